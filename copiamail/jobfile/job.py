"""An FS file's meaning: the frozen :class:`Job` the engine sends.

:func:`parse_job` reads the ``$email...`` commands of an e-mail job, its
``$var_def`` variables and send time, and the lines the engine writes into it
(attempt records, status, next try). Any other command is kept in the file and
ignored here: FS files written for CopiaFacts carry fax commands too; an
unknown ``$email...`` command is a typo and fails the job. A job that cannot be sent as written raises
:class:`~copiamail.errors.JobError` with the outcome code it fails with.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from email.utils import parseaddr, parsedate_to_datetime
from types import MappingProxyType
from typing import NamedTuple

from copiamail.errors import JobError, SyntaxFileError
from copiamail.jobfile import outcome
from copiamail.jobfile.fsfile import Command, CommandFile
from copiamail.jobfile.outcome import RetryItem, RetryRules
from copiamail.jobfile.variables import GRAVE, UndefinedVariable, chained, expand, expand_path, starts_with_path_variable

# Lines the engine owns: it may update or add these; every other line
# is the submitter's and is kept as written.
OWNED_VARS = frozenset({"DOMAINBUSY_COUNT", "EMAIL_ERROR", "EMAIL_CONNECT_IP", "EMAIL_BYTECOUNT", "EMAIL_USING_ALT"})
# Set when the job's $email_alt_address is tried (the main address failed for
# good); its line marks where the alternative's own retries begin.
USING_ALT = "EMAIL_USING_ALT"
OWNED_COMMANDS = frozenset({"attempt_record", "fax_status1", "fax_status2", "fax_next_date", "fax_next_time"})

# Commands that set one value: the last occurrence counts.
_SINGLE = {"email_address", "email_subject", "email_from", "email_esender", "email_charset", "email_alt_address"}

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
    (a named tuple, like :class:`~copiamail.jobfile.fsfile.Command`, for speed)."""

    kind: str  # "text" or "file"
    value: str
    line: int


@dataclass(frozen=True)
class Attachment:
    path: str
    content_type: str | None
    line: int
    name: str | None = None  # the name shown (``TYPE; name=SHOWN``), else the file's
    embedded: bool = False  # ``EMBEDDED:TYPE``: an inline part an HTML body refers to by cid:


@dataclass(frozen=True)
class JobEnv:
    """What a job may draw on besides its own lines: the variables of the CFG
    file and of config ``variables:`` (merged, CFG first; names upper-case),
    and the envelope sender used when the job names none."""

    variables: Mapping[str, str] = field(default_factory=dict)
    esender: str | None = None
    # The From: header where the job has neither $email_from nor
    # $email_esender: the CFG's $email_from, else its $email_esender as written.
    from_header: str | None = None


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

    @property
    def counts_as_retry(self) -> bool:
        """Interruptions (66) and CopiaFacts' ignored failures (class I) do
        not count as retries."""
        return self.outcome != outcome.INTERRUPTED.code and self.klass != outcome.IGNORED


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
    body_encoding: str | None = None  # base64, quoted-printable or 8bit, as $email_charset asks
    header_encoding: str | None = None  # base64 or quoted-printable for encoded words
    retry_delays: Mapping[str, tuple[RetryItem, ...]] = field(default_factory=dict)
    variables: Mapping[str, str] = field(default_factory=dict)
    attempts: tuple[AttemptRecord, ...] = ()
    # Retry rules past $email_retry_delays: $email_retry_max, and the
    # $retry_delays/$retry_max fallback.
    retry_max: int | None = None
    fallback_delays: Mapping[str, tuple[RetryItem, ...]] = field(default_factory=dict)
    fallback_max: int | None = None
    # A job moved back from SENT or FAIL by hand starts its retries afresh:
    # only attempts after its last $fax_status1 6 count. restart_line: the
    # last such line before its current status (where its latest run began);
    # restarted: its current status is 6 (done, or, in a queue, moved back).
    restart_line: int = 0
    restarted: bool = False
    alt_address: str | None = None  # $email_alt_address, not yet tried: for when `address` fails for good
    domainbusy_count: int = 0
    next_attempt: float | None = None
    identity: str = ""
    options: frozenset[str] = frozenset()  # $email_options keywords, lower-case
    to_list: str | None = None  # EMAILTO_LIST: the To: header shown (the job still goes to `address` alone)
    cc_list: str | None = None  # EMAILCC_LIST: a Cc: header shown
    env: JobEnv | None = None  # None with $email_options nomacro; body files expand with it
    dkim_keyfile: tuple[str, int] | None = None  # $email_dkim_keyfile: (path, job line)

    @property
    def binding(self) -> str | None:
        return self.variables.get("EMAIL_BINDING")

    @property
    def binding_group(self) -> str | None:
        return self.variables.get("EMAIL_BINDING_GROUP")

    @property
    def current_attempts(self) -> tuple[AttemptRecord, ...]:
        """The attempts since the ``$fax_status1 6`` before the job's current
        status: its current run, or for a job whose status is 6 (done, or
        moved back by hand) the run that ended there."""
        return tuple(a for a in self.attempts if a.line > self.restart_line)

    @property
    def earlier_retries(self) -> list[str]:
        """The classes of the attempts that count as retries before the job's
        next attempt: none for a job moved back by hand (it starts afresh)."""
        return [] if self.restarted else [a.klass for a in self.current_attempts if a.counts_as_retry]

    @property
    def retry_rules(self) -> RetryRules:
        return RetryRules(self.retry_delays, self.retry_max, self.fallback_delays, self.fallback_max)

    @property
    def interruptions(self) -> int:
        return sum(1 for a in self.current_attempts if a.outcome == outcome.INTERRUPTED.code)

    def without_content(self) -> Job:
        """This job less its body, alternative, attachments and headers: what
        scheduling needs, at a fraction of the memory."""
        return replace(self, body=(), alt=(), attachments=(), headers=())

    def is_due(self, now: float) -> bool:
        return self.next_attempt is None or self.next_attempt <= now


