"""copiamail.fsfile: the CopiaFacts command syntax (SPEC 2)."""

from __future__ import annotations

import os

import pytest
from fs_strategies import (
    BOM,
    OWNED_COMMANDS,
    OWNED_VARS,
    apply_edits,
    engine_edits,
    engine_values,
    expected_value,
    fs_files,
    owned_lines,
)
from hypothesis import given
from hypothesis import strategies as st

from copiamail.errors import SyntaxFileError
from copiamail.jobfile.fsfile import (
    Command,
    CommandFile,
    format_arg,
    format_command,
    read_bytes,
    tokenize,
)

no_line_break = st.text().filter(lambda s: "\r" not in s and "\n" not in s)


def cmds(data: bytes) -> list[tuple[str, tuple[str, ...], int]]:
    return [(c.name, c.args, c.line) for c in CommandFile.parse(data).commands()]


# --- tokenizing -------------------------------------------------------------


def test_tokenize_splits_arguments_on_spaces_and_tabs():
    assert tokenize("$email_text a  b\t\tc \t d") == ["$email_text", "a", "b", "c", "d"]


def test_tokenize_ignores_leading_and_trailing_white_space():
    assert tokenize(" \t $fax_status1 2 \t ") == ["$fax_status1", "2"]


def test_tokenize_keeps_spaces_and_tabs_inside_quotes():
    assert tokenize('$email_subject "Your  statement\tis here"') == ["$email_subject", "Your  statement\tis here"]


def test_tokenize_reads_doubled_quote_inside_quotes_as_one_quote():
    assert tokenize('$email_subject "Your statement for ""November"""') == [
        "$email_subject",
        'Your statement for "November"',
    ]


def test_tokenize_reads_empty_quotes_as_an_empty_argument():
    assert tokenize('$email_retry_delays B ""') == ["$email_retry_delays", "B", ""]


def test_tokenize_joins_quoted_part_with_adjacent_bare_text():
    assert tokenize('$x a"b c"d e') == ["$x", "ab cd", "e"]


def test_semicolon_at_line_start_begins_a_comment():
    assert tokenize("; $email_address a@b.c") == []
    assert tokenize(";") == []


def test_semicolon_after_a_space_begins_a_comment():
    assert tokenize("$fax_status1 2 ; set by node N1") == ["$fax_status1", "2"]


def test_semicolon_after_a_tab_begins_a_comment():
    assert tokenize("$fax_status1 2\t;comment") == ["$fax_status1", "2"]


def test_semicolon_after_indentation_begins_a_comment():
    assert tokenize("  \t; indented comment") == []


def test_semicolon_inside_quotes_is_text():
    assert tokenize('$email_text "a ; b" ";c"') == ["$email_text", "a ; b", ";c"]


def test_semicolon_in_the_middle_of_a_token_is_text():
    assert tokenize("$email_text a;b c;") == ["$email_text", "a;b", "c;"]


def test_semicolon_right_after_a_closing_quote_is_text():
    assert tokenize('$email_text "a b";c') == ["$email_text", "a b;c"]


def test_quote_inside_a_comment_is_not_a_quote():
    assert tokenize('$email_text a ; "unterminated') == ["$email_text", "a"]


def reference_tokenize(text: str) -> list[str] | None:
    """The syntax read one character at a time, as SPEC 2 words it; None for
    an unterminated quote. The oracle for the regex tokenizer."""
    tokens: list[str] = []
    i, n = 0, len(text)
    while i < n:
        if text[i] in " \t":
            i += 1
            continue
        if text[i] == ";":
            break
        buf: list[str] = []
        while i < n and text[i] not in " \t":
            if text[i] == '"':
                i += 1
                while True:
                    if i >= n:
                        return None
                    if text[i] == '"':
                        if i + 1 < n and text[i + 1] == '"':
                            buf.append('"')
                            i += 2
                            continue
                        i += 1
                        break
                    buf.append(text[i])
                    i += 1
            else:
                buf.append(text[i])
                i += 1
        tokens.append("".join(buf))
    return tokens


syntax_heavy_text = st.text(alphabet=st.sampled_from(['"', " ", "\t", ";", "a", "b", "$", "\u00e9"]), max_size=30)


