"""A job file as an operator sees it (``copiamail show``, log lines): its state,
taken from the folder it is in, and what the engine wrote into it, read line
by line, so that a job that does not parse still shows its ``EMAIL_ERROR`` and
attempts."""

from __future__ import annotations

import time
from pathlib import Path

from copiamail.config import Config
from copiamail.errors import SyntaxFileError
from copiamail.jobfile.addresses import address_lines
from copiamail.jobfile.fsfile import Command, CommandFile, tokenize
from copiamail.jobfile.model import Job
from copiamail.jobfile.owned import OWNED_VARS, AttemptRecord, parse_attempt, parse_local_time
from copiamail.spool.layout import ACTIVE, FAIL, SENT, is_queue_name

# The engine's variables in the order show prints them: the reason first.
ENGINE_VARS = ("EMAIL_ERROR", *sorted(OWNED_VARS - {"EMAIL_ERROR"}))
NEXT_TRY_FORMAT = "%m/%d/%Y %H:%M:%S"  # as $fax_next_date/$fax_next_time write it


def job_state(path: Path, next_attempt: float | None, now: float, held: bool = False) -> str:
    """Where the job stands, from the folder it is in: ``waiting (due)``,
    ``waiting (next try ...)`` (both after ``held, `` when ``held``), ``in
    flight on node N``, ``delivered``, ``failed``, or ``not in a spool
    folder``."""
    parts = path.absolute().parts
    folder = parts[-2] if len(parts) >= 2 else ""
    if len(parts) >= 4 and parts[-4] == ACTIVE:  # ACTIVE/<node>/<queue>/<job>
        return f"in flight on node {parts[-3]}"
    if folder == SENT:
        return "delivered"
    if folder == FAIL:
        return "failed"
    if is_queue_name(folder):
        held_by = "held, " if held else ""
        if next_attempt is None or next_attempt <= now:
            return f"{held_by}waiting (due)"
        return f"{held_by}waiting (next try {time.strftime(NEXT_TRY_FORMAT, time.localtime(next_attempt))})"
    return "not in a spool folder"


def readable_commands(cf: CommandFile) -> list[Command]:
    """Every line of ``cf`` that reads as a command, in file order; the lines
    that do not (an unterminated quote, binary data) are left out."""
    out: list[Command] = []
    for number, raw in enumerate(cf.lines, 1):
        try:
            out += [Command(c.name, c.args, number) for c in CommandFile((raw,), cf.encoding).commands()]
        except SyntaxFileError:
            continue
    return out


def engine_lines(commands: list[Command]) -> tuple[dict[str, str], tuple[AttemptRecord, ...], float | None]:
    """What the engine wrote among ``commands``: its variables (the last value
    of each, in :data:`ENGINE_VARS` order), the attempt records it can read,
    and the next try, if readable."""
    found: dict[str, str] = {}
    attempts: list[AttemptRecord] = []
    next_date = next_time = None
    for cmd in commands:
        if cmd.name == "var_def" and len(cmd.args) >= 2 and cmd.args[0].upper() in OWNED_VARS:
            found[cmd.args[0].upper()] = " ".join(cmd.args[1:])
        elif cmd.name == "attempt_record" and (record := parse_attempt(cmd)) is not None:
            attempts.append(record)
        elif cmd.name == "fax_next_date" and cmd.args:
            next_date = cmd.args[0]
        elif cmd.name == "fax_next_time" and cmd.args:
            next_time = cmd.args[0]
    next_attempt = None
    if next_date is not None:
        try:
            next_attempt = parse_local_time(next_date, next_time or "00:00:00")
        except ValueError:
            next_attempt = None
    return {k: found[k] for k in ENGINE_VARS if k in found}, tuple(attempts), next_attempt


def recipient_of(cf: CommandFile) -> str:
    """The recipient a job file names (its last ``$email_address`` line),
    read without parsing the job (cheap: for log lines); ``(none)``."""
    lines = address_lines(cf.text)
    if not lines:
        return "(none)"
    arg = lines[-1].rstrip("\r").strip(" \t")
    try:
        return " ".join(tokenize(arg)) or "(none)"
    except SyntaxFileError:
        return arg


def recipient_domain(recipient: str) -> str:
    """The domain of a recipient as :func:`recipient_of` shows it (inside its
    ``<...>`` if it has them), lower case; empty if it has no ``@``."""
    address = recipient
    if "<" in address and ">" in address:
        address = address[address.rindex("<") + 1:address.rindex(">")]
    return address.rpartition("@")[2].strip().lower() if "@" in address else ""


def sender_for(job: Job, config: Config) -> str:
    """The envelope sender of ``job``: its ``$email_esender``, else the CFG
    file's, else the config's ``esender``."""
    return job.esender or config.rules.esender or config.esender
