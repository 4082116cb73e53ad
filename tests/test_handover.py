"""Moving domains between a drain's workers (the giver's side, with stand-ins
for its connections, waiting jobs, router, shaping and scanner)."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field

from copiamail.scheduling.domain_owners import DomainOwners
from copiamail.scheduling.handover import Handover
from copiamail.scheduling.limits import Limit


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
    asker = handover(other, Parts([]), worker=1)

    async def given_while_asking() -> bool:
        asking = asyncio.ensure_future(asker.ask(lambda: False))
        await asyncio.sleep(0.02)
        assert owners.take_request(0) == 1
        owners.leave("a.test", 1)
        owners.move("a.test")
        return await asyncio.wait_for(asking, 5)

    assert asyncio.run(given_while_asking())

    async def ended_when_the_other_asks_too() -> bool:
        owners.ask(0, True)
        return await asyncio.wait_for(asker.ask(lambda: False), 5)

    assert not asyncio.run(ended_when_the_other_asks_too())
    assert not owners.end_if_unanswered(1)  # it has ended: nothing of it is open


def test_a_stopping_worker_stops_asking():
    owners = DomainOwners.create(2, entries=64)
    assert not asyncio.run(handover(owners, Parts([])).ask(lambda: True))
    assert not owners.asking(0)
