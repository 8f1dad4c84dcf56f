"""The control socket: a Unix socket per role, one JSON request per line.

``mipsec status|sas|bindings|revoke|unrevoke|reload --config FILE`` read the
role's configuration to find the socket, connect, write one request line and
read one response line; the server closes after answering.

    request:  {"cmd": "status", "args": {}}\\n
    response: {"ok": true, "result": {...}}\\n
              {"ok": false, "error": "mn_id: required"}\\n

The protocol half (``parse_request``, ``encode_response``, ``Dispatcher``) is
sans-I/O; ``ControlServer`` and ``request`` only move the octets.  Limits:
a request line of at most ``MAX_REQUEST`` octets, read within the
configured ``[control] timeout``; a response of at most ``MAX_RESPONSE``.

The socket is created with mode 0600 before anyone can connect (bound under
a temporary name, chmod, listen, then renamed into place), so only the
role's own user (and root) can talk to it: the socket is the authorisation.
It is removed at stop, and a stale one (left by a killed process, nobody
listening) is replaced at start; a live one is never taken over.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import secrets
import socket
import stat
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from mipsec.core.errors import ConfigError

log = logging.getLogger("mipsec.control")

MAX_REQUEST = 64 * 1024  # octets of one request line
MAX_RESPONSE = 64 * 1024 * 1024  # octets of one response line (a big HAC's SA list)
SOCKET_MODE = 0o600
# sockaddr_un.sun_path is 108 octets on Linux, the terminating NUL included.
MAX_PATH = 107
MAX_CLIENTS = 16  # control requests served at once
TMP_EXTRA = 10  # "." + "." + 8 hex digits: the temporary name bound first

COMMANDS = ("status", "sas", "bindings", "revoke", "unrevoke", "reload")


class ControlError(Exception):
    """A request the server refuses (bad input, unknown command): the message names the field."""


class NotRunning(Exception):
    """Nobody answers on the control socket (the message says where and why)."""


@dataclass(frozen=True)
class Request:
    cmd: str
    args: Mapping[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- sans-I/O protocol


def encode_request(req: Request) -> bytes:
    return json.dumps({"cmd": req.cmd, "args": dict(req.args)}).encode() + b"\n"


def parse_request(line: bytes) -> Request:
    """One request line -> ``Request``; ``ControlError`` names what is wrong."""
    if len(line) > MAX_REQUEST:
        raise ControlError(f"request: longer than {MAX_REQUEST} octets")
    try:
        data = json.loads(line)
    except (ValueError, RecursionError):
        # RecursionError: arrays nested thousands deep fit in MAX_REQUEST.
        # ValueError: JSONDecodeError and UnicodeDecodeError, and an integer
        # of more than 4,300 digits, which went unanswered with a traceback
        # in the log (found in review).
        raise ControlError("request: not a JSON object") from None
    if not isinstance(data, dict):
        raise ControlError("request: not a JSON object")
    cmd = data.get("cmd")
    if not isinstance(cmd, str):
        raise ControlError("cmd: required, a string")
    if cmd not in COMMANDS:
        raise ControlError(f"cmd: unknown command {cmd[:40]!r}")
    args = data.get("args", {})
    if not isinstance(args, dict):
        raise ControlError("args: must be an object")
    return Request(cmd, args)


def encode_response(result: Any = None, error: str | None = None) -> bytes:
    body: dict[str, Any] = {"ok": error is None}
    if error is None:
        body["result"] = result
    else:
        body["error"] = error
    pieces: list[str] = []
    _dumps(body, pieces)
    pieces.append("\n")
    # One copy of the whole answer, not one per level of nesting.
    return "".join(pieces).encode()


# Rows per json.dumps call of a long list.  One C call holds the interpreter
# lock until it returns, so encoding 100,000 SAs in one call (in a worker
# thread) froze the role's event loop for 0.5-1.3 s (found in review); between
# two chunks the loop gets the lock back (a few ms per chunk).
ENCODE_CHUNK = 200


def _dumps(value: Any, out: list[str]) -> None:
    """Append ``json.dumps(value, default=str)`` to ``out``, long lists in chunks."""
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        out.append("{")
        for n, (k, v) in enumerate(value.items()):
            out.append((", " if n else "") + json.dumps(k) + ": ")
            _dumps(v, out)
        out.append("}")
    elif isinstance(value, list) and len(value) > ENCODE_CHUNK:
        out.append("[")
        for i in range(0, len(value), ENCODE_CHUNK):
            out.append(
                (", " if i else "") + json.dumps(value[i : i + ENCODE_CHUNK], default=str)[1:-1]
            )
        out.append("]")
    else:
        out.append(json.dumps(value, default=str))


def parse_response(line: bytes) -> dict[str, Any]:
    try:
        data = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise NotRunning("the control socket answered something that is not JSON") from None
    if not isinstance(data, dict) or "ok" not in data:
        raise NotRunning("the control socket answered something that is not a response")
    return data


Handler = Callable[[Mapping[str, Any]], Awaitable[Any]]


class Dispatcher:
    """Commands -> handlers of one role; a command the role lacks is a ``ControlError``.

    ``listings``: the commands whose answer grows with the number of MNs
    (``sas``, ``bindings``: tens of MB at 100,000 SAs).  The server builds
    and sends one of those at a time (``ControlServer``).
    """

    def __init__(
        self, role: str, handlers: Mapping[str, Handler], listings: Collection[str] = ()
    ) -> None:
        self.role = role
        self.handlers = dict(handlers)
        self.listings = frozenset(listings)

    def gated(self, ready: Callable[[], bool]) -> Dispatcher:
        """The same commands, each refused (``ControlError``) while ``ready()``
        is false: a role that opens its control socket before it has
        started (so that a socket it cannot open fails the start before it
        serves anyone) answers "starting" until then."""

        def gate(handler: Handler) -> Handler:
            async def gated(args: Mapping[str, Any]) -> Any:
                if not ready():
                    raise ControlError(f"the {self.role} is starting: try again in a moment")
                return await handler(args)

            return gated

        return Dispatcher(
            self.role, {cmd: gate(h) for cmd, h in self.handlers.items()}, self.listings
        )

    def is_listing(self, line: bytes) -> bool:
        """Whether ``line`` asks for one of the ``listings`` (False if it is not a request)."""
        if not self.listings:
            return False
        try:
            return parse_request(line).cmd in self.listings
        except ControlError:
            return False

    async def handle(self, line: bytes) -> bytes:
        try:
            req = parse_request(line)
            handler = self.handlers.get(req.cmd)
            if handler is None:
                raise ControlError(f"cmd: {req.cmd!r} is not available on the {self.role}")
            result = await handler(req.args)
        except ControlError as exc:
            return encode_response(error=str(exc))
        try:
            # In a worker thread: a big HAC's SA list is tens of MB of JSON,
            # which would hold the event loop (and every MN) for a fraction of
            # a second.  The result is freshly built and no longer touched here.
            return await asyncio.to_thread(encode_response, result)
        except ControlError as exc:
            return encode_response(error=str(exc))


def arg_str(args: Mapping[str, Any], name: str, *, required: bool = True) -> str | None:
    v = args.get(name)
    if v is None and not required:
        return None
    if not isinstance(v, str) or not v or len(v) > 253:
        raise ControlError(f"{name}: required, a string of 1 to 253 characters")
    return v


# ---------------------------------------------------------------- where the socket is


def state_dir(cfg: BaseModel, config_file: str) -> Path:
    """The role's state directory: where its SA store lives, else its config file's."""
    store = getattr(cfg, "sa_store", None)
    path = store.options.get("path") if store is not None else None
    if isinstance(path, str) and path:
        return Path(path).parent
    return Path(config_file).resolve().parent


def default_name(config_file: str, role: str, suffix: str) -> str:
    """``hac.toml`` -> ``hac<suffix>``: named after the config file, so that two
    roles sharing a state directory (two HAs of model 3) get two sockets."""
    stem = Path(config_file).stem if config_file != "<memory>" else role
    return f"{stem or role}{suffix}"


def revocations_path(cfg: BaseModel, config_file: str) -> Path:
    """``[revocations] path``, or ``<config file name>-revoked.json`` in the
    HAC's state directory (the HAC's start and preflight read the same)."""
    revocations = getattr(cfg, "revocations", None)
    configured = revocations.path if revocations is not None else None
    if configured is not None:
        return Path(configured)
    return state_dir(cfg, config_file) / default_name(config_file, "hac", "-revoked.json")


def socket_path(cfg: BaseModel, role: str, config_file: str) -> Path:
    """``[control] path``, or ``<config file name>.ctl`` in the state directory;
    checked for length."""
    control = getattr(cfg, "control", None)
    configured = control.path if control is not None else None
    path = (
        Path(configured)
        if configured is not None
        else state_dir(cfg, config_file) / default_name(config_file, role, ".ctl")
    )
    # The socket is bound under a temporary name TMP_EXTRA octets longer
    # (".NAME.xxxxxxxx"), then renamed: that name must fit too.
    if len(os.fsencode(path)) + TMP_EXTRA > MAX_PATH:
        raise ConfigError(
            config_file,
            "control.path",
            f"{str(path)!r} is longer than a control socket path may be "
            f"({MAX_PATH - TMP_EXTRA} octets: {MAX_PATH} for a Unix socket, less the "
            "temporary name it is bound under)",
        )
    return path


def check_place(path: Path, key: str = "control.path") -> None:
    """What a control socket at ``path`` needs before it can be bound, checked
    without binding it: its directory, the right to create files there (the
    socket is bound under a temporary name beside it), and nothing but a
    socket under its name.  ``ControlServer.start`` runs it first, and
    ``mipsec check-config`` runs it alone (core/roles/preflight.py); both
    word an error with :func:`place_reason`.  Raises ``OSError``: a missing
    directory is a ``FileNotFoundError`` (check-config of an MN only warns
    of it: systemd may create its ``RuntimeDirectory`` at start)."""
    parent = path.parent
    if not parent.is_dir():
        raise FileNotFoundError(f"{key}: no such directory {str(parent)!r}")
    effective = os.access in os.supports_effective_ids
    if not os.access(parent, os.W_OK | os.X_OK, effective_ids=effective):
        # What the bind would say: a read-only mount (systemd's
        # ProtectSystem) is EROFS, the rest EACCES.
        code = errno.EROFS if os.statvfs(parent).f_flag & os.ST_RDONLY else errno.EACCES
        raise OSError(code, os.strerror(code))
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(f"{key}: {str(path)!r} exists and is not a socket")


def place_reason(path: Path, exc: OSError) -> str:
    """The reason, after ``control.path:``, that a socket could not be
    listened on at ``path`` (``check_place``, or the bind itself)."""
    if exc.strerror:
        return f"cannot listen on {str(path)!r}: {exc.strerror}"
    return str(exc).removeprefix("control.path: ")


# ---------------------------------------------------------------- server


class ControlServer:
    """Serves a ``Dispatcher`` on a Unix socket from the role's event loop."""

    def __init__(
        self, path: Path, dispatcher: Dispatcher, *, timeout: float, key: str, quiet: bool = False
    ) -> None:
        self.path = path
        self.quiet = quiet  # its start said at DEBUG (the MN's first INFO line is its state)
        self.dispatcher = dispatcher
        self.timeout = timeout
        self.key = key  # "control.path": errors name it
        self._server: asyncio.AbstractServer | None = None
        self._ino: tuple[int, int] | None = None
        self._conns: set[asyncio.Task[None]] = set()
        # One listing built and sent at a time: each is tens of MB at 100,000
        # SAs, and MAX_CLIENTS of them held at once by clients that read
        # slowly would be that many times over, until each one's timeout.
        self._listing = asyncio.Lock()

    async def start(self) -> None:
        path = self.path
        check_place(path, self.key)
        self._take_stale(path)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(tmp))
            # Before listen(): until then a connect is refused, so the mode
            # is 0600 before anyone can talk to it, whatever the umask.
            os.chmod(tmp, SOCKET_MODE)
            sock.listen(16)
            os.replace(tmp, path)
        except BaseException:
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        st = os.stat(path)
        self._ino = (st.st_dev, st.st_ino)
        self._server = await asyncio.start_unix_server(self._serve, sock=sock, limit=MAX_REQUEST)
        log.log(logging.DEBUG if self.quiet else logging.INFO, "control socket %s", path)

    def _take_stale(self, path: Path) -> None:
        """A socket at ``path`` (``check_place`` refused anything else) that
        nobody listens on is removed; one in use is an error."""
        if not os.path.lexists(path):
            return
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(1.0)
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)  # left by a process that died: nobody listens
            return
        except OSError:
            pass
        finally:
            probe.close()
        raise OSError(f"{self.key}: {str(path)!r} is in use: is the role already running?")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._conns) >= MAX_CLIENTS:
            # Each held client costs a task and a buffer until its timeout:
            # beyond the cap, answer at once instead of holding more.
            writer.write(encode_response(error=f"busy: {MAX_CLIENTS} requests in progress"))
            writer.close()
            return
        task = asyncio.current_task()
        if task is not None:
            self._conns.add(task)
        try:
            try:
                async with asyncio.timeout(self.timeout):
                    line = await reader.readuntil(b"\n")
            except asyncio.LimitOverrunError:
                writer.write(encode_response(error=f"request: longer than {MAX_REQUEST} octets"))
                return
            except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                return  # too slow, or gone: nothing to answer
            one: Any = (
                self._listing if self.dispatcher.is_listing(line) else contextlib.nullcontext()
            )
            async with one:  # held until the answer left, or its reader timed out
                try:
                    out = await self.dispatcher.handle(line)
                except Exception as exc:  # a bug in a handler: answer, keep serving
                    log.error("control request failed: %s", type(exc).__name__)
                    out = encode_response(error=f"internal error: {type(exc).__name__}")
                writer.write(out)
                del out  # the writer's buffer holds it until it is drained
                try:
                    async with asyncio.timeout(self.timeout):
                        await writer.drain()
                except TimeoutError:
                    # A reader too slow for the timeout: drop what it has not
                    # read (a close would keep the buffer until it reads).
                    writer.transport.abort()
                except ConnectionError:
                    pass
        finally:
            writer.close()
            if task is not None:
                self._conns.discard(task)

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for t in list(self._conns):
            t.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)
        self._server = None
        # Only the socket this server made: a newer process may own the path now.
        with contextlib.suppress(OSError):
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._ino:
                os.unlink(self.path)


