"""The canonical form of an NAI, the one key an MN's identity has everywhere.

RFC 7542 §2.4: the realm is case-insensitive; §2.1 and §3: compare in
Unicode NFC.  So ``alice@Home.Example`` and ``alice@home.example`` are one
MN.  The credential back ends look identities up under this key, and the
HAC binds what it does per MN to it (PROFILE §4 item 8: the SA, the home
address, the per-MN SA cap, revocations, log lines): were those keyed by the
text as sent, one MN could hold a home address and an SA per spelling of its
realm, past ``max_sas_per_mn``, and a revoked MN could come back by changing
the case of its realm.
"""

from __future__ import annotations

import unicodedata

__all__ = ["nai_key"]


def nai_key(mn_id: str) -> str:
    """NFC, realm lower-cased when it is ASCII.

    A non-ASCII realm is left as it is, on purpose: RFC 7542 §3 warns that
    "almost all 'case insensitive' comparisons can be wrong" for them (the
    mapping depends on locale: dotted and dotless i, sharp s) and allows
    case-insensitive matching only "where the utf8-realm is entirely ASCII".
    """
    # ASCII text is in NFC already (the common case, and the one a 100,000-
    # entry revocation list is read in at start).
    nfc = mn_id if mn_id.isascii() else unicodedata.normalize("NFC", mn_id)
    user, at, realm = nfc.rpartition("@")
    if not at or not realm.isascii():
        return nfc
    lower = realm.lower()
    return nfc if lower == realm else f"{user}@{lower}"
