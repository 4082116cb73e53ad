"""Slot counts that a node's workers share: one table in shared memory.

A cap that counts connections of several domains (the node total, a binding's
or group's total, a pooled regex stanza, a host) is met by connections of
every worker of a node, since each worker sends its own domains. Its count is
kept here, once for the node, so whichever worker needs a slot can use the
whole cap, and the cap still holds for the node as a whole.

The table is a ``memfd`` mapped by the supervisor before it forks the workers,
so every worker sees the same bytes. An entry per key: the key's 64-bit hash
(0: the entry is free), the slots held (for the key of a mail host's refusal
pause, the instant the pause ends instead: :meth:`SharedSlots.pause`), a bit
per worker whose jobs wait on the key, and the worker that last gave a slot of
it back while another worker's jobs waited (so the slot over the halves of an
odd cap goes round: :meth:`~copiamail.scheduling.limiter.LocalLimiter.leaves`).
The header holds a generation number, raised whenever a slot is given back, so
a worker can tell cheaply that something freed.

Every read-then-write runs under a POSIX record lock on the same ``memfd``
(``lockf``): it is per process, so the workers exclude each other, and the
kernel drops it when its holder dies, so a worker killed inside the critical
section cannot block the others. A worker that dies takes the node down with
it (:mod:`copiamail.node.workers`), and the table is made afresh at the next
start, so slots a dead worker held are never counted again.

Entries are never removed: the keys are the shared caps of the configuration
and the hosts they name, a few hundred at most. A table with no free entry
left counts a new key as full (never over a cap) and says so once.
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

ENTRIES = 1 << 14  # entries in the table (a power of two): 512 kB
_HEADER = struct.Struct("<Q")  # generation
_ENTRY = struct.Struct("<QqQq")  # key hash, slots held, workers waiting (bit per worker), last giver + 1


def key_hash(key: str) -> int:
    """``key``'s place in the table: stable across processes, never 0."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little") or 1


class SharedSlots:
    """The shared table of one node (see the module's docstring). Made by
    the supervisor with :meth:`create` before its workers fork; each worker
    uses it from one event loop, under :meth:`locked` for anything that both
    reads and writes."""

    def __init__(self, fd: int, entries: int = ENTRIES) -> None:
        self._fd = fd
        self._entries = entries
        self._map = mmap.mmap(fd, _HEADER.size + entries * _ENTRY.size)
        self._places: dict[str, int] = {}  # key -> entry offset, as found by this process
        self._told_full = False

    @classmethod
    def create(cls, entries: int = ENTRIES) -> SharedSlots:
        fd = os.memfd_create("copiamail-slots", os.MFD_CLOEXEC)
        os.ftruncate(fd, _HEADER.size + entries * _ENTRY.size)
        return cls(fd, entries)

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
            offset = _HEADER.size + i * _ENTRY.size
            found = _ENTRY.unpack_from(self._map, offset)[0]
            if found == h:
                self._places[key] = offset
                return offset
            if found == 0:
                if not make:
                    return None
                _ENTRY.pack_into(self._map, offset, h, 0, 0, 0)
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
        h, held, wants, giver = _ENTRY.unpack_from(self._map, place)
        _ENTRY.pack_into(self._map, place, h, max(0, held + n), wants, giver)
        if n < 0:
            _HEADER.pack_into(self._map, 0, self.generation + 1)
        return True

    @property
    def generation(self) -> int:
        """Raised by every release: unchanged means no slot freed since it was read last."""
        return int(_HEADER.unpack_from(self._map, 0)[0])

    def want(self, worker: int, keys: Iterable[str], wanted: bool) -> None:
        """Say that worker ``worker``'s jobs wait (``wanted``), or no longer wait, on ``keys``. Under :meth:`locked`."""
        bit = 1 << worker
        for key in keys:
            place = self._place(key, make=wanted)
            if place is None:
                continue
            h, held, wants, giver = _ENTRY.unpack_from(self._map, place)
            _ENTRY.pack_into(self._map, place, h, held, (wants | bit) if wanted else (wants & ~bit), giver)

    def gave(self, worker: int, key: str) -> None:
        """Worker ``worker`` gave a slot of ``key`` back while another's jobs
        waited on it. Under :meth:`locked`."""
        place = self._place(key, make=False)
        if place is not None:
            h, held, wants, _ = _ENTRY.unpack_from(self._map, place)
            _ENTRY.pack_into(self._map, place, h, held, wants, worker + 1)

    def last_giver(self, key: str) -> int | None:
        """The worker that last :meth:`gave` a slot of ``key`` back, if any."""
        place = self._place(key, make=False)
        giver = int(_ENTRY.unpack_from(self._map, place)[3]) if place is not None else 0
        return giver - 1 if giver else None

    def pause(self, key: str, until: float) -> None:
        """Pause ``key`` (a mail host's refusal pause: no worker opens a
        connection to it) until ``until``, seconds of ``time.monotonic()``,
        which every process of the machine reads alike; a pause that ends
        later already stays. Under :meth:`locked`. Such a key holds no slots."""
        place = self._place(key, make=True)
        if place is None:
            return
        h, end, wants, giver = _ENTRY.unpack_from(self._map, place)
        _ENTRY.pack_into(self._map, place, h, max(end, int(until * 1e9)), wants, giver)

    def paused_until(self, key: str) -> float:
        """When ``key``'s pause ends (0.0: it was never paused)."""
        place = self._place(key, make=False)
        return int(_ENTRY.unpack_from(self._map, place)[1]) / 1e9 if place is not None else 0.0

    def wanted_by_others(self, worker: int, keys: Iterable[str]) -> set[str]:
        """Those of ``keys`` that another worker's jobs wait on."""
        others = ~(1 << worker)
        out = set()
        for key in keys:
            place = self._place(key, make=False)
            if place is not None and _ENTRY.unpack_from(self._map, place)[2] & others:
                out.add(key)
        return out