def _check_header_value(value: str, what: str, cmd: Command, cf: CommandFile) -> str:
    if "\r" in value or "\n" in value:
        raise JobError(f"{what} contains CR or LF", outcome.BAD_HEADER.code, cf.path, cmd.line)
    return value


def written_address(cmd: Command, cf: CommandFile) -> str:
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
    lines = address_lines(cf.text)
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


def parse_job(cf: CommandFile, name: str, env: JobEnv | None = None) -> Job:
    """The job an FS file describes; raises JobError (with its outcome code).
    ``env``: the CFG's and config's variables and default sender, which the
    job's `` `NAME `` references may draw on."""
    try:
        commands = cf.commands()
    except SyntaxFileError as e:
        raise JobError(e.message, outcome.BAD_JOB.code, cf.path, e.line) from None
    return _JobReader(cf, name, env or JobEnv(), commands).job()


class _JobReader:
    """One pass over a job's commands. Variables and options are read by a
    first look at the whole file, made only where something is to be
    expanded: the file holds a grave accent, a path starts with a path
    variable, or a CFG or config variable holds one."""

    def __init__(self, cf: CommandFile, name: str, env: JobEnv, commands: list[Command]) -> None:
        self.cf = cf
        self.name = name
        self.env = env
        self.commands = commands
        self.variables: dict[str, str] = {}
        self.alt_line = 0
        self.option_words: list[str] = []
        self.looked = False
        self._lookup: Callable[[str], str | None] | None = None
        self.macros = GRAVE in cf.text and not self.first_look()
        self.single: dict[str, Command] = {}
        self.body: list[BodyItem] = []
        self.alt: list[BodyItem] = []
        self.attachments: list[Attachment] = []
        self.headers: list[tuple[str, str]] = []
        self.delays: dict[str, tuple[RetryItem, ...]] = {}
        self.fallback_delays: dict[str, tuple[RetryItem, ...]] = {}
        self.retry_max: dict[str, int] = {}
        self.status1: list[tuple[int, str]] = []
        self.attempts: list[AttemptRecord] = []
        self.dates: dict[str, Command] = {}
        self.identity = job_identity(name, cf, commands)
        self.dkim_keyfile: tuple[str, int] | None = None

    def first_look(self) -> bool:
        """Read every ``$var_def`` and ``$email_options`` of the file (once);
        True if expansion is off (``nomacro``)."""
        if not self.looked:
            self.looked = True
            for cmd in self.commands:
                if cmd.name in ("var_def", "email_options"):
                    _HANDLERS[cmd.name](self, cmd)
        return "nomacro" in self.option_words

    # --- helpers ------------------------------------------------------------

    def error(self, message: str, cmd: Command | None, code: int = outcome.BAD_JOB.code) -> JobError:
        return JobError(message, code, self.cf.path, cmd.line if cmd is not None else None)

    def undefined(self, e: UndefinedVariable, cmd: Command) -> JobError:
        return self.error(f"undefined variable `{e.name} (no $var_def, CFG $var_def or config variables: defines it)", cmd)

    def lookup(self) -> Callable[[str], str | None]:
        """Values by precedence: the job's $var_def, the CFG's, config
        ``variables:``, the engine's own (made once per job)."""
        if self._lookup is None:
            self.first_look()
            self._lookup = chained(self.variables, self.env.variables,
                                   engine_variables(self.name, self.esender_or_default(), self.identity))
        return self._lookup

    def esender_or_default(self) -> str:
        """EMAIL_ESENDER: the job's last $email_esender (expanded without
        EMAIL_ESENDER itself), else the default sender."""
        cmd = next((c for c in reversed(self.commands) if c.name == "email_esender" and c.args), None)
        if cmd is not None:
            text = written_address(cmd, self.cf)
            if GRAVE in text and not self.first_look():
                engine = dict(engine_variables(self.name, "", self.identity))
                del engine["EMAIL_ESENDER"]
                try:
                    text = expand(text, chained(self.variables, self.env.variables, engine))
                except UndefinedVariable as e:
                    raise self.undefined(e, cmd) from None
            mailbox = read_mailbox(text)
            if mailbox is not None:
                return mailbox.address
        return self.env.esender or ""

    def expanded(self, text: str, cmd: Command) -> str:
        """``text`` of an ``$email...`` command with its variables expanded."""
        if not self.macros or GRAVE not in text:
            return text
        try:
            return expand(text, self.lookup())
        except UndefinedVariable as e:
            raise self.undefined(e, cmd) from None

    def args(self, cmd: Command) -> tuple[str, ...]:
        return tuple(self.expanded(a, cmd) for a in cmd.args) if self.macros else cmd.args

    def path(self, cmd: Command, text: str) -> str:
        """A file path of the job with its variables expanded (path
        variables also without the grave accent at its start)."""
        if not (self.macros or starts_with_path_variable(text)) or self.first_look():
            return text
        try:
            return expand_path(text, self.lookup())
        except UndefinedVariable as e:
            raise self.undefined(e, cmd) from None

    def need_arg(self, cmd: Command) -> None:
        if not cmd.args:
            raise self.error(f"${cmd.name} needs an argument", cmd)

    def value(self, key: str) -> str | None:
        cmd = self.single.get(key)
        if cmd is None:
            return None
        return _check_header_value(" ".join(self.args(cmd)), "$" + key, cmd, self.cf)

    # --- the pass -------------------------------------------------------------

    def job(self) -> Job:
        body, macros = self.body, self.macros
        for cmd in self.commands:
            if cmd.name == "email_text" and not macros:
                # Most lines of most jobs: the hot path, without a call.
                body.append(BodyItem("text", " ".join(cmd.args), cmd.line))
                continue
            if self.looked and cmd.name in ("var_def", "email_options"):
                continue  # read by the first look
            handler = _HANDLERS.get(cmd.name)
            if handler is not None:
                handler(self, cmd)
            elif cmd.name in _SINGLE:
                self.need_arg(cmd)
                self.single[cmd.name] = cmd
            elif cmd.name.startswith("email") and cmd.name not in KNOWN_EMAIL_COMMANDS:
                raise self.error(f"unknown command ${cmd.name} (a typo?)", cmd)
        recipient = self.mailbox("email_address", "recipient")
        if recipient is None:
            raise JobError("no recipient ($email_address is missing)", outcome.BAD_JOB.code, self.cf.path)
        alternative = self.mailbox("email_alt_address", "alternative") if "email_alt_address" in self.single else None
        # Moved back by hand after the alternative was tried: the main address again.
        using_alt = (alternative is not None and self.variables.get(USING_ALT, "") not in ("", "0")
                     and self.alt_line > max((line for line, value in self.status1 if value == "6"), default=0))
        if using_alt and alternative is not None:
            recipient = alternative
        sender_text = self.written("email_esender")
        sender = self.mailbox("email_esender", "envelope sender", sender_text) if sender_text is not None else None
        charset, body_encoding, header_encoding = self.charset()
        try:
            busy = int(self.variables.get("DOMAINBUSY_COUNT", "0") or "0")
        except ValueError:
            busy = 0
        return Job(
            name=self.name,
            address=recipient.address,
            domain=recipient.domain,
            to_header=recipient.header,
            subject=self.value("email_subject"),
            body=tuple(self.body),
            alt=tuple(self.alt),
            attachments=tuple(self.attachments),
            # CopiaFacts: without $email_from, the job's $email_esender as
            # written is the From: header (even where the CFG has $email_from).
            from_header=self.written("email_from") or sender_text or self.env.from_header,
            esender=sender.address if sender is not None else None,
            headers=tuple(self.headers),
            charset=charset,
            body_encoding=body_encoding,
            header_encoding=header_encoding,
            retry_delays=self.delays,
            retry_max=self.retry_max.get("email_retry_max"),
            fallback_delays=self.fallback_delays,
            fallback_max=self.retry_max.get("retry_max"),
            restart_line=max(max((line for line, value in self.status1[:-1] if value == "6"), default=0),
                             self.alt_line if using_alt else 0) if self.status1 or using_alt else 0,
            alt_address=alternative.address if alternative is not None and not using_alt else None,
            restarted=bool(self.status1) and self.status1[-1][1] == "6",
            variables=self.variables,
            attempts=tuple(self.attempts),
            domainbusy_count=busy,
            next_attempt=self.next_attempt(),
            identity=self.identity,
            options=frozenset(self.option_words),
            to_list=self.list_variable("EMAILTO_LIST"),
            cc_list=self.list_variable("EMAILCC_LIST"),
            # option_words is complete here (read by the pass, or the first look).
            env=None if "nomacro" in self.option_words else self.env,
            dkim_keyfile=self.dkim_keyfile,
        )

    def written(self, key: str) -> str | None:
        cmd = self.single.get(key)
        if cmd is None:
            return None
        return _check_header_value(self.expanded(written_address(cmd, self.cf), cmd), "$" + key, cmd, self.cf)

    def mailbox(self, key: str, what: str, text: str | None = None) -> Mailbox | None:
        text = self.written(key) if text is None else text
        if text is None:
            return None
        mailbox = read_mailbox(text)
        if mailbox is None:
            raise self.error(f"bad {what} address {text!r}", self.single[key], outcome.BAD_HEADER.code)
        return mailbox

    def list_variable(self, name: str) -> str | None:
        value = self.variables.get(name) or self.env.variables.get(name)
        if not value:
            return None
        if GRAVE in value and not self.first_look():
            try:
                value = expand(value, self.lookup())
            except UndefinedVariable as e:
                raise JobError(f"undefined variable `{e.name} in {name}", outcome.BAD_JOB.code, self.cf.path) from None
        if "\r" in value or "\n" in value:
            raise JobError(f"{name} contains CR or LF", outcome.BAD_HEADER.code, self.cf.path)
        return value

    def charset(self) -> tuple[str, str | None, str | None]:
        """``$email_charset CHARSET [ENCODING [HEADER_ENCODING]]``: the
        charset (``""`` is UTF-8) and the transfer encodings asked for."""
        cmd = self.single.get("email_charset")
        if cmd is None:
            return "utf-8", None, None
        args = self.args(cmd)
        charset = args[0] or "utf-8"
        try:
            "".encode(charset)
        except (LookupError, UnicodeError):  # UnicodeError: the "undefined" codec
            raise self.error(f"unknown charset {charset!r}", cmd, outcome.BAD_CHARSET.code) from None
        encodings = []
        for given in args[1:3]:
            encoding = _ENCODINGS.get(given.lower())
            if encoding is None:
                raise self.error(f"unknown encoding {given!r} (base64, quoted-printable or 8bit)", cmd,
                                 outcome.BAD_CHARSET.code)
            encodings.append(encoding)
        body_encoding = encodings[0] if encodings else None
        header_encoding = encodings[1] if len(encodings) > 1 else None
        if header_encoding == "8bit":
            raise self.error("headers cannot be sent 8bit (base64 or quoted-printable)", cmd, outcome.BAD_CHARSET.code)
        return charset, body_encoding, header_encoding

    def next_attempt(self) -> float | None:
        """When the job is due: its next retry time (``$fax_next_date/time``),
        and not before its ``$fax_send_date/time`` (a date alone means
        midnight; a time alone, today)."""
        due = None
        next_date, next_time = self.dates.get("fax_next_date"), self.dates.get("fax_next_time")
        if next_date is not None and next_date.args:
            clock = next_time.args[0] if next_time is not None and next_time.args else "00:00:00"
            due = self.local_time(next_date, next_date.args[0], clock, "$fax_next_date/$fax_next_time")
        send_date, send_time = self.dates.get("fax_send_date"), self.dates.get("fax_send_time")
        if (send_date is None or not send_date.args) and (self.attempts or self.variables.get("DOMAINBUSY_COUNT")):
            # A time alone means the day the job was submitted: once it has
            # been tried or deferred, that time has come (it must not mean
            # the next day's once midnight has passed).
            send_time = None
        if (send_date is not None and send_date.args) or (send_time is not None and send_time.args):
            date = send_date.args[0] if send_date is not None and send_date.args else time.strftime("%m/%d/%Y")
            clock = send_time.args[0] if send_time is not None and send_time.args else "00:00:00"
            if clock.count(":") == 1:
                clock += ":00"
            send_at = self.local_time(send_date or send_time, date, clock, "$fax_send_date/$fax_send_time")
            due = send_at if due is None else max(due, send_at)
        return due

    def local_time(self, cmd: Command | None, date: str, clock: str, what: str) -> float:
        try:
            return parse_local_time(date, clock)
        except (ValueError, OverflowError):
            raise self.error(f"bad {what} {date} {clock}", cmd) from None

    # --- one command each -----------------------------------------------------

    def text(self, cmd: Command) -> None:
        (self.alt if cmd.name == "email_alttext" else self.body).append(BodyItem("text", " ".join(self.args(cmd)), cmd.line))

    def body_file(self, cmd: Command) -> None:
        self.need_arg(cmd)
        item = BodyItem("file", self.path(cmd, cmd.args[0]), cmd.line)
        (self.alt if cmd.name == "email_altbody" else self.body).append(item)

    def attach(self, cmd: Command) -> None:
        self.need_arg(cmd)
        path = self.path(cmd, cmd.args[0])
        ctype, shown, embedded = None, None, False
        if len(cmd.args) > 1:
            given = self.expanded(cmd.args[1], cmd)
            ctype, shown, embedded = _attachment_type(given)
            if ctype is not None and (not re.fullmatch(r"[A-Za-z0-9.+-]+/[A-Za-z0-9.+-]+", ctype)
                                      or ctype.lower().startswith(("message/", "multipart/"))):
                # message/* and multipart/* are structures, not file types: an
                # attachment is sent as bytes (base64), which they cannot be.
                raise self.error(f"bad content type {given!r} for an attachment", cmd)
            if shown is not None:
                _check_header_value(shown, "attachment name", cmd, self.cf)
        self.attachments.append(Attachment(path, ctype, cmd.line, shown, embedded))

    def header(self, cmd: Command) -> None:
        args = self.args(cmd)
        text = _check_header_value(" ".join(args), "header", cmd, self.cf)
        first = args[0] if args else ""
        if ":" not in first and len(args) == 1 and " " in first.strip():
            args = tuple(first.split(None, 1))  # "X-Priority 1": name and value in one quoted argument
            first = args[0]
        if ":" in first:
            hname, _, hvalue = text.partition(":")
        else:
            # CopiaFacts: "if you do not include a colon at the end, one will be added".
            hname, hvalue = first, " ".join(args[1:])
        hname, hvalue = hname.strip(), hvalue.strip()
        if not hname or not _HEADER_NAME.match(hname) or (":" not in first and len(args) < 2):
            raise self.error(f"bad header {text!r} (NAME VALUE)", cmd, outcome.BAD_HEADER.code)
        try:
            check_header(hname, hvalue)
        except JobError as e:
            raise self.error(e.message, cmd, e.outcome) from None
        self.headers.append((hname, hvalue))

    def retry_delays(self, cmd: Command) -> None:
        try:
            klass, delays = outcome.parse_retry_command(cmd.args)
        except ValueError as e:
            raise self.error(f"${cmd.name} {e}" if not cmd.args else str(e), cmd) from None
        (self.delays if cmd.name == "email_retry_delays" else self.fallback_delays)[klass] = delays

    def max_retries(self, cmd: Command) -> None:
        if len(cmd.args) != 1 or not (cmd.args[0].isascii() and cmd.args[0].isdigit()):
            raise self.error(f"${cmd.name} needs a number of retries", cmd)
        self.retry_max[cmd.name] = int(cmd.args[0])

    def status(self, cmd: Command) -> None:
        if cmd.args:
            self.status1.append((cmd.line, cmd.args[0]))

    def attempt(self, cmd: Command) -> None:
        record = parse_attempt(cmd)
        if record is not None:
            self.attempts.append(record)

    def dkim_key(self, cmd: Command) -> None:
        self.need_arg(cmd)
        self.dkim_keyfile = (self.path(cmd, cmd.args[0]), cmd.line)

    def date(self, cmd: Command) -> None:
        self.dates[cmd.name] = cmd

    def var_def(self, cmd: Command) -> None:
        self.need_arg(cmd)
        self.variables[cmd.args[0].upper()] = " ".join(cmd.args[1:])
        if cmd.args[0].upper() == USING_ALT:
            self.alt_line = cmd.line

    def email_options(self, cmd: Command) -> None:
        self.option_words.extend(w.lower() for a in cmd.args for w in re.split(r"[\s,]+", a) if w)


