"""The five RFC 6618 §5.6.5 ciphersuites as data (PROFILE §5).

This module only describes the suites (ids, algorithms, key sizes); the
packet crypto that uses them lives in ``mipsec.core.crypto``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class Suite(IntEnum):
    NULL_SHA = 0x0002
    NULL_SHA256 = 0x003B
    DES3_EDE_CBC_SHA = 0x000A
    AES_128_CBC_SHA = 0x002F
    AES_128_CBC_SHA256 = 0x003C


@dataclass(frozen=True, slots=True)
class SuiteInfo:
    suite: Suite
    integrity: str  # "hmac-sha1-96" | "aes-xcbc-mac-96"
    ikey_len: int
    encryption: str  # "null" | "3des-cbc" | "aes-128-cbc"
    ekey_len: int  # 0 for NULL: no ekey headers are sent
    block_size: int  # cipher block (= IV size); 4 = ESP alignment for NULL
    icv_len: int = 12

    @property
    def encrypts(self) -> bool:
        return self.ekey_len > 0

    @property
    def token(self) -> str:
        """Wire form as the RFC writes it, upper case: ``{00,2F}``."""
        v = int(self.suite)
        return f"{{{v >> 8:02X},{v & 0xFF:02X}}}"


SUITES: dict[Suite, SuiteInfo] = {
    Suite.NULL_SHA: SuiteInfo(Suite.NULL_SHA, "hmac-sha1-96", 20, "null", 0, 4),
    Suite.NULL_SHA256: SuiteInfo(Suite.NULL_SHA256, "aes-xcbc-mac-96", 16, "null", 0, 4),
    Suite.DES3_EDE_CBC_SHA: SuiteInfo(
        Suite.DES3_EDE_CBC_SHA, "hmac-sha1-96", 20, "3des-cbc", 24, 8
    ),
    Suite.AES_128_CBC_SHA: SuiteInfo(
        Suite.AES_128_CBC_SHA, "hmac-sha1-96", 20, "aes-128-cbc", 16, 16
    ),
    Suite.AES_128_CBC_SHA256: SuiteInfo(
        Suite.AES_128_CBC_SHA256, "aes-xcbc-mac-96", 16, "aes-128-cbc", 16, 16
    ),
}

# PROFILE §5: RFC 6618 §5.6 requires confidentiality, so by default only the
# encrypting suites are offered; NULL suites must be enabled explicitly.
DEFAULT_ALLOWED: tuple[Suite, ...] = (
    Suite.AES_128_CBC_SHA256,
    Suite.AES_128_CBC_SHA,
    Suite.DES3_EDE_CBC_SHA,
)

SUITE_NAMES: dict[str, Suite] = {s.name: s for s in Suite}


def suite_from_name(name: str) -> Suite:
    """Accept ``AES_128_CBC_SHA256`` or the wire token ``{00,3C}`` (config helper)."""
    key = name.strip().upper()
    if key in SUITE_NAMES:
        return SUITE_NAMES[key]
    for info in SUITES.values():
        if info.token == key:
            return info.suite
    raise ValueError(f"unknown ciphersuite {name!r}")
