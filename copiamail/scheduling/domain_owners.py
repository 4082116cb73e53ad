"""Which worker of a node sends each domain: given once, evenly, in memory the workers share.

Every limit of one domain lives in one worker process, so a domain's jobs
must all go to the same worker. The first worker to meet a domain gives it to
the worker that has been given the fewest domains so far (the lowest-numbered
of those), and writes the choice into a table that every worker maps; the
choice holds until the node stops, so each worker keeps a copy of what it
looked up and asks the table once per domain.

Why not a fixed hash of the name: it leaves the workers uneven. Fifty domains
of equal size split 23 and 27 between two workers by ``crc32``, and for the
last seventh of such a batch one CPU sits idle while the other sends the rest.
Given in turn, they split 25 and 25. A batch of domains of very unequal size
is not evened out by this (a domain is never split or moved), but no worse
than by a hash.

The table is a ``memfd`` mapped by the supervisor before it forks the workers.
Its header counts the domains given to each worker; each entry holds a
domain's 64-bit hash (0: free) and its worker plus one. Entries are never
removed. Every look-up that is not in the worker's copy runs under a POSIX
record lock on the ``memfd`` (``lockf``), which the kernel drops if its holder
dies. A domain is looked for in the :data:`PROBES` entries from its hash's
place on; when those are all taken by other domains, the domain goes by
:func:`~copiamail.scheduling.limits.worker_of` (a fixed hash) instead. Since
entries are only ever added, a domain that once found its entries full finds
them full for good, so every worker still gives it the same answer.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct

from copiamail.scheduling.limits import worker_of
from copiamail.scheduling.shared_slots import key_hash

ENTRIES = 1 << 17  # a power of two: 2 MB of table, pages touched only as used
PROBES = 64  # entries a domain may be placed in, from its hash's place on
# A worker's copy of what it looked up is emptied past this many domains (the
# table stays the answer): a node that runs for months meets more domains
# than it should keep in memory.
KNOWN_MAX = 100_000
_COUNT = struct.Struct("<Q")  # domains given to one worker (the header: one per worker)
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
        self._base = workers * _COUNT.size
        self._map = mmap.mmap(fd, self._base + entries * _ENTRY.size)
        self._known: dict[str, int] = {}  # domain -> worker, as this process found it

    @classmethod
    def create(cls, workers: int, entries: int = ENTRIES) -> DomainOwners:
        fd = os.memfd_create("copiamail-owners", os.MFD_CLOEXEC)
        os.ftruncate(fd, workers * _COUNT.size + entries * _ENTRY.size)
        return cls(fd, workers, entries)

    def owner(self, domain: str) -> int:
        """The worker (0 .. workers-1) that sends the jobs of ``domain``;
        given now, to the worker with fewest domains, if no worker had it yet."""
        known = self._known.get(domain)
        if known is not None:
            return known
        fcntl.lockf(self._fd, fcntl.LOCK_EX)
        try:
            worker = self._find_or_give(domain)
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)
        if len(self._known) >= KNOWN_MAX:
            self._known.clear()
        self._known[domain] = worker
        return worker

    def given(self) -> list[int]:
        """How many domains each worker has been given so far."""
        return [int(_COUNT.unpack_from(self._map, i * _COUNT.size)[0]) for i in range(self._workers)]

    def _find_or_give(self, domain: str) -> int:
        h = key_hash(domain)
        mask = self._entries - 1
        for step in range(min(PROBES, self._entries)):
            offset = self._base + ((h + step) & mask) * _ENTRY.size
            found, worker = _ENTRY.unpack_from(self._map, offset)
            if found == h:
                return int(worker) - 1
            if found == 0:
                counts = self.given()
                chosen = counts.index(min(counts))
                _ENTRY.pack_into(self._map, offset, h, chosen + 1)
                _COUNT.pack_into(self._map, chosen * _COUNT.size, counts[chosen] + 1)
                return chosen
        return worker_of(domain, self._workers)
