"""Black-box tests of ``mipsec --role hac`` (set up by ``mipsec init``) with an
independent MN (tests/integration/rawmn.py) that shares no code with mipsec."""

from __future__ import annotations

import contextlib
import os
import random
import socket
import ssl
import struct
import threading
import time
from typing import Any

import pytest
from conftest import Lab, edit_toml
from rawmn import RawMN, container, lines, psk_bootstrap, with_auth

SUITES = {
    "{00,02}": (20, 0),
    "{00,3B}": (16, 0),
    "{00,0A}": (20, 24),
    "{00,2F}": (20, 16),
    "{00,3C}": (16, 16),
}
MN_ID = "demo@mipsec.test"


def connect(lab: Lab, **kw: Any) -> RawMN:
    return RawMN("127.0.0.1", lab.hac_port, lab.info["ca"], "hac.mipsec.test", **kw)


@pytest.mark.parametrize("tls", ["1.2", "1.3"])
def test_every_suite_over_tls12_and_13(lab: Lab, start_hac: Any, tls: str) -> None:
    start_hac(lab)
    seen_spis = set()
    for suite, (ikey, ekey) in SUITES.items():
        mn = connect(lab, max_version=ssl.TLSVersion.TLSv1_2 if tls == "1.2" else None)
        assert mn.version == ("TLSv1.2" if tls == "1.2" else "TLSv1.3")
        r1, final = psk_bootstrap(mn, MN_ID, lab.psk, suites=suite)
        assert r1.identifier == 1 and final.identifier == 2
        assert r1.auth_ok(lab.psk, mn.cb), "step-2 auth must verify with the PSK"
        assert r1.headers["auth-method"] == "psk"
        h = final.headers
        assert h["status-code"] == "200", h
        assert final.auth_ok(lab.psk, mn.cb)
        assert list(h)[-1] == "auth"
        assert h["mip6-ciphersuite"] == suite
        assert h["mip6-sas"] == "1"
        spi = int(h["mip6-spi"])
        assert 1 <= spi <= 268435455 and spi not in seen_spis
        seen_spis.add(spi)
        assert len(bytes.fromhex(h["mip6-mn-to-ha-ikey"])) == ikey
        assert len(bytes.fromhex(h["mip6-ha-to-mn-ikey"])) == ikey
        if ekey:
            assert len(bytes.fromhex(h["mip6-mn-to-ha-ekey"])) == ekey
            assert len(bytes.fromhex(h["mip6-ha-to-mn-ekey"])) == ekey
            assert h["mip6-mn-to-ha-ekey"] != h["mip6-ha-to-mn-ekey"]
        else:
            assert "mip6-mn-to-ha-ekey" not in h and "mip6-ha-to-mn-ekey" not in h
        assert h["mip6-sa-validity-end"].endswith(" GMT")
        # Senders write IPv6 addresses in the full 8-group form (PROFILE §3).
        assert h["mip6-haa-ip6"] == "0:0:0:0:0:0:0:1"
        assert h["mip6-ip6-hoa"].startswith("2001:db8:1:0:0:0:0:")
        assert h["mip6-ip6-hnp"] == "2001:db8:1:0:0:0:0:0/64"
        assert h["mip6-port"] == str(lab.info["ha"]["port"])
        assert h["dns-ip6"] == "2001:db8:1:0:0:0:0:53" and h["dns-ip4"] == "192.0.2.53"
        assert h["mip6-ip4-hoa"].startswith("192.0.2.")
        # The HAC closes after the final response (PROFILE §1).
        assert mn.at_eof()
        mn.close()


def test_same_mn_keeps_its_home_address(lab: Lab, start_hac: Any) -> None:
    start_hac(lab)
    hoas = set()
    for _ in range(2):
        mn = connect(lab)
        _, final = psk_bootstrap(mn, MN_ID, lab.psk)
        hoas.add(final.headers["mip6-ip6-hoa"])
        mn.close()
    assert len(hoas) == 1


def test_wrong_psk_and_unknown_id_both_401_at_done(lab: Lab, start_hac: Any) -> None:
    start_hac(lab)
    shapes = []
    for mn_id, psk in ((MN_ID, os.urandom(32)), ("nobody@mipsec.test", lab.psk)):
        mn = connect(lab)
        r1, final = psk_bootstrap(mn, mn_id, psk)
        assert "status-code" not in r1.headers  # not revealed at step 2
        assert not r1.auth_ok(psk, mn.cb)
        assert final.headers["status-code"] == "401"
        assert "mip6-spi" not in final.headers
        shapes.append((list(r1.headers), list(final.headers)))
        mn.close()
    assert shapes[0] == shapes[1]


def test_malformed_request_gets_400_and_others_unaffected(lab: Lab, start_hac: Any) -> None:
    start_hac(lab)
    bad = connect(lab)
    bad.send(b"mn-id: a@b\r\nmn-id: a@b\r\nauth-method: psk\r\n\r\n")  # duplicate header
    r = bad.recv()
    assert r.identifier == 1 and r.headers["status-code"] == "400" and "auth" not in r.headers
    assert bad.at_eof()
    bad.close()
    good = connect(lab)
    assert psk_bootstrap(good, MN_ID, lab.psk)[1].headers["status-code"] == "200"
    good.close()


