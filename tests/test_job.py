"""copiamail.job: what an FS file means (SPEC 2 and 4)."""

from __future__ import annotations

import hashlib
import time

import pytest
from fs_strategies import apply_edits, engine_edits, fs_files
from hypothesis import given
from hypothesis import strategies as st

from copiamail.errors import JobError
from copiamail.jobfile import outcome
from copiamail.jobfile.addresses import parse_address
from copiamail.jobfile.fsfile import CommandFile
from copiamail.jobfile.job import parse_job, quick_domain
from copiamail.jobfile.model import Attachment, BodyItem, JobEnv
from copiamail.jobfile.owned import AttemptRecord, is_owned, job_identity

# SPEC 2, "An example".
EXAMPLE = b'''; monthly statement, customer 4711
$email_address jane.doe@example.com
$email_esender statements@acme.test
$email_from "Acme Billing <billing@acme.test>"
$email_subject "Your statement for ""November"""
$email_text "Dear Jane,"
$email_body statements/4711.txt
$email_attach statements/4711.pdf application/pdf
$var_def CUSTOMER 4711
'''

# The same job after one deferral and a rejected attempt (SPEC 2).
EXAMPLE_AFTER = EXAMPLE + b'''$var_def DOMAINBUSY_COUNT 1
$attempt_record 11/21/2026 14:03:07 E N1 550 B "550 5.1.1 <jane.doe@example.com>: User unknown"
$var_def EMAIL_ERROR "550 5.1.1 <jane.doe@example.com>: User unknown"
$fax_status1 6
$fax_status2 550
'''

ADDR = b"$email_address jane@example.com\n"


def job(data: bytes, name: str = "00012345.FS", path: str | None = None):
    return parse_job(CommandFile.parse(data, path), name)


def job_error(data: bytes, path: str | None = None) -> JobError:
    with pytest.raises(JobError) as e:
        job(data, path=path)
    return e.value


def identity(data: bytes, name: str = "00012345.FS") -> str:
    cf = CommandFile.parse(data)
    return job_identity(name, cf, cf.commands())


# --- the SPEC's example ---------------------------------------------------------


def test_parse_job_reads_the_spec_example():
    j = job(EXAMPLE)
    assert j.name == "00012345.FS"
    assert j.address == "jane.doe@example.com"
    assert j.domain == "example.com"
    assert j.esender == "statements@acme.test"
    assert j.from_header == "Acme Billing <billing@acme.test>"
    assert j.subject == 'Your statement for "November"'
    assert j.body == (BodyItem("text", "Dear Jane,", 6), BodyItem("file", "statements/4711.txt", 7))
    assert j.alt == ()
    assert j.attachments == (Attachment("statements/4711.pdf", "application/pdf", 8),)
    assert j.variables == {"CUSTOMER": "4711"}
    assert j.charset == "utf-8"
    assert j.headers == ()
    assert j.retry_delays == {}
    assert j.attempts == ()
    assert j.domainbusy_count == 0
    assert j.next_attempt is None
    assert j.is_due(time.time())
    assert j.binding is None and j.binding_group is None


def test_parse_job_reads_the_spec_example_after_the_engine_wrote_into_it():
    j = job(EXAMPLE_AFTER)
    assert j.domainbusy_count == 1
    assert j.attempts == (
        AttemptRecord("11/21/2026", "14:03:07", "N1", 550, "B", "550 5.1.1 <jane.doe@example.com>: User unknown"),
    )
    assert j.variables["EMAIL_ERROR"] == "550 5.1.1 <jane.doe@example.com>: User unknown"
    assert j.identity == job(EXAMPLE).identity


# --- the recipient --------------------------------------------------------------


def test_missing_recipient_fails_with_outcome_60():
    e = job_error(b"$email_subject hi\n$email_text body\n", path="TOSEND/A.FS")
    assert e.outcome == outcome.BAD_JOB.code == 60
    assert "email_address" in str(e)
    assert "A.FS" in str(e)


def test_recipient_without_an_argument_fails_with_outcome_60():
    e = job_error(b"$email_address\n")
    assert (e.outcome, e.line) == (60, 1)


