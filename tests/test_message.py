"""build_message: the message a job becomes, read back with the stdlib parser."""

from __future__ import annotations

import email
import email.policy
import os
import re
from email.message import EmailMessage
from email.utils import parsedate_to_datetime
from pathlib import Path

import pytest

from copiamail.errors import JobError
from copiamail.jobfile import files as files_module
from copiamail.jobfile import message as message_module
from copiamail.jobfile import outcome
from copiamail.jobfile.fsfile import CommandFile
from copiamail.jobfile.job import parse_job
from copiamail.jobfile.message import build_message
from copiamail.jobfile.model import Attachment, BodyItem, Job

SENDER = "bounce@acme.test"
NOW = 1_795_000_000.0


def make_job(**fields: object) -> Job:
    base: dict[str, object] = dict(
        name="00000001.FS", address="jane.doe@example.com", domain="example.com",
        identity="0123456789abcdef0123456789abcdef",
    )
    base.update(fields)
    return Job(**base)  # type: ignore[arg-type]


def texts(*lines: str) -> tuple[BodyItem, ...]:
    return tuple(BodyItem("text", line, n) for n, line in enumerate(lines, 1))


def build(job: Job, root: Path, *, sender: str = SENDER, roots: tuple[Path, ...] | None = None,
          now: float = NOW) -> bytes:
    return build_message(job, spool_root=root, attachment_roots=(root,) if roots is None else roots,
                         sender=sender, now=now)


def build_via_email(job: Job, root: Path) -> bytes:
    return message_module._build(job, root, (root,), SENDER, NOW, force_email=True)


def parse(data: bytes) -> EmailMessage:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    assert not msg.defects, msg.defects
    return msg


def content(part: EmailMessage) -> str:
    return part.get_content().replace("\r\n", "\n")


def outcome_of(excinfo: pytest.ExceptionInfo[JobError]) -> int:
    return excinfo.value.outcome


# --- headers -----------------------------------------------------------------


def test_from_defaults_to_the_sender(tmp_path: Path) -> None:
    msg = parse(build(make_job(body=texts("hi")), tmp_path))
    assert msg["From"] == SENDER


def test_email_from_overrides_the_sender_in_from(tmp_path: Path) -> None:
    job = make_job(body=texts("hi"), from_header="Acme Billing <billing@acme.test>")
    msg = parse(build(job, tmp_path))
    assert msg["From"].addresses[0].addr_spec == "billing@acme.test"
    assert msg["From"].addresses[0].display_name == "Acme Billing"


def test_non_ascii_from_display_name_is_encoded_and_reads_back(tmp_path: Path) -> None:
    data = build(make_job(body=texts("hi"), from_header="Jörg Müller <j@acme.test>"), tmp_path)
    assert data.isascii()
    msg = parse(data)
    assert msg["From"].addresses[0].display_name == "Jörg Müller"
    assert msg["From"].addresses[0].addr_spec == "j@acme.test"


def test_to_is_the_job_address(tmp_path: Path) -> None:
    msg = parse(build(make_job(body=texts("hi")), tmp_path))
    assert msg["To"] == "jane.doe@example.com"


def test_subject_is_written(tmp_path: Path) -> None:
    msg = parse(build(make_job(subject='Your statement for "November"', body=texts("hi")), tmp_path))
    assert msg["Subject"] == 'Your statement for "November"'


def test_non_ascii_subject_is_rfc2047_encoded_and_reads_back(tmp_path: Path) -> None:
    data = build(make_job(subject="Grüße aus Köln – €5", body=texts("hi")), tmp_path)
    head = data.split(b"\r\n\r\n", 1)[0]
    assert head.isascii()
    assert b"=?utf-8?" in head
    assert parse(data)["Subject"] == "Grüße aus Köln – €5"


def test_long_subject_is_folded_and_reads_back(tmp_path: Path) -> None:
    subject = " ".join(f"word{i}" for i in range(40))
    data = build(make_job(subject=subject, body=texts("hi")), tmp_path)
    head = data.split(b"\r\n\r\n", 1)[0]
    assert all(len(line) <= 78 for line in head.split(b"\r\n"))
    assert parse(data)["Subject"] == subject


def test_subject_is_omitted_when_the_job_has_none(tmp_path: Path) -> None:
    msg = parse(build(make_job(body=texts("hi")), tmp_path))
    assert "Subject" not in msg


def test_message_id_is_stable_across_builds_at_different_times(tmp_path: Path) -> None:
    job = make_job(body=texts("hi"))
    first = parse(build(job, tmp_path, now=NOW))
    retry = parse(build(job, tmp_path, now=NOW + 3600))
    assert first["Message-ID"] == retry["Message-ID"]
    assert first["Message-ID"] == "<0123456789abcdef0123456789abcdef@acme.test>"


def test_message_id_differs_for_a_different_identity(tmp_path: Path) -> None:
    a = parse(build(make_job(body=texts("hi"), identity="a" * 32), tmp_path))
    b = parse(build(make_job(body=texts("hi"), identity="b" * 32), tmp_path))
    assert a["Message-ID"] != b["Message-ID"]


def test_message_id_uses_the_domain_of_a_sender_with_display_name(tmp_path: Path) -> None:
    msg = parse(build(make_job(body=texts("hi")), tmp_path, sender="Acme <Bounce@Mail.Acme.Test>"))
    assert msg["Message-ID"].endswith("@mail.acme.test>")


