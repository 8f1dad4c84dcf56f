"""SA issuing (RFC 6618 §5.6, PROFILE §5) and its wire mapping.

Pure logic: suite choice, fresh CSPRNG keys, SPI draws, and the translation
between an ``IssuedSA`` and the TV headers of a final 200 response.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address, IPv6Address

from mipsec.core.errors import RemoteProtocolError
from mipsec.core.model import (
    SPI_MAX,
    BootstrapData,
    IssuedSA,
    SecurityAssociation,
)
from mipsec.core.suites import SUITES, Suite
from mipsec.core.wire.message import Message


def select_suite(suitelist: Iterable[int], allowed: Sequence[Suite]) -> Suite | None:
    """PROFILE §5: the first suite in the MN's list that the HAC policy allows."""
    allowed_set = {int(s) for s in allowed}
    for value in suitelist:
        if value in allowed_set:
            return Suite(value)
    return None


def random_spi() -> int:
    """A uniformly drawn SPI in 1..268435455 (RFC 6618 §5.6.1: 0 is reserved)."""
    return secrets.randbelow(SPI_MAX) + 1


def new_sa(
    *,
    spi: int,
    mn_id: str,
    suite: Suite,
    scope: int,
    lifetime: float,
    now: datetime,
    ha_id: str = "",
) -> SecurityAssociation:
    """Four independent fresh keys from the CSPRNG (PROFILE §5)."""
    info = SUITES[suite]

    def ekey() -> bytes:
        if not info.ekey_len:
            return b""
        while True:
            key = secrets.token_bytes(info.ekey_len)
            if info.encryption != "3des-cbc" or not _des3_degenerate(key):
                return key

    # The wire carries whole seconds (RFC 1123 date): truncate so HAC, HA and
    # MN agree on the exact same instant.
    end = (now + timedelta(seconds=lifetime)).astimezone(UTC).replace(microsecond=0)
    return SecurityAssociation(
        spi=spi,
        mn_id=mn_id,
        suite=suite,
        scope=scope,
        validity_end=end,
        mn_to_ha_ikey=secrets.token_bytes(info.ikey_len),
        ha_to_mn_ikey=secrets.token_bytes(info.ikey_len),
        mn_to_ha_ekey=ekey(),
        ha_to_mn_ekey=ekey(),
        ha_id=ha_id,
    )


def _des3_degenerate(key: bytes) -> bool:
    """RFC 2451 §2.3: k1 == k2 or k2 == k3 (parity bits ignored) turns 3DES
    into single DES; such keys MUST NOT be used."""
    k1, k2, k3 = (bytes(b & 0xFE for b in key[i : i + 8]) for i in (0, 8, 16))
    return k1 == k2 or k2 == k3


def sa_headers(issued: IssuedSA) -> Message:
    """SA data (§5.6) and bootstrap data (§5.7) of a final 200 response."""
    sa, bs = issued.sa, issued.bootstrap
    encrypts = SUITES[sa.suite].encrypts
    return Message(
        mip6_sas=sa.scope,
        mip6_spi=sa.spi,
        mn_to_ha_ikey=sa.mn_to_ha_ikey,
        ha_to_mn_ikey=sa.ha_to_mn_ikey,
        # PROFILE §3: ekey headers are absent for NULL encryption.
        mn_to_ha_ekey=sa.mn_to_ha_ekey if encrypts else None,
        ha_to_mn_ekey=sa.ha_to_mn_ekey if encrypts else None,
        sa_validity_end=sa.validity_end,
        ciphersuite=int(sa.suite),
        haa_ip6=bs.haa_ip6,
        haa_ip4=bs.haa_ip4,
        port=bs.port,
        ip6_hoa=bs.ip6_hoa,
        ip4_hoa=bs.ip4_hoa,
        ip6_hnp=bs.ip6_hnp,
        ip4_hnp=bs.ip4_hnp,
        dns_ip6=bs.dns_ip6,
        dns_ip4=bs.dns_ip4,
    )


