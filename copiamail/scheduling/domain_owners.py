"""Which worker of a node sends each domain: given once, evenly, in memory the workers share.

Every limit of one domain lives in one worker process, so a domain's jobs
must all go to the same worker. The first worker to meet a domain gives it to
the worker that has been given the fewest domains so far (the lowest-numbered
of those), and writes the choice into a table that every worker maps; the
choice holds until the node stops (or the domain moves: below), so each
worker keeps a copy of what it looked up and asks the table once per domain.

Why not a fixed hash of the name: it leaves the workers uneven. Fifty domains
of equal size split 23 and 27 between two workers by ``crc32``, and for the
last seventh of such a batch one CPU sits idle while the other sends the rest.
Given in turn, they split 25 and 25. A batch of domains of very unequal size
is not evened out by this (a domain is never split), but no worse
than by a hash.

In a drain, a domain may change worker once (and again) near the end, so the
workers finish together (:mod:`~copiamail.scheduling.handover`): a worker with
nothing left :meth:`asks <DomainOwners.ask>`, a worker still sending several
domains takes the request (:meth:`~DomainOwners.take_request`), stops sending
some of them at once in its own process (:meth:`~DomainOwners.leave`: from
then on it answers their new worker for them), and only once its last
connection of such a domain has closed rewrites its entry
(:meth:`~DomainOwners.move`), which raises the table's generation. Every
process that sees the generation change forgets its copy
(:meth:`~DomainOwners.forget`) and reads the table again. So no instant has
two workers sending one domain: the old worker has closed its connections
before the table names the new one. A worker that has ended (its connections
all closed) takes no domain and keeps none: its end raises the generation,
and the next worker to meet one of its domains takes it, so a job that
arrives late for such a domain is still sent before the drain ends. A domain
given to a worker that asks for domains raises the generation too, which
wakes that worker to scan.

The table is a ``memfd`` mapped by the supervisor before it forks the workers.
Its header counts the domains given to each worker, then holds the
generation (raised at each move) and, per worker, whether it asks for
domains and whether it has ended; each entry holds a domain's 64-bit hash
(0: free) and its worker plus one. Entries are never removed (a move rewrites
the worker). Every look-up that is not in the worker's copy runs under a POSIX
record lock on the ``memfd`` (``lockf``), which the kernel drops if its holder
dies. A domain is looked for in the :data:`PROBES` entries from its hash's
place on; when those are all taken by other domains, the domain goes by
:func:`~copiamail.scheduling.limits.worker_of` (a fixed hash) instead. Since
entries are only ever added, a domain that once found its entries full finds
them full for good, so every worker still gives it the same answer.
"""

from __future__ import annotations

import mmap
import os
import struct

from copiamail.osutil import file_locked
from copiamail.scheduling.limits import worker_of
from copiamail.scheduling.shared_slots import key_hash

ENTRIES = 1 << 17  # a power of two: 2 MB of table, pages touched only as used
PROBES = 64  # entries a domain may be placed in, from its hash's place on
# A worker's copy of what it looked up is emptied past this many domains (the
# table stays the answer): a node that runs for months meets more domains
# than it should keep in memory.
KNOWN_MAX = 100_000
_COUNT = struct.Struct("<Q")  # domains given to one worker (the header: one per worker); also each word after them
_ENTRY = struct.Struct("<QQ")  # domain's hash, its worker + 1


