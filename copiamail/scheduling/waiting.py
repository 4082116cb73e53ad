"""Jobs a node deferred, waiting for a slot, and who gets a freed slot.

A waiting job waits on every limit key that kept it from starting: the first
full key of each binding and mail host it could have used (so a job that may
use several bindings or hosts waits on several keys, and the first of them to
free takes it). It is indexed under each of those keys, per domain, and once
under its own domain (for a connection of that domain that can carry it).
When a slot of a key frees, :meth:`WaitingJobs.head` names the job that gets
it:

- folder priority first (every TOSEND job before any TOSEND1 job);
- then, among domains, the one served least recently: a key shared by many
  domains (the node total, a pooled regex, a host) is handed round-robin across
  them, as Postfix's queue manager does, so one huge domain cannot starve a small
  one that arrived later;
- then, inside a domain, by file name (the queue order).

For a key of one domain (``$domain_limit``, per binding and domain) this is
plain queue order. Entries are removed lazily: :meth:`take` marks an entry
inactive, and the heaps drop inactive heads when they are looked at.
"""

from __future__ import annotations

import heapq
import os
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

from copiamail.jobfile.job import Job
from copiamail.spool.queue import QueuedJob


@dataclass(eq=False)
class WaitEntry:
    """A deferred job: where it waits, and what the scheduler needs of it
    (a job without its body, so a large backlog costs little memory)."""

    waiting: QueuedJob
    job: Job
    active: bool = True
    keys: set[str] = field(default_factory=set)  # the keys it waits on
    order: tuple[int, bytes] = field(init=False)

    def __post_init__(self) -> None:
        self.order = self.waiting.order  # computed once: heaps compare it often

    def __lt__(self, other: WaitEntry) -> bool:
        return self.order < other.order


class WaitingJobs:
    """The waiting jobs of one node (used from one event loop)."""

    def __init__(self) -> None:
        self._by_path: dict[str, WaitEntry] = {}  # by QueuedJob.file
        self._by_key: dict[str, dict[str, list[WaitEntry]]] = {}
        self._by_domain: dict[str, list[WaitEntry]] = {}
        self._caps: dict[str, int] = {}
        self._served: dict[str, int] = {}
        self._turn = 0

    def __len__(self) -> int:
        return len(self._by_path)

    def __contains__(self, path: object) -> bool:
        return path in self._by_path

    def add(self, entry: WaitEntry, limits: Sequence[tuple[str, int]]) -> None:
        """A job just deferred because these ``(key, cap)`` were full: it waits
        on each (a job that may use several bindings or mail hosts waits on the
        full key of each), and the first that frees takes it."""
        self._by_path[entry.waiting.file] = entry
        heapq.heappush(self._by_domain.setdefault(entry.job.domain, []), entry)
        for key, cap in limits:
            self.wait_on(entry, key, cap)

    def wait_on(self, entry: WaitEntry, key: str, cap: int) -> None:
        """Let ``entry`` wait on ``key`` (again, or now on another key)."""
        self._caps[key] = cap
        if key in entry.keys:
            return
        entry.keys.add(key)
        heapq.heappush(self._by_key.setdefault(key, {}).setdefault(entry.job.domain, []), entry)

    def cap(self, key: str) -> int:
        return self._caps.get(key, 0)

    def set_cap(self, key: str, cap: int) -> None:
        """``key``'s cap changed (a learned limit rose): jobs waiting on it see the new one."""
        if key in self._caps:
            self._caps[key] = cap

    def take(self, entry: WaitEntry) -> None:
        """The job stops waiting (it is being claimed, or its file is gone)."""
        entry.active = False
        self._by_path.pop(entry.waiting.file, None)

    def served(self, domain: str) -> None:
        """A job of ``domain`` just started: it goes to the back of the round."""
        self._turn += 1
        self._served[domain] = self._turn

    def rank(self, entry: WaitEntry) -> tuple[int, int, bytes]:
        priority, name = entry.order
        return (priority, self._served.get(entry.job.domain, 0), name)

    def head(self, key: str, exclude: Collection[str] = ()) -> WaitEntry | None:
        """The job a freed slot of ``key`` goes to (not removed), leaving out
        the domains in ``exclude``."""
        domains = self._by_key.get(key)
        if domains is None:
            return None
        best: WaitEntry | None = None
        for domain in list(domains):
            heap = domains[domain]
            while heap and not heap[0].active:
                heapq.heappop(heap).keys.discard(key)
            if not heap:
                del domains[domain]
                continue
            if domain in exclude:
                continue
            if best is None or self.rank(heap[0]) < self.rank(best):
                best = heap[0]
        if not domains:
            del self._by_key[key]
            self._caps.pop(key, None)
        return best

    def pop_head(self, key: str, exclude: Collection[str] = ()) -> WaitEntry | None:
        """Remove and return :meth:`head` from ``key``'s index (it stays indexed
        by domain, and under the other keys it waits on)."""
        entry = self.head(key, exclude)
        if entry is not None:
            heapq.heappop(self._by_key[key][entry.job.domain])
            entry.keys.discard(key)
        return entry

    def next_of_domain(self, domain: str, usable: Callable[[Job], bool]) -> WaitEntry | None:
        """The first waiting job of ``domain``, in queue order, that ``usable`` accepts (not removed)."""
        heap = self._by_domain.get(domain)
        skipped: list[WaitEntry] = []
        found: WaitEntry | None = None
        while heap:
            entry = heapq.heappop(heap)
            if not entry.active:
                continue
            skipped.append(entry)
            if usable(entry.job):
                found = entry
                break
        for entry in skipped:
            heapq.heappush(self._by_domain.setdefault(domain, []), entry)
        if not self._by_domain.get(domain):
            self._by_domain.pop(domain, None)
        return found

    def keys(self) -> list[str]:
        """Every key jobs wait on (or waited on)."""
        return list(self._caps)

    def waited_on(self) -> list[str]:
        """Every key a job waits on now (or did until lately)."""
        return [k for k in self._caps if self._by_key.get(k)]

    def waits_on(self, key: str) -> bool:
        """Whether a job waits on ``key`` now (or did until lately): one key of :meth:`waited_on`."""
        return key in self._caps and bool(self._by_key.get(key))

    def keys_with_room(self, in_use: Callable[[str], int]) -> list[str]:
        return [k for k, cap in self._caps.items() if in_use(k) < cap]

    def drop_domain(self, domain: str) -> None:
        """Forget every waiting job of ``domain`` (its files stay where they are)."""
        for entry in self._by_domain.pop(domain, []):
            if entry.active:
                self.take(entry)

    def drop_missing(self, seen: Collection[str]) -> None:
        """Forget waiting jobs whose file is gone (taken by another node,
        removed); ``seen``: the files (``QueuedJob.file``) just listed, known
        to exist."""
        for path, entry in list(self._by_path.items()):
            if path not in seen and not os.path.exists(path):
                self.take(entry)
