"""Outcome codes, CopiaFacts classes, and the retry rule.

An attempt ends with an outcome (an SMTP reply code, or one of the engine's own
codes below) and a class letter. Whether and when a job is tried again is
decided here from the job's earlier attempt records, the retry delays
(FS over CFG over the built-in default) and ``$email_retry_max``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple, TypeAlias

# CopiaFacts classes.
TIMEOUT = "A"
MAILBOX = "B"
CONNECTION = "C"
DOMAIN = "D"
SMTP_OTHER = "E"
HOST_REJECTED = "H"
SUCCESS = "S"
FAILURE = "Z"
IGNORED = "I"  # CopiaFacts: an ignored failure, not counted as a retry
# CopiaFacts' letters: A-H and J-O are retried classes, I an ignored failure,
# S success, Z final failure. The engine itself gives A-E, H, S and Z.
CLASSES = "ABCDEFGHIJKLMNOSZ"


@dataclass(frozen=True)
class OutcomeCode:
    """One of the engine's own outcome codes (SMTP replies use their own code)."""

    code: int
    klass: str
    meaning: str


BAD_JOB = OutcomeCode(60, FAILURE, "bad job file: syntax, binary data, missing or bad command")
MISSING_FILE = OutcomeCode(61, FAILURE, "a body or attachment file is missing or unreadable")
OUTSIDE_ROOTS = OutcomeCode(62, FAILURE, "a body or attachment path lies outside attachment_roots")
BAD_HEADER = OutcomeCode(63, FAILURE, "a header or address holds CR/LF or is malformed")
BAD_CHARSET = OutcomeCode(64, FAILURE, "the body cannot be written in $email_charset")
DKIM_FAILED = OutcomeCode(65, FAILURE, "DKIM signing failed: the key is missing, unreadable or refused, or no selector")
INTERRUPTED = OutcomeCode(66, FAILURE, "attempt interrupted (node stopped or crashed while sending)")
INTERRUPTED_TOO_OFTEN = OutcomeCode(67, FAILURE, "interrupted three times: moved to FAIL")
CANCELLED = OutcomeCode(68, FAILURE, "cancelled by the operator (copiamail cancel)")
CONNECT_FAILED = OutcomeCode(70, CONNECTION, "connection refused or unreachable")
CONNECTION_LOST = OutcomeCode(71, CONNECTION, "connection dropped by the server")
TIMED_OUT = OutcomeCode(72, TIMEOUT, "no reply within the timeout")
TLS_FAILED = OutcomeCode(73, CONNECTION, "STARTTLS failed or was required but not offered")
DNS_FAILED = OutcomeCode(80, DOMAIN, "the recipient domain does not exist (NXDOMAIN): final")
DNS_TEMPORARY = OutcomeCode(81, DOMAIN, "DNS failed or timed out, an MX host's name does not exist, or no MX host has an address")
TLS_REQUIRED = OutcomeCode(160, FAILURE, "$email_options reqTLS and the server offers no TLS: not sent (final)")
NULL_MX = OutcomeCode(82, DOMAIN, "the domain accepts no mail (null MX, RFC 7505): final")
INTERNAL = OutcomeCode(75, SMTP_OTHER, "internal error of the engine (a bug: please report it); retried")

ENGINE_CODES: tuple[OutcomeCode, ...] = (
    BAD_JOB, MISSING_FILE, OUTSIDE_ROOTS, BAD_HEADER, BAD_CHARSET, DKIM_FAILED, INTERRUPTED,
    INTERRUPTED_TOO_OFTEN, CANCELLED, CONNECT_FAILED, CONNECTION_LOST, TIMED_OUT, TLS_FAILED, INTERNAL,
    DNS_FAILED, DNS_TEMPORARY, NULL_MX, TLS_REQUIRED,
)

INTERRUPTIONS_TO_FAIL = 3

DEFAULT_RETRY_DELAYS: Mapping[str, tuple[int, ...]] = {"*": (300, 1200, 3600, 14400, 43200)}

_UNITS = {"S": 1, "M": 60, "H": 3600}
MAX_RETRY_DELAY = 366 * 24 * 3600
_ITEM = re.compile(r"(I?)(?:(\d+)([SMH]?)|(\d{1,2}):(\d{2})([WN]?))\Z", re.IGNORECASE)


class RetryAt(NamedTuple):
    """A retry LIST item other than a plain delay: a delay (``seconds``) or
    a time of day (``hour``:``minute``; ``day`` W: the next working day,
    Monday to Friday, N: the next non-working day), and ``relay``: with the
    ``I`` prefix the retry goes through ``retry_relay:``."""

    seconds: int | None
    hour: int = 0
    minute: int = 0
    day: str = ""
    relay: bool = False


# A plain delay in seconds (most lists), or a RetryAt.
RetryItem: TypeAlias = int | RetryAt


def parse_delays(text: str) -> tuple[RetryItem, ...]:
    """A retry LIST: ``"30S 5 2H"`` to seconds ``(30, 300, 7200)``; items
    ``hh:mm`` (with ``W`` or ``N``) and an ``I`` prefix give RetryAt.
    Raises ValueError naming the bad item."""
    out: list[RetryItem] = []
    for item in text.replace(",", " ").split():
        m = _ITEM.match(item) if item.isascii() else None
        if m is None:
            raise ValueError(f"bad retry delay {item!r} (minutes, a number with S, M or H, or hh:mm with W or N; "
                             "I first to retry through retry_relay)")
        relay = bool(m.group(1))
        if m.group(2) is not None:
            seconds = int(m.group(2)) * _UNITS[(m.group(3) or "M").upper()]
            if seconds > MAX_RETRY_DELAY:
                raise ValueError(f"retry delay {item!r} is longer than a year")
            out.append(RetryAt(seconds, relay=True) if relay else seconds)
            continue
        hour, minute = int(m.group(4)), int(m.group(5))
        if hour > 23 or minute > 59:
            raise ValueError(f"bad retry time {item!r} (hh:mm, 00:00 to 23:59)")
        out.append(RetryAt(None, hour, minute, m.group(6).upper(), relay))
    return tuple(out)


