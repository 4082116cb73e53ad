"""copiamail.scheduling.offering: a freed slot offered to a waiting job whose
domain has an idle connection hands the job to that connection, claimed
straight as sending where the connection starts it at once, and sends it back
unsent when its file changed while it waited. Connections are made but never
opened; a session past its greeting is stood in for by a usable link."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

from copiamail.config import Config, RelayConfig
from copiamail.jobfile.fsfile import CommandFile
from copiamail.jobfile.job import parse_job
from copiamail.scheduling.connections import Connection, starttls_for
from copiamail.scheduling.routing import Item
from copiamail.scheduling.scheduler import Scheduler
from copiamail.scheduling.waiting import WaitEntry
from copiamail.spool.held import HeldNames
from copiamail.spool.layout import QueuedJob
from copiamail.spool.queue import Spool

KEY = "domain:x.test"


def _offered(tmp_path: Path, change: Callable[[Connection], None] = lambda conn: None,
             before: Callable[[Path], None] = lambda job_path: None,
             after: tuple[str, ...] = ()) -> tuple[Item | None, list[str], list[str]]:
    """A.FS (then the jobs named in ``after``) waits on ``KEY``; a connection
    of x.test is open, greeted (then ``change``) and idle; ``before`` runs on
    A.FS, then the key is offered. Returns what the connection was handed,
    the names in the node's ACTIVE folder for TOSEND, and those in TOSEND."""
    config = Config(spool=tmp_path, relay=RelayConfig("192.0.2.1"))
    spool = Spool(tmp_path, 15, False)
    spool.ensure()
    spool.use_held_names(HeldNames.create(1).for_process(0))
    scheduler = Scheduler(config, spool, "N1")
    for name in ("A.FS", *after):
        path = tmp_path / "TOSEND" / name
        path.write_text('$email_address a@x.test\n$email_text "hi"\n', encoding="utf-8")
        waiting = parse_job(CommandFile.read(path), name, config.job_env)
        scheduler._waiting.add(WaitEntry(QueuedJob(spool.priority("TOSEND"), "TOSEND", name, str(path)),
                                         waiting.without_content()), [(KEY, 2)])
    job_path = tmp_path / "TOSEND" / "A.FS"
    job = parse_job(CommandFile.read(job_path), "A.FS", config.job_env)
    targets = scheduler._router.targets(job)
    assert targets is not None
    limits = scheduler._shaping.scopes.limits("a@x.test", "x.test", None, targets[0].ips, targets[0].names)
    assert scheduler.limiter.try_acquire(limits) is None
    connections = scheduler._connections
    conn = connections.open("x.test", "a@x.test", None, limits, targets[0], starttls_for(targets[0], job))
    conn.session._link = SimpleNamespace(usable=True)  # type: ignore[assignment]
    change(conn)
    before(job_path)

    async def go() -> Item | None:
        waiting = asyncio.ensure_future(connections.wait_idle(conn, 5, lambda it: None))
        await asyncio.sleep(0)
        scheduler._offers.offer([KEY])
        if not conn.handoff.done():  # type: ignore[union-attr]
            conn.handoff.set_result(None)  # type: ignore[union-attr]
        return await waiting

    handed = asyncio.run(go())
    return handed, sorted(os.listdir(spool.active_dir("N1") / "TOSEND")), os.listdir(tmp_path / "TOSEND")


def test_a_waiting_job_offered_an_idle_connection_that_starts_it_at_once_is_claimed_straight_as_sending(tmp_path):
    handed, active, _ = _offered(tmp_path)
    assert handed is not None and handed.claimed.marked_sending
    assert active == ["A.FS.SENDING"]


def test_a_waiting_job_offered_an_idle_connection_that_owes_an_rset_is_only_claimed(tmp_path):
    def refused_last(conn: Connection) -> None:
        conn.session._reset_due = True

    handed, active, _ = _offered(tmp_path, refused_last)
    assert handed is not None and not handed.claimed.marked_sending
    assert active == ["A.FS"]


def test_a_waiting_job_claimed_as_sending_whose_file_changed_while_it_waited_goes_back_unsent(tmp_path):
    def readdressed(job_path: Path) -> None:
        job_path.write_text('$email_address b@x.test\n$email_text "hi"\n', encoding="utf-8")

    handed, active, folder = _offered(tmp_path, before=readdressed)
    assert handed is None
    assert active == [] and folder == ["A.FS"]


def test_when_a_waiting_job_goes_back_unsent_the_idle_connection_is_offered_to_the_next_at_once(tmp_path):
    def readdressed(job_path: Path) -> None:
        job_path.write_text('$email_address b@x.test\n$email_text "hi"\n', encoding="utf-8")

    handed, active, folder = _offered(tmp_path, before=readdressed, after=("B.FS",))
    assert handed is not None and handed.claimed.name == "B.FS" and handed.claimed.marked_sending
    assert active == ["B.FS.SENDING"] and folder == ["A.FS"]
