"""An EAP-AKA / EAP-AKA' server written for the tests (RFC 4187, RFC 5448).

It plays hostapd's part -- AKA-Identity with AT_ANY_ID_REQ, AT_CHECKCODE,
AT_RESULT_IND, AT_BIDDING, AT_IV/AT_ENCR_DATA with a next pseudonym, a
success notification when both sides want result indications -- and the AuC
behind it.  It shares no protocol code with the peer under test: its own
Milenage (integer arithmetic on AES-128), its own attribute packing and
parsing with ``struct``, its own AUTS check.  Only the RFC 4187 §7 / RFC 5448
§3.3 key derivations come from mipsec.core.eap.aka_keys (their own
known-answer tests pin them).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from mipsec.core.eap.aka_keys import ck_ik_prime, derive_aka, derive_aka_prime

REQUEST, RESPONSE, SUCCESS, FAILURE = 1, 2, 3, 4
AKA, AKA_PRIME, EXPANDED = 23, 50, 254
# subtypes
CHALLENGE, AUTH_REJECT, SYNC_FAILURE, IDENTITY, NOTIFICATION, CLIENT_ERROR = 1, 2, 4, 5, 12, 14
# attribute types
AT_RAND, AT_AUTN, AT_RES, AT_AUTS, AT_PADDING, AT_PERMANENT_ID_REQ, AT_MAC = 1, 2, 3, 4, 6, 10, 11
AT_NOTIFICATION, AT_ANY_ID_REQ, AT_IDENTITY, AT_FULLAUTH_ID_REQ = 12, 13, 14, 17
AT_CLIENT_ERROR_CODE, AT_KDF_INPUT, AT_KDF = 22, 23, 24
AT_IV, AT_ENCR_DATA, AT_NEXT_PSEUDONYM, AT_CHECKCODE, AT_RESULT_IND, AT_BIDDING = (
    129,
    130,
    132,
    134,
    135,
    136,
)

# ---------------------------------------------------------------- AuC


class AuC:
    """Milenage on integers (TS 35.206) and hlr_auc_gw-style SQN handling."""

    IND_BITS = 5

    def __init__(self, k: bytes, opc: bytes, amf: bytes, sqn: int) -> None:
        self._aes = Cipher(algorithms.AES(k), modes.ECB()).encryptor()  # noqa: S305
        self.opc = int.from_bytes(opc, "big")
        self.amf = amf
        self.sqn = sqn  # the last SQN used

    def _e(self, x: int) -> int:
        return int.from_bytes(self._aes.update(x.to_bytes(16, "big")), "big")

    @staticmethod
    def _rot(x: int, bits: int) -> int:
        m = (1 << 128) - 1
        return ((x << bits) | (x >> (128 - bits))) & m if bits else x

    def _temp(self, rand: bytes) -> int:
        return self._e(int.from_bytes(rand, "big") ^ self.opc)

    def out1(self, rand: bytes, sqn: int, amf: bytes) -> bytes:
        in1 = (
            (sqn << 80)
            | (int.from_bytes(amf, "big") << 64)
            | (sqn << 16)
            | int.from_bytes(amf, "big")
        )
        x = self._temp(rand) ^ self._rot(in1 ^ self.opc, 64)
        return (self._e(x) ^ self.opc).to_bytes(16, "big")

    def out(self, rand: bytes, r: int, c: int) -> bytes:
        return (self._e(self._rot(self._temp(rand) ^ self.opc, r) ^ c) ^ self.opc).to_bytes(
            16, "big"
        )

    def next_sqn(self) -> int:
        seq = (self.sqn >> self.IND_BITS) + 1
        ind = (self.sqn + 1) & ((1 << self.IND_BITS) - 1)
        self.sqn = ((seq << self.IND_BITS) | ind) & ((1 << 48) - 1)
        return self.sqn

    def vector(self, rand: bytes, sqn: int | None = None) -> dict[str, bytes]:
        sqn = self.next_sqn() if sqn is None else sqn
        out2 = self.out(rand, 0, 1)
        ak = out2[:6]
        mac_a = self.out1(rand, sqn, self.amf)[:8]
        autn = bytes(a ^ b for a, b in zip(sqn.to_bytes(6, "big"), ak)) + self.amf + mac_a
        return {
            "rand": rand,
            "autn": autn,
            "xres": out2[8:],
            "ck": self.out(rand, 32, 2),
            "ik": self.out(rand, 64, 4),
        }

    def resync(self, rand: bytes, auts: bytes) -> bool:
        ak_star = self.out(rand, 96, 8)[:6]
        sqn_ms = int.from_bytes(bytes(a ^ b for a, b in zip(auts[:6], ak_star)), "big")
        mac_s = self.out1(rand, sqn_ms, b"\x00\x00")[8:]
        if not hmac.compare_digest(mac_s, auts[6:]):
            return False
        self.sqn = sqn_ms
        return True


# ---------------------------------------------------------------- packing


def attr(t: int, value: bytes) -> bytes:
    assert (2 + len(value)) % 4 == 0, t
    return struct.pack("!BB", t, (2 + len(value)) // 4) + value


def attr_u16(t: int, v: int) -> bytes:
    return attr(t, struct.pack("!H", v))


def attr_str(t: int, s: bytes) -> bytes:
    return attr(t, struct.pack("!H", len(s)) + s + bytes(-len(s) % 4))


def parse_attrs(data: bytes) -> dict[int, list[bytes]]:
    out: dict[int, list[bytes]] = {}
    i = 0
    while i < len(data):
        t, n = data[i], data[i + 1] * 4
        assert n and i + n <= len(data), "peer sent a malformed attribute"
        out.setdefault(t, []).append(data[i + 2 : i + n])
        i += n
    return out


def eap(
    code: int, ident: int, typ: int, subtype: int, attrs: bytes, *, expanded: bool = False
) -> bytes:
    """An EAP-AKA(') packet; ``expanded``: Type 254, Vendor-Id 0, Vendor-Type ``typ``."""
    head = struct.pack("!BBHI", EXPANDED, 0, 0, typ) if expanded else bytes((typ,))
    body = head + struct.pack("!BBB", subtype, 0, 0) + attrs
    return struct.pack("!BBH", code, ident, 4 + len(body)) + body


@dataclass
class Outcome:
    success: bool | None = None
    reason: str = ""
    subtypes_seen: list[int] = field(default_factory=list)


class AkaServerSim:
    """One EAP-AKA(') server exchange for ``identity`` (the EAP-Response/Identity)."""

    def __init__(
        self,
        auc: AuC,
        identity: str,
        *,
        prime: bool = False,
        network_name: bytes = b"WLAN",
        identity_round: bool = True,
        result_ind: bool = False,
        checkcode: bool = True,
        pseudonym: bool = False,
        bidding_d: bool | None = None,
        kdfs: tuple[int, ...] = (1,),
        notification_first: int | None = None,
        bad_challenge_mac: bool = False,
        bad_autn_mac: bool = False,
        late_failure_code: int = 0,
        expanded: bool = False,
    ) -> None:
        self.auc = auc
        self.identity = identity.encode()
        self.prime = prime
        self.typ = AKA_PRIME if prime else AKA
        self.network_name = network_name
        self.identity_round = identity_round
        self.result_ind = result_ind
        self.want_checkcode = checkcode
        self.pseudonym = pseudonym
        self.bidding_d = bidding_d
        self.kdfs = kdfs
        self.notification_first = notification_first
        self.bad_challenge_mac = bad_challenge_mac
        self.bad_autn_mac = bad_autn_mac
        self.late_failure_code = late_failure_code  # hostapd uses 16384 here
        self.expanded = expanded  # requests as Type 254 / Vendor-Id 0 (RFC 3748 §5.7)
        self.ident = 0x40
        self.id_msgs = b""
        self.state = "start"
        self.pending_req = b""
        self.outcome = Outcome()
        self.msk: bytes | None = None
        self.emsk: bytes | None = None
        self.k_aut = b""
        self.challenges = 0
        self.autns: list[bytes] = []

    # -------------------------------------------------------------- helpers

    def _mac(self, packet: bytes) -> bytes:
        algo = "sha256" if self.prime else "sha1"
        return hmac.new(self.k_aut, packet, algo).digest()[:16]

    def _req(self, subtype: int, attrs: bytes, *, with_mac: bool = False) -> bytes:
        self.ident = (self.ident + 1) & 0xFF
        if not with_mac:
            return eap(REQUEST, self.ident, self.typ, subtype, attrs, expanded=self.expanded)
        attrs += attr(AT_MAC, bytes(18))
        pkt = eap(REQUEST, self.ident, self.typ, subtype, attrs, expanded=self.expanded)
        mac = self._mac(pkt)
        if self.bad_challenge_mac and subtype == CHALLENGE:
            mac = bytes(b ^ 0x01 for b in mac)
        return pkt[:-16] + mac

    def _verify_mac(self, pkt: bytes, attrs: dict[int, list[bytes]]) -> bool:
        if AT_MAC not in attrs:
            return False
        got = attrs[AT_MAC][0][2:]
        i = pkt.rfind(got)
        return hmac.compare_digest(self._mac(pkt[:i] + bytes(16) + pkt[i + 16 :]), got)

    def _end(self, success: bool, reason: str) -> bytes:
        self.outcome.success, self.outcome.reason = success, reason
        self.state = "done"
        return struct.pack("!BBH", SUCCESS if success else FAILURE, self.ident, 4)

    def _notify(self, code: int, reason: str) -> bytes:
        # RFC 4187 §6.3.2: errors reach the peer as a notification, then EAP-Failure.
        self.state = "notified-failure"
        self.outcome.reason = reason
        p_bit = bool(code & 0x4000)
        return self._req(NOTIFICATION, attr_u16(AT_NOTIFICATION, code), with_mac=not p_bit)

    # -------------------------------------------------------------- exchange

    def start(self) -> bytes:
        if self.notification_first is not None:
            self.state = "notified-failure"
            return self._req(NOTIFICATION, attr_u16(AT_NOTIFICATION, self.notification_first))
        if self.identity_round:
            self.state = "identity"
            self.pending_req = self._req(IDENTITY, attr(AT_ANY_ID_REQ, b"\x00\x00"))
            return self.pending_req
        return self._challenge()

    def replay(self, vector: dict[str, bytes]) -> bytes:
        """An AKA-Challenge with another exchange's (RAND, AUTN, CK, IK): what a
        holder of a used vector (an EAP-AKA server gets CK/IK) would send."""
        return self._challenge(again=vector)

    def _challenge(self, again: dict[str, bytes] | None = None) -> bytes:
        self.state = "challenge"
        self.challenges += 1
        v = again or self.auc.vector(os.urandom(16))
        rand = v["rand"]
        autn = v["autn"]
        if self.bad_autn_mac:
            autn = autn[:-1] + bytes((autn[-1] ^ 0x80,))
        self.autns.append(autn)
        self.vector = v
        ik, ck = v["ik"], v["ck"]
        if self.prime:
            ck, ik = ck_ik_prime(ck, ik, self.network_name, v["autn"][:6])
            keys = derive_aka_prime(self.identity, ik, ck)
        else:
            keys = derive_aka(self.identity, ik, ck)
        self.k_aut, self.k_encr, self.msk, self.emsk = keys.k_aut, keys.k_encr, keys.msk, keys.emsk
        a = attr(AT_RAND, b"\x00\x00" + rand) + attr(AT_AUTN, b"\x00\x00" + autn)
        if self.prime:
            a += b"".join(attr_u16(AT_KDF, k) for k in self.kdfs)
            a += attr_str(AT_KDF_INPUT, self.network_name)
        if self.pseudonym:
            a += self._encrypted_pseudonym()
        if self.want_checkcode:
            h = hashlib.sha256 if self.prime else hashlib.sha1
            a += attr(
                AT_CHECKCODE, b"\x00\x00" + (h(self.id_msgs).digest() if self.id_msgs else b"")
            )
        if self.result_ind:
            a += attr(AT_RESULT_IND, b"\x00\x00")
        if not self.prime and self.bidding_d is not None:
            a += attr_u16(AT_BIDDING, 0x8000 if self.bidding_d else 0)
        return self._req(CHALLENGE, a, with_mac=True)

    def _encrypted_pseudonym(self) -> bytes:
        iv = os.urandom(16)
        plain = attr_str(AT_NEXT_PSEUDONYM, b"7pseudo-" + os.urandom(4).hex().encode())
        if len(plain) % 16:
            plain += attr(AT_PADDING, bytes(16 - len(plain) % 16 - 2))
        enc = Cipher(algorithms.AES(self.k_encr), modes.CBC(iv)).encryptor()
        ct = enc.update(plain) + enc.finalize()
        return attr(AT_IV, b"\x00\x00" + iv) + attr(AT_ENCR_DATA, b"\x00\x00" + ct)

    def handle(self, pkt: bytes) -> bytes:
        code, ident, length = struct.unpack("!BBH", pkt[:4])
        assert code == RESPONSE and ident == self.ident and length == len(pkt)
        # The response in the request's Type form (what its AT_MAC covers).
        head = eap(RESPONSE, ident, self.typ, 0, b"", expanded=self.expanded)[4:-3]
        assert pkt[4 : 4 + len(head)] == head, "response of another EAP type or Type form"
        subtype = pkt[4 + len(head)]
        self.outcome.subtypes_seen.append(subtype)
        attrs = parse_attrs(pkt[4 + len(head) + 3 :])
        if subtype == CLIENT_ERROR:
            code_ = struct.unpack("!H", attrs[AT_CLIENT_ERROR_CODE][0])[0]
            if self.state == "notified-success":
                return self._end(True, "client error after success notification")
            return self._end(False, f"client error {code_}")
        if subtype == AUTH_REJECT:
            return self._end(False, "authentication reject")
        if self.state == "identity":
            assert subtype == IDENTITY
            ident_ = attrs[AT_IDENTITY][0]
            n = struct.unpack("!H", ident_[:2])[0]
            self.identity = ident_[2 : 2 + n]
            self.id_msgs += self.pending_req + pkt
            return self._challenge()
        if self.state == "challenge":
            if subtype == SYNC_FAILURE:
                if not self.auc.resync(self.vector["rand"], attrs[AT_AUTS][0]):
                    return self._notify(16384, "bad AUTS")
                if self.prime:
                    kdfs = tuple(struct.unpack("!H", v)[0] for v in attrs.get(AT_KDF, []))
                    assert kdfs == self.kdfs, "sync failure must copy the AT_KDF list"
                if self.challenges >= 3:
                    return self._notify(16384, "too many challenges")
                return self._challenge()
            assert subtype == CHALLENGE
            if self.prime and AT_MAC not in attrs and AT_KDF in attrs:
                # KDF negotiation (RFC 5448 §3.2): re-send with the choice first.
                choice = struct.unpack("!H", attrs[AT_KDF][0])[0]
                assert choice in self.kdfs[1:]
                self.kdfs = (choice, *self.kdfs)
                return self._challenge(again=self.vector)  # the peer ran no AKA yet
            if not self._verify_mac(pkt, attrs):
                return self._notify(self.late_failure_code, "bad AT_MAC")
            res = attrs[AT_RES][0]
            bits = struct.unpack("!H", res[:2])[0]
            if bits != 64 or not hmac.compare_digest(res[2:10], self.vector["xres"]):
                return self._notify(self.late_failure_code, "bad RES")
            if self.want_checkcode and AT_CHECKCODE in attrs:
                h = hashlib.sha256 if self.prime else hashlib.sha1
                want = h(self.id_msgs).digest() if self.id_msgs else b""
                if attrs[AT_CHECKCODE][0][2:] != want:
                    return self._notify(self.late_failure_code, "bad AT_CHECKCODE")
            if self.result_ind and AT_RESULT_IND in attrs:
                self.state = "notified-success"
                return self._req(NOTIFICATION, attr_u16(AT_NOTIFICATION, 32768), with_mac=True)
            return self._end(True, "challenge ok")
        if self.state == "notified-success":
            assert subtype == NOTIFICATION
            assert self._verify_mac(pkt, attrs), "notification response without a good AT_MAC"
            return self._end(True, "success notification acknowledged")
        if self.state == "notified-failure":
            assert subtype == NOTIFICATION
            return self._end(False, self.outcome.reason or "failure notification acknowledged")
        raise AssertionError(f"unexpected subtype {subtype} in state {self.state}")
