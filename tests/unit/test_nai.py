"""The canonical NAI key (core/nai.py): RFC 7542 §2.4 (case-insensitive
realm) and §3 (NFC; case folding only of an all-ASCII realm)."""

from __future__ import annotations

import unicodedata

from hypothesis import given
from hypothesis import strategies as st

from mipsec.core.nai import nai_key


def reference(mn_id: str) -> str:
    """The definition, spelled out without the ASCII fast path."""
    nfc = unicodedata.normalize("NFC", mn_id)
    user, at, realm = nfc.rpartition("@")
    if not at or not realm.isascii():
        return nfc
    return f"{user}@{realm.lower()}"


@given(st.text(max_size=40), st.text(max_size=20))
def test_nai_key_is_the_definition(user: str, realm: str) -> None:
    for mn_id in (user, f"{user}@{realm}", f"{user}@{realm.upper()}"):
        assert nai_key(mn_id) == reference(mn_id)


def test_nai_key_examples() -> None:
    assert nai_key("Alice@Home.EXAMPLE") == "Alice@home.example"
    assert nai_key("alice@home.example") == "alice@home.example"
    assert nai_key("a@b@Realm") == "a@b@realm"  # the last "@" starts the realm
    assert nai_key("no-realm") == "no-realm"
    # Non-ASCII realm: NFC, but no case folding (RFC 7542 §3).
    assert nai_key("bob@E\u0301xample") == "bob@\u00c9xample"
    assert nai_key("e\u0301@x.Y") == "\u00e9@x.y"