def test_message_id_is_stable_for_a_parsed_job_after_engine_edits(tmp_path: Path) -> None:
    fs = b"$email_address jane@example.com\n$email_text hi\n"
    job = parse_job(CommandFile.parse(fs), "X.FS")
    edited = CommandFile.parse(fs).set_var("EMAIL_ERROR", "421 busy").append_command("fax_status1", "2")
    job2 = parse_job(edited, "X.FS")
    other = parse_job(CommandFile.parse(fs + b"$email_text more\n"), "X.FS")
    ids = [parse(build(j, tmp_path))["Message-ID"] for j in (job, job2, other)]
    assert ids[0] == ids[1] != ids[2]


def test_a_job_without_identity_still_gets_a_stable_valid_message_id(tmp_path: Path) -> None:
    job = make_job(body=texts("hi"), identity="")
    a, b = (parse(build(job, tmp_path))["Message-ID"] for _ in range(2))
    assert a == b
    assert re.fullmatch(r"<[0-9a-f]{32}@acme\.test>", a)


def test_date_is_now_in_local_time(tmp_path: Path) -> None:
    msg = parse(build(make_job(body=texts("hi")), tmp_path, now=NOW))
    assert parsedate_to_datetime(msg["Date"]).timestamp() == NOW


def test_date_follows_a_new_time_zone_of_the_same_names_but_another_offset(tmp_path: Path, monkeypatch) -> None:
    import email.utils
    import time

    dates = []
    for zone in ("EST+5", "EST+4"):  # both named ('EST', 'EST')
        monkeypatch.setenv("TZ", zone)
        time.tzset()
        dates.append((parse(build(make_job(body=texts("hi")), tmp_path, now=NOW))["Date"],
                      email.utils.formatdate(NOW, localtime=True)))
    monkeypatch.undo()
    time.tzset()
    assert [made for made, _ in dates] == [expected for _, expected in dates]
    assert dates[0][0].endswith("-0500") and dates[1][0].endswith("-0400")


def test_date_defaults_to_the_current_time(tmp_path: Path) -> None:
    import time

    before = int(time.time())
    data = build_message(make_job(body=texts("hi")), spool_root=tmp_path, attachment_roots=(tmp_path,),
                         sender=SENDER)
    assert before <= parsedate_to_datetime(parse(data)["Date"]).timestamp() <= time.time() + 1


def test_headers_come_in_the_documented_order(tmp_path: Path) -> None:
    job = make_job(subject="s", body=texts("hi"), headers=(("X-Foo", "1"), ("Reply-To", "r@acme.test")))
    names = list(parse(build(job, tmp_path)).keys())
    assert names == ["From", "To", "Subject", "Date", "Message-ID", "MIME-Version", "X-Mailer", "X-Foo", "Reply-To",
                     "Content-Type", "Content-Transfer-Encoding"]


def test_extra_headers_are_added_in_order_and_repeats_kept(tmp_path: Path) -> None:
    job = make_job(body=texts("hi"), headers=(("X-Tag", "a"), ("Reply-To", "r@acme.test"), ("X-Tag", "b")))
    msg = parse(build(job, tmp_path))
    assert msg.get_all("X-Tag") == ["a", "b"]
    assert msg["Reply-To"] == "r@acme.test"


def test_non_ascii_extra_header_is_encoded(tmp_path: Path) -> None:
    data = build(make_job(body=texts("hi"), headers=(("X-Note", "café"),)), tmp_path)
    assert data.split(b"\r\n\r\n", 1)[0].isascii()
    assert parse(data)["X-Note"] == "café"


@pytest.mark.parametrize("name,value", [
    ("From", "Other <other@acme.test>"),
    ("to", "someone@else.test"),
    ("SUBJECT", "replaced"),
    ("Message-ID", "<custom@acme.test>"),
    ("Date", "Sat, 21 Nov 2026 14:03:07 +0100"),
])
def test_a_job_header_naming_one_of_ours_replaces_it(tmp_path: Path, name: str, value: str) -> None:
    job = make_job(subject="original", from_header="f@acme.test", body=texts("hi"), headers=((name, value),))
    msg = parse(build(job, tmp_path))
    assert msg.get_all(name) == [value]


def test_a_subject_header_adds_a_subject_to_a_job_without_one(tmp_path: Path) -> None:
    msg = parse(build(make_job(body=texts("hi"), headers=(("Subject", "via header"),)), tmp_path))
    assert msg.get_all("Subject") == ["via header"]


@pytest.mark.parametrize("name", ["Content-Type", "content-transfer-encoding", "MIME-Version"])
def test_a_job_header_naming_a_mime_header_is_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(JobError) as e:
        build(make_job(body=texts("hi"), headers=((name, "text/plain"),)), tmp_path)
    assert outcome_of(e) == outcome.BAD_HEADER.code


def test_a_bad_date_header_is_refused(tmp_path: Path) -> None:
    with pytest.raises(JobError) as e:
        build(make_job(body=texts("hi"), headers=(("Date", "yesterday"),)), tmp_path)
    assert outcome_of(e) == outcome.BAD_HEADER.code


@pytest.mark.parametrize("fields,sender", [
    (dict(subject="hi\r\nBcc: victim@example.com"), SENDER),
    (dict(subject="hi\nBcc: victim@example.com"), SENDER),
    (dict(subject="hi\rthere"), SENDER),
    (dict(from_header="a@acme.test\r\nBcc: x@y.test"), SENDER),
    (dict(headers=(("X-Foo", "a\nBcc: x@y.test"),)), SENDER),
    (dict(headers=(("X-Foo\r\nBcc", "x@y.test"),)), SENDER),
    (dict(address="jane@example.com\r\nBcc: x@y.test"), SENDER),
    (dict(subject="nul\0byte"), SENDER),
    ({}, "bounce@acme.test\r\nBcc: x@y.test"),
])
def test_a_header_with_cr_or_lf_is_refused(tmp_path: Path, fields: dict[str, object], sender: str) -> None:
    with pytest.raises(JobError) as e:
        build(make_job(body=texts("hi"), **fields), tmp_path, sender=sender)
    assert outcome_of(e) == outcome.BAD_HEADER.code


