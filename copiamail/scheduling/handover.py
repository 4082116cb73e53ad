"""A drain's workers finish together: domains move from a busy worker to an idle one.

Each domain belongs to one worker (:mod:`~copiamail.scheduling.domain_owners`),
so when the workers of a drain go at different speeds (one shares its CPU with
the SMTP server, or with the other's syncer), the one ahead used to end while
the other still sent the rest of its domains alone. Now the worker that has
nothing left (no job found, none waiting, no connection open) asks for
domains, and a worker still sending several gives it every second one of
those it has connections to:

1. the giver takes the request and *leaves* those domains in its own process:
   from this instant its scan treats their files as another worker's, its
   waiting jobs of them are dropped (their files are in their folders, for the
   new worker's scan), a job of theirs it had claimed but not started goes
   back to its folder, and their connections close after the message they
   carry (at once when idle);
2. once the giver's last connection of such a domain has closed (and no job of
   it waits for a route lookup), it writes the new worker into the table,
   which raises the table's generation;
3. every worker that sees the generation change reads the table afresh and
   scans the whole spool again: the new worker finds the domain's files and
   opens its connections under its own limits.

A domain's connections are therefore never open in two workers at once, and
its ``$domain_limit`` holds for the node throughout. Only domains that carry
nothing a worker learns or keeps move: none whose limit is adaptive (learned
caps and suspensions live in their worker), that paces its messages, or whose
mail host has paused after a refusal. A worker ends once its request is
still open and every other worker has ended or asks as well. Outside a drain
nobody asks: a running node's domains stay where they were given.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from copiamail.scheduling.connections import Connection, Connections
from copiamail.scheduling.domain_owners import DomainOwners
from copiamail.scheduling.limits import adaptive_limit
from copiamail.scheduling.routing import Router
from copiamail.scheduling.scan import Scanner
from copiamail.scheduling.shaping import Shaping
from copiamail.scheduling.waiting import WaitingJobs

# How often (seconds) a worker that asked looks whether it was given domains,
# and a busy worker whether another asks: the handover's delay, against a
# few hundred wake-ups a second of an event loop that is otherwise waiting.
POLL = 0.005


class Handover:
    """The moves of domains for worker ``worker`` (see the module's docstring),
    over the node's table ``owners`` and this worker's parts."""

    def __init__(self, owners: DomainOwners, worker: int, connections: Connections, waiting: WaitingJobs,
                 router: Router, shaping: Shaping, scanner: Scanner) -> None:
        self._owners = owners
        self._worker = worker
        self._connections = connections
        self._waiting = waiting
        self._router = router
        self._shaping = shaping
        self._scanner = scanner
        self._seen = owners.generation

    def refresh(self) -> bool:
        """Whether the table changed since the last look; if so, this worker's
        copy of it and its scanner's notes on other workers' files are dropped
        and a whole scan is due."""
        generation = self._owners.generation
        if generation == self._seen:
            return False
        self._seen = generation
        self._owners.forget()
        self._scanner.forget_others()
        self._scanner.full_scan_due = True
        return True

    def give_if_asked(self) -> None:
        """If another worker asks for domains and this one sends two or more
        that may move, leave every second of them to it."""
        if not self._owners.asked_by_others(self._worker):
            return
        movable = sorted({c.domain for c in self._connections} - self._owners.leaving().keys() - self._unmovable())
        if len(movable) < 2:
            return
        to = self._owners.take_request(self._worker)
        if to is None:
            return
        for domain in movable[1::2]:
            self._owners.leave(domain, to)
            self._waiting.drop_domain(domain)
            for conn in [c for c in self._connections if c.domain == domain]:
                self._connections.retire(conn)
            self.closed(domain)

    def closed(self, *domains: str) -> None:
        """A connection of each of ``domains`` closed (or their jobs were
        routed): a domain this worker is leaving with nothing of it left open
        here goes to its next worker in the table now."""
        leaving = self._owners.leaving()
        for domain in domains:
            if (domain in leaving and not self._connections.serves(domain)
                    and not self._router.waits_for_route(domain)):
                self._owners.move(domain)

    async def watch(self, wake: Callable[[], None]) -> None:
        """Until cancelled (a drain's task): give domains when another worker
        asks, and ``wake`` the worker's loop when the table changed (the loop
        waits on its own events, which a move is not)."""
        while True:
            await asyncio.sleep(POLL)
            if self.refresh():
                wake()
            self.give_if_asked()

    async def ask(self, stopping: Callable[[], bool]) -> bool:
        """This worker has nothing left: ask for domains. True once there is
        something to look at again (domains given to it or moved, or the
        table changed since its last whole scan: scan again), False when
        nothing can come (every other worker has ended or asks too; then this
        worker has ended) or the node stops. A domain given to a worker that
        asks raises the table's generation (:mod:`domain_owners`), so a job
        that arrives for a domain new to the node wakes it; files the watcher
        names for other workers' domains do not."""
        # The generation is read before the request is made: every move for
        # this request raises it past that, whichever refresh notices it.
        self.refresh()
        before = self._seen
        scanner = self._scanner
        if scanner.full_scan_due:
            # A move seen by the watch's refresh during the last whole scan:
            # its jobs may be this worker's; look first.
            return True
        self._owners.ask(self._worker, True)
        while not stopping():
            # The table may change under the watch's refresh as well as this one's.
            self.refresh()
            if self._seen != before or scanner.full_scan_due:
                self._owners.ask(self._worker, False)
                return True
            if self._owners.end_if_unanswered(self._worker):
                return False
            await asyncio.sleep(POLL)
        self._owners.ask(self._worker, False)
        return False

    def end(self) -> None:
        """This worker stops: every domain it was leaving goes to its next
        worker now (its connections have all closed), and it takes no more."""
        for domain in self._owners.leaving():
            self._owners.move(domain)
        self._owners.end(self._worker)

    def _may_move(self, conn: Connection) -> bool:
        """Whether nothing of ``conn``'s domain is learned or kept by this
        worker alone: no adaptive limit, no message rate, no paused host."""
        return (not conn.paces and self._router.paused(conn.target) is None
                and (self._shaping.adaptive is None or adaptive_limit(conn.limits) is None))

    def _unmovable(self) -> set[str]:
        """Domains that must stay: some connection of theirs may not move, or
        they have no entry of their own in the table."""
        return {c.domain for c in self._connections
                if not self._may_move(c) or not self._owners.movable(c.domain)}
