"""Writing jobs' results: batched, made durable by the syncer, and counted.

A result is a job's next version and where it goes: SENT, FAIL, or back to its
own folder (a retry later, its alternative address, a deferral). The results
made in one turn of the event loop are written together, 64 at most to a
batch (:meth:`ResultWriter.write`): one wait for the disk serves them all. Their fsyncs go to the syncer process
(:mod:`copiamail.spool.syncer`), one batch at a time, while the event loop goes
on; results made meanwhile wait for the next batch. Without a syncer (fsync
off, or the syncer lost) the fsyncs are made here. Until its result is
committed a job stays claimed (or marked delivered) in ACTIVE.

When a result cannot be written (a full disk), it is *owed*: kept in memory,
the node takes no new job (:attr:`ResultWriter.paused`), and the next full scan
writes it again (:meth:`ResultWriter.pay_owed`), so a delivered job is not sent
again and nothing is lost. A result committed but not moved out of ACTIVE is
*parked*: it is moved at the next scan, or at the node's next start.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from copiamail.jobfile import records
from copiamail.jobfile.fsfile import CommandFile
from copiamail.jobfile.job import Job
from copiamail.logs import OUTCOMES, log_fields
from copiamail.osutil import journal_in_order
from copiamail.spool.queue import Claimed, DeliveredMark, Destination, ResultBatch, Spool
from copiamail.spool.syncer import Syncer

log = logging.getLogger("copiamail")

# Results written at once, at most: each holds a file open until it is
# committed, so however many jobs a scan defers in one turn of the loop, the
# node's open files stay bounded. (A delivered job's result holds its file
# from the server's 250 on: at most two a connection.)
_MAX_BATCH = 64
outcomes = logging.getLogger(OUTCOMES)  # deliveries and deferrals: shown from -v on


class Tally(StrEnum):
    """What a node counts (:class:`Stats`); the value is also the kind of the
    event ``on_event`` reports."""

    SENT = "sent"
    FAILED = "failed"
    RETRIED = "retried"  # back to its folder: a retry later, or its alternative address
    DEFERRED = "deferred"
    HANDED_BACK = "handed_back"


@dataclass
class Stats:
    """What a node (or one of its workers) did."""

    sent: int = 0
    failed: int = 0
    retried: int = 0
    deferred: int = 0
    handed_back: int = 0

    def count(self, tally: Tally) -> None:
        """One more of ``tally``."""
        if tally is Tally.SENT:
            self.sent += 1
        elif tally is Tally.FAILED:
            self.failed += 1
        elif tally is Tally.RETRIED:
            self.retried += 1
        elif tally is Tally.DEFERRED:
            self.deferred += 1
        else:
            self.handed_back += 1

    def __add__(self, other: Stats) -> Stats:
        return Stats(self.sent + other.sent, self.failed + other.failed, self.retried + other.retried,
                     self.deferred + other.deferred, self.handed_back + other.handed_back)


@dataclass(frozen=True)
class Result:
    """A job's next version (``cf``) and where it goes (SENT, FAIL or BACK), and
    what it counts as. ``landed(path)``, if given, hears where the job is once
    the result is committed (None: nowhere a scan finds it yet). ``mark``: a
    delivered job's mark file, ``cf`` written into it already."""

    claimed: Claimed
    cf: CommandFile
    dest: Destination
    tally: Tally
    landed: Callable[[Path | None], None] | None = field(default=None, compare=False)
    mark: DeliveredMark | None = field(default=None, compare=False)


def _settle(done: asyncio.Future[None] | None) -> None:
    if done is not None and not done.done():
        done.set_result(None)


HAND_BACK_RETRY_MAX = 30.0  # seconds between two tries of a hand-back that keeps failing


