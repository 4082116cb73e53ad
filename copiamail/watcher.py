"""File-system events as wake-up hints for the scheduler.

Events are lost (inotify overflow), mislabelled (a move shows as a create) and
absent on network shares, so they are only hints: the scheduler also scans at
start and on a timer. ``watcher: polling`` uses watchdog's PollingObserver,
which works on network shares. A handler exception never kills the observer.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

log = logging.getLogger("copiamail")


class _Hint(FileSystemEventHandler):
    def __init__(self, wake: Callable[[], None]) -> None:
        self._wake = wake

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write"):
            return
        path = str(getattr(event, "dest_path", "") or event.src_path)
        if not path.upper().endswith(".FS"):
            return
        try:
            self._wake()
        except Exception:  # noqa: BLE001 - the observer thread must survive anything
            log.exception("watcher wake-up failed")


class SpoolWatcher:
    """Watches the TOSEND folders; calls ``wake`` (thread-safe) on any job file event."""

    def __init__(self, folders: list[Path], wake: Callable[[], None], polling: bool = False, poll_interval: float = 1.0) -> None:
        self._observer: BaseObserver = PollingObserver(timeout=poll_interval) if polling else Observer()
        handler = _Hint(wake)
        for folder in folders:
            self._observer.schedule(handler, str(folder), recursive=False)

    def start(self) -> None:
        self._observer.daemon = True
        self._observer.start()

    def stop(self) -> None:
        self._observer.stop()
        self._observer.join(timeout=5)
