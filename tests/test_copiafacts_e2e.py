"""CopiaFacts job files as their applications write them, sent by a node and
read at the SMTP server and in the spool."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from smtpserver import Rule
from spoolkit import SpoolKit, attempts, var


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


# --- issue 12: real CopiaFacts files, unchanged ------------------------------------

MANUAL_CFG = [
    "; FAXFACTS.CFG as the CopiaFacts manual writes it",
    "$email_settings 5000 3 35000 10000",
    '$email_retry_delays 1-4 * "1S 1S"',
    '$email_retry_delays 1-4 B ""',
    "$email_retry_max 3",
    '$email_esender "Acme Billing" <billing@acme.test>',
    "$var_def COMPANY Acme",
    "$domain_limit * @example.com 2",
]


def test_a_cfg_from_the_manual_passes_check_config_and_runs_a_node(tmp_path, server):
    kit = SpoolKit(tmp_path, server.port, MANUAL_CFG)
    check = kit.cli("check-config")
    assert check.returncode == 0, check.stderr
    assert "ignored" not in check.stderr
    kit.job("TOSEND", "M.FS", "$email_address m@example.com", '$email_subject "From `COMPANY"')
    assert kit.drain().returncode == 0
    [msg] = server.messages
    assert msg.mail_from == "billing@acme.test" and msg.parsed()["Subject"] == "From Acme"


def test_variables_expand_from_the_job_the_cfg_and_the_config_in_commands_and_body_files(tmp_path, server):
    kit = SpoolKit(tmp_path, server.port, ["$var_def COMPANY Acme"], yaml="variables: {SIGNATURE: The Billing Team}\n")
    (kit.root / "letter.txt").write_text("Dear `FIRST,\nyour balance is `BALANCE{6+}EUR.\n`SIGNATURE of `COMPANY\n")
    kit.job("TOSEND", "00004711.FS", "$email_address `FIRST Doe <jane@example.com>", '$email_subject "Statement `FSNUM"',
            "$email_body letter.txt", "$var_def FIRST Jane", "$var_def BALANCE 12.5")
    assert kit.drain().returncode == 0
    msg = server.messages[0].parsed()
    assert msg["Subject"] == "Statement 00004711" and msg["To"] == "Jane Doe <jane@example.com>"
    assert msg.get_content().replace("\r\n", "\n") == "Dear Jane,\nyour balance is 12.5  EUR.\nThe Billing Team of Acme\n"


def test_an_undefined_variable_fails_the_job_and_nothing_is_sent(tmp_path, server):
    kit = SpoolKit(tmp_path, server.port)
    kit.job("TOSEND", "U.FS", "$email_address u@example.com", '$email_subject "Hi `NOBODY"')
    assert kit.drain().returncode == 0
    assert server.messages == [] and kit.names("FAIL") == ["U.FS"]
    text = kit.read("FAIL", "U.FS")
    assert "$fax_status2 60" in text and "`NOBODY" in var(text, "EMAIL_ERROR")


def test_attempt_records_are_written_in_copiafacts_field_order(tmp_path, server):
    server.add_rule(Rule(stage="RCPT", code=550, text="5.1.1 <x@example.com>: User unknown"))
    kit = SpoolKit(tmp_path, server.port, yaml="workers: 1\n")  # E1: the first worker's number
    kit.job("TOSEND2", "R.FS", to="x@example.com")
    assert kit.drain().returncode == 0
    [record] = [l for l in kit.read("FAIL", "R.FS").splitlines() if l.startswith("$attempt_record")]
    f = record.split(" ")
    # DATE TIME TYPE SKIPPED SCHED OUTCOME CLASS SENT TOSEND FLAGS BOARDLINE BAUD CALL CONNECT ANSWERBACK node
    assert f[3:12] == ["0", "0", "0", "550", "B", "0", "2", "0", "E1"] and f[12] == "0"
    assert re.fullmatch(r"\d\d:\d\d:\d\d", f[13]) and re.fullmatch(r"\d\d:\d\d:\d\d", f[14])
    assert record.endswith('"550 5.1.1 <x@example.com>: User unknown" N1')


def test_copiafacts_own_records_count_as_retries(tmp_path, server):
    # A job moved over from CopiaFacts with its history: one class E attempt
    # already made, and a list of one retry for E: the next E failure is final.
    server.add_rule(Rule(stage="RCPT", code=451, text="4.3.0 try later"))
    kit = SpoolKit(tmp_path, server.port, ['$email_retry_delays * "1S"'])
    kit.job("TOSEND", "H.FS", "$attempt_record 11/21/2026 14:03:07 0 0 0 451 E 0 0 0 E1 0 14:03:07 14:03:07",
            to="h@example.com")
    assert kit.drain().returncode == 0
    assert kit.names("FAIL") == ["H.FS"]


def test_a_job_moved_back_from_fail_by_hand_starts_its_retries_afresh(tmp_path, server):
    rule = Rule(stage="RCPT", code=451, text="4.3.0 try later", times=2)
    server.add_rule(rule)
    kit = SpoolKit(tmp_path, server.port, ['$email_retry_delays * "1S"'])
    kit.job("TOSEND", "B.FS", to="b@example.com")
    kit.drain_until(lambda: kit.names("FAIL") == ["B.FS"], timeout=20)
    os.rename(kit.root / "FAIL" / "B.FS", kit.root / "TOSEND" / "B.FS")
    kit.drain_until(lambda: kit.names("SENT") == ["B.FS"], timeout=20)
    assert [a[2] for a in attempts(kit.read("SENT", "B.FS"))] == ["451", "451", "0"]


def test_email_retry_max_in_the_fs_counts_retries(tmp_path, server):
    server.add_rule(Rule(stage="RCPT", code=451, text="4.3.0 try later"))
    kit = SpoolKit(tmp_path, server.port, ['$email_retry_delays * "1S 1S 1S 1S"', "$email_retry_max 3"])
    kit.job("TOSEND", "X.FS", "$email_retry_max 1", to="x@example.com")
    kit.drain_until(lambda: kit.names("FAIL") == ["X.FS"], timeout=20)
    assert len(attempts(kit.read("FAIL", "X.FS"))) == 2


def test_retry_delays_is_the_fallback_when_no_email_retry_delays_exists(tmp_path, server):
    server.add_rule(Rule(stage="RCPT", code=451, text="4.3.0 try later"))
    kit = SpoolKit(tmp_path, server.port, ['$retry_delays * "1S 1S 1S"', "$retry_max 1", "$email_retry_max 5"])
    kit.job("TOSEND", "F.FS", to="f@example.com")
    kit.drain_until(lambda: kit.names("FAIL") == ["F.FS"], timeout=20)
    assert len(attempts(kit.read("FAIL", "F.FS"))) == 2


def test_an_i_item_sends_that_retry_through_the_retry_relay(tmp_path, smtp_server):
    main = smtp_server()
    main.add_rule(Rule(stage="RCPT", code=451, text="4.3.0 try later"))
    spare = smtp_server()
    kit = SpoolKit(tmp_path, main.port, ['$email_retry_delays * "I1S"'],
                   yaml=f"retry_relay: {{host: 127.0.0.1, port: {spare.port}, starttls: never}}\n")
    kit.job("TOSEND", "I.FS", to="i@example.com")
    kit.drain_until(lambda: kit.names("SENT") == ["I.FS"], timeout=20)
    assert main.messages == [] and [m.rcpt_tos for m in spare.messages] == [["i@example.com"]]


def test_fax_send_date_in_the_future_keeps_the_job_waiting(tmp_path, server):
    kit = SpoolKit(tmp_path, server.port)
    kit.job("TOSEND", "D.FS", "$fax_send_date 12/31/2098", "$fax_send_time 08:00", to="d@example.com")
    kit.job("TOSEND", "N.FS", "$fax_send_date 01/01/2001", to="n@example.com")
    assert kit.drain().returncode == 0
    assert kit.names("TOSEND") == ["D.FS"] and kit.names("SENT") == ["N.FS"]
    assert [m.rcpt_tos for m in server.messages] == [["n@example.com"]]


def test_addresses_keep_their_quotes_as_written(tmp_path, server):
    kit = SpoolKit(tmp_path, server.port)
    kit.job("TOSEND", "Q.FS", '$email_address "Doe, Jane" <jane@example.com>', '$email_from "Acme, Billing" <b@acme.test>',
            '$email_subject s')
    assert kit.drain().returncode == 0
    msg = server.messages[0].parsed()
    assert len(msg["From"].addresses) == 1 and msg["From"].addresses[0].display_name == "Acme, Billing"
    assert len(msg["To"].addresses) == 1 and msg["To"].addresses[0].username == "jane"


def test_copiafacts_commands_reach_the_server_as_the_manual_says(tmp_path, server):
    kit = SpoolKit(tmp_path, server.port)
    (kit.root / "logo.png").write_bytes(b"\x89PNG logo")
    (kit.root / "4711.pdf").write_bytes(b"%PDF")
    kit.job("TOSEND", "C.FS", "$email_address c@example.com", "$email_subject s",
            "$email_header X-Campaign november   /* a comment, not the header's */",
            "$email_header X-Mailer none", "$email_charset utf-8 base64",
            '$email_text "<html><body><img src=""cid:image1.`EM_MSGID""> Grüße</body></html>"',
            "$email_attach logo.png EMBEDDED:image/png",
            '$email_attach 4711.pdf "application/pdf; name=Statement.pdf"',
            '$var_def EMAILTO_LIST "c@example.com, d@example.com"', "$var_def EMAILCC_LIST e@example.com")
    assert kit.drain().returncode == 0, kit.read("FAIL", "C.FS") if kit.names("FAIL") else ""
    [received] = server.messages
    msg = received.parsed()
    assert received.rcpt_tos == ["c@example.com"]
    assert msg["X-Campaign"] == "november" and msg["X-Mailer"] is None
    assert msg["To"] == "c@example.com, d@example.com" and msg["Cc"] == "e@example.com"
    related, pdf = msg.get_payload()
    html, logo = related.get_payload()
    assert html["Content-Transfer-Encoding"] == "base64" and "Grüße" in html.get_content()
    assert f'cid:{logo["Content-ID"].strip("<>")}' in html.get_content()
    assert pdf.get_filename() == "Statement.pdf"


def test_reqtls_without_tls_fails_with_outcome_160_and_nothing_is_sent(tmp_path, server):
    kit = SpoolKit(tmp_path, server.port)
    kit.job("TOSEND", "T.FS", '$email_options "reqTLS"', to="t@example.com")
    assert kit.drain().returncode == 0
    assert server.messages == [] and kit.names("FAIL") == ["T.FS"]
    assert "$fax_status2 160" in kit.read("FAIL", "T.FS")


def test_usetls_uses_starttls_even_where_the_config_says_never(tmp_path, smtp_server):
    server = smtp_server(starttls=True)
    kit = SpoolKit(tmp_path, None, yaml=f"relay: {{host: 127.0.0.1, port: {server.port}, starttls: never, "
                                          "tls_verify: false}\n")
    kit.job("TOSEND", "P.FS", to="p@example.com")
    kit.job("TOSEND", "U.FS", '$email_options "useTLS"', to="u@example.com")
    kit.job("TOSEND", "R.FS", '$email_options "reqTLS"', to="r@example.com")
    assert kit.drain().returncode == 0
    tls = {m.rcpt_tos[0]: m.tls for m in server.messages}
    assert tls == {"p@example.com": False, "u@example.com": True, "r@example.com": True}


def test_the_alternative_address_is_tried_once_the_main_one_fails_for_good(tmp_path, server):
    server.add_rule(Rule(stage="RCPT", code=550, text="5.1.1 unknown", match="main@example.com"))
    kit = SpoolKit(tmp_path, server.port)
    kit.job("TOSEND", "A.FS", "$email_alt_address Jane at home <alt@home.test>", to="main@example.com")
    kit.drain_until(lambda: kit.names("SENT") == ["A.FS"], timeout=20)
    assert [m.rcpt_tos for m in server.messages] == [["alt@home.test"]]
    assert [a[2] for a in attempts(kit.read("SENT", "A.FS"))] == ["550", "0"]


def test_the_migration_page_examples_are_read_as_it_says(tmp_path):
    import copiamail
    from copiamail.config import load_cfg, parse_config
    from copiamail.jobfile.fsfile import CommandFile
    from copiamail.jobfile.job import parse_job

    page = (Path(copiamail.__file__).resolve().parent.parent / "docs" / "migration.md").read_text(encoding="utf-8")
    job_text, yaml_text, cfg_text = re.findall(r"```(?:yaml)?\n(.*?)```", page, re.S)[:3]
    cfg_path = tmp_path / "FAXFACTS.CFG"
    cfg_path.write_text(cfg_text, encoding="utf-8")
    rules = load_cfg(cfg_path)
    assert [w for w in rules.warnings if "$fax_header" not in w] == []
    assert rules.esender == "mailer@acme.test" and rules.retry_max == 6
    from ruamel.yaml import YAML
    config = parse_config(YAML(typ="rt").load(yaml_text.replace("/srv/copia", str(tmp_path))), tmp_path / "copiamail.yaml")
    job = parse_job(CommandFile.parse(job_text.encode("utf-8")), "00004711.FS", config.job_env)
    assert job.subject == "Your statement for November, Jane"
    assert job.attachments[0].path == "C:\\Copia\\Statements\\4711.pdf" and job.attachments[0].name == "Statement November.pdf"
    assert (job.address, job.to_header) == ("jane.doe@example.com", '"Doe, Jane" <jane.doe@example.com>')


def test_records_in_copiamails_earlier_layout_still_count_as_retries(tmp_path, server):
    server.add_rule(Rule(stage="RCPT", code=451, text="4.3.0 try later"))
    kit = SpoolKit(tmp_path, server.port, ['$email_retry_delays * "1S"'])
    kit.job("TOSEND", "O.FS", '$attempt_record 11/21/2026 14:03:07 E N1 451 E "451 4.3.0 try later"', to="o@example.com")
    assert kit.drain().returncode == 0
    assert kit.names("FAIL") == ["O.FS"]
    assert [a[2] for a in attempts(kit.read("FAIL", "O.FS"))] == ["451", "451"]
