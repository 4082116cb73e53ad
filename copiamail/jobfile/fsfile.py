"""The CopiaFacts command syntax, shared by FS jobs and the CFG file.

A file is a sequence of lines. A line is blank, a comment (``;`` first), or one
command: ``$name arg arg ...``. Arguments are separated by spaces or tabs; one
with spaces is written in double quotes, a ``"`` inside quotes as ``""``. A
``;`` at the start of a line or after white space begins a comment, except
inside quotes, and so does ``/*`` (CopiaFacts). Command names are case-insensitive.

:class:`CommandFile` keeps the file's exact text (every line with its own line
ending, the BOM, the encoding) so that ``CommandFile.parse(b).to_bytes() == b``
for any bytes ``b``. The engine edits a file only through
:meth:`CommandFile.edited`, which in one pass appends lines, sets variables
and sets single-valued commands (each in place where the file has it),
touching only those lines and keeping every other line as it was. Its result
is that of :meth:`~CommandFile.append_command`, :meth:`~CommandFile.set_var`
and :meth:`~CommandFile.set_command` (one line each) called in turn.

Encoding: UTF-8 (a BOM is allowed); bytes that are not valid UTF-8 are read as
cp1252. Bytes cp1252 leaves undefined survive as surrogate escapes, so even
binary junk round-trips; :meth:`commands` then refuses it with a clear error.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from copiamail.errors import SyntaxFileError

_BOM = b"\xef\xbb\xbf"
_SPACE = " \t"


class Command(NamedTuple):
    """One parsed command line: ``name`` lower-case without ``$``; ``line`` 1-based.

    A named tuple rather than a frozen dataclass: a job has a few dozen lines
    and is parsed at every claim, and a tuple is several times cheaper to make."""

    name: str
    args: tuple[str, ...]
    line: int


# Command(...) without the named tuple's Python-level __new__: a job has a few
# dozen lines and is parsed at every claim.
_command = functools.partial(tuple.__new__, Command)

# A token is a run of unquoted characters and quoted parts; inside quotes
# ``""`` is one ``"``. The alternatives are tried in this order, so a ``""``
# inside quotes is always read as an escaped quote, as the syntax says.
# Inside quotes, a grave accent followed by one quote is that quote, kept as
# the two characters (CopiaFacts' older escape, which its variable expansion
# turns into a quote); before a doubled quote it is a plain character.
_IN_QUOTES = r'[^"`]*(?:(?:`(?="")|`"|`(?!")|"")[^"`]*)*'
_TOKEN = re.compile(rf'(?:[^ \t"]+|"{_IN_QUOTES}")+')
_QUOTED_PART = re.compile(rf'"({_IN_QUOTES})"|([^"]+)')
_GAPS = re.compile(r"[ \t]+")
# An argument written as it is: no blank, quote, comment start or line break.
_PLAIN_ARG = re.compile(r'(?!/\*)[^ \t";\r\n]+\Z')
_GAP = re.compile(r"[ \t]*")
# The common job line, ``$name "text"``, with no quote inside the text and no
# grave accent before its closing quote (which would make that a literal quote).
_NAME_AND_QUOTED = re.compile(r'[ \t]*(\$[^ \t";][^ \t"]*)[ \t]+"([^"]*)(?<!`)"(?:[ \t]*|[ \t]+(?:;|/\*).*)')
# The same line whole, with its line ending: what commands() reads without
# tokenizing. After the closing quote only blanks, or blanks and a comment.
_NAME_AND_QUOTED_LINE = re.compile(r'[ \t]*\$([^ \t";][^ \t"]*)[ \t]+"([^"]*)(?<!`)"(?:[ \t]*|[ \t]+(?:;|/\*)[^\n]*)\r?\n?')
# NUL, or a byte that cp1252 leaves undefined (read as a surrogate escape).
_BINARY = re.compile("[\x00\udc80-\udcff]")


def _unquote(token: str) -> str:
    if '"' not in token:
        return token
    return "".join(m.group(2) if m.group(1) is None else m.group(1).replace('""', '"')
                   for m in _QUOTED_PART.finditer(token))


def tokenize(text: str, line: int = 0, path: Path | str | None = None, keep_quotes: bool = False) -> list[str]:
    """Split one line (without its line ending) into its arguments; with
    ``keep_quotes``, each token as written (its double quotes kept).

    Raises :class:`SyntaxFileError` for an unterminated quote.
    """
    tokens: list[str] = []
    simple = _NAME_AND_QUOTED.fullmatch(text)
    if simple is not None:
        return [simple.group(1), f'"{simple.group(2)}"' if keep_quotes else simple.group(2)]
    if '"' not in text:
        for token in _GAPS.split(text):
            if not token:
                continue
            if token[0] == ";" or token.startswith("/*"):
                break
            tokens.append(token)
        return tokens
    i, n = 0, len(text)
    while True:
        i = _GAP.match(text, i).end()  # type: ignore[union-attr]  # [ \t]* matches anywhere, if only empty
        if i >= n or text[i] == ";" or text.startswith("/*", i):
            return tokens
        m = _TOKEN.match(text, i)
        if m is None or (m.end() < n and text[m.end()] == '"'):
            raise SyntaxFileError("unterminated quote", path, line)
        tokens.append(m.group() if keep_quotes else _unquote(m.group()))
        i = m.end()


def format_arg(value: str) -> str:
    """Write one argument so that :func:`tokenize` reads it back as ``value``.

    A line cannot hold a line break, so CR and LF become spaces.
    """
    if _PLAIN_ARG.match(value):
        return value
    value = value.replace("\r\n", " ").replace("\r", " ").replace("\n", " ")
    if value and not any(c in value for c in ' \t";') and not value.startswith("/*"):
        return value
    # Trailing grave accents go after the closing quote: inside, the last
    # one and that quote would read as a literal quote.
    body = value.rstrip("`")
    return '"' + body.replace('"', '""') + '"' + value[len(body):]


class WrittenLine(str):
    """A command line already written (by :func:`format_command` rules),
    for :meth:`CommandFile.edited` to append as it is."""


def format_command(name: str, *args: str) -> str:
    """One command line's text, without its line ending."""
    return " ".join(["$" + name] + [format_arg(a) for a in args])


