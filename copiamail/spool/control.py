"""An operator's moves of single jobs while nodes run (``copiamail cancel``).

``cancel`` takes a waiting job out of its TOSEND folder the way a node claims
one, with a rename, so a job is in one place at any instant and a node that
claims it first wins (the cancel then says the job is no longer waiting):

1. ``TOSENDx/NAME.FS`` is renamed to ``FAIL/NAME.FS.CANCEL``. No node or
   command reads that name as a job: from this instant the job is taken.
2. Its cancelled version (an attempt record of outcome 68, ``EMAIL_ERROR``,
   ``$fax_status1 6``) is written beside it and fsynced.
3. That version is renamed to ``FAIL/NAME.FS`` (another free name if one is
   taken), and the folder fsynced.
4. ``NAME.FS.CANCEL`` is removed.

A crash after 1 leaves ``FAIL/NAME.FS.CANCEL``, the job's file unchanged; after
3, both files. The next ``cancel`` finishes either (:func:`finish_cancels`).
"""

from __future__ import annotations

import os
from pathlib import Path

from copiamail.errors import SpoolError
from copiamail.jobfile import outcome, records
from copiamail.jobfile.fsfile import CommandFile
from copiamail.osutil import rename_noreplace
from copiamail.spool.layout import ACTIVE, FAIL, is_job_name, is_queue_name, queue_number
from copiamail.spool.queue import Spool

CANCEL_SUFFIX = ".CANCEL"
CANCELLER = "cancel"  # the node name its attempt record shows
CANCELLED_TEXT = "cancelled by the operator"


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_cancelled(spool: Spool, taken: Path, queue: int, now: float) -> Path:
    """Steps 2 and 3 for the job taken at ``taken``; returns where it is in FAIL."""
    cf = CommandFile.read(taken)
    version = records.failed(cf, CANCELLER, outcome.CANCELLED.code, outcome.CANCELLED.klass, CANCELLED_TEXT, now,
                             records.Where(queue, 0, None, None))
    name = taken.name.removesuffix(CANCEL_SUFFIX)
    tmp = taken.with_name(f".{name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, version.to_bytes())
        os.fsync(fd)
    finally:
        os.close(fd)
    folder = taken.parent
    candidate = name
    for n in range(1, 10000):
        try:
            rename_noreplace(tmp, folder / candidate)
            break
        except FileExistsError:
            stem, dot, ext = name.rpartition(".")
            candidate = f"{stem}~{n}{dot}{ext}"
    else:
        raise SpoolError(f"{folder}/{name}: no free name for the cancelled job")
    if spool.fsync:
        _fsync_dir(folder)
    taken.unlink()
    return folder / candidate


def cancel(spool: Spool, path: Path, now: float) -> Path:
    """Move the waiting job at ``path`` (in a TOSEND folder of ``spool``) to
    FAIL as cancelled; returns where it is. SpoolError, in one line, if it is
    not a waiting job (in flight, already finished, gone, or not in this
    spool)."""
    path = path.absolute()
    folder = path.parent
    if not is_job_name(path.name):
        raise SpoolError(f"{path}: not a job file (NAME.FS)")
    if ACTIVE in path.parts[-4:-1]:
        raise SpoolError(f"{path}: in flight on node {path.parts[-3]}; not cancelled")
    if folder.parent != spool.root.absolute() or not is_queue_name(folder.name):
        raise SpoolError(f"{path}: not waiting in a TOSEND folder of {spool.root}; not cancelled")
    taken = spool.root.absolute() / FAIL / f"{path.name}{CANCEL_SUFFIX}"
    (spool.root / FAIL).mkdir(exist_ok=True)
    try:
        rename_noreplace(path, taken)
    except FileNotFoundError:
        raise SpoolError(f"{path}: no longer waiting (a node took it, or it is gone); not cancelled") from None
    except FileExistsError:
        raise SpoolError(f"{taken}: a cancel of a job of this name is unfinished; run cancel again later") from None
    return _write_cancelled(spool, taken, queue_number(folder.name), now)


def finish_cancels(spool: Spool, now: float) -> list[Path]:
    """Finish the cancels a crash interrupted (``FAIL/*.FS.CANCEL``); returns
    where their jobs are."""
    fail = spool.root / FAIL
    try:
        left = sorted(n for n in os.listdir(fail) if n.upper().endswith(".FS" + CANCEL_SUFFIX))
    except FileNotFoundError:
        return []
    done: list[Path] = []
    for name in left:
        taken = fail / name
        version = fail / name.removesuffix(CANCEL_SUFFIX)
        if version.exists() and f"{CANCELLED_TEXT}" in version.read_text(encoding="utf-8", errors="replace"):
            taken.unlink()  # step 3 was done
            done.append(version)
        else:
            done.append(_write_cancelled(spool, taken, 0, now))
    return done
