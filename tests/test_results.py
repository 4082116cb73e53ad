"""copiamail.scheduling.results: results written in batches, fsynced by the
syncer, owed when they cannot be written, parked when they cannot be moved;
and what a node counts (Stats). A fake spool and a fake syncer: no disk waits,
no child process."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from copiamail.jobfile.fsfile import CommandFile
from copiamail.jobfile.job import parse_job
from copiamail.scheduling.results import Result, ResultWriter, Stats, Tally
from copiamail.spool.queue import Claimed, Destination

FULL = OSError(errno.ENOSPC, "No space left on device")


class FakeBatch:
    """A ResultBatch: results written into spares, synced, then committed."""

    def __init__(self, spool: FakeSpool, jobs: Sequence[tuple[Claimed, CommandFile, Destination]]) -> None:
        self.spool = spool
        self.jobs = list(jobs)
        # Where a real spool publishes each result: SENT, FAIL, or its own folder.
        self.out: list[Path | OSError] = [
            FULL if c.name in spool.cannot_write else spool.root / ("TOSEND" if d is Destination.BACK else d.value) / c.name
            for c, _, d in jobs]

    def __len__(self) -> int:
        return sum(1 for o in self.out if not isinstance(o, OSError))

    @property
    def fds(self) -> list[int]:
        return [i for i, o in enumerate(self.out) if not isinstance(o, OSError)]

    def sync(self) -> None:
        self.spool.synced_here += len(self)

    def synced(self, errnos: Sequence[int]) -> None:
        for i, err in zip(self.fds, errnos, strict=True):
            if err:
                self.out[i] = OSError(err, "sync failed")

    def abandon(self, error: OSError) -> None:
        self.out = [error if not isinstance(o, OSError) else o for o in self.out]

    def commit(self) -> list[Path | OSError]:
        for (claimed, cf, dest), o in zip(self.jobs, self.out, strict=True):
            if isinstance(o, OSError):
                continue
            if claimed.name in self.spool.cannot_move:
                claimed.path.unlink()  # committed: the claimed job is gone, its result not moved
                self.out[self.jobs.index((claimed, cf, dest))] = FULL
                continue
            self.spool.landed.append((claimed.name, dest))
        return self.out


class FakeSpool:
    def __init__(self, root: Path, fsync: bool = True) -> None:
        self.root = root
        self.fsync = fsync
        self.cannot_write: set[str] = set()  # job names whose result cannot be written
        self.cannot_move: set[str] = set()  # job names whose result is committed but cannot be moved
        self.cannot_hand_back = False
        self.batches: list[list[str]] = []
        self.landed: list[tuple[str, Destination]] = []
        self.synced_here = 0
        self.finished_committed: list[tuple[str, bool]] = []
        self.dropped_spares = False

    def claimed(self, name: str) -> Claimed:
        path = self.root / name
        path.write_text(f"$email_address {name.lower()}@a.test\n")
        return Claimed("N1", "TOSEND", name, str(path))

    def write_results(self, jobs, marks=()):
        self.batches.append([c.name for c, _, _ in jobs])
        return FakeBatch(self, jobs)

    def finish_many(self, jobs):
        batch = self.write_results(jobs)
        batch.sync()
        return batch.commit()

    def finish(self, claimed, cf, dest):
        [landed] = self.finish_many([(claimed, cf, dest)])
        if isinstance(landed, OSError):
            raise landed
        return self.root / "TOSEND" / claimed.name

    def hand_back(self, claimed):
        if self.cannot_hand_back:
            raise OSError(errno.EACCES, "Permission denied")
        self.landed.append((claimed.name, "handed back"))
        return self.root / "TOSEND" / claimed.name

    def finish_committed(self, node, drop_uncommitted=True):
        self.finished_committed.append((node, drop_uncommitted))

    def active_dir(self, node):
        return self.root / "ACTIVE" / node

    def drop_spares(self):
        self.dropped_spares = True


class FakeSyncer:
    """Takes batches and answers them when told to."""

    def __init__(self, accept: bool = True) -> None:
        self.accept = accept
        self.waiting: list[tuple[list[int], Callable[[list[int] | None], None]]] = []
        self.closed = False

    def submit(self, fds, done) -> bool:
        if not self.accept:
            return False
        self.waiting.append((list(fds), done))
        return True

    def answer(self, errnos: list[int] | None = None) -> None:
        fds, done = self.waiting.pop(0)
        done([0] * len(fds) if errnos is None else errnos)

    def lose(self) -> None:
        for _, done in self.waiting:
            done(None)
        self.waiting.clear()

    def close(self) -> None:
        self.closed = True
        self.lose()


def cf(name: str = "J") -> CommandFile:
    return CommandFile.parse(f"$email_address {name.lower()}@a.test\n$email_text hi\n".encode())


def sent(spool: FakeSpool, name: str) -> Result:
    return Result(spool.claimed(name), cf(name), Destination.SENT, Tally.SENT)


@pytest.fixture
def spool(tmp_path) -> FakeSpool:
    return FakeSpool(tmp_path)


def writer_for(spool: FakeSpool, syncer: FakeSyncer | None = None) -> tuple[ResultWriter, list[tuple[str, str]]]:
    events: list[tuple[str, str]] = []
    writer = ResultWriter(spool, "N1", lambda kind, name: events.append((kind, name)), start_syncer=lambda: syncer)  # type: ignore[arg-type]
    writer.start()
    return writer, events


# --- batches -----------------------------------------------------------------------------------


def test_the_results_of_one_turn_of_the_loop_are_written_together_and_counted(spool):
    writer, events = writer_for(spool)

    async def go() -> None:
        futures = [writer.write(sent(spool, n)) for n in ("A", "B", "C")]
        assert len({id(f) for f in futures}) == 1 and not futures[0].done()
        await futures[0]

    asyncio.run(go())
    assert spool.batches == [["A", "B", "C"]] and spool.synced_here == 3
    assert writer.stats == Stats(sent=3) and events == [("sent", "A"), ("sent", "B"), ("sent", "C")]


def test_with_a_syncer_the_loop_goes_on_and_results_made_meanwhile_wait_for_the_next_batch(spool):
    syncer = FakeSyncer()
    writer, _ = writer_for(spool, syncer)

    async def go() -> None:
        first = writer.write(sent(spool, "A"))
        await asyncio.sleep(0)
        assert spool.batches == [["A"]] and len(syncer.waiting) == 1 and not first.done()
        second = writer.write(sent(spool, "B"))
        third = writer.write(sent(spool, "C"))
        await asyncio.sleep(0)
        assert spool.batches == [["A"]]  # one batch at a time
        syncer.answer()
        assert first.done() and spool.batches == [["A"], ["B", "C"]]
        syncer.answer()
        await asyncio.gather(second, third)

    asyncio.run(go())
    assert spool.synced_here == 0 and writer.stats.sent == 3


def test_a_syncer_that_refuses_a_batch_leaves_its_fsyncs_to_this_process(spool):
    writer, _ = writer_for(spool, FakeSyncer(accept=False))

    async def go() -> None:
        await writer.write(sent(spool, "A"))

    asyncio.run(go())
    assert spool.synced_here == 1 and writer.stats.sent == 1


def test_results_a_lost_syncer_never_answered_for_are_owed_and_written_again(spool):
    syncer = FakeSyncer()
    writer, events = writer_for(spool, syncer)

    async def go() -> None:
        done = writer.write(sent(spool, "A"))
        await asyncio.sleep(0)
        syncer.lose()
        await done

    asyncio.run(go())
    assert writer.paused and writer.owed == 1 and events == []
    writer.pay_owed()
    assert not writer.paused and writer.stats.sent == 1 and spool.landed == [("A", Destination.SENT)]


def test_settle_gives_up_a_syncer_that_does_not_answer_and_owes_its_batch(spool):
    syncer = FakeSyncer()
    writer, _ = writer_for(spool, syncer)

    async def go() -> None:
        writer.write(sent(spool, "A"))
        await asyncio.sleep(0)
        await writer.settle(0)  # waits at least a second

    asyncio.run(go())
    assert syncer.closed and writer.owed == 1


# --- owed and parked results ---------------------------------------------------------------------


def test_a_result_that_cannot_be_written_is_owed_and_pauses_the_node_until_paid(spool):
    writer, events = writer_for(spool)
    spool.cannot_write.add("B")

    async def go() -> None:
        await asyncio.gather(writer.write(sent(spool, "A")), writer.write(sent(spool, "B")))

    asyncio.run(go())
    assert writer.paused and writer.owed == 1 and events == [("sent", "A")]
    writer.pay_owed()  # the disk is still full
    assert writer.paused and writer.stats.sent == 1
    spool.cannot_write.clear()
    writer.pay_owed()
    assert not writer.paused and writer.stats.sent == 2 and events[-1] == ("sent", "B")


def test_owed_results_are_paid_in_order_and_stop_at_the_first_that_fails(spool):
    writer, _ = writer_for(spool)
    spool.cannot_write.update({"A", "B", "C"})

    async def go() -> None:
        await asyncio.gather(*(writer.write(sent(spool, n)) for n in "ABC"))

    asyncio.run(go())
    spool.cannot_write = {"B"}
    batches = len(spool.batches)
    writer.pay_owed()
    assert spool.batches[batches:] == [["A"], ["B"]]  # C is not tried after B failed
    assert writer.owed == 2


def test_a_result_committed_but_not_moved_is_parked_counted_and_moved_at_the_next_scan(spool):
    writer, events = writer_for(spool)
    spool.cannot_move.add("A")

    async def go() -> None:
        await writer.write(sent(spool, "A"))

    asyncio.run(go())
    assert writer.parked and not writer.paused and events == [("sent", "A")]
    writer.finish_parked()
    assert not writer.parked and spool.finished_committed == [("N1", False)]


# --- deferrals and jobs handed back --------------------------------------------------------------


def _deferred(writer: ResultWriter, claimed, text: CommandFile, name: str) -> list[Path | None]:
    """Defer a job and wait for its batch; where the writer says it landed."""
    landed: list[Path | None] = []

    async def go() -> None:
        await writer.defer(claimed, text, parse_job(text, name), landed=landed.append)

    asyncio.run(go())
    return landed


def test_a_deferral_is_written_back_with_its_busy_count_one_higher(spool):
    writer, events = writer_for(spool)
    claimed = spool.claimed("D")
    text = cf("D").set_var("DOMAINBUSY_COUNT", 2)
    assert _deferred(writer, claimed, text, "D") == [spool.root / "TOSEND" / "D"]
    assert spool.landed == [("D", Destination.BACK)] and writer.stats == Stats(deferred=1) and events == [("deferred", "D")]
    [batch] = spool.batches
    assert batch == ["D"]


def test_deferrals_of_one_turn_of_the_loop_are_made_durable_together_with_results(spool):
    writer, _ = writer_for(spool)
    landed: list[Path | None] = []

    async def go() -> None:
        a = writer.defer(spool.claimed("D"), cf("D"), parse_job(cf("D"), "D"), landed=landed.append)
        b = writer.write(sent(spool, "S"))
        await asyncio.gather(a, b)

    asyncio.run(go())
    assert spool.batches == [["D", "S"]] and landed == [spool.root / "TOSEND" / "D"]
    assert writer.stats == Stats(sent=1, deferred=1)


def test_a_deferral_that_cannot_be_written_hands_the_job_back_unmarked(spool):
    writer, events = writer_for(spool)
    spool.cannot_write.add("D")
    assert _deferred(writer, spool.claimed("D"), cf("D"), "D") == [spool.root / "TOSEND" / "D"]
    assert spool.landed == [("D", "handed back")]
    assert writer.stats == Stats(handed_back=1) and events == [] and not writer.parked and not writer.paused
    spool.cannot_write.add("E")
    spool.cannot_hand_back = True
    assert _deferred(writer, spool.claimed("E"), cf("E"), "E") == [None]
    assert writer.parked and not writer.paused


def test_close_settles_stops_the_syncer_and_drops_spares(spool):
    syncer = FakeSyncer()
    writer, _ = writer_for(spool, syncer)

    async def go() -> None:
        writer.write(sent(spool, "A"))
        await asyncio.sleep(0)
        asyncio.get_running_loop().call_later(0.05, syncer.answer)
        await writer.close(5)

    asyncio.run(go())
    assert syncer.closed and spool.dropped_spares and writer.stats.sent == 1 and not writer.paused


# --- Stats ------------------------------------------------------------------------------------------


def test_stats_count_each_tally_in_its_own_field_and_add_up():
    stats = Stats()
    for tally in (Tally.SENT, Tally.SENT, Tally.FAILED, Tally.RETRIED, Tally.DEFERRED, Tally.HANDED_BACK):
        stats.count(tally)
    assert stats == Stats(sent=2, failed=1, retried=1, deferred=1, handed_back=1)
    assert stats + Stats(sent=1, handed_back=2) == Stats(3, 1, 1, 1, 3)
    assert {t.value for t in Tally} == {"sent", "failed", "retried", "deferred", "handed_back"}


def test_however_many_results_one_turn_makes_a_batch_holds_at_most_64_files_open(spool):
    writer, _ = writer_for(spool)

    async def go() -> None:
        await asyncio.gather(*(writer.write(sent(spool, f"J{i:03d}")) for i in range(150)))

    asyncio.run(go())
    assert [len(b) for b in spool.batches] == [64, 64, 22]
    assert writer.stats == Stats(sent=150) and not writer.busy


# --- hand-backs --------------------------------------------------------------------------------


def test_a_hand_back_that_fails_is_tried_again_while_the_node_runs(spool, caplog):
    caplog.set_level("INFO", logger="copiamail")

    async def run() -> None:
        writer = ResultWriter(spool, "N1", start_syncer=lambda: None, hand_back_retry=0.05)  # type: ignore[arg-type]
        spool.cannot_hand_back = True
        assert writer.hand_back(spool.claimed("A.FS")) is None
        await asyncio.sleep(0.2)  # tried again at 0.05 s and 0.15 s: still failing
        assert spool.landed == [] and writer.stats.handed_back == 0
        spool.cannot_hand_back = False
        await asyncio.sleep(0.5)  # the next try, 0.2 s after the last
        assert spool.landed == [("A.FS", "handed back")] and writer.stats.handed_back == 1
        await writer.close(0.1)

    asyncio.run(run())
    assert "cannot hand the job back" in caplog.text and "handed back to TOSEND after all" in caplog.text


def test_a_hand_back_still_failing_at_shutdown_is_left_for_recovery_and_said(spool, caplog):
    async def run() -> None:
        writer = ResultWriter(spool, "N1", start_syncer=lambda: None, hand_back_retry=10)  # type: ignore[arg-type]
        spool.cannot_hand_back = True
        writer.hand_back(spool.claimed("A.FS"))
        await writer.close(0.1)
        assert spool.landed == []

    asyncio.run(run())
    assert "1 job(s) could not be handed back" in caplog.text
