"""``mipsec init``: a working lab on loopback.

Writes a test PKI, a credentials file with one demo MN and random PSK, the
key-wrapping keys of the HAC's and the HA's SA stores, and ``hac.toml``,
``ha.toml``, ``mn.toml``.  Every mode is set explicitly, whatever the umask:
secrets (private keys, credentials, PSK, key-wrapping keys) 0600, the
directories init creates 0700 (they hold secrets), certificates and
configuration files 0644.  The lab HAC policy enables all five
ciphersuites so each can be exercised -- unlike the built-in default of
PROFILE §5, which offers only the encrypting ones.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import os
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mipsec.core.errors import ConfigError
from mipsec.core.fsutil import PRIVATE_DIR, PRIVATE_FILE, PUBLIC_FILE, write_file
from mipsec.core.keywrap import create_key_file
from mipsec.core.pki import init_pki, pki_paths
from mipsec.core.tomltext import toml_value as q

DEMO_MN_ID = "demo@mipsec.test"
LAB_REALM = "mipsec.test"
EAP_NAME = "eap.mipsec.test"  # the dNSName of the HAC's EAP-TLS server certificate
HAC_NAME = "hac.mipsec.test"
LAB_SUITES = [
    "AES_128_CBC_SHA256",
    "AES_128_CBC_SHA",
    "DES3_EDE_CBC_SHA",
    "NULL_SHA256",
    "NULL_SHA",
]


def _write(path: Path, text: str, mode: int = PUBLIC_FILE) -> None:
    write_file(path, text.encode(), mode)


@dataclass(frozen=True)
class Usim:
    """A lab subscriber for the software USIM (``--usim IMSI,KI,OPC,AMF,SQN``)."""

    imsi: str
    ki: str
    opc: str
    amf: str
    sqn: str
    mnc_digits: int = 2

    @classmethod
    def parse(cls, text: str, mnc_digits: int = 2) -> Usim:
        parts = [p.strip() for p in text.split(",")]
        if len(parts) != 5:
            raise ValueError("--usim: expected IMSI,KI,OPC,AMF,SQN")
        imsi, ki, opc, amf, sqn = parts
        if not (imsi.isascii() and imsi.isdigit() and 6 <= len(imsi) <= 15):
            raise ValueError("--usim: IMSI must be 6 to 15 digits")
        for name, value, digits in (("KI", ki, 32), ("OPC", opc, 32), ("AMF", amf, 4),
                                    ("SQN", sqn, 12)):  # fmt: skip
            try:
                ok = len(value) == digits and bytes.fromhex(value) is not None
            except ValueError:
                ok = False
            if not ok:
                raise ValueError(f"--usim: {name} must be {digits} hex digits")
        return cls(imsi, ki.lower(), opc.lower(), amf.lower(), sqn.lower(), mnc_digits)

    def nai(self, prefix: str) -> str:
        """3GPP TS 23.003 §14 permanent NAI: 0<IMSI> (AKA) or 6<IMSI> (AKA')."""
        mcc = self.imsi[:3]
        mnc = self.imsi[3 : 3 + self.mnc_digits].rjust(3, "0")
        return f"{prefix}{self.imsi}@wlan.mnc{mnc}.mcc{mcc}.3gppnetwork.org"


def _mn_toml(title: str, mn_table: str, hac_port: int, ca: str, extra: str = "") -> str:
    """One lab MN configuration: the identity part, then what every lab MN shares."""
    return f"""# {title} (mipsec init).
log_level = "info"

[mn]
{mn_table}
[hac]
host = "127.0.0.1"
port = {hac_port}
server_name = {q(HAC_NAME)}
ca = {q(ca)}
timeout = 10              # each wait: the connect and handshake, each response
exchange_timeout = 120    # the whole bootstrap

[sa]
scope = 1
suites = ["AES_128_CBC_SHA256", "AES_128_CBC_SHA"]

[registration]            # Binding Update to the HA after bootstrap
enabled = true
lifetime = 600
transport = "auto"        # IPv6 to mip6-haa-ip6 when provisioned, else IPv4
{extra}"""


def _hac_eap(
    radius: tuple[str, int] | None, secret_file: Path | None, eap_tls: dict[str, str]
) -> str:
    """The HAC's EAP: EAP-TLS run by the HAC itself for the lab realm; with
    ``radius``, EAP of every other realm passes through to that server (RFC 3579)."""
    tls = f"""
[methods.eap.tls]         # EAP-TLS served by the HAC (RFC 5216 / RFC 9190)
cert = {q(eap_tls["cert"])}  # the EAP server certificate (eap.mipsec.test), not the MHAuth one
key = {q(eap_tls["key"])}
ca = {q(eap_tls["ca"])}           # the only CA for MN client certificates
identity_policy = "rfc822name"   # an rfc822Name SAN must equal mn-id
"""
    if radius is None:
        return f"""
[methods.eap]             # EAP next to PSK (RFC 6618 §5.9)
types = ["tls"]
{tls}"""
    host, port = radius
    return f"""
# EAP of every realm but the lab's own passes through to the RADIUS server
# (RFC 3579): EAP-AKA/AKA' for SIM identities, or whatever it supports.
[policy.realms]
{q(LAB_REALM)} = ["psk", "eap"]
"*" = ["eap"]

[methods.eap]
types = ["tls"]
realms = {{ {q(LAB_REALM)} = ["tls"] }}
routes = [
  {{ match = {q(LAB_REALM)}, backend = "local" }},
  {{ match = "*", backend = "aaa" }},
]
{tls}
[methods.eap.backends.aaa]
backend = "radius"
servers = [{{ host = {q(host)}, port = {port}, secret_file = {q(str(secret_file))} }}]
nas_identifier = "mipsec-lab-hac"
"""


def _usim_files(directory: Path, usim: Usim) -> None:
    _write(directory / "usim.ki", usim.ki + "\n", PRIVATE_FILE)
    _write(directory / "usim.opc", usim.opc + "\n", PRIVATE_FILE)


def _aka_table(method: str, usim: Usim) -> str:
    extra = 'network_name = "WLAN"           # what the lab\'s AAA server puts in AT_KDF_INPUT\n'
    return f"""
[eap]
methods = ["{method}"]

[eap.{method}]                 # the software USIM (Milenage, TS 35.206)
ki_file = "usim.ki"
opc_file = "usim.opc"
amf = {q(usim.amf)}
sqn = {q(usim.sqn)}              # initial SQN_MS; then usim.sqn holds the state
sqn_file = "usim.sqn"          # one USIM: shared by mn-aka.toml and mn-aka-prime.toml
{extra if method == "aka-prime" else ""}"""


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """A TCP connection to ``host``/``port`` succeeds now (readiness polling).

    A lab's ports may come from the ephemeral range (``free_port`` when the
    range leaves no room below it), so a
    connect while nothing listens yet may draw ``port`` itself as its source
    port and connect to itself (TCP simultaneous open): that "success" would
    also hold the port the role is about to bind, which then fails with
    "Address already in use".  The source port is bound first and is never
    ``port``.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.bind((host, 0))
            if s.getsockname()[1] == port:
                return False
            s.connect((host, port))
    except OSError:
        return False
    return True


# Lab ports are drawn below the kernel's ephemeral range: a port the kernel
# hands out on its own (bind to 0, the source port of an outgoing
# connection) can then never be one the lab is about to listen on.  Drawing
# them from the ephemeral range made a role fail now and then with "Address
# already in use" when some connection had taken its port as a source port
# in between (seen in CI, tests/integration/test_cli.py).
_LAB_PORTS_LOW = 20000
# Handed out lately by this process: not again, since a caller may ask for
# several before it binds any (a lab's HAC, HA and metrics ports).
_RECENT: list[int] = []


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


# Several processes drawing lab ports at once (parallel test workers, two
# benches) each check a port free and bind it later: two of them may draw the
# same port in between, and one role then answers the other's clients.  Each
# may be given a range of its own in this variable, "LOW-HIGH" (inclusive).
PORTS_ENV = "MIPSEC_LAB_PORTS"


def lab_port_range() -> tuple[int, int]:
    """The range lab ports are drawn from: ``MIPSEC_LAB_PORTS`` when set,
    else from ``_LAB_PORTS_LOW`` to just below the ephemeral range.

    A malformed ``MIPSEC_LAB_PORTS`` is a ``ConfigError`` naming it (one
    line from ``mipsec init`` and ``mipsec demo``, exit 2).
    """
    text = os.environ.get(PORTS_ENV)
    if text is None:
        return _LAB_PORTS_LOW, _ephemeral_low() - 1
    low_s, sep, high_s = text.partition("-")
    try:
        low, high = int(low_s), int(high_s)
    except ValueError:
        low = high = -1
    if not sep or not 1024 <= low <= high <= 65535:
        raise ConfigError("(environment)", PORTS_ENV, f"{text!r} is not LOW-HIGH within 1024-65535")
    return low, high


_DRAWS = 200  # random draws before a port search gives up


def _candidates(low: int, high: int, given: bool, kind: int) -> Iterator[int]:
    """Ports to try: from ``low``-``high`` when it was given (``MIPSEC_LAB_PORTS``,
    whatever its size: outside it a port may be another drawer's) or has
    room (1,000 ports), else from the kernel (bind to 0).  A range narrower
    than the number of draws is tried whole, each port once, in random order."""
    if given and high - low < _DRAWS:
        ports = list(range(low, high + 1))
        secrets.SystemRandom().shuffle(ports)
        yield from ports
        return
    for _ in range(_DRAWS):
        if given or high - low >= 1000:
            yield secrets.choice(range(low, high + 1))
        else:
            with socket.socket(socket.AF_INET, kind) as s:
                s.bind(("127.0.0.1", 0))
                port = int(s.getsockname()[1])
            yield port  # closed first: the caller binds it


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port free now for both TCP and UDP (the HA uses one number for both).

    Drawn at random from ``MIPSEC_LAB_PORTS`` when set, whatever its size
    (none free: a ``ConfigError`` naming it); else from below the
    ephemeral range when that has room (1,000 ports), else from the kernel
    (bind to 0).
    """
    low, high = lab_port_range()
    given = PORTS_ENV in os.environ
    for port in _candidates(low, high, given, kind):
        if port in _RECENT:
            continue
        try:
            with (
                socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t,
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u,
            ):
                t.bind(("127.0.0.1", port))
                u.bind(("127.0.0.1", port))
        except OSError:
            continue
        if not _claim(port):
            continue
        _RECENT.append(port)
        del _RECENT[:-64]
        return port
    if given:
        raise ConfigError(
            "(environment)",
            PORTS_ENV,
            f"no port free for TCP and UDP on 127.0.0.1 in {low}-{high} "
            "(a lab takes four: HAC, HA and two metrics)",
        )
    raise OSError("no free port on 127.0.0.1")


# A port one process drew is not drawn by another for this long, across
# every process of this user on the machine (``_claim``): from the draw to
# the bind takes a role seconds, a bench's lab a minute at most.
CLAIM_S = 120.0


def _claims_dir(base: Path | None = None) -> Path | None:
    """Where drawn ports are claimed: ``mipsec-lab-ports-UID`` in ``base``,
    by default ``/tmp`` (not ``$TMPDIR``, which a test or bench may point
    elsewhere for the processes it starts), a directory of this user's that
    nobody else may write; None when it cannot be had (ports are then drawn
    as before, unclaimed)."""
    if base is None:
        base = Path("/tmp") if os.path.isdir("/tmp") else Path(tempfile.gettempdir())  # noqa: S108 (owner, mode and symlink checked below)
    path = base / f"mipsec-lab-ports-{os.getuid()}"
    try:
        path.mkdir(mode=0o700, exist_ok=True)
        st = os.lstat(path)
    except OSError:
        return None
    if not os.path.isdir(path) or os.path.islink(path) or st.st_uid != os.getuid():
        return None
    if st.st_mode & 0o022:
        return None
    return path


def _claim(port: int) -> bool:
    """Claim ``port`` for this draw among every process that draws lab ports
    (a file named after it, made with O_EXCL); False when another drew it
    less than ``CLAIM_S`` ago.

    Each process's ``_RECENT`` keeps it from handing a port out twice, but
    not from handing out one another process drew and has not bound yet: a
    bench's second ``mipsec init`` drew the first lab's HAC metrics port,
    and that HAC failed with "Address already in use" (a clean-clone CI
    run, thirtieth session).  A claim older than ``CLAIM_S`` is stale and
    taken over."""
    where = _claims_dir()
    if where is None:
        return True
    path = where / str(port)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, PRIVATE_FILE)
    except FileExistsError:
        try:
            if time.time() - os.stat(path).st_mtime < CLAIM_S:
                return False
            os.utime(path)  # stale: this draw's now
        except OSError:
            return False
        return True
    except OSError:
        return True  # nowhere to record it: drawn as before
    os.close(fd)
    return True


def taken_elsewhere(ports: Iterable[int]) -> None:
    """Ports another process chose and may not have bound yet (``mipsec
    init`` run as a command picks the lab's metrics ports itself): this
    process's ``free_port`` does not hand them out for a while, as if it had
    drawn them."""
    for port in ports:
        if port not in _RECENT:
            _RECENT.append(port)
    del _RECENT[:-64]


def _metrics_ports(taken: tuple[int, ...]) -> tuple[int, int]:
    """Two ports free now for the roles' metrics, distinct from each other and
    from the lab's own ports (the kernel may hand one out twice in a row)."""
    picked: list[int] = []
    while len(picked) < 2:
        port = free_port()
        if port not in taken and port not in picked:
            picked.append(port)
    return picked[0], picked[1]


def _metrics_table(port: int) -> str:
    return f"""
[metrics]                 # Prometheus: GET /metrics and /healthz (management address only)
address = "127.0.0.1"
port = {port}
"""


def _control_path(config_file: Path, role: str) -> str | None:
    """The role's control socket; None when the lab's path is too long for one
    (the role then runs without it, saying so in a warning)."""
    from mipsec.core.config import load_config
    from mipsec.core.control import socket_path

    try:
        return str(socket_path(load_config(config_file, role), role, str(config_file)))
    except ConfigError:
        return None


class LabExistsError(FileExistsError):
    """``mipsec init`` found one of its files (or a non-directory where it
    needs a directory) already there; it wrote nothing.  ``path``: the first
    such name, ``more``: how many others of its files exist too."""

    def __init__(self, path: Path, more: int = 0, what: str = "already exists") -> None:
        super().__init__(errno.EEXIST, what, str(path))
        self.path, self.more, self.what = path, more, what

    def __str__(self) -> str:
        more = f" (and {self.more} more of the files init writes)" if self.more else ""
        return f"{self.path} {self.what}{more}"


def lab_files(directory: Path, usim: bool = False) -> list[Path]:
    """Every file ``init_lab`` writes in ``directory``, in the order it puts
    them there: a file before any configuration naming it."""
    names = ["hac-sa.key", "ha-sa.key", "credentials.toml", "mn.psk"]
    if usim:
        names += ["usim.ki", "usim.opc"]
    names += ["hac.toml", "ha.toml", "mn.toml", "mn-eap-tls.toml"]
    if usim:
        names += ["mn-aka.toml", "mn-aka-prime.toml"]
    pki = list(vars(pki_paths(directory / "pki")).values())
    return pki + [directory / n for n in names]


def _state_files(directory: Path, usim: bool) -> list[Path]:
    """Files the new lab's roles would take over as their own state: a store
    left by another lab holds SAs wrapped under another key, a USIM's SQN
    another subscriber's."""
    names = ["hac-sa.sqlite", "ha-sa.sqlite", *(["usim.sqn"] if usim else [])]
    return [directory / n for n in names]


def _refuse_existing(directory: Path, usim: bool) -> None:
    """``LabExistsError`` unless every name init writes is free."""
    for d in (directory, directory / "pki"):
        if os.path.lexists(d) and not d.is_dir():
            raise LabExistsError(d, what="exists and is not a directory")
    found = [
        p
        for p in [*lab_files(directory, usim), *_state_files(directory, usim)]
        if os.path.lexists(p)
    ]
    if found:
        raise LabExistsError(found[0], len(found) - 1)


# The staging directory of a running init, and its lock: held (flock) for the
# whole run, so that a later init can tell an init killed outright (the lock
# free) from one running now (held).
STAGE_PREFIX = ".mipsec-init-"
STAGE_LOCK = ".lock"
# A staging directory without its lock (killed in the instant between the two,
# or left by a mipsec before the twenty-ninth session) is taken for stale once
# it is this old: a live init takes its lock at once.
STAGE_UNLOCKED_STALE_S = 60.0


def reclaim_interrupted(directory: Path) -> int:
    """What an init killed outright (SIGKILL, the OOM killer, a power cut:
    no cleanup runs) left in ``directory``, removed: its staging directory
    -- every key of that run in it -- and the files it had already linked
    into place.  Only those: a file is removed when it is the very file
    staged (same device and inode: a hard link that run made), never a file
    of the same name that is anyone else's.  A staging directory whose lock
    is held (an init running now), or owned by another user, is left alone.
    Returns how many linked files went."""
    if not directory.is_dir() or directory.is_symlink():
        return 0
    removed = 0
    for stage in sorted(directory.glob(STAGE_PREFIX + "*")):
        try:
            st = os.lstat(stage)
        except OSError:
            continue
        if not os.path.isdir(stage) or os.path.islink(stage) or st.st_uid != os.geteuid():
            continue
        try:
            fd: int | None = os.open(stage / STAGE_LOCK, os.O_RDWR | os.O_NOFOLLOW)
        except FileNotFoundError:
            if time.time() - st.st_mtime < STAGE_UNLOCKED_STALE_S:
                continue  # possibly an init between its mkdtemp and its lock
            fd = None
        except OSError:
            continue
        try:
            if fd is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # an init running now
            for path in lab_files(directory, usim=True):
                try:
                    placed, staged = os.lstat(path), os.lstat(stage / path.relative_to(directory))
                except OSError:
                    continue
                if (placed.st_dev, placed.st_ino) == (staged.st_dev, staged.st_ino):
                    path.unlink()
                    removed += 1
            shutil.rmtree(stage, ignore_errors=True)
            pki = directory / "pki"
            with contextlib.suppress(OSError):
                pki.rmdir()  # only if that run's files were all it held
        finally:
            if fd is not None:
                os.close(fd)
    return removed


def _check_ports(hac_port: int, ha_port: int, radius: tuple[str, int] | None) -> None:
    for option, port in (("--hac-port", hac_port), ("--ha-port", ha_port)):
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise ValueError(f"{option}: {port!r} is not a port number (1-65535)")
    if hac_port == ha_port:
        raise ValueError(
            f"--ha-port: {ha_port} is also --hac-port (the HA's TCP listener and the HAC's"
            " cannot share it)"
        )
    if radius is not None and radius[1] == ha_port and _loopback(radius[0]):
        raise ValueError(
            f"--radius: UDP port {ha_port} on the loopback is also --ha-port (the HA binds it)"
        )


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host.lower() == "localhost"


def loopback6_usable() -> bool:
    """This host has ``::1`` (IPv6 on, and on its loopback): without it a lab
    provisioning ``::1`` sends its MNs to an address they cannot reach."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


def _make_dirs(path: Path, created: list[Path]) -> None:
    """``path`` and its missing parents; each one made is appended to ``created``."""
    missing: list[Path] = []
    p = path
    while not os.path.lexists(p):
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        d.mkdir(mode=PRIVATE_DIR if d == path else 0o777)
        created.append(d)
    if missing:
        os.chmod(path, PRIVATE_DIR)  # mkdir's mode is filtered by the umask


def init_lab(
    directory: Path,
    *,
    hac_port: int = 7872,
    ha_port: int = 7873,
    radius: tuple[str, int] | None = None,
    radius_secret_file: Path | None = None,
    usim: Usim | None = None,
    notice: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Write a lab in ``directory`` (made if missing) and describe it.

    All or nothing: every option is checked, every name init writes found
    free (else ``LabExistsError``: nothing is ever written over) and the
    metrics ports drawn before anything is written; the lab is then built in
    a temporary directory inside ``directory`` and linked into place file by
    file (a link never replaces a file).  On any failure exactly what this
    call made is removed: its files, and the directories it created.  What
    an init killed outright left (``reclaim_interrupted``) is removed first;
    ``notice`` is told so in one line.
    """
    if (radius is None) != (radius_secret_file is None):
        raise ValueError("--radius and --radius-secret-file go together")
    if usim is not None and radius is None:
        raise ValueError("--usim needs --radius (the AAA server runs EAP-AKA)")
    _check_ports(hac_port, ha_port, radius)
    if radius is not None:
        try:
            q(radius[0])
        except ValueError as exc:
            raise ValueError(f"--radius: {exc}") from None
    if radius_secret_file is not None:
        try:
            q(str(radius_secret_file))
        except ValueError as exc:
            raise ValueError(f"--radius-secret-file: {exc}") from None
    directory = directory.resolve()
    reclaimed = reclaim_interrupted(directory)
    if reclaimed and notice is not None:
        notice(
            f"{directory}: removed what an interrupted mipsec init left there"
            f" ({reclaimed} files it had put in place, and its staging directory)"
        )
    _refuse_existing(directory, usim is not None)
    taken = (hac_port, ha_port, *([radius[1]] if radius is not None else []))
    metrics_ports = _metrics_ports(taken)
    ipv6 = loopback6_usable()
    dirs: list[Path] = []  # made by this call, outermost first
    files: list[Path] = []  # linked into place by this call
    try:
        _make_dirs(directory, dirs)
        stage = Path(tempfile.mkdtemp(prefix=STAGE_PREFIX, dir=directory))
        lock = os.open(stage / STAGE_LOCK, os.O_CREAT | os.O_EXCL | os.O_RDWR, PRIVATE_FILE)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)  # held until the stage is gone
            psk = _write_lab(
                stage,
                hac_port=hac_port,
                ha_port=ha_port,
                metrics_ports=metrics_ports,
                ipv6=ipv6,
                radius=radius,
                radius_secret_file=radius_secret_file,
                usim=usim,
            )
            for path in lab_files(directory, usim is not None):
                if path.parent != directory and not os.path.lexists(path.parent):
                    _make_dirs(path.parent, dirs)  # pki/, mode 0700: it holds the keys
                # Listed before the link: a Ctrl-C that lands as the link
                # completes must still find it to remove (review).
                files.append(path)
                try:
                    os.link(stage / path.relative_to(directory), path)
                except FileExistsError:
                    files.pop()  # someone else's, made since the check: never removed
                    raise LabExistsError(path) from None
        finally:
            shutil.rmtree(stage, ignore_errors=True)
            os.close(lock)
        return _describe(directory, psk, hac_port, ha_port, metrics_ports, usim)
    except BaseException:
        for path in reversed(files):
            with contextlib.suppress(OSError):
                path.unlink()
        for d in reversed(dirs):
            with contextlib.suppress(OSError):
                d.rmdir()  # only if empty: never what someone else put there
        raise


