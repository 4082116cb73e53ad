"""Finding due jobs: the scan of the TOSEND folders, and the files it remembers.

:class:`Scanner` looks at job files in queue order (the whole spool, or only
the files the watcher named), and claims each one that is

- this worker's: with ``workers`` > 1, a job belongs to the worker its domain
  was given to (:class:`~copiamail.scheduling.domain_owners.DomainOwners`; a
  job that cannot be read: the worker
  :func:`~copiamail.scheduling.limits.worker_of` gives its file name); every
  worker finds the same answer for the same file, and files of other workers
  are not read again until they change;
- due: a job whose next attempt lies ahead is remembered by its due time and
  not read again until its file changes;
- complete: a file renamed into the folder is (the submission protocol); a
  file written in place is taken only once left alone for ``write_settle``
  seconds (by this process's clock, never by mtime alone);
- not waiting for a slot (those are offered slots as they free).

A claimed job goes to ``dispatch``. A scan gives the event loop a turn every
``_SCAN_SLICE`` seconds of work, so connections it starts send while it goes
through a large backlog.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from copiamail.config import Config
from copiamail.errors import JobError
from copiamail.jobfile.fsfile import CommandFile
from copiamail.jobfile.job import Job, parse_job, quick_domain
from copiamail.scheduling.domain_owners import DomainOwners
from copiamail.scheduling.limits import worker_of
from copiamail.spool.queue import Claimed, QueuedJob, Spool, is_job_name

if TYPE_CHECKING:
    from copiamail.scheduling.connections import Connection

log = logging.getLogger("copiamail")

# A scan gives the event loop a turn this often (seconds of work), so the
# connections it starts send while it defers a large backlog, and a job it
# finds meets a connection that has just finished rather than a busy one
# (a deferral is a spool write). Measured on scripts/bench's workload: 2 ms
# deferred 7% of the jobs with one worker and 25-35% with two; 0.5 ms, none.
_SCAN_SLICE = 0.0005

Signature = tuple[int, int, int]  # a file's (inode, mtime in ns, size): changed when it changes


@dataclass(frozen=True)
class Peek:
    """A TOSEND file as last read: its text and job when just read (None when
    only its due time was remembered, or for a job that cannot be parsed)."""

    sig: Signature
    cf: CommandFile | None
    job: Job | None
    next_attempt: float | None


class Scanner:
    """The scans of one scheduler (worker ``worker`` of ``workers`` of node
    ``node``). ``waiting``: the files of jobs that wait for a slot (left
    alone); ``halted()``: whether to stop taking jobs (the scan stops at once);
    ``dispatch(claimed, cf, job, ride)``: a job just claimed (its text and
    meaning when read on the way, else None; ``ride``: the connection it
    rides at once, or None). ``clock``: the time jobs are due by;
    ``monotonic``: the time files settle by and scans slice by."""

    def __init__(
        self,
        config: Config,
        spool: Spool,
        node: str,
        waiting: Container[str],
        halted: Callable[[], bool],
        dispatch: Callable[[Claimed, CommandFile | None, Job | None, Connection | None], None],
        *,
        worker: int = 0,
        workers: int = 1,
        owners: DomainOwners | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        held_until: Callable[[Job, str], float | None] = lambda job, queue: None,
        rides_at_once: Callable[[Job], Connection | None] = lambda job: None,
        hand_back: Callable[[Claimed], object] = lambda claimed: None,
    ) -> None:
        """``owners``: the node's table of which worker sends each domain
        (needed when ``workers`` > 1). ``held_until(job, queue)``: until when a
        due job stays in its folder unclaimed (an operator holds it, or its
        destination is suspended), or None. ``rides_at_once(job)``: the idle
        connection on which its transaction would start as it is dispatched,
        or None (it is then claimed straight as sending, and ``dispatch`` is
        given that connection, so that the choice is not made twice);
        ``hand_back(claimed)`` returns such a job whose file changed before
        the claim, unsent, to its folder."""
        if workers > 1 and owners is None:
            raise ValueError("workers of one node need the table of domain owners")
        self._config = config
        self._held_until = held_until
        self._rides_at_once = rides_at_once
        self._hand_back = hand_back
        self._spool = spool
        self._node = node
        self._waiting = waiting
        self._halted = halted
        self._dispatch = dispatch
        self._worker = worker
        self._workers = workers
        self._owners = owners
        self._clock = clock
        self._monotonic = monotonic
        # Each TOSEND folder's path, as str(Path) spells it, and its name.
        self._queue_dirs = {str(spool.folder(q)): q for q in spool.queue_folders()}
        self.full_scan_due = True
        self.next_due: float | None = None  # when the first job found not yet due falls due
        self._hints: set[str] = set()  # files, as str(Path) spells them
        # The due time of each TOSEND job not yet due, by (inode, mtime, size):
        # a scan reads such a file again only when it changed.
        self._later: dict[str, tuple[Signature, float]] = {}  # by QueuedJob.file
        # Files another worker sends, by (inode, mtime, size): not read again
        # until they change; and whether each is complete should its domain
        # come to this worker (it is, unless its last event said it was
        # written in place: as files present at the node's start, the other
        # worker judged it).
        self._foreign: dict[str, tuple[Signature, bool]] = {}  # by QueuedJob.file
        # Job files written in place (not renamed in) that may still be
        # incomplete: (inode, mtime, size) at the last look, and when (by
        # monotonic) that look found it changed. Taken once left alone for
        # write_settle seconds.
        self._settling: dict[str, tuple[Signature | None, float]] = {}
        self._scanned_once = False
        # Files the watcher saw renamed in since the last full scan: complete,
        # whatever their mtime says (a full scan clears the hints).
        self._renamed: set[str] = set()

    # --- what to look at -----------------------------------------------------

    def reconfigure(self, config: Config) -> None:
        """Read jobs under ``config`` from now on (a reload: CFG variables, write_settle)."""
        self._config = config

    def hint(self, path: str | Path, written: bool = False) -> bool:
        """A file appeared or changed at ``path``: look at it at the next
        :meth:`scan_hinted`. ``written``: it was written in place rather than
        renamed in, so it may still be incomplete. False if it is no job file
        of a TOSEND folder (nothing to look at)."""
        # Strings, not Path: a burst of submissions is thousands of hints,
        # and pathlib costs twenty times the string operations.
        file = os.fspath(path)
        folder, _, name = file.rpartition("/")
        if folder not in self._queue_dirs:
            p = Path(file)  # spelled otherwise (a doubled slash ...): as Path spells it
            file, folder, name = str(p), str(p.parent), p.name
        if folder not in self._queue_dirs or not is_job_name(name):
            return False
        if written and self._config.write_settle > 0:
            self._settling[file] = (None, self._monotonic())
            self._renamed.discard(file)
        else:
            self._settling.pop(file, None)
            self._renamed.add(file)
        self._hints.add(file)
        return True

    @property
    def hinted(self) -> bool:
        """Whether files wait for :meth:`scan_hinted`."""
        return bool(self._hints)

    @property
    def busy(self) -> bool:
        """Whether files wait to be looked at, or to settle."""
        return bool(self._hints or self._settling)

    def hint_settled(self) -> None:
        """Settling files whose time is up become hints (a waiting one is
        looked at only when a slot is offered to it)."""
        if self._settling:
            due = self._monotonic() - self._config.write_settle
            self._hints.update(f for f, (_, since) in self._settling.items() if since <= due and f not in self._waiting)

    def next_settle_look(self) -> float:
        """When (by monotonic) the first settling file not waiting for a slot
        is due another look (none: infinity)."""
        if not self._settling:
            return math.inf
        looks = [since for f, (_, since) in self._settling.items() if f not in self._waiting]
        return (min(looks) + self._config.write_settle) if looks else math.inf

    # --- settling --------------------------------------------------------------

    def _left_alone(self, file: str, sig: Signature, mtime: float, now: float, unknown_recent: bool) -> bool:
        """Whether a job file can be taken as complete: it was renamed in (the
        submission protocol), or it has not changed for ``write_settle``
        seconds by this process's clock. With ``unknown_recent`` (a full scan
        after the first), a file no event told of and written less than
        ``write_settle`` ago is not known to be complete either: its event may
        still be on its way. Files present at the node's start count as
        complete (the watcher could not see them arrive)."""
        settle = self._config.write_settle
        entry = self._settling.get(file)
        if entry is None:
            # A future mtime (another machine's clock) is judged by our clock too.
            if not unknown_recent or settle <= 0 or mtime <= now - settle or file in self._renamed:
                return True
            entry = (None, 0.0)
        looked = self._monotonic()
        if entry[0] != sig:
            self._settling[file] = (sig, looked)
            return False
        if looked - entry[1] >= settle:
            del self._settling[file]
            return True
        return False

    def complete(self, file: str) -> bool:
        """Whether a waiting job's file may be claimed now: not being written
        in place (a settling file is looked at again once left alone)."""
        if file not in self._settling:
            return True
        try:
            st = os.stat(file)
        except OSError:
            return False
        return self._left_alone(file, (st.st_ino, st.st_mtime_ns, st.st_size), st.st_mtime, self._clock(), False)

    # --- worker ownership ------------------------------------------------------

    def mine(self, domain: str) -> bool:
        """Whether this worker sends the jobs of ``domain``."""
        return self._owners is None or self._owners.owner(domain) == self._worker

    def forget_others(self) -> None:
        """Look at other workers' files again (domains changed worker). A file
        of a domain taken over counts as complete, as files present at the
        node's start do, unless an event said it was written in place (then
        it settles as any such file)."""
        self._renamed.update(f for f, (_, complete) in self._foreign.items()
                             if complete and f not in self._settling)
        self._foreign.clear()

    def _mine_unread(self, name: str) -> bool:
        # A job that cannot be read has no domain: its file name decides,
        # which every worker computes alike without the table.
        return self._workers == 1 or worker_of(name, self._workers) == self._worker

    def _peeked(self, w: QueuedJob, now: float) -> Peek | None:
        """What the file of ``w`` says at ``now``; None if it is gone,
        unreadable or another worker's. A file whose (inode, mtime, size) has
        not changed since the last look is not read again while it is not yet
        due (only such jobs are remembered, and only their due time, so a large
        backlog costs little memory)."""
        try:
            st = os.stat(w.file)
        except FileNotFoundError:
            return None
        sig = (st.st_ino, st.st_mtime_ns, st.st_size)
        foreign = self._foreign.get(w.file)
        if foreign is not None and foreign[0] == sig:
            return None
        later = self._later.get(w.file)
        # Once due it is read again: what kept it (an operator's hold, a retry
        # delay) is judged afresh from the job, never taken as over.
        if later is not None and later[0] == sig and later[1] > now:
            return Peek(sig, None, None, later[1])
        try:
            cf = CommandFile.read(w.file, st.st_size)
        except FileNotFoundError:
            return None
        except OSError as e:
            log.warning("%s: cannot read: %s", w.path, e.strerror)
            return None
        # Which worker sends a job: by its domain, read quickly when it can be
        # (most jobs: then other workers' jobs are not parsed at all), else
        # parsed; by its file name when it cannot be parsed.
        quick = quick_domain(cf) if self._workers > 1 else None
        job: Job | None = None
        if quick is None or self.mine(quick):
            try:
                job = parse_job(cf, w.name, self._config.job_env)
            except JobError:
                pass
        domain = quick or (job.domain if job is not None else None)
        if not (self.mine(domain) if domain is not None else self._mine_unread(w.name)):
            self._foreign[w.file] = (sig, w.file not in self._settling)
            return None
        return Peek(sig, cf, job, job.next_attempt if job is not None else None)

    # --- scans -----------------------------------------------------------------

    def _consider(self, w: QueuedJob, now: float, unknown_recent: bool = False) -> bool:
        """Claim and dispatch the job of ``w`` if it is due, complete and not
        waiting; True if it was taken up."""
        if w.file in self._waiting:
            return False
        peek = self._peeked(w, now)
        if peek is None:
            self._settling.pop(w.file, None)  # gone, or another worker's: not ours to settle
            return False
        due = peek.next_attempt
        if peek.job is not None and (held := self._held_until(peek.job, w.queue)) is not None:
            due = max(due or held, held)
            peek = Peek(peek.sig, None, None, due)  # read again once the hold is over
        if due is not None and due > now:
            self._settling.pop(w.file, None)  # by its due time it is long complete
            self._later[w.file] = (peek.sig, due)
            if self.next_due is None or due < self.next_due:
                self.next_due = due
            return False
        if (self._settling or unknown_recent) and not self._left_alone(w.file, peek.sig, peek.sig[1] / 1e9, now, unknown_recent):
            return False
        self._later.pop(w.file, None)
        ride = self._rides_at_once(peek.job) if peek.job is not None else None
        claimed = self._spool.claim(w, self._node, ride is not None)
        if self._renamed:
            self._renamed.discard(w.file)
        if claimed is None:
            return False
        if peek.cf is not None and self._spool.unchanged(claimed, peek.sig):
            self._dispatch(claimed, peek.cf, peek.job, ride)
        elif claimed.marked_sending:
            # Its file changed between the read and the claim (a writer in
            # place): what it now says may not ride, and a job only claimed
            # must not count as sending. It goes back and is read again.
            self._hand_back(claimed)
        else:
            self._dispatch(claimed, None, None, None)
        return True

    def start_full(self) -> None:
        """A full scan begins: it finds whatever the hints named, and sets
        when the next job not yet due falls due."""
        self.full_scan_due = False
        self._hints.clear()
        self.next_due = None

    async def scan(self, now: float) -> tuple[int, set[str]]:
        """Claim every job in the spool that is due at ``now`` (after
        :meth:`start_full`); returns how many were taken up, and the files
        seen (known to exist)."""
        seen: set[str] = set()
        found = await self._consider_all(self._spool.scan(), now, seen, unknown_recent=self._scanned_once)
        self._scanned_once = True
        if not self._halted():  # the scan went through every folder
            for path in [p for p in self._settling if p not in seen]:
                del self._settling[path]
            self._renamed.intersection_update(seen)
        for path in [p for p in self._later if p not in seen]:
            del self._later[path]
        for path in [p for p in self._foreign if p not in seen]:
            del self._foreign[path]
        return found, seen

    async def scan_hinted(self) -> int:
        """Look at the files the watcher named since the last pass, in queue
        order; returns how many were taken up."""
        if self._halted():
            # No new job now: the full scan that resumes work (every
            # scan_interval) finds these files too; keeping the hints would
            # wake the loop again and again for nothing.
            self._hints.clear()
            return 0
        now = self._clock()
        priority, queues = self._spool.priority, self._queue_dirs
        hinted = []
        for file in self._hints:
            folder, _, name = file.rpartition("/")
            queue = queues[folder]
            hinted.append(QueuedJob(priority(queue), queue, name, file))
        hinted.sort(key=lambda w: w.order)
        self._hints.clear()
        return await self._consider_all(hinted, now)

    async def _consider_all(self, jobs: Iterable[QueuedJob], now: float, seen: set[str] | None = None,
                            unknown_recent: bool = False) -> int:
        """:meth:`_consider` each job in turn, giving the event loop a turn every
        ``_SCAN_SLICE`` seconds; ``seen`` collects the paths looked at. Returns
        how many were taken up."""
        found = 0
        monotonic = self._monotonic
        turn = monotonic()
        for w in jobs:
            if self._halted():
                break
            if monotonic() - turn > _SCAN_SLICE:
                await asyncio.sleep(0)
                turn = monotonic()
            if seen is not None:
                seen.add(w.file)
            if self._consider(w, now, unknown_recent):
                found += 1
        return found
