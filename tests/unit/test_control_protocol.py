"""Control socket protocol (sans-I/O), server limits, revocation list, reload diff."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
from datetime import UTC
from pathlib import Path
from typing import Any

import pytest
from fsaccess import not_writable_dir

from mipsec.core import revocation
from mipsec.core.config import validate_config
from mipsec.core.control import (
    MAX_REQUEST,
    ControlError,
    ControlServer,
    Dispatcher,
    NotRunning,
    Request,
    encode_request,
    encode_response,
    parse_request,
    request,
    socket_path,
    start_control,
)
from mipsec.core.errors import ConfigError
from mipsec.core.reload import restart_keys
from mipsec.core.revocation import RevocationList, journal_path, lock_path

# ------------------------------------------------------------ protocol


def test_parse_request_round_trip() -> None:
    req = parse_request(encode_request(Request("sas", {"mn_id": "a@b"})))
    assert req == Request("sas", {"mn_id": "a@b"})


@pytest.mark.parametrize(
    ("line", "field"),
    [
        (b"not json\n", "request"),
        (b"[1]\n", "request"),
        (b"\xff\xfe\n", "request"),
        (b'{"args": {}}\n', "cmd"),
        (b'{"cmd": 3}\n', "cmd"),
        (b'{"cmd": "shutdown"}\n', "cmd"),
        (b'{"cmd": "status", "args": []}\n', "args"),
        (b'{"cmd": "status", "pad": "' + b"x" * MAX_REQUEST + b'"}\n', "request"),
        # An integer past Python's 4,300-digit limit: a plain ValueError,
        # which went unanswered with a traceback (found in review).
        (b'{"cmd": "status", "args": {"n": ' + b"1" * 5000 + b"}}\n", "request"),
    ],
)
def test_parse_request_errors_name_the_field(line: bytes, field: str) -> None:
    with pytest.raises(ControlError) as err:
        parse_request(line)
    assert str(err.value).startswith(f"{field}:")


def test_dispatcher_answers_errors_as_responses() -> None:
    async def status(args: Any) -> dict[str, Any]:
        return {"role": "x"}

    d = Dispatcher("ha", {"status": status})

    async def main() -> None:
        assert json.loads(await d.handle(b'{"cmd": "status"}\n')) == {
            "ok": True,
            "result": {"role": "x"},
        }
        bad = json.loads(await d.handle(b'{"cmd": "revoke", "args": {"mn_id": "a"}}\n'))
        assert bad == {"ok": False, "error": "cmd: 'revoke' is not available on the ha"}

    asyncio.run(main())


def test_a_long_listing_is_encoded_in_chunks_octet_for_octet(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # One json.dumps call over 100,000 rows holds the interpreter lock (and
    # the role's event loop) for up to 1.3 s even in a worker thread; each
    # call must see at most ENCODE_CHUNK rows, and the answer must not change.
    from datetime import datetime

    from mipsec.core import control

    rows = [
        {"spi": i, "mn_id": f"mn{i}@example.org", "end": datetime(2026, 1, 1, tzinfo=UTC)}
        for i in range(2 * control.ENCODE_CHUNK + 7)
    ]
    result = {"role": "hac", "sas": rows, "nested": {"bindings": rows[:3]}, "n": 5}
    expected = json.dumps({"ok": True, "result": result}, default=str).encode() + b"\n"
    real = json.dumps
    sizes: list[int] = []

    def counting(value: Any, **kw: Any) -> str:
        if isinstance(value, list):
            sizes.append(len(value))
        return real(value, **kw)

    monkeypatch.setattr(control.json, "dumps", counting)
    assert encode_response(result) == expected
    assert sizes and max(sizes) <= control.ENCODE_CHUNK
    assert sum(n for n in sizes if n != 3) == len(rows)


def test_gated_dispatcher_answers_starting_until_ready() -> None:
    async def status(args: Any) -> dict[str, Any]:
        return {"role": "x"}

    ready = False
    d = Dispatcher("ha", {"status": status}, listings=("status",)).gated(lambda: ready)

    async def main() -> None:
        nay = json.loads(await d.handle(b'{"cmd": "status"}\n'))
        assert nay == {"ok": False, "error": "the ha is starting: try again in a moment"}
        nonlocal ready
        ready = True
        yes = json.loads(await d.handle(b'{"cmd": "status"}\n'))
        assert yes == {"ok": True, "result": {"role": "x"}}
        assert d.is_listing(b'{"cmd": "status"}\n')  # listings kept

    asyncio.run(main())


# ------------------------------------------------------------ server


def _serve(tmp_path: Path, timeout: float = 0.3) -> tuple[ControlServer, Path]:
    async def status(args: Any) -> dict[str, Any]:
        return {"args": dict(args)}

    path = tmp_path / "t.ctl"
    return ControlServer(
        path, Dispatcher("hac", {"status": status}), timeout=timeout, key="control.path"
    ), path


def test_server_mode_limits_and_removal(tmp_path: Path) -> None:
    server, path = _serve(tmp_path)

    async def main() -> None:
        old = os.umask(0)  # the mode must not depend on it
        try:
            await server.start()
        finally:
            os.umask(old)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        resp = await asyncio.to_thread(request, path, Request("status", {"k": "v"}))
        assert resp == {"ok": True, "result": {"args": {"k": "v"}}}

        def raw(data: bytes) -> bytes:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(5)
                s.connect(str(path))
                s.sendall(data)
                out = b""
                while chunk := s.recv(4096):
                    out += chunk
                return out

        # Longer than the limit: refused with a reason, not buffered forever.
        big = json.loads(await asyncio.to_thread(raw, b"x" * (MAX_REQUEST + 10)))
        assert big["ok"] is False and "longer than" in big["error"]
        # A client that never finishes its line is cut off at the timeout.
        assert await asyncio.to_thread(raw, b'{"cmd": "sta') == b""
        # A second server on the same live path refuses to take it over.
        other, _ = _serve(tmp_path)
        with pytest.raises(OSError, match="in use"):
            await other.start()
        await server.stop()
        assert not path.exists()

    asyncio.run(main())


def test_client_not_running_errors(tmp_path: Path) -> None:
    with pytest.raises(NotRunning, match="no control socket"):
        request(tmp_path / "none.ctl", Request("status"))
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(tmp_path / "stale.ctl"))
    s.close()
    with pytest.raises(NotRunning, match="refuses connections"):
        request(tmp_path / "stale.ctl", Request("status"))


def test_socket_path_default_and_length(tmp_path: Path) -> None:
    data = {"ha": {"id": "ha1"}, "sa_store": {"backend": "memory"}}
    cfg = validate_config(data, "ha", base=tmp_path)
    file = str(tmp_path / "ha.toml")
    assert socket_path(cfg, "ha", file) == tmp_path / "ha.ctl"
    # Two HAs configured in one directory (model 3) get two sockets.
    assert socket_path(cfg, "ha", str(tmp_path / "ha2.toml")) == tmp_path / "ha2.ctl"
    store = {"backend": "sqlite", "path": "state/ha.sqlite"}
    cfg = validate_config({**data, "sa_store": store}, "ha", base=tmp_path)
    assert socket_path(cfg, "ha", file) == tmp_path / "state" / "ha.ctl"
    long = validate_config({**data, "control": {"path": "x" * 120}}, "ha", base=tmp_path)
    with pytest.raises(ConfigError) as err:
        socket_path(long, "ha", file)
    assert err.value.key == "control.path"
    with pytest.raises(ConfigError) as err:
        validate_config({**data, "control": {"timeout": 0}}, "ha", file="ha.toml")
    assert err.value.key == "control.timeout"


# ------------------------------------------------------------ the MN's control path

MN_DATA: dict[str, Any] = {
    "mn": {"mn_id": "alice@mipsec.test", "psk_hex": "00" * 32},
    "hac": {"host": "127.0.0.1", "ca": "ca.pem"},
}


def _mn(tmp_path: Path, path: Path | str | None) -> Any:
    control = {} if path is None else {"path": str(path)}
    return validate_config({**MN_DATA, "control": control}, "mn", base=tmp_path)


def _start_error(cfg: Any, file: str) -> ConfigError:
    """What the MN daemon's start says of its control path."""
    with pytest.raises(ConfigError) as err:
        asyncio.run(start_control(cfg, "mn", file, Dispatcher("mn", {}), default_optional=True))
    return err.value


