"""Configuration: TOML files validated by pydantic models.

A wrong file fails at start with the file, the key and the reason
(``ConfigError``), never with a traceback.  Paths are resolved against the
directory of the file that names them.  Plugin tables (``[credentials]``,
``[sa_store]``, ...) name the plugin and pass every other key to it as its
options; the plugin validates them.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Any, BinaryIO, Literal

from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from mipsec.core import pullgate
from mipsec.core.confvalues import (
    DnsName,
    HaId,
    Host,
    InterfaceText,
    IPv4Text,
    IPv6Text,
    ListenAddresses,
    NetworkText,
)
from mipsec.core.errors import ConfigError, HeaderError
from mipsec.core.filedigest import read_regular
from mipsec.core.model import DEFAULT_MIP6_PORT
from mipsec.core.options import BOOL_FOR_NUMBER, takes_bool
from mipsec.core.suites import DEFAULT_ALLOWED, Suite, suite_from_name
from mipsec.core.tomltext import TomlTextError, parse_toml
from mipsec.core.wire.values import parse_nai

DEFAULT_HAC_PORT = 7872  # PROFILE §1

Port = Annotated[int, Field(ge=1, le=65535)]
Seconds = Annotated[float, Field(gt=0, le=86400 * 365)]


MaxConnections = Annotated[int, Field(ge=1, le=100_000)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        # core/options.py, takes_bool: true is not 1 here.
        if isinstance(value, bool) and info.field_name is not None:
            field = cls.model_fields.get(info.field_name)
            if field is not None and not takes_bool(field.annotation):
                raise ValueError(BOOL_FOR_NUMBER)
        return value


def _renamed(data: Any, old: str, new: str) -> Any:
    """A key and its old name (an ``AliasChoices``) must not both be set."""
    if isinstance(data, dict) and old in data and new in data:
        raise ValueError(f"{old}: old name of {new}; set only {new}")
    return data


class PluginRef(BaseModel):
    """A table that selects a plugin by name; all other keys are its options."""

    model_config = ConfigDict(extra="allow", frozen=True)

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class CredentialsRef(PluginRef):
    backend: str = "toml"


class SAStoreRef(PluginRef):
    backend: str = "sqlite"


class HoAAllocatorRef(PluginRef):
    allocator: str = "pool"


class HASelectorRef(PluginRef):
    selector: str = "fewest-sas"


class AccountingRef(PluginRef):
    backend: str = "radius"


def _suites(values: list[str]) -> tuple[Suite, ...]:
    out: list[Suite] = []
    for v in values:
        out.append(suite_from_name(v))  # ValueError names the bad token
    if not out:
        raise ValueError("at least one ciphersuite is needed")
    return tuple(out)


def _parse_suites(v: Any) -> Any:
    if isinstance(v, list | tuple) and all(isinstance(x, str) for x in v):
        return _suites(list(v))
    return v


# Suites by name (AES_128_CBC_SHA256) or wire token ({00,3C}); printed by name.
SuiteList = Annotated[
    tuple[Suite, ...],
    BeforeValidator(_parse_suites),
    PlainSerializer(lambda v: [s.name for s in v], return_type=list[str]),
]


class PolicyConfig(_Strict):
    # Fail closed: the default names only the built-in PSK method; EAP is
    # enabled explicitly (it needs its own configuration).
    methods: Annotated[tuple[str, ...], Field(min_length=1)] = ("psk",)
    realms: dict[str, tuple[str, ...]] = Field(default_factory=dict)
    suites: SuiteList = DEFAULT_ALLOWED
    max_scope: Literal[0, 1] = 1
    sa_lifetime: Seconds = 3600.0
    # Live SAs one MN may hold; once a newer one is delivered, older ones
    # beyond this are withdrawn from their HAs (issue 6 item 3).
    max_sas_per_mn: Annotated[int, Field(ge=1, le=64)] = 1
    # An MN whose newest SA was issued less than this many seconds ago gets
    # 503 with retry-after instead of another SA: each re-bootstrap leaves
    # a retired SPI on the HAC and a withdrawal record on the HA until the
    # old SA's end, and one credential bootstrapping in a loop grew both
    # without bound (~460,000 of each per hour from one sequential client,
    # found in review).  0: no limit (labs and benches, which bootstrap
    # one MN back to back: ``mipsec init`` writes 0).
    min_rebootstrap_interval: Annotated[float, Field(ge=0, le=86400)] = 10.0


class HAEntry(_Strict):
    id: HaId
    address6: IPv6Text | None = None
    address4: IPv4Text | None = None
    port: Port = DEFAULT_MIP6_PORT  # the MN-HA UDP port (mip6-port)
    # No default: how an SA reaches its HA is never chosen silently
    # ("tls" over the network, "local" for an HA in the HAC's own process).
    transport: str
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_address(self) -> HAEntry:
        if self.address6 is None and self.address4 is None:
            raise ValueError("an HA needs address6 or address4")
        return self


class BootstrapConfig(_Strict):
    dns_ip6: IPv6Text | None = None
    dns_ip4: IPv4Text | None = None


class HACService(_Strict):
    listen: ListenAddresses = ("127.0.0.1", "::1")
    port: Port = DEFAULT_HAC_PORT
    cert: Path
    key: Path
    strict_rfc6618: bool = False
    # PROFILE §1 timeouts, deadlines rather than idle timers (issue 6): the
    # handshake from the accept; the wait for a request's first octet; the
    # request from its first octet to its last.
    handshake_timeout: Seconds = 10.0
    idle_timeout: Seconds | None = None  # None: request_timeout
    request_timeout: Seconds = 10.0
    # The whole MHAuth exchange, from the accept to the final response: a
    # peer that keeps completing requests slowly (an EAP conversation may
    # take up to 255 of them) holds its connection this long at most.
    exchange_timeout: Seconds = 120.0
    provisioning_timeout: Seconds = 5.0
    # Every connection held, pending handshakes included; at the cap the one
    # that has waited longest without completing a request is evicted.
    max_connections: Annotated[
        MaxConnections,
        Field(validation_alias=AliasChoices("max_connections", "max_sessions")),
    ] = 1024
    # SA issues in progress at once; beyond it the MN gets 503 + retry-after.
    max_in_progress: Annotated[int, Field(ge=1, le=100_000)] = 128
    # New connections per second from one source (an IPv4 address, an IPv6
    # /64), ``per_source_burst`` at once; the rest are closed as they are
    # accepted, before any TLS work (core/ratelimit.py).  0: no limit.
    per_source_rate: Annotated[float, Field(ge=0, le=1_000_000)] = 0.0
    per_source_burst: Annotated[int, Field(ge=1, le=1_000_000)] = 20
    expiry_interval: Seconds = 30.0
    # SIGTERM: exchanges under way may finish for this long before the stop.
    drain_timeout: Annotated[float, Field(ge=0, le=300)] = 10.0

    @model_validator(mode="before")
    @classmethod
    def _old_names(cls, data: Any) -> Any:
        return _renamed(data, "max_sessions", "max_connections")


class PluginsConfig(_Strict):
    disable: tuple[str, ...] = ()

    @field_validator("disable")
    @classmethod
    def _installed(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        # A name that is no installed plugin disables nothing: a typo
        # ("event-log" for event_log) left the plugin running while
        # check-config passed (fail open; found in review).
        from importlib.metadata import entry_points

        from mipsec.core.hookspecs import PROJECT

        known = {ep.name for ep in entry_points(group=PROJECT)}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(
                f"no installed plugin named {', '.join(map(repr, unknown))} "
                f"(installed: {', '.join(sorted(known))})"
            )
        return names


class ControlConfig(_Strict):
    """The role's control socket (core/control.py): ``mipsec status`` and friends."""

    enabled: bool = True
    # None: ``<config file name>.ctl`` in the state directory (core/control.py).
    path: Path | None = None
    timeout: Annotated[float, Field(gt=0, le=300)] = 5.0  # a client's request, first to last octet


