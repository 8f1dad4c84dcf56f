"""EAP-TLS plugin: option validation (errors name the key), registration, identity policy."""

from __future__ import annotations

import datetime

import pytest
from eaptls_lab import MN_ID, Pki, make_pki, peer_options, server_options

from mipsec.core.eap.tls_identity import Rfc822NamePolicy, nai_equal
from mipsec.core.hookspecs import PluginContext
from mipsec.core.pki import make_ca, make_leaf
from mipsec.core.pluginmanager import make_plugin_manager, registry
from mipsec.core.wire.eap import EapType
from mipsec.plugins.eap_tls import EapTlsMethod


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("eaptls-opts"))


def server_error(pki: Pki, **options) -> str:
    with pytest.raises(ValueError) as err:
        EapTlsMethod().server(options, PluginContext("hac", pki.dir))
    return str(err.value)


def peer_error(pki: Pki, **options) -> str:
    with pytest.raises(ValueError) as err:
        EapTlsMethod().peer(options, PluginContext("mn", pki.dir))
    return str(err.value)


@pytest.mark.parametrize(
    ("over", "starts"),
    [
        ({"cert": "missing.pem"}, "cert: "),
        ({"key": "missing.key"}, "key: "),
        ({"ca": "missing.pem"}, "ca: "),
        ({"key": "mn.key"}, "key: "),  # does not match eap.pem
        ({"ca": "eap.key"}, "ca: "),  # no certificate in it
        ({"cert": "eap.key"}, "cert: "),
        ({"tls_min": "1.1"}, "tls_min: "),
        ({"tls_max": "1.4"}, "tls_max: "),
        ({"tls_min": "1.3", "tls_max": "1.2"}, "tls_min: 1.3 is above tls_max 1.2"),
        ({"fragment_size": 10}, "fragment_size: "),
        ({"fragment_size": 70000}, "fragment_size: "),
        ({"max_message": 100}, "max_message: "),
        ({"identity_policy": "nope"}, "identity_policy: no policy named 'nope'"),
        ({"groups": "X25519:nope"}, "groups: refused by OpenSSL: 'X25519:nope'"),
        ({"groups": ""}, "groups: "),
        ({"groups": " "}, "groups: refused by OpenSSL"),
        ({"colour": "blue"}, "colour: "),
    ],
)
def test_server_option_errors_name_the_key(pki, over, starts):
    assert server_error(pki, **server_options(pki, **over)).startswith(starts)


def test_peer_groups_error_names_the_key(pki):
    text = peer_error(pki, **peer_options(pki, groups="P-256:ffdhe-none"))
    assert text.startswith("groups: refused by OpenSSL")


def test_missing_required_options_are_named(pki):
    text = server_error(pki)
    for key in ("cert", "key", "ca"):
        assert f"{key}: " in text
    assert "server_name: " in peer_error(pki, cert="mn.pem", key="mn.key", ca="ca.pem")


def test_unreadable_file_names_key_and_path(pki):
    text = server_error(pki, **server_options(pki, ca="nowhere/ca.pem"))
    assert text.startswith("ca: ") and "nowhere/ca.pem" in text and "cannot read" in text


@pytest.mark.parametrize(
    ("server_name", "reason"),
    [
        ("192.0.2.1", "must be a DNS name"),
        ("*.example.net", "wildcard"),
        ("bad name", "not a valid host name"),
    ],
)
def test_peer_server_name_must_be_a_dns_name(pki, server_name, reason):
    text = peer_error(pki, **peer_options(pki, server_name=server_name))
    assert text.startswith("server_name: ") and reason in text


def test_versions_may_be_toml_floats(pki):
    factory = EapTlsMethod().peer(
        peer_options(pki, tls_min=1.2, tls_max=1.3), PluginContext("mn", pki.dir)
    )
    assert factory.config.server_name


def test_key_error_never_quotes_the_key(pki, tmp_path):
    bad = tmp_path / "bad.key"
    bad.write_text("-----BEGIN PRIVATE KEY-----\nc2VjcmV0LXNlY3JldA==\n-----END PRIVATE KEY-----\n")
    text = server_error(pki, **server_options(pki, key=str(bad)))
    assert text.startswith("key: ") and "c2VjcmV0" not in text


def test_plugin_registered_through_the_entry_point(pki):
    pm = make_plugin_manager()
    methods = registry(pm, "mipsec_eap_methods")
    tls = methods["tls"]
    assert tls.eap_type == EapType.TLS == 13 and tls.derives_msk is True
    policies = registry(pm, "mipsec_eap_tls_identity_policies")
    assert isinstance(policies["rfc822name"], Rfc822NamePolicy)
    # The server factory finds the policy through ctx.extra["pm"].
    factory = tls.server(server_options(pki), PluginContext("hac", pki.dir, extra={"pm": pm}))
    assert factory.config.policy.name == "rfc822name"


# --- the rfc822name policy --------------------------------------------------------


def _cert(**kw):
    ca_key, ca = make_ca()
    return make_leaf(ca_key, ca, common_name=MN_ID, client=True, server=False, **kw)[1]


def test_rfc822name_policy():
    policy = Rfc822NamePolicy()
    assert policy.check(_cert(email_addresses=["mn1@EXAMPLE.net"]), "mn1@example.net") is None
    assert "equals mn-id" in policy.check(_cert(email_addresses=["Mn1@example.net"]), MN_ID)
    assert "no rfc822Name" in policy.check(_cert(dns_names=["mn1.example.net"]), MN_ID)
    # The CN alone (even if it is the NAI) never counts.
    assert "no subjectAltName" in policy.check(_cert(include_san=False), MN_ID)
    # Several SANs: one match is enough.
    cert = _cert(email_addresses=["other@example.net", MN_ID])
    assert policy.check(cert, MN_ID) is None


@pytest.mark.parametrize(
    ("a", "b", "equal"),
    [
        ("u@realm.example", "u@REALM.example", True),
        ("u@realm.example", "U@realm.example", False),
        ("u", "u", True),
        ("u", "u@realm", False),
        ("a@b@realm", "a@b@REALM", True),  # the realm follows the last "@"
        ("u@realm", "u@realm2", False),
    ],
)
def test_nai_equal(a, b, equal):
    assert nai_equal(a, b) is equal


def test_make_leaf_validity_window():
    now = datetime.datetime.now(datetime.UTC)
    past = (now - datetime.timedelta(days=3), now - datetime.timedelta(days=2))
    cert = _cert(validity=past)
    assert cert.not_valid_after_utc < now
    with pytest.raises(ValueError, match="validity"):
        _cert(validity=(now, now))


def test_a_private_key_open_to_others_is_refused_naming_the_option(pki, tmp_path):
    """The EAP-TLS private key (the HAC's EAP server key, an MN's client key)
    is a secret file like the MHAuth TLS key: refused at mode 0644, naming
    the option and the fix.  It was loaded at any mode before (found in
    review)."""
    import shutil

    for name, error in (("eap.key", server_error), ("mn.key", peer_error)):
        loose = tmp_path / name
        shutil.copy(pki.dir / name, loose)
        loose.chmod(0o644)
        over = {"key": str(loose)}
        options = (
            server_options(pki, **over) if error is server_error else peer_options(pki, **over)
        )
        message = error(pki, **options)
        assert message.startswith("key: ") and "secret file open to" in message, message
        assert f"chmod 600 {loose}" in message