def test_length_larger_than_data_then_close(lab: Lab, start_hac: Any) -> None:
    start_hac(lab)
    mn = connect(lab)
    mn.send_raw(struct.pack("!BBH", 0, 1, 500) + b"mn-id: a@b\r\n")
    mn.sock.unwrap()  # close_notify: the stream ends inside the container
    mn.sock.close()
    good = connect(lab)
    assert psk_bootstrap(good, MN_ID, lab.psk)[1].headers["status-code"] == "200"
    good.close()


def test_identifier_zero_closed_without_answer(lab: Lab, start_hac: Any) -> None:
    start_hac(lab)
    mn = connect(lab)
    mn.send_raw(container(0, b"mn-id: a@b\r\n\r\n"))
    assert mn.at_eof()
    mn.close()


def test_idle_client_closed_after_timeout(lab: Lab, start_hac: Any) -> None:
    edit_toml(lab.dir / "hac.toml", "request_timeout = 10", "request_timeout = 1")
    start_hac(lab)
    mn = connect(lab)
    mn.sock.settimeout(10)
    t0 = time.monotonic()
    assert mn.at_eof()
    assert time.monotonic() - t0 < 9  # closed by the HAC's timer, not ours
    mn.close()


def test_connection_cap_evicts_the_longest_waiting(lab: Lab, start_hac: Any) -> None:
    # The key's old name is still accepted.
    edit_toml(lab.dir / "hac.toml", "max_connections = 1024", "max_sessions = 2")
    start_hac(lab)
    first, second = connect(lab), connect(lab)  # TLS up, no request: both wait
    time.sleep(0.3)
    # At the cap a newcomer still gets in: the connection that has waited
    # longest without completing a request (first) makes room for it.
    mn = connect(lab)
    assert psk_bootstrap(mn, MN_ID, lab.psk)[1].headers["status-code"] == "200"
    mn.close()
    first.sock.settimeout(5)
    assert first.at_eof()  # closed without an answer
    first.close()
    assert psk_bootstrap(second, MN_ID, lab.psk)[1].headers["status-code"] == "200"
    second.close()


def test_saturated_hac_answers_503_with_retry_after(lab: Lab, start_hac: Any) -> None:
    """Beyond max_in_progress SA issues the MN gets 503 at once (PROFILE §6),
    not a place in a queue."""
    hac_toml = lab.dir / "hac.toml"
    with socket.socket() as silent_ha:  # accepts TCP, never answers: each issue waits
        silent_ha.bind(("127.0.0.1", 0))
        silent_ha.listen(16)
        ha_port = lab.info["ha"]["port"]
        edit_toml(
            hac_toml,
            f'host = "127.0.0.1"\nport = {ha_port}\n',
            f'host = "127.0.0.1"\nport = {silent_ha.getsockname()[1]}\n',
        )
        edit_toml(
            hac_toml, "max_in_progress = 128", "max_in_progress = 1\nprovisioning_timeout = 4"
        )
        start_hac(lab, with_ha=False)
        first: list[str] = []

        def waits_for_the_ha() -> None:
            mn = connect(lab)
            first.append(psk_bootstrap(mn, MN_ID, lab.psk)[1].headers["status-code"])
            mn.close()

        t = threading.Thread(target=waits_for_the_ha)
        t.start()
        time.sleep(1.0)  # its Done is in: the one issue slot is taken
        mn = connect(lab)
        _, final = psk_bootstrap(mn, MN_ID, lab.psk)
        mn.close()
        t.join(30)
    assert final.headers["status-code"] == "503"
    assert final.headers["retry-after"].endswith(" GMT")
    assert final.auth_ok(lab.psk, mn.cb)
    assert first == ["504"]  # the HA never confirmed


