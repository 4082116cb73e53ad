"""CopiaFacts ``$domain_limit node @domain [count]`` rules.

Rules are tested in file order. The first rule whose node is ``*`` or this
node's name (case-insensitive) and whose text is a substring of the recipient
address (case-insensitive) applies; later rules are not consulted. The limit
belongs to the recipient's own domain: each domain a rule matches gets its own
limit of ``count`` connections from this node.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from copiamail.errors import ConfigError
from copiamail.jobfile.fsfile import Command


@dataclass(frozen=True)
class DomainLimitRule:
    """One ``$domain_limit`` line. ``node`` and ``text`` are kept as written."""

    node: str
    text: str
    count: int
    path: Path | None = None
    line: int | None = None

    def covers_node(self, node: str) -> bool:
        return self.node == "*" or self.node.lower() == node.lower()

    def shadows(self, later: DomainLimitRule) -> bool:
        """Whether this rule, coming first, applies to every node and address
        ``later`` would (so ``later`` can never apply)."""
        return self.covers_node(later.node) and self.text.lower() in later.text.lower()

    def where(self) -> str:
        return f"{self.path}:{self.line}" if self.path is not None else f"line {self.line}"

    def __str__(self) -> str:
        return f"$domain_limit {self.node} {self.text} {self.count}"


@dataclass(frozen=True)
class DomainLimit:
    """The outcome of matching: which rule applies, the domain it limits, its count."""

    rule: DomainLimitRule
    domain: str
    count: int


def parse_rule(cmd: Command, path: Path | None) -> DomainLimitRule:
    """A rule from a ``$domain_limit`` command; raises ConfigError naming file and line."""
    if len(cmd.args) < 2:
        raise ConfigError("$domain_limit needs: node @domain [count]", path, cmd.line)
    if len(cmd.args) > 3:
        raise ConfigError(f"$domain_limit takes at most 3 arguments, got {len(cmd.args)}", path, cmd.line)
    node, text = cmd.args[0], cmd.args[1]
    if not node or not text:
        raise ConfigError("$domain_limit node and domain text must not be empty", path, cmd.line)
    count = 1
    if len(cmd.args) == 3:
        raw = cmd.args[2]
        if not (raw.isascii() and raw.isdigit()) or int(raw) < 1:
            raise ConfigError(f"$domain_limit count must be a positive integer, got {raw!r}", path, cmd.line)
        count = int(raw)
    return DomainLimitRule(node, text, count, path, cmd.line)


def recipient_domain(address: str) -> str:
    """The domain after the last ``@``, lower-cased."""
    return address.rsplit("@", 1)[-1].lower()


def match(rules: tuple[DomainLimitRule, ...], node: str, address: str) -> DomainLimit | None:
    """The limit that applies to ``address`` on ``node``, or None when no rule applies."""
    lowered = address.lower()
    for rule in rules:
        if rule.covers_node(node) and rule.text.lower() in lowered:
            return DomainLimit(rule, recipient_domain(address), rule.count)
    return None


def shadowed(rules: tuple[DomainLimitRule, ...]) -> list[tuple[DomainLimitRule, DomainLimitRule]]:
    """Pairs ``(rule, earlier)`` where ``rule`` can never apply because ``earlier``
    applies to every node and address it would: the earlier rule's node covers
    the later one's, and its text is a substring of the later one's text."""
    out: list[tuple[DomainLimitRule, DomainLimitRule]] = []
    for i, rule in enumerate(rules):
        for earlier in rules[:i]:
            if earlier.shadows(rule):
                out.append((rule, earlier))
                break
    return out
