"""The limiter of a node in a cluster: local slots as :class:`LocalLimiter`
counts them, and for cluster-wide keys (``cluster:...``) leases in Redis
(:mod:`.redis_leases`) shared by every node and worker.

A connection under a cluster key takes its local slots first, as every
connection does (:meth:`ClusterLimiter.try_acquire`, synchronous, in the
scheduler's choice); then, before its first message, its leases
(:meth:`ClusterLimiter.lease`, one round trip). Refused, it gives its slots
back and its job waits on the full key, as on any full limit.

What the scheduler sees of a cluster key (:meth:`ClusterLimiter.in_use`) is
its own connections plus the leases of everybody else as last read from
Redis. No local event tells when another node frees a slot, so
:meth:`ClusterLimiter.run` reads the keys jobs wait on again every
:data:`POLL` seconds and calls ``on_room`` after each read; it also renews
every lease this limiter holds every third of ``lease_seconds``. Each read
also tells Redis which keys this worker's jobs wait on, and learns which
keys other workers' jobs wait on (:attr:`ClusterLimiter.cluster_wanted_elsewhere`):
an idle connection holding a slot of such a key is closed, so the slot goes
where it is wanted instead of waiting here for a job of its own node.

Redis unreachable (or refusing us): fail closed. A cluster key counts as
full, so the jobs under it wait and everything else flows on; a connection
whose leases cannot be renewed is told to close after its current message
(``on_lost``); one warning a minute at most; all of it ends by itself when
Redis answers again.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from typing import Any

from copiamail.config import ClusterConfig, Config, read_password
from copiamail.errors import ConfigError
from copiamail.scheduling.limiter import LocalLimiter
from copiamail.scheduling.limits import Limit, Pace, is_cluster_key
from copiamail.scheduling.pacing import SLACK
from copiamail.scheduling.redis_leases import RedisLeases
from copiamail.scheduling.shared_slots import SharedSlots

log = logging.getLogger("copiamail")

POLL = 0.1  # seconds between two reads of the cluster keys jobs wait on
WANT_MS = 1000  # how long a worker's "jobs wait here" lasts in Redis unless told again
WARN_EVERY = 60.0  # seconds between two warnings that Redis cannot be used


def _down_errors() -> tuple[type[BaseException], ...]:
    """What says Redis cannot be used now. The redis package is imported only
    here and where a cluster is used: it would cost every node's start 60 ms."""
    from redis.exceptions import RedisError

    return (RedisError, OSError, asyncio.TimeoutError)


def _still_running() -> None:
    """Raise CancelledError if the current task was cancelled: a cancellation
    that met a client-side timeout can come out as TimeoutError, which is
    otherwise taken for Redis being down, and the task would go on."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def redis_client(url: str, password: str | None, timeout: float = 2.0) -> Any:
    """An asyncio Redis client for ``cluster.redis``; it connects at its first command."""
    import redis.asyncio

    return redis.asyncio.Redis.from_url(url, password=password, socket_timeout=timeout,
                                        socket_connect_timeout=timeout, retry_on_timeout=False)


def why_down(e: BaseException) -> str:
    """``e`` in a few words; never what a server says of a password."""
    from redis.exceptions import AuthenticationError

    if isinstance(e, AuthenticationError):
        return "it refused our password, or wants one (cluster.password_file)"
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def sync_client(config: Config, timeout: float) -> Any:
    """A blocking Redis client for ``config``'s ``cluster:`` (which it must have), for one-off reads."""
    import redis

    assert config.cluster is not None
    return redis.Redis.from_url(config.cluster.redis, password=read_password(config, "cluster"),
                                socket_timeout=timeout, socket_connect_timeout=timeout)


def check_cluster(config: Config) -> None:
    """At a node's start: a ConfigError (one line, no password in it) when
    Redis refuses the password of ``cluster.password_file`` or wants one; a
    warning when it cannot be reached (the node starts, and the jobs under
    cluster-wide limits wait for it)."""

    cluster = config.cluster
    if cluster is None:
        return
    from redis.exceptions import AuthenticationError, RedisError

    client = sync_client(config, 2.0)
    try:
        client.ping()
    except AuthenticationError:
        said = "refused the password in cluster.password_file" if cluster.password_file else "wants a password"
        raise ConfigError(f"key 'cluster.password_file': Redis at {cluster.redis} {said}", config.path,
                          cluster.password_file_line) from None
    except (RedisError, OSError) as e:
        log.warning("Redis at %s cannot be used (%s): connections under cluster-wide limits wait for it; "
                    "the rest flows on", cluster.redis, why_down(e))
    finally:
        client.close()


