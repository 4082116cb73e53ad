"""Moving domains between a drain's workers: the giver's side, with stand-ins
for its connections, waiting jobs, router, shaping and scanner; then a real
worker's drain (worker 0 a real Scheduler in this process, worker 1 played
through its own mapping of the owners' table)."""

from __future__ import annotations

import asyncio
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from copiamail.config import Config, RelayConfig
from copiamail.scheduling.domain_owners import DomainOwners
from copiamail.scheduling.handover import Handover
from copiamail.scheduling.limits import Limit
from copiamail.scheduling.scan import Scanner
from copiamail.scheduling.scheduler import Scheduler
from copiamail.scheduling.shared_slots import SharedSlots
from copiamail.spool.queue import Spool


@dataclass(eq=False)
class Conn:
    domain: str
    paces: bool = False
    target: str = "relay"
    limits: tuple[Limit, ...] = ()


@dataclass
class Parts:
    conns: list[Conn]
    paused_targets: set[str] = field(default_factory=set)
    retired: list[Conn] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    adaptive: None = None
    full_scan_due: bool = False
    hinted: bool = False
    forgot: int = 0

    # connections
    def __iter__(self):
        return iter(self.conns)

    def retire(self, conn: Conn) -> None:
        self.retired.append(conn)

    def serves(self, domain: str) -> bool:
        return any(c.domain == domain for c in self.conns)

    # waiting jobs
    def drop_domain(self, domain: str) -> None:
        self.dropped.append(domain)

    # router
    def paused(self, target: str) -> Limit | None:
        return Limit(f"pause:{target}", 0, "paused") if target in self.paused_targets else None

    def waits_for_route(self, domain: str) -> bool:
        return False

    # scanner
    def forget_others(self) -> None:
        self.forgot += 1


def handover(owners: DomainOwners, parts: Parts, worker: int = 0) -> Handover:
    return Handover(owners, worker, parts, parts, parts, parts, parts)  # type: ignore[arg-type]


def test_a_busy_worker_leaves_every_second_movable_domain_and_names_the_asker_once_its_connections_closed():
    owners = DomainOwners.create(2, entries=64)
    other = DomainOwners(os.dup(owners._fd), 2, entries=64)
    domains = ["a.test", "b.test", "c.test", "d.test", "e.test"]
    given = {d: owners.owner(d) for d in domains}
    parts = Parts([Conn("a.test"), Conn("a.test"), Conn("b.test", paces=True), Conn("c.test"),
                   Conn("d.test", target="paused-host"), Conn("e.test")], paused_targets={"paused-host"})
    giver = handover(owners, parts)
    giver.give_if_asked()
    assert owners.leaving() == {} and parts.retired == []  # nobody asks
    other.ask(1, True)
    giver.give_if_asked()
    # b paces and d's host is paused: they stay; of a, c and e the second leaves.
    assert owners.leaving() == {"c.test": 1}
    assert parts.retired == [parts.conns[3]] and parts.dropped == ["c.test"]
    assert not other.asking(1)  # the request is taken
    assert owners.owner("c.test") == 1  # this worker sends it no more
    generation = other.generation
    giver.closed("c.test")
    assert other.generation == generation  # its connection is still open
    parts.conns.remove(parts.conns[3])
    giver.closed("c.test")
    assert owners.leaving() == {} and other.generation == generation + 1
    other.forget()
    assert other.owner("c.test") == 1 and {d: other.owner(d) for d in domains if d != "c.test"} == {
        d: w for d, w in given.items() if d != "c.test"}
    assert giver.refresh() and parts.full_scan_due and parts.forgot == 1
    assert not giver.refresh()


def test_a_worker_with_one_movable_domain_keeps_it_and_leaves_the_request_open():
    owners = DomainOwners.create(2, entries=64)
    owners.owner("a.test")
    parts = Parts([Conn("a.test"), Conn("a.test")])
    owners.ask(1, True)
    handover(owners, parts).give_if_asked()
    assert owners.leaving() == {} and owners.asking(1)


def test_an_asking_worker_is_given_domains_or_ends_once_nobody_else_can_give():
    owners = DomainOwners.create(2, entries=64)
    owners.owner("a.test")
    other = DomainOwners(os.dup(owners._fd), 2, entries=64)
    scanner = Parts([])
    asker = handover(other, scanner, worker=1)

    async def given_while_asking() -> bool:
        asking = asyncio.ensure_future(asker.ask(lambda: False))
        await asyncio.sleep(0.02)
        assert owners.take_request(0) == 1
        owners.leave("a.test", 1)
        owners.move("a.test")
        return await asyncio.wait_for(asking, 5)

    assert asyncio.run(given_while_asking())
    assert scanner.full_scan_due
    scanner.full_scan_due = False  # the whole scan it asks for, made

    async def ended_when_the_other_asks_too() -> bool:
        owners.ask(0, True)
        return await asyncio.wait_for(asker.ask(lambda: False), 5)

    assert not asyncio.run(ended_when_the_other_asks_too())
    assert not owners.end_if_unanswered(1)  # it has ended: nothing of it is open


