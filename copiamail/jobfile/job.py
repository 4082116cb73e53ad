"""An FS file's meaning: the frozen :class:`~copiamail.jobfile.model.Job` the
engine sends (importable from here too), as :func:`parse_job` reads it.

:func:`parse_job` reads the ``$email...`` commands of an e-mail job, its
``$var_def`` variables and send time, and the lines the engine writes into it
(attempt records, status, next try). Any other command is kept in the file and
ignored here: FS files written for CopiaFacts carry fax commands too; an
unknown ``$email...`` command is a typo and fails the job. A job that cannot be sent as written raises
:class:`~copiamail.errors.JobError` with the outcome code it fails with.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable, Mapping
from types import MappingProxyType

from copiamail.errors import JobError, SyntaxFileError
from copiamail.jobfile import outcome
from copiamail.jobfile.addresses import Mailbox, address_lines, parse_address, read_mailbox, written_address
from copiamail.jobfile.fsfile import Command, CommandFile
from copiamail.jobfile.headers import HEADER_NAME, check_header
from copiamail.jobfile.model import Attachment, BodyItem, Job, JobEnv
from copiamail.jobfile.outcome import RetryItem
from copiamail.jobfile.owned import USING_ALT, AttemptRecord, engine_variables, job_identity, parse_attempt, parse_local_time
from copiamail.jobfile.variables import GRAVE, UndefinedVariable, chained, expand, expand_path, starts_with_path_variable

# BodyItem(...) without the named tuple's Python-level __new__: most lines of
# most jobs are text lines, and a job is parsed at every claim.
_text_item = functools.partial(tuple.__new__, BodyItem)

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


def _check_header_value(value: str, what: str, cmd: Command, cf: CommandFile) -> str:
    if "\r" in value or "\n" in value:
        raise JobError(f"{what} contains CR or LF", outcome.BAD_HEADER.code, cf.path, cmd.line)
    return value


def quick_domain(cf: CommandFile) -> str | None:
    """The recipient's domain read without parsing the whole job, when the file
    has one plain ``$email_address`` line (no quotes, no comment) and does not
    mention ``EMAIL_USING_ALT``; else None.
    Where it gives a domain and :func:`parse_job` succeeds, the two agree
    (tested): it lets a worker skip other workers' jobs cheaply."""
    lines = address_lines(cf.text)
    # A job that has moved to its $email_alt_address goes to that domain
    # (upper(): as parse_job compares the name; a regex search costs 15 times more).
    if len(lines) != 1 or USING_ALT in cf.text.upper():
        return None
    arg = lines[0].rstrip("\r").strip(" \t")
    if not arg or any(c in arg for c in ' \t";\x00'):
        return None
    parsed = parse_address(arg)
    return parsed[1] if parsed is not None else None


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
                args = cmd.args
                body.append(_text_item(("text", args[0] if len(args) == 1 else " ".join(args), cmd.line)))
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
        if not hname or not HEADER_NAME.match(hname) or (":" not in first and len(args) < 2):
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
