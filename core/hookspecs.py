"""The one place that defines mipsec's plugin hooks (pluggy).

Every hook is synchronous (pluggy calls are): registry hooks return
*factories*, and the objects those factories build do the work.  Built-in
plugins register through the ``mipsec`` entry-point group exactly like a
third-party package, so they have no privilege an outside plugin lacks.

Registry hooks
    Each returns a list of factories.  A factory has a ``name`` (what a
    configuration file selects it by) and a ``create(options, ctx)`` method.
    ``options`` is the plain mapping from the TOML table; the factory
    validates it (pydantic recommended) and raises ``ValueError`` naming the
    key on bad input -- the loader turns that into a ``ConfigError`` with the
    file name.  Two plugins providing the same name is an error at start.

Event hooks
    Called after the fact for accounting and logging; they return nothing,
    must not block, and never receive key material.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import pluggy

from mipsec.core.model import HomeAgentInfo, HomeAssignment, IssuedSA

PROJECT = "mipsec"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@dataclass(frozen=True)
class PluginContext:
    """What a factory may know about where it runs."""

    role: str  # "hac" | "ha" | "mn"
    base_dir: Path  # directory of the configuration file: relative paths resolve here
    config_file: str = "<memory>"
    extra: Mapping[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- objects


@runtime_checkable
class CredentialBackend(Protocol):
    """Looks up an MN's credentials.  Returns None for an unknown identity:
    the caller (never the backend) decides how not to reveal that."""

    def get_psk(self, mn_id: str) -> bytes | None: ...

    def close(self) -> None: ...


@runtime_checkable
class SAStore(Protocol):
    """Live SAs of a HAC or HA, keyed by SPI.

    ``add`` must be atomic and return False (storing nothing) when the SPI is
    already held by a live SA -- that is how SPI uniqueness survives restarts
    and is shared by every HAC using the same store.  Expired SAs are not
    live: ``get`` never returns one.

    The roles also use these methods when a store has them (looked up by
    name; the SQLite and memory stores, ``plugins/sa_store_sqlite.py``, have
    them all and document each).  Without one, the role falls back to the
    methods above -- correct, but at a cost that grows with the live SAs
    (issue 9), so a store meant for 100,000 MNs should offer them:

    * HAC, every bootstrap: ``live_summary`` (SAs per HA and the HoA table
      in one look, kept in memory), ``live_spis_for_mn``;
      ``track_delivery`` (an attribute the HAC sets true),
      ``delivered_many`` and ``undelivered`` together (an SA stays
      "pending" until its 200 has left, so a crash in between cannot leave
      it live);
      ``confirm_retired_many``; ``retire_record(spi, reason)`` (``retire``
      answering ``(mn_id, ha_id, validity_end)`` of the SA taken back, or
      None, with no key unwrapped: an MN's older SA is retired on every
      re-bootstrap; a row whose keys fail authentication is still answered
      for, so it is withdrawn from its HA); ``transaction`` (a context manager: every
      write inside is one transaction, one commit, and is visible to the
      store's own reads at once -- the HAC stores the SAs of one event-loop
      turn in it, choosing each one's home address with the earlier ones in
      view; on any error it rolls everything back and re-raises).
    * HAC, operator commands: ``live_counts`` and ``live_listing`` (columns
      only, no key unwrapped), ``live_counts_apart`` and
      ``live_listing_apart`` (the same on a connection of their own, called
      from a worker thread: they must not touch the role's connection; return
      None to be asked on the loop instead), ``live_for_nai`` (every spelling
      of the realm, for ``revoke``).
    * HA: ``add_many``, ``discard_many``, ``transaction`` and
      ``shared_connection`` (a burst of installs and their binding-cache
      records in one commit), ``has_live``; ``live_page(now, after, limit)``
      -- up to ``limit`` rows with an SPI above ``after`` in SPI order: their
      live SAs and the last SPI read (None when no row is left), so the HA
      serves while it loads 100,000 SAs (without it, it loads them all first).
    * Both, expiry timers: ``expire_some(now, limit)`` -- delete at most
      ``limit`` expired SAs, oldest first, and return ``(spi, mn_id,
      validity_end)`` of each, no key unwrapped; the roles call it again,
      after a turn of the event loop, while it returns ``limit`` of them
      (``expire`` does everything in one call: seconds for 100,000 SAs).
    """

    def add(self, issued: IssuedSA) -> bool: ...

    def get(self, spi: int, now: datetime) -> IssuedSA | None: ...

    def remove(self, spi: int) -> IssuedSA | None: ...

    def live(self, now: datetime) -> list[IssuedSA]: ...

    def expire(self, now: datetime) -> list[IssuedSA]:
        """Delete and return every SA whose validity end is <= now."""
        ...

    def hoas_in_use(self, now: datetime) -> dict[str, str]:
        """Every home address (``str``) held by a live SA -> its ``mn_id``."""
        ...

    def count_by_ha(self, now: datetime) -> dict[str, int]:
        """Number of live SAs per ``ha_id``."""
        ...

    def live_for_mn(self, mn_id: str, now: datetime) -> list[IssuedSA]:
        """The live SAs of one MN, oldest first (validity end, then SPI)."""
        ...

    def retire(self, spi: int, reason: str) -> IssuedSA | None:
        """Remove a live SA and record it as retired, atomically (see the SQLite store)."""
        ...

    def retired_unconfirmed(self, now: datetime) -> list[tuple[int, str, str, datetime]]:
        """``(spi, mn_id, ha_id, validity_end)`` of retired SAs still to withdraw from their HA."""
        ...

    def confirm_retired(self, spi: int) -> None:
        """The HA confirmed the withdrawal of ``spi``."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class HoAAllocator(Protocol):
    """Assigns home addresses/prefixes from pools.

    Never one home address to two live MNs: ``in_use`` maps every address
    held by a live SA to its ``mn_id``; an MN that already holds one gets it
    again (re-bootstrap keeps the HoA).  Raises ``LookupError`` when a pool is
    exhausted (the HAC answers 503).  ``in_use`` may be the store's live table
    (``mipsec.core.hoa_table.HoATable``, whose journal lets an allocator
    follow it change by change): read it during the call, never keep it as a
    snapshot.
    """

    def assign(self, mn_id: str, in_use: Mapping[str, str]) -> HomeAssignment: ...


