"""Traffic shaping of one scheduler: the message rates it keeps, the limits
it learns from throttle replies (:mod:`.adaptive`), and the destinations a
``suspend`` reply has stopped.

A suspended destination takes no new connection until its suspension ends;
the jobs that meet it wait on the key ``suspend:<adaptive key>`` (cap 0), and
the jobs in the TOSEND folders are not claimed at all meanwhile (the scan
skips them as not yet due), so their files stay as they are. When the
suspension ends, ``on_resumed(key)`` offers the destination to the jobs that
wait on it, and a scan finds the others.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from copiamail.config import Config
from copiamail.jobfile.job import Job
from copiamail.scheduling.adaptive import AdaptiveLimits, learned_in_spool, state_file
from copiamail.scheduling.limits import Limit, Scopes, adaptive_limit, bindings_for, uses_adaptive
from copiamail.scheduling.pacing import Pacer
from copiamail.spool.holds import Holds

if TYPE_CHECKING:
    from copiamail.spool.queue import Spool


# A job whose SMTP transaction was interrupted before (a crash or kill of a
# node while it was being sent) waits until this node has run this long: a
# node dying again and again soon after its start (killed, or crashing for a
# cause of its own) then does not interrupt the same jobs, sent first at each
# start, until they reach FAIL. A job that itself kills the node still does,
# once the node has settled.
SUSPECT_SETTLE = 5.0
HOLD_LOOK_EVERY = 0.05  # seconds between two looks at the spool's HOLD folder


_SUSPEND_PREFIX = "suspend:"


def suspend_key(key: str) -> str:
    """The key jobs wait on while adaptive key ``key`` is suspended."""
    return _SUSPEND_PREFIX + key


class Shaping:
    """Rates, learned limits and suspensions of worker ``worker`` of node
    ``node`` (used from one event loop). ``adaptive`` is None when nothing in
    the config is adaptive."""

    def __init__(self, config: Config, spool: Spool, node: str, worker: int, workers: int,
                 on_resumed: Callable[[str], None], clock: Callable[[], float] = time.time) -> None:
        self._config = config
        self._where = (node, workers)
        self._on_resumed = on_resumed
        self._clock = clock
        self.pacer = Pacer()
        # A hold must reach the node within 2 s: a look every 50 ms spares a
        # stat of the folder for every job the scan meets.
        self._holds = Holds(spool.root, look_every=HOLD_LOOK_EVERY)
        self.adaptive: AdaptiveLimits | None = None
        if uses_adaptive(config):
            own = learned_in_spool(spool.root, node)
            self.adaptive = AdaptiveLimits(
                state_file(spool.root, node, worker), suspend=config.adaptive_suspend,
                recover_after=config.adaptive_recover_after, recover_seconds=config.adaptive_recover_seconds,
                clock=clock, load={key: learned for key, (_, learned) in own.items()})
        self._resuming: set[str] = set()
        self._settled_at = clock() + SUSPECT_SETTLE
        self.settle_suspects = True
        # The limits of connections, adaptive keys lowered to what they learned.
        self.scopes = Scopes(config, node, workers, learned=self.learned_cap)

    def reconfigure(self, config: Config) -> None:
        """Limits from ``config`` from now on (a reload); what was learned,
        the rates' recent starts and the suspensions stay. Whether anything
        is adaptive is settled at start."""
        self._config = config
        self.scopes = Scopes(config, *self._where, learned=self.learned_cap)

    def learned_cap(self, key: str, ceiling: int) -> int:
        return self.adaptive.cap(key, ceiling) if self.adaptive is not None else ceiling

    def held(self, limits: Sequence[Limit]) -> Limit | None:
        """The suspension that keeps a connection under ``limits`` from
        opening (a limit of cap 0 to wait on), or None."""
        key = adaptive_limit(limits) if self.adaptive is not None else None
        until = self.adaptive.suspended_until(key.key) if key is not None and self.adaptive is not None else None
        if key is None or until is None:
            return None
        held = Limit(suspend_key(key.key), 0, f"suspended after a throttle reply ({key.scope})")
        if held.key not in self._resuming:
            self._resuming.add(held.key)
            asyncio.get_running_loop().call_later(max(0.0, until - self._clock()) + 0.01, self._resume, held.key)
        return held

    def ended_suspensions(self, keys: Iterable[str]) -> list[str]:
        """Those of ``keys`` that are a suspension's key (:func:`suspend_key`)
        whose suspension is over: jobs still waiting on one were deferred after
        its end offered it."""
        return [k for k in keys if k.startswith(_SUSPEND_PREFIX) and k not in self._resuming]

    def _resume(self, key: str) -> None:
        self._resuming.discard(key)
        self._on_resumed(key)

    def held_by_operator(self, queue: str, name: str, domain: str) -> bool:
        """Whether an operator's hold (``copiamail hold``) keeps this job in its folder."""
        return self._holds.held(queue, name, domain)

    def job_held_until(self, job: Job, queue: str) -> float | None:
        """Until when ``job`` (in folder ``queue``) stays in its folder
        unclaimed: an operator holds it (looked at again a second later), it
        was interrupted before and this node has not run
        :data:`SUSPECT_SETTLE` seconds yet (unless ``settle_suspects`` is
        off: a drain), or its domain is suspended
        (judged by its domain's own limits; a suspended mail host is met only
        when the job is routed)."""
        if self._holds.held(queue, job.name, job.domain):
            return self._clock() + 1.0
        if job.interruptions and self.settle_suspects and self._clock() < self._settled_at:
            return self._settled_at
        if self.adaptive is None or not self._resuming:
            return None
        try:
            binding = bindings_for(self._config, job.binding, job.binding_group)[0]
        except KeyError:
            return None
        key = adaptive_limit(self.scopes.limits(job.address, job.domain, binding))
        return self.adaptive.suspended_until(key.key) if key is not None else None