LogLevel = Literal["debug", "info", "warning", "error"]


def _logger_names(v: dict[str, LogLevel]) -> dict[str, LogLevel]:
    for name in v:
        if not name or any(c.isspace() for c in name) or name.startswith("."):
            raise ValueError(f'{name!r} is not a logger name (e.g. "mipsec.ha")')
    return v


LogLevels = Annotated[dict[str, LogLevel], AfterValidator(_logger_names)]


class MetricsConfig(_Strict):
    """Prometheus ``/metrics`` and ``/healthz`` over HTTP (core/metrics.py); off when absent."""

    address: str = "127.0.0.1"
    port: Port
    # Source addresses or networks a scraper may connect from; any other
    # connection is closed at accept, before it holds one of the 16 slots
    # or evicts anyone (a flood spread over 16 networks could otherwise
    # still evict the scraper's connection).  None: any address.
    allowed_clients: Annotated[tuple[NetworkText, ...], Field(min_length=1)] | None = None

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        ipaddress.ip_address(v)  # ValueError names the bad address
        return v


class RevocationsConfig(_Strict):
    """Where the HAC keeps its list of revoked MNs (``mipsec revoke``)."""

    # None: ``<config file name>-revoked.json`` in the HAC's state directory.
    path: Path | None = None


# ---------------------------------------------------------------- data plane


