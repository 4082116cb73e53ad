"""From throttled attempts to proposed ``$domain_limit`` counts, one per
recipient domain and node.

The count proposed is one below the smallest connection count a throttle
reply came at (``EMAIL_CONNECTIONS``), never below 1. Where no job of the
domain carries a count (files from CopiaFacts itself), it is one below the
limit in force. The limit in force is the count of the first
``$domain_limit`` rule that applies to the domain on that node, as the node
matches rules; where none applies, the per-domain cap
``max_outbound_connections`` as copiamail.yaml sets it for the domain.
A proposal whose count is not below the limit in force (the limit was
lowered since the replies came, by hand or by an earlier ``--write``) is
reported without a line: there is nothing to change.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from copiamail.config import Config
from copiamail.jobfile.rules import DomainLimitRule, match
from copiamail.scheduling.limits import limits_for
from copiamail.throttle import ThrottleKind

from .evidence import ANY_NODE, Throttled


@dataclass(frozen=True)
class Proposal:
    """What ``advise`` says of one domain on one node (``*``: every node).

    ``kind`` is the kind most of its replies had (``kinds``: how many of
    each); ``connections`` the smallest connection count a reply came at
    (None: no job said); ``current_limit`` the limit in force and
    ``current_source`` where it comes from; ``rule`` the ``$domain_limit``
    rule in force, if one applies; ``pooled`` the key of a domain stanza of
    copiamail.yaml that pools this domain with others (its cap counts them
    together, which no ``$domain_limit`` line can express)."""

    domain: str
    node: str
    kind: ThrottleKind
    kinds: tuple[tuple[ThrottleKind, int], ...]
    replies: int
    connections: int | None
    current_limit: int
    current_source: str
    proposed_limit: int
    first: datetime
    last: datetime
    example: str
    rule: DomainLimitRule | None = None
    pooled: str | None = None

    @property
    def text(self) -> str:
        """The rule's text: the domain with a leading ``@`` (CopiaFacts'
        advice: only the domain is then matched)."""
        return f"@{self.domain}"

    @property
    def new_rule(self) -> DomainLimitRule | None:
        """The rule to write, or None when the limit in force is already low enough."""
        if self.proposed_limit >= self.current_limit:
            return None
        return DomainLimitRule(self.node, self.text, self.proposed_limit)

    @property
    def line(self) -> str | None:
        """The ``$domain_limit`` line proposed, or None (see :attr:`new_rule`)."""
        rule = self.new_rule
        return str(rule) if rule is not None else None


def _current(config: Config, node: str, domain: str) -> tuple[int, str, DomainLimitRule | None]:
    """The limit in force for ``domain`` on ``node``, where it comes from, and its rule."""
    dl = match(config.rules.domain_limits, node, f"@{domain}")
    if dl is not None:
        return dl.count, f"{dl.rule} at {dl.rule.where()}", dl.rule
    for limit in limits_for(config, node, f"postmaster@{domain}", domain):
        if limit.key.startswith("binding_domain:"):
            return limit.cap, limit.scope, None
    return config.max_outbound_connections, "max_outbound_connections", None  # pragma: no cover - always listed


def _pooled(config: Config, domain: str) -> str | None:
    for stanza in config.domains:  # exact stanzas first, then regexes in file order, as the node tries them
        if stanza.matches(domain):
            pools = stanza.pattern is not None and stanza.caps.scope_max_outbound_connections is not None
            return stanza.key if pools else None
    return None


def _proposal(config: Config, domain: str, node: str, replies: list[Throttled]) -> Proposal:
    kinds = Counter(t.kind for t in replies)
    order = list(ThrottleKind)
    ranked = sorted(kinds.items(), key=lambda kv: (-kv[1], order.index(kv[0])))
    counts = [t.connections for t in replies if t.connections is not None]
    current, source, rule = _current(config, node, domain)
    smallest = min(counts) if counts else None
    proposed = max(1, (smallest if smallest is not None else current) - 1)
    latest = max(replies, key=lambda t: t.when)
    return Proposal(domain, node, ranked[0][0], tuple(ranked), len(replies), smallest, current, source, proposed,
                    min(t.when for t in replies), latest.when, latest.text, rule, _pooled(config, domain))


def propose(config: Config, throttled: Iterable[Throttled]) -> list[Proposal]:
    """One proposal per (domain, node) that had throttle replies, by domain,
    then node (named nodes before ``*``, whose rule must come after theirs)."""
    groups: dict[tuple[str, str], list[Throttled]] = {}
    for t in throttled:  # node names in any case are one node, as rules match them
        groups.setdefault((t.domain, t.node.lower()), []).append(t)
    keys = sorted(groups, key=lambda k: (k[0], k[1] == ANY_NODE, k[1]))
    return [_proposal(config, domain, groups[(domain, node)][0].node, groups[(domain, node)]) for domain, node in keys]