@pytest.mark.parametrize(
    "address",
    [b"jane", b"jane@", b"@example.com", b"jane@@example.com", b"jane@exa mple.com", b'"jane doe@example.com"',
     b"jane@-example.com", b"jane@example.com.", b"<jane@example.com", b"jane@example.com other@example.com"],
)
def test_bad_recipient_address_fails_with_outcome_63_naming_the_line(address):
    e = job_error(b"; x\n$email_address " + address + b"\n", path="A.FS")
    assert e.outcome == outcome.BAD_HEADER.code == 63
    assert e.line == 2
    assert "A.FS:2:" in str(e)


def test_recipient_domain_is_lower_cased_and_angle_brackets_are_dropped():
    j = job(b"$email_address <Jane@Example.COM>\n")
    assert (j.address, j.domain) == ("Jane@Example.COM", "example.com")


def test_recipient_domain_is_after_the_last_at():
    assert parse_address('"a@b"@Example.org') == ('"a@b"@Example.org', "example.org")


def test_bad_envelope_sender_fails_with_outcome_63():
    e = job_error(ADDR + b"$email_esender not-an-address\n")
    assert (e.outcome, e.line) == (63, 2)


# --- headers --------------------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        b"$email_header X-Tag: a\rb",
        b'$email_header "X-Tag: a\rBcc: evil@example.com"',
        b"$email_subject Hello\rBcc: evil@example.com",
        b"$email_from a@b.c\r",
        b"$email_esender a@b.c\rx",
        b"$email_address jane@example.com\rBcc: x@y.z",
    ],
)
def test_a_lone_cr_inside_a_header_line_fails_with_bad_header_63(line):
    e = job_error(ADDR + line + b"\r\n$email_text hi\r\n")
    assert e.outcome == outcome.BAD_HEADER.code == 63
    assert e.line == 2


def test_email_header_is_name_colon_value():
    j = job(ADDR + b'$email_header X-Campaign: november\n$email_header "X-Ref:  a: b "\n$EMAIL_HEADER List-Id:<x>\n')
    assert j.headers == (("X-Campaign", "november"), ("X-Ref", "a: b"), ("List-Id", "<x>"))


def test_email_header_may_repeat_and_keeps_file_order():
    j = job(ADDR + b"$email_header X-A: 1\n$email_header X-B: 2\n$email_header X-A: 3\n")
    assert j.headers == (("X-A", "1"), ("X-B", "2"), ("X-A", "3"))


@pytest.mark.parametrize(
    "line", [b"$email_header X-Tag", b"$email_header : value", b'$email_header "X Tag: v"', b"$email_header X\xc3\xa9: v"]
)
def test_email_header_without_a_proper_name_fails_with_outcome_63(line):
    e = job_error(ADDR + line + b"\n")
    assert (e.outcome, e.line) == (63, 2)


# --- single-valued commands, body, attachments ----------------------------------


def test_last_occurrence_wins_for_single_valued_commands():
    j = job(
        b"$email_address first@example.com\n"
        b"$email_subject first\n$email_from a@first.test\n$email_esender a@first.test\n"
        b"$email_charset iso-8859-1\n$var_def CUSTOMER 1\n"
        b"$email_address last@example.org\n"
        b"$email_subject last\n$email_from a@last.test\n$email_esender a@last.test\n"
        b"$email_charset utf-8\n$VAR_DEF customer 2\n"
    )
    assert (j.address, j.domain, j.subject, j.from_header, j.esender, j.charset) == (
        "last@example.org", "example.org", "last", "a@last.test", "a@last.test", "utf-8",
    )
    assert j.variables == {"CUSTOMER": "2"}


def test_an_earlier_bad_value_is_overridden_by_the_last_occurrence():
    j = job(b"$email_address not-an-address\n$email_address jane@example.com\n")
    assert j.address == "jane@example.com"


def test_body_items_keep_file_order_mixing_text_and_body_files():
    j = job(
        ADDR
        + b'$email_text "Dear Jane,"\n$email_body a.txt\n$email_alttext "<p>alt</p>"\n'
        + b"$email_text\n$email_body b.html\n$email_altbody alt.html\n$email_text P.S. see  below\n"
    )
    assert j.body == (
        BodyItem("text", "Dear Jane,", 2),
        BodyItem("file", "a.txt", 3),
        BodyItem("text", "", 5),
        BodyItem("file", "b.html", 6),
        BodyItem("text", "P.S. see below", 8),
    )
    assert j.alt == (BodyItem("text", "<p>alt</p>", 4), BodyItem("file", "alt.html", 7))


