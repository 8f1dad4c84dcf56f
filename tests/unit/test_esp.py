"""RFC 6618 §6 UDP encapsulation codec (mipsec.core.wire.esp), PROFILE §7."""

from __future__ import annotations

import hmac
import os
import struct

import pytest
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from mipsec.core import crypto
from mipsec.core.crypto import AesXcbcMac96
from mipsec.core.errors import LocalProtocolError, PacketError
from mipsec.core.replay import ReplayWindow
from mipsec.core.suites import SUITES, Suite
from mipsec.core.wire import esp
from mipsec.core.wire.esp import (
    InboundSA,
    OutboundSA,
    SequenceExhausted,
    Unprotected,
    decode_plain,
    encode_plain,
    peek_header,
)

H = bytes.fromhex
SPI = 0x1234567
ALL_SUITES = list(Suite)


def _pair(
    suite: Suite, spi: int = SPI, window: int = 64, **kw: int
) -> tuple[OutboundSA, InboundSA, bytes, bytes]:
    info = SUITES[suite]
    ikey = os.urandom(info.ikey_len)
    ekey = os.urandom(info.ekey_len)
    return (
        OutboundSA(info, ikey, ekey, spi, **kw),
        InboundSA(info, ikey, ekey, spi, window=window),
        ikey,
        ekey,
    )


def _icv(suite: Suite, ikey: bytes, data: bytes) -> bytes:
    """The ICV computed independently of mipsec.core.crypto's SuiteCrypto."""
    if SUITES[suite].integrity == "hmac-sha1-96":
        return hmac.new(ikey, data, "sha1").digest()[:12]
    return AesXcbcMac96(ikey).mac96(data)


def _alg(suite: Suite, ekey: bytes) -> algorithms.AES | TripleDES:
    return TripleDES(ekey) if suite is Suite.DES3_EDE_CBC_SHA else algorithms.AES(ekey)


def _drop(inbound: InboundSA, datagram: bytes) -> str:
    with pytest.raises(PacketError) as info:
        inbound.unprotect(datagram)
    return info.value.drop_reason


# ------------------------------------------------------------------ constants


def test_constants() -> None:
    assert (esp.PTYPE_MH, esp.PTYPE_DATA, esp.PTYPE_PLAIN) == (8, 1, 0)
    assert esp.NEXT_HEADER_MH == 135
    assert esp.NEXT_HEADER_DSTOPTS == 60
    assert esp.NEXT_HEADER_IPV6 == 41
    assert esp.NEXT_HEADER_IPV4 == 4
    assert esp.SEQ_REINIT_THRESHOLD == 4294967296 - 1048576
    assert esp.SEQ_MAX == 0xFFFFFFFF
    assert set(esp.DROP_REASONS) == {
        "malformed",
        "unknown_spi",
        "bad_icv",
        "replay",
        "bad_padding",
        "scope",
    }


# ---------------------------------------------------------------- peek_header


@pytest.mark.parametrize(
    ("datagram", "expected"),
    [
        (H("81234567"), (8, 0x1234567)),
        (H("1fffffff") + bytes(40), (1, 2**28 - 1)),
        (H("80000001"), (8, 1)),
        (H("0000000000000000"), (0, 0)),
        (H("0000000000000000") + b"payload", (0, 0)),
    ],
)
def test_peek_header(datagram: bytes, expected: tuple[int, int]) -> None:
    assert peek_header(datagram) == expected
    assert peek_header(memoryview(datagram)) == expected


@pytest.mark.parametrize(
    ("datagram", "field"),
    [
        (b"", "header"),
        (H("812345"), "header"),
        (H("80000000"), "spi"),  # PType 8 with SPI 0
        (H("10000000") + bytes(8), "spi"),  # PType 1 with SPI 0
        (H("00000001") + bytes(4), "spi"),  # PType 0 with an SPI
        (H("00000000"), "sequence"),  # PType 0 without the sequence field
        (H("0000000000000001"), "sequence"),  # PType 0 with sequence != 0
        (H("20000001") + bytes(8), "ptype"),
        (H("f0000001") + bytes(8), "ptype"),
        (H("90000001") + bytes(8), "ptype"),
    ],
)
def test_peek_header_malformed(datagram: bytes, field: str) -> None:
    with pytest.raises(PacketError) as info:
        peek_header(datagram)
    assert info.value.drop_reason == "malformed"
    assert info.value.field == field