def _write_lab(
    directory: Path,
    *,
    hac_port: int,
    ha_port: int,
    metrics_ports: tuple[int, int],
    ipv6: bool,
    radius: tuple[str, int] | None,
    radius_secret_file: Path | None,
    usim: Usim | None,
) -> bytes:
    """Every file of ``lab_files`` in ``directory`` (empty); the demo MN's PSK."""
    pki = init_pki(directory / "pki")
    # The SA stores wrap SA keys under these (plugins/sa_store_sqlite.py); each
    # role has its own store and its own key.
    for name in ("hac-sa.key", "ha-sa.key"):
        create_key_file(directory / name)
    psk = secrets.token_bytes(32)

    def rel(p: Path) -> str:
        return q(os.path.relpath(p, directory))

    eap_tls = {
        "cert": os.path.relpath(pki.eap_cert, directory),
        "key": os.path.relpath(pki.eap_key, directory),
        "ca": os.path.relpath(pki.ca_cert, directory),
    }
    # Without ::1 on this host (IPv6 off) the lab is IPv4 only: an MN sent
    # to an IPv6 HA address it has no route to registers with nobody.
    listen = q(["127.0.0.1", "::1"] if ipv6 else ["127.0.0.1"])
    no6 = "# no address6: this host had no ::1 when the lab was made"
    hac_address6 = 'address6 = "::1"          # mip6-haa-ip6' if ipv6 else no6
    ha_address6 = (
        'address6 = "::1"          # as provisioned to MNs: the MH checksum uses it (PROFILE §8)'
        if ipv6
        else no6
    )

    _write(
        directory / "credentials.toml",
        "# MN credentials for the HAC (credential backend 'toml').\n"
        f"[[mn]]\nmn_id = {q(DEMO_MN_ID)}\npsk_hex = {q(psk.hex())}\n",
        PRIVATE_FILE,
    )
    hac_toml = f"""# HAC of the mipsec lab (mipsec init).
log_level = "info"

[hac]
listen = {listen}
port = {hac_port}
cert = {rel(pki.hac_cert)}
key = {rel(pki.hac_key)}
strict_rfc6618 = false      # true pins TLS 1.2 (RFC 6618 as written)
handshake_timeout = 10     # from the TCP accept
request_timeout = 10       # each request, from its first octet to its last
exchange_timeout = 120     # the whole exchange, from the TCP accept to the final response
max_connections = 1024     # all held, handshakes included; the longest waiting is evicted
max_in_progress = 128      # SA issues at once; beyond, 503 with retry-after

[policy]
methods = ["psk", "eap"]
# Lab policy: all five suites, so each can be exercised. The built-in default
# offers only the encrypting suites (PROFILE §5).
suites = {q(LAB_SUITES)}
max_scope = 1
sa_lifetime = 3600
min_rebootstrap_interval = 0  # the lab bootstraps one MN back to back; 10-60 s in production

[credentials]
backend = "toml"
path = "credentials.toml"

[sa_store]
backend = "sqlite"
path = "hac-sa.sqlite"
key_file = "hac-sa.key"      # SA keys are wrapped (AES-256-GCM) under this key

[home_addresses]
allocator = "pool"
ip6_prefix = "2001:db8:1::/64"
ip4_pool = "192.0.2.0/24"

[ha_selection]
selector = "fewest-sas"

# The HA is a separate process; SAs reach it over mutually authenticated
# TLS (PROFILE §9) before the MN gets its 200.
[[ha]]
id = "ha1"
{hac_address6}
address4 = "127.0.0.1"    # mip6-haa-ip4
port = {ha_port}              # MN-HA UDP port (mip6-port)
transport = "tls"

[ha.options]              # the HA's provisioning listener (TCP, same number)
host = "127.0.0.1"
port = {ha_port}
server_name = "ha.mipsec.test"
ca = {rel(pki.ca_cert)}
cert = {rel(pki.hac_client_cert)}
key = {rel(pki.hac_client_key)}

[bootstrap]
dns_ip6 = "2001:db8:1::53"
dns_ip4 = "192.0.2.53"
{_hac_eap(radius, radius_secret_file, eap_tls)}"""
    _write(directory / "hac.toml", hac_toml + _metrics_table(metrics_ports[0]))
    ha_toml = f"""# HA of the mipsec lab (mipsec init).
log_level = "info"

[ha]
id = "ha1"
listen = {listen}
port = {ha_port}              # MN-HA UDP (PROFILE §7)
{ha_address6}
address4 = "127.0.0.1"
replay_window = 64
max_binding_lifetime = 3600

[sa_store]                # SAs survive an HA restart
backend = "sqlite"
path = "ha-sa.sqlite"
key_file = "ha-sa.key"    # SA keys are wrapped (AES-256-GCM) under this key

[bindings]                # so does the binding cache, in the SA store's file:
in_sa_store = true        # an SA and its replay records are one commit

[provisioning]            # the HAC hands SAs over mutually authenticated TLS
listen = ["127.0.0.1"]
port = {ha_port}
cert = {rel(pki.ha_cert)}
key = {rel(pki.ha_key)}
client_ca = {rel(pki.ca_cert)}
client_names = ["hac.mipsec.test"]
timeout = 10
max_connections = 64      # all held, handshakes included; the longest waiting is evicted
allowed_clients = ["127.0.0.1"]  # where the HAC connects from; others closed before TLS
"""
    _write(directory / "ha.toml", ha_toml + _metrics_table(metrics_ports[1]))
    ca = os.path.relpath(pki.ca_cert, directory)
    mn_toml = _mn_toml(
        "Mobile node of the mipsec lab",
        f'mn_id = {q(DEMO_MN_ID)}\nmethod = "psk"\npsk_file = "mn.psk"\n',
        hac_port,
        ca,
    )
    _write(directory / "mn.psk", psk.hex() + "\n", PRIVATE_FILE)
    _write(directory / "mn.toml", mn_toml)
    eap_tls_table = f"""
[eap]
methods = ["tls"]

[eap.tls]                 # EAP-TLS with the demo MN's client certificate
cert = {rel(pki.mn_cert)}      # rfc822Name SAN = {DEMO_MN_ID}
key = {rel(pki.mn_key)}
ca = {q(ca)}          # the only CA for the HAC's EAP server certificate
server_name = {q(EAP_NAME)}
"""
    _write(
        directory / "mn-eap-tls.toml",
        _mn_toml(
            "Mobile node of the mipsec lab, EAP-TLS",
            f'mn_id = {q(DEMO_MN_ID)}\nmethod = "eap"\n',
            hac_port,
            ca,
            eap_tls_table,
        ),
    )
    if usim is not None:
        _usim_files(directory, usim)
        for method, prefix, title in _AKA_LABS:
            table = f'mn_id = {q(usim.nai(prefix))}\nmethod = "eap"\n'
            _write(
                directory / f"mn-{method}.toml",
                _mn_toml(title, table, hac_port, ca, _aka_table(method, usim)),
            )
    return psk


