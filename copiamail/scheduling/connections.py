"""The open connections of one scheduler, the slots they hold, and those idle
between jobs.

A :class:`Connection` carries jobs of one domain over one binding to one
target, holding a slot of each of its limits until it closes (the slots are
taken before it opens, and given back by :meth:`Connections.closed`). After a message
it may wait up to ``connection_idle`` seconds, *idle*, for another job of its
domain: a job handed to it (its ``handoff``) rides on the open session. An
idle connection is told to close by handing it None.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field

from copiamail.config import BindingConfig
from copiamail.deadline import Deadline
from copiamail.jobfile.job import Job
from copiamail.scheduling.limiter import Limiter
from copiamail.scheduling.limits import Limit, Pace, Scopes
from copiamail.scheduling.routing import Item, Target
from copiamail.smtp.session import SessionSettings, SmtpSession


@dataclass(eq=False)
class Connection:
    domain: str
    address: str  # of its first job: what its limits were computed for
    binding: BindingConfig | None
    limits: tuple[Limit, ...]
    target: Target
    session: SmtpSession
    max_messages: int  # messages it carries before it is closed (and reopened for the next)
    turn: int = 0  # messages carried since it last yielded to another domain
    handoff: asyncio.Future[Item | None] | None = None  # while idle: the next job, or None to close
    task: asyncio.Task[None] | None = None
    written: asyncio.Future[None] | None = None  # its last result's batch: done when committed
    paces: tuple[Pace, ...] = ()  # the message rates it keeps
    opened: float = field(default_factory=time.monotonic)
    message_started: float | None = None  # when (monotonic) its last message started, under adaptive limits
    retiring: bool = False  # a reload lowered a cap it counts under, or it lost a lease: closes after its message
    lease: str | None = None  # the name its cluster-wide leases are held by in Redis (None: it holds none)
    # While idle: when it closes if no job comes (one timer from wait to wait).
    idle_deadline: Deadline = field(init=False)

    def __post_init__(self) -> None:
        self.idle_deadline = Deadline(self._idle_time_up)

    def _idle_time_up(self) -> None:
        # Answered here, at once: from this instant the connection is no
        # longer idle, so no job can be handed to it before its task runs.
        if self.handoff is not None and not self.handoff.done():
            self.handoff.set_result(None)

    @property
    def idle(self) -> bool:
        """Whether it waits for a job and none was handed to it yet."""
        return self.handoff is not None and not self.handoff.done()


def job_limit_key(limits: Sequence[Limit]) -> str | None:
    """The key of a connection's limits that a receiver's connection limit
    shows in: its ``$domain_limit`` key, else its per-domain cap's."""
    for prefix in ("domain_limit:", "binding_domain:"):
        for limit in limits:
            if limit.key.startswith(prefix):
                return limit.key
    return None


def starttls_for(target: Target, job: Job) -> str:
    """The STARTTLS mode of a connection for ``job``: the target's, except
    that $email_options useTLS or reqTLS use STARTTLS wherever it is offered."""
    if target.starttls == "never" and job.options & {"usetls", "reqtls"}:
        return "auto"
    return target.starttls


