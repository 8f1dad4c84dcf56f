"""A Linux TUN device (``/dev/net/tun``) and its configuration with iproute2.

``TunDevice`` opens the clone device and attaches it to an interface with
``TUNSETIFF`` (``IFF_TUN | IFF_NO_PI``: layer-3 packets, no 4-octet packet
information header, so one ``read`` is one whole IPv6 or IPv4 packet and one
``write`` injects one).  The interface exists as long as the descriptor is
open: closing it (or the process ending) removes the interface with its
addresses and routes, so a crashed data plane leaves nothing behind.

Addresses, MTU and routes are set with ``ip`` (iproute2), the operator's own
tool, so what the data plane did can be read back with ``ip addr`` / ``ip
route`` and repeated by hand.  IPv6 address autoconfiguration is switched
off on the device (``addrgenmode none``): a tunnel interface must not send
Router Solicitations or MLD reports from a link-local address into the
tunnel, where the MN's ingress rule would only drop them.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import socket
import struct
import subprocess
from collections.abc import Callable, Sequence

from mipsec.core.errors import MipsecError
from mipsec.core.gro import VNET_HDR_LEN, TcpCoalescer

__all__ = [
    "IpCommandError",
    "TunDevice",
    "TunError",
    "TunGoneError",
    "TunWriter",
    "ip",
    "ip_batch",
]

_TUNSETIFF = 0x400454CA  # _IOW('T', 202, int), linux/if_tun.h
_IFF_TUN = 0x0001
_IFF_NO_PI = 0x1000
_IFF_VNET_HDR = 0x4000
_IFNAMSIZ = 16
_IP_TIMEOUT = 10.0  # seconds for one ip(8) command
_READ_SIZE = 65535 + VNET_HDR_LEN


class TunError(MipsecError):
    """The TUN device cannot be created or used (names the device and why)."""


# What a read or write of a TUN file descriptor returns once its interface is
# gone (``ip link del``, a network manager): EBADFD ("File descriptor in bad
# state").  The descriptor then polls readable for ever; a reader that only
# counted the error was called again at once -- 180,000 times a second.
_GONE_ERRNOS = frozenset({errno.EBADFD, errno.ENODEV, errno.ENXIO})


class TunGoneError(OSError):
    """The TUN interface behind a descriptor no longer exists."""

    @classmethod
    def of(cls, exc: OSError) -> TunGoneError:
        return cls(exc.errno, exc.strerror)


class IpCommandError(MipsecError):
    """An ``ip`` command failed; the message is the command and ip's own words."""


def ip(*args: str, check: bool = True) -> str:
    """Run ``ip ARGS`` and return its output; ``IpCommandError`` (one line) if it fails."""
    cmd = ["ip", *args]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=_IP_TIMEOUT)
    except FileNotFoundError:
        raise IpCommandError("ip: iproute2 is not installed") from None
    except subprocess.TimeoutExpired:
        raise IpCommandError(f"{' '.join(cmd)}: no answer in {_IP_TIMEOUT:.0f} s") from None
    if check and out.returncode != 0:
        why = " ".join(out.stderr.split()) or f"exit status {out.returncode}"
        raise IpCommandError(f"{' '.join(cmd)}: {why}")
    return out.stdout


# What ``ip -batch`` reads as one plain word: no quoting, comment or line break.
_BATCH_WORD = re.compile(r"[A-Za-z0-9_.:/%@+=,-]+")
_BATCH_FAILED = re.compile(r"Command failed -:(\d+)")


