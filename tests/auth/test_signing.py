"""Garrison's signing keys on a real SQLite file: creation, agreement between workers,
rotation, publication window and the JWKS shape. Time is injected with `now=`."""

from __future__ import annotations

import base64
import multiprocessing
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import Engine, func, select

from garrison.auth.signing import SigningKeys, key_id
from garrison.store.db import events, open_store, signing_keys

T0 = 1_800_000_000.0
ROTATE = 30 * 86400.0
LIFETIME = 900.0


def _url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'g.db'}"


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    eng = open_store(_url(tmp_path))
    yield eng
    eng.dispose()


def _keys(engine: Engine) -> SigningKeys:
    return SigningKeys(engine, rotate_after=ROTATE, max_token_lifetime=LIFETIME)


def _rows(engine: Engine) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(signing_keys)).scalar_one()


def _key_events(engine: Engine) -> int:
    with engine.connect() as conn:
        query = select(func.count()).select_from(events).where(events.c.topic == "keys")
        return conn.execute(query).scalar_one()


def test_first_load_creates_one_key(engine: Engine) -> None:
    keys = _keys(engine)
    keys.load(now=T0)
    kid, private = keys.current
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert isinstance(private.curve, ec.SECP256R1)
    assert kid == key_id(private.public_key())
    assert len(kid) == 22
    assert list(keys.public_keys(now=T0)) == [kid]
    assert _rows(engine) == 1
    with engine.connect() as conn:
        row = conn.execute(select(signing_keys)).one()
    assert row.alg == "ES256"
    assert row.private_pem.startswith("-----BEGIN PRIVATE KEY-----")  # PKCS#8
    keys.load(now=T0 + 60)
    assert keys.current[0] == kid
    assert _rows(engine) == 1


def test_current_before_load_is_an_error(engine: Engine) -> None:
    with pytest.raises(RuntimeError):
        _ = _keys(engine).current


def test_two_instances_on_one_file_agree(engine: Engine, tmp_path: Path) -> None:
    first = _keys(engine)
    other_engine = open_store(_url(tmp_path))
    try:
        second = _keys(other_engine)
        first.load(now=T0)
        second.load(now=T0)
        assert first.current[0] == second.current[0]
        assert _rows(engine) == 1
    finally:
        other_engine.dispose()


def _load_in_process(url: str, queue: multiprocessing.Queue[str]) -> None:
    engine = open_store(url)
    keys = SigningKeys(engine, rotate_after=ROTATE, max_token_lifetime=LIFETIME)
    keys.load(now=T0)
    queue.put(keys.current[0])
    engine.dispose()


def test_concurrent_workers_create_one_key(tmp_path: Path) -> None:
    url = _url(tmp_path)
    open_store(url).dispose()
    ctx = multiprocessing.get_context("spawn")
    queue: multiprocessing.Queue[str] = ctx.Queue()
    procs = [ctx.Process(target=_load_in_process, args=(url, queue)) for _ in range(6)]
    for proc in procs:
        proc.start()
    kids = {queue.get(timeout=60) for _ in procs}
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    assert len(kids) == 1
    engine = open_store(url)
    assert _rows(engine) == 1
    engine.dispose()


def test_rotation_keeps_old_key_published_until_its_tokens_expire(engine: Engine) -> None:
    keys = _keys(engine)
    keys.load(now=T0)
    old = keys.current[0]
    events_before = _key_events(engine)

    keys.load(now=T0 + ROTATE - 1)
    assert keys.current[0] == old

    rotated_at = T0 + ROTATE
    keys.load(now=rotated_at)
    new = keys.current[0]
    assert new != old
    assert _key_events(engine) == events_before + 1
    with engine.connect() as conn:
        retired = conn.execute(
            select(signing_keys.c.retired_at).where(signing_keys.c.kid == old)
        ).scalar_one()
    assert retired == rotated_at

    # Another worker that loads later agrees and sees both keys.
    other = _keys(engine)
    other.load(now=rotated_at + 1)
    assert other.current[0] == new
    assert {k["kid"] for k in other.jwks(now=rotated_at + 1)["keys"]} == {old, new}

    last = rotated_at + LIFETIME
    assert {k["kid"] for k in keys.jwks(now=last - 1)["keys"]} == {old, new}
    assert set(keys.public_keys(now=last - 1)) == {old, new}
    assert [k["kid"] for k in keys.jwks(now=last)["keys"]] == [new]
    assert list(keys.public_keys(now=last)) == [new]

    keys.load(now=last)
    assert _rows(engine) == 1
    assert keys.current[0] == new


def test_forced_rotate(engine: Engine) -> None:
    keys = _keys(engine)
    keys.load(now=T0)
    old = keys.current[0]
    new = keys.rotate(now=T0 + 10)
    assert new != old
    assert keys.current[0] == new
    assert set(keys.public_keys(now=T0 + 10)) == {old, new}
    other = _keys(engine)
    other.load(now=T0 + 11)
    assert other.current[0] == new


def test_jwks_has_public_members_only(engine: Engine) -> None:
    keys = _keys(engine)
    keys.load(now=T0)
    keys.rotate(now=T0 + 1)
    doc = keys.jwks(now=T0 + 2)
    assert len(doc["keys"]) == 2
    for jwk in doc["keys"]:
        assert set(jwk) == {"kty", "crv", "x", "y", "kid", "alg", "use"}
        assert "d" not in jwk
        assert (jwk["kty"], jwk["crv"], jwk["alg"], jwk["use"]) == ("EC", "P-256", "ES256", "sig")
        assert len(jwk["x"]) == len(jwk["y"]) == 43
        public = keys.public_keys(now=T0 + 2)[jwk["kid"]]
        numbers = public.public_numbers()
        assert int.from_bytes(_unb64(jwk["x"]), "big") == numbers.x
        assert int.from_bytes(_unb64(jwk["y"]), "big") == numbers.y


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
