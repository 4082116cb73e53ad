"""copiamail.scheduling.choosing: whether a job would ride an idle connection
at once, so that its transaction starts as it is dispatched (the scan then
claims it straight as sending). Connections are made but never opened; a
session past its greeting is stood in for by a usable link."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest

from copiamail.config import Config, RelayConfig
from copiamail.jobfile.fsfile import CommandFile
from copiamail.jobfile.job import Job, parse_job
from copiamail.scheduling.choosing import Chooser
from copiamail.scheduling.connections import Connection, starttls_for
from copiamail.scheduling.limits import Limit, Pace
from copiamail.scheduling.scheduler import Scheduler
from copiamail.spool.queue import Spool

RELAYED = Config(relay=RelayConfig("192.0.2.1"))


def job(domain: str = "a.test") -> Job:
    return parse_job(CommandFile.parse(f"$email_address u@{domain}\n$email_text hi\n".encode()), "J.FS")


def rides(change: Callable[[Connection], None] = lambda conn: None, domain: str = "a.test",
          config: Config = RELAYED) -> bool:
    """Whether a job of ``domain`` rides at once, with one connection of
    a.test open, greeted and idle, after ``change`` to it."""
    scheduler = Scheduler(config, Spool(Path("/nonexistent"), 15, False), "N1")
    chooser: Chooser = scheduler._carrier.next_jobs.chooser
    connections = scheduler._connections
    target = scheduler._router.targets(job())
    assert target is not None
    limits = scheduler._shaping.scopes.limits("u@a.test", "a.test", None, target[0].ips, target[0].names)
    assert scheduler.limiter.try_acquire(limits) is None
    conn = connections.open("a.test", "u@a.test", None, limits, target[0], starttls_for(target[0], job()))
    conn.session._link = SimpleNamespace(usable=True)  # type: ignore[assignment]
    change(conn)

    async def go() -> bool:
        waiting = asyncio.ensure_future(connections.wait_idle(conn, 5, lambda it: None))
        await asyncio.sleep(0)
        try:
            return chooser.rides_at_once(job(domain)) is conn
        finally:
            conn.handoff.set_result(None)  # type: ignore[union-attr]
            await waiting

    return asyncio.run(go())


def test_a_job_rides_at_once_an_idle_greeted_connection_of_its_domain():
    assert rides()


def _not_greeted(conn: Connection) -> None:
    conn.session._link = None


def _owes_an_rset(conn: Connection) -> None:
    conn.session._reset_due = True  # its last message was refused


def _carried_its_last(conn: Connection) -> None:
    conn.session.messages = conn.max_messages


def _keeps_a_rate(conn: Connection) -> None:
    conn.paces = (Pace("rate:a.test", 1.0, "domain"),)


@pytest.mark.parametrize("change", [
    pytest.param(_not_greeted, id="its session is not open: it would connect first"),
    pytest.param(_owes_an_rset, id="its last message was refused: it sends RSET first"),
    pytest.param(_carried_its_last, id="it has carried its messages per connection: it would reopen first"),
    pytest.param(_keeps_a_rate, id="it keeps a message rate: it may wait first"),
])
def test_a_job_does_not_ride_at_once_when(change):
    assert not rides(change)


def test_a_job_of_another_domain_does_not_ride_at_once():
    assert not rides(domain="b.test")


def test_a_job_does_not_ride_at_once_a_connection_whose_limit_learns_under_adaptive():
    # A learned rate or a learned number of messages per connection may make
    # the job wait, or the connection reopen, before its transaction.
    def learns(conn: Connection) -> None:
        conn.limits = (*conn.limits, Limit("domain:a.test", 2, "domain", ceiling=2))

    assert rides(learns)
    assert not rides(learns, config=dataclasses.replace(RELAYED, adaptive=True))
