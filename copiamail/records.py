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


def _attempt(cf: CommandFile, node: str, code: int, klass: str, text: str, now: float) -> CommandFile:
    date, clock = local_stamp(now)
    return cf.append_command("attempt_record", date, clock, "E", node, str(code), klass, text)


def deferred(cf: CommandFile, busy_count: int) -> CommandFile:
    """A deferral by a connection limit: DOMAINBUSY_COUNT incremented, nothing else."""
    return cf.set_var("DOMAINBUSY_COUNT", busy_count + 1)


def delivered(cf: CommandFile, node: str, reply: str, ip: str, bytecount: int, now: float) -> CommandFile:
    cf = _attempt(cf, node, 0, "S", reply, now)
    cf = cf.set_var("EMAIL_CONNECT_IP", ip).set_var("EMAIL_BYTECOUNT", bytecount)
    return cf.set_command("fax_status1", STATUS_DONE).set_command("fax_status2", 0)


def failed(cf: CommandFile, node: str, code: int, klass: str, text: str, now: float) -> CommandFile:
    """A final failure (5xx, a bad job, retries used up): the job goes to FAIL."""
    cf = _attempt(cf, node, code, klass, text, now).set_var("EMAIL_ERROR", text)
    return cf.set_command("fax_status1", STATUS_DONE).set_command("fax_status2", code)


def retry(cf: CommandFile, node: str, code: int, klass: str, text: str, now: float, not_before: float) -> CommandFile:
    """A temporary failure: back to its folder until ``not_before`` (rounded up to the second)."""
    cf = _attempt(cf, node, code, klass, text, now).set_var("EMAIL_ERROR", text)
    date, clock = local_stamp(math.ceil(not_before))
    cf = cf.set_command("fax_status1", STATUS_WAITING).set_command("fax_status2", code)
    return cf.set_command("fax_next_date", date).set_command("fax_next_time", clock)


def interrupted(cf: CommandFile, node: str, code: int, klass: str, text: str, now: float) -> CommandFile:
    """An attempt cut off by a crash or stop: an attempt record only (not a retry)."""
    return _attempt(cf, node, code, klass, text, now)