class ResultWriter:
    """Writes the results of node ``node``'s jobs into ``spool`` and counts them
    in :attr:`stats`, reporting each to ``on_event(kind, job name)``. Used from
    one event loop. ``start_syncer`` starts the syncer process (None: none;
    by default one that makes each batch durable in one journal commit where
    the spool's file system allows it)."""

    def __init__(self, spool: Spool, node: str, on_event: Callable[[str, str], None] | None = None,
                 start_syncer: Callable[[], Syncer | None] | None = None, hand_back_retry: float = 1.0) -> None:
        self._spool = spool
        self._node = node
        self._on_event = on_event or (lambda kind, name: None)
        self._start_syncer = start_syncer or (lambda: Syncer.start(one_commit=journal_in_order(spool.root)))
        self.stats = Stats()
        self._owed: list[Result] = []
        self._parked = False
        self._batch: list[Result] = []  # results of this turn of the loop, not yet written
        self._batch_written: asyncio.Future[None] | None = None
        self._full: deque[tuple[list[Result], asyncio.Future[None]]] = deque()  # whole batches waiting their turn
        # Results go to the syncer process for their fsyncs, one batch at a
        # time; results made meanwhile wait in _batch for the next one. A lost
        # syncer refuses batches (they are fsynced here) and is reaped at
        # shutdown.
        self._syncer: Syncer | None = None
        self._syncing: asyncio.Future[None] | None = None
        # Jobs a hand-back could not move (a file-system error): tried again
        # after a delay that doubles up to HAND_BACK_RETRY_MAX, not left in
        # ACTIVE until the node's next start.
        self._not_handed_back: list[Claimed] = []
        self._hand_back_retry = hand_back_retry
        self._hand_back_delay = hand_back_retry
        self._hand_back_timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """Start the syncer (with fsync on)."""
        if self._spool.fsync and self._syncer is None:
            self._syncer = self._start_syncer()

    @property
    def paused(self) -> bool:
        """Whether results are owed: the node takes no new job until they are written."""
        return bool(self._owed)

    @property
    def owed(self) -> int:
        """How many results are owed."""
        return len(self._owed)

    @property
    def busy(self) -> bool:
        """Whether results are queued or being made durable (not yet committed)."""
        return bool(self._batch or self._full) or self._syncing is not None

    @property
    def parked(self) -> bool:
        """Whether a committed result waits in ACTIVE to be moved (:meth:`finish_parked`)."""
        return self._parked

    # --- results of attempts -------------------------------------------------

    def write(self, result: Result) -> asyncio.Future[None]:
        """Write a job's result and count it, together with the other results
        of this turn of the event loop (one wait for the disk for all of them;
        until then the job stays claimed, or marked delivered, in ACTIVE).
        Returns a future done when the result is committed (or owed)."""
        if len(self._batch) >= _MAX_BATCH and self._batch_written is not None:
            self._full.append((self._batch, self._batch_written))
            self._batch, self._batch_written = [], asyncio.get_running_loop().create_future()
        self._batch.append(result)
        if self._batch_written is None:
            loop = asyncio.get_running_loop()
            self._batch_written = loop.create_future()
            loop.call_soon(self._write_batch)
        return self._batch_written

    def _write_batch(self) -> None:
        """Write the queued results into spares now. Their fsyncs go to the
        syncer process (the event loop goes on with other jobs meanwhile) or,
        without one, are made here; each is committed after its fsync."""
        while self._syncing is None and (self._full or self._batch_written is not None):
            batch, done = self._next_batch()
            if not batch:
                _settle(done)
                continue
            try:
                pending = self._spool.write_results([(r.claimed, r.cf, r.dest) for r in batch], [r.mark for r in batch])
            except BaseException:
                _settle(done)
                raise
            if self._spool.fsync and len(pending) and self._syncer is not None:
                syncing = asyncio.get_running_loop().create_future()
                self._syncing = syncing
                if self._syncer.submit(pending.fds, functools.partial(self._synced, syncing, batch, pending, done)):
                    return  # the next batch is written when this one is synced
                self._syncing = None
            pending.sync()
            self._commit_batch(batch, pending, done)

    def _next_batch(self) -> tuple[list[Result], asyncio.Future[None] | None]:
        """The batch whose turn it is: the oldest whole one, else this turn's."""
        if self._full:
            return self._full.popleft()
        batch, self._batch = self._batch, []
        done, self._batch_written = self._batch_written, None
        return batch, done

    def _synced(self, syncing: asyncio.Future[None], batch: list[Result], pending: ResultBatch,
                done: asyncio.Future[None] | None, errnos: list[int] | None) -> None:
        """The syncer's answer for a batch (None: it was lost before answering,
        so none of the batch is known to be durable: the results are owed and
        written again, here)."""
        if errnos is None:
            pending.abandon(OSError(errno.EIO, "the syncer process ended before it answered"))
        else:
            pending.synced(errnos)
        try:
            self._commit_batch(batch, pending, done)
        finally:
            self._syncing = None
            _settle(syncing)
            self._write_batch()

    def _commit_batch(self, batch: list[Result], pending: ResultBatch, done: asyncio.Future[None] | None) -> None:
        try:
            self._landed(batch, pending.commit())
        finally:
            _settle(done)

    def _landed(self, results: list[Result], landed: list[Path | OSError]) -> None:
        for result, where in zip(results, landed, strict=True):
            path: Path | None = None
            if isinstance(where, OSError):
                if result.tally is not Tally.DEFERRED:
                    self._not_written(result, where)
                    continue
                path = self._deferral_not_written(result, where)
            else:
                path = where
                self._count(result.tally, result.claimed.name)
            if result.landed is not None:
                result.landed(path)

    def _deferral_not_written(self, result: Result, e: OSError) -> Path | None:
        """A deferral that could not be written: the job goes back unmarked (it
        still waits for a slot, rather than being claimed again on every
        scan); None, and parked, if not even that."""
        claimed = result.claimed
        if not claimed.path.exists():
            log.error("%s: cannot move the deferred job out of ACTIVE: %s; retrying", claimed.path, e.strerror)
            self._parked = True
            self._count(result.tally, claimed.name)
            return None
        log.error("%s: cannot write the deferral: %s; handing the job back", claimed.path, e.strerror)
        handed = self.hand_back(claimed)
        if handed is None:
            self._parked = True
        return handed

    async def settle(self, grace: float) -> None:
        """Write every queued result and wait until all are committed (or
        owed). A syncer that does not answer within ``grace`` seconds (at least
        one) is given up: its batch is owed, and its jobs stay in ACTIVE for
        recovery."""
        while self._batch or self._full or self._syncing is not None:
            if self._syncing is not None:
                try:
                    await asyncio.wait_for(asyncio.shield(self._syncing), max(1.0, grace))
                except TimeoutError:
                    if self._syncer is not None:
                        self._syncer.close()  # answers the batch with None
            else:
                self._write_batch()

    def _not_written(self, result: Result, e: OSError) -> None:
        claimed = result.claimed
        if claimed.path.exists():
            # Not committed: the claimed job is intact; pause and retry.
            if not self._owed:
                log.error("spool: cannot write job results (%s); taking no new job until it can", e.strerror)
            self._owed.append(result)
        else:
            # Committed, not moved: the result waits in ACTIVE (state 4).
            log.error("%s: cannot move the job's result out of ACTIVE: %s; retrying", claimed.path, e.strerror)
            self._parked = True
            self._count(result.tally, claimed.name)

    def _count(self, tally: Tally, name: str) -> None:
        self.stats.count(tally)
        self._on_event(tally, name)

    def pay_owed(self) -> None:
        """Write the owed results again, one at a time, until one fails."""
        owed, self._owed = self._owed, []
        for result in owed:
            if self._owed:
                self._owed.append(result)
                continue
            self._landed([result], self._spool.finish_many([(result.claimed, result.cf, result.dest)]))
        if owed and not self._owed:
            log.warning("spool: job results written again; taking jobs again")

    def finish_parked(self) -> None:
        """Move committed results out of ACTIVE now, rather than at the next start."""
        try:
            # Only committed results: with workers, a result not yet committed
            # may be another worker's, written a moment ago.
            self._spool.finish_committed(self._node, drop_uncommitted=False)
            self._parked = False
        except OSError as e:
            log.error("cannot move finished jobs out of ACTIVE yet: %s", e.strerror)

    # --- jobs that go back unsent --------------------------------------------

    def defer(self, claimed: Claimed, cf: CommandFile, job: Job, reply: tuple[str, int] | None = None,
              landed: Callable[[Path | None], None] | None = None) -> asyncio.Future[None]:
        """Write a job that found no free slot back to its folder, its
        DOMAINBUSY_COUNT one higher (``reply``: the receiver's reply that sent
        it back, and the connections open then), with the other results of
        this turn of the loop: made durable by the syncer while the loop goes
        on, as results are. ``landed(path)`` hears where it is once it is back
        (handed back unmarked if the deferral cannot be written; None, and
        parked, if not even that)."""
        outcomes.info("%s to %s deferred: %s is busy", claimed.name, job.address, job.domain,
                      extra=log_fields("deferred", claimed.name, job.address))
        return self.write(Result(claimed, records.deferred(cf, job.domainbusy_count, reply), Destination.BACK,
                                 Tally.DEFERRED, landed))

    def hand_back(self, claimed: Claimed) -> Path | None:
        """Return a claimed job unchanged to its folder; None if it cannot be
        now: it stays in ACTIVE and is tried again while the node runs (and,
        if it still cannot be, recovered at the node's next start)."""
        try:
            path = self._spool.hand_back(claimed)
        except OSError as e:
            log.error("%s: cannot hand the job back: %s; trying again in %g s", claimed.path, e.strerror,
                      self._hand_back_delay)
            self._not_handed_back.append(claimed)
            self._retry_hand_backs_later()
            return None
        self.stats.count(Tally.HANDED_BACK)
        return path

    def _retry_hand_backs_later(self) -> None:
        if self._hand_back_timer is None:
            self._hand_back_timer = asyncio.get_running_loop().call_later(self._hand_back_delay, self.retry_hand_backs)

    def retry_hand_backs(self) -> None:
        """Try again the hand-backs that failed; those that fail again wait
        twice as long (at most HAND_BACK_RETRY_MAX seconds)."""
        self._hand_back_timer = None
        left: list[Claimed] = []
        for claimed in self._not_handed_back:
            try:
                self._spool.hand_back(claimed)
            except FileNotFoundError:
                continue  # not there any more: nothing of it to hand back
            except OSError:
                left.append(claimed)
                continue
            self.stats.count(Tally.HANDED_BACK)
            log.info("%s: handed back to %s after all", claimed.name, claimed.queue)
        self._not_handed_back = left
        if left:
            self._hand_back_delay = min(HAND_BACK_RETRY_MAX, self._hand_back_delay * 2)
            self._retry_hand_backs_later()
        else:
            self._hand_back_delay = self._hand_back_retry

    async def close(self, grace: float) -> None:
        """At shutdown: :meth:`settle`, a last try of the hand-backs that
        failed, stop the syncer, and say what is owed."""
        await self.settle(grace)
        if self._hand_back_timer is not None:
            self._hand_back_timer.cancel()
        if self._not_handed_back:
            self.retry_hand_backs()
            if self._hand_back_timer is not None:
                self._hand_back_timer.cancel()
                self._hand_back_timer = None
                log.error("%d job(s) could not be handed back: they stay in %s and come back at this node's "
                          "next start", len(self._not_handed_back), self._spool.active_dir(self._node))
        if self._syncer is not None:
            self._syncer.close()
            self._syncer = None
        if self._owed:
            log.error("%d job result(s) could not be written (the disk is full?): they stay in %s and come back "
                      "at this node's next start", len(self._owed), self._spool.active_dir(self._node))
        self._spool.drop_spares()
