"""copiamail.scheduling.carrying: what an open connection carries next. Here:
the next waiting job of its domain is claimed straight as sending when the
connection starts it at once, and goes back unsent when its file changed
while it waited. A real spool (with the node's filter of held names) and a
scheduler's parts; connections are made but never opened."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from copiamail.config import Config, RelayConfig
from copiamail.jobfile.fsfile import CommandFile
from copiamail.jobfile.job import Job, parse_job
from copiamail.scheduling.carrying import NextJobs
from copiamail.scheduling.connections import Connection, starttls_for
from copiamail.scheduling.scheduler import Scheduler
from copiamail.scheduling.waiting import WaitEntry, WaitingJobs
from copiamail.spool.held import HeldNames
from copiamail.spool.layout import QueuedJob
from copiamail.spool.queue import Claimed, Spool

JOB = b"$email_address u@a.test\n$email_text hi\n"


class Rig:
    """A spool holding W.FS of a.test, waiting on the slot of a greeted
    connection of a.test that has just carried a message."""

    def __init__(self, root: Path, greeted: bool = True) -> None:
        self.spool = Spool(root / "spool", 15, fsync=False)
        self.spool.ensure()
        self.spool.use_held_names(HeldNames.create(1).for_process(0))
        (self.spool.folder("TOSEND") / "W.FS").write_bytes(JOB)
        scheduler = Scheduler(Config(relay=RelayConfig("192.0.2.1")), self.spool, "N1")
        chooser = scheduler._carrier.next_jobs.chooser
        target = scheduler._router.targets(self.job())
        assert target is not None
        limits = scheduler._shaping.scopes.limits("u@a.test", "a.test", None, target[0].ips, target[0].names)
        assert scheduler.limiter.try_acquire(limits) is None
        self.conn: Connection = scheduler._connections.open("a.test", "u@a.test", None, limits, target[0],
                                                            starttls_for(target[0], self.job()))
        if greeted:
            self.conn.session._link = SimpleNamespace(usable=True)  # type: ignore[assignment]
        self.conn.session.messages = 1
        self.waiting = WaitingJobs()
        w = QueuedJob(0, "TOSEND", "W.FS", str(self.spool.folder("TOSEND") / "W.FS"))
        self.waiting.add(WaitEntry(w, self.job()), [(limits[0].key, limits[0].cap)])
        self.dispatched: list[Claimed] = []
        self.handed_back: list[Claimed] = []

        def take(entry: WaitEntry, sending: bool) -> Claimed | None:
            self.waiting.take(entry)
            return self.spool.claim(entry.waiting, "N1", sending)

        def hand_back(claimed: Claimed) -> None:
            self.handed_back.append(claimed)
            self.spool.hand_back(claimed)

        self.next_jobs = NextJobs(chooser, self.spool, self.waiting, scheduler._router, scheduler._shaping, take,
                                  lambda claimed, cf, job: self.dispatched.append(claimed), scheduler.clock, hand_back)

    @staticmethod
    def job() -> Job:
        return parse_job(CommandFile.parse(JOB), "W.FS")

    def active(self) -> list[str]:
        return sorted(p.name for p in (self.spool.active_dir("N1") / "TOSEND").iterdir())


@pytest.mark.parametrize("greeted", [True, False])
def test_the_next_waiting_job_is_claimed_straight_as_sending_only_where_the_connection_starts_it_at_once(tmp_path, greeted):
    rig = Rig(tmp_path, greeted=greeted)
    item, close = rig.next_jobs.next_for(rig.conn)
    assert item is not None and not close
    assert item.claimed.marked_sending == greeted
    assert rig.active() == (["W.FS.SENDING"] if greeted else ["W.FS"])
    assert rig.dispatched == [] and rig.handed_back == []


def test_a_waiting_job_claimed_as_sending_whose_file_changed_goes_back_unsent(tmp_path):
    rig = Rig(tmp_path)
    (rig.spool.folder("TOSEND") / "W.FS").write_bytes(b"$email_address other@a.test\n$email_text hi\n")
    item, _ = rig.next_jobs.next_for(rig.conn)
    assert item is None and rig.dispatched == []
    assert [c.name for c in rig.handed_back] == ["W.FS"] and rig.handed_back[0].marked_sending
    assert rig.active() == [] and (rig.spool.folder("TOSEND") / "W.FS").read_bytes().startswith(b"$email_address other@")


def test_a_waiting_job_only_claimed_whose_file_changed_is_decided_afresh(tmp_path):
    rig = Rig(tmp_path, greeted=False)
    (rig.spool.folder("TOSEND") / "W.FS").write_bytes(b"$email_address other@a.test\n$email_text hi\n")
    item, _ = rig.next_jobs.next_for(rig.conn)
    assert item is None and rig.handed_back == [] and [c.name for c in rig.dispatched] == ["W.FS"]


def test_a_job_sent_behind_the_message_in_flight_is_claimed_as_any_job(tmp_path):
    # The message ahead may yet be refused, and the connection then owe an
    # RSET before this one's MAIL FROM: it is marked when its turn comes.
    rig = Rig(tmp_path)
    rig.conn.session.can_send_behind = lambda: True  # type: ignore[method-assign]
    item = rig.next_jobs.behind(rig.conn)
    assert item is not None and not item.claimed.marked_sending and rig.active() == ["W.FS"]