def test_attachments_keep_order_and_optional_content_type():
    j = job(ADDR + b"$email_attach a.pdf application/pdf\n$email_attach \"my file.bin\"\n")
    assert j.attachments == (Attachment("a.pdf", "application/pdf", 2), Attachment("my file.bin", None, 3))


def test_bad_attachment_content_type_fails_with_outcome_60():
    e = job_error(ADDR + b"$email_attach a.pdf not-a-type\n")
    assert (e.outcome, e.line) == (60, 2)


@pytest.mark.parametrize("command", [b"$email_body", b"$email_altbody", b"$email_attach", b"$email_subject", b"$var_def"])
def test_a_command_that_needs_an_argument_fails_without_one(command):
    e = job_error(ADDR + command + b"\n")
    assert (e.outcome, e.line) == (60, 2)


def test_binding_variables_are_read():
    j = job(ADDR + b"$var_def EMAIL_BINDING b1\n$var_def email_binding_group pool1\n")
    assert (j.binding, j.binding_group) == ("b1", "pool1")


def test_unknown_commands_are_ignored():
    j = job(b"$fax_phone 555-1234\n" + ADDR + b'$fax_cover "x y"\n$whatever\n$email_subject hi\n')
    assert (j.address, j.subject) == ("jane@example.com", "hi")


def test_syntax_error_fails_with_outcome_60_naming_file_and_line():
    e = job_error(ADDR + b'$email_subject "open\n', path="TOSEND/A.FS")
    assert (e.outcome, e.line) == (60, 2)
    assert "A.FS:2:" in str(e)


def test_binary_job_fails_with_outcome_60():
    e = job_error(ADDR + b"\x00\x01\x02\x81\n")
    assert (e.outcome, e.line) == (60, 2)


# --- what the engine wrote --------------------------------------------------------


def test_attempt_records_are_parsed_in_order():
    j = job(
        ADDR
        + b'$attempt_record 11/21/2026 14:03:07 E N1 421 e "421 4.7.0 try later"\n'
        + b"$attempt_record 11/21/2026 14:08:09 E N2 72 A no reply\n"
    )
    assert j.attempts == (
        AttemptRecord("11/21/2026", "14:03:07", "N1", 421, "E", "421 4.7.0 try later"),
        AttemptRecord("11/21/2026", "14:08:09", "N2", 72, "A", "no reply"),
    )


def test_interruptions_are_counted_apart_from_retries():
    j = job(
        ADDR
        + b'$attempt_record 11/21/2026 14:03:07 E N1 66 Z "interrupted"\n'
        + b'$attempt_record 11/21/2026 14:05:07 E N1 421 E "421 busy"\n'
        + b'$attempt_record 11/21/2026 14:09:07 E N1 66 Z "interrupted"\n'
    )
    assert j.interruptions == 2
    assert [a.counts_as_retry for a in j.attempts] == [False, True, False]
    assert [a.klass for a in j.attempts if a.counts_as_retry] == ["E"]


def test_an_unreadable_attempt_record_is_not_counted():
    j = job(ADDR + b"$attempt_record garbage\n$attempt_record 11/21/2026 14:03:07 E N1 abc E x\n")
    assert j.attempts == ()


def test_domainbusy_count_is_read():
    assert job(ADDR + b"$var_def DOMAINBUSY_COUNT 3\n").domainbusy_count == 3
    assert job(ADDR + b"$var_def DOMAINBUSY_COUNT 3\n$var_def DOMAINBUSY_COUNT 4\n").domainbusy_count == 4
    assert job(ADDR).domainbusy_count == 0


def test_next_attempt_comes_from_fax_next_date_and_time_in_local_time():
    j = job(ADDR + b"$fax_next_date 11/21/2026\n$fax_next_time 14:03:07\n")
    expected = time.mktime((2026, 11, 21, 14, 3, 7, 0, 0, -1))
    assert j.next_attempt == expected
    assert not j.is_due(expected - 1)
    assert j.is_due(expected)
    assert j.is_due(expected + 1)


def test_next_date_without_time_means_midnight():
    j = job(ADDR + b"$fax_next_date 11/21/2026\n")
    assert j.next_attempt == time.mktime((2026, 11, 21, 0, 0, 0, 0, 0, -1))


def test_last_fax_next_date_and_time_count():
    j = job(ADDR + b"$fax_next_date 01/01/2020\n$fax_next_time 00:00:00\n$fax_next_date 11/21/2026\n$fax_next_time 14:03:07\n")
    assert j.next_attempt == time.mktime((2026, 11, 21, 14, 3, 7, 0, 0, -1))


