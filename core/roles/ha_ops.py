"""What the HA's control socket serves: status, SAs, bindings, reload.

Read-only views of the service (``roles/ha.py``) and its sans-I/O core,
plus a reload of what an HA can change live (log level, the longest
binding lifetime granted).  Rows are built field by field: no key leaves.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mipsec.core import certexpiry
from mipsec.core.config import HAConfig, ProvisioningListener, PullConfig, load_config
from mipsec.core.control import Dispatcher
from mipsec.core.errors import ConfigError
from mipsec.core.model import IssuedSA
from mipsec.core.nai import nai_key
from mipsec.core.reload import ReloadRunner, restart_keys, set_log_level
from mipsec.core.roles.ha import HaService
from mipsec.core.roles.hac_ops import mn_id_arg, sa_row
from mipsec.core.roles.provserver import ACCESS_LEAVES, CAP_LEAF, TIMEOUT_LEAF
from mipsec.core.version import version

log = logging.getLogger("mipsec.ha")

LIVE_KEYS = frozenset({"log_level", "log_format", "log_levels", "ha"})
# Under [ha], only these apply live; every other [ha] key needs a restart.
LIVE_HA_KEYS = frozenset({"max_binding_lifetime", "max_spi_records"})
# Under [provisioning], who may connect (ACCESS_LEAVES): adding a HAC, or
# cutting one off, needs no restart of the HA (and its data plane); nor does
# the listener's timeout and its cap on connections.  Inside an existing
# [pull] table every option: each pull reads them (and its files) as they
# are then, and the pull gate takes the new limits in place (PULL_LIMITS);
# adding or removing [pull] needs a restart (it decides whether SAs can come
# back from the HAC, and so what the binding cache must keep).
PULL_LEAVES = frozenset(f"pull.{k}" for k in PullConfig.model_fields)
PULL_LIMITS = frozenset(
    f"pull.{k}" for k in ("rate", "burst", "max_in_flight", "source_rate", "source_burst")
)
LIVE_LEAVES = ACCESS_LEAVES | {TIMEOUT_LEAF, CAP_LEAF} | PULL_LEAVES


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
            listings=("sas", "bindings"),
        )

    async def status(self, args: Mapping[str, Any]) -> dict[str, Any]:
        svc = self.svc
        stats = svc.stats()
        out = {
            "role": "ha",
            "version": version(),
            "id": svc.cfg.ha.id,
            "config": str(Path(self.config_file).resolve()),
            "started": self.started_at.isoformat(),
            "uptime_s": int(time.monotonic() - self.started),
            "listen": [f"{h}:{p}" if ":" not in h else f"[{h}]:{p}" for h, p in svc.addresses],
            "plugins": sorted(n for n, p in svc.pm.list_name_plugin() if p),
            "sas": {
                "live": svc.core.sa_count(),
                "by_suite": {suite.name: n for suite, n in svc.core.per_suite().items()},
            },
            "bindings": len(svc.bindings),
            # Every counter of the core and the shell: packets, BUs, BAs by
            # status, drops by reason, pulls, store errors.
            "counters": stats,
            "drops": stats.get("drops", {}),
            "provisioning": {
                "listener": svc.cfg.provisioning is not None,
                **_access(svc.cfg.provisioning, svc._provisioning),
                "pull": svc.cfg.pull is not None,
                "pulls_in_flight": stats.get("pulls_in_flight", 0),
            },
            "last_reload": self.reloader.last,
            "certificates": certexpiry.status_rows(self.svc.certificates(), datetime.now(UTC)),
        }
        # The threads checkpointing the SA store's file and (with [bindings]
        # path) the binding cache's (core/walcheckpoint.py).
        for key, checkpointer in (
            ("store_checkpoint", getattr(svc.store, "checkpointer", None)),
            ("bindings_checkpoint", svc.bindings.checkpointer),
        ):
            if checkpointer is not None:
                out[key] = checkpointer.status()
        return out

    async def sas(self, args: Mapping[str, Any]) -> dict[str, Any]:
        # Any spelling of the realm; an identity no MN can send is refused,
        # as on the HAC.
        mn_id = mn_id_arg(args)[1] if args.get("mn_id") is not None else None
        # The list of SAs is taken here (references: the SAs are immutable),
        # the rows are built and sorted in a worker thread: at 100,000 SAs
        # that took 1.9 s of the loop that forwards the MNs' packets.
        installed = self.svc.core.installed()
        return {"role": "ha", "sas": await asyncio.to_thread(_sa_rows, installed, mn_id)}

    async def bindings(self, args: Mapping[str, Any]) -> dict[str, Any]:
        # Bindings change in place (a refresh), so their fields are copied
        # here, on the loop; mn_ids, formatting and sorting in a worker
        # thread (0.9 s of the loop at 100,000 bindings before).
        fields = [
            (b.hoa, b.ip4_hoa, b.coa_host, b.coa_port, b.spi, b.sequence, b.lifetime, b.expires_at)
            for b in self.svc.bindings
        ]
        installed = self.svc.core.installed()
        rows = await asyncio.to_thread(_binding_rows, fields, installed, time.time())
        return {"role": "ha", "bindings": rows}

    async def reload(self, args: Mapping[str, Any]) -> dict[str, Any]:
        return await self.reloader.via_control()

    def _reload(self) -> list[str]:
        changed = self._apply()
        certexpiry.report(log, "ha", self.svc.certificates(), datetime.now(UTC))
        return changed

    def _apply(self) -> list[str]:
        from mipsec.core.roles.preflight import preflight

        svc, file = self.svc, self.config_file
        new = load_config(file, "ha")
        assert isinstance(new, HAConfig)
        preflight(new, file)
        changed, restart = restart_keys(svc.cfg, new, LIVE_KEYS, LIVE_LEAVES)
        restart += [
            f"ha.{k}"
            for k in sorted(type(svc.cfg.ha).model_fields)
            if k not in LIVE_HA_KEYS and getattr(svc.cfg.ha, k) != getattr(new.ha, k)
        ]
        if restart:
            raise ConfigError(file, ", ".join(restart), "changes only with a restart")
        prov = svc._provisioning
        renew = prov.renewal(file, "provisioning.") if prov is not None else None
        if renew is not None:
            changed = sorted({*changed, "provisioning.cert"})
        access = prov is not None and bool(ACCESS_LEAVES & set(changed))
        timeout = prov is not None and TIMEOUT_LEAF in changed
        cap = prov is not None and CAP_LEAF in changed
        limits = sorted(PULL_LIMITS & set(changed))
        if limits and new.pull is not None:
            svc.apply_pull_limits(new.pull)
        svc.cfg = new
        svc.core.max_binding_lifetime = float(new.ha.max_binding_lifetime)
        svc.core.max_spi_records = new.ha.max_spi_records
        if access:
            assert new.provisioning is not None
            prov.apply_access(new.provisioning)
        if timeout:
            assert prov is not None and new.provisioning is not None
            prov.apply_timeout(new.provisioning)
        if cap:
            assert prov is not None and new.provisioning is not None
            prov.apply_max_connections(new.provisioning)
        if renew is not None and new.provisioning is not None:
            renew()
            log.info(
                "ha provisioning listener now presents the certificate in %s to new connections",
                new.provisioning.cert,
            )
        if limits and new.pull is not None:
            p = new.pull
            log.info(
                "ha pull limits from now on: %g a second, bursts of %d, %d at once; per "
                "source %g a second, bursts of %d (sightings kept): %s",
                p.rate,
                p.burst,
                p.max_in_flight,
                p.source_rate,
                p.source_burst,
                ", ".join(limits),
            )
        pulled = sorted((PULL_LEAVES - PULL_LIMITS) & set(changed))
        if pulled and new.pull is not None:
            log.info(
                "ha pulls from %s port %d (server_name %s) from its next pull on: %s",
                new.pull.host,
                new.pull.port,
                new.pull.server_name or new.pull.host,
                ", ".join(pulled),
            )
        set_log_level(new)
        return changed


def _access(cfg: ProvisioningListener | None, server: Any) -> dict[str, Any]:
    """Who may connect to the provisioning listener now (a reload may have
    changed it), and the connections it holds whose client was admitted."""
    if cfg is None:
        return {}
    allowed = cfg.allowed_clients
    return {
        "client_names": list(cfg.client_names),
        "allowed_clients": None if allowed is None else [str(n) for n in allowed],
        "sessions": server.sessions if server is not None else 0,
        "timeout_s": cfg.timeout,
        "max_connections": cfg.max_connections,
    }


def _sa_rows(installed: list[IssuedSA], mn_id: str | None) -> list[dict[str, Any]]:
    # Any spelling of the realm, as the HAC's ``sas --mn-id`` (core/nai.py);
    # an exact match found nothing for another case (found in review).
    want = None if mn_id is None else nai_key(mn_id)
    rows = [sa_row(i) for i in installed if want is None or nai_key(i.sa.mn_id) == want]
    rows.sort(key=lambda r: (r["mn_id"], r["validity_end"], r["spi"]))
    return rows


def _binding_rows(
    fields: list[tuple[str, str | None, str, int, int, int, int, float]],
    installed: list[IssuedSA],
    now: float,
) -> list[dict[str, Any]]:
    by_spi = {i.sa.spi: i.sa.mn_id for i in installed}
    rows = [
        {
            "hoa": hoa,
            "ip4_hoa": ip4_hoa,
            "coa": f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
            "mn_id": by_spi.get(spi, "-"),
            "spi": spi,
            "sequence": sequence,
            "lifetime": lifetime,
            "expires": _iso(expires_at),
            "remaining_s": max(0, int(expires_at - now)),
        }
        for hoa, ip4_hoa, host, port, spi, sequence, lifetime, expires_at in fields
    ]
    rows.sort(key=lambda r: str(r["hoa"]))
    return rows
