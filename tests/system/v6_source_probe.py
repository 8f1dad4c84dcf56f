"""Run inside a network namespace by test_per_source_v6.py (not a test itself).

A real HAC (HA in-process) listening on ``::`` with ``per_source_rate``; TLS
ClientHellos from several IPv6 sources on ``lo``; an MN bootstrapping over
IPv6 from its own /64.  Prints one JSON object: what each source got."""

from __future__ import annotations

import asyncio
import json
import ssl
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# The shared helpers: tests/conftest.py (not tests/system/conftest.py) first.
sys.path[:0] = [str(HERE.parent), str(HERE.parent / "integration")]

from test_hac_lifecycle import Stack, bootstrap, hac_config, hac_data, mn_config  # noqa: E402
from tlsflood import RawTls  # noqa: E402

from mipsec.core.pki import init_pki  # noqa: E402
from mipsec.core.roles.tlsserver import RATE_LIMITED  # noqa: E402

HAC = "2001:db8:a::1"


async def hello_from(source: str, port: int) -> bool:
    """Does a complete ClientHello from ``source`` get a handshake back?"""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    try:
        reader, writer = await asyncio.open_connection(HAC, port, local_addr=(source, 0))
    except ConnectionError:
        return False
    try:
        writer.write(RawTls(reader, writer).start_tls(ctx, "hac.mipsec.test"))
        return bool(await asyncio.wait_for(reader.read(5), 5))
    except ConnectionError:
        return False
    finally:
        writer.close()


async def main(tmp: Path) -> dict[str, object]:
    pki = init_pki(tmp / "pki")
    # A bucket of 3 that practically never refills during the run.
    data = hac_data(tmp, pki, listen=["::"], per_source_rate=0.001, per_source_burst=3)
    async with Stack(hac_config(data, tmp)) as st:
        assert st.hac is not None and st.hac._listener is not None
        got: dict[str, object] = {}
        for source, n in (("2001:db8:a::2", 4), ("2001:db8:a::3", 2), ("2001:db8:b::2", 4)):
            got[source] = [await hello_from(source, st.port) for _ in range(n)]
        # The MN's own /64 (source address selection picks 2001:db8:c::1).
        mn = mn_config(pki, st.port)
        mn = mn.model_copy(update={"hac": mn.hac.model_copy(update={"host": "2001:db8:c::1"})})
        result = await bootstrap(mn)
        got["mn_status"] = result.status
        got["rate_limited"] = st.hac._listener.stats[RATE_LIMITED]
        return got


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(Path(sys.argv[1])))))
