"""One connection's run: the jobs it carries, one message after another,
until none is left for it (:meth:`Carrier.carry`).

Where the session can (a server that takes pipelined commands), the next
job goes out behind the message in flight once that one is written whole,
before its last reply: the server finds it waiting as soon as it has
answered, and the connection never sits idle for a round trip between
messages. One at most is behind: its job is claimed, marked sending and
written, so it is an attempt like any other, unless the message ahead ends
the connection before the server can have taken it
(:class:`~copiamail.errors.NotSent`): then the attempt returns None, and the
job goes again over a new connection.

Whatever happens (cancellation, a bug), a job the run holds is either
attempted, with its result written, or handed back: it is never left in
ACTIVE.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from copiamail.scheduling.attempts import Attempts
from copiamail.scheduling.carrying import NextJobs
from copiamail.scheduling.cluster import ClusterLimiter
from copiamail.scheduling.connections import Connection, Connections
from copiamail.scheduling.limits import Limit, is_cluster_key
from copiamail.scheduling.results import Result, ResultWriter
from copiamail.scheduling.routing import Item

log = logging.getLogger("copiamail")


@dataclass
class Ending:
    """What is left to the scheduler when a connection's run ends."""

    refused: tuple[Item, Limit] | None = None  # its first job, kept from starting by a full cluster-wide limit
    elsewhere: list[Item] = field(default_factory=list)  # jobs for another mail host: this one failed before SMTP


def _call(fn: Callable[[], None], _done: asyncio.Future[None]) -> None:
    fn()


async def _committed(conn: Connection) -> None:
    """Wait until ``conn``'s last result is committed (or owed)."""
    if conn.written is not None:
        if not conn.written.done():  # shield costs a future and two callbacks
            # Shielded: the commit is its batch's, not this connection's to cancel.
            await asyncio.shield(conn.written)
        conn.written = None


class Carrier:
    """Runs connections for one scheduler, with its ``attempts`` (replaced
    on a reload); ``next_jobs``: what a connection carries next (it holds the
    scheduler's chooser too); ``halted``: take no new job; ``stopping``: the
    scheduler stops (jobs in flight still finish)."""

    def __init__(self, attempts: Attempts, results: ResultWriter, next_jobs: NextJobs,
                 connections: Connections, cluster: ClusterLimiter | None, halted: Callable[[], bool],
                 stopping: Callable[[], bool]) -> None:
        self.attempts = attempts
        self._results = results
        self.next_jobs = next_jobs
        self._connections = connections
        self._cluster = cluster
        self._halted = halted
        self._stopping = stopping

    async def _wait_idle(self, conn: Connection, seconds: float) -> Item | None:
        """``conn`` waits up to ``seconds``, idle, for a job of its domain, its
        last result possibly still being committed: a commit waits for an
        fsync, and a connection waiting for it would look busy to the scan,
        which would defer the next job of its domain instead of handing it
        over. A deferral that lands meanwhile is offered to it."""
        on_idle = self._connections.on_idle
        if on_idle is not None and conn.written is not None and not conn.written.done():
            # A drain looks whether it is done when a connection goes idle;
            # with a result still owed it is not, so it looks again when that
            # result lands.
            conn.written.add_done_callback(functools.partial(_call, on_idle))
        return await self._connections.wait_idle(conn, seconds, lambda it: self._results.hand_back(it.claimed))

    async def carry(self, conn: Connection, item: Item | None, end: Ending) -> None:
        """Carry ``item``, then the jobs :class:`NextJobs` finds for ``conn``,
        until none is left (or the scheduler halts); then close it politely.
        What is left to do is in ``end`` however the run ends (a cancellation
        included); the connection's lease and limits are the caller's to give
        back."""
        # A job sent behind the message in flight, and its attempt: at most one.
        behind: list[tuple[Item, asyncio.Task[Result | None]]] = []
        task: asyncio.Task[Result | None] | None = None  # item's attempt, when it was sent behind another
        # item's result, made and not yet handed to the writer: written, not
        # handed back, if the run ends meanwhile (a delivered job must never
        # go back to its folder).
        unwritten: Result | None = None
        loop = asyncio.get_running_loop()

        def send_behind() -> bool:
            # Called while the message ahead awaits its reply: an error here
            # must not become that message's. True: an attempt starts behind it.
            try:
                if not behind and not self._halted():
                    later = self.next_jobs.behind(conn)
                    if later is not None:
                        behind.append((later, loop.create_task(self.attempts.attempt(conn, later, send_behind))))
                        return True
            except Exception:
                log.exception("connection for %s: cannot send a job behind its message", conn.domain)
            return False

        try:
            if item is not None and self._cluster is not None and any(is_cluster_key(l.key) for l in conn.limits):
                got = await self._cluster.lease(conn.limits)
                if isinstance(got, str):
                    conn.lease = got
                else:  # a cluster-wide limit is full: its job waits on it, as on any full limit
                    end.refused, item = (item, got), None
            while item is not None and (task is not None or not self._stopping()):
                if task is None:
                    if conn.session.messages >= conn.max_messages:
                        await conn.session.close()
                    result = await self.attempts.attempt(conn, item, send_behind)
                else:
                    send_behind()  # it was written while the one ahead was in flight: one more may follow now
                    result = await task
                    task = None
                unwritten = result
                # The previous result was made durable while this message was
                # sent: one in flight per connection at most (a full disk
                # pauses the node after one more message, not more).
                await _committed(conn)
                unwritten = None
                if result is None:
                    end.elsewhere.append(item)
                else:
                    conn.written = self._results.write(result)
                item = None
                if behind:  # sent already: it is finished whatever comes next
                    item, task = behind.pop()
                    continue
                if end.elsewhere or self._halted():
                    break
                item, close = self.next_jobs.next_for(conn)
                idle = self.next_jobs.config.connection_idle
                if item is None and not close and not self._stopping() and idle > 0:
                    item = await self._wait_idle(conn, idle)
                elif item is None and conn.written is not None:
                    # Deferrals written before its last result have landed
                    # once that result is committed: one of them may be next.
                    await _committed(conn)
                    if self._halted():
                        break
                    if not close:
                        item, close = self.next_jobs.next_for(conn)
                if item is None:
                    await _committed(conn)  # its slots are not given up before its last result is written
            if item is None:
                await conn.session.close()
        except asyncio.CancelledError:
            conn.session.abort()
            raise
        except Exception:
            log.exception("connection for %s failed", conn.domain)
            conn.session.abort()
        finally:
            attempts = ([(item, task)] if item is not None and task is not None else []) + behind
            if unwritten is not None:
                self._results.write(unwritten)
            await self._wind_up(conn, [item] if item is not None and task is None and unwritten is None else [],
                                attempts, end)

    async def _wind_up(self, conn: Connection, held: list[Item],
                       attempts: list[tuple[Item, asyncio.Task[Result | None]]], end: Ending) -> None:
        """The end of a connection's run: its ``attempts`` still running are
        cancelled (with the run, or outliving a bug) and end before their jobs
        are handed back; one that ended with a result has its result written,
        as any other. The jobs ``held`` (not sent) and those of attempts that
        failed go back to their folders."""
        running = [t for _, t in attempts if not t.done()]
        for t in running:
            t.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        for it, t in attempts:
            if t.cancelled() or t.exception() is not None:
                held.append(it)
            elif (result := t.result()) is None:
                end.elsewhere.append(it)
            else:
                self._results.write(result)
        if held:
            conn.session.abort()
        for it in held:
            self._results.hand_back(it.claimed)
