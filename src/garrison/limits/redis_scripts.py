"""The Lua scripts the Redis backend runs: each is atomic in Redis, so one call decides for
every gateway process at once. Times are whole microseconds from `redis.call('TIME')`: gateway
machines whose clocks disagree still agree on one limit (exact in a Lua double up to 2^53)."""

from __future__ import annotations

import hashlib

# KEYS: one tat per rate, then the slots zset (if concurrency), then the tokens key (if budget).
# ARGV: 1 lease id prefix, 2 number of rates, 3 concurrency (-1: none), 4 budget (-1: none),
#       5 lease (us), 6 permits wanted (0: the caller holds one already, rates unchecked),
#       7 slots needed (0/1: 0 = the caller holds one already), 8 extra slots wanted,
#       then per rate: emission interval T (us), tolerance (us) = period - T.
# Grants p = min(permits wanted, what every rate allows) (>= 1 or refuses when wanted) and
# s = min(needed + extra, free slots) (>= needed or refuses); leases are prefix..':'..j.
# See stock.py for why a caller asks for more than one.
# Returns {allowed, hit (0 none, i rate i, -1 concurrency, -2 tokens), retry (us), d_1..d_n,
#          p, s, rate room, slot room}: d_i = tat_i - now before this call (us, >= 0; 0 when
#          unchecked); rooms = how many more each kind would still allow (-1: unchecked).
ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local nr = tonumber(ARGV[2])
local conc = tonumber(ARGV[3])
local budget = tonumber(ARGV[4])
local wantp = tonumber(ARGV[6])
local need = tonumber(ARGV[7])
local extra = tonumber(ARGV[8])
local out = {1, 0, 0}
local tats = {}
local hit, wait = 0, -1
local p, rroom = 0, -1
for i = 1, nr do
  out[3 + i] = 0
  if wantp > 0 then
    local T = tonumber(ARGV[7 + 2 * i])
    local tol = tonumber(ARGV[8 + 2 * i])
    local tat = tonumber(redis.call('GET', KEYS[i])) or now
    if tat < now then tat = now end
    local d = tat - now
    out[3 + i] = d
    if d > tol then
      if d - tol > wait then hit, wait = i, d - tol end
    else
      tats[i] = tat
      local c = math.floor((tol - d) / T) + 1
      if rroom < 0 or c < rroom then rroom = c end
    end
  end
end
if wantp > 0 and nr > 0 and hit == 0 then p = math.min(wantp, rroom) end
local k = nr
local s, sroom = 0, -1
if conc >= 0 then
  k = k + 1
  redis.call('ZREMRANGEBYSCORE', KEYS[k], '-inf', string.format('%.0f', now))
  local free = conc - redis.call('ZCARD', KEYS[k])
  if free < need then
    if 1000000 > wait then hit, wait = -1, 1000000 end
  else
    s = math.min(need + extra, free)
    sroom = free - s
  end
end
if budget >= 0 then
  local tk = KEYS[k + 1]
  local used = tonumber(redis.call('GET', tk)) or 0
  if used >= budget then
    local ms = redis.call('PTTL', tk)
    if ms < 0 then ms = 1000 end
    if ms * 1000 > wait then hit, wait = -2, ms * 1000 end
  end
end
if hit ~= 0 then
  out[1], out[2], out[3] = 0, hit, wait
  out[4 + nr], out[5 + nr], out[6 + nr], out[7 + nr] = 0, 0, -1, -1
  return out
end
if p > 0 then
  for i = 1, nr do
    local tat = tats[i] + p * tonumber(ARGV[7 + 2 * i])
    local ms = math.floor((tat - now) / 1000) + 1
    redis.call('SET', KEYS[i], string.format('%.0f', tat), 'PX', ms)
  end
  rroom = rroom - p
end
if s > 0 then
  local lease = tonumber(ARGV[5])
  local exp = string.format('%.0f', now + lease)
  for j = 1, s do
    redis.call('ZADD', KEYS[nr + 1], exp, ARGV[1] .. ':' .. j)
  end
  redis.call('PEXPIRE', KEYS[nr + 1], math.floor(lease / 1000) + 1)
end
out[4 + nr], out[5 + nr], out[6 + nr], out[7 + nr] = p, s, rroom, sroom
return out
"""

# KEYS: slot zsets; ARGV: lease (us), then the lease id for each key. XX: a lease released or
# expired meanwhile is not brought back.
HEARTBEAT = """
local t = redis.call('TIME')
local lease = tonumber(ARGV[1])
local exp = string.format('%.0f', tonumber(t[1]) * 1000000 + tonumber(t[2]) + lease)
local ms = math.floor(lease / 1000) + 1
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], 'XX', exp, ARGV[i + 1])
  redis.call('PEXPIRE', KEYS[i], ms)
end
return #KEYS
"""

# KEYS: the tokens key; ARGV: tokens, window (ms). The window starts at the first spend: the
# TTL is set only while the key has none.
SPEND = """
local v = redis.call('INCRBY', KEYS[1], ARGV[1])
if redis.call('PTTL', KEYS[1]) < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return v
"""


def sha(script: str) -> str:
    """The SHA1 that EVALSHA names a loaded script by."""
    return hashlib.sha1(script.encode()).hexdigest()
