"""``mipsec init`` as a library call (core/labsetup.py): all or nothing, never
over an existing file, options checked, every string escaped, IPv4 only on a
host without ``::1``."""

from __future__ import annotations

import os
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest

from mipsec.core import labsetup
from mipsec.core.config import HACConfig, HAConfig, load_config
from mipsec.core.errors import ConfigError
from mipsec.core.labsetup import LabExistsError, init_lab, lab_files


@pytest.fixture(autouse=True)
def _ports(monkeypatch: pytest.MonkeyPatch) -> None:
    """Metrics ports from a range of this test's own (no socket is bound here)."""
    monkeypatch.setenv(labsetup.PORTS_ENV, "45000-45999")


def _listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_lab_files_are_exactly_what_init_writes(tmp_path: Path) -> None:
    lab = tmp_path / "lab"
    usim = labsetup.Usim.parse(
        "001010123456789," + "00" * 16 + "," + "11" * 16 + ",8000,000000000001"
    )
    secret = tmp_path / "radius.secret"
    secret.write_text("s\n")
    init_lab(lab, radius=("127.0.0.1", 1812), radius_secret_file=secret, usim=usim)
    written = _listing(lab)
    declared = {str(p.relative_to(lab)) for p in lab_files(lab, usim=True)}
    assert written == declared | {"pki"}  # no temporary left, nothing undeclared


@pytest.mark.parametrize(
    "name", ["credentials.toml", "hac.toml", "mn.psk", "mn-eap-tls.toml", "pki/ca.key"]
)
def test_an_existing_file_is_never_overwritten(tmp_path: Path, name: str) -> None:
    """The operator's own file, wherever init would write: refused by name,
    before anything is written (init wrote over it before, via os.replace)."""
    lab = tmp_path / "lab"
    (lab / name).parent.mkdir(parents=True)
    (lab / name).write_text("the operator's\n")
    before = _listing(lab)
    with pytest.raises(LabExistsError) as info:
        init_lab(lab)
    assert info.value.path == lab / name and str(lab / name) in str(info.value)
    assert (lab / name).read_text() == "the operator's\n"
    assert _listing(lab) == before


def test_a_store_of_another_lab_is_refused(tmp_path: Path) -> None:
    """The new lab's HAC would take it as its own, under a new key."""
    (tmp_path / "ha-sa.sqlite").write_bytes(b"")
    with pytest.raises(LabExistsError, match="ha-sa.sqlite already exists"):
        init_lab(tmp_path)


def test_a_lab_without_its_pki_names_a_real_file(tmp_path: Path) -> None:
    """pki/ deleted: the refusal named a temporary (.hac-sa.key.<hex>.tmp)."""
    lab = tmp_path / "lab"
    init_lab(lab)
    for p in sorted((lab / "pki").iterdir()):
        p.unlink()
    (lab / "pki").rmdir()
    with pytest.raises(LabExistsError) as info:
        init_lab(lab)
    assert info.value.path == lab / "hac-sa.key" and info.value.more == 7
    assert ".tmp" not in str(info.value)
    assert not (lab / "pki").exists()


def test_a_file_where_the_lab_directory_goes_is_refused(tmp_path: Path) -> None:
    (tmp_path / "lab").write_text("")
    with pytest.raises(LabExistsError, match="not a directory"):
        init_lab(tmp_path / "lab")


