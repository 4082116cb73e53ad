"""Which job names a node may hold in its ACTIVE folder: a filter that its
claims consult before they look on disk.

A claim of ``Q/X.FS`` must wait while a job of the same name from the same
queue is still in the node's ``ACTIVE/<node>/Q`` under any of its names
(``X.FS.SENDING``, ``X.FS.SENT`` ...; :meth:`Spool.claim
<copiamail.spool.queue.Spool.claim>`). Asking the disk takes five look-ups
of names that almost never exist, in a folder that changes with every
message. This filter answers most claims without them: counters in memory
shared by the node's processes (mapped before its workers fork), one row
per process, each row written by its process only, so no lock is needed.
Names share counters (by a hash), so the filter may answer "maybe" for a
name no job holds (the disk is then asked, as without the filter), and it
never answers "no" for a name a job of the node holds:

- a process counts a name in before the rename that claims its job, and out
  only once no name of the job is left in ACTIVE (its result published, or
  the job handed back with no result of it left beside it). A count left in
  (an error left a result in ACTIVE, moved later by a scan) only costs
  look-ups;
- a second ``Q/X.FS`` can appear in a TOSEND folder only after the first
  has left it, that is, after the first one's claimer counted it in (so a
  claim of it meets "maybe", and looks on disk before its rename and again
  after it: the job of the name may have been marked sending in between);
- keys ignore case, as the spool's names do on a file system that ignores
  it (a share), and name the node;
- names found in ACTIVE when the node starts (what recovery could not move)
  are counted in a row of their own, and never out.
"""

from __future__ import annotations

import mmap
import os
import struct
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Final

from copiamail.spool.layout import SPARE

SLOTS = 1 << 14  # counters per row (a power of two): 64 kB a row
_COUNTER: Final = "I"  # 32 bits: a row never counts more than the jobs its process holds


def held_key(node: str, queue: str, name: str) -> str:
    """The filter's key for job ``name`` claimed by ``node`` from queue folder
    ``queue``. Upper case: a name that differs only in case may be the same
    file, and two keys taken for one only cost a look-up."""
    return f"{node}/{queue}/{name}".upper()


def keys_in(active: Path, node: str) -> list[str]:
    """The keys of every job name node ``node`` holds in its ACTIVE folder
    ``active`` under any of its names (each file's own name, and its name
    without its last suffix): those found at the node's start."""
    try:
        folders = [q for q in active.iterdir() if q.is_dir() and q.name != SPARE]
    except (FileNotFoundError, NotADirectoryError):
        return []
    keys = []
    for folder in folders:
        for f in os.listdir(folder):
            keys += [held_key(node, folder.name, f), held_key(node, folder.name, f.rpartition(".")[0])]
    return keys


def _slot(key: str) -> int:
    # crc32, not hash(): the same answer in every process, however started.
    return zlib.crc32(key.encode("utf-8", "surrogateescape")) & (SLOTS - 1)


class HeldNames:
    """The filter of one node (see the module's docstring), as seen by one
    process: it reads every row and writes row ``row``."""

    def __init__(self, table: mmap.mmap, rows: int, row: int) -> None:
        self._table = table
        self._counts = memoryview(table).cast(_COUNTER)
        self._rows = rows
        self._row = row * SLOTS
        self._mine: dict[str, int] = {}  # keys this process counted in and not yet out

    @classmethod
    def create(cls, processes: int) -> HeldNames:
        """A new filter for ``processes`` claiming processes (each takes its
        row with :meth:`for_process`), in memory its forked children share.
        The object returned writes the row of the names found at the start
        (:meth:`count_in` them before the fork)."""
        table = mmap.mmap(-1, SLOTS * struct.calcsize(_COUNTER) * (processes + 1))  # anonymous and shared
        return cls(table, processes + 1, processes)

    def for_process(self, index: int) -> HeldNames:
        """The filter as process ``index`` (0 .. processes-1) uses it."""
        if not 0 <= index < self._rows - 1:
            raise ValueError(f"no row for process {index}")
        return HeldNames(self._table, self._rows, index)

    def may_hold(self, key: str) -> bool:
        """False only if no job of ``key`` is in ACTIVE (counted in by any
        process and not yet out)."""
        slot = _slot(key)
        counts = self._counts
        return any(counts[row * SLOTS + slot] for row in range(self._rows))

    def count_in(self, key: str) -> None:
        """This process is about to put a job of ``key`` into ACTIVE."""
        self._counts[self._row + _slot(key)] += 1
        self._mine[key] = self._mine.get(key, 0) + 1

    def count_out(self, key: str) -> None:
        """A job of ``key`` this process counted in has no name left in
        ACTIVE. A key it did not count in is ignored (a job of a recovery,
        or one its claim never counted): taking it out could hide another."""
        left = self._mine.get(key)
        if left is None:
            return
        if left == 1:
            del self._mine[key]
        else:
            self._mine[key] = left - 1
        self._counts[self._row + _slot(key)] -= 1

    def count_all_in(self, keys: Iterable[str]) -> None:
        """:meth:`count_in` for each of ``keys`` (the names found at the start)."""
        for key in keys:
            self.count_in(key)
