"""``[hac] per_source_rate``: one host opening TLS connections in a loop is
cut off at accept, before any handshake work, while other MNs bootstrap.
A real HAC (with its HA in-process) on loopback; the flooder sends complete
ClientHellos from 127.0.0.2."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from pathlib import Path

import pytest
from test_hac_lifecycle import (  # noqa: F401  (pki: a fixture)
    Stack,
    bootstrap,
    hac_config,
    hac_data,
    mn_config,
    pki,
    run,
)
from tlsflood import RawTls

from mipsec.core.pki import PkiPaths
from mipsec.core.roles.tlsserver import RATE_LIMITED


async def hello_from(source: str, port: int) -> bytes:
    """A complete ClientHello from ``source``; the first octets back (b"":
    none, the connection was closed or reset before the server's flight)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    except ConnectionError:
        return b""
    try:
        writer.write(RawTls(reader, writer).start_tls(ctx, "hac.mipsec.test"))
        return await asyncio.wait_for(reader.read(5), 5)
    except ConnectionError:
        return b""
    finally:
        writer.close()


def test_one_source_over_its_rate_is_closed_before_tls(
    tmp_path: Path,
    pki: PkiPaths,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    data = hac_data(tmp_path, pki, per_source_rate=1.0, per_source_burst=3)

    async def main() -> tuple[list[bool], int]:
        async with Stack(hac_config(data, tmp_path)) as st:
            assert st.hac is not None and st.hac._listener is not None
            # Ten ClientHellos in a row from one host: its burst gets a
            # handshake (a ServerHello record, 0x16), the rest nothing.
            answered = [bool(await hello_from("127.0.0.2", st.port)) for _ in range(10)]
            # Another host (the MN, from 127.0.0.1) is not affected.
            got = await bootstrap(mn_config(pki, st.port))
            assert got.ok and got.status == 200
            return answered, st.hac._listener.stats[RATE_LIMITED]

    with caplog.at_level(logging.INFO, logger="mipsec.tls"):
        answered, limited = run(main())
    assert answered[:3] == [True, True, True] and answered.count(True) <= 4, answered
    assert limited == answered.count(False) >= 6
    assert any("rate-limited" in r.getMessage() for r in caplog.records)


def test_per_source_rate_is_off_by_default_and_checked(tmp_path: Path, pki: PkiPaths) -> None:  # noqa: F811
    from mipsec.core.errors import ConfigError

    cfg = hac_config(hac_data(tmp_path, pki), tmp_path)
    assert cfg.hac.per_source_rate == 0
    with pytest.raises(ConfigError) as err:
        hac_config(hac_data(tmp_path, pki, per_source_burst=0), tmp_path)
    assert "hac.per_source_burst" in str(err.value)


def test_idle_connections_of_one_source_hold_at_most_its_burst(
    tmp_path: Path,
    pki: PkiPaths,  # noqa: F811
) -> None:
    """A slow attacker does not need handshakes: it opens connections and
    sends nothing.  Tokens are taken at accept, so one source holds at most
    its burst (plus what refills before the handshake deadline frees them),
    whatever it opens; the others are closed at once, and an MN from another
    host is served meanwhile."""
    data = hac_data(tmp_path, pki, per_source_rate=0.001, per_source_burst=3)

    async def main() -> tuple[int, int, int]:
        async with Stack(hac_config(data, tmp_path)) as st:
            assert st.hac is not None and st.hac._listener is not None
            listener = st.hac._listener
            held = []
            for _ in range(10):
                held.append(
                    await asyncio.open_connection("127.0.0.1", st.port, local_addr=("127.0.0.2", 0))
                )
            await asyncio.sleep(0.3)  # the accepts are handled
            during = listener.connections
            got = await bootstrap(mn_config(pki, st.port))
            assert got.ok and got.status == 200
            # The 7 refused ones see EOF at once; the 3 admitted ones are open.
            closed = 0
            for reader, _ in held:
                with contextlib.suppress(TimeoutError):
                    if await asyncio.wait_for(reader.read(1), 0.5) == b"":
                        closed += 1
            for _, writer in held:
                writer.close()
            return during, closed, listener.stats[RATE_LIMITED]

    during, closed, limited = run(main())
    assert during == 3
    assert closed == 7 and limited == 7


def test_a_reload_turns_the_per_source_rate_on(
    tmp_path: Path,
    pki: PkiPaths,  # noqa: F811
) -> None:
    """Off at start (the default); a reload's ``per_source_rate`` 1/s, burst
    3, applies to the next connections: ten ClientHellos from one host,
    three answered, the rest closed at accept -- no restart, which would have
    cut every MN mid-exchange to stop a flood.  Before, the key was refused
    ("changes only with a restart")."""
    data = hac_data(tmp_path, pki)

    async def main() -> tuple[list[bool], list[bool], int]:
        async with Stack(hac_config(data, tmp_path)) as st:
            assert st.hac is not None and st.hac._listener is not None
            before = [bool(await hello_from("127.0.0.2", st.port)) for _ in range(5)]
            st.hac.apply_limits(
                hac_config(
                    hac_data(tmp_path, pki, per_source_rate=1.0, per_source_burst=3), tmp_path
                )
            )
            after = [bool(await hello_from("127.0.0.2", st.port)) for _ in range(10)]
            got = await bootstrap(mn_config(pki, st.port))
            assert got.ok and got.status == 200
            return before, after, st.hac._listener.stats[RATE_LIMITED]

    before, after, limited = run(main())
    assert before == [True] * 5
    assert after[:3] == [True, True, True] and after.count(True) <= 4, after
    assert limited == after.count(False) >= 6
