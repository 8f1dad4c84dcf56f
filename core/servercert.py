"""The HAC's MHAuth TLS certificate as one unit a reload can swap.

A certificate the HAC serves comes with two derived facts that must never
disagree with it: the ``SSLContext`` that presents it and the
``tls-server-end-point`` channel binding of its leaf (RFC 5929 §4.1), which
keys every MHAuth ``auth`` of the connections that saw it.  ``load`` builds
all three from one version of the files: the digests are taken before and
checked after, so a certificate renewed while it is being read is read
again rather than paired with the binding of another (core/filedigest.py).

The HAC keeps the binding of every context its live connections were made
with (``ChannelBindings``), so that a reload that swaps the certificate
never changes the binding of a connection whose handshake used the old one.
"""

from __future__ import annotations

import ssl
import weakref
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from cryptography import x509

from mipsec.core.errors import CertificateError
from mipsec.core.filedigest import FileDigests
from mipsec.core.tls import hac_server_context, load_server_chain, server_cb_octets

__all__ = ["ChannelBindings", "ServerCert", "load"]

_ATTEMPTS = 3  # reads of a pair that keeps changing under us before giving up


@dataclass(frozen=True)
class ServerCert:
    context: ssl.SSLContext = field(repr=False)
    cb_octets: bytes = field(repr=False)
    files: FileDigests
    not_after: datetime


def load(cert: Path, key: Path, *, strict_rfc6618: bool) -> ServerCert:
    """The context, binding and digests of ``cert``/``key``, from one version.

    Raises ``CertificateError`` (naming the file) as a start does, or
    ``UnreadableFileError`` (key ``cert`` or ``key``) for a file that is not
    a readable regular file."""
    for _ in range(_ATTEMPTS):
        files = FileDigests([("cert", cert), ("key", key)])
        context = hac_server_context(str(cert), str(key), strict_rfc6618=strict_rfc6618)
        cb_octets = server_cb_octets(str(cert))
        leaf: x509.Certificate = load_server_chain(cert)[0]
        if not files.changed():
            return ServerCert(context, cb_octets, files, leaf.not_valid_after_utc)
    raise CertificateError(f"{cert}: changed again and again while it was read")


class ChannelBindings:
    """``cb_octets`` per server context still in use (RFC 5929 §4.1).

    Weak keys: a context is forgotten once no connection holds it."""

    def __init__(self, current: ServerCert) -> None:
        self._of: weakref.WeakKeyDictionary[ssl.SSLContext, bytes] = weakref.WeakKeyDictionary()
        self.current = current
        self.use(current)

    def use(self, cert: ServerCert) -> None:
        self.current = cert
        self._of[cert.context] = cert.cb_octets

    def of(self, sslobj: ssl.SSLObject | None) -> bytes:
        """The binding of the certificate ``sslobj``'s handshake presented."""
        current = self.current
        if sslobj is None or sslobj.context is current.context:
            return current.cb_octets  # every connection but those of a reload's seconds
        cb = self._of.get(sslobj.context)
        # Never missing: the object holds its context, and every context
        # served was registered by ``use``.
        return cb if cb is not None else current.cb_octets
