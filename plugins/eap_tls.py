"""EAP-TLS (Type 13) as an EAP method plugin: RFC 5216 over TLS 1.2, RFC 9190 over TLS 1.3.

The machines live in ``core/eap/eaptls.py``; this module validates options,
loads the certificates and builds one TLS context per role at start.

HAC, table ``[methods.eap.tls]`` (``server``)::

    cert            = "eap-server.pem"  # EAP server chain, leaf first (not the MHAuth TLS cert)
    key             = "eap-server.key"
    ca              = "mn-ca.pem"       # the only CA trusted for MN client certificates
    tls_min         = "1.2"             # "1.2" or "1.3"
    tls_max         = "1.3"
    fragment_size   = 1400              # largest EAP packet sent, octets (PROFILE §4 item 9)
    max_message     = 65536             # largest reassembled TLS flight accepted, octets
    identity_policy = "rfc822name"      # binds the MN certificate to mn-id
    groups          = "X25519:P-256:P-384:X448:P-521"  # key exchange, preference order

MN, table ``[eap.tls]`` (``peer``): ``cert``, ``key`` (the MN's client
certificate), ``ca`` (the only CA for the EAP server certificate),
``server_name`` (a dNSName the EAP server certificate must carry, PROFILE §1
rules), ``tls_min``, ``tls_max``, ``fragment_size``, ``max_message``,
``groups``.  ``groups`` is classical by default: see ``DEFAULT_GROUPS`` in
``core/eap/eaptls.py`` for why (one fragment per flight at 1,400 octets).

Relative paths resolve against the configuration file's directory.  A wrong
option raises ``ValueError("key: reason")``.

A renewed EAP server certificate (or key, or MN CA) written under the same
paths is taken by the HAC's next reload: the server factory's ``stale()``
(core/reload.py) compares the files with what they held when it was built,
and the reload builds the method again.  A file that no longer loads makes
the reload refused, naming the key; the running method stays.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from cryptography import x509
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mipsec.core.confvalues import DnsName
from mipsec.core.eap.eaptls import (
    DEFAULT_FRAGMENT_SIZE,
    DEFAULT_GROUPS,
    DEFAULT_MAX_MESSAGE,
    TLS_VERSIONS,
    EapTlsPeer,
    EapTlsPeerConfig,
    EapTlsServer,
    EapTlsServerConfig,
    check_groups,
    make_context,
)
from mipsec.core.eap.method import EapPeerContext, EapServerContext
from mipsec.core.eap.tls_identity import (
    DEFAULT_POLICY,
    EapTlsIdentityPolicy,
    Rfc822NamePolicy,
    builtin_policies,
)
from mipsec.core.errors import CertificateError, LocalProtocolError
from mipsec.core.filedigest import FileDigests, read_regular
from mipsec.core.hookspecs import PluginContext, hookimpl
from mipsec.core.pluginmanager import registry
from mipsec.core.secretfiles import check_private_option
from mipsec.core.tls import load_matching_key, load_server_chain
from mipsec.core.wire.eap import EapType
from mipsec.plugins._options import parse_options, resolve_path

TlsVersion = Literal["1.2", "1.3"]


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    cert: str = Field(min_length=1)
    key: str = Field(min_length=1)
    ca: str = Field(min_length=1)
    tls_min: TlsVersion = "1.2"
    tls_max: TlsVersion = "1.3"
    # The whole EAP packet (header, Type, Flags, length field, data).
    fragment_size: Annotated[int, Field(ge=64, le=65535)] = DEFAULT_FRAGMENT_SIZE
    max_message: Annotated[int, Field(ge=256, le=16 * 1024 * 1024)] = DEFAULT_MAX_MESSAGE
    groups: str = Field(default=DEFAULT_GROUPS, min_length=1, max_length=512)

    @field_validator("groups")
    @classmethod
    def _groups_known(cls, value: str) -> str:
        try:
            check_groups(value)
        except LocalProtocolError:
            raise ValueError(
                f"refused by OpenSSL: {value!r} (group names such as X25519, P-256, "
                "X25519MLKEM768, separated by ':')"
            ) from None
        return value

    @field_validator("tls_min", "tls_max", mode="before")
    @classmethod
    def _version_text(cls, value: Any) -> Any:
        # TOML users write tls_max = 1.3 as readily as "1.3".
        if isinstance(value, float) and value in (1.2, 1.3):
            return f"{value:.1f}"
        return value

    @model_validator(mode="after")
    def _range(self) -> _Common:
        if TLS_VERSIONS[self.tls_min] > TLS_VERSIONS[self.tls_max]:
            raise ValueError(f"tls_min: {self.tls_min} is above tls_max {self.tls_max}")
        return self


class ServerOptions(_Common):
    identity_policy: str = Field(default=DEFAULT_POLICY, min_length=1)


class PeerOptions(_Common):
    # The EAP server is checked by dNSName: an IP address is refused.
    server_name: DnsName


class _Credentials:
    """This side's chain and key and the trusted CA, loaded once at start."""

    def __init__(self, opts: _Common, base_dir: Path) -> None:
        cert_file = resolve_path(opts.cert, base_dir)
        key_file = resolve_path(opts.key, base_dir)
        self.ca_file = resolve_path(opts.ca, base_dir)
        # Before the files are loaded (core/filedigest.py says why); also
        # refuses a FIFO or an oversized file, naming the key.
        self.files = FileDigests([("cert", cert_file), ("key", key_file), ("ca", self.ca_file)])
        # The private key is a secret file like the MHAuth TLS key: refused
        # when open to group or others (core/secretfiles.py; it was not
        # checked before the twenty-seventh session, found in review).
        check_private_option(key_file, "key")
        try:
            self.chain = load_server_chain(cert_file)
        except CertificateError as exc:
            raise ValueError(f"cert: {exc}") from None
        try:
            self.key = load_matching_key(cert_file, key_file, self.chain[0])
        except CertificateError as exc:
            raise ValueError(f"key: {exc}") from None
        self.ca_certs = _load_cas(self.ca_file)

    def context(self, opts: _Common, *, server: bool) -> Any:
        try:
            return make_context(
                server=server,
                chain=self.chain,
                key=self.key,
                ca_certs=self.ca_certs,
                tls_min=opts.tls_min,
                tls_max=opts.tls_max,
                groups=opts.groups,
            )
        except CertificateError as exc:
            if "CA" in str(exc):
                raise ValueError(f"ca: {self.ca_file}: {exc}") from None
            raise ValueError(f"cert: {exc}") from None


