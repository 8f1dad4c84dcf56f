"""``port_open``: readiness polling that can never connect a socket to itself."""

from __future__ import annotations

import socket

import pytest

from mipsec.core import labsetup
from mipsec.core.labsetup import port_open


def test_open_only_while_something_listens() -> None:
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        port = srv.getsockname()[1]
        assert port_open("127.0.0.1", port)
    assert not port_open("127.0.0.1", port)


def test_never_connects_to_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    """The race found in a full-suite run: polling a lab port (ephemeral range)
    before its role listened drew that port as the source port, connected to
    itself, and the role then failed to bind it.  Forced here: the source port
    drawn is the target port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    real = socket.socket

    class SamePort(real):  # type: ignore[misc,valid-type]
        def bind(self, address: object) -> None:
            super().bind(("127.0.0.1", port))

    monkeypatch.setattr(labsetup.socket, "socket", SamePort)
    # A plain connect from that source port to itself would succeed (TCP
    # simultaneous open on Linux); port_open refuses to try it.
    assert not port_open("127.0.0.1", port)
