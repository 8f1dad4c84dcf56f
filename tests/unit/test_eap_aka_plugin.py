"""Options of the ``aka`` / ``aka-prime`` EAP method plugins ([eap.aka] tables)."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest
from aka_server_sim import AUTH_REJECT, SYNC_FAILURE, AkaServerSim, AuC
from pydantic import BaseModel

from mipsec.core.config import MNConfig, load_config, redacted
from mipsec.core.eap.method import EapPeerContext
from mipsec.core.eap.mhauth import EapPeerConfig
from mipsec.core.eap.peer import EapPeerMachine
from mipsec.core.errors import ConfigError
from mipsec.core.hookspecs import PluginContext
from mipsec.core.pluginmanager import make_plugin_manager, registry
from mipsec.core.roles.mn import peer_factory
from mipsec.core.wire.eap import EapCode, EapPacket, EapType, decode_eap, encode_eap
from mipsec.plugins.eap_aka import AKA, AKA_PRIME

KI = "465b5ce8b199b49faa5f0a2ee238a6bc"
OP = "cdc202d5123e20f62b6d676ac72cb318"
OPC = "cd63cb71954a9f4e48a5994e37a02baf"


def ctx(tmp_path: Path) -> PluginContext:
    return PluginContext("mn", tmp_path, config_file=str(tmp_path / "mn.toml"))


def test_registered_through_the_entry_point() -> None:
    methods = registry(make_plugin_manager(), "mipsec_eap_methods")
    assert methods["aka"] is AKA and methods["aka-prime"] is AKA_PRIME
    assert (AKA.eap_type, AKA_PRIME.eap_type) == (EapType.AKA, EapType.AKA_PRIME)
    assert AKA.derives_msk and AKA_PRIME.derives_msk
    assert AKA.server({}, ctx(Path("."))) is None  # peer role only


def _challenge_once(tmp_path: Path, opts: dict[str, Any]) -> bool:
    factory = AKA.peer(opts, ctx(tmp_path))
    peer = factory.new(EapPeerContext("0001010000000001@wlan.mnc001.mcc001.3gppnetwork.org"))
    sim = AkaServerSim(
        AuC(bytes.fromhex(KI), bytes.fromhex(OPC), bytes.fromhex("b9b9"), 0xFF9BB4D0B607),
        "0001010000000001@wlan.mnc001.mcc001.3gppnetwork.org",
        identity_round=False,
    )
    req = decode_eap(sim.start())
    out = peer.process(req)
    assert out.data is not None
    fin = sim.handle(encode_eap(EapPacket(EapCode.RESPONSE, req.identifier, req.type, out.data)))
    return decode_eap(fin).code is EapCode.SUCCESS


def test_keys_from_files_and_op(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "ki").write_text(KI.upper() + "\n")
    (tmp_path / "keys" / "op").write_text(OP)
    for f in ("ki", "op"):
        (tmp_path / "keys" / f).chmod(0o600)  # secret files
    opts = {"ki_file": "keys/ki", "op_file": "keys/op", "sqn": "ff9bb4d0b607", "sqn_file": "s"}
    assert _challenge_once(tmp_path, opts)  # OPc derived from OP, paths relative to base_dir
    sqn_file = tmp_path / "s"
    assert stat.S_IMODE(sqn_file.stat().st_mode) == 0o600
    inline = {"ki": KI, "op": OP, "sqn": "ff9bb4d0b607", "sqn_file": "../s2"}
    assert _challenge_once(tmp_path / "keys", inline)
    assert (tmp_path / "s2").exists()


def test_absolute_sqn_file(tmp_path: Path) -> None:
    path = tmp_path / "abs.sqn"
    AKA.peer({"ki": KI, "opc": OPC, "sqn_file": str(path)}, ctx(tmp_path / "elsewhere"))
    assert path.exists()


@pytest.mark.parametrize(
    ("method", "opts", "message"),
    [
        (AKA, {"ki": KI, "opc": OPC}, "sqn_file: field required"),
        (AKA, {"opc": OPC, "sqn_file": "s"}, "exactly one of ki and ki_file"),
        (
            AKA,
            {"ki": KI, "ki_file": "k", "opc": OPC, "sqn_file": "s"},
            "exactly one of ki and ki_file",
        ),
        (AKA, {"ki": KI, "sqn_file": "s"}, "exactly one of opc, op"),
        (AKA, {"ki": KI, "opc": OPC, "op": OP, "sqn_file": "s"}, "exactly one of opc, op"),
        (AKA, {"ki": KI[:-2] + "zz", "opc": OPC, "sqn_file": "s"}, "ki: must be 32 hexadecimal"),
        (AKA, {"ki": KI, "opc": OPC, "amf": "b9", "sqn_file": "s"}, "amf: must be 4 hexadecimal"),
        (AKA, {"ki": KI, "opc": OPC, "sqn": "1", "sqn_file": "s"}, "sqn: must be 12 hexadecimal"),
        (AKA, {"ki": KI, "opc": OPC, "sqn_file": "s", "ind_bits": 11}, "ind_bits"),
        (AKA, {"ki": KI, "opc": OPC, "sqn_file": "s", "network_name": "WLAN"}, "network_name"),
        (
            AKA_PRIME,
            {"ki": KI, "opc": OPC, "sqn_file": "s", "aka_prime_supported": True},
            "aka_prime_supported",
        ),
        (AKA_PRIME, {"ki": KI, "opc": OPC, "sqn_file": "s", "amf": "0000"}, "separation bit"),
        (AKA_PRIME, {"ki": KI, "opc": OPC, "sqn_file": "s", "network_name": ""}, "network_name"),
        (AKA, {"ki_file": "missing", "opc": OPC, "sqn_file": "s"}, "ki_file: cannot read"),
        (AKA, {"ki": KI, "opc": OPC, "sqn_file": "s", "result_ind": "maybe"}, "result_ind"),
    ],
)
def test_bad_options_name_the_key_not_the_value(
    tmp_path: Path, method: Any, opts: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError) as exc:
        method.peer(opts, ctx(tmp_path))
    text = str(exc.value)
    assert message.lower() in text.lower(), text
    assert KI not in text and OPC not in text and KI[:-2] not in text


def test_bad_key_file_content(tmp_path: Path) -> None:
    (tmp_path / "ki").write_text("not hex at all")
    (tmp_path / "ki").chmod(0o600)
    with pytest.raises(ValueError, match="ki_file: .* must hold 32 hexadecimal digits"):
        AKA.peer({"ki_file": "ki", "opc": OPC, "sqn_file": "s"}, ctx(tmp_path))


def test_corrupt_or_foreign_sqn_file(tmp_path: Path) -> None:
    (tmp_path / "s").write_text("{}")
    with pytest.raises(ValueError, match="sqn_file: .*not a mipsec-usim-sqn/1 file"):
        AKA.peer({"ki": KI, "opc": OPC, "sqn_file": "s"}, ctx(tmp_path))
    AKA.peer({"ki": KI, "opc": OPC, "sqn_file": "t", "ind_bits": 4}, ctx(tmp_path))
    with pytest.raises(ValueError, match="ind_bits=4, configured 5"):
        AKA.peer({"ki": KI, "opc": OPC, "sqn_file": "t"}, ctx(tmp_path))


def test_unwritable_sqn_directory(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        target = "/proc/mipsec-no-such-dir/sqn"  # even root cannot create files here
    else:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        target = str(ro / "sqn")
    with pytest.raises(ValueError, match="sqn_file: cannot"):
        AKA.peer({"ki": KI, "opc": OPC, "sqn_file": target}, ctx(tmp_path))


def test_config_dump_redacts_usim_keys() -> None:
    class Cfg(BaseModel):
        eap: dict[str, Any]

    cfg = Cfg(eap={"aka": {"ki": KI, "opc": OPC, "op": OP, "sqn_file": "s", "ki_file": "k"}})
    out = redacted(cfg)["eap"]["aka"]
    assert out["ki"] == out["opc"] == out["op"] == "<redacted>"
    assert out["sqn_file"] == "s" and out["ki_file"] == "k"


def test_check_only_creates_no_sqn_file_and_still_checks_an_existing_one(tmp_path: Path) -> None:
    """``mipsec check-config`` builds the MN's method with ``check_only``:
    the USIM's SQN file and its lock file are not created (a start would),
    while a damaged existing file is still a configuration error."""
    check = PluginContext("mn", tmp_path, extra={"check_only": True})
    AKA.peer({"ki": KI, "opc": OPC, "sqn_file": "s"}, check)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    (tmp_path / "s").write_text("{not json")
    with pytest.raises(ValueError, match="^sqn_file: "):
        AKA.peer({"ki": KI, "opc": OPC, "sqn_file": "s"}, check)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_a_key_file_open_to_others_is_refused_naming_the_option(tmp_path: Path) -> None:
    """K and OP(c) are the subscriber's secrets: a ``ki_file`` or ``op_file``
    that group or others may read is refused, naming the option (read at
    any mode before; found in review)."""
    (tmp_path / "ki").write_text(KI)
    (tmp_path / "op").write_text(OP)
    for f in ("ki", "op"):
        (tmp_path / f).chmod(0o600)
    opts = {"ki_file": "ki", "op_file": "op", "sqn": "ff9bb4d0b607", "sqn_file": "s"}
    for loose in ("ki", "op"):
        (tmp_path / loose).chmod(0o644)
        with pytest.raises(ValueError, match=f"^{loose}_file: .*secret file open to"):
            AKA.peer(opts, ctx(tmp_path))
        (tmp_path / loose).chmod(0o600)
    assert _challenge_once(tmp_path, opts)


# ------------------------------------------------ one subscriber, one SQN array

AKA_ID = "0001010000000001@wlan.mnc001.mcc001.3gppnetwork.org"
LAB_SQN = "ff9bb4d0b607"


def both_methods(tmp_path: Path, aka: dict[str, Any], prime: dict[str, Any]) -> EapPeerConfig:
    """An MN whose ``[eap]`` configures ``aka-prime`` and ``aka`` (lab subscriber)."""
    base = {"ki": KI, "opc": OPC, "amf": "b9b9", "sqn": LAB_SQN}

    def table(over: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in (base | over).items() if v is not None}  # None: left out

    opts = {"methods": ["aka-prime", "aka"], "aka": table(aka), "aka-prime": table(prime)}
    return EapPeerConfig(opts, ctx(tmp_path))


def lab_auc() -> AuC:
    return AuC(bytes.fromhex(KI), bytes.fromhex(OPC), bytes.fromhex("b9b9"), int(LAB_SQN, 16))


def machine(cfg: EapPeerConfig) -> EapPeerMachine:
    return EapPeerMachine(identity=AKA_ID, methods=cfg.methods, ctx=EapPeerContext(AKA_ID))


@pytest.mark.parametrize(
    ("aka_file", "prime_file"), [("usim.sqn", "usim.sqn"), ("aka.sqn", "aka-prime.sqn")]
)
def test_an_autn_used_by_eap_aka_is_not_accepted_again_by_eap_aka_prime(
    tmp_path: Path, aka_file: str, prime_file: str
) -> None:
    """TS 33.102 Annex C: one SQN array per USIM.  An AUTN that EAP-AKA
    accepted, replayed as an EAP-AKA' challenge by a holder of its CK/IK,
    gets AKA-Synchronization-Failure -- in every configuration the MN
    accepts.  Before, one ``sqn_file`` per method (as the README's example
    suggested) gave two arrays: the replay was accepted, and the attacker
    held the MSK (found in review).  Such a configuration is now refused."""
    try:
        cfg = both_methods(tmp_path, {"sqn_file": aka_file}, {"sqn_file": prime_file})
    except ValueError as exc:
        assert aka_file != prime_file and "aka.sqn_file: differs from" in str(exc)
        return
    auc = lab_auc()
    genuine = AkaServerSim(auc, AKA_ID, identity_round=False, checkcode=False)
    reply = machine(cfg).process(genuine.start()).response
    assert reply is not None and decode_eap(genuine.handle(reply)).code is EapCode.SUCCESS
    attacker = AkaServerSim(auc, AKA_ID, prime=True, identity_round=False, checkcode=False)
    again = machine(cfg)
    reply = again.process(attacker.replay(genuine.vector)).response
    assert reply is not None and reply[5] == SYNC_FAILURE  # no RES, no MSK
    assert again.msk() is None


@pytest.mark.parametrize(
    ("prime", "message"),
    [
        ({"sqn_file": "other.sqn"}, "aka.sqn_file: differs from aka-prime.sqn_file"),
        ({"ki": "00" * 16}, "aka.ki: not the K of aka-prime.ki"),
        ({"opc": None, "op": "00" * 16}, "aka.opc: not the OPc of aka-prime.op"),
        ({"ind_bits": 4}, "aka.ind_bits: differs from aka-prime.ind_bits"),
        ({"sqn": "000000000020"}, "aka.sqn: differs from aka-prime.sqn"),
        ({"sqn_age_limit": 64}, "aka.sqn_age_limit: differs from aka-prime.sqn_age_limit"),
    ],
)
def test_two_usims_for_one_identity_are_refused(
    tmp_path: Path, prime: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError) as exc:
        both_methods(tmp_path, {"sqn_file": "usim.sqn"}, {"sqn_file": "usim.sqn"} | prime)
    text = str(exc.value)
    assert text.startswith(message) and "TS 33.102 Annex C" in text, text
    assert KI not in text and OPC not in text and "00" * 16 not in text


def test_one_subscriber_under_both_methods_shares_one_sqn_store(tmp_path: Path) -> None:
    """The same K and OPc (here once as OP), one ``sqn_file`` (spelt two
    ways): accepted, and both methods use the one store; AMF and the
    method's own options may differ."""
    (tmp_path / "sub").mkdir()
    cfg = both_methods(
        tmp_path,
        {"sqn_file": "sub/../usim.sqn", "amf": None},
        {"sqn_file": "usim.sqn", "opc": None, "op": OP, "network_name": "WLAN"},
    )
    (_, prime), (_, aka) = cfg.methods.values()
    assert prime.subscriber.store is aka.subscriber.store
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub", "usim.sqn", "usim.sqn.lock"]


