"""Known-answer and property tests for mipsec.core.crypto.

Vectors are copied from RFC 3566 §4.6 (AES-XCBC-MAC-96), RFC 2202 §3
(HMAC-SHA-1, the vectors RFC 2404 §3/§5 points to, with the 96-bit truncation)
and RFC 3602 §4 (AES-CBC).
"""

from __future__ import annotations

import hmac as std_hmac
import os

import pytest
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from mipsec.core import crypto
from mipsec.core.crypto import AesXcbcMac96, CbcCipher, HmacSha1_96, SuiteCrypto
from mipsec.core.errors import LocalProtocolError
from mipsec.core.suites import SUITES, Suite

H = bytes.fromhex

# ---------------------------------------------------------------- RFC 3566 §4.6

XCBC_KEY = H("000102030405060708090a0b0c0d0e0f")
# (test case, message, AES-XCBC-MAC, AES-XCBC-MAC-96)
RFC3566_VECTORS = [
    (1, b"", "75f0251d528ac01c4573dfd584d79f29", "75f0251d528ac01c4573dfd5"),
    (2, H("000102"), "5b376580ae2f19afe7219ceef172756f", "5b376580ae2f19afe7219cee"),
    (
        3,
        H("000102030405060708090a0b0c0d0e0f"),
        "d2a246fa349b68a79998a4394ff7a263",
        "d2a246fa349b68a79998a439",
    ),
    (
        4,
        H("000102030405060708090a0b0c0d0e0f10111213"),
        "47f51b4564966215b8985c63055ed308",
        "47f51b4564966215b8985c63",
    ),
    (
        5,
        H("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"),
        "f54f0ec8d2b9f3d36807734bd5283fd4",
        "f54f0ec8d2b9f3d36807734b",
    ),
    (
        6,
        H("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f2021"),
        "becbb3bccdb518a30677d5481fb6b4d8",
        "becbb3bccdb518a30677d548",
    ),
    (7, bytes(1000), "f0dafee895db30253761103b5d84528f", "f0dafee895db30253761103b"),
]


@pytest.mark.parametrize(("case", "msg", "full", "mac96"), RFC3566_VECTORS)
def test_rfc3566_vectors_fresh_object(case: int, msg: bytes, full: str, mac96: str) -> None:
    assert AesXcbcMac96(XCBC_KEY).mac(msg) == H(full)
    assert AesXcbcMac96(XCBC_KEY).mac96(msg) == H(mac96)


def test_rfc3566_vectors_one_object_many_messages() -> None:
    # One pre-keyed object serves every packet of an SA: reuse must not leak
    # state from one message into the next, in any order, repeatedly.
    mac = AesXcbcMac96(XCBC_KEY)
    order = RFC3566_VECTORS + RFC3566_VECTORS[::-1] + RFC3566_VECTORS[::2]
    for _, msg, full, mac96 in order:
        assert mac.mac(msg) == H(full)
        assert mac.mac96(msg) == H(mac96)
        assert mac.mac96(memoryview(msg)) == H(mac96)


def _reference_xcbc(key: bytes, msg: bytes) -> bytes:
    """RFC 3566 §4 written block by block, independent of the optimised code."""
    ecb = Cipher(algorithms.AES(key), modes.ECB()).encryptor()

    def aes(k: bytes, block: bytes) -> bytes:
        return Cipher(algorithms.AES(k), modes.ECB()).encryptor().update(block)

    k1, k2, k3 = (ecb.update(bytes([i]) * 16) for i in (1, 2, 3))
    blocks = [msg[i : i + 16] for i in range(0, len(msg), 16)] or [b""]
    e = bytes(16)
    for block in blocks[:-1]:
        e = aes(k1, bytes(a ^ b for a, b in zip(block, e, strict=True)))
    last = blocks[-1]
    if len(last) == 16:
        last = bytes(a ^ b for a, b in zip(last, k2, strict=True))
    else:
        padded = last + b"\x80" + bytes(15 - len(last))
        last = bytes(a ^ b for a, b in zip(padded, k3, strict=True))
    return aes(k1, bytes(a ^ b for a, b in zip(last, e, strict=True)))


