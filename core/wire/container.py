"""MHAuth message container (RFC 6618 §5.1, §5.3; PROFILE §2), sans-I/O.

Wire form: one octet Ver (3 high bits) | Rsrvd (5 bits), one octet
Identifier, a 16-bit network-order Length, then Length octets of Content::

    +-----+---------+------------+------------------+-----------+
    | Ver |  Rsrvd  | Identifier | Length (16 bits) | Content ~ |
    +-----+---------+------------+------------------+-----------+

The decoder is a push parser (h11 style): the caller feeds whatever the TLS
layer delivered, in any chunking, and gets back every complete container.
"""

from __future__ import annotations

from dataclasses import dataclass

from mipsec.core.errors import ContainerError, LocalProtocolError, TruncatedError

__all__ = [
    "HEADER_LEN",
    "IDENTIFIER_MAX",
    "MAX_CONTENT",
    "Container",
    "ContainerDecoder",
    "IdentifierSequence",
    "encode_container",
]

HEADER_LEN = 4
MAX_CONTENT = 65535  # §5.1: Content is 1..65535 octets (16-bit Length)
IDENTIFIER_MAX = 255  # §5.1: Identifier 1..255; §5.3: at most 255 exchanges
VERSION = 0  # §5.1: the current version is 0


@dataclass(frozen=True, slots=True, repr=False)
class Container:
    """One decoded container.  ``content`` is the raw TV-header octets."""

    identifier: int
    content: bytes

    def __repr__(self) -> str:
        # The content of a final response carries SA keys (RFC 6618 §5.6.2):
        # never show it, only its size.
        return f"Container(identifier={self.identifier}, content=<{len(self.content)} octets>)"


def _valid_identifier(identifier: int) -> bool:
    return 1 <= identifier <= IDENTIFIER_MAX


def encode_container(identifier: int, content: bytes) -> bytes:
    """Frame ``content`` (already-encoded TV headers) with the 4-octet header."""
    if not _valid_identifier(identifier):
        raise LocalProtocolError(f"container identifier {identifier} outside 1..255")
    if not 1 <= len(content) <= MAX_CONTENT:
        # §5.1: no fragmentation; a message that does not fit is a caller bug.
        raise LocalProtocolError(f"container content of {len(content)} octets outside 1..65535")
    return bytes((VERSION << 5, identifier)) + len(content).to_bytes(2, "big") + bytes(content)


class ContainerDecoder:
    """Incremental container decoder over a reliable byte stream.

    The header is validated only once all four octets have arrived, so the
    error raised (and the Identifier it carries) does not depend on how the
    stream was chunked.  Errors are raised as soon as they are found: a
    malformed stream ends the session (PROFILE §2), so complete containers
    that preceded the error *in the same* :meth:`feed` call are discarded with
    it.  After an error the decoder is dead and re-raises that error.
    """

    __slots__ = ("_buf", "_error", "_max_content")

    def __init__(self, *, max_content: int = MAX_CONTENT) -> None:
        if not 1 <= max_content <= MAX_CONTENT:
            raise LocalProtocolError(f"max_content {max_content} outside 1..65535")
        self._max_content = max_content
        self._buf = bytearray()
        self._error: ContainerError | TruncatedError | None = None

    @property
    def buffered(self) -> int:
        """Octets received but not yet returned as part of a container."""
        return len(self._buf)

    def _check_header(self, header: bytes | bytearray) -> tuple[int, int]:
        first, identifier = header[0], header[1]
        length = int.from_bytes(header[2:4], "big")
        # Identifier 0 cannot be answered (PROFILE §2): the error carries None.
        ident = identifier if _valid_identifier(identifier) else None
        if first >> 5 != VERSION:
            raise ContainerError("ver", f"unsupported version {first >> 5}", ident)
        if first & 0x1F:
            raise ContainerError("rsrvd", "reserved bits not zero", ident)
        if ident is None:
            raise ContainerError("identifier", "identifier 0 is not allowed", None)
        if length == 0:
            raise ContainerError("length", "content length 0", ident)
        if length > self._max_content:
            raise ContainerError(
                "length", f"content length {length} exceeds limit {self._max_content}", ident
            )
        return ident, length

    def feed(self, data: bytes) -> list[Container]:
        """Add received octets; return every container they complete."""
        if self._error is not None:
            raise self._error
        self._buf += data
        out: list[Container] = []
        pos = 0
        buf = self._buf
        try:
            while len(buf) - pos >= HEADER_LEN:
                identifier, length = self._check_header(buf[pos : pos + HEADER_LEN])
                end = pos + HEADER_LEN + length
                if len(buf) < end:
                    # "Length larger than the data": wait for more (PROFILE §2).
                    break
                out.append(Container(identifier, bytes(buf[pos + HEADER_LEN : end])))
                pos = end
        except ContainerError as exc:
            self._error = exc
            raise
        finally:
            del buf[:pos]
        return out

    def eof(self) -> None:
        """The stream ended: a partial container is a truncated message."""
        if self._error is not None:
            raise self._error
        if self._buf:
            error = TruncatedError(
                "container", f"stream ended inside a container ({len(self._buf)} octets buffered)"
            )
            self._error = error
            raise error


class IdentifierSequence:
    """The request/response Identifier rule of RFC 6618 §5.1 and §5.3.

    The first request carries 1, each next request exactly the previous + 1,
    and a response copies its request's Identifier.  Since the field is one
    octet and 0 is forbidden, a 256th exchange is impossible and refused.
    One instance per TLS session (§5.3: each session restarts at 1).
    """

    __slots__ = ("_last",)

    def __init__(self) -> None:
        self._last = 0

    @property
    def last(self) -> int:
        """Identifier of the last request accepted or issued (0: none yet)."""
        return self._last

    def check_request(self, identifier: int) -> None:
        """HAC side: accept the next request's Identifier or raise."""
        ident = identifier if _valid_identifier(identifier) else None
        if self._last >= IDENTIFIER_MAX:
            raise ContainerError("identifier", "more than 255 exchanges", ident)
        expected = self._last + 1
        if identifier != expected:
            raise ContainerError(
                "identifier", f"out of sequence: expected {expected}, got {identifier}", ident
            )
        self._last = identifier

    def check_response(self, identifier: int, request_identifier: int) -> None:
        """MN side: a response must carry its request's Identifier."""
        if identifier != request_identifier:
            ident = identifier if _valid_identifier(identifier) else None
            raise ContainerError(
                "identifier",
                f"response identifier {identifier} does not match request {request_identifier}",
                ident,
            )

    def next_identifier(self) -> int:
        """MN side: the Identifier for the next request."""
        if self._last >= IDENTIFIER_MAX:
            raise LocalProtocolError("more than 255 exchanges in one session (RFC 6618 §5.3)")
        self._last += 1
        return self._last
