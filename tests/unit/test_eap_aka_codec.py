"""EAP-AKA(') attribute codec: golden bytes, typed errors, hypothesis properties."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mipsec.core.errors import LocalProtocolError
from mipsec.core.wire import eap_aka as w
from mipsec.core.wire.eap_aka import AkaError, Attr, Subtype

H = bytes.fromhex


def test_golden_challenge_bytes() -> None:
    rand, autn, mac = H("01" * 16), H("02" * 16), bytes(16)
    data = w.encode_aka(
        Subtype.CHALLENGE,
        [
            w.reserved_value(Attr.AT_RAND, rand),
            w.reserved_value(Attr.AT_AUTN, autn),
            w.u16(Attr.AT_KDF, 1),
            w.string(Attr.AT_KDF_INPUT, b"WLAN"),
            w.flag(Attr.AT_RESULT_IND),
            w.reserved_value(Attr.AT_MAC, mac),
        ],
    )
    assert data[:3] == H("010000")
    assert data[3:23] == H("01050000") + rand  # RFC 4187 §10.6: Length 5
    assert data[43:47] == H("18010001")  # AT_KDF = 24, Length 1, KDF 1
    assert data[47:55] == H("17020004") + b"WLAN"  # AT_KDF_INPUT, actual length 4, no pad
    assert data[55:59] == H("87010000")  # AT_RESULT_IND = 135
    msg = w.decode_aka(data)
    a = msg.attrs
    assert msg.subtype == Subtype.CHALLENGE
    assert (a.rand, a.autn, a.kdfs, a.kdf_input, a.result_ind) == (rand, autn, (1,), b"WLAN", True)
    assert a.mac_offset == 63 and data[a.mac_offset : a.mac_offset + 16] == mac


def test_res_and_identity_padding() -> None:
    r = w.res(H("a54211d5e3ba50bf"))
    assert r == H("03030040") + H("a54211d5e3ba50bf")  # 64 bits, no padding needed
    r5 = w.res(H("0102030405"))  # 40 bits -> padded to 12 octets
    assert r5 == H("0303002801020304050000 00".replace(" ", ""))
    a = w.decode_attributes(r5)
    assert (a.res, a.res_bits) == (H("0102030405"), 40)
    ident = w.string(Attr.AT_IDENTITY, b"0001")
    assert ident == H("0e020004") + b"0001"
    assert w.decode_attributes(w.string(Attr.AT_IDENTITY, b"abc")).identity == b"abc"


@pytest.mark.parametrize(
    ("data", "field", "reason"),
    [
        (H("0500"), "eap-aka.subtype", "need 3"),
        (H("01000005"), "eap-aka.attribute", "trailing"),
        (H("010000010000000000"), "eap-aka.AT_RAND", "Length 0"),
        (H("01000001020000"), "eap-aka.AT_RAND", "runs past"),
        (H("0100000101000000"), "eap-aka.AT_RAND", "must be 20"),
        (H("0100000501000000"), "eap-aka.attribute 5", "non-skippable"),
        (H("0100008701000087010000"), "eap-aka.AT_RESULT_IND", "duplicate"),
        (H("01000003030010" + "00" * 8), "eap-aka.AT_RES", "outside 32..128"),
        (H("0100000302004000000000"), "eap-aka.AT_RES", "does not fit"),
        (H("0100000e0100ff"), "eap-aka.AT_IDENTITY", "exceeds"),
        (H("0100000e02000161000001"), "eap-aka.AT_IDENTITY", "non-zero padding"),
        (H("0100000e03000161" + "00" * 7), "eap-aka.AT_IDENTITY", "padding octets"),
        (H("010000860200000000000000"), "eap-aka.AT_CHECKCODE", "checkcode of 4"),
        (H("0100008202000000000000"), "eap-aka.AT_ENCR_DATA", "AES blocks"),
        (H("010000060100ff"), "eap-aka.AT_PADDING", "non-zero"),
        (H("0100000604" + "00" * 14), "eap-aka.AT_PADDING", "not 4, 8 or 12"),  # RFC 4187 §10.12
    ],
)
def test_typed_errors_name_the_attribute(data: bytes, field: str, reason: str) -> None:
    with pytest.raises(AkaError) as exc:
        w.decode_aka(data)
    assert exc.value.field == field
    assert reason in exc.value.reason


def test_skippable_unknown_ignored_and_kdf_repeats() -> None:
    data = w.encode_aka(
        Subtype.CHALLENGE,
        [
            b"\xc8\x02" + bytes(6),
            w.u16(Attr.AT_KDF, 2),
            w.u16(Attr.AT_KDF, 1),
            w.u16(Attr.AT_KDF, 2),
        ],
    )
    a = w.decode_aka(data).attrs
    assert a.unknown == (200,)
    assert a.kdfs == (2, 1, 2)  # duplicates are the machine's to judge (RFC 5448 §3.2)


def test_identity_requests_counted() -> None:
    data = w.encode_aka(
        Subtype.IDENTITY, [w.flag(Attr.AT_ANY_ID_REQ), w.flag(Attr.AT_PERMANENT_ID_REQ)]
    )
    a = w.decode_aka(data).attrs
    assert (a.id_req, a.id_reqs) == (Attr.AT_ANY_ID_REQ, 2)


def test_zero_mac_and_builder_errors() -> None:
    data = w.encode_aka(Subtype.NOTIFICATION, [w.reserved_value(Attr.AT_MAC, H("ff" * 16))])
    off = w.decode_aka(data).attrs.mac_offset
    assert w.zero_mac(data, off) == data[:off] + bytes(16)
    with pytest.raises(LocalProtocolError):
        w.zero_mac(data, off + 1)
    with pytest.raises(LocalProtocolError):
        w.res(bytes(3))
    with pytest.raises(LocalProtocolError):
        w.auts(bytes(13))
    with pytest.raises(LocalProtocolError):
        w.padding(5)
    with pytest.raises(LocalProtocolError):
        w.u16(Attr.AT_KDF, 70000)
    with pytest.raises(LocalProtocolError):
        w.reserved_value(Attr.AT_RAND, bytes(15))


# ---------------------------------------------------------------- properties

_b16 = st.binary(min_size=16, max_size=16)
_text = st.binary(max_size=60)


@st.composite
def attribute_sets(draw: st.DrawFn) -> tuple[list[bytes], dict[str, object]]:
    """A random set of distinct attributes with their expected decoded values."""
    choices: list[tuple[str, st.SearchStrategy[object]]] = [
        ("rand", _b16),
        ("autn", _b16),
        ("mac", _b16),
        ("iv", _b16),
        ("nonce_s", _b16),
        ("identity", _text),
        ("kdf_input", _text),
        ("next_pseudonym", _text),
        ("next_reauth_id", _text),
        ("notification", st.integers(0, 0xFFFF)),
        ("client_error_code", st.integers(0, 0xFFFF)),
        ("counter", st.integers(0, 0xFFFF)),
        ("bidding", st.integers(0, 0xFFFF)),
        ("res", st.binary(min_size=4, max_size=16)),
        ("auts", st.binary(min_size=14, max_size=14)),
        ("checkcode", st.sampled_from([b"", bytes(20), bytes(range(32))])),
        ("encr_data", st.integers(1, 4).map(lambda n: bytes(range(16 * n)))),
        ("result_ind", st.just(True)),
        ("kdfs", st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=4).map(tuple)),
    ]
    picked = draw(st.lists(st.sampled_from(choices), unique_by=lambda c: c[0], max_size=10))
    encoded: list[bytes] = []
    expected: dict[str, object] = {}
    for name, strat in picked:
        v = draw(strat)
        expected[name] = v
        if name in ("rand", "autn", "mac", "iv", "nonce_s", "checkcode", "encr_data"):
            at = {"nonce_s": Attr.AT_NONCE_S, "encr_data": Attr.AT_ENCR_DATA}.get(
                name, Attr["AT_" + name.upper()]
            )
            encoded.append(w.reserved_value(at, v))  # type: ignore[arg-type]
        elif name in ("identity", "kdf_input", "next_pseudonym", "next_reauth_id"):
            encoded.append(w.string(Attr["AT_" + name.upper()], v))  # type: ignore[arg-type]
        elif name in ("notification", "client_error_code", "counter", "bidding"):
            encoded.append(w.u16(Attr["AT_" + name.upper()], v))  # type: ignore[arg-type]
        elif name == "res":
            encoded.append(w.res(v))  # type: ignore[arg-type]
        elif name == "auts":
            encoded.append(w.auts(v))  # type: ignore[arg-type]
        elif name == "result_ind":
            encoded.append(w.flag(Attr.AT_RESULT_IND))
        else:
            encoded.extend(w.u16(Attr.AT_KDF, k) for k in v)  # type: ignore[attr-defined]
    order = draw(st.permutations(range(len(encoded))))
    return [encoded[i] for i in order], expected


@given(attribute_sets(), st.sampled_from(list(Subtype)))
def test_round_trip(case: tuple[list[bytes], dict[str, object]], subtype: Subtype) -> None:
    encoded, expected = case
    msg = w.decode_aka(w.encode_aka(subtype, encoded))
    assert msg.subtype == subtype
    for name, value in expected.items():
        got = getattr(msg.attrs, name)
        if name == "kdfs":
            assert sorted(got) == sorted(value)  # type: ignore[type-var]
        else:
            assert got == value, name


@given(st.binary(max_size=200))
@settings(max_examples=400)
def test_random_octets_parse_or_raise_aka_error(data: bytes) -> None:
    try:
        w.decode_aka(data)
    except AkaError as exc:
        assert exc.field.startswith("eap-aka.")


@given(attribute_sets(), st.data())
def test_truncation_is_never_silent(
    case: tuple[list[bytes], dict[str, object]], data: st.DataObject
) -> None:
    encoded, _ = case
    whole = w.encode_aka(Subtype.CHALLENGE, encoded)
    boundaries = {3}
    for a in encoded:
        boundaries.add(max(boundaries) + len(a))
    cut = data.draw(st.integers(0, len(whole) - 1))
    if cut in boundaries:
        w.decode_aka(whole[:cut])  # a shorter but well-formed message
    else:
        with pytest.raises(AkaError):
            w.decode_aka(whole[:cut])