# --- text or HTML ------------------------------------------------------------


def test_a_body_without_html_marker_is_text_plain(tmp_path: Path) -> None:
    msg = parse(build(make_job(body=texts("Dear Jane,", "see attached")), tmp_path))
    assert msg.get_content_type() == "text/plain"
    assert content(msg) == "Dear Jane,\nsee attached\n"


@pytest.mark.parametrize("where", [0, 1, 2])
def test_html_marker_in_the_first_three_lines_makes_text_html(tmp_path: Path, where: int) -> None:
    lines = ["line a", "line b", "line c", "line d"]
    lines[where] = '<HTML lang="en">'
    msg = parse(build(make_job(body=texts(*lines)), tmp_path))
    assert msg.get_content_type() == "text/html"


def test_html_marker_on_the_fourth_line_leaves_text_plain(tmp_path: Path) -> None:
    msg = parse(build(make_job(body=texts("a", "b", "c", "<html>")), tmp_path))
    assert msg.get_content_type() == "text/plain"


def test_html_marker_counts_lines_of_a_body_file(tmp_path: Path) -> None:
    (tmp_path / "page.txt").write_bytes(b"one\r\ntwo\r\n<html><body>x</body></html>\r\n")
    msg = parse(build(make_job(body=(BodyItem("file", "page.txt", 1),)), tmp_path))
    assert msg.get_content_type() == "text/html"
    (tmp_path / "late.txt").write_bytes(b"one\ntwo\nthree\n<html>\n")
    msg = parse(build(make_job(body=(BodyItem("file", "late.txt", 1),)), tmp_path))
    assert msg.get_content_type() == "text/plain"


@pytest.mark.parametrize("filename", ["mail.html", "MAIL.HTM"])
def test_an_html_body_file_makes_text_html(tmp_path: Path, filename: str) -> None:
    (tmp_path / filename).write_text("<p>no marker here</p>\n")
    msg = parse(build(make_job(body=texts("a", "b", "c") + (BodyItem("file", filename, 4),)), tmp_path))
    assert msg.get_content_type() == "text/html"
    assert content(msg) == "a\nb\nc\n<p>no marker here</p>\n"


# --- body --------------------------------------------------------------------


def test_body_mixes_text_lines_and_files_in_file_order(tmp_path: Path) -> None:
    (tmp_path / "statements").mkdir()
    (tmp_path / "statements" / "4711.txt").write_bytes(b"Balance: 12.00\nDue: now\n")
    (tmp_path / "sig.txt").write_bytes(b"-- \nAcme")  # no final line break
    body = (
        BodyItem("text", "Dear Jane,", 1),
        BodyItem("file", "statements/4711.txt", 2),
        BodyItem("text", "Regards,", 3),
        BodyItem("file", str(tmp_path / "sig.txt"), 4),
    )
    msg = parse(build(make_job(body=body), tmp_path))
    assert content(msg) == "Dear Jane,\nBalance: 12.00\nDue: now\nRegards,\n-- \nAcme\n"


def test_a_body_file_is_added_as_is_without_a_line_break_after_it(tmp_path: Path) -> None:
    (tmp_path / "part.txt").write_bytes(b"Hello ")
    body = (BodyItem("file", "part.txt", 1), BodyItem("text", "Jane", 2))
    assert content(parse(build(make_job(body=body), tmp_path))) == "Hello Jane\n"


def test_a_body_file_that_is_not_utf8_is_read_as_cp1252(tmp_path: Path) -> None:
    (tmp_path / "old.txt").write_bytes(b"Caf\xe9 \x80 5\n")
    msg = parse(build(make_job(body=(BodyItem("file", "old.txt", 1),)), tmp_path))
    assert content(msg) == "Café € 5\n"


def test_a_utf8_bom_in_a_body_file_is_dropped(tmp_path: Path) -> None:
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfhello\n")
    assert content(parse(build(make_job(body=(BodyItem("file", "bom.txt", 1),)), tmp_path))) == "hello\n"


def test_a_subject_with_an_empty_body_is_a_valid_message(tmp_path: Path) -> None:
    msg = parse(build(make_job(subject="only a subject"), tmp_path))
    assert msg.get_content_type() == "text/plain"
    assert content(msg).strip() == ""


def test_a_job_with_no_subject_body_or_attachment_fails_with_outcome_60(tmp_path: Path) -> None:
    with pytest.raises(JobError) as e:
        build(make_job(), tmp_path)
    assert e.value.outcome == outcome.BAD_JOB.code == 60
    assert "nothing to send" in e.value.message


def test_short_ascii_body_is_sent_7bit(tmp_path: Path) -> None:
    msg = parse(build(make_job(body=texts("plain ascii")), tmp_path))
    assert msg["Content-Transfer-Encoding"] == "7bit"


def test_mostly_ascii_utf8_body_is_quoted_printable(tmp_path: Path) -> None:
    msg = parse(build(make_job(body=texts("The café on the corner serves good coffee today.")), tmp_path))
    assert msg["Content-Transfer-Encoding"] == "quoted-printable"
    assert content(msg) == "The café on the corner serves good coffee today.\n"


def test_mostly_non_ascii_body_is_base64(tmp_path: Path) -> None:
    msg = parse(build(make_job(body=texts("日本語のテキストです。" * 5)), tmp_path))
    assert msg["Content-Transfer-Encoding"] == "base64"
    assert content(msg) == "日本語のテキストです。" * 5 + "\n"


