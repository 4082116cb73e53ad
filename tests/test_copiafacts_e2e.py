"""CopiaFacts job files as their applications write them, sent by a node and
read at the SMTP server and in the spool."""

from __future__ import annotations

import pytest

from spoolkit import SpoolKit, var


@pytest.fixture
def server(smtp_server):
    return smtp_server()


def test_a_recipient_with_a_display_name_is_sent_to_its_address_with_the_name_in_to(tmp_path, server):
    kit = SpoolKit(tmp_path, server.port)
    kit.job("TOSEND", "N.FS", "$email_address Jane Doe <jane@example.com>", '$email_subject "hello"')
    assert kit.drain().returncode == 0
    assert kit.names("SENT") == ["N.FS"]
    [msg] = server.messages
    assert msg.rcpt_tos == ["jane@example.com"]
    assert msg.parsed()["To"] == "Jane Doe <jane@example.com>"


def test_an_attachment_path_with_backslashes_and_a_mapped_windows_prefix_are_read(tmp_path, server):
    kit = SpoolKit(tmp_path, server.port,
                   yaml='path_map: {"C:\\\\Copia\\\\": ./copia/}\nattachment_roots: [./spool, ./copia]\n')
    (kit.root / "files").mkdir()
    (kit.root / "files" / "report.pdf").write_bytes(b"%PDF-1.4 report")
    (tmp_path / "copia" / "Statements").mkdir(parents=True)
    (tmp_path / "copia" / "Statements" / "4711.txt").write_text("Balance 12.00\n", encoding="utf-8")
    kit.job("TOSEND", "W.FS", "$email_address w@example.com", '$email_subject "report"',
            "$email_attach files\\report.pdf", "$email_body C:\\COPIA\\Statements\\4711.txt")
    assert kit.drain().returncode == 0
    assert kit.names("SENT") == ["W.FS"], [kit.read(f, "W.FS") for f in ("FAIL", "TOSEND") if kit.names(f)]
    msg = server.messages[0].parsed()
    [att] = list(msg.iter_attachments())
    assert att.get_filename() == "report.pdf" and att.get_content() == b"%PDF-1.4 report"
    assert "Balance 12.00" in msg.get_body(("plain",)).get_content()


@pytest.mark.parametrize("lines", [
    ['$email_subjct "typo"', '$email_text "body"'],
    ['$email_subject "fine"', '$emailtext "body"'],
    [],
], ids=["subject-typo", "text-typo", "empty"])
def test_a_typo_or_an_empty_job_fails_with_outcome_60_and_nothing_is_sent(tmp_path, server, lines):
    kit = SpoolKit(tmp_path, server.port)
    path = kit.root / "TOSEND" / "T.FS"
    path.write_text("\n".join(["$email_address t@example.com", *lines]) + "\n", encoding="utf-8")
    assert kit.drain().returncode == 0
    assert server.messages == [] and kit.names("FAIL") == ["T.FS"]
    text = kit.read("FAIL", "T.FS")
    assert "$fax_status2 60" in text
    error = var(text, "EMAIL_ERROR")
    assert error is not None and ("unknown command" in error or "nothing to send" in error)
    if lines and "typo" in lines[0] + lines[1]:
        assert error.startswith("line ")
