"""Reading the tree of ``copiamail.yaml``: each value checked for its type and
range, and every error a :class:`~copiamail.errors.ConfigError` naming the
file, the line and the key. A relative path is taken from the config file's
folder (from the working folder when there is no file).
:mod:`copiamail.config_keys` says which key is read by which reader."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from ruamel.yaml.comments import CommentedMap, CommentedSeq

from copiamail.config_sections import MessageRate
from copiamail.errors import ConfigError

_PERIODS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_RATE = re.compile(r"\s*(\d+)\s*/\s*([smh])\s*", re.IGNORECASE)
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", re.IGNORECASE)


class Reader:
    """Walks the YAML tree, naming file, line and key in every error."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.base = path.parent if path is not None else Path.cwd()

    def error(self, node: Any, key: str, message: str, leaf: Any = None) -> ConfigError:
        # ``leaf`` is the key as it stands in ``node`` when it may hold a dot.
        leaf = key.rsplit(".", 1)[-1] if leaf is None else leaf
        return ConfigError(f"key '{key}': {message}", self.path, self.line(node, leaf))

    @staticmethod
    def line(node: Any, leaf: Any) -> int | None:
        """The line of key ``leaf`` in ``node`` (else of ``node`` itself)."""
        if isinstance(node, CommentedMap) and leaf in node:
            try:
                return node.lc.key(leaf)[0] + 1
            except (KeyError, TypeError, AttributeError):
                pass
        if isinstance(node, (CommentedMap, CommentedSeq)):
            return node.lc.line + 1
        return None

    def child(self, parent: CommentedMap, leaf: Any, full: str, allowed: Collection[str] | None) -> CommentedMap:
        """``parent[leaf]`` as a mapping (empty when null) with only ``allowed`` keys
        (any key when None); the error for a non-mapping names the key's line."""
        node = parent[leaf]
        if node is None:
            return CommentedMap()
        if not isinstance(node, CommentedMap):
            raise self.error(parent, full, f"must be a mapping, got {node!r}", leaf=leaf)
        return self.mapping(node, full, allowed if allowed is not None else {str(k) for k in node})

    def mapping(self, node: Any, key: str, allowed: Collection[str]) -> CommentedMap:
        if not isinstance(node, CommentedMap):
            if not key:
                raise ConfigError("the top level must be a mapping of keys", self.path, self.line(node, None) or 1)
            raise ConfigError(f"key '{key}': must be a mapping", self.path)
        for k in node:
            if str(k) not in allowed:
                raise self.error(node, f"{key}.{k}" if key else str(k), "unknown key", leaf=k)
        return node

    def integer(self, m: CommentedMap, key: str, full: str, lo: int, hi: int | None = None) -> int:
        v = m[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
            span = f"from {lo} to {hi}" if hi is not None else f"at least {lo}"
            raise self.error(m, full, f"must be an integer {span}, got {v!r}")
        return v

    def number(self, m: CommentedMap, key: str, full: str, lo: float) -> float:
        v = m[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < lo:
            raise self.error(m, full, f"must be a number of at least {lo}, got {v!r}")
        return float(v)

    def string(self, m: CommentedMap, key: str, full: str, choices: tuple[str, ...] | None = None) -> str:
        v = m[key]
        if not isinstance(v, str) or not v or "\x00" in v:
            raise self.error(m, full, f"must be a non-empty string, got {v!r}")
        if choices is not None and v not in choices:
            raise self.error(m, full, f"must be one of {', '.join(choices)}, got {v!r}")
        return v

    def boolean(self, m: CommentedMap, key: str, full: str) -> bool:
        v = m[key]
        if not isinstance(v, bool):
            raise self.error(m, full, f"must be true or false, got {v!r}")
        return v

    def pathval(self, m: CommentedMap, key: str, full: str) -> Path:
        return (self.base / self.string(m, key, full)).absolute()

    def rate(self, m: CommentedMap, key: str, full: str) -> MessageRate:
        """``"N/s"``, ``"N/m"`` or ``"N/h"`` (N at least 1)."""
        v = m[key]
        found = _RATE.fullmatch(v) if isinstance(v, str) else None
        if found is None or int(found.group(1)) < 1:
            raise self.error(m, full, f'must be a message rate such as "10/s", "300/m" or "5000/h", got {v!r}')
        return MessageRate(int(found.group(1)), _PERIODS[found.group(2).lower()])

    def duration(self, m: CommentedMap, key: str, full: str) -> float:
        """Seconds: a number, or a text such as ``"90s"``, ``"15m"``, ``"2h"``."""
        v = m[key]
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0:
            return float(v)
        found = _DURATION.fullmatch(v) if isinstance(v, str) else None
        if found is None:
            raise self.error(m, full, f'must be a duration in seconds, or such as "90s", "15m", "2h", got {v!r}')
        return float(found.group(1)) * _PERIODS.get(found.group(2).lower(), 1.0)


# How one key's value is read: ``read(reader, mapping, key, full)`` returns the
# value of ``mapping[key]`` (there, and not null), named ``full`` in errors.
Read = Callable[[Reader, CommentedMap, str, str], Any]


def integer(lo: int, hi: int | None = None) -> Read:
    return lambda r, m, key, full: r.integer(m, key, full, lo, hi)


def number(lo: float) -> Read:
    return lambda r, m, key, full: r.number(m, key, full, lo)


def choice(*choices: str) -> Read:
    return lambda r, m, key, full: r.string(m, key, full, choices)


string: Read = Reader.string
boolean: Read = Reader.boolean
path: Read = Reader.pathval
rate: Read = Reader.rate
duration: Read = Reader.duration


def values(r: Reader, m: CommentedMap, keys: Mapping[str, Read], full: str) -> dict[str, Any]:
    """What ``m`` (named ``full``) sets of ``keys``, each read by its reader, in
    the order of ``keys``; a key that is missing or null is left out (its
    field keeps its default)."""
    return {key: read(r, m, key, f"{full}.{key}" if full else key)
            for key, read in keys.items() if m.get(key) is not None}


def _required(cls: type) -> tuple[str, ...]:
    """The fields of dataclass ``cls`` that have no default."""
    return tuple(f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING)


def section(r: Reader, parent: CommentedMap, key: str, full: str, cls: type[Any],
            keys: Mapping[str, Read]) -> tuple[CommentedMap, Any]:
    """``parent[key]``, a mapping of ``keys`` only, read into dataclass ``cls``
    (whose fields without a default it must give): the mapping and the value."""
    m = r.child(parent, key, full, keys)
    for name in _required(cls):
        if m.get(name) is None:
            raise r.error(m, f"{full}.{name}", "is required")
    return m, cls(**values(r, m, keys, full))


def section_of(cls: type[Any], keys: Mapping[str, Read]) -> Read:
    """The reader of a mapping read into dataclass ``cls`` (see :func:`section`)."""
    return lambda r, m, key, full: section(r, m, key, full, cls, keys)[1]