def test_plain_packets() -> None:
    inner = H("6000000000000000") + b"inner ipv6"
    wire = encode_plain(inner)
    assert wire == bytes(8) + inner
    assert decode_plain(wire) == inner
    assert decode_plain(encode_plain(b"")) == b""
    for bad in (H("8000000100000000") + inner, H("0000000000000005") + inner, b"\x00" * 7):
        with pytest.raises(PacketError) as info:
            decode_plain(bad)
        assert info.value.drop_reason == "malformed"


# ------------------------------------------------------- hand-written vector


def test_null_sha_byte_vector() -> None:
    """NULL_SHA, SPI 0x1234567, PType 8, Next Header 135, 4-octet payload."""
    ikey = bytes(range(0x20, 0x34))  # 20 octets
    out = OutboundSA(SUITES[Suite.NULL_SHA], ikey, b"", 0x1234567)
    payload = H("3b010500")  # first bytes of a Mobility Header
    wire = out.protect(8, 135, payload)

    authed = H(
        "81234567"  # PType 8 | SPI 0x1234567
        "00000000"  # Sequence Number 0 (PROFILE §7: starts at 0)
        "3b010500"  # Payload Data (no IV for NULL)
        "0102"  # Padding 01 02: 4 + 2 + 2 = 8, a multiple of 4
        "02"  # Pad Length
        "87"  # Next Header 135 (Mobility Header)
    )
    assert wire[0:4] == H("81234567")
    assert wire[4:8] == H("00000000")
    assert wire[8:12] == payload
    assert wire[12:14] == H("0102")
    assert wire[14] == 2
    assert wire[15] == 135
    assert wire[:16] == authed
    assert wire[16:] == hmac.new(ikey, authed, "sha1").digest()[:12]
    assert len(wire) == 28

    second = out.protect(1, 41, H("60"))  # 1 + 2 -> one padding octet
    assert second[:12] == H("112345670000000160010129")
    assert second[12:] == hmac.new(ikey, second[:12], "sha1").digest()[:12]

    inbound = InboundSA(SUITES[Suite.NULL_SHA], ikey, b"", 0x1234567)
    assert inbound.unprotect(wire) == Unprotected(8, 0, 135, payload)
    assert inbound.unprotect(second) == Unprotected(1, 1, 41, H("60"))


