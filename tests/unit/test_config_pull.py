"""The HA's [pull] limits (rate, burst, max_in_flight, source_rate,
source_burst): defaults as before they were keys, bounds, and errors that
name the file, the key and the reason."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mipsec.core.config import HAConfig, PullConfig, validate_config
from mipsec.core.errors import ConfigError

WHERE = {
    "host": "127.0.0.1",
    "port": 7874,
    "ca": "pki/ca.pem",
    "cert": "pki/ha.pem",
    "key": "pki/ha.key",
}


def pull(**limits: Any) -> PullConfig:
    cfg = validate_config({"pull": {**WHERE, **limits}}, "ha", file="ha.toml", base=Path("/"))
    assert isinstance(cfg, HAConfig) and cfg.pull is not None
    return cfg.pull


def refused(**limits: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        pull(**limits)
    assert info.value.file == "ha.toml"
    return info.value


def test_the_defaults_are_the_limits_of_before() -> None:
    p = pull()
    got = (p.rate, p.burst, p.max_in_flight, p.source_rate, p.source_burst)
    assert got == (20.0, 50, 16, 5.0, 10)


@pytest.mark.parametrize(
    "limits",
    [
        {"rate": 500, "burst": 1000, "max_in_flight": 64},  # README: a recovery
        {"rate": 10_000, "burst": 100_000, "max_in_flight": 256},  # every upper bound
        {"rate": 0.5, "burst": 2, "max_in_flight": 2, "source_rate": 0.5, "source_burst": 1},
        {"rate": 50, "source_rate": 50, "burst": 80, "source_burst": 80},  # equal is fine
    ],
)
def test_good_values_pass(limits: dict[str, Any]) -> None:
    p = pull(**limits)
    for key, value in limits.items():
        assert getattr(p, key) == value


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("rate", 0, "greater than 0"),
        ("rate", -5, "greater than 0"),
        ("rate", 10_001, "less than or equal to 10000"),
        ("rate", "fast", "valid number"),
        ("rate", True, "boolean"),
        ("burst", 1, "greater than or equal to 2"),
        ("burst", 100_001, "less than or equal to 100000"),
        ("burst", 2.5, "valid integer"),
        ("max_in_flight", 1, "greater than or equal to 2"),
        ("max_in_flight", 257, "less than or equal to 256"),
        ("max_in_flight", 0, "greater than or equal to 2"),
        ("source_rate", 0, "greater than 0"),
        ("source_rate", 10_001, "less than or equal to 10000"),
        ("source_burst", 0, "greater than or equal to 1"),
        ("source_burst", 100_001, "less than or equal to 100000"),
    ],
)
def test_each_bad_value_names_its_key_and_the_reason(key: str, value: Any, words: str) -> None:
    err = refused(**{key: value})
    assert err.key == f"pull.{key}", err
    assert words in err.reason, err
    assert str(err).startswith(f"ha.toml: pull.{key}: ")


@pytest.mark.parametrize(
    ("limits", "words"),
    [
        ({"rate": 10, "source_rate": 30}, "source_rate (30) is above rate (10)"),
        ({"burst": 50, "source_burst": 60}, "source_burst (60) is above burst (50)"),
        # A lowered global limit whose per-source one kept its default.
        ({"rate": 2}, "source_rate (5, its default) is above rate (2)"),
        ({"burst": 4}, "source_burst (10, its default) is above burst (4)"),
    ],
)
def test_a_source_share_above_everyones_is_refused(limits: dict[str, Any], words: str) -> None:
    err = refused(**limits)
    assert err.key == "pull", err  # a check across keys: the table, both keys in the reason
    assert words in err.reason and "set source_" in err.reason, err


def test_the_examples_comment_out_the_defaults() -> None:
    """conf/'s HA examples with [pull] list the limits commented out, each
    with its default (uncommented, they change nothing)."""
    import tomllib

    conf = Path(__file__).resolve().parents[2] / "conf"
    defaults = pull()
    examples = [p for p in sorted(conf.glob("*/*.toml")) if "\n[pull]" in p.read_text()]
    assert len(examples) == 3
    for path in examples:
        table = path.read_text().split("\n[pull]", 1)[1].split("\n[", 1)[0]
        lines = [ln[2:] for ln in table.splitlines() if ln.startswith("# ") and " = " in ln]
        shown = tomllib.loads("\n".join(lines))
        assert sorted(shown) == sorted(
            ["rate", "burst", "max_in_flight", "source_rate", "source_burst"]
        ), path
        assert pull(**shown) == defaults, path
