"""`garrison limits show` for the Redis backend: what every key holds now, read with SCAN (never
KEYS) and one pipelined round trip, in the same rows as the memory backend's."""

from __future__ import annotations

import math

import redis.asyncio as aioredis

_US = 1_000_000


async def usage(
    client: aioredis.Redis, key_prefix: str, prefix: str = ""
) -> list[dict[str, object]]:
    """Rows like the memory backend's (for `garrison limits show`): per key, each rate in
    use ("used": units of the bucket taken now), slots held, tokens spent in the window."""
    sec, usec = await client.time()
    now = sec * _US + usec
    names: list[str] = []
    async for raw in client.scan_iter(match=_glob(key_prefix + prefix) + "*", count=1000):
        names.append(raw.decode() if isinstance(raw, bytes) else raw)
    names.sort()
    async with client.pipeline(transaction=False) as pipe:
        for name in names:
            if name.endswith("|c"):
                pipe.zcount(name, f"({now}", "+inf")
            else:
                pipe.get(name)
            pipe.pttl(name)
        values = await pipe.execute()
    rates: list[dict[str, object]] = []
    slots: list[dict[str, object]] = []
    tokens: list[dict[str, object]] = []
    for i, name in enumerate(names):
        value, pttl = values[2 * i], values[2 * i + 1]
        rest = name[len(key_prefix) :]
        if rest.endswith("|c"):
            if int(value):
                slots.append({"key": rest[:-2], "kind": "concurrency", "used": int(value)})
        elif rest.endswith("|t"):
            if value is not None:
                row = {"key": rest[:-2], "kind": "tokens", "used": int(value)}
                tokens.append(row | {"resets_in": max(0, pttl) / 1000})
        elif (cut := rest.rfind("|r|")) >= 0 and value is not None:
            # `<key>|r|<limit>/<period>`: the key itself may hold "|", the rate cannot.
            limit_text, _, period_text = rest[cut + 3 :].partition("/")
            limit, period = int(limit_text), float(period_text)
            d = int(value) - now
            if d > 0:
                used = math.ceil(d / (period * _US / limit) - 1e-9)
                rates.append(
                    {"key": rest[:cut], "kind": "rate", "limit": f"{limit}/{period:g}s"}
                    | {"used": min(limit, used)}
                )
    return rates + slots + tokens


def _glob(text: str) -> str:
    """Escape glob metacharacters so that a key prefix matches only itself."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)
