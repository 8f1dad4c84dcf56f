"""Renewing certificates in place: core/filedigest.py (what a reload
compares files against), core/servercert.py (the channel binding per
server context) and core/certexpiry.py (what is due)."""

from __future__ import annotations

import os
import shutil
import ssl
from pathlib import Path

import pytest

from mipsec.core.errors import CertificateError
from mipsec.core.filedigest import MAX_FILE, FileDigests, UnreadableFileError, read_regular
from mipsec.core.pki import init_pki, make_ca, make_leaf, write_cert, write_key
from mipsec.core.servercert import ChannelBindings, load
from mipsec.core.tls import server_cb_octets


def test_digests_follow_contents_not_paths_or_times(tmp_path: Path) -> None:
    a, b = tmp_path / "a.pem", tmp_path / "b.pem"
    a.write_bytes(b"one")
    b.write_bytes(b"two")
    d = FileDigests([("cert", a), ("key", b)])
    assert not d.changed()
    a.write_bytes(b"one")  # rewritten, the same octets (new mtime)
    os.utime(a, (1, 1))
    assert not d.changed()
    a.write_bytes(b"on")  # an octet moved from one file to the next
    b.write_bytes(b"etwo")
    assert d.changed()
    a.write_bytes(b"one")
    b.write_bytes(b"two")
    assert not d.changed()
    b.unlink()  # cannot be read: changed (the rebuild names it)
    assert d.changed()


def test_unreadable_files_are_named_by_key(tmp_path: Path) -> None:
    good = tmp_path / "good.pem"
    good.write_bytes(b"x")
    with pytest.raises(UnreadableFileError) as err:
        FileDigests([("cert", good), ("key", tmp_path / "missing.key")])
    assert err.value.key == "key"
    assert str(err.value).startswith(f"key: {tmp_path / 'missing.key'}: cannot read (")
    assert isinstance(err.value, ValueError)  # a plugin option error


def test_a_fifo_is_refused_without_waiting(tmp_path: Path) -> None:
    fifo = tmp_path / "cert.pem"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match="not a regular file"):
        read_regular(fifo)  # no writer: a blocking open would never return
    with pytest.raises(UnreadableFileError, match="cert: .*not a regular file"):
        FileDigests([("cert", fifo)])
    with pytest.raises(OSError, match="not a regular file"):
        read_regular(tmp_path)  # a directory


def test_an_oversized_file_is_refused(tmp_path: Path) -> None:
    big = tmp_path / "big.pem"
    big.write_bytes(b"\0" * (MAX_FILE + 1))
    with pytest.raises(OSError, match=f"larger than {MAX_FILE} octets"):
        read_regular(big)
    assert read_regular(big, limit=MAX_FILE + 1) == b"\0" * (MAX_FILE + 1)


def test_digests_keep_no_file_contents(tmp_path: Path) -> None:
    key = tmp_path / "k.key"
    key.write_bytes(b"SECRET-KEY-MATERIAL")
    d = FileDigests([("key", key)])
    assert "SECRET" not in repr(d)
    assert b"SECRET" not in d._digest and len(d._digest) == 32  # a SHA-256, not the octets


# ------------------------------------------------------------ servercert


def _pair(tmp_path: Path) -> tuple[Path, Path]:
    pki = init_pki(tmp_path / "pki")
    return pki.hac_cert, pki.hac_key


def test_load_pairs_context_binding_and_digests(tmp_path: Path) -> None:
    cert, key = _pair(tmp_path)
    sc = load(cert, key, strict_rfc6618=False)
    assert sc.cb_octets == server_cb_octets(cert)
    assert not sc.files.changed()
    assert isinstance(sc.context, ssl.SSLContext)
    assert "cb_octets=" not in repr(sc) and "context=" not in repr(sc)


def test_load_refuses_a_mismatched_pair_and_a_fifo(tmp_path: Path) -> None:
    cert, key = _pair(tmp_path)
    _, stray = make_leaf(*make_ca("stray"), common_name="hac.mipsec.test")
    write_cert(cert, stray)
    with pytest.raises(CertificateError, match="does not match the private key"):
        load(cert, key, strict_rfc6618=False)
    cert.unlink()
    os.mkfifo(cert)
    with pytest.raises(UnreadableFileError) as err:
        load(cert, key, strict_rfc6618=False)
    assert err.value.key == "cert"


