"""The Lua scripts of scheduling/redis_leases.py against a real redis-server:
all or none, expiry on Redis's clock, renewal, the quiet time after Redis
lost its leases, and cluster-wide message rates."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio

from copiamail.scheduling.redis_leases import EPOCH_KEY, RedisLeases, Refused, lease_key


@pytest.fixture
def leases(redis_server):
    server = redis_server()

    def run(coro_fn):
        async def main():
            client = redis.asyncio.Redis.from_url(server.url)
            try:
                await client.set(EPOCH_KEY, 1)  # a Redis in use for a while: no quiet time
                return await coro_fn(RedisLeases(client), client)
            finally:
                await client.aclose()
        return asyncio.run(main())
    return run


def test_leases_are_taken_all_or_none_and_never_beyond_a_cap(leases):
    async def go(l: RedisLeases, client):
        assert await l.acquire("a", [("k1", 2), ("k2", 1)], 10_000) is None
        assert await l.acquire("b", [("k1", 2), ("k2", 1)], 10_000) == Refused(1, 1)  # k2 full
        assert await l.counts("r", ["k1", "k2"], (), 1000) == (0, [(1, 0), (1, 0)])  # b took nothing, not even k1
        assert await l.acquire("c", [("k1", 2)], 10_000) is None
        assert await l.acquire("d", [("k1", 2)], 10_000) == Refused(0, 2)
        await l.release("a", ["k1", "k2"])
        assert await l.counts("r", ["k1", "k2"], (), 1000) == (0, [(1, 0), (0, 0)])
        assert sorted(await l.holders("k1")) == ["c"]
    leases(go)


def test_a_lease_not_renewed_expires_by_redis_clock_and_its_slot_comes_back(leases):
    async def go(l: RedisLeases, client):
        assert await l.acquire("dead", [("k", 1)], 300) is None
        assert await l.acquire("live", [("k", 1)], 300) == Refused(0, 1)
        await asyncio.sleep(0.4)
        assert await l.acquire("live", [("k", 1)], 300) is None
        assert await l.renew([("live", ["k"]), ("dead", ["k"])], 300) == [0, 1]  # the dead one lost it
    leases(go)


def test_renewal_keeps_a_lease_alive_past_its_first_expiry(leases):
    async def go(l: RedisLeases, client):
        assert await l.acquire("m", [("k", 1)], 400) is None
        for _ in range(4):
            await asyncio.sleep(0.2)
            assert await l.renew([("m", ["k"])], 400) == [0]
        assert await l.acquire("other", [("k", 1)], 400) == Refused(0, 1)
    leases(go)


def test_a_redis_that_lost_its_leases_grants_none_for_a_lease_period_while_holders_put_theirs_back(leases):
    async def go(l: RedisLeases, client):
        assert await l.acquire("holder", [("k", 1)], 500) is None
        await client.flushdb()  # as a restart without persistence leaves it
        got = await l.acquire("newcomer", [("k", 1)], 500)
        assert got is not None and got.index == -1 and 0 < got.count <= 500
        assert await l.renew([("holder", ["k"])], 500) == [0]  # in the quiet time: re-added
        await asyncio.sleep(0.3)
        assert await l.renew([("holder", ["k"])], 500) == [0]
        await asyncio.sleep(0.3)  # the quiet time is over
        assert await l.acquire("newcomer", [("k", 1)], 500) == Refused(0, 1)  # the holder is counted
        assert await client.zscore(lease_key("k"), "holder") is not None
    leases(go)


def test_a_cluster_rate_takes_a_start_only_when_it_happens_and_never_books_one_ahead(leases):
    async def go(l: RedisLeases, client):
        assert await l.rate_start([("r", 0.1)]) == 0  # taken now
        waits = [await l.rate_start([("r", 0.1)]) for _ in range(3)]
        # Asked again at once: the same next start each time, and none taken.
        assert all(0.08 < w <= 0.1 for w in waits) and max(waits) - min(waits) < 0.02, waits
        await asyncio.sleep(max(waits) + 0.3)  # woken late: the start is taken then
        assert await l.rate_start([("r", 0.1)]) == 0
        assert 0.08 < await l.rate_start([("r", 0.1)]) <= 0.1  # the gap counts from the late start
        # Two rates at once: a start only when both allow it, and both move on.
        assert await l.rate_start([("r", 0.1), ("s", 1.0)]) > 0.08
        await asyncio.sleep(0.1)
        assert await l.rate_start([("r", 0.1), ("s", 1.0)]) == 0
        assert await l.rate_start([("s", 1.0)]) >= 0.9
        assert await l.rate_start([("r", 0.1)]) > 0.08
    leases(go)


def test_readers_say_which_keys_their_jobs_wait_on_and_learn_who_else_waits(leases):
    async def go(l: RedisLeases, client):
        assert await l.counts("A", ["k"], {"k"}, 300) == (0, [(0, 0)])  # only A waits: nobody else
        assert await l.counts("B", ["k"], (), 300) == (0, [(0, 1)])  # B learns that A waits
        assert await l.counts("A", ["k"], {"k"}, 300) == (0, [(0, 0)])
        await asyncio.sleep(0.35)
        assert await l.counts("B", ["k"], (), 300) == (0, [(0, 0)])  # A's want lapsed untold
    leases(go)