def test_job_with_past_next_attempt_is_due():
    assert job(ADDR + b"$fax_next_date 01/01/2000\n$fax_next_time 00:00:00\n").is_due(time.time())


@pytest.mark.parametrize(
    "date, clock",
    [(b"13/01/2026", b"00:00:00"), (b"02/30/2026", b"00:00:00"), (b"2026-11-21", b"14:03:07"),
     (b"11/21/2026", b"25:00:00"), (b"11/21/2026", b"noon"), (b"tomorrow", b"12:00:00")],
)
def test_bad_next_date_or_time_fails_with_outcome_60(date, clock):
    e = job_error(ADDR + b"$fax_next_date " + date + b"\n$fax_next_time " + clock + b"\n")
    assert e.outcome == 60
    assert e.line == 2


def test_retry_delays_are_read_per_class():
    j = job(ADDR + b'$email_retry_delays B "30S 5 2H"\n$email_retry_delays * "1"\n$email_retry_delays c ""\n')
    assert j.retry_delays == {"B": (30, 300, 7200), "*": (60,), "C": ()}


def test_retry_delays_last_occurrence_of_a_class_counts():
    j = job(ADDR + b'$email_retry_delays B "1"\n$email_retry_delays b "2 3"\n')
    assert j.retry_delays == {"B": (120, 180)}


@pytest.mark.parametrize("line", [b'$email_retry_delays X "5"', b'$email_retry_delays B "5 soon"', b"$email_retry_delays"])
def test_bad_retry_delays_fail_with_outcome_60(line):
    e = job_error(ADDR + line + b"\n")
    assert (e.outcome, e.line) == (60, 2)


# --- charset ------------------------------------------------------------------------


@pytest.mark.parametrize("charset", [b"klingon", b"rot13", b"base64", b"undefined"])
def test_unknown_charset_fails_with_outcome_64(charset):
    e = job_error(ADDR + b"$email_charset " + charset + b"\n")
    assert e.outcome == outcome.BAD_CHARSET.code == 64
    assert e.line == 2


@pytest.mark.parametrize("charset", ["iso-8859-1", "ISO-8859-15", "windows-1252", "UTF-8"])
def test_known_charset_is_kept(charset):
    assert job(ADDR + b"$email_charset " + charset.encode() + b"\n").charset == charset


# --- identity -------------------------------------------------------------------------


def test_identity_is_stable_across_the_engines_edits():
    cf = CommandFile.parse(EXAMPLE)
    edited = (
        cf.set_var("DOMAINBUSY_COUNT", 1)
        .set_var("DOMAINBUSY_COUNT", 2)
        .append_command("attempt_record", "11/21/2026", "14:03:07", "E", "N1", 421, "E", "421 busy")
        .set_var("EMAIL_ERROR", "421 busy")
        .set_command("fax_status1", 2)
        .set_command("fax_status2", 421)
        .set_command("fax_next_date", "11/21/2026")
        .set_command("fax_next_time", "14:08:07")
    )
    assert parse_job(edited, "00012345.FS").identity == parse_job(cf, "00012345.FS").identity


def test_identity_is_the_digest_it_always_was():
    # A job retried after an upgrade keeps its Message-ID: the digest's bytes never change.
    data = (b'$email_address a@b.c\r\n$var_def DOMAINBUSY_COUNT 3\r\n$email_text "x\xff"\n'
            b'$attempt_record 01/02/2026 10:00:00 N1 451 H "busy"\n')
    assert identity(data) == "78e78882680757679366e1857838b49a"


def test_identity_of_a_plain_job_is_the_digest_it_always_was():
    # No owned line and no CR: the identity is taken from the text at once.
    assert identity(b'$email_address a@b.c\n$email_text "x"') == "41cc8a901903d4ab0b289fa3c3d833da"


@given(fs_files(first_lines=("$email_address jane@example.com",)))
def test_identity_is_the_digest_of_the_submitters_lines_each_ended_by_lf(data):
    cf = CommandFile.parse(data)
    commands = cf.commands()
    owned = {c.line for c in commands if is_owned(c)}
    kept = "".join(raw.rstrip("\r\n") + "\n" for number, raw in enumerate(cf.lines, 1) if number not in owned)
    h = hashlib.sha256(b"A.FS" + kept.encode("utf-8", "surrogateescape"))
    assert job_identity("A.FS", cf, commands) == h.hexdigest()[:32]


