"""Log lines on stderr (or a file): ``2026-12-01 11:42:07 copiamail: ...``,
or with ``--log-format json`` one JSON object a line (:class:`JsonLines`).
A command's own report (a drain's summary, ``status``) goes to stdout, never
here. A log file (``--log-file``) is reopened on SIGHUP, for logrotate
(:func:`reopen_log_files`).

What each verbosity shows:

- default: a node's start and stop, each retry and failure, every warning;
- ``-v``: also each delivery and deferral (logger :data:`OUTCOMES`);
- ``-vv``: everything copiamail logs at debug level;
- ``-vvv``: third-party libraries' debug lines too (filelock, asyncio ...),
  which stay at WARNING below that.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

OUTCOMES = "copiamail.outcomes"  # one line per delivery or deferral: -v
_FORMAT = "%(asctime)s %(source)s: %(message)s"
_DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
_CLEAR_LINE = "\r\x1b[2K"  # to column 0, erase the line


class LineStartHandler(logging.StreamHandler[TextIO]):
    """A stream handler whose lines each start on a line of their own while
    a live display (the drain's progress bar) holds the terminal's current
    line: that line is cleared first, and the display draws itself again
    below on its next refresh. Worker processes forked meanwhile inherit the
    state, so their lines do the same."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self.below_live_display = False

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return _CLEAR_LINE + text if self.below_live_display else text


def log_fields(event: str, job: str, recipient: str, code: int | str | None = None) -> dict[str, Any]:
    """The ``extra=`` of a log line about one job, for the JSON lines: a
    short event name, the job, its domain (taken from ``recipient``) and the
    reply code (``code``: a code, or a reply whose first three characters may
    be one)."""
    domain = recipient.rpartition("@")[2].strip(" >").lower() or None
    if isinstance(code, str):
        code = int(code[:3]) if code[:3].isascii() and code[:3].isdigit() else None
    return {"event": event, "job": job, "domain": domain, "code": code}


class JsonLines(logging.Formatter):
    """One JSON object a line: ``ts`` (ISO 8601, local time with its
    offset), ``level``, ``event`` (``log`` unless the call names one),
    ``node`` where known, ``job``, ``domain`` and ``code`` where the call gives
    them, and ``text``, the line as the text format shows it (with a
    traceback, if any)."""

    def __init__(self, node: str | None = None) -> None:
        super().__init__()
        self.node = node  # the node this process runs, once known

    def format(self, record: logging.LogRecord) -> str:
        t = time.localtime(record.created)
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(record.msecs):03d}" + time.strftime("%z", t)
        doc: dict[str, Any] = {"ts": ts, "level": record.levelname.lower(), "event": getattr(record, "event", "log")}
        node = getattr(record, "node", None) or self.node
        if node is not None:
            doc["node"] = node
        for name in ("job", "domain", "code"):
            value = getattr(record, name, None)
            if value is not None:
                doc[name] = value
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        doc["text"] = text
        if record.name.partition(".")[0] != "copiamail":
            doc["logger"] = record.name
        return json.dumps(doc, ensure_ascii=False)


class ReopenedFileHandler(logging.FileHandler):
    """A log file (appended to) that :func:`reopen_log_files` reopens: after
    logrotate has moved it, the next line goes to a new file of its name."""

    def reopen(self) -> None:
        self.acquire()
        try:
            if self.stream is not None:
                self.stream.close()
                self.stream = None  # FileHandler opens it again at the next line
        finally:
            self.release()


def reopen_log_files() -> None:
    """Reopen every log file of this process (SIGHUP)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, ReopenedFileHandler):
            handler.reopen()


def set_log_node(node: str) -> None:
    """The JSON lines of this process name ``node`` from now on."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler.formatter, JsonLines):
            handler.formatter.node = node


def setup_logging(verbosity: int, stream: TextIO, log_format: str = "text", log_file: Path | None = None) -> None:
    """Send log lines to ``stream`` (or append them to ``log_file``: OSError
    if it cannot be opened) at the levels ``verbosity`` (the count of ``-v``)
    selects (see the module doc), as text or, with ``log_format`` ``json``,
    as :class:`JsonLines`."""
    handler: logging.Handler = LineStartHandler(stream) if log_file is None else ReopenedFileHandler(log_file, "a",
                                                                                                       "utf-8")
    handler.addFilter(_name_source)
    handler.setFormatter(JsonLines() if log_format == "json" else logging.Formatter(_FORMAT, _DATE_FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbosity >= 3 else logging.WARNING)
    logging.getLogger("copiamail").setLevel(logging.DEBUG if verbosity >= 2 else logging.INFO)
    logging.getLogger(OUTCOMES).setLevel(logging.NOTSET if verbosity >= 1 else logging.WARNING)


def _name_source(record: logging.LogRecord) -> bool:
    # copiamail's own lines all say "copiamail:"; a library's (at -vvv) its name.
    record.source = "copiamail" if record.name.partition(".")[0] == "copiamail" else record.name
    return True


@contextmanager
def live_display_on(terminal: TextIO) -> Iterator[None]:
    """For the block a live display is drawn on ``terminal``: log lines that
    go to that same terminal start on a line of their own."""
    handlers = [h for h in logging.getLogger().handlers
                if isinstance(h, LineStartHandler) and _same_terminal(h.stream, terminal)]
    for h in handlers:
        h.below_live_display = True
    try:
        yield
    finally:
        for h in handlers:
            h.below_live_display = False


def _same_terminal(a: TextIO, b: TextIO) -> bool:
    try:
        return a.isatty() and b.isatty() and os.ttyname(a.fileno()) == os.ttyname(b.fileno())
    except (OSError, ValueError, AttributeError):
        return False
