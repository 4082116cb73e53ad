"""The limiter: counts the slots of limit keys that open connections hold.

:class:`Limiter` is the one interface the scheduler talks to; the node (or a
test) chooses what stands behind it. :class:`LocalLimiter` counts inside one
process, and with a table in shared memory for a node's workers together; the
cluster's limiter (leases in Redis that expire, so a dead node's slots come
back) is a :class:`LocalLimiter` with cluster keys besides.

With workers, the keys that count connections of several domains (a
:class:`~copiamail.scheduling.limits.Limit` marked ``shared``) are counted
once for the node, in :class:`~.shared_slots.SharedSlots`, so any worker may
use a shared cap in full; :meth:`LocalLimiter.watch_shared` tells the
scheduler when a slot another worker held has freed, and which of its own
slots other workers' jobs wait on. While they wait, the cap is split: a worker
that holds more than half of it lets each connection under it close at the end
of its turn (:meth:`Limiter.yields`), and one that holds half (rounded up;
of an odd cap, rounded down when it was the last to give a slot back, so the
slot over the halves goes round and is never left unused by both) leaves a
slot it frees to them (:meth:`Limiter.leaves`; its
:meth:`~LocalLimiter.try_acquire` counts such a slot as full), so a domain that
fills a shared cap does not keep another worker's domain out until it is done.

The rules every limiter keeps: a connection takes one slot of every key that
applies to it, in the order given, all or none; it gives them back when it
closes; a cap is the ``cap`` of the :class:`~copiamail.scheduling.limits.Limit`
asked for, so a cap lowered below the slots in use closes nothing, it only
stops new connections until the count falls under it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Protocol

from copiamail.scheduling.limits import Limit, is_cluster_key
from copiamail.scheduling.shared_slots import SharedSlots

log = logging.getLogger("copiamail")

SHARED_POLL = 0.02  # seconds between two looks at the shared table while jobs wait on it


class Limiter(Protocol):
    """Counts slots per limit key (used from one event loop)."""

    def try_acquire(self, limits: Sequence[Limit]) -> Limit | None:
        """Take a slot of every limit, or of none; returns the first full
        limit (in the order given) when it takes none."""
        ...

    def release(self, limits: Sequence[Limit]) -> None:
        """Give back one slot of every limit (a connection closed)."""
        ...

    def in_use(self, key: str) -> int:
        """How many slots of ``key`` are held."""
        ...

    def force_acquire(self, limits: Sequence[Limit]) -> None:
        """Count a slot of every limit whatever its cap: a connection already
        open turned out to fall under limits it did not know of when it opened
        (a host name learned late). The count is then true, and no new
        connection opens until it is back under the cap."""
        ...

    def yields(self, key: str, cap: int) -> bool:
        """Whether a connection holding a slot of ``key`` should close at the
        end of its turn: other workers' jobs wait on ``key`` and this process
        holds more than half of ``cap``."""
        ...

    def leaves(self, key: str, cap: int) -> bool:
        """Whether a freed slot of ``key`` is left to other workers' jobs that
        wait on it: this process holds half of ``cap`` (rounded down) already,
        so a cap of 1 goes from worker to worker, a turn each."""
        ...

    def greeted_elsewhere(self, key: str) -> int:
        """Connections holding ``key`` that the node's other workers have open
        past their greeting, as they last told (0 for a key no other worker
        counts)."""
        ...


class LocalLimiter:
    """A :class:`Limiter` inside one process (one event loop), or one worker's
    part of a node: with ``shared``, the shared keys are counted in that
    table, for worker ``worker`` of the node."""

    def __init__(self, shared: SharedSlots | None = None, worker: int = 0) -> None:
        self._used: dict[str, int] = {}  # this process's connections per key
        self._shared = shared
        self._worker = worker
        self._in_table: set[str] = set()  # keys counted in the shared table
        self._wanted: set[str] = set()  # keys this worker has said its jobs wait on
        self.wanted_elsewhere: set[str] = set()  # keys held here that other workers' jobs wait on
        self._greeted_told: dict[str, int] = {}  # this worker's greeted connections by key, as told to the table

    def _table_keys(self, limits: Sequence[Limit]) -> list[str]:
        if self._shared is None:
            return []
        # Cluster keys are Redis's to count (every node's workers), never the table's.
        keys = [l.key for l in limits if l.shared and not is_cluster_key(l.key)]
        self._in_table.update(keys)
        return keys

    def try_acquire(self, limits: Sequence[Limit]) -> Limit | None:
        # A slot left to other workers' jobs counts as full here: a job of a
        # domain whose own key just freed (a connection that yielded) would
        # otherwise take the shared slot straight back.
        if self.wanted_elsewhere:
            left = next((l for l in limits if self.leaves(l.key, l.cap)), None)
            if left is not None:
                return left
        shared = self._shared
        if shared is None or not self._table_keys(limits):
            return self._take(limits, self._used.get)
        # Check and take under one lock: two workers never both see the last slot free.
        with shared.locked():
            full = self._take(limits, self._count)
            if full is None:
                added: list[str] = []
                for limit in limits:
                    if limit.key in self._in_table:
                        if not shared.add(limit.key, 1):
                            for key in added:
                                shared.add(key, -1)
                            self._forget(limits)
                            return limit
                        added.append(limit.key)
        return full

    def _take(self, limits: Sequence[Limit], used: Callable[[str, int], int]) -> Limit | None:
        need: dict[str, int] = {}
        for limit in limits:
            # A key listed twice takes two slots: check it against both.
            need[limit.key] = need.get(limit.key, 0) + 1
            if used(limit.key, 0) + need[limit.key] > limit.cap:
                return limit
        for limit in limits:
            self._used[limit.key] = self._used.get(limit.key, 0) + 1
        return None

    def _forget(self, limits: Sequence[Limit]) -> None:
        for limit in limits:
            n = self._used.get(limit.key, 0) - 1
            if n > 0:
                self._used[limit.key] = n
            else:
                self._used.pop(limit.key, None)

    def release(self, limits: Sequence[Limit]) -> None:
        shared = self._shared
        if shared is not None and any(l.key in self._in_table for l in limits):
            with shared.locked():
                for limit in limits:
                    if limit.key in self._in_table:
                        shared.add(limit.key, -1)
                        if limit.key in self.wanted_elsewhere:
                            shared.gave(self._worker, limit.key)
        self._forget(limits)

    def in_use(self, key: str) -> int:
        return self._count(key)

    def yields(self, key: str, cap: int) -> bool:
        return key in self.wanted_elsewhere and self._used.get(key, 0) > cap // 2

    def leaves(self, key: str, cap: int) -> bool:
        if key not in self.wanted_elsewhere:
            return False
        used = self._used.get(key, 0)
        if used >= (cap + 1) // 2:
            return True
        return used >= cap // 2 and self._shared is not None and self._shared.last_giver(key) == self._worker

    def greeted_elsewhere(self, key: str) -> int:
        if self._shared is None or key not in self._in_table:
            return 0
        return max(0, self._shared.greeted(key) - self._greeted_told.get(key, 0))

    def _tell_greeted(self, greeted: dict[str, int]) -> None:
        """Write the change from what this worker last told to ``greeted``
        into the table. Under its lock."""
        assert self._shared is not None
        for key in set(greeted) | set(self._greeted_told):
            change = greeted.get(key, 0) - self._greeted_told.get(key, 0)
            if change:
                self._shared.add_greeted(key, change)
        self._greeted_told = dict(greeted)

    def _count(self, key: str, default: int = 0) -> int:
        if key in self._in_table:
            assert self._shared is not None
            return self._shared.held(key)
        return self._used.get(key, default)

    def force_acquire(self, limits: Sequence[Limit]) -> None:
        table = self._table_keys(limits)
        if table:
            assert self._shared is not None
            with self._shared.locked():
                for key in table:
                    self._shared.add(key, 1)
        for limit in limits:
            self._used[limit.key] = self._used.get(limit.key, 0) + 1

    @property
    def waited_in_table(self) -> frozenset[str]:
        """The shared keys this worker's jobs wait on, as :meth:`watch_shared` last found them."""
        return frozenset(self._wanted)

    async def watch_shared(self, waits_on: Callable[[str], bool], on_room: Callable[[], None],
                           greeted_here: Callable[[], dict[str, int]] | None = None) -> None:
        """Until cancelled (only with a shared table): every :data:`SHARED_POLL`
        seconds, tell the table which shared keys this worker's jobs wait on
        (``waits_on(key)``; only the table's keys are asked about, a few, not
        every key a job waits on) and how many of its connections hold each
        past their greeting (``greeted_here()``, by key: read by other workers
        with :meth:`greeted_elsewhere`), learn which of the keys it holds other
        workers wait on (:attr:`wanted_elsewhere`), and call ``on_room()`` when
        a slot was given back anywhere, when other workers wait on its keys,
        or when they stopped waiting on some (what it left them is its own
        again). An error in ``on_room`` is logged and the watch goes on; when
        the watch ends (cancelled, or by any other error), this worker waits on
        nothing in the table any more (else other workers would go on leaving
        it their slots), nor leaves its slots to others, nor counts any
        greeted connection there."""
        shared = self._shared
        if shared is None:
            return
        seen = shared.generation
        try:
            while True:
                await asyncio.sleep(SHARED_POLL)
                wanted = {k for k in self._in_table if waits_on(k)}
                held = [k for k in self._used if k in self._in_table]
                greeted = {} if greeted_here is None else {k: n for k, n in greeted_here().items() if k in self._in_table}
                generation = shared.generation
                if (wanted == self._wanted and generation == seen and not held and not self.wanted_elsewhere
                        and greeted == self._greeted_told):
                    continue
                with shared.locked():
                    shared.want(self._worker, self._wanted - wanted, False)
                    shared.want(self._worker, wanted - self._wanted, True)
                    self._tell_greeted(greeted)
                    elsewhere = shared.wanted_by_others(self._worker, held)
                self._wanted = wanted
                fewer = bool(self.wanted_elsewhere - elsewhere)
                self.wanted_elsewhere = elsewhere
                if generation != seen or elsewhere or fewer:
                    seen = generation
                    try:
                        on_room()
                    except Exception as e:  # a bad turn must not end the watch for good
                        log.error("offering freed shared slots failed: %s: %s", type(e).__name__, e)
        finally:
            # Nobody will say when the others stop waiting: leaving them slots
            # from now on could leave those slots unused for good. Cleared
            # first: the table's own error may have ended the watch, and may
            # come again below.
            self.wanted_elsewhere = set()
            wanted, self._wanted = self._wanted, set()
            with shared.locked():
                shared.want(self._worker, wanted, False)
                self._tell_greeted({})
