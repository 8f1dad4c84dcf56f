"""TunWriter once its device is gone (core/tun.py): told once, then silent.

The descriptor of a removed TUN interface answers EBADFD; once the data
plane closes it, its number may be handed to the next file the process
opens, so nothing may be written to it again -- not even by a flush that
was scheduled before.
"""

from __future__ import annotations

import errno
import os
from types import SimpleNamespace
from typing import Any, cast

import pytest

from mipsec.core import tun as tun_mod
from mipsec.core.tun import TunGoneError, TunWriter


def _writer(
    monkeypatch: pytest.MonkeyPatch, fail: int | None
) -> tuple[TunWriter, list[bytes], list[TunGoneError], dict[str, int]]:
    written: list[bytes] = []

    def write(fd: int, data: bytes) -> int:
        if fail is not None:
            raise OSError(fail, os.strerror(fail))
        written.append(bytes(data))
        return len(data)

    monkeypatch.setattr(tun_mod.os, "write", write)
    gone: list[TunGoneError] = []
    counts: dict[str, int] = {}
    device = cast(Any, SimpleNamespace(fd=99, vnet_hdr=False))
    w = TunWriter(device, lambda cb: None, counts, on_gone=gone.append)
    return w, written, gone, counts


def test_a_gone_device_is_reported_once_and_never_written_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    w, _, gone, counts = _writer(monkeypatch, errno.EBADFD)
    w.write(b"\x60" + bytes(39))
    assert len(gone) == 1 and gone[0].errno == errno.EBADFD and w.fd == -1
    w.write(b"\x60" + bytes(39))
    w.flush()
    assert len(gone) == 1 and counts["io_errors"] == 0


def test_another_write_error_is_counted_and_the_writer_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    w, _, gone, counts = _writer(monkeypatch, errno.EINVAL)
    w.write(b"\x60" + bytes(39))
    w.write(b"\x60" + bytes(39))
    assert gone == [] and counts["io_errors"] == 2 and w.fd == 99


def test_a_closed_writer_writes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    w, written, _, counts = _writer(monkeypatch, None)
    w.write(b"\x60" + bytes(39))
    assert len(written) == 1
    w.close()
    w.write(b"\x60" + bytes(39))
    w.flush()
    assert len(written) == 1 and counts["tun_writes"] == 1
