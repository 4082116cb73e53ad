"""copiamail.scheduling.scheduler: how the run loop waits to be woken. The
runs themselves (scans, sends, drains) are shown end to end in
test_node_e2e, test_workers_e2e and the other e2e tests."""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from copiamail.config import Config, RelayConfig
from copiamail.jobfile.fsfile import CommandFile
from copiamail.jobfile.job import Job, parse_job
from copiamail.scheduling.choosing import Blocked
from copiamail.scheduling.limits import Limit
from copiamail.scheduling.routing import Item, pause_key
from copiamail.scheduling.scheduler import Scheduler
from copiamail.scheduling.shaping import suspend_key
from copiamail.scheduling.shared_slots import SharedSlots
from copiamail.scheduling.waiting import WaitEntry
from copiamail.spool.held import HeldNames
from copiamail.spool.layout import QueuedJob
from copiamail.spool.queue import Claimed, Spool
from tests.smtpserver import Rule, SMTPTestServer


@pytest.fixture
def scheduler() -> Scheduler:
    return Scheduler(Config(relay=RelayConfig("192.0.2.1")), Spool(Path("/nonexistent"), 15, False), "N1")


async def _turns(n: int = 5) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def _waiting(scheduler: Scheduler, wake: asyncio.Event, open_connections: list[object],
             until_closed: bool) -> asyncio.Task[None]:
    scheduler._connections = open_connections  # type: ignore[assignment]  # only its length is asked
    scheduler._wake = wake
    scheduler._scanner.full_scan_due = False  # as after the run's first whole scan
    return asyncio.get_running_loop().create_task(scheduler._woken(wake, 30.0, until_closed))


def test_a_closing_drain_waits_through_each_closing_until_the_last_connection_has_closed(scheduler):
    async def go() -> None:
        wake, connections = asyncio.Event(), [object(), object()]
        waiting = _waiting(scheduler, wake, connections, until_closed=True)
        connections.pop()
        wake.set()  # one connection closed: the other is still closing
        await _turns()
        assert not waiting.done()
        assert not wake.is_set()  # taken: the wait goes on asleep, not spinning
        connections.pop()
        wake.set()
        await asyncio.wait_for(waiting, 5)

    asyncio.run(go())


@pytest.mark.parametrize("event", [
    pytest.param(lambda s: s.request_stop(), id="the node stops"),
    pytest.param(lambda s: s.hint("/nonexistent/TOSEND/00000001.FS"), id="the watcher names a new job"),
    pytest.param(lambda s: s.request_scan(), id="a whole scan is asked for (a dead peer's jobs came back)"),
])
def test_a_closing_drain_stops_waiting_at_once_when(scheduler, event):
    async def go() -> None:
        wake = asyncio.Event()
        waiting = _waiting(scheduler, wake, [object()], until_closed=True)
        await _turns()
        event(scheduler)  # each wakes the loop
        await asyncio.wait_for(waiting, 5)

    asyncio.run(go())


def test_outside_a_drains_end_the_first_wake_ends_the_wait(scheduler):
    async def go() -> None:
        wake = asyncio.Event()
        waiting = _waiting(scheduler, wake, [object()], until_closed=False)
        wake.set()
        await asyncio.wait_for(waiting, 5)

    asyncio.run(go())


def test_the_wait_ends_at_its_timeout_without_a_wake(scheduler):
    async def go() -> None:
        scheduler._connections = [object()]  # type: ignore[assignment]
        await asyncio.wait_for(scheduler._woken(asyncio.Event(), 0.01, True), 5)

    asyncio.run(go())


