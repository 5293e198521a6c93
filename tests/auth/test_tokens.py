"""JWT issue and verify with real crypto: an attack table that must all be refused with a
precise reason, good tokens from Garrison and from external issuers (PEM key file, JWKS file,
HMAC secret, and a JWKS URL served by a real aiohttp server), and the verification cache.

Time is injected (`now=`); hand-built tokens are signed with PyJWT's algorithm objects, or with
hmac directly where PyJWT refuses (a PEM public key as an HMAC secret).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from sqlalchemy import Engine

from garrison.auth.signing import SigningKeys
from garrison.auth.tokens import Claims, InvalidToken, TokenIssuer, TokenVerifier, UnknownKey
from garrison.config import JwtIssuerConfig
from garrison.store.db import open_store

T0 = 1_800_000_000.0
OWN_ISS = "garrison"
OWN_AUD = "garrison"
EXT_ISS = "https://idp.example"
EXT_AUD = "garrison-api"
HS_ISS = "https://hs.example"
SECRET = b"0123456789abcdef0123456789abcdef-hmac"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_KEY_2 = rsa.generate_private_key(public_exponent=65537, key_size=2048)


# -- helpers ------------------------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64json(obj: object) -> str:
    return b64(json.dumps(obj).encode())


def sign(header: dict[str, Any], payload: dict[str, Any], key: Any, alg: str) -> str:
    """A JWS built by hand, so headers PyJWT would not write (crit, none) can be tested."""
    signing_input = f"{b64json(header)}.{b64json(payload)}".encode("ascii")
    algorithm = jwt.get_algorithm_by_name(alg)
    signature = algorithm.sign(signing_input, algorithm.prepare_key(key))
    return f"{signing_input.decode('ascii')}.{b64(signature)}"


def hs256_raw(header: dict[str, Any], payload: dict[str, Any], secret: bytes) -> str:
    """HMAC with any bytes as secret (PyJWT refuses a PEM key as secret; attackers do not)."""
    signing_input = f"{b64json(header)}.{b64json(payload)}"
    mac = hmac.new(secret, signing_input.encode("ascii"), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


def pem(key: Any) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def rsa_jwk(key: rsa.RSAPrivateKey, kid: str, alg: str | None = "RS256") -> dict[str, Any]:
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwk["kid"] = kid
    if alg is not None:
        jwk["alg"] = alg
    return jwk


def own_payload(**changes: Any) -> dict[str, Any]:
    payload = {"iss": OWN_ISS, "sub": "alice", "aud": OWN_AUD, "iat": T0, "exp": T0 + 900}
    payload.update(changes)
    return {k: v for k, v in payload.items() if v is not None}


def ext_payload(**changes: Any) -> dict[str, Any]:
    return own_payload(**({"iss": EXT_ISS, "aud": [EXT_AUD, "other"]} | changes))


@dataclass
class Env:
    keys: SigningKeys
    issuer: TokenIssuer
    verifier: TokenVerifier
    tmp: Path

    @property
    def kid(self) -> str:
        return self.keys.current[0]

    @property
    def own_key(self) -> ec.EllipticCurvePrivateKey:
        return self.keys.current[1]


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    eng = open_store(f"sqlite:///{tmp_path / 'g.db'}")
    yield eng
    eng.dispose()


@pytest.fixture
def env(engine: Engine, tmp_path: Path) -> Env:
    keys = SigningKeys(engine, rotate_after=30 * 86400.0, max_token_lifetime=3600.0)
    keys.load(now=T0)
    pem_file = tmp_path / "idp.pem"
    pem_file.write_bytes(pem(RSA_KEY))
    secret_file = tmp_path / "hs.secret"
    secret_file.write_bytes(SECRET + b"\n")
    external = [
        JwtIssuerConfig(
            issuer=EXT_ISS,
            audience=[EXT_AUD],
            key_file=pem_file,
            roles_claim="groups",
        ),
        JwtIssuerConfig(
            issuer=HS_ISS, audience="hs-aud", secret_file=secret_file, algorithms=["HS256"]
        ),
    ]
    verifier = TokenVerifier(keys, OWN_ISS, OWN_AUD, external)
    return Env(keys, TokenIssuer(keys, OWN_ISS, OWN_AUD), verifier, tmp_path)


# -- the attack table ---------------------------------------------------------------------------

Build = Callable[[Env], str]


def _tampered(e: Env) -> str:
    token = e.issuer.issue("alice", lifetime=600, roles=["user"], now=T0)
    head, _, sig = token.split(".")
    return f"{head}.{b64json(own_payload(roles=['admin']))}.{sig}"


NAN_PAYLOAD = b'{"iss":"garrison","aud":"garrison","sub":"a","exp":NaN}'
DUPLICATE_PAYLOAD = b'{"iss":"evil","iss":"garrison","aud":"garrison","sub":"a","exp":1e10}'


def _raw_payload(e: Env, payload: bytes) -> str:
    header = b64json({"alg": "ES256", "kid": e.kid})
    return f"{header}.{b64(payload)}.AAAA"


def _flip_signature(token: str) -> str:
    head, body, sig = token.split(".")
    middle = len(sig) // 2
    flipped = "A" if sig[middle] != "A" else "B"
    return f"{head}.{body}.{sig[:middle]}{flipped}{sig[middle + 1 :]}"


def _own_signed(**changes: Any) -> Build:
    return lambda e: sign(
        {"alg": "ES256", "typ": "JWT", "kid": e.kid}, own_payload(**changes), e.own_key, "ES256"
    )


ATTACKS: list[tuple[str, Build, str]] = [
    (
        "alg-none-with-kid",
        lambda e: f"{b64json({'alg': 'none', 'kid': e.kid})}.{b64json(own_payload())}.",
        "algorithm not allowed",
    ),
    (
        "alg-none-without-kid",
        lambda e: f"{b64json({'alg': 'none'})}.{b64json(own_payload())}.",
        "algorithm not allowed",
    ),
    (
        "alg-None-capitalised",
        lambda e: f"{b64json({'alg': 'None', 'kid': e.kid})}.{b64json(own_payload())}.x",
        "algorithm not allowed",
    ),
    (
        "alg-missing",
        lambda e: sign({"kid": e.kid}, own_payload(), e.own_key, "ES256"),
        "algorithm not allowed",
    ),
    (
        "hs256-with-own-public-pem-as-secret",
        lambda e: hs256_raw({"alg": "HS256", "kid": e.kid}, own_payload(), pem(e.own_key)),
        "algorithm not allowed for this key",
    ),
    (
        "hs256-with-own-public-pem-no-kid",
        lambda e: hs256_raw({"alg": "HS256"}, own_payload(), pem(e.own_key)),
        "algorithm not allowed for this key",
    ),
    (
        "external-rs256-rewritten-to-hs256",
        lambda e: hs256_raw({"alg": "HS256", "typ": "JWT"}, ext_payload(), pem(RSA_KEY)),
        "algorithm not allowed for this key",
    ),
    (
        "external-rs256-key-with-ps256-header",
        lambda e: sign({"alg": "PS256"}, ext_payload(), RSA_KEY, "PS256"),
        "algorithm not allowed for this key",
    ),
    (
        "own-kid-with-es384-header",
        lambda e: sign(
            {"alg": "ES384", "kid": e.kid},
            own_payload(),
            ec.generate_private_key(ec.SECP384R1()),
            "ES384",
        ),
        "algorithm not allowed for this key",
    ),
    (
        "hmac-issuer-token-signed-rs256",
        lambda e: sign({"alg": "RS256"}, own_payload(iss=HS_ISS, aud="hs-aud"), RSA_KEY, "RS256"),
        "algorithm not allowed for this key",
    ),
    (
        "unknown-ec-key-with-known-kid",
        lambda e: sign(
            {"alg": "ES256", "kid": e.kid},
            own_payload(),
            ec.generate_private_key(ec.SECP256R1()),
            "ES256",
        ),
        "invalid signature",
    ),
    (
        "unknown-kid",
        lambda e: sign(
            {"alg": "ES256", "kid": "AAAAAAAAAAAAAAAAAAAAAA"},
            own_payload(),
            ec.generate_private_key(ec.SECP256R1()),
            "ES256",
        ),
        "unknown signing key",
    ),
    (
        "external-wrong-rsa-key",
        lambda e: sign({"alg": "RS256", "kid": "k"}, ext_payload(), RSA_KEY_2, "RS256"),
        "invalid signature",
    ),
    (
        "hs256-wrong-secret",
        lambda e: hs256_raw({"alg": "HS256"}, own_payload(iss=HS_ISS, aud="hs-aud"), b"x" * 40),
        "invalid signature",
    ),
    (
        "expired",
        lambda e: e.issuer.issue("alice", lifetime=60, now=T0 - 1000),
        "token expired",
    ),
    ("expired-beyond-leeway", _own_signed(exp=T0 - 31, iat=T0 - 100), "token expired"),
    ("nbf-in-future", _own_signed(nbf=T0 + 3600), "token not yet valid"),
    ("iat-in-future", _own_signed(iat=T0 + 3600), "token issued in the future"),
    ("wrong-iss", _own_signed(iss="https://evil.example"), "wrong issuer"),
    ("missing-iss", _own_signed(iss=None), "wrong issuer"),
    ("iss-not-a-string", _own_signed(iss=["garrison"]), "wrong issuer"),
    (
        "wrong-aud",
        lambda e: e.issuer.issue("alice", lifetime=60, audience="other", now=T0),
        "wrong audience",
    ),
    ("missing-aud", _own_signed(aud=None), "wrong audience"),
    ("aud-list-without-ours", _own_signed(aud=["a", "b", 7]), "wrong audience"),
    (
        "external-token-with-own-audience",
        lambda e: sign({"alg": "RS256"}, ext_payload(aud=OWN_AUD), RSA_KEY, "RS256"),
        "wrong audience",
    ),
    ("missing-exp", _own_signed(exp=None), "missing exp claim"),
    ("exp-is-a-string", _own_signed(exp="9999999999"), "invalid exp claim"),
    ("exp-is-bool", _own_signed(exp=True), "invalid exp claim"),
    ("exp-too-large-for-a-float", _own_signed(exp=10**400), "invalid exp claim"),
    ("nbf-is-a-list", _own_signed(nbf=[1]), "invalid nbf claim"),
    ("missing-sub", _own_signed(sub=None), "missing subject"),
    (
        "crit-header",
        lambda e: sign(
            {"alg": "ES256", "kid": e.kid, "crit": ["exp"]}, own_payload(), e.own_key, "ES256"
        ),
        "unsupported critical header",
    ),
    ("malformed-two-parts", lambda e: f"{b64json({'alg': 'ES256'})}.{b64json({})}", "malformed"),
    ("malformed-four-parts", lambda e: _own_signed()(e) + ".x", "malformed"),
    ("malformed-bad-base64-chars", lambda e: "eyJ!!!.eyJ.abc", "malformed"),
    ("malformed-bad-base64-length", lambda e: "abcde.abcde.abc", "malformed"),
    ("malformed-padding", lambda e: _own_signed()(e).replace(".", "=.", 1), "malformed"),
    ("malformed-bad-json", lambda e: f"{b64(b'{nope')}.{b64json({})}.x", "malformed"),
    ("malformed-header-not-object", lambda e: f"{b64json([1])}.{b64json({})}.x", "malformed"),
    ("malformed-payload-not-object", lambda e: f"{b64json({})}.{b64json('s')}.x", "malformed"),
    ("malformed-nan-exp", lambda e: _raw_payload(e, NAN_PAYLOAD), "malformed"),
    ("malformed-duplicate-iss", lambda e: _raw_payload(e, DUPLICATE_PAYLOAD), "malformed"),
    (
        "malformed-kid-not-string",
        lambda e: sign({"alg": "ES256", "kid": 5}, own_payload(), e.own_key, "ES256"),
        "malformed",
    ),
    ("malformed-huge", lambda e: "a" * 9000 + "." + "b" * 10 + ".c", "malformed"),
    ("malformed-empty", lambda e: "", "malformed"),
    ("tampered-payload", _tampered, "invalid signature"),
    ("tampered-signature", lambda e: _flip_signature(_own_signed()(e)), "invalid signature"),
]


@pytest.mark.parametrize(
    ("build", "reason"), [(b, r) for _, b, r in ATTACKS], ids=[i for i, _, _ in ATTACKS]
)
def test_attack_is_refused(env: Env, build: Build, reason: str) -> None:
    token = build(env)
    with pytest.raises(InvalidToken) as caught:
        env.verifier.verify(token, now=T0)
    assert reason in str(caught.value)
    assert not isinstance(caught.value, UnknownKey)
    assert token not in env.verifier._cache


# -- good tokens --------------------------------------------------------------------------------


def test_own_token_roundtrip(env: Env) -> None:
    token = env.issuer.issue(
        "alice",
        lifetime=900,
        roles=["admin", "dev"],
        email="alice@example.com",
        scopes=["chat", "files:read"],
        extra={"sid": "s1"},
        now=T0,
    )
    header = jwt.get_unverified_header(token)
    assert header == {"alg": "ES256", "typ": "JWT", "kid": env.kid}
    claims = env.verifier.verify(token, now=T0 + 10)
    assert claims.subject == "alice"
    assert claims.issuer == OWN_ISS
    assert claims.expires_at == T0 + 900
    assert claims.issued_at == T0
    assert claims.email == "alice@example.com"
    assert claims.roles == ("admin", "dev")
    assert claims.scopes == ("chat", "files:read")
    assert claims.own is True
    assert claims.token_id and len(claims.token_id) >= 16
    payload = jwt.decode(token, options={"verify_signature": False})
    assert payload["sid"] == "s1"
    assert payload["nbf"] == payload["iat"] == T0


def test_own_token_without_scopes_is_not_scope_restricted(env: Env) -> None:
    claims = env.verifier.verify(env.issuer.issue("bob", lifetime=60, now=T0), now=T0)
    assert claims.scopes is None
    assert claims.roles == ()
    assert claims.email is None


def test_exp_within_leeway_is_accepted(env: Env) -> None:
    token = sign({"alg": "ES256", "kid": env.kid}, own_payload(exp=T0 - 29), env.own_key, "ES256")
    assert env.verifier.verify(token, now=T0).subject == "alice"


def test_issue_refuses_bad_arguments(env: Env) -> None:
    with pytest.raises(ValueError):
        env.issuer.issue("alice", lifetime=3601, now=T0)  # longer than its key is published
    for claim in ("sub", "iss", "aud", "exp", "nbf", "iat", "jti"):
        with pytest.raises(ValueError):
            env.issuer.issue("alice", lifetime=60, extra={claim: "x"}, now=T0)


def test_extra_may_carry_scope_and_iat_is_exact(env: Env) -> None:
    now = T0 + 0.75
    token = env.issuer.issue("alice", lifetime=60, extra={"scope": "a b", "amr": ["pwd"]}, now=now)
    claims = env.verifier.verify(token, now=now)
    assert claims.scopes == ("a", "b")
    assert claims.issued_at == now  # not floored: never older than a change a moment before
    assert jwt.decode(token, options={"verify_signature": False})["nbf"] == int(now)


def test_token_from_retired_key_verifies_until_it_expires(env: Env) -> None:
    token = env.issuer.issue("alice", lifetime=600, now=T0)
    env.keys.rotate(now=T0 + 1)
    env.verifier.reload_own_keys()
    new = env.issuer.issue("alice", lifetime=600, now=T0 + 2)
    assert jwt.get_unverified_header(new)["kid"] != jwt.get_unverified_header(token)["kid"]
    assert env.verifier.verify(token, now=T0 + 2).subject == "alice"
    assert env.verifier.verify(new, now=T0 + 2).subject == "alice"


def test_external_rs256_with_pem_key_file(env: Env) -> None:
    payload = ext_payload(groups="ops, dev admin", scp=["read", 7, "write"], email="a@x.io")
    token = jwt.encode(payload, RSA_KEY, algorithm="RS256", headers={"kid": "idp-key-1"})
    claims = env.verifier.verify(token, now=T0)
    assert claims.own is False
    assert claims.issuer == EXT_ISS
    assert claims.roles == ("ops", "dev", "admin")
    assert claims.scopes == ("read", "write")
    assert claims.email == "a@x.io"
    no_kid = jwt.encode(payload, RSA_KEY, algorithm="RS256")
    assert env.verifier.verify(no_kid, now=T0).subject == "alice"


def test_external_claims_junk_is_ignored_not_a_crash(env: Env) -> None:
    payload = ext_payload(groups={"a": 1}, scope=5, email=["x"], jti=3)
    claims = env.verifier.verify(jwt.encode(payload, RSA_KEY, algorithm="RS256"), now=T0)
    assert claims.roles == ()
    assert claims.scopes == ()  # an unreadable scope claim restricts to nothing
    assert claims.email is None
    assert claims.token_id is None


def test_external_user_claim_and_nested_roles(env: Env, tmp_path: Path) -> None:
    path = tmp_path / "kc.pem"
    path.write_bytes(pem(RSA_KEY))
    config = JwtIssuerConfig(
        issuer="https://kc.example/realms/r",
        audience="account",
        key_file=path,
        user_claim="preferred_username",
        roles_claim="realm_access.roles",
    )
    verifier = TokenVerifier(None, OWN_ISS, OWN_AUD, [config])
    payload = own_payload(
        iss=config.issuer,
        aud="account",
        sub="0f3c",
        preferred_username="carol",
        realm_access={"roles": ["admin", None, "user"]},
    )
    claims = verifier.verify(jwt.encode(payload, RSA_KEY, algorithm="RS256"), now=T0)
    assert (claims.subject, claims.roles) == ("carol", ("admin", "user"))
    # No own keys configured: a Garrison-looking token has no issuer to match.
    with pytest.raises(InvalidToken, match="wrong issuer"):
        verifier.verify(jwt.encode(own_payload(), RSA_KEY, algorithm="RS256"), now=T0)


def test_external_jwks_key_file_selects_by_kid(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    doc = {
        "keys": [
            rsa_jwk(RSA_KEY, "one"),
            rsa_jwk(RSA_KEY_2, "two", alg=None),  # inferred: RS256 is the only RSA algorithm
            {"kty": "oct", "k": b64(SECRET), "kid": "sym", "alg": "HS256"},  # never used
            rsa_jwk(RSA_KEY_2, "enc") | {"use": "enc"},
        ]
    }
    path.write_text(json.dumps(doc))
    config = JwtIssuerConfig(issuer=EXT_ISS, audience=EXT_AUD, key_file=path)
    verifier = TokenVerifier(None, OWN_ISS, OWN_AUD, [config])
    for kid, key in (("one", RSA_KEY), ("two", RSA_KEY_2)):
        token = jwt.encode(ext_payload(), key, algorithm="RS256", headers={"kid": kid})
        assert verifier.verify(token, now=T0).subject == "alice"
    wrong = jwt.encode(ext_payload(), RSA_KEY, algorithm="RS256", headers={"kid": "two"})
    with pytest.raises(InvalidToken, match="invalid signature"):
        verifier.verify(wrong, now=T0)
    no_kid = jwt.encode(ext_payload(), RSA_KEY, algorithm="RS256")
    with pytest.raises(InvalidToken, match="unknown signing key"):
        verifier.verify(no_kid, now=T0)  # two keys: a token must say which
    forged = hs256_raw({"alg": "HS256", "kid": "sym"}, ext_payload(), SECRET)
    with pytest.raises(InvalidToken, match="unknown signing key"):
        verifier.verify(forged, now=T0)


def test_ambiguous_pem_key_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    path.write_bytes(pem(RSA_KEY))
    config = JwtIssuerConfig(
        issuer=EXT_ISS, audience=EXT_AUD, key_file=path, algorithms=["RS256", "PS256"]
    )
    with pytest.raises(ValueError, match="several"):
        TokenVerifier(None, OWN_ISS, OWN_AUD, [config])


def test_short_hmac_secret_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "s"
    path.write_bytes(b"short")
    config = JwtIssuerConfig(issuer=HS_ISS, audience="a", secret_file=path, algorithms=["HS256"])
    with pytest.raises(ValueError, match="at least 32 bytes"):
        TokenVerifier(None, OWN_ISS, OWN_AUD, [config])


def test_external_hs256_with_secret_file(env: Env) -> None:
    payload = own_payload(iss=HS_ISS, aud="hs-aud", roles=["a", 1, "b"])
    claims = env.verifier.verify(jwt.encode(payload, SECRET, algorithm="HS256"), now=T0)
    assert (claims.subject, claims.issuer, claims.roles, claims.own) == (
        "alice",
        HS_ISS,
        ("a", "b"),
        False,
    )


# -- the cache ----------------------------------------------------------------------------------


def test_cache_hit_returns_equal_claims_and_expiry_still_applies(env: Env) -> None:
    token = env.issuer.issue("alice", lifetime=300, roles=["r"], now=T0)
    first = env.verifier.verify(token, now=T0)
    assert token in env.verifier._cache
    second = env.verifier.verify(token, now=T0 + 100)
    assert second == first
    assert env.verifier.verify(token, now=T0 + 300 + 29) == first  # within leeway
    with pytest.raises(InvalidToken, match="token expired"):
        env.verifier.verify(token, now=T0 + 300 + 30)
    assert token not in env.verifier._cache
    with pytest.raises(InvalidToken, match="token expired"):
        env.verifier.verify(token, now=T0 + 300 + 30)


def test_cache_evicts_oldest_and_reload_clears(env: Env) -> None:
    verifier = TokenVerifier(env.keys, OWN_ISS, OWN_AUD, cache_size=2)
    tokens = [env.issuer.issue(f"u{i}", lifetime=60, now=T0) for i in range(3)]
    for token in tokens:
        verifier.verify(token, now=T0)
    assert list(verifier._cache) == tokens[1:]
    verifier.reload_own_keys()
    assert not verifier._cache


def test_failures_are_not_cached(env: Env) -> None:
    token = env.issuer.issue("alice", lifetime=60, now=T0)
    with pytest.raises(InvalidToken, match="not yet valid"):
        env.verifier.verify(token, now=T0 - 3600)
    assert not env.verifier._cache
    assert env.verifier.verify(token, now=T0).subject == "alice"


# -- JWKS over HTTP -----------------------------------------------------------------------------


class FakeIdP:
    """A real HTTP server on 127.0.0.1 that serves a JWKS and counts the fetches."""

    def __init__(self) -> None:
        self.keys: dict[str, rsa.RSAPrivateKey] = {}
        self.fetches = 0
        self.status = 200
        self.delay = 0.0
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def _jwks(self, _request: web.Request) -> web.Response:
        self.fetches += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        doc = {"keys": [rsa_jwk(key, kid) for kid, key in self.keys.items()]}
        return web.json_response(doc, status=self.status)

    async def __aenter__(self) -> FakeIdP:
        app = web.Application()
        app.router.add_get("/jwks", self._jwks)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/jwks"
        return self

    async def __aexit__(self, *_exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()

    def token(self, kid: str, key: rsa.RSAPrivateKey | None = None) -> str:
        signer = key or self.keys[kid]
        return jwt.encode(ext_payload(), signer, algorithm="RS256", headers={"kid": kid})


def _remote_verifier(url: str) -> TokenVerifier:
    config = JwtIssuerConfig(issuer=EXT_ISS, audience=EXT_AUD, jwks_url=url)
    return TokenVerifier(None, OWN_ISS, OWN_AUD, [config])


def test_jwks_url_rotation_triggers_one_refresh_and_floods_do_not() -> None:
    async def scenario() -> None:
        async with FakeIdP() as idp:
            idp.keys["k1"] = RSA_KEY
            verifier = _remote_verifier(idp.url)
            await verifier.start()
            assert idp.fetches == 1
            assert verifier.verify(idp.token("k1"), now=T0).subject == "alice"

            idp.keys["k2"] = RSA_KEY_2  # the IdP rotates
            rotated = idp.token("k2")
            with pytest.raises(UnknownKey):
                verifier.verify(rotated, now=T0)
            claims = await verifier.verify_async(rotated, now=T0)
            assert claims.issuer == EXT_ISS
            assert idp.fetches == 2

            intruder = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            flood = [idp.token(secrets.token_hex(8), intruder) for _ in range(50)]
            results = await asyncio.gather(
                *(verifier.verify_async(t, now=T0) for t in flood), return_exceptions=True
            )
            assert all(isinstance(r, InvalidToken) for r in results)
            assert {str(r) for r in results} == {"unknown signing key"}
            for token in flood[:10]:  # one after another: each would refresh, if allowed
                with pytest.raises(InvalidToken, match="unknown signing key"):
                    await verifier.verify_async(token, now=T0)
            assert idp.fetches <= 3
            # Known keys still work after the flood.
            assert (await verifier.verify_async(idp.token("k1"), now=T0)).subject == "alice"

    asyncio.run(scenario())


def test_jwks_url_concurrent_unknown_kids_share_one_fetch() -> None:
    async def scenario() -> None:
        async with FakeIdP() as idp:
            idp.keys["k1"] = RSA_KEY
            idp.delay = 0.2  # every caller arrives while the first fetch is in flight
            verifier = _remote_verifier(idp.url)  # no start(): keys come on first demand
            good = idp.token("k1")
            bad = [idp.token(f"x{i}", RSA_KEY_2) for i in range(50)]
            results = await asyncio.gather(
                verifier.verify_async(good, now=T0),
                *(verifier.verify_async(t, now=T0) for t in bad),
                return_exceptions=True,
            )
            assert isinstance(results[0], Claims)
            assert all(isinstance(r, InvalidToken) for r in results[1:])
            assert idp.fetches == 1

    asyncio.run(scenario())


def test_jwks_url_down_fails_closed() -> None:
    async def scenario() -> None:
        async with FakeIdP() as idp:
            idp.keys["k1"] = RSA_KEY
            idp.status = 503
            verifier = _remote_verifier(idp.url)
            await verifier.start()  # logged, not raised
            with pytest.raises(InvalidToken, match="unknown signing key"):
                await verifier.verify_async(idp.token("k1"), now=T0)
            assert idp.fetches == 2  # start, then one refresh for the unknown kid

    asyncio.run(scenario())


def test_jwks_url_withdrawn_key_drops_cached_tokens() -> None:
    async def scenario() -> None:
        async with FakeIdP() as idp:
            idp.keys["k1"] = RSA_KEY
            verifier = TokenVerifier(
                None,
                OWN_ISS,
                OWN_AUD,
                [JwtIssuerConfig(issuer=EXT_ISS, audience=EXT_AUD, jwks_url=idp.url)],
                refresh_interval=0.0,
            )
            await verifier.start()
            old = idp.token("k1")
            assert verifier.verify(old, now=T0).subject == "alice"
            idp.keys = {"k2": RSA_KEY_2}  # k1 withdrawn (leaked, say)
            await verifier.verify_async(idp.token("k2"), now=T0)
            with pytest.raises(UnknownKey):
                verifier.verify(old, now=T0)

    asyncio.run(scenario())