def test_identity_is_stable_when_an_append_ends_the_last_line():
    assert identity(EXAMPLE.rstrip(b"\n")) == identity(EXAMPLE)
    assert identity(EXAMPLE.rstrip(b"\n") + b"\r") == identity(EXAMPLE)


@given(fs_files(first_lines=("$email_address jane@example.com",)), engine_edits())
def test_identity_is_stable_across_any_engine_edits(data, edits):
    cf = CommandFile.parse(data)
    edited = apply_edits(cf, edits)
    assert job_identity("A.FS", edited, edited.commands()) == job_identity("A.FS", cf, cf.commands())


@pytest.mark.parametrize(
    "change",
    [
        lambda b: b.replace(b"customer 4711", b"customer 4712"),  # a comment
        lambda b: b.replace(b"November", b"December"),
        lambda b: b.replace(b"$var_def CUSTOMER 4711", b"$var_def CUSTOMER 4712"),
        lambda b: b + b"$email_text P.S.\n",
        lambda b: b.replace(b'$email_text "Dear Jane,"\n', b""),
        lambda b: b.replace(b"$email_body statements/4711.txt\n$email_attach", b"$email_attach"),
        lambda b: b.replace(b"Dear Jane", b"Dear jane"),
    ],
)
def test_identity_changes_when_a_submitter_line_changes(change):
    changed = change(EXAMPLE)
    assert changed != EXAMPLE
    assert identity(changed) != identity(EXAMPLE)


def test_identity_differs_between_job_names():
    assert identity(EXAMPLE, "00012345.FS") != identity(EXAMPLE, "00012346.FS")


def test_is_owned_marks_only_the_engines_lines():
    cf = CommandFile.parse(EXAMPLE_AFTER + b"$var_def DOMAINBUSY_COUNTER 1\n$fax_status 1\n$var_def email_connect_ip 1.2.3.4\n")
    owned = [c.line for c in cf.commands() if is_owned(c)]
    assert owned == [10, 11, 12, 13, 14, 17]


@given(st.one_of(fs_files(first_lines=("$email_address jane@example.com",)), st.binary()))
def test_parse_job_raises_only_job_errors(data):
    try:
        job(data)
    except JobError as e:
        assert e.outcome in {c.code for c in outcome.ENGINE_CODES}


# --- quick_domain: a worker's cheap look at the recipient ------------------------------


@given(fs_files())
def test_quick_domain_agrees_with_parse_job_whenever_both_give_a_domain(data):
    cf = CommandFile.parse(data)
    quick = quick_domain(cf)
    try:
        job = parse_job(cf, "X.FS")
    except JobError:
        return
    assert quick is None or quick == job.domain


@given(fs_files(first_lines=("$email_address someone@Example.ORG",)))
def test_quick_domain_reads_a_plain_address_line(data):
    cf = CommandFile.parse(data)
    lines = [c for c in cf.commands() if c.name == "email_address"] if _parses(cf) else None
    if lines is not None and len(lines) == 1:
        assert quick_domain(cf) == "example.org"


@given(st.lists(st.sampled_from(["$email_address", "$EMAIL_Address", "$email_addresses", " ", "\t", "\r", "\n",
                                  "\r\n", "a@b.c", "x", "$", ";"]), max_size=25).map("".join))
def test_address_lines_finds_what_the_line_pattern_finds(text):
    from copiamail.jobfile.addresses import _ADDRESS_LINE, address_lines

    assert address_lines(text) == _ADDRESS_LINE.findall(text)


def _parses(cf: CommandFile) -> bool:
    try:
        cf.commands()
    except Exception:
        return False
    return True


@pytest.mark.parametrize("text", [
    "$email_address a@x.org\n$email_alt_address b@y.org\n$var_def EMAIL_USING_ALT 1\n",
    '$email_address "a b"@x.org\n',
    "$email_address a@x.org\n$EMAIL_ADDRESS b@y.org\n",
    "$email_address a@x.org ;comment\n",
    "$email_address <a@x.org> more\n",
    "; $email_address a@x.org\n",
])
def test_quick_domain_leaves_anything_but_one_plain_line_to_the_full_parse(text):
    cf = CommandFile.parse(text.encode())
    assert quick_domain(cf) is None or quick_domain(cf) == parse_job(cf, "X.FS").domain


