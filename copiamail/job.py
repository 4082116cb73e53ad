"""An FS file's meaning: the frozen :class:`Job` the engine sends.

:func:`parse_job` reads the commands of SPEC 2 ("Commands of an e-mail job") and
the lines the engine writes (SPEC 2, "What the engine writes into a job"). Any
other command is kept in the file and ignored here: FS files written for
CopiaFacts carry fax commands too. A job that cannot be sent as written raises
:class:`~copiamail.errors.JobError` with the outcome code it fails with.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass, field, replace
from email.utils import parsedate_to_datetime
from typing import Mapping, NamedTuple

from . import outcome
from .errors import JobError, SyntaxFileError
from .fsfile import Command, CommandFile

# Lines the engine owns (SPEC 2): it may update or add these; every other line
# is the submitter's and is kept as written.
OWNED_VARS = frozenset({"DOMAINBUSY_COUNT", "EMAIL_ERROR", "EMAIL_CONNECT_IP", "EMAIL_BYTECOUNT"})
OWNED_COMMANDS = frozenset({"attempt_record", "fax_status1", "fax_status2", "fax_next_date", "fax_next_time"})

# Commands that set one value: the last occurrence counts.
_SINGLE = {"email_address", "email_subject", "email_from", "email_esender", "email_charset"}

# Every ``$email...`` command of the CopiaFacts FS and CFG command lists. A
# line that begins ``$email`` and names none of these is a typo
# (``$email_subjct``, ``$emailtext``) and fails the job: a typo must never
# send an empty message. Commands copiamail does not act on are listed too,
# so a real CopiaFacts file never fails as a typo.
KNOWN_EMAIL_COMMANDS = frozenset({
    "email_address", "email_alt_address", "email_altbody", "email_alttext", "email_attach", "email_body",
    "email_charset", "email_dkim_keyfile", "email_esender", "email_from", "email_header", "email_options",
    "email_retry_delays", "email_retry_max", "email_subject", "email_text",
    # CFG-only commands, harmless in an FS file.
    "email_settings", "email_server", "email_domain", "email_bcc", "email_dkim_selector",
})

# RFC 5321: a dot-atom local part (no leading, trailing or double dot) or a
# quoted one, and a domain of non-empty labels.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_DOMAIN = rf"{_LABEL}(?:\.{_LABEL})*"
_ADDRESS = re.compile(rf"^[^\s<>()\[\],;:\"@.]+(?:\.[^\s<>()\[\],;:\"@.]+)*@{_DOMAIN}$")
_QUOTED_LOCAL = re.compile(rf'^"[^"\r\n]*"@{_DOMAIN}$')
_HEADER_NAME = re.compile(r"^[!-9;-~]+$")


def is_owned(command: Command) -> bool:
    """Whether a line is one the engine writes (and so may rewrite)."""
    if command.name == "var_def":
        return bool(command.args) and command.args[0].upper() in OWNED_VARS
    return command.name in OWNED_COMMANDS


class BodyItem(NamedTuple):
    """A piece of a body in file order: a text line, or a file to include
    (a named tuple, like :class:`~copiamail.fsfile.Command`, for speed)."""

    kind: str  # "text" or "file"
    value: str
    line: int


@dataclass(frozen=True)
class Attachment:
    path: str
    content_type: str | None
    line: int


@dataclass(frozen=True)
class AttemptRecord:
    """``$attempt_record MM/DD/YYYY HH:MM:SS E NODE OUTCOME CLASS "text"``."""

    date: str
    time: str
    node: str
    outcome: int
    klass: str
    text: str

    @property
    def counts_as_retry(self) -> bool:
        """Interruptions (66) do not count as retries (SPEC 4)."""
        return self.outcome != outcome.INTERRUPTED.code


@dataclass(frozen=True)
class Job:
    """One parsed e-mail job (one recipient)."""

    name: str
    address: str
    domain: str
    to_header: str | None = None  # the recipient as written, where it has a display name
    subject: str | None = None
    body: tuple[BodyItem, ...] = ()
    alt: tuple[BodyItem, ...] = ()
    attachments: tuple[Attachment, ...] = ()
    from_header: str | None = None
    esender: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    charset: str = "utf-8"
    retry_delays: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    variables: Mapping[str, str] = field(default_factory=dict)
    attempts: tuple[AttemptRecord, ...] = ()
    domainbusy_count: int = 0
    next_attempt: float | None = None
    identity: str = ""
    dkim_keyfile: tuple[str, int] | None = None  # $email_dkim_keyfile: (path, job line)

    @property
    def binding(self) -> str | None:
        return self.variables.get("EMAIL_BINDING")

    @property
    def binding_group(self) -> str | None:
        return self.variables.get("EMAIL_BINDING_GROUP")

    @property
    def interruptions(self) -> int:
        return sum(1 for a in self.attempts if not a.counts_as_retry)

    def without_content(self) -> "Job":
        """This job less its body, alternative, attachments and headers: what
        scheduling needs, at a fraction of the memory."""
        return replace(self, body=(), alt=(), attachments=(), headers=())

    def is_due(self, now: float) -> bool:
        return self.next_attempt is None or self.next_attempt <= now


def _joined(cmd: Command) -> str:
    return " ".join(cmd.args)


def _check_header_value(value: str, what: str, cmd: Command, cf: CommandFile) -> str:
    if "\r" in value or "\n" in value:
        raise JobError(f"{what} contains CR or LF", outcome.BAD_HEADER.code, cf.path, cmd.line)
    return value


def _as_written(cmd: Command, cf: CommandFile) -> str:
    """An address command's text as CopiaFacts takes it: the rest of the line
    as written, double quotes kept; one token quoted whole (the older form
    ``$email_from "Acme Billing <billing@acme.test>"``) is read unquoted."""
    text = cf.as_written(cmd)
    if len(cmd.args) == 1 and text.startswith('"') and text.endswith('"'):
        text = cmd.args[0]
    return text


class Mailbox(NamedTuple):
    """An address as a job writes it: ``address`` for SMTP, its ``domain``
    (lower-case), and ``header``: the text for a header where it carries
    more than the address (a display name), else None."""

    address: str
    domain: str
    header: str | None


_AROUND_AT = re.compile(r"[ \t]*@[ \t]*")


def read_mailbox(text: str) -> Mailbox | None:
    """A mailbox as CopiaFacts reads ``$email_address``: the address is the
    text between ``<`` and the first ``>`` where there is one, else the
    whole text with blanks next to the ``@`` dropped; double quotes around
    the address are dropped. None if no valid address is found."""
    text = text.strip(" \t")
    close = text.find(">")
    header: str | None = None
    if close >= 0:
        opening = text.rfind("<", 0, close)
        if opening < 0:
            return None
        candidate = text[opening + 1:close].strip(" \t")
        if text[:opening].strip(" \t") or text[close + 1:].strip(" \t"):
            header = text
    else:
        # Text beside a bare address would be guesswork: it needs <...>.
        candidate = _AROUND_AT.sub("@", text)
    if len(candidate) > 2 and candidate.startswith('"') and candidate.endswith('"') and candidate.count('"') == 2:
        candidate = candidate[1:-1]
    parsed = parse_address(candidate)
    if parsed is None:
        return None
    return Mailbox(parsed[0], parsed[1], header)


def check_header(name: str, value: str) -> None:
    """Refuse a job header the engine cannot send as asked (JobError,
    BAD_HEADER): a bad name, one the engine writes to match the body, a CR,
    LF or NUL, a Date that is no date, a Message-ID that is not printable ASCII."""
    if not _HEADER_NAME.match(name):
        raise JobError(f"bad header name {name!r}", outcome.BAD_HEADER.code)
    key = name.lower()
    if key in ENGINE_HEADERS:
        raise JobError(f"header {name} is written by the engine and cannot be set", outcome.BAD_HEADER.code)
    if "\r" in value or "\n" in value or "\0" in value:
        raise JobError(f"header {name} contains CR, LF or NUL", outcome.BAD_HEADER.code)
    if key == "date":
        try:
            parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            raise JobError(f"bad Date header {value!r}", outcome.BAD_HEADER.code) from None
    if key == "message-id" and not (value.isascii() and value.isprintable()):
        raise JobError(f"header {name}: an identifier must be printable ASCII", outcome.BAD_HEADER.code)


# Headers the engine writes to match the body: a job cannot set them.
ENGINE_HEADERS = frozenset({"mime-version", "content-type", "content-transfer-encoding"})


def parse_address(text: str) -> tuple[str, str] | None:
    """``(address, domain)`` of a plain address, ``<address>`` allowed; None if
    malformed. ASCII only: a non-ASCII address needs SMTPUTF8, which copiamail
    does not send."""
    text = text.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1]
    if not text.isascii() or not (_ADDRESS.match(text) or _QUOTED_LOCAL.match(text)):
        return None
    return text, text.rsplit("@", 1)[1].lower()


# A line whose command is $email_address (any case), and the rest of it.
_ADDRESS_LINE = re.compile(r"^[ \t]*\$email_address(?=[ \t]|\r?$)(.*)$", re.IGNORECASE | re.MULTILINE)


def address_lines(text: str) -> list[str]:
    """What follows ``$email_address`` on each line that starts with it (any
    case, after blanks): ``_ADDRESS_LINE.findall(text)``, found faster in
    ASCII text (tested against it) with ``str.find`` on the lowered text.
    Not for other text: there, case folding can match other letters (the
    long s, the Kelvin sign) and change lengths."""
    if not text.isascii():
        return _ADDRESS_LINE.findall(text)
    low = text.lower()
    found = []
    at = low.find("$email_address")
    while at != -1:
        after = at + 14
        line_start = low.rfind("\n", 0, at) + 1
        if not low[line_start:at].strip(" \t"):
            next_char = low[after:after + 1]
            if next_char in ("", " ", "\t", "\n") or (next_char == "\r" and low[after + 1:after + 2] in ("", "\n")):
                end = low.find("\n", after)
                found.append(text[after:] if end == -1 else text[after:end])
        at = low.find("$email_address", after)
    return found


def quick_domain(cf: CommandFile) -> str | None:
    """The recipient's domain read without parsing the whole job, when the file
    has one plain ``$email_address`` line (no quotes, no comment); else None.
    Where it gives a domain and :func:`parse_job` succeeds, the two agree
    (tested): it lets a worker skip other workers' jobs cheaply."""
    lines = address_lines("".join(cf.lines))
    if len(lines) != 1:
        return None
    arg = lines[0].rstrip("\r").strip(" \t")
    if not arg or any(c in arg for c in ' \t";\x00'):
        return None
    parsed = parse_address(arg)
    return parsed[1] if parsed is not None else None


