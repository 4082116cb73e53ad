"""The table a node's workers share: shared caps counted once for the node."""

import asyncio
import os
import signal
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from copiamail.scheduling.limiter import LocalLimiter
from copiamail.scheduling.limits import Limit
from copiamail.scheduling.shared_slots import SharedSlots, key_hash

POOL = Limit("global_domain:/pool/", 4, "pooled", shared=True)
ONE = Limit("domain_limit:a.test", 9, "one domain")


def two_workers(entries: int = 64) -> tuple[SharedSlots, LocalLimiter, LocalLimiter]:
    table = SharedSlots.create(entries)
    return table, LocalLimiter(table, 0), LocalLimiter(table, 1)


def test_one_worker_may_use_a_shared_cap_in_full_and_the_node_never_more():
    _, w0, w1 = two_workers()
    assert [w0.try_acquire([POOL]) for _ in range(4)] == [None] * 4
    assert w1.try_acquire([POOL]) == POOL
    assert w0.in_use(POOL.key) == w1.in_use(POOL.key) == 4
    w0.release([POOL])
    assert w1.try_acquire([POOL]) is None
    assert w0.try_acquire([POOL]) == POOL


def test_a_key_of_one_domain_stays_the_workers_own():
    _, w0, w1 = two_workers()
    assert w0.try_acquire([ONE]) is None
    assert (w0.in_use(ONE.key), w1.in_use(ONE.key)) == (1, 0)


def test_a_refused_acquire_takes_nothing_in_the_table_or_here():
    table, w0, w1 = two_workers()
    small = Limit("server", 1, "node total", shared=True)
    assert w1.try_acquire([small]) is None
    assert w0.try_acquire([POOL, ONE, small]) == small
    assert (table.held(POOL.key), w0.in_use(ONE.key), table.held("server")) == (0, 0, 1)


def test_cluster_keys_are_never_counted_in_the_table():
    table, w0, _ = two_workers()
    cluster = Limit("cluster:total", 5, "cluster", shared=True)
    assert w0.try_acquire([cluster]) is None
    assert table.held("cluster:total") == 0 and w0.in_use("cluster:total") == 1


def test_a_full_table_counts_a_new_key_as_full_and_takes_nothing(caplog):
    table, w0, _ = two_workers(entries=2)
    keys = [Limit(f"host:10.0.0.{i}", 3, "h", shared=True) for i in range(3)]
    results = [w0.try_acquire([POOL, k]) for k in keys]
    refused = [r for r in results if r is not None]
    assert len(refused) >= 1
    assert table.held(POOL.key) == len(results) - len(refused)  # the refused ones gave the pool back
    assert "table of shared limit keys is full" in caplog.text


@given(st.text(max_size=40))
def test_a_keys_hash_is_stable_and_never_marks_a_free_entry(key):
    assert key_hash(key) == key_hash(key) != 0


def _hammer(table: SharedSlots, worker: int, rounds: int, w: int) -> None:
    limiter = LocalLimiter(table, worker)
    worst = 0
    for _ in range(rounds):
        if limiter.try_acquire([POOL]) is None:
            worst = max(worst, table.held(POOL.key))
            limiter.release([POOL])
    os.write(w, f"{worst}\n".encode())


def test_workers_in_separate_processes_never_hold_more_than_the_cap_together():
    table = SharedSlots.create(64)
    r, w = os.pipe()
    pids = []
    for worker in range(6):
        pid = os.fork()
        if pid == 0:
            try:
                _hammer(table, worker, 3000, w)
            finally:
                os._exit(0)
        pids.append(pid)
    for pid in pids:
        os.waitpid(pid, 0)
    os.close(w)
    worst = [int(line) for line in os.read(r, 4096).split()]
    os.close(r)
    assert len(worst) == 6
    assert max(worst) <= POOL.cap
    assert max(worst) == POOL.cap  # six processes at once do fill it
    assert table.held(POOL.key) == 0


