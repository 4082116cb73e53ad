"""Recovery of a node's claimed jobs after a crash.

Run when a node starts, and by ``copiamail recover --node N``. Results the
node had committed are finished first (see :mod:`copiamail.spool.queue`,
states 4 and 5). A job whose SMTP transaction had started (state 2a) was
interrupted mid-attempt: it gets an attempt record of outcome 66 and goes back
to its own folder, or to FAIL with outcome 67 once it has been interrupted
three times. A job that was only claimed goes back unchanged, as at a
shutdown: nothing was sent, nothing counts. Interruptions do not count as
retries.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from copiamail.errors import SyntaxFileError
from copiamail.jobfile import outcome, records
from copiamail.jobfile.fsfile import CommandFile
from copiamail.jobfile.owned import parse_attempt
from copiamail.spool.layout import Destination, queue_number
from copiamail.spool.queue import Spool

log = logging.getLogger("copiamail")


@dataclass(frozen=True)
class RecoveryReport:
    returned: tuple[str, ...] = ()  # with an attempt record of outcome 66
    failed: tuple[str, ...] = ()
    sent: tuple[str, ...] = ()
    handed_back: tuple[str, ...] = ()  # only claimed: back unchanged


def _interruptions(cf: CommandFile) -> int:
    """Interruptions since the job last started afresh (after its last
    ``$fax_status1 6``: a job moved back from SENT or FAIL by hand)."""
    try:
        commands = cf.commands()
    except SyntaxFileError:
        return 0  # junk: it goes back, and fails as a bad job when next taken
    restart = max((c.line for c in commands if c.name == "fax_status1" and c.args[:1] == ("6",)), default=0)
    records = (parse_attempt(c) for c in commands if c.name == "attempt_record" and c.line > restart)
    return sum(1 for r in records if r is not None and r.outcome == outcome.INTERRUPTED.code)


def _where(queue: str, cf: CommandFile) -> records.Where:
    """The record of a recovered job: its queue, and whether it had been
    moved back by hand (see :class:`copiamail.jobfile.records.Where`)."""
    try:
        status = [c.args[0] for c in cf.commands() if c.name == "fax_status1" and c.args]
    except SyntaxFileError:
        status = []
    return records.Where(queue_number(queue), restarted=status[-1:] == ["6"])


def recover(spool: Spool, node: str, now: float | None = None, recorder: str | None = None) -> RecoveryReport:
    """Return node ``node``'s interrupted jobs to their folders (or FAIL).
    ``recorder`` names the node in the attempt records (the one recovering a
    folder it took over; by default ``node`` itself)."""
    now = time.time() if now is None else now
    me = recorder or node
    returned: list[str] = []
    failed: list[str] = []
    sent: list[str] = []
    handed_back: list[str] = []
    try:
        _recover(spool, node, now, me, returned, failed, sent, handed_back)
    finally:
        # Spares live in the recovered folder, which a takeover removes next.
        spool.drop_spares()
    return RecoveryReport(tuple(returned), tuple(failed), tuple(sent), tuple(handed_back))


def _recover(spool: Spool, node: str, now: float, me: str, returned: list[str], failed: list[str], sent: list[str],
             handed_back: list[str]) -> None:
    claimed_only, interrupted, delivered = spool.claimed_jobs(node)
    for claimed in claimed_only:
        spool.hand_back(claimed)
        handed_back.append(claimed.name)
    for claimed in delivered:
        # The server accepted it before the stop: finish it, never send it again.
        cf = spool.read(claimed)
        cf = records.delivered(cf, me, "250 (accepted; the rest of the reply was not recorded before a stop)", "", 0, now,
                               _where(claimed.queue, cf))
        spool.finish(claimed, cf, Destination.SENT)
        sent.append(claimed.name)
    for claimed in interrupted:
        cf = spool.read(claimed)
        code = outcome.INTERRUPTED
        where = _where(claimed.queue, cf)
        cf = records.interrupted(cf, me, code.code, code.klass, "attempt interrupted", now, where)
        if _interruptions(cf) >= outcome.INTERRUPTIONS_TO_FAIL:
            final = outcome.INTERRUPTED_TOO_OFTEN
            text = f"interrupted {outcome.INTERRUPTIONS_TO_FAIL} times"
            spool.finish(claimed, records.failed(cf, me, final.code, final.klass, text, now, where), Destination.FAIL)
            failed.append(claimed.name)
            log.warning("%s: %s; moved to FAIL", claimed.name, text)
        else:
            spool.finish(claimed, cf, Destination.BACK)
            returned.append(claimed.name)
            log.warning("%s: attempt interrupted; returned to %s", claimed.name, claimed.queue)
