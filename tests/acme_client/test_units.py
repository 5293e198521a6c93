"""The pure parts of ACME: renewal timing, backoff, the challenge table, the [tls] schema."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from garrison import config as config_mod
from garrison.acme.challenges import ChallengeStore
from garrison.acme.schedule import backoff, renewal_due
from garrison.config import LETSENCRYPT, LETSENCRYPT_STAGING, ConfigError

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def _cert(days: float) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "t")])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(T0)
        .not_valid_after(T0 + dt.timedelta(days=days))
        .sign(key, hashes.SHA256())
    )


def test_renewal_margin_fraction_and_ari() -> None:
    ninety = _cert(90)
    # 30 days before expiry (day 60) equals 2/3 of 90 days: both say day 60.
    assert renewal_due(ninety, 30 * 86400) == T0 + dt.timedelta(days=60)
    # A larger margin wins when it comes first.
    assert renewal_due(ninety, 45 * 86400) == T0 + dt.timedelta(days=45)
    # A short-lived certificate: 2/3 of 6 days (day 4) comes before "30 days before expiry"
    # would (which lies before issuance): the fraction keeps it from renewing at once.
    six = _cert(6)
    assert renewal_due(six, 1 * 86400) == T0 + dt.timedelta(days=4)
    # ARI can only move renewal earlier.
    early = T0 + dt.timedelta(days=10)
    assert renewal_due(ninety, 30 * 86400, early) == early
    assert renewal_due(ninety, 30 * 86400, T0 + dt.timedelta(days=80)) == T0 + dt.timedelta(days=60)


def test_backoff_doubles_and_caps() -> None:
    assert [backoff(n, 60, 600) for n in range(0, 6)] == [0, 60, 120, 240, 480, 600]
    assert backoff(10_000, 60, 21600) == 21600


def test_challenge_store_refuses_bad_tokens(tmp_path: Path) -> None:
    store = ChallengeStore(tmp_path)
    token = "A" * 43
    store.put(token, f"{token}.thumbprint")
    assert store.answer(f"/.well-known/acme-challenge/{token}".encode()) == (
        f"{token}.thumbprint".encode()
    )
    assert store.answer(f"/.well-known/acme-challenge/{token}?x=1".encode()) is not None
    assert store.answer(b"/.well-known/acme-challenge/../../acme/live/privkey.pem") is None
    assert store.answer(b"/.well-known/acme-challenge/" + b"B" * 43) is None
    assert store.answer(b"/other") is None
    with pytest.raises(ValueError, match="invalid challenge token"):
        store.put("../x" * 10, "k")
    store.remove(token)
    assert store.get(token) is None


def _problems(text: str, tmp_path: Path) -> list[str]:
    path = tmp_path / "g.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        config_mod.validate(config_mod.load_file(path))
    return info.value.problems


def test_tls_config_errors_are_precise(tmp_path: Path) -> None:
    problems = _problems(
        '[tls]\nsource = "acme"\n[tls.acme]\nnames = ["a.example.com"]\n', tmp_path
    )
    assert any("server.http_listen" in p for p in problems), problems
    problems = _problems(
        '[server]\nhttp_listen=":80"\n[tls]\nsource = "acme"\n'
        '[tls.acme]\nnames = ["*.example.com", "10.0.0.1", "nodot"]\n'
        'directory = "http://insecure/dir"\nalert_webhook = "ftp://x"\nretry_min = "0s"\n',
        tmp_path,
    )
    text = "\n".join(problems)
    assert "tls.acme.names: '*.example.com': wildcards need DNS-01" in text
    assert "tls.acme.directory:" in text and "https://" in text
    assert "tls.acme.alert_webhook:" in text and "tls.acme.retry_min:" in text
    problems = _problems('[server]\nhttp_listen=":80"\n[tls]\nsource = "acme"\n', tmp_path)
    assert any("needs [tls.acme] names" in p for p in problems), problems
    problems = _problems('[tls]\nsource = "files"\n', tmp_path)
    assert any("cert and key" in p for p in problems), problems


def test_directory_aliases_and_dry_run_target(tmp_path: Path) -> None:
    path = tmp_path / "g.toml"
    path.write_text(
        '[server]\nhttp_listen=":80"\n[tls]\nsource = "acme"\n'
        '[tls.acme]\nnames = ["Chat.Example.com.", "chat.example.com"]\n'
    )
    acme = config_mod.validate(config_mod.load_file(path)).tls.acme
    assert acme.directory == LETSENCRYPT and acme.dry_run_directory == LETSENCRYPT_STAGING
    assert acme.names == ["chat.example.com"]
    path.write_text(path.read_text() + 'directory = "staging"\n')
    assert config_mod.validate(config_mod.load_file(path)).tls.acme.directory == LETSENCRYPT_STAGING