async def start_control(
    cfg: BaseModel,
    role: str,
    config_file: str,
    dispatcher: Dispatcher,
    *,
    default_optional: bool = False,
) -> ControlServer | None:
    """The role's control server, started; None when ``[control] enabled = false``.

    ``default_optional`` (the MN): a default path that cannot be listened on
    -- a configuration directory the service may not write (systemd's
    ProtectSystem), another MN on the same file -- is a WARNING and no
    socket, not a failed start; a configured path must work.  Its start is
    then said at DEBUG: an MN's first INFO line says what it does."""
    control = getattr(cfg, "control", None)
    if control is None or not control.enabled:
        return None
    try:
        path = socket_path(cfg, role, config_file)
    except ConfigError as exc:
        if control.path is not None:
            raise
        # Only the default is too long (a deep state directory): the role
        # runs; the operator sets [control] path to get the socket back.
        log.warning("no control socket: %s; set [control] path", exc.reason)
        return None
    server = ControlServer(
        path, dispatcher, timeout=control.timeout, key="control.path", quiet=default_optional
    )
    try:
        await server.start()
    except OSError as exc:
        reason = place_reason(path, exc)
        if default_optional and control.path is None:
            log.warning("no control socket: %s; set [control] path", reason)
            return None
        raise ConfigError(config_file, "control.path", reason) from None
    return server


