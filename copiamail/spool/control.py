"""An operator's moves of single jobs while nodes run (``copiamail cancel``,
``copiamail flush`` and ``copiamail requeue``).

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

``flush`` makes a job that waits for its retry time due now, the same way:
``TOSENDx/NAME.FS`` is renamed to ``TOSENDx/NAME.FS.FLUSH`` (invisible to the
nodes), its version with ``$fax_next_date``/``$fax_next_time`` set to now is
written beside it, fsynced and renamed to ``NAME.FS`` (if a submitter wrote a
new ``NAME.FS`` meanwhile, the flush gives up and puts the old one back under
``NAME~1.FS``), and the ``.FLUSH`` file is removed. A crash in between leaves
``NAME.FS.FLUSH`` (the job unchanged); the next ``flush`` finishes it.

``requeue`` moves a job from FAIL back to the TOSEND folder it came from (the
TOSEND field of its last attempt record) with one rename, under its name or
the first free ``NAME~n.FS``: nothing is written, and a crash leaves it in
FAIL or in its folder, never in both or neither. Nodes never take jobs from
FAIL, so the rename races only another ``requeue``, and one of the two finds
the file gone. The job keeps its whole history; its retry budget starts
afresh because its ``$fax_status1 6``, written when it failed, is the mark
after which a job moved back counts its attempts. A file in FAIL without
that mark as its last status (not written by an engine) is refused: moved
as it is, its old attempts would still count.
"""

from __future__ import annotations

import os
from pathlib import Path

from copiamail.errors import SpoolError
from copiamail.jobfile import outcome, records
from copiamail.jobfile.fsfile import CommandFile
from copiamail.osutil import rename_noreplace
from copiamail.spool.holds import Holds
from copiamail.spool.jobview import engine_lines, readable_commands, recipient_domain, recipient_of
from copiamail.spool.layout import ACTIVE, FAIL, is_job_name, is_queue_name, queue_names, queue_number
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


def _put_in_place(spool: Spool, taken: Path, suffix: str, version: CommandFile) -> Path:
    """Write ``version`` of the job taken at ``taken`` (its name plus
    ``suffix``) beside it, fsynced; rename it to the job's name (or the first
    free one); then remove ``taken``. Returns where the job is."""
    name = taken.name.removesuffix(suffix)
    tmp = taken.with_name(f".{name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, version.to_bytes())
        os.fsync(fd)
    finally:
        os.close(fd)
    where = spool.place(os.fspath(tmp), os.fspath(taken.parent), name)
    if spool.fsync:
        _fsync_dir(taken.parent)
    taken.unlink()
    return where


def _write_cancelled(spool: Spool, taken: Path, queue: int, now: float) -> Path:
    """Steps 2 to 4 for the job taken at ``taken``; returns where it is in FAIL."""
    version = records.failed(CommandFile.read(taken), CANCELLER, outcome.CANCELLED.code, outcome.CANCELLED.klass,
                             CANCELLED_TEXT, now, records.Where(queue, 0, None, None))
    return _put_in_place(spool, taken, CANCEL_SUFFIX, version)


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


FLUSH_SUFFIX = ".FLUSH"


def _write_flushed(spool: Spool, taken: Path, now: float) -> Path:
    date, clock = records.local_stamp(now)
    version = CommandFile.read(taken).edited(commands=(("fax_next_date", (date,)), ("fax_next_time", (clock,))))
    return _put_in_place(spool, taken, FLUSH_SUFFIX, version)


def flush_jobs(spool: Spool, now: float, domain: str | None = None) -> list[Path]:
    """Make every job in the TOSEND folders that waits for a retry time
    (``$fax_next_date`` after ``now``) due now; only those to ``domain`` when
    given. Held jobs are left alone (a hold means untouched). Interrupted
    flushes are finished first. Returns the jobs made due."""
    holds = Holds(spool.root)
    done: list[Path] = []
    for queue in spool.queue_folders():
        folder = spool.root / queue
        try:
            left = sorted(n for n in os.listdir(folder) if n.upper().endswith(".FS" + FLUSH_SUFFIX))
        except FileNotFoundError:
            continue
        done += [_write_flushed(spool, folder / n, now) for n in left]
    for w in spool.scan():
        try:
            cf = CommandFile.read(w.path)
        except OSError:
            continue  # taken meanwhile
        _, _, next_attempt = engine_lines(readable_commands(cf))
        to = recipient_domain(recipient_of(cf))
        if next_attempt is None or next_attempt <= now or (domain is not None and to != domain.lower()):
            continue
        if holds.held(w.queue, w.name, to):
            continue
        taken = w.path.with_name(w.name + FLUSH_SUFFIX)
        try:
            rename_noreplace(w.path, taken)
        except (FileNotFoundError, FileExistsError):
            continue  # a node took it, or another flush is at it
        done.append(_write_flushed(spool, taken, now))
    return done


def _queue_folder(spool: Spool, queue: int) -> str:
    """The folder of TOSEND number ``queue`` as the spool spells it (its usual name if there is none)."""
    for name in spool.queue_folders():
        if queue_number(name) == queue:
            return name
    return queue_names(queue)[-1]


def requeue(spool: Spool, path: Path) -> Path:
    """Move the job at ``path`` (in the spool's FAIL) back to the TOSEND
    folder it came from, for a fresh run; returns where it is. SpoolError, in
    one line, if it is not a failed job of this spool or not there any more."""
    path = path.absolute()
    if not is_job_name(path.name):
        raise SpoolError(f"{path}: not a job file (NAME.FS)")
    if path.parent != (spool.root / FAIL).absolute():
        raise SpoolError(f"{path}: not in {spool.root / FAIL}; not requeued")
    try:
        commands = readable_commands(CommandFile.read(path))
    except FileNotFoundError:
        raise SpoolError(f"{path}: no longer in FAIL; not requeued") from None
    status = [c.args[0] for c in commands if c.name == "fax_status1" and c.args]
    if status[-1:] != ["6"]:
        raise SpoolError(f"{path}: its last $fax_status1 is not 6, so its earlier attempts would count "
                         "against its retries; not requeued")
    _, attempts, _ = engine_lines(commands)
    queue = next((a.queue for a in reversed(attempts) if a.queue is not None), 0)
    folder = spool.root / _queue_folder(spool, queue)
    try:
        where = spool.place(os.fspath(path), os.fspath(folder), path.name)
    except FileNotFoundError:
        raise SpoolError(f"{path}: no longer in FAIL (requeued by another command?); not requeued") from None
    if spool.fsync:
        _fsync_dir(folder)
    return where
