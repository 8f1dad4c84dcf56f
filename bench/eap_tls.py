"""EAP-TLS cost in memory: CPU per full conversation, peer and server together.

Run:  python bench/eap_tls.py            (about 15 s)
      python bench/eap_tls.py --quick    (CI smoke run, ~2 s; noisier)

Each figure drives one ``EapTlsServer`` (HAC) and one ``EapTlsPeer`` (MN),
built by the ``tls`` plugin's factories from files, through a whole
conversation (Start .. final empty response) with real EAP packets encoded
and decoded by ``core/wire/eap.py`` -- both machines in this process, so the
time is peer + server CPU (``time.process_time``), no network.

Baseline in the same run: the bare mutual-auth handshake over pyOpenSSL
memory BIOs, same contexts and certificates (ECDSA P-256), no EAP framing,
no fragmentation and no MSK export: ``ratio = EAP-TLS / bare``.  Fragment
sizes: 1400 (the PROFILE default; with the default classical groups every
flight fits one packet, 3 rounds) and 300.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from OpenSSL import SSL

from mipsec.core.eap.eaptls import EapTlsPeer, EapTlsServer
from mipsec.core.eap.method import EapPeerContext, EapServerContext
from mipsec.core.hookspecs import PluginContext
from mipsec.core.pki import make_ca, make_leaf, write_cert, write_key
from mipsec.core.wire.eap import EapCode, EapPacket, EapType, decode_eap, encode_eap
from mipsec.plugins.eap_tls import EapTlsMethod

MN_ID = "mn1@example.net"
SERVER_NAME = "eap.example.net"


def make_files(d: Path) -> None:
    ca_key, ca = make_ca("bench CA")
    sk, sc = make_leaf(ca_key, ca, common_name="eap", dns_names=[SERVER_NAME])
    ck, cc = make_leaf(
        ca_key, ca, common_name="mn", email_addresses=[MN_ID], client=True, server=False
    )
    write_cert(d / "ca.pem", ca)
    write_cert(d / "eap.pem", sc)
    write_key(d / "eap.key", sk)
    write_cert(d / "mn.pem", cc)
    write_key(d / "mn.key", ck)


def conversation(server: EapTlsServer, peer: EapTlsPeer) -> int:
    identifier, td, rounds = 1, server.initiate(), 0
    while True:
        rounds += 1
        req = decode_eap(encode_eap(EapPacket(EapCode.REQUEST, identifier, EapType.TLS, td)))
        out = peer.process(req)
        assert out.data is not None, out.reason
        rsp = decode_eap(encode_eap(EapPacket(EapCode.RESPONSE, identifier, EapType.TLS, out.data)))
        so = server.process(rsp)
        if so.done:
            assert so.success and server.msk() == peer.msk(), so.reason
            return rounds
        assert so.data is not None
        td = so.data
        identifier = (identifier + 1) & 0xFF


def _openssl_verdict(conn: SSL.Connection, cert: object, errnum: int, depth: int, ok: int) -> bool:
    return bool(ok)


def bare_handshake(sctx: SSL.Context, cctx: SSL.Context) -> None:
    # The contexts' verify callback asks the EAP machine attached to the
    # connection; here OpenSSL's own chain verdict stands alone.
    s = SSL.Connection(sctx, None)
    s.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, _openssl_verdict)
    s.set_accept_state()
    c = SSL.Connection(cctx, None)
    c.set_verify(SSL.VERIFY_PEER, _openssl_verdict)
    c.set_connect_state()
    done_c = done_s = False
    while not (done_c and done_s):
        for a, b, is_client in ((c, s, True), (s, c, False)):
            try:
                a.do_handshake()
                if is_client:
                    done_c = True
                else:
                    done_s = True
            except SSL.WantReadError:
                pass
            try:
                data = a.bio_read(1 << 20)
            except SSL.WantReadError:
                data = b""
            if data:
                b.bio_write(data)
    if c.get_protocol_version_name() == "TLSv1.3":
        # Let the client read the server's tickets, as the EAP peer does.
        s.send(b"\x00")
        c.bio_write(s.bio_read(1 << 20))
        c.recv(16)


def timed_pair(fn_a, fn_b, n: int) -> tuple[float, float]:
    """Median CPU µs per call of each, over 5 slices of n/5 calls, interleaved
    (a, b, a, b ...) so that load from other processes hits both alike."""
    per_a, per_b = [], []
    k = max(1, n // 5)
    for _ in range(5):
        for fn, per in ((fn_a, per_a), (fn_b, per_b)):
            t0 = time.process_time()
            for _ in range(k):
                fn()
            per.append((time.process_time() - t0) / k * 1e6)
    return statistics.median(per_a), statistics.median(per_b)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="few conversations (CI)")
    p.add_argument("-n", type=int, default=200, help="conversations per figure")
    args = p.parse_args()
    n = 20 if args.quick else args.n
    method = EapTlsMethod()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        make_files(d)
        base = {"cert": "eap.pem", "key": "eap.key", "ca": "ca.pem"}
        peer_base = {"cert": "mn.pem", "key": "mn.key", "ca": "ca.pem"}
        print(f"EAP-TLS in memory, peer + server CPU per conversation ({n} per figure)")
        print(f"{'TLS':>4} {'frag':>5} {'rounds':>6} {'µs CPU':>9} {'bare µs':>9} {'ratio':>6}")
        for version in ("1.2", "1.3"):
            pin = {"tls_min": version, "tls_max": version}
            for frag in (1400, 300):
                sf = method.server({**base, **pin, "fragment_size": frag}, PluginContext("hac", d))
                pf = method.peer(
                    {**peer_base, "server_name": SERVER_NAME, "fragment_size": frag},
                    PluginContext("mn", d),
                )

                def one(sf=sf, pf=pf) -> int:
                    return conversation(
                        sf.new(EapServerContext(MN_ID, MN_ID)), pf.new(EapPeerContext(MN_ID))
                    )

                def bare(sf=sf, pf=pf) -> None:
                    bare_handshake(sf.config.context, pf.config.context)

                rounds = one()
                us, bare_us = timed_pair(one, bare, n)
                print(
                    f"{version:>4} {frag:>5} {rounds:>6} {us:>9.0f} {bare_us:>9.0f} "
                    f"{us / bare_us:>6.2f}"
                )


if __name__ == "__main__":
    main()