def _waiting_job(tmp_path: Path, config: Config, waits_on: tuple[str, int]
                 ) -> tuple[Scheduler, SharedSlots, Path, WaitEntry]:
    """A worker's scheduler over a spool in ``tmp_path`` holding one job,
    ``A.FS``, that waits on the key and cap ``waits_on``."""
    for d in ["TOSEND"] + [f"TOSEND{i}" for i in range(1, 16)]:
        (tmp_path / d).mkdir()
    job_path = tmp_path / "TOSEND" / "A.FS"
    job_path.write_text('$email_address a@x.test\n$email_text "hi"\n', encoding="utf-8")
    table = SharedSlots.create(64)
    spool = Spool(tmp_path, 15, False)
    scheduler = Scheduler(config, spool, "N1", shared=table)
    job = parse_job(CommandFile.read(job_path), "A.FS", config.job_env)
    entry = WaitEntry(QueuedJob(spool.priority("TOSEND"), "TOSEND", "A.FS", str(job_path)), job.without_content())
    scheduler._waiting.add(entry, [waits_on])
    return scheduler, table, job_path, entry


def test_a_claim_that_raises_after_the_slots_were_taken_gives_them_back(tmp_path, monkeypatch):
    # A waiting job offered a freed slot: the slots are taken, then its claim
    # fails (EIO on the spool's share). The slots must come back.
    config = Config(spool=tmp_path, relay=RelayConfig("192.0.2.1"), server_max_outbound_connections=2)
    scheduler, table, job_path, _ = _waiting_job(tmp_path, config, ("server", 2))
    spool = scheduler.spool

    def broken_claim(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(spool, "claim", broken_claim)

    async def go() -> None:
        try:
            scheduler._offers.offer(["server"])
        except OSError:
            pass

    asyncio.run(go())
    assert job_path.exists()  # the job is not lost ...
    assert scheduler._connections.tasks() == []  # ... and no connection opened ...
    assert table.held("server") == 0, f"server slots held by nobody: {table.held('server')}"


def test_a_background_task_of_the_run_that_dies_is_logged_when_it_dies(tmp_path, caplog):
    spool = Spool(tmp_path, 15, False)
    spool.ensure()
    scheduler = Scheduler(Config(relay=RelayConfig("192.0.2.1")), spool, "N1", shared=SharedSlots.create(64))

    async def broken(*args: object) -> None:
        raise RuntimeError("a bug")

    scheduler.limiter.watch_shared = broken  # type: ignore[method-assign,union-attr]
    asyncio.run(scheduler.run(drain=True))
    assert "the shared caps task stopped: RuntimeError: a bug" in caplog.text


def test_the_end_of_a_pause_that_another_worker_lengthened_offers_its_jobs_later_without_spinning(tmp_path):
    # A job waits on the relay's refusal pause. Worker 0's timer ends at its
    # own pause; the table (another worker's later refusal) says it goes on.
    # Its end must neither offer the job early nor loop on it for good.
    key = pause_key("192.0.2.1")
    config = Config(spool=tmp_path, relay=RelayConfig("192.0.2.1"), refusal_pause=0.2)
    scheduler, table, job_path, entry = _waiting_job(tmp_path, config, (key, 0))
    relay = scheduler._router.relay
    assert relay is not None

    def stuck(signum: int, frame: object) -> None:
        raise TimeoutError("the event loop spins")

    async def go() -> None:
        scheduler._router.refused(relay)
        with table.locked():
            table.pause(key, time.monotonic() + 0.6, time.monotonic())  # another worker's later refusal
        scheduler._offers.unpaused(key)  # as a timer that fired at the worker's own end would
        await asyncio.sleep(0.3)

    old = signal.signal(signal.SIGALRM, stuck)
    signal.setitimer(signal.ITIMER_REAL, 5.0)
    try:
        asyncio.run(go())
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert scheduler._waiting.head(key) is entry and job_path.exists()  # still waiting, untouched


def _record_starts(scheduler: Scheduler, monkeypatch) -> list[str]:
    started: list[str] = []
    monkeypatch.setattr(scheduler._offers, "_start", lambda choice, item: started.append(item.claimed.name))
    return started


ENDED = [pause_key("192.0.2.1"), suspend_key("host:192.0.2.1")]


@pytest.mark.parametrize("key", ENDED, ids=["pause", "suspension"])
def test_a_job_left_waiting_on_a_pause_or_suspension_that_has_ended_is_offered_by_the_next_whole_scan(tmp_path,
                                                                                                     monkeypatch, key):
    # Its deferral landed after the end had offered the key to the jobs
    # waiting then: nothing else would ever offer it (such a key has no room).
    config = Config(spool=tmp_path, relay=RelayConfig("192.0.2.1"), refusal_pause=0.2)
    scheduler, _, _, _ = _waiting_job(tmp_path, config, (key, 0))
    started = _record_starts(scheduler, monkeypatch)
    asyncio.run(scheduler._scan())
    assert started == ["A.FS"] and scheduler._waiting.head(key) is None


@pytest.mark.parametrize("key", ENDED, ids=["pause", "suspension"])
def test_a_deferral_that_lands_after_its_pause_or_suspension_ended_is_offered_at_once(tmp_path, monkeypatch, key):
    config = Config(spool=tmp_path, relay=RelayConfig("192.0.2.1"), refusal_pause=0.2)
    scheduler, _, job_path, entry = _waiting_job(tmp_path, config, ("other", 1))
    scheduler._waiting.take(entry)
    started = _record_starts(scheduler, monkeypatch)
    claimed = scheduler.spool.claim(entry.waiting, "N1")
    assert claimed is not None
    cf = CommandFile.read(Path(claimed.path))
    item = Item(claimed, cf, parse_job(cf, "A.FS", config.job_env))
    scheduler.spool.hand_back(claimed)  # back in its folder, as a deferral leaves it
    asyncio.run(_in_loop(lambda: scheduler._deferred(item, Blocked((Limit(key, 0, "refusal_pause"),)), job_path)))
    assert started == ["A.FS"] and scheduler._waiting.head(key) is None


async def _in_loop(call) -> None:
    call()
    await asyncio.sleep(0)


def test_a_whole_scan_leaves_waiting_a_job_whose_pause_another_worker_still_holds_or_whose_suspension_goes_on(
        tmp_path, monkeypatch):
    paused, suspended = pause_key("192.0.2.1"), suspend_key("host:192.0.2.1")
    config = Config(spool=tmp_path, relay=RelayConfig("192.0.2.1"), refusal_pause=0.2)
    scheduler, table, _, entry = _waiting_job(tmp_path, config, (paused, 0))
    scheduler._waiting.wait_on(entry, suspended, 0)
    scheduler._shaping._resuming.add(suspended)  # its timer is set: the suspension goes on
    with table.locked():
        table.pause(paused, time.monotonic() + 30, time.monotonic())  # another worker's refusal
    started = _record_starts(scheduler, monkeypatch)
    asyncio.run(scheduler._scan())
    assert started == [] and scheduler._waiting.head(paused) is entry and scheduler._waiting.head(suspended) is entry


# --- jobs claimed straight as sending (a real SMTP server, in-process) --------


def _submit(spool: Spool, name: str, to: str) -> Path:
    tmp = spool.root / "TOSEND" / (name[:-3] + ".TFS")
    tmp.write_text(f'$email_address {to}\n$email_subject s\n$email_text "hi"\n', encoding="utf-8")
    dest = spool.root / "TOSEND" / name
    os.rename(tmp, dest)
    return dest


def _second_job_over_one_connection(tmp_path: Path, first_to: str, rules: list[Rule],
                                    watch: Callable[[Spool, SMTPTestServer], None] = lambda spool, srv: None,
                                    prepare: Callable[[Scheduler], None] = lambda scheduler: None,
                                    ) -> tuple[list[Claimed], SMTPTestServer]:
    """A.FS to ``first_to`` and, once it is done, B.FS to good@x.test, with
    the first connection kept open; every claim made, in order. ``watch`` is
    called every 10 ms until B.FS is in SENT; ``prepare`` before B.FS is
    submitted."""
    with SMTPTestServer(rules=rules) as srv:
        config = Config(spool=tmp_path / "spool", relay=RelayConfig(srv.host, srv.port), connection_idle=20.0,
                        fsync=False, write_settle=0.0, scan_interval=60.0)
        spool = Spool(config.spool, config.queues, False)
        spool.ensure()
        spool.use_held_names(HeldNames.create(1).for_process(0))
        claims: list[Claimed] = []
        claim = spool.claim

        def recorded(job: QueuedJob, node: str, sending: bool = False) -> Claimed | None:
            claimed = claim(job, node, sending)
            if claimed is not None:
                claims.append(claimed)
            return claimed

        spool.claim = recorded  # type: ignore[method-assign]
        scheduler = Scheduler(config, spool, "N1")

        async def until(path: Path, each: Callable[[], None] = lambda: None) -> None:
            deadline = time.monotonic() + 10
            while not path.exists():
                assert time.monotonic() < deadline, f"{path} never came"
                each()
                await asyncio.sleep(0.01)

        async def go() -> None:
            run = asyncio.get_running_loop().create_task(scheduler.run())
            scheduler.hint(_submit(spool, "A.FS", first_to))
            await until(spool.root / ("FAIL" if first_to.startswith("bad") else "SENT") / "A.FS")
            await asyncio.sleep(0.1)
            prepare(scheduler)
            scheduler.hint(_submit(spool, "B.FS", "good@x.test"))
            await until(spool.root / "SENT" / "B.FS", lambda: watch(spool, srv))
            scheduler.request_stop()
            await run

        asyncio.run(go())
    return claims, srv


def test_a_job_that_rides_an_idle_greeted_connection_is_claimed_straight_as_sending_and_sent_over_it(tmp_path):
    claims, srv = _second_job_over_one_connection(tmp_path, "good@x.test", [])
    assert [(c.name, c.marked_sending) for c in claims] == [("A.FS", False), ("B.FS", True)]
    assert srv.connections_total == 1 and len(srv.messages) == 2


def test_a_job_is_not_named_sending_while_its_idle_connection_still_owes_an_rset(tmp_path):
    # After a refused message the connection sends RSET before the next MAIL
    # FROM: a round trip (a reconnection, should RSET fail) in which the next
    # job has not begun, and must not count as begun should the node die.
    early: list[list[str]] = []

    def watch(spool: Spool, srv: SMTPTestServer) -> None:
        active = spool.root / "ACTIVE" / "N1" / "TOSEND"
        if len(srv.message_starts) < 2:
            early.append(sorted(os.listdir(active)) if active.exists() else [])

    claims, srv = _second_job_over_one_connection(
        tmp_path, "bad@x.test", [Rule(stage="RCPT", code=550, text="5.1.1 unknown", match="bad@x.test"),
                                 Rule(stage="RSET", delay=1.0)], watch)
    assert [(c.name, c.marked_sending) for c in claims] == [("A.FS", False), ("B.FS", False)]
    assert any("B.FS" in names for names in early)  # the RSET's round trip was watched, B claimed
    assert not any("B.FS.SENDING" in names for names in early)
    assert srv.connections_total == 1


def test_a_job_chosen_to_ride_an_idle_connection_starts_on_it_without_its_route_asked_again(tmp_path):
    # Between the scan's choice and the start nothing may choose again: a
    # route whose time to live ran out in between would send the job, already
    # named sending, to a look-up (and a crash there would count an attempt).
    asked: list[str] = []

    def expire_after_one_look(scheduler: Scheduler) -> None:
        targets = scheduler._router.targets

        def once(job: Job, *args: Any, **kwargs: Any) -> Any:
            asked.append(job.name)
            return targets(job, *args, **kwargs) if asked.count(job.name) == 1 else None

        scheduler._router.targets = once  # type: ignore[method-assign]

    claims, srv = _second_job_over_one_connection(tmp_path, "good@x.test", [], prepare=expire_after_one_look)
    assert [(c.name, c.marked_sending) for c in claims] == [("A.FS", False), ("B.FS", True)]
    assert asked == ["B.FS"]
    assert srv.connections_total == 1 and len(srv.messages) == 2
