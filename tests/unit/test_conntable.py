"""The listener's cap and eviction order (core/conntable.py, issue 6 item 2)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mipsec.core.conntable import ConnectionTable
from mipsec.core.errors import LocalProtocolError


def test_under_the_cap_everyone_is_admitted() -> None:
    t: ConnectionTable[str] = ConnectionTable(3)
    assert [t.admit(k) for k in "abc"] == [(True, [])] * 3
    assert len(t) == 3 and "b" in t and t.oldest() == "a"


def test_at_the_cap_the_longest_waiting_makes_room() -> None:
    t: ConnectionTable[str] = ConnectionTable(3)
    for k in "abc":
        t.admit(k)
    t.waiting("a")  # a was answered: it waits again, now the newest
    assert t.admit("d") == (True, ["b"])
    assert "b" not in t and len(t) == 3
    assert t.admit("e") == (True, ["c"])
    assert t.admit("f") == (True, ["a"])


def test_worked_for_connections_are_never_evicted() -> None:
    t: ConnectionTable[str] = ConnectionTable(2)
    t.admit("a")
    t.admit("b")
    assert t.begin_work("a")
    assert t.admit("c") == (True, ["b"])
    assert t.begin_work("c")
    # Everyone held is being worked for: the newcomer is refused.
    assert t.admit("d") == (False, [])
    assert "d" not in t and len(t) == 2
    t.waiting("a")  # a's work ended; it is evictable again
    assert t.admit("d") == (True, ["a"])


def test_in_progress_cap() -> None:
    t: ConnectionTable[str] = ConnectionTable(10, max_in_progress=2)
    for k in "abc":
        t.admit(k)
    assert t.begin_work("a") and t.begin_work("b")
    assert not t.begin_work("c")  # the caller answers busy (503)
    assert t.in_progress == 2 and "c" in t
    assert t.begin_work("a")  # already working: still True, not counted twice
    t.remove("a")
    assert t.in_progress == 1 and t.begin_work("c")


def test_closing_connections_leave_first() -> None:
    t: ConnectionTable[str] = ConnectionTable(3)
    for k in "abc":
        t.admit(k)
    t.begin_work("c")
    t.closing("c")  # was working, now closing: first in line
    assert t.in_progress == 0
    assert t.admit("d") == (True, ["c"])


def test_authenticated_connections_go_only_when_nothing_else_is_left() -> None:
    """A flood of connects evicts only itself: an authenticated connection
    (the HAC's kept connection to its HA's provisioning port) outlives it."""
    t: ConnectionTable[str] = ConnectionTable(3)
    for k in "abc":
        t.admit(k)
    t.authenticated("a")  # the oldest, but proven
    flood = [t.admit(f"x{i}") for i in range(50)]
    assert flood[:2] == [(True, ["b"]), (True, ["c"])]
    assert all(len(v) == 1 and v[0].startswith("x") for _, v in flood[2:])
    assert "a" in t
    t.begin_work("a")  # keeps its rank while worked for
    t.waiting("a")
    assert t.admit("y") == (True, ["x48"])
    t.authenticated("x49")
    t.authenticated("y")
    assert t.admit("z") == (True, ["a"])  # only proven ones left: the longest waiting
    t.closing("y")  # a closing connection leaves first, whatever its rank
    t.authenticated("y")  # ... and stays first
    assert t.admit("w") == (True, ["y"])


def test_misuse_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        ConnectionTable(0)
    with pytest.raises(LocalProtocolError):
        ConnectionTable(1, max_in_progress=0)
    t: ConnectionTable[str] = ConnectionTable(2)
    t.admit("a")
    with pytest.raises(LocalProtocolError):
        t.admit("a")
    with pytest.raises(LocalProtocolError):
        t.begin_work("zz")
    t.remove("zz")  # idempotent
    t.closing("zz")
    with pytest.raises(LocalProtocolError):
        t.authenticated("zz")


ops = st.lists(
    st.tuples(
        st.sampled_from(["admit", "waiting", "work", "close", "remove", "auth"]),
        st.integers(0, 15),
    ),
    max_size=200,
)


@given(cap=st.integers(1, 6), in_progress=st.none() | st.integers(1, 4), script=ops)
def test_model(cap: int, in_progress: int | None, script: list[tuple[str, int]]) -> None:
    """Against a model with explicit timestamps and ranks: the victim is
    always the evictable connection of the lowest rank (unauthenticated,
    then authenticated) with the oldest 'waiting since' (closing ones first), the
    cap always holds and worked-for connections stay."""
    t: ConnectionTable[int] = ConnectionTable(cap, in_progress)
    since: dict[int, float] = {}  # evictable -> waiting since
    rank: dict[int, int] = {}  # every held one -> 0 unauthenticated, 1 authenticated
    closed: set[int] = set()

    def first() -> int | None:
        return min(since, key=lambda k: (rank[k], since[k])) if since else None

    working: set[int] = set()
    clock = 0.0
    fresh = 100
    for op, n in script:
        clock += 1
        held = sorted(since) + sorted(working)
        key = held[n % len(held)] if held else None
        if op == "admit":
            fresh += 1
            expect_victim = first()
            admitted, victims = t.admit(fresh)
            assert len(victims) <= 1  # never over the cap without a resize
            victim = victims[0] if victims else None
            if len(since) + len(working) >= cap:
                assert victim == expect_victim
                assert admitted == (expect_victim is not None)
                if victim is not None:
                    del since[victim], rank[victim]
            else:
                assert (admitted, victim) == (True, None)
            if admitted:
                since[fresh] = clock
                rank[fresh] = 0
        elif key is None:
            continue
        elif op == "waiting":
            t.waiting(key)
            working.discard(key)
            since[key] = clock
        elif op == "work":
            ok = t.begin_work(key)
            if key in working:
                assert ok
            elif in_progress is not None and len(working) >= in_progress:
                assert not ok
            else:
                assert ok
                del since[key]
                working.add(key)
        elif op == "close":
            t.closing(key)
            working.discard(key)
            since[key] = -clock  # before everyone else, the latest closer first
            rank[key] = 0
            closed.add(key)
        elif op == "auth":
            t.authenticated(key)
            if rank[key] == 0 and key not in closed:  # closing ones stay first
                rank[key] = 1
                if key in since:  # at the back of its new rank
                    since[key] = clock
        else:
            t.remove(key)
            working.discard(key)
            since.pop(key, None)
            rank.pop(key, None)
            closed.discard(key)
        assert len(t) == len(since) + len(working) <= cap
        assert t.in_progress == len(working)
        assert t.oldest() == first()


def test_a_lowered_cap_gives_back_the_connections_over_it_in_eviction_order() -> None:
    """A reload lowers the cap: the connections over it are those a newcomer
    would evict first -- unauthenticated before authenticated, the longest
    waiting first -- and never one being worked for, so the table may stay
    over the cap until that work ends; raising it evicts nothing."""
    t: ConnectionTable[str] = ConnectionTable(6)
    for k in "abcdef":
        t.admit(k)
    t.authenticated("a")  # a proven peer: evicted last
    assert t.begin_work("b")  # being worked for: never evicted
    t.waiting("c")  # answered: now the newest of the unproven
    assert t.resize(3) == ["d", "e", "f"]
    assert len(t) == 3 and t.max_connections == 3
    assert t.resize(1) == ["c", "a"]  # b stays: its request is being worked on
    assert list(t) == ["b"] and len(t) == 1
    assert t.resize(10) == [] and t.max_connections == 10
    assert t.admit("g") == (True, [])
    with pytest.raises(LocalProtocolError, match="at least 1"):
        t.resize(0)


def test_a_table_left_over_a_lowered_cap_comes_back_under_it_at_the_next_admission() -> None:
    """Three connections worked for when the cap is lowered to 1: they stay
    (``resize`` never takes one being worked for).  Once their work has
    ended, the next admission evicts down to the cap -- before, it swapped
    one connection for one, and the table stayed over the operator's cap
    for good (found in review)."""
    t: ConnectionTable[str] = ConnectionTable(5)
    for k in "abcde":
        t.admit(k)
    for k in "abc":
        assert t.begin_work(k)
    assert t.resize(1) == ["d", "e"] and len(t) == 3
    for k in "abc":
        t.waiting(k)
    assert t.admit("f") == (True, ["a", "b", "c"])
    assert list(t) == ["f"]
    assert t.admit("g") == (True, ["f"])
