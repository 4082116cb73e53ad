"""Outcome codes, CopiaFacts classes, and the retry rule (SPEC 4).

An attempt ends with an outcome (an SMTP reply code, or one of the engine's own
codes below) and a class letter. Whether and when a job is tried again is
decided here from the job's earlier attempt records, the retry delays
(FS over CFG over the built-in default) and ``$email_retry_max``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

# CopiaFacts classes.
TIMEOUT = "A"
MAILBOX = "B"
CONNECTION = "C"
DOMAIN = "D"
SMTP_OTHER = "E"
HOST_REJECTED = "H"
SUCCESS = "S"
FAILURE = "Z"
CLASSES = "ABCDEHSZ"


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
CONNECT_FAILED = OutcomeCode(70, CONNECTION, "connection refused or unreachable")
CONNECTION_LOST = OutcomeCode(71, CONNECTION, "connection dropped by the server")
TIMED_OUT = OutcomeCode(72, TIMEOUT, "no reply within the timeout")
TLS_FAILED = OutcomeCode(73, CONNECTION, "STARTTLS failed or was required but not offered")
DNS_FAILED = OutcomeCode(80, DOMAIN, "the recipient domain does not exist (NXDOMAIN)")
DNS_TEMPORARY = OutcomeCode(81, DOMAIN, "DNS lookup failed or timed out, or no mail host has an address")
NULL_MX = OutcomeCode(82, DOMAIN, "the domain accepts no mail (null MX, RFC 7505): final")
INTERNAL = OutcomeCode(75, SMTP_OTHER, "internal error of the engine (a bug: please report it); retried")

ENGINE_CODES: tuple[OutcomeCode, ...] = (
    BAD_JOB, MISSING_FILE, OUTSIDE_ROOTS, BAD_HEADER, BAD_CHARSET, DKIM_FAILED, INTERRUPTED,
    INTERRUPTED_TOO_OFTEN, CONNECT_FAILED, CONNECTION_LOST, TIMED_OUT, TLS_FAILED, INTERNAL,
    DNS_FAILED, DNS_TEMPORARY, NULL_MX,
)

INTERRUPTIONS_TO_FAIL = 3

DEFAULT_RETRY_DELAYS: Mapping[str, tuple[int, ...]] = {"*": (300, 1200, 3600, 14400, 43200)}

_UNITS = {"S": 1, "M": 60, "H": 3600}
MAX_RETRY_DELAY = 366 * 24 * 3600


def parse_delays(text: str) -> tuple[int, ...]:
    """``"30S 5 2H"`` to seconds ``(30, 300, 7200)``; raises ValueError naming the bad item."""
    out: list[int] = []
    for item in text.replace(",", " ").split():
        unit = 60
        number = item
        if item[-1:].upper() in _UNITS:
            unit = _UNITS[item[-1].upper()]
            number = item[:-1]
        if not (number.isascii() and number.isdigit()):
            raise ValueError(f"bad retry delay {item!r} (minutes, or a number with S, M or H)")
        if int(number) * unit > MAX_RETRY_DELAY:
            raise ValueError(f"retry delay {item!r} is longer than a year")
        out.append(int(number) * unit)
    return tuple(out)


def parse_retry_class(text: str) -> str:
    """A class letter or ``*``; raises ValueError otherwise."""
    klass = text.upper()
    if klass != "*" and (len(klass) != 1 or klass not in CLASSES):
        raise ValueError(f"bad retry class {text!r} (one of {CLASSES} or *)")
    return klass


def delays_for(klass: str, *levels: Mapping[str, tuple[int, ...]]) -> tuple[int, ...]:
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
    delays: tuple[int, ...],
    retry_max: int | None,
) -> int | None:
    """Seconds to wait before the next try after a temporary failure of ``klass``,
    or None when the job's retries have run out.

    ``earlier_classes`` are the classes of the job's earlier counted attempts
    (interruptions excluded); this attempt is not among them.
    """
    earlier = list(earlier_classes)
    nth = sum(1 for c in earlier if c == klass) + 1
    if nth > len(delays):
        return None
    if retry_max is not None and len(earlier) + 1 >= retry_max:
        return None
    return delays[nth - 1]