@pytest.mark.parametrize("suite", [s for s in ALL_SUITES if SUITES[s].encrypts])
def test_encrypted_layout_opened_independently(suite: Suite) -> None:
    out, _, ikey, ekey = _pair(suite)
    bs = SUITES[suite].block_size
    payload = os.urandom(37)
    wire = out.protect(1, 4, payload)
    pt_len = -(-(37 + 2) // bs) * bs
    assert len(wire) == 8 + bs + pt_len + 12
    assert struct.unpack(">II", wire[:8]) == ((1 << 28) | SPI, 0)
    assert wire[-12:] == _icv(suite, ikey, wire[:-12])
    iv, ct = wire[8 : 8 + bs], wire[8 + bs : -12]
    plain = Cipher(_alg(suite, ekey), modes.CBC(iv)).decryptor().update(ct)
    pad_len = pt_len - 37 - 2
    assert plain == payload + bytes(range(1, pad_len + 1)) + bytes((pad_len, 4))


# ------------------------------------------------------------- round trips


@pytest.mark.parametrize("suite", ALL_SUITES)
def test_round_trip_every_size(suite: Suite) -> None:
    out, inbound, _, _ = _pair(suite, window=4096)
    info = SUITES[suite]
    iv_len = info.block_size if info.encrypts else 0
    data = os.urandom(1500)
    for n in range(1501):
        ptype = 8 if n % 2 else 1
        wire = out.protect(ptype, n % 256, data[:n])
        # minimal padding: fewer than one block/4-octet unit of padding
        body = len(wire) - 8 - iv_len - 12
        assert body % info.block_size == 0 and n + 2 <= body < n + 2 + info.block_size
        assert inbound.unprotect(wire) == Unprotected(ptype, n, n % 256, data[:n])
    assert out.seq == 1501
    assert inbound.highest_seq == 1500


@pytest.mark.parametrize("suite", ALL_SUITES)
def test_inlined_icv_interoperates_at_every_length(suite: Suite) -> None:
    # protect()/unprotect() compute the ICV inline (not through SuiteCrypto.mac):
    # check them both against the independent ICV, for every length modulo the
    # MAC block (XCBC's last step depends on it: RFC 3566 §4 steps 3a/3b).
    out, inbound, ikey, ekey = _pair(suite, window=128)
    info = SUITES[suite]
    residues = set()
    for n in range(70):
        wire = out.protect(8, 135, os.urandom(n))
        residues.add((len(wire) - 12) % 16)
        assert wire[-12:] == _icv(suite, ikey, wire[:-12])
        assert inbound.unprotect(wire).seq == n
    # ... and a packet made without mipsec at all is accepted.
    pad = -(5 + 2) % info.block_size
    plain = b"hello" + bytes(range(1, pad + 1)) + bytes((pad, 135))
    if info.encrypts:
        wire = _encrypted_packet(suite, ikey, ekey, plain, seq=70)
    else:
        authed = struct.pack(">II", (8 << 28) | SPI, 70) + plain
        wire = authed + _icv(suite, ikey, authed)
    assert inbound.unprotect(wire) == Unprotected(8, 70, 135, b"hello")
    if not info.encrypts:
        assert residues == {0, 4, 8, 12}  # full and partial last blocks both seen


@pytest.mark.parametrize("suite", [s for s in ALL_SUITES if SUITES[s].encrypts])
def test_protect_refills_the_random_block_pool(suite: Suite) -> None:
    # protect() takes R from the shared pool inline and falls back to
    # CbcCipher.encrypt_parts (which refills it from os.urandom) when empty.
    out, inbound, _, ekey = _pair(suite, window=4096)
    bs = SUITES[suite].block_size
    crypto._clear_pools()
    ivs = set()
    for seq in range(crypto._POOL_OCTETS // bs + 3):  # empty, drained, refilled
        payload = seq.to_bytes(4, "big")
        wire = out.protect(1, 41, payload)
        iv, ct = wire[8 : 8 + bs], wire[8 + bs : -12]
        plain = Cipher(_alg(suite, ekey), modes.CBC(iv)).decryptor().update(ct)
        assert plain.startswith(payload)
        assert inbound.unprotect(wire).payload == payload
        ivs.add(iv)
    assert len(ivs) == crypto._POOL_OCTETS // bs + 3


@pytest.mark.parametrize("suite", ALL_SUITES)
@settings(max_examples=25, deadline=None)
@given(
    payloads=st.lists(
        st.tuples(st.sampled_from([1, 8]), st.integers(0, 255), st.binary(max_size=1500)),
        min_size=1,
        max_size=5,
    )
)
def test_round_trip_property(suite: Suite, payloads: list[tuple[int, int, bytes]]) -> None:
    out, inbound, _, _ = _pair(suite)
    for seq, (ptype, nh, payload) in enumerate(payloads):
        got = inbound.unprotect(out.protect(ptype, nh, payload))
        assert got == Unprotected(ptype, seq, nh, payload)
        assert isinstance(got.payload, bytes)


@pytest.mark.parametrize("suite", ALL_SUITES)
def test_accepts_memoryview_and_bytearray(suite: Suite) -> None:
    out, inbound, _, _ = _pair(suite)
    wire = out.protect(8, 135, bytearray(b"abc"))
    assert inbound.unprotect(memoryview(bytearray(wire))).payload == b"abc"


# ------------------------------------------------------------- rejections


@pytest.mark.parametrize("suite", ALL_SUITES)
def test_every_single_bit_flip_is_rejected(suite: Suite) -> None:
    out, inbound, _, _ = _pair(suite)
    wire = out.protect(8, 135, b"mobility")
    reasons: set[str] = set()
    for bit in range(len(wire) * 8):
        flipped = bytearray(wire)
        flipped[bit // 8] ^= 0x80 >> (bit % 8)
        reason = _drop(inbound, bytes(flipped))
        reasons.add(reason)
        if bit >= 32:  # past PType|SPI everything is caught by the ICV
            assert reason == "bad_icv", bit
    assert reasons == {"malformed", "unknown_spi", "bad_icv"}
    # None of the failures touched the window: the original still goes through.
    assert inbound.highest_seq == -1
    assert inbound.unprotect(wire).payload == b"mobility"


def _null_packet(ikey: bytes, trailer_plain: bytes, seq: int = 0) -> bytes:
    authed = struct.pack(">II", (8 << 28) | SPI, seq) + trailer_plain
    return authed + hmac.new(ikey, authed, "sha1").digest()[:12]


def _encrypted_packet(suite: Suite, ikey: bytes, ekey: bytes, plain: bytes, seq: int = 0) -> bytes:
    bs = SUITES[suite].block_size
    iv = os.urandom(bs)
    ct = Cipher(_alg(suite, ekey), modes.CBC(iv)).encryptor().update(plain)
    authed = struct.pack(">II", (8 << 28) | SPI, seq) + iv + ct
    return authed + _icv(suite, ikey, authed)


@pytest.mark.parametrize(
    "plain",
    [
        H("aabbccdd") + H("0103") + H("02") + H("87"),  # second octet should be 02
        H("aabbccdd") + H("0000") + H("02") + H("87"),  # zero padding
        H("aabbcc") + H("020304") + H("03") + H("87"),  # does not start at 01
        H("aabbccdd") + H("0102") + H("03") + H("87"),  # one octet short of Pad Length
        H("aabbcc") + H("0101") + H("87") + bytes(2) + H("0203") + H("03") + H("87"),
        H("aabb") + H("ff") + H("87"),  # Pad Length beyond the packet
        H("0102") + H("05") + H("87"),  # Pad Length beyond the packet
    ],
)
def test_null_bad_padding_with_valid_icv(plain: bytes) -> None:
    assert len(plain) % 4 == 0  # aligned: only the padding is wrong
    ikey = os.urandom(20)
    inbound = InboundSA(SUITES[Suite.NULL_SHA], ikey, b"", SPI)
    assert _drop(inbound, _null_packet(ikey, plain)) == "bad_padding"
    # The window did not move: the same sequence number with good padding passes.
    good = _null_packet(ikey, H("aabbccdd") + H("0102") + H("02") + H("87"))
    assert inbound.unprotect(good) == Unprotected(8, 0, 0x87, H("aabbccdd"))
    assert (
        inbound.unprotect(_null_packet(ikey, H("0102") + H("02") + H("87"), seq=1)).payload == b""
    )


@pytest.mark.parametrize("suite", [s for s in ALL_SUITES if SUITES[s].encrypts])
def test_encrypted_bad_padding_with_valid_icv(suite: Suite) -> None:
    _, inbound, ikey, ekey = _pair(suite)
    bs = SUITES[suite].block_size
    n = bs - 2 - 3  # three padding octets
    payload = os.urandom(n)
    for bad_pad, pad_len in ((H("010203")[:2] + H("09"), 3), (H("000000"), 3), (H("010203"), 200)):
        plain = payload + bad_pad + bytes((pad_len, 41))
        assert _drop(inbound, _encrypted_packet(suite, ikey, ekey, plain)) == "bad_padding"
    good = _encrypted_packet(suite, ikey, ekey, payload + H("010203") + bytes((3, 41)))
    assert inbound.unprotect(good) == Unprotected(8, 0, 41, payload)


@pytest.mark.parametrize("suite", ALL_SUITES)
def test_longer_valid_padding_is_accepted(suite: Suite) -> None:
    # Senders use minimal padding; receivers only demand 01 02 03 ... (RFC 4303 §2.4).
    _, inbound, ikey, ekey = _pair(suite)
    bs = SUITES[suite].block_size
    pad_len = 2 * bs + (bs - 4) % bs
    payload = b"ab"
    plain = payload + bytes(range(1, pad_len + 1)) + bytes((pad_len, 60))
    assert len(plain) % bs == 0
    if SUITES[suite].encrypts:
        wire = _encrypted_packet(suite, ikey, ekey, plain)
    else:
        authed = struct.pack(">II", (8 << 28) | SPI, 0) + plain
        wire = authed + _icv(suite, ikey, authed)
    assert inbound.unprotect(wire) == Unprotected(8, 0, 60, payload)


@pytest.mark.parametrize("suite", ALL_SUITES)
def test_replay_rejected_the_second_time(suite: Suite) -> None:
    out, inbound, _, _ = _pair(suite)
    wire = out.protect(1, 41, b"x" * 40)
    inbound.unprotect(wire)
    assert _drop(inbound, wire) == "replay"
    # A replay is refused before any crypto: even a broken ICV reports "replay".
    broken = wire[:-1] + bytes((wire[-1] ^ 1,))
    assert _drop(inbound, broken) == "replay"


def test_replay_checked_before_the_icv(monkeypatch: pytest.MonkeyPatch) -> None:
    out, inbound, _, _ = _pair(Suite.AES_128_CBC_SHA256)
    wire = out.protect(1, 41, b"data")
    inbound.unprotect(wire)
    calls: list[int] = []
    real_new = inbound._mac_new

    def spy() -> object:  # every ICV computation starts with a fresh MAC context
        calls.append(1)
        return real_new()

    monkeypatch.setattr(inbound, "_mac_new", spy)
    assert _drop(inbound, wire) == "replay"
    assert calls == []
    assert inbound.unprotect(out.protect(1, 41, b"next")).payload == b"next"
    assert calls == [1]  # the spy does see the MAC of a fresh packet


@pytest.mark.parametrize("suite", [Suite.NULL_SHA, Suite.AES_128_CBC_SHA256])
def test_left_of_window_and_reordering(suite: Suite) -> None:
    out, inbound, _, _ = _pair(suite, window=64)
    packets = [out.protect(1, 41, bytes([i % 256])) for i in range(200)]
    inbound.unprotect(packets[150])
    assert _drop(inbound, packets[150 - 64]) == "replay"  # left edge is 87
    assert _drop(inbound, packets[0]) == "replay"
    assert inbound.unprotect(packets[87]).seq == 87  # inside, out of order: fine
    assert inbound.unprotect(packets[149]).seq == 149
    assert inbound.unprotect(packets[199]).seq == 199
    assert inbound.highest_seq == 199
    assert _drop(inbound, packets[149]) == "replay"


@pytest.mark.parametrize("window", [32, 64, 128])
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_inbound_window_matches_replay_window(window: int, data: st.DataObject) -> None:
    """InboundSA runs the window inline: it must decide exactly as ReplayWindow does.

    Packets arrive in any order, duplicated, some with a broken ICV (which must
    not move the window), across jumps larger than the window.
    """
    out, inbound, _, _ = _pair(Suite.NULL_SHA, window=window)
    n = 3 * window
    packets = [out.protect(1, 41, bytes([i % 256])) for i in range(n)]
    events = data.draw(
        st.lists(st.tuples(st.integers(0, n - 1), st.booleans()), min_size=1, max_size=150)
    )
    ref = ReplayWindow(window)
    for seq, icv_ok in events:
        wire = packets[seq] if icv_ok else packets[seq][:-1] + bytes((packets[seq][-1] ^ 1,))
        expected = ref.check(seq)
        if expected and icv_ok:
            assert inbound.unprotect(wire).seq == seq
            ref.update(seq)
        else:
            assert _drop(inbound, wire) == ("replay" if not expected else "bad_icv")
        assert inbound.highest_seq == ref.highest


@pytest.mark.parametrize("suite", ALL_SUITES)
def test_truncated_or_misaligned_packets(suite: Suite) -> None:
    out, inbound, _, _ = _pair(suite)
    wire = out.protect(8, 135, os.urandom(30))
    info = SUITES[suite]
    iv_len = info.block_size if info.encrypts else 0
    minimum = 8 + iv_len + info.block_size + 12
    for n in range(len(wire)):
        reason = _drop(inbound, wire[:n])
        if n < minimum or (n - 20) % info.block_size:
            assert reason == "malformed", n
        else:
            assert reason == "bad_icv", n
    for extra in (b"\x00", b"\x00" * info.block_size):
        assert _drop(inbound, wire + extra) in {"malformed", "bad_icv"}
    assert _drop(inbound, wire + b"\x00") == "malformed"
    assert inbound.unprotect(wire).payload  # still fresh


def test_wrong_spi_and_plain_ptype() -> None:
    out, inbound, _, _ = _pair(Suite.AES_128_CBC_SHA)
    other, _, _, _ = _pair(Suite.AES_128_CBC_SHA, spi=SPI + 1)
    assert _drop(inbound, other.protect(1, 41, b"hello")) == "unknown_spi"
    assert _drop(inbound, encode_plain(bytes(60))) == "unknown_spi"
    wire = bytearray(out.protect(1, 41, b"hello"))
    wire[0] = (wire[0] & 0x0F) | 0x20  # PType 2
    assert _drop(inbound, bytes(wire)) == "malformed"


# ------------------------------------------------------------ sequence limits


def test_sequence_exhaustion_refused() -> None:
    out, inbound, _, _ = _pair(Suite.NULL_SHA, initial_seq=esp.SEQ_MAX)
    assert out.needs_reinit
    last = out.protect(1, 41, b"last")
    assert last[4:8] == H("ffffffff")
    assert out.seq == 2**32
    with pytest.raises(SequenceExhausted):
        out.protect(1, 41, b"one too many")
    with pytest.raises(LocalProtocolError):  # SequenceExhausted is a LocalProtocolError
        out.protect(8, 135, b"")
    assert out.seq == 2**32
    assert inbound.unprotect(last).seq == 2**32 - 1


def test_reinit_threshold() -> None:
    t = esp.SEQ_REINIT_THRESHOLD
    out, inbound, _, _ = _pair(Suite.NULL_SHA, initial_seq=t - 1)
    below = out.protect(1, 41, b"a")
    assert not out.needs_reinit  # sent t - 1
    at = out.protect(1, 41, b"b")
    assert out.needs_reinit  # sent t
    inbound.unprotect(below)
    assert not inbound.needs_reinit and inbound.highest_seq == t - 1
    inbound.unprotect(at)
    assert inbound.needs_reinit and inbound.highest_seq == t


# ---------------------------------------------------------- caller misuse


def test_protect_rejects_bad_arguments() -> None:
    out, _, _, _ = _pair(Suite.NULL_SHA)
    for ptype in (0, 2, 15):
        with pytest.raises(LocalProtocolError, match="ptype"):
            out.protect(ptype, 41, b"")
    out.protect(1, 0, b"a")  # caches the trailer 01 01 00 for one padding octet
    for nh in (-1, 256, 257):
        with pytest.raises(LocalProtocolError, match="next_header"):
            out.protect(1, nh, b"ab")  # 256 with no padding must not hit that entry
    assert out.seq == 1  # the failures consumed nothing


@pytest.mark.parametrize("spi", [0, 2**28, -1, True])
def test_spi_range(spi: int) -> None:
    info = SUITES[Suite.NULL_SHA]
    with pytest.raises(LocalProtocolError, match="spi"):
        OutboundSA(info, bytes(20), b"", spi)
    with pytest.raises(LocalProtocolError, match="spi"):
        InboundSA(info, bytes(20), b"", spi)


def test_bad_keys_and_window() -> None:
    info = SUITES[Suite.AES_128_CBC_SHA256]
    with pytest.raises(LocalProtocolError, match="ekey"):
        OutboundSA(info, bytes(16), bytes(24), SPI)
    with pytest.raises(LocalProtocolError, match="window"):
        InboundSA(info, bytes(16), bytes(16), SPI, window=16)
    assert InboundSA(info, bytes(16), bytes(16), SPI, window=4096).window_size == 4096


@pytest.mark.parametrize("suite", ALL_SUITES)
def test_repr_hides_keys(suite: Suite) -> None:
    out, inbound, ikey, ekey = _pair(suite)
    text = repr(out) + repr(inbound)
    assert ikey.hex()[:8] not in text
    assert "spi=" in text
