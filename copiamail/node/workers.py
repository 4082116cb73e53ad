"""One node as several processes: the supervisor and its workers.

With ``workers: n`` (n > 1) the node's own process is the *supervisor*. It
holds the node's lock, recovers, and runs the node's services
(:func:`~copiamail.node.services.node_services`: heartbeat, spool watcher,
signals); it sends no mail. It forks ``n`` *workers*, each a full
:class:`~copiamail.scheduling.scheduler.Scheduler` with its own event loop.
Worker ``i`` sends only the jobs of the domains given to it (each domain to
the worker with fewest, when first met:
:mod:`~copiamail.scheduling.domain_owners`, a table in shared memory made here
before the fork), so every limit of one domain lives in one process with its
whole cap; a cap shared between domains
is counted for the whole node in a table in shared memory
(:mod:`~copiamail.scheduling.shared_slots`, made here before the fork), so
any worker may use it in full. All
workers claim into the same ``ACTIVE/<node>`` folder: a claim is a rename, so
two workers never hold the same job.

Pipes, one pair per worker, records ending in NUL:

- supervisor to worker: ``H<path>`` a job file renamed into a queue and
  ``W<path>`` one written there in place (watcher events); ``R`` scan the
  whole spool (a dead peer's jobs came back); ``L`` reopen the log file and
  ``C`` read the configuration again (SIGHUP; ``C`` only once the supervisor
  has read it without error); ``Q`` stop. End of file: stop.
- worker to supervisor: ``E<kind>\\t<name>`` a job's outcome (only when
  the node shows a progress line); ``S<field>=<count> ...`` its totals
  (:class:`~copiamail.scheduling.results.Stats`, each field by name), last.

Crashes: a worker dies with the supervisor (``PR_SET_PDEATHSIG`` with
SIGKILL), so no worker outlives the node's lock (which the workers also hold,
by the inherited descriptor). When a worker ends without its totals, the
supervisor stops the others; its claimed jobs are recovered at the node's
next start, as after any crash.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import functools
import logging
import os
import select
import signal
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

from copiamail.config import Config
from copiamail.logs import reopen_log_files
from copiamail.node.reload import ConfigLoader, HandedConfig, on_hangup, taken_over
from copiamail.node.services import node_services
from copiamail.osutil import NulRecords, die_with_parent, write_all
from copiamail.scheduling.domain_owners import DomainOwners
from copiamail.scheduling.scheduler import Scheduler, Stats
from copiamail.scheduling.shared_slots import SharedSlots
from copiamail.spool.held import HeldNames
from copiamail.spool.queue import Spool

log = logging.getLogger("copiamail")

_STATS_FIELDS = frozenset(f.name for f in dataclasses.fields(Stats))


def encode_stats(stats: Stats) -> bytes:
    """A worker's totals as they cross the pipe (without the record's tag):
    ``name=count`` for each field, so both ends agree by name, not by place."""
    return " ".join(f"{name}={count}" for name, count in dataclasses.asdict(stats).items()).encode("ascii")


def decode_stats(data: bytes) -> Stats | None:
    """What :func:`encode_stats` wrote; None if it is not that (a field
    unknown, repeated or missing, or a count that is no number)."""
    counts: dict[str, int] = {}
    for part in data.decode("ascii", "replace").split():
        name, eq, count = part.partition("=")
        if not eq or name not in _STATS_FIELDS or name in counts:
            return None
        try:
            counts[name] = int(count)
        except ValueError:
            return None
    if counts.keys() != _STATS_FIELDS:
        return None
    return Stats(**counts)


@dataclass
class WorkersResult:
    stats: Stats
    failed_workers: list[int] = field(default_factory=list)


@dataclass(eq=False)
class _Worker:
    index: int
    pid: int
    ctl: int  # supervisor to worker (non-blocking)
    out: NulRecords  # worker to supervisor
    stats: Stats | None = None
    ended: bool = False
    pending: list[bytes] = field(default_factory=list)
    scan_owed: bool = False
    blocked: bool = False  # its pipe is full: the rest is written once it can take more


def run_workers(
    config: Config,
    spool: Spool,
    node: str,
    password: str | None,
    drain: bool,
    on_event: Callable[[str, str], None] | None,
    load: ConfigLoader | None = None,
    held: HeldNames | None = None,
    started: float | None = None,
) -> WorkersResult:
    """Fork ``config.worker_count`` workers and supervise them until all have
    ended (drained, or stopped by SIGTERM/SIGINT). Call with the node's lock
    held and its recovery done, before any thread or event loop is started.
    ``held``: the node's filter of the job names it holds in ACTIVE
    (:mod:`copiamail.spool.held`); worker ``i`` claims through row ``i``.
    ``started``: when the node started (``time.time()``), for the spool
    watcher (:func:`~copiamail.node.services.node_services`)."""
    workers: list[_Worker] = []
    supervisor = os.getpid()
    shared = SharedSlots.create()
    owners = DomainOwners.create(config.worker_count)
    for i in range(config.worker_count):
        ctl_r, ctl_w = os.pipe()
        out_r, out_w = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the worker
            code = 70
            try:
                os.close(ctl_w)
                os.close(out_r)
                if held is not None:
                    spool.use_held_names(held.for_process(i))
                for w in workers:
                    os.close(w.ctl)
                    os.close(w.out.fd)
                code = _worker_main(config, spool, node, password, drain, i, ctl_r, out_w, on_event is not None,
                                    supervisor, shared, owners)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stderr.flush()
                os._exit(code)
        os.close(ctl_r)
        os.close(out_w)
        os.set_blocking(ctl_w, False)
        workers.append(_Worker(i, pid, ctl_w, NulRecords(out_r)))
    try:
        asyncio.run(_supervise(config, spool, node, workers, on_event or (lambda kind, job: None), load, started))
    finally:
        for w in workers:
            for fd in (w.ctl, w.out.fd):
                try:
                    os.close(fd)
                except OSError:
                    pass
            _reap(w)
    total = Stats()
    failed = []
    for w in workers:
        if w.stats is None:
            failed.append(w.index)
            continue
        total += w.stats
    return WorkersResult(total, failed)


def _reap(w: _Worker) -> None:
    try:
        _, status = os.waitpid(w.pid, 0)
    except ChildProcessError:
        return
    code = os.waitstatus_to_exitcode(status)
    if code != 0 or w.stats is None:
        log.error("worker %d (pid %d) ended with %s; the jobs it held are recovered at this node's next start",
                  w.index, w.pid, f"signal {-code}" if code < 0 else f"exit code {code}")


# --- the supervisor ------------------------------------------------------------


async def _supervise(
    config: Config,
    spool: Spool,
    node: str,
    workers: list[_Worker],
    on_event: Callable[[str, str], None],
    load: ConfigLoader | None,
    started: float | None,
) -> None:
    loop = asyncio.get_running_loop()
    all_ended = loop.create_future()
    flush_due = False

    def flush() -> None:
        nonlocal flush_due
        flush_due = False
        for w in workers:
            _send(w)

    def tell_all(record: bytes) -> None:
        nonlocal flush_due
        for w in workers:
            if not w.ended:
                w.pending.append(record)
        if not flush_due:
            flush_due = True
            loop.call_soon(flush)

    def stop() -> None:
        tell_all(b"Q")

    handed: list[HandedConfig] = []  # the configuration last handed to the workers

    def reload() -> None:
        nonlocal config
        new = on_hangup(load, lambda: config)
        tell_all(b"L")
        if new is None:
            return
        try:
            made = HandedConfig(new)
        except OSError as e:
            log.error("SIGHUP: the configuration cannot be handed to the workers (%s); the one in force stays", e)
            return
        config = new
        _let_go(handed)
        handed.append(made)
        tell_all(b"C" + os.fsencode(made.path))

    def readable(w: _Worker) -> None:
        records = w.out.read()
        if records is not None:
            for record in records:
                _received(w, record, on_event)
            return
        loop.remove_reader(w.out.fd)
        w.ended = True
        if w.stats is None:
            # It crashed: its jobs wait for recovery; the others stop too, so
            # the next start can recover the whole node.
            stop()
        if all(x.ended for x in workers) and not all_ended.done():
            all_ended.set_result(None)

    for w in workers:
        loop.add_reader(w.out.fd, readable, w)
    try:
        async with node_services(config, spool, node, on_takeover=lambda: tell_all(b"R"), on_stop=stop,
                                 on_path=lambda p, written: tell_all((b"W" if written else b"H") + os.fsencode(p)),
                                 on_reload=reload, started=started):
            await all_ended
    finally:
        _let_go(handed)
        for w in workers:
            if not w.ended:
                loop.remove_reader(w.out.fd)
            if w.blocked:
                loop.remove_writer(w.ctl)


# Records a worker may be owed while its pipe is full (a burst of submissions
# meeting a busy worker). Up to this many wait in memory, in order; beyond it,
# the watcher events among them are replaced by one request to scan. Not
# before: a job a scan finds without its event is not known to have been
# renamed in, so it waits write_settle seconds as a file written in place.
_MAX_OWED = 100_000


def _send(w: _Worker) -> None:
    """Write what the worker is owed without blocking, in writes of at most
    PIPE_BUF bytes of whole records (such a write is all or nothing). When the
    pipe is full, the rest waits and is written as soon as the pipe can take
    it; past ``_MAX_OWED`` records, the watcher events among them are replaced
    by one request to scan (the scan finds those files), and a stop and
    SIGHUP's records are kept."""
    if w.ended or w.blocked or not (w.pending or w.scan_owed):
        return
    records = ([b"R"] if w.scan_owed else []) + w.pending
    w.pending, w.scan_owed = [], False
    i = 0
    while i < len(records):
        first = i
        chunk: list[bytes] = []
        size = 0
        while i < len(records) and size + len(records[i]) + 1 <= select.PIPE_BUF:
            chunk.append(records[i])
            size += len(records[i]) + 1
            i += 1
        if not chunk:
            w.scan_owed = True  # an event for a path too long for one write
            i += 1
            continue
        try:
            os.write(w.ctl, b"".join(r + b"\0" for r in chunk))
        except BlockingIOError:
            left = records[first:]
            if len(left) > _MAX_OWED:
                w.scan_owed = True
                # A stop and SIGHUP's records each once, in order (of handed
                # configurations, the last).
                w.pending = ([b"L"] if b"L" in left else []) + [r for r in left if r[:1] == b"C"][-1:] + (
                    [b"Q"] if b"Q" in left else [])
            else:
                w.pending = left
            w.blocked = True
            asyncio.get_running_loop().add_writer(w.ctl, _writable, w)
            return
        except OSError as e:
            if e.errno == errno.EPIPE:
                return  # it has ended; its reader sees the end of file
            raise


