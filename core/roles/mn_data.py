"""The MN's data plane: its home addresses on a TUN device, their traffic via the HA.

RFC 6618 §6.4 reverse tunnelling, as a thin asyncio shell around
``forwarding.MnForwarder``.  The device is opened once per MN process
(``open``: a device that cannot be made fails the start, naming the key) and
lives across re-bootstraps; each registered SA is ``attach``-ed to it:

* its home addresses go on the device -- the IPv6 HoA, and the IPv4 HoA once a
  BA acknowledged it (DSMIP6, RFC 5555 §3.2.1) -- and ``[dataplane] routes``
  point into it with that home address as the preferred source, so the
  host's own traffic to those destinations leaves from the HoA;
* packets the device gives are read while the event loop says it is readable
  (up to ``TUN_BUDGET`` per wake-up), sealed under the SA and sent on the
  registrar's socket (connected to the HA), runs of equal-size datagrams in
  one system call (UDP GSO, ``udpgso.py``);
* user-data datagrams the registrar reads are opened, checked and written
  to the device.

A route that would take the HA's own address into the device is removed
again (with a warning): the tunnel's outer packets would be routed into the
tunnel itself.  A default route is fine wherever a more specific route
(the care-of link's, say) still leads to the HA.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_interface, ip_network
from typing import Any

from mipsec.core.config import MNDataPlane
from mipsec.core.errors import ConfigError
from mipsec.core.forwarding import MnForwarder, stats_line
from mipsec.core.roles.mn import Registrar
from mipsec.core.roles.tunrevive import LinkKeeper, TunReviver, listed
from mipsec.core.tun import (
    IpCommandError,
    TunDevice,
    TunError,
    TunGoneError,
    TunWriter,
    ip_batch,
)

log = logging.getLogger("mipsec.mn.data")

TUN_BUDGET = 256  # packets read from the TUN device per wake-up


class MnDataPlane:
    """The MN's TUN device; ``attach`` a registered ``Registrar`` to carry its traffic."""

    def __init__(self, cfg: MNDataPlane, config_file: str = "<memory>") -> None:
        self.cfg = cfg
        self.config_file = config_file
        self.tun: TunDevice | None = None
        self.writer: TunWriter | None = None
        self.forwarder: MnForwarder | None = None
        self.registrar: Registrar | None = None
        self.counts: dict[str, int] = {"io_errors": 0, "not_read": 0}
        self._out: list[bytes] = []  # datagrams of the current TUN drain
        self._totals: dict[str, int] = {}  # forwarder counters of detached SAs
        self._drops: dict[str, int] = {}
        self.counts["tun_gone_drops"] = 0  # packets from the HA dropped meanwhile
        self._ip4_hoa: str | None = None  # of the attached SA
        self._routes: list[str] = []  # added for it (put back after a down and up)
        # The interface removed under the MN: created again, the attached
        # SA's addresses and routes with it (roles/tunrevive.py; tun_lost).
        self.reviver = TunReviver(
            cfg.tun, self._open_device, self._back, self.counts, log,
            "traffic of the home addresses",
        )  # fmt: skip
        # Taken down and up again: the kernel deleted the home addresses and
        # routes; the attached SA's put back once it is up (tunrevive.py).
        self.counts["tun_down_drops"] = 0  # packets from the HA dropped while it was down
        self.link = LinkKeeper(
            self._restore, self._lost, self.counts, log, "traffic of the home addresses"
        )

    def open(self) -> None:
        self.tun = self._open_device()
        self.link.watch(self.tun)

    def _open_device(self) -> TunDevice:
        try:
            tun = TunDevice(self.cfg.tun, vnet_hdr=self.cfg.gro)
        except TunError as exc:
            raise ConfigError(self.config_file, "dataplane.tun", str(exc)) from None
        try:
            tun.up(self.cfg.mtu)
        except IpCommandError as exc:
            tun.close()
            raise ConfigError(self.config_file, "dataplane.tun", str(exc)) from None
        return tun

    def close(self) -> None:
        self.detach()
        self.reviver.cancel()
        self.link.close()
        if self.tun is not None:
            log.info("data plane on %s stopped: %s", self.tun.name, stats_line(self.stats()))
            self.tun.close()
            self.tun = None
        elif self.counts["tun_lost"]:
            log.info("data plane on %s stopped: %s", self.cfg.tun, stats_line(self.stats()))

    # ------------------------------------------------------------ the device removed

    def _lost(self, exc: TunGoneError) -> None:
        """The interface was removed under the MN: stop reading it and drop
        the HA's packets (``tun_gone_drops``) until the reviver has created
        it again."""
        tun = self.tun
        if tun is None:
            return
        self.link.close()
        writer, self.writer, self.tun = self.writer, None, None
        if writer is not None:  # attached: its reader is registered
            asyncio.get_running_loop().remove_reader(tun.fd)
        self._out.clear()
        self.reviver.lost(tun, writer, exc)

    def _back(self, tun: TunDevice) -> None:
        """The device created again: the attached SA goes back on it."""
        self.tun = tun
        self.link.watch(tun)  # its new index
        registrar = self.registrar
        if registrar is not None:
            self.detach()
            self.attach(registrar, self._ip4_hoa)

    # ------------------------------------------------------------ attach / detach

    def attach(self, registrar: Registrar, ip4_hoa: str | None) -> list[str]:
        """Carry the traffic of ``registrar``'s SA; returns the home addresses in use.

        ``ip4_hoa``: the IPv4 home address the HA acknowledged (None: none).
        """
        self.detach()
        tun = self.tun
        if tun is not None and not tun.exists():
            # Removed while no SA was attached (nothing read it): found now.
            self._lost(TunGoneError(errno.ENODEV, os.strerror(errno.ENODEV)))
            tun = None
        if tun is None:
            # The device is gone and being created again: attached then.
            self.registrar, self._ip4_hoa = registrar, ip4_hoa
            registrar.on_data = self._from_ha
            return []
        hoas = self._hoas(registrar, ip4_hoa)
        try:
            self._routes = self._configure(tun, registrar, hoas)
        except IpCommandError as exc:
            # The binding stands; only user data cannot flow.  Say so once.
            log.error("data plane on %s not attached: %s", tun.name, exc)
            tun.flush()
            return []
        self.forwarder = MnForwarder(
            registrar.machine, frozenset(h.packed for h in hoas), mtu=self.cfg.mtu
        )
        self.registrar = registrar
        self._ip4_hoa = ip4_hoa
        registrar.on_data = self._from_ha
        loop = asyncio.get_running_loop()
        self.writer = TunWriter(tun, loop.call_soon, self.counts, on_gone=self._lost)
        loop.add_reader(tun.fd, self._tun_readable)
        names = [str(h) for h in hoas]
        log.info(
            "data plane on %s: home addresses %s, scope %d",
            tun.name,
            ", ".join(names),
            registrar.machine.scope,
        )
        return names

    @staticmethod
    def _hoas(registrar: Registrar, ip4_hoa: str | None) -> list[IPv6Address | IPv4Address]:
        bs = registrar.issued.bootstrap
        hoas: list[IPv6Address | IPv4Address] = []
        if bs.ip6_hoa is not None:
            hoas.append(bs.ip6_hoa)
        if ip4_hoa is not None:
            hoas.append(IPv4Address(ip4_hoa))
        return hoas

    def _configure(
        self,
        tun: TunDevice,
        registrar: Registrar,
        hoas: list[IPv6Address | IPv4Address],
        *,
        restore: bool = False,
    ) -> list[str]:
        """The home addresses and ``routes`` on ``tun`` (all else flushed);
        returns the routes added.  ``IpCommandError`` if an address failed;
        a route that fails or is skipped is a warning.  Every one is tried,
        in one ``ip -batch``.

        ``restore`` (the device up again, or link notifications lost): the
        routes added at the attach are put back, nothing is flushed and an
        address already on it is left as it is -- a device that kept its
        state is not touched (a flush after lost notifications took the
        home addresses off a device nobody had touched: found in review);
        ``IpCommandError`` if anything failed, after trying the rest."""
        if restore:
            have = {ip_interface(a) for a in tun.addresses()}
        else:
            tun.flush()
            have = set()
        commands = [tun.address_args(str(h)) for h in hoas if ip_interface(h) not in have]
        n_addresses = len(commands)
        nets = []
        for route in self._routes if restore else self.cfg.routes:
            net = ip_network(route)
            src = next((h for h in hoas if h.version == net.version), None)
            if src is None:
                if not restore:
                    log.warning("route %s skipped: no IPv%d home address", net, net.version)
                continue
            nets.append(net)
            commands.append(tun.route_args(str(net), src=str(src)))
        failed = dict(ip_batch(commands))
        if failed and (restore or min(failed) < n_addresses):
            first = failed[min(failed)]
            if len(failed) == 1:
                raise first
            raise IpCommandError(f"{first} (and {len(failed) - 1} more of {len(commands)})")
        kept = []
        for i, net in enumerate(nets, n_addresses):
            if i in failed:
                log.warning("route %s not added: %s", net, failed[i])
                continue
            kept.append(net)
        # A route that takes the HA's address into the tunnel goes again.
        # All are in place at once now (one batch): the most specific route
        # holding the HA's address is the one the kernel uses, so it is
        # checked first, then the next -- a default route stays as long as
        # the care-of link's own route still leads to the HA (checked one by
        # one as each was added, before the batch).
        ha_host = ip_address(registrar.ha[0]) if registrar.ha is not None else None
        removed = set()
        if ha_host is not None:
            holding = sorted((n for n in kept if ha_host in n), key=lambda n: -n.prefixlen)
            for net in holding:
                if not tun.routes_to(str(ha_host)):
                    break
                tun.delete_route(str(net))
                removed.add(net)
                log.warning("route %s removed: it would take the HA address %s", net, ha_host)
        return [str(net) for net in kept if net not in removed]

    def _restore(self, tun: TunDevice) -> str:
        """The device up again after a down: the attached SA's home addresses
        and routes back on it (``IpCommandError`` if any fails)."""
        registrar = self.registrar
        if registrar is None or self.forwarder is None:
            return "no SA attached, nothing"
        hoas = self._hoas(registrar, self._ip4_hoa)
        routes = self._configure(tun, registrar, hoas, restore=True)
        return f"home addresses {listed(hoas)}, routes {listed(routes)}"

    def detach(self) -> None:
        if self.registrar is None:
            return
        if self.forwarder is not None:
            self._fold(self._totals, self._drops, self.forwarder)  # this SA's counters
        registrar = self.registrar
        if registrar.on_data == self._from_ha:
            registrar.on_data = None
        self.registrar = None
        self.forwarder = None
        if self.writer is not None:
            self.writer.flush()
            self.writer = None
            if self.tun is not None:
                asyncio.get_running_loop().remove_reader(self.tun.fd)
        if self.tun is not None:
            self.tun.flush()

    # ------------------------------------------------------------ the two directions

    def _tun_readable(self) -> None:
        if self.tun is None or self.forwarder is None or self.registrar is None:
            return
        out = self._out
        try:
            self.tun.drain(self._to_ha, TUN_BUDGET, self.counts)
        except TunGoneError as exc:
            self._lost(exc)
            return
        if out:
            self.registrar.send_all(out)  # one UDP GSO send per run of them
            out.clear()

    def _to_ha(self, packet: bytes) -> None:
        fwd = self.forwarder
        if fwd is not None:
            datagram = fwd.uplink(packet)
            if datagram is not None:
                self._out.append(datagram)

    def _from_ha(self, datagram: bytes) -> None:
        fwd, writer = self.forwarder, self.writer
        if fwd is None or writer is None:
            if self.tun is None and self.registrar is not None:
                self.counts["tun_gone_drops"] += 1  # the device is being created again
            return
        if self.link.down:  # the kernel would refuse it (EIO)
            self.counts["tun_down_drops"] += 1
            return
        packet = fwd.downlink(datagram)
        if packet is not None:
            writer.write(packet)

    @staticmethod
    def _fold(totals: dict[str, int], drops: dict[str, int], fwd: MnForwarder) -> None:
        for k, v in fwd.stats().items():
            if isinstance(v, int):
                totals[k] = totals.get(k, 0) + v
        for reason, n in fwd.drops.items():
            drops[reason] = drops.get(reason, 0) + n

    def stats(self) -> dict[str, Any]:
        """Counters over the device's whole life (every SA attached so far)."""
        totals, drops = dict(self._totals), dict(self._drops)
        if self.forwarder is not None:
            self._fold(totals, drops, self.forwarder)
        return {**totals, **self.counts, "drops": drops}
