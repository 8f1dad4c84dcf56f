"""MHAuth container framing (RFC 6618 §5.1, §5.3; PROFILE §2)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mipsec.core.errors import ContainerError, LocalProtocolError, TruncatedError
from mipsec.core.wire.container import (
    MAX_CONTENT,
    Container,
    ContainerDecoder,
    IdentifierSequence,
    encode_container,
)

CONTENT = b"mn-id: a\r\n\r\n"  # 12 octets


# ------------------------------------------------------------------ encoder


def test_encode_hand_vector() -> None:
    assert encode_container(1, b"auth: x\r\n\r\n") == b"\x00\x01\x00\x0b" + b"auth: x\r\n\r\n"


def test_encode_max_identifier_and_length_network_order() -> None:
    content = b"x" * 0x1234
    assert encode_container(255, content)[:4] == b"\x00\xff\x12\x34"


def test_encode_max_content() -> None:
    framed = encode_container(7, b"a" * MAX_CONTENT)
    assert framed[:4] == b"\x00\x07\xff\xff"
    assert len(framed) == 4 + 65535


@pytest.mark.parametrize("identifier", [0, 256, -1])
def test_encode_rejects_bad_identifier(identifier: int) -> None:
    with pytest.raises(LocalProtocolError):
        encode_container(identifier, b"x")


@pytest.mark.parametrize("size", [0, MAX_CONTENT + 1])
def test_encode_rejects_bad_length(size: int) -> None:
    with pytest.raises(LocalProtocolError):
        encode_container(1, b"x" * size)


# ------------------------------------------------------------------ decoder


def test_decode_hand_vector() -> None:
    d = ContainerDecoder()
    assert d.feed(b"\x00\x01\x00\x0c" + CONTENT) == [Container(1, CONTENT)]
    assert d.buffered == 0
    d.eof()  # clean end


def test_decode_two_containers_in_one_chunk() -> None:
    d = ContainerDecoder()
    data = b"\x00\x01\x00\x01A" + b"\x00\x02\x00\x02BC"
    assert d.feed(data) == [Container(1, b"A"), Container(2, b"BC")]


def test_decode_one_byte_at_a_time() -> None:
    d = ContainerDecoder()
    data = b"\x00\x03\x00\x0c" + CONTENT
    got: list[Container] = []
    for i in range(len(data)):
        got += d.feed(data[i : i + 1])
        if i < len(data) - 1:
            assert got == []
            assert d.buffered == i + 1
    assert got == [Container(3, CONTENT)]


def test_length_larger_than_data_waits_then_eof_truncated() -> None:
    d = ContainerDecoder()
    assert d.feed(b"\x00\x01\x00\x10abc") == []
    assert d.buffered == 7
    with pytest.raises(TruncatedError) as ei:
        d.eof()
    assert ei.value.field == "container"


def test_eof_inside_header_is_truncated() -> None:
    d = ContainerDecoder()
    d.feed(b"\x00\x01")
    with pytest.raises(TruncatedError):
        d.eof()


def test_eof_after_truncation_stays_dead() -> None:
    d = ContainerDecoder()
    d.feed(b"\x00")
    with pytest.raises(TruncatedError):
        d.eof()
    with pytest.raises(TruncatedError):
        d.feed(b"\x01\x00\x01A")


def test_ver_nonzero() -> None:
    d = ContainerDecoder()
    with pytest.raises(ContainerError) as ei:
        d.feed(b"\x20\x05\x00\x01A")  # Ver = 1
    assert ei.value.field == "ver"
    assert ei.value.identifier == 5  # header complete, Identifier valid: answer 400


def test_rsrvd_nonzero() -> None:
    d = ContainerDecoder()
    with pytest.raises(ContainerError) as ei:
        d.feed(b"\x01\x01\x00\x01A")
    assert ei.value.field == "rsrvd"
    assert ei.value.identifier == 1


def test_identifier_zero_cannot_be_answered() -> None:
    d = ContainerDecoder()
    with pytest.raises(ContainerError) as ei:
        d.feed(b"\x00\x00\x00\x01A")
    assert ei.value.field == "identifier"
    assert ei.value.identifier is None


def test_ver_error_with_identifier_zero_has_no_identifier() -> None:
    with pytest.raises(ContainerError) as ei:
        ContainerDecoder().feed(b"\xe0\x00\x00\x01A")
    assert ei.value.field == "ver"
    assert ei.value.identifier is None


def test_length_zero() -> None:
    d = ContainerDecoder()
    with pytest.raises(ContainerError) as ei:
        d.feed(b"\x00\x09\x00\x00")
    assert ei.value.field == "length"
    assert ei.value.identifier == 9


def test_length_above_configured_max() -> None:
    d = ContainerDecoder(max_content=100)
    with pytest.raises(ContainerError) as ei:
        d.feed(b"\x00\x02\x00\x65")  # 101
    assert ei.value.field == "length"
    assert ei.value.identifier == 2


def test_header_is_checked_only_when_complete() -> None:
    # A bad first octet alone does not raise yet: the Identifier (and so the
    # error's identifier) is only known with the full header.
    d = ContainerDecoder()
    assert d.feed(b"\x20") == []
    with pytest.raises(ContainerError) as ei:
        d.feed(b"\x04\x00\x01")
    assert ei.value.identifier == 4


def test_dead_after_error_reraises_same_error() -> None:
    d = ContainerDecoder()
    with pytest.raises(ContainerError) as first:
        d.feed(b"\x00\x00\x00\x01A")
    with pytest.raises(ContainerError) as again:
        d.feed(b"\x00\x01\x00\x01A")
    assert again.value is first.value
    with pytest.raises(ContainerError):
        d.eof()


def test_error_after_valid_container_in_later_feed() -> None:
    d = ContainerDecoder()
    assert d.feed(b"\x00\x01\x00\x01A") == [Container(1, b"A")]
    with pytest.raises(ContainerError):
        d.feed(b"\x00\x00\x00\x01B")


def test_bad_max_content_is_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        ContainerDecoder(max_content=0)
    with pytest.raises(LocalProtocolError):
        ContainerDecoder(max_content=MAX_CONTENT + 1)


def test_repr_hides_content() -> None:
    secret = b"mip6-mn-to-ha-ikey: 00112233\r\n\r\n"
    r = repr(Container(1, secret))
    assert "00112233" not in r
    assert str(len(secret)) in r


# ------------------------------------------------------------- property tests

containers_st = st.lists(
    st.tuples(st.integers(1, 255), st.binary(min_size=1, max_size=300)), max_size=6
)


@settings(max_examples=200, deadline=None)
@given(items=containers_st, data=st.data())
def test_roundtrip_under_arbitrary_chunking(
    items: list[tuple[int, bytes]], data: st.DataObject
) -> None:
    stream = b"".join(encode_container(i, c) for i, c in items)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    d = ContainerDecoder()
    got: list[Container] = []
    prev = 0
    for cut in [*cuts, len(stream)]:
        got += d.feed(stream[prev:cut])
        prev = cut
    d.eof()
    assert got == [Container(i, c) for i, c in items]


@settings(max_examples=200, deadline=None)
@given(stream=st.binary(max_size=200), data=st.data())
def test_arbitrary_bytes_only_raise_wire_errors(stream: bytes, data: st.DataObject) -> None:
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    d = ContainerDecoder()
    prev = 0
    try:
        for cut in [*cuts, len(stream)]:
            for c in d.feed(stream[prev:cut]):
                assert 1 <= c.identifier <= 255 and 1 <= len(c.content)
            prev = cut
        d.eof()
    except (ContainerError, TruncatedError):
        pass


# -------------------------------------------------------- identifier sequence


def test_sequence_accepts_1_to_255_then_refuses_256th() -> None:
    seq = IdentifierSequence()
    for i in range(1, 256):
        seq.check_request(i)
    assert seq.last == 255
    with pytest.raises(ContainerError) as ei:
        seq.check_request(1)
    assert ei.value.field == "identifier"


def test_first_request_must_be_1() -> None:
    with pytest.raises(ContainerError) as ei:
        IdentifierSequence().check_request(2)
    assert ei.value.field == "identifier"
    assert ei.value.identifier == 2


def test_out_of_sequence_identifier() -> None:
    seq = IdentifierSequence()
    seq.check_request(1)
    seq.check_request(2)
    with pytest.raises(ContainerError) as ei:
        seq.check_request(4)
    assert ei.value.identifier == 4
    with pytest.raises(ContainerError):
        IdentifierSequence().check_request(0)


def test_repeated_identifier_refused() -> None:
    seq = IdentifierSequence()
    seq.check_request(1)
    with pytest.raises(ContainerError):
        seq.check_request(1)


def test_response_identifier_must_match() -> None:
    seq = IdentifierSequence()
    seq.check_response(3, 3)
    with pytest.raises(ContainerError) as ei:
        seq.check_response(4, 3)
    assert ei.value.field == "identifier"


def test_next_identifier_for_sender() -> None:
    seq = IdentifierSequence()
    assert [seq.next_identifier() for _ in range(255)] == list(range(1, 256))
    with pytest.raises(LocalProtocolError):
        seq.next_identifier()
