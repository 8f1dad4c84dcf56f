"""CbcCipher makes its running contexts at first use: one per SA direction (issue 9)."""

from __future__ import annotations

import os

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from mipsec.core.crypto import CbcCipher, SuiteCrypto
from mipsec.core.suites import SUITES, Suite


def _built(c: CbcCipher, name: str) -> bool:
    # The slot itself, without __getattr__ (which would build the context).
    try:
        getattr(CbcCipher, name).__get__(c, CbcCipher)
    except AttributeError:
        return False
    return True


def test_only_the_context_a_direction_uses_is_made() -> None:
    key = os.urandom(16)
    sender, receiver = CbcCipher(algorithms.AES(key), 16), CbcCipher(algorithms.AES(key), 16)
    assert not _built(sender, "encrypt_update") and not _built(sender, "decrypt_update")
    plaintext = os.urandom(64)
    wire = sender.encrypt(plaintext)
    assert _built(sender, "encrypt_update") and not _built(sender, "decrypt_update")
    assert receiver.decrypt(wire) == plaintext
    assert _built(receiver, "decrypt_update") and not _built(receiver, "encrypt_update")
    # Same bytes as a fresh CBC context with the packet's IV (the reference).
    ref = Cipher(algorithms.AES(key), modes.CBC(wire[:16])).decryptor()
    assert ref.update(wire[16:]) + ref.finalize() == plaintext
    # The running contexts keep chaining across packets.
    for _ in range(3):
        p = os.urandom(32)
        assert receiver.decrypt(sender.encrypt(p)) == p


def test_suite_crypto_makes_no_cipher_context_until_used() -> None:
    info = SUITES[Suite.AES_128_CBC_SHA256]
    c = SuiteCrypto(info, os.urandom(info.ikey_len), os.urandom(info.ekey_len))
    assert c.cipher is not None
    assert not _built(c.cipher, "encrypt_update") and not _built(c.cipher, "decrypt_update")
    assert c.decrypt(c.encrypt(bytes(16))) == bytes(16)


def test_unknown_attribute_still_raises() -> None:
    c = CbcCipher(algorithms.AES(bytes(16)), 16)
    try:
        c.nothing  # type: ignore[attr-defined]  # noqa: B018
    except AttributeError as exc:
        assert "nothing" in str(exc)
    else:
        raise AssertionError("no AttributeError")
