"""What an open connection carries after a message: the next waiting job of
its domain, or nothing, when a job of another domain that waits on one of its
slots comes first (then it closes and its slots go there); which job it sends
behind the message in flight, where it can; and claiming a waiting job whose
slot or connection was chosen while it waited."""

from __future__ import annotations

import functools
from collections.abc import Callable

from copiamail.config import Config
from copiamail.errors import JobError
from copiamail.jobfile.fsfile import CommandFile
from copiamail.jobfile.job import Job, parse_job
from copiamail.scheduling.choosing import Chooser, bindings_of
from copiamail.scheduling.connections import Connection, starttls_for
from copiamail.scheduling.routing import Item, Router
from copiamail.scheduling.shaping import Shaping
from copiamail.scheduling.waiting import WaitEntry, WaitingJobs
from copiamail.spool.queue import Claimed, Spool

# A connection carries this many more messages of its own domain before it
# yields a shared slot to another domain's waiting job of the same folder: a
# fair turn, without a new connection for every message.
_TURN_MESSAGES = 10


def as_planned(job: Job, planned: Job, now: float) -> bool:
    """Whether a job read from the file just claimed is the one its slot was
    chosen for (same recipient and binding, and due at ``now``): a waiting
    job's file may have been replaced meanwhile, and the file decides."""
    return (job.address == planned.address and job.binding == planned.binding
            and job.binding_group == planned.binding_group and job.options == planned.options
            and job.attempts == planned.attempts and job.is_due(now))


def read_claimed(spool: Spool, config: Config, claimed: Claimed) -> tuple[CommandFile | None, Job | None]:
    """The text and meaning of a job just claimed; (None, None) if it cannot
    be read or parsed (then the scheduler's dispatch tries again and says why)."""
    try:
        cf = spool.read(claimed)
        return cf, parse_job(cf, claimed.name, config.job_env)
    except (OSError, JobError):
        return None, None


def _can_ride(config: Config, router: Router, conn: Connection, job: Job) -> bool:
    """Whether ``job`` may ride on ``conn``: the same binding, STARTTLS mode,
    and route (a retry sent through retry_relay rides only on a connection
    to it, and nothing else does)."""
    if conn.session.settings.starttls != starttls_for(conn.target, job):
        return False
    if not router.same_route(conn.target, job):
        return False
    try:
        return conn.binding in bindings_of(config, job)
    except JobError:
        return True  # take it: the scheduler's dispatch fails it with the reason


def _first_other(waiting: WaitingJobs, conn: Connection, can_use: Callable[[Job], bool]) -> WaitEntry | None:
    """The first waiting job that waits on a slot ``conn`` holds and cannot
    ride on it (``can_use``)."""
    best: WaitEntry | None = None
    for limit in conn.limits:
        head = waiting.head(limit.key)
        if head is None or (head.job.domain == conn.domain and can_use(head.job)):
            continue
        if best is None or waiting.rank(head) < waiting.rank(best):
            best = head
    return best


class NextJobs:
    """Finds what connections carry next, and holds the ``chooser`` of where
    a new job starts; ``config`` is theirs (replaced on a reload).
    ``take(entry, sending)`` claims a waiting job (None: it cannot be now;
    ``sending``: straight as sending, where it can); ``dispatch`` decides
    afresh for a claimed job that cannot ride; ``hand_back`` returns one
    claimed as sending, unsent, to its folder."""

    def __init__(self, chooser: Chooser, spool: Spool, waiting: WaitingJobs, router: Router, shaping: Shaping,
                 take: Callable[[WaitEntry, bool], Claimed | None],
                 dispatch: Callable[[Claimed, CommandFile | None, Job | None], None],
                 clock: Callable[[], float], hand_back: Callable[[Claimed], object]) -> None:
        self.chooser = chooser
        self._spool = spool
        self._waiting = waiting
        self._router = router
        self._shaping = shaping
        self._take = take
        self._dispatch = dispatch
        self._clock = clock
        self._hand_back = hand_back

    @property
    def config(self) -> Config:
        return self.chooser.config

    @config.setter
    def config(self, config: Config) -> None:
        self.chooser.config = config

    def next_for(self, conn: Connection, as_sending: bool = True) -> tuple[Item | None, bool]:
        """What a connection does after a message: ``(item, False)`` carry the
        next waiting job of its domain (claimed straight as sending where
        ``as_sending`` and the connection starts it at once); ``(None, True)``
        close, because a job of another domain that waits on a slot it holds
        comes first; ``(None, False)`` nothing waits for it."""
        if ((not conn.session.greeted and self._router.paused(conn.target) is not None)
                or self._shaping.held(conn.limits) is not None or conn.retiring):
            return None, True  # its host refused it, or asked for a rest: reopened, it would be refused again
        can_use = functools.partial(_can_ride, self.config, self._router, conn)
        while True:
            own = self._waiting.next_of_domain(conn.domain, can_use)
            other = _first_other(self._waiting, conn, can_use)
            if own is None:
                return None, other is not None
            # Another domain's job that comes first: from an earlier folder it
            # goes first at once; within a folder the connection yields when
            # its turn is over. Another worker's jobs have no rank here: they
            # get their half of a shared cap, turn by turn.
            if (other is not None and self._waiting.rank(other) < self._waiting.rank(own)
                    and (other.order[0] < own.order[0] or conn.turn >= _TURN_MESSAGES)):
                return None, True
            if conn.turn >= _TURN_MESSAGES and any(self.chooser.limiter.yields(l.key, l.cap) for l in conn.limits):
                return None, True
            item = self._claim_for(own, can_use, as_sending and self.chooser.carries_at_once(conn))
            if item is not None:
                self._waiting.served(conn.domain)
                conn.turn += 1
                return item, False

    def behind(self, conn: Connection) -> Item | None:
        """A job to send over ``conn`` at once, behind its message in flight,
        before that one's last reply (where the session can:
        :meth:`~copiamail.smtp.session.SmtpSession.can_send_behind`); None if
        none may. Never where the connection keeps a message rate or learns
        its limit (each message must start at its own time, and be judged on
        its own reply), nor past its messages per connection. Claimed as any
        job, and marked when its turn comes: the message ahead may yet be
        refused, and the connection owe an RSET first."""
        if self.chooser.paced(conn) or conn.session.messages + 2 > conn.max_messages or not conn.session.can_send_behind():
            return None
        return self.next_for(conn, as_sending=False)[0]

    def _claim_for(self, entry: WaitEntry, can_use: Callable[[Job], bool], at_once: bool) -> Item | None:
        """Claim a waiting job to ride on an open connection (``can_use``),
        straight as sending when the connection starts it ``at_once``; None if
        it cannot."""
        claimed = self._take(entry, at_once)
        if claimed is None:
            return None
        cf, job = read_claimed(self._spool, self.config, claimed)
        if cf is None or job is None or not as_planned(job, entry.job, self._clock()) or not can_use(job):
            if claimed.marked_sending:
                # Its file changed while it waited: only claimed after all, it
                # must not count as sending. It goes back; a scan reads it again.
                self._hand_back(claimed)
            else:
                self._dispatch(claimed, cf, job)
            return None
        return Item(claimed, cf, job)
