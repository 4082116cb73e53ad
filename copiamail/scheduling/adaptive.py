"""Limits that learn: what throttle replies taught a node about its
destinations, and how it unlearns it.

A destination under ``adaptive`` has one *adaptive key*: the limit key its
connections count against that stands for the receiver (the host stanza's,
the pooled stanza's, else the ``$domain_limit`` key of the domain, else its
per-binding cap; :class:`~copiamail.scheduling.limits.Scopes` marks it, and
:func:`~copiamail.scheduling.limits.adaptive_limit` finds it). Its configured cap is the *ceiling*. A throttle reply on a
connection counted against the key (:class:`~copiamail.throttle.ThrottleKind`)
teaches:

- ``connections``: a connection cap below the connections open when it came
  (the others past their greeting, plus the refused one), never below 1;
- ``rate``: a message rate half the rate the key was sending at, counted over
  the last second at least (a refusal of a message started before the last
  such change teaches nothing more);
- ``per_connection``: a cap on messages per connection below the count of
  the message that got the reply;
- ``suspend``: no new connection for ``adaptive_suspend`` seconds.

Recovery: after ``adaptive_recover_after`` deliveries with no throttle reply,
and ``adaptive_recover_seconds`` after the last change, every learned value of
the key goes one step back towards what was configured: a connection cap and
a per-connection cap by one, a rate by a quarter; a value that reaches its
ceiling (for a rate or a per-connection cap: the value that was throttled,
when nothing is configured) is forgotten.

The learned values are kept in a JSON file in the spool, rewritten whole and
renamed into place at each change (a crash leaves the old file or the new
one), so a restarted node starts from what it learned, not from its ceilings.
Learning from late evidence: connections opened at the same time are refused
or greeted in any order, so a refusal may see fewer of its siblings greeted
than the receiver allowed. A connection opened before the last lowering that
turns out to be accepted raises the cap back to the connections it shows
were accepted together (:meth:`AdaptiveLimits.accepted`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from copiamail.osutil import replace_file
from copiamail.throttle import ThrottleKind

log = logging.getLogger("copiamail")

LIMITS_FOLDER = "LIMITS"  # in the spool: one state file per node and worker

# A rate is learned from the starts of messages counted against a key: the
# last _RATE_SAMPLE of them, over _RATE_WINDOW seconds at least. A receiver
# counts messages in a window (per second, per minute), so a burst of 20 in
# 70 ms after a connection opens is 20 a second to it, not 300.
_RATE_SAMPLE = 20
_RATE_WINDOW = 1.0
_RATE_FLOOR = 1 / 3600  # one message an hour: a learned rate never goes below


@dataclass
class Learned:
    """What one adaptive key has learned (None: nothing, the configuration holds)."""

    key: str
    ceiling: int  # the configured connection cap
    connections: int | None = None
    rate: float | None = None  # messages per second
    rate_from: float | None = None  # the rate that was throttled
    per_connection: int | None = None
    per_connection_from: int | None = None  # the message count that was throttled
    suspended_until: float | None = None
    kind: str = ""  # of the reply that made the last change
    reply: str = ""
    at: float = 0.0  # when the last change was made (wall clock)

    @property
    def empty(self) -> bool:
        return (self.connections is None and self.rate is None and self.per_connection is None
                and self.suspended_until is None)

    def describe(self) -> str:
        """The learned values in words (``status``, ``explain``)."""
        parts = []
        if self.connections is not None:
            parts.append(f"{self.connections} connection{'s' if self.connections != 1 else ''} (of {self.ceiling})")
        if self.rate is not None:
            parts.append(f"{self.rate * 60:.1f} messages/min")
        if self.per_connection is not None:
            parts.append(f"{self.per_connection} messages per connection")
        if self.suspended_until is not None:
            parts.append(f"suspended until {local_time(self.suspended_until)}")
        return ", ".join(parts)


def _from_json(key: str, data: object) -> Learned | None:
    if not isinstance(data, dict) or not isinstance(data.get("ceiling"), int):
        return None
    known = {f.name for f in fields(Learned)} - {"key"}
    try:
        return Learned(key=key, **{k: v for k, v in data.items() if k in known})
    except TypeError:
        return None


def read_state(path: Path) -> dict[str, Learned]:
    """The learned values a state file holds (an unreadable file: none, with a warning)."""
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning("%s: cannot read learned limits (%s); starting from the configured ones", path, e)
        return {}
    out = {}
    for key, value in (data.get("keys", {}) if isinstance(data, dict) else {}).items():
        learned = _from_json(key, value)
        if learned is not None:
            out[key] = learned
    return out


def state_files(spool_root: Path, node: str | None = None) -> Iterator[Path]:
    """The state files in a spool (of ``node`` only, if given)."""
    folder = spool_root / LIMITS_FOLDER
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return
    for name in names:
        if name.endswith(".json") and not name.startswith(".") and (node is None or state_owner(name) == node):
            yield folder / name


def state_file(spool_root: Path, node: str, worker: int) -> Path:
    """Where worker ``worker`` (from 0) of ``node`` keeps what it learned."""
    return spool_root / LIMITS_FOLDER / f"{node}.w{worker + 1}.json"


def state_owner(name: str) -> str:
    """The node whose state file is called ``name``."""
    return name.rsplit(".", 2)[0]


def learned_in_spool(spool_root: Path, node: str | None = None) -> dict[str, tuple[str, Learned]]:
    """Every learned key in a spool, by key: the node that learned it and
    what (the most recent where several workers or nodes learned one key)."""
    out: dict[str, tuple[str, Learned]] = {}
    for path in state_files(spool_root, node):
        owner = state_owner(path.name)
        for key, learned in read_state(path).items():
            if key not in out or out[key][1].at < learned.at:
                out[key] = (owner, learned)
    return out


def local_time(when: float) -> str:
    """A time in the machine's zone, as ``status`` and ``explain`` show it."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))


