"""Issue Garrison's own JWTs and verify them and those of configured external issuers.

DESIGN §5.4: every key is bound to one algorithm, by kid; `none` never; iss, aud, exp and nbf
are always checked. The algorithm comes from the key we hold, never from the token: the header
`alg` must equal it, and PyJWT is called with exactly that one algorithm. HMAC secrets exist only
for an issuer configured with `secret_file`, so a public key can never be used as an HMAC secret
(the RS256 -> HS256 confusion).

The key is found from the *unverified* `iss` (which issuer) and `kid` (which of its keys); both are
then verified with the signature. Time claims are checked here rather than by PyJWT so that `now`
can be injected and every refusal has a short reason that is safe to show a client.

Verified tokens are cached (token -> Claims) until they expire: a hit costs one dict lookup and
one float compare, with no crypto.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import math
import re
import secrets
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import jwt

from garrison.auth.jwt_keys import Key, jwks_keys, load_key_file, load_secret
from garrison.auth.signing import ALGORITHM as OWN_ALGORITHM
from garrison.auth.signing import SigningKeys
from garrison.config import JwtIssuerConfig

log = logging.getLogger("garrison")

MAX_TOKEN_BYTES = 8 * 1024
JWKS_TIMEOUT = 5.0
MAX_JWKS_BYTES = 512 * 1024
_SEGMENT = re.compile(r"[A-Za-z0-9_-]+")
_SIGNATURE = re.compile(r"[A-Za-z0-9_-]*")
# Claims that verification depends on; `extra` may not set them (roles, email and scope it may,
# and the keyword arguments win when given).
_RESERVED = frozenset({"iss", "sub", "aud", "iat", "nbf", "exp", "jti"})
# Time and signature are checked by us (injectable `now`, exact reasons); PyJWT checks the rest.
_DECODE_OPTIONS: Any = {
    "verify_signature": True,
    "verify_exp": False,
    "verify_nbf": False,
    "verify_iat": False,
    "verify_aud": False,
    "verify_iss": False,
    "verify_sub": False,
    "verify_jti": False,
    "require": [],
}


@dataclass(frozen=True, slots=True)
class Claims:
    """A verified identity. Times are UTC epoch seconds."""

    subject: str
    issuer: str
    expires_at: float
    issued_at: float | None
    email: str | None
    roles: tuple[str, ...]
    scopes: tuple[str, ...] | None  # None: no scope claim, so not scope-restricted
    own: bool  # signed by Garrison: the caller checks the user is still enabled
    token_id: str | None


class InvalidToken(Exception):
    """Short reason safe to show a client, e.g. 'token expired', 'unknown signing key'."""


class UnknownKey(InvalidToken):
    """The kid is not (yet) known for a jwks_url issuer: refreshing its JWKS may help."""

    def __init__(self, issuer: str) -> None:
        super().__init__("unknown signing key")
        self.issuer = issuer


class _Issuer:
    """One accepted issuer: its claim names, leeway and keys (replaced whole on refresh)."""

    __slots__ = (
        "algorithms",
        "audiences",
        "email_claim",
        "inflight",
        "jwks_url",
        "keys",
        "last_refresh",
        "leeway",
        "name",
        "own",
        "roles_claim",
        "scope_claim",
        "user_claim",
    )

    def __init__(
        self,
        name: str,
        audiences: Iterable[str],
        *,
        leeway: float,
        own: bool,
        algorithms: Iterable[str] = (OWN_ALGORITHM,),
        jwks_url: str | None = None,
        user_claim: str = "sub",
        email_claim: str = "email",
        roles_claim: str = "roles",
        scope_claim: str = "scope",
    ) -> None:
        self.name = name
        self.audiences = frozenset(audiences)
        self.leeway = leeway
        self.own = own
        self.algorithms = tuple(algorithms)
        self.jwks_url = jwks_url
        self.user_claim = user_claim
        self.email_claim = email_claim
        self.roles_claim = roles_claim
        self.scope_claim = scope_claim
        self.keys: dict[str | None, Key] = {}
        self.inflight: asyncio.Future[bool] | None = None
        self.last_refresh = -math.inf

    def key_for(self, kid: str | None) -> Key | None:
        """The key named by kid; a token without kid only works for an issuer with one key."""
        keys = self.keys
        if kid is not None:
            found = keys.get(kid)
            if found is not None:
                return found
            # A single PEM key or secret has no kid of its own to compare with.
            return keys[None] if len(keys) == 1 and None in keys else None
        return next(iter(keys.values())) if len(keys) == 1 else None


class TokenIssuer:
    """Signs Garrison's own ES256 access tokens with the current signing key."""

    def __init__(self, keys: SigningKeys, issuer: str, audience: str) -> None:
        self._keys = keys
        self.issuer = issuer
        self.audience = audience

    def issue(
        self,
        subject: str,
        *,
        lifetime: float,
        audience: str | None = None,
        roles: Iterable[str] = (),
        email: str | None = None,
        scopes: Sequence[str] | None = None,
        extra: Mapping[str, object] | None = None,
        now: float | None = None,
    ) -> str:
        """A signed token. `lifetime` may not exceed the keys' max_token_lifetime: a retired key
        is published only that long, so a longer-lived token would outlive its key.

        `iat` is the exact time (a float NumericDate), so a token issued just after a password
        change never looks older than the change; `nbf` and `exp` are whole seconds."""
        if not 0 < lifetime <= self._keys.max_token_lifetime:
            raise ValueError("lifetime must be more than 0 and at most max_token_lifetime")
        if extra and _RESERVED.intersection(extra):
            raise ValueError(f"extra claims may not set {sorted(_RESERVED.intersection(extra))}")
        now = time.time() if now is None else now
        payload: dict[str, object] = dict(extra or {})
        payload.update(
            iss=self.issuer,
            sub=subject,
            aud=audience if audience is not None else self.audience,
            iat=now,
            nbf=int(now),
            exp=int(now + lifetime),
            jti=secrets.token_urlsafe(16),
            roles=list(roles),
        )
        if email is not None:
            payload["email"] = email
        if scopes is not None:
            payload["scope"] = " ".join(scopes)
        kid, private = self._keys.current
        return jwt.encode(
            payload, private, algorithm=OWN_ALGORITHM, headers={"kid": kid, "typ": "JWT"}
        )


