"""File-system events as wake-up hints for the scheduler.

Events are lost (inotify overflow), mislabelled (a move shows as a create) and
absent on network shares, so they are only hints: the scheduler also scans at
start and on a timer. ``watcher: polling`` uses watchdog's PollingObserver,
which works on network shares.

The watching runs in a child process, ``python -m copiamail.spool.watcher``,
so that a burst of events never contends with the node's event loop for the
interpreter lock (a busy node makes thousands of events: every job written
back is one). The child writes a record for each job file that appeared or
changed to its standard output (how it came, one byte, then its path;
NUL-terminated); the node reads that pipe from its event loop. The child
exits when its standard input closes, so it never outlives the node, even one
killed with SIGKILL. It runs at a lower priority (nice 10): its events are
hints, and on a busy machine the workers that send come first.

The child takes some tenths of a second to start, while the node's first scan
has already listed the folders: a job that arrived in between would have no
event until the next full scan, and that scan could not tell it from a file
still being written in place. So once its watches are in place, the child
lists the folders and reports every job file changed since the node started
(by its ``ctime``): as renamed in when its last change was a rename (its
``ctime`` after its ``mtime``: a rename moves only the ``ctime``), else as
written in place, so a file still being written waits ``write_settle``.

With inotify the child reads one inotify instance of watchdog's
(:class:`~watchdog.observers.inotify_c.InotifyFD`) in a loop of its own: each
read of the kernel's queue becomes one write to the node. watchdog's observer
would hand every event from thread to thread (reader, emitter, dispatcher)
and pair each arrival with the moves still queued, at 85 to 130 µs of CPU an
event; a batch of 4,000 jobs renamed in cost the child about 0.4 s of CPU, in
the very second the workers start sending them.

Each event says how the file came: renamed into the folder (the submission
protocol: the file is complete), or written there in place (created, or
closed after writing: it may still be incomplete, so the scheduler waits
until it has been left alone for ``write_settle`` seconds). The polling
watcher cannot tell a rename from a write: every file it reports counts as
written in place.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from watchdog.events import FileClosedEvent, FileCreatedEvent, FileMovedEvent, FileSystemEvent, FileSystemEventHandler
from watchdog.observers.api import BaseObserver
from watchdog.observers.inotify_c import CallbackId, InotifyConstants, InotifyEvent, InotifyFD, Mask, WatchDescriptor
from watchdog.observers.polling import PollingObserver

from copiamail.osutil import NulRecords, write_all

log = logging.getLogger("copiamail")

# The first byte of each record the child writes: how the file came.
_WRITTEN = b"W"
_MOVED = b"M"
_CLOCK_TICK = 0.05  # seconds: more than the kernel's file-time clock may lag time.time()


class _Polled(FileSystemEventHandler):
    """The polling observer's events as reports: every job file it names
    counts as written in place (it cannot tell a rename from a write)."""

    def __init__(self, report: Callable[[str, bool], None]) -> None:
        self._report = report

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write", "deleted"):
            return
        path = os.fsdecode(getattr(event, "dest_path", "") or event.src_path)
        if not path.upper().endswith(".FS"):
            return
        try:
            self._report(path, True)
        except Exception:
            log.exception("watcher report failed")


# What makes a job appear or change in a folder: renamed in (from elsewhere,
# or from another name in it), created, closed after writing. Not a file
# leaving it: every claim is a rename out of TOSEND.
ARRIVALS = Mask(InotifyConstants.IN_CREATE | InotifyConstants.IN_MOVED_TO | InotifyConstants.IN_CLOSE_WRITE)


class Arrivals:
    """The job files that arrive in ``folders``, from one inotify instance
    (``InotifyFD``, read by :meth:`pump` rather than by a thread of its own):
    each read of the kernel's queue is written to the node as one batch of
    records. A file renamed into a folder is reported as moved, one created
    or written there as written."""

    def __init__(self, folders: list[Path]) -> None:
        self._inotify = InotifyFD()  # an instance of its own, not watchdog's shared one
        self._stopped = False
        self._records: list[bytes] = []
        self._folders: dict[WatchDescriptor, bytes] = {}
        for folder in folders:
            path = os.fsencode(folder)
            self._folders[self._inotify.add_callback(path, ARRIVALS, self, CallbackId(0))] = path

    def on_event(self, event: InotifyEvent) -> None:
        if event.is_directory or not event.name.upper().endswith(b".FS"):
            return
        folder = self._folders.get(event.wd)
        if folder is not None:
            self._records.append((_MOVED if event.is_moved_to else _WRITTEN) + folder + b"/" + event.name + b"\0")

    def on_watch_deleted(self, wd: WatchDescriptor) -> None:
        self._folders.pop(wd, None)

    def on_queue_overflow(self) -> None:
        """Events were lost: nothing to report (the node's scans find those files)."""

    def on_events_lost(self) -> None:
        """Called after every callback's :meth:`on_queue_overflow` (watchdog 7.1
        on): nothing more to do."""

    def pump(self, write: Callable[[bytes], None]) -> None:
        """Read events and ``write`` each read's records at once, until :meth:`stop`."""
        while not self._stopped:
            for event in self._inotify.read_events():
                self._inotify.handle_event(event)
            if self._records:
                batch, self._records = b"".join(self._records), []
                write(batch)

    def stop(self) -> None:
        self._stopped = True
        self._inotify.close()  # wakes a pump waiting for events


def observe_polling(folders: list[Path], report: Callable[[str, bool], None], interval: float = 1.0) -> BaseObserver:
    """Start watchdog's polling observer, which calls ``report(path, True)``
    (from its threads) for each job file that appears or changes in
    ``folders`` (it cannot tell a rename from a write)."""
    observer: BaseObserver = PollingObserver(timeout=interval)
    handler = _Polled(report)
    for folder in folders:
        observer.schedule(handler, str(folder), recursive=False,
                          event_filter=[FileCreatedEvent, FileMovedEvent, FileClosedEvent])
    observer.daemon = True
    observer.start()
    return observer


class SpoolWatcher:
    """Watches the TOSEND folders from a child process; calls ``on_path(path,
    written)`` on the event loop for each job file event, with the path the
    file has now and whether it was written in place (see the module doc)."""

    def __init__(self, folders: list[Path], on_path: Callable[[str, bool], None], polling: bool = False,
                 since: float | None = None) -> None:
        """``since``: when the node started (``time.time()``): the job files
        changed since then are reported once the watches are in place (see
        the module doc; None: none are)."""
        self._folders = folders
        self._on_path = on_path
        self._polling = polling
        self._since = since
        self._proc: subprocess.Popen[bytes] | None = None
        self._records: NulRecords | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        argv = [sys.executable, "-m", "copiamail.spool.watcher"] + (["--polling"] if self._polling else [])
        if self._since is not None:
            # A file's times come from the kernel's coarse clock, which may
            # lag the clock read for ``since`` by a tick or so.
            argv += ["--since", str(int((self._since - _CLOCK_TICK) * 1e9))]
        argv += [os.fspath(f) for f in self._folders]
        self._proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True)
        assert self._proc.stdout is not None
        os.set_blocking(self._proc.stdout.fileno(), False)
        self._records = NulRecords(self._proc.stdout.fileno())
        self._loop = loop
        loop.add_reader(self._proc.stdout.fileno(), self._readable)

    def _readable(self) -> None:
        assert self._records is not None
        records = self._records.read()
        if records is None:
            log.warning("the spool watcher stopped; new jobs are found by the scan every scan_interval")
            self._stop_reading()
            return
        for raw in records:
            self._on_path(os.fsdecode(raw[1:]), raw[:1] == _WRITTEN)

    def _stop_reading(self) -> None:
        if self._loop is not None and self._proc is not None and self._proc.stdout is not None:
            self._loop.remove_reader(self._proc.stdout.fileno())
            self._loop = None

    def stop(self) -> None:
        self._stop_reading()
        if self._proc is None:
            return
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.close()
        # Killed rather than waited for: it holds nothing but hints, and one
        # still starting up (a drain that found little to do) would finish
        # importing before it saw its input close, 50 ms or more at the end
        # of the node's run.
        self._proc.kill()
        self._proc.wait()
        self._proc.stdout.close()
        self._proc = None


