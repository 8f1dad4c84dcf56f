"""HA data-path benchmark: µs per protect / unprotect per suite, then BU/BA per second.

Run:  python bench/ha.py            (about 30-60 s)
      python bench/ha.py --quick    (CI smoke run, < 10 s; numbers are noisier)

Part 1, packet crypto:

For every suite of SUITES and payload sizes 64, 512 and 1400 octets it times
``OutboundSA.protect`` and ``InboundSA.unprotect`` (replay check + ICV verify +
decrypt + padding check + window update) and, in the same run, two baselines
built from the bare ``cryptography`` primitives doing the same cryptographic
work on the same number of octets, without any ESP framing:

* fresh:  what a straightforward implementation costs per packet:
          protect   = os.urandom IV + a NEW Cipher(alg, CBC(iv)) encryptor + one
                      update() over the padded plaintext + one MAC over
                      header || IV || ciphertext;
          unprotect = one MAC + compare_digest + a NEW CBC decryptor + update().
* floor:  the same, but with ONE CBC context created before the loop and reused
          (no IV generation): the cost of the primitives alone.

MAC in both baselines: HMAC-SHA1 from ``cryptography``, pre-keyed and copy()-ed
per packet; for AES-XCBC-MAC-96 suites ``cryptography`` has no XCBC, so the
stand-in is its AES-CMAC (pre-keyed, copy()-ed), the same number of AES block
operations.  NULL suites have no cipher: their baselines are the MAC alone.

ratio = mipsec / baseline.  Target (brief): ratio vs "fresh" <= 1.5 at 1400 B.

Part 2, BU -> BA transactions per second, many MNs, target >= 10,000 on one core:

* in-memory: one ``HaCore`` with N installed SAs (default 1000, one HoA
  each) per suite.  The MNs' protected BUs (round-robin over the MNs, a
  registration round then refresh rounds, each MN with its own care-of port)
  are made BEFORE the clock starts; the timed loop is ``HaCore.receive`` alone:
  replay check, ICV, decrypt, MH decode, binding update, BA encode + protect.
  Every BA is then checked outside the clock the way an MN checks it (ICV,
  replay window, padding, MH checksum, status 0, its BU's sequence).  "esp" is
  the part of that which is ESP alone (one unprotect + one protect of BU-sized
  packets), for scale.
* UDP on 127.0.0.1: ``HaService`` (the real asyncio shell, memory SA store,
  SAs installed through ``HaService.install_sa``) runs in a child process of
  this script, pinned to its own CPU where there are two; this process is the
  client, pinned to the other.  It blasts pre-made BUs from N MNs with a window
  of outstanding BUs, then counts valid BAs (checked as above, after the
  clock).  The child reports its own ``getrusage`` CPU time around each run,
  so "HA CPU µs/tx" and "per core = 1e6 / that" are the HA's cost whatever
  the client costs.  Baseline in the same run: a bare UDP echo server in a
  child process built the same way (asyncio + the HA's own ``_Protocol``
  socket-draining class), echoing the same BUs; ratio = HA / echo.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import os
import pickle
import resource
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from ipaddress import IPv6Address
from typing import IO, Any

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives import cmac, hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.ciphers import Cipher, CipherAlgorithm, algorithms, modes

from mipsec.core.ha_core import HaCore, Reply
from mipsec.core.issuer import new_sa
from mipsec.core.model import BootstrapData, IssuedSA
from mipsec.core.suites import SUITES, Suite, SuiteInfo
from mipsec.core.wire.esp import NEXT_HEADER_MH, PTYPE_MH, InboundSA, OutboundSA, peek_header
from mipsec.core.wire.mh import ACCEPTED, BindingAck, BindingUpdate, decode_mh, encode_mh

SIZES = (64, 512, 1400)
SPI = 0x0ABCDEF


@dataclass
class Row:
    suite: str
    size: int
    protect: float
    protect_fresh: float
    protect_floor: float
    unprotect: float
    unprotect_fresh: float
    unprotect_floor: float


def _best_us(fn: Callable[[], object], n: int, repeat: int) -> float:
    """Best of ``repeat`` loops of ``n`` calls, in µs per call."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, time.perf_counter() - t0)
    return best / n * 1e6


