"""Cluster-wide limits in Redis: connection leases and message rates, each
taken by one Lua script (atomic in Redis, one round trip).

Keys, all under ``copiamail:``:

``lease:<limit key>``
    A sorted set: one member per connection that holds a slot of the key
    (``<node>.w<worker>.<token>.<n>``), scored with the instant its lease
    expires, in milliseconds of Redis's own clock (``TIME`` inside the
    script, so the nodes' clocks never matter). Members past their expiry
    are dropped before a key is counted, so the slots of a node that died
    come back within ``lease_seconds`` by themselves.
``rate:<pace key>``
    The earliest instant (microseconds, Redis's clock) at which the next
    message counted against a cluster-wide rate may start; set when a start
    is taken, which happens only at the start itself.
``want:<limit key>``
    A sorted set of the nodes' workers that have jobs waiting on the key
    (one member each, scored with the instant its want lapses unless put
    again): so a node knows when to close an idle connection that holds a
    slot another node's jobs wait for.
``epoch``
    The instant until which no new lease is granted. Redis keeps leases in
    memory: when it restarts without them (or its data is flushed), the
    connections still open would not be counted, and new ones could exceed a
    cap. So a Redis found without this key grants no lease for one lease
    period; meanwhile every connection still open puts its lease back at its
    next renewal (a renewal may re-add a lease only then), and after it the
    count is true again. A Redis that has never been used costs the same
    wait once.

Taking a connection's leases is all or none over every key it needs; a
renewal moves their expiry on; a release removes them.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

_PREFIX = "copiamail:"
EPOCH_KEY = f"{_PREFIX}epoch"

# Every lease script starts here: ``now`` in milliseconds of Redis's clock.
_NOW_MS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: epoch, lease sets; ARGV: member, lease ms, a cap per lease set.
# Returns {0, 0} when taken; {i, n} when lease set i holds n >= its cap;
# {-1, ms} while no lease is granted for ms more.
_ACQUIRE = _NOW_MS + """
local lease = tonumber(ARGV[2])
local quiet = tonumber(redis.call('GET', KEYS[1]) or 0)
if quiet == 0 then
  redis.call('SET', KEYS[1], now + lease)
  return {-1, lease}
end
if now < quiet then return {-1, quiet - now} end
for i = 2, #KEYS do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
  local n = redis.call('ZCARD', KEYS[i])
  if n >= tonumber(ARGV[i + 1]) then return {i - 1, n} end
end
for i = 2, #KEYS do
  redis.call('ZADD', KEYS[i], now + lease, ARGV[1])
  redis.call('PEXPIRE', KEYS[i], lease * 2)
end
return {0, 0}
"""

# KEYS: epoch, lease sets; ARGV: member, lease ms. Moves the member's expiry
# on in every set where it is still live; returns 0, or the first set where
# its lease was lost (expired or gone, outside the epoch's quiet time).
_RENEW = _NOW_MS + """
local lease = tonumber(ARGV[2])
local quiet = tonumber(redis.call('GET', KEYS[1]) or 0)
if quiet == 0 then
  quiet = now + lease
  redis.call('SET', KEYS[1], quiet)
end
local lost = 0
for i = 2, #KEYS do
  local score = tonumber(redis.call('ZSCORE', KEYS[i], ARGV[1]) or 0)
  if score > now or now < quiet then
    redis.call('ZADD', KEYS[i], now + lease, ARGV[1])
    redis.call('PEXPIRE', KEYS[i], lease * 2)
  elseif lost == 0 then
    lost = i - 1
  end