@settings(max_examples=60, deadline=None)
@given(key=st.binary(min_size=16, max_size=16), msgs=st.lists(st.binary(max_size=100), max_size=6))
def test_xcbc_matches_blockwise_reference(key: bytes, msgs: list[bytes]) -> None:
    mac = AesXcbcMac96(key)
    for msg in msgs:
        assert mac.mac(msg) == _reference_xcbc(key, msg)


@pytest.mark.parametrize("size", [0, 15, 17, 20, 32])
def test_xcbc_only_128_bit_keys(size: int) -> None:
    with pytest.raises(LocalProtocolError, match="ikey"):
        AesXcbcMac96(bytes(size))


# ---------------------------------------------------- RFC 2202 §3 (via RFC 2404)

# (test case, key, data, HMAC-SHA-1 digest); digest-96 = first 12 octets, which
# RFC 2202 prints for test case 5 ("Test With Truncation").
RFC2202_SHA1_VECTORS = [
    (1, b"\x0b" * 20, b"Hi There", "b617318655057264e28bc0b6fb378c8ef146be00"),
    (2, b"Jefe", b"what do ya want for nothing?", "effcdf6ae5eb2fa2d27416d5f184df9c259a7c79"),
    (3, b"\xaa" * 20, b"\xdd" * 50, "125d7342b9ac11cd91a39af48aa17b4f63f175d3"),
    (
        4,
        H("0102030405060708090a0b0c0d0e0f10111213141516171819"),
        b"\xcd" * 50,
        "4c9007f4026250c6bc8414f9bf50c86c2d7235da",
    ),
    (5, b"\x0c" * 20, b"Test With Truncation", "4c1a03424b55e07fe7f27be1d58bb9324a9a5a04"),
    (
        6,
        b"\xaa" * 80,
        b"Test Using Larger Than Block-Size Key - Hash Key First",
        "aa4ae5e15272d00e95705637ce8a3b55ed402112",
    ),
    (
        7,
        b"\xaa" * 80,
        b"Test Using Larger Than Block-Size Key and Larger Than One Block-Size Data",
        "e8e99d0f45237d786d6bbaa7965c7808bbff1a91",
    ),
]


@pytest.mark.parametrize(("case", "key", "data", "digest"), RFC2202_SHA1_VECTORS)
def test_rfc2202_hmac_sha1_and_96_bit_truncation(
    case: int, key: bytes, data: bytes, digest: str
) -> None:
    mac = HmacSha1_96(key)
    assert mac.mac(data) == H(digest)
    assert mac.mac96(data) == H(digest)[:12]
    # The pre-keyed object is reusable: a second packet gives the same answer.
    assert mac.mac96(memoryview(data)) == H(digest)[:12]


def test_rfc2202_case5_digest96_as_printed() -> None:
    assert HmacSha1_96(b"\x0c" * 20).mac96(b"Test With Truncation") == H("4c1a03424b55e07fe7f27be1")


# ------------------------------------------------------------- RFC 3602 §4

RFC3602_VECTORS = [
    (
        1,
        "06a9214036b8a15b512e03d534120006",
        "3dafba429d9eb430b422da802c9fac41",
        b"Single block msg",
        "e353779c1079aeb82708942dbe77181a",
    ),
    (
        2,
        "c286696d887c9aa0611bbb3e2025a45a",
        "562e17996d093d28ddb3ba695a2e6f58",
        H("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"),
        "d296cd94c2cccf8a3a863028b5e1dc0a7586602d253cfff91b8266bea6d61ab1",
    ),
    (
        3,
        "6c3ea0477630ce21a2ce334aa746c2cd",
        "c782dc4c098c66cbd9cd27d825682c81",
        b"This is a 48-byte message (exactly 3 AES blocks)",
        "d0a02b3836451753d493665d33f0e8862dea54cdb293abc7506939276772f8d5"
        "021c19216bad525c8579695d83ba2684",
    ),
    (
        4,
        "56e47a38c5598974bc46903dba290349",
        "8ce82eefbea0da3c44699ed7db51b7d9",
        H(
            "a0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babbbcbdbebf"
            "c0c1c2c3c4c5c6c7c8c9cacbcccdcecfd0d1d2d3d4d5d6d7d8d9dadbdcdddedf"
        ),
        "c30e32ffedc0774e6aff6af0869f71aa0f3af07a9a31a9c684db207eb0ef8e4e"
        "35907aa632c3ffdf868bb7b29d3d46ad83ce9f9a102ee99d49a53e87f4c3da55",
    ),
]