@pytest.mark.parametrize("fail_at", [0, 1, 17, 21])
def test_a_failed_init_removes_what_it_made_and_nothing_else(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_at: int
) -> None:
    """Cut short while putting its files in place (the fail_at-th): what it
    made goes -- files, pki/, the directory when it made it -- what was there
    stays, and a second init then succeeds (a half lab made it refuse)."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine\n")
    made = tmp_path / "new" / "lab"
    real_link = os.link
    links = 0

    def link(src: Any, dst: Any) -> None:
        nonlocal links
        if links == fail_at:
            raise OSError(28, "No space left on device")
        links += 1
        real_link(src, dst)

    monkeypatch.setattr(labsetup.os, "link", link)
    for lab in (mine, made):
        links = 0
        with pytest.raises(OSError, match="No space"):
            init_lab(lab)
    assert _listing(mine) == {"notes.txt"}
    assert not (tmp_path / "new").exists()
    monkeypatch.setattr(labsetup.os, "link", real_link)
    init_lab(mine)
    assert (mine / "notes.txt").read_text() == "mine\n"


@pytest.mark.parametrize("cut_at", [0, 5, 20])
def test_an_interrupt_as_a_link_completes_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cut_at: int
) -> None:
    """Ctrl-C (or SIGTERM, which ``mipsec init`` turns into the same) landing
    just as a link completes: that file goes too.  It was listed after the
    link, and stayed behind -- a rerun then refused (found in review)."""
    real_link = os.link
    links = 0

    def link(src: Any, dst: Any) -> None:
        nonlocal links
        real_link(src, dst)
        links += 1
        if links == cut_at + 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(labsetup.os, "link", link)
    lab = tmp_path / "lab"
    with pytest.raises(KeyboardInterrupt):
        init_lab(lab)
    assert not lab.exists()
    monkeypatch.setattr(labsetup.os, "link", real_link)
    init_lab(lab)


def test_ports_are_drawn_before_anything_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(labsetup.PORTS_ENV, "abc")
    with pytest.raises(ConfigError, match=f"^\\(environment\\): {labsetup.PORTS_ENV}: 'abc'"):
        init_lab(tmp_path / "lab")
    assert not (tmp_path / "lab").exists()


@pytest.mark.parametrize(
    ("ports", "option"),
    [((0, 7873), "--hac-port"), ((7872, 70000), "--ha-port"), ((9000, 9000), "--ha-port")],
)
def test_ports_are_checked(tmp_path: Path, ports: tuple[int, int], option: str) -> None:
    """0, 70000, or one port for both: init wrote a lab that failed
    check-config or its start."""
    with pytest.raises(ValueError, match=f"^{option}: "):
        init_lab(tmp_path / "lab", hac_port=ports[0], ha_port=ports[1])
    assert not (tmp_path / "lab").exists()


def test_radius_on_the_has_own_port_is_refused(tmp_path: Path) -> None:
    secret = tmp_path / "s"
    secret.write_text("s\n")
    with pytest.raises(ValueError, match="^--radius: "):
        init_lab(
            tmp_path / "lab", ha_port=7873, radius=("127.0.0.1", 7873), radius_secret_file=secret
        )


def test_every_string_is_escaped(tmp_path: Path) -> None:
    """A backslash, a quote or a newline in a path or host gave a hac.toml
    that did not parse (written between bare quotes)."""
    odd = tmp_path / 'esc\\dir "q"\nx'
    odd.mkdir()
    secret = odd / "radius.secret"
    secret.write_text("s\n")
    lab = odd / "lab"
    info = init_lab(lab, radius=('radius\\"host', 1812), radius_secret_file=secret)
    hac = tomllib.loads((lab / "hac.toml").read_text())
    server = hac["methods"]["eap"]["backends"]["aaa"]["servers"][0]
    assert server == {"host": 'radius\\"host', "port": 1812, "secret_file": str(secret)}
    for name in ("ha.toml", "mn.toml", "mn-eap-tls.toml", "credentials.toml"):
        tomllib.loads((lab / name).read_text())
    assert info["hac"]["config"] == str(lab / "hac.toml")


def test_a_path_toml_cannot_hold_is_refused(tmp_path: Path) -> None:
    secret = tmp_path / "s\udcff"  # a file name that is not UTF-8
    with pytest.raises(ValueError, match="^--radius-secret-file: .*not UTF-8"):
        init_lab(tmp_path / "lab", radius=("127.0.0.1", 1812), radius_secret_file=secret)


def _ha_addresses(lab: Path) -> tuple[Any, Any]:
    hac = load_config(lab / "hac.toml", "hac")
    ha = load_config(lab / "ha.toml", "ha")
    return hac, ha


def test_without_ipv6_the_lab_is_ipv4_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No ::1 on this host: the lab neither listens there nor provisions it
    (the MN, sent to ::1, could not reach the HA: Errno 99)."""
    monkeypatch.setattr(labsetup, "loopback6_usable", lambda: False)
    init_lab(tmp_path / "lab")
    hac, ha = _ha_addresses(tmp_path / "lab")
    assert [str(a) for a in hac.hac.listen] == ["127.0.0.1"]
    assert hac.ha[0].address6 is None and str(hac.ha[0].address4) == "127.0.0.1"
    assert [str(a) for a in ha.ha.listen] == ["127.0.0.1"] and ha.ha.address6 is None


def test_with_ipv6_the_lab_is_dual_stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(labsetup, "loopback6_usable", lambda: True)
    init_lab(tmp_path / "lab")
    hac, ha = _ha_addresses(tmp_path / "lab")
    assert [str(a) for a in hac.hac.listen] == ["127.0.0.1", "::1"]
    assert str(hac.ha[0].address6) == "::1" and str(ha.ha.address6) == "::1"


def _killed_init(tmp_path: Path, linked: int, *, lock: bool = True) -> tuple[Path, Path]:
    """The state an init killed outright (SIGKILL) leaves: its staging
    directory with the whole lab in it (and its lock, unless ``lock`` is
    false), the first ``linked`` files of ``lab_files`` linked into place."""
    source = tmp_path / "source"
    init_lab(source)
    lab = tmp_path / "lab"
    lab.mkdir()
    stage = lab / (labsetup.STAGE_PREFIX + "x1y2")
    (stage / "pki").mkdir(parents=True)
    for path in lab_files(source):
        (stage / path.relative_to(source)).write_bytes(path.read_bytes())
    if lock:
        (stage / labsetup.STAGE_LOCK).write_bytes(b"")
    for path in lab_files(lab)[:linked]:
        path.parent.mkdir(exist_ok=True)
        os.link(stage / path.relative_to(lab), path)
    return lab, stage


