"""The software USIM: AUTN checks, TS 33.102 Annex C SQN handling, AUTS, persistence."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from aka_server_sim import AuC

from mipsec.core.eap import usim as usim_mod
from mipsec.core.eap.milenage import Milenage
from mipsec.core.eap.usim import (
    AuthReject,
    SqnPolicy,
    SqnStore,
    SyncFailure,
    UmtsAuth,
    Usim,
    UsimStateError,
)

H = bytes.fromhex
# The AAA lab subscriber = 3GPP TS 35.208 test set 1.
KI = H("465b5ce8b199b49faa5f0a2ee238a6bc")
OPC = H("cd63cb71954a9f4e48a5994e37a02baf")
AMF = H("b9b9")
RAND1 = H("23553cbe9637a89d218ae64dae47bf35")


def make(tmp_path: Path, sqn: int, **kw: object) -> Usim:
    policy = SqnPolicy(**kw)  # type: ignore[arg-type]
    return Usim(Milenage(KI, OPC), SqnStore(tmp_path / "sqn.json", sqn, policy))


def xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def test_lab_subscriber_test_set_1(tmp_path: Path) -> None:
    # TS 35.208 set 1: SQN ff9bb4d0b607, AK aa689c648370, MAC-A 4a9ffac354dfafb3.
    autn = xor(H("ff9bb4d0b607"), H("aa689c648370")) + AMF + H("4a9ffac354dfafb3")
    u = make(tmp_path, 0xFF9BB4D0B5E7)  # one SEQ behind, same IND
    r = u.authenticate(RAND1, autn, separation_bit=True)  # b9b9 has the separation bit
    assert isinstance(r, UmtsAuth)
    assert r.res == H("a54211d5e3ba50bf")
    assert r.ck == H("b40ba9a3c58b2a05bbf0d987b21bf8cb")
    assert r.ik == H("f769bcd751044604127672711c6d3441")
    assert r.sqn_xor_ak == autn[:6]
    assert u.sqn_ms == 0xFF9BB4D0B607
    # the same AUTN again: SQN not fresh -> AUTS carrying SQN_MS = ff9bb4d0b607
    again = u.authenticate(RAND1, autn)
    assert isinstance(again, SyncFailure)
    assert xor(again.auts[:6], H("451e8beca43b")) == H("ff9bb4d0b607")  # f5* of set 1


def test_lab_first_vector_with_the_readme_sqn(tmp_path: Path) -> None:
    # The lab's AuC holds SQN ff9bb4d0b607 and its first vector uses ff9bb4d0b628;
    # a USIM given SQN_MS = ff9bb4d0b607 (as the lab README says) accepts it.
    auc = AuC(KI, OPC, AMF, 0xFF9BB4D0B607)
    v = auc.vector(os.urandom(16))
    assert auc.sqn == 0xFF9BB4D0B628
    u = make(tmp_path, 0xFF9BB4D0B607)
    r = u.authenticate(v["rand"], v["autn"])
    assert isinstance(r, UmtsAuth) and (r.res, r.ck, r.ik) == (v["xres"], v["ck"], v["ik"])


def test_auts_known_answers(tmp_path: Path) -> None:
    # TS 35.208 set 20 keys.  AUTS for SQN_MS = 1 and RAND of set 20 (hostapd's
    # milenage_auts test), and an AUTS a real test USIM produced for RAND aa..aa.
    k, opc = H("90dca4eda45b53cf0f12d7c9c3bc6a89"), H("cb9cccc4b9258e6dca4760379fb82581")
    m = Milenage(k, opc)
    u = Usim(m, SqnStore(tmp_path / "s", 1, SqnPolicy()))
    rand20 = H("9fddc72092c6ad036b6e464789315b78")
    sqn0 = xor(bytes(6), m.f2345(rand20).ak)  # SQN 0 <= SQN_MS 1: not fresh
    autn_stale = sqn0 + b"\x80\x00" + m.f1(rand20, bytes(6), b"\x80\x00")
    r = u.authenticate(rand20, autn_stale)
    assert isinstance(r, SyncFailure)
    assert r.auts == H("4f2039392ddd4bb4316ed4a14688")
    real = H("43681ad3daf006bcde405a207267")
    rand_aa = b"\xaa" * 16
    sqn_ms = xor(real[:6], m.f5star(rand_aa))
    assert m.f1star(rand_aa, sqn_ms, b"\x00\x00") == real[6:]


def test_mac_failures_are_rejects(tmp_path: Path) -> None:
    auc = AuC(KI, OPC, AMF, 0x20)
    u = make(tmp_path, 0x0)
    v = auc.vector(os.urandom(16))
    for i in range(16):  # any flipped bit of AUTN breaks MAC-A (SQN, AMF or MAC)
        bad = bytearray(v["autn"])
        bad[i] ^= 0x04
        assert isinstance(u.authenticate(v["rand"], bytes(bad)), AuthReject)
    wrong_ki = AuC(bytes(16), OPC, AMF, 0x20).vector(v["rand"])
    assert isinstance(u.authenticate(v["rand"], wrong_ki["autn"]), AuthReject)
    assert u.sqn_ms == 0  # nothing was accepted
    assert isinstance(u.authenticate(v["rand"], v["autn"]), UmtsAuth)


def test_amf_policies(tmp_path: Path) -> None:
    auc = AuC(KI, OPC, H("0000"), 0x20)
    v = auc.vector(os.urandom(16))
    u = make(tmp_path, 0)
    r = u.authenticate(v["rand"], v["autn"], separation_bit=True)
    assert isinstance(r, AuthReject) and "separation bit" in r.reason
    pinned = Usim(Milenage(KI, OPC), SqnStore(tmp_path / "p", 0, SqnPolicy()), amf=AMF)
    r = pinned.authenticate(v["rand"], v["autn"])
    assert isinstance(r, AuthReject) and "configured AMF" in r.reason
    assert u.sqn_ms == 0 and pinned.sqn_ms == 0


def test_ind_array_accepts_out_of_order_vectors(tmp_path: Path) -> None:
    auc = AuC(KI, OPC, AMF, 0x1000)
    u = make(tmp_path, 0x1000)
    vs = [auc.vector(os.urandom(16)) for _ in range(5)]  # five IND slots
    for v in reversed(vs):  # delivered newest first: each slot is still fresh
        assert isinstance(u.authenticate(v["rand"], v["autn"]), UmtsAuth)
    assert u.sqn_ms == auc.sqn
    for v in vs:  # none of them twice
        assert isinstance(u.authenticate(v["rand"], v["autn"]), SyncFailure)


def test_same_ind_lower_seq_refused(tmp_path: Path) -> None:
    u = make(tmp_path, 0, ind_bits=5)
    auc = AuC(KI, OPC, AMF, 0)
    hi = auc.vector(os.urandom(16), sqn=(10 << 5) | 3)
    lo = auc.vector(os.urandom(16), sqn=(9 << 5) | 3)
    other = auc.vector(os.urandom(16), sqn=(9 << 5) | 4)
    assert isinstance(u.authenticate(hi["rand"], hi["autn"]), UmtsAuth)
    assert isinstance(u.authenticate(lo["rand"], lo["autn"]), SyncFailure)
    assert isinstance(u.authenticate(other["rand"], other["autn"]), UmtsAuth)
    assert u.sqn_ms == (10 << 5) | 3  # the highest SEQ stays SQN_MS


def test_delta_and_age_limit(tmp_path: Path) -> None:
    auc = AuC(KI, OPC, AMF, 0)
    u = make(tmp_path, 5 << 5, delta=100, age_limit=3)
    far = auc.vector(os.urandom(16), sqn=(106 << 5) | 1)
    assert isinstance(u.authenticate(far["rand"], far["autn"]), SyncFailure)
    near = auc.vector(os.urandom(16), sqn=(105 << 5) | 1)
    assert isinstance(u.authenticate(near["rand"], near["autn"]), UmtsAuth)
    old = auc.vector(os.urandom(16), sqn=(101 << 5) | 2)  # 105 - 101 > L = 3
    assert isinstance(u.authenticate(old["rand"], old["autn"]), SyncFailure)
    recent = auc.vector(os.urandom(16), sqn=(102 << 5) | 2)
    assert isinstance(u.authenticate(recent["rand"], recent["autn"]), UmtsAuth)


def test_resync_round_trip_with_the_auc(tmp_path: Path) -> None:
    auc = AuC(KI, OPC, AMF, 0xFF9BB4D0B607)
    u = make(tmp_path, 0)  # far behind: delta refuses the jump
    v = auc.vector(os.urandom(16))
    r = u.authenticate(v["rand"], v["autn"])
    assert isinstance(r, SyncFailure)
    assert auc.resync(v["rand"], r.auts) and auc.sqn == 0
    v2 = auc.vector(os.urandom(16))
    assert isinstance(u.authenticate(v2["rand"], v2["autn"]), UmtsAuth)


def test_restart_refuses_the_replayed_autn(tmp_path: Path) -> None:
    auc = AuC(KI, OPC, AMF, 0x40)
    v = auc.vector(os.urandom(16))
    first = make(tmp_path, 0x40)
    assert isinstance(first.authenticate(v["rand"], v["autn"]), UmtsAuth)
    del first
    # A new process: initial SQN from the configuration is ignored, the file wins.
    restarted = make(tmp_path, 0x40)
    assert isinstance(restarted.authenticate(v["rand"], v["autn"]), SyncFailure)


def test_state_file_is_private_and_rejects_corruption(tmp_path: Path) -> None:
    u = make(tmp_path, 0x40)
    path = tmp_path / "sqn.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    body = json.loads(path.read_text())
    assert body["sqn_ms"] == "000000000040" and len(body["seq"]) == 32
    assert "465b5ce8" not in path.read_text()  # no key material in the state
    path.write_text("{not json")
    v = AuC(KI, OPC, AMF, 0x40).vector(os.urandom(16))
    with pytest.raises(UsimStateError, match="cannot read"):
        u.authenticate(v["rand"], v["autn"])
    body["seq"][0] = body["seq"][0] + 5  # higher than sqn_ms claims
    path.write_text(json.dumps(body))
    with pytest.raises(UsimStateError, match="does not match"):
        SqnStore(path, 0, SqnPolicy())
    body["seq"][0] -= 5
    path.write_text(json.dumps(body))
    with pytest.raises(UsimStateError, match="ind_bits"):
        SqnStore(path, 0, SqnPolicy(ind_bits=4))


def test_no_res_without_durable_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    auc = AuC(KI, OPC, AMF, 0x40)
    v = auc.vector(os.urandom(16))
    u = make(tmp_path, 0x40)

    def broken_replace(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(usim_mod.os, "replace", broken_replace)
    with pytest.raises(UsimStateError, match="cannot write"):
        u.authenticate(v["rand"], v["autn"])
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left
    assert u.sqn_ms == 0x40  # the old state is intact...
    assert isinstance(u.authenticate(v["rand"], v["autn"]), UmtsAuth)  # ...and works


def test_a_lock_that_cannot_be_taken_is_a_state_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """flock failing (ENOLCK on a network file system) is a UsimStateError
    naming the lock file -- no RES, and an error the peer turns into an
    answer -- not an OSError out of the EAP exchange (found in review)."""
    auc = AuC(KI, OPC, AMF, 0x40)
    v = auc.vector(os.urandom(16))
    u = make(tmp_path, 0x40)

    def no_locks(fd: int, op: int) -> None:
        raise OSError(37, "No locks available")

    monkeypatch.setattr(usim_mod.fcntl, "flock", no_locks)
    with pytest.raises(UsimStateError, match="cannot lock"):
        u.authenticate(v["rand"], v["autn"])
    monkeypatch.undo()
    assert isinstance(u.authenticate(v["rand"], v["autn"]), UmtsAuth)


def test_repr_hides_secrets(tmp_path: Path) -> None:
    u = make(tmp_path, 0)
    r = u.authenticate(
        RAND1, xor(H("ff9bb4d0b607"), H("aa689c648370")) + AMF + H("4a9ffac354dfafb3")
    )
    text = repr(u) + repr(r)
    assert KI.hex() not in text and OPC.hex() not in text and "a54211d5" not in text