def _best_us_each(fn: Callable[[bytes], object], items: list[bytes], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for item in items:
            fn(item)
        best = min(best, time.perf_counter() - t0)
    return best / len(items) * 1e6


def _algorithm(info: SuiteInfo, ekey: bytes) -> CipherAlgorithm | None:
    if info.encryption == "aes-128-cbc":
        return algorithms.AES(ekey)
    if info.encryption == "3des-cbc":
        return TripleDES(ekey)
    return None


def _bare_mac(info: SuiteInfo, ikey: bytes) -> Callable[[bytes], bytes]:
    if info.integrity == "hmac-sha1-96":
        keyed_h = crypto_hmac.HMAC(ikey, hashes.SHA1())

        def mac_h(data: bytes) -> bytes:
            h = keyed_h.copy()
            h.update(data)
            return h.finalize()[:12]

        return mac_h
    keyed_c = cmac.CMAC(algorithms.AES(ikey))

    def mac_c(data: bytes) -> bytes:
        c = keyed_c.copy()
        c.update(data)
        return c.finalize()[:12]

    return mac_c


def bench_suite(suite: Suite, size: int, n: int, repeat: int) -> Row:
    info = SUITES[suite]
    ikey, ekey = os.urandom(info.ikey_len), os.urandom(info.ekey_len)
    payload = os.urandom(size)

    out = OutboundSA(info, ikey, ekey, SPI)
    protect = out.protect
    t_protect = _best_us(lambda: protect(1, 41, payload), n, repeat)

    # Unprotect needs a fresh sequence number per packet: pre-build them and
    # give every repeat a new InboundSA (new window), same keys.
    sender = OutboundSA(info, ikey, ekey, SPI)
    packets = [sender.protect(1, 41, payload) for _ in range(n)]
    best_un = float("inf")
    for _ in range(repeat):
        unprotect = InboundSA(info, ikey, ekey, SPI).unprotect
        best_un = min(best_un, _best_us_each(unprotect, packets, 1))
    t_unprotect = best_un

    # ---- baselines on the same octet counts
    bs = info.block_size
    padded_len = -(-(size + 2) // bs) * bs
    plain = os.urandom(padded_len)
    iv_len = bs if info.encrypts else 0
    authed = os.urandom(8 + iv_len + padded_len)  # what the ICV covers
    mac = _bare_mac(info, ikey)
    alg = _algorithm(info, ekey)
    compare = hmac.compare_digest
    urandom = os.urandom

    if alg is None:

        def p_fresh() -> object:
            return mac(authed)

        def u_fresh() -> object:
            return compare(mac(authed), authed[:12])

        p_floor, u_floor = p_fresh, u_fresh
    else:
        algorithm = alg
        enc = Cipher(algorithm, modes.CBC(urandom(bs))).encryptor()
        dec = Cipher(algorithm, modes.CBC(urandom(bs))).decryptor()
        ct = authed[8 + bs :]

        def p_fresh() -> object:
            e = Cipher(algorithm, modes.CBC(urandom(bs))).encryptor()
            e.update(plain)
            return mac(authed)

        def p_floor() -> object:
            enc.update(plain)
            return mac(authed)

        def u_fresh() -> object:
            ok = compare(mac(authed), authed[:12])
            d = Cipher(algorithm, modes.CBC(authed[8 : 8 + bs])).decryptor()
            return ok, d.update(ct)

        def u_floor() -> object:
            ok = compare(mac(authed), authed[:12])
            return ok, dec.update(ct)

    return Row(
        suite=suite.name,
        size=size,
        protect=t_protect,
        protect_fresh=_best_us(p_fresh, n, repeat),
        protect_floor=_best_us(p_floor, n, repeat),
        unprotect=t_unprotect,
        unprotect_fresh=_best_us(u_fresh, n, repeat),
        unprotect_floor=_best_us(u_floor, n, repeat),
    )


def _iterations(suite: Suite, quick: bool) -> tuple[int, int]:
    """(calls per loop, loops): 3DES is ~10x slower, so it gets fewer calls."""
    slow = SUITES[suite].encryption == "3des-cbc"
    if quick:
        return (100 if slow else 1000), 2
    return (1000 if slow else 10000), 3


def run(quick: bool) -> list[Row]:
    rows = []
    for suite in SUITES:
        for size in SIZES:
            n, repeat = _iterations(suite, quick)
            rows.append(bench_suite(suite, size, n, repeat))
    return rows


def render(rows: list[Row]) -> str:
    head = (
        f"{'suite':<19}{'bytes':>6} | {'protect':>8}{'fresh':>8}{'ratio':>7}"
        f"{'floor':>8}{'ratio':>7} | {'unprot':>8}{'fresh':>8}{'ratio':>7}"
        f"{'floor':>8}{'ratio':>7}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.suite:<19}{r.size:>6} | {r.protect:8.2f}{r.protect_fresh:8.2f}"
            f"{r.protect / r.protect_fresh:7.2f}{r.protect_floor:8.2f}"
            f"{r.protect / r.protect_floor:7.2f} | {r.unprotect:8.2f}"
            f"{r.unprotect_fresh:8.2f}{r.unprotect / r.unprotect_fresh:7.2f}"
            f"{r.unprotect_floor:8.2f}{r.unprotect / r.unprotect_floor:7.2f}"
        )
    return "\n".join(lines)


BASELINE_TEXT = """\
times in µs per packet (best of several loops, time.perf_counter)
protect/unprot: mipsec OutboundSA.protect / InboundSA.unprotect (full ESP framing)
fresh: bare primitives, NEW CBC context per packet (+ os.urandom IV) + pre-keyed MAC copy
floor: bare primitives, ONE reused CBC context + pre-keyed MAC copy (no framing, no IV)
MAC: HMAC-SHA1 (cryptography); XCBC suites use AES-CMAC as stand-in (no XCBC in cryptography)
NULL suites: fresh = floor = the MAC alone
ratio = mipsec / baseline; target: ratio vs fresh <= 1.5 at 1400 bytes"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="short CI run (< 5 s)")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    rows = run(args.quick)
    print(BASELINE_TEXT)
    print()
    print(render(rows))
    worst = max(r.protect / r.protect_fresh for r in rows if r.size == 1400)
    worst_un = max(r.unprotect / r.unprotect_fresh for r in rows if r.size == 1400)
    print()
    print(
        f"worst ratio vs fresh at 1400 B: protect {worst:.2f}, unprotect {worst_un:.2f}"
        f"   (elapsed {time.perf_counter() - t0:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