def test_channel_bindings_follow_the_context_a_connection_used(tmp_path: Path) -> None:
    cert, key = _pair(tmp_path)
    old = load(cert, key, strict_rfc6618=False)
    bindings = ChannelBindings(old)
    ca_key, ca_cert = make_ca("another")
    k2, c2 = make_leaf(ca_key, ca_cert, common_name="hac.mipsec.test", dns_names=["hac.x"])
    other = tmp_path / "other"
    other.mkdir()
    write_cert(other / "hac.pem", c2)
    write_key(other / "hac.key", k2)
    new = load(other / "hac.pem", other / "hac.key", strict_rfc6618=False)
    assert new.cb_octets != old.cb_octets
    before = old.context.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_side=True)
    bindings.use(new)
    after = new.context.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_side=True)
    assert bindings.of(before) == old.cb_octets  # begun under the old certificate
    assert bindings.of(after) == new.cb_octets
    assert bindings.of(None) == new.cb_octets
    assert bindings.current is new


def test_eap_tls_server_factory_goes_stale_when_its_files_change(tmp_path: Path) -> None:
    from eaptls_lab import make_pki, server_options

    from mipsec.core.eap.local import LocalBackend, LocalMethod
    from mipsec.core.hookspecs import PluginContext
    from mipsec.core.wire.eap import EapType
    from mipsec.plugins.eap_tls import EapTlsMethod

    pki = make_pki(tmp_path)
    factory = EapTlsMethod().server(server_options(pki), PluginContext("hac", pki.dir))
    backend = LocalBackend([LocalMethod("tls", int(EapType.TLS), factory)])
    assert factory.stale() is False and backend.stale() is False
    shutil.copy(pki.dir / "eap.pem", pki.dir / "eap.pem.bak")
    shutil.copy(pki.dir / "eap-other.pem", pki.dir / "eap.pem")  # renewed (another key)
    assert factory.stale() is True and backend.stale() is True
    shutil.copy(pki.dir / "eap.pem.bak", pki.dir / "eap.pem")  # back: nothing changed
    assert factory.stale() is False
    (pki.dir / "ca.pem").write_bytes((pki.dir / "other-ca.pem").read_bytes())  # the MN CA
    assert factory.stale() is True
    rebuilt = EapTlsMethod().server(server_options(pki), PluginContext("hac", pki.dir))
    assert rebuilt.stale() is False
    (pki.dir / "eap.key").unlink()
    assert rebuilt.stale() is True


# ------------------------------------------------------------ certexpiry


def test_expiry_report_warns_only_for_what_is_due(caplog: pytest.LogCaptureFixture) -> None:
    import logging
    from datetime import UTC, datetime, timedelta

    from mipsec.core.certexpiry import WARN_DAYS, certificates, prefixed, report, status_rows

    now = datetime(2026, 12, 6, tzinfo=UTC)
    found = {
        "hac.cert": now + timedelta(days=400),
        "provisioning.cert": now + timedelta(days=WARN_DAYS, hours=-1),
        "ha[0].options.cert": now - timedelta(seconds=1),
    }
    log = logging.getLogger("test.certexpiry")
    with caplog.at_level(logging.INFO, logger="test.certexpiry"):
        report(log, "hac", found, now)
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert lines == [
        ("ERROR", "hac certificate ha[0].options.cert expired at 2026-12-05T23:59:59+00:00"),
        (
            "WARNING",
            "hac certificate provisioning.cert expires at 2026-12-19T23:00:00+00:00 "
            "(in 13 days): renew it in place and reload",
        ),
    ]
    rows = status_rows(found, now)
    assert rows["hac.cert"] == {"not_after": "2028-01-10T00:00:00+00:00", "days_left": 400}
    assert rows["ha[0].options.cert"]["days_left"] == -1
    # Optional on plugin objects: none offered, none reported.
    assert certificates(object()) == {}
    assert prefixed("methods.eap.", {"tls.cert": now}) == {"methods.eap.tls.cert": now}
