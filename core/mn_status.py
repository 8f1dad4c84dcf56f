"""What ``mipsec status --config mn.toml`` shows of a running MN daemon.

Until the twenty-ninth session the MN had no control socket: an operator
learnt its state from its log alone, and the counters it keeps -- BAs
dropped before decoding, what an accepted BA carried that it did not act
on (``ignored``: an IPv4 home address it did not ask for, a lifetime 0),
its data plane's -- were seen by nobody.  :class:`MnStatus` is told by the
daemon's loop (core/cli.py ``_run_mn``) what it is doing, and reads the
live counters of the SA's ``Registrar``, a kept binding and the data plane
when asked.  It holds no key: the SA is shown by SPI, suite, validity end,
HA and home addresses, as ``mipsec sas`` shows it on the HAC.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mipsec.core.control import Dispatcher
from mipsec.core.version import version

__all__ = ["STATES", "MnStatus"]

# What the daemon is doing: bootstrapping (TLS to the HAC and the MHAuth
# exchange), registering (the new SA's first BU until its BA), registered
# (refreshing the binding), waiting (for the next bootstrap: after a
# failure, or with registration off), stopping.
STATES = ("starting", "bootstrapping", "registering", "registered", "waiting", "stopping")


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).replace(microsecond=0).isoformat()


class MnStatus:
    """The MN daemon's state and counters, for its control socket."""

    def __init__(
        self,
        mn_id: str,
        config_file: str,
        *,
        wall: Callable[[], float] = time.time,
        mono: Callable[[], float] = time.monotonic,
    ) -> None:
        self.mn_id = mn_id
        self.config_file = config_file
        self._wall, self._mono = wall, mono
        self._started_wall, self._started = wall(), mono()
        self.state = "starting"
        self._since = wall()
        self.bootstraps_ok = 0
        self.bootstraps_failed = 0
        self.failures_in_a_row = 0
        self.last_bootstrap: dict[str, Any] | None = None
        self.last_failure: dict[str, Any] | None = None
        self._next_at: float | None = None  # wall time of the next bootstrap, while waiting
        # Live objects read at each status (their counters move meanwhile).
        self.registrar: Any = None
        # The binding kept while the MN bootstraps again (core/mn_keep.py),
        # read through the loop's own variable; None: none.
        self.kept_of: Callable[[], Any] = lambda: None
        self.dataplane: Any = None

    # ------------------------------------------------------------ told by the loop

    def _set(self, state: str) -> None:
        assert state in STATES, state
        if state != self.state:
            self.state, self._since = state, self._wall()
        if state != "waiting":
            self._next_at = None

    def bootstrapping(self) -> None:
        self._set("bootstrapping")

    def bootstrapped(self, status: int | None, ok: bool, reason: str, spi: int | None) -> None:
        """A bootstrap ended: ``ok`` with an SA (``spi``), else why not."""
        entry: dict[str, Any] = {"at": _iso(self._wall()), "status": status, "ok": ok}
        if spi is not None:
            entry["spi"] = spi
        if reason:
            entry["reason"] = reason
        self.last_bootstrap = entry
        if ok:
            self.bootstraps_ok += 1
        else:
            self.bootstraps_failed += 1

    def registering(self, registrar: Any) -> None:
        self.registrar = registrar
        self._set("registering")

    def registered(self) -> None:
        self._set("registered")

    def unregistered(self, registrar: Any) -> None:
        """``registrar``'s SA is no longer the MN's current one."""
        if self.registrar is registrar:
            self.registrar = None

    def waiting(self, seconds: float, why: str, failures_in_a_row: int) -> None:
        """Waiting ``seconds`` for the next bootstrap; ``why`` a failure's
        reason (empty: the normal wait, e.g. registration off)."""
        self._set("waiting")
        self._next_at = self._wall() + max(0.0, seconds)
        self.failures_in_a_row = failures_in_a_row
        if why:
            self.last_failure = {"at": _iso(self._wall()), "reason": why}

    def stopping(self) -> None:
        self._set("stopping")

    # ------------------------------------------------------------ the control socket

    def dispatcher(self) -> Dispatcher:
        return Dispatcher("mn", {"status": self.status})

    async def status(self, args: Mapping[str, Any]) -> dict[str, Any]:
        return self.snapshot()

    def snapshot(self) -> dict[str, Any]:
        now = self._wall()
        out: dict[str, Any] = {
            "role": "mn",
            "version": version(),
            "mn_id": self.mn_id,
            "config": str(Path(self.config_file).resolve()),
            "started": _iso(self._started_wall),
            "uptime_s": int(self._mono() - self._started),
            "state": self.state,
            "state_since": _iso(self._since),
            "bootstraps": {
                "ok": self.bootstraps_ok,
                "failed": self.bootstraps_failed,
                "failures_in_a_row": self.failures_in_a_row,
                "last": self.last_bootstrap,
                "last_failure": self.last_failure,
                "next_in_s": None
                if self._next_at is None
                else round(max(0.0, self._next_at - now), 1),
            },
            "sa": None,
            "binding": None,
            "kept": None,
            "data": None,
        }
        registrar = self.registrar
        if registrar is not None:
            out["sa"] = _sa_row(registrar)
            out["binding"] = _binding_row(registrar)
        kept = self.kept_of()
        if kept is not None and getattr(kept, "live", False):
            out["kept"] = {"spi": kept.registrar.issued.sa.spi, **_binding_row(kept.registrar)}
        if self.dataplane is not None:
            out["data"] = dict(self.dataplane.counts)
        return out


def _sa_row(registrar: Any) -> dict[str, Any]:
    issued = registrar.issued
    sa, boot = issued.sa, issued.bootstrap
    ha = registrar.ha
    return {
        "spi": sa.spi,
        "suite": sa.suite.name,
        "scope": sa.scope,
        "validity_end": sa.validity_end.replace(microsecond=0).isoformat(),
        "ha": None
        if ha is None
        else (f"[{ha[0]}]:{ha[1]}" if ":" in ha[0] else f"{ha[0]}:{ha[1]}"),
        "hoa": None if boot.ip6_hoa is None else str(boot.ip6_hoa),
        "ip4_hoa": None if boot.ip4_hoa is None else str(boot.ip4_hoa),
    }


def _binding_row(registrar: Any) -> dict[str, Any]:
    machine = registrar.machine
    return {
        "registered": bool(machine.registered),
        "lifetime_s": machine.granted_lifetime,
        "last_status": machine.last_status,
        "sequence": machine.sequence,
        "retransmissions": machine.retransmissions,
        "moves": registrar.moves,
        "send_errors": registrar.send_errors,
        # BAs dropped before decoding, by reason; what accepted BAs carried
        # that the MN did not act on, by reason (core/mn_registration.py).
        "drops": dict(machine.drops),
        "ignored": dict(machine.ignored),
    }
