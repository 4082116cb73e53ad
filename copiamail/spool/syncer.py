"""fsyncs in a child process, so that a node's event loop goes on while the disk works.

A job's result must be durable before its commit (:mod:`copiamail.spool.queue`,
state 3), and
an fsync waits for the disk (0.1 to 0.3 ms per file on the build machine). On
the event loop that wait stops every connection of the process. A thread does
not help: after each fsync it must take the interpreter lock back from the
busy loop, and the two hand it back and forth (measured: no gain, more CPU).
So a scheduler forks a *syncer*, a process that does nothing but fsync files
it is handed.

Protocol, over a socket pair (``SOCK_SEQPACKET``: one message is one request):

- request: a 12-byte header (the batch's sequence number, the chunk's index)
  with up to :data:`MAX_FDS` open file descriptors attached (``SCM_RIGHTS``):
  results of one batch, each already written into its spare; a larger batch
  goes in several chunks;
- answer: the same header, then one 4-byte errno per descriptor, in order
  (0: the file is durable).

The syncer asks the disk to write the whole request first
(``sync_file_range``), then fsyncs each file -- or, on a file system whose
journal commits in order (``one_commit``, see
:func:`~copiamail.osutil.fsync_all`), waits for each file's data and makes
one fsync for the whole request -- closes its copies of the descriptors, and
answers. The node commits a result only after its answer
(the order of states in :mod:`copiamail.spool.queue` is unchanged), and keeps its own
descriptors open until then.

Failure: the syncer exits when its socket closes (the node is done) and dies
with the process that forked it (``PR_SET_PDEATHSIG``). If it dies first, or
the socket fails, each batch in flight is answered with None: none of its
results may be taken as durable (an fsync repeated elsewhere would not do,
since Linux reports a writeback error to one fsync only), so the node writes
them again. ``on_lost`` is called, and the node fsyncs in its own process from
then on. An answer with fewer errnos than the files sent (the kernel drops
passed descriptors beyond the syncer's open-file limit) counts as EIO for
every file of that request.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import socket
import struct
from collections.abc import Callable, Sequence

from copiamail.osutil import die_with_parent, fsync_all, reap_child

log = logging.getLogger("copiamail")

MAX_FDS = 250  # below the kernel's SCM_MAX_FD (253) descriptors per message
_HEADER = struct.Struct("=QI")  # batch sequence number, chunk index


class Syncer:
    """The node side of one syncer process (used from one event loop)."""

    def __init__(self, sock: socket.socket, pid: int, on_lost: Callable[[], None] | None = None) -> None:
        self._sock = sock
        self._pid = pid
        self._on_lost = on_lost
        self._seq = 0
        # Per batch in flight: its callback, the size of each chunk, and the
        # answer of each chunk.
        self._batches: dict[int, tuple[Callable[[list[int] | None], None], list[int], list[list[int] | None]]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.alive = True

    @classmethod
    def start(cls, on_lost: Callable[[], None] | None = None, one_commit: bool = False) -> Syncer | None:
        """Fork a syncer; None where that cannot be done (no fork or no
        SCM_RIGHTS here, or the fork failed): the caller fsyncs itself.
        ``on_lost`` is called once if the syncer is lost while in use;
        ``one_commit``: each request made durable by one journal commit
        (only for files on a file system :func:`~copiamail.osutil.journal_in_order`
        approves)."""
        if not hasattr(os, "fork") or not hasattr(socket, "send_fds"):
            return None
        try:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        except OSError:
            return None
        node = os.getpid()
        try:
            pid = os.fork()
        except OSError as e:
            log.warning("cannot start the syncer process (%s): results are fsynced by the node itself", e.strerror)
            ours.close()
            theirs.close()
            return None
        if pid == 0:
            # Never return into the node's code in this process (its finally
            # blocks would release the node's lock, shared with the parent).
            code = 1
            try:
                ours.close()
                code = _serve(theirs, node, one_commit)
            finally:
                os._exit(code)
        theirs.close()
        ours.setblocking(False)
        return cls(ours, pid, on_lost)

    def submit(self, fds: Sequence[int], done: Callable[[list[int] | None], None]) -> bool:
        """Ask for ``fds`` to be fsynced; ``done(errnos)`` is called on the
        event loop with one errno per descriptor, or ``done(None)`` if the
        syncer was lost first. False (and ``done`` never called) if the
        request cannot be sent: the caller fsyncs itself."""
        if not self.alive:
            return False
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(self._sock.fileno(), self._readable)
        chunks = [fds[i:i + MAX_FDS] for i in range(0, len(fds), MAX_FDS)] or [[]]
        self._seq += 1
        seq = self._seq
        for index, chunk in enumerate(chunks):
            try:
                socket.send_fds(self._sock, [_HEADER.pack(seq, index)], list(chunk))
            except OSError as e:
                # A full socket buffer or a dead syncer: nothing of this batch
                # may be taken as synced, and the caller syncs it.
                self._lost(f"cannot hand files to the syncer: {e.strerror or e}")
                return False
        self._batches[seq] = (done, [len(c) for c in chunks], [None] * len(chunks))
        return True

    def _readable(self) -> None:
        try:
            data = self._sock.recv(_HEADER.size + 4 * MAX_FDS)
        except BlockingIOError:
            return
        except OSError as e:
            self._lost(f"the syncer's socket failed: {e.strerror or e}")
            return
        if not data:
            self._lost("the syncer process ended")
            return
        seq, index = _HEADER.unpack_from(data)
        count = (len(data) - _HEADER.size) // 4
        batch = self._batches.get(seq)
        if batch is None:
            return
        done, sizes, answers = batch
        errnos = list(struct.unpack_from(f"={count}i", data, _HEADER.size))
        answers[index] = errnos if len(errnos) == sizes[index] else [errno.EIO] * sizes[index]
        complete = [a for a in answers if a is not None]
        if len(complete) == len(answers):
            del self._batches[seq]
            done([e for part in complete for e in part])

    def _lost(self, why: str) -> None:
        if not self.alive:
            return
        self.alive = False
        log.warning("%s; results are fsynced by the node itself from now on", why)
        self._stop_reading()
        batches, self._batches = self._batches, {}
        if self._on_lost is not None:
            self._on_lost()
        for done, _, _ in batches.values():
            done(None)

    def _stop_reading(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._loop = None

    def close(self) -> None:
        """End the syncer (it exits when its socket closes) and reap it. A
        batch still unanswered is given up (answered with None) and the
        syncer killed: a node that stops does not wait on a stuck one. A
        second call does nothing (a stuck syncer is waited for once)."""
        if self._sock.fileno() < 0:  # closed before
            return
        stuck = bool(self._batches)
        if stuck:
            self._lost("the syncer did not answer in time")
        self.alive = False
        self._stop_reading()
        self._sock.close()
        if stuck:
            try:
                os.kill(self._pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        # Not reaped within the second: still in the kernel (a disk that does
        # not answer); it is reaped with the node, and nothing waits on it.
        reap_child(self._pid, 1.0)


def _serve(sock: socket.socket, node: int, one_commit: bool) -> int:
    """The syncer process: answer requests until the socket closes (or the
    node process ``node`` ends)."""
    # The node's own signal handling is not this process's: a Ctrl-C sent to
    # the process group is the node's to handle, and its wake-up pipe belongs
    # to the node's event loop.
    try:
        signal.set_wakeup_fd(-1)
    except ValueError:
        pass
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    # Hold no copy of the node's descriptors: a pipe the node closes to stop
    # a child (the watcher's standard input) or the node's own output, which
    # a caller reads to its end, must close when the node closes them.
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    keep = sock.fileno()
    os.closerange(3, keep)
    os.closerange(keep + 1, 1 << 20)
    if not die_with_parent(node):
        return 0  # the node died before the death signal was set up
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(sock, _HEADER.size, MAX_FDS)
        except OSError:
            return 1
        if not msg:
            return 0
        errnos = fsync_all(fds, one_commit)
        for fd in fds:
            os.close(fd)
        try:
            sock.send(msg + struct.pack(f"={len(errnos)}i", *errnos))
        except OSError:
            return 1
