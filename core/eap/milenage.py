"""The 3GPP authentication functions f1, f1*, f2, f3, f4, f5 and f5* (Milenage).

3GPP TS 35.206 §4 with the kernel E_K = AES-128 (TS 35.206 §3, "Rijndael"
with a 128-bit block) and the constants it fixes: r1 = 64, r2 = 0, r3 = 32,
r4 = 64, r5 = 96 (bits), c1 = 0, c2 = 1, c3 = 2, c4 = 4, c5 = 8.

    OPc  = OP xor E_K(OP)
    TEMP = E_K(RAND xor OPc)
    IN1  = SQN || AMF || SQN || AMF
    OUT1 = E_K(TEMP xor rot(IN1 xor OPc, r1) xor c1) xor OPc   f1 = OUT1[0..63], f1* = OUT1[64..127]
    OUTi = E_K(rot(TEMP xor OPc, ri) xor ci) xor OPc           (i = 2..5)
    f5 = OUT2[0..47], f2 = OUT2[64..127], f3 = OUT3, f4 = OUT4, f5* = OUT5[0..47]

Every rotation here is a whole number of octets, so ``rot`` is a slice.
Keys never appear in a repr or an error message.  This is the MN's USIM
algorithm; it shares no code with the AAA lab's AuC (the interop test is
where the two independent implementations must agree).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes

from mipsec.core.errors import LocalProtocolError

__all__ = [
    "AK_LEN",
    "AMF_LEN",
    "KEY_LEN",
    "MAC_LEN",
    "RAND_LEN",
    "RES_LEN",
    "SQN_LEN",
    "Milenage",
    "Vector",
    "opc_from_op",
]

KEY_LEN = 16  # K, OP, OPc, CK, IK (TS 35.206 §2.3)
RAND_LEN = 16
SQN_LEN = 6
AMF_LEN = 2
MAC_LEN = 8  # MAC-A (f1) and MAC-S (f1*)
RES_LEN = 8  # f2: a 64-bit RES
AK_LEN = 6  # f5 and f5*

# (rotation in octets, constant c_i as its last octet) for OUT2..OUT5.
_R2, _C2 = 0, 1
_R3, _C3 = 4, 2
_R4, _C4 = 8, 4
_R5, _C5 = 12, 8
_R1 = 8  # r1 = 64 bits; c1 = 0


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


def _rot(x: bytes, octets: int) -> bytes:
    """TS 35.206 §4.1: rot(x, r) cyclically rotates x by r bits towards the MSB."""
    return x[octets:] + x[:octets]


def _with_const(x: bytes, c: int) -> bytes:
    """x xor c_i, where c_i is zero except in its last octet."""
    return x[:-1] + bytes((x[-1] ^ c,))


def _check_len(name: str, value: bytes, n: int) -> None:
    if len(value) != n:
        raise LocalProtocolError(f"milenage: {name} must be {n} octets, got {len(value)}")


def _aes_block(key: bytes) -> CipherContext:
    # ECB on exactly one block is the raw kernel E_K; one encryptor serves
    # every call of this key (creating one costs more than using it).
    return Cipher(algorithms.AES(key), modes.ECB()).encryptor()  # noqa: S305


def opc_from_op(k: bytes, op: bytes) -> bytes:
    """OPc = OP xor E_K(OP) (TS 35.206 §4.1)."""
    _check_len("K", k, KEY_LEN)
    _check_len("OP", op, KEY_LEN)
    return _xor(op, _aes_block(k).update(op))


@dataclass(frozen=True, slots=True)
class Vector:
    """The outputs of f2..f5 for one RAND (what the USIM returns to the ME)."""

    res: bytes = field(repr=False)
    ck: bytes = field(repr=False)
    ik: bytes = field(repr=False)
    ak: bytes = field(repr=False)


class Milenage:
    """f1..f5* for one subscriber (K, OPc)."""

    __slots__ = ("_enc", "_opc")

    def __init__(self, k: bytes, opc: bytes) -> None:
        _check_len("K", k, KEY_LEN)
        _check_len("OPc", opc, KEY_LEN)
        self._opc = bytes(opc)
        self._enc = _aes_block(bytes(k))

    @classmethod
    def from_op(cls, k: bytes, op: bytes) -> Milenage:
        return cls(k, opc_from_op(k, op))

    def __repr__(self) -> str:
        return "Milenage(<secret>)"

    def _e(self, block: bytes) -> bytes:
        return bytes(self._enc.update(block))

    def _temp(self, rand: bytes) -> bytes:
        _check_len("RAND", rand, RAND_LEN)
        return self._e(_xor(rand, self._opc))

    def _out(self, temp: bytes, rot_octets: int, c: int) -> bytes:
        x = _with_const(_rot(_xor(temp, self._opc), rot_octets), c)
        return _xor(self._e(x), self._opc)

    def _out1(self, rand: bytes, sqn: bytes, amf: bytes) -> bytes:
        _check_len("SQN", sqn, SQN_LEN)
        _check_len("AMF", amf, AMF_LEN)
        temp = self._temp(rand)
        in1 = sqn + amf + sqn + amf
        x = _xor(temp, _rot(_xor(in1, self._opc), _R1))  # c1 = 0
        return _xor(self._e(x), self._opc)

    def f1(self, rand: bytes, sqn: bytes, amf: bytes) -> bytes:
        """MAC-A: the network authentication code in AUTN."""
        return self._out1(rand, sqn, amf)[:MAC_LEN]

    def f1star(self, rand: bytes, sqn: bytes, amf: bytes) -> bytes:
        """MAC-S: the re-synchronisation code in AUTS."""
        return self._out1(rand, sqn, amf)[MAC_LEN:]

    def f2345(self, rand: bytes) -> Vector:
        """RES (f2), CK (f3), IK (f4) and AK (f5) for ``rand``."""
        temp = self._temp(rand)
        out2 = self._out(temp, _R2, _C2)
        return Vector(
            res=out2[8:16],
            ck=self._out(temp, _R3, _C3),
            ik=self._out(temp, _R4, _C4),
            ak=out2[:AK_LEN],
        )

    def f5star(self, rand: bytes) -> bytes:
        """AK*: the anonymity key that conceals SQN_MS in AUTS."""
        return self._out(self._temp(rand), _R5, _C5)[:AK_LEN]
