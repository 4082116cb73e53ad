"""The jobs of a spool as an operator lists them (``copiamail list``, the
counterpart of Postfix's ``postqueue -p``): one line per job file with its
folder, age, size, recipient, state and last ``EMAIL_ERROR``.

Listing only reads: it takes no lock and moves nothing, so it is safe while
nodes run. It is a walk through the folders, not a snapshot: a job that
moves from one folder to another while the walk goes on may be missed, or
shown in both."""

from __future__ import annotations

import os
import re
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from copiamail.errors import CopiamailError
from copiamail.jobfile.fsfile import CommandFile
from copiamail.spool.holds import Holds
from copiamail.spool.jobview import engine_lines, job_state, readable_commands, recipient_domain, recipient_of
from copiamail.spool.layout import (
    ACTIVE,
    DELIVERED,
    FAIL,
    SENDING,
    SENT,
    SPARE,
    delivered_mark,
    is_job_name,
    is_queue_name,
)
from copiamail.spool.queue import Spool

# What ``list`` shows without --folder: what is still to be done or needs a
# look (SENT, which only grows, only when asked for).
DEFAULT_FOLDERS = ("TOSEND", ACTIVE, FAIL)


@dataclass(frozen=True)
class ListedJob:
    """One job file as ``list`` shows it. ``folder`` is ``TOSEND3``,
    ``ACTIVE/N1``, ``SENT`` or ``FAIL``; ``age`` the seconds since the file
    was last written (submitted, or last changed by a node)."""

    name: str
    folder: str
    path: Path
    age: float
    size: int
    recipient: str
    domain: str
    state: str
    error: str | None
    held: bool = False  # an operator's hold keeps it in its folder
    busy_count: int = 0  # DOMAINBUSY_COUNT: how often a full limit deferred it

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "folder": self.folder, "path": str(self.path), "age_seconds": round(self.age, 1),
                "size": self.size, "recipient": self.recipient, "domain": self.domain, "state": self.state,
                "error": self.error, "held": self.held, "domainbusy_count": self.busy_count}


def folder_choice(name: str) -> str:
    """The canonical name of a folder ``list --folder`` accepts (any case):
    ``TOSEND``, ``TOSEND<n>``, ``ACTIVE``, ``SENT`` or ``FAIL``; ValueError
    for anything else."""
    upper = name.upper()
    if is_queue_name(upper) or upper in (ACTIVE, SENT, FAIL):
        return upper
    raise ValueError(f"{name!r} is not a spool folder (TOSEND, TOSEND1 ..., ACTIVE, SENT, FAIL)")


def _files(spool: Spool, folders: Collection[str]) -> Iterator[tuple[str, Path]]:
    """(folder label, path) of every job file in ``folders`` (``TOSEND``
    alone stands for every TOSEND folder, a ``TOSEND<n>`` for that one)."""
    every_queue = "TOSEND" in folders
    for queue in spool.queue_folders():
        if every_queue or queue.upper() in folders:
            for w in spool.scan_queue(queue):
                yield queue, w.path
    if ACTIVE in folders:
        active = spool.root / ACTIVE
        nodes = sorted(p for p in active.iterdir() if p.is_dir()) if active.is_dir() else []
        for node_dir in nodes:
            for queue_dir in sorted(q for q in node_dir.iterdir() if q.is_dir() and q.name != SPARE):
                for name in sorted(os.listdir(queue_dir), key=os.fsencode):
                    if is_job_name(name) or name.upper().endswith((f".FS.{SENDING}", f".FS.{DELIVERED}")):
                        yield f"{ACTIVE}/{node_dir.name}", queue_dir / name
    for plain in (SENT, FAIL):
        if plain in folders:
            try:
                names = sorted((n for n in os.listdir(spool.root / plain) if is_job_name(n)), key=os.fsencode)
            except FileNotFoundError:
                continue
            for name in names:
                yield plain, spool.root / plain / name


def list_jobs(spool: Spool, now: float, folders: Collection[str] = DEFAULT_FOLDERS, domain: str | None = None,
              error: re.Pattern[str] | None = None) -> Iterator[ListedJob]:
    """The job files in ``folders`` (names from :func:`folder_choice`), in
    queue order, then ACTIVE by node, then SENT and FAIL; only those whose
    recipient's domain is ``domain`` (any case) and whose ``EMAIL_ERROR``
    ``error`` finds, when given."""
    wanted = domain.lower() if domain is not None else None
    holds = Holds(spool.root)
    for folder, path in _files(spool, set(folders)):
        try:
            st = path.stat()
            cf = CommandFile.read(path)
        except FileNotFoundError:
            continue  # moved on since the folder was read: it is shown where it went, or not
        except (OSError, CopiamailError):
            st, cf = None, None
        found: dict[str, str] = {}
        next_attempt: float | None = None
        if cf is None:
            recipient = "(unreadable)"
        else:
            found, _, next_attempt = engine_lines(readable_commands(cf))
            recipient = recipient_of(cf)
        job_domain = recipient_domain(recipient)
        text = found.get("EMAIL_ERROR")
        if wanted is not None and job_domain != wanted:
            continue
        if error is not None and (text is None or error.search(text) is None):
            continue
        held = is_queue_name(folder) and holds.held(folder, path.name, job_domain)
        state = job_state(path, next_attempt, now, held)
        if path.name.upper().endswith(f".{DELIVERED}") or (
                path.name.upper().endswith(f".{SENDING}") and os.path.exists(delivered_mark(str(path)))):
            # Delivered: renamed so, or its result file (the delivered mark) named beside it.
            state += " (delivered; its result is being written)"
        elif path.name.upper().endswith(f".{SENDING}"):
            state += " (sending)"
        busy = found.get("DOMAINBUSY_COUNT", "0")
        yield ListedJob(path.name.removesuffix(f".{DELIVERED}").removesuffix(f".{SENDING}"), folder, path,
                        max(0.0, now - st.st_mtime) if st is not None else 0.0,
                        st.st_size if st is not None else 0, recipient, job_domain, state, text, held,
                        int(busy) if busy.isascii() and busy.isdigit() else 0)
