"""A step of the wall clock told apart from time passing (core/clockstep.py)."""

from __future__ import annotations

import pytest

from mipsec.core.clockstep import ClockWatch, step_line, step_text


class Clocks:
    def __init__(self) -> None:
        self.wall = 1_765_000_000.0
        self.mono = 5_000.0

    def tick(self, seconds: float, wall_extra: float = 0.0) -> None:
        self.mono += seconds
        self.wall += seconds + wall_extra


def watch(c: Clocks, threshold: float = 10.0) -> ClockWatch:
    return ClockWatch(threshold, wall=lambda: c.wall, mono=lambda: c.mono)


def test_time_passing_is_no_step_and_ntp_slewing_neither() -> None:
    c = Clocks()
    w = watch(c)
    for _ in range(100):
        c.tick(30.0, wall_extra=30.0 * 500e-6)  # the most NTP slews: 500 ppm
        assert w.check() is None


@pytest.mark.parametrize("extra", [7200.0, -40.0, 10.0, -10.0])
def test_a_step_is_reported_once_with_its_sign(extra: float) -> None:
    c = Clocks()
    w = watch(c)
    c.tick(30.0, wall_extra=extra)
    assert w.check() == pytest.approx(extra)
    c.tick(30.0)
    assert w.check() is None  # measured from the last check: said once


def test_a_step_under_the_threshold_is_not_one() -> None:
    c = Clocks()
    w = watch(c)
    c.tick(1.0, wall_extra=9.9)
    assert w.check() is None


def test_the_threshold_must_be_positive() -> None:
    with pytest.raises(ValueError, match="threshold"):
        ClockWatch(0.0)


@pytest.mark.parametrize(
    ("step", "text"),
    [(7200.0, "2.0 h"), (-7200.0, "2.0 h"), (600.0, "10 min"), (-40.0, "40 s"), (119.0, "119 s")],
)
def test_step_text(step: float, text: str) -> None:
    assert step_text(step) == text


def test_the_lines_say_which_way_and_what_it_means_for_the_sas() -> None:
    ahead = step_line(7200.0, "HA ha1: ")
    assert ahead.startswith("HA ha1: wall clock stepped 2.0 h ahead (or the host was suspended)")
    assert "every live SA now ends 2.0 h sooner" in ahead and "NTP" in ahead
    back = step_line(-40.0, "")
    assert back.startswith("wall clock stepped 40 s back: ")
    assert "every live SA now ends 40 s later" in back