# --- addresses as CopiaFacts writes them, typos --------------------------------


@pytest.mark.parametrize("line, address, header", [
    (b"$email_address Jane Doe <jane@example.com>", "jane@example.com", "Jane Doe <jane@example.com>"),
    (b'$email_address "Doe, Jane" <jane@example.com>', "jane@example.com", '"Doe, Jane" <jane@example.com>'),
    (b"$email_address   Jane   Doe   <Jane@Example.COM>", "Jane@Example.COM", "Jane Doe <Jane@Example.COM>"),
    (b"$email_address <jane@example.com>", "jane@example.com", None),
    (b"$email_address jane @ example.com", "jane@example.com", None),
    (b'$email_address "jane@example.com"', "jane@example.com", None),
    (b'$email_address "Jane Doe <jane@example.com>"', "jane@example.com", "Jane Doe <jane@example.com>"),
])
def test_email_address_is_read_as_written_with_its_display_name(line, address, header):
    j = job(line + b"\n$email_subject s\n")
    assert (j.address, j.domain, j.to_header) == (address, "example.com", header)


def test_email_from_keeps_its_double_quotes_as_written():
    j = job(ADDR + b'$email_from "Doe, Jane" <jane@acme.test>\n$email_subject s\n')
    assert j.from_header == '"Doe, Jane" <jane@acme.test>'


def test_email_from_quoted_whole_is_read_unquoted():
    assert job(EXAMPLE).from_header == "Acme Billing <billing@acme.test>"


def test_email_esender_with_a_display_name_sends_the_address_inside_angle_brackets():
    j = job(ADDR + b"$email_esender Statements Desk <statements@acme.test>\n$email_subject s\n")
    assert j.esender == "statements@acme.test"


@pytest.mark.parametrize("line", [b"$email_subjct \"typo\"", b"$emailtext \"body\"", b"$EMAIL_BODYY x.txt"])
def test_an_unknown_email_command_fails_the_job_with_outcome_60_naming_the_line(line):
    e = job_error(ADDR + b"$email_subject ok\n" + line + b"\n", path="T.FS")
    assert e.outcome == outcome.BAD_JOB.code == 60
    assert e.line == 3
    assert "unknown command" in e.message


def test_every_copiafacts_email_command_is_known():
    data = ADDR + b"".join(b"$" + n.encode() + b" " + v + b"\n" for n, v in [
        ("email_alt_address", b"alt@example.com"), ("email_options", b"second"), ("email_dkim_keyfile", b"k.pem"),
        ("email_retry_max", b"3"), ("email_settings", b"5000 3 35000 10000")])
    job(data + b"$email_subject s\n")


def test_unknown_commands_other_than_email_ones_are_kept_and_ignored():
    j = job(ADDR + b"$fax_phone 5551234\n$email_subject s\n")
    assert j.subject == "s"


@pytest.mark.parametrize("header", [b"$email_header Content-Type: text/plain", b"$email_header Date: yesterday",
                                    b'$email_header "Bad Name:" x'])
def test_a_header_error_names_its_line(header):
    e = job_error(ADDR + b"$email_subject s\n" + header + b"\n", path="H.FS")
    assert e.outcome == outcome.BAD_HEADER.code
    assert e.line == 3
    assert str(e).startswith("H.FS:3: ")


# --- CopiaFacts variables, options, dates ---------------------------------------


def test_email_commands_expand_variables_from_the_job_then_the_cfg_and_config():
    env = JobEnv({"COMPANY": "Acme", "NAME": "from cfg"}, "bounce@acme.test")
    j = parse_job(CommandFile.parse(
        b"$email_address `NAME <jane@example.com>\n$email_subject \"Hi `NAME of `COMPANY (`FSNUM)\"\n"
        b"$email_text \"sent by `EMAIL_ESENDER\"\n$var_def NAME Jane\n"), "00004711.FS", env)
    assert j.subject == "Hi Jane of Acme (00004711)"
    assert j.to_header == "Jane <jane@example.com>"
    assert j.body[0].value == "sent by bounce@acme.test"


def test_nomacro_turns_expansion_off():
    j = job(ADDR + b'$email_options "nomacro"\n$email_subject "Hi `NAME"\n')
    assert j.subject == "Hi `NAME"