def test_an_ascii_line_over_998_bytes_is_not_sent_7bit(tmp_path: Path) -> None:
    line = "x" * 2000
    data = build(make_job(body=texts(line)), tmp_path)
    msg = parse(data)
    assert msg["Content-Transfer-Encoding"] != "7bit"
    assert content(msg) == line + "\n"
    assert max(len(x) for x in data.split(b"\r\n")) <= 998


# --- alternative and attachments ---------------------------------------------


@pytest.mark.parametrize("main_html,alt_html,first", [
    (True, False, "alt"),   # HTML last
    (False, True, "main"),  # HTML last
    (False, False, "alt"),
    (True, True, "alt"),
])
def test_alternative_puts_html_last_else_the_alt_part_first(
    tmp_path: Path, main_html: bool, alt_html: bool, first: str,
) -> None:
    main = texts("<html>main</html>" if main_html else "main")
    alt = texts("<html>alt</html>" if alt_html else "alt")
    msg = parse(build(make_job(body=main, alt=alt), tmp_path))
    assert msg.get_content_type() == "multipart/alternative"
    parts = list(msg.iter_parts())
    assert len(parts) == 2
    contents = [content(p).strip() for p in parts]
    assert ("alt" in contents[0]) == (first == "alt")
    assert ("main" in contents[1]) == (first == "alt")
    types = [p.get_content_type() for p in parts]
    assert types[0] == ("text/html" if (alt_html if first == "alt" else main_html) else "text/plain")


def test_alternative_body_from_an_html_file(tmp_path: Path) -> None:
    (tmp_path / "alt.html").write_text("<p>Hi</p>\n")
    msg = parse(build(make_job(body=texts("Hi"), alt=(BodyItem("file", "alt.html", 2),)), tmp_path))
    plain, html = msg.iter_parts()
    assert (plain.get_content_type(), html.get_content_type()) == ("text/plain", "text/html")
    assert content(html) == "<p>Hi</p>\n"


def test_attachment_binary_content_round_trips_in_base64(tmp_path: Path) -> None:
    blob = bytes(range(256)) * 10 + b"\r\n\n\r\x00end"
    (tmp_path / "data.bin").write_bytes(blob)
    job = make_job(body=texts("see attached"), attachments=(Attachment("data.bin", None, 2),))
    msg = parse(build(job, tmp_path))
    assert msg.get_content_type() == "multipart/mixed"
    body, att = msg.iter_parts()
    assert content(body) == "see attached\n"
    assert att["Content-Transfer-Encoding"] == "base64"
    assert att.get_content_disposition() == "attachment"
    assert att.get_filename() == "data.bin"
    assert att.get_content_type() == "application/octet-stream"
    assert att.get_content() == blob


def test_attachment_content_type_is_the_one_given(tmp_path: Path) -> None:
    (tmp_path / "report.dat").write_bytes(b"%PDF-1.4 fake")
    job = make_job(body=texts("x"), attachments=(Attachment("report.dat", "application/pdf", 2),))
    att = list(parse(build(job, tmp_path)).iter_parts())[1]
    assert att.get_content_type() == "application/pdf"
    assert att.get_filename() == "report.dat"


@pytest.mark.parametrize("filename,expected", [
    ("statement.pdf", "application/pdf"),
    ("photo.PNG", "image/png"),
    ("archive.tar.gz", "application/gzip"),
    ("noextension", "application/octet-stream"),
    ("weird.zzqx", "application/octet-stream"),
])
def test_attachment_content_type_is_guessed_from_the_name(tmp_path: Path, filename: str, expected: str) -> None:
    (tmp_path / filename).write_bytes(b"\x00\x01")
    job = make_job(body=texts("x"), attachments=(Attachment(filename, None, 2),))
    att = list(parse(build(job, tmp_path)).iter_parts())[1]
    assert att.get_content_type() == expected
    assert att.get_content() == b"\x00\x01"


def test_attachment_with_non_ascii_name_reads_back(tmp_path: Path) -> None:
    (tmp_path / "Übersicht.txt").write_bytes(b"abc")
    job = make_job(body=texts("x"), attachments=(Attachment("Übersicht.txt", None, 2),))
    att = list(parse(build(job, tmp_path)).iter_parts())[1]
    assert att.get_filename() == "Übersicht.txt"


def test_attachments_with_an_alternative_body_nest_it_first(tmp_path: Path) -> None:
    (tmp_path / "a.pdf").write_bytes(b"A")
    (tmp_path / "b.pdf").write_bytes(b"B")
    job = make_job(
        body=texts("<html>hi</html>"), alt=texts("hi"),
        attachments=(Attachment("a.pdf", None, 3), Attachment("b.pdf", None, 4)),
    )
    msg = parse(build(job, tmp_path))
    assert msg.get_content_type() == "multipart/mixed"
    alt, a, b = msg.iter_parts()
    assert alt.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in alt.iter_parts()] == ["text/plain", "text/html"]
    assert (a.get_content(), b.get_content()) == (b"A", b"B")
    assert (a.get_filename(), b.get_filename()) == ("a.pdf", "b.pdf")


def test_a_multipart_message_is_the_same_bytes_at_each_build(tmp_path: Path) -> None:
    (tmp_path / "a.pdf").write_bytes(b"A")
    job = make_job(body=texts("x"), alt=texts("<html>x</html>"), attachments=(Attachment("a.pdf", None, 3),))
    assert build(job, tmp_path) == build(job, tmp_path)