def sa_from_message(msg: Message, mn_id: str, ha_id: str = "") -> IssuedSA:
    """MN side: rebuild the SA of a 200 response, checking every field
    (also the HA's, for an install, with the HA it names: ``ha_id``).

    Raises ``RemoteProtocolError`` naming what is missing or inconsistent.
    """

    def need(value: object, name: str) -> None:
        if value is None:
            raise RemoteProtocolError(200, f"{name}: missing in a 200 response")

    need(msg.mip6_spi, "mip6-spi")
    need(msg.ciphersuite, "mip6-ciphersuite")
    need(msg.mip6_sas, "mip6-sas")
    need(msg.sa_validity_end, "mip6-sa-validity-end")
    need(msg.mn_to_ha_ikey, "mip6-mn-to-ha-ikey")
    need(msg.ha_to_mn_ikey, "mip6-ha-to-mn-ikey")
    assert msg.ciphersuite is not None and msg.mip6_spi is not None
    assert msg.mip6_sas is not None and msg.sa_validity_end is not None
    assert msg.mn_to_ha_ikey is not None and msg.ha_to_mn_ikey is not None
    try:
        suite = Suite(msg.ciphersuite)
    except ValueError:
        raise RemoteProtocolError(200, "mip6-ciphersuite: a reserved suite") from None
    info = SUITES[suite]
    for name, key, size in (
        ("mip6-mn-to-ha-ikey", msg.mn_to_ha_ikey, info.ikey_len),
        ("mip6-ha-to-mn-ikey", msg.ha_to_mn_ikey, info.ikey_len),
        ("mip6-mn-to-ha-ekey", msg.mn_to_ha_ekey, info.ekey_len),
        ("mip6-ha-to-mn-ekey", msg.ha_to_mn_ekey, info.ekey_len),
    ):
        got = len(key) if key is not None else 0
        if got != size:
            raise RemoteProtocolError(200, f"{name}: {got} octets, suite needs {size}")
        if info.encryption == "3des-cbc" and name.endswith("ekey") and key is not None:
            # RFC 2451 §2.3: k1 == k2 or k2 == k3 makes 3DES single DES, and
            # such keys MUST be rejected: the HAC's fault, so the bootstrap
            # fails (with backoff) -- the MN crashed later building its
            # cipher, and a supervisor's restarts hammered the HAC (found in
            # review).
            if _des3_degenerate(key):
                raise RemoteProtocolError(
                    200, f"{name}: 3DES key with k1 == k2 or k2 == k3 (RFC 2451 §2.3)"
                )
    sa = SecurityAssociation(
        spi=msg.mip6_spi,
        mn_id=mn_id,
        suite=suite,
        scope=msg.mip6_sas,
        validity_end=msg.sa_validity_end,
        mn_to_ha_ikey=msg.mn_to_ha_ikey,
        ha_to_mn_ikey=msg.ha_to_mn_ikey,
        mn_to_ha_ekey=msg.mn_to_ha_ekey or b"",
        ha_to_mn_ekey=msg.ha_to_mn_ekey or b"",
        ha_id=ha_id,
    )
    _check_addresses(msg)
    kwargs = {}
    if msg.port is not None:
        kwargs["port"] = msg.port
    bs = BootstrapData(
        haa_ip6=msg.haa_ip6,
        haa_ip4=msg.haa_ip4,
        ip6_hoa=msg.ip6_hoa,
        ip4_hoa=msg.ip4_hoa,
        ip6_hnp=msg.ip6_hnp,
        ip4_hnp=msg.ip4_hnp,
        dns_ip6=msg.dns_ip6,
        dns_ip4=msg.dns_ip4,
        **kwargs,
    )
    return IssuedSA(sa, bs)


def _bad_address(address: IPv4Address | IPv6Address, *, home: bool) -> str | None:
    """Why ``address`` cannot be an HA address or (``home``) a home address."""
    if address.is_unspecified:
        return "unspecified"
    if address.is_multicast:
        return "multicast"
    if address.is_link_local:
        return "link-local"
    if isinstance(address, IPv4Address) and address == IPv4Address("255.255.255.255"):
        return "broadcast"
    # Loopback only for a home address: the project's labs run the HA on
    # ::1 / 127.0.0.1 (``mipsec init --lab``), and an HAC pointing its MNs at
    # a loopback HA hurts no one but itself.
    if home and address.is_loopback:
        return "loopback"
    return None


def _check_addresses(msg: Message) -> None:
    """The bootstrap data's HA and home addresses (RFC 6618 §5.7) must be
    unicast addresses an MN can send to and be reached at: ``::`` as the HA
    sent the BUs to this host, ff02::1 or ::1 as a home address was
    registered and routed (found in review; since the twenty-eighth
    session).  Refused, as the HAC's protocol error: multicast, unspecified,
    link-local (and 255.255.255.255) HA and home addresses, loopback home
    addresses, and a home address equal to the HA's address."""
    for name, address, home in (
        ("mip6-haa-ip6", msg.haa_ip6, False),
        ("mip6-haa-ip4", msg.haa_ip4, False),
        ("mip6-ip6-hoa", msg.ip6_hoa, True),
        ("mip6-ip4-hoa", msg.ip4_hoa, True),
    ):
        if address is None:
            continue
        why = _bad_address(address, home=home)
        if why is not None:
            raise RemoteProtocolError(200, f"{name}: {address} is a {why} address")
    if msg.ip6_hoa is not None and msg.ip6_hoa == msg.haa_ip6:
        raise RemoteProtocolError(200, f"mip6-ip6-hoa: {msg.ip6_hoa} is the HA's own address")
    if msg.ip4_hoa is not None and msg.ip4_hoa == msg.haa_ip4:
        raise RemoteProtocolError(200, f"mip6-ip4-hoa: {msg.ip4_hoa} is the HA's own address")


def utcnow() -> datetime:
    return datetime.now(UTC)