# RFC 3602 §4 cases 5 and 6: ESP payloads (padding 01 02 .., pad length, next header).
RFC3602_ESP_VECTORS = [
    (
        5,
        "90d382b410eeba7ad938c46cec1a82bf",
        "e96e8c08ab465763fd098d45dd3ff893",
        "08000ebda70a00008e9c083db95b070008090a0b0c0d0e0f1011121314151617"
        "18191a1b1c1d1e1f202122232425262728292a2b2c2d2e2f3031323334353637"
        "0102030405060708090a0b0c0d0e0e01",
        "f663c25d325c18c6a9453e194e120849a4870b66cc6b9965330013b4898dc856"
        "a4699e523a55db080b59ec3a8e4b7e52775b07d1db34ed9c538ab50c551b874a"
        "a269add047ad2d5913ac19b7cfbad4a6",
    ),
    (
        6,
        "90d382b410eeba7ad938c46cec1a82bf",
        "69d08df7d203329db093fc4924e5bd80",
        "0800b5e8a80a0500a69c083d0b660e0077777777777777777777777701020201",
        "f51995881ec4e0c4488987ce742e8109689bb379d2d750c0d915dca346a89f75",
    ),
]


def _force_iv(cipher: CbcCipher, key: bytes, wanted_iv: bytes) -> None:
    """Make the next ``encrypt`` emit ``wanted_iv``: R = D_K(IV) XOR C_prev.

    Only possible for someone who knows the key and the random block R, which
    is the point: the test plays the CSPRNG by putting R on top of the pool.
    """
    c_prev = cipher.encrypt(bytes(16))[-16:]  # last block of the running chain
    d = Cipher(algorithms.AES(key), modes.ECB()).decryptor().update(wanted_iv)
    r = bytes(a ^ b for a, b in zip(d, c_prev, strict=True))
    crypto._pools[16].append(r)  # list.pop takes the last block next


@pytest.mark.parametrize(("case", "key", "iv", "plaintext", "ciphertext"), RFC3602_VECTORS)
def test_rfc3602_decrypt(case: int, key: str, iv: str, plaintext: bytes, ciphertext: str) -> None:
    cipher = CbcCipher(algorithms.AES(H(key)), 16)
    cipher.encrypt(os.urandom(32))  # some earlier traffic on the running contexts
    cipher.decrypt(os.urandom(48))
    assert cipher.decrypt(H(iv) + H(ciphertext)) == plaintext


@pytest.mark.parametrize(("case", "key", "iv", "plaintext", "ciphertext"), RFC3602_VECTORS)
def test_rfc3602_encrypt(
    case: int,
    key: str,
    iv: str,
    plaintext: bytes,
    ciphertext: str,
) -> None:
    cipher = CbcCipher(algorithms.AES(H(key)), 16)
    _force_iv(cipher, H(key), H(iv))
    assert cipher.encrypt(plaintext) == H(iv) + H(ciphertext)


@pytest.mark.parametrize(("case", "key", "iv", "plaintext", "ciphertext"), RFC3602_ESP_VECTORS)
def test_rfc3602_esp_payload_vectors(
    case: int, key: str, iv: str, plaintext: str, ciphertext: str
) -> None:
    suite = SuiteCrypto(SUITES[Suite.AES_128_CBC_SHA], bytes(20), H(key))
    assert suite.decrypt(H(iv) + H(ciphertext)) == H(plaintext)


# ------------------------------------------------------------ CBC and IVs


def _cipher_for(name: str, key: bytes) -> tuple[CbcCipher, int]:
    if name == "aes":
        return CbcCipher(algorithms.AES(key[:16]), 16), 16
    return CbcCipher(TripleDES(key), 8), 8


