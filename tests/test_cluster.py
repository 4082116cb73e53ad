"""The cluster limiter (scheduling/cluster.py): local slots and Redis leases
together, what the scheduler sees of a cluster key, failing closed."""

from __future__ import annotations

import asyncio
import logging

from redisserver import free_port

from copiamail.scheduling.cluster import ClusterLimiter, redis_client
from copiamail.scheduling.limits import Limit
from copiamail.scheduling.redis_leases import EPOCH_KEY, RedisLeases

CAP2 = Limit("cluster:domain:d.test", 2, "test")
LOCAL = Limit("domain_limit:d.test", 4, "test")


def _limiter(url: str, node: str = "N1", lease: float = 3.0, clock=None) -> ClusterLimiter:
    kw = {} if clock is None else {"monotonic": clock}
    return ClusterLimiter(RedisLeases(redis_client(url, None, timeout=0.5)), node, 0, lease, url, **kw)


def test_a_lease_is_taken_after_the_local_slots_and_given_back_at_close(redis_server):
    server = redis_server()

    async def go():
        a, b = _limiter(server.url, "A"), _limiter(server.url, "B")
        await a._leases.client.set(EPOCH_KEY, 1)
        got = []
        for lim in (a, a, b):
            assert lim.try_acquire([LOCAL, CAP2]) is None  # locally each sees room
            got.append(await lim.lease([LOCAL, CAP2]))
        assert isinstance(got[0], str) and isinstance(got[1], str) and got[2] == CAP2  # B is refused by Redis
        b.release([LOCAL, CAP2])
        assert b.in_use(CAP2.key) == 2  # and sees the key full now, without a local slot taken
        assert b.try_acquire([LOCAL, CAP2]) == CAP2
        a.release([LOCAL, CAP2])
        a.give_back(got[0])
        await asyncio.sleep(0.1)
        await b._read([CAP2.key])
        assert b.in_use(CAP2.key) == 1 and b.try_acquire([LOCAL, CAP2]) is None
        assert isinstance(await b.lease([LOCAL, CAP2]), str)
        await a.close()
        await b.close()
    asyncio.run(go())


def test_redis_unreachable_fails_closed_with_one_warning_a_minute(caplog):
    url = f"redis://127.0.0.1:{free_port()}/0"
    now = [0.0]

    async def go():
        lim = _limiter(url, clock=lambda: now[0])
        with caplog.at_level(logging.WARNING, logger="copiamail"):
            for _ in range(3):
                assert lim.try_acquire([LOCAL, CAP2]) is None or True
                assert await lim.lease([LOCAL, CAP2]) == CAP2
                lim.release([LOCAL, CAP2])
                now[0] += 10
            assert lim.try_acquire([LOCAL, CAP2]) == CAP2  # counted full: no round trip
            assert lim.in_use("domain_limit:d.test") == 0  # other keys are not touched
            now[0] += 60
            await lim._read([CAP2.key])
        await lim.close()
        return [r.getMessage() for r in caplog.records if "cannot be used" in r.getMessage()]
    warnings = asyncio.run(go())
    assert len(warnings) == 2 and url in warnings[0]


def test_the_loop_renews_leases_and_reports_those_it_lost(redis_server):
    server = redis_server()

    async def go():
        lim = _limiter(server.url, lease=0.6)
        await lim._leases.client.set(EPOCH_KEY, 1)
        assert lim.try_acquire([CAP2]) is None
        member = await lim.lease([CAP2])
        assert isinstance(member, str)
        lost: list[str] = []
        rooms: list[int] = []
        task = asyncio.get_running_loop().create_task(lim.run(lambda: [CAP2.key], lambda: rooms.append(1), lost.append))
        await asyncio.sleep(1.5)  # over two lease periods: alive only if renewed
        assert lost == [] and await lim._leases.holders(CAP2.key) == [member]
        await lim._leases.client.zrem(f"copiamail:lease:{CAP2.key}", member)  # as if it had expired
        await asyncio.sleep(0.6)
        assert lost == [member] and rooms
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await lim.close()
    asyncio.run(go())


def test_the_loop_ends_when_cancelled_even_if_a_redis_call_swallows_the_cancellation():
    class Swallowing:
        client = None

        async def counts(self, *args):
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:  # as a client library may, turning it into a timeout
                raise TimeoutError from None
            return 0, []

    async def go() -> bool:
        lim = ClusterLimiter(Swallowing(), "N1", 0, 3.0, "redis://test")  # type: ignore[arg-type]
        task = asyncio.get_running_loop().create_task(lim.run(lambda: [CAP2.key], lambda: None, lambda m: None))
        await asyncio.sleep(0.4)  # inside counts() now
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=2.0)
        return task in done and task.cancelled()

    assert asyncio.run(go())
