"""The lines the engine writes into a job: an attempt record per attempt, the
``$fax_status1``/``$fax_status2`` status, the next try, and its own variables
(:data:`~copiamail.jobfile.owned.OWNED_VARS`).

Each function takes the job's :class:`CommandFile` and returns the edited copy;
every line the engine does not own is kept as it was.
"""

from __future__ import annotations

import math
import time
from typing import NamedTuple

from copiamail.jobfile import outcome
from copiamail.jobfile.fsfile import CommandFile, WrittenLine, format_arg
from copiamail.jobfile.localtime import once_a_second

STATUS_WAITING = 2
STATUS_DONE = 6


@once_a_second
def local_stamp(t: time.struct_time) -> tuple[str, str]:
    """``(MM/DD/YYYY, HH:MM:SS)`` of a moment in the node's local time (called
    with the moment; ``t`` is its local time, see :func:`once_a_second`)."""
    return time.strftime("%m/%d/%Y", t), time.strftime("%H:%M:%S", t)


class Where(NamedTuple):
    """The circumstances of an attempt that its record tells: the queue it
    came from (TOSEND number), the worker (BOARDLINE ``E<n>``), when the
    connection was started and made (CALL and CONNECT; None: not known, or
    never made), and whether the job had been moved back by hand from SENT or
    FAIL (its ``$fax_status1 6`` line then stays, as the mark after which its
    attempts count, and a new status line is added after it)."""

    queue: int = 0
    worker: int = 1
    call: float | None = None
    connect: float | None = None
    restarted: bool = False


def _clock(when: float | None, now: float, now_clock: str) -> str:
    if when is None:
        return "-"
    if int(when) == int(now):
        return now_clock  # the usual case: one strftime for all three
    return time.strftime("%H:%M:%S", time.localtime(when))


def _record(node: str, code: int, klass: str, text: str, now: float, where: Where) -> WrittenLine:
    """``$attempt_record`` in CopiaFacts' field order: DATE TIME TYPE SKIPPED
    SCHED OUTCOME CLASS SENT TOSEND FLAGS BOARDLINE BAUD CALL CONNECT
    ANSWERBACK, then the node's name (copiamail's own field)."""
    date, clock = local_stamp(now)
    # Written at once: its fixed fields are plain words (cheaper than
    # formatting sixteen arguments one by one).
    return WrittenLine(f"$attempt_record {date} {clock} 0 0 0 {code} {klass} 0 {where.queue} 0 E{where.worker} 0 "
                       f"{_clock(where.call, now, clock)} {_clock(where.connect, now, clock)} "
                       f"{format_arg(text)} {format_arg(node)}")


def _attempt(cf: CommandFile, node: str, code: int, klass: str, text: str, now: float, where: Where) -> CommandFile:
    return cf.edited(append=(_record(node, code, klass, text, now, where),))


def _finished(cf: CommandFile, record: WrittenLine, variables: tuple[tuple[str, str | int], ...],
              commands: tuple[tuple[str, tuple[str | int, ...]], ...], where: Where) -> CommandFile:
    """``cf`` with an attempt record appended and its engine lines set.

    ``$fax_status1 6`` (the job is done) always goes after the records of the
    run it ends: its line is where a later run of the job, moved back from
    SENT or FAIL by hand, starts counting its attempts. So a final status
    line is moved to the end, not set in place; and for a job moved back by
    hand (:class:`Where`) the old ``6`` stays and its new status lines are
    added after it."""
    if where.restarted:
        return cf.edited(append=(record, *commands), variables=variables)
    final = any(name == "fax_status1" and args == (STATUS_DONE,) for name, args in commands)
    return cf.edited(append=(record,), variables=variables, commands=commands,
                     moved=("fax_status1",) if final else ())


def deferred(cf: CommandFile, busy_count: int, reply: tuple[str, int] | None = None) -> CommandFile:
    """A deferral by a connection limit: DOMAINBUSY_COUNT incremented, nothing
    else; or, when a receiver's reply that it has too many connections from
    us sent the job back (``reply``: its text, and the connections open
    then), that reply in EMAIL_ERROR and EMAIL_CONNECTIONS too."""
    extra = _error(*reply) if reply is not None else ()
    return cf.edited(variables=(("DOMAINBUSY_COUNT", busy_count + 1), *extra))


def delivered(cf: CommandFile, node: str, reply: str, ip: str, bytecount: int, now: float,
              where: Where = Where()) -> CommandFile:
    return _finished(cf, _record(node, 0, outcome.SUCCESS, reply, now, where),
                     (("EMAIL_CONNECT_IP", ip), ("EMAIL_BYTECOUNT", bytecount)),
                     (("fax_status1", (STATUS_DONE,)), ("fax_status2", (0,))), where)


def _error(text: str, connections: int | None) -> tuple[tuple[str, str | int], ...]:
    """EMAIL_ERROR, and with a throttle reply EMAIL_CONNECTIONS: how many
    connections to the job's limit were open when the reply came, its own
    included."""
    if connections is None:
        return (("EMAIL_ERROR", text),)
    return (("EMAIL_ERROR", text), ("EMAIL_CONNECTIONS", connections))


def failed(cf: CommandFile, node: str, code: int, klass: str, text: str, now: float,
           where: Where = Where(), connections: int | None = None) -> CommandFile:
    """A final failure (5xx, a bad job, retries used up): the job goes to FAIL."""
    return _finished(cf, _record(node, code, klass, text, now, where), _error(text, connections),
                     (("fax_status1", (STATUS_DONE,)), ("fax_status2", (code,))), where)


def retry(cf: CommandFile, node: str, code: int, klass: str, text: str, now: float, not_before: float,
          where: Where = Where(), connections: int | None = None) -> CommandFile:
    """A temporary failure: back to its folder until ``not_before`` (rounded up to the second)."""
    date, clock = local_stamp(math.ceil(not_before))
    return _finished(cf, _record(node, code, klass, text, now, where), _error(text, connections),
                     (("fax_status1", (STATUS_WAITING,)), ("fax_status2", (code,)),
                      ("fax_next_date", (date,)), ("fax_next_time", (clock,))), where)


def to_alternative(cf: CommandFile, node: str, code: int, klass: str, text: str, now: float,
                   where: Where = Where(), connections: int | None = None) -> CommandFile:
    """The main address failed for good and the job has an
    ``$email_alt_address``: back to its folder, due now, to be sent there
    (EMAIL_USING_ALT marks where the alternative's own retries begin)."""
    date, clock = local_stamp(math.ceil(now))
    return _finished(cf, _record(node, code, klass, text, now, where), (*_error(text, connections), ("EMAIL_USING_ALT", 1)),
                     (("fax_status1", (STATUS_WAITING,)), ("fax_status2", (code,)),
                      ("fax_next_date", (date,)), ("fax_next_time", (clock,))), where)


def interrupted(cf: CommandFile, node: str, code: int, klass: str, text: str, now: float,
                where: Where = Where()) -> CommandFile:
    """An attempt cut off by a crash or stop: an attempt record only (not a retry)."""
    return _attempt(cf, node, code, klass, text, now, where)