def _ifname(v: str) -> str:
    # Linux dev_valid_name(): 1..15 octets (IFNAMSIZ - 1), not "." or "..",
    # no "/", ":" or white space; "%" would ask the kernel to pick a number.
    if not 1 <= len(v.encode()) <= 15:
        raise ValueError("an interface name has 1 to 15 octets")
    if v in (".", "..") or any(c in v for c in "/:%") or any(c.isspace() for c in v):
        raise ValueError(f"{v!r} is not a valid interface name")
    return v


IfName = Annotated[str, AfterValidator(_ifname)]
# RFC 8200 §5: every link that carries IPv6 has an MTU of at least 1280.
TunMtu = Annotated[int, Field(ge=1280, le=65535)]


class HADataPlane(_Strict):
    """The HA's data plane: MN user data to and from the home network (RFC 6618 §6.4)."""

    enabled: bool = False
    tun: IfName = "mipha0"
    mtu: TunMtu = 1400
    # Addresses put on the TUN device (e.g. the HA's own on the home prefix).
    addresses: tuple[InterfaceText, ...] = ()
    # Prefixes routed into the TUN device: the home network(s) the HoAs come
    # from.  Packets for a HoA with a live binding go to that MN.
    routes: tuple[NetworkText, ...] = ()
    # Merge in-order TCP segments before they enter the host's IP stack
    # (GRO in user space, gro.py).
    gro: bool = True


class MNDataPlane(_Strict):
    """The MN's data plane: its home addresses on a TUN device, traffic via the HA."""

    enabled: bool = False
    tun: IfName = "mip0"
    mtu: TunMtu = 1400
    # Destinations reached through the tunnel, from the home address.
    routes: tuple[NetworkText, ...] = ()
    gro: bool = True  # as the HA's
    # NAT keepalive: a BU at least this often (RFC 5555 §4.3; NATKATIMEOUT,
    # §6, is 110 s).  0 = only the lifetime's own refreshes.
    keepalive_interval: Annotated[float, Field(ge=0, le=86400)] = 110.0
    # How often the MN checks which source address reaches the HA (its
    # care-of address); a change re-opens the socket and sends a BU.  0 = off.
    movement_check: Annotated[float, Field(ge=0, le=3600)] = 1.0


