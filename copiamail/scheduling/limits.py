"""Connection limits as keys with caps, and the limiter that counts them.

A connection carries one domain's mail over one binding to one host. Before it
opens, :func:`limits_for` lists every limit that applies to it (a
:class:`Limit`: a key naming what is counted, and its cap); the connection takes
one slot of every key at once (all or none) and gives them back when it closes.
The scopes, from SPEC 3 and 5:

===============================  =========================================
scope                            key
===============================  =========================================
``$domain_limit`` (this node)    ``domain_limit:<domain>``
node total                       ``server``
Binding::Domain (max_outbound)   ``binding_domain:<binding>:<domain>``
Binding::Domain (scope_max)      ``binding_scope:<binding>:<stanza>``
Binding_Group::Domain            ``group_domain:<group>:<stanza>``
Global::Domain, pooled           ``global_domain:<stanza>``
Global::Host                     ``host:<ip>``
===============================  =========================================

A regex stanza's ``scope_max_outbound_connections`` pools every matching
domain into one key named by the stanza; its ``max_outbound_connections``
limits each matching domain on its own (the binding_domain key).

Workers (``workers:`` > 1): each worker process sends the domains that
:func:`worker_of` gives it, so a key of one domain lives in one worker and
keeps its whole cap. A key that counts several domains (``shared``: the node
total, binding and group totals, a regex stanza's pool, a host) is divided:
worker ``i`` of ``n`` gets ``cap // n``, plus one if ``i < cap % n``. The
workers' parts add up to the cap, so the node as a whole never exceeds it.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from copiamail.config import BindingConfig, Config, DomainStanza, ScopeCaps
from copiamail.jobfile.rules import match


@dataclass(frozen=True)
class Limit:
    """One counted key and its cap; ``scope`` says in words where it comes from."""

    key: str
    cap: int
    scope: str
    shared: bool = False  # counts connections of more than one domain


def worker_of(key: str, workers: int) -> int:
    """The worker (0 .. workers-1) that sends the jobs of domain ``key`` (a
    job that cannot be read: of its file name). Stable across runs and machines."""
    return zlib.crc32(key.encode("utf-8", "surrogatepass")) % workers


def worker_cap(cap: int, worker: int, workers: int) -> int:
    """Worker ``worker``'s part of a shared cap; the parts add up to ``cap``."""
    return cap // workers + (1 if worker < cap % workers else 0)


def _first(stanzas: Iterable[DomainStanza], domain: str) -> DomainStanza | None:
    # Exact stanzas come first in the tuple, then regexes in file order.
    return next((s for s in stanzas if s.matches(domain)), None)


def _domain_caps(stanzas: Iterable[DomainStanza], domain: str) -> tuple[DomainStanza | None, ScopeCaps]:
    s = _first(stanzas, domain)
    return s, (s.caps if s is not None else ScopeCaps())


def bindings_for(config: Config, binding: str | None, group: str | None) -> list[BindingConfig | None]:
    """The bindings a job may use (SPEC 5): its EMAIL_BINDING, else every binding
    of its EMAIL_BINDING_GROUP, else of default_binding_group, else the default
    binding (None: no source address). Raises KeyError naming what is unknown."""
    if binding:
        b = config.binding(binding)
        if b is None:
            raise KeyError(f"EMAIL_BINDING names no binding: {binding!r}")
        return [b]
    group_name = group or config.default_binding_group
    if group_name:
        g = config.binding_group(group_name)
        if g is None:
            raise KeyError(f"EMAIL_BINDING_GROUP names no binding group: {group_name!r}")
        return [config.binding(n) for n in g.bindings]
    return [None]