def test_a_boundary_in_the_text_is_avoided(tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(b"A")
    job = make_job(body=texts("x"), attachments=(Attachment("a.bin", None, 2),))
    boundary = parse(build(job, tmp_path)).get_boundary()
    tricky = make_job(body=texts("--" + boundary, "x"), attachments=(Attachment("a.bin", None, 3),))
    msg = parse(build(tricky, tmp_path))
    assert msg.get_boundary() != boundary
    body, att = msg.iter_parts()
    assert content(body) == f"--{boundary}\nx\n"
    assert att.get_content() == b"A"


# --- charset -----------------------------------------------------------------


def test_iso_8859_1_body_is_declared_and_encoded_in_it(tmp_path: Path) -> None:
    data = build(make_job(body=texts("Grüße, café"), charset="latin1"), tmp_path)
    msg = parse(data)
    assert msg.get_content_charset() == "iso-8859-1"
    assert content(msg) == "Grüße, café\n"
    assert msg.get_payload(decode=True).replace(b"\r\n", b"\n") == "Grüße, café\n".encode("iso-8859-1")


def test_charset_name_is_written_as_its_mime_name(tmp_path: Path) -> None:
    msg = parse(build(make_job(body=texts("x €"), charset="cp1252"), tmp_path))
    assert msg.get_content_charset() == "windows-1252"
    assert content(msg) == "x €\n"


def test_us_ascii_body_uses_the_fast_path(tmp_path: Path) -> None:
    msg = parse(build(make_job(body=texts("plain"), charset="ASCII"), tmp_path))
    assert msg.get_content_charset() == "us-ascii"
    assert content(msg) == "plain\n"


@pytest.mark.parametrize("charset,text,line", [
    ("iso-8859-1", "price: 5 €", 2),
    ("us-ascii", "café", 2),
])
def test_a_character_the_charset_cannot_hold_gives_bad_charset(
    tmp_path: Path, charset: str, text: str, line: int,
) -> None:
    with pytest.raises(JobError) as e:
        build(make_job(body=texts("fine", text), charset=charset), tmp_path)
    assert outcome_of(e) == outcome.BAD_CHARSET.code
    assert e.value.line == line


def test_an_alt_part_the_charset_cannot_hold_gives_bad_charset(tmp_path: Path) -> None:
    with pytest.raises(JobError) as e:
        build(make_job(body=texts("fine"), alt=texts("€"), charset="iso-8859-1"), tmp_path)
    assert outcome_of(e) == outcome.BAD_CHARSET.code


@pytest.mark.parametrize("charset", ["no-such-charset", "unicode_escape", "rot13"])
def test_an_unknown_or_non_mime_charset_gives_bad_charset(tmp_path: Path, charset: str) -> None:
    with pytest.raises(JobError) as e:
        build(make_job(body=texts("x"), charset=charset), tmp_path)
    assert outcome_of(e) == outcome.BAD_CHARSET.code


def test_utf16_body_is_sent_base64_and_reads_back(tmp_path: Path) -> None:
    data = build(make_job(body=texts("héllo", "wörld"), charset="utf-16"), tmp_path)
    msg = parse(data)
    assert msg["Content-Transfer-Encoding"] == "base64"
    assert content(msg) == "héllo\nwörld\n"


# --- paths -------------------------------------------------------------------


@pytest.fixture()
def spool(tmp_path: Path) -> Path:
    root = tmp_path / "spool"
    root.mkdir()
    (root / "ok.txt").write_text("inside\n")
    (tmp_path / "secret.txt").write_text("outside\n")
    return root


def test_absolute_path_outside_attachment_roots_is_refused(spool: Path) -> None:
    job = make_job(body=(BodyItem("file", str(spool.parent / "secret.txt"), 7),))
    with pytest.raises(JobError) as e:
        build(job, spool)
    assert outcome_of(e) == outcome.OUTSIDE_ROOTS.code
    assert e.value.line == 7
    assert "outside attachment_roots" in str(e.value)


def test_dotdot_path_outside_attachment_roots_is_refused(spool: Path) -> None:
    job = make_job(body=texts("x"), attachments=(Attachment("../secret.txt", None, 3),))
    with pytest.raises(JobError) as e:
        build(job, spool)
    assert outcome_of(e) == outcome.OUTSIDE_ROOTS.code
    assert e.value.line == 3


def test_dotdot_path_that_stays_inside_is_allowed(spool: Path) -> None:
    (spool / "sub").mkdir()
    job = make_job(body=(BodyItem("file", "sub/../ok.txt", 1),))
    assert content(parse(build(job, spool))) == "inside\n"


def test_symlink_pointing_outside_attachment_roots_is_refused(spool: Path) -> None:
    os.symlink(spool.parent / "secret.txt", spool / "link.txt")
    job = make_job(alt=(BodyItem("file", "link.txt", 4),), body=texts("x"))
    with pytest.raises(JobError) as e:
        build(job, spool)
    assert outcome_of(e) == outcome.OUTSIDE_ROOTS.code
    assert e.value.line == 4


def test_symlinked_directory_pointing_outside_is_refused(spool: Path) -> None:
    os.symlink(spool.parent, spool / "up")
    job = make_job(body=(BodyItem("file", "up/secret.txt", 2),))
    with pytest.raises(JobError) as e:
        build(job, spool)
    assert outcome_of(e) == outcome.OUTSIDE_ROOTS.code


def test_a_sibling_directory_sharing_the_root_prefix_is_outside(spool: Path) -> None:
    sibling = spool.parent / (spool.name + "2")
    sibling.mkdir()
    (sibling / "f.txt").write_text("x\n")
    job = make_job(body=(BodyItem("file", str(sibling / "f.txt"), 1),))
    with pytest.raises(JobError) as e:
        build(job, spool)
    assert outcome_of(e) == outcome.OUTSIDE_ROOTS.code


def test_a_file_in_another_attachment_root_is_allowed(spool: Path, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "logo.png").write_bytes(b"\x89PNG")
    job = make_job(body=texts("x"), attachments=(Attachment(str(shared / "logo.png"), None, 2),))
    msg = parse(build(job, spool, roots=(spool, shared)))
    assert list(msg.iter_parts())[1].get_content() == b"\x89PNG"


def test_attachment_roots_reached_through_a_symlink_are_resolved(spool: Path, tmp_path: Path) -> None:
    os.symlink(spool, tmp_path / "spool-link")
    job = make_job(body=(BodyItem("file", "ok.txt", 1),))
    assert content(parse(build(job, tmp_path / "spool-link", roots=(tmp_path / "spool-link",)))) == "inside\n"


def test_empty_attachment_roots_mean_the_spool_root(spool: Path) -> None:
    assert content(parse(build(make_job(body=(BodyItem("file", "ok.txt", 1),)), spool, roots=()))) == "inside\n"
    with pytest.raises(JobError) as e:
        build(make_job(body=(BodyItem("file", "../secret.txt", 1),)), spool, roots=())
    assert outcome_of(e) == outcome.OUTSIDE_ROOTS.code


def test_a_missing_body_file_gives_missing_file_naming_it(spool: Path) -> None:
    job = make_job(body=texts("x") + (BodyItem("file", "statements/nope.txt", 5),))
    with pytest.raises(JobError) as e:
        build(job, spool)
    assert outcome_of(e) == outcome.MISSING_FILE.code
    assert e.value.line == 5
    assert "statements/nope.txt" in str(e.value)


def test_a_missing_attachment_gives_missing_file(spool: Path) -> None:
    job = make_job(body=texts("x"), attachments=(Attachment("gone.pdf", None, 9),))
    with pytest.raises(JobError) as e:
        build(job, spool)
    assert outcome_of(e) == outcome.MISSING_FILE.code
    assert e.value.line == 9


def test_a_directory_as_body_file_gives_missing_file(spool: Path) -> None:
    (spool / "dir").mkdir()
    with pytest.raises(JobError) as e:
        build(make_job(body=(BodyItem("file", "dir", 1),)), spool)
    assert outcome_of(e) == outcome.MISSING_FILE.code


def test_a_missing_file_outside_the_roots_is_reported_as_outside(spool: Path) -> None:
    with pytest.raises(JobError) as e:
        build(make_job(body=(BodyItem("file", "/nonexistent/x.txt", 1),)), spool)
    assert outcome_of(e) == outcome.OUTSIDE_ROOTS.code


# --- line endings ------------------------------------------------------------


def _shapes(root: Path) -> dict[str, Job]:
    (root / "lf.txt").write_bytes(b"unix\nlines\n")
    (root / "cr.txt").write_bytes(b"old mac\rlines\r")
    (root / "mixed.html").write_bytes(b"<p>\r\nmixed\n</p>\r")
    (root / "a.bin").write_bytes(b"\n\r\r\n" * 100)
    mixed = texts("text") + (BodyItem("file", "lf.txt", 2), BodyItem("file", "cr.txt", 3))
    return {
        "fast ascii": make_job(subject="s", body=mixed),
        "fast qp": make_job(body=mixed + texts("café " * 40)),
        "fast base64": make_job(body=mixed + texts("日本語" * 40)),
        "latin1": make_job(body=mixed + texts("café"), charset="iso-8859-1"),
        "alternative": make_job(body=mixed, alt=(BodyItem("file", "mixed.html", 4),)),
        "attachments": make_job(body=mixed, attachments=(Attachment("a.bin", None, 5),)),
    }


@pytest.mark.parametrize("shape", ["fast ascii", "fast qp", "fast base64", "latin1", "alternative", "attachments"])
def test_every_line_ends_in_crlf(tmp_path: Path, shape: str) -> None:
    data = build(_shapes(tmp_path)[shape], tmp_path)
    assert data.endswith(b"\r\n")
    assert re.search(rb"[^\r]\n", data) is None
    assert re.search(rb"\r[^\n]", data) is None
    assert max(len(line) for line in data.split(b"\r\n")) <= 998


def test_bare_cr_and_lf_in_body_files_become_line_breaks(tmp_path: Path) -> None:
    msg = parse(build(_shapes(tmp_path)["fast ascii"], tmp_path))
    assert content(msg) == "text\nunix\nlines\nold mac\nlines\n"


# --- the fast path and the email path ----------------------------------------


AGREEMENT_CASES = {
    "ascii": dict(body=texts("Dear Jane,", "", "  indented", "trailing space ", ".", "From here")),
    "latin": dict(body=texts("Grüße aus Köln", "naïve café"), subject="Grüße"),
    "cjk": dict(body=texts("日本語のテキスト" * 10)),
    "long line": dict(body=texts("y" * 1500, "ü" * 300)),
    "html": dict(body=texts("<!doctype html>", "<html><body>é</body></html>")),
    "ascii charset": dict(body=texts("only ascii"), charset="us-ascii"),
    "headers": dict(body=texts("x"), from_header="Jörg <j@acme.test>",
                    headers=(("X-Foo", "bar"), ("Subject", "über"))),
    "empty": dict(subject="s"),
    "tabs and equals": dict(body=texts("a\tb=c\t", "=?utf-8?q?x?=")),
}


@pytest.mark.parametrize("case", sorted(AGREEMENT_CASES))
def test_fast_path_and_email_path_say_the_same(tmp_path: Path, case: str) -> None:
    job = make_job(**AGREEMENT_CASES[case])
    fast_bytes = build(job, tmp_path)
    slow_bytes = build_via_email(job, tmp_path)
    assert re.search(rb"[^\r]\n", slow_bytes) is None
    fast, slow = parse(fast_bytes), parse(slow_bytes)
    assert list(fast.keys()) == list(slow.keys())
    for name in fast:
        assert fast.get_all(name) == slow.get_all(name), name
    assert fast.get_content_type() == slow.get_content_type()
    assert fast.get_content_charset() == slow.get_content_charset()
    assert fast["Content-Transfer-Encoding"] == slow["Content-Transfer-Encoding"]
    assert content(fast) == content(slow)


def test_fast_path_is_taken_for_a_simple_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object) -> bytes:
        raise AssertionError("email path used")

    monkeypatch.setattr(message_module, "_mime_part", fail)
    build(make_job(body=texts("x"), subject="ü"), tmp_path)
    build(make_job(body=texts("<html>ü</html>")), tmp_path)
    with pytest.raises(AssertionError):
        build(make_job(body=texts("x"), charset="iso-8859-1"), tmp_path)