def _split_lines(text: str) -> tuple[str, ...]:
    # Only LF ends a line: str.splitlines would also split on VT, FF, U+2028...
    # and so change the file on the way back.
    parts = text.split("\n")
    lines = [p + "\n" for p in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return tuple(lines)


@functools.lru_cache(maxsize=64)
def _candidates(names: frozenset[str]) -> re.Pattern[str]:
    """Lines whose command may be one of ``names``: the first token is one of
    them (any case), or holds a quote (then only the tokenizer can tell)."""
    alternatives = "|".join(re.escape(n) for n in sorted(names))
    return re.compile(rf'[ \t]*\$(?:(?:{alternatives})(?=[ \t]|\r?\n?$)|[^ \t\r\n"]*")', re.IGNORECASE)


@functools.lru_cache(maxsize=64)
def _any_candidate(names: frozenset[str]) -> re.Pattern[str]:
    """Whether a text may hold a line :func:`_candidates` takes: any ``$``
    followed by one of ``names``, or by a token that holds a quote, anywhere
    (it may say yes where no line is one, never no where one is). A literal
    ``$`` to look for makes one search of a whole job cheaper than a match
    at the start of each of its lines."""
    alternatives = "|".join(re.escape(n) for n in sorted(names))
    return re.compile(rf'\$(?:{alternatives}|[^ \t\r\n"]*")', re.IGNORECASE)


def _newline(lines: tuple[str, ...] | list[str]) -> str:
    for raw in lines:
        if raw.endswith("\n"):
            return "\r\n" if raw.endswith("\r\n") else "\n"
    return "\n"


def _append_line(lines: list[str], text: str) -> None:
    """Append ``text`` as a line, ending as the file's lines end as they stand
    (a previous addition may have ended a cut last line)."""
    newline = _newline(lines)
    if lines and not lines[-1].endswith("\n"):
        # A last line cut after its CR only needs the LF: adding a whole
        # ending would turn that CR into part of the line's text.
        lines[-1] += "\n" if lines[-1].endswith("\r") else newline
    lines.append(text + newline)


def _replaced(old: str, text: str) -> str:
    """Line ``old`` with its command replaced by ``text``: its indentation and
    its line ending kept."""
    return old[: len(old) - len(old.lstrip(_SPACE))] + text + old[len(_body(old)):]


def _body(raw: str) -> str:
    if raw.endswith("\n"):
        raw = raw[:-1]
    if raw.endswith("\r"):
        raw = raw[:-1]
    return raw


def _key(raw: str) -> tuple[str, str] | None:
    """The (command, variable) a line sets, for finding lines to edit; None if none."""
    text = raw.lstrip(_SPACE)
    if not text.startswith("$"):
        return None
    try:
        tokens = tokenize(_body(text))
    except SyntaxFileError:
        return None
    if not tokens:
        return None
    name = tokens[0][1:].lower()
    if name == "var_def":
        return (name, tokens[1].upper() if len(tokens) > 1 else "")
    return (name, "")


@dataclass(frozen=True)
class CommandFile:
    """An FS or CFG file as exact text, readable as commands and editable by line."""

    lines: tuple[str, ...]
    encoding: str = "utf-8"
    bom: bool = False
    # As the caller named it (a job's path stays a str: a Path for every
    # file read costs more than the reading): for error messages only.
    path: Path | str | None = field(default=None, compare=False)

    @functools.cached_property
    def text(self) -> str:
        """The whole text (the lines joined): one search in it is cheaper than one per line."""
        return "".join(self.lines)

    @classmethod
    def parse(cls, data: bytes, path: Path | str | None = None) -> CommandFile:
        """Read bytes; never fails (errors surface in :meth:`commands`)."""
        bom = data.startswith(_BOM)
        if bom:
            data = data[len(_BOM):]
        try:
            text, encoding = data.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            text, encoding = data.decode("cp1252", errors="surrogateescape"), "cp1252"
        return cls(_split_lines(text), encoding, bom, path)

    @classmethod
    def read(cls, path: Path | str, size: int | None = None) -> CommandFile:
        """Read a file from disk (an OSError propagates to the caller);
        ``size``: its size as last seen, if known (:func:`read_bytes`)."""
        return cls.parse(read_bytes(path, size), path)

    def to_bytes(self) -> bytes:
        data = "".join(self.lines).encode(self.encoding, errors="surrogateescape")
        return _BOM + data if self.bom else data

    @property
    def newline(self) -> str:
        """The file's line ending: that of its first line, LF for a file with none."""
        return _newline(self.lines)

    def commands(self) -> list[Command]:
        """Every command in file order; the first bad line raises SyntaxFileError."""
        out: list[Command] = []
        # Text decoded as UTF-8 holds no surrogate escapes: only a NUL can make it binary.
        suspect = self.encoding != "utf-8" or "\x00" in self.text
        fast = None if suspect else _NAME_AND_QUOTED_LINE.fullmatch
        for number, raw in enumerate(self.lines, 1):
            if fast is not None and (m := fast(raw)) is not None:
                # Most job lines: `$name "text"` (test_fsfile holds this to the
                # general reader below).
                out.append(_command((m.group(1).lower(), (m.group(2),), number)))
                continue
            text = _body(raw)
            if suspect and _BINARY.search(text):
                raise SyntaxFileError("binary data, not a command file", self.path, number)
            stripped = text.strip(_SPACE)
            if not stripped or stripped.startswith((";", "/*")):
                continue
            if not stripped.startswith("$"):
                shown = stripped if len(stripped) <= 40 else stripped[:40] + "..."
                raise SyntaxFileError(f"expected a $command, found {shown!r}", self.path, number)
            tokens = tokenize(text, number, self.path)
            name = tokens[0][1:].lower()
            if not name:
                raise SyntaxFileError("a '$' without a command name", self.path, number)
            out.append(Command(name, tuple(tokens[1:]), number))
        return out

    def as_written(self, command: Command) -> str:
        """The arguments of ``command`` as the file writes them: its tokens
        with their double quotes, joined by single spaces (CopiaFacts reads
        addresses this way: quotes pass through to the header as they are)."""
        raw = self.lines[command.line - 1]
        if '"' not in raw:
            return " ".join(command.args)
        tokens = tokenize(_body(raw), command.line, self.path, keep_quotes=True)
        return " ".join(tokens[1:])

    def _sanitize(self, value: str) -> str:
        # A value the file's encoding cannot hold is written with '?' rather than
        # failing the write-back of a job that must not be lost; so is a NUL,
        # which would make commands() refuse the job as binary on its next read.
        value = value.replace("\x00", "?")
        if self.encoding == "utf-8":
            return value.encode("utf-8", errors="replace").decode("utf-8")
        return value.encode(self.encoding, errors="replace").decode(self.encoding)

    def _replace_or_append(self, key: tuple[str, str], text: str) -> CommandFile:
        text = self._sanitize(text)
        lines = list(self.lines)
        for i in range(len(lines) - 1, -1, -1):
            # The name must appear in the line: a cheap test before tokenizing it.
            if key[0] in lines[i].lower() and _key(lines[i]) == key:
                lines[i] = _replaced(lines[i], text)
                return CommandFile(tuple(lines), self.encoding, self.bom, self.path)
        _append_line(lines, text)
        return CommandFile(tuple(lines), self.encoding, self.bom, self.path)

    def edited(self, append: tuple[tuple[str, tuple[str | int, ...]] | WrittenLine, ...] = (),
               variables: tuple[tuple[str, str | int], ...] = (),
               commands: tuple[tuple[str, tuple[str | int, ...]], ...] = (),
               moved: tuple[str, ...] = ()) -> CommandFile:
        """:meth:`append_command` for each of ``append``, then :meth:`set_var`
        for each of ``variables``, then :meth:`set_command` for each of
        ``commands``, in one pass over the lines (the same result as the calls
        one after another; each variable and command at most once). The
        commands named in ``moved`` are not set in place: their last
        occurrence is removed and they are appended at the end."""
        wanted: dict[tuple[str, str], str] = {}
        for name, value in variables:
            wanted[("var_def", name.upper())] = self._sanitize(format_command("var_def", name, str(value)))
        for name, args in commands:
            wanted[(name.lower(), "")] = self._sanitize(format_command(name, *(str(a) for a in args)))
        assert len(wanted) == len(variables) + len(commands), "each variable and command at most once"
        names = frozenset(k[0] for k in wanted)
        candidate = _candidates(names).match
        lines = list(self.lines)
        found: set[tuple[str, str]] = set()
        removed: list[int] = []
        # Most jobs set none of these yet (a first attempt): one search of the
        # whole text then spares a look at each line.
        start = len(lines) - 1 if wanted and _any_candidate(names).search(self.text) is not None else -1
        for i in range(start, -1, -1):
            if len(found) == len(wanted):
                break
            if candidate(lines[i]) is None:
                continue
            key = _key(lines[i])
            if key in wanted and key not in found:
                found.add(key)
                if key[0] in moved and not key[1]:
                    removed.append(i)
                    continue
                lines[i] = _replaced(lines[i], wanted[key])
        for i in removed:  # from the end: earlier indexes stay valid
            del lines[i]
        found = {k for k in found if not (k[0] in moved and not k[1])}
        added = [self._sanitize(item if isinstance(item, WrittenLine) else format_command(item[0], *(str(a) for a in item[1])))
                 for item in append]
        added += [text for key, text in wanted.items() if key not in found]
        for text in added:
            _append_line(lines, text)
        return CommandFile(tuple(lines), self.encoding, self.bom, self.path)

    def set_var(self, name: str, value: str | int) -> CommandFile:
        """Update the (last) ``$var_def NAME`` line in place, or append one."""
        return self._replace_or_append(("var_def", name.upper()), format_command("var_def", name, str(value)))

    def set_command(self, name: str, *args: str | int) -> CommandFile:
        """Update the last ``$name`` line in place, or append one (single-valued commands)."""
        return self._replace_or_append((name.lower(), ""), format_command(name, *(str(a) for a in args)))

    def append_command(self, name: str, *args: str | int) -> CommandFile:
        """Append a ``$name`` line (repeatable commands such as ``$attempt_record``)."""
        lines = list(self.lines)
        _append_line(lines, self._sanitize(format_command(name, *(str(a) for a in args))))
        return CommandFile(tuple(lines), self.encoding, self.bom, self.path)

    def var(self, name: str) -> str | None:
        """The value of ``$var_def NAME`` at its last occurrence, or None."""
        wanted = name.upper()
        value: str | None = None
        for raw in self.lines:
            if "var_def" in raw.lower() and _key(raw) == ("var_def", wanted):
                tokens = tokenize(_body(raw))
                value = " ".join(tokens[2:])
        return value


_NOATIME = getattr(os, "O_NOATIME", 0)


def read_bytes(path: Path | str, size: int | None = None) -> bytes:
    """A whole file, read without updating its access time where the system
    allows it: a job file was just created or renamed, so reading it would
    otherwise dirty its inode, and each such update waits for the file
    system's journal (behind every fsync in flight). ``size``: its size as
    last seen; a read that returns less than asked for has met the end of a
    regular file, so such a file is read in one call, not two."""
    try:
        fd = os.open(path, os.O_RDONLY | _NOATIME)
    except PermissionError:
        if not _NOATIME:
            raise
        fd = os.open(path, os.O_RDONLY)  # O_NOATIME is for the file's owner only
    try:
        if size is not None and size < 1 << 20:
            data = os.read(fd, size + 1)
            if len(data) <= size:
                return data
            chunks = [data]  # it grew since: read on to its end
        else:
            chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)

