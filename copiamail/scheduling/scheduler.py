"""Which due job goes next, over which connection, and who gets a freed slot.

The loop: scan the TOSEND folders in queue order (on start, on a watcher
wake-up, on a timer, and when a retry falls due). Each due job is claimed and
then either

- handed to an idle open connection for its domain and binding,
- started on a new connection to the relay, or to the first of the domain's
  mail hosts (MX by preference, then each of its addresses) where every limit
  that applies has room (:class:`~copiamail.scheduling.limits.Scopes`; the slots are
  taken all or none), trying the bindings of its group least loaded first, or
- deferred (SPEC 3): written back to its own folder with DOMAINBUSY_COUNT
  incremented, and remembered as *waiting* on the limit that was full.

A waiting job is not taken up by later scans. It is offered a slot when one
frees (:mod:`copiamail.waiting` says which job gets it: folder priority, then
round-robin across domains, then name). A connection that finishes a message
carries the next waiting job of its domain unless a job of another domain that
waits on one of its slots comes first; then it closes and its slots go there.
So a job is deferred about once per wait, one domain cannot starve another,
and nothing polls (DESIGN: "no busy loops"). A periodic scan still checks
waiting jobs, so a lost wake-up costs one scan interval, not a stuck job.

Direct delivery: a job whose domain's route is not known yet waits (claimed)
for one MX lookup per domain; a DNS failure is a class D attempt. A mail host
that refuses the connection or fails before any SMTP command is skipped for a
while and the job goes to the next one, within the same attempt.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import os
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from copiamail.config import BindingConfig, Config, RelayConfig, is_ip, read_password
from copiamail.errors import DeliveryError, JobError
from copiamail.jobfile import outcome, records
from copiamail.jobfile.dkim import sign_for_job
from copiamail.jobfile.fsfile import CommandFile
from copiamail.jobfile.job import Job, parse_job, quick_domain
from copiamail.jobfile.message import build_message
from copiamail.logs import OUTCOMES
from copiamail.scheduling.limiter import Limiter, LocalLimiter
from copiamail.scheduling.limits import Limit, Scopes, bindings_for, worker_cap, worker_of
from copiamail.scheduling.retry import GiveUp, TryAlternative, after_error, through_retry_relay
from copiamail.scheduling.waiting import WaitEntry, WaitingJobs
from copiamail.smtp.mx import MxResolver, Route
from copiamail.smtp.session import (
    CONNECT,
    Delivered,
    SessionSettings,
    SmtpSession,
    machine_helo_name,
    make_tls_context,
    resolve_relay,
)
from copiamail.spool.jobview import recipient_of
from copiamail.spool.queue import Claimed, Destination, QueuedJob, ResultBatch, Spool, is_job_name, queue_number
from copiamail.spool.syncer import Syncer

log = logging.getLogger("copiamail")
outcomes = logging.getLogger(OUTCOMES)  # deliveries and deferrals: shown from -v on

# A scan gives the event loop a turn this often (seconds of work), so the
# connections it starts send while it defers a large backlog, and a job it
# finds meets a connection that has just finished rather than a busy one
# (a deferral is a spool write). Measured on scripts/bench's workload: 2 ms
# deferred 7% of the jobs with one worker and 25-35% with two; 0.5 ms, none.
_SCAN_SLICE = 0.0005
_HOST_DOWN_SECONDS = 60.0
# A connection carries this many more messages of its own domain before it
# yields a shared slot to another domain's waiting job of the same folder: a
# fair turn, without a new connection for every message.
_TURN_MESSAGES = 10


@dataclass
class Stats:
    sent: int = 0
    failed: int = 0
    retried: int = 0
    deferred: int = 0
    handed_back: int = 0


@dataclass(eq=False)
class _Item:
    claimed: Claimed
    cf: CommandFile
    job: Job
    tried: set[str] = field(default_factory=set)  # mail host addresses this attempt found dead


@dataclass(frozen=True)
class _Target:
    """Where a connection goes: the relay, or one address of one mail host."""

    host: str
    port: int
    ips: tuple[str, ...]  # the addresses host limits count against
    names: tuple[str, ...]  # the names host stanzas may use
    starttls: str
    tls: ssl.SSLContext | None
    relay: bool
    server_name: str | None = None  # the MX host's name, which its certificate must carry
    login: tuple[str, str] | None = None  # AUTH (user name, password) for a relay


@dataclass(eq=False)
class _Connection:
    domain: str
    address: str  # of its first job: what its limits were computed for
    binding: BindingConfig | None
    limits: tuple[Limit, ...]
    target: _Target
    session: SmtpSession
    turn: int = 0
    handoff: asyncio.Future[_Item | None] | None = None
    task: asyncio.Task[None] | None = None
    written: asyncio.Future[None] | None = None  # its last result's batch: done when committed


@dataclass(frozen=True)
class _Result:
    """A job's next version and where it goes (SENT, FAIL or BACK), and the
    :class:`Stats` field it counts in."""

    claimed: Claimed
    cf: CommandFile
    dest: Destination
    kind: str


@dataclass(frozen=True)
class _Peek:
    """A TOSEND file as last read: its text and job when just read (None when
    only its due time was remembered, or for a job that cannot be parsed)."""

    sig: tuple[int, int, int]
    cf: CommandFile | None
    job: Job | None
    next_attempt: float | None


@dataclass(frozen=True)
class _Blocked:
    """The full limits that kept a job from starting: the first full one of each
    binding and mail host it could have used (it waits on all of them)."""

    limits: tuple[Limit, ...]


@dataclass(eq=False)
class _Start:
    binding: BindingConfig | None
    target: _Target | None
    limits: tuple[Limit, ...] = ()
    reuse: _Connection | None = None


class Scheduler:
    """One node's scheduling loop over one spool."""

    def __init__(
        self,
        config: Config,
        spool: Spool,
        node: str,
        password: str | None = None,
        clock: Callable[[], float] = time.time,
        on_event: Callable[[str, str], None] | None = None,
        worker: int = 0,
        workers: int = 1,
        limiter: Limiter | None = None,
    ) -> None:
        """``worker`` of ``workers``: this scheduler sends only the jobs whose
        domain :func:`~copiamail.limits.worker_of` gives it, and holds its part
        of each shared cap (the other workers run the same code in other
        processes, on the same spool and ACTIVE folder). ``limiter`` counts
        the slots of every limit (None: a :class:`LocalLimiter`)."""
        self.config = config
        self.worker = worker
        self.workers = workers
        self.spool = spool
        self.node = node
        self.password = password
        self.clock = clock
        self.on_event = on_event or (lambda kind, name: None)
        self.limiter: Limiter = limiter if limiter is not None else LocalLimiter()
        self._scopes = Scopes(config, node, worker, workers)
        self.stats = Stats()
        self.stopping = False
        self._wake: asyncio.Event | None = None
        self._connections: set[_Connection] = set()
        self._idle: dict[str, list[_Connection]] = {}
        self._waiting = WaitingJobs()
        # The due time of each TOSEND job not yet due, by (inode, mtime, size):
        # a scan reads such a file again only when it changed.
        self._later: dict[str, tuple[tuple[int, int, int], float]] = {}  # by QueuedJob.file
        # Files another worker sends, by (inode, mtime, size): not read again
        # until they change.
        self._foreign: dict[str, tuple[int, int, int]] = {}  # by QueuedJob.file
        self._next_due: float | None = None
        self._hints: set[Path] = set()
        # Job files written in place (not renamed in) that may still be
        # incomplete: (inode, mtime, size) at the last look, and when (time.
        # monotonic) that look found it changed. Taken once left alone for
        # write_settle seconds.
        self._settling: dict[str, tuple[tuple[int, int, int] | None, float]] = {}
        self._scanned_once = False
        # Files the watcher saw renamed in since the last full scan: complete,
        # whatever their mtime says (a full scan clears the hints).
        self._renamed: set[str] = set()
        self._full_scan_due = True
        self._queue_dirs = {spool.folder(q) for q in spool.queue_folders()}
        self._parked = False
        self._owed: list[_Result] = []
        self._batch: list[_Result] = []  # results of this turn of the loop, not yet written
        self._batch_written: asyncio.Future[None] | None = None
        # Results go to the syncer process for their fsyncs, one batch at a
        # time; results made meanwhile wait in _batch for the next one. A lost
        # syncer refuses batches (they are fsynced here) and is reaped at
        # shutdown.
        self._syncer: Syncer | None = None
        self._syncing: asyncio.Future[None] | None = None
        self._resolving: dict[str, list[_Item]] = {}
        self._lookups: set[asyncio.Task[None]] = set()
        self._down: dict[str, float] = {}
        # Every name an address is known by (MX names, host stanza names), so a
        # host stanza naming one of them limits every connection to that address.
        self._names_by_ip: dict[str, set[str]] = {}
        self._unresolved_hosts: list[str] = []
        self._host_lookup: asyncio.Task[None] | None = None
        self._mx: MxResolver | None = None
        # Once, at start: machine_helo_name() may ask DNS (SPEC 4: an FQDN,
        # else each connection's address literal, never a bare host name).
        self._helo_name = config.helo_name or machine_helo_name()
        self._relay = _relay_target(config.relay, password)
        # Retries whose list item carries the I prefix go through here.
        self._retry_relay = _relay_target(config.retry_relay, read_password(config, "retry_relay"))
        if self._relay is None:
            self._mx = MxResolver(config.dns)
            self._mx_tls = make_tls_context(config.mx_tls_verify, None)

    # --- public --------------------------------------------------------------

    def wake(self) -> None:
        """Look again at what can be done (a send ended, a lookup finished)."""
        if self._wake is not None:
            self._wake.set()

    def hint(self, path: str | Path, written: bool = False) -> None:
        """A file appeared or changed at ``path`` (from the watcher, via the
        loop): look at that one file, not the whole spool. ``written``: it was
        written in place rather than renamed in, so it may still be
        incomplete and waits until left alone for ``write_settle`` seconds."""
        p = Path(path)
        if p.parent in self._queue_dirs and is_job_name(p.name):
            if written and self.config.write_settle > 0:
                self._settling[str(p)] = (None, time.monotonic())
                self._renamed.discard(str(p))
            else:
                self._settling.pop(str(p), None)
                self._renamed.add(str(p))
            self._hints.add(p)
            self.wake()

    def request_scan(self) -> None:
        """Scan every TOSEND folder soon (jobs came back from a dead peer)."""
        self._full_scan_due = True
        self.wake()

    def request_stop(self) -> None:
        """Take no new job; in-flight sends get shutdown_grace seconds."""
        self.stopping = True
        self.wake()

    async def run(self, drain: bool = False) -> Stats:
        """Run until :meth:`request_stop`, or with ``drain`` until no job is due
        and none is in flight. Then shut down as SPEC 6 says.

        The whole spool is scanned at start, every ``scan_interval`` and when a
        retry falls due; in between, only the files the watcher names are
        looked at, so the cost of a wake-up does not grow with the backlog."""
        self._wake = asyncio.Event()
        if self.spool.fsync and self._syncer is None:
            self._syncer = Syncer.start()
        await self._learn_host_stanza_addresses()
        next_full = 0.0
        try:
            while not self.stopping:
                self._wake.clear()
                self._hint_settled()
                full = self._full_scan_due or time.monotonic() >= next_full
                if full:
                    self._full_scan_due = False
                    self._hints.clear()
                    self._next_due = None
                    found = await self._scan()
                    next_full = time.monotonic() + self.config.scan_interval
                else:
                    found = await self._scan_hinted()
                if (drain and not found and not len(self._waiting) and not self._resolving and not self._hints
                        and not self._settling):
                    if not full:
                        # Finish only after a whole scan has found nothing left.
                        self._full_scan_due = True
                        continue
                    if not self._connections:
                        break
                    self._close_idle()
                if self._next_due is not None:
                    next_full = min(next_full, time.monotonic() + max(0.01, self._next_due - self.clock()))
                timeout = next_full - time.monotonic()
                if self._settling:
                    timeout = min(timeout, self._next_settle_look() - time.monotonic())
                if timeout > 0 and not self._hints and not self._full_scan_due:
                    try:
                        await asyncio.wait_for(self._wake.wait(), timeout)
                    except TimeoutError:
                        pass
                # Let a burst of watcher events and finishing sends settle into one pass.
                await asyncio.sleep(0.01)
        finally:
            await self._shutdown()
        return self.stats

    async def _learn_host_stanza_addresses(self) -> None:
        """Resolve the host names that host stanzas use, once at start, so their
        limits hold for every MX name that comes to the same address."""
        if self._mx is None:
            return
        names = self._unresolved_hosts or [h.key for h in self.config.hosts if not is_ip(h.key)]
        results = await asyncio.gather(*(self._mx.addresses(n) for n in names), return_exceptions=True)
        self._unresolved_hosts = []
        for name, ips in zip(names, results):
            if isinstance(ips, BaseException):
                log.warning("host %s (a host stanza): cannot resolve it now (retried at each scan); "
                            "until then its limit applies by name only", name)
                self._unresolved_hosts.append(name)
                continue
            for ip in ips:
                self._learn(ip, name)

    # --- scanning ------------------------------------------------------------

    def _left_alone(self, file: str, sig: tuple[int, int, int], mtime: float, now: float, unknown_recent: bool) -> bool:
        """Whether a job file can be taken as complete: it was renamed in (the
        submission protocol), or it has not changed for ``write_settle``
        seconds by this process's clock. With ``unknown_recent`` (a full scan
        after the first), a file no event told of and written less than
        ``write_settle`` ago is not known to be complete either: its event may
        still be on its way. Files present at the node's start count as
        complete (the watcher could not see them arrive)."""
        settle = self.config.write_settle
        entry = self._settling.get(file)
        if entry is None:
            # A future mtime (another machine's clock) is judged by our clock too.
            if not unknown_recent or settle <= 0 or mtime <= now - settle or file in self._renamed:
                return True
            entry = (None, 0.0)
        looked = time.monotonic()
        if entry[0] != sig:
            self._settling[file] = (sig, looked)
            return False
        if looked - entry[1] >= settle:
            del self._settling[file]
            return True
        return False

    def _next_settle_look(self) -> float:
        """When (time.monotonic) the first settling file not waiting for a
        slot is due another look (none: the next full scan)."""
        looks = [since for f, (_, since) in self._settling.items() if f not in self._waiting]
        return (min(looks) + self.config.write_settle) if looks else math.inf

    def _hint_settled(self) -> None:
        # Settling files whose time is up are looked at again, as hints; a
        # waiting one only when a slot is offered to it (_take).
        if self._settling:
            due = time.monotonic() - self.config.write_settle
            self._hints.update(Path(f) for f, (_, since) in self._settling.items()
                               if since <= due and f not in self._waiting)

    def _peeked(self, w: QueuedJob) -> _Peek | None:
        """What the file of ``w`` says now; None if it is gone or unreadable.
        A file whose (inode, mtime, size) has not changed since the last look
        is not read again (only jobs not yet due are remembered, and only
        their due time, so a large backlog costs little memory)."""
        try:
            st = os.stat(w.file)
        except FileNotFoundError:
            return None
        sig = (st.st_ino, st.st_mtime_ns, st.st_size)
        if self._foreign.get(w.file) == sig:
            return None
        later = self._later.get(w.file)
        if later is not None and later[0] == sig:
            return _Peek(sig, None, None, later[1])
        try:
            cf = CommandFile.read(w.file)
        except FileNotFoundError:
            return None
        except OSError as e:
            log.warning("%s: cannot read: %s", w.path, e.strerror)
            return None
        # Which worker sends a job: by its domain, read quickly when it can be
        # (most jobs: then other workers' jobs are not parsed at all), else
        # parsed; by its file name when it cannot be parsed. Every worker
        # computes the same answer from the same file.
        quick = quick_domain(cf) if self.workers > 1 else None
        job: Job | None = None
        if quick is None or self._mine(quick):
            try:
                job = parse_job(cf, w.name, self.config.job_env)
            except JobError:
                pass
        if not self._mine(quick or (job.domain if job is not None else w.name)):
            self._foreign[w.file] = sig
            return None
        return _Peek(sig, cf, job, job.next_attempt if job is not None else None)

    def _mine(self, key: str) -> bool:
        """Whether this worker sends the jobs of domain (or file name) ``key``."""
        return self.workers == 1 or worker_of(key, self.workers) == self.worker

    def _consider(self, w: QueuedJob, now: float, unknown_recent: bool = False) -> bool:
        """Claim and dispatch the job of ``w`` if it is due, complete and not
        waiting; True if it was taken up."""
        if w.file in self._waiting:
            return False
        peek = self._peeked(w)
        if peek is None:
            self._settling.pop(w.file, None)  # gone, or another worker's: not ours to settle
            return False
        if peek.next_attempt is not None and peek.next_attempt > now:
            self._settling.pop(w.file, None)  # by its due time it is long complete
            self._later[w.file] = (peek.sig, peek.next_attempt)
            if self._next_due is None or peek.next_attempt < self._next_due:
                self._next_due = peek.next_attempt
            return False
        if (self._settling or unknown_recent) and not self._left_alone(w.file, peek.sig, peek.sig[1] / 1e9, now, unknown_recent):
            return False
        self._later.pop(w.file, None)
        claimed = self.spool.claim(w, self.node)
        if self._renamed:
            self._renamed.discard(w.file)
        if claimed is None:
            return False
        if peek.cf is not None and self.spool.unchanged(claimed, peek.sig):
            self._dispatch(claimed, peek.cf, peek.job)
        else:
            self._dispatch(claimed)
        return True

    async def _scan(self) -> int:
        """Start or defer every due job in the spool not already waiting;
        returns how many were taken up (and sets when the next not-yet-due
        job falls due)."""
        now = self.clock()
        seen: set[str] = set()
        if self._owed:
            self._pay_owed()
            if self._owed:
                return len(self._owed)
        if self._unresolved_hosts and (self._host_lookup is None or self._host_lookup.done()):
            self._host_lookup = asyncio.get_running_loop().create_task(self._learn_host_stanza_addresses())
        found = await self._consider_all(self.spool.scan(), now, seen, unknown_recent=self._scanned_once)
        self._scanned_once = True
        if not (self.stopping or self._paused):  # the scan went through every folder
            for path in [p for p in self._settling if p not in seen]:
                del self._settling[path]
            self._renamed.intersection_update(seen)
        for path in [p for p in self._later if p not in seen]:
            del self._later[path]
        for path in [p for p in self._foreign if p not in seen]:
            del self._foreign[path]
        self._recheck_waiting(seen)
        return found

    async def _scan_hinted(self) -> int:
        """Look at the files the watcher named since the last pass, in queue order."""
        if self._owed or self.stopping:
            # No new job while results are owed: the full scan that pays them
            # (every scan_interval) finds these files too; keeping the hints
            # would wake the loop again and again for nothing.
            self._hints.clear()
            return 0
        now = self.clock()
        hinted = sorted((QueuedJob(self.spool.priority(p.parent.name), p.parent.name, p.name, str(p)) for p in self._hints),
                        key=lambda w: w.order)
        self._hints.clear()
        return await self._consider_all(hinted, now)

    async def _consider_all(self, jobs: Iterable[QueuedJob], now: float, seen: set[str] | None = None,
                            unknown_recent: bool = False) -> int:
        """:meth:`_consider` each job in turn, giving the event loop a turn every
        ``_SCAN_SLICE`` seconds; ``seen`` collects the paths looked at. Returns
        how many were taken up."""
        found = 0
        turn = time.monotonic()
        for w in jobs:
            if self.stopping or self._paused:
                break
            if time.monotonic() - turn > _SCAN_SLICE:
                await asyncio.sleep(0)
                turn = time.monotonic()
            if seen is not None:
                seen.add(w.file)
            if self._consider(w, now, unknown_recent):
                found += 1
        return found

    def _recheck_waiting(self, seen: set[str]) -> None:
        # The safety net for a lost wake-up: drop waiting jobs whose file is
        # gone, and offer any key that has room.
        self._waiting.drop_missing(seen)
        self._offer(self._waiting.keys_with_room(self.limiter.in_use))
        if self._parked:
            self._finish_parked()

    # --- where a job can go --------------------------------------------------

    def _bindings_for(self, job: Job) -> list[BindingConfig | None]:
        try:
            return bindings_for(self.config, job.binding, job.binding_group)
        except KeyError as e:
            raise JobError(str(e.args[0]), outcome.BAD_JOB.code) from None

    def _targets(self, job: Job, fresh: bool, tried: set[str] | None = None) -> list[_Target] | None:
        """The relay (the retry relay for a retry its list sends there), or the
        domain's mail host addresses by preference, less those this attempt
        already found dead (``tried``) and, while others remain, those recently
        found down; None when the route must be looked up."""
        if self._retry_relay is not None and self._retry_through_relay(job):
            return [self._retry_relay]
        if self._relay is not None:
            return [self._relay]
        domain = job.domain
        assert self._mx is not None
        route = self._mx.cached(domain) if fresh else self._mx.last_known(domain)
        if route is None:
            return None
        return self._mx_targets(route, tried or set())

    def _retry_through_relay(self, job: Job) -> bool:
        """Whether the job's next attempt is a retry that its retry list sends
        through ``retry_relay`` (an ``I`` item)."""
        return through_retry_relay(job, self.config.rules.retry_rules, self.clock())

    def _mx_targets(self, route: Route, tried: set[str]) -> list[_Target]:
        for host in route.hosts:
            for ip in host.ips:
                self._learn(ip, host.name)
        targets = [
            _Target(ip, self.config.mx_port, (ip,), tuple(sorted(self._names_by_ip[ip])), "auto", self._mx_tls, False, host.name)
            for host in route.hosts for ip in host.ips
        ]
        untried = [t for t in targets if t.host not in tried] or targets
        now = time.monotonic()
        up = [t for t in untried if self._down.get(t.host, 0.0) <= now]
        return up or untried

    def _learn(self, ip: str, name: str) -> None:
        """``name`` is a name of ``ip``. If that brings a host stanza to ``ip``,
        connections already open to it start counting against its limit."""
        names = self._names_by_ip.setdefault(ip, set())
        if name in names:
            return
        names.add(name)
        for conn in self._connections:
            if conn.target.relay or conn.target.host != ip:
                continue
            held = {l.key for l in conn.limits}
            now = self._scopes.limits(conn.address, conn.domain, conn.binding, (ip,), tuple(sorted(names)))
            extra = tuple(l for l in now if l.key not in held and l.key.startswith("host:"))
            if extra:
                self.limiter.force_acquire(extra)
                conn.limits = conn.limits + extra

    def _open_count(self, binding: BindingConfig | None) -> int:
        return sum(1 for c in self._connections if c.binding is binding)

    def _reserve_blocks(self, domain: str, limits: tuple[Limit, ...]) -> Limit | None:
        # Momentum's server_reserve_outbound_connections: the last N slots of the
        # node total are kept for domains that have no connection open yet.
        reserve = worker_cap(self.config.server_reserve_outbound_connections, self.worker, self.workers)
        if not reserve or not any(c.domain == domain for c in self._connections):
            return None
        server = next(l for l in limits if l.key == "server")
        if self.limiter.in_use("server") >= server.cap - reserve:
            return server
        return None

    def _choose(self, job: Job, targets: list[_Target]) -> _Start | _Blocked:
        candidates = self._bindings_for(job)
        for conn in self._idle.get(job.domain, ()):
            if (conn.binding in candidates and conn.handoff is not None and not conn.handoff.done()
                    and any(conn.target is t for t in targets) and conn.session.settings.starttls == _starttls_for(conn.target, job)):
                return _Start(conn.binding, conn.target, conn.limits, reuse=conn)
        blocked: dict[str, Limit] = {}
        by_load = sorted(candidates, key=lambda b: (self._open_count(b), b.name if b else ""))
        for target in targets:
            for b in by_load:
                limits = self._scopes.limits(job.address, job.domain, b, target.ips, target.names)
                full = self._reserve_blocks(job.domain, limits) or self.limiter.try_acquire(limits)
                if full is None:
                    return _Start(b, target, limits)
                blocked.setdefault(full.key, full)
        return _Blocked(tuple(blocked.values()))

    # --- dispatch ------------------------------------------------------------

    def _dispatch(self, claimed: Claimed, cf: CommandFile | None = None, job: Job | None = None) -> None:
        """Send, hand off, look up or defer a job this node has just claimed
        (``cf`` and ``job``: its text and meaning, when already read)."""
        if cf is None:
            try:
                cf = self.spool.read(claimed)
            except OSError as e:
                log.error("%s: cannot read claimed job: %s", claimed.path, e.strerror)
                return
        try:
            job = job if job is not None else parse_job(cf, claimed.name, self.config.job_env)
        except JobError as e:
            self._write(self._failed(claimed, cf, e.outcome, outcome.FAILURE, _job_error_text(e), self._where(claimed, None)))
            return
        if not self._mine(job.domain) or not job.is_due(self.clock()):
            # Its file changed while it waited here: to another worker's
            # domain (that worker's limits count it), or to a later time.
            self._hand_back(claimed)
            return
        self._route(_Item(claimed, cf, job))

    def _as_planned(self, job: Job, planned: Job) -> bool:
        """Whether a job read from the file just claimed is the one its slot
        was chosen for (same recipient and binding, and due): a waiting job's
        file may have been replaced meanwhile, and the file decides."""
        return (job.address == planned.address and job.binding == planned.binding
                and job.binding_group == planned.binding_group and job.options == planned.options
                and job.attempts == planned.attempts and job.is_due(self.clock()))

    def _route(self, item: _Item, after_lookup: bool = False) -> None:
        targets = self._targets(item.job, fresh=not after_lookup, tried=item.tried)
        if targets is None:
            self._look_up(item)
            return
        try:
            choice = self._choose(item.job, targets)
        except JobError as e:
            self._write(self._failed(item.claimed, item.cf, e.outcome, outcome.FAILURE, _job_error_text(e),
                                     self._where(item.claimed, item.job)))
            return
        if isinstance(choice, _Blocked):
            self._defer(item, choice)
        else:
            self._start(choice, item)

    def _look_up(self, item: _Item) -> None:
        """Park a claimed job until its domain's route is known (one lookup per domain)."""
        domain = item.job.domain
        parked = self._resolving.setdefault(domain, [])
        parked.append(item)
        if len(parked) == 1:
            task = asyncio.get_running_loop().create_task(self._resolve(domain))
            self._lookups.add(task)
            task.add_done_callback(self._lookups.discard)

    async def _resolve(self, domain: str) -> None:
        assert self._mx is not None
        error: DeliveryError | None = None
        try:
            await self._mx.route(domain)
        except DeliveryError as e:
            error = e
        except Exception as e:
            log.exception("MX lookup of %s failed", domain)
            error = DeliveryError(outcome.DNS_TEMPORARY.code, outcome.DNS_TEMPORARY.klass, f"DNS: lookup of {domain} failed: {e}", False, "DNS")
        finally:
            items = self._resolving.pop(domain, [])
            for item in items:
                try:
                    if self.stopping or self._paused:
                        self._hand_back(item.claimed)
                    elif error is not None:
                        self._write(self._after_error(item.claimed, item.cf, item.job, error,
                                                      self._where(item.claimed, item.job, self.clock())))
                    else:
                        self._route(item, after_lookup=True)
                except Exception:
                    log.exception("%s: cannot route the job; handing it back", item.claimed.name)
                    self._hand_back(item.claimed)
            self.wake()

    def _start(self, choice: _Start, item: _Item) -> None:
        self._waiting.served(item.job.domain)
        if choice.reuse is not None:
            assert choice.reuse.handoff is not None
            choice.reuse.handoff.set_result(item)
            return
        assert choice.target is not None
        conn = _Connection(item.job.domain, item.job.address, choice.binding, choice.limits, choice.target,
                           SmtpSession(self._settings(choice.target, choice.binding, _starttls_for(choice.target, item.job))))
        self._connections.add(conn)
        conn.task = asyncio.get_running_loop().create_task(self._run_connection(conn, item))

    def _settings(self, target: _Target, binding: BindingConfig | None, starttls: str) -> SessionSettings:
        return SessionSettings(
            host=target.host, port=target.port,
            source_address=binding.bind_address if binding is not None else None,
            starttls=starttls, tls_context=target.tls,
            username=target.login[0] if target.login is not None else None,
            password=target.login[1] if target.login is not None else None,
            timeout=self.config.smtp_timeout, helo_name=self._helo_name, server_name=target.server_name,
            relay=target.relay,
        )

    def _defer(self, item: _Item, blocked: _Blocked) -> None:
        claimed, cf, job = item.claimed, item.cf, item.job
        try:
            path = self.spool.finish(claimed, records.deferred(cf, job.domainbusy_count), Destination.BACK)
            self.stats.deferred += 1
            outcomes.info("%s to %s deferred: %s is busy", claimed.name, job.address, job.domain)
            self.on_event("deferred", claimed.name)
        except OSError as e:
            # It still waits for a slot (unmarked), rather than being claimed
            # again on every scan.
            log.error("%s: cannot write the deferral: %s; handing the job back", claimed.path, e.strerror)
            handed = self._hand_back(claimed)
            if handed is None:
                self._parked = True
                return
            path = handed
        w = QueuedJob(self.spool.priority(claimed.queue), claimed.queue, path.name, str(path))
        # Only what scheduling needs is kept: a large backlog costs little memory.
        self._waiting.add(WaitEntry(w, job.without_content()), [(l.key, l.cap) for l in blocked.limits])
        for limit in blocked.limits:
            self._release_idle_holding(limit.key)

    def _release_idle_holding(self, key: str) -> None:
        # An idle connection that holds the full key closes, so its slot can
        # go to the job that waits for it.
        for conns in self._idle.values():
            for conn in conns:
                if conn.handoff is not None and not conn.handoff.done() and any(l.key == key for l in conn.limits):
                    conn.handoff.set_result(None)
                    return

    def _take(self, entry: WaitEntry) -> Claimed | None:
        """Claim a waiting job; it stops waiting either way. A file that is
        being written in place is not claimed: it is looked at again once it
        has been left alone (as any settling file)."""
        self._waiting.take(entry)
        file = entry.waiting.file
        if file in self._settling:
            try:
                st = os.stat(file)
            except OSError:
                return None
            if not self._left_alone(file, (st.st_ino, st.st_mtime_ns, st.st_size), st.st_mtime, self.clock(), False):
                return None
        return self.spool.claim(entry.waiting, self.node)

    def _offer(self, keys: list[str]) -> None:
        """Slots of ``keys`` freed: offer them to waiting jobs, the first by
        :meth:`WaitingJobs.rank` first (none while results are owed)."""
        if self._paused:
            return
        pending = set(keys)
        while pending:
            heads = [(self._waiting.rank(h), k) for k in pending if (h := self._waiting.head(k)) is not None]
            if not heads:
                return
            _, key = min(heads)
            pending.discard(key)
            self._offer_key(key)

    def _offer_key(self, key: str) -> None:
        """A slot of ``key`` freed: offer it to the first waiting job that can use it."""
        passed_over: set[str] = set()
        while (entry := self._waiting.pop_head(key, passed_over)) is not None:
            targets = self._targets(entry.job, fresh=False)
            choice: _Start | _Blocked | None = None
            if targets is not None:
                try:
                    choice = self._choose(entry.job, targets)
                except JobError:
                    choice = None  # claimed below; _dispatch fails it with the reason
            if isinstance(choice, _Blocked):
                for limit in choice.limits:
                    self._waiting.wait_on(entry, limit.key, limit.cap)
                if self.limiter.in_use(key) >= self._waiting.cap(key):
                    return  # the slot is taken again
                # The slot is free but not for this job (the reserve, or another
                # of its limits): it goes to the next domain's job instead.
                passed_over.add(entry.job.domain)
                continue
            claimed = self._take(entry)
            if claimed is None:
                if choice is not None and choice.reuse is None:
                    self.limiter.release(choice.limits)
                continue
            if choice is None:
                self._dispatch(claimed)
            else:
                self._start_claimed(choice, claimed, entry.job)
            return

    def _start_claimed(self, choice: _Start, claimed: Claimed, planned: Job) -> None:
        try:
            cf = self.spool.read(claimed)
            job = parse_job(cf, claimed.name, self.config.job_env)
        except (OSError, JobError):
            if choice.reuse is None:
                self.limiter.release(choice.limits)
            self._dispatch(claimed)
            return
        if not self._as_planned(job, planned):
            # The file changed while it waited: decide afresh.
            if choice.reuse is None:
                self.limiter.release(choice.limits)
            self._dispatch(claimed, cf, job)
            return
        self._start(choice, _Item(claimed, cf, job))

    def _next_for(self, conn: _Connection) -> tuple[_Item | None, bool]:
        """What a connection does after a message: ``(item, False)`` carry the
        next waiting job of its domain; ``(None, True)`` close, because a job of
        another domain that waits on a slot it holds comes first; ``(None,
        False)`` nothing waits for it."""
        while True:
            own = self._waiting.next_of_domain(conn.domain, lambda job: self._can_use(conn, job))
            other = self._first_other(conn)
            if own is None:
                return None, other is not None
            if other is not None and self._waiting.rank(other) < self._waiting.rank(own):
                # An earlier folder goes first at once; within a folder the
                # connection yields when its turn is over.
                if other.order[0] < own.order[0] or conn.turn >= _TURN_MESSAGES:
                    return None, True
            item = self._claim_for(conn, own)
            if item is not None:
                self._waiting.served(conn.domain)
                conn.turn += 1
                return item, False

    def _first_other(self, conn: _Connection) -> WaitEntry | None:
        """The first waiting job that waits on a slot this connection holds and
        cannot ride on it."""
        best: WaitEntry | None = None
        for limit in conn.limits:
            head = self._waiting.head(limit.key)
            if head is None or (head.job.domain == conn.domain and self._can_use(conn, head.job)):
                continue
            if best is None or self._waiting.rank(head) < self._waiting.rank(best):
                best = head
        return best

    def _can_use(self, conn: _Connection, job: Job) -> bool:
        """Whether ``job`` may ride on ``conn``: the same binding, STARTTLS
        mode, and route (a retry sent through retry_relay rides only on a
        connection to it, and nothing else does)."""
        if conn.session.settings.starttls != _starttls_for(conn.target, job):
            return False
        if self._retry_relay is not None and (conn.target is self._retry_relay) != self._retry_through_relay(job):
            return False
        try:
            return conn.binding in self._bindings_for(job)
        except JobError:
            return True  # take it: _dispatch fails it with the reason

    def _claim_for(self, conn: _Connection, entry: WaitEntry) -> _Item | None:
        """Claim a waiting job to ride on an open connection; None if it cannot."""
        claimed = self._take(entry)
        if claimed is None:
            return None
        try:
            cf = self.spool.read(claimed)
            job = parse_job(cf, claimed.name, self.config.job_env)
        except (OSError, JobError):
            self._dispatch(claimed)
            return None
        if not self._as_planned(job, entry.job) or not self._can_use(conn, job):
            self._dispatch(claimed, cf, job)
            return None
        return _Item(claimed, cf, job)

    # --- connections ---------------------------------------------------------

    async def _run_connection(self, conn: _Connection, item: _Item | None) -> None:
        """Carry jobs over one connection until none is left for it. Whatever
        happens (cancellation, a bug), a claimed job this task holds is either
        attempted or handed back: it is never left in ACTIVE."""
        elsewhere: _Item | None = None
        try:
            while item is not None and not self.stopping:
                if conn.session.messages >= self.config.messages_per_connection:
                    await conn.session.close()
                elsewhere = await self._attempt(conn, item)
                item = None
                # Its result is written before the connection takes another
                # job: a result that cannot be written (a full disk) pauses
                # the node first.
                if conn.written is not None:
                    await asyncio.shield(conn.written)
                    conn.written = None
                if elsewhere is not None or self.stopping or self._paused:
                    break
                item, close = self._next_for(conn)
                if item is None and not close:
                    item = await self._idle_wait(conn)
            if item is None:
                await conn.session.close()
        except asyncio.CancelledError:
            conn.session.abort()
            raise
        except Exception:
            log.exception("connection for %s failed", conn.domain)
            conn.session.abort()
        finally:
            if item is not None:
                conn.session.abort()
                self._hand_back(item.claimed)
            self.limiter.release(conn.limits)
            self._connections.discard(conn)
            if elsewhere is not None:
                if self.stopping or self._paused:
                    self._hand_back(elsewhere.claimed)
                else:
                    self._route(elsewhere, after_lookup=True)
            if not self.stopping:
                self._offer([l.key for l in conn.limits])
            self.wake()

    async def _idle_wait(self, conn: _Connection) -> _Item | None:
        """Wait up to connection_idle for a job of this connection's domain."""
        if self.stopping or self.config.connection_idle <= 0:
            return None
        handoff: asyncio.Future[_Item | None] = asyncio.get_running_loop().create_future()
        conn.handoff = handoff
        self._idle.setdefault(conn.domain, []).append(conn)
        try:
            return await asyncio.wait_for(asyncio.shield(handoff), self.config.connection_idle)
        except TimeoutError:
            if handoff.done():
                return handoff.result()
            handoff.cancel()
            return None
        except asyncio.CancelledError:
            # A job handed over just before the cancel is ours to give back.
            if handoff.done() and not handoff.cancelled() and handoff.result() is not None:
                self._hand_back(handoff.result().claimed)  # type: ignore[union-attr]
            raise
        finally:
            self._idle[conn.domain].remove(conn)
            if not self._idle[conn.domain]:
                del self._idle[conn.domain]
            conn.handoff = None

    async def _attempt(self, conn: _Connection, item: _Item) -> _Item | None:
        """One delivery attempt; the job ends in SENT, FAIL or back in its
        folder, or (returned) goes to the domain's next mail host because this
        one failed before any SMTP command. A cancellation propagates with the
        job still claimed (the caller hands it back)."""
        claimed, cf, job = item.claimed, item.cf, item.job
        now = self.clock()
        reused = conn.session.messages > 0
        try:
            data = build_message(job, spool_root=self.spool.root, attachment_roots=self.config.roots, sender=self._sender(job),
                                 now=now, path_map=self.config.path_map)
            data = sign_for_job(data, job, self.config, self.spool.root)  # DKIM signs the exact bytes sent
            sent = await conn.session.send(self._sender(job), job.address, data, require_tls="reqtls" in job.options)
        except JobError as e:
            result = self._failed(claimed, cf, e.outcome, outcome.FAILURE, _job_error_text(e), self._where(claimed, job, now))
        except DeliveryError as e:
            if self._next_host_exists(conn, e, item):
                log.info("%s: %s; trying the next mail host", claimed.name, e.text)
                return item
            connected = None if e.stage in (CONNECT, "DNS") and not reused else now
            result = self._after_error(claimed, cf, job, e, self._where(claimed, job, now, connected))
        except Exception as e:
            log.exception("%s: internal error", claimed.name)
            conn.session.abort()
            result = self._after_error(claimed, cf, job, DeliveryError(
                outcome.INTERNAL.code, outcome.INTERNAL.klass, f"internal error: {type(e).__name__}: {e}", False),
                self._where(claimed, job, now))
        else:
            result = self._sent(claimed, cf, sent, self._where(claimed, job, now, now))
        conn.written = self._write(result)
        return None

    def _next_host_exists(self, conn: _Connection, e: DeliveryError, item: _Item) -> bool:
        """Mark a mail host that failed before any SMTP command as down; True if
        the domain has a host (or address) this attempt has not tried that is
        not down. Each address is tried once per attempt, so an attempt ends."""
        if conn.target.relay or e.stage != CONNECT:
            return False
        item.tried.add(conn.target.host)
        self._down[conn.target.host] = time.monotonic() + _HOST_DOWN_SECONDS
        assert self._mx is not None
        route = self._mx.last_known(conn.domain)
        if route is None:
            return False
        now = time.monotonic()
        return any(ip not in item.tried and self._down.get(ip, 0.0) <= now for host in route.hosts for ip in host.ips)

    def _sender(self, job: Job) -> str:
        return job.esender or self.config.rules.esender or self.config.esender

    # --- outcomes ------------------------------------------------------------

    def _write(self, result: _Result) -> asyncio.Future[None]:
        """Write a job's result and count it, together with the other results
        of this turn of the event loop (one wait for the disk for all of them;
        until then the job stays claimed, or marked delivered, in ACTIVE).
        Returns a future done when the result is committed (or owed)."""
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
        if self._syncing is not None:
            return  # these join the batch written when the one in flight is synced
        batch, self._batch = self._batch, []
        done, self._batch_written = self._batch_written, None
        if not batch:
            _settle(done)
            return
        try:
            pending = self.spool.write_results([(r.claimed, r.cf, r.dest) for r in batch])
        except BaseException:
            _settle(done)
            raise
        if self.spool.fsync and len(pending) and self._syncer is not None:
            syncing = asyncio.get_running_loop().create_future()
            self._syncing = syncing
            if self._syncer.submit(pending.fds, lambda errnos: self._synced(syncing, batch, pending, done, errnos)):
                return
            self._syncing = None
        pending.sync()
        self._commit_batch(batch, pending, done)

    def _synced(self, syncing: asyncio.Future[None], batch: list[_Result], pending: ResultBatch,
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
            if self._batch:
                self._write_batch()

    def _commit_batch(self, batch: list[_Result], pending: ResultBatch, done: asyncio.Future[None] | None) -> None:
        try:
            landed = pending.commit()
            for result, where in zip(batch, landed):
                if isinstance(where, OSError):
                    self._not_written(result, where)
                else:
                    self._count(result.kind, result.claimed.name)
        finally:
            _settle(done)

    async def _results_settled(self) -> None:
        """Write every queued result and wait until all are committed (or
        owed). A syncer that does not answer within shutdown_grace is given
        up: its batch is owed, and its jobs stay in ACTIVE for recovery."""
        while self._batch or self._syncing is not None:
            if self._syncing is not None:
                try:
                    await asyncio.wait_for(asyncio.shield(self._syncing), max(1.0, self.config.shutdown_grace))
                except TimeoutError:
                    if self._syncer is not None:
                        self._syncer.close()  # answers the batch with None
            else:
                self._write_batch()

    def _write_now(self, results: list[_Result]) -> None:
        """Write results at once; one that cannot be written (a full disk) is
        owed: kept in memory and written when space returns, so a delivered
        job is not sent again and nothing is lost."""
        if not results:
            return
        landed = self.spool.finish_many([(r.claimed, r.cf, r.dest) for r in results])
        for result, where in zip(results, landed):
            if isinstance(where, OSError):
                self._not_written(result, where)
            else:
                self._count(result.kind, result.claimed.name)

    def _not_written(self, result: _Result, e: OSError) -> None:
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
            self._count(result.kind, claimed.name)

    def _count(self, kind: str, name: str) -> None:
        setattr(self.stats, kind, getattr(self.stats, kind) + 1)
        self.on_event(kind, name)

    def _pay_owed(self) -> None:
        owed, self._owed = self._owed, []
        for result in owed:
            if self._owed:
                self._owed.append(result)
                continue
            self._write_now([result])
        if owed and not self._owed:
            log.warning("spool: job results written again; taking jobs again")

    @property
    def _paused(self) -> bool:
        return bool(self._owed)

    def _where(self, claimed: Claimed, job: Job | None, call: float | None = None,
               connected: float | None = None) -> records.Where:
        """What the attempt record of a job claimed from ``claimed.queue`` tells
        besides its outcome (CALL: when the attempt started, CONNECT: when its
        connection was made; the connection of a message is made, or reused, as
        its attempt starts)."""
        return records.Where(queue_number(claimed.queue), self.worker + 1, call, connected,
                             job is not None and job.restarted)

    def _sent(self, claimed: Claimed, cf: CommandFile, result: Delivered, where: records.Where) -> _Result:
        if outcomes.isEnabledFor(logging.INFO):
            outcomes.info("%s to %s delivered (%s): %s", claimed.name, recipient_of(cf), result.ip, result.reply)
        try:
            # First a rename (no disk space needed): from now on a crash or a
            # full disk can no longer make this message go out twice.
            claimed = self.spool.mark_delivered(claimed)
        except OSError as e:
            log.error("%s: cannot mark the job delivered: %s", claimed.path, e.strerror)
        return _Result(claimed, records.delivered(cf, self.node, result.reply, result.ip, result.bytecount, self.clock(),
                                                  where), Destination.SENT, "sent")

    def _failed(self, claimed: Claimed, cf: CommandFile, code: int, klass: str, text: str,
                where: records.Where) -> _Result:
        log.warning("%s to %s failed: %s", claimed.name, recipient_of(cf), text)
        return _Result(claimed, records.failed(cf, self.node, code, klass, text, self.clock(), where), Destination.FAIL, "failed")

    def _after_error(self, claimed: Claimed, cf: CommandFile, job: Job, e: DeliveryError,
                     where: records.Where) -> _Result:
        """A failed attempt: a retry later, its alternative address, or FAIL."""
        now = self.clock()
        plan = after_error(job, e, self.config.rules.retry_rules, now)
        if isinstance(plan, TryAlternative):
            log.warning("%s to %s failed for good: %s; trying its alternative address %s", claimed.name, job.address,
                        e.text, plan.address)
            return _Result(claimed, records.to_alternative(cf, self.node, e.code, e.klass, e.text, now, where),
                           Destination.BACK, "retried")
        if isinstance(plan, GiveUp):
            return self._failed(claimed, cf, e.code, e.klass, e.text, where)
        log.info("%s to %s: retry in %d s%s: %s", claimed.name, job.address, plan.wait,
                 " through retry_relay" if plan.relay else "", e.text)
        return _Result(claimed, records.retry(cf, self.node, e.code, e.klass, e.text, now, now + plan.wait, where),
                       Destination.BACK, "retried")

    def _hand_back(self, claimed: Claimed) -> Path | None:
        try:
            path = self.spool.hand_back(claimed)
        except OSError as e:
            log.error("%s: cannot hand the job back: %s; it stays in ACTIVE", claimed.path, e.strerror)
            return None
        self.stats.handed_back += 1
        return path

    def _finish_parked(self) -> None:
        # A result committed but not yet moved (a write failed after the
        # commit): move it now rather than at the next start.
        try:
            # Only committed results: with workers, a result not yet committed
            # may be another worker's, written a moment ago.
            self.spool.finish_committed(self.node, drop_uncommitted=False)
            self._parked = False
        except OSError as e:
            log.error("cannot move finished jobs out of ACTIVE yet: %s", e.strerror)

    # --- shutdown ------------------------------------------------------------

    def _close_idle(self) -> None:
        for conns in list(self._idle.values()):
            for conn in conns:
                if conn.handoff is not None and not conn.handoff.done():
                    conn.handoff.set_result(None)

    async def _shutdown(self) -> None:
        self.stopping = True
        self._close_idle()
        if self._host_lookup is not None:
            self._host_lookup.cancel()
        for task in list(self._lookups):
            task.cancel()
        await asyncio.gather(*self._lookups, return_exceptions=True)
        for items in self._resolving.values():
            for item in items:
                self._hand_back(item.claimed)
        self._resolving.clear()
        tasks = [c.task for c in self._connections if c.task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=self.config.shutdown_grace)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await self._results_settled()
        if self._syncer is not None:
            self._syncer.close()
            self._syncer = None
        if self._owed:
            log.error("%d job result(s) could not be written (the disk is full?): they stay in %s and come back "
                      "at this node's next start", len(self._owed), self.spool.active_dir(self.node))
        self.spool.drop_spares()


def _relay_target(relay: RelayConfig | None, password: str | None) -> _Target | None:
    if relay is None:
        return None
    # The TLS context is made even for starttls: never: a job with
    # $email_options useTLS or reqTLS uses STARTTLS wherever it is offered.
    tls = make_tls_context(relay.tls_verify, relay.ca_file)
    login = (relay.username, password or "") if relay.username is not None else None
    return _Target(relay.host, relay.port, resolve_relay(relay.host, relay.port), (relay.host,), relay.starttls, tls,
                   True, login=login)


def _starttls_for(target: _Target, job: Job) -> str:
    """The STARTTLS mode of a connection for ``job``: the target's, except
    that $email_options useTLS or reqTLS use STARTTLS wherever it is offered."""
    if target.starttls == "never" and job.options & {"usetls", "reqtls"}:
        return "auto"
    return target.starttls


def _settle(done: asyncio.Future[None] | None) -> None:
    if done is not None and not done.done():
        done.set_result(None)


def _job_error_text(e: JobError) -> str:
    """EMAIL_ERROR for a bad job: the message and the line, not the ACTIVE path."""
    return f"line {e.line}: {e.message}" if e.line is not None else e.message
