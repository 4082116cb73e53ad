"""Slot counts that a node's workers share: one table in shared memory.

A cap that counts connections of several domains (the node total, a binding's
or group's total, a pooled regex stanza, a host) is met by connections of
every worker of a node, since each worker sends its own domains. Its count is
kept here, once for the node, so whichever worker needs a slot can use the
whole cap, and the cap still holds for the node as a whole.

The table is a ``memfd`` mapped by the supervisor before it forks the workers,
so every worker sees the same bytes. An entry per key: the key's 64-bit hash
(0: the entry is free), the slots held, a bit per worker whose jobs wait on the
key, the worker that last gave a slot of it back while another worker's
jobs waited (so the slot over the halves of an odd cap goes round:
:meth:`~copiamail.scheduling.limiter.LocalLimiter.leaves`), and the
connections of the key past their greeting, which each worker tells as they
change (a throttle reply is judged by all the node's connections to the
receiver, not one worker's: :mod:`copiamail.scheduling.adaptive`). The header holds a
generation number, raised whenever a slot is given back, so a worker can tell
cheaply that something freed.

Mail hosts' refusal pauses (:meth:`SharedSlots.pause`) are kept apart, in a
small second table of (key hash, end) entries: their keys are every host that
ever refused, not a few from the configuration, so an entry whose pause has
ended is taken again by the next pause. A second generation number is raised
by every pause written; each worker reads the pauses into a dictionary of its
own when it has moved, so asking whether a host is paused (at each new
connection) costs no look through the table.

Every read-then-write runs under a POSIX record lock on the same ``memfd``
(``lockf``): it is per process, so the workers exclude each other, and the
kernel drops it when its holder dies, so a worker killed inside the critical
section cannot block the others. A worker that dies takes the node down with
it (:mod:`copiamail.node.workers`), and the table is made afresh at the next
start, so slots a dead worker held are never counted again.

Slot entries are never removed: the keys are the shared caps of the
configuration and the hosts they name, a few hundred at most. A table with no
free entry left counts a new key as full (never over a cap) and says so once.
With every pause entry taken by a pause that goes on, a new pause holds for
the worker that met the refusal only, and that is said once too.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import mmap
import os
import struct
from collections.abc import Iterable

from copiamail.osutil import file_locked

log = logging.getLogger("copiamail")

ENTRIES = 1 << 14  # entries in the table (a power of two): 640 kB
PAUSES = 1 << 10  # entries for refusal pauses: hosts refusing within one refusal_pause (16 kB)
_GENERATION = struct.Struct("<Q")  # raised by every slot given back
_PAUSE_GENERATION = struct.Struct("<Q")  # raised by every pause written
_HEADER_SIZE = _GENERATION.size + _PAUSE_GENERATION.size
# Key hash, slots held, workers waiting (bit per worker), last giver + 1,
# connections past their greeting (as the workers last told).
_ENTRY = struct.Struct("<QqQqq")
_PAUSE = struct.Struct("<Qq")  # key hash (0: never used), end in ns of the callers' monotonic clock


def key_hash(key: str) -> int:
    """``key``'s place in the table: stable across processes, never 0."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little") or 1