def test_a_worker_with_a_whole_scan_due_looks_before_it_asks():
    # A move seen during its last whole scan: its jobs may be this worker's,
    # so it scans again instead of waiting.
    owners = DomainOwners.create(2, entries=64)
    assert asyncio.run(handover(owners, Parts([], full_scan_due=True)).ask(lambda: False))
    assert not owners.asking(0)


def test_an_asking_worker_given_a_domain_new_to_the_node_goes_back_to_scanning():
    owners = DomainOwners.create(2, entries=64)
    other = DomainOwners(os.dup(owners._fd), 2, entries=64)  # worker 1's mapping
    parts = Parts([], hinted=True)  # files named for other workers' domains do not wake it

    async def given_while_asking() -> bool:
        asking = asyncio.ensure_future(handover(owners, parts).ask(lambda: False))
        await asyncio.sleep(0.05)
        assert owners.asking(0) and not asking.done()
        assert other.owner("new.test") == 0  # worker 1 meets a job of a new domain: worker 0's
        return await asyncio.wait_for(asking, 5)

    assert asyncio.run(given_while_asking())
    assert not owners.asking(0)  # its request is withdrawn: nobody gives to it meanwhile


def test_a_stopping_worker_stops_asking():
    owners = DomainOwners.create(2, entries=64)
    assert not asyncio.run(handover(owners, Parts([])).ask(lambda: True))
    assert not owners.asking(0)


# --- a real worker's drain -------------------------------------------------------


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _rig(tmp_path: Path):
    spool = Spool(tmp_path / "spool", 15, fsync=False)
    spool.ensure()
    owners = DomainOwners.create(2, entries=64)
    other = DomainOwners(os.dup(owners._fd), 2, entries=64)  # worker 1's mapping
    config = Config(spool=spool.root, relay=RelayConfig("127.0.0.1", _closed_port()), helo_name="test.example",
                    write_settle=0)
    sched = Scheduler(config, spool, "N1", worker=0, workers=2, shared=SharedSlots.create(), owners=owners)
    claimed: list[str] = []
    claim = spool.claim

    def recording_claim(job, node, sending=False):
        got = claim(job, node, sending)
        if got is not None:
            claimed.append(job.name)
        return got

    spool.claim = recording_claim  # type: ignore[method-assign]
    return spool, owners, other, sched, claimed


def _job(spool: Spool, queue: str, name: str, to: str) -> Path:
    tmp = spool.root / queue / (name[:-3] + ".TFS")
    tmp.write_text(f"$email_address {to}\n$email_text \"hi\"\n")
    path = spool.root / queue / name
    os.rename(tmp, path)
    return path


def test_a_job_of_its_own_domain_that_arrives_while_a_worker_asks_is_sent_before_the_drain_ends(tmp_path):
    spool, owners, other, sched, claimed = _rig(tmp_path)

    async def main() -> None:
        run = asyncio.ensure_future(sched.run(drain=True))
        # Worker 0 finds nothing and asks for domains; worker 1 is busy.
        for _ in range(200):
            await asyncio.sleep(0.01)
            if owners.asking(0):
                break
        assert owners.asking(0)
        # Worker 1's scan meets a new domain first and gives it to worker 0
        # (fewest domains); the watcher names the file to every worker.
        assert other.owner("late.test") == 0
        path = _job(spool, "TOSEND", "LATE.FS", "u@late.test")
        sched.hint(path)
        sched.request_scan()  # even a whole scan asked for is not made
        await asyncio.sleep(0.5)
        # Worker 1 ends its own work (seconds or minutes later) and asks too.
        other.ask(1, True)
        await asyncio.wait_for(run, 10)

    asyncio.run(main())
    assert "LATE.FS" in claimed, f"drain ended with {sorted(os.listdir(spool.root / 'TOSEND'))} in TOSEND"


def test_a_domain_moved_here_while_its_last_whole_scan_ran_is_scanned_before_it_asks(tmp_path, monkeypatch):
    spool, _owners, other, sched, claimed = _rig(tmp_path)
    assert other.owner("x.test") == 0 and other.owner("e.test") == 1  # e.test: worker 1's
    _job(spool, "TOSEND", "E1.FS", "u@e.test")
    _job(spool, "TOSEND1", "T.FS", "u@e.test")
    consider = Scanner._consider

    def consider_then_move(self, w, now, unknown_recent=False):
        if w.name == "T.FS" and other.leaving():
            # Worker 1 had left e.test to worker 0 (an earlier request); its
            # last connection of e.test closes now, while worker 0's whole
            # scan is past E1.FS.
            other.move("e.test")
        return consider(self, w, now, unknown_recent)

    other.leave("e.test", 0)
    monkeypatch.setattr(Scanner, "_consider", consider_then_move)

    async def main() -> None:
        run = asyncio.ensure_future(sched.run(drain=True))
        await asyncio.sleep(1.0)
        other.ask(1, True)  # worker 1 is done with its own domains
        await asyncio.wait_for(run, 10)

    asyncio.run(main())
    assert not other.leaving()
    left = sorted(os.listdir(spool.root / "TOSEND")) + sorted(os.listdir(spool.root / "TOSEND1"))
    assert sorted(claimed) == ["E1.FS", "T.FS"], f"drain ended with {left} unsent"
