"""TV-header value codecs (RFC 6618 §5.5-5.7; PROFILE §3 value table)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mipsec.core.errors import HeaderError, LocalProtocolError
from mipsec.core.wire import values as v

# ---------------------------------------------------------------------- NAI


@pytest.mark.parametrize(
    "nai",
    [
        "alice@home.example",
        "bob",
        "@realm.example",
        "jürgen@bücher.example",
        "a" * 253,
        "0001010000000001@wlan.mnc001.mcc001.3gppnetwork.org",
        "o'neil+tag=1/x!y@a-b.c1",  # every atext class
        "a@lab",  # one realm label: accepted (README)
    ],
)
def test_nai_accepted(nai: str) -> None:
    assert v.parse_nai(nai, field="mn-id") == nai
    assert v.format_nai(nai) == nai


@pytest.mark.parametrize(
    "nai",
    [
        "",
        "a" * 254,
        "é" * 127,  # 254 octets in UTF-8
        "a@b@c",
        "alice@",
        "alice@home..example",
        "alice@.example",
        "al ice@x",
        "al\x00ice",
        "al\u0085ice",
        "\udcff@x",
        # RFC 7542 §2.2: a dot-string of atext, realm labels of letters,
        # digits and inner hyphens (found in review: all were accepted).
        "a:b@x.example",
        "<script>@x.example",
        "a;b,c[d]@e.f",
        'a"b@x',
        "a..b@x.example",
        ".a@x.example",
        "a.@x",
        "a@-x.example",
        "a@x-.example",
        "a@ex!ample.com",
        "a@x_y.example",
    ],
)
def test_nai_rejected(nai: str) -> None:
    with pytest.raises(HeaderError) as ei:
        v.parse_nai(nai, field="mn-id")
    assert ei.value.field == "mn-id"
    with pytest.raises(LocalProtocolError):
        v.format_nai(nai)


# -------------------------------------------------------------- auth-method


def test_auth_methods() -> None:
    assert v.parse_auth_methods("psk") == ("psk",)
    assert v.parse_auth_methods(" PSK , eap,x-new ") == ("psk", "eap", "x-new")
    assert v.format_auth_methods(["psk", "eap"]) == "psk,eap"


@pytest.mark.parametrize("value", ["", "psk,", ",eap", "psk,,eap", "ps k", "p\u212ask"])
def test_auth_methods_rejected(value: str) -> None:
    with pytest.raises(HeaderError) as ei:
        v.parse_auth_methods(value)
    assert ei.value.field == "auth-method"


def test_format_auth_methods_rejects_empty() -> None:
    with pytest.raises(LocalProtocolError):
        v.format_auth_methods([])


# ---------------------------------------------------------------------- hex


def test_rand() -> None:
    raw = bytes(range(32))
    assert v.parse_rand(raw.hex().upper(), field="mn-rand") == raw
    assert v.format_hex(raw) == raw.hex()
    assert v.format_rand(raw) == raw.hex()


@pytest.mark.parametrize("value", ["00" * 31, "00" * 33, "0" * 63, "0" * 65, ""])
def test_rand_of_wrong_length(value: str) -> None:
    with pytest.raises(HeaderError) as ei:
        v.parse_rand(value, field="hac-rand")
    assert ei.value.field == "hac-rand"


@pytest.mark.parametrize("value", ["0g", "0 1", "00 ", "0x00", "abc", "", "\uff10\uff10", "-1"])
def test_bad_hex(value: str) -> None:
    with pytest.raises(HeaderError) as ei:
        v.parse_hex(value, field="mip6-mn-to-ha-ikey")
    assert ei.value.field == "mip6-mn-to-ha-ikey"


def test_hex_length() -> None:
    assert v.parse_hex("AbCd", field="k") == b"\xab\xcd"
    assert v.parse_hex("abcd", field="k", length=2) == b"\xab\xcd"
    with pytest.raises(HeaderError):
        v.parse_hex("abcd", field="k", length=3)
    with pytest.raises(LocalProtocolError):
        v.format_hex(b"")


def test_eap_payload() -> None:
    identity_request = bytes.fromhex("0101000501")  # Code 1, Id 1, Length 5, Type 1
    assert v.parse_eap_payload("0101000501") == identity_request
    assert v.format_eap_payload(identity_request) == "0101000501"
    assert v.parse_eap_payload("03020004") == b"\x03\x02\x00\x04"  # EAP-Success


@pytest.mark.parametrize("value", ["010100", "0101000601", "0101000401", "01010005"])
def test_eap_payload_bad_length(value: str) -> None:
    with pytest.raises(HeaderError) as ei:
        v.parse_eap_payload(value)
    assert ei.value.field == "eap-payload"


# ------------------------------------------------------------- status-code


@pytest.mark.parametrize("code", [100, 200, 400, 401, 500, 501, 503, 504])
def test_status_codes(code: int) -> None:
    assert v.parse_status(str(code)) == code
    assert v.format_status(code) == str(code)


@pytest.mark.parametrize("value", ["402", "20", "2000", "+20", "２００", " 200", "abc"])
def test_status_rejected(value: str) -> None:
    with pytest.raises(HeaderError) as ei:
        v.parse_status(value)
    assert ei.value.field == "status-code"


# -------------------------------------------------------------------- dates


def test_date_rfc2616_example() -> None:
    dt = v.parse_date("Sun, 06 Nov 1994 08:49:37 GMT", field="retry-after")
    assert dt == datetime(1994, 11, 6, 8, 49, 37, tzinfo=UTC)
    assert dt.tzinfo is not None
    assert v.format_date(dt) == "Sun, 06 Nov 1994 08:49:37 GMT"


def test_format_date_converts_to_gmt_and_drops_microseconds() -> None:
    dt = datetime(2024, 3, 1, 1, 2, 3, 999999, tzinfo=timezone(timedelta(hours=2)))
    assert v.format_date(dt) == "Thu, 29 Feb 2024 23:02:03 GMT"


def test_format_date_naive_refused() -> None:
    with pytest.raises(LocalProtocolError):
        v.format_date(datetime(2024, 1, 1))  # noqa: DTZ001


@pytest.mark.parametrize(
    "value",
    [
        "Mon, 06 Nov 1994 08:49:37 GMT",  # wrong weekday
        "Sunday, 06-Nov-94 08:49:37 GMT",  # RFC 850
        "Sun Nov  6 08:49:37 1994",  # asctime
        "Sun, 6 Nov 1994 08:49:37 GMT",
        "Sun, 06 Nov 1994 08:49:37 UTC",
        "sun, 06 nov 1994 08:49:37 GMT",
        "Sun, 31 Nov 1994 08:49:37 GMT",
        "Sun, 06 Nov 1994 24:00:00 GMT",
        "Sun, 06 Nov 1994 08:49:60 GMT",
        "Sun, 06 Xyz 1994 08:49:37 GMT",
        "Sun, 06 Nov 1994 08:49:37 GMT\n",
        "Sun, ０6 Nov 1994 08:49:37 GMT",
    ],
)
def test_date_rejected(value: str) -> None:
    with pytest.raises(HeaderError) as ei:
        v.parse_date(value, field="mip6-sa-validity-end")
    assert ei.value.field == "mip6-sa-validity-end"


@settings(max_examples=200, deadline=None)
@given(
    dt=st.datetimes(
        min_value=datetime(1, 1, 2),  # noqa: DTZ001
        max_value=datetime(9999, 12, 30),  # noqa: DTZ001
        timezones=st.sampled_from([UTC, timezone(timedelta(hours=-5, minutes=-30))]),
    )
)
def test_date_roundtrip(dt: datetime) -> None:
    text = v.format_date(dt)
    back = v.parse_date(text, field="retry-after")
    assert back == dt.replace(microsecond=0)
    assert v.format_date(back) == text


# ---------------------------------------------------------- SPI, SAS, port


def test_spi() -> None:
    assert v.parse_spi("1") == 1
    assert v.parse_spi("268435455") == 268435455
    assert v.parse_spi("0042") == 42  # BNF 1*DIGIT allows leading zeros
    assert v.format_spi(42) == "42"


@pytest.mark.parametrize(
    "value", ["0", "268435456", "-1", "+1", "1_000", "١", "", " 1", "1e3", "0" * 5000 + "9" * 12]
)
def test_spi_rejected(value: str) -> None:
    with pytest.raises(HeaderError) as ei:
        v.parse_spi(value)
    assert ei.value.field == "mip6-spi"


@pytest.mark.parametrize("bad", [0, 268435456, True])
def test_format_spi_rejects(bad: int) -> None:
    with pytest.raises(LocalProtocolError):
        v.format_spi(bad)


def test_sas() -> None:
    assert v.parse_sas("0") == 0
    assert v.parse_sas("1") == 1
    assert v.format_sas(1) == "1"


@pytest.mark.parametrize("value", ["O", "o", "2", "01", "", "１"])
def test_sas_letter_o_is_malformed(value: str) -> None:
    with pytest.raises(HeaderError) as ei:
        v.parse_sas(value)
    assert ei.value.field == "mip6-sas"


def test_port() -> None:
    assert v.parse_port("7872") == 7872
    assert v.parse_port("65535") == 65535
    assert v.format_port(1) == "1"
    for bad in ["0", "65536", "000080", "+80", "８０"]:
        with pytest.raises(HeaderError):
            v.parse_port(bad)


# ------------------------------------------------------------------- suites


def test_suite() -> None:
    assert v.parse_suite("{00,2F}") == 0x002F
    assert v.parse_suite("{00,2f}") == 0x002F
    assert v.parse_suite("{C0,FF}") == 0xC0FF  # reserved values parse; policy rejects
    assert v.format_suite(0x3C) == "{00,3C}"
    assert v.format_suite(0x0A) == "{00,0A}"


@pytest.mark.parametrize("value", ["{00, 2F}", "{0,2F}", "00,2F", "{00,2F", "{002F}", " {00,2F}"])
def test_suite_rejected(value: str) -> None:
    with pytest.raises(HeaderError) as ei:
        v.parse_suite(value)
    assert ei.value.field == "mip6-ciphersuite"


def test_suitelist() -> None:
    assert v.parse_suitelist("{00,3C},{00,2F}") == (0x3C, 0x2F)
    assert v.parse_suitelist("{00,3c} ,\t{00,0A}") == (0x3C, 0x0A)
    assert v.format_suitelist([0x3C, 0x2F, 0x0A]) == "{00,3C},{00,2F},{00,0A}"


@pytest.mark.parametrize(
    "value", ["", "{00,3C},", ",{00,3C}", "{00,3C}{00,2F}", "{00,3C},,{00,2F}"]
)
def test_suitelist_rejected(value: str) -> None:
    with pytest.raises(HeaderError) as ei:
        v.parse_suitelist(value)
    assert ei.value.field == "mip6-suitelist"


# ------------------------------------------------------------------------ IP


def test_ip6_forms() -> None:
    a = IPv6Address("2001:db8::1")
    for text in ["2001:db8::1", "2001:DB8:0:0:0:0:0:1", "2001:0db8:0000:0000:0000:0000:0000:0001"]:
        assert v.parse_ip6(text, field="dns-ip6") == a
    assert v.format_ip6(a) == "2001:db8:0:0:0:0:0:1"
    assert v.format_ip6(IPv6Address("::")) == "0:0:0:0:0:0:0:0"
    assert v.parse_ip6("::ffff:192.0.2.1", field="x") == IPv6Address("::ffff:c000:201")


@pytest.mark.parametrize(
    "value", ["fe80::1%eth0", "fe80::1%1", "2001:db8::1::2", "1.2.3.4", "", "２001:db8::1", "g::1"]
)
def test_ip6_rejected_incl_zone_id(value: str) -> None:
    with pytest.raises(HeaderError) as ei:
        v.parse_ip6(value, field="mip6-haa-ip6")
    assert ei.value.field == "mip6-haa-ip6"


def test_format_ip6_rejects_zone_and_wrong_type() -> None:
    with pytest.raises(LocalProtocolError):
        v.format_ip6(IPv6Address("fe80::1%eth0"))
    with pytest.raises(LocalProtocolError):
        v.format_ip6(IPv4Address("1.2.3.4"))  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(addr=st.ip_addresses(v=6))
def test_ip6_roundtrip(addr: IPv6Address) -> None:
    text = v.format_ip6(addr)
    assert text.count(":") == 7 and "::" not in text and text == text.lower()
    assert all(g == "0" or not g.startswith("0") for g in text.split(":"))
    assert v.parse_ip6(text, field="x") == addr


def test_ip6_prefix() -> None:
    net = v.parse_ip6_prefix("2001:db8:1::/48")
    assert net == IPv6Network("2001:db8:1::/48")
    assert v.format_ip6_prefix(net) == "2001:db8:1:0:0:0:0:0/48"
    assert v.parse_ip6_prefix("::/0") == IPv6Network("::/0")
    assert v.parse_ip6_prefix("2001:db8::1/128").prefixlen == 128
    # Host bits are cleared (documented normalisation).
    assert v.parse_ip6_prefix("2001:db8::1/64") == IPv6Network("2001:db8::/64")


@pytest.mark.parametrize(
    "value",
    [
        "2001:db8::/129",
        "2001:db8::",
        "2001:db8::/",
        "2001:db8::/+4",
        "2001:db8::/1/2",
        "fe80::%1/64",
        "2001:db8::/0064",
    ],
)
def test_ip6_prefix_rejected(value: str) -> None:
    with pytest.raises(HeaderError) as ei:
        v.parse_ip6_prefix(value)
    assert ei.value.field == "mip6-ip6-hnp"


def test_ip4() -> None:
    assert v.parse_ip4("192.0.2.1", field="dns-ip4") == IPv4Address("192.0.2.1")
    assert v.parse_ip4("010.0.0.1", field="x") == IPv4Address("10.0.0.1")  # decimal, not octal
    assert v.format_ip4(IPv4Address("192.0.2.1")) == "192.0.2.1"


@pytest.mark.parametrize(
    "value", ["256.0.0.1", "1.2.3", "1.2.3.4.5", "+1.2.3.4", "1.2.3.0001", "1..3.4", "١.2.3.4", ""]
)
def test_ip4_rejected(value: str) -> None:
    with pytest.raises(HeaderError) as ei:
        v.parse_ip4(value, field="mip6-ip4-hoa")
    assert ei.value.field == "mip6-ip4-hoa"


def test_ip4_subnet() -> None:
    assert v.parse_ip4_subnet("192.0.2.0/24") == IPv4Network("192.0.2.0/24")
    assert v.parse_ip4_subnet("192.0.2.7/24") == IPv4Network("192.0.2.0/24")
    assert v.format_ip4_subnet(IPv4Network("10.0.0.0/8")) == "10.0.0.0/8"
    for bad in ["192.0.2.0/33", "192.0.2.0", "192.0.2.0/024"]:
        with pytest.raises(HeaderError):
            v.parse_ip4_subnet(bad)


# ------------------------------------------------------------- never crash

PARSERS: list[Callable[..., Any]] = [
    v.parse_nai,
    v.parse_auth_methods,
    v.parse_rand,
    v.parse_hex,
    v.parse_eap_payload,
    v.parse_status,
    v.parse_date,
    v.parse_spi,
    v.parse_sas,
    v.parse_port,
    v.parse_suite,
    v.parse_suitelist,
    v.parse_ip6,
    v.parse_ip6_prefix,
    v.parse_ip4,
    v.parse_ip4_subnet,
]


@settings(max_examples=500, deadline=None)
@given(parser=st.sampled_from(PARSERS), text=st.text(max_size=80))
def test_parsers_only_raise_header_error(parser: Callable[..., Any], text: str) -> None:
    try:
        parser(text, field="f")
    except HeaderError as exc:
        assert exc.field == "f"


@settings(max_examples=300, deadline=None)
@given(
    parser=st.sampled_from(PARSERS),
    text=st.from_regex(r"[0-9a-fA-F:./,{}@ GMTSunNov-]{0,60}", fullmatch=True),
)
def test_parsers_only_raise_header_error_near_valid(parser: Callable[..., Any], text: str) -> None:
    try:
        parser(text, field="f")
    except HeaderError:
        pass
