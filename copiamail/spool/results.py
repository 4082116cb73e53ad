"""Results written through spare files: states 3 to 5 of the spool protocol
(:mod:`copiamail.spool.queue` lists every state and what a crash leaves at
each). :class:`Spares` keeps a process's spare files and writes a job's next
version into one; :class:`ResultBatch` carries the results of several jobs
from their spares to their commit, their fsyncs made together."""

from __future__ import annotations

import errno
import itertools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from copiamail.osutil import fsync_all, write_all
from copiamail.spool.crashpoints import check_disk_space, crash_point, crashes_while_writing
from copiamail.spool.layout import ACTIVE, SPARE, Claimed

_SPARES_KEPT = 512  # at most this many spares per process; more are deleted


@dataclass(frozen=True)
class DeliveredMark:
    """A delivered job's mark: its result file ``result`` (``X.FS.SENT``)
    named beside its claimed ``X.FS.SENDING``, open at ``fd`` for the
    result's data (until its commit)."""

    result: str
    fd: int


def _let_go(spare: str, fd: int, result: str) -> None:
    """Give up a written result not yet synced: a spare is deleted; a result
    that is its job's delivered mark (``spare`` is ``result``) is only
    closed, the mark kept: the job was delivered, whatever the file holds."""
    if spare == result:
        os.close(fd)
    else:
        _drop(spare, fd)


def _drop(spare: str, fd: int | None) -> None:
    """Close and delete a spare whose result could not be written."""
    if fd is not None:
        os.close(fd)
    try:
        os.unlink(spare)
    except OSError:
        pass