# ---------------------------------------------------------------- client


def request(path: Path, req: Request, *, timeout: float = 30.0) -> dict[str, Any]:
    """Send one request, return the response object; ``NotRunning`` when nobody answers."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(path))
        except FileNotFoundError:
            raise NotRunning(f"not running: no control socket at {path}") from None
        except ConnectionRefusedError:
            raise NotRunning(f"not running: {path} refuses connections (stale socket)") from None
        except PermissionError:
            raise NotRunning(f"permission denied on {path} (run as the role's user)") from None
        except OSError as exc:
            raise NotRunning(f"cannot connect to {path}: {exc.strerror or exc}") from None
        try:
            try:
                sock.sendall(encode_request(req))
            except (BrokenPipeError, ConnectionResetError):
                pass  # answered ("busy") and closed before it read: read the answer
            buf = bytearray()
            while True:
                try:
                    chunk = sock.recv(65536)
                except ConnectionResetError:
                    # A server past MAX_CLIENTS answers "busy" and closes
                    # without reading the request; on AF_UNIX that close
                    # resets the connection behind the answer (seen with 64
                    # clients at once), or breaks the pipe of a request not
                    # yet sent.  A whole line is the answer.
                    if buf.endswith(b"\n"):
                        break
                    raise
                if not chunk:
                    break
                buf += chunk
                if len(buf) > MAX_RESPONSE:
                    raise NotRunning(f"{path}: response longer than {MAX_RESPONSE} octets")
        except TimeoutError:
            raise NotRunning(f"{path}: no answer within {timeout:g} s") from None
        except OSError as exc:
            raise NotRunning(f"{path}: {exc.strerror or exc}") from None
    finally:
        sock.close()
    if not buf:
        raise NotRunning(f"{path}: closed without an answer")
    return parse_response(bytes(buf))