@given(st.one_of(syntax_heavy_text, no_line_break))
def test_tokenize_reads_every_line_as_the_character_by_character_reference_does(text):
    expected = reference_tokenize(text)
    if expected is None:
        with pytest.raises(SyntaxFileError):
            tokenize(text)
    else:
        assert tokenize(text) == expected


@pytest.mark.parametrize("text", ['$email_subject "abc', '$x "a""', '$x a"b', '$x "a" "'])
def test_tokenize_unterminated_quote_raises_with_the_line_number(text):
    with pytest.raises(SyntaxFileError) as e:
        tokenize(text, line=7, path="JOB.FS")
    assert e.value.line == 7
    assert "unterminated quote" in str(e.value)
    assert str(e.value).startswith("JOB.FS:7:")


def test_commands_unterminated_quote_names_file_and_line():
    cf = CommandFile.parse(b'; first\n$email_address a@b.c\n$email_subject "oops\n', path="spool/TOSEND/A.FS")
    with pytest.raises(SyntaxFileError) as e:
        cf.commands()
    assert e.value.line == 3
    assert "A.FS:3:" in str(e.value)


def test_commands_reads_indented_lines():
    assert cmds(b"  $email_address a@b.c\n\t$email_subject hi\n \t $fax_status1 2\n") == [
        ("email_address", ("a@b.c",), 1),
        ("email_subject", ("hi",), 2),
        ("fax_status1", ("2",), 3),
    ]


def test_command_names_are_case_insensitive():
    assert cmds(b"$EMAIL_Address a@b.c\n$Var_Def X 1\n") == [
        ("email_address", ("a@b.c",), 1),
        ("var_def", ("X", "1"), 2),
    ]


def test_arguments_keep_their_case():
    assert cmds(b"$email_subject Hello WORLD\n") == [("email_subject", ("Hello", "WORLD"), 1)]


def test_commands_skip_blank_and_comment_lines_and_count_them_in_line_numbers():
    data = b"; header\n\n   \n\t\n  ; indented comment\n$email_address a@b.c\n"
    assert cmds(data) == [("email_address", ("a@b.c",), 6)]


def test_commands_returns_command_objects():
    (c,) = CommandFile.parse(b"$email_text hi\n").commands()
    assert c == Command("email_text", ("hi",), 1)


def test_commands_read_crlf_lines_without_the_cr():
    assert cmds(b"$email_address a@b.c\r\n$email_subject hi\r\n") == [
        ("email_address", ("a@b.c",), 1),
        ("email_subject", ("hi",), 2),
    ]


def test_commands_skip_a_utf8_bom():
    assert cmds(BOM + b"$email_address a@b.c\n") == [("email_address", ("a@b.c",), 1)]


def test_commands_read_cp1252_text():
    assert cmds(b"$email_subject Caf\xe9 \x80\n") == [("email_subject", ("Café", "€"), 1)]


@pytest.mark.parametrize("line", [b"email_address a@b.c", b"hello", b'"$email_text" x', b"\x0b$email_text x"])
def test_a_line_not_starting_with_dollar_raises_naming_the_line(line):
    cf = CommandFile.parse(b"$email_address a@b.c\n\n" + line + b"\n", path="X.FS")
    with pytest.raises(SyntaxFileError) as e:
        cf.commands()
    assert e.value.line == 3
    assert "X.FS:3:" in str(e.value)


@pytest.mark.parametrize("line", [b"$", b"$ email_text x", b"  $\t"])
def test_a_dollar_without_a_command_name_raises(line):
    with pytest.raises(SyntaxFileError) as e:
        CommandFile.parse(line + b"\n").commands()
    assert e.value.line == 1


@pytest.mark.parametrize(
    "junk",
    [b"$email_text a\x00b", b"\x00\x00\x00", b"; comment \x00", b"$email_text \x81", b"$x \x8d\x8f\x90\x9d"],
)
def test_binary_junk_makes_commands_raise_naming_the_line(junk):
    cf = CommandFile.parse(b"$email_address a@b.c\r\n" + junk + b"\r\n$email_subject x\r\n", path="J.FS")
    with pytest.raises(SyntaxFileError) as e:
        cf.commands()
    assert e.value.line == 2
    assert "J.FS:2:" in str(e.value)
    assert "binary" in str(e.value)


