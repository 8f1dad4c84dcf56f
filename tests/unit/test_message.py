"""Typed MHAuth messages (RFC 6618 §5.5-5.7; PROFILE §3, §4)."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import fields
from datetime import UTC, datetime
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest

from mipsec.core.errors import HeaderError, LocalProtocolError
from mipsec.core.wire.message import (
    HEADER_NAMES,
    Message,
    decode_message,
    encode_message,
    message_from_bytes,
)
from mipsec.core.wire.tvheader import (
    LABEL_HAC,
    encode_content,
    encode_content_with_auth,
    parse_content,
    verify_auth,
)

MN_RAND = bytes(range(32))
HAC_RAND = bytes(range(32, 64))
IKEY = bytes.fromhex("11" * 16)
EKEY = bytes.fromhex("22" * 16)


def full_success() -> Message:
    return Message(
        mn_id="alice@home.example",
        auth_method=("psk",),
        mn_rand=MN_RAND,
        hac_rand=HAC_RAND,
        status_code=200,
        mip6_spi=4097,
        mn_to_ha_ikey=IKEY,
        ha_to_mn_ikey=IKEY[::-1],
        mn_to_ha_ekey=EKEY,
        ha_to_mn_ekey=EKEY[::-1],
        sa_validity_end=datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC),
        mip6_sas=1,
        ciphersuite=0x3C,
        suitelist=(0x3C, 0x2F),
        haa_ip6=IPv6Address("2001:db8::1"),
        haa_ip4=IPv4Address("192.0.2.1"),
        port=7872,
        ip6_hoa=IPv6Address("2001:db8:1::100"),
        ip4_hoa=IPv4Address("10.1.0.100"),
        ip6_hnp=IPv6Network("2001:db8:1::/64"),
        ip4_hnp=IPv4Network("10.1.0.0/16"),
        dns_ip6=IPv6Address("2001:db8::53"),
        dns_ip4=IPv4Address("192.0.2.53"),
    )


def test_table_covers_every_field_once() -> None:
    attrs = [c.attribute for c in HEADER_NAMES.values()]
    assert sorted(attrs) == sorted(f.name for f in fields(Message))
    assert len(set(attrs)) == len(attrs)
    assert "auth" not in HEADER_NAMES


def test_table_order_is_canonical_sender_order() -> None:
    assert list(HEADER_NAMES) == [
        "mn-id", "auth-method", "mn-rand", "hac-rand", "eap-payload", "status-code",
        "retry-after", "mip6-spi", "mip6-mn-to-ha-ikey", "mip6-ha-to-mn-ikey",
        "mip6-mn-to-ha-ekey", "mip6-ha-to-mn-ekey", "mip6-sa-validity-end", "mip6-sas",
        "mip6-ciphersuite", "mip6-suitelist", "mip6-haa-ip6", "mip6-haa-ip4", "mip6-port",
        "mip6-ip6-hoa", "mip6-ip4-hoa", "mip6-ip6-hnp", "mip6-ip4-hnp", "dns-ip6", "dns-ip4",
    ]  # fmt: skip


def test_encode_init_request_exact_bytes() -> None:
    msg = Message(mn_id="alice@home.example", mn_rand=MN_RAND, auth_method=("psk",))
    raw = encode_content(encode_message(msg))
    assert raw == (
        b"mn-id: alice@home.example\r\n"
        b"auth-method: psk\r\n"
        b"mn-rand: " + MN_RAND.hex().encode() + b"\r\n"
        b"\r\n"
    )


def test_encode_canonical_forms() -> None:
    pairs = dict(encode_message(full_success()))
    assert pairs["mip6-haa-ip6"] == "2001:db8:0:0:0:0:0:1"
    assert pairs["mip6-ip6-hnp"] == "2001:db8:1:0:0:0:0:0/64"
    assert pairs["mip6-ip4-hnp"] == "10.1.0.0/16"
    assert pairs["mip6-ciphersuite"] == "{00,3C}"
    assert pairs["mip6-suitelist"] == "{00,3C},{00,2F}"
    assert pairs["mip6-sa-validity-end"] == "Wed, 02 Jan 2030 03:04:05 GMT"
    assert pairs["mip6-mn-to-ha-ikey"] == "11" * 16
    assert pairs["status-code"] == "200"
    assert pairs["mip6-sas"] == "1"


def test_full_roundtrip_with_auth() -> None:
    msg = full_success()
    key, cb = b"psk", b"\x01" * 32
    raw = encode_content_with_auth(encode_message(msg), key, LABEL_HAC, cb)
    parsed, back = message_from_bytes(raw)
    assert back == msg
    assert verify_auth(key, LABEL_HAC, parsed, cb)
    expected = hmac.new(key, b"HAC" + parsed.msg_octets + cb, hashlib.sha256).hexdigest()
    assert parsed.auth == expected


def test_decode_liberal_receiver_forms() -> None:
    raw = (
        b"MN-ID: bob@x.example\r\n"
        b"Auth-Method: PSK, eap\r\n"
        b"mip6-haa-ip6: 2001:DB8::1\r\n"
        b"mip6-suitelist: {00,3c} , {00,2f}\r\n"
        b"mip6-spi:\t007\r\n"
        b"x-vendor-thing: ignored\r\n"
    )
    _, msg = message_from_bytes(raw)
    assert msg.mn_id == "bob@x.example"
    assert msg.auth_method == ("psk", "eap")
    assert msg.haa_ip6 == IPv6Address("2001:db8::1")
    assert msg.suitelist == (0x3C, 0x2F)
    assert msg.mip6_spi == 7
    assert msg.port is None  # absent; default 7872 is the consumer's choice


def test_unknown_headers_ignored() -> None:
    assert decode_message(parse_content(b"x-new: 1\r\n\r\n")) == Message()


@pytest.mark.parametrize(
    ("line", "field"),
    [
        (b"mip6-sas: O", "mip6-sas"),
        (b"mn-rand: 00", "mn-rand"),
        (b"mip6-spi: 0", "mip6-spi"),
        (b"status-code: 302", "status-code"),
        (b"mip6-ip6-hoa: fe80::1%eth0", "mip6-ip6-hoa"),
        (b"mip6-ha-to-mn-ekey: xyz1", "mip6-ha-to-mn-ekey"),
        (b"retry-after: tomorrow", "retry-after"),
        (b"mn-id: a@b@c", "mn-id"),
    ],
)
def test_decode_error_names_header(line: bytes, field: str) -> None:
    with pytest.raises(HeaderError) as ei:
        message_from_bytes(line + b"\r\n\r\n")
    assert ei.value.field == field


def test_decode_error_does_not_leak_key() -> None:
    with pytest.raises(HeaderError) as ei:
        message_from_bytes(b"mip6-mn-to-ha-ikey: deadbeefcafe0\r\n")
    assert "deadbeef" not in str(ei.value)


def test_repr_hides_keys() -> None:
    r = repr(full_success())
    assert IKEY.hex() not in r and EKEY.hex() not in r
    assert "ikey" not in r and "ekey" not in r
    assert "alice@home.example" in r


def test_encode_rejects_bad_typed_values() -> None:
    with pytest.raises(LocalProtocolError):
        encode_message(Message(mn_rand=b"short"))
    with pytest.raises(LocalProtocolError):
        encode_message(Message(mip6_spi=0))
    with pytest.raises(LocalProtocolError):
        encode_message(Message(status_code=302))
    with pytest.raises(LocalProtocolError):
        encode_message(Message(mip6_sas=2))
    with pytest.raises(LocalProtocolError):
        encode_message(Message(retry_after=datetime(2030, 1, 1)))  # noqa: DTZ001


def test_empty_message_encodes_to_nothing() -> None:
    assert encode_message(Message()) == []


def test_per_ha_texts_are_made_once_per_object_and_never_confused() -> None:
    """Issue 9: the HA's addresses, DNS and pool prefixes are formatted once
    per object; an entry for another object under a reused id is not used,
    a bad value still raises, and the memo stays bounded."""
    from mipsec.core.wire import message as m

    haa = IPv6Address("2001:db8::1")
    first = dict(encode_message(Message(haa_ip6=haa, dns_ip4=IPv4Address("192.0.2.53"))))
    assert m._TEXT_MEMO[id(haa)] == (haa, "2001:db8:0:0:0:0:0:1")
    # Another object now sits under haa's id (as if haa had died and its id
    # been reused): its text must not be taken for haa's.
    m._TEXT_MEMO[id(haa)] = (IPv6Address("2001:db8::99"), "2001:db8:0:0:0:0:0:99")
    again = dict(encode_message(Message(haa_ip6=haa, dns_ip4=IPv4Address("192.0.2.53"))))
    assert again == first == {"mip6-haa-ip6": "2001:db8:0:0:0:0:0:1", "dns-ip4": "192.0.2.53"}
    for i in range(2 * m._TEXT_MEMO_MAX):
        encode_message(Message(dns_ip6=IPv6Address(f"2001:db8::{i:x}")))
    assert len(m._TEXT_MEMO) <= m._TEXT_MEMO_MAX
    with pytest.raises(LocalProtocolError):
        encode_message(Message(haa_ip6=IPv6Address("fe80::1%eth0")))  # zone id: never sent


def test_per_ha_values_received_are_parsed_once_per_text_and_stay_strict() -> None:
    """The same per-HA texts in every install are parsed once; a memo hit
    gives the value the codec gives (the same field, the same text), a bad
    text raises naming its field every time and is never kept, per-MN
    headers never enter the memo, and the memo stays bounded."""
    from mipsec.core.wire import message as m

    def decode(*headers: tuple[str, str]) -> Message:
        return decode_message(parse_content(encode_content(list(headers))))

    m._VALUE_MEMO.clear()
    one = decode(("mip6-haa-ip6", "2001:db8:0:0:0:0:0:1"), ("mip6-ip6-hoa", "2001:db8:1:0:0:0:0:7"))
    two = decode(("mip6-haa-ip6", "2001:db8:0:0:0:0:0:1"), ("mip6-ip6-hoa", "2001:db8:1:0:0:0:0:8"))
    assert one.haa_ip6 == two.haa_ip6 == IPv6Address("2001:db8::1")
    assert two.ip6_hoa == IPv6Address("2001:db8:1::8")
    assert set(m._VALUE_MEMO) == {("mip6-haa-ip6", "2001:db8:0:0:0:0:0:1")}  # not the HoA
    # The same text under another header is that header's own parse.
    assert decode(("dns-ip6", "2001:db8:0:0:0:0:0:1")).dns_ip6 == IPv6Address("2001:db8::1")
    net = decode(("mip6-ip6-hnp", "2001:db8:1:0:0:0:0:5/64")).ip6_hnp
    assert net == IPv6Network("2001:db8:1::/64")  # host bits cleared, as uncached
    for _ in range(2):
        with pytest.raises(HeaderError) as err:
            decode(("dns-ip4", "192.0.2.256"))
        assert err.value.field == "dns-ip4"
    assert not any(text == "192.0.2.256" for _, text in m._VALUE_MEMO)
    for i in range(2 * m._VALUE_MEMO_MAX):
        assert decode(("dns-ip4", f"10.0.{i // 256}.{i % 256}")).dns_ip4 == IPv4Address(
            f"10.0.{i // 256}.{i % 256}"
        )
    assert len(m._VALUE_MEMO) <= m._VALUE_MEMO_MAX
