"""Where a job's connection goes: the relay, the retry relay, or one address of
one of the domain's mail hosts. The node and ``copiamail explain`` both ask a
:class:`Router`, so explain shows the places the node uses.

- With ``relay:``, every job goes to the relay; with ``retry_relay:``, a retry
  that its retry list sends there (an ``I`` item) goes to the retry relay
  instead of the usual route.
- Without a relay (direct delivery), a job goes to its domain's mail hosts by
  MX preference, each of their addresses in turn. A domain's route is looked
  up once however many jobs wait for it (:meth:`Router.look_up`).
- A mail host address that refused a connection, or failed before any SMTP
  command, is *down* for a while: other addresses go first while there are
  any, and an attempt tries each address at most once, so it ends.
- Host stanzas (``host:``) may name a mail host rather than its address. Every
  name an address is known by (MX names, and host stanza names resolved at
  start) travels with a connection to it, so such a stanza limits every
  connection to that address, whichever MX name led there. A name learned
  while connections to its address are open is reported (``on_learned``): they
  count against its limit from then on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from copiamail.config import Config, RelayConfig, is_ip
from copiamail.errors import DeliveryError
from copiamail.jobfile import outcome
from copiamail.jobfile.fsfile import CommandFile
from copiamail.jobfile.job import Job
from copiamail.scheduling.limits import Limit
from copiamail.scheduling.retry import through_retry_relay
from copiamail.scheduling.shared_slots import SharedSlots
from copiamail.smtp.startup import TlsSettings, relay_tls, resolve_relay
from copiamail.spool.queue import Claimed

if TYPE_CHECKING:
    from copiamail.smtp.mx import MxResolver, Route

log = logging.getLogger("copiamail")

HOST_DOWN_SECONDS = 60.0
_NONE_TRIED: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Target:
    """Where a connection goes: the relay, or one address of one mail host."""

    host: str
    port: int
    ips: tuple[str, ...]  # the addresses host limits count against
    names: tuple[str, ...]  # the names host stanzas may use
    starttls: str
    tls: TlsSettings | None  # None: no STARTTLS
    relay: bool
    server_name: str | None = None  # the MX host's name, which its certificate must carry
    login: tuple[str, str] | None = None  # AUTH (user name, password) for a relay


@dataclass(eq=False)
class Item:
    """A claimed job on its way to a mail host: its file, text and meaning."""

    claimed: Claimed
    cf: CommandFile
    job: Job
    tried: set[str] = field(default_factory=set)  # mail host addresses this attempt found dead
    # A receiver's reply that it has too many connections from us, under
    # adaptive limits, and the connections open then (EMAIL_CONNECTIONS):
    # the job waits for a slot, and its deferral records the reply.
    busy_reply: tuple[str, int] | None = None


def relay_target(relay: RelayConfig | None, password: str | None) -> Target | None:
    """The place ``relay`` stands for (None: no relay)."""
    if relay is None:
        return None
    # Even with starttls: never a job with $email_options useTLS or reqTLS
    # uses STARTTLS wherever it is offered: the settings are kept either way.
    tls = relay_tls(relay)
    login = (relay.username, password or "") if relay.username is not None else None
    return Target(relay.host, relay.port, resolve_relay(relay.host, relay.port), (relay.host,), relay.starttls, tls,
                  True, login=login)


# Jobs given to on_routed at once when a lookup ends, before the event loop runs again.
ROUTED_SLICE = 200


_PAUSE_PREFIX = "pause:"


def pause_key(host: str) -> str:
    """The key jobs wait on while ``host`` is paused after a refusal."""
    return _PAUSE_PREFIX + host


class Router:
    """The routes of one node (used from one event loop). ``password`` and
    ``retry_password``: the relays' (for AUTH); :attr:`relay` and
    :attr:`retry_relay` are their targets (None: not configured).
    ``resolver``: the MX resolver to use (by default one for ``config.dns``;
    none is made when a relay takes all mail). Jobs parked by :meth:`look_up`
    are given to ``on_routed`` with the lookup's error (None when the route is
    known now, or the lookup was cancelled); ``on_learned(ip, names)`` hears
    of each name an address is found to have."""

    def __init__(
        self,
        config: Config,
        password: str | None = None,
        retry_password: str | None = None,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        resolver: MxResolver | None = None,
        on_learned: Callable[[str, tuple[str, ...]], None] | None = None,
        on_routed: Callable[[list[Item], DeliveryError | None], None] | None = None,
        on_unpaused: Callable[[str], None] | None = None,
        shared: SharedSlots | None = None,
    ) -> None:
        """``shared``: the table the node's workers share, where a refusal's
        pause is kept for all of them (None: one process sends alone)."""
        self._config = config
        self._shared = shared
        self._clock = clock
        self._monotonic = monotonic
        self._on_learned = on_learned
        self._on_routed = on_routed
        self.relay = relay_target(config.relay, password)
        # Retries whose list item carries the I prefix go through here.
        self.retry_relay = relay_target(config.retry_relay, retry_password)
        self._mx: MxResolver | None = None
        self._mx_tls: TlsSettings | None = None
        if self.relay is None:
            # Imported here: dnspython takes 50 to 90 ms to import, at every
            # node's start, and a node whose relay takes all mail never uses it.
            from copiamail.smtp.mx import MxResolver

            self._mx = resolver or MxResolver(config.dns)
            self._mx_tls = TlsSettings(config.mx_tls_verify)
            self._mx_tls.context()
        self._down: dict[str, float] = {}  # mail host address: down until (monotonic)
        # Hosts that refused a connection: the end of each one's pause, and
        # whom to tell of it.
        self._paused: dict[str, asyncio.TimerHandle] = {}
        self._on_unpaused = on_unpaused
        # Every name an address is known by (MX names, host stanza names), so a
        # host stanza naming one of them limits every connection to that address.
        self._names_by_ip: dict[str, set[str]] = {}
        self._unresolved_hosts: list[str] = [h.key for h in config.hosts if not is_ip(h.key)]
        self._host_lookup: asyncio.Task[None] | None = None
        self._parked: dict[str, list[Item]] = {}  # jobs waiting for their domain's route, by domain
        self._lookups: set[asyncio.Task[None]] = set()

    # --- where a job goes ----------------------------------------------------

    def targets(self, job: Job, fresh: bool = True, tried: Collection[str] = _NONE_TRIED) -> list[Target] | None:
        """The relay (the retry relay for a retry its list sends there), or the
        domain's mail host addresses by preference, less those this attempt
        already found dead (``tried``) and, while others remain, those recently
        found down; None when the route must be looked up (``fresh``: only a
        route whose time to live has not run out will do)."""
        if self.retry_relay is not None and self.through_retry_relay(job):
            return [self.retry_relay]
        if self.relay is not None:
            return [self.relay]
        assert self._mx is not None
        route = self._mx.cached(job.domain) if fresh else self._mx.last_known(job.domain)
        if route is None:
            return None
        return self._mx_targets(route, tried)

    def through_retry_relay(self, job: Job) -> bool:
        """Whether the job's next attempt is a retry that its retry list sends
        through ``retry_relay`` (an ``I`` item)."""
        return through_retry_relay(job, self._config.rules.retry_rules, self._clock())

    def same_route(self, target: Target, job: Job) -> bool:
        """Whether ``job`` may go to ``target`` as far as the retry relay is
        concerned: a retry sent through retry_relay rides only on a connection
        to it, and nothing else does."""
        return self.retry_relay is None or (target is self.retry_relay) == self.through_retry_relay(job)

    def _mx_targets(self, route: Route, tried: Collection[str]) -> list[Target]:
        targets = self._route_targets(route)
        untried = [t for t in targets if t.host not in tried] or targets
        now = self._monotonic()
        up = [t for t in untried if self._down.get(t.host, 0.0) <= now]
        return up or untried

    def _route_targets(self, route: Route) -> list[Target]:
        """Every address of every mail host of ``route``, by preference."""
        for host in route.hosts:
            for ip in host.ips:
                self._learn(ip, host.name)
        return [
            Target(ip, self._config.mx_port, (ip,), tuple(sorted(self._names_by_ip[ip])), "auto", self._mx_tls, False, host.name)
            for host in route.hosts for ip in host.ips
        ]

    def refused(self, target: Target) -> None:
        """``target`` refused a connection (connection refused, a 4xx greeting
        or EHLO): the node opens no new connection to it for
        ``refusal_pause`` seconds, in any of its workers (the pause is written
        into the table they share). Its connections already open go on. When
        the pause ends, its key (:func:`pause_key`) is given to
        ``on_unpaused``, so the jobs that waited for it are offered the host
        again."""
        pause = self._config.refusal_pause
        if pause <= 0 or target.host in self._paused:
            return
        if self._shared is not None:
            now = self._monotonic()
            with self._shared.locked():
                self._shared.pause(pause_key(target.host), now + pause, now)
        # Until the end the table holds: another worker's refusal may already have set a later one.
        self._end_pause_in(target.host, max(pause, self._shared_pause_left(target.host)))

    def _end_pause_in(self, host: str, seconds: float) -> None:
        """``host``'s pause (this worker's, or one it took from the table) ends in ``seconds``."""
        self._paused[host] = asyncio.get_running_loop().call_later(seconds, self._unpause, host)

    def _shared_pause_left(self, host: str) -> float:
        """Seconds until ``host``'s pause in the workers' table ends (0 or less: none)."""
        if self._shared is None:
            return 0.0
        now = self._monotonic()
        return self._shared.paused_until(pause_key(host), now) - now

    def _unpause(self, host: str) -> None:
        left = self._shared_pause_left(host)
        if left > 0:
            # Another worker's refusal made the pause longer since this timer
            # was set: the jobs that wait on it are offered the host at its end.
            self._end_pause_in(host, left)
            return
        del self._paused[host]
        if self._on_unpaused is not None:
            self._on_unpaused(pause_key(host))

    def ended_pauses(self, keys: Iterable[str]) -> list[str]:
        """Those of ``keys`` that are a host's pause key (:func:`pause_key`)
        whose pause is over, here and in the workers' table: jobs still
        waiting on one were deferred after its end offered the host."""
        return [k for k in keys if k.startswith(_PAUSE_PREFIX) and (host := k[len(_PAUSE_PREFIX):]) not in self._paused
                and self._shared_pause_left(host) <= 0]

    def paused(self, target: Target) -> Limit | None:
        """While ``target`` is paused after a refusal (this worker's, or
        another's in the shared table): a limit with no room that stands for
        the pause (a job waits on it as on a full limit)."""
        if target.host not in self._paused:
            # Another worker's pause: this worker's jobs that wait on it are
            # offered the host when it ends, as after a pause of its own.
            left = self._shared_pause_left(target.host)
            if left <= 0:
                return None
            self._end_pause_in(target.host, left)
        return Limit(pause_key(target.host), 0, f"refusal_pause: {target.host} refused a connection")

    def host_failed(self, target: Target, domain: str, tried: set[str]) -> bool:
        """The mail host address ``target`` failed before any SMTP command: mark
        it down (and tried by this attempt, in ``tried``). True if the domain has
        an address this attempt has not tried that is not down."""
        if target.relay:
            return False
        tried.add(target.host)
        self._down[target.host] = self._monotonic() + HOST_DOWN_SECONDS
        assert self._mx is not None
        route = self._mx.last_known(domain)
        if route is None:
            return False
        now = self._monotonic()
        return any(ip not in tried and self._down.get(ip, 0.0) <= now for host in route.hosts for ip in host.ips)

    # --- names of addresses --------------------------------------------------

    def _learn(self, ip: str, name: str) -> None:
        """``name`` is a name of ``ip``."""
        names = self._names_by_ip.setdefault(ip, set())
        if name in names:
            return
        names.add(name)
        if self._on_learned is not None:
            self._on_learned(ip, tuple(sorted(names)))

    def reconfigure(self, config: Config) -> None:
        """Retry rules, ports, pauses and host stanzas from ``config`` from
        now on (a reload); the relays, their passwords and the DNS resolver
        stay as they were at start. New host stanza names are resolved at the
        next scan."""
        known = {h.key for h in self._config.hosts}
        self._config = config
        self._unresolved_hosts += [h.key for h in config.hosts if not is_ip(h.key) and h.key not in known]

    async def learn_host_names(self) -> list[str]:
        """Resolve the host names that host stanzas use and that are not
        resolved yet, so their limits hold for every MX name that comes to the
        same address; returns those that cannot be resolved now (asked again
        at the next call). Nothing to do with a relay."""
        if self._mx is None:
            return []
        names, self._unresolved_hosts = self._unresolved_hosts, []
        results = await asyncio.gather(*(self._mx.addresses(n) for n in names), return_exceptions=True)
        for name, ips in zip(names, results, strict=True):
            if isinstance(ips, BaseException):
                self._unresolved_hosts.append(name)
                continue
            for ip in ips:
                self._learn(ip, name)
        return list(self._unresolved_hosts)

    async def learn_host_names_or_warn(self) -> None:
        """:meth:`learn_host_names`, with a warning for each name left unresolved."""
        for name in await self.learn_host_names():
            log.warning("host %s (a host stanza): cannot resolve it now (retried at each scan); "
                        "until then its limit applies by name only", name)

    def retry_host_names(self) -> None:
        """Try again, in the background, the host stanza names not resolved yet."""
        if self._unresolved_hosts and self._mx is not None and (self._host_lookup is None or self._host_lookup.done()):
            self._host_lookup = asyncio.get_running_loop().create_task(self.learn_host_names_or_warn())

    # --- lookups -------------------------------------------------------------

    @property
    def looking_up(self) -> bool:
        """Whether jobs wait for a route."""
        return bool(self._parked)

    def waits_for_route(self, domain: str) -> bool:
        """Whether jobs of ``domain`` wait for its route."""
        return domain in self._parked

    def look_up(self, item: Item) -> None:
        """Park a claimed job until its domain's route is known (one lookup per
        domain), then give it to ``on_routed``."""
        domain = item.job.domain
        parked = self._parked.setdefault(domain, [])
        parked.append(item)
        if len(parked) == 1:
            task = asyncio.get_running_loop().create_task(self._resolve(domain))
            self._lookups.add(task)
            task.add_done_callback(self._lookups.discard)

    async def _resolve(self, domain: str) -> None:
        """Look ``domain`` up, then give its parked jobs to ``on_routed``,
        :data:`ROUTED_SLICE` at a time with the event loop let run between
        (thousands of jobs may wait on one answer; the heartbeat and the open
        connections must not wait for all of them). Cancelled (the node
        stops), the jobs not given yet stay parked for :meth:`close`."""
        assert self._mx is not None
        error: DeliveryError | None = None
        try:
            await self._mx.route(domain)
        except DeliveryError as e:
            error = e
        except Exception as e:
            log.exception("MX lookup of %s failed", domain)
            error = DeliveryError(outcome.DNS_TEMPORARY.code, outcome.DNS_TEMPORARY.klass, f"DNS: lookup of {domain} failed: {e}",
                                  False, "DNS")
        while True:
            items = self._parked.pop(domain, [])
            if len(items) > ROUTED_SLICE:
                self._parked[domain] = items[ROUTED_SLICE:]  # still parked: looking_up stays true
                items = items[:ROUTED_SLICE]
            if self._on_routed is not None and items:
                self._on_routed(items, error)
            if domain not in self._parked:
                return
            await asyncio.sleep(0)

    async def close(self) -> list[Item]:
        """Stop every lookup and pause; returns the jobs still parked (to hand back)."""
        for handle in self._paused.values():
            handle.cancel()
        self._paused.clear()
        if self._host_lookup is not None:
            self._host_lookup.cancel()
        for task in list(self._lookups):
            task.cancel()
        await asyncio.gather(*self._lookups, return_exceptions=True)
        left = [item for items in self._parked.values() for item in items]
        self._parked.clear()
        return left

    # --- for explain ---------------------------------------------------------

    async def places(self, domain: str) -> list[tuple[str, Target]]:
        """Every place a connection for ``domain`` may go, each with a label:
        the relay, or each address of each mail host (looked up now; raises
        DeliveryError); then the retry relay, if there is one. Call
        :meth:`learn_host_names` first, as the node does at start."""
        out: list[tuple[str, Target]] = []
        if self.relay is not None:
            out.append((f"relay {self.relay.host}:{self.relay.port}", self.relay))
        else:
            assert self._mx is not None
            route = await self._mx.route(domain)
            labels = [f"MX {h.preference} {h.name} ({ip})" for h in route.hosts for ip in h.ips]
            out += zip(labels, self._route_targets(route), strict=True)
        if self.retry_relay is not None:
            out.append((f"retry relay {self.retry_relay.host}:{self.retry_relay.port}, for retries that an I item sends there",
                        self.retry_relay))
        return out
