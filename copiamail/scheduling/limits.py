"""Connection limits as keys with caps: which limits apply to a connection.

A connection carries one domain's mail over one binding to one host. Before it
opens, :meth:`Scopes.limits` lists every limit that applies to it (a
:class:`Limit`: a key naming what is counted, and its cap); the connection takes
one slot of every key at once, all or none (:mod:`copiamail.scheduling.limiter`
counts them), and gives them back when it closes. The keys, in acquire order:

=======================================  ======================================  ======
scope (the setting that gives the cap)   key                                     shared
=======================================  ======================================  ======
``$domain_limit`` rule (CFG, this node)  ``domain_limit:<domain>``               no
``server_max_outbound_connections``      ``server``                              yes
Binding_Group ``scope_max``              ``group_total:<group>``                 yes
Binding_Group::Domain ``scope_max``      ``group_domain:<group>:<stanza>``       regex
Binding ``scope_max``                    ``binding_total:<binding>``             yes
Binding::Domain ``scope_max``            ``binding_scope:<binding>:<stanza>``    regex
``max_outbound_connections``             ``binding_domain:<binding>:<domain>``   no
Global::Domain ``scope_max``             ``global_domain:<stanza>``              regex
Global::Host ``scope_max``               ``host:<ip>``                           yes
``cluster_scope_max`` (top level)        ``cluster:total``                       cluster
``cluster_scope_max`` (domain stanza)    ``cluster:domain:<stanza>``             cluster
``cluster_scope_max`` (host stanza)      ``cluster:host:<ip>``                   cluster
=======================================  ======================================  ======

``scope_max`` is ``scope_max_outbound_connections``, ``cluster_scope_max``
``cluster_scope_max_outbound_connections``; ``<binding>`` is
``default`` for a job without a binding. ``max_outbound_connections`` is taken
from the innermost scope that sets it (Binding::Domain, Binding,
Binding_Group::Domain, Binding_Group, Global::Domain, then the top level) and
limits each domain over each binding on its own. A regex stanza's
``scope_max_outbound_connections`` pools every domain it matches into one key
named by the stanza; an exact stanza's counts its one domain.

Workers (``workers:`` > 1): each worker process sends the domains given to
it (:mod:`~copiamail.scheduling.domain_owners`), so a key of one domain lives
in one worker. A key
that counts several domains (*shared*: the table's last column) is counted
once for the whole node, in memory the workers share
(:mod:`copiamail.scheduling.shared_slots`), so whichever worker needs a slot
may use the cap in full, and the node as a whole never exceeds it. Which
config caps are shared is decided in one place,
:meth:`~copiamail.config.Config.shared_caps`; a limit is shared when the
setting its cap comes from is one of those.

The ``cluster:`` keys count every connection of every node and worker of the
cluster: they are held in Redis (:mod:`copiamail.scheduling.cluster`), not
in the workers' table; they come last, so a connection asks Redis
only once every local limit has room. A cluster-wide message rate is the
pace ``cluster:rate:domain:<stanza>``, kept in Redis too.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from copiamail.config import BindingConfig, BindingGroupConfig, Config, DomainStanza, HostStanza, MessageRate, ScopeCaps
from copiamail.jobfile.rules import match

_SCOPE_MAX = "scope_max_outbound_connections"
CLUSTER_PREFIX = "cluster:"


def is_cluster_key(key: str) -> bool:
    """Whether limit or pace key ``key`` is held cluster-wide (in Redis)."""
    return key.startswith(CLUSTER_PREFIX)


@dataclass(frozen=True)
class Limit:
    """One counted key and its cap; ``scope`` says in words where it comes
    from. ``ceiling``: for the adaptive key of a connection (its cap learned
    from throttle replies), the configured cap; None for every other key."""

    key: str
    cap: int
    scope: str
    shared: bool = False  # counts connections of more than one domain
    ceiling: int | None = None


@dataclass(frozen=True)
class Pace:
    """A message rate a connection keeps: starts of messages counted against
    ``key`` are ``spacing`` seconds apart at least; ``scope`` says where it
    comes from."""

    key: str
    spacing: float
    scope: str


def uses_adaptive(config: Config) -> bool:
    """Whether any limit of ``config`` learns from throttle replies."""
    return (config.adaptive or any(s.caps.adaptive for s in config.domains)
            or any(h.caps.adaptive for h in config.hosts))


def adaptive_limit(limits: Sequence[Limit]) -> Limit | None:
    """The limit among ``limits`` whose cap adapts, if any."""
    return next((limit for limit in limits if limit.ceiling is not None), None)


def worker_of(key: str, workers: int) -> int:
    """A fixed worker (0 .. workers-1) for ``key``: the one that sends a job
    that cannot be read (``key``: its file name), and a domain the table of
    domain owners has no room for. Stable across runs and machines."""
    return zlib.crc32(key.encode("utf-8", "surrogatepass")) % workers


def _first(stanzas: Iterable[DomainStanza], domain: str) -> DomainStanza | None:
    # Exact stanzas come first in the tuple, then regexes in file order.
    return next((s for s in stanzas if s.matches(domain)), None)


def _domain_caps(stanzas: Iterable[DomainStanza], domain: str) -> tuple[DomainStanza | None, ScopeCaps]:
    s = _first(stanzas, domain)
    return s, (s.caps if s is not None else ScopeCaps())


def bindings_for(config: Config, binding: str | None, group: str | None) -> list[BindingConfig | None]:
    """The bindings a job may use: its EMAIL_BINDING, else every binding of its
    EMAIL_BINDING_GROUP, else of default_binding_group, else the default
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