@pytest.mark.parametrize("name", ["aes", "3des"])
@settings(max_examples=40, deadline=None)
@given(key=st.binary(min_size=24, max_size=24), sizes=st.lists(st.integers(1, 12), max_size=6))
def test_running_cbc_equals_fresh_cbc_with_the_sent_iv(
    name: str, key: bytes, sizes: list[int]
) -> None:
    cipher, bs = _cipher_for(name, key)
    alg = algorithms.AES(key[:16]) if name == "aes" else TripleDES(key)
    for blocks in sizes:
        plaintext = os.urandom(blocks * bs)
        out = cipher.encrypt(plaintext)
        iv, ct = out[:bs], out[bs:]
        fresh = Cipher(alg, modes.CBC(iv))
        assert ct == fresh.encryptor().update(plaintext)
        # and the running decryptor opens what a fresh encryptor made
        assert cipher.decrypt(iv + ct) == plaintext
        assert fresh.decryptor().update(ct) == plaintext


@pytest.mark.parametrize("name", ["aes", "3des"])
def test_ivs_are_fresh_and_not_the_previous_ciphertext_block(name: str) -> None:
    cipher, bs = _cipher_for(name, os.urandom(24))
    plaintext = bytes(4 * bs)  # same plaintext every time
    outs = [cipher.encrypt(plaintext) for _ in range(2000)]
    ivs = [o[:bs] for o in outs]
    assert len(set(ivs)) == len(ivs)
    assert len({o[bs : 2 * bs] for o in outs}) == len(outs)  # first blocks differ too
    for prev, cur in zip(outs, outs[1:], strict=False):
        assert cur[:bs] != prev[-bs:]  # not the chained (predictable) IV
    # Unbiased bits: 2000 * 8 * bs samples, a 5 % deviation is astronomically unlikely.
    ones = sum(bin(int.from_bytes(iv, "big")).count("1") for iv in ivs)
    assert 0.45 < ones / (len(ivs) * bs * 8) < 0.55


