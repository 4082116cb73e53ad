"""Reading a YAML file of the operator's (ruamel.yaml, round trip, so every
mapping and list knows its line): every failure is one ConfigError naming the
file and, where YAML knows it, the line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from copiamail.errors import ConfigError


def load_yaml(path: Path) -> Any:
    """The YAML tree of ``path`` (None for an empty file)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read: {e}", path) from None
    try:
        return YAML(typ="rt").load(text)
    except YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"YAML syntax: {problem}", path, line) from None
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        # ruamel's constructors: a tagged value they cannot build (!!int x,
        # a date that does not exist), or nesting too deep to read.
        raise ConfigError(f"YAML value cannot be read: {type(e).__name__}: {e}", path) from None
