"""A parsed e-mail job as frozen data: the :class:`Job` the engine sends, its
body items and attachments, and the :class:`JobEnv` a job draws on besides its
own lines. :func:`copiamail.jobfile.job.parse_job` makes them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import NamedTuple

from copiamail.jobfile import outcome
from copiamail.jobfile.outcome import RetryItem, RetryRules
from copiamail.jobfile.owned import AttemptRecord


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