_HANDLERS: Mapping[str, Callable[[_JobReader, Command], None]] = MappingProxyType({
    "email_text": _JobReader.text,
    "email_alttext": _JobReader.text,
    "email_body": _JobReader.body_file,
    "email_altbody": _JobReader.body_file,
    "email_attach": _JobReader.attach,
    "email_header": _JobReader.header,
    "email_retry_delays": _JobReader.retry_delays,
    "retry_delays": _JobReader.retry_delays,
    "email_retry_max": _JobReader.max_retries,
    "retry_max": _JobReader.max_retries,
    "fax_status1": _JobReader.status,
    "email_dkim_keyfile": _JobReader.dkim_key,
    "attempt_record": _JobReader.attempt,
    "fax_next_date": _JobReader.date,
    "fax_next_time": _JobReader.date,
    "fax_send_date": _JobReader.date,
    "fax_send_time": _JobReader.date,
    "var_def": _JobReader.var_def,
    "email_options": _JobReader.email_options,
})

_ENCODINGS = MappingProxyType({"base64": "base64", "b": "base64", "quoted-printable": "quoted-printable",
                               "q": "quoted-printable", "qp": "quoted-printable", "8bit": "8bit"})


def _attachment_type(text: str) -> tuple[str | None, str | None, bool]:
    """``TYPE``, ``TYPE; name=SHOWN`` or ``EMBEDDED:TYPE`` to (type, shown
    name, embedded)."""
    embedded = text[:9].upper() == "EMBEDDED:"
    if embedded:
        text = text[9:]
    ctype, _, params = text.partition(";")
    shown = None
    m = re.search(r'(?:^|;)\s*name\s*=\s*("?)([^";]+)\1', params, re.IGNORECASE)
    if m is not None:
        shown = m.group(2).strip()
    return (ctype.strip() or None), shown, embedded