class DomainOwners:
    """The table of one node with ``workers`` workers (see the module's
    docstring). Made by the supervisor with :meth:`create` before it forks."""

    def __init__(self, fd: int, workers: int, entries: int = ENTRIES) -> None:
        if workers < 1 or entries & (entries - 1):
            raise ValueError("workers must be at least 1 and entries a power of two")
        self._fd = fd
        self._workers = workers
        self._entries = entries
        # Header: the counts, the generation, then per worker "asks" and "ended".
        self._generation_at = workers * _COUNT.size
        self._asks_at = self._generation_at + _COUNT.size
        self._ended_at = self._asks_at + workers * _COUNT.size
        self._base = self._ended_at + workers * _COUNT.size
        self._map = mmap.mmap(fd, self._base + entries * _ENTRY.size)
        self._known: dict[str, int] = {}  # domain -> worker, as this process found it
        self._leaving: dict[str, int] = {}  # domains this process stops sending -> their next worker

    @classmethod
    def create(cls, workers: int, entries: int = ENTRIES) -> DomainOwners:
        fd = os.memfd_create("copiamail-owners", os.MFD_CLOEXEC)
        os.ftruncate(fd, (3 * workers + 1) * _COUNT.size + entries * _ENTRY.size)
        return cls(fd, workers, entries)

    def owner(self, domain: str) -> int:
        """The worker (0 .. workers-1) that sends the jobs of ``domain``;
        given now, to the worker with fewest domains, if no worker had it yet.
        A domain this process is leaving is its next worker's already."""
        if self._leaving and domain in self._leaving:
            return self._leaving[domain]
        known = self._known.get(domain)
        if known is not None:
            return known
        with file_locked(self._fd):
            worker = self._find_or_give(domain)
        if len(self._known) >= KNOWN_MAX:
            self._known.clear()
        self._known[domain] = worker
        return worker

    # --- moves (see the module's docstring) ------------------------------------

    @property
    def generation(self) -> int:
        """Raised by every move: a change means copies must be forgotten."""
        return int(_COUNT.unpack_from(self._map, self._generation_at)[0])

    def forget(self) -> None:
        """Drop this process's copy of the table (it changed)."""
        self._known.clear()

    def ask(self, worker: int, asking: bool) -> None:
        """``worker`` has nothing left and asks for domains (or no longer does)."""
        self._set(self._asks_at, worker, asking)

    def asking(self, worker: int) -> bool:
        """Whether ``worker``'s request is still open (nobody has taken it)."""
        return self._get(self._asks_at, worker)

    def asked_by_others(self, worker: int) -> bool:
        """Whether any worker but ``worker`` asks for domains (no lock: a hint)."""
        return any(self._get(self._asks_at, w) for w in range(self._workers) if w != worker)

    def take_request(self, worker: int) -> int | None:
        """The worker whose request ``worker`` now answers (it asks no longer),
        or None if nobody asks."""
        with file_locked(self._fd):
            for w in range(self._workers):
                if w != worker and self._get(self._asks_at, w):
                    self._set(self._asks_at, w, False)
                    return w
        return None

    def end(self, worker: int) -> None:
        """``worker`` has ended: it gives no domain any more, and takes none;
        its domains go to the next worker to meet them (the generation is
        raised, so every copy naming it is forgotten)."""
        with file_locked(self._fd):
            self._end(worker)

    def end_if_unanswered(self, worker: int) -> bool:
        """End ``worker`` (True) if its request is still open and every other
        worker has ended or asks too: then nobody can give it a domain. In one
        step, so no worker takes the request of a worker that has ended."""
        with file_locked(self._fd):
            if not self._get(self._asks_at, worker) or not self.others_idle(worker):
                return False
            self._end(worker)
            return True

    def _end(self, worker: int) -> None:
        """Mark ``worker`` ended (under the lock); its domains are forgotten everywhere."""
        self._set(self._asks_at, worker, False)
        self._set(self._ended_at, worker, True)
        self._raise_generation()

    def _raise_generation(self) -> None:
        """Under the lock: every process's copy of the table is out of date."""
        _COUNT.pack_into(self._map, self._generation_at, self.generation + 1)

    def others_idle(self, worker: int) -> bool:
        """Whether every other worker has ended or asks for domains itself."""
        return all(self._get(self._ended_at, w) or self._get(self._asks_at, w)
                   for w in range(self._workers) if w != worker)

    def movable(self, domain: str) -> bool:
        """Whether ``domain`` has an entry (one that went by the fixed hash cannot move)."""
        return self._entry_of(domain) is not None

    def leave(self, domain: str, to: int) -> None:
        """This process stops sending ``domain`` now: it answers ``to`` for it
        from here on, while the table still names this worker."""
        self._leaving[domain] = to

    def leaving(self) -> dict[str, int]:
        """The domains this process is leaving, and their next workers."""
        return dict(self._leaving)

    def move(self, domain: str) -> None:
        """Give a domain this process was leaving to its next worker in the
        table (its last connection here has closed), and raise the generation."""
        to = self._leaving.pop(domain)
        with file_locked(self._fd):
            offset = self._entry_of(domain)
            if offset is not None:
                h, worker = _ENTRY.unpack_from(self._map, offset)
                _ENTRY.pack_into(self._map, offset, h, to + 1)
                for w, step in ((int(worker) - 1, -1), (to, 1)):
                    count = int(_COUNT.unpack_from(self._map, w * _COUNT.size)[0])
                    _COUNT.pack_into(self._map, w * _COUNT.size, count + step)
            self._raise_generation()
        self._known[domain] = to

    def _entry_of(self, domain: str) -> int | None:
        """The offset of ``domain``'s entry, or None if it has none."""
        h, offset = self._probe(domain)
        return offset if offset is not None and _ENTRY.unpack_from(self._map, offset)[0] == h else None

    def _probe(self, domain: str) -> tuple[int, int | None]:
        """``domain``'s hash, and the offset of its entry or else of the free
        entry it would take; None when its places are all other domains'."""
        h = key_hash(domain)
        mask = self._entries - 1
        for step in range(min(PROBES, self._entries)):
            offset = self._base + ((h + step) & mask) * _ENTRY.size
            if _ENTRY.unpack_from(self._map, offset)[0] in (h, 0):
                return h, offset
        return h, None

    def _get(self, at: int, worker: int) -> bool:
        return bool(_COUNT.unpack_from(self._map, at + worker * _COUNT.size)[0])

    def _set(self, at: int, worker: int, on: bool) -> None:
        _COUNT.pack_into(self._map, at + worker * _COUNT.size, int(on))

    def given(self) -> list[int]:
        """How many domains each worker has been given so far."""
        return [int(_COUNT.unpack_from(self._map, i * _COUNT.size)[0]) for i in range(self._workers)]

    def _find_or_give(self, domain: str) -> int:
        h, offset = self._probe(domain)
        if offset is None:
            return worker_of(domain, self._workers)
        found, worker = _ENTRY.unpack_from(self._map, offset)
        owner = int(worker) - 1 if found == h else None
        live = [w for w in range(self._workers) if not self._get(self._ended_at, w)] or list(range(self._workers))
        if owner is not None and owner in live:
            return owner
        # A new domain, or one whose worker has ended (its connections have
        # all closed, so another may start at once): to the live worker
        # given the fewest domains.
        counts = self.given()
        chosen = min(live, key=lambda w: (counts[w], w))
        _ENTRY.pack_into(self._map, offset, h, chosen + 1)
        _COUNT.pack_into(self._map, chosen * _COUNT.size, counts[chosen] + 1)
        if owner is not None:
            _COUNT.pack_into(self._map, owner * _COUNT.size, counts[owner] - 1)
        if self._get(self._asks_at, chosen):
            # It waits for domains in a drain: the change wakes it to scan.
            self._raise_generation()
        return chosen
