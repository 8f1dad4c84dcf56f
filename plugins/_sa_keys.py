"""How an SA store row keeps the four SA keys: one ``sa_keys`` BLOB, clear or wrapped.

Layout of the BLOB (first octet = format)::

    0x00 | len(k1) len(k2) len(k3) len(k4) | k1 k2 k3 k4                 clear
    0x01 | nonce (12) | AES-256-GCM(len(k1)..len(k4) | k1..k4) | tag (16)  wrapped

k1..k4 = mn_to_ha_ikey, ha_to_mn_ikey, mn_to_ha_ekey, ha_to_mn_ekey (RFC
6618 §5.6).  A wrapped BLOB's additional authenticated data is every other
column of its row, as stored (``row_aad``): moving the BLOB to another row,
or editing the row around it, makes it fail authentication.  A store is one
mode or the other: a clear BLOB in a wrapped store is refused as a forgery.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mipsec.core.keywrap import KeyWrapper, UnwrapError

MODE_CLEAR = "clear"
MODE_WRAPPED = "aes-256-gcm"

_CLEAR = 0x00
_WRAPPED = 0x01
_AAD_LABEL = b"mipsec issued_sa v2 "

Keys = tuple[bytes, bytes, bytes, bytes]


def row_aad(head: Sequence[Any]) -> bytes:
    """The row's other columns as one octet string: ``ascii()`` of the tuple of
    SQLite values (int, str, None), which round-trip unchanged through the file."""
    return _AAD_LABEL + ascii(tuple(head)).encode("ascii")


def _pack(keys: Keys) -> bytes:
    a, b, c, d = keys
    return bytes((len(a), len(b), len(c), len(d))) + a + b + c + d


def _unpack(data: bytes) -> Keys:
    if len(data) < 4:
        raise UnwrapError("sa_keys: truncated")
    lens = data[:4]
    if len(data) != 4 + sum(lens):
        raise UnwrapError("sa_keys: lengths do not add up")
    out: list[bytes] = []
    at = 4
    for n in lens:
        out.append(data[at : at + n])
        at += n
    return out[0], out[1], out[2], out[3]


class ClearKeys:
    """Keys in clear (``clear_keys = true``): anyone who reads the file has them."""

    mode = MODE_CLEAR

    def seal(self, head: Sequence[Any], keys: Keys) -> bytes:
        return bytes((_CLEAR,)) + _pack(keys)

    def open(self, head: Sequence[Any], blob: bytes) -> Keys:
        if not blob or blob[0] != _CLEAR:
            raise UnwrapError("sa_keys: wrapped keys in a clear store")
        return _unpack(blob[1:])


class WrappedKeys:
    """Keys under AES-256-GCM, bound to their row."""

    mode = MODE_WRAPPED

    def __init__(self, wrapper: KeyWrapper) -> None:
        self.wrapper = wrapper

    def __repr__(self) -> str:
        return "WrappedKeys(<key>)"

    def seal(self, head: Sequence[Any], keys: Keys) -> bytes:
        return bytes((_WRAPPED,)) + self.wrapper.seal(_pack(keys), row_aad(head))

    def open(self, head: Sequence[Any], blob: bytes) -> Keys:
        if not blob or blob[0] != _WRAPPED:
            # Only a forger writes clear keys into a wrapped store.
            raise UnwrapError("sa_keys: clear keys in a wrapped store")
        return _unpack(self.wrapper.open(blob[1:], row_aad(head)))


KeyCodec = ClearKeys | WrappedKeys


def clear_blob_keys(blob: bytes) -> Keys:
    """The keys of a clear BLOB (conversion of a clear store to a wrapped one)."""
    return ClearKeys().open((), blob)
