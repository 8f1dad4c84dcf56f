"""The EAP-AKA / EAP-AKA' peer driven through whole conversations against the
test's own server and AuC (tests/unit/aka_server_sim.py)."""

from __future__ import annotations

import hmac
import json
from pathlib import Path
from typing import Any

import pytest
from aka_server_sim import (
    AT_MAC,
    AT_RES,
    AUTH_REJECT,
    CHALLENGE,
    CLIENT_ERROR,
    IDENTITY,
    NOTIFICATION,
    SYNC_FAILURE,
    AkaServerSim,
    AuC,
    attr,
    attr_u16,
    eap,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mipsec.core.eap import usim as usim_mod
from mipsec.core.eap.aka_peer import AkaPeer, network_name_matches
from mipsec.core.eap.method import Decision, EapPeerContext, MethodState, PeerOutput
from mipsec.core.eap.peer import EapPeerMachine
from mipsec.core.hookspecs import PluginContext
from mipsec.core.wire.eap import EapCode, EapPacket, decode_eap, encode_eap
from mipsec.plugins.eap_aka import AKA, AKA_PRIME

H = bytes.fromhex
KI = H("465b5ce8b199b49faa5f0a2ee238a6bc")
OPC = H("cd63cb71954a9f4e48a5994e37a02baf")
AMF = H("b9b9")
LAB_SQN = 0xFF9BB4D0B607
IMSI = "001010000000001"
REALM = "wlan.mnc001.mcc001.3gppnetwork.org"
AKA_ID = f"0{IMSI}@{REALM}"
AKA_PRIME_ID = f"6{IMSI}@{REALM}"


def options(tmp_path: Path, **over: Any) -> dict[str, Any]:
    base = {
        "ki": KI.hex(),
        "opc": OPC.hex(),
        "amf": AMF.hex(),
        "sqn": f"{LAB_SQN:012x}",
        "sqn_file": "usim.sqn",
    }
    base.update(over)
    return base


def make_peer(tmp_path: Path, prime: bool = False, **over: Any) -> AkaPeer:
    method = AKA_PRIME if prime else AKA
    factory = method.peer(options(tmp_path, **over), PluginContext("mn", tmp_path))
    return factory.new(EapPeerContext(AKA_PRIME_ID if prime else AKA_ID))


def run(
    peer: AkaPeer, sim: AkaServerSim, first: bytes | None = None
) -> tuple[int, list[PeerOutput]]:
    """Drive one exchange; returns the final EAP code and every peer output.

    The peer's state machine side of RFC 4137 is modelled here: EAP-Success is
    only accepted when the last decision is not FAIL."""
    pkt = sim.start() if first is None else first
    outs: list[PeerOutput] = []
    for _ in range(12):
        req = decode_eap(pkt)
        if req.code in (EapCode.SUCCESS, EapCode.FAILURE):
            if req.code is EapCode.SUCCESS:
                assert outs and outs[-1].decision is not Decision.FAIL, "Success not acceptable"
            return int(req.code), outs
        out = peer.process(req)
        outs.append(out)
        assert out.data is not None, out.reason
        resp = encode_eap(EapPacket(EapCode.RESPONSE, req.identifier, req.type, out.data))
        pkt = sim.handle(resp)
    raise AssertionError("conversation did not end")


def lab_auc() -> AuC:
    return AuC(KI, OPC, AMF, LAB_SQN)


# ---------------------------------------------------------------- success


def test_aka_success_with_identity_round_checkcode_and_pseudonym(tmp_path: Path) -> None:
    peer = make_peer(tmp_path)
    sim = AkaServerSim(lab_auc(), AKA_ID, pseudonym=True)
    code, outs = run(peer, sim)
    assert code == EapCode.SUCCESS and sim.outcome.success, sim.outcome.reason
    assert sim.identity == AKA_ID.encode()  # AT_IDENTITY carried the permanent identity
    last = outs[-1]
    assert (last.state, last.decision) == (MethodState.MAY_CONT, Decision.COND_SUCC)
    assert peer.msk() == sim.msk and len(sim.msk or b"") == 64
    assert peer.emsk() == sim.emsk
    # the lab AuC's first vector: SEQ + 1 and IND + 1 from ff9bb4d0b607
    assert sim.auc.sqn == 0xFF9BB4D0B628


def test_aka_prime_success_with_network_name(tmp_path: Path) -> None:
    peer = make_peer(tmp_path, prime=True, network_name="WLAN")
    sim = AkaServerSim(lab_auc(), AKA_PRIME_ID, prime=True, pseudonym=True)
    code, outs = run(peer, sim)
    assert code == EapCode.SUCCESS, sim.outcome.reason
    assert outs[-1].decision is Decision.COND_SUCC
    assert peer.msk() == sim.msk and peer.emsk() == sim.emsk


def test_aka_prime_without_identity_round_and_checkcode(tmp_path: Path) -> None:
    peer = make_peer(tmp_path, prime=True)
    sim = AkaServerSim(lab_auc(), AKA_PRIME_ID, prime=True, identity_round=False, checkcode=False)
    code, _ = run(peer, sim)
    assert code == EapCode.SUCCESS and peer.msk() == sim.msk


def test_aka_prime_network_name_prefix_match(tmp_path: Path) -> None:
    peer = make_peer(tmp_path, prime=True, network_name="WLAN")
    sim = AkaServerSim(lab_auc(), AKA_PRIME_ID, prime=True, network_name=b"WLAN:op.example")
    assert run(peer, sim)[0] == EapCode.SUCCESS
    assert network_name_matches("", "FOO:BAR") and network_name_matches("FOO:BAR", "FOO")
    assert not network_name_matches("FOO:BAZ", "FOO:BAR")


def test_aka_prime_kdf_negotiation(tmp_path: Path) -> None:
    peer = make_peer(tmp_path, prime=True)
    sim = AkaServerSim(lab_auc(), AKA_PRIME_ID, prime=True, kdfs=(2, 1))
    code, outs = run(peer, sim)
    assert code == EapCode.SUCCESS, sim.outcome.reason
    assert sim.kdfs == (1, 2, 1)  # the server put the chosen KDF first
    assert "KDF 1" in outs[1].reason and peer.msk() == sim.msk


def test_aka_prime_kdf_negotiation_then_a_resync(tmp_path: Path) -> None:
    """KDF negotiated (the server re-sends (1, 2, 1), the one duplicate RFC
    5448 §3.2 allows), then the USIM is ahead of the network: AUTS, and the
    next challenge repeats that list.  Accepted, and the run succeeds --
    before, the repeat was refused as a duplicate AT_KDF (found in review)."""
    peer = make_peer(tmp_path, prime=True, sqn=f"{LAB_SQN + (1 << 20):012x}")
    sim = AkaServerSim(lab_auc(), AKA_PRIME_ID, prime=True, kdfs=(2, 1))
    code, outs = run(peer, sim)
    assert code == EapCode.SUCCESS, sim.outcome.reason
    reasons = [o.reason for o in outs]
    assert any("KDF 1" in r for r in reasons) and any("re-synchronisation" in r for r in reasons)
    assert peer.msk() == sim.msk


def test_result_indication_success_notification(tmp_path: Path) -> None:
    peer = make_peer(tmp_path, prime=True, result_ind=True)
    sim = AkaServerSim(lab_auc(), AKA_PRIME_ID, prime=True, result_ind=True)
    code, outs = run(peer, sim)
    assert code == EapCode.SUCCESS, sim.outcome.reason
    assert sim.outcome.subtypes_seen[-1] == NOTIFICATION
    challenge, notification = outs[-2], outs[-1]
    # RFC 4187 §6.3.4: no EAP-Success before the success notification (state
    # CONT), but the MSK exists, so the decision is COND_SUCC and the Done
    # parameters ride on the challenge response (PROFILE §4 item 4).
    assert (challenge.state, challenge.decision) == (MethodState.CONT, Decision.COND_SUCC)
    assert (notification.state, notification.decision) == (MethodState.DONE, Decision.UNCOND_SUCC)
    assert peer.msk() == sim.msk


def test_result_indication_declined_by_the_peer(tmp_path: Path) -> None:
    peer = make_peer(tmp_path)  # result_ind defaults to false
    sim = AkaServerSim(lab_auc(), AKA_ID, result_ind=True)
    code, outs = run(peer, sim)
    assert code == EapCode.SUCCESS and sim.outcome.reason == "challenge ok"
    assert outs[-1].decision is Decision.COND_SUCC


# ---------------------------------------------------------------- failures


def test_wrong_ki_is_authentication_reject(tmp_path: Path) -> None:
    peer = make_peer(tmp_path, ki="00" * 16)
    sim = AkaServerSim(lab_auc(), AKA_ID)
    code, outs = run(peer, sim)
    assert code == EapCode.FAILURE
    assert sim.outcome.subtypes_seen[-1] == AUTH_REJECT
    assert (outs[-1].state, outs[-1].decision) == (MethodState.DONE, Decision.FAIL)
    assert "MAC-A" in outs[-1].reason and peer.msk() is None


def test_autn_with_bad_mac_is_authentication_reject(tmp_path: Path) -> None:
    peer = make_peer(tmp_path, prime=True)
    sim = AkaServerSim(lab_auc(), AKA_PRIME_ID, prime=True, bad_autn_mac=True)
    assert run(peer, sim)[0] == EapCode.FAILURE
    assert sim.outcome.subtypes_seen[-1] == AUTH_REJECT


def test_bad_at_mac_is_client_error(tmp_path: Path) -> None:
    peer = make_peer(tmp_path)
    sim = AkaServerSim(lab_auc(), AKA_ID, bad_challenge_mac=True)
    code, outs = run(peer, sim)
    assert code == EapCode.FAILURE and sim.outcome.subtypes_seen[-1] == CLIENT_ERROR
    assert outs[-1].reason == "invalid AT_MAC" and peer.msk() is None


def test_sqn_out_of_range_auts_then_success(tmp_path: Path) -> None:
    # The USIM is far ahead of the AuC: AUTS, the AuC re-synchronises, success.
    peer = make_peer(tmp_path, prime=True, sqn=f"{LAB_SQN + (5000 << 5):012x}")
    sim = AkaServerSim(lab_auc(), AKA_PRIME_ID, prime=True)
    code, outs = run(peer, sim)
    assert code == EapCode.SUCCESS, sim.outcome.reason
    assert SYNC_FAILURE in sim.outcome.subtypes_seen and sim.challenges == 2
    sync = next(o for o in outs if "AUTS" in o.reason)
    assert (sync.state, sync.decision) == (MethodState.CONT, Decision.FAIL)
    assert peer.msk() == sim.msk


def test_aka_prime_network_name_mismatch(tmp_path: Path) -> None:
    peer = make_peer(tmp_path, prime=True, network_name="WLAN")
    sim = AkaServerSim(lab_auc(), AKA_PRIME_ID, prime=True, network_name=b"HRPD")
    code, outs = run(peer, sim)
    assert code == EapCode.FAILURE and sim.outcome.subtypes_seen[-1] == AUTH_REJECT
    assert "HRPD" in outs[-1].reason
    # refused before the USIM ran: its SQN was not consumed
    again = make_peer(tmp_path, prime=True, network_name="WLAN")
    sim2 = AkaServerSim(AuC(KI, OPC, AMF, LAB_SQN), AKA_PRIME_ID, prime=True)
    assert run(again, sim2)[0] == EapCode.SUCCESS


def test_aka_prime_needs_the_amf_separation_bit(tmp_path: Path) -> None:
    peer = make_peer(tmp_path, prime=True, amf=None)
    sim = AkaServerSim(AuC(KI, OPC, H("0000"), LAB_SQN), AKA_PRIME_ID, prime=True)
    code, outs = run(peer, sim)
    assert code == EapCode.FAILURE and "separation bit" in outs[-1].reason


def test_aka_prime_without_kdf_1_is_rejected(tmp_path: Path) -> None:
    peer = make_peer(tmp_path, prime=True)
    sim = AkaServerSim(lab_auc(), AKA_PRIME_ID, prime=True, kdfs=(2,))
    code, outs = run(peer, sim)
    assert code == EapCode.FAILURE and sim.outcome.subtypes_seen[-1] == AUTH_REJECT
    assert "key derivation" in outs[-1].reason


def test_bidding_down_detected(tmp_path: Path) -> None:
    sim = AkaServerSim(lab_auc(), AKA_ID, bidding_d=True)
    code, outs = run(make_peer(tmp_path, aka_prime_supported=True), sim)
    assert code == EapCode.FAILURE and "bidding down" in outs[-1].reason
    # an MN without EAP-AKA' ignores the D bit
    other = tmp_path / "other"
    other.mkdir()
    sim2 = AkaServerSim(lab_auc(), AKA_ID, bidding_d=True)
    assert run(make_peer(other), sim2)[0] == EapCode.SUCCESS


def test_failure_notification_before_the_challenge(tmp_path: Path) -> None:
    peer = make_peer(tmp_path)
    sim = AkaServerSim(lab_auc(), AKA_ID, notification_first=16384)  # General failure, P=1
    code, outs = run(peer, sim)
    assert code == EapCode.FAILURE
    assert outs[-1].data == bytes((NOTIFICATION, 0, 0))  # no attributes, no AT_MAC
    assert (outs[-1].state, outs[-1].decision) == (MethodState.DONE, Decision.FAIL)


@pytest.mark.parametrize("late_code", [0, 16384])
def test_failure_notification_after_the_challenge(tmp_path: Path, late_code: int) -> None:
    # The server dislikes the response (here: RES tampered in flight) and says so
    # with a protected notification (code 0: the peer checks its AT_MAC and answers
    # with one), or as hostapd does with an unprotected "General failure" (16384).
    peer = make_peer(tmp_path)
    sim = AkaServerSim(lab_auc(), AKA_ID, late_failure_code=late_code)
    pkt = sim.start()
    out = peer.process(decode_eap(pkt))  # AKA-Identity
    pkt = sim.handle(encode_eap(EapPacket(EapCode.RESPONSE, sim.ident, 23, out.data or b"")))
    out = peer.process(decode_eap(pkt))  # AKA-Challenge
    data = bytearray(out.data or b"")
    i = data.index(bytes((AT_RES, 3)))
    data[i + 4] ^= 0xFF
    note = sim.handle(encode_eap(EapPacket(EapCode.RESPONSE, sim.ident, 23, bytes(data))))
    assert decode_eap(note).data[0] == NOTIFICATION
    out = peer.process(decode_eap(note))
    assert (out.state, out.decision) == (MethodState.DONE, Decision.FAIL)
    assert out.data is not None and (bytes((AT_MAC, 5)) in out.data) == (late_code == 0)
    assert peer.msk() is None
    fin = sim.handle(encode_eap(EapPacket(EapCode.RESPONSE, sim.ident, 23, out.data)))
    assert decode_eap(fin).code is EapCode.FAILURE


def test_restart_refuses_the_replayed_autn(tmp_path: Path) -> None:
    peer = make_peer(tmp_path)
    sim = AkaServerSim(lab_auc(), AKA_ID, identity_round=False)
    challenge = sim.start()
    out = peer.process(decode_eap(challenge))
    assert out.decision is Decision.COND_SUCC
    # The MN restarts: a new factory reloads the USIM from sqn_file.
    restarted = make_peer(tmp_path)
    replay = restarted.process(decode_eap(challenge))
    assert replay.data is not None and replay.data[0] == SYNC_FAILURE  # no RES for it
    assert restarted.msk() is None


def test_retransmitted_challenge_gets_the_same_answer(tmp_path: Path) -> None:
    peer = make_peer(tmp_path)
    sim = AkaServerSim(lab_auc(), AKA_ID, identity_round=False)
    challenge = decode_eap(sim.start())
    first = peer.process(challenge)
    assert peer.process(challenge) is first  # not a second USIM run (which would be a replay)


def test_usim_state_unwritable_gives_client_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    peer = make_peer(tmp_path)

    def broken(src: object, dst: object) -> None:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(usim_mod.os, "replace", broken)
    sim = AkaServerSim(lab_auc(), AKA_ID)
    code, outs = run(peer, sim)
    assert code == EapCode.FAILURE and sim.outcome.subtypes_seen[-1] == CLIENT_ERROR
    assert "USIM state" in outs[-1].reason


def test_checkcode_mismatch_is_client_error(tmp_path: Path) -> None:
    class Tampered(AkaServerSim):
        def _challenge(self, again: Any = None) -> bytes:
            self.id_msgs += b"\x00"
            return super()._challenge(again)

    code, outs = run(make_peer(tmp_path), Tampered(lab_auc(), AKA_ID))
    assert code == EapCode.FAILURE and "AT_CHECKCODE" in outs[-1].reason


# ---------------------------------------------------------------- malformed requests

AKA_T = 23


def request(subtype: int, attrs: bytes, ident: int = 7, typ: int = AKA_T) -> EapPacket:
    return decode_eap(eap(1, ident, typ, subtype, attrs))


@pytest.mark.parametrize(
    ("subtype", "attrs", "reason"),
    [
        (5, attr(13, b"\x00\x00") + attr(10, b"\x00\x00"), "2 identity requests"),
        (5, b"", "0 identity requests"),
        (5, attr(1, bytes(18)), "AT_RAND is not allowed"),
        (1, attr(1, bytes(18)) + attr(2, bytes(18)), "without AT_RAND, AT_AUTN or AT_MAC"),
        (1, attr(3, b"\x00\x40" + bytes(8)), "AT_RES is not allowed"),
        (1, b"\x05\x01\x00\x00", "non-skippable"),
        (1, b"\x01\x05\x00", "malformed request"),
        (
            1,
            attr(1, bytes(18)) + attr(2, bytes(18)) + attr(11, bytes(18)) + attr(24, b"\x00\x01"),
            "AT_KDF / AT_KDF_INPUT in an EAP-AKA",
        ),
        (12, b"", "without AT_NOTIFICATION"),
        (12, attr_u16(12, 0), "before the challenge"),
        (12, attr_u16(12, 0xC000), "P bit set with the S bit"),
        (12, attr_u16(12, 0x4000) + attr(11, bytes(18)), "carries AT_MAC"),
        (13, b"", "fast re-authentication"),
        (14, attr_u16(22, 0), "unexpected Subtype 14"),
    ],
)
def test_malformed_or_unexpected_requests(
    tmp_path: Path, subtype: int, attrs: bytes, reason: str
) -> None:
    peer = make_peer(tmp_path)
    out = peer.process(request(subtype, attrs))
    assert out.data == bytes((CLIENT_ERROR, 0, 0)) + attr_u16(22, 0)
    assert (out.state, out.decision) == (MethodState.DONE, Decision.FAIL)
    assert reason in out.reason, out.reason
    # after the error the method is over: later requests are discarded
    later = peer.process(request(5, attr(13, b"\x00\x00"), ident=8))
    assert later.data is None and later.decision is Decision.FAIL


def test_identity_round_sequencing(tmp_path: Path) -> None:
    peer = make_peer(tmp_path)
    assert peer.process(request(5, attr(13, b"\x00\x00"), 1)).state is MethodState.CONT
    bad = peer.process(request(5, attr(13, b"\x00\x00"), 2))  # ANY_ID_REQ again
    assert "AT_ANY_ID_REQ after the first" in bad.reason

    peer = make_peer(tmp_path)
    for i, t in enumerate((13, 17, 10)):  # any, full-auth, permanent: three rounds allowed
        out = peer.process(request(5, attr(t, b"\x00\x00"), i + 1))
        assert out.data is not None and out.data[0] == 5, out.reason
    fourth = peer.process(request(5, attr(10, b"\x00\x00"), 9))
    assert "three" in fourth.reason

    peer = make_peer(tmp_path)
    peer.process(request(5, attr(10, b"\x00\x00"), 1))
    after_perm = peer.process(request(5, attr(17, b"\x00\x00"), 2))
    assert "AT_PERMANENT_ID_REQ was answered" in after_perm.reason


def test_second_notification_round_refused(tmp_path: Path) -> None:
    peer = make_peer(tmp_path)
    sim = AkaServerSim(lab_auc(), AKA_ID, identity_round=False)
    out = peer.process(decode_eap(sim.start()))
    assert out.decision is Decision.COND_SUCC
    k_aut = sim.k_aut

    def protected(code: int, ident: int) -> EapPacket:
        pkt = eap(1, ident, AKA_T, NOTIFICATION, attr_u16(12, code) + attr(AT_MAC, bytes(18)))
        return decode_eap(pkt[:-16] + hmac.new(k_aut, pkt, "sha1").digest()[:16])

    info = peer.process(protected(0x8001, 50))  # S bit: informational, nothing changes
    assert info.decision is Decision.COND_SUCC and info.data is not None
    second = peer.process(protected(0x8001, 51))
    assert "second AKA-Notification" in second.reason


def test_not_our_type_is_ignored(tmp_path: Path) -> None:
    peer = make_peer(tmp_path)
    out = peer.process(request(5, attr(13, b"\x00\x00"), typ=50))
    assert out.data is None and out.reason == "not a request of this method"


def test_repr_hides_secrets(tmp_path: Path) -> None:
    peer = make_peer(tmp_path)
    sim = AkaServerSim(lab_auc(), AKA_ID)
    run(peer, sim)
    text = repr(peer) + repr(AKA.peer(options(tmp_path), PluginContext("mn", tmp_path)))
    for secret in (KI.hex(), OPC.hex(), (sim.msk or b"").hex()[:16]):
        assert secret not in text


@pytest.mark.parametrize("prime", [False, True], ids=["aka", "aka-prime"])
def test_lab_subscriber(tmp_path: Path, prime: bool) -> None:
    """The AAA lab subscriber (TS 35.208 set 1, AuC at SQN ff9bb4d0b607, "WLAN")
    as the lab README gives it: the first vector carries SQN ff9bb4d0b628."""
    peer = make_peer(tmp_path, prime=prime, **({"network_name": "WLAN"} if prime else {}))
    sim = AkaServerSim(lab_auc(), AKA_PRIME_ID if prime else AKA_ID, prime=prime)
    assert run(peer, sim)[0] == EapCode.SUCCESS and peer.msk() == sim.msk
    state = json.loads((tmp_path / "usim.sqn").read_text())
    assert state["sqn_ms"] == "ff9bb4d0b628"


def test_kdf_list_must_not_change_between_challenges(tmp_path: Path) -> None:
    # RFC 5448 §3.2: differing AT_KDF lists without a negotiation = a bad AT_MAC.
    class Shifty(AkaServerSim):
        def _challenge(self, again: Any = None) -> bytes:
            if self.challenges:  # the challenge after the AUTS
                self.kdfs = (1, 7)
            return super()._challenge(again)

    peer = make_peer(tmp_path, prime=True, sqn=f"{LAB_SQN + (5000 << 5):012x}")
    code, outs = run(peer, Shifty(lab_auc(), AKA_PRIME_ID, prime=True))
    assert code == EapCode.FAILURE and "differs from the previous" in outs[-1].reason


@given(
    st.sampled_from([1, 2, 4, 5, 12, 13, 14, 99]),
    st.lists(
        st.tuples(st.integers(0, 255), st.binary(max_size=40)).map(
            lambda t: bytes((t[0], (2 + len(t[1]) + 3) // 4)) + t[1] + bytes(-(2 + len(t[1])) % 4)
        ),
        max_size=6,
    ),
    st.booleans(),
)
@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_any_request_gets_an_answer_never_an_exception(
    tmp_path: Path, subtype: int, attrs: list[bytes], prime: bool
) -> None:
    peer = make_peer(tmp_path, prime=prime)
    out = peer.process(request(subtype, b"".join(attrs), typ=50 if prime else AKA_T))
    assert isinstance(out, PeerOutput)
    if out.decision is not Decision.FAIL:  # only a real challenge could get here
        raise AssertionError(out)


def test_identity_round_after_a_challenge_refused(tmp_path: Path) -> None:
    peer = make_peer(tmp_path, prime=True)
    sim = AkaServerSim(lab_auc(), AKA_PRIME_ID, prime=True, identity_round=False, kdfs=(2, 1))
    out = peer.process(decode_eap(sim.start()))  # only a KDF negotiation so far
    assert "KDF 1" in out.reason
    late = peer.process(request(5, attr(13, b"\x00\x00"), ident=99, typ=50))
    assert "AKA-Identity after an AKA-Challenge" in late.reason


def test_the_master_key_is_bound_to_the_identity_the_peer_sent(tmp_path: Path) -> None:
    """The MN's ``[eap] identity`` differs from its mn-id in the realm's case
    (the HAC accepts that: realms match in any case).  With no AKA-Identity
    round the master key is bound to the EAP-Response/Identity (RFC 4187
    §7): the peer uses that identity, and the server's AT_MAC verifies.
    Before, the peer used mn-id: "invalid AT_MAC", EAP-Failure (found in
    review)."""
    factory = AKA.peer(options(tmp_path), PluginContext("mn", tmp_path))
    sent = AKA_ID.replace("wlan.mnc001", "WLAN.mnc001")
    machine = EapPeerMachine(
        identity=sent, methods={23: ("aka", factory)}, ctx=EapPeerContext(mn_id=AKA_ID)
    )
    response = machine.process(bytes((1, 1, 0, 5, 1))).response
    assert response is not None and response[5:].decode() == sent
    sim = AkaServerSim(lab_auc(), sent, identity_round=False)
    assert converse(machine, sim) == EapCode.SUCCESS, sim.outcome.reason


def converse(machine: EapPeerMachine, sim: AkaServerSim) -> EapCode:
    """Whole packets between the MN's EAP framework and the server; the final code."""
    packet = sim.start()
    for _ in range(6):
        if (code := decode_eap(packet).code) in (EapCode.SUCCESS, EapCode.FAILURE):
            return code
        out = machine.process(packet)
        assert out.response is not None, out.reason
        packet = sim.handle(out.response)
    raise AssertionError("conversation did not end")


@pytest.mark.parametrize("prime", [False, True], ids=["aka", "aka-prime"])
def test_an_expanded_request_is_answered_expanded_under_its_at_mac(
    tmp_path: Path, prime: bool
) -> None:
    """A server sending EAP-AKA(') as Type 254, Vendor-Id 0 (RFC 3748 §5.7)
    gets every response in that form, and AT_MAC (RFC 4187 §10.15: the whole
    packet), AT_CHECKCODE and the notification's AT_MAC cover the octets
    sent.  Before, the framework answered in the legacy form while the
    method had computed AT_MAC over the expanded one: the server's check
    failed (found in review)."""
    identity = AKA_PRIME_ID if prime else AKA_ID
    method = AKA_PRIME if prime else AKA
    factory = method.peer(options(tmp_path, result_ind=True), PluginContext("mn", tmp_path))
    machine = EapPeerMachine(
        identity=identity,
        methods={method.eap_type: (method.name, factory)},
        ctx=EapPeerContext(identity),
    )
    sim = AkaServerSim(lab_auc(), identity, prime=prime, result_ind=True, expanded=True)
    assert converse(machine, sim) == EapCode.SUCCESS, sim.outcome.reason
    assert sim.outcome.subtypes_seen == [IDENTITY, CHALLENGE, NOTIFICATION]  # checked by the sim
    assert machine.msk() == sim.msk and machine.succeeded