def test_a_worker_killed_inside_the_lock_does_not_block_the_others():
    table = SharedSlots.create(64)
    pid = os.fork()
    if pid == 0:
        with table.locked():
            os.kill(os.getpid(), signal.SIGKILL)
    os.waitpid(pid, 0)
    started = time.monotonic()
    assert LocalLimiter(table, 1).try_acquire([POOL]) is None
    assert time.monotonic() - started < 5


def test_the_watch_tells_a_worker_of_a_slot_freed_by_another_and_of_slots_wanted_elsewhere():
    _, w0, w1 = two_workers()
    for _ in range(4):
        assert w0.try_acquire([POOL]) is None
    assert w1.try_acquire([POOL]) == POOL  # w1's job now waits on the pool

    async def main() -> tuple[int, set[str]]:
        calls = 0

        def room() -> None:
            nonlocal calls
            calls += 1

        watch1 = asyncio.create_task(w1.watch_shared(lambda key: key == POOL.key, room))
        watch0 = asyncio.create_task(w0.watch_shared(lambda key: False, lambda: None))
        await asyncio.sleep(0.2)
        wanted = set(w0.wanted_elsewhere)
        before = calls
        w0.release([POOL])
        await asyncio.sleep(0.2)
        await cancelled(watch0, watch1)
        return calls - before, wanted

    woken, wanted = asyncio.run(main())
    assert wanted == {POOL.key}  # w0 holds slots that w1's jobs wait on
    assert woken >= 1
    assert w1.try_acquire([POOL]) is None


def test_a_scheduler_of_several_workers_needs_the_table(tmp_path):
    from copiamail.config import Config
    from copiamail.scheduling.scheduler import Scheduler
    from copiamail.spool.queue import Spool

    with pytest.raises(ValueError):
        Scheduler(Config(spool=tmp_path), Spool(tmp_path), "N1", worker=0, workers=2)


def test_a_worker_over_half_of_a_cap_others_wait_on_yields_and_leaves_them_what_it_frees():
    _, w0, _ = two_workers()
    for _ in range(4):
        assert w0.try_acquire([POOL]) is None
    assert not w0.yields(POOL.key, POOL.cap) and not w0.leaves(POOL.key, POOL.cap)  # nobody else waits
    w0.wanted_elsewhere = {POOL.key}  # as the watch finds it
    assert w0.yields(POOL.key, POOL.cap) and w0.leaves(POOL.key, POOL.cap)
    w0.release([POOL])
    w0.release([POOL])
    # At half: no more yielding, and a slot it frees still goes to the others.
    assert not w0.yields(POOL.key, POOL.cap) and w0.leaves(POOL.key, POOL.cap)
    w0.release([POOL])
    assert not w0.leaves(POOL.key, POOL.cap)  # under half: it takes its share again


def test_a_cap_of_one_that_others_wait_on_goes_from_worker_to_worker():
    _, w0, w1 = two_workers()
    one = Limit("server_total", 1, "node total", shared=True)
    assert w0.try_acquire([one]) is None
    w0.wanted_elsewhere = {one.key}
    assert w0.yields(one.key, 1)
    w0.release([one])
    assert w0.leaves(one.key, 1)  # until its watch sees it holds none
    assert not w1.leaves(one.key, 1) and w1.try_acquire([one]) is None


