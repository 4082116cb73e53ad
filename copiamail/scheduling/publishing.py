"""A scheduler's live state, published into the spool about once a second
(:mod:`copiamail.spool.livestate`), so that ``status`` shows what every node
is doing: its connections per limit key and per domain, its counters, and
how long its SMTP transactions took."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

from copiamail.scheduling.connections import Connection
from copiamail.scheduling.results import Stats
from copiamail.spool.livestate import PUBLISH_INTERVAL, KeyState, TransactionTimes, remove_state, write_state

log = logging.getLogger("copiamail")


def snapshot(connections: Iterable[Connection]) -> tuple[dict[str, KeyState], dict[str, int]]:
    """Connections open per limit key (with each key's cap, and the
    configured cap where a learned one is lower) and per recipient domain."""
    open_per_key: Counter[str] = Counter()
    caps: dict[str, tuple[int, int | None, bool]] = {}
    domains: Counter[str] = Counter()
    for conn in connections:
        domains[conn.domain] += 1
        for limit in conn.limits:
            open_per_key[limit.key] += 1
            caps[limit.key] = (limit.cap, limit.ceiling, limit.shared)
    keys = {key: KeyState(n, *caps[key]) for key, n in sorted(open_per_key.items())}
    return keys, dict(sorted(domains.items()))


async def publish_live_state(root: Path, node: str, worker: int, connections: Iterable[Connection],
                             stats: Callable[[], Stats], transactions: TransactionTimes,
                             clock: Callable[[], float]) -> None:
    """Publish until cancelled, then remove the published file. A write that
    fails (a full disk) is logged once and tried again a second later: it
    never stops the node."""
    failing = False
    try:
        while True:
            keys, domains = snapshot(connections)
            try:
                write_state(root, node, worker, clock(), dataclasses.asdict(stats()), keys, domains, transactions)
                failing = False
            except OSError as e:
                if not failing:
                    log.warning("%s: cannot publish this node's live state: %s", root, e.strerror)
                failing = True
            await asyncio.sleep(PUBLISH_INTERVAL)
    finally:
        try:
            remove_state(root, node, worker)
        except OSError:
            pass
