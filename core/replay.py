"""RFC 4303 §3.4.3 sliding anti-replay window, sans-I/O (PROFILE §7).

The receiver keeps the highest *verified* sequence number (the right edge of
the window) and a bitmap of which of the ``size`` numbers ending there it has
seen.  ``check`` is the preliminary test done before any crypto (RFC 4303
§3.4.3: "the first ESP check applied to a packet", so forged floods cost no
HMAC); ``update`` runs only once the ICV (and, here, the padding) verified.

Profile specifics: sequence numbers start at 0 in each direction (PROFILE §7),
so 0 is a valid first packet and "nothing received yet" is ``highest == -1``;
32-bit numbers, no ESN, and a counter never wraps (the SA is re-bootstrapped
before that), so no wrap-around arithmetic is needed.
"""

from __future__ import annotations

from mipsec.core.errors import LocalProtocolError

__all__ = ["MAX_WINDOW", "MIN_WINDOW", "SEQ_LIMIT", "ReplayWindow"]

# RFC 4303 §3.4.3: at least 32 packets MUST be supported, 64 SHOULD be the
# default; PROFILE §7 caps the configurable size at 4096.
MIN_WINDOW = 32
MAX_WINDOW = 4096
SEQ_LIMIT = 1 << 32  # sequence numbers are 0 .. 2**32 - 1


class ReplayWindow:
    """Anti-replay window of ``size`` packets over an int bitmap.

    Bit ``i`` of the bitmap stands for sequence number ``highest - i``.
    """

    __slots__ = ("_bitmap", "_highest", "_mask", "size")

    def __init__(self, size: int = 64) -> None:
        if isinstance(size, bool) or not isinstance(size, int):
            raise LocalProtocolError(f"window: size must be an int, not {type(size).__name__}")
        if not MIN_WINDOW <= size <= MAX_WINDOW:
            raise LocalProtocolError(
                f"window: size {size} outside {MIN_WINDOW}..{MAX_WINDOW} (RFC 4303 §3.4.3)"
            )
        self.size = size
        self._mask = (1 << size) - 1
        self._highest = -1
        self._bitmap = 0

    @property
    def highest(self) -> int:
        """Highest verified sequence number, -1 before the first packet."""
        return self._highest

    def check(self, seq: int) -> bool:
        """Would ``seq`` be accepted?  Changes nothing (runs before the ICV check)."""
        if not 0 <= seq < SEQ_LIMIT:
            raise LocalProtocolError(f"sequence: {seq} is not a 32-bit number")
        diff = self._highest - seq
        if diff < 0:
            return True  # right of the window: new
        if diff >= self.size:
            return False  # left of the window: too old to tell, drop
        return not (self._bitmap >> diff) & 1

    def update(self, seq: int) -> None:
        """Record ``seq`` as received; call only after the ICV verified.

        ``seq`` must have passed ``check`` (nothing can change the window in
        between in a sans-I/O receiver); anything else is a caller bug.
        """
        if not 0 <= seq < SEQ_LIMIT:
            raise LocalProtocolError(f"sequence: {seq} is not a 32-bit number")
        diff = seq - self._highest
        if diff > 0:
            # Slide right: older bits move left, bits past the left edge fall off.
            self._bitmap = ((self._bitmap << diff) | 1) & self._mask if diff < self.size else 1
            self._highest = seq
            return
        diff = -diff
        if diff >= self.size or (self._bitmap >> diff) & 1:
            raise LocalProtocolError(f"sequence: {seq} was not accepted by check()")
        self._bitmap |= 1 << diff

    def __repr__(self) -> str:
        return f"ReplayWindow(size={self.size}, highest={self._highest})"
