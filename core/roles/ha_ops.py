"""What the HA's control socket serves: status, SAs, bindings, reload.

Read-only views of the service (``roles/ha.py``) and its sans-I/O core,
plus a reload of what an HA can change live (log level, the longest
binding lifetime granted).  Rows are built field by field: no key leaves.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mipsec.core.config import HAConfig, load_config
from mipsec.core.control import Dispatcher, arg_str
from mipsec.core.errors import ConfigError
from mipsec.core.reload import ReloadRunner, restart_keys, set_log_level
from mipsec.core.roles.ha import HaService
from mipsec.core.roles.hac_ops import sa_row
from mipsec.core.version import version

log = logging.getLogger("mipsec.ha")

LIVE_KEYS = frozenset({"log_level", "log_format", "log_levels", "ha"})
# Under [ha], only these apply live; every other [ha] key needs a restart.
LIVE_HA_KEYS = frozenset({"max_binding_lifetime"})


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).replace(microsecond=0).isoformat()


class HaOps:
    def __init__(self, service: HaService, config_file: str) -> None:
        self.svc = service
        self.config_file = config_file
        self.started = time.monotonic()
        self.started_at = datetime.now(UTC).replace(microsecond=0)
        self.reloader = ReloadRunner("ha", config_file, self._reload)

    def dispatcher(self) -> Dispatcher:
        return Dispatcher(
            "ha",
            {
                "status": self.status,
                "sas": self.sas,
                "bindings": self.bindings,
                "reload": self.reload,
            },
        )

    async def status(self, args: Mapping[str, Any]) -> dict[str, Any]:
        svc = self.svc
        stats = svc.stats()
        installed = svc.core.installed()
        return {
            "role": "ha",
            "version": version(),
            "id": svc.cfg.ha.id,
            "config": str(Path(self.config_file).resolve()),
            "started": self.started_at.isoformat(),
            "uptime_s": int(time.monotonic() - self.started),
            "listen": [f"{h}:{p}" if ":" not in h else f"[{h}]:{p}" for h, p in svc.addresses],
            "plugins": sorted(n for n, p in svc.pm.list_name_plugin() if p),
            "sas": {
                "live": len(installed),
                "by_suite": dict(Counter(i.sa.suite.name for i in installed)),
            },
            "bindings": len(svc.bindings),
            # Every counter of the core and the shell: packets, BUs, BAs by
            # status, drops by reason, pulls, store errors.
            "counters": stats,
            "drops": stats.get("drops", {}),
            "provisioning": {
                "listener": svc.cfg.provisioning is not None,
                "pull": svc.cfg.pull is not None,
                "pulls_in_flight": stats.get("pulls_in_flight", 0),
            },
            "last_reload": self.reloader.last,
        }

    async def sas(self, args: Mapping[str, Any]) -> dict[str, Any]:
        mn_id = arg_str(args, "mn_id", required=False)
        rows = [
            sa_row(i) for i in self.svc.core.installed() if mn_id is None or i.sa.mn_id == mn_id
        ]
        rows.sort(key=lambda r: (r["mn_id"], r["validity_end"], r["spi"]))
        return {"role": "ha", "sas": rows}

    async def bindings(self, args: Mapping[str, Any]) -> dict[str, Any]:
        by_spi = {i.sa.spi: i.sa.mn_id for i in self.svc.core.installed()}
        now = time.time()
        rows = []
        for b in self.svc.bindings:
            rows.append(
                {
                    "hoa": b.hoa,
                    "ip4_hoa": b.ip4_hoa,
                    "coa": f"[{b.coa_host}]:{b.coa_port}"
                    if ":" in b.coa_host
                    else f"{b.coa_host}:{b.coa_port}",
                    "mn_id": by_spi.get(b.spi, "-"),
                    "spi": b.spi,
                    "sequence": b.sequence,
                    "lifetime": b.lifetime,
                    "expires": _iso(b.expires_at),
                    "remaining_s": max(0, int(b.expires_at - now)),
                }
            )
        rows.sort(key=lambda r: str(r["hoa"]))
        return {"role": "ha", "bindings": rows}

    async def reload(self, args: Mapping[str, Any]) -> dict[str, Any]:
        return await self.reloader.via_control()

    def _reload(self) -> list[str]:
        from mipsec.core.roles.preflight import preflight

        svc, file = self.svc, self.config_file
        new = load_config(file, "ha")
        assert isinstance(new, HAConfig)
        preflight(new, file)
        changed, restart = restart_keys(svc.cfg, new, LIVE_KEYS)
        restart += [
            f"ha.{k}"
            for k in sorted(type(svc.cfg.ha).model_fields)
            if k not in LIVE_HA_KEYS and getattr(svc.cfg.ha, k) != getattr(new.ha, k)
        ]
        if restart:
            raise ConfigError(file, ", ".join(restart), "changes only with a restart")
        svc.cfg = new
        svc.core.max_binding_lifetime = float(new.ha.max_binding_lifetime)
        set_log_level(new)
        return changed
