"""A software USIM: AUTN verification, SQN checks and re-synchronisation.

What the USIM does with (RAND, AUTN), 3GPP TS 33.102 §6.3.3:

1. AK = f5(RAND); SQN = (SQN xor AK) xor AK; AMF and MAC-A from AUTN.
2. XMAC = f1(SQN, RAND, AMF); XMAC != MAC-A -> authentication reject.
   (An AMF different from the configured one, when one is configured, and
   for EAP-AKA' an AMF without its separation bit (RFC 5448 §3.3) are
   rejected the same way; AMF is covered by MAC-A.)
3. SQN outside the accepted range -> synchronisation failure with
   AUTS = (SQN_MS xor f5*(RAND)) || f1*(SQN_MS, RAND, AMF = 0000).
4. Otherwise RES = f2, CK = f3, IK = f4, and SQN is remembered.

The range check is TS 33.102 Annex C.3 with an IND array: SQN = SEQ || IND
with ``ind_bits`` bits of IND (default 5, i.e. an array of 32, which is what
hostapd's hlr_auc_gw and the AAA lab's AuC use: each vector adds 1 to SEQ
and to IND).  A SQN is accepted when

* SEQ > SEQ_MS(IND)                         (C.3.2, freshness per IND slot),
* SEQ - SEQ_MS <= delta                     (C.3.1 wrap-around protection,
  SEQ_MS = the highest SEQ accepted; default delta = 2^28),
* SEQ_MS - SEQ <= age_limit, if configured  (C.3.3 age limit L; off by default).

SQN_MS in AUTS is the highest SQN accepted so far (TS 33.102 §6.3.5).

The state (the SEQ array and SQN_MS) lives in a file that is re-read under
an exclusive lock for every AUTN and rewritten -- temporary file, fsync,
rename, fsync of the directory, mode 0600 -- *before* RES leaves the USIM,
so neither a restart nor a second process on the same file ever accepts an
AUTN twice.  If the state cannot be read or written the USIM answers with
:class:`UsimStateError` and never with RES.
"""

from __future__ import annotations

import contextlib
import fcntl
import hmac
import json
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mipsec.core.eap.milenage import AMF_LEN, RAND_LEN, SQN_LEN, Milenage
from mipsec.core.errors import LocalProtocolError, MipsecError
from mipsec.core.filedigest import read_regular

__all__ = [
    "AUTN_LEN",
    "AuthReject",
    "SqnPolicy",
    "SqnStore",
    "SyncFailure",
    "UmtsAuth",
    "Usim",
    "UsimResult",
    "UsimStateError",
]

AUTN_LEN = 16
_AUTS_AMF = bytes(AMF_LEN)  # TS 33.102 §6.3.3: the dummy AMF of MAC-S is all zeros
_SQN_MAX = (1 << 48) - 1
_FORMAT = "mipsec-usim-sqn/1"


class UsimStateError(MipsecError):
    """The SQN state file cannot be read, validated or written."""


@dataclass(frozen=True, slots=True)
class SqnPolicy:
    """TS 33.102 Annex C parameters (see the module docstring)."""

    ind_bits: int = 5
    delta: int = 1 << 28
    age_limit: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.ind_bits <= 10:
            raise LocalProtocolError("sqn policy: ind_bits must be 0..10")
        if self.delta < 1 or (self.age_limit is not None and self.age_limit < 0):
            raise LocalProtocolError("sqn policy: delta must be >= 1 and age_limit >= 0")


@dataclass(frozen=True, slots=True)
class UmtsAuth:
    """AUTN accepted: RES, CK, IK, and SQN xor AK (AUTN[0..5], needed for CK'/IK')."""

    res: bytes = field(repr=False)
    ck: bytes = field(repr=False)
    ik: bytes = field(repr=False)
    sqn_xor_ak: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class SyncFailure:
    """SQN out of range: AUTS for the network to re-synchronise."""

    auts: bytes


@dataclass(frozen=True, slots=True)
class AuthReject:
    """AUTN not accepted (MAC-A mismatch or an unacceptable AMF)."""

    reason: str


UsimResult = UmtsAuth | SyncFailure | AuthReject


@dataclass
class _State:
    seq: list[int]  # SEQ_MS(i) per IND slot
    sqn_ms: int  # the highest SQN accepted (SEQ_MS || its IND)


