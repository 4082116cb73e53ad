"""The spool's layout: its folders, the names of jobs and queues, and where a
job stands (:class:`QueuedJob` in a TOSEND folder, :class:`Claimed` in a node's
ACTIVE folder, the :class:`Destination` of its result). The moves between
them are :mod:`copiamail.spool.queue`'s."""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

ACTIVE = "ACTIVE"
SENT = "SENT"
FAIL = "FAIL"
TEMP = "TEMP"
SPARE = ".spare"  # the folder of spare files inside ACTIVE/<node>


class Destination(StrEnum):
    """Where a finished job goes: the SENT or FAIL folder, or BACK to its own
    queue. The value is also the suffix of its result file in ACTIVE."""

    SENT = "SENT"
    FAIL = "FAIL"
    BACK = "BACK"


RESULT_SUFFIXES = tuple(d.value for d in Destination)
SENDING = "SENDING"  # the suffix of a claimed job whose SMTP transaction has started
DELIVERED = "DELIVERED"  # the suffix of a claimed job the server has accepted
_QUEUE_NAME = re.compile(r"^TOSEND(\d*)$", re.IGNORECASE)


def delivered_mark(sending: str) -> str:
    """The path of the result file that marks the job at ``sending``
    (``X.FS.SENDING``) delivered: ``X.FS.SENT`` beside it."""
    return f"{sending[:-len(SENDING)]}{SENT}"


def is_job_name(name: str) -> bool:
    return name.upper().endswith(".FS") and len(name) > 3


def is_queue_name(name: str) -> bool:
    """Whether a folder of this name is a TOSEND folder (in any case: ``tosend1`` is ``TOSEND1``)."""
    return _QUEUE_NAME.match(name) is not None


def queue_number(queue: str) -> int:
    """The number of a queue folder: 0 for TOSEND, n for TOSENDn (any case)."""
    number = queue[6:]
    return int(number) if number.isascii() and number.isdigit() else 0


def queue_names(queues: int) -> list[str]:
    """TOSEND, TOSEND1 ... TOSEND<queues>, highest priority first."""
    return ["TOSEND"] + [f"TOSEND{i}" for i in range(1, queues + 1)]


@dataclass(frozen=True)
class QueuedJob:
    """A job file in a TOSEND folder. Ordered by (priority, name bytes).
    ``file`` is its path as a string: the scheduler keys its tables by it
    (a scan makes one QueuedJob per file; a Path would cost more to build and
    hash than the scan's system calls)."""

    priority: int
    queue: str
    name: str
    file: str

    @functools.cached_property
    def path(self) -> Path:
        return Path(self.file)

    @property
    def order(self) -> tuple[int, bytes]:
        return (self.priority, os.fsencode(self.name))


@dataclass(frozen=True)
class Claimed:
    """A job node ``node`` holds in ``ACTIVE/<node>/<queue>/<name>``, at
    ``file`` (its name there may carry a state suffix). ``file`` is a string,
    as for :class:`QueuedJob`: every job is claimed and marked, and pathlib
    costs more than the renames themselves."""

    node: str
    queue: str
    name: str
    file: str

    @functools.cached_property
    def path(self) -> Path:
        return Path(self.file)

    @property
    def marked_sending(self) -> bool:
        """Whether its name marks its SMTP transaction begun (``X.FS.SENDING``)."""
        return self.file.endswith(f".{SENDING}")
