"""The files a job names, as this machine reads them.

A job names files by the paths its submitter wrote, often Windows paths
(CopiaFacts runs on Windows): ``path_map`` turns their prefixes into local
folders, and every backslash becomes a separator. A relative path is taken
from the spool root. A file is read only if its real path (symlinks and
``..`` followed) lies inside one of the attachment roots; every refusal is a
:class:`~copiamail.errors.JobError` with the job line that names the file
(``MISSING_FILE`` or ``OUTSIDE_ROOTS``).
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from copiamail.errors import JobError
from copiamail.jobfile import outcome

_WINDOWS_DRIVE = re.compile(r"[A-Za-z]:[\\/]|\\\\")


def local_path(path: str, path_map: tuple[tuple[str, str], ...]) -> str:
    """A job's file path as this machine names it: the longest ``path_map``
    prefix it starts with (any case) replaced by its folder, and every
    backslash a separator (CopiaFacts jobs carry Windows paths)."""
    low = path.lower()
    for prefix, folder in path_map:
        if low.startswith(prefix):
            return os.path.join(folder, path[len(prefix):].replace("\\", "/").lstrip("/"))
    return path.replace("\\", "/")


class JobFiles:
    """Reads the files one job names (bodies, attachments, its DKIM key),
    refusing any whose real path is outside the roots. Made per message: the
    roots' real paths are resolved at most once, when a file is first read."""

    def __init__(self, spool_root: Path, attachment_roots: tuple[Path, ...],
                 path_map: tuple[tuple[str, str], ...] = ()) -> None:
        self._spool_root = spool_root
        self._given_roots = attachment_roots or (spool_root,)
        self._roots: list[str] | None = None
        self._path_map = path_map

    def local(self, path: str, line: int) -> str:
        """``path`` as this machine names it (see :func:`local_path`)."""
        local = local_path(path, self._path_map)
        if local == path.replace("\\", "/") and _WINDOWS_DRIVE.match(path):
            raise JobError(f"cannot read {path!r}: a Windows path with no path_map entry for it",
                           outcome.MISSING_FILE.code, line=line)
        return local

    def read(self, path: str, line: int) -> tuple[bytes, str]:
        """The file's bytes and its real path."""
        local = self.local(path, line)
        try:
            real = os.path.realpath(os.path.join(self._spool_root, local))
        except ValueError:  # an embedded NUL: no file has that name
            raise JobError(f"cannot read {path!r}: bad file name", outcome.MISSING_FILE.code, line=line) from None
        if self._roots is None:
            # Resolved once per message, and only when a file is named: most jobs name none.
            self._roots = [os.path.join(os.path.realpath(r), "") for r in self._given_roots]
        if not any(real == r[:-1] or real.startswith(r) for r in self._roots):
            raise JobError(f"{path!r} ({real}) is outside attachment_roots", outcome.OUTSIDE_ROOTS.code, line=line)
        try:
            # The real path, not the given one: a symlink swapped in after the
            # check above cannot redirect the read.
            # O_NONBLOCK: opening a FIFO must not wait for a writer; the fstat
            # below then refuses anything that is not a regular file.
            fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK)
            with open(fd, "rb") as f:
                if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                    raise JobError(f"cannot read {path!r}: not a regular file", outcome.MISSING_FILE.code, line=line)
                return f.read(), real
        except OSError as e:
            raise JobError(f"cannot read {path!r}: {e.strerror or e}", outcome.MISSING_FILE.code, line=line) from None
