"""Which due job goes next, over which connection, and who gets a freed slot.

The loop: scan the TOSEND folders in queue order (on start, on a watcher
wake-up, on a timer, and when a retry falls due; :mod:`.scan`). Each due job
is claimed and then either

- handed to an idle open connection for its domain and binding,
- started on a new connection to the first place :mod:`.routing` names for it
  (the relay, or the domain's mail hosts by preference) where every limit that
  applies has room (:class:`~.limits.Scopes`; the slots are taken all or none,
  :mod:`.limiter`), trying the bindings of its group least loaded first, or
- deferred: written back to its own folder with DOMAINBUSY_COUNT incremented,
  and remembered as *waiting* on the limits that were full.

A waiting job is not taken up by later scans. It is offered a slot when one
frees (:mod:`.offering`; :mod:`.waiting` says which job gets it: folder
priority, then round-robin across domains, then name). A connection that
finishes a message carries the next waiting job of its domain unless a job of
another domain that waits on one of its slots comes first; then it closes and
its slots go there.
So a job is deferred about once per wait, one domain cannot starve another,
and nothing polls. A periodic scan still checks waiting jobs, so a lost
wake-up costs one scan interval, not a stuck job.

Direct delivery: a job whose domain's route is not known yet waits (claimed)
for one MX lookup per domain; a DNS failure is a class D attempt. Attempts and
their results: :mod:`.attempts`, :mod:`.results`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections.abc import Callable
from pathlib import Path

from copiamail.config import Config, read_password
from copiamail.errors import DeliveryError, JobError
from copiamail.jobfile.fsfile import CommandFile
from copiamail.jobfile.job import Job, parse_job
from copiamail.scheduling.attempts import Attempts
from copiamail.scheduling.carrier import Carrier, Ending
from copiamail.scheduling.carrying import NextJobs
from copiamail.scheduling.choosing import Blocked, Chooser, Start
from copiamail.scheduling.cluster import ClusterLimiter, cluster_limiter
from copiamail.scheduling.connections import Connection, Connections, starttls_for
from copiamail.scheduling.domain_owners import DomainOwners
from copiamail.scheduling.handover import Handover
from copiamail.scheduling.limiter import Limiter, LocalLimiter
from copiamail.scheduling.limits import is_cluster_key
from copiamail.scheduling.offering import Offers
from copiamail.scheduling.publishing import publish_live_state
from copiamail.scheduling.results import ResultWriter, Stats
from copiamail.scheduling.routing import Item, Router
from copiamail.scheduling.scan import Scanner
from copiamail.scheduling.shaping import Shaping
from copiamail.scheduling.shared_slots import SharedSlots
from copiamail.scheduling.waiting import WaitEntry, WaitingJobs
from copiamail.smtp.startup import machine_helo_name
from copiamail.spool.queue import Claimed, QueuedJob, Spool

__all__ = ["Scheduler", "Stats"]

log = logging.getLogger("copiamail")


def _say_if_failed(task: asyncio.Task[None], what: str) -> None:
    if not task.cancelled() and (error := task.exception()) is not None:
        log.error("the %s task stopped: %s: %s", what, type(error).__name__, error)


def _say_failures(tasks: dict[asyncio.Task[None] | None, str]) -> None:
    """Log each of a run's background ``tasks`` (with what it does) that ends
    by an error, when it ends: the run collects them only at its own end,
    and quietly."""
    for task, what in tasks.items():
        if task is not None:
            task.add_done_callback(functools.partial(_say_if_failed, what=what))


async def _wait_for_wake(wake: asyncio.Event, timeout: float, sleep_on: Callable[[], bool]) -> None:
    """Wait up to ``timeout`` seconds for ``wake`` to be set; when it is and
    ``sleep_on()`` says so, clear it and wait on (a wake-up that changes nothing)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            await asyncio.wait_for(wake.wait(), deadline - time.monotonic())
        except TimeoutError:
            return
        if not sleep_on():
            return
        wake.clear()


