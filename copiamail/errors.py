"""The one exception hierarchy of copiamail.

Every error a user can cause (a bad job, a bad config, a missing file) is a
:class:`CopiamailError`; its ``str()`` is one line that names the file, line or
key. The CLI prints that line and exits non-zero; the node writes it into the
job's ``EMAIL_ERROR`` and goes on. Anything else escaping is a bug.
"""

from __future__ import annotations

from pathlib import Path


class CopiamailError(Exception):
    """Base of every error copiamail raises on purpose."""


class LocatedError(CopiamailError):
    """An error at a place in a file: ``file:line: message``."""

    def __init__(self, message: str, path: Path | str | None = None, line: int | None = None) -> None:
        self.message = message
        self.path = Path(path) if path is not None else None
        self.line = line
        super().__init__(str(self))

    def __str__(self) -> str:
        where = ""
        if self.path is not None:
            where = f"{self.path}"
            if self.line is not None:
                where += f":{self.line}"
            where += ": "
        elif self.line is not None:
            where = f"line {self.line}: "
        # One line, always: a key or value may hold a line break.
        return " ".join(f"{where}{self.message}".splitlines())


class SyntaxFileError(LocatedError, ValueError):
    """A line of an FS or CFG file that does not follow the command syntax."""


class ConfigError(LocatedError, ValueError):
    """A bad key or value in copiamail.yaml or the CFG file."""


class JobError(LocatedError, ValueError):
    """An FS job that cannot be sent as written (the job fails with class Z).

    ``outcome`` is the engine's outcome code written into ``$fax_status2``.
    """

    def __init__(self, message: str, outcome: int, path: Path | str | None = None, line: int | None = None) -> None:
        self.outcome = outcome
        super().__init__(message, path, line)


class SpoolError(CopiamailError, OSError):
    """The spool cannot be used: a missing folder, a full disk, a node already running."""


class DeliveryError(CopiamailError):
    """An SMTP attempt that did not deliver.

    ``code`` is the SMTP reply code or the engine's outcome code, ``klass`` the
    CopiaFacts class letter, ``text`` the server's reply or our own message,
    ``permanent`` tells whether the job fails at once (5xx) or may be retried, and
    ``stage`` where in the attempt it failed (before any SMTP command, a node
    may try the domain's next mail host).
    """

    def __init__(self, code: int, klass: str, text: str, permanent: bool, stage: str = "") -> None:
        self.code = code
        self.klass = klass
        self.text = text
        self.permanent = permanent
        self.stage = stage  # DNS, CONNECT, MAIL, RCPT or DATA: where it failed
        super().__init__(text)


class NotSent(DeliveryError):
    """A message written behind another on a connection that ended before the
    server could take it: the server said 421 before reading it, or (with
    DATA) its content was never sent. It was no attempt; the job is sent again."""