class Scopes:
    """The limits of connections under one config, for node ``node`` (run
    as ``workers`` workers: each keeps its part of a message rate that counts
    several domains). A scheduler makes one at start:
    what does not depend on the connection (the node total, which settings
    are shared) is worked out once, not for every job."""

    def __init__(self, config: Config, node: str, workers: int = 1,
                 learned: Callable[[str, int], int] | None = None) -> None:
        """``learned(key, ceiling)``: the cap an adaptive key has learned (None:
        the configured caps hold)."""
        self._config = config
        self._learned = learned
        self._adaptive = uses_adaptive(config)
        # Whether any message rate is configured: most configs set none, and
        # then a connection's paces cost nothing to find.
        stanzas: list[DomainStanza | HostStanza | BindingConfig | BindingGroupConfig] = [
            *config.domains, *config.hosts, *config.bindings, *config.binding_groups]
        scopes: list[BindingConfig | BindingGroupConfig] = [*config.bindings, *config.binding_groups]
        stanzas += [d for scope in scopes for d in scope.domains]
        self._rates = config.max_message_rate is not None or any(
            s.caps.max_message_rate is not None or s.caps.cluster_max_message_rate is not None for s in stanzas)
        self._cluster = config.cluster is not None
        self._node = node
        self._workers = workers
        self._shared = frozenset(setting for setting, _ in config.shared_caps())
        self.server = self._limit("server", config.server_max_outbound_connections, "server_max_outbound_connections",
                                  "server_max_outbound_connections")
        # The slots of the node total kept for domains with no connection open (counted for the node).
        self.reserve = config.server_reserve_outbound_connections

    def _limit(self, key: str, cap: int, scope: str, setting: str) -> Limit:
        """A limit whose cap is the config's ``setting``: marked shared when
        :meth:`Config.shared_caps` names that setting."""
        return Limit(key, cap, scope, setting in self._shared)

    def limits(
        self,
        address: str,
        domain: str,
        binding: BindingConfig | None = None,
        host_ips: Sequence[str] = (),
        host_names: Sequence[str] = (),
    ) -> tuple[Limit, ...]:
        """Every limit a connection for ``address`` over ``binding`` to the host
        at ``host_ips`` (known by ``host_names``) must have room in, in a fixed
        order (the acquire order)."""
        config = self._config
        out: list[Limit] = []
        dl = match(config.rules.domain_limits, self._node, address)
        if dl is not None:
            # A cap of one domain: never divided (its domain has one worker).
            out.append(Limit(f"domain_limit:{dl.domain}", dl.count, f"$domain_limit {dl.rule.where()} ({dl.rule})"))
        out.append(self.server)
        bname = binding.name if binding is not None else "default"
        global_stanza, global_caps = _domain_caps(config.domains, domain)
        # max_outbound_connections: the innermost scope that sets it wins
        # (Momentum): applied here from the outside in.
        per_domain = config.max_outbound_connections
        if global_caps.max_outbound_connections is not None:
            per_domain = global_caps.max_outbound_connections
        if binding is not None:
            per_domain = self._binding_limits(out, binding, bname, domain, per_domain)
        # A cap of one domain over one binding: never divided.
        out.append(Limit(f"binding_domain:{bname}:{domain}", per_domain,
                         f"max_outbound_connections (binding {bname}, domain {domain})"))
        if global_stanza is not None and global_caps.scope_max_outbound_connections is not None:
            out.append(self._limit(f"global_domain:{global_stanza.key}", global_caps.scope_max_outbound_connections,
                                   f"Global::Domain domain.{global_stanza.key}", f"domain.{global_stanza.key}.{_SCOPE_MAX}"))
        if host_ips:
            self._host_limits(out, host_ips, host_names)
        if self._cluster:
            self._cluster_limits(out, global_stanza, host_ips, host_names)
        return self._adapted(out, domain, host_ips, host_names) if self._adaptive else tuple(out)

    def _adapted(self, out: list[Limit], domain: str, host_ips: Sequence[str], host_names: Sequence[str]) -> tuple[Limit, ...]:
        """``out`` with the adaptive key (if the destination is adaptive) marked
        and its cap lowered to what it learned. The key stands for the
        receiver: a host stanza's, else a pooled stanza's, else the domain's
        ``$domain_limit``, else its per-binding cap."""
        config = self._config
        names = {h.lower() for h in host_names}
        host_flags = [h.caps.adaptive for ip in host_ips for h in self._host_stanzas(ip, names)]
        host_on = any(host_flags) or (config.adaptive and False not in host_flags)
        stanza = _first(config.domains, domain)
        domain_on = config.adaptive if stanza is None or stanza.caps.adaptive is None else stanza.caps.adaptive
        prefixes = ["host:"] if host_on else []
        if domain_on:
            pooled = stanza is not None and stanza.pattern is not None
            prefixes += ["global_domain:"] * pooled + ["domain_limit:", "binding_domain:"]
        for prefix in prefixes:
            i = next((i for i, limit in enumerate(out) if limit.key.startswith(prefix)), None)
            if i is not None:
                limit = out[i]
                cap = self._learned(limit.key, limit.cap) if self._learned is not None else limit.cap
                scope = limit.scope if cap >= limit.cap else f"{limit.scope}, learned {cap} of {limit.cap}"
                out[i] = Limit(limit.key, min(cap, limit.cap), scope, limit.shared, limit.cap)
                break
        return tuple(out)

    def paces(self, domain: str, binding: BindingConfig | None = None,
              host_ips: Sequence[str] = (), host_names: Sequence[str] = ()) -> tuple[Pace, ...]:
        """The message rates (``max_message_rate``) a connection for ``domain``
        over ``binding`` to the host at ``host_ips`` keeps: the node's, the
        domain stanza's (a regex stanza's pooled over its domains), the
        binding group's, the binding's and their domain stanzas', the host
        stanzas'. A rate counted over several domains is divided between
        the workers, as shared caps are."""
        if not self._rates:
            return ()
        config = self._config
        found: list[tuple[str, MessageRate | None, str, bool]] = [
            ("rate:node", config.max_message_rate, "max_message_rate", True)]
        stanza = _first(config.domains, domain)
        if stanza is not None:
            pooled = stanza.pattern is not None
            found.append((f"rate:domain:{stanza.key if pooled else domain}", stanza.caps.max_message_rate,
                          f"domain.{stanza.key}.max_message_rate", pooled))
            if self._cluster:
                # Kept in Redis for every node and worker: never divided.
                found.append((f"{CLUSTER_PREFIX}rate:domain:{stanza.key}", stanza.caps.cluster_max_message_rate,
                              f"domain.{stanza.key}.cluster_max_message_rate", False))
        if binding is not None:
            group = config.binding_group(binding.group) if binding.group else None
            for kind, scope in (("group", group), ("binding", binding)):
                if scope is None:
                    continue
                found.append((f"rate:{kind}:{scope.name}", scope.caps.max_message_rate,
                              f"{kind} {scope.name} max_message_rate", True))
                inner = _first(scope.domains, domain)
                if inner is not None:
                    found.append((f"rate:{kind}:{scope.name}:{inner.key}", inner.caps.max_message_rate,
                                  f"{kind} {scope.name} domain.{inner.key}.max_message_rate", True))
        names = {h.lower() for h in host_names}
        for ip in dict.fromkeys(host_ips):
            for h in self._host_stanzas(ip, names):
                found.append((f"rate:host:{ip}", h.caps.max_message_rate, f"host.{h.key}.max_message_rate", True))
        return tuple(Pace(key, rate.spacing * (self._workers if shared else 1), where)
                     for key, rate, where, shared in found if rate is not None)

    def deliveries_per_connection(self, domain: str, binding: BindingConfig | None = None,
                                  host_ips: Sequence[str] = (), host_names: Sequence[str] = ()) -> int:
        """The messages a connection for ``domain`` over ``binding`` to the host
        at ``host_ips`` (known by ``host_names``) carries before it is closed:
        ``messages_per_connection``, lowered by ``max_deliveries_per_connection``
        at the top level and in every stanza that applies (the smallest holds:
        it is a receiver's limit, which no scope may raise)."""
        config = self._config
        caps = [config.messages_per_connection, config.max_deliveries_per_connection,
                _domain_caps(config.domains, domain)[1].max_deliveries_per_connection]
        if binding is not None:
            group = config.binding_group(binding.group) if binding.group else None
            for stanza in ([group] if group is not None else []) + [binding]:
                caps += [stanza.caps.max_deliveries_per_connection,
                         _domain_caps(stanza.domains, domain)[1].max_deliveries_per_connection]
        names = {h.lower() for h in host_names}
        caps += [h.caps.max_deliveries_per_connection for ip in host_ips for h in self._host_stanzas(ip, names)]
        return min(cap for cap in caps if cap is not None)

    def _binding_limits(self, out: list[Limit], binding: BindingConfig, bname: str, domain: str, per_domain: int) -> int:
        """Append the group and binding limits of a connection over ``binding``;
        returns its per-domain cap as those scopes set it."""
        config = self._config
        group = config.binding_group(binding.group) if binding.group else None
        if group is not None:
            where = f"binding_group.{group.name}"
            per_domain = self._stanza_limits(
                out, domain, per_domain, group.caps, group.domains, where,
                (f"group_total:{group.name}", f"Binding_Group {where} (all its bindings, all domains)"),
                (f"group_domain:{group.name}", f"Binding_Group::Domain {where}"))
        # The binding's place in the YAML file, as Config.shared_caps names it.
        where = f"binding_group.{binding.group}.binding.{bname}" if binding.group else f"binding.{bname}"
        return self._stanza_limits(
            out, domain, per_domain, binding.caps, binding.domains, where,
            (f"binding_total:{bname}", f"Binding binding {bname} (all domains)"),
            (f"binding_scope:{bname}", f"Binding::Domain binding.{bname}"))

    def _stanza_limits(self, out: list[Limit], domain: str, per_domain: int, caps: ScopeCaps,
                       domains: Iterable[DomainStanza], where: str,
                       total: tuple[str, str], per_stanza: tuple[str, str]) -> int:
        """Append the limits of a binding or binding group stanza (at ``where``
        in the YAML file): its total (``total``: key and scope) and its domain
        stanza's (``per_stanza``: key and scope, each completed by the stanza's
        key); returns the per-domain cap as that stanza sets it."""
        stanza, dcaps = _domain_caps(domains, domain)
        for cap in (caps.max_outbound_connections, dcaps.max_outbound_connections):
            if cap is not None:
                per_domain = cap
        if caps.scope_max_outbound_connections is not None:
            out.append(self._limit(total[0], caps.scope_max_outbound_connections, total[1], f"{where}.{_SCOPE_MAX}"))
        if stanza is not None and dcaps.scope_max_outbound_connections is not None:
            out.append(self._limit(f"{per_stanza[0]}:{stanza.key}", dcaps.scope_max_outbound_connections,
                                   f"{per_stanza[1]}.domain.{stanza.key}", f"{where}.domain.{stanza.key}.{_SCOPE_MAX}"))
        return per_domain

    def _host_stanzas(self, ip: str, names: set[str]) -> list[HostStanza]:
        """The host stanzas that name the address ``ip`` or one of its ``names`` (lower-case)."""
        return [h for h in self._config.hosts if h.key == ip.lower() or h.key in names]

    def _host_limits(self, out: list[Limit], host_ips: Sequence[str], host_names: Sequence[str]) -> None:
        names = {h.lower() for h in host_names}
        for ip in dict.fromkeys(host_ips):  # one key per IP, even if listed twice
            stanzas = self._host_stanzas(ip, names)
            scoped = [h for h in stanzas if h.caps.scope_max_outbound_connections is not None]
            if scoped:
                # Where two stanzas come to one IP, the smaller cap holds.
                smallest = min(scoped, key=lambda h: h.caps.scope_max_outbound_connections or 0)
                out.append(self._limit(f"host:{ip}", smallest.caps.scope_max_outbound_connections or 0,
                                       f"Global::Host host {ip}", f"host.{smallest.key}.{_SCOPE_MAX}"))


    def _cluster_limits(self, out: list[Limit], stanza: DomainStanza | None, host_ips: Sequence[str],
                        host_names: Sequence[str]) -> None:
        """Append the cluster-wide limits: the cluster's total, the domain
        stanza's (a regex stanza's pools every domain it matches), each host's."""
        config = self._config
        cap = config.cluster_scope_max_outbound_connections
        if cap is not None:
            out.append(Limit(f"{CLUSTER_PREFIX}total", cap, "cluster_scope_max_outbound_connections (every node)", True))
        if stanza is not None and (cap := stanza.caps.cluster_scope_max_outbound_connections) is not None:
            out.append(Limit(f"{CLUSTER_PREFIX}domain:{stanza.key}", cap,
                             f"domain.{stanza.key}.cluster_scope_max_outbound_connections (every node)",
                             stanza.pattern is not None))
        names = {h.lower() for h in host_names}
        for ip in dict.fromkeys(host_ips):
            caps = [c for h in self._host_stanzas(ip, names)
                    if (c := h.caps.cluster_scope_max_outbound_connections) is not None]
            if caps:
                out.append(Limit(f"{CLUSTER_PREFIX}host:{ip}", min(caps),
                                 f"host {ip} cluster_scope_max_outbound_connections (every node)", True))


def limits_for(
    config: Config,
    node: str,
    address: str,
    domain: str,
    binding: BindingConfig | None = None,
    host_ips: Sequence[str] = (),
    host_names: Sequence[str] = (),
    learned: Callable[[str, int], int] | None = None,
) -> tuple[Limit, ...]:
    """:meth:`Scopes.limits` for one connection, without a :class:`Scopes` kept
    (``explain``, tests): every limit it must have room in, in acquire order
    (the same for any number of workers); ``learned``: as for :class:`Scopes`."""
    return Scopes(config, node, learned=learned).limits(address, domain, binding, host_ips, host_names)