class SqnStore:
    """The USIM's SQN state in ``path`` (created from ``initial_sqn`` if absent)."""

    def __init__(
        self, path: Path, initial_sqn: int, policy: SqnPolicy, *, create: bool = True
    ) -> None:
        """``create=False`` (``mipsec check-config``): validate an existing
        file without the lock, and create neither it nor its lock file."""
        if not 0 <= initial_sqn <= _SQN_MAX:
            raise LocalProtocolError("sqn store: initial SQN must fit 48 bits")
        self.path = path
        self.policy = policy
        self._lock_path = path.with_name(path.name + ".lock")
        if not create:
            if path.exists():
                self.load()
            return
        with self.locked():
            if not path.exists():
                seq0 = initial_sqn >> policy.ind_bits
                self.save(_State([seq0] * (1 << policy.ind_bits), initial_sqn))
            self.load()  # validate now: a bad file is a start-up error

    def __repr__(self) -> str:
        return f"SqnStore({str(self.path)!r})"

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        try:
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise UsimStateError(f"cannot open {self._lock_path}: {exc.strerror}") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as exc:  # ENOLCK on some network file systems
                raise UsimStateError(f"cannot lock {self._lock_path}: {exc.strerror}") from None
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def load(self) -> _State:
        try:
            raw = json.loads(read_regular(self.path).decode("utf-8"))  # a FIFO: refused
        except (OSError, ValueError, RecursionError) as exc:  # RecursionError: nested too deep
            raise UsimStateError(f"cannot read {self.path}: {exc}") from None
        n = 1 << self.policy.ind_bits
        try:
            if raw.get("format") != _FORMAT:
                raise ValueError(f"not a {_FORMAT} file")
            if raw.get("ind_bits") != self.policy.ind_bits:
                got, want = raw.get("ind_bits"), self.policy.ind_bits
                raise ValueError(f"written with ind_bits={got}, configured {want}")
            seq = [int(x) for x in raw["seq"]]
            sqn_ms = int(raw["sqn_ms"], 16)
            if len(seq) != n or not all(0 <= s <= _SQN_MAX >> self.policy.ind_bits for s in seq):
                raise ValueError("bad SEQ array")
            if not 0 <= sqn_ms <= _SQN_MAX or max(seq) != sqn_ms >> self.policy.ind_bits:
                raise ValueError("sqn_ms does not match the SEQ array")
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise UsimStateError(f"{self.path}: {exc}") from None
        return _State(seq, sqn_ms)

    def save(self, state: _State) -> None:
        """Atomic and durable: a crash leaves the old or the new state, never half."""
        body = {
            "format": _FORMAT,
            "ind_bits": self.policy.ind_bits,
            "sqn_ms": f"{state.sqn_ms:012x}",
            "seq": state.seq,
        }
        data = (json.dumps(body, separators=(",", ":")) + "\n").encode()
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.fchmod(fd, 0o600)  # independent of the umask
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            dfd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise UsimStateError(f"cannot write {self.path}: {exc.strerror}") from None


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


class Usim:
    """One subscriber's USIM (K, OPc) over a :class:`SqnStore`."""

    def __init__(self, milenage: Milenage, store: SqnStore, amf: bytes | None = None) -> None:
        if amf is not None and len(amf) != AMF_LEN:
            raise LocalProtocolError("usim: AMF must be 2 octets")
        self._m = milenage
        self._store = store
        self._amf = amf

    def __repr__(self) -> str:
        return f"Usim(store={self._store!r})"

    @property
    def sqn_ms(self) -> int:
        """The highest SQN accepted so far (read from the state file)."""
        with self._store.locked():
            return self._store.load().sqn_ms

    def authenticate(self, rand: bytes, autn: bytes, *, separation_bit: bool = False) -> UsimResult:
        """Run the USIM side of AKA; ``separation_bit`` demands AMF bit 0 (EAP-AKA')."""
        if len(rand) != RAND_LEN or len(autn) != AUTN_LEN:
            raise LocalProtocolError("usim: RAND and AUTN are 16 octets each")
        v = self._m.f2345(rand)
        sqn = _xor(autn[:SQN_LEN], v.ak)
        amf, mac_a = autn[SQN_LEN : SQN_LEN + AMF_LEN], autn[SQN_LEN + AMF_LEN :]
        if not hmac.compare_digest(self._m.f1(rand, sqn, amf), mac_a):
            return AuthReject("MAC-A in AUTN does not verify (wrong Ki/OPc or forged AUTN)")
        if self._amf is not None and amf != self._amf:
            return AuthReject(f"AMF {amf.hex()} in AUTN is not the configured AMF")
        if separation_bit and not amf[0] & 0x80:
            return AuthReject(f"AMF {amf.hex()} lacks the separation bit (RFC 5448 §3.3)")
        with self._store.locked():
            state = self._store.load()
            if not self._accept(state, int.from_bytes(sqn, "big")):
                return SyncFailure(self._auts(rand, state.sqn_ms))
            self._store.save(state)  # durable before RES leaves the USIM
        return UmtsAuth(res=v.res, ck=v.ck, ik=v.ik, sqn_xor_ak=autn[:SQN_LEN])

    def _accept(self, state: _State, sqn: int) -> bool:
        p = self._store.policy
        seq, ind = sqn >> p.ind_bits, sqn & ((1 << p.ind_bits) - 1)
        highest = state.sqn_ms >> p.ind_bits
        if seq <= state.seq[ind]:  # C.3.2: not fresh for this IND slot
            return False
        if seq - highest > p.delta:  # C.3.1: too far ahead (wrap-around protection)
            return False
        if p.age_limit is not None and highest - seq > p.age_limit:  # C.3.3
            return False
        state.seq[ind] = seq
        if seq > highest:
            state.sqn_ms = sqn
        return True

    def _auts(self, rand: bytes, sqn_ms: int) -> bytes:
        sqn = sqn_ms.to_bytes(SQN_LEN, "big")
        return _xor(sqn, self._m.f5star(rand)) + self._m.f1star(rand, sqn, _AUTS_AMF)