def test_binary_junk_raises_a_value_error_never_a_unicode_error():
    cf = CommandFile.parse(bytes(range(256)))
    with pytest.raises(SyntaxFileError):
        cf.commands()


# --- format_arg / format_command --------------------------------------------


@pytest.mark.parametrize("value", ["a@b.c", "4711", "é€", "$x", "statements/4711.pdf"])
def test_format_arg_writes_a_plain_value_bare(value):
    assert format_arg(value) == value


@pytest.mark.parametrize(
    "value, written",
    [("", '""'), ("a b", '"a b"'), ("a\tb", '"a\tb"'), ('say "hi"', '"say ""hi"""'), (";x", '";x"')],
)
def test_format_arg_quotes_empty_spaced_quoted_and_comment_values(value, written):
    assert format_arg(value) == written


@given(no_line_break)
def test_format_arg_round_trips_through_tokenize(s):
    assert tokenize(format_arg(s)) == [s]


@given(st.text())
def test_format_arg_never_writes_a_line_break(s):
    written = format_arg(s)
    assert "\r" not in written and "\n" not in written


@pytest.mark.parametrize("value", ["a\r\nb", "a\nb", "a\rb"])
def test_format_arg_replaces_line_breaks_with_spaces(value):
    assert tokenize(format_arg(value)) == ["a b"]


@given(st.lists(no_line_break, max_size=5))
def test_format_command_round_trips_through_tokenize(args):
    assert tokenize(format_command("var_def", *args)) == ["$var_def", *args]


# --- byte-exact round trip ----------------------------------------------------


@given(st.binary())
def test_parse_then_to_bytes_gives_back_any_bytes(data):
    assert CommandFile.parse(data).to_bytes() == data


@given(st.binary())
def test_parse_of_any_bytes_never_raises_and_commands_raise_only_syntax_errors(data):
    cf = CommandFile.parse(data)
    try:
        cf.commands()
    except SyntaxFileError:
        pass


@given(fs_files())
def test_parse_then_to_bytes_gives_back_realistic_fs_files(data):
    assert CommandFile.parse(data).to_bytes() == data


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\n",
        b"\r\n",
        b"\r",
        BOM,
        BOM + b"$x 1",
        b"$x 1\r\n$y 2\n$z 3",
        b"$x \x81\xe9\r\n",
        BOM + b"$x \xe9\n",
        b"$x a\x0cb\x0bc\xe2\x80\xa8d\xc2\x85\n",  # FF, VT, U+2028, U+0085 do not end a line
        b"\xef\xbb\xbf\xef\xbb\xbf$x\n",
    ],
)
def test_parse_then_to_bytes_is_exact_for_edge_cases(data):
    assert CommandFile.parse(data).to_bytes() == data


def test_only_lf_ends_a_line():
    cf = CommandFile.parse("$x a\x0cb\u2028c\x85d\re\n$y\n".encode())
    assert len(cf.lines) == 2


def test_utf8_file_is_read_as_utf8_and_others_as_cp1252():
    assert CommandFile.parse("$x é".encode()).encoding == "utf-8"
    assert CommandFile.parse(b"$x \xe9").encoding == "cp1252"


def test_newline_is_that_of_the_first_ended_line():
    assert CommandFile.parse(b"$x\r\n$y\n").newline == "\r\n"
    assert CommandFile.parse(b"$x\n$y\r\n").newline == "\n"
    assert CommandFile.parse(b"$x").newline == "\n"
    assert CommandFile.parse(b"").newline == "\n"


# --- the engine's edits -------------------------------------------------------


