"""Plugin discovery and per-hook registries.

Every plugin -- built-in or third-party -- comes from the ``mipsec``
entry-point group.  A registry hook's factories are indexed by name; two
plugins claiming one name is an error at start, not a silent override.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

import pluggy

from mipsec.core.errors import ConfigError, PluginError
from mipsec.core.hookspecs import PROJECT, MipsecSpec, PluginContext

REGISTRY_HOOKS = (
    "mipsec_auth_methods",
    "mipsec_eap_methods",
    "mipsec_eap_backends",
    "mipsec_accounting_backends",
    "mipsec_credential_backends",
    "mipsec_sa_stores",
    "mipsec_ha_selectors",
    "mipsec_hoa_allocators",
    "mipsec_provisioning_transports",
    "mipsec_eap_tls_identity_policies",
    "mipsec_cli_commands",
)


@dataclass(frozen=True)
class LoadedPlugin:
    name: str  # entry-point name
    module: str
    distribution: str
    version: str
    hooks: tuple[str, ...]
    provides: Mapping[str, tuple[str, ...]]  # hook -> names it provides


def emit(
    pm: pluggy.PluginManager,
    hook: str,
    stats: MutableMapping[str, int],
    log: logging.Logger,
    **kwargs: Any,
) -> None:
    """Call an event hook after the fact; a raising plugin never breaks the role.

    pluggy stops at the first raising implementation: each is called on its
    own so one broken plugin does not silence the others (accounting).  A
    failure is counted in ``stats["hook_errors"]`` and logged in one line.
    """
    caller = getattr(pm.hook, hook)
    for impl in caller.get_hookimpls():
        try:
            impl.function(**{k: kwargs[k] for k in impl.argnames if k in kwargs})
        except Exception as exc:
            stats["hook_errors"] = stats.get("hook_errors", 0) + 1
            log.error(
                "event hook %s of plugin %s failed: %s", hook, impl.plugin_name, type(exc).__name__
            )


def make_plugin_manager(disable: Iterable[str] = ()) -> pluggy.PluginManager:
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(MipsecSpec)
    skip = set(disable)
    for ep in sorted(entry_points(group=PROJECT), key=lambda e: e.name):
        if ep.name in skip:
            continue
        if pm.get_plugin(ep.name) is not None:
            first = _DIST[ep.name]
            if first.value == ep.value:
                continue  # the same plugin found twice on the path
            # Another distribution reusing a name (a built-in's, "psk"):
            # skipping it silently let the first one found win -- or, the
            # other way round, replace a built-in (found in review).
            raise PluginError(
                f"plugin name {ep.name!r} is declared by two entry points: "
                f"{first.value} and {ep.value}; uninstall one, or rename its entry point"
            )
        try:
            plugin = ep.load()
        except Exception as exc:  # a broken third-party plugin must not be a traceback
            raise PluginError(f"plugin {ep.name!r} ({ep.value}) failed to load: {exc}") from exc
        pm.register(plugin, name=ep.name)
        # The distribution is looked up only when listed (describe): each
        # name/version read parses its METADATA file, 0.1-0.3 s of a start.
        _DIST[ep.name] = ep
    return pm


_DIST: dict[str, Any] = {}  # plugin name -> its entry point


def _dist_of(name: str) -> tuple[str, str]:
    ep = _DIST.get(name)
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "?", "?"
    md = dist.metadata  # parsed once here, not once per field
    return md["Name"] or "?", md["Version"] or "?"


def registry(pm: pluggy.PluginManager, hook: str) -> dict[str, Any]:
    """name -> factory (or AuthMethod) for one registry hook."""
    out: dict[str, Any] = {}
    owner: dict[str, str] = {}
    caller = getattr(pm.hook, hook)
    for impl in caller.get_hookimpls():
        for item in _provided(impl.plugin_name, hook, impl.function):
            name = getattr(item, "name", None)
            if not isinstance(name, str) or not name:
                raise PluginError(f"plugin {impl.plugin_name!r}: {hook} returned an unnamed item")
            if name in out:
                raise PluginError(
                    f"{hook}: name {name!r} provided by both {owner[name]!r} and "
                    f"{impl.plugin_name!r}"
                )
            out[name] = item
            owner[name] = impl.plugin_name
    return out


def _provided(plugin: str, hook: str, function: Any) -> list[Any]:
    """What one plugin's registry hook returns; a raising plugin is a
    ``PluginError`` naming it (its exception's type only: a traceback at
    every start and even at ``mipsec --help`` before; found in review)."""
    try:
        return list(function() or ())
    except Exception as exc:
        raise PluginError(f"plugin {plugin!r}: {hook} failed ({type(exc).__name__})") from None


def create(
    pm: pluggy.PluginManager,
    hook: str,
    name: str,
    options: Mapping[str, Any],
    ctx: PluginContext,
    *,
    key: str,
) -> Any:
    """Build the object a config table selects; errors name file and key."""
    factories = registry(pm, hook)
    factory = factories.get(name)
    if factory is None:
        known = ", ".join(sorted(factories)) or "none"
        raise ConfigError(ctx.config_file, key, f"no plugin provides {name!r} (known: {known})")
    with building(ctx.config_file, key, name):
        return factory.create(options, ctx)


@contextlib.contextmanager
def building(config_file: str, key: str, name: str) -> Iterator[None]:
    """Turn what a plugin raises while it builds ``key``'s object into a
    ``ConfigError`` naming the file and the key."""
    try:
        yield
    except (ConfigError, PluginError):
        raise
    except ValueError as exc:
        raise ConfigError(config_file, key, str(exc)) from None
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        raise ConfigError(
            config_file, key, f"cannot open{where}: {exc.strerror or type(exc).__name__}"
        ) from None
    except Exception as exc:
        # A plugin's own bug (a KeyError on an option left out): the key and
        # the plugin named, the exception's type only -- its text may quote
        # an option's value, a secret (found in review: a traceback).
        raise ConfigError(
            config_file, key, f"plugin {name!r} failed to build it ({type(exc).__name__})"
        ) from None


def describe(pm: pluggy.PluginManager) -> list[LoadedPlugin]:
    out: list[LoadedPlugin] = []
    for name, plugin in sorted(pm.list_name_plugin()):
        if plugin is None:
            continue
        hooks = tuple(sorted(h.name for h in pm.get_hookcallers(plugin) or ()))
        provides: dict[str, tuple[str, ...]] = {}
        for hook in hooks:
            if hook in REGISTRY_HOOKS:
                items = _provided(name, hook, getattr(plugin, hook))
                provides[hook] = tuple(getattr(i, "name", "?") for i in items)
        dist, version = _dist_of(name)
        out.append(
            LoadedPlugin(
                name, getattr(plugin, "__name__", repr(plugin)), dist, version, hooks, provides
            )
        )
    return out