# --- end to end from an FS file ----------------------------------------------


def test_the_spec_example_job_builds_the_expected_message(tmp_path: Path) -> None:
    (tmp_path / "statements").mkdir()
    (tmp_path / "statements" / "4711.txt").write_text("Your balance is 0.00.\n")
    (tmp_path / "statements" / "4711.pdf").write_bytes(b"%PDF-1.4\n\x00\xff")
    fs = (
        b"; monthly statement, customer 4711\r\n"
        b"$email_address jane.doe@example.com\r\n"
        b"$email_esender statements@acme.test\r\n"
        b'$email_from "Acme Billing <billing@acme.test>"\r\n'
        b'$email_subject "Your statement for ""November"""\r\n'
        b'$email_text "Dear Jane,"\r\n'
        b"$email_body statements/4711.txt\r\n"
        b"$email_attach statements/4711.pdf application/pdf\r\n"
        b"$email_header Reply-To: help@acme.test\r\n"
        b"$var_def CUSTOMER 4711\r\n"
    )
    job = parse_job(CommandFile.parse(fs), "00012345.FS")
    msg = parse(build(job, tmp_path, sender=job.esender or SENDER))
    assert msg["From"] == "Acme Billing <billing@acme.test>"
    assert msg["To"] == "jane.doe@example.com"
    assert msg["Subject"] == 'Your statement for "November"'
    assert msg["Reply-To"] == "help@acme.test"
    assert msg["Message-ID"] == f"<{job.identity}@acme.test>"
    body, pdf = msg.iter_parts()
    assert content(body) == "Dear Jane,\nYour balance is 0.00.\n"
    assert pdf.get_content_type() == "application/pdf"
    assert pdf.get_filename() == "4711.pdf"
    assert pdf.get_content() == b"%PDF-1.4\n\x00\xff"


