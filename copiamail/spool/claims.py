"""The two steps of a claim that touch the disk
(:meth:`Spool.claim <copiamail.spool.queue.Spool.claim>`): looking for a job
of the same name still in the node's ACTIVE folder under another of its
names, and the no-replace rename itself."""

from __future__ import annotations

import os

from copiamail.osutil import move_unless_taken
from copiamail.spool.layout import DELIVERED, RESULT_SUFFIXES, SENDING

# The suffixes beside a claimed job's name that keep a job of the same name
# from being claimed: its marks, and its results.
_TAKEN_BY = (SENDING, DELIVERED, *RESULT_SUFFIXES)


def taken_beside(dest: str) -> bool:
    """Whether a job named as the claimed ``dest`` is in its folder under
    another of its names. In the order a job moves through them: a name
    found absent cannot come back while the others are looked at. access(),
    not exists(): a missing name (the usual answer) raises nothing."""
    return any(os.access(f"{dest}.{suffix}", os.F_OK) for suffix in _TAKEN_BY)


def claim_rename(src: str, dest_dir: str, dest: str) -> bool:
    """The claim's rename of ``src`` to ``dest`` (its folder made if missing);
    False if the job is gone or the name taken."""
    try:
        move_unless_taken(src, dest)
    except FileExistsError:
        return False
    except FileNotFoundError:
        if not os.path.exists(src):
            return False
        os.makedirs(dest_dir, exist_ok=True)
        try:
            move_unless_taken(src, dest)
        except (FileExistsError, FileNotFoundError):
            return False
    return True