def test_concurrent_mns_with_a_bad_one(lab: Lab, start_hac: Any) -> None:
    start_hac(lab)
    results: list[str] = []

    def good() -> None:
        mn = connect(lab)
        results.append(psk_bootstrap(mn, MN_ID, lab.psk)[1].headers["status-code"])
        mn.close()

    bad = connect(lab)
    bad.send_raw(b"\xff" * 3)  # half a header, then silence
    threads = [threading.Thread(target=good) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == ["200"] * 8
    bad.close()


def test_strict_rfc6618_pins_tls12(lab: Lab, start_hac: Any) -> None:
    edit_toml(lab.dir / "hac.toml", "strict_rfc6618 = false", "strict_rfc6618 = true")
    start_hac(lab)
    mn = connect(lab)
    assert mn.version == "TLSv1.2"
    assert psk_bootstrap(mn, MN_ID, lab.psk)[1].headers["status-code"] == "200"
    mn.close()


def test_done_with_reserved_suites_only_501(lab: Lab, start_hac: Any) -> None:
    start_hac(lab)
    mn = connect(lab)
    r1, final = psk_bootstrap(mn, MN_ID, lab.psk, suites="{00,35},{C0,2F}")
    assert final.headers["status-code"] == "501"
    assert final.auth_ok(lab.psk, mn.cb)
    assert final.headers["mn-rand"] == r1.headers["mn-rand"]
    assert "mip6-spi" not in final.headers
    mn.close()


def test_done_with_letter_o_scope_is_400(lab: Lab, start_hac: Any) -> None:
    start_hac(lab)
    mn = connect(lab)
    r1, final = psk_bootstrap(mn, MN_ID, lab.psk, sas="O")
    assert final.headers["status-code"] == "400"
    mn.close()


def test_third_request_breaks_sequence(lab: Lab, start_hac: Any) -> None:
    start_hac(lab)
    mn = connect(lab)
    mn.send(
        lines([("mn-id", MN_ID), ("mn-rand", os.urandom(32).hex()), ("auth-method", "psk")])
        + b"\r\n"
    )
    mn.recv()
    mn.send(with_auth(b"", lab.psk, b"MN", mn.cb), identifier=3)  # skips Identifier 2
    r = mn.recv()
    assert r.identifier == 3 and r.headers["status-code"] == "400"
    mn.close()


def test_ipv6_listener(lab: Lab, start_hac: Any) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this host")
    start_hac(lab)
    try:
        mn = RawMN("::1", lab.hac_port, lab.info["ca"], "hac.mipsec.test")
    except OSError as exc:
        pytest.skip(f"::1 unreachable: {exc}")
    assert psk_bootstrap(mn, MN_ID, lab.psk)[1].headers["status-code"] == "200"
    mn.close()


def _flip(data: bytes, rng: random.Random) -> bytes:
    """One octet of ``data`` XORed with a nonzero mask, or ``data`` cut short."""
    at = rng.randrange(len(data))
    if rng.random() < 0.2:
        return data[:at]
    return data[:at] + bytes([data[at] ^ rng.randrange(1, 256)]) + data[at + 1 :]


def _half_close(mn: RawMN) -> None:
    """TCP FIN, TLS kept for reading the answer: the HAC sees the stream end
    (a damaged Length that now reaches past the data is a truncated request)."""
    with contextlib.suppress(OSError):
        socket.socket.shutdown(mn.sock, socket.SHUT_WR)  # not SSLSocket's: it drops TLS


def _final_or_close(mn: RawMN) -> str:
    """The status of the HAC's answer, or how the connection ended."""
    try:
        return mn.recv().headers.get("status-code", "continue")  # a non-final response
    except (EOFError, ConnectionError, ssl.SSLError, OSError):
        return "closed"


def test_a_running_hac_answers_damaged_requests_and_keeps_serving(lab: Lab, start_hac: Any) -> None:
    """The sans-I/O property tests (tests/unit/test_psk_exchange.py), over real
    TLS against a real HAC process: 150 Inits or Dones with one octet
    flipped, or cut short, each on its own connection.  Every one gets a
    final 4xx/501 or a close -- a 200 only for a damaged Done that still
    verifies, a non-final response only for an Init still well-formed --
    the HAC logs no traceback, and a genuine MN bootstraps
    afterwards."""
    hac = start_hac(lab)
    rng = random.Random(6618)
    seen: dict[str, int] = {}
    for i in range(150):
        mn = connect(lab)
        try:
            mn_rand = os.urandom(32).hex()
            init = lines([("mn-id", MN_ID), ("mn-rand", mn_rand), ("auth-method", "psk")])
            if i % 2 == 0:  # a damaged Init
                mn.send_raw(_flip(container(1, init + b"\r\n"), rng))
                _half_close(mn)
                status = _final_or_close(mn)
                # "continue": the flip left a well-formed Init (e.g. in mn-rand)
                assert status in ("400", "501", "continue", "closed"), status
            else:  # a genuine Init, then a damaged Done
                mn.send(init + b"\r\n")
                r1 = mn.recv()
                body = lines(
                    [
                        ("mn-rand", mn_rand),
                        ("hac-rand", r1.headers["hac-rand"]),
                        ("mip6-sas", "1"),
                        ("mip6-suitelist", "{00,3C}"),
                    ]
                )
                mn.send_raw(_flip(container(2, with_auth(body, lab.psk, b"MN", mn.cb)), rng))
                _half_close(mn)
                status = _final_or_close(mn)
                assert status in ("200", "400", "401", "closed"), status
            seen[status] = seen.get(status, 0) + 1
        finally:
            mn.close()
    assert seen.get("400", 0) + seen.get("401", 0) >= 75, seen  # answered, not only closed
    assert seen.get("200", 0) <= 5, seen  # only flips that leave the auth valid (hex case)
    good = connect(lab)
    assert psk_bootstrap(good, MN_ID, lab.psk)[1].headers["status-code"] == "200"
    good.close()
    hac.terminate()
    log = hac.communicate(timeout=10)[0]
    assert "Traceback" not in log and "Task exception" not in log