@runtime_checkable
class HASelector(Protocol):
    """Chooses the HA for a new SA; None = no HA available (503)."""

    def select(
        self, mn_id: str, candidates: Sequence[HomeAgentInfo], live_sas: Mapping[str, int]
    ) -> HomeAgentInfo | None: ...


@runtime_checkable
class ProvisioningTransport(Protocol):
    """Hands an SA to an HA (PROFILE §9).  Async: it does network I/O, but it
    is built by a synchronous factory.

    Optional: ``stale() -> bool``, True when a file it read at build time
    (a client certificate, key or CA) now holds something else or cannot be
    read.  The HAC's next reload then builds it again from the same options
    and closes this one once the requests it may still carry are over
    (core/reload.py ``stale``)."""

    async def provision(self, ha: HomeAgentInfo, issued: IssuedSA, timeout: float) -> None:
        """Return once the HA confirmed; raise TimeoutError or ConnectionError."""
        ...

    async def withdraw(self, ha: HomeAgentInfo, spi: int, timeout: float) -> None: ...


class Factory(Protocol):
    name: str

    def create(self, options: Mapping[str, Any], ctx: PluginContext) -> Any: ...


class CliCommand(Protocol):
    """A subcommand of the ``mipsec`` launcher that a plugin adds
    (``mipsec NAME ...``), e.g. a tool for the plugin's own files."""

    name: str  # the word after ``mipsec``; a built-in command's name is refused
    help: str  # one line, shown in ``mipsec --help``

    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace) -> int:
        """The exit status: 0 done, 1 failed, 2 bad input (one line on stderr)."""
        ...


# ---------------------------------------------------------------- hooks