def limits_for(
    config: Config,
    node: str,
    address: str,
    domain: str,
    binding: BindingConfig | None = None,
    host_ips: Sequence[str] = (),
    host_names: Sequence[str] = (),
    worker: int = 0,
    workers: int = 1,
) -> tuple[Limit, ...]:
    """Every limit a connection for ``address`` over ``binding`` to the host at
    ``host_ips`` must have room in, in a fixed order (acquire order); shared
    caps as worker ``worker`` of ``workers`` holds them."""
    out: list[Limit] = []
    dl = match(config.rules.domain_limits, node, address)
    if dl is not None:
        out.append(Limit(f"domain_limit:{dl.domain}", dl.count, f"$domain_limit {dl.rule.where()} ({dl.rule})"))
    out.append(Limit("server", config.server_max_outbound_connections, "server_max_outbound_connections", True))

    bname = binding.name if binding is not None else "default"
    global_stanza, global_caps = _domain_caps(config.domains, domain)
    # max_outbound_connections: the innermost scope that sets it wins (Momentum):
    # Binding::Domain, Binding, Binding_Group::Domain, Binding_Group,
    # Global::Domain, global. Applied here from the outside in.
    per_domain = config.max_outbound_connections
    if global_caps.max_outbound_connections is not None:
        per_domain = global_caps.max_outbound_connections
    if binding is not None:
        group = config.binding_group(binding.group) if binding.group else None
        if group is not None:
            gs, gcaps = _domain_caps(group.domains, domain)
            for cap in (group.caps.max_outbound_connections, gcaps.max_outbound_connections):
                if cap is not None:
                    per_domain = cap
            if group.caps.scope_max_outbound_connections is not None:
                out.append(Limit(f"group_total:{group.name}", group.caps.scope_max_outbound_connections,
                                 f"Binding_Group binding_group.{group.name} (all its bindings, all domains)", True))
            if gs is not None and gcaps.scope_max_outbound_connections is not None:
                out.append(Limit(f"group_domain:{group.name}:{gs.key}", gcaps.scope_max_outbound_connections,
                                 f"Binding_Group::Domain binding_group.{group.name}.domain.{gs.key}", gs.pattern is not None))
        bs, bcaps = _domain_caps(binding.domains, domain)
        for cap in (binding.caps.max_outbound_connections, bcaps.max_outbound_connections):
            if cap is not None:
                per_domain = cap
        if binding.caps.scope_max_outbound_connections is not None:
            out.append(Limit(f"binding_total:{bname}", binding.caps.scope_max_outbound_connections,
                             f"Binding binding {bname} (all domains)", True))
        if bs is not None and bcaps.scope_max_outbound_connections is not None:
            out.append(Limit(f"binding_scope:{bname}:{bs.key}", bcaps.scope_max_outbound_connections,
                             f"Binding::Domain binding.{bname}.domain.{bs.key}", bs.pattern is not None))
    out.append(Limit(f"binding_domain:{bname}:{domain}", per_domain, f"max_outbound_connections (binding {bname}, domain {domain})"))
    if global_stanza is not None:
        if global_caps.scope_max_outbound_connections is not None:
            out.append(Limit(f"global_domain:{global_stanza.key}", global_caps.scope_max_outbound_connections,
                             f"Global::Domain domain.{global_stanza.key}", global_stanza.pattern is not None))
    for ip in dict.fromkeys(host_ips):  # one key per IP, even if listed twice
        names = {ip.lower(), *(h.lower() for h in host_names)}
        caps = [h.caps for h in config.hosts if h.key in names]
        scoped = [c.scope_max_outbound_connections for c in caps if c.scope_max_outbound_connections is not None]
        if scoped:
            # Where two stanzas come to one IP, the smaller cap holds (SPEC 5).
            out.append(Limit(f"host:{ip}", min(scoped), f"Global::Host host {ip}", True))
    if workers > 1:
        return tuple(replace(l, cap=worker_cap(l.cap, worker, workers)) if l.shared else l for l in out)
    return tuple(out)


class Limiter(Protocol):
    """Counts slots per key. ``try_acquire`` takes a slot of every limit or of
    none, and returns the first full limit when it takes none."""

    def try_acquire(self, limits: Sequence[Limit]) -> Limit | None: ...

    def release(self, limits: Sequence[Limit]) -> None: ...

    def in_use(self, key: str) -> int: ...


class LocalLimiter:
    """A limiter inside one node's process (one event loop: no locking needed)."""

    def __init__(self) -> None:
        self._used: dict[str, int] = {}

    def try_acquire(self, limits: Sequence[Limit]) -> Limit | None:
        need: dict[str, int] = {}
        for limit in limits:
            # A key listed twice takes two slots: check it against both.
            need[limit.key] = need.get(limit.key, 0) + 1
            if self._used.get(limit.key, 0) + need[limit.key] > limit.cap:
                return limit
        for limit in limits:
            self._used[limit.key] = self._used.get(limit.key, 0) + 1
        return None

    def release(self, limits: Sequence[Limit]) -> None:
        for limit in limits:
            n = self._used.get(limit.key, 0) - 1
            if n > 0:
                self._used[limit.key] = n
            else:
                self._used.pop(limit.key, None)

    def in_use(self, key: str) -> int:
        return self._used.get(key, 0)

    def force_acquire(self, limits: Sequence[Limit]) -> None:
        """Count connections that are already open against limits they did not
        know of when they opened (a host name learned late): the count is then
        true, and no new connection opens until it is back under the cap."""
        for limit in limits:
            self._used[limit.key] = self._used.get(limit.key, 0) + 1

    def has_room(self, limits: Sequence[Limit]) -> bool:
        return all(self._used.get(l.key, 0) < l.cap for l in limits)