class Connections:
    """The open connections (used from one event loop), whose slots
    ``limiter`` counts under the limits ``scopes`` gives. ``timeout``: the
    SMTP timeout; ``helo_name``: the EHLO name (None: each connection's
    address literal); ``chunking``: whether a message goes as one BDAT where
    the server offers CHUNKING."""

    def __init__(self, scopes: Scopes, limiter: Limiter, timeout: float, helo_name: str | None,
                 chunking: bool = True) -> None:
        self._scopes = scopes
        self._limiter = limiter
        self._timeout = timeout
        self._helo_name = helo_name
        self._chunking = chunking
        self._open: set[Connection] = set()
        self._idle: dict[str, list[Connection]] = {}  # by domain
        # Whether an idle connection waits for a job (False: it closes at once).
        self.linger = True
        # Called as a connection starts to wait (a drain looks whether it is done).
        self.on_idle: Callable[[], None] | None = None
        # The shared keys any connection has learned on (see greeted_by_shared_key): a key is
        # one connection's adaptive key and merely counted on another, and both are counted.
        self._adaptive_shared: set[str] = set()

    def __len__(self) -> int:
        return len(self._open)

    def __iter__(self) -> Iterator[Connection]:
        return iter(self._open)

    def greeted_sharing(self, conn: Connection, key: str | None = None) -> int:
        """How many other open connections of the node, past their greeting,
        hold a slot of ``key``, by default ``conn``'s job limit (its
        ``$domain_limit`` key, else its per-domain key): the evidence a
        throttle reply is judged by. A key that several workers count (a host
        or a pooled stanza's) counts their connections too, as they last told
        (:meth:`greeted_by_shared_key`)."""
        key = key or job_limit_key(conn.limits)
        here = sum(1 for c in self._open
                   if c is not conn and c.session.greeted and any(limit.key == key for limit in c.limits))
        return here + (self._limiter.greeted_elsewhere(key) if key is not None else 0)

    def greeted_by_shared_key(self) -> dict[str, int]:
        """This worker's connections past their greeting, by each shared key
        that learns (that any connection has learned on) they hold: what it
        tells the node's other workers."""
        out: dict[str, int] = {}
        keys = self._adaptive_shared
        if not keys:
            return out
        for c in self._open:
            if c.session.greeted:
                for limit in c.limits:
                    if limit.key in keys:
                        out[limit.key] = out.get(limit.key, 0) + 1
        return out

    def open(self, domain: str, address: str, binding: BindingConfig | None, limits: tuple[Limit, ...], target: Target,
             starttls: str) -> Connection:
        """A new connection (its session opens at its first message), counted
        as open; it holds a slot of each of ``limits``, taken already."""
        source = binding.bind_address if binding is not None else None
        login = target.login
        tls = target.tls.context() if target.tls is not None and starttls != "never" else None
        settings = SessionSettings(
            host=target.host, port=target.port, source_address=source, starttls=starttls, tls_context=tls,
            username=login[0] if login is not None else None, password=login[1] if login is not None else None,
            timeout=self._timeout, helo_name=self._helo_name, server_name=target.server_name, relay=target.relay,
            chunking=self._chunking,
        )
        max_messages = self._scopes.deliveries_per_connection(domain, binding, target.ips, target.names)
        conn = Connection(domain, address, binding, limits, target, SmtpSession(settings), max_messages,
                          paces=self._scopes.paces(domain, binding, target.ips, target.names))
        self._open.add(conn)
        self._adaptive_shared.update(limit.key for limit in limits if limit.shared and limit.ceiling is not None)
        return conn

    def closed(self, conn: Connection) -> None:
        """``conn`` has closed: its slots are given back."""
        self._limiter.release(conn.limits)
        self._open.discard(conn)
        conn.idle_deadline.cancel()

    def learned_host(self, ip: str, names: tuple[str, ...]) -> None:
        """``ip`` is known by ``names`` now: if that brings a host stanza to it,
        connections already open to it count against its limit from now on."""
        for conn in self._open:
            if conn.target.relay or conn.target.host != ip:
                continue
            held = {l.key for l in conn.limits}
            now = self._scopes.limits(conn.address, conn.domain, conn.binding, (ip,), names)
            extra = tuple(l for l in now if l.key not in held and l.key.startswith("host:"))
            if extra:
                self._limiter.force_acquire(extra)
                conn.limits = conn.limits + extra
                self._adaptive_shared.update(l.key for l in extra if l.shared and l.ceiling is not None)
            conn.max_messages = min(conn.max_messages,
                                    self._scopes.deliveries_per_connection(conn.domain, conn.binding, (ip,), names))
            conn.paces = self._scopes.paces(conn.domain, conn.binding, (ip,), names)

    def reconfigure(self, scopes: Scopes) -> None:
        """Take limits from ``scopes`` from now on (a reload). An open
        connection keeps the slots it holds (the limiter counts them by key);
        where a key's new cap is below the connections holding it, idle ones
        close now and busy ones retire after their current message, until the
        count fits. Rates and per-connection caps apply at once."""
        self._scopes = scopes
        excess: dict[str, int] = {}
        for conn in self._open:
            ips, names = conn.target.ips, conn.target.names
            for limit in scopes.limits(conn.address, conn.domain, conn.binding, ips, names):
                excess[limit.key] = self._limiter.in_use(limit.key) - limit.cap
            conn.max_messages = scopes.deliveries_per_connection(conn.domain, conn.binding, ips, names)
            conn.paces = scopes.paces(conn.domain, conn.binding, ips, names)
        for conn in sorted(self._open, key=lambda c: not c.idle):
            over = {l.key for l in conn.limits if excess.get(l.key, 0) > 0}
            if not over or conn.retiring:
                continue
            for limit in conn.limits:
                excess[limit.key] = excess.get(limit.key, 0) - 1
            self.retire(conn)

    def retire(self, conn: Connection) -> None:
        """``conn`` closes now if idle, else after its current message."""
        if conn.idle:
            conn.handoff.set_result(None)  # type: ignore[union-attr]
        else:
            conn.retiring = True

    def lease_lost(self, member: str) -> None:
        """The cluster leases held as ``member`` could not be renewed: its
        connection closes now if idle, else after its current message."""
        for conn in self._open:
            if conn.lease == member:
                self.retire(conn)

    def idle_for(self, job: Job, bindings: Collection[BindingConfig | None], targets: Sequence[Target]) -> Connection | None:
        """An idle connection of ``job``'s domain that may carry it: over one of
        ``bindings``, to one of ``targets`` (the same place, not only the same
        object: a domain's targets are made anew at each lookup), in the
        STARTTLS mode the job needs."""
        for conn in self._idle.get(job.domain, ()):
            if (conn.binding in bindings and conn.idle and any(conn.target is t or conn.target == t for t in targets)
                    and conn.session.settings.starttls == starttls_for(conn.target, job)):
                return conn
        return None

    def idle_of(self, domain: str) -> Sequence[Connection]:
        """The idle connections of ``domain``, longest idle first."""
        return self._idle.get(domain, ())

    def open_count(self, binding: BindingConfig | None) -> int:
        return sum(1 for c in self._open if c.binding is binding)

    def serves(self, domain: str) -> bool:
        """Whether a connection of ``domain`` is open."""
        return any(c.domain == domain for c in self._open)

    def reserved(self, domain: str) -> Limit | None:
        """The node total's limit when a new connection for ``domain`` may not
        take one of its last slots, else None. Those slots
        (server_reserve_outbound_connections, as Momentum has it) are kept for
        domains that have no connection open yet."""
        reserve = self._scopes.reserve
        if not reserve or not self.serves(domain):
            return None
        server = self._scopes.server
        if self._limiter.in_use(server.key) >= server.cap - reserve:
            return server
        return None

    def tasks(self) -> list[asyncio.Task[None]]:
        return [c.task for c in self._open if c.task is not None]

    def close_idle(self) -> None:
        """Tell every idle connection to close."""
        for conns in list(self._idle.values()):
            for conn in conns:
                if conn.idle:
                    conn.handoff.set_result(None)  # type: ignore[union-attr]

    def close_one_holding(self, key: str, other_than: str | None = None) -> None:
        """Tell one idle connection that holds a slot of ``key`` to close, so
        its slot can go to a job that waits for it; not one of domain
        ``other_than``: an idle connection of the waiting job's own domain
        carries it instead (closing it would only open another)."""
        for domain, conns in self._idle.items():
            if domain == other_than:
                continue
            for conn in conns:
                if conn.idle and any(l.key == key for l in conn.limits):
                    conn.handoff.set_result(None)  # type: ignore[union-attr]
                    return

    async def wait_idle(self, conn: Connection, seconds: float, hand_back: Callable[[Item], object]) -> Item | None:
        """Wait up to ``seconds`` for a job handed to ``conn``; None when the
        time is up or it is told to close, and at once when :attr:`linger` is
        off. A job handed over just before a cancellation goes to ``hand_back``."""
        if not self.linger:
            return None
        if self.on_idle is not None:
            self.on_idle()
        loop = asyncio.get_running_loop()
        handoff: asyncio.Future[Item | None] = loop.create_future()
        conn.handoff = handoff
        self._idle.setdefault(conn.domain, []).append(conn)
        # The time running out answers the handoff itself (this runs once or
        # twice a message: one timer a connection, see copiamail.deadline).
        conn.idle_deadline.start(loop, seconds)
        try:
            return await handoff
        except asyncio.CancelledError:
            # A job handed over just before the cancellation: the task was
            # resumed with it, and the cancellation came in its place.
            if handoff.done() and not handoff.cancelled() and handoff.result() is not None:
                hand_back(handoff.result())  # type: ignore[arg-type]
            raise
        finally:
            conn.idle_deadline.end()
            self._idle[conn.domain].remove(conn)
            if not self._idle[conn.domain]:
                del self._idle[conn.domain]
            conn.handoff = None
