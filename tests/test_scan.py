"""copiamail.scheduling.scan: due jobs claimed in queue order, jobs not yet due
and other workers' jobs remembered, files written in place left to settle,
scans sliced so the event loop gets turns. A real spool in tmp_path; fake
clocks; the jobs claimed are collected instead of sent."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from copiamail.config import Config
from copiamail.jobfile.fsfile import CommandFile
from copiamail.jobfile.job import Job
from copiamail.scheduling.domain_owners import DomainOwners
from copiamail.scheduling.limits import worker_of
from copiamail.scheduling.scan import Scanner
from copiamail.spool.held import HeldNames
from copiamail.spool.queue import Claimed, Spool

NOW = 4_000_000_000.0  # jobs dated 2098 are not due yet


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Rig:
    """A spool, a scanner over it, and what the scanner dispatched."""

    def __init__(self, root: Path, write_settle: float = 5.0, worker: int = 0, workers: int = 1,
                 held_until: Callable[[Job, str], float | None] = lambda job, queue: None,
                 owners: DomainOwners | None = None, rides_at_once: Callable[[Job], object | None] = lambda job: None) -> None:
        self.spool = Spool(root / "spool", 15, fsync=False)
        self.spool.ensure()
        self.spool.use_held_names(HeldNames.create(1).for_process(0))
        self.claims: list[Claimed] = []
        self.handed_back: list[str] = []
        if workers > 1 and owners is None:
            owners = DomainOwners.create(workers, entries=64)
        self.waiting: set[str] = set()
        self.halt = False
        self.dispatched: list[tuple[str, bool]] = []  # (job name, read on the way)
        self.rides: list[object | None] = []  # the connection each dispatched job was chosen to ride
        self.clock = Clock(NOW)
        self.mono = Clock(100.0)
        self.scanner = Scanner(Config(spool=self.spool.root, write_settle=write_settle), self.spool, "N1", self.waiting,
                               lambda: self.halt, self._dispatched, worker=worker, workers=workers, owners=owners,
                               clock=self.clock, monotonic=self.mono, held_until=held_until, rides_at_once=rides_at_once,
                               hand_back=lambda claimed: self.handed_back.append(self.spool.hand_back(claimed).name))

    def _dispatched(self, claimed: Claimed, cf: CommandFile | None, job: Job | None, ride: object | None) -> None:
        self.claims.append(claimed)
        self.rides.append(ride)
        self.dispatched.append((claimed.name, cf is not None))

    def job(self, queue: str, name: str, to: str = "u@a.test", *lines: str) -> Path:
        path = self.spool.root / queue / name
        path.write_text("\n".join([f"$email_address {to}", '$email_text "hi"', *lines]) + "\n")
        return path

    def full(self) -> int:
        self.scanner.start_full()
        found, _ = asyncio.run(self.scanner.scan(self.clock()))
        return found

    def hinted(self) -> int:
        return asyncio.run(self.scanner.scan_hinted())

    def names(self) -> list[str]:
        return [name for name, _ in self.dispatched]


def test_due_jobs_are_claimed_in_queue_order_and_dispatched_with_what_was_read(tmp_path):
    rig = Rig(tmp_path)
    rig.job("TOSEND1", "A.FS")
    rig.job("TOSEND", "B.FS")
    rig.job("TOSEND", "A.FS")
    assert rig.full() == 3
    assert rig.dispatched == [("A.FS", True), ("B.FS", True), ("A.FS", True)]
    assert (rig.spool.active_dir("N1") / "TOSEND1" / "A.FS").exists()
    assert rig.full() == 0


def test_a_job_that_rides_an_open_connection_at_once_is_claimed_straight_as_sending_and_dispatched_to_it(tmp_path):
    conn = object()
    rig = Rig(tmp_path, rides_at_once=lambda job: conn if job.domain == "ride.test" else None)
    rig.job("TOSEND", "A.FS", "u@ride.test")
    rig.job("TOSEND", "B.FS", "u@new.test")
    assert rig.full() == 2
    assert [(c.name, c.marked_sending) for c in rig.claims] == [("A.FS", True), ("B.FS", False)]
    assert rig.rides == [conn, None]
    assert sorted(os.listdir(rig.spool.active_dir("N1") / "TOSEND")) == ["A.FS.SENDING", "B.FS"]


def test_a_job_claimed_as_sending_whose_file_changed_since_it_was_read_goes_back_unsent(tmp_path, monkeypatch):
    rig = Rig(tmp_path, rides_at_once=lambda job: object())
    rig.job("TOSEND", "A.FS")
    monkeypatch.setattr(rig.spool, "unchanged", lambda claimed, sig: False)
    assert rig.full() == 1
    assert rig.dispatched == [] and rig.handed_back == ["A.FS"]
    assert os.listdir(rig.spool.folder("TOSEND")) == ["A.FS"] and os.listdir(rig.spool.active_dir("N1") / "TOSEND") == []


def test_a_job_only_claimed_whose_file_changed_since_it_was_read_is_read_again(tmp_path, monkeypatch):
    rig = Rig(tmp_path)
    rig.job("TOSEND", "A.FS")
    monkeypatch.setattr(rig.spool, "unchanged", lambda claimed, sig: False)
    assert rig.full() == 1 and rig.dispatched == [("A.FS", False)] and rig.handed_back == []


def test_a_job_not_yet_due_is_remembered_and_not_read_again_until_it_changes(tmp_path, monkeypatch):
    rig = Rig(tmp_path)
    later = rig.job("TOSEND", "L.FS", "u@a.test", "$fax_send_date 12/31/2098")
    reads: list[str] = []
    read = CommandFile.read
    monkeypatch.setattr(CommandFile, "read", classmethod(lambda cls, path, size=None: reads.append(str(path)) or read(path, size)))
    assert rig.full() == 0 and rig.scanner.next_due is not None and rig.scanner.next_due > NOW
    assert rig.full() == 0 and len(reads) == 1
    rig.job("TOSEND", "L.FS")  # rewritten: due now
    os.utime(later, ns=(1, 1))
    assert rig.full() == 1 and len(reads) == 2
    rig.scanner.start_full()
    assert rig.scanner.next_due is None


def test_a_held_job_is_judged_again_when_its_remembered_time_is_over_and_stays_while_still_held(tmp_path):
    held = {"H.FS"}
    rig = Rig(tmp_path, held_until=lambda job, queue: rig.clock() + 1.0 if job.name in held else None)
    rig.job("TOSEND", "H.FS")
    assert rig.full() == 0 and rig.scanner.next_due == NOW + 1.0  # held: looked at again a second later
    rig.clock.now += 2.0
    assert rig.full() == 0 and rig.names() == []  # still held: not claimed
    held.clear()
    rig.clock.now += 2.0
    assert rig.full() == 1 and rig.names() == ["H.FS"]


def test_a_worker_claims_only_the_jobs_of_its_domains_and_does_not_read_the_others_again(tmp_path, monkeypatch):
    owners = DomainOwners.create(2, entries=64)
    domains = {owners.owner(d): d for d in ("a.test", "b.test")}
    rig = Rig(tmp_path, worker=0, workers=2, owners=owners)
    rig.job("TOSEND", "MINE.FS", f"u@{domains[0]}")
    rig.job("TOSEND", "THEIRS.FS", f"u@{domains[1]}")
    reads: list[str] = []
    read = CommandFile.read
    monkeypatch.setattr(CommandFile, "read", classmethod(lambda cls, path, size=None: reads.append(Path(path).name) or read(path, size)))
    assert rig.full() == 1 and rig.names() == ["MINE.FS"]
    assert rig.full() == 0 and reads == ["MINE.FS", "THEIRS.FS"]
    assert rig.scanner.mine(domains[0]) and not rig.scanner.mine(domains[1])


def test_a_domain_moved_here_is_found_by_the_next_scan_and_its_files_seen_at_start_are_complete(tmp_path):
    owners = DomainOwners.create(2, entries=64)
    giver = DomainOwners(os.dup(owners._fd), 2, entries=64)  # the other worker's mapping
    domains = {owners.owner(d): d for d in ("a.test", "b.test")}
    rig = Rig(tmp_path, worker=0, workers=2, owners=owners)
    old = rig.job("TOSEND", "OLD.FS", f"u@{domains[1]}")
    rig.clock.now = old.stat().st_mtime + 1  # written a second ago: complete only as present at start
    assert rig.full() == 0
    written = rig.job("TOSEND", "WRITTEN.FS", f"u@{domains[1]}")
    rig.scanner.hint(written, written=True)  # being written in place
    assert rig.hinted() == 0
    giver.owner(domains[1])
    giver.leave(domains[1], 0)
    giver.move(domains[1])
    assert rig.full() == 0  # this worker's copy of the table still names the other
    owners.forget()
    rig.scanner.forget_others()
    assert rig.full() == 1 and rig.names() == ["OLD.FS"]
    rig.mono.now += 6  # the file written in place settles as any other
    assert rig.full() == 1 and rig.names() == ["OLD.FS", "WRITTEN.FS"]


def test_two_workers_split_the_domains_evenly_as_they_meet_them(tmp_path):
    owners = DomainOwners.create(2, entries=64)
    rigs = [Rig(tmp_path / f"w{i}", worker=i, workers=2, owners=owners) for i in range(2)]
    for rig in rigs:
        for i in range(10):
            rig.job("TOSEND", f"J{i:02d}.FS", f"u@d{i}.test")
    # Worker 1 scans first, so it gives out every domain, in turn.
    assert rigs[1].full() == 5 and rigs[0].full() == 5
    assert sorted(rigs[0].names() + rigs[1].names()) == [f"J{i:02d}.FS" for i in range(10)]
    assert owners.given() == [5, 5]


def test_a_job_that_cannot_be_read_goes_to_the_worker_its_file_name_gives(tmp_path):
    name = next(n for n in (f"B{i}.FS" for i in range(20)) if worker_of(n, 2) == 1)
    rigs = [Rig(tmp_path / f"w{i}", worker=i, workers=2) for i in range(2)]
    for rig in rigs:
        (rig.spool.root / "TOSEND" / name).write_text("$email_text no address\n")
    assert rigs[0].full() == 0 and rigs[1].full() == 1 and rigs[1].names() == [name]


def test_a_job_that_waits_for_a_slot_is_left_alone(tmp_path):
    rig = Rig(tmp_path)
    rig.waiting.add(str(rig.job("TOSEND", "W.FS")))
    assert rig.full() == 0 and rig.dispatched == []


def test_a_scan_stops_when_halted_and_a_hinted_scan_drops_its_hints(tmp_path):
    rig = Rig(tmp_path)
    path = rig.job("TOSEND", "A.FS")
    rig.halt = True
    assert rig.full() == 0
    assert rig.scanner.hint(path) and rig.scanner.hinted
    assert rig.hinted() == 0 and not rig.scanner.hinted
    rig.halt = False
    assert rig.full() == 1


def test_a_hint_names_one_file_of_a_queue_folder(tmp_path):
    rig = Rig(tmp_path)
    rig.job("TOSEND", "A.FS")
    b = rig.job("TOSEND2", "B.FS")
    assert not rig.scanner.hint(rig.spool.root / "SENT" / "X.FS")
    assert not rig.scanner.hint(rig.spool.root / "TOSEND" / "X.TFS")
    assert rig.scanner.hint(b)
    assert rig.hinted() == 1 and rig.names() == ["B.FS"]


def test_a_hint_spelled_otherwise_names_the_same_file_as_a_scan(tmp_path):
    rig = Rig(tmp_path)
    path = rig.job("TOSEND", "A.FS")
    rig.waiting.add(str(path))  # as a scan spells it
    assert rig.scanner.hint(f"{path.parent}//A.FS") and rig.hinted() == 0  # the waiting job, left alone
    rig.waiting.clear()
    assert rig.scanner.hint(f"{path.parent}/./A.FS") and rig.hinted() == 1 and rig.names() == ["A.FS"]


def test_a_file_written_in_place_is_taken_once_left_alone_for_write_settle(tmp_path):
    rig = Rig(tmp_path, write_settle=5.0)
    path = rig.job("TOSEND", "P.FS")
    assert rig.scanner.hint(path, written=True)
    assert rig.hinted() == 0 and rig.scanner.busy  # first look: it just changed
    assert rig.scanner.next_settle_look() == 105.0
    rig.mono.now += 3
    rig.scanner.hint_settled()
    assert not rig.scanner.hinted
    rig.mono.now += 3
    rig.scanner.hint_settled()
    assert rig.scanner.hinted and rig.hinted() == 1 and not rig.scanner.busy


def test_a_file_that_keeps_changing_keeps_settling(tmp_path):
    rig = Rig(tmp_path, write_settle=5.0)
    path = rig.job("TOSEND", "P.FS")
    rig.scanner.hint(path, written=True)
    rig.hinted()
    rig.mono.now += 6
    path.write_text(path.read_text() + "$email_text more\n")
    rig.scanner.hint_settled()
    assert rig.hinted() == 0  # changed since the last look: its clock starts again
    rig.mono.now += 6
    rig.scanner.hint_settled()
    assert rig.hinted() == 1


def test_after_the_first_scan_a_recent_file_no_event_told_of_may_be_incomplete(tmp_path):
    rig = Rig(tmp_path, write_settle=5.0)
    assert rig.full() == 0
    path = rig.job("TOSEND", "NEW.FS")
    mtime = path.stat().st_mtime
    rig.clock.now = mtime + 1  # written a second ago, by our clock
    assert rig.full() == 0 and rig.scanner.busy
    rig.mono.now += 6
    assert rig.full() == 1


def test_a_recent_file_renamed_in_is_complete_at_once(tmp_path):
    rig = Rig(tmp_path, write_settle=5.0)
    assert rig.full() == 0
    path = rig.job("TOSEND", "NEW.FS")
    rig.clock.now = path.stat().st_mtime + 1
    rig.scanner.hint(path)
    assert rig.full() == 1


def test_files_present_at_start_count_as_complete(tmp_path):
    rig = Rig(tmp_path, write_settle=5.0)
    path = rig.job("TOSEND", "OLD.FS")
    rig.clock.now = path.stat().st_mtime + 1
    assert rig.full() == 1


def test_a_waiting_file_being_written_is_not_complete_until_left_alone(tmp_path):
    rig = Rig(tmp_path, write_settle=5.0)
    path = rig.job("TOSEND", "W.FS")
    assert rig.scanner.complete(str(path))  # not settling
    rig.waiting.add(str(path))
    rig.scanner.hint(path, written=True)
    rig.scanner.hint_settled()
    assert rig.scanner.next_settle_look() == float("inf")  # a waiting file is looked at when offered a slot
    assert not rig.scanner.complete(str(path))
    rig.mono.now += 6
    assert rig.scanner.complete(str(path))


@pytest.mark.parametrize("jobs", [40])
def test_a_long_scan_gives_the_event_loop_turns(tmp_path, jobs):
    rig = Rig(tmp_path)
    for i in range(jobs):
        rig.job("TOSEND", f"J{i:03d}.FS")
    seen_during: list[int] = []

    def tick() -> float:
        rig.mono.now += 0.001  # each look takes a millisecond
        return rig.mono.now

    rig.scanner = Scanner(Config(spool=rig.spool.root), rig.spool, "N1", rig.waiting, lambda: False,
                          lambda claimed, cf, job, ride: rig.dispatched.append((claimed.name, True)), clock=rig.clock, monotonic=tick)

    async def go() -> int:
        def other_work() -> None:
            seen_during.append(len(rig.dispatched))
            if len(seen_during) < 100:
                asyncio.get_running_loop().call_soon(other_work)

        asyncio.get_running_loop().call_soon(other_work)
        rig.scanner.start_full()
        found, seen = await rig.scanner.scan(NOW)
        assert len(seen) == jobs
        return found

    assert asyncio.run(go()) == jobs
    assert any(0 < n < jobs for n in seen_during)