end
return lost
"""

# KEYS: epoch, then per key its lease set and its want set; ARGV: the
# reader's name, how long (ms) its wants last, then per key 1 if the reader
# has jobs waiting on it (its want is put or moved on), else 0. Returns {ms
# of quiet time left, then per key: live leases, live wants of others}.
_COUNT = _NOW_MS + """
local quiet = tonumber(redis.call('GET', KEYS[1]) or 0)
local out = {0}
if quiet == 0 then out[1] = -1 elseif quiet > now then out[1] = quiet - now end
for i = 1, (#KEYS - 1) / 2 do
  local leases, wants = KEYS[2 * i], KEYS[2 * i + 1]
  redis.call('ZREMRANGEBYSCORE', leases, '-inf', now)
  redis.call('ZREMRANGEBYSCORE', wants, '-inf', now)
  if ARGV[2 + i] == '1' then
    redis.call('ZADD', wants, now + tonumber(ARGV[2]), ARGV[1])
    redis.call('PEXPIRE', wants, tonumber(ARGV[2]) * 2)
  end
  local others = redis.call('ZCARD', wants)
  if redis.call('ZSCORE', wants, ARGV[1]) then others = others - 1 end
  out[2 * i] = redis.call('ZCARD', leases)
  out[2 * i + 1] = others
end
return out
"""

# KEYS: rate keys; ARGV: a spacing (microseconds) per key. Takes a start
# now if every key allows one (returns 0), else takes nothing and returns how
# many microseconds away the next allowed start is. A start is taken only
# when it happens, never booked ahead: a node that wakes late then widens the
# gap after the one before it instead of narrowing the one after it, so the
# starts the receiver sees stay a spacing apart, whichever node makes them.
_RATE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local start = now
for i = 1, #KEYS do
  local nxt = tonumber(redis.call('GET', KEYS[i]) or 0)
  if nxt > start then start = nxt end
end
if start > now then return start - now end
for i = 1, #KEYS do
  local gap = tonumber(ARGV[i])
  redis.call('SET', KEYS[i], string.format('%.0f', now + gap), 'PX', math.ceil(gap / 1000) + 1000)
end
return 0
"""


def lease_key(key: str) -> str:
    """The Redis key of limit key ``key``'s leases."""
    return f"{_PREFIX}lease:{key}"


def want_key(key: str) -> str:
    """The Redis key of the workers whose jobs wait on limit key ``key``."""
    return f"{_PREFIX}want:{key}"


def rate_key(key: str) -> str:
    """The Redis key of cluster-wide rate ``key``."""
    return f"{_PREFIX}rate:{key}"


@dataclass(frozen=True)
class Refused:
    """No lease was taken: ``index`` is the first key (in the order asked)
    whose cap is reached and ``count`` its live leases; ``index`` -1: no
    lease is granted for ``count`` milliseconds more (Redis lost its leases)."""

    index: int
    count: int


class RedisLeases:
    """The scripts above, over one asyncio Redis client (``redis.asyncio``)."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._count = client.register_script(_COUNT)
        self._rate = client.register_script(_RATE)

    async def acquire(self, member: str, keys: Sequence[tuple[str, int]], lease_ms: int) -> Refused | None:
        """Take a lease of every ``(key, cap)`` for ``member``, or none."""
        got = await self._acquire(keys=[EPOCH_KEY, *(lease_key(k) for k, _ in keys)],
                                  args=[member, lease_ms, *(cap for _, cap in keys)])
        index, count = int(got[0]), int(got[1])
        return None if index == 0 else Refused(index - 1 if index > 0 else -1, count)

    async def renew(self, leases: Sequence[tuple[str, Sequence[str]]], lease_ms: int) -> list[int]:
        """Renew each ``(member, keys)``, in one round trip; per member, 0 or
        the place (1-based) of the first key whose lease it lost."""
        async with self.client.pipeline(transaction=False) as pipe:
            for member, keys in leases:
                await self._renew(keys=[EPOCH_KEY, *(lease_key(k) for k in keys)], args=[member, lease_ms],
                                  client=pipe)
            return [int(x) for x in await pipe.execute()]

    async def release(self, member: str, keys: Sequence[str]) -> None:
        """Give back ``member``'s leases of ``keys``."""
        async with self.client.pipeline(transaction=False) as pipe:
            for k in keys:
                pipe.zrem(lease_key(k), member)
            await pipe.execute()

    async def counts(self, reader: str, keys: Sequence[str], wanted: Collection[str],
                     want_ms: int) -> tuple[int, list[tuple[int, int]]]:
        """Per key of ``keys``: its live leases, and how many other readers
        have jobs waiting on it; ``reader`` has jobs waiting on those of
        ``wanted`` (told for ``want_ms``). Also the milliseconds until leases
        are granted again (0: now; -1: Redis holds no epoch yet, and the
        first lease asked for starts one)."""
        got = await self._count(keys=[EPOCH_KEY, *(k for key in keys for k in (lease_key(key), want_key(key)))],
                                args=[reader, want_ms, *("1" if k in wanted else "0" for k in keys)])
        pairs = [(int(got[i]), int(got[i + 1])) for i in range(1, len(got), 2)]
        return int(got[0]), pairs

    async def holders(self, key: str) -> list[str]:
        """The members holding a live lease of ``key`` (for ``status``)."""
        t = await self.client.time()
        now_ms = int(t[0]) * 1000 + int(t[1]) // 1000
        found = await self.client.zrangebyscore(lease_key(key), f"({now_ms}", "+inf")
        return [m.decode() if isinstance(m, bytes) else str(m) for m in found]

    async def rate_start(self, keys: Sequence[tuple[str, float]]) -> float:
        """Take a start now if every ``(key, spacing seconds)`` allows one
        (returns 0); else take nothing and return the seconds until one may
        (ask again then: another node may take it first)."""
        got = await self._rate(keys=[rate_key(k) for k, _ in keys],
                               args=[max(1, round(spacing * 1_000_000)) for _, spacing in keys])
        return max(0, int(got)) / 1_000_000
