"""File-system events as wake-up hints for the scheduler.

Events are lost (inotify overflow), mislabelled (a move shows as a create) and
absent on network shares, so they are only hints: the scheduler also scans at
start and on a timer. ``watcher: polling`` uses watchdog's PollingObserver,
which works on network shares.

watchdog runs its observers in threads (two per watched folder). In the node's
own process those threads would contend with the event loop for the
interpreter lock at every event, and a busy node makes thousands of events
(every job written back is one). So the observer runs in a child process,
``python -m copiamail.spool.watcher``, which writes a record for each job file
that appeared or changed to its standard output (how it came, one byte, then
its path; NUL-terminated); the node reads that pipe from its event loop. The child exits when its standard input closes,
so it never outlives the node, even one killed with SIGKILL. It runs at a
lower priority (nice 10): its events are hints, and on a busy machine the
workers that send come first.

Each event says how the file came: renamed into the folder (the submission
protocol: the file is complete), or written there in place (created, or
closed after writing: it may still be incomplete, so the scheduler waits
until it has been left alone for ``write_settle`` seconds). The polling
watcher cannot tell a rename from a write: every file it reports counts as
written in place.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from watchdog.events import FileClosedEvent, FileCreatedEvent, FileMovedEvent, FileSystemEvent, FileSystemEventHandler
from watchdog.observers.api import BaseObserver
from watchdog.observers.inotify import InotifyEmitter
from watchdog.observers.inotify_c import InotifyConstants, Mask
from watchdog.observers.polling import PollingObserver

from copiamail.osutil import NulRecords

log = logging.getLogger("copiamail")

# The first byte of each record the child writes: how the file came.
_WRITTEN = b"W"
_MOVED = b"M"


class _Hint(FileSystemEventHandler):
    def __init__(self, report: Callable[[str, bool], None], polling: bool) -> None:
        self._report = report
        self._polling = polling

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write", "deleted"):
            return
        path = os.fsdecode(getattr(event, "dest_path", "") or event.src_path)
        if not path.upper().endswith(".FS"):
            return
        try:
            self._report(path, self._polling or event.event_type != "moved")
        except Exception:
            log.exception("watcher report failed")


class _ArrivalsEmitter(InotifyEmitter):
    """inotify for files that arrive or change in a folder, not those that
    leave it. watchdog's filter for moves asks for both halves of a rename,
    so every claim (a rename out of TOSEND) was an event: 10,000 claims cost
    the watcher 0.8 s of CPU for nothing. A rename into the folder alone is
    reported as a move with no source ("full events"), a file written there
    as a creation and a close after writing."""

    def get_event_mask_from_filter(self) -> Mask:
        return Mask(InotifyConstants.IN_DELETE_SELF | InotifyConstants.IN_CREATE | InotifyConstants.IN_MOVED_TO
                    | InotifyConstants.IN_CLOSE_WRITE)

    def build_and_queue_event(self, event: Any, *, full_events: bool = False) -> None:
        # "Full events": a file renamed in from an unwatched folder is a move
        # (with no source), not a creation, so a renamed job can be told from
        # one written in place.
        super().build_and_queue_event(event, full_events=True)


def observe(folders: list[Path], report: Callable[[str, bool], None], polling: bool = False,
            poll_interval: float = 1.0) -> BaseObserver:
    """Start an observer that calls ``report(path, written)`` (from its
    threads) for each job file that appears or changes in ``folders``;
    ``written`` is False only for a file renamed into the folder."""
    observer: BaseObserver = PollingObserver(timeout=poll_interval) if polling else BaseObserver(_ArrivalsEmitter)
    handler = _Hint(report, polling)
    for folder in folders:
        # Only what makes a job appear or change. Without the filter every
        # read of a job (open, close) and every claim would be an event.
        observer.schedule(handler, str(folder), recursive=False,
                          event_filter=[FileCreatedEvent, FileMovedEvent, FileClosedEvent])
    observer.daemon = True
    observer.start()
    return observer


class SpoolWatcher:
    """Watches the TOSEND folders from a child process; calls ``on_path(path,
    written)`` on the event loop for each job file event, with the path the
    file has now and whether it was written in place (see the module doc)."""

    def __init__(self, folders: list[Path], on_path: Callable[[str, bool], None], polling: bool = False) -> None:
        self._folders = folders
        self._on_path = on_path
        self._polling = polling
        self._proc: subprocess.Popen[bytes] | None = None
        self._records: NulRecords | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        argv = [sys.executable, "-m", "copiamail.spool.watcher"] + (["--polling"] if self._polling else [])
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
        self._proc.stdin.close()  # the child's cue to exit
        try:
            self._proc.wait(5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc.stdout.close()
        self._proc = None


def _child(argv: list[str]) -> int:
    # The node stops this process by closing its standard input; a Ctrl-C,
    # a SIGTERM or a terminal's hang-up sent to the whole process group is
    # the node's to handle.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    # Hints only: when the machine is busy, the node's workers come first.
    # A burst of submissions is thousands of events, and watchdog spends
    # about 45 us of CPU on each, which the workers sending then missed.
    os.nice(10)
    # watchdog logs an error when an emitter is asked for events while it
    # stops ("called when the thread is inactive"): noise at every node exit.
    # Failures to watch a folder are exceptions, reported below.
    logging.getLogger("watchdog").setLevel(logging.CRITICAL)
    polling = "--polling" in argv
    folders = [Path(a) for a in argv if a != "--polling"]
    out = sys.stdout.fileno()

    def report(path: str, written: bool) -> None:
        os.write(out, (_WRITTEN if written else _MOVED) + os.fsencode(path) + b"\0")

    try:
        observer = observe(folders, report, polling=polling)
    except OSError as e:
        print(f"copiamail watcher: {e}", file=sys.stderr)
        return 1
    try:
        while sys.stdin.buffer.read(4096):
            pass
    except (KeyboardInterrupt, OSError):
        pass
    observer.stop()
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