class TokenVerifier:
    """Verifies Garrison's own tokens and those of configured external issuers."""

    def __init__(
        self,
        own: SigningKeys | None,
        own_issuer: str,
        own_audience: str,
        external: Sequence[JwtIssuerConfig] = (),
        leeway: float = 30.0,
        cache_size: int = 10000,
        refresh_interval: float = 30.0,
    ) -> None:
        self._own_keys = own
        self._cache: dict[str, tuple[float, Claims]] = {}
        self._cache_size = cache_size
        self._refresh_interval = refresh_interval
        self._issuers: dict[str, _Issuer] = {}
        if own is not None:
            self._issuers[own_issuer] = _Issuer(own_issuer, [own_audience], leeway=leeway, own=True)
        for config in external:
            if config.issuer in self._issuers:
                raise ValueError(f"jwt issuer {config.issuer!r} is configured twice")
            issuer = _Issuer(
                config.issuer,
                config.audience,
                leeway=config.leeway,
                own=False,
                algorithms=config.algorithms,
                jwks_url=config.jwks_url,
                user_claim=config.user_claim,
                email_claim=config.email_claim,
                roles_claim=config.roles_claim,
                scope_claim=config.scope_claim,
            )
            if config.key_file is not None:
                issuer.keys = load_key_file(config.key_file, issuer.algorithms, config.issuer)
            elif config.secret_file is not None:
                issuer.keys = load_secret(config.secret_file, issuer.algorithms, config.issuer)
            self._issuers[config.issuer] = issuer
        self.reload_own_keys()

    # -- keys -------------------------------------------------------------------------------

    def reload_own_keys(self) -> None:
        """Call after SigningKeys.load(): rebuild the own kid map and drop cached results."""
        if self._own_keys is None:
            return
        own = next(i for i in self._issuers.values() if i.own)
        own.keys = {kid: Key(OWN_ALGORITHM, k) for kid, k in self._own_keys.public_keys().items()}
        self._cache.clear()

    async def start(self) -> None:
        """Fetch every jwks_url issuer's keys once. Failures are logged, not fatal: until a
        fetch succeeds that issuer's tokens are refused (fail closed)."""
        remote = [i for i in self._issuers.values() if i.jwks_url is not None]
        await asyncio.gather(*(self._fetch(i) for i in remote))

    async def _refresh(self, issuer: _Issuer) -> None:
        """Re-fetch one issuer's JWKS: one fetch in flight, at most one per refresh_interval,
        so a flood of tokens with made-up kids cannot hammer the identity provider."""
        inflight = issuer.inflight
        if inflight is None:
            started = time.monotonic()
            if started - issuer.last_refresh < self._refresh_interval:
                return
            issuer.last_refresh = started
            inflight = asyncio.ensure_future(self._fetch(issuer))
            issuer.inflight = inflight
            inflight.add_done_callback(lambda _done: setattr(issuer, "inflight", None))
        await asyncio.shield(inflight)

    async def _fetch(self, issuer: _Issuer) -> bool:
        url = issuer.jwks_url
        assert url is not None
        try:
            timeout = aiohttp.ClientTimeout(total=JWKS_TIMEOUT)
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.get(url, allow_redirects=False) as response,
            ):
                if response.status != 200:
                    raise ValueError(f"HTTP status {response.status}")
                body = await response.content.read(MAX_JWKS_BYTES + 1)
            if len(body) > MAX_JWKS_BYTES:
                raise ValueError("JWKS document too large")
            keys = jwks_keys(json.loads(body), issuer.algorithms, issuer.name)
        except Exception as exc:  # any failure: keep the old keys, log, fail closed
            log.warning("jwt issuer %s: JWKS fetch from %s failed: %s", issuer.name, url, exc)
            return False
        if not keys:
            log.warning("jwt issuer %s: JWKS at %s has no usable key", issuer.name, url)
        old = issuer.keys
        issuer.keys = keys
        if any(keys.get(kid) != key for kid, key in old.items()):
            self._cache.clear()  # a key was withdrawn: its cached tokens must go too
        return True

    # -- verification -----------------------------------------------------------------------

    def verify(self, token: str, now: float | None = None) -> Claims:
        """Verify a token (CPU only). Raises InvalidToken, or UnknownKey to ask for a refresh."""
        entry = self._cache.get(token)
        if now is None:
            now = time.time()
        if entry is not None:
            if now < entry[0]:
                return entry[1]
            del self._cache[token]
            raise InvalidToken("token expired")
        issuer, claims = self._verify(token, now)
        if self._cache_size > 0:
            if len(self._cache) >= self._cache_size:
                del self._cache[next(iter(self._cache))]
            self._cache[token] = (claims.expires_at + issuer.leeway, claims)
        return claims

    async def verify_async(self, token: str, now: float | None = None) -> Claims:
        """verify(); on an unknown kid of a jwks_url issuer, refresh its JWKS and try once more."""
        try:
            return self.verify(token, now)
        except UnknownKey as exc:
            issuer = self._issuers.get(exc.issuer)
            if issuer is None or issuer.jwks_url is None:
                raise
            await self._refresh(issuer)
        return self.verify(token, now)

    def _verify(self, token: str, now: float) -> tuple[_Issuer, Claims]:
        header, payload = _parse_unverified(token)
        if "crit" in header:
            raise InvalidToken("unsupported critical header")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg.lower() == "none":
            raise InvalidToken("algorithm not allowed")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise InvalidToken("malformed token")
        iss = payload.get("iss")
        issuer = self._issuers.get(iss) if isinstance(iss, str) else None
        if issuer is None:
            raise InvalidToken("wrong issuer")
        key = issuer.key_for(kid)
        if key is None:
            if issuer.jwks_url is not None:
                raise UnknownKey(issuer.name)
            raise InvalidToken("unknown signing key")
        if alg != key.alg:
            raise InvalidToken("algorithm not allowed for this key")
        try:
            verified = jwt.decode(token, key.key, algorithms=[key.alg], options=_DECODE_OPTIONS)
        except jwt.InvalidSignatureError:
            raise InvalidToken("invalid signature") from None
        except jwt.PyJWTError:
            raise InvalidToken("invalid token") from None
        return issuer, _claims(verified, issuer, now)


