"""Hypothesis strategies for realistic FS files and the engine's edits to them.

Shared by test_fsfile.py and test_job.py (pytest puts this folder on sys.path).
"""

from __future__ import annotations

from hypothesis import strategies as st

from copiamail.jobfile.fsfile import CommandFile, format_arg, format_command
from copiamail.jobfile.owned import is_owned

BOM = b"\xef\xbb\xbf"

# Characters a submitter types: printable ASCII (quotes, ';' and '$' included),
# tabs, and letters cp1252 can hold; UTF-8 files may hold anything printable.
_CP1252_EXTRA = "éüßç€ñ–’"
_UTF8_EXTRA = _CP1252_EXTRA + "日本語Ωж😀"


_ASCII = "".join(chr(c) for c in range(0x20, 0x7F)) + "\t"
_WORDS = {
    "cp1252": st.text(_ASCII + _CP1252_EXTRA, max_size=10),
    "utf-8": st.text(_ASCII + _UTF8_EXTRA, max_size=10),
}


OWNED_VARS = ["DOMAINBUSY_COUNT", "EMAIL_ERROR", "EMAIL_CONNECT_IP", "EMAIL_BYTECOUNT"]
OWNED_COMMANDS = ["fax_status1", "fax_status2", "fax_next_date", "fax_next_time"]

# Command lines a submitter (or CopiaFacts) writes, owned ones and look-alikes.
_SUBMITTER_COMMANDS = [
    ("email_address", None),
    ("email_subject", None),
    ("email_text", None),
    ("email_body", None),
    ("email_attach", None),
    ("email_header", None),
    ("fax_phone", None),
    ("fax_status", None),
    ("fax_status10", None),
    ("attempt_records", None),
    ("var_def", "CUSTOMER"),
    ("var_def", "DOMAINBUSY_COUNTER"),
    ("var_def", "EMAIL_ERRORS"),
    ("var_def", "EMAIL_BINDING"),
]
_OWNED_LINES = [("var_def", v) for v in OWNED_VARS] + [(c, None) for c in OWNED_COMMANDS] + [
    ("attempt_record", None)
]


def _case_variants(name: str) -> list[str]:
    return [name, name, name.upper(), name[:1].upper() + name[1:].lower()]


@st.composite
def line_text(draw, encoding: str = "utf-8", owned: bool = True) -> str:
    """One line's text, without its ending: blank, comment or command."""
    words = _WORDS[encoding]
    indent = draw(st.sampled_from(["", "", "", " ", "\t", "  \t "]))
    kind = draw(st.sampled_from(["blank", "comment", "commented_command", "command", "command", "command"]))
    if kind == "blank":
        return draw(st.sampled_from(["", " ", "\t", " \t "]))
    if kind == "comment":
        return indent + ";" + draw(words)
    if kind == "commented_command":
        # Looks like an owned line, but is a comment: the engine must not touch it.
        return indent + "; " + draw(st.sampled_from(["$var_def DOMAINBUSY_COUNT 9", "$fax_status1 2", "$attempt_record x"]))
    pool = _SUBMITTER_COMMANDS + (_OWNED_LINES if owned else [])
    name, var = draw(st.sampled_from(pool))
    head = "$" + draw(st.sampled_from(_case_variants(name)))
    args = [draw(st.sampled_from(_case_variants(var)))] if var else []
    args += draw(st.lists(words, max_size=3))
    sep = draw(st.sampled_from([" ", "\t", " \t "]))
    text = indent + head + "".join(sep + format_arg(a) for a in args)
    if draw(st.integers(0, 4)) == 0:
        text += " ;" + draw(words)
    return text


@st.composite
def fs_files(draw, owned: bool = True, first_lines: tuple[str, ...] = ()) -> bytes:
    """A realistic FS file as bytes: UTF-8 or cp1252, maybe a BOM, LF/CRLF/mixed
    endings, comments, blank lines, and maybe no final newline (or a final lone CR)."""
    encoding = draw(st.sampled_from(["utf-8", "cp1252"]))
    texts = list(first_lines) + draw(st.lists(line_text(encoding, owned), max_size=12))
    texts = draw(st.permutations(texts)) if first_lines else texts
    mode = draw(st.sampled_from(["lf", "crlf", "mixed"]))
    if mode == "mixed":
        endings = draw(st.lists(st.sampled_from(["\n", "\r\n"]), min_size=len(texts), max_size=len(texts)))
    else:
        endings = ["\n" if mode == "lf" else "\r\n"] * len(texts)
    if texts:
        endings[-1] = draw(st.sampled_from([endings[-1], "", "\r"]))
    data = "".join(t + e for t, e in zip(texts, endings, strict=True)).encode(encoding)
    if draw(st.booleans()):
        data = BOM + data
    return data


# Values the engine writes: anything, even CR/LF, NUL and characters the
# file's encoding cannot hold (a server reply is not under our control).
engine_values = st.one_of(st.text(max_size=40), st.integers(min_value=0, max_value=10**9))


@st.composite
def engine_edits(draw) -> list[tuple]:
    """A sequence of the engine's edits: (method, name, args...)."""
    edit = st.one_of(
        st.tuples(st.just("set_var"), st.sampled_from(OWNED_VARS + [v.lower() for v in OWNED_VARS]), engine_values),
        st.tuples(st.just("set_command"), st.sampled_from(OWNED_COMMANDS), engine_values),
        st.tuples(
            st.just("append_command"),
            st.just("attempt_record"),
            st.tuples(
                st.just("11/21/2026"), st.just("14:03:07"), st.just("E"), st.just("N1"),
                st.integers(200, 599), st.sampled_from("ABCDEHSZ"), st.text(max_size=30),
            ),
        ),
    )
    return draw(st.lists(edit, max_size=6))


def apply_edit(cf: CommandFile, edit: tuple) -> CommandFile:
    method, name, args = edit
    if method == "set_var":
        return cf.set_var(name, args)
    if method == "set_command":
        return cf.set_command(name, args)
    return cf.append_command(name, *args)


def apply_edits(cf: CommandFile, edits: list[tuple]) -> CommandFile:
    for edit in edits:
        cf = apply_edit(cf, edit)
    return cf


def owned_lines(cf: CommandFile) -> set[int]:
    """0-based indexes of the lines the engine owns."""
    return {c.line - 1 for c in cf.commands() if is_owned(c)}


def expected_value(cf: CommandFile, value: object) -> str:
    """What reading back a value the engine wrote gives: one line, in the file's encoding."""
    text = str(value).replace("\r\n", " ").replace("\r", " ").replace("\n", " ")
    return text.encode(cf.encoding, errors="replace").decode(cf.encoding).replace("\x00", "?")


__all__ = [
    "BOM",
    "OWNED_COMMANDS",
    "OWNED_VARS",
    "apply_edit",
    "apply_edits",
    "engine_edits",
    "engine_values",
    "expected_value",
    "format_command",
    "fs_files",
    "line_text",
    "owned_lines",
]
