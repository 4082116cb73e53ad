"""A deadline that moves from wait to wait, watched by one event-loop timer.

A connection waits many times a second (for a reply, for its next job), each
wait with a time limit. Making an asyncio timer for each wait and cancelling
it when the wait ends costs a heap entry the loop must sort past each time
(about 2 µs, three times a message). :class:`Deadline` keeps one timer running
from wait to wait instead: when it fires it calls ``on_due`` only if a wait is
on and that wait's deadline has come; a wait whose deadline lies further on
sets the timer again for it. The timer is only made anew when a wait's
deadline comes before it (a shorter limit than the last).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Deadline:
    """The deadline of the wait now on, if any (used from one event loop);
    ``on_due`` is called once a wait's deadline has come while it is on."""

    def __init__(self, on_due: Callable[[], None]) -> None:
        self._on_due = on_due
        self._when: float | None = None  # by the loop's clock; None: no wait on
        self._timer: asyncio.TimerHandle | None = None
        self._cancelled = False

    def start(self, loop: asyncio.AbstractEventLoop, seconds: float) -> None:
        """A wait begins that is due in ``seconds`` (none after :meth:`cancel`:
        a wait on what has ended fails at once, and must leave no timer)."""
        if self._cancelled:
            return
        self._when = when = loop.time() + seconds
        timer = self._timer
        if timer is not None:
            if timer.when() <= when:
                return  # it fires first, then waits on for this deadline
            timer.cancel()
        self._timer = loop.call_at(when, self._fired, loop)

    def end(self) -> None:
        """The wait is over (its timer is left running for the next one)."""
        self._when = None

    def cancel(self) -> None:
        """No wait will come again: the timer goes too."""
        self._cancelled = True
        self._when = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fired(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        if self._when is None:
            return  # no wait on: the next one starts the timer again
        if loop.time() < self._when:
            self._timer = loop.call_at(self._when, self._fired, loop)
            return
        self._on_due()