def _parse_unverified(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split and decode header and payload, before any crypto; anything odd is malformed."""
    if not isinstance(token, str) or len(token) > MAX_TOKEN_BYTES:
        raise InvalidToken("malformed token")
    parts = token.split(".")
    if (
        len(parts) != 3
        or not _SEGMENT.fullmatch(parts[0])
        or not _SEGMENT.fullmatch(parts[1])
        or not _SIGNATURE.fullmatch(parts[2])
    ):
        raise InvalidToken("malformed token")
    try:
        header = _json(_b64decode(parts[0]))
        payload = _json(_b64decode(parts[1]))
    except (ValueError, binascii.Error):
        raise InvalidToken("malformed token") from None
    if not isinstance(header, dict) or not isinstance(payload, dict):
        raise InvalidToken("malformed token")
    return header, payload


def _b64decode(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Duplicate members could mean one thing to us and another to a later reader: refuse."""
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate member")
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # NaN would make `now >= exp` never true


def _json(data: bytes) -> Any:
    return json.loads(data, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)


def _time(payload: Mapping[str, Any], name: str) -> float | None:
    value = payload.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidToken(f"invalid {name} claim")
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float
        raise InvalidToken(f"invalid {name} claim") from None
    if not math.isfinite(number):
        raise InvalidToken(f"invalid {name} claim")
    return number


def _claims(payload: dict[str, Any], issuer: _Issuer, now: float) -> Claims:
    if payload.get("iss") != issuer.name:
        raise InvalidToken("wrong issuer")
    aud = payload.get("aud")
    audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
    if not any(isinstance(a, str) and a in issuer.audiences for a in audiences):
        raise InvalidToken("wrong audience")
    exp = _time(payload, "exp")
    if exp is None:
        raise InvalidToken("missing exp claim")
    leeway = issuer.leeway
    if now >= exp + leeway:
        raise InvalidToken("token expired")
    nbf = _time(payload, "nbf")
    if nbf is not None and nbf > now + leeway:
        raise InvalidToken("token not yet valid")
    iat = _time(payload, "iat")
    if iat is not None and iat > now + leeway:
        raise InvalidToken("token issued in the future")
    subject = _claim(payload, issuer.user_claim)
    if isinstance(subject, int) and not isinstance(subject, bool):
        subject = str(subject)
    if not isinstance(subject, str) or not subject:
        raise InvalidToken("missing subject")
    email = _claim(payload, issuer.email_claim)
    roles = _strings(_claim(payload, issuer.roles_claim), r"[\s,]+")
    scope_value = _claim(payload, issuer.scope_claim)
    if scope_value is None:
        scope_value = payload.get("scp")
    scopes: tuple[str, ...] | None = None
    if scope_value is not None:
        # A scope claim we cannot read restricts to nothing, never to "not restricted".
        scopes = _strings(scope_value, r"\s+") or ()
    jti = payload.get("jti")
    return Claims(
        subject=subject,
        issuer=issuer.name,
        expires_at=exp,
        issued_at=iat,
        email=email if isinstance(email, str) else None,
        roles=roles or (),
        scopes=scopes,
        own=issuer.own,
        token_id=jti if isinstance(jti, str) else None,
    )


def _claim(payload: Mapping[str, Any], name: str) -> Any:
    """A claim by name, or by dotted path into nested objects (Keycloak: realm_access.roles)."""
    if name in payload:
        return payload[name]
    node: Any = payload
    for part in name.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _strings(value: Any, separators: str) -> tuple[str, ...]:
    """A list of strings, or one string split on separators; anything else is ignored."""
    if isinstance(value, str):
        return tuple(s for s in re.split(separators, value) if s)
    if isinstance(value, list):
        return tuple(s for s in value if isinstance(s, str) and s)
    return ()