def pump_or_exit(arrivals: Arrivals, out: int) -> None:
    """Report ``arrivals`` to the node on ``out``; if that fails, end the
    process with one line on standard error."""
    # A watcher that can no longer read or report ends, so the node sees its
    # pipe close and says that new jobs are found by the scan from now on,
    # rather than waiting for events that never come.
    try:
        arrivals.pump(functools.partial(write_all, out))
    except Exception as e:
        print(f"copiamail watcher: {e}", file=sys.stderr, flush=True)
        os._exit(1)


def arrived_since(folders: list[Path], since_ns: int, polling: bool) -> bytes:
    """Records of the job files in ``folders`` whose ``ctime`` is
    ``since_ns`` or later (a folder not changed since then is not listed: a
    file that comes into a folder changes the folder). Each as renamed in
    when its last change was no write (``ctime`` after ``mtime``: a rename
    moves only ``ctime``; or written before ``since_ns``), else as written in
    place, so that it waits ``write_settle`` as any such file; with
    ``polling``, every one as written, as the polling observer reports them."""
    records = []
    for folder in folders:
        try:
            if os.stat(folder).st_mtime_ns < since_ns:
                continue
            entries = os.scandir(folder)
        except OSError:
            continue  # a folder that cannot be listed: the node's scans say so
        with entries:
            for entry in entries:
                if not entry.name.upper().endswith(".FS"):
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue  # claimed meanwhile
                if st.st_ctime_ns < since_ns:
                    continue
                # A file still being written in place has both times of its
                # last write; one written and renamed within the same tick of
                # the kernel's clock waits write_settle too (on the safe side).
                renamed = not polling and (st.st_ctime_ns > st.st_mtime_ns or st.st_mtime_ns < since_ns)
                records.append((_MOVED if renamed else _WRITTEN) + os.fsencode(entry.path) + b"\0")
    return b"".join(records)


