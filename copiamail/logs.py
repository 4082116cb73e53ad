"""Log lines on stderr: ``2026-12-01 11:42:07 copiamail: ...``.

What each verbosity shows:

- default: a node's start and stop, each retry and failure, every warning;
- ``-v``: also each delivery and deferral (logger :data:`OUTCOMES`);
- ``-vv``: everything copiamail logs at debug level;
- ``-vvv``: third-party libraries' debug lines too (filelock, asyncio ...),
  which stay at WARNING below that.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

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


def setup_logging(verbosity: int, stream: TextIO) -> None:
    """Send log lines to ``stream`` at the levels ``verbosity`` (the count of
    ``-v``) selects (see the module doc)."""
    handler = LineStartHandler(stream)
    handler.addFilter(_name_source)
    handler.setFormatter(logging.Formatter(_FORMAT, _DATE_FORMAT))
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