@pytest.mark.parametrize("name", ["aes", "3des"])
def test_iv_comes_from_buffered_os_urandom(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # R (the random block in front of each packet) is a slice of os.urandom
    # output drawn _POOL_OCTETS at a time, each slice used exactly once.
    key = os.urandom(24)
    cipher, bs = _cipher_for(name, key)
    alg = algorithms.AES(key[:16]) if name == "aes" else TripleDES(key)
    ecb_d = Cipher(alg, modes.ECB()).decryptor()  # noqa: S305 (recovers R, test only)
    real = os.urandom
    drawn: list[bytes] = []

    def spy(n: int) -> bytes:
        drawn.append(real(n))
        return drawn[-1]

    crypto._clear_pools()
    monkeypatch.setattr(os, "urandom", spy)
    per_pool = crypto._POOL_OCTETS // bs
    outs = [cipher.encrypt(bytes(2 * bs)) for _ in range(per_pool + 5)]
    assert [len(d) for d in drawn] == [crypto._POOL_OCTETS] * 2  # one refill per pool
    offered = {d[i : i + bs] for d in drawn for i in range(0, len(d), bs)}
    # C0 = E_K(R XOR C_prev): recover each R (from the 2nd packet, C_prev is known).
    rs = [
        bytes(a ^ b for a, b in zip(ecb_d.update(out[:bs]), prev[-bs:], strict=True))
        for prev, out in zip(outs, outs[1:], strict=False)
    ]
    assert set(rs) <= offered
    assert len(set(rs)) == len(rs)  # never reused
    # With the CSPRNG pinned, the IV is a function of that secret block: two
    # ciphers that saw identical traffic emit different IVs for different R.
    k = os.urandom(16)
    a, b = CbcCipher(algorithms.AES(k), 16), CbcCipher(algorithms.AES(k), 16)
    crypto._pools[16].append(bytes(16))
    ia = a.encrypt(bytes(16))[:16]
    crypto._pools[16].append(b"\xff" * 16)
    ib = b.encrypt(bytes(16))[:16]
    assert ia != ib


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_does_not_reuse_the_parents_random_blocks() -> None:
    cipher, _ = _cipher_for("aes", os.urandom(24))
    cipher.encrypt(bytes(16))  # the pool now holds unused blocks
    assert crypto._pools[16]
    pid = os.fork()
    if pid == 0:  # child: report through the exit status only
        os._exit(0 if not crypto._pools[16] and not crypto._pools[8] else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert crypto._pools[16]  # the parent keeps its own


def test_cbc_rejects_unaligned_lengths() -> None:
    cipher, _ = _cipher_for("aes", os.urandom(24))
    with pytest.raises(LocalProtocolError, match="plaintext"):
        cipher.encrypt(bytes(15))
    with pytest.raises(LocalProtocolError, match="ciphertext"):
        cipher.decrypt(bytes(16))  # IV only
    with pytest.raises(LocalProtocolError, match="ciphertext"):
        cipher.decrypt(bytes(33))


# ------------------------------------------------------------ SuiteCrypto


def _keys(suite: Suite) -> tuple[bytes, bytes]:
    info = SUITES[suite]
    return os.urandom(info.ikey_len), os.urandom(info.ekey_len)


@pytest.mark.parametrize("suite", list(Suite))
def test_suite_crypto_round_trip_and_icv(suite: Suite) -> None:
    info = SUITES[suite]
    ikey, ekey = _keys(suite)
    tx, rx = SuiteCrypto(info, ikey, ekey), SuiteCrypto(info, ikey, ekey)
    plaintext = os.urandom(6 * 8)  # a multiple of 4, 8 and 16
    sealed = tx.encrypt(plaintext)
    assert rx.decrypt(sealed) == plaintext
    assert len(sealed) == len(plaintext) + (info.block_size if info.encrypts else 0)
    if not info.encrypts:
        assert sealed == plaintext
    icv = tx.mac(sealed)
    assert len(icv) == 12
    assert rx.verify(sealed, icv)
    assert not rx.verify(sealed, bytes(12))
    assert not rx.verify(sealed + b"\x00", icv)
    assert not rx.verify(sealed, icv[:11])
    # The ICV is the independent algorithm's 96-bit truncation.
    if info.integrity == "hmac-sha1-96":
        assert icv == std_hmac.new(ikey, sealed, "sha1").digest()[:12]
    else:
        assert icv == _reference_xcbc(ikey, sealed)[:12]


@pytest.mark.parametrize("suite", list(Suite))
def test_suite_crypto_key_lengths(suite: Suite) -> None:
    info = SUITES[suite]
    ikey, ekey = _keys(suite)
    for bad in (ikey[:-1], ikey + b"\x00", b""):
        with pytest.raises(LocalProtocolError, match="ikey"):
            SuiteCrypto(info, bad, ekey)
    for bad in (ekey + b"\x00", ekey[:-1]) if ekey else (b"\x00" * 16,):
        with pytest.raises(LocalProtocolError, match="ekey"):
            SuiteCrypto(info, ikey, bad)
    with pytest.raises(LocalProtocolError, match="ikey"):
        SuiteCrypto(info, ikey.hex(), ekey)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "key",
    [
        bytes(range(8)) * 2 + bytes(range(8, 16)),  # k1 == k2
        bytes(range(8)) + bytes(range(8, 16)) * 2,  # k2 == k3
        bytes(range(8)) + bytes(b ^ 1 for b in range(8)) + bytes(range(16, 24)),  # parity only
    ],
)
def test_3des_rejects_degenerate_keys(key: bytes) -> None:
    with pytest.raises(LocalProtocolError, match="RFC 2451"):
        SuiteCrypto(SUITES[Suite.DES3_EDE_CBC_SHA], bytes(20), key)


@pytest.mark.parametrize("suite", list(Suite))
def test_no_key_in_repr(suite: Suite) -> None:
    info = SUITES[suite]
    ikey = b"\x5a" * info.ikey_len
    ekey = (b"\xa5" * 8 + b"\xc3" * 8 + b"\xa5" * 8)[: info.ekey_len]  # k2 != k1, k3
    sc = SuiteCrypto(info, ikey, ekey)
    text = repr(sc) + repr(sc.integrity) + repr(sc.cipher)
    for marker in ("5a5a", "a5a5", "c3c3", "zzzz", "\\xa5", "\\xc3"):
        assert marker not in text.lower()
    assert "hidden" in text