@given(fs_files(), engine_edits())
def test_engine_edits_change_only_the_lines_the_engine_owns(data, edits):
    before = CommandFile.parse(data)
    owned_before = owned_lines(before)
    after = apply_edits(before, edits)
    owned_after = owned_lines(after)  # the result still parses

    assert len(after.lines) >= len(before.lines)
    for i, raw in enumerate(before.lines):
        if i in owned_before:
            assert i in owned_after, "an owned line became a submitter's line"
            continue
        if i == len(before.lines) - 1 and not raw.endswith("\n") and len(after.lines) > len(before.lines):
            # The last line gains the line ending an appended line needs (just the
            # LF when it already ends in the CR of a cut CRLF).
            assert after.lines[i] == raw + ("\n" if raw.endswith("\r") else before.newline)
        else:
            assert after.lines[i] == raw, f"line {i + 1} changed"
    # Only owned lines are added, at the end, with the file's line ending.
    added = range(len(before.lines), len(after.lines))
    assert set(added) <= owned_after
    assert all(after.lines[i].endswith(before.newline) and not after.lines[i].endswith("\r\r\n") for i in added)
    # Every submitter command reads as before, at the same line.
    def submitter(cf, owned):
        return [(c.name, c.args, c.line) for c in cf.commands() if c.line - 1 not in owned]

    assert submitter(after, owned_after) == submitter(before, owned_before)
    # The BOM and the encoding stay.
    assert (after.bom, after.encoding) == (before.bom, before.encoding)
    assert after.to_bytes().startswith(BOM) == data.startswith(BOM)


@given(fs_files(), st.sampled_from(["DOMAINBUSY_COUNT", "EMAIL_ERROR", "EMAIL_CONNECT_IP"]), engine_values)
def test_set_var_value_reads_back_from_the_rewritten_bytes(data, name, value):
    edited = CommandFile.parse(data).set_var(name, value)
    after = CommandFile.parse(edited.to_bytes())
    after.commands()
    assert after.var(name) == expected_value(edited, value)


def test_set_var_updates_the_line_in_place():
    cf = CommandFile.parse(b"$email_address a@b.c\n$var_def DOMAINBUSY_COUNT 1\n$email_subject hi\n")
    assert cf.set_var("DOMAINBUSY_COUNT", 2).to_bytes() == (
        b"$email_address a@b.c\n$var_def DOMAINBUSY_COUNT 2\n$email_subject hi\n"
    )


def test_set_var_updates_only_the_last_occurrence():
    cf = CommandFile.parse(b"$var_def EMAIL_ERROR first\n$var_def EMAIL_ERROR second\n; end\n")
    assert cf.set_var("EMAIL_ERROR", "third").to_bytes() == (
        b"$var_def EMAIL_ERROR first\n$var_def EMAIL_ERROR third\n; end\n"
    )


def test_set_var_keeps_indentation_and_that_lines_ending():
    cf = CommandFile.parse(b"$a 1\n \t$var_def DOMAINBUSY_COUNT 1\r\n$b 2\n")
    assert cf.set_var("DOMAINBUSY_COUNT", 5).to_bytes() == b"$a 1\n \t$var_def DOMAINBUSY_COUNT 5\r\n$b 2\n"


def test_set_var_on_last_line_without_newline_adds_none():
    cf = CommandFile.parse(b"$a 1\n$var_def DOMAINBUSY_COUNT 1")
    assert cf.set_var("DOMAINBUSY_COUNT", 2).to_bytes() == b"$a 1\n$var_def DOMAINBUSY_COUNT 2"


def test_set_var_finds_the_variable_case_insensitively():
    cf = CommandFile.parse(b"$VAR_DEF domainbusy_count 1\n")
    out = cf.set_var("DOMAINBUSY_COUNT", 2)
    assert len(out.lines) == 1
    assert out.var("domainbusy_count") == "2"


def test_set_var_ignores_commented_out_and_look_alike_lines():
    data = b"; $var_def DOMAINBUSY_COUNT 9\n$var_def DOMAINBUSY_COUNTER 9\n$email_text $var_def DOMAINBUSY_COUNT 9\n"
    assert CommandFile.parse(data).set_var("DOMAINBUSY_COUNT", 1).to_bytes() == (
        data + b"$var_def DOMAINBUSY_COUNT 1\n"
    )


def test_set_var_appends_when_missing_with_lf_in_an_lf_file():
    cf = CommandFile.parse(b"$email_address a@b.c\n")
    assert cf.set_var("DOMAINBUSY_COUNT", 1).to_bytes() == b"$email_address a@b.c\n$var_def DOMAINBUSY_COUNT 1\n"