def test_two_sqn_files_are_a_one_line_config_error(tmp_path: Path) -> None:
    """What ``mipsec mn`` / ``check-config`` print: file, key, both options."""
    (tmp_path / "ca.pem").write_text("")
    conf = tmp_path / "mn.toml"
    conf.write_text(
        f"""
[mn]
mn_id = "{AKA_ID}"
method = "eap"
[hac]
host = "hac.example"
ca = "ca.pem"
[eap]
methods = ["aka-prime", "aka"]
[eap.aka-prime]
ki = "{KI}"
opc = "{OPC}"
sqn_file = "usim-aka-prime.sqn"
[eap.aka]
ki = "{KI}"
opc = "{OPC}"
sqn_file = "usim-aka.sqn"
"""
    )
    cfg = load_config(conf, "mn")
    assert isinstance(cfg, MNConfig)
    with pytest.raises(ConfigError) as exc:
        peer_factory(cfg, make_plugin_manager(), str(conf))
    text = str(exc.value)
    assert "\n" not in text and text.startswith(f"{conf}: eap: aka.sqn_file: differs from ")
    assert "aka-prime.sqn_file" in text and "usim-aka.sqn is not " in text


# ------------------------------------------------ bidding down (RFC 5448 §4)


def test_with_aka_prime_configured_eap_aka_refuses_a_bidding_down(tmp_path: Path) -> None:
    """The server says (AT_BIDDING, D bit, under AT_MAC) that it would have
    used EAP-AKA'; an MN that lists ``aka-prime`` would have too, so someone
    bid the pair down to EAP-AKA: Authentication-Reject, no MSK.  Before,
    the check was off unless ``aka_prime_supported = true`` was set by hand,
    whatever the methods (found in review)."""
    cfg = both_methods(tmp_path, {"sqn_file": "usim.sqn"}, {"sqn_file": "usim.sqn"})
    sim = AkaServerSim(lab_auc(), AKA_ID, identity_round=False, checkcode=False, bidding_d=True)
    mn = machine(cfg)
    reply = mn.process(sim.start())
    assert reply.response is not None and reply.response[5] == AUTH_REJECT, reply.reason
    assert "bidding down" in reply.reason and mn.msk() is None
    assert decode_eap(sim.handle(reply.response)).code is EapCode.FAILURE
    # An MN without EAP-AKA' ignores the D bit (nothing better to bid for).
    (tmp_path / "aka-only").mkdir()
    table = {"ki": KI, "opc": OPC, "sqn": LAB_SQN, "sqn_file": "usim.sqn"}
    only = EapPeerConfig({"methods": ["aka"], "aka": table}, ctx(tmp_path / "aka-only"))
    sim = AkaServerSim(lab_auc(), AKA_ID, identity_round=False, checkcode=False, bidding_d=True)
    reply = machine(only).process(sim.start())
    assert reply.response is not None
    assert decode_eap(sim.handle(reply.response)).code is EapCode.SUCCESS


def test_opting_out_of_the_bidding_check_next_to_aka_prime_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as exc:
        both_methods(
            tmp_path,
            {"sqn_file": "usim.sqn", "aka_prime_supported": False},
            {"sqn_file": "usim.sqn"},
        )
    text = str(exc.value)
    assert text.startswith("aka.aka_prime_supported: false, but aka-prime is in methods")
    assert "RFC 5448 §4" in text and "\n" not in text
