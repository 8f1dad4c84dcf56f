"""Registration transport "auto" on a host that cannot send IPv6 to the HA
(core/roles/mn.py ``Registrar.open``): the HA's IPv4 address is taken; any
other transport, any other error, or no IPv4 address provisioned: the error
stands.  The same in namespaces with real processes: tests/system/test_no_ipv6.py."""

from __future__ import annotations

import asyncio
import errno
from datetime import UTC, datetime
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import pytest

from mipsec.core.config import MNConfig, validate_config
from mipsec.core.issuer import new_sa
from mipsec.core.model import BootstrapData, IssuedSA
from mipsec.core.roles import mn
from mipsec.core.roles.mn import Registrar
from mipsec.core.suites import Suite

PORT = 7873


def _issued(ip4: bool = True) -> IssuedSA:
    sa = new_sa(
        spi=4242,
        mn_id="alice@mipsec.test",
        suite=Suite.AES_128_CBC_SHA256,
        scope=1,
        lifetime=3600,
        now=datetime.now(UTC),
    )
    bs = BootstrapData(
        haa_ip6=IPv6Address("::1"),
        haa_ip4=IPv4Address("127.0.0.1") if ip4 else None,
        ip6_hoa=IPv6Address("2001:db8:1::7"),
        port=PORT,
    )
    return IssuedSA(sa, bs)


def _config(tmp_path: Path, transport: str) -> MNConfig:
    ca = tmp_path / "ca.pem"
    ca.write_text("")
    data = {
        "mn": {"mn_id": "alice@mipsec.test", "psk_hex": "00" * 32},
        "hac": {"host": "127.0.0.1", "port": 1, "server_name": "hac.mipsec.test",
                "ca": str(ca)},
        "registration": {"transport": transport},
    }  # fmt: skip
    cfg = validate_config(data, "mn")
    assert isinstance(cfg, MNConfig)
    return cfg


def _open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, transport: str, code: int, ip4: bool = True
) -> tuple[tuple[str, int] | None, list[str]]:
    """Open a Registrar whose IPv6 sockets fail with ``code``; where it went
    and the hosts it tried."""
    tried: list[str] = []

    def open_socket(self: Registrar) -> None:
        assert self.ha is not None
        tried.append(self.ha[0])
        if ":" in self.ha[0]:
            raise OSError(code, "refused by the test")

    monkeypatch.setattr(mn.Registrar, "_open_socket", open_socket)
    reg = Registrar(_issued(ip4), _config(tmp_path, transport))
    asyncio.run(reg.open())
    return reg.ha, tried


@pytest.mark.parametrize(
    "code",
    [
        errno.EADDRNOTAVAIL,
        errno.ENETUNREACH,
        errno.EAFNOSUPPORT,
        errno.EHOSTUNREACH,  # an `unreachable` IPv6 route (found in review)
        errno.EACCES,  # a `prohibit` IPv6 route (found in review)
    ],
)
def test_auto_takes_ipv4_when_ipv6_cannot_be_sent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    ha, tried = _open(tmp_path, monkeypatch, "auto", code)
    assert ha == ("127.0.0.1", PORT) and tried == ["::1", "127.0.0.1"]


@pytest.mark.parametrize(
    ("transport", "code", "ip4"),
    [
        ("ip6", errno.EADDRNOTAVAIL, True),  # asked for IPv6 alone
        ("auto", errno.EPERM, True),  # not a missing IPv6 path
        ("auto", errno.EADDRNOTAVAIL, False),  # nothing to fall back to
    ],
)
def test_otherwise_the_error_stands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, transport: str, code: int, ip4: bool
) -> None:
    with pytest.raises(OSError) as info:
        _open(tmp_path, monkeypatch, transport, code, ip4)
    assert info.value.errno == code
