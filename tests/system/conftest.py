"""Namespace labs for the data-plane system tests (mipsec.core.netlab).

Each module-scoped lab runs one HA (data plane on) and one HAC in its ``ha``
namespace; tests start MNs with their own configuration in the ``mn``
namespace.  Labs are built and torn down by these fixtures, also when a test
fails.  Without CAP_NET_ADMIN the tests skip, saying so; with it, a missing
tool (ip, nft) is a failure that names the tool.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from labfix import REASON, RunningLab, running


@pytest.fixture(scope="module")
def direct(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningLab]:
    """MN -- HA -- CN, no NAT."""
    if REASON is not None:
        pytest.skip(REASON)
    yield from running(tmp_path_factory.mktemp("netlab"), nat=False)


@pytest.fixture(scope="module")
def natted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningLab]:
    """MN -- NAT (MASQUERADE) -- HA -- CN, IPv4 outside."""
    if REASON is not None:
        pytest.skip(REASON)
    yield from running(tmp_path_factory.mktemp("netlab-nat"), nat=True)
