"""The limiter: counts the slots of limit keys that open connections hold.

:class:`Limiter` is the one interface the scheduler talks to; the node (or a
test) chooses what stands behind it. :class:`LocalLimiter` counts inside one
process. A limiter shared by a node's workers, or held in Redis for a cluster
(leases that expire, so a dead node's slots come back), or one whose caps
adapt to the replies of a destination, fits behind the same interface.

The rules every limiter keeps: a connection takes one slot of every key that
applies to it, in the order given, all or none; it gives them back when it
closes; a cap is the ``cap`` of the :class:`~copiamail.scheduling.limits.Limit`
asked for, so a cap lowered below the slots in use closes nothing, it only
stops new connections until the count falls under it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from copiamail.scheduling.limits import Limit


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


class LocalLimiter:
    """A :class:`Limiter` inside one process (one event loop: no locking needed)."""

    def __init__(self) -> None:
        self._used: dict[str, int] = {}

    def try_acquire(self, limits: Sequence[Limit]) -> Limit | None:
        need: dict[str, int] = {}
        for limit in limits:
            # A key listed twice takes two slots: check it against both.
            need[limit.key] = need.get(limit.key, 0) + 1
            if self._used.get(limit.key, 0) + need[limit.key] > limit.cap:
                return limit
        for limit in limits:
            self._used[limit.key] = self._used.get(limit.key, 0) + 1
        return None

    def release(self, limits: Sequence[Limit]) -> None:
        for limit in limits:
            n = self._used.get(limit.key, 0) - 1
            if n > 0:
                self._used[limit.key] = n
            else:
                self._used.pop(limit.key, None)

    def in_use(self, key: str) -> int:
        return self._used.get(key, 0)

    def force_acquire(self, limits: Sequence[Limit]) -> None:
        for limit in limits:
            self._used[limit.key] = self._used.get(limit.key, 0) + 1