def ip_batch(commands: Sequence[Sequence[str]]) -> list[tuple[int, IpCommandError]]:
    """Run every command (``ip`` arguments without global options) with
    one ``ip -force -batch -``; the ones that failed, by index, each worded
    like :func:`ip`'s error.  ``-force``: a failed command does not stop
    the others.  ``IpCommandError`` if ``ip`` does not run or answer (the
    same timeout as one command).  A word ``ip -batch`` would read otherwise
    (a quote, a ``#``) makes it one ``ip`` per command, as before."""
    if not commands:
        return []
    if not all(_BATCH_WORD.fullmatch(word) for cmd in commands for word in cmd):
        failed: list[tuple[int, IpCommandError]] = []
        for i, cmd in enumerate(commands):
            try:
                ip(*cmd)
            except IpCommandError as exc:
                failed.append((i, exc))
        return failed
    script = "".join(" ".join(cmd) + "\n" for cmd in commands)
    try:
        out = subprocess.run(
            ["ip", "-force", "-batch", "-"],
            input=script,
            capture_output=True,
            text=True,
            timeout=_IP_TIMEOUT,
        )
    except FileNotFoundError:
        raise IpCommandError("ip: iproute2 is not installed") from None
    except subprocess.TimeoutExpired:
        raise IpCommandError(
            f"ip -force -batch - ({len(commands)} commands): no answer in {_IP_TIMEOUT:.0f} s"
        ) from None
    if out.returncode == 0:
        return []
    # ip's words for a failed command, then "Command failed -:LINE".
    failed, said = [], []
    for line in out.stderr.splitlines():
        m = _BATCH_FAILED.fullmatch(line.strip())
        if m is None:
            said.append(line)
            continue
        index = int(m.group(1)) - 1
        if 0 <= index < len(commands):
            why = " ".join(" ".join(said).split()) or "failed"
            failed.append((index, IpCommandError(f"ip {' '.join(commands[index])}: {why}")))
        said = []
    if not failed:  # not a command's failure: ip itself
        why = " ".join(out.stderr.split()) or f"exit status {out.returncode}"
        raise IpCommandError(f"ip -force -batch -: {why}")
    return failed


class TunDevice:
    """One TUN interface, non-blocking; ``read`` / ``write`` move whole IP packets.

    ``vnet_hdr=True`` (``IFF_VNET_HDR``): every read and write carries a
    10-octet ``struct virtio_net_hdr`` in front of the packet, which lets a
    writer hand the kernel coalesced TCP segments (``gro.py``).  No offload
    is switched on for reads (no ``TUNSETOFFLOAD``): packets read are whole,
    with complete checksums, and their header is all zeros but for flags.
    """

    def __init__(self, name: str, *, vnet_hdr: bool = False) -> None:
        encoded = name.encode()
        if not 0 < len(encoded) < _IFNAMSIZ:
            raise TunError(f"tun {name!r}: a name has 1 to {_IFNAMSIZ - 1} octets")
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise TunError(f"tun {name}: cannot open /dev/net/tun: {exc.strerror}") from None
        try:
            flags = _IFF_TUN | _IFF_NO_PI | (_IFF_VNET_HDR if vnet_hdr else 0)
            ifr = struct.pack("16sH22x", encoded, flags)
            got = fcntl.ioctl(fd, _TUNSETIFF, ifr)
        except OSError as exc:
            os.close(fd)
            # EPERM without CAP_NET_ADMIN; EBUSY when another process holds it.
            raise TunError(f"tun {name}: TUNSETIFF failed: {exc.strerror}") from None
        self.fd = fd
        self.vnet_hdr = vnet_hdr
        self.name = got[:_IFNAMSIZ].split(b"\0", 1)[0].decode()

    def fileno(self) -> int:
        return self.fd

    def exists(self) -> bool:
        """Whether the interface is still there (in this network namespace)."""
        try:
            socket.if_nametoindex(self.name)
        except OSError:
            return False
        return True

    def read(self, size: int = 65535) -> bytes:
        """One packet; ``BlockingIOError`` when none is queued."""
        return os.read(self.fd, size)

    def write(self, packet: bytes) -> int:
        return os.write(self.fd, packet)

    def drain(self, handle: Callable[[bytes], object], budget: int, counts: dict[str, int]) -> None:
        """Hand each queued packet to ``handle``, at most ``budget`` of them.

        With vnet headers the header is stripped; a GSO frame (which a device
        without offloads never yields) is counted as ``not_read``.  A read
        error other than "nothing queued" is counted as ``io_errors``;
        :class:`TunGoneError` once the interface is gone (the caller must
        stop reading: the descriptor stays readable for ever).
        """
        fd, read, vnet = self.fd, os.read, self.vnet_hdr
        for _ in range(budget):
            try:
                packet = read(fd, _READ_SIZE)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in _GONE_ERRNOS:
                    raise TunGoneError.of(exc) from None
                counts["io_errors"] = counts.get("io_errors", 0) + 1
                return
            if vnet:
                if packet[1]:  # gso_type: never without TUNSETOFFLOAD
                    counts["not_read"] = counts.get("not_read", 0) + 1
                    continue
                packet = packet[VNET_HDR_LEN:]
            handle(packet)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> TunDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TunDevice({self.name!r}, fd={self.fd})"

    # ------------------------------------------------------------ configuration (iproute2)

    def up(self, mtu: int) -> None:
        """MTU, no IPv6 autoconfiguration, link up (see the module docstring)."""
        ip("link", "set", "dev", self.name, "addrgenmode", "none")
        ip("link", "set", "dev", self.name, "mtu", str(mtu), "up")

    def add_address(self, address: str) -> None:
        """Add ``address`` (``addr/len``; a bare address is a host address)."""
        family = "-6" if ":" in address else "-4"
        ip(family, *self.address_args(address))

    def address_args(self, address: str) -> list[str]:
        """The ``ip`` arguments that add ``address`` (for :func:`ip_batch`)."""
        if "/" not in address:
            address += "/128" if ":" in address else "/32"
        # nodad: the address is ours alone on a point-to-point device.
        extra = ["nodad"] if ":" in address else []
        return ["addr", "replace", address, "dev", self.name, *extra]

    def route_args(self, prefix: str, *, src: str | None = None) -> list[str]:
        """The ``ip`` arguments that route ``prefix`` into the device."""
        extra = ["src", src] if src is not None else []
        return ["route", "replace", prefix, "dev", self.name, *extra]

    def addresses(self) -> set[str]:
        """The addresses on the device now (``addr/len``, as ``ipaddress`` writes them)."""
        out = ip("-o", "addr", "show", "dev", self.name)
        found = set()
        for line in out.splitlines():
            words = line.split()
            if len(words) > 3 and words[2] in ("inet", "inet6"):
                found.add(words[3])
        return found

    def flush(self) -> None:
        """Remove every address and route of the device (it stays up)."""
        for family in ("-4", "-6"):
            ip(family, "route", "flush", "dev", self.name, check=False)
        ip("addr", "flush", "dev", self.name, check=False)

    def add_route(self, prefix: str, *, src: str | None = None) -> None:
        """Route ``prefix`` into the device (``src``: the source address to prefer)."""
        family = "-6" if ":" in prefix else "-4"
        ip(family, *self.route_args(prefix, src=src))

    def delete_route(self, prefix: str) -> None:
        family = "-6" if ":" in prefix else "-4"
        ip(family, "route", "del", prefix, "dev", self.name, check=False)

    def routes_to(self, address: str) -> bool:
        """Would the host send a packet for ``address`` into this device now?"""
        out = ip("-o", "route", "get", address, check=False)
        return f" dev {self.name} " in f" {' '.join(out.split())} "