def test_an_undefined_variable_fails_the_job_with_outcome_60_naming_it():
    e = job_error(ADDR + b'$email_subject "Hi `NOBODY"\n', path="U.FS")
    assert e.outcome == 60 and e.line == 2 and "`NOBODY" in e.message


def test_other_commands_never_expand():
    j = job(ADDR + b'$email_subject s\n$fax_phone "`NOBODY"\n')
    assert j.subject == "s"


def test_email_header_takes_name_and_value_without_a_colon():
    j = job(ADDR + b"$email_subject s\n$email_header X-Campaign november\n$email_header Reply-To: r@acme.test\n")
    assert j.headers == (("X-Campaign", "november"), ("Reply-To", "r@acme.test"))


def test_email_charset_reads_its_encodings():
    j = job(ADDR + b"$email_subject s\n$email_charset iso-8859-1 base64 quoted-printable\n")
    assert (j.charset, j.body_encoding, j.header_encoding) == ("iso-8859-1", "base64", "quoted-printable")
    e = job_error(ADDR + b"$email_subject s\n$email_charset utf-8 uuencode\n")
    assert e.outcome == outcome.BAD_CHARSET.code


def test_email_attach_reads_a_shown_name_and_embedded_parts():
    j = job(ADDR + b'$email_subject s\n$email_attach a.pdf "application/pdf; name=Statement.pdf"\n'
            b"$email_attach logo.png EMBEDDED:image/png\n")
    assert j.attachments[0].content_type == "application/pdf" and j.attachments[0].name == "Statement.pdf"
    assert j.attachments[1].content_type == "image/png" and j.attachments[1].embedded


def test_email_options_are_read_in_lower_case():
    assert job(ADDR + b'$email_subject s\n$email_options "reqTLS, nomacro"\n').options == {"reqtls", "nomacro"}


def test_fax_send_date_and_time_defer_the_job():
    j = job(ADDR + b"$email_subject s\n$fax_send_date 01/02/2099\n$fax_send_time 08:30\n")
    assert j.next_attempt == time.mktime(time.strptime("01/02/2099 08:30:00", "%m/%d/%Y %H:%M:%S"))
    j = job(ADDR + b"$email_subject s\n$fax_send_date 01/02/2099\n")
    assert j.next_attempt == time.mktime(time.strptime("01/02/2099 00:00:00", "%m/%d/%Y %H:%M:%S"))
    today = time.strftime("%m/%d/%Y")
    j = job(ADDR + b"$email_subject s\n$fax_send_time 23:59:59\n")
    assert j.next_attempt == time.mktime(time.strptime(f"{today} 23:59:59", "%m/%d/%Y %H:%M:%S"))


def test_emailto_and_emailcc_lists_are_read_from_variables():
    j = job(ADDR + b'$email_subject s\n$var_def EMAILTO_LIST "a@x.test, b@x.test"\n$var_def EMAILCC_LIST c@x.test\n')
    assert (j.to_list, j.cc_list) == ("a@x.test, b@x.test", "c@x.test")


def test_email_alt_address_is_kept_for_when_the_main_address_fails_for_good():
    j = job(ADDR + b"$email_subject s\n$email_alt_address Jane Home <jane@home.test>\n")
    assert (j.address, j.alt_address) == ("jane@example.com", "jane@home.test")


def test_once_switched_the_job_goes_to_its_alternative_with_retries_of_its_own():
    j = job(ADDR + b"$email_subject s\n$email_alt_address jane@home.test\n"
            b'$attempt_record 11/21/2026 14:03:07 0 0 0 451 E 0 0 0 E1 0 - - "451 later" N1\n'
            b"$var_def EMAIL_USING_ALT 1\n")
    assert (j.address, j.domain, j.alt_address) == ("jane@home.test", "home.test", None)
    assert j.current_attempts == () and len(j.attempts) == 1


def test_a_job_moved_back_by_hand_starts_its_retries_afresh():
    records = (b'$attempt_record 11/21/2026 14:03:07 0 0 0 451 E 0 0 0 E1 0 - - "451 later" N1\n'
               b'$attempt_record 11/21/2026 14:08:07 0 0 0 451 E 0 0 0 E1 0 - - "451 later" N1\n')
    done = job(ADDR + b"$email_subject s\n" + records + b"$fax_status1 6\n$fax_status2 451\n")
    assert done.restarted and done.earlier_retries == [] and len(done.current_attempts) == 2
    again = job(ADDR + b"$email_subject s\n" + records + b"$fax_status1 6\n$fax_status2 451\n"
                + records.split(b"\n")[0] + b"\n$fax_status1 2\n")
    assert not again.restarted and again.earlier_retries == ["E"]