async def cancelled(*tasks: asyncio.Task[None]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def w0_holding(n: int) -> tuple[SharedSlots, LocalLimiter, LocalLimiter]:
    """Two workers, worker 0 holding ``n`` slots of :data:`POOL`."""
    table, w0, w1 = two_workers()
    for _ in range(n):
        assert w0.try_acquire([POOL]) is None
    return table, w0, w1


def test_a_watch_goes_on_after_an_error_in_its_callback_and_its_want_bits_follow():
    # An error while offering a freed slot must not end the watch: the worker
    # would never hear of freed slots again, and its want bits would keep the
    # other worker to half the cap for good.
    _, w0, w1 = w0_holding(4)
    assert w1.try_acquire([POOL]) == POOL  # w1's job waits on the pool
    w1_waits = {"yes": True}

    def room_raises() -> None:
        raise OSError(5, "Input/output error")  # e.g. spool.claim() inside _offer_key

    async def main() -> tuple[bool, set[str]]:
        watch1 = asyncio.create_task(w1.watch_shared(lambda key: w1_waits["yes"], room_raises))
        watch0 = asyncio.create_task(w0.watch_shared(lambda key: False, lambda: None))
        await asyncio.sleep(0.1)
        w0.release([POOL])  # a slot frees: w1's on_room is called and raises
        await asyncio.sleep(0.1)
        w1_waits["yes"] = False  # w1's jobs no longer wait (sent elsewhere, expired ...)
        await asyncio.sleep(0.2)
        alive = not watch1.done()
        elsewhere = set(w0.wanted_elsewhere)
        await cancelled(watch0, watch1)
        return alive, elsewhere

    alive, elsewhere = asyncio.run(main())
    assert alive and elsewhere == set(), f"w1 watch alive={alive}; w0 still believes others wait on {elsewhere}"


def test_a_worker_that_left_slots_to_others_hears_when_they_stop_waiting():
    # w0 holds 2 of 4 and leaves the other 2 to w1, whose job waits; w1's job
    # then starts elsewhere (another mail host) without giving a slot back: w0
    # must be told its own waiting jobs may take the 2 free slots.
    table, w0, w1 = w0_holding(2)
    assert w1.try_acquire([Limit(POOL.key, 0, "x", shared=True)]) is not None  # w1 learns the key
    w1_waits = {"yes": True}

    async def main() -> tuple[int, Limit | None]:
        calls = 0

        def room() -> None:
            nonlocal calls
            calls += 1

        watch1 = asyncio.create_task(w1.watch_shared(lambda key: w1_waits["yes"], lambda: None))
        watch0 = asyncio.create_task(w0.watch_shared(lambda key: True, room))
        await asyncio.sleep(0.2)
        assert w0.wanted_elsewhere == {POOL.key}
        blocked = w0.try_acquire([POOL])  # its job is refused: left to w1
        before = calls
        w1_waits["yes"] = False
        await asyncio.sleep(0.3)
        await cancelled(watch0, watch1)
        return calls - before, blocked

    woken, blocked = asyncio.run(main())
    assert blocked == POOL
    assert w0.wanted_elsewhere == set() and table.held(POOL.key) == 2
    assert woken >= 1, "w0 was never told it may take the 2 free slots again"


def test_a_watch_that_ends_leaves_no_want_bits_behind():
    # A drain's worker that ends stops watching: the others must not go on
    # leaving it slots of their caps.
    _, w0, w1 = w0_holding(4)
    assert w1.try_acquire([POOL]) == POOL

    async def main() -> tuple[set[str], set[str]]:
        watch1 = asyncio.create_task(w1.watch_shared(lambda key: True, lambda: None))
        watch0 = asyncio.create_task(w0.watch_shared(lambda key: False, lambda: None))
        await asyncio.sleep(0.2)
        waited = set(w0.wanted_elsewhere)
        watch1.cancel()
        await asyncio.gather(watch1, return_exceptions=True)
        await asyncio.sleep(0.2)
        after = set(w0.wanted_elsewhere)
        watch0.cancel()
        await asyncio.gather(watch0, return_exceptions=True)
        return waited, after

    waited, after = asyncio.run(main())
    assert waited == {POOL.key} and after == set()


def test_a_watch_that_dies_of_an_error_stops_leaving_slots_to_others():
    # After the watch, nothing would tell this worker when the others stop
    # waiting: it must not go on holding only half of the cap.
    _, w0, w1 = w0_holding(4)
    assert w1.try_acquire([POOL]) == POOL  # w1's job waits on the pool
    broken = False

    def waits_on(key: str) -> bool:
        if broken:
            raise RuntimeError("a bug in the scheduler")
        return False

    async def main() -> tuple[set[str], BaseException | None]:
        nonlocal broken
        watch1 = asyncio.create_task(w1.watch_shared(lambda key: True, lambda: None))
        watch0 = asyncio.create_task(w0.watch_shared(waits_on, lambda: None))
        for _ in range(200):
            if w0.wanted_elsewhere:
                break
            await asyncio.sleep(0.01)
        left = set(w0.wanted_elsewhere)
        broken = True
        ended = (await asyncio.gather(watch0, return_exceptions=True))[0]
        watch1.cancel()
        await asyncio.gather(watch1, return_exceptions=True)
        return left, ended

    left, ended = asyncio.run(main())
    assert left == {POOL.key} and isinstance(ended, RuntimeError)
    assert w0.wanted_elsewhere == set()


def test_a_watch_ended_by_the_tables_own_error_stops_leaving_slots_to_others_too():
    table, w0, w1 = w0_holding(4)
    assert w1.try_acquire([POOL]) == POOL  # w1's job waits on the pool

    async def main() -> BaseException | None:
        watch1 = asyncio.create_task(w1.watch_shared(lambda key: True, lambda: None))
        watch0 = asyncio.create_task(w0.watch_shared(lambda key: key == POOL.key, lambda: None))
        for _ in range(200):
            if w0.wanted_elsewhere:
                break
            await asyncio.sleep(0.01)
        assert w0.wanted_elsewhere == {POOL.key}

        def broken(*args: object) -> None:
            raise OSError("the table")

        table.want = broken  # type: ignore[method-assign]
        ended = (await asyncio.gather(watch0, return_exceptions=True))[0]
        watch1.cancel()
        await asyncio.gather(watch1, return_exceptions=True)
        return ended

    assert isinstance(asyncio.run(main()), OSError)
    assert w0.wanted_elsewhere == set()


def test_a_pause_written_in_one_process_is_read_in_another_and_only_ever_lengthened():
    table = SharedSlots.create(64)
    assert table.paused_until("pause:192.0.2.1", 100.0) == 0.0  # read (none) before the other process writes
    pid = os.fork()
    if pid == 0:
        try:
            with table.locked():
                table.pause("pause:192.0.2.1", 1000.5, 100.0)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert table.paused_until("pause:192.0.2.1", 100.0) == 1000.5
    with table.locked():
        assert table.pause("pause:192.0.2.1", 900.0, 100.0)  # a shorter pause does not cut the longer one
    assert table.paused_until("pause:192.0.2.1", 100.0) == 1000.5
    assert table.paused_until("pause:192.0.2.9", 100.0) == 0.0
    assert table.paused_until("pause:192.0.2.1", 1000.5) == 0.0  # over at its end


def test_pauses_take_no_slot_entries_and_an_ended_pause_gives_its_entry_to_the_next(caplog):
    table = SharedSlots.create(8, pauses=4)
    with table.locked():
        for i in range(4):
            assert table.pause(f"pause:192.0.2.{i}", 20.0, 10.0)
        assert not table.pause("pause:192.0.2.9", 20.0, 10.0)  # four pauses go on: no room
        assert not table.pause("pause:192.0.2.8", 20.0, 10.0)
    assert [r.getMessage() for r in caplog.records].count(
        "the node's table of refusal pauses is full (4 hosts paused at once): "
        "a new pause holds for the worker that met the refusal only") == 1
    assert table.paused_until("pause:192.0.2.9", 10.0) == 0.0
    with table.locked():
        assert table.pause("pause:192.0.2.9", 40.0, 30.0)  # the others ended at 20
        for i in range(8):
            assert table.add(f"key{i}", 1)  # every slot entry is still free for the caps
    assert table.paused_until("pause:192.0.2.9", 30.0) == 40.0
    assert all(table.paused_until(f"pause:192.0.2.{i}", 30.0) == 0.0 for i in range(4))


def test_a_node_paused_by_ever_more_hosts_keeps_finding_room_for_the_next():
    table = SharedSlots.create(8, pauses=16)
    now = 0.0
    for i in range(2000):  # each host refuses once, its pause ends before the next few
        now += 1.0
        with table.locked():
            assert table.pause(f"pause:10.0.{i // 256}.{i % 256}", now + 10.0, now)
        assert table.paused_until(f"pause:10.0.{i // 256}.{i % 256}", now) == now + 10.0
    assert table.paused_until("pause:10.0.0.0", now) == 0.0


THREE = Limit("global_domain:/three/", 3, "pooled", shared=True)


def test_an_odd_shared_caps_last_slot_is_used_while_both_workers_want_it():
    # Cap 3, each worker holding 1, both with jobs waiting: neither may leave
    # the third slot to the other, or it stays unused.
    table, w0, w1 = two_workers()
    assert w0.try_acquire([THREE]) is None and w1.try_acquire([THREE]) is None
    w0.wanted_elsewhere = w1.wanted_elsewhere = {THREE.key}  # as their watches find it
    assert w0.try_acquire([THREE]) is None  # the first to ask takes it
    assert table.held(THREE.key) == 3


def test_an_odd_shared_caps_last_slot_goes_round_between_workers_that_want_it():
    table, w0, w1 = two_workers()
    assert w0.try_acquire([THREE]) is None and w0.try_acquire([THREE]) is None and w1.try_acquire([THREE]) is None
    w0.wanted_elsewhere = w1.wanted_elsewhere = {THREE.key}
    assert w0.yields(THREE.key, 3) and not w1.yields(THREE.key, 3)  # w0 holds more than half
    w0.release([THREE])  # at the end of its turn
    assert w0.try_acquire([THREE]) == THREE  # it gave the slot back: it leaves it to w1 ...
    assert w1.try_acquire([THREE]) is None  # ... who takes it
    assert w1.yields(THREE.key, 3) and not w0.yields(THREE.key, 3)
    w1.release([THREE])
    assert w1.try_acquire([THREE]) == THREE and w0.try_acquire([THREE]) is None  # and back
    assert table.held(THREE.key) == 3


HOST = Limit("host:192.0.2.1", 10, "Global::Host", shared=True, ceiling=10)


def test_each_worker_counts_the_other_workers_greeted_connections_as_they_tell_them_and_none_once_they_stop():
    table, w0, w1 = two_workers()
    assert w0.try_acquire([HOST]) is None and w1.try_acquire([HOST]) is None  # each counts the key in the table
    greeted0 = {HOST.key: 3, "domain_limit:a.test": 3}  # a key the table does not count is not told

    async def main() -> list[tuple[int, int]]:
        seen = []
        watch0 = asyncio.create_task(w0.watch_shared(lambda key: False, lambda: None, lambda: dict(greeted0)))
        watch1 = asyncio.create_task(w1.watch_shared(lambda key: False, lambda: None, lambda: {HOST.key: 1}))
        await asyncio.sleep(0.1)
        seen.append((w0.greeted_elsewhere(HOST.key), w1.greeted_elsewhere(HOST.key)))
        greeted0[HOST.key] = 2  # one of worker 0's connections closed
        await asyncio.sleep(0.1)
        seen.append((w0.greeted_elsewhere(HOST.key), w1.greeted_elsewhere(HOST.key)))
        watch0.cancel()
        await asyncio.gather(watch0, return_exceptions=True)
        seen.append((w0.greeted_elsewhere(HOST.key), w1.greeted_elsewhere(HOST.key)))
        watch1.cancel()
        await asyncio.gather(watch1, return_exceptions=True)
        return seen

    assert asyncio.run(main()) == [(1, 3), (1, 2), (1, 0)]
    assert table.greeted(HOST.key) == 0 and w1.greeted_elsewhere("domain_limit:a.test") == 0