class HACConfig(_Strict):
    hac: HACService
    policy: PolicyConfig = PolicyConfig()
    credentials: CredentialsRef = CredentialsRef()
    sa_store: SAStoreRef = SAStoreRef()
    home_addresses: HoAAllocatorRef = HoAAllocatorRef()
    ha_selection: HASelectorRef = HASelectorRef()
    ha: tuple[HAEntry, ...] = Field(min_length=1)
    bootstrap: BootstrapConfig = BootstrapConfig()
    methods: dict[str, dict[str, Any]] = Field(default_factory=dict)  # per-method options
    # Optional listener where HAs pull SAs for SPIs they do not know (PROFILE §9).
    provisioning: ProvisioningListener | None = None
    # Deployment model 1: an HA running in the HAC's own process, reached with
    # the ``local`` transport (an [[ha]] entry with the same id).
    local_ha: HAConfig | None = None
    # Optional accounting of issued SAs (``mipsec_accounting_backends``).
    accounting: AccountingRef | None = None
    plugins: PluginsConfig = PluginsConfig()
    control: ControlConfig = ControlConfig()
    revocations: RevocationsConfig = RevocationsConfig()
    metrics: MetricsConfig | None = None
    log_level: LogLevel = "info"
    log_format: Literal["text", "json"] = "text"
    log_levels: LogLevels = Field(default_factory=dict)  # per logger, e.g. "mipsec.events"

    @model_validator(mode="after")
    def _unique_ha(self) -> HACConfig:
        ids = [h.id for h in self.ha]
        if len(set(ids)) != len(ids):
            raise ValueError("ha ids must be unique")
        if self.local_ha is not None:
            local = [h for h in self.ha if h.id == self.local_ha.ha.id]
            if not local or local[0].transport != "local":
                raise ValueError(
                    f"local_ha: an [[ha]] entry with id {self.local_ha.ha.id!r} and "
                    'transport = "local" must point at the in-process HA'
                )
            # MNs are given the [[ha]] entry's port and addresses: the
            # in-process HA must be there (found in review: a mismatch
            # passed check-config, every BU then went where nobody listens).
            # Port 0 (ephemeral, tests and labs) and addresses left unset
            # are not compared.
            # An HA in this process has no control socket, metrics listener
            # or log settings of its own: the HAC's serve it (its commands,
            # its series on the HAC's /metrics).  Found in review: such
            # tables passed check-config and were silently ignored.
            for key in ("control", "metrics", "log_level", "log_format", "log_levels"):
                if key in self.local_ha.model_fields_set:
                    raise ValueError(
                        f"local_ha.{key}: not used by an HA in the HAC's process; "
                        f"set the HAC's own {key} (it serves the in-process HA too)"
                    )
            entry, ha = local[0], self.local_ha.ha
            for key, mine, theirs in (
                ("port", ha.port or None, entry.port),
                ("address6", ha.address6, entry.address6),
                ("address4", ha.address4, entry.address4),
            ):
                if mine is not None and theirs is not None and str(mine) != str(theirs):
                    raise ValueError(
                        f"local_ha.ha.{key}: {mine} is not the {key} of [[ha]] {entry.id!r} "
                        f"({theirs}), which MNs are given"
                    )
        return self


def _nai(value: str) -> str:
    try:
        return parse_nai(value)  # PROFILE §3: the mn-id the MN will send
    except HeaderError as exc:
        raise ValueError(exc.reason) from None