def test_set_var_appends_with_crlf_in_a_crlf_file():
    cf = CommandFile.parse(b"$email_address a@b.c\r\n; note\r\n")
    assert cf.set_var("EMAIL_ERROR", "421 busy").to_bytes() == (
        b'$email_address a@b.c\r\n; note\r\n$var_def EMAIL_ERROR "421 busy"\r\n'
    )


def test_append_to_a_file_without_final_newline_ends_the_last_line_first():
    assert CommandFile.parse(b"$a 1\r\n$b 2").set_var("DOMAINBUSY_COUNT", 1).to_bytes() == (
        b"$a 1\r\n$b 2\r\n$var_def DOMAINBUSY_COUNT 1\r\n"
    )
    assert CommandFile.parse(b"$a 1").append_command("fax_status1", 2).to_bytes() == b"$a 1\n$fax_status1 2\n"


def test_append_after_a_last_line_ending_in_a_lone_cr_completes_its_crlf():
    # A CRLF file cut after its last CR: the CR is part of the line ending, so it
    # must not become part of the line's text when a line is appended.
    cf = CommandFile.parse(b"$email_address a@b.c\r\n$email_subject hi\r")
    out = cf.set_var("DOMAINBUSY_COUNT", 1)
    assert out.to_bytes() == b"$email_address a@b.c\r\n$email_subject hi\r\n$var_def DOMAINBUSY_COUNT 1\r\n"
    assert [c.args for c in out.commands()][1] == ("hi",)


def test_appending_to_a_lone_line_cut_after_its_cr_ends_the_first_addition_as_the_file_stood():
    # The file had no line ending yet: the first line appended ends in LF; the
    # CR completed into CRLF makes the file's ending CRLF for the next one.
    cf = CommandFile.parse(b"$a 1\r")
    assert cf.append_command("x").to_bytes() == b"$a 1\r\n$x\n"
    twice = b"$a 1\r\n$x\n$y\r\n"
    assert cf.append_command("x").append_command("y").to_bytes() == twice
    assert cf.edited(append=(("x", ()), ("y", ()))).to_bytes() == twice


def test_append_to_an_empty_file():
    assert CommandFile.parse(b"").set_var("DOMAINBUSY_COUNT", 1).to_bytes() == b"$var_def DOMAINBUSY_COUNT 1\n"
    assert CommandFile.parse(BOM).set_var("X", 1).to_bytes() == BOM + b"$var_def X 1\n"


def test_set_command_updates_the_last_occurrence_in_place():
    cf = CommandFile.parse(b"$fax_status1 2\n$FAX_STATUS1 2\n$fax_status2 421\n")
    assert cf.set_command("fax_status1", 6).to_bytes() == b"$fax_status1 2\n$fax_status1 6\n$fax_status2 421\n"


def test_set_command_appends_when_missing():
    cf = CommandFile.parse(b"$fax_status10 1\n")
    assert cf.set_command("fax_status1", 6).to_bytes() == b"$fax_status10 1\n$fax_status1 6\n"


def test_append_command_always_adds_a_line():
    cf = CommandFile.parse(b"$attempt_record 11/21/2026 14:03:07 E N1 421 E x\n")
    out = cf.append_command("attempt_record", "11/21/2026", "14:08:07", "E", "N1", 550, "B", "550 5.1.1 unknown")
    assert out.to_bytes() == (
        b"$attempt_record 11/21/2026 14:03:07 E N1 421 E x\n"
        b'$attempt_record 11/21/2026 14:08:07 E N1 550 B "550 5.1.1 unknown"\n'
    )


def test_rewrite_keeps_the_bom():
    cf = CommandFile.parse(BOM + "$email_subject Grüße\n".encode())
    out = cf.set_var("EMAIL_ERROR", "ü").to_bytes()
    assert out == BOM + "$email_subject Grüße\n$var_def EMAIL_ERROR ü\n".encode()


def test_rewrite_keeps_cp1252_encoding():
    cf = CommandFile.parse(b"$email_subject Caf\xe9 \x80 5\r\n")
    assert cf.encoding == "cp1252"
    out = cf.set_var("EMAIL_ERROR", "Café € 5").to_bytes()
    assert out == b'$email_subject Caf\xe9 \x80 5\r\n$var_def EMAIL_ERROR "Caf\xe9 \x80 5"\r\n'


