"""The peer side of EAP-AKA (RFC 4187) and EAP-AKA' (RFC 5448, RFC 9048), sans-I/O.

One :class:`AkaPeer` per EAP exchange; the MN's EAP framework hands it every
Request of its Type and sends the type-data it returns (in the same Type
form -- legacy or expanded -- as the Request, since AT_MAC covers the header).

What it does, by Subtype of the Request:

* AKA-Identity: answers with the permanent identity (the MN's ``mn_id``) in
  AT_IDENTITY.  No pseudonyms, no fast re-authentication identities: the MN
  always uses its permanent identity, and the AT_NEXT_PSEUDONYM /
  AT_NEXT_REAUTH_ID a server sends are decrypted, checked and dropped.  The
  sequencing rules of RFC 4187 §4.1.5 are enforced (at most three rounds,
  AT_ANY_ID_REQ only first, AT_FULLAUTH_ID_REQ never after
  AT_PERMANENT_ID_REQ).
* AKA-Challenge (RFC 4187 §9.3: RAND and AUTN first, keys and AT_MAC after):
  for EAP-AKA' first AT_KDF (only KDF 1; RFC 5448 §3.2 negotiation when the
  server prefers another), a non-empty AT_KDF_INPUT and the network-name
  check of RFC 5448 §3.1 against ``network_name``; for EAP-AKA the AT_BIDDING
  check of RFC 5448 §4.  Then the USIM: MAC-A failure (or an unacceptable
  AMF) -> AKA-Authentication-Reject; SQN out of range ->
  AKA-Synchronization-Failure with AT_AUTS (and, for EAP-AKA', a copy of the
  AT_KDF list).  Then keys, AT_MAC, AT_CHECKCODE, AT_ENCR_DATA, and the
  response AT_RES (+ AT_CHECKCODE when the server sent one) (+ AT_RESULT_IND
  when the server offered it and ``result_ind`` is on) + AT_MAC.
* AKA-Notification (RFC 4187 §6, §9.10-§9.11): one round; S bit clear =
  failure.  P bit clear: only after the challenge and with a valid AT_MAC
  (echoed in the response).  P bit set: a failure (the S bit set with it is
  an error), without AT_MAC, accepted before *and after* the challenge.
  RFC 4187 §6.1 allows P = 1 only before the challenge; the deviation is
  deliberate and tolerated because hostapd sends "General failure" (16384)
  after refusing a challenge response, and the outcome is failure either
  way -- an unprotected failure ends no more than an attacker who drops
  packets could end.
* Anything malformed or out of sequence: AKA-Client-Error (code 0).

RFC 4137 §4.1 outputs: after the challenge response the decision is
COND_SUCC (methodState MAY_CONT: a notification may follow).  When both
sides asked for result indications the decision stays FAIL (methodState
CONT) until the "Success" notification (then UNCOND_SUCC, DONE): RFC 4187
§6.3.4 forbids accepting EAP-Success before it, and a peer state machine
that accepts Success only with a decision other than FAIL (RFC 4137) then
does the right thing without a special case.  Errors: decision FAIL, DONE.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from mipsec.core.eap.aka_keys import (
    AKA_PRIME_KDF,
    AkaKeys,
    at_mac,
    checkcode,
    ck_ik_prime,
    derive_aka,
    derive_aka_prime,
)
from mipsec.core.eap.method import Decision, MethodState, PeerOutput
from mipsec.core.eap.usim import AuthReject, SyncFailure, Usim, UsimStateError
from mipsec.core.wire import eap_aka as w
from mipsec.core.wire.eap import EapCode, EapPacket, EapType, encode_eap, method_response
from mipsec.core.wire.eap_aka import AkaAttributes, AkaError, Attr, Subtype

__all__ = ["MAX_CHALLENGES", "AkaPeer", "AkaPeerConfig", "network_name_matches"]

MAX_CHALLENGES = 4  # KDF negotiation + re-synchronisation + spare: a loop guard
MAX_IDENTITY_ROUNDS = 3  # RFC 4187 §4.1.5
NOTIFICATION_SUCCESS = 32768
_S_BIT, _P_BIT = 0x8000, 0x4000  # RFC 4187 §6.1
_BIDDING_D = 0x8000  # RFC 5448 §4
_CLIENT_ERROR_UNABLE_TO_PROCESS = 0  # RFC 4187 §10.20

_ID_REQS = frozenset({Attr.AT_PERMANENT_ID_REQ, Attr.AT_ANY_ID_REQ, Attr.AT_FULLAUTH_ID_REQ})
_CHALLENGE_ATTRS = frozenset(
    {
        Attr.AT_RAND,
        Attr.AT_AUTN,
        Attr.AT_MAC,
        Attr.AT_RESULT_IND,
        Attr.AT_CHECKCODE,
        Attr.AT_IV,
        Attr.AT_ENCR_DATA,
        Attr.AT_BIDDING,
        Attr.AT_KDF,
        Attr.AT_KDF_INPUT,
    }
)
_NOTIFICATION_ATTRS = frozenset({Attr.AT_NOTIFICATION, Attr.AT_MAC})
_ENCRYPTED_ATTRS = frozenset({Attr.AT_NEXT_PSEUDONYM, Attr.AT_NEXT_REAUTH_ID, Attr.AT_PADDING})


@dataclass(frozen=True, slots=True)
class AkaPeerConfig:
    """Per-method peer policy (validated by the plugin)."""

    prime: bool  # EAP-AKA' (Type 50) or EAP-AKA (Type 23)
    network_name: str | None = None  # AKA': the name expected in AT_KDF_INPUT; None = no check
    result_ind: bool = False  # answer AT_RESULT_IND with AT_RESULT_IND
    aka_prime_supported: bool = False  # AKA: this MN would use AKA' (AT_BIDDING check)


def network_name_matches(local: str, received: str) -> bool:
    """RFC 5448 §3.1: compare colon-separated fields up to the shorter name, so
    "", "FOO" and "FOO:BAR" all match "FOO:BAR"."""
    a = local.split(":") if local else []
    b = received.split(":")
    return all(x == y for x, y in zip(a, b, strict=False))


class _Fail(Exception):
    """Internal: end the exchange with a Client-Error or an Authentication-Reject."""

    def __init__(self, reason: str, *, reject: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.reject = reject


class AkaPeer:
    """One exchange of the EAP-AKA / EAP-AKA' peer."""

    def __init__(self, usim: Usim, identity: str, config: AkaPeerConfig) -> None:
        self._usim = usim
        self._cfg = config
        self._prime = config.prime
        self._type = EapType.AKA_PRIME if config.prime else EapType.AKA
        self._identity = identity.encode()  # RFC 4187 §7: sent as-is, no NUL
        self._id_rounds: list[Attr] = []
        self._id_msgs = b""  # AKA-Identity requests and responses, for AT_CHECKCODE
        self._challenges = 0  # AKA runs asked for (KDF negotiation rounds excluded)
        self._challenge_seen = False
        self._kdf_request: tuple[int, ...] | None = None  # the list we asked to change
        self._last_kdfs: tuple[int, ...] | None = None
        self._keys: AkaKeys | None = None
        self._authenticated = False  # a challenge response was sent
        self._use_result_ind = False
        self._notified = False
        self._ended = False
        self._ended_in_failure = False
        self._last: tuple[bytes, PeerOutput] | None = None  # for retransmitted requests

    def __repr__(self) -> str:
        name = "EAP-AKA'" if self._prime else "EAP-AKA"
        return f"AkaPeer({name}, authenticated={self._authenticated}, ended={self._ended})"

    # ------------------------------------------------------------ interface

    def msk(self) -> bytes | None:
        return self._keys.msk if self._keys is not None and not self._ended_in_failure else None

    def emsk(self) -> bytes | None:
        return self._keys.emsk if self._keys is not None and not self._ended_in_failure else None

    def process(self, request: EapPacket) -> PeerOutput:
        if request.code is not EapCode.REQUEST or request.method != self._type:
            return PeerOutput(None, MethodState.CONT, Decision.FAIL, "not a request of this method")
        raw = encode_eap(request)
        if self._last is not None and hmac.compare_digest(self._last[0], raw):
            return self._last[1]  # RFC 3748 §4.1: a retransmission gets the same answer
        if self._ended:
            return PeerOutput(None, MethodState.DONE, Decision.FAIL, "method already ended")
        try:
            out = self._dispatch(request, raw)
        except _Fail as f:
            self._ended = True
            self._ended_in_failure = True
            if f.reject:
                data = w.encode_aka(Subtype.AUTHENTICATION_REJECT)
            else:
                code = w.u16(Attr.AT_CLIENT_ERROR_CODE, _CLIENT_ERROR_UNABLE_TO_PROCESS)
                data = w.encode_aka(Subtype.CLIENT_ERROR, [code])
            out = PeerOutput(data, MethodState.DONE, Decision.FAIL, f.reason)
        self._last = (raw, out)
        return out

    # ------------------------------------------------------------ dispatch

    def _dispatch(self, request: EapPacket, raw: bytes) -> PeerOutput:
        try:
            msg = w.decode_aka(request.data)
        except AkaError as exc:
            raise _Fail(f"malformed request: {exc}") from None
        if msg.subtype == Subtype.IDENTITY:
            return self._identity_round(request, raw, msg.attrs)
        if msg.subtype == Subtype.CHALLENGE:
            return self._challenge(request, msg.attrs)
        if msg.subtype == Subtype.NOTIFICATION:
            return self._notification(request, msg.attrs)
        if msg.subtype == Subtype.REAUTHENTICATION:
            raise _Fail("fast re-authentication requested, but this peer never offered it")
        raise _Fail(f"unexpected Subtype {msg.subtype} in a request")

    def _respond(
        self, request: EapPacket, subtype: Subtype, attrs: list[bytes], mac: bool
    ) -> bytes:
        """Type-data of the response; with ``mac``, AT_MAC over the whole response packet."""
        if not mac:
            return w.encode_aka(subtype, attrs)
        assert self._keys is not None
        data = w.encode_aka(subtype, [*attrs, w.reserved_value(Attr.AT_MAC, bytes(16))])
        packet = self._response_packet(request, data)
        value = at_mac(self._prime, self._keys.k_aut, packet)
        return data[: -w.MAC_VALUE_LEN] + value

    @staticmethod
    def _response_packet(request: EapPacket, data: bytes) -> bytes:
        """The whole response as the framework sends it (RFC 4187 §10.15, §10.13)."""
        return encode_eap(method_response(request, data))

    @staticmethod
    def _only(attrs: AkaAttributes, allowed: frozenset[Attr], what: str) -> None:
        """RFC 4187 §6.3.1: wrong attribute types in a request are an error."""
        for a in attrs.present:
            if a not in allowed:
                raise _Fail(f"{a.name} is not allowed in {what}")

    # ------------------------------------------------------------ AKA-Identity

    def _identity_round(self, request: EapPacket, raw: bytes, attrs: AkaAttributes) -> PeerOutput:
        self._only(attrs, _ID_REQS, "AKA-Identity")
        if self._challenge_seen:
            raise _Fail("AKA-Identity after an AKA-Challenge")
        if attrs.id_reqs != 1 or attrs.id_req is None:
            raise _Fail(f"AKA-Identity with {attrs.id_reqs} identity requests (RFC 4187 §9.1: one)")
        req = attrs.id_req
        prev = self._id_rounds
        if len(prev) >= MAX_IDENTITY_ROUNDS:
            raise _Fail("more than three AKA-Identity rounds (RFC 4187 §4.1.5)")
        if req is Attr.AT_ANY_ID_REQ and prev:
            raise _Fail("AT_ANY_ID_REQ after the first AKA-Identity round")
        if Attr.AT_PERMANENT_ID_REQ in prev:
            raise _Fail("AKA-Identity after AT_PERMANENT_ID_REQ was answered")
        if req is Attr.AT_FULLAUTH_ID_REQ and Attr.AT_FULLAUTH_ID_REQ in prev:
            raise _Fail("AT_FULLAUTH_ID_REQ repeated")
        self._id_rounds.append(req)
        # The permanent identity answers all three requests: there is no
        # pseudonym and no fast re-authentication identity (RFC 4187 §4.1.5).
        data = w.encode_aka(Subtype.IDENTITY, [w.string(Attr.AT_IDENTITY, self._identity)])
        # RFC 4187 §10.13: every AKA-Identity round trip goes into the checkcode
        # (a retransmission is answered from the cache above and not counted).
        self._id_msgs += raw + self._response_packet(request, data)
        return PeerOutput(data, MethodState.CONT, Decision.FAIL)

    # ------------------------------------------------------------ AKA-Challenge

    def _challenge(self, request: EapPacket, attrs: AkaAttributes) -> PeerOutput:
        self._only(attrs, _CHALLENGE_ATTRS, "AKA-Challenge")
        if self._authenticated:
            raise _Fail("a second AKA-Challenge after the challenge response")
        if attrs.rand is None or attrs.autn is None or attrs.mac is None:
            raise _Fail("AKA-Challenge without AT_RAND, AT_AUTN or AT_MAC")
        if (attrs.iv is None) != (attrs.encr_data is None):
            raise _Fail("AT_IV and AT_ENCR_DATA must come together")
        self._challenge_seen = True
        self._challenges += 1
        if self._challenges > MAX_CHALLENGES:
            raise _Fail(f"more than {MAX_CHALLENGES} AKA-Challenge rounds")
        if self._prime:
            kdf_select = self._check_kdf(attrs)
            if kdf_select is not None:
                return kdf_select
            network_name = self._check_network_name(attrs)
        else:
            if attrs.kdfs or attrs.kdf_input is not None:
                raise _Fail("AT_KDF / AT_KDF_INPUT in an EAP-AKA challenge")
            self._check_bidding(attrs)
        # RFC 4187 §9.3: RAND and AUTN before anything else.
        try:
            result = self._usim.authenticate(attrs.rand, attrs.autn, separation_bit=self._prime)
        except UsimStateError as exc:
            raise _Fail(f"USIM state unusable, refusing to answer: {exc}") from None
        if isinstance(result, AuthReject):
            raise _Fail(result.reason, reject=True)
        if isinstance(result, SyncFailure):
            extra = [w.u16(Attr.AT_KDF, k) for k in attrs.kdfs] if self._prime else []
            data = w.encode_aka(Subtype.SYNCHRONIZATION_FAILURE, [w.auts(result.auts), *extra])
            reason = "SQN out of range: sent AUTS for re-synchronisation"
            return PeerOutput(data, MethodState.CONT, Decision.FAIL, reason)
        if self._prime:
            assert network_name is not None
            ck, ik = ck_ik_prime(result.ck, result.ik, network_name, result.sqn_xor_ak)
            keys = derive_aka_prime(self._identity, ik, ck)
        else:
            keys = derive_aka(self._identity, result.ik, result.ck)
        self._verify_mac(keys, request, attrs)
        response_attrs = [w.res(result.res)]
        if attrs.checkcode is not None:
            mine = checkcode(self._prime, self._id_msgs)
            if not hmac.compare_digest(attrs.checkcode, mine):
                raise _Fail("AT_CHECKCODE does not match the AKA-Identity messages")
            response_attrs.append(w.reserved_value(Attr.AT_CHECKCODE, mine))
        if attrs.encr_data is not None and attrs.iv is not None:
            self._check_encrypted(keys, attrs.iv, attrs.encr_data)
        self._keys = keys
        self._use_result_ind = attrs.result_ind and self._cfg.result_ind
        if self._use_result_ind:
            response_attrs.append(w.flag(Attr.AT_RESULT_IND))
        data = self._respond(request, Subtype.CHALLENGE, response_attrs, mac=True)
        self._authenticated = True
        if self._use_result_ind:
            # RFC 4187 §6.3.4: with result indications, EAP-Success is only
            # believed after the server's Success notification -- methodState
            # CONT says "not finished" -- but the MSK exists now, so the
            # decision is already COND_SUCC and PROFILE §4 item 4 puts the
            # Done parameters on this very response (the AKA-Challenge one).
            return PeerOutput(data, MethodState.CONT, Decision.COND_SUCC, "waiting for the result")
        return PeerOutput(data, MethodState.MAY_CONT, Decision.COND_SUCC)

    def _check_kdf(self, attrs: AkaAttributes) -> PeerOutput | None:
        """RFC 5448 §3.2; a PeerOutput when the server must re-send with KDF 1 first."""
        kdfs = attrs.kdfs
        if not kdfs:
            raise _Fail("EAP-AKA' challenge without AT_KDF", reject=True)
        if self._kdf_request is not None:
            if kdfs != (AKA_PRIME_KDF, *self._kdf_request):
                raise _Fail("AT_KDF list changed beyond the requested KDF")  # as AT_MAC wrong
            self._kdf_request = None
            rest = kdfs[1:]
        else:
            if self._last_kdfs is not None and kdfs != self._last_kdfs:
                raise _Fail("AT_KDF list differs from the previous challenge")  # as AT_MAC wrong
            # The previous challenge's list was checked then; after a
            # negotiation it holds the one duplicate RFC 5448 §3.2 allows
            # (the chosen KDF in front), which a challenge after a resync
            # repeats -- refused as a duplicate before (found in review).
            rest = () if kdfs == self._last_kdfs else kdfs
        if len(set(rest)) != len(rest):
            raise _Fail("duplicate AT_KDF values", reject=True)
        self._last_kdfs = kdfs
        if kdfs[0] == AKA_PRIME_KDF:
            return None
        if AKA_PRIME_KDF not in kdfs:
            raise _Fail(f"no supported key derivation function offered {kdfs}", reject=True)
        # Ask for KDF 1: only AT_KDF, no AT_MAC (RFC 5448 §3.2).
        self._kdf_request = kdfs
        self._challenges -= 1  # negotiation is not an AKA run
        data = w.encode_aka(Subtype.CHALLENGE, [w.u16(Attr.AT_KDF, AKA_PRIME_KDF)])
        return PeerOutput(data, MethodState.CONT, Decision.FAIL, "asked for KDF 1")

    def _check_network_name(self, attrs: AkaAttributes) -> bytes:
        name = attrs.kdf_input
        if not name:
            raise _Fail("empty or missing AT_KDF_INPUT (RFC 5448 §3.1)", reject=True)
        expected = self._cfg.network_name
        if expected is not None:
            try:
                text = name.decode("utf-8")
            except UnicodeDecodeError:
                raise _Fail("AT_KDF_INPUT is not UTF-8", reject=True) from None
            if not network_name_matches(expected, text):
                raise _Fail(
                    f"network name {text!r} in AT_KDF_INPUT does not match {expected!r}",
                    reject=True,
                )
        return name

    def _check_bidding(self, attrs: AkaAttributes) -> None:
        if (
            self._cfg.aka_prime_supported
            and attrs.bidding is not None
            and attrs.bidding & _BIDDING_D
        ):
            raise _Fail("bidding down: the server prefers EAP-AKA' (RFC 5448 §4)", reject=True)

    def _verify_mac(self, keys: AkaKeys, request: EapPacket, attrs: AkaAttributes) -> None:
        """AT_MAC over the whole request with its MAC value zeroed (RFC 4187 §10.15)."""
        assert attrs.mac is not None
        zeroed = encode_eap(
            EapPacket(
                request.code,
                request.identifier,
                request.type,
                w.zero_mac(request.data, attrs.mac_offset),
                request.expanded,
            )
        )
        if not hmac.compare_digest(at_mac(self._prime, keys.k_aut, zeroed), attrs.mac):
            raise _Fail("invalid AT_MAC")

    def _check_encrypted(self, keys: AkaKeys, iv: bytes, encr: bytes) -> None:
        """Decrypt AT_ENCR_DATA and check its nested attributes; the identities
        it carries are not used (no pseudonyms or fast re-authentication)."""
        dec = Cipher(algorithms.AES(keys.k_encr), modes.CBC(iv)).decryptor()
        plain = dec.update(encr) + dec.finalize()
        try:
            nested = w.decode_attributes(plain)
        except AkaError as exc:
            raise _Fail(f"malformed AT_ENCR_DATA: {exc}") from None
        self._only(nested, _ENCRYPTED_ATTRS, "AT_ENCR_DATA of AKA-Challenge")
        if nested.padding and nested.present[-1] is not Attr.AT_PADDING:
            raise _Fail("AT_PADDING is not the last encrypted attribute")

    # ------------------------------------------------------------ AKA-Notification

    def _notification(self, request: EapPacket, attrs: AkaAttributes) -> PeerOutput:
        self._only(attrs, _NOTIFICATION_ATTRS, "AKA-Notification")
        if attrs.notification is None:
            raise _Fail("AKA-Notification without AT_NOTIFICATION")
        if self._notified:
            raise _Fail("a second AKA-Notification round (RFC 4187 §6.1: one)")
        self._notified = True
        code = attrs.notification
        if code & _P_BIT:
            # A failure the server decided before authenticating us, never
            # protected.  RFC 4187 §6.1 allows it only before the challenge;
            # hostapd also sends one (16384) when it refuses our challenge
            # response, so it is tolerated after the challenge too (see the
            # module docstring): an unprotected failure can only end what an
            # attacker could end anyway by dropping packets.
            if code & _S_BIT:
                raise _Fail(f"notification {code}: P bit set with the S bit")
            if attrs.mac is not None:
                raise _Fail(f"notification {code} with the P bit carries AT_MAC")
            self._ended = self._ended_in_failure = True
            data = w.encode_aka(Subtype.NOTIFICATION)
            return PeerOutput(data, MethodState.DONE, Decision.FAIL, f"server notification {code}")
        if not self._authenticated or self._keys is None:
            raise _Fail(f"notification {code} without the P bit before the challenge")
        if attrs.mac is None:
            raise _Fail(f"notification {code} without AT_MAC")
        self._verify_mac(self._keys, request, attrs)
        data = self._respond(request, Subtype.NOTIFICATION, [], mac=True)
        if not code & _S_BIT:
            self._ended = self._ended_in_failure = True
            return PeerOutput(data, MethodState.DONE, Decision.FAIL, f"server notification {code}")
        if code == NOTIFICATION_SUCCESS and self._use_result_ind:
            self._ended = True
            return PeerOutput(data, MethodState.DONE, Decision.UNCOND_SUCC)
        # Informational (or a Success nobody asked for): nothing changes.
        state = MethodState.CONT if self._use_result_ind else MethodState.MAY_CONT
        return PeerOutput(data, state, Decision.COND_SUCC, f"server notification {code}")
