"""One delivery attempt of a claimed job over a connection, and the result it
leads to: SENT, FAIL, or back to its folder (a retry later, its alternative
address; :mod:`copiamail.scheduling.retry` decides which).

A mail host that refuses the connection, or fails before any SMTP command,
costs no attempt while the domain has another address to try: the job goes
there instead (:meth:`Attempts.attempt` returns None).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from copiamail.config import Config
from copiamail.errors import DeliveryError, JobError, NotSent
from copiamail.jobfile import outcome, records
from copiamail.jobfile.dkim import sign_for_job
from copiamail.jobfile.fsfile import CommandFile
from copiamail.jobfile.job import Job
from copiamail.jobfile.message import build_message
from copiamail.logs import OUTCOMES, log_fields
from copiamail.scheduling.adaptive import AdaptiveLimits
from copiamail.scheduling.cluster import ClusterLimiter
from copiamail.scheduling.connections import Connection
from copiamail.scheduling.limits import Pace, adaptive_limit, is_cluster_key
from copiamail.scheduling.pacing import Pacer
from copiamail.scheduling.results import Result, Tally
from copiamail.scheduling.retry import GiveUp, TryAlternative, after_error
from copiamail.scheduling.routing import Item, Router
from copiamail.smtp.session import CONNECT, Delivered
from copiamail.spool.jobview import recipient_of
from copiamail.spool.livestate import TransactionTimes
from copiamail.spool.queue import Claimed, Destination, Spool, queue_number
from copiamail.throttle import ThrottleKind

log = logging.getLogger("copiamail")

# After a receiver said we send too fast, no message to it for this long:
# the window it counts in is full.
_RATE_HOLD = 1.0


def learned_pace_key(key: str) -> str:
    """The rate key of the message rate adaptive key ``key`` learned."""
    return f"learned:{key}"


# A message that must wait longer than this for its rate closes its
# connection first: receivers drop a connection left idle for minutes.
_CLOSE_BEFORE_WAIT = 20.0
outcomes = logging.getLogger(OUTCOMES)  # deliveries and deferrals: shown from -v on


def job_error_text(e: JobError) -> str:
    """EMAIL_ERROR for a bad job: the message and the line, not the ACTIVE path."""
    return f"line {e.line}: {e.message}" if e.line is not None else e.message


def refused_at_connect(e: DeliveryError) -> bool:
    """Whether a host refused the connection itself: it could not be made,
    or its greeting or EHLO was a 4xx reply (not a timeout, not a drop)."""
    return e.stage == CONNECT and (e.code == outcome.CONNECT_FAILED.code or 400 <= e.code < 500)


@dataclass(frozen=True, eq=False)
class Attempts:
    """Delivery attempts of node ``node`` (worker ``worker``, counted from 0),
    and the results they lead to. ``router`` is told of mail hosts that fail
    before any SMTP command."""

    config: Config
    spool: Spool
    node: str
    router: Router
    worker: int = 0
    clock: Callable[[], float] = time.time
    # The other connections past their greeting that share a connection's
    # job limit, or the key given (Connections.greeted_sharing): a throttle
    # reply's evidence.
    greeted_sharing: Callable[[Connection, str | None], int] = lambda conn, key: 0
    adaptive: AdaptiveLimits | None = None  # limits learned from throttle replies (None: not adaptive)
    pacer: Pacer | None = None  # message rates (None: none kept)
    cluster: ClusterLimiter | None = None  # cluster-wide leases and rates (None: no cluster)
    on_cap_raised: Callable[[str, int], None] = lambda key, cap: None  # an adaptive key's cap rose
    transactions: TransactionTimes = field(default_factory=TransactionTimes)  # how long each send took

    async def _pace(self, conn: Connection) -> None:
        """Wait until every message rate of ``conn`` allows a message, and
        close a connection that has carried as many as it learned it may."""
        key = adaptive_limit(conn.limits) if self.adaptive is not None else None
        paces = conn.paces
        if key is not None and self.adaptive is not None:
            rate = self.adaptive.rate(key.key)
            if rate is not None:
                paces = (*paces, Pace(learned_pace_key(key.key), 1 / rate, "learned"))
            per_connection = self.adaptive.per_connection(key.key)
            if per_connection is not None and conn.session.messages >= per_connection:
                await conn.session.close()
        shared = [p for p in paces if is_cluster_key(p.key)]
        if shared:
            paces = tuple(p for p in paces if not is_cluster_key(p.key))
        if self.pacer is not None and paces:
            # Connected and greeted first: the time a connection takes to
            # open must not come between its turn and its MAIL FROM.
            await conn.session.ready()
            await self.pacer.start(paces, conn.session.close, _CLOSE_BEFORE_WAIT)
        if shared and self.cluster is not None:
            await conn.session.ready()
            await self.cluster.pace(shared, conn.session.close, _CLOSE_BEFORE_WAIT)
        if key is not None and self.adaptive is not None:
            conn.message_started = time.monotonic()
            self.adaptive.started(key.key, conn.message_started)

    def _learn(self, conn: Connection, kind: ThrottleKind | None, e: DeliveryError | None) -> None:
        """What an attempt on ``conn`` teaches its adaptive key: a throttle
        reply ``e`` of ``kind``, or (``e`` None) a clean delivery."""
        if self.adaptive is None:
            return
        key = adaptive_limit(conn.limits)
        if key is None or key.ceiling is None:
            return
        if e is not None and kind is not None:
            learned = self.adaptive.throttled(key.key, key.ceiling, kind, e.text,
                                              open_connections=self.greeted_sharing(conn, key.key) + 1,
                                              messages=conn.session.messages, monotonic=time.monotonic(),
                                              started=conn.message_started)
            if learned and kind is ThrottleKind.RATE and self.pacer is not None:
                # Its window is full for now: sent at once, the next messages
                # would be refused whatever the rate.
                self.pacer.hold(learned_pace_key(key.key), _RATE_HOLD)
            return
        rose = self.adaptive.delivered(key.key)
        if conn.session.messages == 1:
            rose = self.adaptive.accepted(key.key, self.greeted_sharing(conn, key.key) + 1, conn.opened) or rose
        if rose:
            self.on_cap_raised(key.key, self.adaptive.cap(key.key, key.ceiling))

    async def attempt(self, conn: Connection, item: Item,
                      on_written: Callable[[], bool] | None = None) -> Result | None:
        """Send ``item``'s job over ``conn``; its result, or None when the job
        goes to the domain's next mail host because this one failed before any
        SMTP command, or is sent again because it was not sent at all (written
        behind a message that ended the connection first: NotSent). A
        cancellation propagates with the job still claimed. ``on_written``: called once its transaction is written, before its
        replies are read; whether another attempt starts at once behind it
        (:meth:`~copiamail.smtp.session.SmtpSession.send`)."""
        claimed, cf, job = item.claimed, item.cf, item.job
        config = self.config
        reused = conn.session.messages > 0
        now = self.clock()
        sending = False  # its transaction may have begun (before: the connection is as it was)
        try:
            await self._pace(conn)
            sender = self._sender(job)
            data = build_message(job, spool_root=self.spool.root, attachment_roots=config.roots, sender=sender,
                                 now=now, path_map=config.path_map)
            data = sign_for_job(data, job, config, self.spool.root)  # DKIM signs the exact bytes sent
            # Connected and greeted: its transaction starts next, and from
            # here a crash counts against the job (outcome 66); a job only
            # claimed, or still waiting for its connection, goes back unchanged.
            await conn.session.ready()
            item.claimed = claimed = self.spool.mark_sending(claimed)
            sending = True
            started = time.monotonic()
            try:
                sent = await conn.session.send(sender, job.address, data, require_tls="reqtls" in job.options,
                                               on_written=on_written)
            finally:
                self.transactions.observe(time.monotonic() - started)
        except JobError as e:
            return self.failed(claimed, cf, e.outcome, outcome.FAILURE, job_error_text(e), self.where(claimed, job, now))
        except NotSent as e:
            log.info("%s: %s; sending it again", claimed.name, e.text,
                     extra=log_fields("not_sent", claimed.name, job.address, e.code))
            return None
        except DeliveryError as e:
            kind = config.throttle_table.kind(e.code, e.text)
            if kind is not None:
                self._learn(conn, kind, e)
                key = adaptive_limit(conn.limits)
                if kind is ThrottleKind.CONNECTIONS and e.stage == CONNECT and self.adaptive is not None and key is not None:
                    if key.ceiling is not None and self.adaptive.nothing_left_to_lower(
                            key.key, key.ceiling, self.greeted_sharing(conn, key.key), conn.opened):
                        # The receiver counts connections this key does not
                        # see, other domains' or another sender's on our
                        # address. Reopened at once it would refuse again,
                        # hundreds of times a second; the host rests for
                        # refusal_pause instead.
                        self.router.refused(conn.target)
                    # Refused for the connection, not for the message: it
                    # waits for a slot under the lowered cap, as a deferred job.
                    item.busy_reply = (e.text, self.greeted_sharing(conn, None) + 1)
                    return None
            if refused_at_connect(e):
                self.router.refused(conn.target)
            if e.stage == CONNECT and self.router.host_failed(conn.target, conn.domain, item.tried):
                log.info("%s: %s; trying the next mail host", claimed.name, e.text,
                         extra=log_fields("next_host", claimed.name, job.address, e.code))
                return None
            connected = None if e.stage in (CONNECT, "DNS") and not reused else now
            return self.after_error(claimed, cf, job, e, self.where(claimed, job, now, connected),
                                    self.greeted_sharing(conn, None) + 1 if kind is not None else None)
        except Exception as e:
            log.exception("%s: internal error", claimed.name)
            if sending:
                # Not before: the connection may carry another message, whole
                # and awaiting its reply, that this error must not drop.
                conn.session.abort()
            return self.after_error(claimed, cf, job, DeliveryError(
                outcome.INTERNAL.code, outcome.INTERNAL.klass, f"internal error: {type(e).__name__}: {e}", False),
                self.where(claimed, job, now))
        self._learn(conn, None, None)
        return self.sent(claimed, cf, sent, self.where(claimed, job, now, now))

    def _sender(self, job: Job) -> str:
        return job.esender or self.config.rules.esender or self.config.esender

    def where(self, claimed: Claimed, job: Job | None, call: float | None = None,
              connected: float | None = None) -> records.Where:
        """What the attempt record of a job claimed from ``claimed.queue`` tells
        besides its outcome (CALL: when the attempt started, CONNECT: when its
        connection was made; the connection of a message is made, or reused, as
        its attempt starts)."""
        return records.Where(queue_number(claimed.queue), self.worker + 1, call, connected,
                             job is not None and job.restarted)

    def sent(self, claimed: Claimed, cf: CommandFile, result: Delivered, where: records.Where) -> Result:
        if outcomes.isEnabledFor(logging.INFO):
            to = recipient_of(cf)
            outcomes.info("%s to %s delivered (%s): %s", claimed.name, to, result.ip, result.reply,
                          extra=log_fields("delivered", claimed.name, to, result.reply[:3]))
        mark = None
        try:
            # First a rename: from now on a crash or a full disk can no longer
            # make this message go out twice.
            claimed, mark = self.spool.mark_delivered(claimed)
        except OSError as e:
            log.error("%s: cannot mark the job delivered: %s", claimed.path, e.strerror)
        try:
            cf = records.delivered(cf, self.node, result.reply, result.ip, result.bytecount, self.clock(), where)
        except BaseException:
            if mark is not None:
                os.close(mark.fd)  # the mark stays: the job is delivered, never handed back
            raise
        if mark is not None:
            mark = self.spool.write_delivered(mark, cf)
        return Result(claimed, cf, Destination.SENT, Tally.SENT, mark=mark)

    def failed(self, claimed: Claimed, cf: CommandFile, code: int, klass: str, text: str, where: records.Where,
               connections: int | None = None) -> Result:
        to = recipient_of(cf)
        log.warning("%s to %s failed: %s", claimed.name, to, text, extra=log_fields("failed", claimed.name, to, code))
        return Result(claimed, records.failed(cf, self.node, code, klass, text, self.clock(), where, connections),
                      Destination.FAIL, Tally.FAILED)

    def bad_job(self, claimed: Claimed, cf: CommandFile, e: JobError, job: Job | None = None) -> Result:
        """A job that cannot be sent as written (it does not parse, names an
        unknown binding): FAIL, saying why."""
        return self.failed(claimed, cf, e.outcome, outcome.FAILURE, job_error_text(e), self.where(claimed, job))

    def after_error(self, claimed: Claimed, cf: CommandFile, job: Job, e: DeliveryError, where: records.Where,
                    connections: int | None = None) -> Result:
        """A failed attempt: a retry later, its alternative address, or FAIL.
        ``connections``: with a throttle reply, the connections to the job's
        limit open when it came, its own included (EMAIL_CONNECTIONS)."""
        now = self.clock()
        verdict = after_error(job, e, self.config.rules.retry_rules, now)
        if isinstance(verdict, TryAlternative):
            log.warning("%s to %s failed for good: %s; trying its alternative address %s", claimed.name, job.address,
                        e.text, verdict.address, extra=log_fields("alternative", claimed.name, job.address, e.code))
            return Result(claimed, records.to_alternative(cf, self.node, e.code, e.klass, e.text, now, where, connections),
                          Destination.BACK, Tally.RETRIED)
        if isinstance(verdict, GiveUp):
            return self.failed(claimed, cf, e.code, e.klass, e.text, where, connections)
        log.info("%s to %s: retry in %d s%s: %s", claimed.name, job.address, verdict.wait,
                 " through retry_relay" if verdict.relay else "", e.text,
                 extra=log_fields("retry", claimed.name, job.address, e.code))
        return Result(claimed, records.retry(cf, self.node, e.code, e.klass, e.text, now, now + verdict.wait, where,
                                                   connections),
                      Destination.BACK, Tally.RETRIED)

    def lookup_failed(self, item: Item, error: DeliveryError) -> Result:
        """The result of a job whose domain's route could not be looked up."""
        return self.after_error(item.claimed, item.cf, item.job, error, self.where(item.claimed, item.job, self.clock()))