def _child(argv: list[str]) -> int:
    # The node stops this process by closing its standard input; a Ctrl-C,
    # a SIGTERM or a terminal's hang-up sent to the whole process group is
    # the node's to handle.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    # Hints only: when the machine is busy, the node's workers come first.
    os.nice(10)
    # watchdog logs an error when an emitter is asked for events while it
    # stops ("called when the thread is inactive"): noise at every node exit.
    # Failures to watch a folder are exceptions, reported below.
    logging.getLogger("watchdog").setLevel(logging.CRITICAL)
    polling = "--polling" in argv
    since: int | None = None
    if "--since" in argv:
        at = argv.index("--since")
        since = int(argv[at + 1])
        argv = argv[:at] + argv[at + 2:]
    folders = [Path(a) for a in argv if a != "--polling"]
    out = sys.stdout.fileno()
    writing = threading.Lock()  # the polling observer reports from its own thread

    def report(path: str, written: bool) -> None:
        with writing:
            write_all(out, (_WRITTEN if written else _MOVED) + os.fsencode(path) + b"\0")

    try:
        arrivals = None if polling else Arrivals(folders)
        # From here every arrival has an event (or is in the polling
        # observer's first snapshot): those before are listed now.
        stop = observe_polling(folders, report).stop if arrivals is None else arrivals.stop
        if since is not None:
            with writing:
                write_all(out, arrived_since(folders, since, polling))
        if arrivals is not None:
            threading.Thread(target=pump_or_exit, args=(arrivals, out), daemon=True).start()
    except OSError as e:
        print(f"copiamail watcher: {e}", file=sys.stderr)
        return 1
    try:
        while sys.stdin.buffer.read(4096):
            pass
    except (KeyboardInterrupt, OSError):
        pass
    stop()
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
