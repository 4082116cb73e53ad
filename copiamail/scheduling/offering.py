"""Who gets a freed slot: the slots of a key offered to the jobs that wait on
it (:class:`~.waiting.WaitingJobs` ranks them: folder priority, then
round-robin across domains, then name), the chosen job claimed and started;
and the offers made when a host's refusal pause or a key's suspension ends,
when a learned cap rises, and when another worker or node leaves room."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Iterable

from copiamail.errors import JobError
from copiamail.jobfile.fsfile import CommandFile
from copiamail.jobfile.job import Job
from copiamail.scheduling.carrying import as_planned, read_claimed
from copiamail.scheduling.choosing import Blocked, Chooser, Start
from copiamail.scheduling.connections import Connections
from copiamail.scheduling.limiter import Limiter
from copiamail.scheduling.results import ResultWriter
from copiamail.scheduling.routing import Item, Router
from copiamail.scheduling.scan import Scanner
from copiamail.scheduling.shaping import Shaping
from copiamail.scheduling.waiting import WaitEntry, WaitingJobs
from copiamail.spool.queue import Claimed, Spool


class Offers:
    """The offers of one scheduler (of node ``node``, over ``spool``), with
    its parts. ``start(choice, item)`` starts a claimed job where ``choice``
    says; ``dispatch(claimed, cf, job)`` decides afresh for one that cannot
    start as planned; ``stopping()``: whether the scheduler stops (no job is
    taken then)."""

    def __init__(self, spool: Spool, node: str, waiting: WaitingJobs, limiter: Limiter, results: ResultWriter,
                 router: Router, chooser: Chooser, scanner: Scanner, shaping: Shaping, connections: Connections,
                 start: Callable[[Start, Item], None],
                 dispatch: Callable[[Claimed, CommandFile | None, Job | None], None],
                 stopping: Callable[[], bool], clock: Callable[[], float]) -> None:
        self._spool = spool
        self._node = node
        self._waiting = waiting
        self._limiter = limiter
        self._results = results
        self._router = router
        self._chooser = chooser
        self._scanner = scanner
        self._shaping = shaping
        self._connections = connections
        self._start = start
        self._dispatch = dispatch
        self._stopping = stopping
        self._clock = clock

    def take(self, entry: WaitEntry, sending: bool = False) -> Claimed | None:
        """Claim a waiting job (``sending``: straight as sending, where it can);
        it stops waiting either way. A file being written in place, or held,
        is not claimed: a scan looks at it again later."""
        self._waiting.take(entry)
        w = entry.waiting
        if (not self._scanner.mine(entry.job.domain) or not self._scanner.complete(w.file)
                or self._shaping.held_by_operator(w.queue, w.name, entry.job.domain)):
            return None
        return self._spool.claim(w, self._node, sending)

    def offer(self, keys: Iterable[str], fill: bool = False) -> None:
        """Slots of ``keys`` freed: offer them to waiting jobs, the first by
        :meth:`WaitingJobs.rank` first (none while results are owed, nor a
        shared key this worker holds its half of while other workers' jobs
        wait on it); with ``fill`` (caps changed), each key again while it has room."""
        if self._results.paused:
            return
        pending = set(keys)
        while pending:
            heads = [(self._waiting.rank(h), k) for k in pending
                     if not self._limiter.leaves(k, self._waiting.cap(k)) and (h := self._waiting.head(k)) is not None]
            if not heads:
                return
            _, key = min(heads)
            pending.discard(key)
            before = self._limiter.in_use(key)
            self._offer_key(key)
            if fill and self._limiter.in_use(key) > before:
                pending.add(key)

    def unpaused(self, key: str) -> None:
        """A host's refusal pause, or a key's suspension, is over: offer it to
        every job that waited on it (their one offer)."""
        if self._results.paused and not self._stopping():  # results owed: no job is taken now; ask again later
            asyncio.get_running_loop().call_later(1.0, self.unpaused, key)
            return
        while not self._stopping() and (head := self._waiting.head(key)) is not None:
            self._offer_key(key)  # each call starts, claims or moves on at least one job ...
            if self._waiting.head(key) is head:
                break  # ... or it waits on the key again: the pause goes on, and its end offers it

    def ended(self, keys: Collection[str]) -> None:
        """Offer each of ``keys`` whose refusal pause or suspension has ended
        (a job may have come to wait on it after its end offered it)."""
        for key in self._router.ended_pauses(keys) + self._shaping.ended_suspensions(keys):
            self.unpaused(key)

    def room_elsewhere(self, wanted: Collection[str], waited: Iterable[str]) -> None:
        """Redis was read, or the workers' table changed: idle connections holding a slot of ``wanted`` (keys
        other nodes' or workers' jobs wait on) close; keys of ``waited`` (jobs here wait on) with room are offered."""
        for key in wanted:
            self._connections.close_one_holding(key)
        self.offer([k for k in waited if self._limiter.in_use(k) < self._waiting.cap(k)], fill=True)

    def cap_raised(self, key: str, cap: int) -> None:
        """An adaptive key's learned cap rose to ``cap``: its waiting jobs may start."""
        self._waiting.set_cap(key, cap)
        self.offer([key])

    def _offer_key(self, key: str) -> None:
        """A slot of ``key`` freed: offer it to the first waiting job that can use it."""
        passed_over: set[str] = set()
        while (entry := self._waiting.pop_head(key, passed_over)) is not None:
            targets = self._router.targets(entry.job, fresh=False)
            choice: Start | Blocked | None = None
            if targets is not None:
                try:
                    choice = self._chooser.choose(entry.job, targets)
                except JobError:
                    choice = None  # claimed below; dispatch fails it with the reason
            if isinstance(choice, Blocked):
                for limit in choice.limits:
                    self._waiting.wait_on(entry, limit.key, limit.cap)
                if self._limiter.in_use(key) >= self._waiting.cap(key):
                    return  # the slot is taken again
                # The slot is free but not for this job (the reserve, or another
                # of its limits): it goes to the next domain's job instead.
                passed_over.add(entry.job.domain)
                continue
            claimed = None
            # An idle connection of its domain that starts it at once: claimed
            # straight as sending, as the scan does.
            at_once = choice is not None and choice.reuse is not None and self._chooser.carries_at_once(choice.reuse)
            try:
                claimed = self.take(entry, at_once)
            finally:  # not claimed, even by an error: its slots go back (else the cap shrinks)
                if claimed is None and choice is not None and choice.reuse is None:
                    self._limiter.release(choice.limits)
            if claimed is None:
                continue
            if choice is None:
                self._dispatch(claimed, None, None)
                return
            if self._start_claimed(choice, claimed, entry.job):
                return
            # Handed back unsent: the slot (or the idle connection) is still
            # free, and goes to the next waiting job now, not at the next event.

    def _start_claimed(self, choice: Start, claimed: Claimed, planned: Job) -> bool:
        """Start ``claimed`` as ``choice`` planned it, or decide afresh where
        its file changed; False only where it went back to its folder unsent."""
        cf, job = read_claimed(self._spool, self._chooser.config, claimed)
        if cf is None or job is None or not as_planned(job, planned, self._clock()):
            # Unreadable, or its file changed while it waited: decide afresh.
            if choice.reuse is None:
                self._limiter.release(choice.limits)
            if claimed.marked_sending:
                # Only claimed after all, it must not count as sending: it
                # goes back, and a scan reads it again.
                self._results.hand_back(claimed)
                return False
            self._dispatch(claimed, cf, job)
            return True
        self._start(choice, Item(claimed, cf, job))
        return True
