"""copiamail.scheduling.carrier: one connection's run, with its attempts,
results and next jobs faked (no SMTP, no spool): when it goes idle, and when
it gives up its slots, relative to the commit of its last result."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from test_connections import Rig, job, relay

from copiamail.scheduling.carrier import Carrier, Ending
from copiamail.scheduling.connections import Connection
from copiamail.scheduling.routing import Item


class FakeAttempts:
    """Every attempt succeeds at once with a result (any object will do)."""

    async def attempt(self, conn: Connection, item: Item, send_behind: object) -> object:
        return ("result", item)


class FakeResults:
    """Each result's commit is ``commit``, a future the test finishes."""

    def __init__(self, commit: asyncio.Future[None]) -> None:
        self.commit = commit
        self.written: list[object] = []

    def write(self, result: object) -> asyncio.Future[None]:
        self.written.append(result)
        return self.commit

    def hand_back(self, claimed: object) -> None:
        raise AssertionError("nothing is handed back here")


class NoNextJob:
    config = SimpleNamespace(connection_idle=60.0)

    def next_for(self, conn: Connection) -> tuple[None, bool]:
        return None, False

    def behind(self, conn: Connection) -> None:
        return None


async def _until(condition: object, turns: int = 200) -> None:
    for _ in range(turns):
        if condition():  # type: ignore[operator]
            return
        await asyncio.sleep(0)
    raise AssertionError("never happened")


def _run(woken: list[int] | None = None, next_jobs: NoNextJob | None = None
         ) -> tuple[Rig, Connection, FakeResults, asyncio.Task[None], asyncio.Future[None]]:
    rig = Rig()
    if woken is not None:
        rig.connections.on_idle = lambda: woken.append(1)
    conn = rig.open("a.test", relay())
    commit: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    results = FakeResults(commit)
    carrier = Carrier(FakeAttempts(), results, next_jobs or NoNextJob(), rig.connections, None,  # type: ignore[arg-type]
                      lambda: False, lambda: False)
    task = asyncio.get_running_loop().create_task(carrier.carry(conn, Item(None, None, job()), Ending()))  # type: ignore[arg-type]
    return rig, conn, results, task, commit


def test_a_connection_goes_idle_while_its_last_result_is_still_being_committed():
    async def go() -> None:
        _, conn, results, task, commit = _run()
        # Idle, so the scan hands it the next job of its domain instead of
        # deferring that job for as long as an fsync takes.
        await _until(lambda: conn.idle)
        assert len(results.written) == 1 and not commit.done()
        conn.handoff.set_result(None)  # type: ignore[union-attr]  # told to close
        await asyncio.sleep(0.02)
        assert not task.done()  # its slots are not given up before its last result is committed
        commit.set_result(None)
        await asyncio.wait_for(task, 5)

    asyncio.run(go())


def test_a_drain_is_woken_again_when_an_idle_connections_last_result_lands():
    async def go() -> None:
        woken: list[int] = []
        _, conn, _, task, commit = _run(woken)
        await _until(lambda: conn.idle)
        assert woken == [1]  # went idle: the drain looks, and finds a result still owed
        commit.set_result(None)
        await _until(lambda: len(woken) == 2)  # the result landed: it looks again
        conn.handoff.set_result(None)  # type: ignore[union-attr]
        await asyncio.wait_for(task, 5)

    asyncio.run(go())


class OneMoreJob(NoNextJob):
    """After the first message, one more job of the domain; then none."""

    def __init__(self) -> None:
        self.left = 1

    def next_for(self, conn: Connection) -> tuple[Item | None, bool]:
        if self.left:
            self.left -= 1
            return Item(None, None, job()), False  # type: ignore[arg-type]
        return None, False


def test_a_result_made_while_the_last_one_is_committed_is_written_not_handed_back_when_the_run_ends():
    # A delivered message whose connection is cancelled (shutdown) while it
    # waits for the previous result's commit: its result is written (the job
    # goes to SENT), never handed back to be sent again.
    async def go() -> tuple[int, bool]:
        _, _, results, task, _ = _run(next_jobs=OneMoreJob())
        await _until(lambda: len(results.written) == 1)
        await asyncio.sleep(0.01)  # the second message's result waits for the first one's commit
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        return len(results.written), task.cancelled()

    assert asyncio.run(go()) == (2, True)