def test_value_the_encoding_cannot_hold_is_written_with_question_marks():
    out = CommandFile.parse(b"$x \xe9\n").set_var("EMAIL_ERROR", "日本").to_bytes()
    assert out == b"$x \xe9\n$var_def EMAIL_ERROR ??\n"


def test_value_with_cr_lf_is_written_on_one_line():
    cf = CommandFile.parse(b"$email_address a@b.c\n")
    out = cf.set_var("EMAIL_ERROR", "421-first line\r\n421 second\nthird\rfourth")
    assert out.to_bytes() == b'$email_address a@b.c\n$var_def EMAIL_ERROR "421-first line 421 second third fourth"\n'
    assert len(out.lines) == 2


def test_value_with_nul_keeps_the_file_readable():
    # A server reply is not under our control; writing it must not make the job binary.
    out = CommandFile.parse(b"$email_address a@b.c\n").set_var("EMAIL_ERROR", "421 a\x00b")
    out.commands()
    assert out.var("EMAIL_ERROR") == "421 a?b"


def test_var_reads_the_last_occurrence():
    cf = CommandFile.parse(b"$var_def X one\n$var_def x two words\n")
    assert cf.var("X") == "two words"
    assert cf.var("Y") is None


def test_edits_return_a_new_file_and_leave_the_original_alone():
    cf = CommandFile.parse(b"$a 1\n")
    cf.set_var("X", 1)
    cf.append_command("fax_status1", 2)
    assert cf.to_bytes() == b"$a 1\n"


# --- reading and writing files ------------------------------------------------


def test_read_keeps_the_path_for_error_messages(tmp_path):
    p = tmp_path / "A.FS"
    p.write_bytes(b"oops\n")
    cf = CommandFile.read(p)
    assert cf.path == p
    with pytest.raises(SyntaxFileError, match=r"A\.FS:1:"):
        cf.commands()


def reference_commands(cf: CommandFile) -> list[Command]:
    """commands() as it reads every line through tokenize (no whole-line fast path)."""
    out = []
    for number, raw in enumerate(cf.lines, 1):
        text = raw[:-1] if raw.endswith("\n") else raw
        text = text[:-1] if text.endswith("\r") else text
        if "\x00" in text or any("\udc80" <= c <= "\udcff" for c in text):
            return None  # binary: commands() raises
        stripped = text.strip(" \t")
        if not stripped or stripped.startswith(";"):
            continue
        if not stripped.startswith("$"):
            return None
        tokens = reference_tokenize(text)
        if tokens is None or not tokens[0][1:]:
            return None
        out.append(Command(tokens[0][1:].lower(), tuple(tokens[1:]), number))
    return out


line_heavy_file = st.lists(
    st.one_of(
        syntax_heavy_text,
        st.builds(lambda n, t, tail: f'$email_{n} "{t}"{tail}', st.sampled_from(["text", "Subject", "x"]),
                  st.text(alphabet=st.sampled_from(['a', ' ', '\t', ';', '$', '\r', '\u00e9']), max_size=8),
                  st.sampled_from(["", " ", "\t", " ;c", ";c", ' "', "\r", "\r\r", " x"])),
    ),
    max_size=8,
).flatmap(lambda lines: st.sampled_from(["\n", "\r\n", "\r"]).map(lambda end: end.join(lines)))


@given(st.one_of(line_heavy_file, fs_files().map(lambda b: CommandFile.parse(b).to_bytes().decode("utf-8", "replace"))))
def test_commands_reads_every_file_as_the_line_by_line_reference_does(text):
    cf = CommandFile.parse(text.encode("utf-8"))
    expected = reference_commands(cf)
    if expected is None:
        with pytest.raises(SyntaxFileError):
            cf.commands()
    else:
        assert cf.commands() == expected


