"""MX lookup for direct delivery, with dnspython's async resolver (RFC 5321 5.1).

A domain's :class:`Route` is its MX hosts by preference, each with its IPv4
addresses. A domain with no MX record (NODATA) is its own mail host (the A
record, preference 0). A null MX (RFC 7505, ``0 .``) means the domain takes no
mail. Results are cached for their TTL (at most ``max_cache`` seconds); one
lookup per domain runs at a time, however many jobs wait for it.

Failures come out as :class:`~copiamail.errors.DeliveryError` of class D. A
domain that does not exist (NXDOMAIN, outcome 80) or takes no mail (null MX,
82) is final: the job fails at once, as Postfix bounces it; a lookup that fails or times out
(SERVFAIL, no answer), a mail host name that does not exist and a domain
whose mail hosts have no address (81) are retried like any temporary failure.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.rdatatype
import dns.resolver

from copiamail.config import DnsConfig
from copiamail.errors import DeliveryError
from copiamail.jobfile import outcome


@dataclass(frozen=True)
class MxHost:
    name: str
    preference: int
    ips: tuple[str, ...]


@dataclass(frozen=True)
class Route:
    domain: str
    hosts: tuple[MxHost, ...]
    expires: float


def _error(code: outcome.OutcomeCode, text: str, permanent: bool = False) -> DeliveryError:
    return DeliveryError(code.code, code.klass, text, permanent, stage="DNS")


class MxResolver:
    """Looks up and caches routes. Used from one event loop."""

    def __init__(self, config: DnsConfig, max_cache: float = 300.0, clock: Callable[[], float] = time.monotonic) -> None:
        resolver = dns.asyncresolver.Resolver(configure=not config.nameservers)
        if config.nameservers:
            resolver.nameservers = list(config.nameservers)
        resolver.port = config.port
        resolver.timeout = config.timeout
        resolver.lifetime = config.timeout
        self._resolver = resolver
        self._max_cache = max_cache
        self._clock = clock
        self._cache: dict[str, Route] = {}
        self._pending: dict[str, asyncio.Future[Route]] = {}

    def cached(self, domain: str) -> Route | None:
        """The route if it is known and fresh; None means a lookup is needed."""
        route = self._cache.get(domain)
        if route is not None and route.expires > self._clock():
            return route
        return None

    def last_known(self, domain: str) -> Route | None:
        """The route as last looked up, fresh or not (for jobs already waiting)."""
        return self._cache.get(domain)

    async def route(self, domain: str) -> Route:
        """The domain's route; raises DeliveryError (class D)."""
        fresh = self.cached(domain)
        if fresh is not None:
            return fresh
        pending = self._pending.get(domain)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[Route] = asyncio.get_running_loop().create_future()
        self._pending[domain] = future
        try:
            route = await self._lookup(domain)
        except DeliveryError as e:
            future.set_exception(e)
            future.exception()  # retrieved here; waiters re-raise it
            raise
        finally:
            del self._pending[domain]
        self._cache[domain] = route
        future.set_result(route)
        return route

    async def _query(self, name: str, rtype: str) -> dns.resolver.Answer:
        try:
            return await self._resolver.resolve(name, rtype, search=False)
        except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
            raise
        except dns.exception.Timeout:
            raise _error(outcome.DNS_TEMPORARY, f"DNS: {rtype} lookup of {name} timed out") from None
        except dns.exception.DNSException as e:
            raise _error(outcome.DNS_TEMPORARY, f"DNS: {rtype} lookup of {name} failed: {e}") from None

    async def addresses(self, name: str) -> tuple[str, ...]:
        """A host name's IPv4 addresses (none for a name without A records);
        raises DeliveryError (class D)."""
        return (await self._addresses(name))[0]

    async def _addresses(self, name: str) -> tuple[tuple[str, ...], float]:
        try:
            answer = await self._query(name, "A")
        except dns.resolver.NoAnswer:
            return (), self._max_cache
        except dns.resolver.NXDOMAIN:
            # A mail host's name, not the recipient domain: a fault of the
            # domain's DNS that its owner may mend, so not final.
            raise _error(outcome.DNS_TEMPORARY, f"DNS: {name}: no such host (NXDOMAIN)") from None
        return tuple(r.address for r in answer), float(answer.rrset.ttl if answer.rrset is not None else 0)

    async def _lookup(self, domain: str) -> Route:
        ttl = self._max_cache
        try:
            answer = await self._query(domain, "MX")
            records = sorted(answer, key=lambda r: (r.preference, r.exchange.to_text()))
            if answer.rrset is not None:
                ttl = min(ttl, float(answer.rrset.ttl))
        except dns.resolver.NoAnswer:
            records = []
        except dns.resolver.NXDOMAIN:
            raise _error(outcome.DNS_FAILED, f"DNS: {domain}: no such domain (NXDOMAIN)", permanent=True) from None
        if len(records) == 1 and records[0].exchange.to_text() == ".":
            raise _error(outcome.NULL_MX, f"DNS: {domain} accepts no mail (null MX, RFC 7505)", permanent=True)
        targets = [(r.preference, r.exchange.to_text().rstrip(".").lower()) for r in records if r.exchange.to_text() != "."]
        if not records:
            targets = [(0, domain)]
        lookups = await asyncio.gather(*(self._addresses(name) for _, name in targets), return_exceptions=True)
        hosts: list[MxHost] = []
        first_error: DeliveryError | None = None
        for (preference, name), result in zip(targets, lookups, strict=True):
            if isinstance(result, DeliveryError):
                first_error = first_error or result
                continue
            if isinstance(result, BaseException):
                raise result
            ips, host_ttl = result
            ttl = min(ttl, host_ttl)
            if ips:
                hosts.append(MxHost(name, preference, ips))
        if not hosts:
            if first_error is not None:
                raise first_error
            names = ", ".join(n for _, n in targets)
            raise _error(outcome.DNS_TEMPORARY, f"DNS: no address for any mail host of {domain} ({names})")
        return Route(domain, tuple(hosts), self._clock() + max(ttl, 1.0))