def parse_retry_class(text: str) -> str:
    """A class letter or ``*``; raises ValueError otherwise."""
    klass = text.upper()
    if klass != "*" and (len(klass) != 1 or klass not in CLASSES):
        raise ValueError(f"bad retry class {text!r} (one of {CLASSES} or *)")
    return klass


def parse_retry_command(args: tuple[str, ...]) -> tuple[str, tuple[RetryItem, ...]]:
    """``$email_retry_delays`` / ``$retry_delays`` arguments: ``CLASS LIST``,
    or the CFG form ``LINE CLASS LIST`` (LINE names fax lines or line groups:
    accepted and ignored). Raises ValueError."""
    if not args:
        raise ValueError('needs CLASS "LIST"')
    if len(args) == 3 and len(args[1]) == 1 and args[1].upper() in CLASSES + "*":
        return parse_retry_class(args[1]), parse_delays(args[2])
    return parse_retry_class(args[0]), parse_delays(" ".join(args[1:]))


def wait_for(item: RetryItem, now: float) -> float:
    """Seconds from ``now`` until the retry an item names (a time of day in
    the node's local time: its next occurrence, on a working day for W,
    on a Saturday or Sunday for N)."""
    if isinstance(item, int):
        return item
    if item.seconds is not None:
        return item.seconds
    t = time.localtime(now)
    for days in range(0, 8):
        candidate = time.mktime((t.tm_year, t.tm_mon, t.tm_mday + days, item.hour, item.minute, 0, 0, 0, -1))
        if candidate <= now:
            continue
        weekday = time.localtime(candidate).tm_wday
        if (item.day == "W" and weekday >= 5) or (item.day == "N" and weekday < 5):
            continue
        return candidate - now
    raise AssertionError("a week always holds such a day")  # pragma: no cover


def through_relay(item: RetryItem) -> bool:
    return isinstance(item, RetryAt) and item.relay


@dataclass(frozen=True)
class RetryRules:
    """One level's retry rules (an FS file's, or the CFG's): the
    ``$email_retry_delays`` lists and ``$email_retry_max``, and the
    ``$retry_delays``/``$retry_max`` ones used when no level has an e-mail list."""

    delays: Mapping[str, tuple[RetryItem, ...]] = field(default_factory=dict)
    retry_max: int | None = None
    fallback_delays: Mapping[str, tuple[RetryItem, ...]] = field(default_factory=dict)
    fallback_max: int | None = None


class RetryPlan(NamedTuple):
    wait: float  # seconds
    relay: bool  # through retry_relay


def plan_retry(klass: str, earlier_classes: Iterable[str], job: RetryRules, cfg: RetryRules,
               now: float | None = None) -> RetryPlan | None:
    """The next retry after a temporary failure of ``klass`` (FS over CFG over
    the built-in default), or None when the job's retries have run out.
    CopiaFacts: if no ``$email_retry_delays`` exists at any level,
    ``$retry_delays`` and ``$retry_max`` are used instead."""
    maxima = [job.retry_max, cfg.retry_max, job.fallback_max, cfg.fallback_max]
    if job.delays or cfg.delays:
        delays = delays_for(klass, job.delays, cfg.delays)
    else:
        # "The system will also use $retry_max, even if you have
        # $email_retry_max defined": $retry_max first, here.
        delays = delays_for(klass, job.fallback_delays, cfg.fallback_delays)
        maxima = maxima[2:] + maxima[:2]
    retry_max = next((m for m in maxima if m is not None), None)
    earlier = list(earlier_classes)
    nth = sum(1 for c in earlier if c == klass) + 1
    if nth > len(delays) or (retry_max is not None and len(earlier) + 1 > retry_max):
        return None
    item = delays[nth - 1]
    return RetryPlan(wait_for(item, time.time() if now is None else now), through_relay(item))


def delays_for(klass: str, *levels: Mapping[str, tuple[RetryItem, ...]]) -> tuple[RetryItem, ...]:
    """The delay list for ``klass``: each level (FS, then CFG) is asked for the
    class's own list, then its ``*`` list; the built-in default comes last."""
    for level in (*levels, DEFAULT_RETRY_DELAYS):
        if klass in level:
            return level[klass]
        if "*" in level:
            return level["*"]
    return DEFAULT_RETRY_DELAYS["*"]


def retry_delay(
    klass: str,
    earlier_classes: Iterable[str],
    delays: tuple[RetryItem, ...],
    retry_max: int | None,
    now: float | None = None,
) -> float | None:
    """Seconds to wait before the next try after a temporary failure of ``klass``,
    or None when the job's retries have run out (:func:`plan_retry` with one list).

    ``earlier_classes`` are the classes of the job's earlier counted attempts
    (interruptions excluded); this attempt is not among them. ``retry_max``
    counts retries, as CopiaFacts does: N allows N+1 attempts.
    """
    plan = plan_retry(klass, earlier_classes, RetryRules({klass: delays}, retry_max), RetryRules(), now)
    return None if plan is None else plan.wait