def fill(fd: int, data: bytes, path: str) -> None:
    """Write ``data`` over the file open at ``fd`` (a spare, or a result named
    already: ``path``), from its start, and cut it to that length."""
    if crashes_while_writing():
        write_all(fd, data[: len(data) // 2])
        crash_point(f"writing-{path.rsplit('.', 1)[1]}")
    write_all(fd, data)
    # A spare is written over, not emptied first: truncating a file whose
    # blocks were synced costs the kernel sixteen times the write. Only what
    # is left past the new end is cut off.
    if os.fstat(fd).st_size > len(data):
        os.ftruncate(fd, len(data))


class Spares:
    """The spare files of one process under spool root ``root``: files with no
    job in ``ACTIVE/<node>/.spare``, each an inode to write a result into
    (rewriting a file costs far less than creating one). A retired claimed
    job becomes one; at most :data:`_SPARES_KEPT` are kept."""

    def __init__(self, root: str) -> None:
        self._root = root
        self._files: list[str] = []
        self._numbers = itertools.count()

    def write(self, path: str, data: bytes, node: str) -> tuple[str, int]:
        """Write ``data`` into a spare file (not yet fsynced) for the result
        ``path``; the spare's name and its still open descriptor."""
        check_disk_space(path)
        spare, fd = self._open(node)
        try:
            fill(fd, data, path)
        except OSError:
            _drop(spare, fd)
            raise
        return spare, fd

    def mark(self, path: str, node: str) -> int:
        """Rename a spare file to the result ``path`` at once, its old bytes
        still in it (a name that marks a job delivered: one rename, no data
        written yet); its open descriptor, to :func:`fill` next. Raises the
        OSError that stopped it, with no name taken."""
        spare, fd = self._open(node)
        try:
            os.rename(spare, path)
        except OSError:
            _drop(spare, fd)
            raise
        return fd

    def _open(self, node: str) -> tuple[str, int]:
        """A spare file of this process, open for writing at its start (its
        old bytes still there; a new one when none is left)."""
        while self._files:
            spare = self._files.pop()
            try:
                return spare, os.open(spare, os.O_WRONLY)
            except FileNotFoundError:
                continue  # removed by hand, or by a recovery: take the next
        folder = self._folder(node)
        for _ in range(2):
            spare = f"{folder}/{os.getpid()}-{next(self._numbers)}"
            try:
                return spare, os.open(spare, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileNotFoundError:
                os.makedirs(folder, exist_ok=True)
            except FileExistsError:
                continue  # left by an earlier process of the same number
        spare = f"{folder}/{os.getpid()}-{next(self._numbers)}"
        return spare, os.open(spare, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)

    def retire(self, claimed: Claimed) -> None:
        """Remove the claimed job's name (the commit): its inode becomes a
        spare, or is deleted when this process has spares enough."""
        if len(self._files) >= _SPARES_KEPT:
            os.unlink(claimed.file)
            return
        spare = f"{self._folder(claimed.node)}/{os.getpid()}-{next(self._numbers)}"
        try:
            os.rename(claimed.file, spare)
        except FileNotFoundError:
            os.unlink(claimed.file)  # the spare folder was removed meanwhile
            return
        self._files.append(spare)

    def _folder(self, node: str) -> str:
        return f"{self._root}/{ACTIVE}/{node}/{SPARE}"

    def drop(self) -> None:
        """Delete this process's spare files (when it stops)."""
        spares, self._files = self._files, []
        for spare in spares:
            try:
                os.unlink(spare)
            except OSError:
                pass


class ResultBatch:
    """The results of several jobs between states 3 and 5, made by
    :meth:`~copiamail.spool.queue.Spool.write_results`: each written into a
    spare, its descriptor still open. Then either ``sync`` (fsync here, when
    ``fsync`` is on) or ``synced`` (the fsyncs were made elsewhere:
    :mod:`copiamail.spool.syncer`), and ``commit``, which hands each result to
    ``commit_result`` (states 4 and 5: where the job landed). A delivered
    job's result may be in place already, written into its delivered mark
    (an entry whose spare is its result)."""

    def __init__(self, claimed: list[Claimed], fsync: bool, commit_result: Callable[[Claimed, str], Path]) -> None:
        self._claimed = claimed
        self._fsync = fsync
        self._commit_result = commit_result
        self.out: list[Path | OSError | None] = [None] * len(claimed)
        self.written: list[tuple[int, str, int, str]] = []  # (index, spare, fd, result); spare is result: in place

    def __len__(self) -> int:
        return len(self.written)

    @property
    def fds(self) -> list[int]:
        """The open descriptors of the written results, in order."""
        return [fd for _, _, fd, _ in self.written]

    def sync(self) -> None:
        """fsync every written result (with fsync on): the disk is asked to
        write them all first, so the waits overlap instead of adding up."""
        if not self._fsync:
            return
        self.synced(fsync_all(self.fds))

    def synced(self, errors: Sequence[int]) -> None:
        """The fsync of each written result was made, with these errnos (0:
        durable, in the order of :attr:`fds`). A result that could not be
        synced is dropped (its job is intact, still claimed)."""
        errors = list(errors)[: len(self.written)]
        errors += [errno.EIO] * (len(self.written) - len(errors))  # no answer: not durable
        kept = []
        for entry, err in zip(self.written, errors, strict=True):  # errors was made as long just above
            if err:
                self.out[entry[0]] = OSError(err, os.strerror(err), entry[1])
                _let_go(entry[1], entry[2], entry[3])
            else:
                kept.append(entry)
        self.written = kept

    def abandon(self, error: OSError) -> None:
        """Give up every written result not yet committed: each spare is
        deleted and its job (intact, still claimed; a delivered job keeps its
        mark) gets ``error``."""
        for i, spare, fd, result in self.written:
            self.out[i] = error
            _let_go(spare, fd, result)
        self.written = []

    def commit(self) -> list[Path | OSError]:
        """States 3 to 5 for each synced result, in turn: where each job
        landed, or the OSError that stopped it."""
        for i, spare, fd, result in self.written:
            os.close(fd)
            if spare != result:
                try:
                    os.rename(spare, result)
                except OSError as e:
                    self.out[i] = e
                    _drop(spare, None)
                    continue
            crash_point(f"written-{result.rsplit('.', 1)[1]}")
            try:
                self.out[i] = self._commit_result(self._claimed[i], result)
            except OSError as e:
                self.out[i] = e
        self.written = []
        return cast("list[Path | OSError]", self.out)  # every slot is set by now