def _load_cas(path: Path) -> list[x509.Certificate]:
    try:
        data = read_regular(path)  # a FIFO: refused, not waited on
    except OSError as exc:
        raise ValueError(f"ca: {path}: cannot read ({exc.strerror})") from None
    try:
        cas = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ValueError(f"ca: {path}: no PEM certificate found") from None
    return cas


def _policy(name: str, ctx: PluginContext) -> EapTlsIdentityPolicy:
    pm = ctx.extra.get("pm")
    policies: Mapping[str, Any] = (
        registry(pm, "mipsec_eap_tls_identity_policies") if pm is not None else builtin_policies()
    )
    policy = policies.get(name)
    if policy is None:
        known = ", ".join(sorted(policies)) or "none"
        raise ValueError(f"identity_policy: no policy named {name!r} (known: {known})")
    if not callable(getattr(policy, "check", None)):
        raise ValueError(f"identity_policy: {name!r} has no check(cert, mn_id)")
    return policy  # type: ignore[no-any-return]


class EapTlsServerFactory:
    """Builds one :class:`EapTlsServer` per EAP conversation (HAC)."""

    def __init__(
        self,
        config: EapTlsServerConfig,
        files: FileDigests | None = None,
        not_after: datetime | None = None,
    ) -> None:
        self.config = config
        self.files = files
        self.not_after = not_after

    def certificates(self) -> dict[str, datetime]:
        """The EAP server certificate's notAfter (core/certexpiry.py)."""
        return {"cert": self.not_after} if self.not_after is not None else {}

    def __repr__(self) -> str:
        return f"EapTlsServerFactory(policy={self.config.policy.name!r})"

    def new(self, ctx: EapServerContext) -> EapTlsServer:
        return EapTlsServer(self.config, ctx)

    def stale(self) -> bool:
        """Whether ``cert``, ``key`` or ``ca`` now hold something else than
        this factory was built from, or cannot be read (core/reload.py)."""
        return self.files is not None and self.files.changed()


class EapTlsPeerFactory:
    """Builds one :class:`EapTlsPeer` per EAP conversation (MN)."""

    def __init__(self, config: EapTlsPeerConfig, files: FileDigests | None = None) -> None:
        self.config = config
        self.files = files

    def stale(self) -> bool:
        """Whether the MN's ``cert``, ``key`` or ``ca`` hold something else
        now (a renewed client certificate): the MN builds the method again
        before its next bootstrap."""
        return self.files is not None and self.files.changed()

    def __repr__(self) -> str:
        return f"EapTlsPeerFactory(server_name={self.config.server_name!r})"

    def new(self, ctx: EapPeerContext) -> EapTlsPeer:
        return EapTlsPeer(self.config, ctx)


class EapTlsMethod:
    """The ``tls`` EAP method (an ``EapMethodPlugin``)."""

    name = "tls"
    eap_type = int(EapType.TLS)
    derives_msk = True

    def server(self, options: Mapping[str, Any], ctx: PluginContext) -> EapTlsServerFactory:
        opts = parse_options(ServerOptions, options)
        policy = _policy(opts.identity_policy, ctx)
        creds = _Credentials(opts, ctx.base_dir)
        config = EapTlsServerConfig(
            context=creds.context(opts, server=True),
            policy=policy,
            fragment_size=opts.fragment_size,
            max_message=opts.max_message,
        )
        return EapTlsServerFactory(config, creds.files, creds.chain[0].not_valid_after_utc)

    def peer(self, options: Mapping[str, Any], ctx: PluginContext) -> EapTlsPeerFactory:
        opts = parse_options(PeerOptions, options)
        creds = _Credentials(opts, ctx.base_dir)
        config = EapTlsPeerConfig(
            context=creds.context(opts, server=False),
            server_name=opts.server_name,
            fragment_size=opts.fragment_size,
            max_message=opts.max_message,
        )
        return EapTlsPeerFactory(config, creds.files)


@hookimpl
def mipsec_eap_methods() -> Sequence[Any]:
    return [EapTlsMethod()]


@hookimpl
def mipsec_eap_tls_identity_policies() -> Sequence[Any]:
    return [Rfc822NamePolicy()]
