"""Where a job may start now: an idle open connection it can ride, or a new
connection under a binding and mail host whose limits all have room (their
slots then taken, all or none); else the full limits it must wait on.

The bindings of a job's group are tried least loaded first, and a mail host
in its refusal pause, or a destination suspended by a throttle reply, counts
as a full limit."""

from __future__ import annotations

from dataclasses import dataclass

from copiamail.config import BindingConfig, Config
from copiamail.errors import JobError
from copiamail.jobfile import outcome
from copiamail.jobfile.job import Job
from copiamail.scheduling.connections import Connection, Connections
from copiamail.scheduling.limiter import Limiter
from copiamail.scheduling.limits import Limit, adaptive_limit, bindings_for
from copiamail.scheduling.routing import Router, Target
from copiamail.scheduling.shaping import Shaping


@dataclass(frozen=True)
class Blocked:
    """The full limits that kept a job from starting: the first full one of each
    binding and mail host it could have used (it waits on all of them)."""

    limits: tuple[Limit, ...]


@dataclass(eq=False)
class Start:
    """Where a job starts: on ``reuse`` (an idle connection), or on a new
    connection under ``binding`` to ``target``, whose ``limits``' slots are taken."""

    binding: BindingConfig | None
    target: Target | None
    limits: tuple[Limit, ...] = ()
    reuse: Connection | None = None


def bindings_of(config: Config, job: Job) -> list[BindingConfig | None]:
    """The bindings ``job`` may use; JobError if it names one that does not exist."""
    try:
        return bindings_for(config, job.binding, job.binding_group)
    except KeyError as e:
        raise JobError(str(e.args[0]), outcome.BAD_JOB.code) from None


class Chooser:
    """Chooses where jobs start, under ``config`` (replaced on a reload) and
    the limits ``shaping`` gives."""

    def __init__(self, config: Config, connections: Connections, router: Router, shaping: Shaping,
                 limiter: Limiter) -> None:
        self.config = config
        self._connections = connections
        self._router = router
        self._shaping = shaping
        self.limiter = limiter

    def paced(self, conn: Connection) -> bool:
        """Whether each message on ``conn`` starts at its own time: it keeps a
        message rate, or its limit learns (a rate may be learned, and each
        message is judged on its own reply)."""
        return bool(conn.paces) or (self._shaping.adaptive is not None and adaptive_limit(conn.limits) is not None)

    def carries_at_once(self, conn: Connection) -> bool:
        """Whether a job handed to ``conn`` now starts its transaction at once:
        its session is greeted and owes no RSET, and it neither reopens first
        (at its messages per connection) nor is :meth:`paced` (the spool may
        then claim the job straight as sending)."""
        return conn.session.starts_at_once and conn.session.messages < conn.max_messages and not self.paced(conn)

    def rides_at_once(self, job: Job) -> Connection | None:
        """The idle connection ``job``, dispatched now, would ride (the one
        :meth:`choose` reuses), where it :meth:`carries_at_once` it; else None."""
        targets = self._router.targets(job)
        if targets is None:
            return None
        try:
            conn = self._connections.idle_for(job, bindings_of(self.config, job), targets)
        except JobError:
            return None
        return conn if conn is not None and self.carries_at_once(conn) else None

    @staticmethod
    def riding(conn: Connection) -> Start:
        """The start of a job on ``conn``, an idle connection it may ride."""
        return Start(conn.binding, conn.target, conn.limits, reuse=conn)

    def choose(self, job: Job, targets: list[Target]) -> Start | Blocked:
        """Where ``job`` starts among ``targets`` (in order), or what blocks
        it; JobError if it names a binding that does not exist."""
        candidates = bindings_of(self.config, job)
        reuse = self._connections.idle_for(job, candidates, targets)
        if reuse is not None:
            return self.riding(reuse)
        blocked: dict[str, Limit] = {}
        by_load = sorted(candidates, key=lambda b: (self._connections.open_count(b), b.name if b else ""))
        reserve = self._connections.reserved(job.domain)
        for target in targets:
            if (paused := self._router.paused(target)) is not None:
                blocked.setdefault(paused.key, paused)
                continue
            for b in by_load:
                limits = self._shaping.scopes.limits(job.address, job.domain, b, target.ips, target.names)
                full = reserve or self._shaping.held(limits) or self.limiter.try_acquire(limits)
                if full is None:
                    return Start(b, target, limits)
                blocked.setdefault(full.key, full)
        return Blocked(tuple(blocked.values()))