# key in init_lab's description, EAP method, NAI prefix, title
_AKA_LABS = (
    ("aka", "0", "Mobile node with a software USIM, EAP-AKA"),
    ("aka-prime", "6", "Mobile node with a software USIM, EAP-AKA'"),
)


def _describe(
    directory: Path,
    psk: bytes,
    hac_port: int,
    ha_port: int,
    metrics_ports: tuple[int, int],
    usim: Usim | None,
) -> dict[str, Any]:
    """init_lab's description of the lab it wrote in ``directory``."""
    pki = pki_paths(directory / "pki")
    aka: dict[str, Any] = {}
    if usim is not None:  # mn-aka.toml and mn-aka-prime.toml for the --usim subscriber
        for method, prefix, _title in _AKA_LABS:
            aka["mn_" + method.replace("-", "_")] = {
                "config": str(directory / f"mn-{method}.toml"),
                "mn_id": usim.nai(prefix),
            }
    return {
        "ca": str(pki.ca_cert),
        "hac": {
            "host": "127.0.0.1",
            "port": hac_port,
            "server_name": HAC_NAME,
            "config": str(directory / "hac.toml"),
            "metrics": f"http://127.0.0.1:{metrics_ports[0]}/metrics",
            "control": _control_path(directory / "hac.toml", "hac"),
        },
        "ha": {
            "host": "127.0.0.1",
            "port": ha_port,
            "config": str(directory / "ha.toml"),
            "metrics": f"http://127.0.0.1:{metrics_ports[1]}/metrics",
            "control": _control_path(directory / "ha.toml", "ha"),
        },
        "mn": {
            "mn_id": DEMO_MN_ID,
            "psk_hex": psk.hex(),
            "config": str(directory / "mn.toml"),
            "cert": str(pki.mn_cert),
            "key": str(pki.mn_key),
        },
        "eap": {"ca": str(pki.ca_cert), "server_name": EAP_NAME},
        **aka,
    }