class TunWriter:
    """Writes packets to a TUN device; with vnet headers, TCP runs are merged (``gro.py``).

    A run is held only until the end of the current event-loop callback:
    the first packet held schedules ``flush`` with ``schedule`` (the loop's
    ``call_soon``), so a burst the shell drains in one callback is written as
    few packets as it allows, and nothing waits beyond that burst.  A full
    device queue or a refused packet is counted in ``counts`` (``tun_full``,
    ``io_errors``) and dropped, as a router would.
    """

    def __init__(
        self,
        tun: TunDevice,
        schedule: Callable[[Callable[[], None]], object],
        counts: dict[str, int],
        on_gone: Callable[[TunGoneError], None] | None = None,
    ) -> None:
        self.fd = tun.fd
        self._on_gone = on_gone  # told once the interface is gone (a write found it)
        self._gro = TcpCoalescer() if tun.vnet_hdr else None
        self._schedule = schedule
        self._scheduled = False
        self.counts = counts
        counts.setdefault("tun_full", 0)
        counts.setdefault("io_errors", 0)
        counts.setdefault("tun_writes", 0)

    def write(self, packet: bytes) -> None:
        gro = self._gro
        if gro is None:
            self._write(packet)
            return
        for frame in gro.push(packet):
            self._write(frame)
        if gro.pending and not self._scheduled:
            self._scheduled = True
            self._schedule(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        if self._gro is not None:
            for frame in self._gro.flush():
                self._write(frame)

    def close(self) -> None:
        """Write nothing more, ever: the device's descriptor is closed (or
        about to be), and its number may soon be another file's.  What is
        held is dropped; a flush already scheduled finds nothing to do."""
        self.fd = -1
        if self._gro is not None:
            self._gro.flush()  # discarded

    def _write(self, frame: bytes) -> None:
        if self.fd < 0:
            return  # closed: the device is gone
        try:
            os.write(self.fd, frame)
        except BlockingIOError:
            self.counts["tun_full"] += 1
        except OSError as exc:
            if exc.errno in _GONE_ERRNOS and self._on_gone is not None:
                on_gone = self._on_gone
                self.close()  # before the callback closes the descriptor
                on_gone(TunGoneError.of(exc))
                return
            # e.g. EINVAL for a packet the kernel refuses; keep serving.
            self.counts["io_errors"] += 1
        else:
            self.counts["tun_writes"] += 1
