"""RFC 4303 §3.4.3 anti-replay window (mipsec.core.replay), PROFILE §7."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mipsec.core.errors import LocalProtocolError
from mipsec.core.replay import ReplayWindow


class ReferenceWindow:
    """The RFC 4303 rules written plainly: a set of seen numbers + the highest."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.seen: set[int] = set()
        self.highest = -1

    def check(self, seq: int) -> bool:
        if seq in self.seen:
            return False
        return seq > self.highest or self.highest - seq < self.size

    def update(self, seq: int) -> None:
        self.seen.add(seq)
        self.highest = max(self.highest, seq)


def test_zero_is_a_valid_first_packet() -> None:
    w = ReplayWindow()
    assert w.size == 64
    assert w.highest == -1
    assert w.check(0)
    w.update(0)
    assert w.highest == 0
    assert not w.check(0)
    assert w.check(1)


def test_check_does_not_change_state() -> None:
    w = ReplayWindow(32)
    for _ in range(3):
        assert w.check(5)
    assert w.highest == -1
    w.update(5)
    assert w.check(4) and w.check(0)  # below the first packet but inside the window


@pytest.mark.parametrize("size", [32, 64, 100, 128, 4096])
def test_window_edges(size: int) -> None:
    w = ReplayWindow(size)
    top = 10_000
    w.update(top)
    assert w.check(top - size + 1)  # left-most slot of the window
    assert not w.check(top - size)  # just left of it
    assert not w.check(0)
    assert w.check(top + 1) and w.check(2**32 - 1)
    w.update(top - size + 1)
    assert not w.check(top - size + 1)
    # Sliding right by exactly the size forgets everything old.
    w.update(top + size)
    assert not w.check(top)
    assert w.check(top + 1)


def test_large_jump_resets_bitmap() -> None:
    w = ReplayWindow(64)
    for seq in range(10):
        w.update(seq)
    w.update(1_000_000)
    assert w.highest == 1_000_000
    for seq in range(1_000_000 - 63, 1_000_000):
        assert w.check(seq)


def test_update_requires_an_accepted_number() -> None:
    w = ReplayWindow(32)
    w.update(100)
    with pytest.raises(LocalProtocolError, match="sequence"):
        w.update(100)  # duplicate
    with pytest.raises(LocalProtocolError, match="sequence"):
        w.update(50)  # left of the window
    assert w.highest == 100


@pytest.mark.parametrize("seq", [-1, 2**32, 2**40])
def test_sequence_outside_32_bits(seq: int) -> None:
    with pytest.raises(LocalProtocolError, match="sequence"):
        ReplayWindow().check(seq)


@pytest.mark.parametrize("size", [0, 31, 4097, True, 64.0, "64"])
def test_size_bounds(size: object) -> None:
    with pytest.raises(LocalProtocolError, match="window"):
        ReplayWindow(size)  # type: ignore[arg-type]


def test_repr_names_state() -> None:
    w = ReplayWindow(128)
    w.update(7)
    assert repr(w) == "ReplayWindow(size=128, highest=7)"


# A stream of (sequence, integrity ok?) pairs: numbers cluster so that
# duplicates, in-window reordering, and left-of-window packets all happen.
def _events(spread: int) -> st.SearchStrategy[list[tuple[int, bool]]]:
    base = st.integers(0, 2**32 - 1 - 3 * spread)
    return base.flatmap(
        lambda b: st.lists(
            st.tuples(
                st.one_of(
                    st.integers(b, b + 3 * spread),
                    st.integers(0, 2**32 - 1),
                    st.just(b),
                ),
                st.booleans(),
            ),
            max_size=120,
        )
    )


@pytest.mark.parametrize("size", [32, 64, 128, 4096])
@settings(max_examples=120, deadline=None)
@given(data=st.data())
def test_matches_reference_model(size: int, data: st.DataObject) -> None:
    events = data.draw(_events(size))
    w, ref = ReplayWindow(size), ReferenceWindow(size)
    for seq, icv_ok in events:
        accepted = w.check(seq)
        assert accepted == ref.check(seq), (seq, ref.highest)
        if accepted and icv_ok:  # the window moves only for verified packets
            w.update(seq)
            ref.update(seq)
        assert w.highest == ref.highest


@settings(max_examples=60, deadline=None)
@given(order=st.permutations(list(range(200))))
def test_every_number_accepted_once_when_in_window(order: list[int]) -> None:
    # Any reordering within a window of 4096 delivers every packet exactly once.
    w = ReplayWindow(4096)
    for seq in order:
        assert w.check(seq)
        w.update(seq)
    for seq in order:
        assert not w.check(seq)
