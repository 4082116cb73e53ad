"""The lines of a job the engine owns, as read back: which lines are its own,
its attempt records and the times it writes, the variables it defines for a
job, and the job's identity over every other line.
:mod:`copiamail.jobfile.records` writes these lines."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from copiamail.jobfile import outcome
from copiamail.jobfile.addresses import message_id_domain
from copiamail.jobfile.fsfile import Command, CommandFile

# Lines the engine owns: it may update or add these; every other line
# is the submitter's and is kept as written.
OWNED_VARS = frozenset({"DOMAINBUSY_COUNT", "EMAIL_ERROR", "EMAIL_CONNECT_IP", "EMAIL_BYTECOUNT", "EMAIL_USING_ALT",
                        "EMAIL_CONNECTIONS"})
# Set when the job's $email_alt_address is tried (the main address failed for
# good); its line marks where the alternative's own retries begin.
USING_ALT = "EMAIL_USING_ALT"
OWNED_COMMANDS = frozenset({"attempt_record", "fax_status1", "fax_status2", "fax_next_date", "fax_next_time"})
_MAYBE_OWNED = OWNED_COMMANDS | {"var_def"}


def is_owned(command: Command) -> bool:
    """Whether a line is one the engine writes (and so may rewrite)."""
    if command.name == "var_def":
        return bool(command.args) and command.args[0].upper() in OWNED_VARS
    return command.name in OWNED_COMMANDS


@dataclass(frozen=True)
class AttemptRecord:
    """One ``$attempt_record`` line, in any of the layouts :func:`parse_attempt` reads."""

    date: str
    time: str
    node: str
    outcome: int
    klass: str
    text: str
    line: int = field(default=0, compare=False)  # its line in the file
    queue: int | None = field(default=None, compare=False)  # TOSEND, where the layout has it: the queue it came from

    @property
    def counts_as_retry(self) -> bool:
        """Interruptions (66) and CopiaFacts' ignored failures (class I) do
        not count as retries."""
        return self.outcome != outcome.INTERRUPTED.code and self.klass != outcome.IGNORED


def parse_local_time(date: str, clock: str) -> float:
    """``MM/DD/YYYY`` and ``HH:MM:SS`` in the node's local time, to epoch seconds."""
    return time.mktime(time.strptime(f"{date} {clock}", "%m/%d/%Y %H:%M:%S"))


def job_identity(name: str, cf: CommandFile, commands: list[Command]) -> str:
    """A digest of the job's name and the lines the engine does not own: stable
    across the engine's own edits, so a retry carries the same Message-ID."""
    h = hashlib.sha256(name.encode("utf-8", "surrogateescape"))
    owned = {c.line for c in commands if c.name in _MAYBE_OWNED and is_owned(c)}
    # One update for all the lines (the same bytes as one a line, at a
    # fraction of the cost: a job is parsed at every scan that takes it up).
    text = cf.text
    if not owned and "\r" not in text:
        # Each line already ends in one LF (the last one excepted): the text
        # is the lines as the loop below would join them.
        kept = text if not text or text.endswith("\n") else text + "\n"
    else:
        kept = "".join(raw.rstrip("\r\n") + "\n" for number, raw in enumerate(cf.lines, 1) if number not in owned)
    h.update(kept.encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:32]


def engine_variables(name: str, esender: str, identity: str) -> Mapping[str, str]:
    """The variables the engine defines for a job: FSNUM (its name without
    ``.FS``), EMAIL_ESENDER (its envelope sender) and EM_MSGID (its
    Message-ID without the angle brackets: embedded parts are ``cid:imageN.`EM_MSGID``)."""
    stem = name[:-3] if name.upper().endswith(".FS") else name
    # The engine's own lines, before the engine has written them (the job's
    # $var_def comes first in any lookup).
    return {"FSNUM": stem, "EMAIL_ESENDER": esender, "EM_MSGID": f"{identity}@{message_id_domain(esender)}",
            "DOMAINBUSY_COUNT": "0", "EMAIL_ERROR": "", "EMAIL_CONNECT_IP": "", "EMAIL_BYTECOUNT": "0"}


def parse_attempt(cmd: Command) -> AttemptRecord | None:
    """An ``$attempt_record`` line, or None when it cannot be read. Three layouts:

    - CopiaFacts' own field order, which copiamail writes: ``DATE TIME TYPE
      SKIPPED SCHED OUTCOME CLASS SENT TOSEND FLAGS BOARDLINE BAUD CALL
      CONNECT ANSWERBACK``, then (copiamail only) the node's name;
    - copiamail's earlier layout: ``DATE TIME E NODE OUTCOME CLASS "TEXT"``
      (the third field is the letter E, never a number).
    """
    # A record the engine cannot read is kept in the file but not counted; the
    # alternative, failing the job, would punish it for a hand edit.
    a = cmd.args
    if len(a) < 6:
        return None
    queue: int | None = None
    if a[2].upper() == "E":
        field, node, text = 4, a[3], " ".join(a[6:])
    elif len(a) >= 7:
        field, node, text = 5, (a[15] if len(a) > 15 else ""), (a[14] if len(a) > 14 else "")
        if len(a) > 8 and a[8].isascii() and a[8].isdigit():
            queue = int(a[8])
    else:
        return None
    try:
        code = int(a[field])
    except ValueError:
        return None
    return AttemptRecord(a[0], a[1], node, code, a[field + 1].upper(), text, cmd.line, queue)
