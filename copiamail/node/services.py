"""What a node's own process runs besides scheduling: the heartbeat (taking
over dead peers' jobs), the spool watcher and the signals; the same with or
without worker processes (with workers, in the supervisor)."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from copiamail.config import Config
from copiamail.spool.peers import Peers, heartbeat_interval
from copiamail.spool.queue import Spool
from copiamail.spool.watcher import SpoolWatcher

log = logging.getLogger("copiamail")


async def beat(peers: Peers, interval: float) -> None:
    """Move the heartbeat on every ``interval`` seconds until cancelled."""
    while True:
        peers.beat()
        await asyncio.sleep(interval)


async def watch_peers(peers: Peers, on_takeover: Callable[[], None], interval: float) -> None:
    """Take over dead peers' jobs until cancelled, ``on_takeover`` after each
    takeover. The check runs in a thread: recovering a large takeover folder
    takes long, and meanwhile this node must go on beating (or others would
    take it for dead) and sending. ``peers`` has a spool of its own for that
    (:func:`node_services`): recovery writes through that spool's spares,
    never through the scheduler's."""
    while True:
        if await asyncio.to_thread(peers.check):  # never raises
            on_takeover()
        await asyncio.sleep(interval)


@asynccontextmanager
async def node_services(config: Config, spool: Spool, node: str, on_takeover: Callable[[], None],
                        on_stop: Callable[[], None], on_path: Callable[[str, bool], None],
                        on_reload: Callable[[], None], started: float | None = None) -> AsyncIterator[None]:
    """What a node's own process runs besides scheduling, for the block: the
    heartbeat (``on_takeover`` when a dead peer's jobs came back), SIGTERM and
    SIGINT (``on_stop``), SIGHUP (``on_reload``: log file and configuration)
    and the spool watcher (``on_path(path, written)`` for each event; the job
    files changed since ``started``, the node's start by ``time.time()``, are
    told of once it watches). SIGHUP
    is ignored before and after the block; the caller ignores it before
    starting any child process (see :func:`ignore_hangups`)."""
    loop = asyncio.get_running_loop()
    peers = Peers(Spool(config.spool, config.queues, config.fsync), node, config.node_stale_after)
    interval = heartbeat_interval(peers.stale_after)
    beating = [loop.create_task(beat(peers, interval)), loop.create_task(watch_peers(peers, on_takeover, interval))]
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop)
    watcher = SpoolWatcher([spool.folder(q) for q in spool.queue_folders()], on_path, polling=config.watcher != "native",
                           since=started)
    # Started while SIGHUP is still ignored here, so the watcher inherits that
    # from its first instruction on (a handled signal is reset by exec).
    watcher.start(loop)
    loop.add_signal_handler(signal.SIGHUP, on_reload)
    try:
        yield
    finally:
        for task in beating:
            task.cancel()
        await asyncio.gather(*beating, return_exceptions=True)
        peers.stop()
        watcher.stop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        loop.remove_signal_handler(signal.SIGHUP)
        ignore_hangups()  # removing the handler restored the default, which kills


def ignore_hangups() -> None:
    """Ignore SIGHUP in this process and in every child it starts from now on
    (forked workers and the syncer inherit it, and so does the watcher: an
    ignored signal stays ignored across exec). A terminal that hangs up (an
    SSH session closed) sends SIGHUP to the whole foreground process group;
    a node must not die of it, nor lose a worker mid-send."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
