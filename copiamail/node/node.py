"""A running node: lock, recovery, watcher, signals, scheduler.

``run_node`` holds the node's lock file (``ACTIVE/<node>.lock``, filelock) for
its whole life, so a second ``node --name N1`` on this machine refuses to start
instead of taking N1's jobs. It recovers N1's interrupted jobs, starts the
watcher, and runs the scheduler until SIGTERM or SIGINT (or, with ``drain``,
until no job is due and none is in flight).

SIGHUP reopens the log file and reloads the configuration
(:mod:`copiamail.node.reload`); with workers, the supervisor reads it first
and tells the workers to follow only if it is good.

With ``workers:`` above 1 the scheduling runs in worker processes instead
(:mod:`copiamail.node.workers`); this process keeps the lock, the recovery and
the node's services (:mod:`copiamail.node.services`: heartbeat, watcher,
signals).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from filelock import FileLock, Timeout

from copiamail.config import Config, read_password
from copiamail.errors import ConfigError, SpoolError
from copiamail.logs import set_log_node
from copiamail.node.reload import ConfigLoader, on_hangup
from copiamail.node.services import ignore_hangups, node_services
from copiamail.node.workers import run_workers
from copiamail.osutil import unordered_metadata
from copiamail.scheduling.cluster import check_cluster
from copiamail.scheduling.scheduler import Scheduler, Stats
from copiamail.smtp.startup import make_tls_context, relay_tls
from copiamail.spool.held import HeldNames, keys_in
from copiamail.spool.peers import IGNORE_LOCKS_ENV, alive_elsewhere
from copiamail.spool.queue import Spool
from copiamail.spool.recovery import RecoveryReport, recover

log = logging.getLogger("copiamail")

# No dots: the lock file ACTIVE/<name>.lock must never be another node's folder.
_NODE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True)
class NodeResult:
    stats: Stats
    recovered: RecoveryReport
    seconds: float
    failed_workers: list[int] = field(default_factory=list)  # worker processes that crashed


def check_node_name(name: str) -> str:
    if not _NODE_NAME.match(name) or name in (".", ".."):
        raise ConfigError(f"bad node name {name!r} (letters, digits, '_' and '-'; at most 64)")
    return name


def run_node(
    config: Config,
    name: str,
    drain: bool = False,
    on_event: Callable[[str, str], None] | None = None,
    load: ConfigLoader | None = None,
) -> NodeResult:
    """Run node ``name`` until stopped (or drained); returns what it did.
    On SIGHUP the log file is reopened and ``load`` (the loader ``config``
    came from) is called for the configuration from then on (None: the
    configuration cannot be reloaded, and SIGHUP says so)."""
    check_node_name(name)
    set_log_node(name)
    ignore_hangups()
    # Job files changed from now on may arrive before the spool watcher is up.
    started_at = time.time()
    password = read_password(config)
    # What every scheduler reads again at its start, checked here once: in
    # worker processes a bad file would not be one clear line.
    read_password(config, "retry_relay")
    check_cluster(config)
    # The TLS contexts connections will use are made here, for the workers
    # forked below to inherit.
    for relay in (config.relay, config.retry_relay):
        if relay is not None:
            relay_tls(relay)
    if config.relay is None:
        make_tls_context(config.mx_tls_verify, None)
    spool = Spool(config.spool, config.queues, config.fsync)
    spool.ensure()
    started = time.monotonic()
    with node_lock(spool, name):
        host = alive_elsewhere(spool, name)
        if host is not None:
            raise SpoolError(f"node {name} is running on {host} (its heartbeat in {spool.root / 'ACTIVE'} moves); "
                             "node names must be unique across machines")
        # Said by a node that starts only: one refused just above says one line.
        for warning in spool_warnings(spool, config.fsync):
            log.warning("%s", warning)
        report = recover(spool, name)
        held = HeldNames.create(config.worker_count)
        held.count_all_in(keys_in(spool.active_dir(name), name))
        if config.worker_count > 1:
            _log_start(config, name)
            result = run_workers(config, spool, name, password, drain, on_event, load, held, started_at)
            done = NodeResult(result.stats, report, time.monotonic() - started, result.failed_workers)
        else:
            spool.use_held_names(held.for_process(0))
            scheduler = Scheduler(config, spool, name, password=password, on_event=on_event)
            _log_start(config, name)
            done = NodeResult(asyncio.run(_serve(config, spool, scheduler, drain, load, started_at)), report,
                              time.monotonic() - started)
    s = done.stats
    log.info("node %s stopped: sent %d, failed %d, retry later %d, deferred %d, handed back %d in %.1f s",
             name, s.sent, s.failed, s.retried, s.deferred, s.handed_back, done.seconds)
    return done


def spool_warnings(spool: Spool, fsync: bool) -> list[str]:
    """What a node says about its spool when it starts: folders any user may
    write into, and (with ``fsync``, which promises jobs that survive a power
    loss) a file system that cannot keep that promise for the moves between
    folders."""
    out = [f"{path}: writable by every user: anyone on this machine can drop, change or remove jobs here"
           for path in spool.writable_by_others()]
    kind = unordered_metadata(spool.root) if fsync else None
    if kind is not None:
        out.append(f"{spool.root}: on an {kind}, which writes folders back in no order: after a power loss "
                   "a job may be left in lost+found, in two folders, or under another job's name; keep the "
                   "spool on a file system with a journal (ext4 with one, xfs)")
    return out


def _log_start(config: Config, name: str) -> None:
    relay = config.relay
    rules = config.rules
    log.info("node %s started: spool %s, %s, limits %s (%d $domain_limit rule(s)), %d worker(s)",
             name, config.spool, f"relay {relay.host}:{relay.port}" if relay else "direct to each domain's MX",
             rules.path or "none", len(rules.domain_limits), config.worker_count)


@contextmanager
def node_lock(spool: Spool, name: str) -> Iterator[None]:
    """Hold node ``name``'s lock file (``ACTIVE/<name>.lock``) for the block;
    SpoolError at once if node ``name`` runs on this spool on this machine."""
    if os.environ.get(IGNORE_LOCKS_ENV):  # test-only: as if every other node ran on another machine
        yield
        return
    lock = FileLock(str(spool.lock_path(name)))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise SpoolError(f"node {name} is already running on this spool ({spool.lock_path(name)} is locked)") from None
    try:
        yield
    finally:
        lock.release()


async def _serve(config: Config, spool: Spool, scheduler: Scheduler, drain: bool, load: ConfigLoader | None,
                 started: float) -> Stats:
    def reload() -> None:
        new = on_hangup(load, lambda: scheduler.config)
        if new is not None:
            scheduler.reconfigure(new)

    async with node_services(config, spool, scheduler.node, on_takeover=scheduler.request_scan,
                             on_stop=scheduler.request_stop, on_path=scheduler.hint, on_reload=reload,
                             started=started):
        return await scheduler.run(drain=drain)
