"""HA selectors: ``fewest-sas`` (default) and ``first``.

RFC 6618 §5.7.1 lets the HAC choose which HA address it provisions; these
selectors make that choice from the configured candidates.  ``fewest-sas``
spreads MNs over HAs by live SA count (from the SA store's
``count_by_ha``), ties broken by configuration order so the choice is
deterministic.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict

from mipsec.core.hookspecs import PluginContext, hookimpl
from mipsec.core.model import HomeAgentInfo
from mipsec.plugins._options import parse_options


class _NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FewestSAsSelector:
    """The candidate holding the fewest live SAs; the earliest configured on a tie."""

    def select(
        self, mn_id: str, candidates: Sequence[HomeAgentInfo], live_sas: Mapping[str, int]
    ) -> HomeAgentInfo | None:
        best: HomeAgentInfo | None = None
        best_n = 0
        for ha in candidates:
            n = live_sas.get(ha.ha_id, 0)
            if best is None or n < best_n:  # strict: ties keep the earlier one
                best, best_n = ha, n
        return best


class FirstSelector:
    """Always the first candidate (active/standby set-ups)."""

    def select(
        self, mn_id: str, candidates: Sequence[HomeAgentInfo], live_sas: Mapping[str, int]
    ) -> HomeAgentInfo | None:
        return candidates[0] if candidates else None


class FewestSAsFactory:
    name = "fewest-sas"

    def create(self, options: Mapping[str, Any], ctx: PluginContext) -> FewestSAsSelector:
        parse_options(_NoOptions, options)
        return FewestSAsSelector()


class FirstFactory:
    name = "first"

    def create(self, options: Mapping[str, Any], ctx: PluginContext) -> FirstSelector:
        parse_options(_NoOptions, options)
        return FirstSelector()


@hookimpl
def mipsec_ha_selectors() -> list[FewestSAsFactory | FirstFactory]:
    return [FewestSAsFactory(), FirstFactory()]