@pytest.mark.parametrize("line, node, code, klass, text", [
    (b'$attempt_record 11/21/2026 14:03:07 0 0 0 550 B 0 2 0 E1 0 14:03:07 14:03:07 "550 5.1.1 unknown" N1',
     "N1", 550, "B", "550 5.1.1 unknown"),
    (b"$attempt_record 11/21/2026 14:03:07 0 0 0 550 B 0 2 0 E1 0 14:03:07 14:03:07", "", 550, "B", ""),
    (b'$attempt_record 11/21/2026 14:03:07 E N1 421 E "421 try later"', "N1", 421, "E", "421 try later"),
])
def test_attempt_records_are_read_in_every_layout(line, node, code, klass, text):
    [record] = job(ADDR + b"$email_subject s\n" + line + b"\n").attempts
    assert (record.node, record.outcome, record.klass, record.text) == (node, code, klass, text)


def test_without_email_from_the_jobs_esender_as_written_is_the_from_header():
    j = job(ADDR + b'$email_subject s\n$email_esender "Acme Billing" <billing@acme.test>\n')
    assert (j.esender, j.from_header) == ("billing@acme.test", '"Acme Billing" <billing@acme.test>')


def test_the_cfgs_from_comes_after_the_jobs_from_and_esender():
    env = JobEnv(from_header="Acme <cfg@acme.test>")
    assert parse_job(CommandFile.parse(ADDR + b"$email_subject s\n"), "X.FS", env).from_header == "Acme <cfg@acme.test>"
    j = parse_job(CommandFile.parse(ADDR + b"$email_subject s\n$email_esender e@acme.test\n"), "X.FS", env)
    assert j.from_header == "e@acme.test"


def test_a_grave_accent_quote_is_a_literal_quote_in_email_commands():
    assert job(ADDR + b'$email_subject "say `"hello`" now"\n').subject == 'say "hello" now'


def test_engine_variables_are_known_before_the_engine_writes_them():
    j = job(ADDR + b'$email_subject "tries `DOMAINBUSY_COUNT, error [`EMAIL_ERROR]"\n')
    assert j.subject == "tries 0, error []"


def test_email_esender_may_use_variables_and_email_esender_is_its_last_occurrence():
    j = job(ADDR + b'$email_text "from `EMAIL_ESENDER"\n$email_esender first@acme.test\n'
            b"$email_esender b-`FSNUM@acme.test\n$email_subject s\n", name="00000042.FS")
    assert j.esender == "b-00000042@acme.test" and j.body[0].value == "from b-00000042@acme.test"


def test_a_path_variable_defined_after_its_use_expands_without_any_grave_accent():
    j = job(ADDR + b"$email_subject s\n$email_attach FFJOBS\\x.pdf\n$var_def FFJOBS C:\\Copia\\Jobs\n")
    assert j.attachments[0].path == "C:\\Copia\\Jobs\\x.pdf"


def test_a_list_variable_from_the_cfg_expands_in_a_job_without_a_grave_accent():
    env = JobEnv({"EMAILTO_LIST": "ref-`FSNUM@example.com"})
    assert parse_job(CommandFile.parse(ADDR + b"$email_subject s\n"), "00000007.FS", env).to_list == "ref-00000007@example.com"


def test_a_send_time_alone_no_longer_holds_once_the_job_was_tried_or_deferred():
    late = b"$fax_send_time 23:59:59\n"
    assert job(ADDR + b"$email_subject s\n" + late).next_attempt is not None
    assert job(ADDR + b"$email_subject s\n" + late + b"$var_def DOMAINBUSY_COUNT 1\n").next_attempt is None


def test_email_header_name_and_value_in_one_quoted_argument():
    assert job(ADDR + b'$email_subject s\n$email_header "X-Priority 1"\n').headers == (("X-Priority", "1"),)


def test_a_job_moved_back_after_its_alternative_was_tried_goes_to_the_main_address_again():
    tried = (ADDR + b"$email_subject s\n$email_alt_address alt@home.test\n$var_def EMAIL_USING_ALT 1\n"
             b"$fax_status1 6\n")
    assert job(tried).address == "jane@example.com"
