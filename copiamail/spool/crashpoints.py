"""Test-only crash points: the node killed at each step of the spool protocol.

With ``COPIAMAIL_CRASH_AT=<point>`` in its environment, a node kills itself with
SIGKILL the moment it reaches that point, so a test can see what each step of
the spool protocol leaves behind. Both variables are read once, when the
process starts: unset (always, outside tests) a point costs one comparison.
The points:

``claimed``                 a job was just renamed into ACTIVE (state 2)
``sending``                 a job was just marked as sending, or claimed straight
                            as sending: its connection is greeted, its SMTP
                            transaction starts next (state 2a)
``delivered``               the server accepted the message and the job was just
                            marked delivered: its result file named beside it,
                            nothing written into it yet (state 2b)
``written-SENT``, ``written-FAIL``, ``written-BACK``
                            a result was written and fsynced beside the claimed
                            job, not yet committed (state 3)
``writing-SENT``, ``writing-FAIL``, ``writing-BACK``
                            half of a result is written into a spare file (for
                            SENT: into the delivered mark), not fsynced (state
                            3, with a partial file)
``committed-SENT``, ``committed-FAIL``, ``committed-BACK``
                            the claimed job's name was removed, the result not
                            yet moved to its folder (state 4)

With ``COPIAMAIL_FULL_DISK=<path>``, every job file the spool writes fails with
ENOSPC while the file ``<path>`` exists: a full disk, simulated, that a test can
fill and free.
"""

from __future__ import annotations

import errno
import os
import signal

CRASH_ENV = "COPIAMAIL_CRASH_AT"
FULL_DISK_ENV = "COPIAMAIL_FULL_DISK"
# Read at import, not at each point: a message passes five of them, and an
# environment lookup costs more than everything else a point does.
_CRASH_AT = os.environ.get(CRASH_ENV)
_FULL_DISK_FLAG = os.environ.get(FULL_DISK_ENV)


def check_disk_space(path: str) -> None:
    """Raise ENOSPC for ``path`` while the simulated disk is full."""
    if _FULL_DISK_FLAG is not None and os.path.exists(_FULL_DISK_FLAG):
        raise OSError(errno.ENOSPC, "No space left on device (simulated)", path)


def crashes_while_writing() -> bool:
    """Whether the environment names a ``writing-`` point: then a result is
    written in two halves, with the point between them."""
    return _CRASH_AT is not None and _CRASH_AT.startswith("writing-")


def crash_point(name: str) -> None:
    """Die here, without any clean-up, if the environment names this point."""
    if name == _CRASH_AT:
        os.kill(os.getpid(), signal.SIGKILL)
