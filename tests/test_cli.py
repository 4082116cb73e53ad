"""The CLI surface of SPEC 6 besides `node`: submit, show, status, explain,
check-config, demo, and one-line errors for everything a user can get wrong."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from smtpserver import Rule
from spoolkit import CLI, SpoolKit, attempts, cli_env, run_on_a_terminal, var

from copiamail.jobfile.fsfile import CommandFile
from copiamail.jobfile.job import parse_job

REPO = Path(__file__).resolve().parent.parent


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture
def kit(tmp_path, smtp_server):
    server = smtp_server()
    k = SpoolKit(tmp_path, server.port, ["$domain_limit * @copia.com 2", "$domain_limit * @ 3", "$domain_limit * @copia.com 1"])
    k.server = server
    return k


def test_submit_writes_a_job_atomically_and_prints_its_path(kit):
    result = kit.cli("submit", "--to", "jane@copia.com", "--subject", 'Your "November" statement', "--text", "line one", "--text", "line two", "--queue", "3")
    assert result.returncode == 0, result.stderr
    path = Path(result.stdout.strip())
    assert path.parent == kit.root / "TOSEND3" and path.name.endswith(".FS")
    job = parse_job(CommandFile.read(path), path.name)
    assert job.address == "jane@copia.com" and job.subject == 'Your "November" statement'
    assert [b.value for b in job.body] == ["line one", "line two"]
    assert not list((kit.root / "TOSEND3").glob("*.TFS"))


def test_submitted_jobs_sort_in_submission_order_and_are_sent(tmp_path, smtp_server):
    server = smtp_server()
    kit = SpoolKit(tmp_path, server.port, ["$domain_limit * @ 1"])
    kit.server = server
    paths = [Path(kit.cli("submit", "--to", f"u{i}@copia.com", "--text", "hi").stdout.strip()) for i in range(3)]
    assert sorted(p.name for p in paths) == [p.name for p in paths]
    assert kit.drain().returncode == 0
    assert kit.names("SENT") == sorted(p.name for p in paths)
    assert [m.rcpt_tos[0] for m in kit.server.messages] == ["u0@copia.com", "u1@copia.com", "u2@copia.com"]


def test_submit_with_an_attachment_inside_the_spool_is_sent(kit):
    (kit.root / "files").mkdir()
    pdf = kit.root / "files" / "a.pdf"
    pdf.write_bytes(b"%PDF-1.4 test")
    result = kit.cli("submit", "--to", "a@copia.com", "--attach", str(pdf))
    assert result.returncode == 0
    assert kit.drain().returncode == 0
    msg = kit.server.messages[0].parsed()
    [part] = [p for p in msg.iter_attachments()]
    assert part.get_content() == b"%PDF-1.4 test"


def test_submit_refuses_a_bad_address_in_one_line(kit):
    assert "not an e-mail address" in one_line_error(kit.cli("submit", "--to", "nobody"))


def test_show_prints_recipient_error_and_attempts(kit):
    kit.server.add_rule(Rule(stage="RCPT", code=550, text="5.1.1 <jane@copia.com>: User unknown"))
    kit.job("TOSEND", "J.FS", to="jane@copia.com")
    kit.drain()
    result = kit.cli("show", str(kit.root / "FAIL" / "J.FS"))
    assert result.returncode == 0
    assert "jane@copia.com" in result.stdout
    assert "EMAIL_ERROR" in result.stdout and "User unknown" in result.stdout
    assert "550 B" in result.stdout


def test_show_of_a_bad_job_is_one_clear_line(kit):
    bad = kit.root / "TOSEND" / "BAD.FS"
    bad.write_bytes(b'$email_address a@copia.com\n$email_subject "open\n')
    line = one_line_error(kit.cli("show", str(bad)))
    assert "BAD.FS:2" in line and "unterminated quote" in line


def test_status_counts_folders_domains_and_active_jobs(kit):
    kit.job("TOSEND", "A.FS", to="a@copia.com")
    kit.job("TOSEND2", "B.FS", to="b@copia.com")
    kit.job("TOSEND2", "C.FS", to="c@other.org")
    (kit.root / "ACTIVE" / "N1" / "TOSEND").mkdir(parents=True)
    (kit.root / "ACTIVE" / "N1" / "TOSEND" / "D.FS").write_text("$email_address d@copia.com\n")
    result = kit.cli("status")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "TOSEND2" in out and "copia.com" in out and "other.org" in out
    assert "ACTIVE/N1" in out


def test_explain_names_the_rule_file_line_domain_and_scoped_limits(kit):
    result = kit.cli("explain", "jane@Copia.com", "--node", "N1")
    assert result.returncode == 0, result.stderr
    assert "$domain_limit * @copia.com 2" in result.stdout
    assert "FAXFACTS.CFG:1" in result.stdout
    assert "copia.com to 2 connection" in result.stdout
    assert "server_max_outbound_connections" in result.stdout
    assert "binding_domain:default:copia.com" in result.stdout


def test_explain_says_when_no_rule_applies(tmp_path):
    kit = SpoolKit(tmp_path, 2525, ["$domain_limit N2 @copia.com 1"])
    result = kit.cli("explain", "a@copia.com", "--node", "N1")
    assert result.returncode == 0
    assert "no rule applies" in result.stdout


def test_check_config_warns_about_shadowed_rules_and_exits_0(kit):
    result = kit.cli("check-config")
    assert result.returncode == 0, result.stderr
    assert "FAXFACTS.CFG:3" in result.stdout and "can never apply" in result.stdout
    assert "FAXFACTS.CFG:2" not in result.stdout
    assert "ok:" in result.stdout


def test_check_config_warns_about_ignored_cfg_commands(tmp_path):
    kit = SpoolKit(tmp_path, 2525, ["$fax_resolution high"])
    result = kit.cli("check-config")
    assert result.returncode == 0
    assert "FAXFACTS.CFG:1" in result.stdout and "ignored" in result.stdout


@pytest.mark.parametrize(
    "yaml,expected",
    [
        ("queues: many\n", "queues"),
        ("relay: {host: 127.0.0.1, prot: 25}\n", "relay.prot"),
        ("bogus: 1\n", "bogus"),
        ("domain:\n  \"/(unclosed/\": {scope_max_outbound_connections: 2}\n", "bad regex"),
        ("server_max_outbound_connections: 0\n", "server_max_outbound_connections"),
        ("spool: [\n", "YAML syntax"),
    ],
)
def test_check_config_exits_2_with_one_line_naming_file_line_and_key(tmp_path, yaml, expected):
    kit = SpoolKit(tmp_path, 2525, [])
    kit.config_path.write_text(yaml)
    line = one_line_error(kit.cli("check-config"))
    assert expected in line and "copiamail.yaml:" in line


def test_bad_cfg_rule_stops_the_node_with_one_line(tmp_path):
    kit = SpoolKit(tmp_path, 2525, ["; rules", "$domain_limit * @copia.com zero"])
    line = one_line_error(kit.cli("node", "--name", "N1", "--drain"))
    assert "FAXFACTS.CFG:2" in line and "positive integer" in line


def test_missing_config_file_is_one_line(tmp_path):
    kit = SpoolKit(tmp_path, 2525, [])
    line = one_line_error(kit.cli("check-config", "--config", str(tmp_path / "nope.yaml")))
    assert "nope.yaml" in line and "not found" in line


def test_bad_node_name_is_one_line(kit):
    assert "bad node name" in one_line_error(kit.cli("node", "--name", "../x", "--drain"))


def test_relay_option_overrides_the_config(tmp_path, smtp_server):
    server = smtp_server()
    kit = SpoolKit(tmp_path, 1, [])  # the config's relay port has no server
    kit.job("TOSEND", "J.FS", to="a@copia.com")
    result = kit.drain("N1", "--relay", f"127.0.0.1:{server.port}")
    assert result.returncode == 0, result.stderr
    assert kit.names("SENT") == ["J.FS"]


def test_spool_option_overrides_the_config(tmp_path, smtp_server):
    server = smtp_server()
    kit = SpoolKit(tmp_path, server.port, [])
    other = tmp_path / "other-spool"
    assert kit.cli("init", "--spool", str(other)).returncode == 0
    result = kit.cli("submit", "--to", "a@copia.com", "--subject", "s", "--spool", str(other))
    assert Path(result.stdout.strip()).parent == other / "TOSEND"
    assert kit.drain("N1", "--spool", str(other)).returncode == 0
    assert len(list((other / "SENT").glob("*.FS"))) == 1


def test_starttls_with_certificate_verification_and_auth_from_a_password_file(tmp_path, smtp_server, tls_cert):
    server = smtp_server(starttls=True, auth=("mailer", "s3cret"), auth_required=True)
    (tmp_path / "relay.pw").write_text("s3cret\n")
    kit = SpoolKit(tmp_path, None, [], yaml=(
        f"relay: {{host: 127.0.0.1, port: {server.port}, starttls: always, username: mailer,"
        f" password_file: ./relay.pw, ca_file: {tls_cert.cert_path}}}\n"
    ))
    kit.job("TOSEND", "J.FS", to="a@copia.com")
    result = kit.cli("-vv", "node", "--name", "N1", "--drain")
    assert result.returncode == 0, result.stderr
    assert kit.names("SENT") == ["J.FS"]
    msg = server.messages[0]
    assert msg.tls and msg.login == "mailer"
    assert "s3cret" not in result.stderr + result.stdout


def test_starttls_auto_refuses_an_untrusted_certificate_as_a_class_c_retry(tmp_path, smtp_server):
    server = smtp_server(starttls=True)
    kit = SpoolKit(tmp_path, None, ['$email_retry_delays * "1H"'], yaml=f"relay: {{host: 127.0.0.1, port: {server.port}, starttls: auto}}\n")
    kit.job("TOSEND", "J.FS", to="a@copia.com")
    assert kit.drain().returncode == 0
    text = kit.read("TOSEND", "J.FS")
    [[_, _, code, klass, _]] = attempts(text)
    assert (code, klass) == ("73", "C")
    assert "TLS" in var(text, "EMAIL_ERROR")
    assert server.messages == []


def test_demo_runs_the_samples_into_the_embedded_sink(tmp_path):
    env = {k: v for k, v in cli_env().items() if k != "COPIAMAIL_CONFIG"}
    result = subprocess.run([*CLI, "demo", "--dir", str(tmp_path / "demo")], cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    sent = sorted(p.name for p in (tmp_path / "demo" / "SENT").glob("*.FS"))
    failed = sorted(p.name for p in (tmp_path / "demo" / "FAIL").glob("*.FS"))
    samples = sorted(p.name for p in (REPO / "samples" / "spool").rglob("*.FS"))
    assert sorted(sent + failed) == samples
    assert failed == ["00002002.FS"]
    assert "User unknown" in (tmp_path / "demo" / "FAIL" / "00002002.FS").read_text()
    # A second run replaces its own earlier demo spool.
    again = subprocess.run([*CLI, "demo", "--dir", str(tmp_path / "demo")], cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env, stdin=subprocess.DEVNULL)
    assert again.returncode == 0, again.stderr


def test_demo_refuses_to_replace_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "mine").mkdir()
    result = subprocess.run([*CLI, "demo", "--dir", str(tmp_path / "mine")], cwd=tmp_path, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, env=cli_env())
    assert "not an earlier demo spool" in one_line_error(result)


def test_drain_on_a_terminal_shows_a_progress_bar_and_a_summary(tmp_path, smtp_server):
    server = smtp_server()
    kit = SpoolKit(tmp_path, server.port, [])
    for i in range(3):
        kit.job("TOSEND", f"J{i}.FS", to=f"u{i}@copia.com")
    code, out = run_on_a_terminal([*CLI, "node", "--name", "N1", "--drain"], tmp_path, stderr_too=False,
                                  env=cli_env(COPIAMAIL_CONFIG=str(kit.config_path), TERM="xterm", COLUMNS="120"))
    assert code == 0
    assert "sending" in out and "3/3" in out
    assert "N1: sent 3, failed 0" in out


@pytest.mark.parametrize(
    "args,expected",
    [
        (["node"], "Missing option '--name'"),
        (["nosuch"], "No such command"),
        (["node", "--name", "x.lock", "--drain"], "bad node name"),
        (["show"], "Missing argument"),
    ],
)
def test_usage_errors_are_one_line_too(tmp_path, args, expected):
    kit = SpoolKit(tmp_path, 2525, [])
    assert expected in one_line_error(kit.cli(*args))


def test_submit_refuses_an_attachment_outside_attachment_roots(kit, tmp_path):
    outside = tmp_path / "outside.pdf"
    outside.write_bytes(b"%PDF")
    assert "outside attachment_roots" in one_line_error(kit.cli("submit", "--to", "a@copia.com", "--attach", str(outside)))


def test_explain_lists_the_limits_over_every_binding_of_the_default_group(tmp_path):
    kit = SpoolKit(tmp_path, 2525, [], yaml=(
        "binding_group:\n"
        "  pool1:\n"
        "    domain:\n"
        "      \"yahoo.com\": {scope_max_outbound_connections: 6}\n"
        "    binding:\n"
        "      b1:\n"
        "        bind_address: 127.0.0.2\n"
        "        domain:\n"
        "          \"yahoo.com\": {scope_max_outbound_connections: 2}\n"
        "      b2: {bind_address: 127.0.0.3}\n"
        "default_binding_group: pool1\n"
        "host:\n"
        "  \"127.0.0.1\": {scope_max_outbound_connections: 4}\n"
    ))
    kit.config_path.write_text(kit.config_path.read_text().replace("host: 127.0.0.1, port: 2525", "host: localhost, port: 2525"))
    out = kit.cli("explain", "joe@yahoo.com").stdout
    assert "binding b1 (127.0.0.2)" in out and "binding b2 (127.0.0.3)" in out
    assert "group_domain:pool1:yahoo.com" in out and "binding_scope:b1:yahoo.com" in out
    assert "host:127.0.0.1" in out
    only_b2 = kit.cli("explain", "joe@yahoo.com", "--binding", "b2").stdout
    assert "binding b1" not in only_b2 and "binding b2" in only_b2


@pytest.mark.parametrize(
    "cfg,expected",
    [
        ("$domain_limit * @x.com ²", "positive integer"),
        ("$email_retry_max ²", "$email_retry_max"),
        ('$email_retry_delays * "²"', "bad retry delay"),
    ],
)
def test_non_ascii_digits_in_the_cfg_are_one_line_errors(tmp_path, cfg, expected):
    kit = SpoolKit(tmp_path, 2525, [cfg])
    line = one_line_error(kit.cli("check-config"))
    assert expected in line and "FAXFACTS.CFG:1" in line


@pytest.mark.parametrize(
    "yaml,expected",
    [
        ("connection_idle: .nan\n", "connection_idle"),
        ("scan_interval: .inf\n", "scan_interval"),
        ('spool: "a\\0b"\n', "spool"),
        ("domain:\n  ~: {max_outbound_connections: 2}\n", "domain"),
        ("host:\n  [a, b]: {scope_max_outbound_connections: 2}\n", "host"),
    ],
)
def test_odd_yaml_values_are_one_line_errors(tmp_path, yaml, expected):
    kit = SpoolKit(tmp_path, 2525, [])
    kit.config_path.write_text(yaml)
    line = one_line_error(kit.cli("check-config"))
    assert expected in line and "copiamail.yaml" in line


def test_recover_refuses_while_that_node_runs(kit):
    proc = kit.start("N1")
    try:
        from spoolkit import wait_until

        wait_until(lambda: (kit.root / "ACTIVE" / "N1.lock").exists(), timeout=10)
        import time

        time.sleep(0.5)
        assert "already running" in one_line_error(kit.cli("recover", "--node", "N1"))
    finally:
        from spoolkit import stop

        stop(proc)


def test_the_relay_password_is_never_logged_even_when_auth_fails_at_debug_level(tmp_path, smtp_server):
    import base64

    server = smtp_server(auth=("mailer", "right-one"), auth_required=True)
    (tmp_path / "relay.pw").write_text("Wr0ng-s3cret\n")
    kit = SpoolKit(tmp_path, None, ['$email_retry_delays * "1H"'], yaml=(
        f"relay: {{host: 127.0.0.1, port: {server.port}, starttls: never, username: mailer, password_file: ./relay.pw}}\n"
    ))
    kit.job("TOSEND", "J.FS", to="a@copia.com")
    result = kit.cli("-vv", "node", "--name", "N1", "--drain")
    assert result.returncode == 0
    out = result.stdout + result.stderr + kit.read("TOSEND", "J.FS")
    assert "535" in kit.read("TOSEND", "J.FS")
    for secret in ("Wr0ng-s3cret", base64.b64encode(b"\0mailer\0Wr0ng-s3cret").decode(), base64.b64encode(b"Wr0ng-s3cret").decode()):
        assert secret not in out


def test_output_piped_into_a_reader_that_stops_early_is_no_error(kit):
    # Far more output than a pipe buffer holds, so the writer meets the closed pipe.
    records = [f'$attempt_record 11/21/2026 10:00:{i % 60:02d} E N1 451 E "4.3.0 try later {i}"' for i in range(5000)]
    kit.job("TOSEND", "J.FS", *records, to="a@copia.com")
    shell = f"{' '.join(CLI)} show {kit.root / 'TOSEND' / 'J.FS'} | head -1"
    result = subprocess.run(["bash", "-c", shell], cwd=kit.base, capture_output=True, text=True, timeout=60, env=cli_env())
    assert result.stdout.startswith("job") and result.stderr == ""


def test_submit_refuses_a_job_with_nothing_to_send(tmp_path):
    kit = SpoolKit(tmp_path, None, [])
    assert "nothing to send" in one_line_error(kit.cli("submit", "--to", "a@copia.com"))
    assert kit.waiting() == []


def test_recover_finishes_a_takeover_the_node_left_halfway(kit):
    taken = kit.root / "ACTIVE" / "N1~from~N2~1" / "TOSEND1"
    taken.mkdir(parents=True)
    (taken / "J.FS.SENDING").write_text("$email_address a@copia.com\n")  # N2 was sending it
    (taken / "K.FS").write_text("$email_address k@copia.com\n")  # only claimed
    result = kit.cli("recover", "--node", "N1")
    assert result.returncode == 0, result.stderr
    assert "returned 2 job(s) to their folders (1 interrupted while being sent)" in result.stdout
    assert (kit.root / "TOSEND1" / "J.FS").exists()
    assert not (kit.root / "ACTIVE" / "N1~from~N2~1").exists()
    assert attempts((kit.root / "TOSEND1" / "J.FS").read_text())[-1][1:3] == ["N1", "66"]
    assert (kit.root / "TOSEND1" / "K.FS").read_text() == "$email_address k@copia.com\n"


LATE_MODULES = {"copiamail.cli_queue", "copiamail.cli_status", "copiamail.cli_web", "copiamail.cluster_report"}


def test_the_modules_of_commands_a_node_never_runs_are_not_imported_with_the_command_line():
    code = ("import sys, copiamail.cli, copiamail.node.node; "
            f"print(sorted(m for m in sys.modules if m in {sorted(LATE_MODULES)!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), check=True)
    assert out.stdout.strip() == "[]"


def test_every_command_imported_when_it_runs_is_found_under_its_own_name():
    import click

    from copiamail.cli import _LAZY_COMMANDS, main

    with click.Context(main) as ctx:
        for name in _LAZY_COMMANDS:
            command = main.get_command(ctx, name)
            assert command is not None and command.name == name
        assert set(_LAZY_COMMANDS) <= set(main.list_commands(ctx))


def test_a_mistyped_command_is_offered_the_command_it_resembles_lazy_or_not(tmp_path):
    for typed, meant in [("lis", "list"), ("statu", "status"), ("nod", "node")]:
        out = subprocess.run([*CLI, typed], capture_output=True, text=True, env=cli_env(), cwd=tmp_path)
        assert out.returncode == 2 and f"Did you mean '{meant}'?" in out.stderr, out.stderr
