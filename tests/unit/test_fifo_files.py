"""A FIFO (or a directory) where a role reads a file is refused at once.

An operator's mistake or a hostile write to a configuration directory can
put a FIFO where a credential file, the revocation list, a configuration,
key or certificate file is expected.  A plain ``open()`` of a FIFO waits for
a writer, for ever: on the event loop (a reload, a credential lookup, the
revocation check of every bootstrap) that stops every MN, in a worker thread
it keeps the process from exiting.  Every reader refuses it instead, naming
the file and "not a regular file", and a running role keeps what it read
last (core/filedigest.py ``open_regular``).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from mipsec.core import config, keywrap, tls
from mipsec.core.eap.usim import SqnPolicy, SqnStore
from mipsec.core.errors import ConfigError
from mipsec.core.hookspecs import PluginContext
from mipsec.core.revocation import RevocationList, journal_path
from mipsec.core.roles.mn import mn_secret
from mipsec.plugins import eap_aka, eap_tls
from mipsec.plugins.cred_toml import TomlCredentialsFactory, load_credentials

GOOD = '[[mn]]\nmn_id = "alice@home.example"\npsk_hex = "00112233445566778899aabbccddeeff"\n'
ALICE_KEY = bytes.fromhex("00112233445566778899aabbccddeeff")


def refused_at_once(call: Callable[[], Any], fifo: Path) -> BaseException | None:
    """Run ``call`` in a thread; what it raised (None: it returned).  A call
    still waiting after 5 s waited on the FIFO: the test fails, after a
    writer that opens and closes it has let the thread go."""
    box: dict[str, BaseException] = {}

    def run() -> None:
        try:
            call()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["exc"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(5)
    if t.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # EOF for the reader
        t.join(5)
        pytest.fail(f"{fifo}: waited on a FIFO")
    return box.get("exc")


def fifo_at(path: Path) -> Path:
    if path.exists():
        path.unlink()
    os.mkfifo(path, 0o600)
    return path


def test_configuration_file(tmp_path: Path) -> None:
    fifo = fifo_at(tmp_path / "hac.toml")
    exc = refused_at_once(lambda: config.load_toml(fifo), fifo)
    assert isinstance(exc, ConfigError), exc
    assert str(fifo) in str(exc) and "not a regular file" in str(exc)


def test_configuration_file_that_is_a_directory_or_not_utf8(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a regular file"):
        config.load_toml(tmp_path)
    bad = tmp_path / "hac.toml"
    bad.write_bytes(b'name = "\xff"\n')
    with pytest.raises(ConfigError, match=r"hac\.toml.*not UTF-8"):
        config.load_toml(bad)


def test_credential_file_at_start(tmp_path: Path) -> None:
    fifo = fifo_at(tmp_path / "creds.toml")
    exc = refused_at_once(lambda: load_credentials(fifo), fifo)
    assert isinstance(exc, ValueError), exc
    assert str(fifo) in str(exc) and "not a regular file" in str(exc)


def test_credential_file_replaced_by_a_fifo_keeps_the_last_contents(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "creds.toml"
    path.write_text(GOOD)
    path.chmod(0o600)
    backend = TomlCredentialsFactory().create({"path": str(path)}, PluginContext("hac", tmp_path))
    fifo_at(path)
    answers: list[bytes | None] = []

    def lookup() -> None:  # what a bootstrap does, on the event loop
        answers.append(backend.get_psk("alice@home.example"))

    with caplog.at_level(logging.INFO, logger="mipsec.plugins.cred_toml"):
        for _ in range(3):
            exc = refused_at_once(lookup, path)
            assert exc is None
    assert answers == [ALICE_KEY] * 3
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and len(caplog.records) == 1, caplog.text  # once, not per lookup
    assert "not a regular file" in caplog.text and str(path) in caplog.text
    assert ALICE_KEY.hex() not in caplog.text


@pytest.mark.parametrize("which", ["snapshot", "journal"])
def test_revocation_list_replaced_by_a_fifo_keeps_the_last_list(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, which: str
) -> None:
    path = tmp_path / "revoked.json"
    revoked = RevocationList(path)
    assert revoked.add("mallory@home.example")  # the journal now exists
    fifo = fifo_at(path if which == "snapshot" else journal_path(path))
    answers: list[bool] = []
    with caplog.at_level(logging.INFO, logger="mipsec.revocation"):
        for _ in range(3):  # the check of every bootstrap
            exc = refused_at_once(lambda: answers.append("mallory@home.example" in revoked), fifo)
            assert exc is None
    assert answers == [True] * 3  # the revocation read before stays in force
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1, caplog.text
    assert "not a regular file" in caplog.text


def test_revocation_list_at_start(tmp_path: Path) -> None:
    fifo = fifo_at(tmp_path / "revoked.json")
    exc = refused_at_once(lambda: RevocationList(fifo, config_file="hac.toml"), fifo)
    assert isinstance(exc, ConfigError), exc
    assert "revocations.path" in str(exc) and "not a regular file" in str(exc)


def test_certificate_and_key_files(tmp_path: Path) -> None:
    fifo = fifo_at(tmp_path / "hac.pem")
    exc = refused_at_once(lambda: tls.load_server_chain(fifo), fifo)
    assert isinstance(exc, tls.CertificateError) and "not a regular file" in str(exc), exc
    leaf = cast(Any, None)
    exc = refused_at_once(lambda: tls.load_matching_key(fifo, fifo, leaf), fifo)
    assert isinstance(exc, tls.CertificateError) and "not a regular file" in str(exc), exc


def test_store_key_file(tmp_path: Path) -> None:
    fifo = fifo_at(tmp_path / "store.key")
    exc = refused_at_once(lambda: keywrap.read_key_file(fifo), fifo)
    assert isinstance(exc, keywrap.KeyFileError), exc
    assert str(fifo) in str(exc) and "not a regular file" in str(exc)


def test_eap_tls_ca_file(tmp_path: Path) -> None:
    fifo = fifo_at(tmp_path / "ca.pem")
    exc = refused_at_once(lambda: eap_tls._load_cas(fifo), fifo)
    assert isinstance(exc, ValueError) and str(exc).startswith("ca: "), exc
    assert "not a regular file" in str(exc)


def test_eap_aka_key_file(tmp_path: Path) -> None:
    fifo = fifo_at(tmp_path / "ki.hex")
    exc = refused_at_once(lambda: eap_aka._key(None, str(fifo), "ki", tmp_path), fifo)
    assert isinstance(exc, ValueError) and str(exc).startswith("ki_file: "), exc
    assert "not a regular file" in str(exc)


def test_mn_psk_file(tmp_path: Path) -> None:
    fifo = fifo_at(tmp_path / "mn.psk")
    cfg = cast(Any, SimpleNamespace(mn=SimpleNamespace(psk_hex=None, psk_file=str(fifo))))
    exc = refused_at_once(lambda: mn_secret(cfg, "mn.toml"), fifo)
    assert isinstance(exc, ConfigError), exc
    assert "mn.psk_file" in str(exc) and "not a regular file" in str(exc)


def test_usim_sqn_state_file(tmp_path: Path) -> None:
    fifo = fifo_at(tmp_path / "sqn.json")
    exc = refused_at_once(lambda: SqnStore(fifo, 0, SqnPolicy()), fifo)
    assert exc is not None and "not a regular file" in str(exc), exc


# -------------------------------------------- paths OpenSSL opens itself


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from mipsec.core.pki import init_pki

    return init_pki(tmp_path_factory.mktemp("pki"))


def test_client_context_ca_and_certificate(tmp_path: Path, pki: Any) -> None:
    """What the MN reads at every bootstrap (``[hac] ca``), and the HA at
    every pull (``[pull]`` ``ca``, ``cert``, ``key``): on the event loop."""
    fifo = fifo_at(tmp_path / "ca.pem")
    exc = refused_at_once(lambda: tls.mn_client_context(fifo), fifo)
    assert isinstance(exc, tls.CertificateError) and "not a regular file" in str(exc), exc
    cert = fifo_at(tmp_path / "client.pem")
    exc = refused_at_once(
        lambda: tls.mn_client_context(pki.ca_cert, client_cert=cert, client_key=pki.hac_client_key),
        cert,
    )
    assert isinstance(exc, tls.CertificateError) and "not a regular file" in str(exc), exc


def test_server_context_client_ca(tmp_path: Path, pki: Any) -> None:
    fifo = fifo_at(tmp_path / "client-ca.pem")
    exc = refused_at_once(
        lambda: tls.hac_server_context(pki.hac_cert, pki.hac_key, client_ca_file=fifo), fifo
    )
    assert isinstance(exc, tls.CertificateError) and "not a regular file" in str(exc), exc


@pytest.mark.parametrize("side", ["hac", "mn"])
def test_a_fifo_swapped_in_after_the_check_is_never_opened(
    tmp_path: Path, pki: Any, monkeypatch: pytest.MonkeyPatch, side: str
) -> None:
    """The certificate and key are checked (regular files), then, just as
    OpenSSL is about to open them, replaced by FIFOs.  OpenSSL gets
    ``/proc/self/fd/N`` of the files opened for the check, so it loads them
    and never waits; by name (the old way) its open waited for a writer."""
    import shutil
    import ssl

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    shutil.copy(pki.hac_cert if side == "hac" else pki.hac_client_cert, cert)
    shutil.copy(pki.hac_key if side == "hac" else pki.hac_client_key, key)
    real = ssl.SSLContext.load_cert_chain
    handed: list[str] = []

    def swapped(
        self: ssl.SSLContext, certfile: Any, keyfile: Any = None, password: Any = None
    ) -> None:
        fifo_at(cert)
        fifo_at(key)
        handed.extend([str(certfile), str(keyfile)])
        real(self, certfile, keyfile, password)

    monkeypatch.setattr(ssl.SSLContext, "load_cert_chain", swapped)
    if side == "hac":
        build: Callable[[], Any] = lambda: tls.hac_server_context(cert, key)  # noqa: E731
    else:
        build = lambda: tls.mn_client_context(pki.ca_cert, client_cert=cert, client_key=key)  # noqa: E731
    assert refused_at_once(build, cert) is None
    assert all(h.startswith("/proc/self/fd/") for h in handed), handed


def test_revocation_lock_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The list's lock file (``PATH.lock``), opened at every re-read and
    change: a FIFO there is refused, and the list read before stays."""
    path = tmp_path / "revoked.json"
    revoked = RevocationList(path)
    assert revoked.add("mallory@home.example")
    fifo = fifo_at(path.with_name(path.name + ".lock"))
    exc = refused_at_once(lambda: revoked.add("eve@home.example"), fifo)
    assert isinstance(exc, ConfigError) and "not a regular file" in str(exc), exc
    os.utime(journal_path(path), ns=(1, 1))  # looks changed: the next lookup re-reads
    answers: list[bool] = []
    with caplog.at_level(logging.INFO, logger="mipsec.revocation"):
        exc = refused_at_once(lambda: answers.append("mallory@home.example" in revoked), fifo)
    assert exc is None and answers == [True]
    assert "not a regular file" in caplog.text


def test_mn_backoff_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The MN reads its kept backoff before its first bootstrap: a FIFO at
    the path is reported and ignored at once, not waited on."""
    import logging

    from mipsec.core.mn_backoff import Backoff

    fifo = fifo_at(tmp_path / "mn.backoff")
    log = logging.getLogger("test.fifo.backoff")
    backoff = Backoff(fifo, mn_id="mn1@example.net", retry_min=10, retry_max=600, log=log)
    left: list[float] = []
    with caplog.at_level(logging.WARNING, logger=log.name):
        assert refused_at_once(lambda: left.append(backoff.resume()), fifo) is None
    assert left == [0.0] and backoff.failures == 0
    (record,) = caplog.records
    assert str(fifo) in record.getMessage() and "not a regular file" in record.getMessage()