class MipsecSpec:
    @hookspec
    def mipsec_auth_methods(self) -> Sequence[Any]:
        """Return authentication methods (``mipsec.core.authmethod.AuthMethod``).

        Each has a ``name`` used in ``auth-method`` on the wire (``psk``,
        ``eap``) and builds per-exchange sans-I/O server and peer machines.
        """

    @hookspec
    def mipsec_eap_methods(self) -> Sequence[Any]:
        """Return EAP methods (``mipsec.core.eap.method.EapMethodPlugin``).

        Each has a ``name`` (what ``[eap] methods`` / ``[methods.eap] types``
        select), its EAP ``eap_type`` and a factory per role it implements
        (``peer`` on the MN, ``server`` on the HAC), built at start from the
        method's validated options.
        """

    @hookspec
    def mipsec_eap_tls_identity_policies(self) -> Sequence[Any]:
        """Return EAP-TLS identity policies (``mipsec.core.eap.tls_identity.EapTlsIdentityPolicy``).

        Each has a ``name`` (what ``[methods.eap.tls] identity_policy``
        selects) and ``check(cert, mn_id) -> str | None``: None when the
        verified MN client certificate proves ``mn_id``, else the reason.
        Built in: ``rfc822name`` (an rfc822Name SAN equal to the NAI, realm
        case-insensitive).
        """

    @hookspec
    def mipsec_eap_backends(self) -> Sequence[Factory]:
        """Return factories of HAC EAP back ends (``mipsec.core.eap.backend.EapBackend``).

        The HAC's EAP authenticator routes each identity to one back end:
        ``local`` runs EAP server methods in the HAC; ``radius`` passes EAP
        through to an AAA server (RFC 3579).  ``create(options, ctx)``.
        """

    @hookspec
    def mipsec_accounting_backends(self) -> Sequence[Factory]:
        """Return factories of HAC accounting back ends (e.g. ``radius``, RFC 2866).

        The HAC's optional ``[accounting]`` table selects one by ``backend``;
        ``create(options, ctx)`` returns an object that the HAC registers on
        its plugin manager at start, so its ``@hookimpl`` event methods
        (``mipsec_sa_issued``, ``mipsec_sa_expired``, ``mipsec_sa_withdrawn``)
        receive the events.  Those must not block: queue, and send from a
        task.  An ``async aclose()`` method, when present, is awaited at
        service stop (flush, release sockets).
        """

    @hookspec
    def mipsec_credential_backends(self) -> Sequence[Factory]:
        """Return factories of ``CredentialBackend`` (e.g. ``toml``, ``sqlite``)."""

    @hookspec
    def mipsec_sa_stores(self) -> Sequence[Factory]:
        """Return factories of ``SAStore`` (e.g. ``sqlite``, ``memory``)."""

    @hookspec
    def mipsec_ha_selectors(self) -> Sequence[Factory]:
        """Return factories of ``HASelector`` (e.g. ``fewest-sas``)."""

    @hookspec
    def mipsec_hoa_allocators(self) -> Sequence[Factory]:
        """Return factories of ``HoAAllocator`` (e.g. ``pool``).

        On the HAC, ``ctx.extra["reserved_addresses"]`` holds the addresses
        the HAC itself provisions to MNs as servers -- every ``[[ha]]``
        ``address6``/``address4`` and the ``[bootstrap]`` DNS servers
        (``ipaddress`` objects): an allocator must never hand one out as a
        home address (the built-in ``pool`` excludes them)."""

    @hookspec
    def mipsec_provisioning_transports(self) -> Sequence[Factory]:
        """Return factories of ``ProvisioningTransport`` (``local``, ``tls``)."""

    @hookspec
    def mipsec_cli_commands(self) -> Sequence[CliCommand]:
        """Return launcher subcommands (``CliCommand``): ``mipsec NAME ...``.

        E.g. the ``sqlite`` credential backend's ``mipsec credentials``.  Two
        plugins offering one name, or a plugin offering a built-in's name, is
        an error naming them.
        """

    # ---- events (accounting, logging); never given key material

    @hookspec
    def mipsec_mn_authenticated(self, mn_id: str, method: str, peer: str) -> None:
        """An MN proved its identity (before SA issuing)."""

    @hookspec
    def mipsec_auth_failed(
        self, mn_id: str, method: str, status: int | None, peer: str, reason: str
    ) -> None:
        """An exchange ended without an SA: a final status other than 200, or
        (``status`` None) no final response at all (timeout, peer closed).

        ``reason`` tells why (``bad-auth``, ``unknown-identity``, ``timeout``,
        ``peer-closed``, ``bad-request``...): the wire never reveals an unknown
        identity (PROFILE §4), the audit log does.  Provisioning failures are
        ``mipsec_provisioning_failed``, not this.
        """

    @hookspec
    def mipsec_provisioning_failed(
        self, mn_id: str, ha_id: str, spi: int | None, status: int, reason: str, peer: str
    ) -> None:
        """An authenticated MN got no SA: no HA or home address (503), the HA did
        not confirm (504), an internal failure (500), or the MN went away before
        its 200 -- whatever was provisioned has been taken back."""

    @hookspec
    def mipsec_sa_issued(
        self,
        spi: int,
        mn_id: str,
        suite: str,
        scope: int,
        validity_end: datetime,
        ha_id: str,
        peer: str,
    ) -> None:
        """An SA was issued and confirmed by its HA (the MN gets 200 next)."""

    @hookspec
    def mipsec_sa_expired(self, spi: int, mn_id: str, validity_end: datetime) -> None:
        """A live SA reached its validity end and was removed."""

    @hookspec
    def mipsec_sa_withdrawn(self, spi: int, mn_id: str, ha_id: str, reason: str) -> None:
        """A live SA was taken back before its validity end and is dead for good.

        ``reason``: ``superseded`` (the MN holds a newer SA), ``revoked``
        (by the operator), ``provisioning-failed`` (the MN never got it).
        """

    # ---- HA events (accounting, logging, monitoring); never given key material

    @hookspec
    def mipsec_ha_sa_installed(
        self, ha_id: str, spi: int, mn_id: str, suite: str, scope: int, validity_end: datetime
    ) -> None:
        """The HA installed an SA a HAC provisioned or it pulled (not those restored at start)."""

    @hookspec
    def mipsec_ha_sa_withdrawn(self, ha_id: str, spi: int) -> None:
        """The HAC withdrew an SA from this HA: its SPI is dead for good."""

    @hookspec
    def mipsec_ha_binding_changed(
        self, ha_id: str, event: str, hoa: str, coa: str, lifetime: int, spi: int
    ) -> None:
        """A binding cache change: ``event`` is ``added``, ``refreshed``, ``deleted``
        or ``expired``; ``coa`` is ``address:port`` (``[v6]:port``)."""
