"""The lines the engine writes into a job (SPEC 2, "What the engine writes").

Each function takes the job's :class:`CommandFile` and returns the edited copy;
every line the engine does not own is kept as it was.
"""

from __future__ import annotations

import math
import time

from .fsfile import CommandFile

STATUS_WAITING = 2
STATUS_DONE = 6


def local_stamp(when: float) -> tuple[str, str]:
    """``(MM/DD/YYYY, HH:MM:SS)`` in the node's local time."""
    t = time.localtime(when)
    return time.strftime("%m/%d/%Y", t), time.strftime("%H:%M:%S", t)


def _record(node: str, code: int, klass: str, text: str, now: float) -> tuple[str, tuple[str, ...]]:
    date, clock = local_stamp(now)
    return ("attempt_record", (date, clock, "E", node, str(code), klass, text))


def _attempt(cf: CommandFile, node: str, code: int, klass: str, text: str, now: float) -> CommandFile:
    return cf.edited(append=(_record(node, code, klass, text, now),))


def deferred(cf: CommandFile, busy_count: int) -> CommandFile:
    """A deferral by a connection limit: DOMAINBUSY_COUNT incremented, nothing else."""
    return cf.edited(variables=(("DOMAINBUSY_COUNT", busy_count + 1),))


def delivered(cf: CommandFile, node: str, reply: str, ip: str, bytecount: int, now: float) -> CommandFile:
    return cf.edited(
        append=(_record(node, 0, "S", reply, now),),
        variables=(("EMAIL_CONNECT_IP", ip), ("EMAIL_BYTECOUNT", bytecount)),
        commands=(("fax_status1", (STATUS_DONE,)), ("fax_status2", (0,))),
    )


def failed(cf: CommandFile, node: str, code: int, klass: str, text: str, now: float) -> CommandFile:
    """A final failure (5xx, a bad job, retries used up): the job goes to FAIL."""
    return cf.edited(
        append=(_record(node, code, klass, text, now),),
        variables=(("EMAIL_ERROR", text),),
        commands=(("fax_status1", (STATUS_DONE,)), ("fax_status2", (code,))),
    )


def retry(cf: CommandFile, node: str, code: int, klass: str, text: str, now: float, not_before: float) -> CommandFile:
    """A temporary failure: back to its folder until ``not_before`` (rounded up to the second)."""
    date, clock = local_stamp(math.ceil(not_before))
    return cf.edited(
        append=(_record(node, code, klass, text, now),),
        variables=(("EMAIL_ERROR", text),),
        commands=(("fax_status1", (STATUS_WAITING,)), ("fax_status2", (code,)),
                  ("fax_next_date", (date,)), ("fax_next_time", (clock,))),
    )


def interrupted(cf: CommandFile, node: str, code: int, klass: str, text: str, now: float) -> CommandFile:
    """An attempt cut off by a crash or stop: an attempt record only (not a retry)."""
    return _attempt(cf, node, code, klass, text, now)