# --- Windows paths (CopiaFacts jobs) ------------------------------------------


def test_a_backslash_in_a_path_is_a_separator(tmp_path: Path) -> None:
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "report.pdf").write_bytes(b"%PDF-1.4 report")
    job = make_job(subject="s", body=texts("hi"), attachments=(Attachment("files\\report.pdf", None, 3),))
    msg = parse(build(job, tmp_path))
    [att] = list(msg.iter_attachments())
    assert att.get_filename() == "report.pdf"
    assert att.get_content() == b"%PDF-1.4 report"


def test_path_map_maps_a_windows_prefix_in_any_case(tmp_path: Path) -> None:
    local = tmp_path / "srv" / "copia"
    (local / "Statements").mkdir(parents=True)
    (local / "Statements" / "4711.txt").write_text("Your balance is 12.00\n")
    job = make_job(subject="s", body=(BodyItem("file", "c:\\COPIA\\Statements\\4711.txt", 4),))
    data = build_message(job, spool_root=tmp_path, attachment_roots=(tmp_path,), sender=SENDER, now=NOW,
                         path_map=(("c:\\copia\\", str(local) + "/"),))
    assert "Your balance is 12.00" in content(parse(data))


def test_an_unmapped_windows_drive_path_fails_naming_path_map(tmp_path: Path) -> None:
    job = make_job(subject="s", attachments=(Attachment("C:\\Copia\\x.pdf", None, 5),))
    with pytest.raises(JobError) as e:
        build(job, tmp_path)
    assert e.value.outcome == outcome.MISSING_FILE.code
    assert e.value.line == 5 and "path_map" in e.value.message


def test_local_path_prefers_the_longest_prefix() -> None:
    mapping = (("c:\\copia\\statements\\", "/data/st/"), ("c:\\copia\\", "/srv/copia/"))
    assert files_module.local_path("C:\\Copia\\Statements\\a\\b.txt", mapping) == "/data/st/a/b.txt"
    assert files_module.local_path("C:\\Copia\\other.txt", mapping) == "/srv/copia/other.txt"
    assert files_module.local_path("rel/x.txt", mapping) == "rel/x.txt"


def test_every_shipped_sample_job_builds_a_message_that_greets_once() -> None:
    samples = Path(__file__).resolve().parent.parent / "samples" / "spool"
    for path in sorted(samples.rglob("*.FS")):
        job = parse_job(CommandFile.read(path), path.name)
        text = build_message(job, spool_root=samples, attachment_roots=(samples,), sender=SENDER, now=NOW)
        greetings = re.findall(rb"^Dear [^\r\n]*", text, re.M)
        assert len(greetings) <= 1, (path.name, greetings)


# --- CopiaFacts message details -------------------------------------------------


def fs_message(tmp_path: Path, text: bytes, env=None, name: str = "00000001.FS") -> EmailMessage:
    from copiamail.jobfile.model import JobEnv
    job = parse_job(CommandFile.parse(text), name, env or JobEnv(esender=SENDER))
    return parse(build_message(job, spool_root=tmp_path, attachment_roots=(tmp_path,), sender=SENDER, now=NOW))


