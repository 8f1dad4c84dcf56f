"""EAP packet codec (RFC 3748 §4-§5) and the MN's EAP peer machine (RFC 4137)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mipsec.core.eap.method import Decision, EapPeerContext, MethodState, PeerOutput
from mipsec.core.eap.peer import EapPeerMachine
from mipsec.core.wire.eap import (
    EXPANDED_NAK,
    EapCode,
    EapError,
    EapPacket,
    EapType,
    ExpandedType,
    decode_eap,
    encode_eap,
    expanded_nak_data,
    failure,
    identity_request,
    legacy_nak_data,
    parse_expanded_nak,
    parse_identity,
    parse_legacy_nak,
    success,
)

# ------------------------------------------------------------ known bytes


def test_known_packets() -> None:
    # RFC 3748 §5.1: Request/Identity, Identifier 1, Length 5.
    assert identity_request(1) == bytes.fromhex("0101000501")
    assert success(7) == bytes.fromhex("03070004")
    assert failure(9) == bytes.fromhex("04090004")
    resp = decode_eap(bytes.fromhex("0201000a01") + b"alice")
    assert resp == EapPacket(EapCode.RESPONSE, 1, EapType.IDENTITY, b"alice")
    assert parse_identity(resp.data) == "alice"
    # An expanded Request (Vendor-Id 32473, Vendor-Type 1) with two data octets.
    raw = bytes.fromhex("01 05 000e fe 007ed9 00000001 aabb".replace(" ", ""))
    pkt = decode_eap(raw)
    assert pkt.expanded == ExpandedType(32473, 1) and pkt.data == b"\xaa\xbb"
    assert encode_eap(pkt) == raw and len(pkt) == len(raw)


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ("010100", "eap.length"),  # shorter than the header
        ("05010004", "eap.code"),  # Code 5 is unknown
        ("01010006", "eap.length"),  # Length 6, 4 octets
        ("0101000501ff", "eap.length"),  # Length 5, 6 octets
        ("0301000501", "eap.length"),  # Success with data
        ("01010004", "eap.type"),  # Request without a Type
        ("0101000500", "eap.type"),  # Type 0
        ("0101000503", "eap.type"),  # Nak in a Request
        ("0101000cfe00000000000003", "eap.type"),  # Expanded Nak in a Request (§5.3.2)
        ("01010008fe007ed9", "eap.expanded"),  # expanded header cut short
    ],
)
def test_malformed_packets_name_the_field(raw: str, field: str) -> None:
    with pytest.raises(EapError) as info:
        decode_eap(bytes.fromhex(raw))
    assert info.value.field == field


def test_size_limit() -> None:
    pkt = encode_eap(EapPacket(EapCode.RESPONSE, 1, EapType.IDENTITY, b"a" * 1396))
    assert len(pkt) == 1401
    with pytest.raises(EapError, match="more than the limit of 1400"):
        decode_eap(pkt, max_len=1400)
    assert decode_eap(pkt[:-1][:2] + (1400).to_bytes(2, "big") + pkt[4:-1], max_len=1400)


def test_nak_codecs() -> None:
    assert legacy_nak_data([13, 23]) == b"\x0d\x17"
    assert legacy_nak_data([]) == b"\x00"
    assert parse_legacy_nak(b"\x0d\x17") == [13, 23]
    assert parse_legacy_nak(b"\x00") == []
    for bad in (b"", b"\x00\x0d", b"\x01"):
        with pytest.raises(EapError):
            parse_legacy_nak(bad)
    data = expanded_nak_data([13, ExpandedType(32473, 1)])
    assert parse_expanded_nak(data) == [13, ExpandedType(32473, 1)]
    assert parse_expanded_nak(expanded_nak_data([])) == []
    with pytest.raises(EapError):
        parse_expanded_nak(data[:-1])


def test_identity_must_be_utf8_without_nul() -> None:
    with pytest.raises(EapError):
        parse_identity(b"a\x00b")
    with pytest.raises(EapError):
        parse_identity(b"\xff")


# ------------------------------------------------------------ properties


packets = st.one_of(
    st.builds(
        EapPacket,
        st.sampled_from([EapCode.REQUEST, EapCode.RESPONSE]),
        st.integers(0, 255),
        st.integers(1, 253).filter(lambda t: t != 3),
        st.binary(max_size=300),
    ),
    st.builds(
        lambda c, i, v, t, d: EapPacket(c, i, EapType.EXPANDED, d, ExpandedType(v, t)),
        st.sampled_from([EapCode.REQUEST, EapCode.RESPONSE]),
        st.integers(0, 255),
        st.integers(0, (1 << 24) - 1),
        st.integers(0, (1 << 32) - 1),
        st.binary(max_size=300),
    ),
    st.builds(EapPacket, st.sampled_from([EapCode.SUCCESS, EapCode.FAILURE]), st.integers(0, 255)),
)


@given(packets)
def test_round_trip(pkt: EapPacket) -> None:
    raw = encode_eap(pkt)
    assert decode_eap(raw) == pkt
    assert int.from_bytes(raw[2:4], "big") == len(raw)


@given(st.binary(max_size=400))
def test_only_eap_errors_on_arbitrary_input(raw: bytes) -> None:
    try:
        pkt = decode_eap(raw)
    except EapError:
        return
    assert encode_eap(pkt) == raw


# ------------------------------------------------------------ the peer machine


class Echo:
    """A peer method that answers 'ok' and succeeds on 'fin'."""

    def __init__(self) -> None:
        self.done = False

    def new(self, ctx: EapPeerContext) -> Echo:
        return self

    def process(self, request: EapPacket) -> PeerOutput:
        if request.data == b"fin":
            self.done = True
            return PeerOutput(b"ok", MethodState.DONE, Decision.UNCOND_SUCC)
        if request.data == b"cond":  # MSK exists, result still to come (AKA result_ind)
            self.done = True
            return PeerOutput(b"ok", MethodState.CONT, Decision.COND_SUCC)
        if request.data == b"drop":
            return PeerOutput(None, MethodState.DONE, Decision.FAIL, "dropped")
        return PeerOutput(b"ok", MethodState.CONT, Decision.FAIL)

    def msk(self) -> bytes | None:
        return b"m" * 64 if self.done else None


def machine(methods: dict | None = None) -> EapPeerMachine:  # type: ignore[type-arg]
    return EapPeerMachine(
        identity="alice@x.example",
        methods=methods if methods is not None else {13: ("tls", Echo())},
        ctx=EapPeerContext("alice@x.example"),
    )


def req(
    identifier: int, type_: int, data: bytes = b"", expanded: ExpandedType | None = None
) -> bytes:
    return encode_eap(EapPacket(EapCode.REQUEST, identifier, type_, data, expanded))


def test_identity_notification_method_and_decision() -> None:
    m = machine()
    r = decode_eap(m.process(identity_request(1)).response or b"")
    assert (r.code, r.identifier, r.type, r.data) == (
        EapCode.RESPONSE, 1, EapType.IDENTITY, b"alice@x.example"
    )  # fmt: skip
    r = decode_eap(m.process(req(2, EapType.NOTIFICATION, b"hello")).response or b"")
    assert (r.type, r.data) == (EapType.NOTIFICATION, b"") and m.notifications == ["hello"]
    r = decode_eap(m.process(req(3, 13, b"go")).response or b"")
    assert (r.type, r.data) == (13, b"ok") and not m.succeeded and m.msk() is None
    r = decode_eap(m.process(req(4, 13, b"fin")).response or b"")
    assert m.succeeded and m.decision is Decision.UNCOND_SUCC and m.msk() == b"m" * 64


def test_retransmitted_request_gets_the_same_response_other_content_is_discarded() -> None:
    m = machine()
    first = m.process(req(3, 13, b"go")).response
    assert m.process(req(3, 13, b"go")).response == first
    assert m.process(req(3, 13, b"other")).response is None


def test_nak_for_an_unconfigured_method() -> None:
    m = machine()
    r = decode_eap(m.process(req(5, EapType.MD5, b"x")).response or b"")
    assert r.type == EapType.NAK and parse_legacy_nak(r.data) == [13]
    # An expanded Request gets the expanded Nak (RFC 3748 §5.3.2).
    r = decode_eap(m.process(req(6, EapType.EXPANDED, b"x", ExpandedType(9, 9))).response or b"")
    assert r.expanded == EXPANDED_NAK and parse_expanded_nak(r.data) == [13]
    # Configured for an expanded method only: the legacy Nak says 254.
    e = machine({ExpandedType(32473, 1): ("example", Echo())})
    r = decode_eap(e.process(req(7, EapType.MD5)).response or b"")
    assert parse_legacy_nak(r.data) == [EapType.EXPANDED]


def test_a_method_is_answered_in_the_type_form_of_each_request() -> None:
    """RFC 3748 §5.7: Type 13 and Type 254 / Vendor-Id 0 / Vendor-Type 13 are
    one method; each Response takes its Request's form, which is what a
    method's integrity check over the header (EAP-AKA's AT_MAC) covers.
    Before, the form the method was configured under was sent (found in
    review)."""
    m = machine()
    expanded = req(1, EapType.EXPANDED, b"go", ExpandedType(0, 13))
    r = decode_eap(m.process(expanded).response or b"")
    assert (r.type, r.expanded, r.data) == (EapType.EXPANDED, ExpandedType(0, 13), b"ok")
    r = decode_eap(m.process(req(2, 13, b"go")).response or b"")
    assert (r.type, r.expanded, r.data) == (13, None, b"ok")
    vendor = machine({ExpandedType(32473, 1): ("example", Echo())})
    r = decode_eap(vendor.process(req(3, 254, b"go", ExpandedType(32473, 1))).response or b"")
    assert (r.type, r.expanded, r.data) == (EapType.EXPANDED, ExpandedType(32473, 1), b"ok")


def test_other_method_or_identity_after_the_method_started_is_discarded() -> None:
    m = machine({13: ("tls", Echo()), 23: ("aka", Echo())})
    assert m.process(req(1, 13, b"go")).response is not None
    assert m.process(req(2, 23, b"go")).response is None
    assert m.process(identity_request(3)).response is None


def test_success_failure_and_junk_are_not_requests() -> None:
    m = machine()
    for raw in (success(1), failure(1), b"\x01\x01\x00\x09\x01"):
        assert m.process(raw).response is None


def test_a_method_that_discards_ends_it() -> None:
    m = machine()
    out = m.process(req(1, 13, b"drop"))
    assert out.response is None and out.reason == "dropped"


def test_ready_for_done_before_success_may_be_believed() -> None:
    m = machine()
    m.process(req(1, 13, b"cond"))
    assert m.ready and not m.succeeded  # Done goes out; an EAP-Success would be refused
    m.process(req(2, 13, b"fin"))
    assert m.ready and m.succeeded