class Scheduler:
    """One node's scheduling loop over one spool (or one worker's part of it).
    It chooses a binding and limits for each job, starts, reuses and closes
    connections, defers jobs, and shuts down; finding due jobs, offering freed
    slots, routes, attempts, results and counting slots are the parts'
    (:mod:`copiamail.scheduling`)."""

    def __init__(
        self,
        config: Config,
        spool: Spool,
        node: str,
        password: str | None = None,
        clock: Callable[[], float] = time.time,
        on_event: Callable[[str, str], None] | None = None,
        worker: int = 0, workers: int = 1,
        limiter: Limiter | None = None,
        shared: SharedSlots | None = None,
        owners: DomainOwners | None = None,
    ) -> None:
        """``worker`` of ``workers``: this scheduler sends only the jobs of the
        domains ``owners`` (the node's table of domain owners) gives it, and
        counts shared caps in ``shared``, the node's workers' table.
        ``limiter``: None for a :class:`LocalLimiter`."""
        if workers > 1 and shared is None and limiter is None:
            raise ValueError("workers of one node need the table of shared slots")
        self.config = config
        self.spool = spool
        self.node = node
        self.clock = clock
        self.stopping = False
        self._wake = asyncio.Event()  # set to wake run()'s loop (each run makes its own)
        if limiter is None and config.cluster is not None:
            limiter = cluster_limiter(config.cluster, read_password(config, "cluster"), node, worker, shared)
        limiter = limiter if limiter is not None else LocalLimiter(shared, worker)
        cluster = limiter if isinstance(limiter, ClusterLimiter) else None
        self._shaping = Shaping(config, spool, node, worker, workers, lambda key: self._offers.unpaused(key), clock)
        self._waiting = WaitingJobs()
        self._results = ResultWriter(spool, node, on_event)
        # Once, at start: machine_helo_name() may ask DNS (an EHLO name is an
        # FQDN, else each connection's address literal, never a bare host name).
        self._connections = Connections(self._shaping.scopes, limiter, config.smtp_timeout,
                                        config.helo_name or machine_helo_name(), config.smtp_chunking)
        self._router = Router(config, password, read_password(config, "retry_relay"), clock=clock,
                              on_learned=self._connections.learned_host, on_routed=self._routed,
                              on_unpaused=lambda key: self._offers.unpaused(key), shared=shared)
        chooser = Chooser(config, self._connections, self._router, self._shaping, limiter)
        self._scanner = Scanner(config, spool, node, self._waiting, self._halted, self._dispatch, worker=worker,
                                workers=workers, owners=owners, clock=clock, held_until=self._shaping.job_held_until,
                                rides_at_once=chooser.rides_at_once, hand_back=self._results.hand_back)
        attempts = Attempts(config, spool, node, self._router, worker, clock, self._connections.greeted_sharing,
                            self._shaping.adaptive, self._shaping.pacer, cluster,
                            lambda key, cap: self._offers.cap_raised(key, cap))
        self._offers = Offers(spool, node, self._waiting, limiter, self._results, self._router, chooser, self._scanner,
                              self._shaping, self._connections, self._start, self._dispatch, lambda: self.stopping, clock)
        next_jobs = NextJobs(chooser, spool, self._waiting, self._router, self._shaping, self._offers.take, self._dispatch,
                             clock, self._results.hand_back)
        self._carrier = Carrier(attempts, self._results, next_jobs, self._connections, cluster,
                                self._halted, lambda: self.stopping)
        self._handover = None if owners is None or workers < 2 else Handover(
            owners, worker, self._connections, self._waiting, self._router, self._shaping, self._scanner)

    @property
    def limiter(self) -> Limiter:
        """What counts the slots of every limit (the chooser's, which takes them)."""
        return self._carrier.next_jobs.chooser.limiter

    @property
    def _cluster(self) -> ClusterLimiter | None:
        """The limiter, when it holds cluster-wide limits in Redis."""
        return self.limiter if isinstance(self.limiter, ClusterLimiter) else None

    @property
    def stats(self) -> Stats:
        """What this scheduler did so far."""
        return self._results.stats

    # --- public --------------------------------------------------------------

    def wake(self) -> None:
        """Look again at what can be done (a send ended, a lookup finished)."""
        self._wake.set()

    def hint(self, path: str | Path, written: bool = False) -> None:
        """A file appeared or changed at ``path`` (from the watcher, via the
        loop): look at that one file, not the whole spool. ``written``: it was
        written in place rather than renamed in, so it may still be
        incomplete and waits until left alone for ``write_settle`` seconds."""
        if self._scanner.hint(path, written):
            self.wake()

    def request_scan(self) -> None:
        """Scan every TOSEND folder soon (jobs came back from a dead peer)."""
        self._scanner.full_scan_due = True
        self.wake()

    def reconfigure(self, config: Config) -> None:
        """Use ``config`` from now on (SIGHUP): new connections take their limits from it, open ones over a
        lowered cap retire (:meth:`Connections.reconfigure`); what is settled at start stays (spool, relays ...)."""
        self.config = config
        self._shaping.reconfigure(config)
        self._connections.reconfigure(self._shaping.scopes)
        self._router.reconfigure(config)
        self._scanner.reconfigure(config)
        self._carrier.next_jobs.config = config
        self._carrier.attempts = dataclasses.replace(self._carrier.attempts, config=config)
        self._offers.offer(self._waiting.keys(), fill=True)  # under the new caps: a raised one starts jobs now
        self.wake()

    def request_stop(self) -> None:
        """Take no new job; in-flight sends get shutdown_grace seconds."""
        self.stopping = True
        self.wake()

    async def run(self, drain: bool = False) -> Stats:
        """Run until :meth:`request_stop`, or with ``drain`` until no job is due
        and none is in flight. Then take no new job, give in-flight sends up to
        ``shutdown_grace`` seconds, and hand the rest back to their folders.

        The whole spool is scanned at start, every ``scan_interval`` and when a
        retry falls due; in between, only the files the watcher names are
        looked at, so the cost of a wake-up does not grow with the backlog."""
        self._wake = asyncio.Event()  # an event waits in one event loop only: this run's
        self._shaping.settle_suspects = not drain  # a drain sends everything due, and then it ends
        # A drain's last connection going idle is the moment to look whether it is done.
        self._connections.on_idle = self.wake if drain else None
        self._results.start()
        loop = asyncio.get_running_loop()
        publisher = loop.create_task(publish_live_state(self.spool.root, self.node, self._carrier.attempts.worker,
            self._connections, lambda: self.stats, self._carrier.attempts.transactions, self.clock))
        cluster, limiter = self._cluster, self.limiter
        leases = None if cluster is None else loop.create_task(cluster.run(
            self._waiting.waited_on, lambda: self._offers.room_elsewhere(
                cluster.cluster_wanted_elsewhere, [k for k in self._waiting.waited_on() if is_cluster_key(k)]),
            self._connections.lease_lost))
        shared = None if not isinstance(limiter, LocalLimiter) else loop.create_task(limiter.watch_shared(
            self._waiting.waits_on, lambda: self._offers.room_elsewhere(limiter.wanted_elsewhere, limiter.waited_in_table),
            self._connections.greeted_by_shared_key))
        handover = self._handover
        giving = None if handover is None or not drain else loop.create_task(handover.watch(self.wake))
        _say_failures({publisher: "live state", leases: "cluster leases", shared: "shared caps", giving: "handover"})
        await self._router.learn_host_names_or_warn()
        scanner = self._scanner
        next_full = 0.0
        try:
            while not self.stopping:
                self._wake.clear()
                scanner.hint_settled()
                full = scanner.full_scan_due or time.monotonic() >= next_full
                if full:
                    scanner.start_full()
                    found = await self._scan()
                    next_full = time.monotonic() + self.config.scan_interval
                else:
                    found = await scanner.scan_hinted()
                ending = (drain and not found and not len(self._waiting) and not self._router.looking_up
                          and not scanner.busy and not self._results.busy)
                if ending:
                    if not full:
                        # Finish only after a whole scan has found nothing left.
                        scanner.full_scan_due = True
                        continue
                    if not self._connections:
                        # Another worker may still give this one domains.
                        if handover is None or not await handover.ask(lambda: self.stopping):
                            break
                        continue
                    # Nothing left to send: a connection whose last reply
                    # comes now closes at once, not connection_idle later (the
                    # drain ends when the last one has closed).
                    self._connections.linger = False
                    self._connections.close_idle()
                else:
                    self._connections.linger = True
                if scanner.next_due is not None:
                    next_full = min(next_full, time.monotonic() + max(0.01, scanner.next_due - self.clock()))
                timeout = min(next_full, scanner.next_settle_look()) - time.monotonic()
                if timeout > 0 and not scanner.hinted and not scanner.full_scan_due:
                    await self._woken(self._wake, timeout, until_closed=ending)
                if ending and not self._connections:
                    continue  # the last connection has closed: nothing is left to settle
                # Let a burst of watcher events and finishing sends settle into one pass.
                await asyncio.sleep(0.01)
        finally:
            await self._shutdown()
            if handover is not None:
                handover.end()
            for task in (publisher, leases, shared, giving):
                if task is not None:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
            if self._cluster is not None:
                await self._cluster.close()
        return self.stats

    async def _woken(self, wake: asyncio.Event, timeout: float, until_closed: bool) -> None:
        """Wait up to ``timeout`` seconds for :meth:`wake` (``wake``: the run's
        event). ``until_closed`` (a drain with nothing left to send, its
        connections closing): wait on until the last has closed, a file is
        hinted, a whole scan is asked for, or the node stops; each closing
        wakes the loop, and a pass for each would look at the whole spool again
        for nothing."""
        scanner = self._scanner
        await _wait_for_wake(wake, timeout, lambda: until_closed and bool(self._connections) and not scanner.hinted
                             and not scanner.full_scan_due and not self.stopping)

    def _halted(self) -> bool:
        """Whether to take no new job: stopping, or results are owed."""
        return self.stopping or self._results.paused

    async def _scan(self) -> int:
        """Start or defer every due job in the spool not already waiting;
        returns how many were taken up (with results owed: how many)."""
        now = self.clock()
        results = self._results
        if results.paused:
            results.pay_owed()
            if results.paused:
                return results.owed
        self._router.retry_host_names()
        found, seen = await self._scanner.scan(now)
        # The safety net for a lost wake-up: drop waiting jobs whose file is
        # gone, and offer any key that has room.
        self._waiting.drop_missing(seen)
        self._offers.offer(self._waiting.keys_with_room(self.limiter.in_use))
        self._offers.ended(self._waiting.waited_on())
        if results.parked:
            results.finish_parked()
        return found

    # --- dispatch ------------------------------------------------------------

    def _dispatch(self, claimed: Claimed, cf: CommandFile | None = None, job: Job | None = None,
                  ride: Connection | None = None) -> None:
        """Send, hand off, look up or defer a job this node has just claimed
        (``cf`` and ``job``: its text and meaning, when already read; ``ride``:
        the idle connection the scan chose for it, as it claimed it)."""
        if cf is None:
            try:
                cf = self.spool.read(claimed)
            except OSError as e:
                log.error("%s: cannot read claimed job: %s", claimed.path, e.strerror)
                return
        try:
            job = job if job is not None else parse_job(cf, claimed.name, self.config.job_env)
        except JobError as e:
            self._results.write(self._carrier.attempts.bad_job(claimed, cf, e))
            return
        if not self._scanner.mine(job.domain) or not job.is_due(self.clock()):
            # Its file changed while it waited here: to another worker's
            # domain (that worker's limits count it), or to a later time.
            self._results.hand_back(claimed)
            return
        if ride is not None:
            # Chosen a moment ago, with no turn of the event loop since: still
            # idle. Not chosen again: a route that expired meanwhile would send
            # a job claimed as sending to a look-up.
            self._start(Chooser.riding(ride), Item(claimed, cf, job))
            return
        self._route(Item(claimed, cf, job))

    def _route(self, item: Item, after_lookup: bool = False) -> None:
        targets = self._router.targets(item.job, not after_lookup, item.tried)
        if targets is None:
            self._router.look_up(item)
            return
        try:
            choice = self._carrier.next_jobs.chooser.choose(item.job, targets)
        except JobError as e:
            self._results.write(self._carrier.attempts.bad_job(item.claimed, item.cf, e, item.job))
            return
        if isinstance(choice, Blocked):
            self._defer(item, choice)
        else:
            self._start(choice, item)

    def _routed(self, items: list[Item], error: DeliveryError | None) -> None:
        """The route lookup these jobs waited for ended (``error``: it failed)."""
        for item in items:
            try:
                if self._halted() or not self._scanner.mine(item.job.domain):
                    self._results.hand_back(item.claimed)
                elif error is not None:
                    self._results.write(self._carrier.attempts.lookup_failed(item, error))
                else:
                    self._route(item, after_lookup=True)
            except Exception:
                log.exception("%s: cannot route the job; handing it back", item.claimed.name)
                self._results.hand_back(item.claimed)
        if self._handover is not None:
            self._handover.closed(*{item.job.domain for item in items})
        self.wake()

    def _start(self, choice: Start, item: Item) -> None:
        self._waiting.served(item.job.domain)
        if choice.reuse is not None:
            assert choice.reuse.handoff is not None
            choice.reuse.handoff.set_result(item)
            return
        assert choice.target is not None
        conn = self._connections.open(item.job.domain, item.job.address, choice.binding, choice.limits, choice.target,
                                      starttls_for(choice.target, item.job))
        conn.task = asyncio.get_running_loop().create_task(self._run_connection(conn, item))

    def _defer(self, item: Item, blocked: Blocked) -> None:
        self._results.defer(item.claimed, item.cf, item.job, item.busy_reply, lambda path: self._deferred(item, blocked, path))

    def _deferred(self, item: Item, blocked: Blocked, path: Path | None) -> None:
        """A deferred job is back in its folder, at ``path``: it waits for a slot."""
        self.wake()
        if path is None or self.stopping or not self._scanner.mine(item.job.domain):
            return  # (another worker's now: its scan finds the file)
        claimed = item.claimed
        w = QueuedJob(self.spool.priority(claimed.queue), claimed.queue, path.name, str(path))
        # Only what scheduling needs is kept: a large backlog costs little memory.
        self._waiting.add(WaitEntry(w, item.job.without_content()), [(l.key, l.cap) for l in blocked.limits])
        for limit in blocked.limits:
            self._connections.close_one_holding(limit.key, other_than=item.job.domain)
        # While its deferral was being written a slot may have freed, a connection of its
        # domain gone idle, or the pause or suspension it met ended: it is offered them now.
        keys = [l.key for l in blocked.limits]
        free = [k for k in keys if self.limiter.in_use(k) < self._waiting.cap(k)]
        if free or self._connections.idle_of(item.job.domain):
            self._offers.offer(free or keys)
        self._offers.ended(keys)

    # --- connections ---------------------------------------------------------

    async def _run_connection(self, conn: Connection, item: Item | None) -> None:
        """Carry jobs over one connection until none is left for it
        (:class:`~.carrier.Carrier`); then give back its lease and slots, and
        send on what it could not carry."""
        end = Ending()
        try:
            await self._carrier.carry(conn, item, end)
        finally:
            self._connections.closed(conn)
            if conn.lease is not None and self._cluster is not None:
                self._cluster.give_back(conn.lease)
            if end.refused is not None:
                self._defer(end.refused[0], Blocked((end.refused[1],)))
            for elsewhere in end.elsewhere:
                if self._halted() or not self._scanner.mine(elsewhere.job.domain):
                    self._results.hand_back(elsewhere.claimed)
                else:
                    self._route(elsewhere, after_lookup=True)
            if not self.stopping:
                self._offers.offer([l.key for l in conn.limits])
            if self._handover is not None:
                self._handover.closed(conn.domain)
            self.wake()

    # --- shutdown ------------------------------------------------------------

    async def _shutdown(self) -> None:
        self.stopping = True
        self._connections.close_idle()
        for item in await self._router.close():
            self._results.hand_back(item.claimed)
        tasks = self._connections.tasks()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=self.config.shutdown_grace)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await self._results.close(self.config.shutdown_grace)