def parse_local_time(date: str, clock: str) -> float:
    """``MM/DD/YYYY`` and ``HH:MM:SS`` in the node's local time, to epoch seconds."""
    return time.mktime(time.strptime(f"{date} {clock}", "%m/%d/%Y %H:%M:%S"))


def job_identity(name: str, cf: CommandFile, commands: list[Command]) -> str:
    """A digest of the job's name and the lines the engine does not own: stable
    across the engine's own edits, so a retry carries the same Message-ID."""
    h = hashlib.sha256(name.encode("utf-8", "surrogateescape"))
    owned = {c.line for c in commands if is_owned(c)}
    for number, raw in enumerate(cf.lines, 1):
        if number not in owned:
            h.update(raw.rstrip("\r\n").encode("utf-8", "surrogateescape") + b"\n")
    return h.hexdigest()[:32]


def parse_job(cf: CommandFile, name: str) -> Job:
    """The job an FS file describes; raises JobError (with its outcome code)."""
    try:
        commands = cf.commands()
    except SyntaxFileError as e:
        raise JobError(e.message, outcome.BAD_JOB.code, cf.path, e.line) from None

    single: dict[str, Command] = {}
    body: list[BodyItem] = []
    alt: list[BodyItem] = []
    attachments: list[Attachment] = []
    headers: list[tuple[str, str]] = []
    delays: dict[str, tuple[int, ...]] = {}
    variables: dict[str, str] = {}
    attempts: list[AttemptRecord] = []
    next_date: Command | None = None
    next_time: Command | None = None
    dkim_keyfile: tuple[str, int] | None = None

    def need_arg(cmd: Command) -> None:
        if not cmd.args:
            raise JobError(f"${cmd.name} needs an argument", outcome.BAD_JOB.code, cf.path, cmd.line)

    for cmd in commands:
        n = cmd.name
        if n in _SINGLE:
            need_arg(cmd)
            single[n] = cmd
        elif n == "email_text":
            body.append(BodyItem("text", _joined(cmd), cmd.line))
        elif n == "email_body":
            need_arg(cmd)
            body.append(BodyItem("file", cmd.args[0], cmd.line))
        elif n == "email_alttext":
            alt.append(BodyItem("text", _joined(cmd), cmd.line))
        elif n == "email_altbody":
            need_arg(cmd)
            alt.append(BodyItem("file", cmd.args[0], cmd.line))
        elif n == "email_attach":
            need_arg(cmd)
            ctype = cmd.args[1] if len(cmd.args) > 1 else None
            if ctype is not None and (not re.fullmatch(r"[A-Za-z0-9.+-]+/[A-Za-z0-9.+-]+", ctype)
                                      or ctype.lower().startswith(("message/", "multipart/"))):
                # message/* and multipart/* are structures, not file types: an
                # attachment is sent as bytes (base64), which they cannot be.
                raise JobError(f"bad content type {ctype!r} for an attachment", outcome.BAD_JOB.code, cf.path, cmd.line)
            attachments.append(Attachment(cmd.args[0], ctype, cmd.line))
        elif n == "email_header":
            text = _check_header_value(_joined(cmd), "header", cmd, cf)
            hname, sep, hvalue = text.partition(":")
            hname = hname.strip()
            if not sep or not _HEADER_NAME.match(hname):
                raise JobError(f"bad header {text!r} (NAME: VALUE)", outcome.BAD_HEADER.code, cf.path, cmd.line)
            try:
                check_header(hname, hvalue.strip())
            except JobError as e:
                raise JobError(e.message, e.outcome, cf.path, cmd.line) from None
            headers.append((hname, hvalue.strip()))
        elif n == "email_retry_delays":
            if len(cmd.args) < 1:
                raise JobError("$email_retry_delays needs CLASS \"LIST\"", outcome.BAD_JOB.code, cf.path, cmd.line)
            try:
                delays[outcome.parse_retry_class(cmd.args[0])] = outcome.parse_delays(" ".join(cmd.args[1:]))
            except ValueError as e:
                raise JobError(str(e), outcome.BAD_JOB.code, cf.path, cmd.line) from None
        elif n == "email_dkim_keyfile":
            need_arg(cmd)
            dkim_keyfile = (cmd.args[0], cmd.line)
        elif n == "var_def":
            need_arg(cmd)
            variables[cmd.args[0].upper()] = " ".join(cmd.args[1:])
        elif n == "attempt_record":
            record = parse_attempt(cmd)
            if record is not None:
                attempts.append(record)
        elif n == "fax_next_date":
            next_date = cmd
        elif n == "fax_next_time":
            next_time = cmd
        elif n.startswith("email") and n not in KNOWN_EMAIL_COMMANDS:
            raise JobError(f"unknown command ${n} (a typo?)", outcome.BAD_JOB.code, cf.path, cmd.line)

    if "email_address" not in single:
        raise JobError("no recipient ($email_address is missing)", outcome.BAD_JOB.code, cf.path)
    addr_cmd = single["email_address"]
    written = _check_header_value(_as_written(addr_cmd, cf), "$email_address", addr_cmd, cf)
    recipient = read_mailbox(written)
    if recipient is None:
        raise JobError(f"bad recipient address {written!r}", outcome.BAD_HEADER.code, cf.path, addr_cmd.line)

    def value(key: str) -> str | None:
        cmd = single.get(key)
        return None if cmd is None else _check_header_value(_joined(cmd), "$" + key, cmd, cf)

    esender = None
    if "email_esender" in single:
        cmd = single["email_esender"]
        written_sender = _check_header_value(_as_written(cmd, cf), "$email_esender", cmd, cf)
        sender = read_mailbox(written_sender)
        if sender is None:
            raise JobError(f"bad envelope sender {written_sender!r}", outcome.BAD_HEADER.code, cf.path, cmd.line)
        esender = sender.address
    from_header = None
    if "email_from" in single:
        cmd = single["email_from"]
        from_header = _check_header_value(_as_written(cmd, cf), "$email_from", cmd, cf)

    subject = value("email_subject")

    charset = value("email_charset") or "utf-8"
    try:
        "".encode(charset)
    except (LookupError, UnicodeError):  # UnicodeError: the "undefined" codec
        cmd = single["email_charset"]
        raise JobError(f"unknown charset {charset!r}", outcome.BAD_CHARSET.code, cf.path, cmd.line) from None

    next_attempt = None
    if next_date is not None and next_date.args:
        clock = next_time.args[0] if next_time is not None and next_time.args else "00:00:00"
        try:
            next_attempt = parse_local_time(next_date.args[0], clock)
        except (ValueError, OverflowError):
            raise JobError(
                f"bad $fax_next_date/$fax_next_time {next_date.args[0]} {clock}",
                outcome.BAD_JOB.code, cf.path, next_date.line,
            ) from None

    try:
        busy = int(variables.get("DOMAINBUSY_COUNT", "0") or "0")
    except ValueError:
        busy = 0

    return Job(
        name=name,
        address=recipient.address,
        domain=recipient.domain,
        to_header=recipient.header,
        subject=subject,
        body=tuple(body),
        alt=tuple(alt),
        attachments=tuple(attachments),
        from_header=from_header,
        esender=esender,
        headers=tuple(headers),
        charset=charset,
        retry_delays=delays,
        variables=variables,
        attempts=tuple(attempts),
        domainbusy_count=busy,
        next_attempt=next_attempt,
        identity=job_identity(name, cf, commands),
        dkim_keyfile=dkim_keyfile,
    )


def parse_attempt(cmd: Command) -> AttemptRecord | None:
    """An ``$attempt_record`` line, or None when it cannot be read."""
    # A record the engine cannot read is kept in the file but not counted; the
    # alternative, failing the job, would punish it for a hand edit.
    a = cmd.args
    if len(a) < 6:
        return None
    try:
        code = int(a[4])
    except ValueError:
        return None
    return AttemptRecord(a[0], a[1], a[3], code, a[5].upper(), " ".join(a[6:]))