@pytest.mark.parametrize("case", ["too long", "not writable", "not a socket", "a directory"])
def test_check_config_of_an_mn_refuses_the_control_path_its_start_would(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    """``check_services`` (check-config) refuses a configured MN control
    path that the daemon's start refuses, with the start's very words.
    Before, check-config of an MN did not look at it."""
    from mipsec.core.roles.preflight import check_services

    if case == "too long":
        path = tmp_path / ("x" * 100)
    elif case == "not writable":
        path = not_writable_dir(tmp_path / "ro", monkeypatch) / "mn.ctl"
    elif case == "not a socket":
        path = tmp_path / "mn.ctl"
        path.write_text("")
    else:
        path = tmp_path / "mn.ctl"
        path.mkdir()
    cfg, file = _mn(tmp_path, path), str(tmp_path / "mn.toml")
    with pytest.raises(ConfigError) as checked:
        check_services(cfg, file)
    assert checked.value.key == "control.path"
    assert str(checked.value) == str(_start_error(cfg, file)), case


def test_check_config_of_an_mn_warns_of_a_missing_control_directory(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A configured path whose directory is missing fails the start, but
    check-config only warns, with the start's words: the example unit's
    RuntimeDirectory (``/run/mipsec-mn``) exists only while the MN runs."""
    from mipsec.core.roles.preflight import check_services

    cfg, file = _mn(tmp_path, tmp_path / "run" / "mn.ctl"), str(tmp_path / "mn.toml")
    check_services(cfg, file)
    [line] = [r.getMessage() for r in caplog.records if "control.path" in r.getMessage()]
    assert line.startswith(f"{_start_error(cfg, file)}: ")


def test_check_config_of_an_mn_passes_a_usable_or_default_control_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from mipsec.core.roles.preflight import check_services

    file = str(tmp_path / "mn.toml")
    check_services(_mn(tmp_path, tmp_path / "mn.ctl"), file)
    stale = tmp_path / "stale.ctl"  # a socket left by a killed MN: the start replaces it
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(stale))
    sock.close()
    check_services(_mn(tmp_path, stale), file)
    # The default beside a directory it cannot write: the start only warns.
    ro = not_writable_dir(tmp_path / "ro", monkeypatch)
    check_services(_mn(tmp_path, None), str(ro / "mn.toml"))
    assert not [r for r in caplog.records if "control.path" in r.getMessage()]


# ------------------------------------------------------------ revocation list


def test_revocation_list_persists_atomically(tmp_path: Path) -> None:
    path = tmp_path / "revoked.json"
    journal = journal_path(path)
    rl = RevocationList(path)
    assert "a@x" not in rl and not path.exists() and not journal.exists()
    assert rl.add("a@x") and not rl.add("a@x")
    assert stat.S_IMODE(os.stat(journal).st_mode) == 0o600
    assert "a@x" in RevocationList(path)
    assert rl.remove("a@x") and not rl.remove("a@x")
    assert "a@x" not in RevocationList(path) and len(RevocationList(path)) == 0
    # No temporary left; the lock file every process sharing the list flocks.
    assert sorted(p.name for p in tmp_path.iterdir()) == [journal.name, lock_path(path).name]
    assert stat.S_IMODE(os.stat(lock_path(path)).st_mode) == 0o600


def test_a_revocation_costs_one_journal_line_and_folds_amortized(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A change appends one line, whatever the list's size (before 2026-12-05
    each one rewrote the whole list: 209 ms per revoke at 100,000 revoked
    MNs); the journal is folded into the snapshot once it holds more lines
    than the list has entries (COMPACT_MIN at least), then starts empty."""
    monkeypatch.setattr(revocation, "COMPACT_MIN", 4)
    path = tmp_path / "revoked.json"
    journal = journal_path(path)
    path.write_text(
        '{"version": 1, "revoked": {'
        + ", ".join(f'"old{i}@x": "2026-01-01T00:00:00+00:00"' for i in range(6))
        + "}}"
    )
    before = path.read_bytes(), path.stat().st_ino
    rl = RevocationList(path)
    for i in range(6):  # six lines: as many as the snapshot has entries
        assert rl.add(f"new{i}@x")
        assert len(journal.read_bytes().splitlines()) == i + 1
        assert (path.read_bytes(), path.stat().st_ino) == before  # not rewritten
    assert len(RevocationList(path)) == 12  # snapshot + journal
    assert rl.remove("old0@x")  # the seventh change folds
    assert not journal.exists()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    folded = json.loads(path.read_text())["revoked"]
    assert sorted(folded) == sorted(
        [f"old{i}@x" for i in range(1, 6)] + [f"new{i}@x" for i in range(6)]
    )
    assert rl.items() == folded == RevocationList(path).items()
    assert rl.add("after@x") and len(journal.read_bytes().splitlines()) == 1
    assert "after@x" in RevocationList(path) and "old0@x" not in RevocationList(path)
    # Adds only: the next fold comes after as many lines as the new snapshot
    # holds (11), so the journal never outgrows it.
    for i in range(10):
        assert rl.add(f"more{i}@x")
    assert len(journal.read_bytes().splitlines()) == 11
    assert rl.add("last@x") and not journal.exists()
    assert len(json.loads(path.read_text())["revoked"]) == 23


def test_a_journal_append_that_fails_leaves_no_part_of_its_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk in the middle of an append: the change is refused (the
    operator sees the error) and neither a restart nor the next change finds
    any of it."""
    path = tmp_path / "revoked.json"
    journal = journal_path(path)
    rl = RevocationList(path)
    assert rl.add("a@x")
    real_write = os.write

    def short_then_full(fd: int, data: Any) -> int:
        # Five octets of the line reach the file, then the disk is full.
        monkeypatch.setattr(os, "write", failing)
        return real_write(fd, bytes(data[:5]))

    def failing(fd: int, data: Any) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", short_then_full)
    with pytest.raises(OSError, match="No space"):
        rl.add("b@x")
    monkeypatch.setattr(os, "write", real_write)
    assert "b@x" not in rl and journal.read_bytes().count(b"\n") == 1
    assert RevocationList(path).items() == rl.items()
    assert rl.add("c@x")
    assert sorted(RevocationList(path).items()) == ["a@x", "c@x"]


def test_a_journal_cut_by_a_crash_drops_the_unacknowledged_change(tmp_path: Path) -> None:
    path = tmp_path / "revoked.json"
    journal = journal_path(path)
    rl = RevocationList(path)
    assert rl.add("a@x")
    with journal.open("ab") as f:
        f.write(b'{"add": "b@x", "si')  # killed inside the append: never acknowledged
    rl = RevocationList(path)
    assert "a@x" in rl and "b@x" not in rl
    # The next change is not appended after the torn octets: the list is folded.
    assert rl.add("c@x") and not journal.exists()
    again = RevocationList(path)
    assert sorted(again.items()) == ["a@x", "c@x"]


def test_a_crash_inside_a_fold_replays_to_the_same_list(tmp_path: Path) -> None:
    """Killed after the new snapshot but before the journal was emptied: its
    lines replay over a snapshot that holds them already."""
    path = tmp_path / "revoked.json"
    journal = journal_path(path)
    rl = RevocationList(path)
    for mn in ("a@x", "b@x", "c@x"):
        rl.add(mn)
    rl.remove("b@x")
    rl.add("b@x")
    rl.remove("c@x")
    lines = journal.read_bytes()
    want = rl.items()
    rl._fold(want)  # the snapshot the fold writes
    journal.write_bytes(lines)  # ... and the journal it had not removed yet
    assert RevocationList(path).items() == want and sorted(want) == ["a@x", "b@x"]


def test_a_journal_line_that_is_not_a_change_fails_closed(tmp_path: Path) -> None:
    path = tmp_path / "revoked.json"
    journal = journal_path(path)
    for bad in (b'{"add": "a@x"}\n', b"[]\n", b'{"remove": 3}\n', b"garbage\n"):
        journal.write_bytes(b'{"remove": "z@x"}\n' + bad + b'{"remove": "y@x"}\n')
        with pytest.raises(ConfigError) as err:
            RevocationList(path, config_file="hac.toml")
        assert err.value.key == "revocations.path" and err.value.file == "hac.toml"
        assert "line 2" in str(err.value) and "revoked.json.journal" in str(err.value)


def test_a_revocation_holds_for_every_spelling_of_the_realm(tmp_path: Path) -> None:
    """RFC 7542 §2.4: the realm is case-insensitive, so ``a@X.Example`` is the
    MN ``a@x.example``; the user part is not (``A@x.example`` is another MN)."""
    path = tmp_path / "revoked.json"
    rl = RevocationList(path)
    assert rl.add("a@X.Example")
    for spelling in ("a@x.example", "a@X.EXAMPLE", "a@X.Example"):
        assert spelling in rl and spelling in RevocationList(path)
    assert "A@x.example" not in rl
    assert not rl.add("a@x.EXAMPLE")  # already revoked
    assert list(RevocationList(path).items()) == ["a@x.example"]
    assert rl.remove("a@x.example") and "a@X.Example" not in RevocationList(path)
    # A file written before the canonical form: read the same way.
    path.write_text('{"version": 1, "revoked": {"b@Y.org": "2026-01-02T00:00:00+00:00"}}')
    assert "b@y.ORG" in RevocationList(path)


def test_revocation_list_unreadable_fails_closed(tmp_path: Path) -> None:
    path = tmp_path / "revoked.json"
    path.write_text('{"version": 1, "revoked": ["a"]}')
    with pytest.raises(ConfigError) as err:
        RevocationList(path, config_file="hac.toml")
    assert err.value.key == "revocations.path" and err.value.file == "hac.toml"


# ------------------------------------------------------------ reload diff


def test_restart_keys_names_leaves_outside_live_keys(tmp_path: Path) -> None:
    base = {"ha": {"id": "ha1", "replay_window": 64}, "sa_store": {"backend": "memory"}}
    old = validate_config(base, "ha")
    new = validate_config(
        {**base, "ha": {"id": "ha1", "replay_window": 128}, "log_level": "debug"}, "ha"
    )
    changed, restart = restart_keys(old, new, frozenset({"log_level"}))
    assert changed == ["log_level"]
    assert restart == ["ha.replay_window"]
    assert restart_keys(old, old, frozenset()) == ([], [])
    # A leaf a reload applies inside a restart-only table (the HAC's hac.cert)
    # is named as changed; its neighbours still need a restart.
    changed, restart = restart_keys(
        old, new, frozenset({"log_level"}), frozenset({"ha.replay_window"})
    )
    assert (changed, restart) == (["ha.replay_window", "log_level"], [])


# ------------------------------------------------------------ CLI help


def test_every_cli_option_has_help() -> None:
    import argparse

    from mipsec.core.cli import build_parser

    parsers: list[argparse.ArgumentParser] = list(build_parser())
    subs = [a for a in parsers[1]._actions if isinstance(a, argparse._SubParsersAction)]
    parsers += list(subs[0].choices.values())
    missing = [
        f"{p.prog} {a.dest}"
        for p in parsers
        for a in p._actions
        if not isinstance(a, argparse._SubParsersAction | argparse._HelpAction) and not a.help
    ]
    assert missing == []
    names = set(subs[0].choices)
    assert {"status", "sas", "bindings", "revoke", "unrevoke", "reload"} <= names


async def _hold_every_slot(path: Path) -> list[Any]:
    """MAX_CLIENTS connections that never send a line: the server's cap reached."""
    from mipsec.core.control import MAX_CLIENTS

    held = [await asyncio.open_unix_connection(str(path)) for _ in range(MAX_CLIENTS)]
    await asyncio.sleep(0.1)
    return held


def test_a_client_past_the_cap_reads_busy_not_a_reset(tmp_path: Path) -> None:
    """``mipsec status`` while MAX_CLIENTS are held: the server answers
    "busy" and closes without reading the request, which resets the
    connection behind the answer; ``request()`` returns the answer (one
    line), where it raised "Connection reset by peer" before."""

    server, path = _serve(tmp_path, timeout=2.0)

    async def main() -> list[dict[str, Any]]:
        await server.start()
        held = await _hold_every_slot(path)
        try:
            return [await asyncio.to_thread(request, path, Request("status")) for _ in range(5)]
        finally:
            for _, w in held:
                w.close()
            await server.stop()

    answers = asyncio.run(main())
    assert all(a["ok"] is False and a["error"].startswith("busy:") for a in answers), answers


def test_server_caps_clients_held_at_once(tmp_path: Path) -> None:

    server, path = _serve(tmp_path, timeout=2.0)

    async def main() -> None:
        await server.start()
        held = await _hold_every_slot(path)
        try:
            reader, writer = await asyncio.open_unix_connection(str(path))
            busy = json.loads(await asyncio.wait_for(reader.read(), 5))
            writer.close()
            assert busy["ok"] is False and busy["error"].startswith("busy:")
        finally:
            for _, w in held:
                w.close()
        await asyncio.sleep(0.1)
        # Once they are gone, requests are served again.
        resp = await asyncio.to_thread(request, path, Request("status"))
        assert resp == {"ok": True, "result": {"args": {}}}
        await server.stop()

    asyncio.run(main())


def _listing_server(tmp_path: Path, timeout: float, size: int) -> tuple[ControlServer, Path, Any]:
    """A server whose ``sas`` is a listing of ``size`` octets, counting how
    many are being built or sent at once."""
    state = {"now": 0, "most": 0, "built": 0}

    async def sas(args: Any) -> dict[str, Any]:
        state["now"] += 1
        state["most"] = max(state["most"], state["now"])
        state["built"] += 1
        try:
            await asyncio.sleep(0.05)
            return {"sas": "x" * size}
        finally:
            state["now"] -= 1

    async def status(args: Any) -> dict[str, Any]:
        return {"listing_in_progress": state["now"]}

    path = tmp_path / "l.ctl"
    d = Dispatcher("hac", {"sas": sas, "status": status}, listings=("sas",))
    return ControlServer(path, d, timeout=timeout, key="control.path"), path, state


def test_listings_are_built_and_sent_one_at_a_time(tmp_path: Path) -> None:
    """``sas`` and ``bindings`` grow with the number of MNs (tens of MB at
    100,000): four asked at once are built one after the other, and each
    client gets its whole answer."""
    server, path, state = _listing_server(tmp_path, timeout=5.0, size=1 << 20)

    async def main() -> list[dict[str, Any]]:
        await server.start()
        try:
            return await asyncio.gather(
                *(asyncio.to_thread(request, path, Request("sas")) for _ in range(4))
            )
        finally:
            await server.stop()

    answers = asyncio.run(main())
    assert [len(a["result"]["sas"]) for a in answers] == [1 << 20] * 4
    assert state["most"] == 1 and state["built"] == 4


def test_a_listing_never_read_is_dropped_at_the_timeout(tmp_path: Path) -> None:
    """A client asks for a listing bigger than the socket buffers and never
    reads it.  Meanwhile other commands are answered at once; at the
    timeout its connection is aborted -- the unsent octets dropped, not kept
    in the transport until it reads -- and the next listing is served."""
    size = 16 << 20
    server, path, state = _listing_server(tmp_path, timeout=0.5, size=size)

    async def until(check: Any) -> None:
        for _ in range(1000):  # no wall-clock bound on a loaded machine: 10 s
            if check():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("never happened")

    async def main() -> tuple[dict[str, Any], bool, int, dict[str, Any]]:
        await server.start()
        try:
            sleeper = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sleeper.connect(str(path))
            sleeper.sendall(b'{"cmd": "sas"}\n')
            await until(lambda: state["built"] == 1 and state["now"] == 0)  # built, sending
            status = await asyncio.to_thread(request, path, Request("status"), timeout=5)
            held = server._listing.locked()  # status was answered during the listing's turn
            await until(lambda: not server._conns)  # the stalled reader was cut off

            def drain() -> int:
                got = 0
                sleeper.settimeout(5)
                try:
                    while chunk := sleeper.recv(1 << 20):
                        got += len(chunk)
                except ConnectionResetError:
                    pass
                finally:
                    sleeper.close()
                return got

            # In a thread: abort() closes the socket in a callback of the
            # loop, which a recv on the loop's own thread would never let run.
            got = await asyncio.to_thread(drain)
            after = await asyncio.to_thread(request, path, Request("sas"), timeout=5)
            return status, held, got, after
        finally:
            await server.stop()

    status, held, got, after = asyncio.run(main())
    assert status["result"] == {"listing_in_progress": 0} and held
    assert got < size  # what the socket buffers held, not the whole answer
    assert len(after["result"]["sas"]) == size


def test_the_method_tracker_forgets_each_sa_at_its_end() -> None:
    """The HAC's status counts SAs by method from what this process saw.
    With HACs sharing a store, another HAC ends most of this one's SAs:
    each entry now goes at its SA's validity end, whoever ended it; before,
    they stayed for good, and status counted dead SPIs (found in review)."""
    from datetime import UTC, datetime, timedelta

    from mipsec.core.roles.hac_ops import _MethodTracker

    tracker = _MethodTracker()
    now = datetime.now(UTC)
    for spi in range(1, 101):
        tracker.mipsec_mn_authenticated(mn_id=f"m{spi}@x", method="psk")
        end = now + timedelta(seconds=60 if spi <= 50 else 3600)
        tracker.mipsec_sa_issued(spi=spi, mn_id=f"m{spi}@x", ha_id="ha1", validity_end=end)
    assert len(tracker.by_spi) == 100
    tracker.prune((now + timedelta(seconds=61)).timestamp())
    assert sorted(tracker.by_spi) == list(range(51, 101))
    tracker.mipsec_sa_withdrawn(spi=51)  # ended here: gone at once, its heap entry harmless
    tracker.prune((now + timedelta(seconds=3601)).timestamp())
    assert tracker.by_spi == {} and tracker._end_of == {} and tracker._ends == []


def test_unrevoke_takes_an_identity_listed_before_the_strict_nai_check(tmp_path: Path) -> None:
    """`a..b@x` could be revoked before the twenty-eighth session's RFC 7542
    grammar check; it must still come off the list, while an identity no MN
    can send that is not listed is refused naming the field."""
    from types import SimpleNamespace

    from mipsec.core.roles.hac_ops import HacOps

    rl = RevocationList(tmp_path / "rev.json")
    assert rl.add("a..b@x.example")
    ops = object.__new__(HacOps)
    ops.svc = SimpleNamespace(revocations=rl)  # type: ignore[assignment]
    out = asyncio.run(ops.unrevoke({"mn_id": "a..b@X.example"}))
    assert out["was_revoked"] is True and "a..b@x.example" not in rl
    with pytest.raises(ControlError, match="^mn_id: "):
        asyncio.run(ops.unrevoke({"mn_id": "c..d@x.example"}))
    with pytest.raises(ControlError, match="^mn_id: "):
        asyncio.run(ops.revoke({"mn_id": "c..d@x.example"}))