def engine_variables(name: str, esender: str, identity: str) -> Mapping[str, str]:
    """The variables the engine defines for a job: FSNUM (its name without
    ``.FS``), EMAIL_ESENDER (its envelope sender) and EM_MSGID (its
    Message-ID without the angle brackets: embedded parts are ``cid:imageN.`EM_MSGID``)."""
    stem = name[:-3] if name.upper().endswith(".FS") else name
    # The engine's own lines, before the engine has written them (the job's
    # $var_def comes first in any lookup).
    return {"FSNUM": stem, "EMAIL_ESENDER": esender, "EM_MSGID": f"{identity}@{message_id_domain(esender)}",
            "DOMAINBUSY_COUNT": "0", "EMAIL_ERROR": "", "EMAIL_CONNECT_IP": "", "EMAIL_BYTECOUNT": "0"}


_DOT_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*\Z")


def message_id_domain(sender: str) -> str:
    """The domain of a job's Message-ID: its envelope sender's, else localhost."""
    address = parseaddr(sender)[1] if "<" in sender else sender.strip()
    domain = address.rpartition("@")[2]
    if _DOT_ATOM.match(domain):
        return domain.lower()
    try:
        domain = domain.encode("idna").decode("ascii")
    except UnicodeError:
        return "localhost"
    return domain.lower() if _DOT_ATOM.match(domain) else "localhost"


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
    if a[2].upper() == "E":
        field, node, text = 4, a[3], " ".join(a[6:])
    elif len(a) >= 7:
        field, node, text = 5, (a[15] if len(a) > 15 else ""), (a[14] if len(a) > 14 else "")
    else:
        return None
    try:
        code = int(a[field])
    except ValueError:
        return None
    return AttemptRecord(a[0], a[1], node, code, a[field + 1].upper(), text, cmd.line)
