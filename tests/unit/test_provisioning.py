"""HAC <-> HA provisioning messages (PROFILE §9; framing of PROFILE §2-3)."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from ipaddress import IPv4Address, IPv6Address, IPv6Network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mipsec.core.errors import HeaderError, LocalProtocolError
from mipsec.core.issuer import _bad_address, _des3_degenerate
from mipsec.core.model import BootstrapData, IssuedSA, SecurityAssociation
from mipsec.core.provisioning import (
    ProvisioningFailed,
    ProvOp,
    ProvRequest,
    ProvResponse,
    decode_request,
    decode_response,
    encode_install,
    encode_pull,
    encode_response,
    encode_withdraw,
)
from mipsec.core.suites import SUITES, Suite
from mipsec.core.wire.container import ContainerDecoder, encode_container

END = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)  # a Wednesday
IK1, IK2 = bytes(range(20)), bytes(range(0x20, 0x34))
EK1, EK2 = bytes(range(0x40, 0x50)), bytes(range(0x60, 0x70))


def make_issued(suite: Suite = Suite.AES_128_CBC_SHA, ha_id: str = "ha1") -> IssuedSA:
    info = SUITES[suite]
    sa = SecurityAssociation(
        spi=4660,
        mn_id="alice@home.example",
        suite=suite,
        scope=1,
        validity_end=END,
        mn_to_ha_ikey=IK1[: info.ikey_len],
        ha_to_mn_ikey=IK2[: info.ikey_len],
        mn_to_ha_ekey=EK1[: info.ekey_len] if info.ekey_len else b"",
        ha_to_mn_ekey=EK2[: info.ekey_len] if info.ekey_len else b"",
        ha_id=ha_id,
    )
    bs = BootstrapData(
        haa_ip6=IPv6Address("2001:db8::1"),
        ip6_hoa=IPv6Address("2001:db8:1::100"),
        ip6_hnp=IPv6Network("2001:db8:1::/64"),
    )
    return IssuedSA(sa, bs)


SA_LINES = (
    b"mn-id: alice@home.example\r\n"
    b"mip6-spi: 4660\r\n"
    b"mip6-mn-to-ha-ikey: 000102030405060708090a0b0c0d0e0f10111213\r\n"
    b"mip6-ha-to-mn-ikey: 202122232425262728292a2b2c2d2e2f30313233\r\n"
    b"mip6-mn-to-ha-ekey: 404142434445464748494a4b4c4d4e4f\r\n"
    b"mip6-ha-to-mn-ekey: 606162636465666768696a6b6c6d6e6f\r\n"
    b"mip6-sa-validity-end: Wed, 02 Jan 2030 03:04:05 GMT\r\n"
    b"mip6-sas: 1\r\n"
    b"mip6-ciphersuite: {00,2F}\r\n"
    b"mip6-haa-ip6: 2001:db8:0:0:0:0:0:1\r\n"
    b"mip6-port: 7872\r\n"
    b"mip6-ip6-hoa: 2001:db8:1:0:0:0:0:100\r\n"
    b"mip6-ip6-hnp: 2001:db8:1:0:0:0:0:0/64\r\n"
    b"ha-id: ha1\r\n"
)
INSTALL = b"prov-op: install\r\n" + SA_LINES + b"\r\n"


# ------------------------------------------------------------------ vectors


def test_install_hand_vector() -> None:
    assert encode_install(make_issued()) == INSTALL


def test_install_framed_as_container_identifier_1() -> None:
    framed = encode_container(1, encode_install(make_issued()))
    assert framed[:4] == b"\x00\x01" + len(INSTALL).to_bytes(2, "big")
    (c,) = ContainerDecoder().feed(framed)
    assert decode_request(c.content).issued == make_issued()


def test_install_decodes_hand_vector() -> None:
    req = decode_request(INSTALL)
    assert req == ProvRequest(ProvOp.INSTALL, issued=make_issued(), spi=4660, ha_id="ha1")
    assert req.issued is not None and req.issued.sa.ha_id == "ha1"


def test_install_receiver_is_liberal_per_profile_3() -> None:
    # Case-insensitive names and hex, spaces/tabs around values, no final empty line.
    text = INSTALL.replace(b"prov-op: install", b"Prov-Op:\tINSTALL ")
    text = text.replace(b"HA-ID", b"ha-id").replace(b"ha-id: ha1", b"HA-ID:  ha1")
    text = text.replace(b"404142434445464748494a4b4c4d4e4f", b"404142434445464748494A4B4C4D4E4F")
    text = text.replace(b"2001:db8:0:0:0:0:0:1", b"2001:db8::1")
    assert decode_request(text[:-2]).issued == make_issued()


def test_null_suite_install_has_no_ekeys() -> None:
    issued = make_issued(Suite.NULL_SHA)
    content = encode_install(issued)
    assert b"ekey" not in content
    expected = (
        b"prov-op: install\r\n"
        b"mn-id: alice@home.example\r\n"
        b"mip6-spi: 4660\r\n"
        b"mip6-mn-to-ha-ikey: 000102030405060708090a0b0c0d0e0f10111213\r\n"
        b"mip6-ha-to-mn-ikey: 202122232425262728292a2b2c2d2e2f30313233\r\n"
        b"mip6-sa-validity-end: Wed, 02 Jan 2030 03:04:05 GMT\r\n"
        b"mip6-sas: 1\r\n"
        b"mip6-ciphersuite: {00,02}\r\n"
        b"mip6-haa-ip6: 2001:db8:0:0:0:0:0:1\r\n"
        b"mip6-port: 7872\r\n"
        b"mip6-ip6-hoa: 2001:db8:1:0:0:0:0:100\r\n"
        b"mip6-ip6-hnp: 2001:db8:1:0:0:0:0:0/64\r\n"
        b"ha-id: ha1\r\n\r\n"
    )
    assert content == expected
    got = decode_request(expected).issued
    assert got == issued and got is not None
    assert got.sa.mn_to_ha_ekey == b"" and got.sa.ha_to_mn_ekey == b""


def test_null_sha256_round_trip() -> None:
    issued = make_issued(Suite.NULL_SHA256)
    assert decode_request(encode_install(issued)).issued == issued


def test_withdraw_vector() -> None:
    vector = b"prov-op: withdraw\r\nmip6-spi: 4660\r\n\r\n"
    assert encode_withdraw(4660) == vector
    assert decode_request(vector) == ProvRequest(ProvOp.WITHDRAW, spi=4660)


def test_pull_vector() -> None:
    vector = b"prov-op: pull\r\nmip6-spi: 268435455\r\nha-id: ha-2.example\r\n\r\n"
    assert encode_pull(268435455, "ha-2.example") == vector
    assert decode_request(vector) == ProvRequest(ProvOp.PULL, spi=268435455, ha_id="ha-2.example")


def test_response_vectors() -> None:
    assert encode_response(200) == b"status-code: 200\r\n\r\n"
    assert decode_response(b"status-code: 200\r\n\r\n") == ProvResponse(200)
    unknown = b"status-code: 400\r\nprov-reason: unknown-spi\r\n\r\n"
    assert encode_response(400, reason="unknown-spi") == unknown
    assert decode_response(unknown) == ProvResponse(400, None, "unknown-spi")
    assert decode_response(b"status-code: 500\r\nprov-reason: internal\r\n\r\n").status == 500


def test_pull_answer_vector_carries_the_install_headers() -> None:
    vector = b"status-code: 200\r\n" + SA_LINES + b"\r\n"
    assert encode_response(200, make_issued()) == vector
    assert decode_response(vector) == ProvResponse(200, make_issued(), None)


def test_unknown_headers_ignored() -> None:
    vector = b"prov-op: withdraw\r\nx-future: 1\r\nmip6-spi: 7\r\n\r\n"
    assert decode_request(vector).spi == 7


# ------------------------------------------------------------------- errors


def _field(content: bytes, decode: object = decode_request) -> str:
    with pytest.raises(HeaderError) as info:
        decode(content)  # type: ignore[operator]
    return info.value.field


@pytest.mark.parametrize(
    ("content", "field"),
    [
        (b"mip6-spi: 1\r\n\r\n", "prov-op"),
        (b"prov-op: delete\r\nmip6-spi: 1\r\n\r\n", "prov-op"),
        (b"prov-op: withdraw\r\n\r\n", "mip6-spi"),
        (b"prov-op: withdraw\r\nmip6-spi: 0\r\n\r\n", "mip6-spi"),
        (b"prov-op: withdraw\r\nmip6-spi: 268435456\r\n\r\n", "mip6-spi"),
        (b"prov-op: pull\r\nmip6-spi: 1\r\n\r\n", "ha-id"),
        (b"prov-op: pull\r\nprov-op: pull\r\nmip6-spi: 1\r\nha-id: a\r\n\r\n", "prov-op"),
        (INSTALL.replace(b"mn-id: alice@home.example\r\n", b""), "mn-id"),
        (INSTALL.replace(b"ha-id: ha1\r\n", b""), "ha-id"),
        (INSTALL.replace(b"mip6-sas: 1\r\n", b""), "mip6-sas"),
        (INSTALL.replace(b"mip6-sas: 1", b"mip6-sas: O"), "mip6-sas"),
        (INSTALL.replace(b"mip6-spi: 4660\r\n", b""), "mip6-spi"),
        (INSTALL.replace(b"404142434445464748494a4b4c4d4e4f", b"4041"), "mip6-mn-to-ha-ekey"),
        (
            INSTALL.replace(b"mip6-ha-to-mn-ekey: 6061", b"mip6-ha-to-mn-ekey: zz61"),
            "mip6-ha-to-mn-ekey",
        ),
        (INSTALL.replace(b"{00,2F}", b"{00,3D}"), "mip6-ciphersuite"),
        (INSTALL.replace(b"{00,2F}", b"{00,02}"), "mip6-mn-to-ha-ekey"),  # NULL needs no ekey
        (INSTALL + b"x", "content"),
    ],
)
def test_malformed_request_names_the_field(content: bytes, field: str) -> None:
    assert _field(content) == field


@pytest.mark.parametrize(
    ("content", "field"),
    [
        (b"prov-reason: internal\r\n\r\n", "status-code"),
        (b"status-code: 299\r\n\r\n", "status-code"),
        (b"status-code: 20\r\n\r\n", "status-code"),
        (b"status-code: 400\r\nprov-reason: no such spi\r\n\r\n", "prov-reason"),
        (b"status-code: 400\r\n" + SA_LINES + b"\r\n", "mip6-spi"),
        (b"status-code: 200\r\n" + SA_LINES.replace(b"ha-id: ha1\r\n", b"") + b"\r\n", "ha-id"),
    ],
)
def test_malformed_response_names_the_field(content: bytes, field: str) -> None:
    assert _field(content, decode_response) == field


def test_sender_refuses_unsendable_values() -> None:
    with pytest.raises(LocalProtocolError):
        encode_response(400, reason="Unknown SPI")
    with pytest.raises(LocalProtocolError):
        encode_response(400, make_issued())  # SA data only with 200
    with pytest.raises(LocalProtocolError):
        encode_response(299)  # PROFILE §6 set only
    with pytest.raises(LocalProtocolError):
        encode_install(make_issued(ha_id=""))
    with pytest.raises(LocalProtocolError):
        encode_pull(1, "hä")
    with pytest.raises(LocalProtocolError):
        encode_withdraw(0)


def test_keys_never_in_repr_or_errors() -> None:
    hexes = [IK1.hex(), IK2.hex(), EK1.hex(), EK2.hex()]
    texts = [
        repr(decode_request(INSTALL)),
        repr(decode_response(b"status-code: 200\r\n" + SA_LINES)),
    ]
    for bad in (
        INSTALL.replace(b"{00,2F}", b"{00,3C}"),  # 20-octet ikeys for a 16-octet suite
        INSTALL.replace(b"mip6-sas: 1", b"mip6-sas: 2"),
    ):
        with pytest.raises(HeaderError) as info:
            decode_request(bad)
        texts.append(str(info.value))
    assert "20 octets, suite needs 16" in texts[2]
    for text in texts:
        for h in hexes:
            assert h not in text and h[:16] not in text


def test_provisioning_failed_is_a_connection_error() -> None:
    exc = ProvisioningFailed("HA ha1 refused install", 500)
    assert isinstance(exc, ConnectionError) and exc.status == 500


# ------------------------------------------------------------ round trips

_names = st.from_regex(r"[a-z0-9]{1,12}@[a-z]{1,10}\.example", fullmatch=True)
_ha_ids = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=40
)


@st.composite
def issued_sas(draw: st.DrawFn) -> IssuedSA:
    suite = draw(st.sampled_from(list(Suite)))
    info = SUITES[suite]
    keys = [draw(st.binary(min_size=info.ikey_len, max_size=info.ikey_len)) for _ in range(2)]
    ekey = st.binary(min_size=info.ekey_len, max_size=info.ekey_len)
    if info.encryption == "3des-cbc":  # RFC 2451 §2.3: sa_from_message refuses these
        ekey = ekey.filter(lambda k: not _des3_degenerate(k))
    ekeys = [draw(ekey) for _ in range(2)]
    end = draw(st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2200, 1, 1)))
    sa = SecurityAssociation(
        spi=draw(st.integers(1, 268435455)),
        mn_id=draw(_names),
        suite=suite,
        scope=draw(st.sampled_from([0, 1])),
        validity_end=end.replace(microsecond=0, tzinfo=UTC),
        mn_to_ha_ikey=keys[0],
        ha_to_mn_ikey=keys[1],
        mn_to_ha_ekey=ekeys[0],
        ha_to_mn_ekey=ekeys[1],
        ha_id=draw(_ha_ids),
    )

    # Addresses sa_from_message takes (multicast, unspecified, link-local
    # and, for a home address, loopback or the HA's own are refused).
    def usable(v: int, home: bool) -> st.SearchStrategy[object]:
        return st.ip_addresses(v=v).filter(lambda a: _bad_address(a, home=home) is None)

    haa_ip6 = draw(st.none() | usable(6, False))
    haa_ip4 = draw(st.none() | usable(4, False))
    ip6_hoa = draw(st.none() | usable(6, True).filter(lambda a: a != haa_ip6))
    ip4_hoa = None if haa_ip4 == IPv4Address("192.0.2.7") else IPv4Address("192.0.2.7")
    bs = BootstrapData(
        haa_ip6=haa_ip6,  # type: ignore[arg-type]
        haa_ip4=haa_ip4,  # type: ignore[arg-type]
        port=draw(st.integers(1, 65535)),
        ip6_hoa=ip6_hoa,  # type: ignore[arg-type]
        ip4_hoa=draw(st.none() | st.just(ip4_hoa)),
    )
    return IssuedSA(sa, bs)


@settings(max_examples=200, deadline=None)
@given(issued_sas())
def test_round_trip_install_and_pull_answer(issued: IssuedSA) -> None:
    req = decode_request(encode_install(issued))
    assert req.op is ProvOp.INSTALL and req.issued == issued
    assert req.spi == issued.sa.spi and req.ha_id == issued.sa.ha_id
    resp = decode_response(encode_response(200, issued))
    assert resp == ProvResponse(200, issued, None)


@given(st.integers(1, 268435455), _ha_ids)
def test_round_trip_withdraw_and_pull(spi: int, ha_id: str) -> None:
    assert decode_request(encode_withdraw(spi)) == ProvRequest(ProvOp.WITHDRAW, spi=spi)
    assert decode_request(encode_pull(spi, ha_id)) == ProvRequest(ProvOp.PULL, spi=spi, ha_id=ha_id)


def test_install_ha_id_is_the_sas() -> None:
    issued = make_issued(ha_id="ha-7")
    req = decode_request(encode_install(issued))
    assert req.ha_id == "ha-7"
    assert req.issued == issued
    other = IssuedSA(dataclasses.replace(issued.sa, ha_id="ha-8"), issued.bootstrap)
    assert req.issued != other


# ------------------------------------------------- install superseding (prov-withdraw)

INSTALL_SUPERSEDING = INSTALL[:-2] + b"prov-withdraw: 7 268435455\r\n\r\n"


def test_install_superseding_vector() -> None:
    assert encode_install(make_issued(), (7, 268435455)) == INSTALL_SUPERSEDING
    req = decode_request(INSTALL_SUPERSEDING)
    assert req.op is ProvOp.INSTALL and req.withdraw == (7, 268435455)
    assert req.issued == make_issued()
    assert decode_request(INSTALL).withdraw == ()  # the header is optional


def test_install_superseding_answer_vector() -> None:
    vector = b"status-code: 200\r\nprov-withdrawn: 7 268435455\r\n\r\n"
    assert encode_response(200, withdrawn=(7, 268435455)) == vector
    assert decode_response(vector) == ProvResponse(200, withdrawn=(7, 268435455))
    assert decode_response(b"status-code: 200\r\n\r\n").withdrawn == ()


@pytest.mark.parametrize(
    "value",
    [
        b"",  # empty
        b"0",  # below SPI_MIN
        b"268435456",  # above SPI_MAX
        b"7 7",  # twice
        b"7  8",  # two spaces: an empty item
        b"7,8",
        b"4660",  # the SPI being installed
        b" ".join(str(i).encode() for i in range(1, 18)),  # 17 > 16
    ],
)
def test_malformed_prov_withdraw_names_the_field(value: bytes) -> None:
    assert _field(INSTALL[:-2] + b"prov-withdraw: " + value + b"\r\n\r\n") == "prov-withdraw"


def test_malformed_prov_withdrawn_names_the_field() -> None:
    bad = b"status-code: 400\r\nprov-withdrawn: 7\r\n\r\n"  # only a 200 confirms
    assert _field(bad, decode_response) == "prov-withdrawn"
    assert _field(b"status-code: 200\r\nprov-withdrawn: x\r\n\r\n", decode_response) == (
        "prov-withdrawn"
    )


def test_sender_refuses_unsendable_prov_withdraw() -> None:
    for withdraw in ((4660,), (7, 7), tuple(range(1, 18))):
        with pytest.raises(LocalProtocolError):
            encode_install(make_issued(), withdraw)
    with pytest.raises(LocalProtocolError):
        encode_response(500, reason="internal", withdrawn=(7,))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 268435455), min_size=1, max_size=16, unique=True))
def test_round_trip_prov_withdraw(spis: list[int]) -> None:
    spis = [s for s in spis if s != 4660] or [1]
    assert decode_request(encode_install(make_issued(), tuple(spis))).withdraw == tuple(spis)
    assert decode_response(encode_response(200, withdrawn=tuple(spis))).withdrawn == tuple(spis)


@settings(max_examples=500, deadline=None)
@given(
    issued_sas(),
    st.integers(min_value=0, max_value=10_000),
    st.integers(min_value=1, max_value=255),
    st.booleans(),
)
def test_a_damaged_install_decodes_or_raises_header_error_naming_a_field(
    issued: IssuedSA, at: int, mask: int, cut: bool
) -> None:
    """An install with one octet flipped (or cut short) is either still a
    well-formed request -- mutual TLS, not this codec, vouches for its
    sender -- or a ``HeaderError`` naming the field, which the HA answers
    with 400 and goes on (PROFILE §9).  Never another exception."""
    content = encode_install(issued, (issued.sa.spi % 268435455 + 1,))
    at %= len(content)
    flipped = content[:at] + bytes([content[at] ^ mask]) + content[at + 1 :]
    damaged = content[:at] if cut else flipped
    try:
        req = decode_request(damaged)
    except HeaderError as exc:
        assert exc.args and isinstance(exc.args[0], str) and exc.args[0], exc.args
        return
    assert req.op in tuple(ProvOp)
    if req.op is ProvOp.INSTALL:
        assert req.issued is not None and req.spi == req.issued.sa.spi