def test_the_engine_adds_x_mailer_and_x_mailer_none_drops_it(tmp_path: Path) -> None:
    from copiamail import __version__
    base = b"$email_address a@example.com\n$email_subject s\n"
    assert fs_message(tmp_path, base)["X-Mailer"] == f"copiamail {__version__}"
    assert fs_message(tmp_path, base + b"$email_header X-Mailer none\n")["X-Mailer"] is None
    assert fs_message(tmp_path, base + b"$email_header X-Mailer: Ours 1.0\n")["X-Mailer"] == "Ours 1.0"


def test_emailto_and_emailcc_lists_become_to_and_cc(tmp_path: Path) -> None:
    msg = fs_message(tmp_path, b'$email_address a@example.com\n$email_subject s\n'
                               b'$var_def EMAILTO_LIST "a@example.com, b@example.com"\n$var_def EMAILCC_LIST c@example.com\n')
    assert msg["To"] == "a@example.com, b@example.com" and msg["Cc"] == "c@example.com"


def test_variables_are_expanded_inside_body_files(tmp_path: Path) -> None:
    (tmp_path / "letter.txt").write_text("Dear `NAME,\nyour number is `FSNUM.\n", encoding="utf-8")
    msg = fs_message(tmp_path, b"$email_address a@example.com\n$email_body letter.txt\n$var_def NAME Jane\n",
                     name="00004711.FS")
    assert content(msg) == "Dear Jane,\nyour number is 00004711.\n"


def test_an_undefined_variable_in_a_body_file_fails_naming_it(tmp_path: Path) -> None:
    (tmp_path / "letter.txt").write_text("Dear `NOBODY,\n", encoding="utf-8")
    with pytest.raises(JobError) as e:
        fs_message(tmp_path, b"$email_address a@example.com\n$email_body letter.txt\n$var_def NAME `x\n")
    assert e.value.outcome == 60 and "`NOBODY" in e.value.message and e.value.line == 2


@pytest.mark.parametrize("encoding, cte", [("base64", {"base64"}), ("quoted-printable", {"quoted-printable"}),
                                           ("8bit", {"base64", "quoted-printable"})])
def test_email_charset_encoding_sets_the_body_transfer_encoding(tmp_path: Path, encoding, cte) -> None:
    # 8bit is met with a 7-bit-safe encoding: copiamail does not ask servers for 8BITMIME.
    msg = fs_message(tmp_path, f'$email_address a@example.com\n$email_charset utf-8 {encoding}\n'
                               f'$email_text "Grüße"\n'.encode())
    assert msg["Content-Transfer-Encoding"] in cte
    assert content(msg) == "Grüße\n"


@pytest.mark.parametrize("encoding, marker", [("base64", "?b?"), ("quoted-printable", "?q?")])
def test_email_charset_header_encoding_sets_encoded_words(tmp_path: Path, encoding, marker) -> None:
    data = build_message(parse_job(CommandFile.parse(
        f'$email_address a@example.com\n$email_charset iso-8859-1 quoted-printable {encoding}\n'
        f'$email_subject "Grüße aus Köln"\n'.encode()), "X.FS"), spool_root=tmp_path, attachment_roots=(tmp_path,),
        sender=SENDER, now=NOW)
    subject = re.search(rb"^Subject: (.*(?:\r\n[ \t].*)*)", data, re.M).group(1).decode()
    assert marker in subject.lower() and "iso-8859-1" in subject.lower()
    assert parse(data)["Subject"] == "Grüße aus Köln"


def test_an_attachment_shows_the_name_its_type_gives(tmp_path: Path) -> None:
    (tmp_path / "4711.pdf").write_bytes(b"%PDF")
    msg = fs_message(tmp_path, b'$email_address a@example.com\n$email_subject s\n'
                               b'$email_attach 4711.pdf "application/pdf; name=Statement November.pdf"\n')
    [att] = list(msg.iter_attachments())
    assert att.get_filename() == "Statement November.pdf" and att.get_content_type() == "application/pdf"


def test_embedded_attachments_make_a_related_part_an_html_body_refers_to(tmp_path: Path) -> None:
    (tmp_path / "logo.png").write_bytes(b"\x89PNG logo")
    (tmp_path / "a.pdf").write_bytes(b"%PDF")
    msg = fs_message(tmp_path, b'$email_address a@example.com\n$email_subject s\n'
                               b'$email_text "<html><body><img src=""cid:image1.`EM_MSGID""></body></html>"\n'
                               b"$email_attach logo.png EMBEDDED:image/png\n$email_attach a.pdf application/pdf\n")
    assert msg.get_content_type() == "multipart/mixed"
    related, pdf = msg.get_payload()
    assert related.get_content_type() == "multipart/related" and pdf.get_content_type() == "application/pdf"
    html, logo = related.get_payload()
    cid = logo["Content-ID"].strip("<>")
    assert f"cid:{cid}" in html.get_content()
    assert logo["Content-Location"] == "logo.png" and logo.get_content_disposition() == "inline"
    assert cid == "image1." + msg["Message-ID"].strip("<>")


def test_an_embedded_part_the_body_names_by_its_file_name_has_that_content_id(tmp_path: Path) -> None:
    (tmp_path / "logo.png").write_bytes(b"\x89PNG logo")
    msg = fs_message(tmp_path, b'$email_address a@example.com\n$email_subject s\n'
                               b'$email_text "<html><body><img src=""cid:logo.png""></body></html>"\n'
                               b"$email_attach logo.png EMBEDDED:image/png\n")
    _html, logo = msg.get_payload()
    assert logo["Content-ID"] == "<logo.png>"
