"""One error family for the whole project.

Two kinds, as in h11: the *peer* broke the protocol (``RemoteProtocolError`` and
the ``WireError`` family -- answer or drop, never crash) versus the *caller*
misused an API (``LocalProtocolError`` -- a bug, raise).  Messages name the
field and never carry secret material.
"""

from __future__ import annotations

import os


class MipsecError(Exception):
    """Base of every error mipsec raises on purpose."""


class StoreBusyError(MipsecError):
    """A store write could not begin: another process holds the store's
    write lock (a second HAC sharing the file, an operator's ``sqlite3``)."""


class WireError(MipsecError):
    """Malformed octets on the wire.  ``field`` names what was wrong."""

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}")


class TruncatedError(WireError):
    """The stream or datagram ended inside a structure (PROFILE §2)."""


class ContainerError(WireError):
    """A bad MHAuth container header (PROFILE §2).

    ``identifier`` is the container's Identifier when the 4-octet header was
    complete and its Identifier valid (1..255): the HAC then answers 400 with
    that Identifier; ``None`` means "cannot be answered, close".
    """

    def __init__(self, field: str, reason: str, identifier: int | None = None) -> None:
        super().__init__(field, reason)
        self.identifier = identifier


class HeaderError(WireError):
    """A bad TV-header line or value (PROFILE §3)."""


class PacketError(WireError):
    """A bad MN-HA packet (PROFILE §7); ``drop_reason`` is the counter name."""

    def __init__(self, field: str, reason: str, drop_reason: str = "malformed") -> None:
        super().__init__(field, reason)
        self.drop_reason = drop_reason


class MobilityHeaderError(WireError):
    """A bad Mobility Header or mobility option (RFC 6275 §6.1, PROFILE §8)."""


class RemoteProtocolError(MipsecError):
    """The peer broke the MHAuth exchange; ``status`` is the code to answer."""

    def __init__(self, status: int, reason: str) -> None:
        self.status = status
        self.reason = reason
        super().__init__(f"{status}: {reason}")


class LocalProtocolError(MipsecError):
    """The caller misused an API (a bug in the caller, not the peer)."""


class CertificateError(MipsecError):
    """A certificate is unusable for RFC 6618 §9.2 / PROFILE §1."""


class ConfigError(MipsecError):
    """A configuration problem: names the file, the key and the reason."""

    def __init__(self, file: str, key: str, reason: str) -> None:
        self.file = file
        self.key = key
        self.reason = reason
        super().__init__(f"{file}: {key}: {reason}")


class PluginError(MipsecError):
    """A plugin is missing, duplicated or broke its hook contract."""


class ListenError(MipsecError):
    """A listener could not bind its address; ``key`` is the config key of its port.

    Raised by the services' ``start``; the launcher adds the file name.
    """

    def __init__(self, key: str, host: str, port: int, why: str) -> None:
        self.key = key
        self.host = host
        self.port = port
        self.why = why
        where = f"[{host}]" if ":" in host else host
        self.reason = f"cannot listen on {where} port {port}: {why}"
        super().__init__(f"{key}: {self.reason}")

    @classmethod
    def from_oserror(cls, key: str, host: str, port: int, exc: OSError) -> ListenError:
        # asyncio rewords bind errors ("error while attempting to bind on
        # address ...: address already in use"): keep only the plain reason.
        return cls(key, host, port, os.strerror(exc.errno) if exc.errno else str(exc))

    def under(self, prefix: str) -> ListenError:
        """The same error for a service configured under ``prefix`` (``local_ha.``)."""
        return ListenError(prefix + self.key, self.host, self.port, self.why)