def cluster_limiter(cluster: ClusterConfig, password: str | None, node: str, worker: int,
                    shared: SharedSlots | None = None) -> ClusterLimiter:
    """The limiter of worker ``worker`` of node ``node`` under ``cluster:``
    (``shared``: the table of the node's workers)."""
    return ClusterLimiter(RedisLeases(redis_client(cluster.redis, password)), node, worker, cluster.lease_seconds,
                          cluster.redis, shared=shared)


class ClusterLimiter(LocalLimiter):
    """A :class:`~copiamail.scheduling.limiter.Limiter` whose ``cluster:``
    keys are also held in Redis, for worker ``worker`` of node ``node``
    (used from one event loop)."""

    def __init__(self, leases: RedisLeases, node: str, worker: int, lease_seconds: float, url: str,
                 monotonic: Callable[[], float] = time.monotonic, shared: SharedSlots | None = None) -> None:
        super().__init__(shared, worker)
        self._leases = leases
        self._lease_ms = max(1, round(lease_seconds * 1000))
        self._url = url
        self._monotonic = monotonic
        self._member = f"{node}.w{worker}.{secrets.token_hex(4)}."
        self._serial = itertools.count(1)
        self._others: dict[str, int] = {}  # leases of each cluster key held elsewhere, as last read
        self._caps: dict[str, int] = {}  # each cluster key's cap, as last asked for
        self._held: dict[str, tuple[Limit, ...]] = {}  # our leases: member -> its cluster limits
        self._lost: set[str] = set()  # members whose connections were told their lease is lost
        self._pending: set[asyncio.Task[None]] = set()
        self._warned_at: float | None = None  # when we last warned that Redis cannot be used
        self._quiet_warned_at: float | None = None  # ... that it lost its leases
        self.down: str | None = None  # why Redis cannot be used now (None: it can)
        self.cluster_wanted_elsewhere: set[str] = set()  # cluster keys other workers' jobs wait on, as last read

    # --- what the scheduler counts (synchronous) -----------------------------

    def _mine(self) -> Counter[str]:
        """Our leases per key (a worker holds a few hundred at most)."""
        return Counter(l.key for limits in self._held.values() for l in limits)

    def try_acquire(self, limits: Sequence[Limit]) -> Limit | None:
        for limit in limits:
            if is_cluster_key(limit.key):
                self._caps[limit.key] = limit.cap
                if self.in_use(limit.key) + 1 > limit.cap:
                    return limit
        return super().try_acquire(limits)

    def in_use(self, key: str) -> int:
        return super().in_use(key) + self._others.get(key, 0)

    # --- leases (one round trip each) ----------------------------------------

    async def lease(self, limits: Sequence[Limit]) -> str | Limit:
        """Take a lease of every cluster key among ``limits`` (whose local
        slots are held); the lease's member name, or the limit to wait on."""
        cluster = [l for l in limits if is_cluster_key(l.key)]
        member = f"{self._member}{next(self._serial)}"
        if self._pending:
            # Leases given back go first: the slot a closing connection just
            # freed here is often the one this connection took locally, and
            # Redis must not still count it (a needless refusal).
            await asyncio.wait(list(self._pending), timeout=2.0)
        try:
            refused = await self._leases.acquire(member, [(l.key, l.cap) for l in cluster], self._lease_ms)
        except _down_errors() as e:
            _still_running()
            self._unreachable(e, [l.key for l in cluster])
            return cluster[0]
        self._reachable()
        if refused is not None:
            if refused.index < 0:
                self._quiet(refused.count, [l.key for l in cluster])
                return cluster[0]
            full = cluster[refused.index]
            # Seen full: wait until a read finds room, not until a local slot frees.
            self._others[full.key] = max(0, refused.count - self._mine()[full.key])
            return full
        self._held[member] = tuple(cluster)
        return member

    def give_back(self, member: str) -> None:
        """The connection holding lease ``member`` has closed (its local
        slots are released apart): its leases go back to Redis, soon."""
        cluster = self._held.pop(member, ())
        self._lost.discard(member)
        if cluster:
            task = asyncio.get_running_loop().create_task(self._release(member, [l.key for l in cluster]))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _release(self, member: str, keys: list[str]) -> None:
        try:
            await self._leases.release(member, keys)
        except _down_errors():
            _still_running()  # else it expires within lease_seconds

    async def pace(self, paces: Sequence[Pace], before_long_wait: Callable[[], Any], long_wait: float = 20.0) -> None:
        """Wait for a start the cluster-wide rates ``paces`` allow, and take
        it. Redis unreachable: wait (fail closed), asking again every second;
        the connection is closed first (once) if the wait lasts over
        ``long_wait``."""
        waited = 0.0
        while True:
            try:
                # A little wider than the rate, as the local pacer keeps it (jitter on the way).
                wait = await self._leases.rate_start([(p.key, p.spacing * SLACK) for p in paces])
                _still_running()
                self._reachable()
            except _down_errors() as e:
                _still_running()
                self._unreachable(e, [])
                wait = 1.0
            if wait <= 0:
                return
            waited += wait
            if waited > long_wait:
                await before_long_wait()
                waited = float("-inf")
            await asyncio.sleep(wait)

    # --- the loop: renew leases, read the keys jobs wait on ------------------

    async def run(self, watched: Callable[[], list[str]], on_room: Callable[[], None],
                  on_lost: Callable[[str], None]) -> None:
        """Until cancelled: read the cluster keys among ``watched()`` (keys
        jobs wait on) every :data:`POLL` seconds, then call ``on_room()``;
        renew our leases every third of ``lease_seconds``, calling
        ``on_lost(member)`` for a lease that could not be renewed."""
        renew_every = self._lease_ms / 3000
        next_renew = self._monotonic() + renew_every
        while True:
            await asyncio.sleep(POLL)
            _still_running()
            if self._monotonic() >= next_renew:
                next_renew = self._monotonic() + renew_every
                await self._renew(on_lost)
            wanted = {k for k in watched() if is_cluster_key(k)}
            keys = sorted(wanted | set(self._mine()))
            if keys:
                await self._read(keys, wanted)
                on_room()

    async def _renew(self, on_lost: Callable[[str], None]) -> None:
        held = list(self._held.items())
        if not held:
            return
        try:
            lost = await self._leases.renew([(m, [l.key for l in ls]) for m, ls in held], self._lease_ms)
        except _down_errors() as e:
            _still_running()
            self._unreachable(e, [])
            lost = [1] * len(held)
        # The rest of a member's leases are renewed on until its connection
        # closes; it is told only once.
        gone = [(member, limits[where - 1].key) for (member, limits), where in zip(held, lost, strict=True)
                if where and member not in self._lost]
        self._lost.update(member for member, _ in gone)
        if gone and self.down is None:
            log.warning("%d cluster lease(s) expired before renewal (%s): their connections close after "
                        "their current message", len(gone), ", ".join(sorted({key for _, key in gone})))
        for member, _ in gone:
            on_lost(member)

    async def _read(self, keys: list[str], wanted: Collection[str] = ()) -> None:
        """Read the leases of ``keys`` (and say that jobs here wait on those of ``wanted``)."""
        try:
            quiet, counts = await self._leases.counts(self._member, keys, wanted, WANT_MS)
        except _down_errors() as e:
            _still_running()
            self._unreachable(e, keys)
            return
        self._reachable()
        if quiet > 0:
            self._quiet(quiet, keys)
            return
        self.cluster_wanted_elsewhere = {key for key, (_, wants) in zip(keys, counts, strict=True) if wants}
        for key in set(self._others) - set(keys):
            del self._others[key]  # not read any more: no stale "full" when a job meets it next
        mine = self._mine()
        for key, (n, _) in zip(keys, counts, strict=True):
            others = max(0, n - mine[key])
            if others:
                self._others[key] = others
            else:
                self._others.pop(key, None)

    # --- Redis's state, told once --------------------------------------------

    def _full(self, keys: Sequence[str]) -> None:
        """Count ``keys`` full until a read finds otherwise."""
        for key in keys:
            self._others[key] = max(self._others.get(key, 0), self._caps.get(key, 1 << 30))

    def _unreachable(self, e: BaseException, keys: Sequence[str]) -> None:
        self._full(keys)
        self.down = why_down(e)
        now = self._monotonic()
        if self._warned_at is None or now - self._warned_at >= WARN_EVERY:
            self._warned_at = now
            log.warning("Redis at %s cannot be used (%s): connections under cluster-wide limits wait; "
                        "the rest flows on", self._url, self.down)

    def _quiet(self, ms: int, keys: Sequence[str]) -> None:
        self._full(keys)
        now = self._monotonic()
        if self._quiet_warned_at is None or now - self._quiet_warned_at >= WARN_EVERY:
            self._quiet_warned_at = now
            log.warning("Redis at %s holds no leases yet (new, restarted or flushed): no cluster-wide lease "
                        "for %.1f s, while open connections put theirs back", self._url, ms / 1000)

    def _reachable(self) -> None:
        if self.down is not None:
            log.info("Redis at %s answers again: cluster-wide limits in use", self._url)
            self.down = None

    async def close(self) -> None:
        """Give back what is left, then close the client."""
        if self._pending:
            await asyncio.wait(self._pending, timeout=2.0)
        try:
            await self._leases.client.aclose()
        except _down_errors():
            pass