class MNIdentity(_Strict):
    mn_id: Annotated[str, Field(min_length=1, max_length=253), AfterValidator(_nai)]
    method: str = "psk"
    psk_hex: str | None = Field(default=None, repr=False)
    psk_file: Path | None = None

    @field_validator("psk_hex")
    @classmethod
    def _hex(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                if not bytes.fromhex(v):
                    raise ValueError
            except ValueError:
                raise ValueError("must be non-empty hex") from None
        return v

    @model_validator(mode="after")
    def _one_psk(self) -> MNIdentity:
        # Two sources for one key: which one wins would be a silent guess.
        if self.psk_hex is not None and self.psk_file is not None:
            raise ValueError("psk_hex and psk_file exclude each other: keep one")
        return self


class MNHac(_Strict):
    host: Host
    port: Port = DEFAULT_HAC_PORT
    server_name: Host | None = None  # None: the HAC is checked by its IP SAN
    ca: Path
    strict_rfc6618: bool = False
    timeout: Seconds = 10.0  # each wait: the connect and handshake, each response
    # The whole bootstrap, from the connect to the final response: a HAC that
    # keeps the MN waiting by trickling its responses (each octet within
    # ``timeout``) ends it then; the MN tries again later.
    exchange_timeout: Seconds = 120.0
    # After a failed bootstrap or registration: waits doubling from
    # retry_min to retry_max, jittered; a 503's retry-after honoured within
    # retry_max (core/mn_retry.py).
    retry_min: Annotated[float, Field(ge=1, le=3600)] = 10.0
    retry_max: Annotated[float, Field(ge=1, le=86_400)] = 600.0
    # The failures in a row and the next allowed bootstrap, kept across a
    # restart (core/mn_backoff.py); None: ``<config name>.backoff`` in
    # $STATE_DIRECTORY, else next to this file.  keep_backoff = false: not kept.
    backoff_file: Path | None = None
    keep_backoff: bool = True

    @model_validator(mode="after")
    def _retry_order(self) -> MNHac:
        if self.retry_max < self.retry_min:
            raise ValueError(
                f"retry_max ({self.retry_max:g}) is below retry_min ({self.retry_min:g})"
            )
        return self


class MNSA(_Strict):
    scope: Literal[0, 1] = 1
    suites: SuiteList = DEFAULT_ALLOWED
    rebootstrap_at: Annotated[float, Field(gt=0, lt=1)] = 0.8  # PROFILE §5
    # An SA that arrives with less than this left by the MN's clock is taken
    # as the MN's clock running ahead of the HAC's (or a HAC issuing SAs
    # that short): used, but the next bootstrap is backed off as after a
    # failure, never at 80 % of what is "left" (core/cli.py).
    min_lifetime: Annotated[float, Field(ge=1, le=86_400)] = 60.0


class MNRegistrationConfig(_Strict):
    """Home registration with the HA after bootstrap (RFC 6618 §6)."""

    enabled: bool = True
    lifetime: Annotated[int, Field(ge=4, le=262_140)] = 600  # requested, seconds
    # Reach the HA at its IPv6 (mip6-haa-ip6) or IPv4 (mip6-haa-ip4) address;
    # "auto" prefers IPv6 when the HAC provisioned one.
    transport: Literal["auto", "ip6", "ip4"] = "auto"
    once_timeout: Seconds = 15.0  # --once: the longest wait for a BA
    request_ip4_hoa: bool = True  # DSMIP6 (RFC 5555) when an IPv4 HoA was provisioned
    replay_window: Annotated[int, Field(ge=32, le=4096)] = 64


class MNConfig(_Strict):
    mn: MNIdentity
    hac: MNHac
    # The daemon's control socket (``mipsec status``; not with --once).
    control: ControlConfig = ControlConfig()
    # Options of the ``eap`` method (``[eap]``: methods, per-method tables);
    # validated by the method's plugin at start.
    eap: dict[str, Any] = Field(default_factory=dict)
    sa: MNSA = MNSA()
    registration: MNRegistrationConfig = MNRegistrationConfig()
    dataplane: MNDataPlane = MNDataPlane()
    plugins: PluginsConfig = PluginsConfig()
    log_level: LogLevel = "info"
    log_format: Literal["text", "json"] = "text"
    log_levels: LogLevels = Field(default_factory=dict)

    @model_validator(mode="after")
    def _eap_only_for_eap(self) -> MNConfig:
        # Read only when the MN authenticates with EAP: otherwise a typo in
        # it passed check-config unread (found in review).
        if self.eap and self.mn.method != "eap":
            raise ValueError(
                f'eap: read only with mn.method = "eap" (this MN uses {self.mn.method!r}); '
                "remove the table or change the method"
            )
        return self


class HAService(_Strict):
    id: HaId = "ha1"
    listen: ListenAddresses = ("127.0.0.1", "::1")
    # MN-HA UDP port (PROFILE §7); 0 = an ephemeral port (tests, labs).
    port: Annotated[int, Field(ge=0, le=65535)] = DEFAULT_MIP6_PORT
    # The HA's own addresses as provisioned to MNs (mip6-haa-ip6/-ip4): the MH
    # checksum pseudo-header uses address6 (PROFILE §8).
    address6: IPv6Text | None = None
    address4: IPv4Text | None = None
    replay_window: Annotated[int, Field(ge=32, le=4096)] = 64
    max_binding_lifetime: Seconds = 3600.0
    # An SA whose validity end lies further ahead than this is refused: what
    # a HAC with a valid provisioning certificate gone wrong (or rogue) can
    # pin here at most -- and how long a withdrawal record (one per SA the
    # HAC withdraws) is kept.  Default 7 days since the twenty-ninth session
    # (365 before: a HAC's made-up install + withdraw pairs left records for
    # a year, found in review): 168 times the HAC's default sa_lifetime
    # (3600 s); a HAC issuing longer SAs needs this raised to its sa_lifetime.
    max_sa_lifetime: Seconds = 86400.0 * 7
    # SPI records held at most: live SAs plus withdrawal records (each SA a
    # HAC withdraws is remembered until its validity end, so that it is never
    # accepted again).  An install that would add one beyond is refused (400
    # prov-reason refused); a withdrawal never is.  Default: 100,000 MNs, each
    # with its SA and the withdrawal records of its superseded ones, ten
    # times over.  Since the twenty-ninth session (found in review: an
    # admitted HAC's install + withdraw pairs grew them without bound).
    max_spi_records: Annotated[int, Field(ge=1, le=100_000_000)] = 1_000_000


class BindingsConfig(_Strict):
    path: Path | None = None  # SQLite file; None keeps the binding cache in memory
    # True: the binding cache lives in the SA store's own SQLite file, so an
    # install's SA row and its replay records are one commit (issue 9; the
    # store must be "sqlite" with a path, and the file this HA's alone).
    in_sa_store: bool = False
    # "normal": every commit survives a crash of the HA process; "full": also
    # a power loss, at an fsync per commit (core/bindings.py).
    synchronous: Literal["normal", "full"] = "normal"

    @model_validator(mode="after")
    def _one_place(self) -> BindingsConfig:
        if self.in_sa_store and self.path is not None:
            raise ValueError("give either path (a file of its own) or in_sa_store = true, not both")
        return self


class ProvisioningListener(_Strict):
    """A mutually authenticated TLS listener for PROFILE §9 provisioning."""

    listen: ListenAddresses = ("127.0.0.1",)
    port: Port
    cert: Path
    key: Path
    client_ca: Path
    # dNSName SANs a client certificate must carry (at least one: a CA alone
    # would let every certificate it ever issued in).
    client_names: tuple[DnsName, ...] = Field(min_length=1)
    # Bounds the handshake, the wait for a request's first octet, each request
    # (first octet to last, not per chunk) and each operation's callback.
    timeout: Seconds = 10.0
    # Every connection held, pending handshakes included (same eviction rule
    # as [hac] max_connections).
    max_connections: MaxConnections = 64
    # Source addresses or networks a client may connect from; a connection
    # from elsewhere is closed at accept, before any TLS work (a flood of
    # ClientHellos would otherwise cost a key exchange and a signature
    # each).  None: any address (the client certificate still decides).
    allowed_clients: Annotated[tuple[NetworkText, ...], Field(min_length=1)] | None = None


class PullConfig(_Strict):
    """Where an HA pulls an SA for an unknown SPI (PROFILE §9), and how fast."""

    host: Host
    port: Port
    server_name: Host | None = None
    ca: Path
    cert: Path
    key: Path
    timeout: Seconds = 2.0
    # The pull limits (core/pullgate.py; all apply at a reload).  An HA that
    # lost its store recovers its MNs at ``rate`` (100,000 at 20 a second:
    # 83 minutes).  Each pull costs the HAC a TLS handshake (~0.9 ms of CPU
    # measured) and a store read: the upper bounds are against a typo, not
    # advice -- 10,000 a second is ~9 cores of the HAC's, and more than one
    # HA's event loop can start (it pays a handshake per pull too).
    rate: Annotated[float, Field(gt=0, le=pullgate.MAX_RATE)] = pullgate.RATE
    # Half of it (and of max_in_flight) is kept for an SPI's repeated
    # sighting under a flood: at least 2, or a flood of made-up SPIs would
    # starve an MN's pull again.
    burst: Annotated[int, Field(ge=2, le=pullgate.MAX_BURST)] = pullgate.BURST
    # Each pull in flight is a TCP+TLS connection (a descriptor here, a
    # connection slot at the HAC's [provisioning] listener, whose
    # max_connections evicts beyond it) and up to 8 queued datagrams; 256
    # sustain the highest rate at 25 ms a pull.
    max_in_flight: Annotated[int, Field(ge=2, le=pullgate.MAX_MAX_IN_FLIGHT)] = (
        pullgate.MAX_IN_FLIGHT
    )
    # Per source (an IPv4 address, an IPv6 /64), for repeated sightings: MNs
    # behind one NAT share it.
    source_rate: Annotated[float, Field(gt=0, le=pullgate.MAX_RATE)] = pullgate.SOURCE_RATE
    source_burst: Annotated[int, Field(ge=1, le=pullgate.MAX_BURST)] = pullgate.SOURCE_BURST

    @model_validator(mode="after")
    def _source_within_global(self) -> PullConfig:
        # One source's share beyond everyone's would never be reached: a
        # mistake (often a lowered rate or burst whose source_* kept its default).
        for key, mine, of in (
            ("source_rate", self.source_rate, "rate"),
            ("source_burst", self.source_burst, "burst"),
        ):
            limit = getattr(self, of)
            if mine > limit:
                default = "" if key in self.model_fields_set else ", its default"
                raise ValueError(
                    f"source_{of} ({mine:g}{default}) is above {of} ({limit:g}): one "
                    f"source's share cannot exceed every source's; set source_{of} <= {of}"
                )
        return self


class HAConfig(_Strict):
    ha: HAService = HAService()
    sa_store: SAStoreRef = SAStoreRef()
    bindings: BindingsConfig = BindingsConfig()
    provisioning: ProvisioningListener | None = None
    pull: PullConfig | None = None
    dataplane: HADataPlane = HADataPlane()
    plugins: PluginsConfig = PluginsConfig()
    control: ControlConfig = ControlConfig()
    metrics: MetricsConfig | None = None
    log_level: LogLevel = "info"
    log_format: Literal["text", "json"] = "text"
    log_levels: LogLevels = Field(default_factory=dict)


HACConfig.model_rebuild()

ROLE_MODELS: dict[str, type[BaseModel]] = {"hac": HACConfig, "mn": MNConfig, "ha": HAConfig}

_PATH_KEYS = {
    "cert",
    "key",
    "ca",
    "client_ca",
    "psk_file",
    "path",
    "client_cert",
    "client_key",
    "key_file",
    "backoff_file",
}


def _resolve_paths(obj: Any, base: Path) -> Any:
    """Resolve relative path-like keys against the config file's directory."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if k in _PATH_KEYS and isinstance(v, str) and not Path(v).is_absolute():
                out[k] = str((base / v).resolve())
            else:
                out[k] = _resolve_paths(v, base)
        return out
    if isinstance(obj, list):
        return [_resolve_paths(v, base) for v in obj]
    return obj


def _loc(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for p in loc:
        if isinstance(p, int):
            parts[-1:] = [f"{parts[-1]}[{p}]"] if parts else [f"[{p}]"]
        else:
            parts.append(str(p))
    return ".".join(parts) or "(top level)"


# Far above any role's configuration (it names files; it holds no tables).
MAX_CONFIG_FILE = 16 << 20


def load_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        # A FIFO at the path (refused, not waited on: a reload reads this on
        # the event loop), a directory, a file of absurd size.
        raw = read_regular(p, MAX_CONFIG_FILE)
    except FileNotFoundError:
        raise ConfigError(str(p), "(file)", "no such file") from None
    except PermissionError:
        raise ConfigError(str(p), "(file)", "permission denied") from None
    except OSError as exc:
        raise ConfigError(str(p), "(file)", exc.strerror or str(exc)) from None
    return toml_data(raw, str(p))


# The name a configuration read from standard input goes by in messages;
# its relative paths are relative to the working directory.
STDIN_NAME = "<stdin>"


def read_stdin_toml(stream: BinaryIO) -> dict[str, Any]:
    """A configuration piped in (``mipsec check-config -``), at most
    MAX_CONFIG_FILE octets: a start reads its file again at each reload, so
    only the check takes one from a pipe."""
    raw = stream.read(MAX_CONFIG_FILE + 1)
    if len(raw) > MAX_CONFIG_FILE:
        raise ConfigError(STDIN_NAME, "(file)", f"larger than {MAX_CONFIG_FILE} octets")
    return toml_data(raw, STDIN_NAME)


def toml_data(raw: bytes, file: str) -> dict[str, Any]:
    try:
        return parse_toml(raw)
    except TomlTextError as exc:
        raise ConfigError(file, f"({exc.where})", exc.reason) from None


def load_config(path: str | Path, role: str) -> BaseModel:
    """Load and validate a role's configuration file."""
    p = Path(path)
    data = load_toml(p)
    return validate_config(data, role, file=str(p), base=p.resolve().parent)


def validate_config(
    data: dict[str, Any], role: str, *, file: str = "<memory>", base: Path | None = None
) -> BaseModel:
    model = ROLE_MODELS.get(role)
    if model is None:
        raise ConfigError(file, "role", f"unknown role {role!r}")
    data = _resolve_paths(data, base or Path.cwd())
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        reason = str(err.get("msg", "invalid"))
        if reason.startswith("Value error, "):
            reason = reason[len("Value error, ") :]
        more = len(exc.errors()) - 1
        if more:
            reason += f" (and {more} more problem{'s' if more > 1 else ''})"
        raise ConfigError(file, _loc(tuple(err.get("loc", ()))), reason) from None


def redacted(model: BaseModel) -> dict[str, Any]:
    """The resolved config as a dict with every secret replaced."""

    def walk(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {
                k: (
                    "<redacted>"
                    if _is_secret(k) and v is not None and not isinstance(v, bool)
                    else walk(v)
                )
                for k, v in obj.items()
            }
        if isinstance(obj, list | tuple):
            return [walk(v) for v in obj]
        return obj

    return walk(model.model_dump(mode="json"))  # type: ignore[no-any-return]


# Keys whose whole name is a secret: a USIM's K and OP/OPc ([eap.aka] tables).
_SECRET_KEYS = frozenset({"ki", "op", "opc"})


def _is_secret(key: str) -> bool:
    k = key.lower()
    if k in _SECRET_KEYS:
        return True
    return any(s in k for s in ("psk", "secret", "password", "passphrase")) and not k.endswith(
        "_file"
    )
