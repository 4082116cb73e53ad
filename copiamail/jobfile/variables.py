"""CopiaFacts variables on e-mail commands: `` `NAME `` expanded to its value.

A reference is a grave accent followed by a name of letters, digits and ``_``
(case-insensitive, at most 32 characters), optionally followed by a width:
``{30}`` cuts the value to 30 characters, ``{30+}`` also pads it with spaces
to 30. A grave accent followed by ``"`` stands for a literal ``"`` (the older
way to write a quote inside a quoted argument). A grave accent followed by
anything else is kept as it is.

A value that starts with ``^`` is itself expanded once (its own references
are replaced; what they bring in is not expanded again). A reference to a name
no source defines raises :class:`UndefinedVariable`: raw template codes must
never reach a recipient.

Where the values come from, highest first, is the caller's business (the FS
file's ``$var_def``, the CFG's, config ``variables:``, the engine's own):
:func:`expand` takes one lookup.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

from copiamail.errors import CopiamailError

GRAVE = "`"
_REFERENCE = re.compile(r'`(?:(")|([A-Za-z0-9_]{1,32})(?:\{(\d{1,4})(\+?)\})?)')

# Path variables: at the start of a path and followed by a backslash they
# expand without the grave accent too (CopiaFacts writes `FFJOBS\...` and
# FFJOBS\... alike in its own files).
PATH_VARIABLES = ("FFBASE", "FFUSER", "FFJOBS", "FFREQ", "FFLOG", "FFPO", "PFC")
_PATH_START = re.compile(rf"({'|'.join(PATH_VARIABLES)})\\", re.IGNORECASE)


class UndefinedVariable(CopiamailError, KeyError):
    """A `` `NAME `` that no source defines; ``name`` is the name as written."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"undefined variable `{name}")

    def __str__(self) -> str:
        return f"undefined variable `{self.name}"


def expand(text: str, lookup: Callable[[str], str | None]) -> str:
    """``text`` with every reference replaced (see the module doc);
    ``lookup`` takes an upper-case name and returns its value or None."""
    if GRAVE not in text:
        return text
    return _expand(text, lookup, again=True)


def _expand(text: str, lookup: Callable[[str], str | None], again: bool) -> str:
    def one(m: re.Match[str]) -> str:
        if m.group(1) is not None:
            return '"'
        name = m.group(2)
        value = lookup(name.upper())
        if value is None:
            raise UndefinedVariable(name)
        if again and value.startswith("^"):
            value = _expand(value[1:], lookup, again=False)
        if m.group(3) is not None:
            width = int(m.group(3))
            value = value[:width]
            if m.group(4):
                value = value.ljust(width)
        return value

    return _REFERENCE.sub(one, text)


def expand_path(path: str, lookup: Callable[[str], str | None]) -> str:
    """A job's file path with its references expanded, and a path variable
    written without the grave accent at its start (``FFJOBS\\x.pdf``)
    replaced where a source defines it."""
    m = _PATH_START.match(path)
    if m is not None:
        value = lookup(m.group(1).upper())
        if value is not None:
            path = value.rstrip("\\/") + "\\" + path[m.end():]
    return expand(path, lookup)


def starts_with_path_variable(path: str) -> bool:
    return _PATH_START.match(path) is not None


def chained(*sources: Mapping[str, str]) -> Callable[[str], str | None]:
    """A lookup asking each mapping (keys upper-case) in turn."""
    def lookup(name: str) -> str | None:
        for source in sources:
            value = source.get(name)
            if value is not None:
                return value
        return None
    return lookup
