"""Which due job goes next, over which connection, and who gets a freed slot.

The loop: scan the TOSEND folders in queue order (on start, on a watcher
wake-up, on a timer, and when a retry falls due). Each due job is claimed and
then either

- handed to an idle open connection for its domain and binding,
- started on a new connection, when every limit that applies has room
  (:func:`~copiamail.limits.limits_for`; the slots are taken all or none), or
- deferred (SPEC 3): written back to its own folder with DOMAINBUSY_COUNT
  incremented, and remembered as *waiting* on the limit that was full.

A waiting job is not taken up by later scans. It is offered a slot when one
frees, in queue order (folder priority, then name): a connection that finishes
a message takes the next waiting job for its domain; a connection that closes
offers each of its keys to one waiting job. So a job is deferred about once
per wait, and nothing polls (DESIGN: "no busy loops"). A periodic scan still
checks waiting jobs, so a lost wake-up costs one scan interval, not a stuck job.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import outcome, records
from .config import BindingConfig, Config
from .delivery import Delivered, SessionSettings, SmtpSession, make_tls_context, resolve_relay
from .errors import DeliveryError, JobError
from .fsfile import CommandFile
from .job import Job, parse_job
from .limits import Limit, LocalLimiter, bindings_for, limits_for
from .message import build_message
from .spool import FAIL, SENT, Claimed, Spool, Waiting

log = logging.getLogger("copiamail")

_SCAN_YIELD_EVERY = 64


@dataclass
class Stats:
    sent: int = 0
    failed: int = 0
    retried: int = 0
    deferred: int = 0
    handed_back: int = 0


@dataclass(eq=False)
class _WaitEntry:
    order: tuple[int, bytes]
    waiting: Waiting
    job: Job
    active: bool = True

    def __lt__(self, other: "_WaitEntry") -> bool:
        return self.order < other.order


@dataclass(eq=False)
class _Item:
    claimed: Claimed
    cf: CommandFile
    job: Job


@dataclass(eq=False)
class _Connection:
    domain: str
    binding: BindingConfig | None
    limits: tuple[Limit, ...]
    session: SmtpSession
    handoff: "asyncio.Future[_Item | None] | None" = None
    task: "asyncio.Task[None] | None" = None


@dataclass(frozen=True)
class _Blocked:
    limit: Limit


@dataclass(eq=False)
class _Start:
    binding: BindingConfig | None
    limits: tuple[Limit, ...] = ()
    reuse: _Connection | None = None


@dataclass
class _PeekCache:
    entries: dict[Path, tuple[tuple[int, int, int], Job | None, JobError | None]] = field(default_factory=dict)


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
    ) -> None:
        self.config = config
        self.spool = spool
        self.node = node
        self.password = password
        self.clock = clock
        self.on_event = on_event or (lambda kind, name: None)
        self.limiter = LocalLimiter()
        self.stats = Stats()
        self.stopping = False
        self._wake: asyncio.Event | None = None
        self._connections: set[_Connection] = set()
        self._idle: dict[str, list[_Connection]] = {}
        self._waiting: dict[Path, _WaitEntry] = {}
        self._heaps: dict[str, list[_WaitEntry]] = {}
        self._caps: dict[str, int] = {}
        self._by_domain: dict[str, list[_WaitEntry]] = {}
        self._peek = _PeekCache()
        self._parked = False
        relay = config.relay
        self._host_ips: tuple[str, ...] = ()
        self._host_names: tuple[str, ...] = ()
        self._tls: ssl.SSLContext | None = None
        if relay is not None:
            self._host_names = (relay.host,)
            self._host_ips = resolve_relay(relay.host, relay.port)
            self._tls = make_tls_context(relay.tls_verify, relay.ca_file) if relay.starttls != "never" else None

    # --- public --------------------------------------------------------------

    def wake(self) -> None:
        """A hint that the spool changed (from the watcher, via the loop)."""
        if self._wake is not None:
            self._wake.set()

    def request_stop(self) -> None:
        """Take no new job; in-flight sends get shutdown_grace seconds."""
        self.stopping = True
        self.wake()

    @property
    def in_flight(self) -> int:
        return len(self._connections)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    async def run(self, drain: bool = False) -> Stats:
        """Run until :meth:`request_stop`, or with ``drain`` until no job is due
        and none is in flight. Then shut down as SPEC 6 says."""
        self._wake = asyncio.Event()
        try:
            while not self.stopping:
                self._wake.clear()
                found, next_due = await self._scan()
                if drain and not found and not self._waiting:
                    if not self._connections:
                        break
                    self._close_idle()
                timeout = self.config.scan_interval
                if next_due is not None:
                    timeout = max(0.01, min(timeout, next_due - self.clock()))
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout)
                except asyncio.TimeoutError:
                    pass
                # Let a burst of watcher events and finishing sends settle into one scan.
                await asyncio.sleep(0.01)
        finally:
            await self._shutdown()
        return self.stats

    # --- scanning ------------------------------------------------------------

    def _peeked(self, w: Waiting) -> tuple[Job | None, JobError | None] | None:
        try:
            st = w.path.stat()
        except FileNotFoundError:
            return None
        sig = (st.st_ino, st.st_mtime_ns, st.st_size)
        cached = self._peek.entries.get(w.path)
        if cached is not None and cached[0] == sig:
            return cached[1], cached[2]
        try:
            cf = CommandFile.read(w.path)
        except FileNotFoundError:
            return None
        except OSError as e:
            log.warning("%s: cannot read: %s", w.path, e.strerror)
            return None
        try:
            job, err = parse_job(cf, w.name), None
        except JobError as e:
            job, err = None, e
        self._peek.entries[w.path] = (sig, job, err)
        return job, err

    async def _scan(self) -> tuple[int, float | None]:
        """Start or defer every due job not already waiting; returns how many
        were taken up and when the next not-yet-due job falls due."""
        now = self.clock()
        found = 0
        next_due: float | None = None
        seen: set[Path] = set()
        for i, w in enumerate(self.spool.scan()):
            if self.stopping:
                break
            if i % _SCAN_YIELD_EVERY == _SCAN_YIELD_EVERY - 1:
                # A large backlog must not starve the connections already open.
                await asyncio.sleep(0)
            seen.add(w.path)
            if w.path in self._waiting:
                continue
            peeked = self._peeked(w)
            if peeked is None:
                continue
            job, _ = peeked
            if job is not None and not job.is_due(now):
                if job.next_attempt is not None and (next_due is None or job.next_attempt < next_due):
                    next_due = job.next_attempt
                continue
            claimed = self.spool.claim(w, self.node)
            if claimed is None:
                continue
            found += 1
            self._dispatch(claimed)
        for path in [p for p in self._peek.entries if p not in seen]:
            del self._peek.entries[path]
        self._recheck_waiting()
        return found, next_due

    def _recheck_waiting(self) -> None:
        # The safety net for a lost wake-up: drop waiting jobs whose file is
        # gone, and offer any key that has room.
        for path, entry in list(self._waiting.items()):
            if not path.exists():
                entry.active = False
                del self._waiting[path]
        self._offer([k for k in self._heaps if self.limiter.in_use(k) < self._caps.get(k, 0)])
        if self._parked:
            self._finish_parked()

    # --- dispatch ------------------------------------------------------------

    def _bindings_for(self, job: Job) -> list[BindingConfig | None]:
        try:
            return bindings_for(self.config, job.binding, job.binding_group)
        except KeyError as e:
            raise JobError(str(e.args[0]), outcome.BAD_JOB.code) from None

    def _open_count(self, binding: BindingConfig | None) -> int:
        return sum(1 for c in self._connections if c.binding is binding)

    def _choose(self, job: Job) -> _Start | _Blocked:
        candidates = self._bindings_for(job)
        for conn in self._idle.get(job.domain, ()):
            if conn.binding in candidates and conn.handoff is not None and not conn.handoff.done():
                return _Start(conn.binding, conn.limits, reuse=conn)
        blocked: Limit | None = None
        for b in sorted(candidates, key=lambda b: (self._open_count(b), b.name if b else "")):
            limits = limits_for(self.config, self.node, job.address, job.domain, b, self._host_ips, self._host_names)
            full = self.limiter.try_acquire(limits)
            if full is None:
                return _Start(b, limits)
            blocked = blocked or full
        assert blocked is not None
        return _Blocked(blocked)

    def _dispatch(self, claimed: Claimed) -> None:
        """Send, hand off or defer a job this node has just claimed."""
        try:
            cf = self.spool.read(claimed)
        except OSError as e:
            log.error("%s: cannot read claimed job: %s", claimed.path, e.strerror)
            return
        try:
            job = parse_job(cf, claimed.name)
            choice = self._choose(job)
        except JobError as e:
            self._finish_failed(claimed, cf, e.outcome, outcome.FAILURE, _job_error_text(e))
            return
        if isinstance(choice, _Blocked):
            self._defer(claimed, cf, job, choice.limit)
        else:
            self._start(choice, _Item(claimed, cf, job))

    def _start(self, choice: _Start, item: _Item) -> None:
        if choice.reuse is not None:
            assert choice.reuse.handoff is not None
            choice.reuse.handoff.set_result(item)
            return
        conn = _Connection(item.job.domain, choice.binding, choice.limits, SmtpSession(self._settings(choice.binding)))
        self._connections.add(conn)
        conn.task = asyncio.get_running_loop().create_task(self._run_connection(conn, item))

    def _settings(self, binding: BindingConfig | None) -> SessionSettings:
        relay = self.config.relay
        assert relay is not None
        return SessionSettings(
            host=relay.host, port=relay.port,
            source_address=binding.bind_address if binding is not None else None,
            starttls=relay.starttls, tls_context=self._tls,
            username=relay.username, password=self.password,
            timeout=self.config.smtp_timeout, helo_name=self.config.helo_name,
        )

    def _defer(self, claimed: Claimed, cf: CommandFile, job: Job, limit: Limit) -> None:
        try:
            path = self.spool.finish(claimed, records.deferred(cf, job.domainbusy_count), "BACK")
            self.stats.deferred += 1
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
        w = Waiting(self.spool.priority(claimed.queue), claimed.queue, path.name, path)
        entry = _WaitEntry(w.order, w, job)
        self._waiting[w.path] = entry
        self._caps[limit.key] = limit.cap
        heapq.heappush(self._heaps.setdefault(limit.key, []), entry)
        heapq.heappush(self._by_domain.setdefault(job.domain, []), entry)
        self._release_idle_holding(limit.key)

    def _release_idle_holding(self, key: str) -> None:
        # An idle connection that holds the full key closes, so its slot can
        # go to the job that waits for it.
        for conns in self._idle.values():
            for conn in conns:
                if conn.handoff is not None and not conn.handoff.done() and any(l.key == key for l in conn.limits):
                    conn.handoff.set_result(None)
                    return

    def _take(self, entry: _WaitEntry) -> Claimed | None:
        """Claim a waiting job; it stops waiting either way."""
        entry.active = False
        self._waiting.pop(entry.waiting.path, None)
        return self.spool.claim(entry.waiting, self.node)

    def _offer_key(self, key: str) -> None:
        """A slot of ``key`` freed: offer it to the first waiting job that can use it."""
        heap = self._heaps.get(key)
        while heap:
            entry = heapq.heappop(heap)
            if not entry.active:
                continue
            try:
                choice = self._choose(entry.job)
            except JobError:
                choice = _Start(None)  # claim it; _dispatch fails it properly
                claimed = self._take(entry)
                if claimed is not None:
                    self._dispatch(claimed)
                continue
            if isinstance(choice, _Blocked):
                self._caps[choice.limit.key] = choice.limit.cap
                heapq.heappush(self._heaps.setdefault(choice.limit.key, []), entry)
                if choice.limit.key == key:
                    break
                continue
            claimed = self._take(entry)
            if claimed is None:
                if choice.reuse is None:
                    self.limiter.release(choice.limits)
                continue
            self._start_claimed(choice, claimed)
            break
        if heap is not None and not heap:
            self._heaps.pop(key, None)

    def _start_claimed(self, choice: _Start, claimed: Claimed) -> None:
        try:
            cf = self.spool.read(claimed)
            job = parse_job(cf, claimed.name)
        except (OSError, JobError):
            if choice.reuse is None:
                self.limiter.release(choice.limits)
            self._dispatch(claimed)
            return
        if choice.reuse is not None and job.domain != choice.reuse.domain:
            self._dispatch(claimed)
            return
        self._start(choice, _Item(claimed, cf, job))

    def _next_for(self, conn: _Connection) -> tuple[_Item | None, bool]:
        """What a connection does after a message: ``(item, False)`` carry the
        next waiting job of its domain; ``(None, True)`` close, because a job of
        another domain that waits on a slot it holds comes first in queue order
        (SPEC 3: freed slots go to waiting jobs in queue order); ``(None,
        False)`` nothing waits for it."""
        heap = self._by_domain.get(conn.domain)
        skipped: list[_WaitEntry] = []
        own: _WaitEntry | None = None
        while heap:
            entry = heapq.heappop(heap)
            if not entry.active:
                continue
            if self._can_use(conn, entry.job):
                own = entry
                break
            skipped.append(entry)
        for entry in skipped:
            heapq.heappush(self._by_domain.setdefault(conn.domain, []), entry)
        if heap is not None and not heap and own is None:
            self._by_domain.pop(conn.domain, None)
        other = self._first_other(conn)
        if own is not None and (other is None or own.order <= other.order):
            item = self._claim_for(conn, own)
            if item is not None:
                return item, False
            return self._next_for(conn)
        if own is not None:
            heapq.heappush(self._by_domain.setdefault(conn.domain, []), own)
        return None, other is not None

    def _head(self, key: str) -> _WaitEntry | None:
        heap = self._heaps.get(key)
        while heap and not heap[0].active:
            heapq.heappop(heap)
        if heap is not None and not heap:
            self._heaps.pop(key, None)
            return None
        return heap[0] if heap else None

    def _first_other(self, conn: _Connection) -> _WaitEntry | None:
        """The first waiting job, in queue order, that waits on a slot this
        connection holds and cannot ride on it."""
        best: _WaitEntry | None = None
        for limit in conn.limits:
            head = self._head(limit.key)
            if head is None or (head.job.domain == conn.domain and self._can_use(conn, head.job)):
                continue
            if best is None or head.order < best.order:
                best = head
        return best

    def _offer(self, keys: list[str]) -> None:
        """Slots of ``keys`` freed: offer them to waiting jobs, the earliest in
        queue order first."""
        pending = set(keys)
        while pending:
            heads = [(h.order, k) for k in pending if (h := self._head(k)) is not None]
            if not heads:
                return
            _, key = min(heads)
            pending.discard(key)
            self._offer_key(key)

    def _can_use(self, conn: _Connection, job: Job) -> bool:
        try:
            return conn.binding in self._bindings_for(job)
        except JobError:
            return True  # take it: _dispatch fails it with the reason

    def _claim_for(self, conn: _Connection, entry: _WaitEntry) -> _Item | None:
        """Claim a waiting job to ride on an open connection; None if it cannot."""
        claimed = self._take(entry)
        if claimed is None:
            return None
        try:
            cf = self.spool.read(claimed)
            job = parse_job(cf, claimed.name)
        except (OSError, JobError):
            self._dispatch(claimed)
            return None
        if job.domain != conn.domain:
            self._dispatch(claimed)
            return None
        return _Item(claimed, cf, job)

    # --- connections ---------------------------------------------------------

    async def _run_connection(self, conn: _Connection, item: _Item | None) -> None:
        """Carry jobs over one connection until none is left for it. Whatever
        happens (cancellation, a bug), a claimed job this task holds is either
        attempted or handed back: it is never left in ACTIVE."""
        try:
            while item is not None and not self.stopping:
                if conn.session.messages >= self.config.messages_per_connection:
                    await conn.session.close()
                await self._attempt(conn, item)
                item = None
                if self.stopping:
                    break
                item, close = self._next_for(conn)
                if item is None and not close:
                    item = await self._idle_wait(conn)
            if item is None:
                await conn.session.close()
        except asyncio.CancelledError:
            conn.session.abort()
            raise
        except Exception:  # noqa: BLE001 - a bug must not strand the jobs
            log.exception("connection for %s failed", conn.domain)
            conn.session.abort()
        finally:
            if item is not None:
                conn.session.abort()
                self._hand_back(item.claimed)
            self.limiter.release(conn.limits)
            self._connections.discard(conn)
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
        except asyncio.TimeoutError:
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

    async def _attempt(self, conn: _Connection, item: _Item) -> None:
        """One delivery attempt; the job ends in SENT, FAIL or back in its folder.
        A cancellation propagates with the job still claimed (the caller hands
        it back)."""
        claimed, cf, job = item.claimed, item.cf, item.job
        now = self.clock()
        try:
            data = build_message(job, spool_root=self.spool.root, attachment_roots=self.config.roots, sender=self._sender(job), now=now)
            result = await conn.session.send(self._sender(job), job.address, data)
        except JobError as e:
            self._finish_failed(claimed, cf, e.outcome, outcome.FAILURE, _job_error_text(e))
        except DeliveryError as e:
            self._finish_error(claimed, cf, job, e)
        except Exception as e:  # noqa: BLE001 - a bug: retry later rather than lose or spin
            log.exception("%s: internal error", claimed.name)
            conn.session.abort()
            self._finish_error(claimed, cf, job, DeliveryError(
                outcome.INTERNAL.code, outcome.INTERNAL.klass, f"internal error: {type(e).__name__}: {e}", False))
        else:
            self._finish_sent(claimed, cf, result)

    def _sender(self, job: Job) -> str:
        return job.esender or self.config.rules.esender or self.config.esender

    # --- outcomes ------------------------------------------------------------

    def _write(self, claimed: Claimed, cf: CommandFile, dest: str) -> bool:
        try:
            self.spool.finish(claimed, cf, dest)
            return True
        except OSError as e:
            # A full disk must not lose the job: it stays in ACTIVE (claimed, or
            # committed and parked); the next scan retries a parked result and
            # the next start of this node recovers a claimed one.
            log.error("%s: cannot write the job's result: %s; it stays in ACTIVE", claimed.path, e.strerror)
            self._parked = True
            return False

    def _finish_sent(self, claimed: Claimed, cf: CommandFile, result: Delivered) -> None:
        if self._write(claimed, records.delivered(cf, self.node, result.reply, result.ip, result.bytecount, self.clock()), SENT):
            self.stats.sent += 1
            self.on_event("sent", claimed.name)

    def _finish_failed(self, claimed: Claimed, cf: CommandFile, code: int, klass: str, text: str) -> None:
        log.warning("%s: failed: %s", claimed.name, text)
        if self._write(claimed, records.failed(cf, self.node, code, klass, text, self.clock()), FAIL):
            self.stats.failed += 1
            self.on_event("failed", claimed.name)

    def _finish_error(self, claimed: Claimed, cf: CommandFile, job: Job, e: DeliveryError) -> None:
        if e.permanent:
            self._finish_failed(claimed, cf, e.code, e.klass, e.text)
            return
        delays = outcome.delays_for(e.klass, job.retry_delays, self.config.rules.retry_delays)
        earlier = [a.klass for a in job.attempts if a.counts_as_retry]
        wait = outcome.retry_delay(e.klass, earlier, delays, self.config.rules.retry_max)
        if wait is None:
            self._finish_failed(claimed, cf, e.code, e.klass, e.text)
            return
        now = self.clock()
        if self._write(claimed, records.retry(cf, self.node, e.code, e.klass, e.text, now, now + wait), "BACK"):
            self.stats.retried += 1
            self.on_event("retried", claimed.name)

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
            self.spool.finish_committed(self.node)
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
        tasks = [c.task for c in self._connections if c.task is not None]
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=self.config.shutdown_grace)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


def _job_error_text(e: JobError) -> str:
    """EMAIL_ERROR for a bad job: the message and the line, not the ACTIVE path."""
    return f"line {e.line}: {e.message}" if e.line is not None else e.message