@given(
    fs_files(),
    st.lists(st.tuples(st.sampled_from(OWNED_VARS + ["customer", "Email_Error"]), engine_values), max_size=4,
             unique_by=lambda v: v[0].upper()),
    st.lists(st.tuples(st.sampled_from(OWNED_COMMANDS + ["email_subject"]), st.lists(engine_values, max_size=2)),
             max_size=4, unique_by=lambda c: c[0]),
    st.lists(st.tuples(st.just("attempt_record"), st.lists(engine_values, max_size=7)), max_size=2),
)
def test_edited_in_one_pass_equals_the_edits_one_after_another(data, variables, commands, append):
    cf = CommandFile.parse(data)
    expected = cf
    for name, args in append:
        expected = expected.append_command(name, *args)
    for name, value in variables:
        expected = expected.set_var(name, value)
    for name, args in commands:
        expected = expected.set_command(name, *args)
    got = cf.edited(tuple((n, tuple(a)) for n, a in append), tuple(variables), tuple((n, tuple(a)) for n, a in commands))
    assert got.lines == expected.lines
    assert got.to_bytes() == expected.to_bytes()


@pytest.mark.parametrize("line", [
    b"$var_def DOMAINBUSY_COUNT 3\n", b"  $VAR_DEF domainbusy_count 3\r\n", b'$"var_def" DOMAINBUSY_COUNT 3\n',
    b'$va"r_def" DOMAINBUSY_COUNT 3\n', b"\t$Var_Def\tDOMAINBUSY_COUNT 3",
])
def test_edited_finds_the_line_it_sets_however_its_command_is_written(line):
    cf = CommandFile.parse(b'$email_address a@b.test\n$email_text "x"\n' + line)
    edited = cf.edited(variables=(("DOMAINBUSY_COUNT", 4),))
    assert len(edited.lines) == len(cf.lines) and edited.var("DOMAINBUSY_COUNT") == "4"


def test_as_written_keeps_the_double_quotes_and_joins_tokens_by_one_space():
    cf = CommandFile.parse(b'$email_from   "Doe, Jane"\t <j@x.test> ; note\n$email_text "a ""b"""\n')
    first, second = cf.commands()
    assert cf.as_written(first) == '"Doe, Jane" <j@x.test>'
    assert cf.as_written(second) == '"a ""b"""'


@pytest.mark.parametrize("line, args", [
    (b'$email_text "hello" /* a comment', ("hello",)),
    (b"$email_subject plain words /* comment ; more", ("plain", "words")),
    (b'$email_text "a /* not a comment"', ("a /* not a comment",)),
    (b"$email_text a/*b", ("a/*b",)),
])
def test_a_slash_star_after_white_space_begins_a_comment(line, args):
    [cmd] = CommandFile.parse(line + b"\n").commands()
    assert cmd.args == args


def test_a_line_starting_with_slash_star_is_a_comment():
    assert CommandFile.parse(b"/* header of the job\n$email_text x\n").commands()[0].args == ("x",)


def test_format_arg_quotes_a_value_starting_with_slash_star():
    assert tokenize(format_command("email_text", "/*x")) == ["$email_text", "/*x"]


def test_a_grave_accent_before_a_quote_inside_quotes_is_that_quote():
    [cmd] = CommandFile.parse(b'$email_subject "say `"hello`" now"\n').commands()
    assert cmd.args == ('say `"hello`" now',)  # the expansion of $email commands makes it a quote


@pytest.mark.parametrize("value", ['a`"b', '`"', 'x`', '``""``', 'end`', 'a b`', '` `', '"`', '`""`'])
def test_values_with_grave_accents_and_quotes_are_written_back_as_they_were(value):
    line = format_command("var_def", "X", value)
    assert tokenize(line) == ["$var_def", "X", value]
    [cmd] = CommandFile.parse(line.encode() + b"\n").commands()
    assert cmd.args == ("X", value)


@given(st.text(alphabet=st.sampled_from(list('`"; \tab/*')), max_size=12))
def test_format_arg_and_tokenize_round_trip_grave_accents_and_quotes(value):
    assert tokenize(format_command("var_def", "X", value)) == ["$var_def", "X", value] if value else True


@pytest.mark.parametrize("told", [None, 0, 99, 100, 101, 5000, (1 << 20) + 7])
def test_a_file_is_read_whole_whatever_size_it_was_last_seen_at(tmp_path, told):
    # The size a scan saw may be out of date: the file grew or shrank since.
    path = tmp_path / "X.FS"
    for data in (b"", b"x" * 100, os.urandom(3000), b"y" * ((1 << 20) + 5)):
        path.write_bytes(data)
        assert read_bytes(path, told) == data
