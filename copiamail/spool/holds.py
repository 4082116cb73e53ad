"""Holds: jobs an operator has told every node not to take (``copiamail hold``).

A hold is an empty file in ``HOLD/`` in the spool, named for what it holds:
``domain~example.com`` (every job to that recipient domain), ``queue~3`` (every
job in TOSEND3; ``queue~0`` is TOSEND) or ``job~00012345.FS`` (that job, in
whichever folder). It is made by writing a temporary file and renaming it in,
and lifted by removing it, so every node on the spool, on any machine, sees
it whole or not at all. Nodes read the folder again whenever it changes
(:class:`Holds`): a node skips a held job when it scans and when it offers it
a slot, so the job is never claimed and its file never rewritten. Sends that
had started go on to the end.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from copiamail.spool.layout import is_queue_name, queue_number

HOLD_FOLDER = "HOLD"
_SEP = "~"


class HoldKind(StrEnum):
    DOMAIN = "domain"
    QUEUE = "queue"
    JOB = "job"


@dataclass(frozen=True)
class Hold:
    """One hold: a recipient domain (lower case), a queue number, or a job's file name (upper case)."""

    kind: HoldKind
    value: str

    @staticmethod
    def domain(domain: str) -> Hold:
        return Hold(HoldKind.DOMAIN, domain.strip().lower())

    @staticmethod
    def queue(number: int) -> Hold:
        return Hold(HoldKind.QUEUE, str(number))

    @staticmethod
    def job(name: str) -> Hold:
        return Hold(HoldKind.JOB, name.upper())

    @property
    def file_name(self) -> str:
        return f"{self.kind.value}{_SEP}{self.value}"

    def __str__(self) -> str:
        if self.kind is HoldKind.QUEUE:
            return f"queue {'TOSEND' if self.value == '0' else 'TOSEND' + self.value}"
        return f"{self.kind.value} {self.value}"


def _parse(name: str) -> Hold | None:
    kind, sep, value = name.partition(_SEP)
    if not sep or not value or kind not in {k.value for k in HoldKind}:
        return None
    return Hold(HoldKind(kind), value)


def holds_in(root: Path) -> set[Hold]:
    """The holds in force in the spool at ``root``."""
    try:
        names = os.listdir(root / HOLD_FOLDER)
    except FileNotFoundError:
        return set()
    return {h for n in names if not n.startswith(".") and (h := _parse(n)) is not None}


def add_hold(root: Path, hold: Hold) -> bool:
    """Put ``hold`` in force; False if it already was. Raises OSError."""
    folder = root / HOLD_FOLDER
    folder.mkdir(exist_ok=True)
    path = folder / hold.file_name
    if path.exists():
        return False
    tmp = folder / f".{hold.file_name}.{os.getpid()}.tmp"
    tmp.write_bytes(b"")
    os.replace(tmp, path)
    return True


def remove_hold(root: Path, hold: Hold) -> bool:
    """Lift ``hold``; False if it was not in force. Raises OSError."""
    try:
        (root / HOLD_FOLDER / hold.file_name).unlink()
    except FileNotFoundError:
        return False
    return True


class Holds:
    """The holds of one spool as a node sees them: the folder is read again
    whenever its modification time changes (one stat per question, or per
    ``look_every`` seconds at most), and at least every second (two changes
    within one tick of the file system's clock leave its time as it was)."""

    def __init__(self, root: Path, look_every: float = 0.0) -> None:
        self._folder = root / HOLD_FOLDER
        self._root = root
        self._look_every = look_every
        self._looked_at = float("-inf")
        self._seen: int | None = None
        self._read_at = float("-inf")
        self._domains: frozenset[str] = frozenset()
        self._queues: frozenset[int] = frozenset()
        self._jobs: frozenset[str] = frozenset()

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._looked_at < self._look_every:
            return
        self._looked_at = now
        try:
            stamp: int | None = os.stat(self._folder).st_mtime_ns
        except FileNotFoundError:
            stamp = None
        if stamp == self._seen and now - self._read_at < 1.0:
            return
        holds = holds_in(self._root)
        self._seen, self._read_at = stamp, now
        self._domains = frozenset(h.value for h in holds if h.kind is HoldKind.DOMAIN)
        self._queues = frozenset(int(h.value) for h in holds if h.kind is HoldKind.QUEUE and h.value.isdigit())
        self._jobs = frozenset(h.value for h in holds if h.kind is HoldKind.JOB)

    def held(self, queue: str, name: str, domain: str) -> bool:
        """Whether the job ``name`` in folder ``queue`` to ``domain`` is held."""
        self._refresh()
        if not (self._domains or self._queues or self._jobs):
            return False
        return (domain.lower() in self._domains or queue_number(queue) in self._queues
                or name.upper() in self._jobs)


def held_where_it_is(path: Path, domain: str) -> bool:
    """Whether the job file at ``path``, to ``domain``, waits in a TOSEND
    folder of a spool with a hold on it (``show``)."""
    folder = path.absolute().parent
    return is_queue_name(folder.name) and Holds(folder.parent).held(folder.name, path.name, domain)
