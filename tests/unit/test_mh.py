"""Mobility Header codec (RFC 6275 §6.1.1, §6.1.7, §6.1.8, §6.2; RFC 5555; PROFILE §8)."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

# scapy is GPL: it is imported here, in tests only, never under core/.
from scapy.fields import BitField, ByteField, IPField, ShortField
from scapy.layers.inet6 import (
    MIP6MH_BA,
    MIP6MH_BU,
    IPv6,
    MIP6OptAltCoA,
    MIP6OptUnknown,
    _MIP6OptAlign,
)

from mipsec.core.errors import LocalProtocolError, MobilityHeaderError
from mipsec.core.wire.mh import (
    ACCEPTED,
    NOT_HOME_AGENT,
    REASON_UNSPECIFIED,
    REINIT_SA_WITH_HAC,
    SEQUENCE_OUT_OF_WINDOW,
    AlternateCareOfAddress,
    BindingAck,
    BindingUpdate,
    IPv4AddressAck,
    IPv4CareOfAddress,
    IPv4HomeAddressRequest,
    MobilityOption,
    UnknownOption,
    align_padding,
    decode_mh,
    encode_mh,
    lifetime_units,
    pad_octets,
    seq_newer,
)

HOA = IPv6Address("2001:db8::1")  # MN home address: BU source, BA destination
HAA = IPv6Address("2001:db8::2")  # HA address: BU destination, BA source


# --- independent checksum ----------------------------------------------------


def ref_checksum(src: IPv6Address, dst: IPv6Address, mh: bytes) -> int:
    """RFC 2460 §8.1 pseudo-header checksum, computed another way than core.

    The one's complement sum equals the plain sum modulo 0xFFFF (with a
    non-zero multiple of 0xFFFF read as 0xFFFF).
    """
    mh = mh[:4] + b"\x00\x00" + mh[6:]
    pseudo = src.packed + dst.packed + len(mh).to_bytes(4, "big") + bytes([0, 0, 0, 135])
    buf = pseudo + mh + (b"\x00" if len(mh) % 2 else b"")
    total = sum(struct.unpack(f"!{len(buf) // 2}H", buf))
    ones = total % 0xFFFF or 0xFFFF
    return 0xFFFF - ones


def with_checksum(src: IPv6Address, dst: IPv6Address, mh: bytes) -> bytes:
    return mh[:4] + ref_checksum(src, dst, mh).to_bytes(2, "big") + mh[6:]


def check_vector(msg: BindingUpdate | BindingAck, src: IPv6Address, dst: IPv6Address, vec: str):
    expected = bytes.fromhex(vec.replace(" ", ""))
    # The checksum written in the vector is the independently computed one.
    assert int.from_bytes(expected[4:6], "big") == ref_checksum(src, dst, expected)
    wire = encode_mh(msg, src=src, dst=dst)
    assert wire == expected
    decoded = decode_mh(wire, src=src, dst=dst)
    assert decoded.message == msg
    assert decoded.checksum_ok
    assert decoded.checksum == int.from_bytes(expected[4:6], "big")


# --- hand-written vectors ----------------------------------------------------


def test_bu_without_options_carries_padn4_and_header_len_1():
    # RFC 6275 §6.1.7 / PROFILE §8: 12 octets of header + BU, then PadN(4).
    bu = BindingUpdate(sequence=1, a=True, h=True, k=True, lifetime=100)
    check_vector(
        bu,
        HOA,
        HAA,
        "3b 01 05 00 928a"  # proto 59, len 1, type 5, reserved, checksum
        " 0001 d000 0064"  # seq 1, A|H|K (0x80|0x40|0x10), lifetime 100
        " 01 02 0000",  # PadN, length 2, two zero octets
    )
    assert bu.lifetime_seconds == 400


def test_ba_status_0():
    ba = BindingAck(status=ACCEPTED, k=True, sequence=1, lifetime=100)
    check_vector(
        ba,
        HAA,
        HOA,
        "3b 01 06 00 610b"
        " 00 80 0001 0064"  # status 0, K, seq 1, lifetime 100
        " 01 02 0000",
    )
    assert ba.accepted and ba.lifetime_seconds == 400


def test_bu_with_alternate_coa_is_8n_plus_6_aligned():
    coa = IPv6Address("2001:db8:ffff::5")
    bu = BindingUpdate(
        sequence=0x1234, a=True, h=True, lifetime=0x0E10, options=(AlternateCareOfAddress(coa),)
    )
    wire = encode_mh(bu, src=HOA, dst=HAA)
    check_vector(
        bu,
        HOA,
        HAA,
        "3b 03 05 00 " + wire[4:6].hex() + " 1234 c000 0e10"
        " 01 00"  # offset 12: PadN with no data, so the option starts at 14 = 8*1+6
        " 03 10 20010db8ffff00000000000000000005",  # type 3, len 16, address at 16
    )
    assert wire[14] == 3 and wire[16:32] == coa.packed and len(wire) == 32


def test_bu_with_ipv4_hoa_request():
    opt = IPv4HomeAddressRequest(prefix_len=32, home_address=IPv4Address("192.0.2.10"))
    bu = BindingUpdate(sequence=7, a=True, h=True, k=True, lifetime=150, options=(opt,))
    wire = encode_mh(bu, src=HOA, dst=HAA)
    check_vector(
        bu,
        HOA,
        HAA,
        "3b 02 05 00 " + wire[4:6].hex() + " 0007 d000 0096"
        " 1d 06 8000 c000020a"  # offset 12 (4n): type 29, len 6, 32<<10, 192.0.2.10
        " 01 02 0000",  # end at 20: PadN(4) to reach 24
    )


def test_bu_ipv4_hoa_request_p_flag_and_unspecified_address():
    opt = IPv4HomeAddressRequest(prefix_len=24, home_address=IPv4Address("0.0.0.0"), p=True)
    wire = encode_mh(BindingUpdate(sequence=1, options=(opt,)), src=HOA, dst=HAA)
    # Prefix-len 24 (6 bits) | P | 9 reserved bits = 0b011000_1_000000000
    assert wire[12:20] == bytes.fromhex("1d06 6200 00000000")
    assert decode_mh(wire, src=HOA, dst=HAA).message.options == (opt,)


def test_ba_with_ipv4_address_ack():
    opt = IPv4AddressAck(status=0, prefix_len=24, home_address=IPv4Address("192.0.2.10"))
    ba = BindingAck(status=ACCEPTED, k=True, sequence=7, lifetime=150, options=(opt,))
    wire = encode_mh(ba, src=HAA, dst=HOA)
    check_vector(
        ba,
        HAA,
        HOA,
        "3b 02 06 00 " + wire[4:6].hex() + " 00 80 0007 0096"
        " 1e 06 00 60 c000020a"  # type 30, len 6, status 0, pref-len 24<<2, address
        " 01 02 0000",
    )
    assert opt.accepted


def test_pad1_before_4n_option_and_padn_before_8n6_option():
    # UnknownOption(type 200, 1 octet) ends at 15: the IPv4 CoA (4n) needs one
    # octet -> Pad1; it ends at 24 and the Alt CoA (8n+6) needs 6 -> PadN(6).
    coa6 = IPv6Address("2001:db8::99")
    bu = BindingUpdate(
        sequence=2,
        options=(
            UnknownOption(200, b"\xaa"),
            IPv4CareOfAddress(IPv4Address("198.51.100.7")),
            AlternateCareOfAddress(coa6),
        ),
    )
    wire = encode_mh(bu, src=HOA, dst=HAA)
    expected = bytes.fromhex(
        "3b 05 05 00 0000 0002 0000 0000"  # checksum filled in below
        " c8 01 aa"  # offset 12: unknown option (type 200), no alignment
        " 00"  # offset 15: Pad1
        " 20 06 0000 c6336407"  # offset 16 (4n): IPv4 CoA, Reserved, 198.51.100.7
        " 01 04 00000000"  # offset 24: PadN(6)
        " 03 10 20010db8000000000000000000000099"  # offset 30 = 8*3+6: Alt CoA
    )
    # 30 + 18 = 48 octets: already a multiple of 8, so no trailing padding.
    expected = with_checksum(HOA, HAA, expected)
    assert len(expected) == 48
    assert wire == expected
    assert decode_mh(wire, src=HOA, dst=HAA).message == bu


def test_trailing_padding_pad1_or_one_padn():
    # Trailing padding: 7 octets missing -> one PadN(7), never Pad1 runs.
    ba = BindingAck(status=0, options=(UnknownOption(201, b"\x01\x02\x03"),))
    wire = encode_mh(ba, src=HAA, dst=HOA)
    assert wire[12:] == bytes.fromhex("c9 03 010203 01 05 0000000000")
    ba1 = BindingAck(status=0, options=(UnknownOption(201, bytes(range(1, 10))),))
    wire1 = encode_mh(ba1, src=HAA, dst=HOA)
    # 12 + 2 + 9 = 23: one octet missing -> Pad1.
    assert wire1[12:] == bytes.fromhex("c9 09 010203040506070809 00")
    assert decode_mh(wire1, src=HAA, dst=HOA).message == ba1


# --- scapy cross-checks ------------------------------------------------------


class ScapyIPv4HoA(_MIP6OptAlign):
    """RFC 5555 §3.1.1 for scapy (which lacks DSMIP6 options), alignment 4n."""

    name = "DSMIP6 IPv4 Home Address"
    fields_desc = [
        ByteField("otype", 29),
        ByteField("olen", 6),
        BitField("plen", 32, 6),
        BitField("p", 0, 1),
        BitField("res", 0, 9),
        IPField("hoa", "0.0.0.0"),
    ]
    x = 4
    y = 0


class ScapyIPv4Ack(_MIP6OptAlign):
    name = "DSMIP6 IPv4 Address Acknowledgement"
    fields_desc = [
        ByteField("otype", 30),
        ByteField("olen", 6),
        ByteField("status", 0),
        BitField("plen", 32, 6),
        BitField("res", 0, 2),
        IPField("hoa", "0.0.0.0"),
    ]
    x = 4
    y = 0


class ScapyIPv4CoA(_MIP6OptAlign):
    name = "DSMIP6 IPv4 Care-of Address"
    fields_desc = [
        ByteField("otype", 32),
        ByteField("olen", 6),
        ShortField("res", 0),
        IPField("coa", "0.0.0.0"),
    ]
    x = 4
    y = 0


def to_scapy_option(opt: MobilityOption):
    if isinstance(opt, AlternateCareOfAddress):
        return MIP6OptAltCoA(acoa=str(opt.address))
    if isinstance(opt, IPv4HomeAddressRequest):
        return ScapyIPv4HoA(plen=opt.prefix_len, p=int(opt.p), hoa=str(opt.home_address))
    if isinstance(opt, IPv4AddressAck):
        return ScapyIPv4Ack(status=opt.status, plen=opt.prefix_len, hoa=str(opt.home_address))
    if isinstance(opt, IPv4CareOfAddress):
        return ScapyIPv4CoA(coa=str(opt.address))
    # MIP6OptUnknown has no alignment (x = y = 0), like our UnknownOption.
    return MIP6OptUnknown(otype=opt.option_type, odata=opt.data)


def scapy_mh(msg: BindingUpdate | BindingAck, src: IPv6Address, dst: IPv6Address) -> bytes:
    """Same message built by scapy inside IPv6(): scapy fills Header Len,
    padding (Pad1 / PadN, same xn+y rule) and the pseudo-header checksum."""
    opts = [to_scapy_option(o) for o in msg.options]
    if isinstance(msg, BindingUpdate):
        # scapy's BU flag field lists bits LSB first: "PRMKLHA" -> A is the MSB.
        flags = "".join(
            f for f, on in (("A", msg.a), ("H", msg.h), ("L", msg.l), ("K", msg.k)) if on
        )
        layer = MIP6MH_BU(seq=msg.sequence, flags=flags, mhtime=msg.lifetime, options=opts)
        pkt = IPv6(src=str(src), dst=str(dst)) / layer
        return bytes(pkt[MIP6MH_BU])
    # scapy's BA default flags is "K": set it explicitly, and res2 (None) to 0.
    layer = MIP6MH_BA(
        status=msg.status,
        flags="K" if msg.k else 0,
        res2=0,
        seq=msg.sequence,
        mhtime=msg.lifetime,
        options=opts,
    )
    pkt = IPv6(src=str(src), dst=str(dst)) / layer
    return bytes(pkt[MIP6MH_BA])


@pytest.mark.parametrize(
    "msg",
    [
        BindingUpdate(sequence=1, a=True, h=True, k=True, lifetime=100),
        BindingUpdate(sequence=0xFFFF, l=True, lifetime=0),
        BindingUpdate(
            sequence=0x1234,
            a=True,
            h=True,
            lifetime=0x0E10,
            options=(AlternateCareOfAddress(IPv6Address("2001:db8:ffff::5")),),
        ),
        BindingUpdate(
            sequence=9,
            a=True,
            h=True,
            k=True,
            lifetime=60,
            options=(
                IPv4HomeAddressRequest(32, IPv4Address("0.0.0.0")),
                AlternateCareOfAddress(IPv6Address("2001:db8::77")),
                IPv4CareOfAddress(IPv4Address("203.0.113.9")),
            ),
        ),
        BindingAck(status=ACCEPTED, k=True, sequence=1, lifetime=100),
        BindingAck(status=SEQUENCE_OUT_OF_WINDOW, sequence=0x8000),
        BindingAck(
            status=ACCEPTED,
            k=True,
            sequence=9,
            lifetime=60,
            options=(IPv4AddressAck(0, 24, IPv4Address("192.0.2.10")),),
        ),
    ],
)
def test_matches_scapy_octet_for_octet(msg):
    src, dst = (HOA, HAA) if isinstance(msg, BindingUpdate) else (HAA, HOA)
    assert encode_mh(msg, src=src, dst=dst) == scapy_mh(msg, src, dst)


# --- hypothesis strategies ---------------------------------------------------

u16 = st.integers(0, 0xFFFF)
ip6 = st.builds(IPv6Address, st.integers(0, 2**128 - 1))
ip4 = st.builds(IPv4Address, st.integers(0, 2**32 - 1))
KNOWN = {0, 1, 3, 29, 30, 32}
unknown_type = st.integers(2, 255).filter(lambda t: t not in KNOWN)

options_st = st.one_of(
    st.builds(AlternateCareOfAddress, ip6),
    st.builds(IPv4HomeAddressRequest, st.integers(0, 63), ip4, st.booleans()),
    st.builds(IPv4AddressAck, st.integers(0, 255), st.integers(0, 63), ip4),
    st.builds(IPv4CareOfAddress, ip4),
    st.builds(UnknownOption, unknown_type, st.binary(max_size=40)),
)
opt_tuple = st.lists(options_st, max_size=6).map(tuple)

bu_st = st.builds(
    BindingUpdate,
    sequence=u16,
    a=st.booleans(),
    h=st.booleans(),
    l=st.booleans(),
    k=st.booleans(),
    lifetime=u16,
    options=opt_tuple,
)
ba_st = st.builds(
    BindingAck,
    status=st.integers(0, 255),
    k=st.booleans(),
    sequence=u16,
    lifetime=u16,
    options=opt_tuple,
)
msg_st = st.one_of(bu_st, ba_st)


def walk_options(wire: bytes):
    """Independent option walker: yields (offset, type) of every non-pad option."""
    i = 12
    while i < len(wire):
        if wire[i] == 0:
            i += 1
            continue
        if wire[i] != 1:
            yield i, wire[i]
        i += 2 + wire[i + 1]
    assert i == len(wire)


@settings(max_examples=300, deadline=None)
@given(msg_st, ip6, ip6)
def test_round_trip(msg, src, dst):
    wire = encode_mh(msg, src=src, dst=dst)
    assert len(wire) % 8 == 0 and (wire[1] + 1) * 8 == len(wire)
    assert int.from_bytes(wire[4:6], "big") == ref_checksum(src, dst, wire)
    decoded = decode_mh(wire, src=src, dst=dst)
    assert decoded.message == msg
    assert decoded.checksum_ok
    # Every option sits at its own xn+y alignment (RFC 6275 §6.2, RFC 5555).
    align = {3: (8, 6), 29: (4, 0), 30: (4, 0), 32: (4, 0)}
    for offset, otype in walk_options(wire):
        x, y = align.get(otype, (1, 0))
        assert offset % x == y


@settings(max_examples=60, deadline=None)
@given(msg_st)
def test_random_messages_match_scapy(msg):
    src, dst = (HOA, HAA) if isinstance(msg, BindingUpdate) else (HAA, HOA)
    assert encode_mh(msg, src=src, dst=dst) == scapy_mh(msg, src, dst)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=80))
def test_arbitrary_bytes_raise_only_mobility_header_error(data):
    try:
        decode_mh(data, src=HOA, dst=HAA)
    except MobilityHeaderError:
        pass


@st.composite
def plausible_mh(draw):
    """Random bodies behind a consistent header, so the option parser is hit."""
    units = draw(st.integers(1, 6))
    body = draw(st.binary(min_size=units * 8 + 2, max_size=units * 8 + 2))
    mh_type = draw(st.sampled_from([5, 6]))
    return bytes([59, units, mh_type, 0]) + body


@settings(max_examples=500, deadline=None)
@given(plausible_mh())
def test_plausible_garbage_raises_only_mobility_header_error(data):
    try:
        decoded = decode_mh(data, src=HOA, dst=HAA)
    except MobilityHeaderError:
        return
    # Whatever decodes re-encodes into something that decodes the same.
    again = encode_mh(decoded.message, src=HOA, dst=HAA)
    assert decode_mh(again, src=HOA, dst=HAA).message == decoded.message


# --- malformed input ---------------------------------------------------------

BU_PLAIN = BindingUpdate(sequence=1, a=True, h=True, k=True, lifetime=100)


def fix(data: bytes) -> bytes:
    return with_checksum(HOA, HAA, data)


def expect_error(data: bytes, field: str) -> MobilityHeaderError:
    with pytest.raises(MobilityHeaderError) as info:
        decode_mh(data, src=HOA, dst=HAA)
    assert info.value.field == field
    assert field in str(info.value)
    return info.value


@pytest.mark.parametrize("n", [0, 1, 7])
def test_too_short(n):
    expect_error(encode_mh(BU_PLAIN, src=HOA, dst=HAA)[:n], "length")


def test_payload_proto_not_59():
    wire = bytearray(encode_mh(BU_PLAIN, src=HOA, dst=HAA))
    wire[0] = 6
    expect_error(fix(bytes(wire)), "payload_proto")


def test_header_len_longer_than_data():
    wire = bytearray(encode_mh(BU_PLAIN, src=HOA, dst=HAA))
    wire[1] = 2
    expect_error(bytes(wire), "header_len")


def test_header_len_shorter_than_data():
    wire = encode_mh(BU_PLAIN, src=HOA, dst=HAA) + bytes(8)
    expect_error(wire, "header_len")


def test_truncated_to_non_multiple_of_8():
    expect_error(encode_mh(BU_PLAIN, src=HOA, dst=HAA)[:12], "header_len")


def test_header_len_0_cannot_hold_bu():
    expect_error(bytes.fromhex("3b00050000000001"), "header_len")


@pytest.mark.parametrize("mh_type", [0, 1, 4, 7, 8, 255])
def test_unknown_mh_type(mh_type):
    wire = bytearray(encode_mh(BU_PLAIN, src=HOA, dst=HAA))
    wire[2] = mh_type
    expect_error(fix(bytes(wire)), "mh_type")


def test_padn_running_past_end():
    # PadN claiming 3 data octets where 2 remain.
    expect_error(fix(bytes.fromhex("3b01050000000001d0000064 0103 0000")), "option_length")


def test_option_without_length_octet():
    # Pad1 x3 then a lone type octet in the last position.
    expect_error(fix(bytes.fromhex("3b01050000000001d0000064 000000 1d")), "option_length")


def test_known_option_running_past_end():
    # Alt CoA at 14 claims 16 octets, 8 remain.
    wire = bytes.fromhex("3b02050000000001d0000064 0100 0310" + "00" * 8)
    expect_error(fix(wire), "option_length")


@pytest.mark.parametrize(
    ("option", "field"),
    [
        ("0100 030e" + "00" * 14 + "0100", "alt_coa.length"),  # Alt CoA of 14 octets
        ("1d04 80000000 0104 00000000", "ipv4_hoa.length"),  # IPv4 HoA of 4
        ("1e08 0060c000020a0000 0100", "ipv4_ack.length"),  # IPv4 Ack of 8
        ("2000 0100", "ipv4_coa.length"),  # IPv4 CoA of 0
    ],
)
def test_known_option_with_wrong_length(option, field):
    body = bytes.fromhex(option.replace(" ", ""))
    assert len(body) % 8 == 4
    units = (12 + len(body)) // 8 - 1
    wire = bytes([59, units, 5, 0, 0, 0]) + bytes.fromhex("0001d0000064") + body
    expect_error(fix(wire), field)


def test_reserved_fields_are_ignored():
    # RFC 6275 §6.1.1/§6.1.7 and RFC 5555: Reserved MUST be ignored by receivers.
    opt = IPv4HomeAddressRequest(32, IPv4Address("192.0.2.1"))
    msg = BindingUpdate(sequence=3, a=True, lifetime=5, options=(opt,))
    wire = bytearray(encode_mh(msg, src=HOA, dst=HAA))
    wire[3] = 0xFF  # MH Reserved
    wire[8] |= 0x0F  # low BU flag bits (RFC 5555 F etc. -- unused here)
    wire[9] = 0xFF  # BU Reserved
    wire[15] |= 0xFF  # IPv4 HoA option: 8 low Reserved bits
    wire[14] |= 0x01  # ... and the 9th
    decoded = decode_mh(fix(bytes(wire)), src=HOA, dst=HAA)
    assert decoded.message == msg and decoded.checksum_ok


def test_ba_reserved_bits_ignored():
    msg = BindingAck(status=REASON_UNSPECIFIED, sequence=4)
    wire = bytearray(encode_mh(msg, src=HAA, dst=HOA))
    wire[7] = 0x7F  # 7 Reserved bits after K
    decoded = decode_mh(bytes(wire), src=HAA, dst=HOA)
    assert decoded.message == msg
    assert not decoded.checksum_ok  # we did not fix the checksum here


def test_padn_content_ignored():
    wire = bytearray(encode_mh(BU_PLAIN, src=HOA, dst=HAA))
    wire[14:16] = b"\xde\xad"  # PadN data MUST be ignored (RFC 6275 §6.2.3)
    assert decode_mh(fix(bytes(wire)), src=HOA, dst=HAA).message == BU_PLAIN


def test_bad_checksum_reported_not_raised():
    wire = bytearray(encode_mh(BU_PLAIN, src=HOA, dst=HAA))
    wire[4] ^= 0x01
    decoded = decode_mh(bytes(wire), src=HOA, dst=HAA)
    assert decoded.message == BU_PLAIN
    assert not decoded.checksum_ok


def test_checksum_depends_on_pseudo_header_addresses():
    wire = encode_mh(BU_PLAIN, src=HOA, dst=HAA)
    # (Swapping src and dst would not show: the one's complement sum commutes.)
    assert not decode_mh(wire, src=IPv6Address("2001:db8::3"), dst=HAA).checksum_ok
    assert not decode_mh(wire, src=IPv6Address("::"), dst=HAA).checksum_ok


def test_unspecified_addresses_in_pseudo_header():
    # PROFILE §8: "::" where an address is unknown.
    unspec = IPv6Address("::")
    wire = encode_mh(BU_PLAIN, src=unspec, dst=HAA)
    assert int.from_bytes(wire[4:6], "big") == ref_checksum(unspec, HAA, wire)
    assert decode_mh(wire, src=unspec, dst=HAA).checksum_ok


def test_misaligned_known_option_still_decodes():
    # Alignment is a sender duty; the Alt CoA here starts at 12, not 8n+6.
    coa = IPv6Address("2001:db8::42")
    wire = bytes.fromhex("3b03050000000001d0000064 0310") + coa.packed + bytes.fromhex("0100")
    decoded = decode_mh(fix(wire), src=HOA, dst=HAA)
    assert decoded.message.options == (AlternateCareOfAddress(coa),)


def test_unknown_options_preserved_and_other_rfc6275_options_skipped():
    # Binding Refresh Advice (type 2) is not interpreted here: kept verbatim.
    ba_wire = bytes.fromhex("3b010600 0000 00000001 0000 0202 0005")
    decoded = decode_mh(with_checksum(HAA, HOA, ba_wire), src=HAA, dst=HOA)
    assert decoded.message == BindingAck(
        status=0, sequence=1, options=(UnknownOption(2, b"\x00\x05"),)
    )
    assert decoded.checksum_ok


def test_ipv4_ack_reserved_bits_ignored():
    # IPv4 Ack with both Res bits set after Pref-len 24 (RFC 5555 §3.2.1).
    wire = bytes.fromhex("3b02060000000080 00070096 1e06 0063 c000020a 01020000")
    decoded = decode_mh(with_checksum(HAA, HOA, wire), src=HAA, dst=HOA)
    assert decoded.message.options == (IPv4AddressAck(0, 24, IPv4Address("192.0.2.10")),)


# --- caller errors (LocalProtocolError) --------------------------------------


@pytest.mark.parametrize("otype", [0, 1, 3, 29, 30, 32, 256, -1])
def test_unknown_option_cannot_impersonate_known_or_padding(otype):
    with pytest.raises(LocalProtocolError):
        UnknownOption(otype, b"")


def test_out_of_range_fields_rejected():
    with pytest.raises(LocalProtocolError):
        BindingUpdate(sequence=0x10000)
    with pytest.raises(LocalProtocolError):
        BindingUpdate(sequence=1, lifetime=-1)
    with pytest.raises(LocalProtocolError):
        BindingAck(status=256)
    with pytest.raises(LocalProtocolError):
        IPv4HomeAddressRequest(64, IPv4Address("0.0.0.0"))
    with pytest.raises(LocalProtocolError):
        IPv4AddressAck(0, 64, IPv4Address("0.0.0.0"))
    with pytest.raises(LocalProtocolError):
        UnknownOption(200, bytes(256))


def test_header_len_overflow_rejected_on_encode():
    big = tuple(UnknownOption(200, bytes(255)) for _ in range(8))  # 8 * 257 > 2048
    with pytest.raises(LocalProtocolError):
        encode_mh(BindingUpdate(sequence=1, options=big), src=HOA, dst=HAA)
    # The largest that fits still encodes (Header Len 255 at most).
    fits = tuple(UnknownOption(200, bytes(255)) for _ in range(7))
    wire = encode_mh(BindingUpdate(sequence=1, options=fits), src=HOA, dst=HAA)
    assert len(wire) <= 2048 and decode_mh(wire, src=HOA, dst=HAA).message.options == fits


# --- helpers -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("offset", "x", "y", "pad"),
    [
        (12, 8, 6, 2),
        (14, 8, 6, 0),
        (15, 8, 6, 7),
        (22, 8, 6, 0),
        (12, 4, 0, 0),
        (13, 4, 0, 3),
        (15, 4, 0, 1),
        (13, 2, 0, 1),
        (13, 1, 0, 0),
        (20, 8, 0, 4),
    ],
)
def test_align_padding_xn_plus_y(offset, x, y, pad):
    assert align_padding(offset, x, y) == pad
    assert (offset + pad) % x == y


@pytest.mark.parametrize(("x", "y"), [(0, 0), (4, 4), (8, -1)])
def test_align_padding_rejects_bad_alignment(x, y):
    with pytest.raises(LocalProtocolError):
        align_padding(0, x, y)


def test_pad_octets():
    assert pad_octets(0) == b""
    assert pad_octets(1) == b"\x00"
    assert pad_octets(2) == b"\x01\x00"
    assert pad_octets(4) == b"\x01\x02\x00\x00"
    assert pad_octets(7) == b"\x01\x05" + bytes(5)


def test_seq_newer_rfc6275_example():
    # RFC 6275 §9.5.1: last = 15 -> 0..15 and 32783..65535 are "<=".
    newer = {a for a in range(0x10000) if seq_newer(a, 15)}
    assert newer == set(range(16, 32783))


def test_seq_newer_wraps():
    assert seq_newer(0, 0xFFFF)
    assert not seq_newer(0xFFFF, 0)
    assert not seq_newer(5, 5)
    assert seq_newer(0x7FFF, 0) and not seq_newer(0x8000, 0)


@given(u16, u16)
def test_seq_newer_antisymmetric(a, b):
    if a == b or (a - b) % 0x10000 == 0x8000:
        assert not (seq_newer(a, b) and seq_newer(b, a))
    else:
        assert seq_newer(a, b) != seq_newer(b, a)


def test_lifetime_units():
    assert lifetime_units(0) == 0
    assert lifetime_units(7) == 1
    assert lifetime_units(3600) == 900
    assert lifetime_units(10**9) == 0xFFFF
    with pytest.raises(LocalProtocolError):
        lifetime_units(-1)


def test_status_constants():
    assert (ACCEPTED, REASON_UNSPECIFIED, NOT_HOME_AGENT) == (0, 128, 133)
    assert (SEQUENCE_OUT_OF_WINDOW, REINIT_SA_WITH_HAC) == (135, 176)
    assert not BindingAck(status=REINIT_SA_WITH_HAC).accepted
