"""Throttle replies: SMTP replies by which a receiver says it limits us.

Receivers word this differently ("too many connections from ...", "receiving
mail too quickly", "[TSS04] temporarily deferred ..."), so a table of regular
expressions sorts a reply into one of four kinds (:class:`ThrottleKind`). The
table shipped with copiamail is ``throttle_replies.yaml`` beside this module,
each entry with the real reply it comes from; an operator's own file of the
same form (config key ``throttle_replies``) is tried first. A reply no
pattern matches is no throttle reply and keeps its plain meaning.

A pattern is searched, in any case, in the reply as one line: the code, a
space, and the text (``421 4.7.0 host Error: too many connections from
192.0.2.1``); the first entry that matches decides.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from ruamel.yaml.comments import CommentedMap, CommentedSeq

from copiamail.errors import ConfigError
from copiamail.yamlfile import load_yaml

SHIPPED_TABLE = Path(__file__).with_name("throttle_replies.yaml")


class ThrottleKind(StrEnum):
    """What a throttle reply asks of the sender."""

    CONNECTIONS = "connections"  # fewer simultaneous connections
    RATE = "rate"  # fewer messages per unit of time
    PER_CONNECTION = "per_connection"  # fewer messages on one connection
    SUSPEND = "suspend"  # nothing at all for a while


@dataclass(frozen=True)
class ThrottlePattern:
    """One entry of a table: ``pattern`` (compiled, any case), its ``kind``,
    and where it was written (``path``, ``line``) or where its text comes
    from (``source``)."""

    pattern: re.Pattern[str]
    kind: ThrottleKind
    source: str = ""
    path: Path | None = None
    line: int | None = None


@dataclass(frozen=True)
class ThrottleTable:
    """Patterns tried in order; the operator's own come before the shipped ones."""

    patterns: tuple[ThrottlePattern, ...]

    def match(self, code: int, text: str) -> ThrottlePattern | None:
        """The entry that classifies the reply ``code text``, or None. Only
        refusals (4xx and 5xx) can be throttle replies."""
        if code < 400:
            return None
        reply = f"{code} {text}"
        for entry in self.patterns:
            if entry.pattern.search(reply):
                return entry
        return None

    def kind(self, code: int, text: str) -> ThrottleKind | None:
        """The kind of the reply ``code text``, or None if it is no throttle reply."""
        entry = self.match(code, text)
        return entry.kind if entry is not None else None

    def before(self, first: tuple[ThrottlePattern, ...]) -> ThrottleTable:
        """This table with ``first`` tried ahead of it."""
        return ThrottleTable(first + self.patterns)


_KINDS = ", ".join(k.value for k in ThrottleKind)


def read_patterns(path: Path) -> tuple[ThrottlePattern, ...]:
    """The entries of a throttle-reply file: a YAML list of mappings with
    ``pattern`` (a regular expression) and ``kind`` (one of the four kinds),
    and optionally ``source`` (where the reply's text comes from). Raises a
    ConfigError naming the file and the line of the first bad entry."""
    data = load_yaml(path)
    if data is None:
        return ()
    if not isinstance(data, CommentedSeq):
        raise ConfigError("must be a list of {pattern: REGEX, kind: KIND} entries", path, 1)
    out = []
    for i, entry in enumerate(data):
        line = data.lc.item(i)[0] + 1
        if not isinstance(entry, CommentedMap) or set(entry) - {"pattern", "kind", "source"}:
            raise ConfigError("an entry has the keys pattern, kind and (optionally) source", path, line)
        pattern, kind, source = entry.get("pattern"), entry.get("kind"), entry.get("source", "")
        if not isinstance(pattern, str) or not pattern:
            raise ConfigError("an entry needs a pattern (a regular expression)", path, line)
        try:
            compiled = re.compile(pattern, re.IGNORECASE)
        except re.error as e:
            raise ConfigError(f"pattern {pattern!r} is no regular expression: {e}", path, line) from None
        if kind not in {k.value for k in ThrottleKind}:
            raise ConfigError(f"kind must be one of {_KINDS}, got {kind!r}", path, line)
        if not isinstance(source, str):
            raise ConfigError("source must be a text", path, line)
        out.append(ThrottlePattern(compiled, ThrottleKind(kind), source, path, line))
    return tuple(out)


def shipped_table() -> ThrottleTable:
    """The table shipped with copiamail (``throttle_replies.yaml``)."""
    return ThrottleTable(read_patterns(SHIPPED_TABLE))
