"""The HA's data plane: MN user data to and from the home network on a TUN device.

RFC 6618 §6.4 reverse tunnelling, as a thin asyncio shell around
``forwarding.HaForwarder``:

* ``HaService.handle`` turns each authenticated user-data datagram into a
  ``DataIn`` and hands it to ``on_data`` (this object, on the event loop's
  thread); the forwarder's ingress filter decides, and the packet is
  written to the TUN device, from where the host's routing takes it into the
  home network;
* the TUN device's packets -- home-network traffic routed to the HoAs
  (``[dataplane] routes``) -- are read when the event loop says the device is
  readable, up to ``TUN_BUDGET`` per wake-up, encapsulated under the SA of the
  destination's binding and sent from the HA's own UDP socket of the right
  family to the binding's care-of address and port (PROFILE §7); a run of
  them for one care-of address goes in one system call (UDP GSO,
  ``udpgso.py``).

Why on the event loop's thread and not a thread of its own: the SA's
outbound state (sequence counter, its persisted reservation, the running
CBC context) is shared with the Binding Acknowledgements that ``HaCore``
sends, and its inbound replay window with the BUs; one thread owning all of
it needs no lock on the per-packet path.  Under load the loop's overhead is
spread thin: measured through bench/tunnel.py, the HA's socket drain read
about 60 datagrams per wake-up and the MN's TUN drain about 120 packets
(docs-dataplane.md, "Fast path").  Writes into the TUN device go through
``TunWriter``, which merges runs of TCP segments (``gro.py``).

A full TUN queue or UDP send buffer drops the packet (``tun_full``,
``send_full``), as a router would; TCP recovers.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from ipaddress import ip_interface
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mipsec.core.config import HADataPlane
from mipsec.core.errors import ConfigError
from mipsec.core.forwarding import HaForwarder, stats_line
from mipsec.core.ha_core import DataIn
from mipsec.core.model import SPI_MAX
from mipsec.core.roles.tunrevive import LinkKeeper, TunReviver, listed
from mipsec.core.tun import (
    IpCommandError,
    TunDevice,
    TunError,
    TunGoneError,
    TunWriter,
    ip_batch,
)
from mipsec.core.udpgso import GsoSender

if TYPE_CHECKING:
    from mipsec.core.roles.ha import HaService

log = logging.getLogger("mipsec.ha.data")

TUN_BUDGET = 256  # packets read from the TUN device per wake-up
_FORWARDING = (
    ("IPv4", "/proc/sys/net/ipv4/ip_forward"),
    ("IPv6", "/proc/sys/net/ipv6/conf/all/forwarding"),
)


def pick_socket(
    sockets: list[socket.socket], family: int, preferred: str | None
) -> socket.socket | None:
    """The UDP socket to send from: the one bound to the HA's provisioned address
    (MNs connect to it, and a connected MN socket only accepts that source),
    else one bound to the wildcard address, else any of the family."""
    mine = [s for s in sockets if s.family == family]
    for wanted in (preferred, "::" if family == socket.AF_INET6 else "0.0.0.0"):  # noqa: S104
        for s in mine:
            if wanted is not None and s.getsockname()[0] == wanted:
                return s
    return mine[0] if mine else None


class HaDataPlane:
    """Attach to a started ``HaService`` with ``start()``; ``stop()`` removes the device."""

    def __init__(self, service: HaService, cfg: HADataPlane) -> None:
        self.service = service
        self.cfg = cfg
        self.forwarder = HaForwarder(service.core, mtu=cfg.mtu)
        self.tun: TunDevice | None = None
        self.writer: TunWriter | None = None
        self.counts: dict[str, int] = {
            "send_full": 0,
            "io_errors": 0,
            "not_read": 0,
            "reserve_unwritten": 0,  # datagrams dropped: their numbers' reservation not written
        }
        self._sock4: GsoSender | None = None
        self._sock6: GsoSender | None = None
        self._out: list[tuple[bytes, tuple[str, int]]] = []  # of the current TUN drain
        self.counts["tun_gone_drops"] = 0  # MN packets dropped while it was gone
        # The interface removed under the HA: created again, with its
        # addresses and routes (roles/tunrevive.py; counts tun_lost).
        self.reviver = TunReviver(
            cfg.tun, self._open_device, self._use, self.counts, log, "MN traffic"
        )
        # Taken down and up again (an operator, a network manager): the
        # kernel deleted its routes and addresses; put back once it is up
        # (roles/tunrevive.py; counts link_down, link_restored).
        self.counts["tun_down_drops"] = 0  # MN packets dropped while it was down
        self.link = LinkKeeper(self._restore, self._lost, self.counts, log, "MN traffic")

    def _open_device(self) -> TunDevice:
        """The TUN device up, with its addresses and routes; ``ConfigError``
        naming the key that failed."""
        cfg, file = self.cfg, self.service.config_file
        try:
            tun = TunDevice(cfg.tun, vnet_hdr=cfg.gro)
        except TunError as exc:
            raise ConfigError(file, "dataplane.tun", str(exc)) from None
        try:
            tun.up(cfg.mtu)
        except IpCommandError as exc:
            tun.close()
            raise ConfigError(file, "dataplane.tun", str(exc)) from None
        try:
            self._configure(tun)
        except ConfigError:
            tun.close()
            raise
        return tun

    def _configure(self, tun: TunDevice, *, missing_only: bool = False) -> str:
        """``addresses`` and ``routes`` on ``tun`` (again: ``ip ... replace``);
        says what.  ``missing_only``: an address already on it is left as it
        is (a restore).  Every one is tried, in one ``ip -batch``, whatever
        fails before it; then ``ConfigError`` naming the key of the first
        that failed (a restore found one failed route of many stopping the
        others: found in review)."""
        cfg, file = self.cfg, self.service.config_file
        have = {ip_interface(a) for a in tun.addresses()} if missing_only else set()
        commands: list[list[str]] = []
        keys: list[str] = []
        for address in cfg.addresses:
            if ip_interface(str(address)) not in have:
                commands.append(tun.address_args(str(address)))
                keys.append("dataplane.addresses")
        for route in cfg.routes:
            commands.append(tun.route_args(str(route)))
            keys.append("dataplane.routes")
        try:
            failed = ip_batch(commands)
        except IpCommandError as exc:
            raise ConfigError(file, keys[0], str(exc)) from None
        if failed:
            index, first = failed[0]
            more = f" (and {len(failed) - 1} more of {len(commands)})" if len(failed) > 1 else ""
            raise ConfigError(file, keys[index], f"{first}{more}")
        return f"addresses {listed(cfg.addresses)}, routes {listed(cfg.routes)}"

    def _restore(self, tun: TunDevice) -> str:
        """What ``_configure`` put on ``tun``, back after a down and up."""
        return self._configure(tun, missing_only=True)

    def _use(self, tun: TunDevice) -> None:
        self.tun = tun
        loop = asyncio.get_running_loop()
        self.writer = TunWriter(tun, loop.call_soon, self.counts, on_gone=self._lost)
        loop.add_reader(tun.fd, self._tun_readable)
        self.link.watch(tun)  # a device created anew: its new index

    def start(self) -> None:
        cfg = self.cfg
        tun = self._open_device()
        ha = self.service.cfg.ha
        socks = self.service.sockets
        six = str(ha.address6) if ha.address6 is not None else None
        four = str(ha.address4) if ha.address4 is not None else None
        sock6 = pick_socket(socks, socket.AF_INET6, six)
        sock4 = pick_socket(socks, socket.AF_INET, four)
        self._sock6 = GsoSender(sock6) if sock6 is not None else None
        self._sock4 = GsoSender(sock4) if sock4 is not None else None
        self.service.on_data = self.on_data
        self._use(tun)
        for family, path in _FORWARDING:
            try:
                off = Path(path).read_text().strip() == "0"
            except OSError:
                continue
            if off:
                log.warning(
                    "%s forwarding is off (%s = 0): MN traffic reaches this host only", family, path
                )
        log.info(
            "data plane on %s: mtu %d, gro %s, routes %s",
            tun.name,
            cfg.mtu,
            "on" if cfg.gro else "off",
            ", ".join(str(r) for r in cfg.routes) or "none",
        )

    def stop(self) -> None:
        if self.service.on_data == self.on_data:
            self.service.on_data = None
        # Taken first: a last flush that finds the device gone calls _lost,
        # which then sees nothing to lose.  Before, it set self.writer to
        # None under the flush (an AttributeError cut HaService.stop short:
        # bindings not closed, sockets left open) and armed the reviver, which
        # created the device again after the stop (found in review).
        tun, writer = self.tun, self.writer
        self.tun = self.writer = None
        self.reviver.cancel()
        self.link.close()
        if tun is not None:
            asyncio.get_running_loop().remove_reader(tun.fd)
            if writer is not None:
                writer.flush()
                writer.close()
            tun.close()  # the interface, its addresses and routes go with it
        elif not self.counts["tun_lost"]:
            return  # never started
        log.info("data plane on %s stopped: %s", self.cfg.tun, stats_line(self.stats()))

    def _lost(self, exc: TunGoneError) -> None:
        """The interface was removed under the HA: stop reading its
        descriptor and drop the MNs' packets (``tun_gone_drops``) until the
        reviver has created it again.  The control plane (BUs, BAs) goes on."""
        tun = self.tun
        if tun is None:
            return
        asyncio.get_running_loop().remove_reader(tun.fd)
        self.link.close()
        writer, self.tun, self.writer = self.writer, None, None
        self._out.clear()
        self.reviver.lost(tun, writer, exc)

    # ------------------------------------------------------------ MN -> home network

    def on_data(self, data: DataIn) -> None:
        packet = self.forwarder.inbound(data, time.time())
        if packet is not None:
            if self.writer is None:  # the device is gone, being created again
                self.counts["tun_gone_drops"] += 1
            elif self.link.down:  # the kernel would refuse it (EIO)
                self.counts["tun_down_drops"] += 1
            else:
                self.writer.write(packet)

    # ------------------------------------------------------------ home network -> MN

    def _tun_readable(self) -> None:
        if self.tun is None:
            return
        out = self._out
        core = self.service.core
        blocks = core.out_blocks
        try:
            self.tun.drain(self._to_mn, TUN_BUDGET, self.counts)
        except TunGoneError as exc:
            self._lost(exc)
            return
        # A block of HA->MN sequence numbers reserved (ha_core._reserve_out,
        # write-behind) is on disk before any datagram of its SA leaves, as a
        # BA waits for its commit: sent first, a kill before the next commit
        # made the restarted HA use those numbers again, and the MN drop its
        # BAs and data as replays (found in review).  Not only this drain's
        # reservations: one whose write failed before (this data plane's
        # flush, a BA burst's, a drain cut by a lost TUN) still stands in
        # memory, and the next drain sent numbers above the mark on disk
        # without a commit (found in a later review).
        bindings = self.service.bindings
        reserved = core.out_blocks != blocks or bindings.marks_unwritten
        if out and reserved and not self.service.flush_bindings():
            # Not written: the datagrams of those SAs are not sent (their
            # numbers already run past the mark on disk).  The other SAs'
            # leave: no other record waiting, e.g. behind another
            # process's lock, is a reason to hold their downlink.
            held = bindings.unwritten_marks
            # PType|SPI: the SPI is the low 28 bits (PROFILE §7; 0 in a
            # plaintext datagram, which carries no sequence number).
            keep = [o for o in out if (int.from_bytes(o[0][:4], "big") & SPI_MAX) not in held]
            self.counts["reserve_unwritten"] += len(out) - len(keep)
            out[:] = keep
        # Consecutive datagrams for one care-of address leave together: one
        # UDP GSO send per run of equal size (udpgso.py).
        start = 0
        for i in range(1, len(out) + 1):
            if i == len(out) or out[i][1] != out[start][1]:
                self._send([d for d, _ in out[start:i]], out[start][1])
                start = i
        out.clear()

    def _to_mn(self, packet: bytes) -> None:
        out = self.forwarder.outbound(packet, time.time())
        if out is not None:
            self._out.append(out)

    def _send(self, datagrams: list[bytes], dst: tuple[str, int]) -> None:
        sender = self._sock6 if ":" in dst[0] else self._sock4
        if sender is None:
            self.forwarder.drops["no_socket"] += len(datagrams)
            return
        try:
            sender.send(datagrams, dst)
        except BlockingIOError:
            self.counts["send_full"] += 1
        except OSError:
            self.counts["io_errors"] += 1

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = self.forwarder.stats()
        out.update(self.counts)
        return out
