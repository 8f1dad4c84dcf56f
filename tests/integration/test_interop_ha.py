"""An independent MN (rawmn + rawha, no mipsec code) bootstraps through
``mipsec --role hac``, sends a protected BU to the provisioned
``mipsec --role ha`` and gets a valid protected BA -- for every suite."""

from __future__ import annotations

import socket
from typing import Any

import pytest
from conftest import Lab
from rawha import RawSA, binding_update, parse_ba
from rawmn import RawMN, psk_bootstrap

MN_ID = "demo@mipsec.test"
SUITES = ["{00,02}", "{00,3B}", "{00,0A}", "{00,2F}", "{00,3C}"]


def bootstrap(lab: Lab, suite: str) -> dict[str, str]:
    mn = RawMN("127.0.0.1", lab.hac_port, lab.info["ca"], "hac.mipsec.test")
    try:
        _, final = psk_bootstrap(mn, MN_ID, lab.psk, suites=suite)
    finally:
        mn.close()
    assert final.headers["status-code"] == "200", final.headers
    return final.headers


def raw_sa(h: dict[str, str], suite: str) -> RawSA:
    return RawSA(
        suite,
        int(h["mip6-spi"]),
        bytes.fromhex(h["mip6-mn-to-ha-ikey"]),
        bytes.fromhex(h.get("mip6-mn-to-ha-ekey", "")),
        bytes.fromhex(h["mip6-ha-to-mn-ikey"]),
        bytes.fromhex(h.get("mip6-ha-to-mn-ekey", "")),
    )


def udp(timeout: float = 3.0) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(timeout)
    s.bind(("127.0.0.1", 0))
    return s


def test_bu_ba_every_suite_and_replay(lab: Lab, start_hac: Any) -> None:
    hac = start_hac(lab)
    del hac
    port = int(lab.info["ha"]["port"])
    for n, suite in enumerate(SUITES):
        h = bootstrap(lab, suite)
        assert int(h["mip6-port"]) == port
        sa = raw_sa(h, suite)
        hoa, haa = h["mip6-ip6-hoa"], h["mip6-haa-ip6"]
        sock = udp()
        seq = 1000 + 10 * n  # the binding (keyed on HoA) outlives each SA
        bu = sa.protect(binding_update(seq, 25, hoa, haa))
        sock.sendto(bu, ("127.0.0.1", port))
        pkt, src = sock.recvfrom(2048)
        assert src == ("127.0.0.1", port)
        esp_seq, nh, mh = sa.unprotect(pkt)
        assert esp_seq == 0 and nh == 135
        ba = parse_ba(mh)
        assert ba == {"status": 0, "k": 0, "sequence": seq, "lifetime": 25}, suite
        # The same datagram again, also from another source port: no answer,
        # and the binding does not move to the replayer's address.
        sock.settimeout(0.5)  # negative checks: nothing may arrive
        sock.sendto(bu, ("127.0.0.1", port))
        other = udp(0.5)
        other.sendto(bu, ("127.0.0.1", port))
        for s in (sock, other):
            with pytest.raises(TimeoutError):
                s.recvfrom(2048)
        # A flipped bit gets no answer either.
        bad = bytearray(sa.protect(binding_update(seq + 1, 25, hoa, haa)))
        bad[12] ^= 0x40
        sock.sendto(bytes(bad), ("127.0.0.1", port))
        with pytest.raises(TimeoutError):
            sock.recvfrom(2048)
        # The next genuine BU still works (the replay changed nothing).
        sock.settimeout(3.0)
        sock.sendto(sa.protect(binding_update(seq + 2, 25, hoa, haa)), ("127.0.0.1", port))
        _, _, mh = sa.unprotect(sock.recvfrom(2048)[0])
        assert parse_ba(mh)["status"] == 0 and parse_ba(mh)["sequence"] == seq + 2
        other.close()
        sock.close()


def test_old_sequence_gets_135(lab: Lab, start_hac: Any) -> None:
    start_hac(lab)
    port = int(lab.info["ha"]["port"])
    h = bootstrap(lab, "{00,3C}")
    sa = raw_sa(h, "{00,3C}")
    hoa, haa = h["mip6-ip6-hoa"], h["mip6-haa-ip6"]
    sock = udp()
    sock.sendto(sa.protect(binding_update(500, 25, hoa, haa)), ("127.0.0.1", port))
    assert parse_ba(sa.unprotect(sock.recvfrom(2048)[0])[2])["status"] == 0
    sock.sendto(sa.protect(binding_update(400, 25, hoa, haa)), ("127.0.0.1", port))
    ba = parse_ba(sa.unprotect(sock.recvfrom(2048)[0])[2])
    assert ba["status"] == 135 and ba["sequence"] == 500
    sock.close()


def test_unknown_spi_and_plain_data_dropped(lab: Lab, start_hac: Any) -> None:
    start_hac(lab)
    port = int(lab.info["ha"]["port"])
    h = bootstrap(lab, "{00,3C}")
    sa = raw_sa(h, "{00,3C}")
    sa.spi ^= 0x5555  # an SPI nobody provisioned
    sock = udp(1.0)
    sock.sendto(
        sa.protect(binding_update(1, 25, h["mip6-ip6-hoa"], h["mip6-haa-ip6"])), ("127.0.0.1", port)
    )
    with pytest.raises(TimeoutError):
        sock.recvfrom(2048)
    # PType 0 under mip6-sas 1 is dropped silently (PROFILE §7).
    sock.sendto(bytes(8) + b"\x60" + bytes(39), ("127.0.0.1", port))
    with pytest.raises(TimeoutError):
        sock.recvfrom(2048)
    sock.close()
