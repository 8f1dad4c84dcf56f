"""Wrapping SA keys at rest: AES-256-GCM under a key-wrapping key read from a file.

The SA stores keep the four keys of every SA (RFC 6618 §5.6) because the HAC
hands them to an HA again after a restart (PROFILE §9 pull) and the HA
reinstalls them at start.  They are wrapped so that a copy of the store
(a backup, a support bundle, a stolen disk image without the key file)
reveals no key, and so that a row altered in place -- another SPI's keys
pasted in, a validity end pushed back -- is refused rather than used:

* key-wrapping key: 32 random octets in a file of its own (mode 0600);
  the AES key is derived from it with HKDF-SHA256 (``_INFO``), so the file's
  octets never key anything else directly;
* one fresh random 96-bit nonce per wrapped value (``os.urandom``);
* the additional authenticated data is the caller's binding of the value to
  its row (the SA store passes every other column of the row: SPI, mn_id,
  suite, validity end, HA, addresses), so a wrapped value moved to another
  row, or a row whose other columns changed, fails authentication;
* a verifier (the wrap of a fixed label) tells a wrong key file from a
  tampered row at start.

Random 96-bit nonces keep AES-GCM's guarantees for up to 2^32 wraps under
one key (NIST SP 800-38D §8.3): about 50 days of 1,000 SAs per second
without pause.  Replace the key file (with a fresh store) well before that.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from mipsec.core.errors import MipsecError
from mipsec.core.filedigest import open_regular
from mipsec.core.fsutil import write_private_atomic
from mipsec.core.secretfiles import check_private

KEY_FILE_LEN = 32  # octets of key-wrapping key material in a key file
NONCE_LEN = 12
TAG_LEN = 16
_INFO = b"mipsec sa-store key wrapping v1 aes-256-gcm"
_VERIFIER_AAD = b"mipsec sa-store key check"


class UnwrapError(MipsecError):
    """A wrapped value failed authentication: wrong key, or altered octets."""


class KeyFileError(ValueError):
    """A key file that cannot be used (a ``ValueError``: factories pass it on)."""


class KeyWrapper:
    """AES-256-GCM seal/open with a key derived from key-file octets."""

    __slots__ = ("_aead",)

    def __init__(self, key_material: bytes) -> None:
        if len(key_material) != KEY_FILE_LEN:
            raise KeyFileError(f"key material must be {KEY_FILE_LEN} octets")
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO).derive(
            bytes(key_material)
        )
        self._aead = AESGCM(key)

    def __repr__(self) -> str:
        return "KeyWrapper(<key>)"

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        """``nonce || ciphertext || tag``."""
        nonce = os.urandom(NONCE_LEN)
        return nonce + self._aead.encrypt(nonce, plaintext, aad)

    def open(self, sealed: bytes, aad: bytes) -> bytes:
        if len(sealed) < NONCE_LEN + TAG_LEN:
            raise UnwrapError("wrapped value too short")
        try:
            return self._aead.decrypt(sealed[:NONCE_LEN], sealed[NONCE_LEN:], aad)
        except InvalidTag:
            raise UnwrapError("wrapped value fails authentication") from None

    def verifier(self) -> bytes:
        """A value that only this key opens (stored next to the wrapped rows)."""
        return self.seal(b"", _VERIFIER_AAD)

    def matches(self, verifier: bytes) -> bool:
        try:
            self.open(verifier, _VERIFIER_AAD)
        except UnwrapError:
            return False
        return True


def read_key_file(path: Path) -> bytes:
    """The key material in ``path``: exactly 32 octets, mode 0600 or stricter."""
    check_private(path)
    try:
        with open_regular(path) as f:  # a FIFO: refused, not waited on
            data = f.read(KEY_FILE_LEN + 1)
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if len(data) != KEY_FILE_LEN:
        raise KeyFileError(
            f"{path}: must hold exactly {KEY_FILE_LEN} octets "
            f"(e.g. head -c {KEY_FILE_LEN} /dev/urandom > {path}; chmod 600 {path})"
        )
    return data


def create_key_file(path: Path) -> bytes:
    """Create ``path`` with 32 fresh random octets, mode 0600; ``FileExistsError`` if present."""
    material = os.urandom(KEY_FILE_LEN)
    write_private_atomic(path, material)
    return material
