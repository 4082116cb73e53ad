"""Low-level operating-system helpers the standard library lacks or that several
modules need: a rename that never replaces, fsyncs made together, death with
the parent process, the reaping of a child that is ending, whole writes, and
NUL-terminated records read from a non-blocking pipe.

Linux calls are reached through ctypes, looked up once at import; where one is
missing (another system, an old C library) each helper says what it does
instead. These run on the spool's hot path (every claim, every published
result, every batch of fsyncs), so each makes only the system calls it must.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import select
import signal
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_SYNC_FILE_RANGE_WAIT_BEFORE = 1
_SYNC_FILE_RANGE_WRITE = 2
_SYNC_FILE_RANGE_WAIT_AFTER = 4
# Local file systems whose journal commits changes in the order they were
# made, every file's together: one commit makes durable every change made
# before it (see fsync_all). ext2 has no journal, nor has an ext4 made
# without one (journal_in_order looks); network file systems,
# overlays and copy-on-write file systems (btrfs logs each fsynced file on
# its own) are not in the list: there each file is fsynced.
_IN_ORDER_JOURNALS = frozenset({"ext3", "ext4", "xfs"})
# What sync_file_range answers where it may not be called (a seccomp filter) or does not exist.
_SYNC_FILE_RANGE_REFUSED = (errno.ENOSYS, errno.EPERM, errno.EOPNOTSUPP)
_PR_SET_PDEATHSIG = 1
# What renameat2 answers where the file system (NFS) or the kernel cannot
# refuse to replace: the caller falls back.
_NOREPLACE_UNSUPPORTED = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)


def _libc_function(name: str, *argtypes: Any) -> Callable[..., int] | None:
    """The C library's function ``name`` returning an int, or None where there is none."""
    try:
        fn = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (AttributeError, OSError, TypeError):  # no such function; no C library to load (not POSIX)
        return None
    fn.argtypes = argtypes
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _libc_function("renameat2", ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
_SYNC_FILE_RANGE = _libc_function("sync_file_range", ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
_PRCTL = _libc_function("prctl", ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)


def _rename_noreplace_at(src: Path | str, dst: Path | str) -> bool:
    """One ``renameat2(RENAME_NOREPLACE)``: True when ``src`` was renamed,
    False where this system or file system cannot do it (the caller falls
    back); FileExistsError if ``dst`` exists, any other OSError as raised."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
        return True
    err = ctypes.get_errno()
    if err in _NOREPLACE_UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err), os.fspath(dst))


def rename_noreplace(src: Path | str, dst: Path | str) -> None:
    """Rename ``src`` to ``dst``, failing with FileExistsError if ``dst`` exists.

    One atomic step where RENAME_NOREPLACE works. Elsewhere ``link`` then
    ``unlink``: ``link`` refuses to replace, but a crash between the two
    leaves the file under both names (its link count tells)."""
    if _rename_noreplace_at(src, dst):
        return
    os.link(src, dst)
    os.unlink(src)


def move_unless_taken(src: str, dst: str) -> None:
    """Rename ``src`` to ``dst``; FileExistsError if ``dst`` exists.

    One atomic step where RENAME_NOREPLACE works; elsewhere a check, then a
    plain rename. Never ``link`` then ``unlink``: two processes renaming one
    file that way could both succeed, each holding a name of it."""
    if _rename_noreplace_at(src, dst):
        return
    if os.path.exists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst)
    os.rename(src, dst)


def fsync_all(fds: Sequence[int], one_commit: bool = False) -> list[int]:
    """Make each file's data durable, the disk first asked to start writing
    them all (``sync_file_range``, Linux) so that the waits overlap instead of
    adding up. One errno per file, in order: 0 when its data is durable.

    ``one_commit`` (only for files on a file system :func:`journal_in_order`
    approves): instead of an fsync per file, each file's data is written and
    waited for, then one fsync commits the journal and empties the disk's
    write cache. Every file's data is then durable, and every file's size
    and blocks are in a journal transaction no later than any rename made
    after this call, so a rename that commits a result never outlives its
    data after a power loss -- what an fsync per file gives, for one cache
    flush instead of one a file."""
    if one_commit and _SYNC_FILE_RANGE is not None:
        return _fsync_in_one_commit(fds)
    if _SYNC_FILE_RANGE is not None:
        for fd in fds:
            _SYNC_FILE_RANGE(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)  # only a hint: the fsync makes it durable
    errnos = []
    for fd in fds:
        try:
            os.fsync(fd)
            errnos.append(0)
        except OSError as e:
            errnos.append(e.errno or errno.EIO)
    return errnos


def _fsync_in_one_commit(fds: Sequence[int]) -> list[int]:
    assert _SYNC_FILE_RANGE is not None
    for fd in fds:
        _SYNC_FILE_RANGE(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)
    errnos = []
    last = None
    for fd in fds:
        # Written and waited for: a write-back error is reported here, to this
        # open file (as an fsync would report it, and once).
        if _SYNC_FILE_RANGE(fd, 0, 0, _SYNC_FILE_RANGE_WAIT_BEFORE | _SYNC_FILE_RANGE_WRITE
                            | _SYNC_FILE_RANGE_WAIT_AFTER) == 0:
            errnos.append(0)
            last = fd
            continue
        err = ctypes.get_errno() or errno.EIO
        if err in _SYNC_FILE_RANGE_REFUSED:
            # Not allowed here (a sandbox's filter): this file is fsynced alone.
            err = fsync_all([fd])[0]
        errnos.append(err)
    if last is not None:
        # The commit: its journal transaction holds the last file's changes
        # and everything made before them, and the disk's cache is emptied
        # first, which makes every write waited for above durable too.
        try:
            os.fsync(last)
        except OSError as e:
            failed = e.errno or errno.EIO
            errnos = [err or failed for err in errnos]
    return errnos


def _mounted(path: Path | str, mountinfo: str | None) -> tuple[str, str] | None:
    """The type of the file system ``path`` lies on and its device
    (``MAJOR:MINOR``), read from ``mountinfo`` (the text of
    ``/proc/self/mountinfo`` by default); None wherever it cannot be told."""
    try:
        dev = os.stat(path).st_dev
        if mountinfo is None:
            with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
                mountinfo = f.read()
    except OSError:
        return None
    device = f"{os.major(dev)}:{os.minor(dev)}"
    types = set()
    for line in mountinfo.splitlines():
        # ID PARENT MAJOR:MINOR ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - TYPE SOURCE SUPER
        fields = line.split()
        if len(fields) > 3 and fields[2] == device and " - " in line:
            types.add(line.split(" - ", 1)[1].split()[0])
    return (types.pop(), device) if len(types) == 1 else None


def _has_journal(device: str, jbd2: str, sys_block: str, sys_ext4: str) -> bool | None:
    """Whether the ext3/ext4 on ``device`` (``MAJOR:MINOR``) runs a journal:
    its ``journal_task`` in ``sys_ext4`` names the journal's thread, or
    ``<none>`` (an external journal too has a thread); on kernels without that
    file, each journal on the disk itself has an entry ``<disk>-<number>`` in
    ``jbd2``. None where the device's name cannot be read."""
    try:
        name = os.path.basename(os.readlink(f"{sys_block}/{device}"))
    except OSError:
        return None
    try:
        with open(f"{sys_ext4}/{name}/journal_task", encoding="ascii", errors="replace") as f:
            return f.read().strip() != "<none>"
    except OSError:
        pass
    try:
        return any(entry.startswith(f"{name}-") for entry in os.listdir(jbd2))
    except OSError:
        return None


def journal_in_order(path: Path | str, mountinfo: str | None = None, jbd2: str = "/proc/fs/jbd2",
                     sys_block: str = "/sys/dev/block", sys_ext4: str = "/sys/fs/ext4") -> bool:
    """Whether ``path`` lies on a file system whose journal commits in order
    (xfs; ext3 and ext4 with a journal: one made without has none, and says
    so in ``sys_ext4``, or shows no entry in ``jbd2``), where :func:`fsync_all` may make a group of files
    durable with one commit. Read from ``mountinfo`` (the text of
    ``/proc/self/mountinfo`` by default); False wherever it cannot be told."""
    mounted = _mounted(path, mountinfo)
    if mounted is None or mounted[0] not in _IN_ORDER_JOURNALS:
        return False
    if mounted[0] == "xfs":
        return True  # xfs always logs
    return _has_journal(mounted[1], jbd2, sys_block, sys_ext4) is True


def unordered_metadata(path: Path | str, mountinfo: str | None = None, jbd2: str = "/proc/fs/jbd2",
                       sys_block: str = "/sys/dev/block", sys_ext4: str = "/sys/fs/ext4") -> str | None:
    """What ``path`` lies on when it is known to write its metadata back in
    no order at all: ``"ext2"``, or ``"ext4 without a journal"`` (ext3
    likewise; on a kernel too old to say so in ``sys_ext4``, an external
    journal is not seen, and counts as none). There a
    power loss can keep one half of a rename between folders (the entry gone
    from the old folder and not in the new one: ``fsck`` puts that file in
    ``lost+found``; or in both). None for any other file system, and
    wherever it cannot be told."""
    mounted = _mounted(path, mountinfo)
    if mounted is None:
        return None
    if mounted[0] == "ext2":
        return "ext2"
    if mounted[0] in ("ext3", "ext4") and _has_journal(mounted[1], jbd2, sys_block, sys_ext4) is False:
        return f"{mounted[0]} without a journal"
    return None


def die_with_parent(parent: int) -> bool:
    """Have the kernel kill this process (SIGKILL) when its parent ends
    (``PR_SET_PDEATHSIG``, Linux; elsewhere nothing is set up). ``parent`` is
    the process that should be the parent; False if it has already ended
    (then the signal will never come and the caller should exit)."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    return os.getppid() == parent


def reap_child(pid: int, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for child ``pid`` to end, and reap it.
    True once it is reaped (or was already); False if it still runs. The wait
    ends the moment the child does (a ``pidfd``, Linux 5.3 and later):
    a process takes milliseconds to die, and polling at a fixed step would
    add up to one step to the end of every node's run. Elsewhere it polls
    every 10 ms."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return _reaped(pid)  # no such process: reaped already
    except (AttributeError, OSError):
        pidfd = -1
    deadline = time.monotonic() + timeout
    # poll, not select: a busy node's descriptors may be numbered past
    # select's limit (1024).
    poller = select.poll()
    if pidfd >= 0:
        poller.register(pidfd, select.POLLIN)
    try:
        while not _reaped(pid):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if pidfd >= 0:
                poller.poll(max(1, int(left * 1000)))
            else:
                time.sleep(min(0.01, left))
        return True
    finally:
        if pidfd >= 0:
            os.close(pidfd)


def _reaped(pid: int) -> bool:
    try:
        return os.waitpid(pid, os.WNOHANG)[0] != 0
    except ChildProcessError:  # not our child, or reaped before
        return True


def write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is written (a write may be partial)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class NulRecords:
    """The records a non-blocking pipe carries, each ended by a NUL byte; a
    record cut between two reads is kept until its end arrives."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._rest = b""

    def read(self) -> list[bytes] | None:
        """The records complete after one read of the pipe, without their NULs
        (none when nothing could be read); None at the end of the pipe."""
        try:
            data = os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return []
        if not data:
            return None
        records = (self._rest + data).split(b"\0")
        self._rest = records.pop()
        return records


def replace_file(path: Path, data: bytes, mode: int) -> None:
    """Replace the file at ``path`` by one holding ``data``, with permissions
    ``mode``, at once: written beside it under a temporary name, fsynced, then
    renamed over it, so a reader (or a crash) finds the old file or the new
    one, never half of one. Raises OSError; no temporary file is left."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def file_locked(fd: int) -> Iterator[None]:
    """Hold a POSIX record lock (``lockf``) on the whole of ``fd`` for the block.
    Per process, so it excludes other processes only; the kernel drops it if
    its holder dies, so a process killed inside the block blocks nobody."""
    fcntl.lockf(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.lockf(fd, fcntl.LOCK_UN)