def _let_go(handed: list[HandedConfig]) -> None:
    """Close the configurations handed over before (a worker that has not
    read one yet cannot, and reads the next)."""
    for made in handed:
        made.close()
    handed.clear()


def _writable(w: _Worker) -> None:
    """A full pipe to ``w`` can take more: write what it is owed."""
    asyncio.get_running_loop().remove_writer(w.ctl)
    w.blocked = False
    _send(w)


def _received(w: _Worker, record: bytes, on_event: Callable[[str, str], None]) -> None:
    if record[:1] == b"E":
        kind, _, name = record[1:].partition(b"\t")
        on_event(kind.decode("ascii", "replace"), os.fsdecode(name))
    elif record[:1] == b"S":
        stats = decode_stats(record[1:])
        if stats is not None:
            w.stats = stats


# --- a worker -------------------------------------------------------------------


def _worker_main(config: Config, spool: Spool, node: str, password: str | None, drain: bool,
                 index: int, ctl: int, out: int, report_events: bool, supervisor: int,
                 shared: SharedSlots, owners: DomainOwners) -> int:
    # Where the death signal is missing (not Linux), the end of file on the
    # control pipe still stops the worker.
    if not die_with_parent(supervisor):
        return 1  # the supervisor died before the death signal was set
    events: list[bytes] = []
    write = functools.partial(write_all, out)

    def on_event(kind: str, name: str) -> None:
        if not events:
            asyncio.get_running_loop().call_soon(flush_events)
        events.append(b"E" + kind.encode("ascii") + b"\t" + os.fsencode(name) + b"\0")

    def flush_events() -> None:
        if events:
            write(b"".join(events))
            events.clear()

    scheduler = Scheduler(config, spool, node, password=password, on_event=on_event if report_events else None,
                          worker=index, workers=config.worker_count, shared=shared, owners=owners)
    stats = asyncio.run(_serve_worker(scheduler, drain, ctl))
    flush_events()
    write(b"S" + encode_stats(stats) + b"\0")
    return 0


async def _serve_worker(scheduler: Scheduler, drain: bool, ctl: int) -> Stats:
    loop = asyncio.get_running_loop()
    records = NulRecords(ctl)

    def readable() -> None:
        received = records.read()
        if received is None:
            loop.remove_reader(ctl)
            scheduler.request_stop()  # the supervisor is gone
            return
        for record in received:
            kind = record[:1]
            if kind in (b"H", b"W"):
                scheduler.hint(os.fsdecode(record[1:]), written=kind == b"W")
            elif kind == b"R":
                scheduler.request_scan()
            elif kind == b"L":
                reopen_log_files()
            elif kind == b"C":
                new = taken_over(os.fsdecode(record[1:]))
                if new is not None:
                    scheduler.reconfigure(new)
            elif kind == b"Q":
                scheduler.request_stop()

    os.set_blocking(ctl, False)
    loop.add_reader(ctl, readable)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, scheduler.request_stop)
    try:
        return await scheduler.run(drain=drain)
    finally:
        loop.remove_reader(ctl)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
