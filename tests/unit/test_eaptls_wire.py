"""EAP-TLS framing (RFC 5216 §3, §2.1.5): Flags, TLS Message Length, fragments, reassembly."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mipsec.core.errors import LocalProtocolError
from mipsec.core.wire.eaptls import (
    ACK,
    FLAG_L,
    FLAG_M,
    FLAG_S,
    MIN_TYPE_DATA,
    EapTlsError,
    EapTlsFrame,
    Reassembler,
    decode_frame,
    encode_frame,
    fragment,
)


def test_start_request_is_the_s_flag_alone():
    assert encode_frame(EapTlsFrame(start=True)) == bytes((FLAG_S,))
    frame = decode_frame(bytes((FLAG_S,)), request=True)
    assert frame.start and not frame.data and not frame.is_empty


def test_s_bit_is_reserved_in_a_response():
    # §3.2: S is not defined for Responses; reserved bits are ignored on reception.
    frame = decode_frame(bytes((FLAG_S | 0x1F,)), request=False)
    assert not frame.start and frame.is_empty


def test_reserved_bits_are_ignored():
    frame = decode_frame(bytes((0x1F,)) + b"abc", request=True)
    assert frame == EapTlsFrame(data=b"abc")


def test_empty_frame_is_the_ack():
    assert ACK == b"\x00"
    assert decode_frame(ACK, request=True).is_empty
    assert fragment(b"", 100) == [ACK]


def test_first_fragment_layout():
    frames = fragment(bytes(range(20)), 10)
    first = frames[0]
    assert first[0] == FLAG_L | FLAG_M
    assert int.from_bytes(first[1:5], "big") == 20
    assert first[5:] == bytes(range(5))
    assert frames[1][0] == FLAG_M and frames[-1][0] == 0
    assert all(len(f) <= 10 for f in frames)


def test_unfragmented_message_carries_no_length():
    assert fragment(b"hello", 6) == [b"\x00hello"]
    assert fragment(b"hello!", 6)[0][0] == FLAG_L | FLAG_M


@pytest.mark.parametrize(
    ("type_data", "in_request", "field"),
    [
        (b"", True, "eap-tls.flags"),  # no Flags octet
        (bytes((FLAG_L, 0, 0)), True, "eap-tls.length"),  # truncated length field
        (bytes((FLAG_L,)) + (2).to_bytes(4, "big") + b"abc", False, "eap-tls.length"),
        (bytes((FLAG_M,)), False, "eap-tls.flags"),  # M without data
        (bytes((FLAG_S,)) + b"x", True, "eap-tls.flags"),  # Start with data
        (bytes((FLAG_S | FLAG_M,)) + b"x", True, "eap-tls.flags"),
        (bytes((FLAG_S | FLAG_L,)) + bytes(4), True, "eap-tls.flags"),
    ],
)
def test_malformed_frames_name_the_field(type_data, in_request, field):
    with pytest.raises(EapTlsError) as err:
        decode_frame(type_data, request=in_request)
    assert err.value.field == field


def test_reassembler_refuses_first_fragment_without_l():
    with pytest.raises(EapTlsError, match="without the L flag"):
        Reassembler(100).add(EapTlsFrame(more=True, data=b"x"))


def test_reassembler_refuses_announced_length_over_limit_before_buffering():
    rx = Reassembler(100)
    with pytest.raises(EapTlsError, match="reassembly limit of 100"):
        rx.add(EapTlsFrame(more=True, tls_length=101, data=b"x"))
    assert rx.buffered == 0


def test_reassembler_refuses_unfragmented_message_over_limit():
    with pytest.raises(EapTlsError, match="reassembly limit"):
        Reassembler(4).add(EapTlsFrame(data=b"12345"))


def test_reassembler_refuses_overrun_and_shortfall():
    rx = Reassembler(100)
    assert rx.add(EapTlsFrame(more=True, tls_length=5, data=b"abc")) is None
    with pytest.raises(EapTlsError, match="more than the announced 5"):
        rx.add(EapTlsFrame(data=b"def"))
    rx = Reassembler(100)
    rx.add(EapTlsFrame(more=True, tls_length=5, data=b"abc"))
    with pytest.raises(EapTlsError, match="carried 4 octets"):
        rx.add(EapTlsFrame(data=b"d"))


def test_reassembler_refuses_changed_length_tolerates_repeated():
    rx = Reassembler(100)
    rx.add(EapTlsFrame(more=True, tls_length=6, data=b"ab"))
    assert rx.add(EapTlsFrame(more=True, tls_length=6, data=b"cd")) is None
    assert rx.add(EapTlsFrame(tls_length=6, data=b"ef")) == b"abcdef"
    rx.add(EapTlsFrame(more=True, tls_length=6, data=b"ab"))
    with pytest.raises(EapTlsError, match="changed between fragments"):
        rx.add(EapTlsFrame(tls_length=7, data=b"cdef"))


def test_reassembler_refuses_m_once_complete():
    rx = Reassembler(100)
    rx.add(EapTlsFrame(more=True, tls_length=4, data=b"ab"))
    with pytest.raises(EapTlsError, match="M flag set although"):
        rx.add(EapTlsFrame(more=True, data=b"cd"))


def test_unfragmented_length_field_must_match():
    with pytest.raises(EapTlsError, match="does not match"):
        Reassembler(100).add(EapTlsFrame(tls_length=9, data=b"abc"))
    assert Reassembler(100).add(EapTlsFrame(tls_length=3, data=b"abc")) == b"abc"


def test_fragment_refuses_a_budget_that_moves_no_data():
    with pytest.raises(LocalProtocolError):
        fragment(b"abc", MIN_TYPE_DATA - 1)


# --- properties ----------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    message=st.binary(min_size=0, max_size=5000),
    budget=st.integers(min_value=MIN_TYPE_DATA, max_value=1500),
    request=st.booleans(),
)
def test_fragment_then_reassemble_is_identity(message, budget, request):
    frames = fragment(message, budget)
    assert all(len(f) <= budget for f in frames)
    rx = Reassembler(max(len(message), 1))
    results = []
    for i, raw in enumerate(frames):
        frame = decode_frame(raw, request=request)
        assert frame.more == (i < len(frames) - 1)
        assert (frame.tls_length is not None) == (len(frames) > 1 and i == 0)
        results.append(rx.add(frame))
        assert rx.buffered <= len(message)
    assert results[:-1] == [None] * (len(frames) - 1)
    assert results[-1] == message
    assert not rx.in_progress


@settings(max_examples=200, deadline=None)
@given(
    message=st.binary(min_size=2, max_size=3000),
    budget=st.integers(min_value=MIN_TYPE_DATA, max_value=600),
    data=st.data(),
)
def test_reassembly_limit_is_never_exceeded(message, budget, data):
    limit = data.draw(st.integers(min_value=1, max_value=len(message) - 1))
    rx = Reassembler(limit)
    with pytest.raises(EapTlsError):
        for raw in fragment(message, budget):
            rx.add(decode_frame(raw, request=False))
            assert rx.buffered <= limit


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=64), st.booleans())
def test_decode_rejects_only_with_typed_errors_and_round_trips(raw, request):
    try:
        frame = decode_frame(raw, request=request)
    except EapTlsError as exc:
        assert exc.field in ("eap-tls.flags", "eap-tls.length")
        return
    # Reserved bits (and S in a Response) are dropped; the rest survives.
    again = decode_frame(encode_frame(frame), request=request)
    assert again == frame


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=30), st.integers(1, 200))
def test_reassembler_bounded_under_arbitrary_frames(chunks, limit):
    # Whatever a hostile peer sends, the buffer never exceeds the limit and
    # every refusal is an EapTlsError.
    rx = Reassembler(limit)
    for raw in chunks:
        try:
            rx.add(decode_frame(raw, request=False))
        except EapTlsError:
            rx = Reassembler(limit)
        assert rx.buffered <= limit
