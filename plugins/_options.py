"""Shared helpers of the built-in plugins (kept in ``core/options.py``, which
the core's own factories use too)."""

from mipsec.core.options import error_text, parse_options, resolve_path

__all__ = ["error_text", "parse_options", "resolve_path"]