def learned_cap(learned: Learned | None, ceiling: int) -> int:
    """The connection cap of a key that has learned ``learned``: never above ``ceiling``."""
    if learned is None or learned.connections is None:
        return ceiling
    return min(ceiling, learned.connections)


class AdaptiveLimits:
    """The learned limits of one node's scheduler (one event loop), saved to
    ``state_file`` (None: not saved)."""

    def __init__(self, state_file: Path | None, *, suspend: float, recover_after: int, recover_seconds: float,
                 clock: Callable[[], float] = time.time, load: dict[str, Learned] | None = None) -> None:
        self._file = state_file
        self._suspend = suspend
        self._recover_after = recover_after
        self._recover_seconds = recover_seconds
        self._clock = clock
        self._keys: dict[str, Learned] = dict(load or {})
        self._clean: dict[str, int] = {}
        self._starts: dict[str, deque[float]] = {}
        # When (by monotonic) each key's connection cap, and its rate, was last lowered.
        self._lowered: dict[str, float] = {}
        self._slowed: dict[str, float] = {}

    def get(self, key: str) -> Learned | None:
        return self._keys.get(key)

    def cap(self, key: str, ceiling: int) -> int:
        """The connection cap of ``key`` now: the learned one, never above ``ceiling``."""
        return learned_cap(self._keys.get(key), ceiling)

    def rate(self, key: str) -> float | None:
        learned = self._keys.get(key)
        return learned.rate if learned is not None else None

    def per_connection(self, key: str) -> int | None:
        learned = self._keys.get(key)
        return learned.per_connection if learned is not None else None

    def suspended_until(self, key: str) -> float | None:
        """When the suspension of ``key`` ends; None if it is not suspended."""
        learned = self._keys.get(key)
        if learned is None or learned.suspended_until is None:
            return None
        if learned.suspended_until <= self._clock():
            learned.suspended_until = None
            self._forget_if_empty(learned)
            self.save()
            return None
        return learned.suspended_until

    def started(self, key: str, when: float) -> None:
        """A message counted against ``key`` started at ``when`` (monotonic)."""
        starts = self._starts.get(key)
        if starts is None:
            starts = self._starts[key] = deque()
        starts.append(when)
        while len(starts) > _RATE_SAMPLE and starts[0] < when - _RATE_WINDOW:
            starts.popleft()

    def _sending_rate(self, key: str) -> float | None:
        starts = self._starts.get(key)
        if not starts or len(starts) < 2 or starts[-1] <= starts[0]:
            return None
        return (len(starts) - 1) / max(_RATE_WINDOW, starts[-1] - starts[0])

    def throttled(self, key: str, ceiling: int, kind: ThrottleKind, reply: str, *,
                  open_connections: int, messages: int, monotonic: float, started: float | None = None) -> bool:
        """A throttle reply of ``kind`` came on a connection counted against
        ``key``: ``open_connections`` were open to it then (the others past
        their greeting, and this one); the connection had carried ``messages``
        before; the message that got it started at ``started`` (monotonic).
        Returns whether anything was learned."""
        learned = self._keys.get(key) or Learned(key, ceiling)
        learned.ceiling = ceiling
        before = asdict(learned)
        if kind is ThrottleKind.CONNECTIONS:
            lower = max(1, open_connections - 1)
            if lower < min(ceiling, learned.connections or ceiling):
                learned.connections = lower
                self._lowered[key] = monotonic
        elif kind is ThrottleKind.RATE:
            sending = self._sending_rate(key)
            # A message started before the rate was last lowered was sent at
            # the old rate: its refusal says nothing of the new one.
            fresh = started is None or started >= self._slowed.get(key, float("-inf"))
            if sending is not None and fresh:
                slower = max(_RATE_FLOOR, sending / 2)
                if learned.rate is None or slower < learned.rate:
                    learned.rate, learned.rate_from = slower, learned.rate_from or sending
                    self._slowed[key] = monotonic
        elif kind is ThrottleKind.PER_CONNECTION:
            lower = max(1, messages)
            if learned.per_connection is None or lower < learned.per_connection:
                learned.per_connection, learned.per_connection_from = lower, messages + 1
        elif kind is ThrottleKind.SUSPEND:
            learned.suspended_until = self._clock() + self._suspend
        self._clean[key] = 0
        if asdict(learned) == before:
            return False
        learned.kind, learned.reply, learned.at = kind.value, reply, self._clock()
        self._keys[key] = learned
        log.warning("%s: learned %s from %s reply: %s", key, learned.describe(), kind.value, reply)
        self.save()
        return True

    def lowered_after(self, key: str, opened: float) -> bool:
        """Whether ``key``'s connection cap was lowered after a connection
        opened at ``opened`` (monotonic): a refusal of that connection is late
        evidence of a lesson already taken, not a new one."""
        return opened < self._lowered.get(key, float("-inf"))

    def nothing_left_to_lower(self, key: str, ceiling: int, others: int, opened: float) -> bool:
        """Whether a ``connections`` refusal of a connection to ``key`` opened
        at ``opened`` (monotonic), while ``others`` of its connections were
        past their greeting, has nothing left to teach (after
        :meth:`throttled`): the cap is down to 1, no other connection holds
        it, and the connection is not one of the burst that taught the last
        lowering. A key still full of other connections only waits on its cap."""
        return others == 0 and self.cap(key, ceiling) == 1 and not self.lowered_after(key, opened)

    def accepted(self, key: str, together: int, opened: float) -> bool:
        """A connection to ``key`` opened at ``opened`` (monotonic) was accepted
        while ``together`` connections to it (itself included) were past their
        greeting. If it was opened before the last lowering, the receiver
        accepted that many at once: the cap is raised to it. Returns whether
        it was raised."""
        learned = self._keys.get(key)
        if learned is None or learned.connections is None or together <= learned.connections:
            return False
        if not self.lowered_after(key, opened):
            return False
        learned.connections = together if together < learned.ceiling else None
        self._forget_if_empty(learned)
        self.save()
        return True

    def delivered(self, key: str) -> bool:
        """A message counted against ``key`` was delivered with no throttle
        reply. Returns whether the connection cap rose (a recovery step)."""
        learned = self._keys.get(key)
        if learned is None:
            return False
        clean = self._clean.get(key, 0) + 1
        self._clean[key] = clean
        if clean < self._recover_after or self._clock() - learned.at < self._recover_seconds:
            return False
        self._clean[key] = 0
        rose = learned.connections is not None
        if learned.connections is not None:
            learned.connections = learned.connections + 1 if learned.connections + 1 < learned.ceiling else None
        if learned.rate is not None:
            learned.rate *= 1.25
            if learned.rate_from is None or learned.rate >= learned.rate_from:
                learned.rate = learned.rate_from = None
        if learned.per_connection is not None:
            learned.per_connection += 1
            if learned.per_connection_from is None or learned.per_connection >= learned.per_connection_from:
                learned.per_connection = learned.per_connection_from = None
        learned.at = self._clock()
        log.info("%s: recovered a step after %d clean deliveries: %s", key, clean, learned.describe() or "as configured")
        self._forget_if_empty(learned)
        self.save()
        return rose

    def _forget_if_empty(self, learned: Learned) -> None:
        if learned.empty:
            self._keys.pop(learned.key, None)

    def save(self) -> None:
        """Write the state file (whole, then renamed into place); a failure is
        logged, and the node goes on with what it holds in memory."""
        if self._file is None:
            return
        data = {"keys": {k: {f: v for f, v in asdict(v).items() if f != "key"} for k, v in self._keys.items()}}
        try:
            self._file.parent.mkdir(exist_ok=True)
            replace_file(self._file, json.dumps(data, indent=1, sort_keys=True).encode(), 0o644)
        except OSError as e:
            log.error("%s: cannot save learned limits: %s", self._file, e.strerror or e)
