"""The evidence ``advise`` reads: every attempt in the spool's jobs that a
receiver answered with a throttle reply.

Jobs are read in ``SENT``, ``FAIL`` and the TOSEND folders (ACTIVE holds jobs
in flight, whose records come back with them). Each readable attempt record
is one attempt; its reply is the record's ANSWERBACK text, or, for a record
without one (CopiaFacts writes its records that way too), the job's
``EMAIL_ERROR`` where that record is the job's last failed attempt: the
variable holds the last failed attempt's reply only. A reply is a throttle
reply when the config's throttle table (the operator's patterns, then the
shipped ones) gives it a kind, as the node judges it when the reply comes.

An attempt is charged to the domain of the job's ``$email_address``, or of
its ``$email_alt_address`` when the record comes after the line where the
engine switched the job to it (``EMAIL_USING_ALT``).

``EMAIL_CONNECTIONS`` is set in place at each throttled attempt, so it
belongs to the job's last throttled attempt; earlier throttled attempts of
that job count as replies with no known connection count.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path

from copiamail.jobfile.addresses import read_mailbox, written_address
from copiamail.jobfile.fsfile import Command, CommandFile
from copiamail.jobfile.owned import USING_ALT, AttemptRecord, parse_attempt
from copiamail.spool.layout import FAIL, SENT, is_job_name
from copiamail.spool.queue import Spool
from copiamail.throttle import ThrottleKind, ThrottleTable

ANY_NODE = "*"
_CODE = re.compile(r"([45]\d\d)(?![0-9])")
_NODE_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True)
class Throttled:
    """One attempt answered by a throttle reply: the job's recipient
    ``domain`` (lower-case), the ``node`` its record names (:data:`ANY_NODE`
    for a record that names none, as CopiaFacts' own), the reply's ``kind``,
    when the attempt ended (local time), the reply as the job holds it, the
    connections open to the domain's limit when it came (its own included;
    None where the job does not say) and the job file it was read from."""

    domain: str
    node: str
    kind: ThrottleKind
    when: datetime
    text: str
    connections: int | None
    path: Path


@dataclass(frozen=True)
class Evidence:
    """What the spool holds: the throttled attempts, the number of job files
    read, and one warning per file skipped (naming it)."""

    throttled: tuple[Throttled, ...]
    files: int
    warnings: tuple[str, ...]


def job_files(spool: Spool) -> Iterator[Path]:
    """Every job file in ``SENT``, ``FAIL`` and the TOSEND folders (as they
    are named on disk), folder by folder, by name."""
    for folder in [SENT, FAIL, *spool.queue_folders()]:
        try:
            names = sorted(p.name for p in spool.folder(folder).iterdir() if is_job_name(p.name) and p.is_file())
        except FileNotFoundError:
            continue
        for name in names:
            yield spool.folder(folder) / name


def _when(record: AttemptRecord) -> datetime | None:
    try:
        return datetime.strptime(f"{record.date} {record.time}", "%m/%d/%Y %H:%M:%S")
    except ValueError:
        return None


def _code(record: AttemptRecord, text: str) -> int:
    """The reply code of an attempt: its outcome where that is an SMTP
    refusal, else the code the reply text starts with (a record whose
    outcome is the writer's own code), else its outcome."""
    if 400 <= record.outcome < 600:
        return record.outcome
    m = _CODE.match(text)
    return int(m.group(1)) if m else record.outcome


def _domain(commands: list[Command], cf: CommandFile, name: str = "email_address") -> str | None:
    """The domain of the job's last ``$email_address`` (or other address command ``name``)."""
    addresses = [c for c in commands if c.name == name]
    if not addresses:
        return None
    mailbox = read_mailbox(written_address(addresses[-1], cf))
    return mailbox.domain if mailbox is not None else None


def _alternative_from(commands: list[Command]) -> int | None:
    """The line after which attempts went to the job's ``$email_alt_address``:
    the engine writes ``EMAIL_USING_ALT`` after the main address's last record."""
    marks = [c.line for c in commands if c.name == "var_def" and c.args and c.args[0].upper() == USING_ALT
             and c.args[1:] not in ((), ("0",))]
    return marks[-1] if marks else None


def _node(record: AttemptRecord) -> str:
    # A field that is no node name (a record from another writer) must not
    # become a CFG line that does not parse.
    return record.node if _NODE_NAME.fullmatch(record.node) else ANY_NODE


def read_job(path: Path, table: ThrottleTable, since: date | None = None) -> tuple[Throttled, ...]:
    """The throttled attempts of one job file, those that ended on ``since``
    or later where it is given. Raises :class:`~copiamail.errors.SyntaxFileError` naming the
    file for a file that is no command file, a ValueError for one with
    throttle replies and no readable recipient, and OSError for one that
    cannot be read."""
    cf = CommandFile.read(path)
    commands = cf.commands()
    records = [r for c in commands if c.name == "attempt_record" and (r := parse_attempt(c)) is not None]
    if not records:
        return ()
    error = cf.var("EMAIL_ERROR") or ""
    count = cf.var("EMAIL_CONNECTIONS")
    connections = int(count) if count is not None and count.isascii() and count.isdigit() else None
    last_failed = max((r.line for r in records if r.outcome != 0), default=None)
    found: list[tuple[AttemptRecord, str, ThrottleKind]] = []
    for record in records:
        text = record.text or (error if record.line == last_failed else "")
        kind = table.kind(_code(record, text), text) if text else None
        if kind is not None:
            found.append((record, text, kind))
    if not found:
        return ()
    domain = _domain(commands, cf)
    if domain is None:  # only a job with evidence needs a domain: others stay silent
        raise ValueError(f"{path}: no readable $email_address")
    switched = _alternative_from(commands)
    alternative = _domain(commands, cf, "email_alt_address") if switched is not None else None
    out = []
    for record, text, kind in found:
        when = _when(record)
        if when is None or (since is not None and when.date() < since):
            continue
        known = connections if record is found[-1][0] else None
        to = alternative if alternative is not None and switched is not None and record.line > switched else domain
        out.append(Throttled(to, _node(record), kind, when, text, known, path))
    return tuple(out)


def gather(spool: Spool, table: ThrottleTable, since: date | None = None) -> Evidence:
    """Every throttled attempt in the spool's jobs (see :func:`read_job`). A
    file that cannot be read or parsed is skipped with a warning naming it;
    nothing else stops the reading."""
    throttled: list[Throttled] = []
    warnings: list[str] = []
    files = 0
    for path in job_files(spool):
        files += 1
        try:
            throttled += read_job(path, table, since)
        except ValueError as e:  # SyntaxFileError too: each names the file
            warnings.append(f"{e}; skipped")
        except OSError as e:
            warnings.append(f"{path}: cannot read: {e.strerror or e}; skipped")
    return Evidence(tuple(throttled), files, tuple(warnings))
