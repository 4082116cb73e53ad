"""Where a proposed ``$domain_limit`` rule goes in the CFG file, and the file
with it written in.

Rules are tried in file order, and a rule can never apply when an earlier
one's node covers its node and the earlier one's text is a substring of its
text (``check-config`` warns of it). A new rule R therefore goes just before
the first rule that would shadow it (call it E): no rule before it shadows
it, and it shadows no rule that was not shadowed already (a rule after R
that R would shadow, E shadows too, E's text being part of R's). Where no
rule shadows R, it goes after the last ``$domain_limit`` line (rules stay
together, and it comes after every rule it could shadow), or at the end of
a file that has none.

One case cannot be inserted cleanly: E is R's own rule, the same node and
text (in any case). R before it would make it dead, R after it would be
dead. Then E's count is changed in place: only the count's characters of
that one line change; its spelling, spacing, comment and line ending stay.

Every other line is kept byte for byte, each inserted line takes the line
ending of the line it goes before (a CRLF file stays CRLF), and a last line
without a line ending gets one only when a rule goes after it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from copiamail.errors import ConfigError, SyntaxFileError
from copiamail.jobfile.fsfile import CommandFile, tokenize
from copiamail.jobfile.rules import DomainLimitRule, parse_rule
from copiamail.osutil import replace_file

INSERT = "insert"
UPDATE = "update"


@dataclass(frozen=True)
class Placement:
    """Where ``rule`` went: ``insert`` before ``anchor`` (None: after the
    last rule, or at the end of the file), or ``update`` of ``anchor``'s
    count. ``anchor`` is the rule as the file held it then."""

    rule: DomainLimitRule
    action: str
    anchor: DomainLimitRule | None


def rules_of(cf: CommandFile) -> list[DomainLimitRule]:
    """The ``$domain_limit`` rules of a CFG file, with their lines. Raises
    ConfigError naming the file and line of a bad one."""
    try:
        commands = cf.commands()
    except SyntaxFileError as e:
        raise ConfigError(e.message, cf.path, e.line) from None
    path = Path(cf.path) if cf.path is not None else None
    return [parse_rule(c, path) for c in commands if c.name == "domain_limit"]


def _same(a: DomainLimitRule, b: DomainLimitRule) -> bool:
    return a.node.lower() == b.node.lower() and a.text.lower() == b.text.lower()


def _ending(raw: str, default: str) -> str:
    if raw.endswith("\r\n"):
        return "\r\n"
    return "\n" if raw.endswith("\n") else default


def _with_count(raw: str, count: int) -> str:
    """Line ``raw`` (a ``$domain_limit`` line) with its count set to
    ``count``; every other character kept."""
    body = raw[:-1] if raw.endswith("\n") else raw
    body = body[:-1] if body.endswith("\r") else body
    ending = raw[len(body):]
    tokens = tokenize(body, keep_quotes=True)
    # Tokens as written, in order, with only blanks between: each is found
    # verbatim after the end of the one before.
    ends, at = [], 0
    for token in tokens:
        at = body.index(token, at) + len(token)
        ends.append(at)
    if len(tokens) >= 4:
        start = ends[3] - len(tokens[3])
        body = body[:start] + str(count) + body[ends[3]:]
    else:  # no count written: it was 1
        body = body[:ends[2]] + f" {count}" + body[ends[2]:]
    return body + ending


def place(cf: CommandFile, rule: DomainLimitRule) -> tuple[CommandFile, Placement]:
    """``cf`` with ``rule`` written where no earlier rule shadows it and it
    shadows no rule that applied (see the module's docstring)."""
    rules = rules_of(cf)
    lines = list(cf.lines)
    first = next((r for r in rules if r.shadows(rule)), None)
    if first is not None and first.line is not None:
        i = first.line - 1
        if _same(first, rule):
            lines[i] = _with_count(lines[i], rule.count)
            placement = Placement(rule, UPDATE, first)
        else:
            lines.insert(i, str(rule) + _ending(lines[i], cf.newline))
            placement = Placement(rule, INSERT, first)
    else:
        at = len(lines)
        if rules and rules[-1].line is not None:
            at = rules[-1].line
        if at > 0 and not lines[at - 1].endswith("\n"):
            lines[at - 1] += "\n" if lines[at - 1].endswith("\r") else cf.newline
        lines.insert(at, str(rule) + (_ending(lines[at - 1], cf.newline) if at > 0 else cf.newline))
        placement = Placement(rule, INSERT, None)
    return CommandFile(tuple(lines), cf.encoding, cf.bom, cf.path), placement


def place_all(cf: CommandFile, rules: Iterable[DomainLimitRule]) -> tuple[CommandFile, list[Placement]]:
    """``cf`` with each of ``rules`` placed in turn (:func:`place`), and where each went."""
    placements = []
    for rule in rules:
        cf, placement = place(cf, rule)
        placements.append(placement)
    return cf, placements


def read_cfg(path: Path) -> CommandFile:
    """The CFG file as exact text; a ConfigError naming it if it cannot be read."""
    try:
        return CommandFile.read(path)
    except OSError as e:
        raise ConfigError(f"cannot read CFG file: {e.strerror or e}", path) from None


def write_cfg(path: Path, cf: CommandFile) -> None:
    """Replace the CFG file by ``cf`` at once (a temporary file beside it,
    then a rename), keeping its permissions: a node starting meanwhile reads
    the old file or the new one, never half of one."""
    try:
        replace_file(path, cf.to_bytes(), path.stat().st_mode & 0o7777)
    except OSError as e:
        raise ConfigError(f"cannot write CFG file: {e.strerror or e}", path) from None
