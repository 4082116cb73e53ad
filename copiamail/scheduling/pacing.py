"""Message rates: the starts of messages spaced so that no rate is exceeded.

Each rate a message is counted against (a :class:`~copiamail.scheduling.limits.Pace`:
a key and the spacing its ``max_message_rate`` gives, or a rate learned from
throttle replies) has the earliest instant its next message may start. A
message about to start waits until every one of its rates allows it, then
takes the start: each rate's next instant becomes *now* plus its spacing.
Checking and taking happen with no await between them (one event loop), and
the next instant counts from the real start, so a late wake-up only widens a
gap, never narrows the next one. Starts at least ``period / N`` apart put at
most N in any window of the period, so the rate holds in every window, not
only on average; the receiver sees them a little jittered, so the spacing is
kept a little wider than that (:data:`SLACK`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence

from copiamail.scheduling.limits import Pace

SLACK = 1.02


class Pacer:
    """The next free instant of every rate (used from one event loop)."""

    def __init__(self, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._monotonic = monotonic
        self._next: dict[str, float] = {}

    def wait_for(self, paces: Sequence[Pace]) -> float:
        """Seconds until every one of ``paces`` allows a start (0: now)."""
        now = self._monotonic()
        return max([0.0, *(self._next.get(p.key, now) - now for p in paces)])

    def take(self, paces: Sequence[Pace]) -> None:
        """A message starts now under ``paces``."""
        now = self._monotonic()
        for p in paces:
            self._next[p.key] = now + p.spacing * SLACK

    def hold(self, key: str, seconds: float) -> None:
        """No start counted against ``key`` for ``seconds`` from now."""
        now = self._monotonic()
        self._next[key] = max(self._next.get(key, now), now + seconds)

    async def start(self, paces: Sequence[Pace], before_long_wait: Callable[[], Awaitable[None]],
                    long_wait: float = 20.0) -> None:
        """Wait until ``paces`` allow a start, and take it. Before a wait
        longer than ``long_wait`` seconds, ``before_long_wait()`` is awaited
        (the connection is closed: receivers drop idle ones)."""
        closed = False
        while (wait := self.wait_for(paces)) > 0:
            if wait > long_wait and not closed:
                closed = True
                await before_long_wait()
                continue
            await asyncio.sleep(wait)
        self.take(paces)