def test_a_rerun_removes_what_an_init_killed_outright_left_and_nothing_else(
    tmp_path: Path,
) -> None:
    """SIGKILL (the OOM killer, a power cut) runs no cleanup: the staging
    directory with every key and a half-linked lab stayed, and every rerun
    refused until an operator cleaned up by hand (known limit of the
    twenty-eighth session).  Now a rerun removes exactly that run's files
    -- the same inode as its staged copy -- and its staging directory, says
    so in one line, and writes the lab."""
    lab, stage = _killed_init(tmp_path, 7)
    (lab / "notes.txt").write_text("mine\n")
    said: list[str] = []
    init_lab(lab, notice=said.append)
    assert not stage.exists()
    assert said == [
        f"{lab.resolve()}: removed what an interrupted mipsec init left there"
        " (7 files it had put in place, and its staging directory)"
    ]
    assert (lab / "notes.txt").read_text() == "mine\n"
    assert _listing(lab) >= {str(p.relative_to(lab)) for p in lab_files(lab)}
    assert not [p for p in lab.iterdir() if p.name.startswith(labsetup.STAGE_PREFIX)]


def test_a_file_of_the_same_name_that_is_not_the_staged_one_is_kept(tmp_path: Path) -> None:
    lab, stage = _killed_init(tmp_path, 3)
    (lab / "hac.toml").write_text("# the operator's own\n")
    with pytest.raises(LabExistsError, match="hac.toml already exists"):
        init_lab(lab)
    assert (lab / "hac.toml").read_text() == "# the operator's own\n"
    assert not stage.exists()
    assert not any(p.exists() for p in lab_files(lab)[:3])


def test_the_staging_directory_of_an_init_running_now_is_left_alone(tmp_path: Path) -> None:
    import fcntl

    lab, stage = _killed_init(tmp_path, 4)
    fd = os.open(stage / labsetup.STAGE_LOCK, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as the running init holds it
        assert labsetup.reclaim_interrupted(lab) == 0
        with pytest.raises(LabExistsError):
            init_lab(lab)
        assert stage.exists() and all(p.exists() for p in lab_files(lab)[:4])
    finally:
        os.close(fd)
    assert labsetup.reclaim_interrupted(lab) == 4 and not stage.exists()


def test_a_staging_directory_without_its_lock_is_stale_only_once_old(tmp_path: Path) -> None:
    """No lock: killed between the staging directory and its lock, or left
    by an older mipsec.  A live init takes the lock at once, so only an old
    one is taken for stale."""
    lab, stage = _killed_init(tmp_path, 2, lock=False)
    assert labsetup.reclaim_interrupted(lab) == 0 and stage.exists()
    old = time.time() - labsetup.STAGE_UNLOCKED_STALE_S - 5
    os.utime(stage, (old, old))
    assert labsetup.reclaim_interrupted(lab) == 2 and not stage.exists()


def test_an_init_holds_its_staging_lock_while_it_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a rerun relies on: during the links the lock is held."""
    import fcntl

    seen: list[bool] = []
    real_link = os.link

    def link(src: Any, dst: Any) -> None:
        if not seen and labsetup.STAGE_PREFIX not in str(dst):  # a link into place
            [stage] = (tmp_path / "lab").glob(labsetup.STAGE_PREFIX + "*")
            fd = os.open(stage / labsetup.STAGE_LOCK, os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                seen.append(True)
            else:
                seen.append(False)
            finally:
                os.close(fd)
        real_link(src, dst)

    monkeypatch.setattr(labsetup.os, "link", link)
    init_lab(tmp_path / "lab")
    assert seen == [True]


def test_a_labs_sas_fit_the_has_max_sa_lifetime(tmp_path: Path) -> None:
    """``[ha] max_sa_lifetime``'s default went from 365 to 7 days in the
    twenty-ninth session (a HAC's made-up install + withdraw pairs left
    withdrawal records for a year, found in review): the SAs a lab's HAC
    issues still fit, and an SA ending 300 days ahead (the review's) does not."""
    lab = tmp_path / "lab"
    init_lab(lab)
    hac = load_config(lab / "hac.toml", "hac")
    ha = load_config(lab / "ha.toml", "ha")
    assert isinstance(hac, HACConfig) and isinstance(ha, HAConfig)
    assert hac.policy.sa_lifetime <= ha.ha.max_sa_lifetime
    assert HACConfig.model_fields["policy"].default.sa_lifetime <= ha.ha.max_sa_lifetime
    assert ha.ha.max_sa_lifetime < 300 * 86400
    assert ha.ha.max_spi_records == 1_000_000
