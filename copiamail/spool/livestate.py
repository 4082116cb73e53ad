"""What each running node is doing, published in the spool for ``status``.

Every worker of every node writes ``STATE/<node>.w<worker>.json`` about once a
second: its connections open per limit key (with the key's cap now and its
configured cap), per recipient domain, its counters, how long its SMTP
transactions took (:class:`TransactionTimes`), and when it wrote. The
file is replaced whole by a rename, so a reader finds the old version or the
new one, never half of one. It is not fsynced: it says what is happening now,
and a crash that loses it loses nothing that matters. A worker that stops
removes its file; one that dies leaves it, and readers call it stale once it
has not been rewritten for ``STALE_AFTER`` seconds (by the writer's clock:
nodes on other machines need their clocks in step for that).
"""

from __future__ import annotations

import bisect
import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STATE_FOLDER = "STATE"
PUBLISH_INTERVAL = 1.0  # seconds between two versions of a worker's file
STALE_AFTER = 10.0  # a file not rewritten for this long is a dead worker's


# Upper bounds, in seconds, of the buckets transaction times are counted in
# (the last, infinity, is implied): from a fast local relay to a receiver
# that tarpits.
TRANSACTION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class TransactionTimes:
    """How long a worker's SMTP transactions took (from MAIL FROM, on a
    connection already greeted, to the reply to the message), counted in
    :data:`TRANSACTION_BUCKETS`: a histogram, cumulative over the worker's
    life, as Prometheus keeps one."""

    def __init__(self) -> None:
        self.counts = [0] * (len(TRANSACTION_BUCKETS) + 1)  # per bucket, not cumulative; the last is +Inf
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(TRANSACTION_BUCKETS, seconds)] += 1  # the first bound >= seconds
        self.total += seconds

    def as_json(self) -> dict[str, Any]:
        return {"counts": list(self.counts), "sum": self.total}

    @classmethod
    def from_json(cls, doc: Any) -> TransactionTimes:
        """What :meth:`as_json` wrote (empty for anything else: a file of an older version)."""
        times = cls()
        if isinstance(doc, dict) and isinstance(doc.get("counts"), list) and len(doc["counts"]) == len(times.counts):
            times.counts = [int(n) for n in doc["counts"]]
            times.total = float(doc.get("sum", 0.0))
        return times


@dataclass(frozen=True)
class KeyState:
    """One limit key of one worker: connections holding a slot of it, its
    cap now (learned or configured) and the cap configured (None: the same);
    ``shared``: the cap is the whole node's, which its workers share (so it
    is not summed over them)."""

    open: int
    cap: int
    configured: int | None = None
    shared: bool = False


@dataclass(frozen=True)
class WorkerState:
    """One worker's published state (:func:`read_states`)."""

    node: str
    worker: int
    host: str
    pid: int
    updated: float
    alive: bool
    counters: dict[str, int] = field(default_factory=dict)
    keys: dict[str, KeyState] = field(default_factory=dict)
    domains: dict[str, int] = field(default_factory=dict)
    transactions: TransactionTimes = field(default_factory=TransactionTimes)

    @property
    def connections(self) -> int:
        return sum(self.domains.values())


def state_path(root: Path, node: str, worker: int) -> Path:
    return root / STATE_FOLDER / f"{node}.w{worker}.json"


def write_state(root: Path, node: str, worker: int, now: float, counters: dict[str, int],
                keys: dict[str, KeyState], domains: dict[str, int], transactions: TransactionTimes | None = None) -> None:
    """Publish one worker's state (creating ``STATE/`` if needed). Raises OSError."""
    path = state_path(root, node, worker)
    path.parent.mkdir(exist_ok=True)
    doc = {"node": node, "worker": worker, "host": socket.gethostname(), "pid": os.getpid(), "updated": now,
           "counters": counters, "domains": domains,
           "transactions": (transactions or TransactionTimes()).as_json(),
           "keys": {k: {"open": s.open, "cap": s.cap, "configured": s.configured, "shared": s.shared}
                    for k, s in keys.items()}}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


def remove_state(root: Path, node: str, worker: int) -> None:
    """A worker stops: its state goes (a file already gone is fine)."""
    try:
        state_path(root, node, worker).unlink()
    except FileNotFoundError:
        pass


def _parse(doc: Any, now: float) -> WorkerState | None:
    try:
        keys = {str(k): KeyState(int(v["open"]), int(v["cap"]), None if v.get("configured") is None
                                 else int(v["configured"]), bool(v.get("shared", False)))
                for k, v in doc["keys"].items()}
        updated = float(doc["updated"])
        return WorkerState(str(doc["node"]), int(doc["worker"]), str(doc.get("host", "?")), int(doc.get("pid", 0)),
                           updated, now - updated <= STALE_AFTER,
                           {str(k): int(v) for k, v in doc.get("counters", {}).items()},
                           keys, {str(k): int(v) for k, v in doc.get("domains", {}).items()},
                           TransactionTimes.from_json(doc.get("transactions")))
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def read_states(root: Path, now: float) -> list[WorkerState]:
    """Every worker state published in the spool at ``root``, by node and
    worker; a file that cannot be read or parsed is left out."""
    folder = root / STATE_FOLDER
    try:
        names = sorted(n for n in os.listdir(folder) if n.endswith(".json") and not n.startswith("."))
    except FileNotFoundError:
        return []
    states: list[WorkerState] = []
    for name in names:
        try:
            doc = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        state = _parse(doc, now)
        if state is not None:
            states.append(state)
    return sorted(states, key=lambda s: (s.node, s.worker))