class SharedSlots:
    """The shared table of one node (see the module's docstring). Made by
    the supervisor with :meth:`create` before its workers fork; each worker
    uses it from one event loop, under :meth:`locked` for anything that both
    reads and writes."""

    def __init__(self, fd: int, entries: int = ENTRIES, pauses: int = PAUSES) -> None:
        self._fd = fd
        self._entries = entries
        self._pauses_at = _HEADER_SIZE + entries * _ENTRY.size
        self._pauses_end = self._pauses_at + pauses * _PAUSE.size
        self._map = mmap.mmap(fd, self._pauses_end)
        self._places: dict[str, int] = {}  # key -> entry offset, as found by this process
        self._told_full = False
        self._told_pauses_full = False
        # The pauses as this process last read them (key hash -> end, ns),
        # and the pauses' generation it read them at (-1: not yet).
        self._pauses_read: dict[int, int] = {}
        self._pauses_read_at = -1

    @classmethod
    def create(cls, entries: int = ENTRIES, pauses: int = PAUSES) -> SharedSlots:
        fd = os.memfd_create("copiamail-slots", os.MFD_CLOEXEC)
        os.ftruncate(fd, _HEADER_SIZE + entries * _ENTRY.size + pauses * _PAUSE.size)
        return cls(fd, entries, pauses)

    def locked(self) -> contextlib.AbstractContextManager[None]:
        return file_locked(self._fd)

    def _place(self, key: str, make: bool) -> int | None:
        """The offset of ``key``'s entry; with ``make``, a free one is taken
        for it (under the lock) when it has none yet."""
        place = self._places.get(key)
        if place is not None:
            return place
        h = key_hash(key)
        mask = self._entries - 1
        i = h & mask
        for _ in range(self._entries):
            offset = _HEADER_SIZE + i * _ENTRY.size
            found = _ENTRY.unpack_from(self._map, offset)[0]
            if found == h:
                self._places[key] = offset
                return offset
            if found == 0:
                if not make:
                    return None
                _ENTRY.pack_into(self._map, offset, h, 0, 0, 0, 0)
                self._places[key] = offset
                return offset
            i = (i + 1) & mask
        if not self._told_full:
            self._told_full = True
            log.error("the node's table of shared limit keys is full (%d keys): new shared keys count as full",
                      self._entries)
        return None

    def held(self, key: str) -> int:
        """Slots of ``key`` held by the node's workers."""
        place = self._place(key, make=False)
        if place is None:
            return 0
        return int(_ENTRY.unpack_from(self._map, place)[1])

    def add(self, key: str, n: int) -> bool:
        """Hold ``n`` more slots of ``key`` (fewer when ``n`` is negative; a
        release raises the generation). Under :meth:`locked`. False when the
        table has no room for the key (nothing changed)."""
        place = self._place(key, make=True)
        if place is None:
            return False
        h, held, wants, giver, greeted = _ENTRY.unpack_from(self._map, place)
        _ENTRY.pack_into(self._map, place, h, max(0, held + n), wants, giver, greeted)
        if n < 0:
            _GENERATION.pack_into(self._map, 0, self.generation + 1)
        return True

    @property
    def generation(self) -> int:
        """Raised by every release: unchanged means no slot freed since it was read last."""
        return int(_GENERATION.unpack_from(self._map, 0)[0])

    def want(self, worker: int, keys: Iterable[str], wanted: bool) -> None:
        """Say that worker ``worker``'s jobs wait (``wanted``), or no longer wait, on ``keys``. Under :meth:`locked`."""
        bit = 1 << worker
        for key in keys:
            place = self._place(key, make=wanted)
            if place is None:
                continue
            h, held, wants, giver, greeted = _ENTRY.unpack_from(self._map, place)
            _ENTRY.pack_into(self._map, place, h, held, (wants | bit) if wanted else (wants & ~bit), giver, greeted)

    def gave(self, worker: int, key: str) -> None:
        """Worker ``worker`` gave a slot of ``key`` back while another's jobs
        waited on it. Under :meth:`locked`."""
        place = self._place(key, make=False)
        if place is not None:
            h, held, wants, _, greeted = _ENTRY.unpack_from(self._map, place)
            _ENTRY.pack_into(self._map, place, h, held, wants, worker + 1, greeted)

    def add_greeted(self, key: str, n: int) -> bool:
        """Count ``n`` more connections of ``key`` past their greeting (fewer
        when ``n`` is negative): each worker tells its own changes. Under
        :meth:`locked`. False when the table has no room for the key."""
        place = self._place(key, make=True)
        if place is None:
            return False
        h, held, wants, giver, greeted = _ENTRY.unpack_from(self._map, place)
        _ENTRY.pack_into(self._map, place, h, held, wants, giver, max(0, greeted + n))
        return True

    def greeted(self, key: str) -> int:
        """Connections of ``key`` past their greeting in the node's workers, as they last told."""
        place = self._place(key, make=False)
        return int(_ENTRY.unpack_from(self._map, place)[4]) if place is not None else 0

    def last_giver(self, key: str) -> int | None:
        """The worker that last :meth:`gave` a slot of ``key`` back, if any."""
        place = self._place(key, make=False)
        giver = int(_ENTRY.unpack_from(self._map, place)[3]) if place is not None else 0
        return giver - 1 if giver else None

    def pause(self, key: str, until: float, now: float) -> bool:
        """Pause ``key`` (a mail host's refusal pause: no worker opens a
        connection to it) until ``until``; ``until`` and ``now`` are seconds
        of one monotonic clock that every process of the machine reads alike
        (``time.monotonic()``). A pause that ends later already stays. Under
        :meth:`locked`. False when every pause entry holds a pause that goes
        on after ``now`` (nothing written)."""
        h, end, now_ns = key_hash(key), int(until * 1e9), int(now * 1e9)
        entries = _PAUSE.iter_unpack(self._map[self._pauses_at:self._pauses_end])
        taken: int | None = None
        for i, (found, found_end) in enumerate(entries):
            if found == h:
                taken, end = i, max(end, found_end)
                break
            if found == 0:
                # Entries are taken first to last: none past a never-used one.
                taken = i if taken is None else taken
                break
            if taken is None and found_end <= now_ns:
                taken = i  # its pause is over: the entry can be taken
        if taken is None:
            if not self._told_pauses_full:
                self._told_pauses_full = True
                log.error("the node's table of refusal pauses is full (%d hosts paused at once): "
                          "a new pause holds for the worker that met the refusal only",
                          (self._pauses_end - self._pauses_at) // _PAUSE.size)
            return False
        _PAUSE.pack_into(self._map, self._pauses_at + taken * _PAUSE.size, h, end)
        _PAUSE_GENERATION.pack_into(self._map, _GENERATION.size, self._pause_generation() + 1)
        return True

    def _pause_generation(self) -> int:
        """Raised by every pause written."""
        return int(_PAUSE_GENERATION.unpack_from(self._map, _GENERATION.size)[0])

    def paused_until(self, key: str, now: float) -> float:
        """When ``key``'s pause ends (0.0: it is not paused at ``now``; both
        as in :meth:`pause`). Not under :meth:`locked`: when a pause was
        written since this process last read them, it reads them again under
        the lock, which it takes itself."""
        if self._pause_generation() != self._pauses_read_at:
            # Under the lock: a pause half written by another worker must not be read.
            with self.locked():
                self._pauses_read_at = self._pause_generation()
                entries = _PAUSE.iter_unpack(self._map[self._pauses_at:self._pauses_end])
                self._pauses_read = {found: end for found, end in entries if found}
        end = self._pauses_read.get(key_hash(key), 0)
        return end / 1e9 if end > int(now * 1e9) else 0.0

    def wanted_by_others(self, worker: int, keys: Iterable[str]) -> set[str]:
        """Those of ``keys`` that another worker's jobs wait on."""
        others = ~(1 << worker)
        out = set()
        for key in keys:
            place = self._place(key, make=False)
            if place is not None and _ENTRY.unpack_from(self._map, place)[2] & others:
                out.add(key)
        return out
