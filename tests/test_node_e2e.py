"""End to end: the `copiamail node` CLI against a real SMTP server on 127.0.0.1,
reading the spool afterwards (SPEC 1, 3, 4 and 6)."""

from __future__ import annotations

import signal
import time

import pytest
from smtpserver import Rule
from spoolkit import SpoolKit, attempts, children_of, stop, var, wait_until

from copiamail.jobfile.fsfile import CommandFile
from copiamail.jobfile.job import parse_job
from copiamail.node import node as node_module
from copiamail.node.node import spool_warnings
from copiamail.osutil import unordered_metadata
from copiamail.spool.queue import Spool


@pytest.fixture
def server(smtp_server):
    return smtp_server()


def kit_for(tmp_path, server, *cfg, yaml=""):
    return SpoolKit(tmp_path, server.port, cfg, yaml)


# --- $domain_limit: reached, never exceeded, deferral --------------------------


def test_domain_limit_is_reached_and_never_exceeded_at_the_server(tmp_path, server):
    server.add_rule(Rule(stage="EOD", delay=0.25))
    kit = kit_for(tmp_path, server, "$domain_limit * @copia.com 3")
    for i in range(12):
        kit.job("TOSEND", f"J{i:03d}.FS", to=f"user{i}@copia.com")
    result = kit.drain()
    assert result.returncode == 0, result.stderr
    assert len(kit.names("SENT")) == 12
    assert server.peak_by_domain["copia.com"] == 3
    assert server.peak == 3


def test_each_domain_a_substring_rule_matches_gets_its_own_limit(tmp_path, server):
    server.add_rule(Rule(stage="EOD", delay=0.25))
    kit = kit_for(tmp_path, server, "$domain_limit * @copia. 2")
    for i in range(6):
        kit.job("TOSEND", f"A{i}.FS", to=f"a{i}@copia.com")
        kit.job("TOSEND", f"B{i}.FS", to=f"b{i}@copia.net")
    assert kit.drain().returncode == 0
    assert len(kit.names("SENT")) == 12
    assert server.peak_by_domain["copia.com"] == 2
    assert server.peak_by_domain["copia.net"] == 2
    assert server.peak == 4


def test_catch_all_rule_limits_every_domain_apart(tmp_path, server):
    server.add_rule(Rule(stage="EOD", delay=0.2))
    kit = kit_for(tmp_path, server, "$domain_limit * @ 1")
    for d in ("any.org", "other.org", "third.org"):
        for i in range(3):
            kit.job("TOSEND", f"{d}-{i}.FS", to=f"x{i}@{d}")
    assert kit.drain().returncode == 0
    assert len(kit.names("SENT")) == 9
    assert all(server.peak_by_domain[d] == 1 for d in ("any.org", "other.org", "third.org"))
    assert server.peak == 3


def test_limit_is_used_in_full_at_once_without_slow_start(tmp_path, server):
    server.add_rule(Rule(stage="EOD", delay=0.6))
    kit = kit_for(tmp_path, server, "$domain_limit * @copia.com 4")
    for i in range(4):
        kit.job("TOSEND", f"J{i}.FS", to=f"u{i}@copia.com")
    started = time.monotonic()
    assert kit.drain().returncode == 0
    assert server.peak_by_domain["copia.com"] == 4
    opened = sorted(c.opened_at for c in server.connections)
    assert opened[-1] - opened[0] < 0.5
    assert time.monotonic() - started < 10


def test_a_rule_for_another_node_does_not_limit_this_node(tmp_path, server):
    server.add_rule(Rule(stage="EOD", delay=0.3))
    kit = kit_for(tmp_path, server, "$domain_limit N2 @copia.com 1")
    for i in range(3):
        kit.job("TOSEND", f"J{i}.FS", to=f"u{i}@copia.com")
    assert kit.drain("N1").returncode == 0
    assert server.peak_by_domain["copia.com"] == 3
    assert all(var(kit.read("SENT", n), "DOMAINBUSY_COUNT") is None for n in kit.names("SENT"))


def test_deferred_job_gets_domainbusy_count_and_no_attempt_record(tmp_path, server):
    server.add_rule(Rule(stage="EOD", delay=0.3))
    kit = kit_for(tmp_path, server, "$domain_limit * @copia.com 1")
    for i in range(3):
        kit.job("TOSEND", f"J{i}.FS", to=f"u{i}@copia.com")
    assert kit.drain().returncode == 0
    texts = {n: kit.read("SENT", n) for n in kit.names("SENT")}
    assert var(texts["J0.FS"], "DOMAINBUSY_COUNT") is None
    for name in ("J1.FS", "J2.FS"):
        assert var(texts[name], "DOMAINBUSY_COUNT") == "1"
    for text in texts.values():
        # One attempt each: the delivery. A deferral writes no attempt record.
        assert [a[2] for a in attempts(text)] == ["0"]


def test_deferral_changes_nothing_but_domainbusy_count(tmp_path, server):
    server.add_rule(Rule(stage="EOD", delay=1.5))
    kit = kit_for(tmp_path, server, "$domain_limit * @copia.com 1")
    kit.job("TOSEND3", "A.FS", to="a@copia.com")
    original = kit.job("TOSEND3", "B.FS", "; keep me", "  $email_subject   \"indented\"", to="b@copia.com").read_bytes()
    proc = kit.start("N1")
    try:
        wait_until(lambda: b"DOMAINBUSY_COUNT" in (kit.root / "TOSEND3" / "B.FS").read_bytes() if (kit.root / "TOSEND3" / "B.FS").exists() else False)
        deferred = (kit.root / "TOSEND3" / "B.FS").read_bytes()
    finally:
        stop(proc)
    assert deferred == original + b"$var_def DOMAINBUSY_COUNT 1\n"


def test_job_is_deferred_about_once_per_wait_not_once_per_scan(tmp_path, server):
    server.add_rule(Rule(stage="EOD", delay=0.15))
    kit = kit_for(tmp_path, server, "$domain_limit * @copia.com 2")
    for i in range(20):
        kit.job("TOSEND", f"J{i:02d}.FS", to=f"u{i}@copia.com")
    assert kit.drain().returncode == 0
    counts = [int(var(kit.read("SENT", n), "DOMAINBUSY_COUNT") or 0) for n in kit.names("SENT")]
    assert len(counts) == 20
    # 3 s of waiting and ten scans later, no job was deferred more than once.
    assert max(counts) == 1
    assert counts.count(0) == 2


def test_connection_is_reused_for_the_same_domain(tmp_path, server):
    kit = kit_for(tmp_path, server, "$domain_limit * @copia.com 1")
    for i in range(5):
        kit.job("TOSEND", f"J{i}.FS", to=f"u{i}@copia.com")
    assert kit.drain().returncode == 0
    assert len(server.messages) == 5
    assert server.connections_total == 1


def test_priority_order_is_kept_folder_first_then_name(tmp_path, server):
    kit = kit_for(tmp_path, server, "$domain_limit * @ 1")
    kit.job("TOSEND2", "A.FS", to="t2a@copia.com")
    kit.job("TOSEND1", "Z.FS", to="t1z@copia.com")
    kit.job("TOSEND1", "B.FS", to="t1b@copia.com")
    kit.job("TOSEND", "Y.FS", to="t0y@copia.com")
    kit.job("TOSEND10", "A.FS", to="t10a@copia.com")
    kit.job("TOSEND9", "A.FS", to="t9a@copia.com")
    assert kit.drain().returncode == 0
    got = [m.rcpt_tos[0] for m in server.messages]
    assert got == ["t0y@copia.com", "t1b@copia.com", "t1z@copia.com", "t2a@copia.com", "t9a@copia.com", "t10a@copia.com"]


def test_jobs_not_ending_in_fs_are_ignored(tmp_path, server):
    kit = kit_for(tmp_path, server)
    kit.job("TOSEND", "J.TFS", to="a@copia.com")
    kit.job("TOSEND", "J.txt", to="a@copia.com")
    kit.job("TOSEND", "lower.fs", to="b@copia.com")
    assert kit.drain().returncode == 0
    assert kit.names("SENT") == ["lower.fs"]
    assert (kit.root / "TOSEND" / "J.TFS").exists()


# --- outcomes and retries ----------------------------------------------------


def test_550_lands_in_fail_with_the_servers_reply_in_email_error(tmp_path, server):
    server.add_rule(Rule(stage="RCPT", code=550, text="5.1.1 <jane@copia.com>: User unknown", match="jane@copia.com"))
    kit = kit_for(tmp_path, server)
    kit.job("TOSEND2", "00012345.FS", to="jane@copia.com")
    kit.job("TOSEND2", "00012346.FS", to="john@copia.com")
    assert kit.drain().returncode == 0
    assert kit.names("FAIL") == ["00012345.FS"]
    assert kit.names("SENT") == ["00012346.FS"]
    text = kit.read("FAIL", "00012345.FS")
    assert var(text, "EMAIL_ERROR") == "550 5.1.1 <jane@copia.com>: User unknown"
    assert attempts(text) == [["E", "N1", "550", "B", '"550 5.1.1 <jane@copia.com>: User unknown"']]
    assert "$fax_status1 6" in text and "$fax_status2 550" in text


def test_5xx_at_mail_and_at_data_are_final(tmp_path, server):
    server.add_rule(Rule(stage="MAIL", code=553, text="5.7.1 sender rejected", match="bad@acme.test"))
    server.add_rule(Rule(stage="EOD", code=552, text="5.3.4 too big", match="big@copia.com"))
    kit = kit_for(tmp_path, server)
    kit.job("TOSEND", "M.FS", "$email_esender bad@acme.test", to="m@copia.com")
    kit.job("TOSEND", "D.FS", to="big@copia.com")
    assert kit.drain().returncode == 0
    assert kit.names("FAIL") == ["D.FS", "M.FS"]
    assert var(kit.read("FAIL", "M.FS"), "EMAIL_ERROR") == "553 5.7.1 sender rejected"
    assert var(kit.read("FAIL", "D.FS"), "EMAIL_ERROR") == "552 5.3.4 too big"


def test_with_chunking_offered_each_message_goes_as_bdat_and_refusals_land_as_with_data(tmp_path, smtp_server):
    server = smtp_server(pipelining=True, chunking=True)
    server.add_rule(Rule(stage="RCPT", code=550, text="5.1.1 <jane@copia.com>: User unknown", match="jane@copia.com"))
    server.add_rule(Rule(stage="EOD", code=552, text="5.3.4 too big", match="big@copia.com"))
    kit = kit_for(tmp_path, server)
    (kit.root / "files").mkdir()
    (kit.root / "files" / "dots.txt").write_bytes(b"first\n.a line a DATA upload would stuff\nlast\n")
    kit.job("TOSEND", "A.FS", "$email_body files/dots.txt", to="a@copia.com")
    kit.job("TOSEND", "B.FS", to="jane@copia.com")
    kit.job("TOSEND", "C.FS", to="big@copia.com")
    kit.job("TOSEND", "D.FS", to="d@copia.com")
    assert kit.drain().returncode == 0
    assert kit.names("SENT") == ["A.FS", "D.FS"] and kit.names("FAIL") == ["B.FS", "C.FS"]
    assert var(kit.read("FAIL", "B.FS"), "EMAIL_ERROR") == "550 5.1.1 <jane@copia.com>: User unknown"
    assert var(kit.read("FAIL", "C.FS"), "EMAIL_ERROR") == "552 5.3.4 too big"
    [a] = [m for m in server.messages if m.rcpt_tos == ["a@copia.com"]]
    assert b"\r\nfirst\r\n.a line a DATA upload would stuff\r\nlast\r\n" in a.data
    commands = [c for conn in server.connections for c in conn.commands]
    assert commands.count("BDAT") == 4 and "DATA" not in commands


def test_with_chunking_each_next_job_goes_out_behind_the_message_in_flight(tmp_path, smtp_server):
    server = smtp_server(pipelining=True, chunking=True)
    server.add_rule(Rule(stage="EOD", delay=0.1))
    kit = kit_for(tmp_path, server, "$domain_limit * @copia.com 1")
    for i in range(6):
        kit.job("TOSEND", f"J{i}.FS", to=f"u{i}@copia.com")
    assert kit.drain().returncode == 0
    assert kit.names("SENT") == [f"J{i}.FS" for i in range(6)] and len(server.connections) == 1
    # An RSET after a message accepted is the mark of one sent behind it,
    # before its reply: the others are sent only once it came.
    commands = server.connections[0].commands
    assert commands.count("RSET") >= 4 and commands.count("BDAT") == 6
    for i in range(6):
        [[e, *_]] = attempts(kit.read("SENT", f"J{i}.FS"))
        assert e == "E"


def test_a_job_behind_a_message_whose_server_closes_the_connection_is_sent_again_without_an_attempt(
        tmp_path, smtp_server):
    server = smtp_server(pipelining=True, chunking=True)
    server.add_rule(Rule(stage="EOD", delay=0.3, match="a@copia.com"))  # the others wait meanwhile
    server.add_rule(Rule(stage="EOD", code=421, text="4.3.2 shutting down", match="b@copia.com", delay=0.1))
    kit = kit_for(tmp_path, server, "$domain_limit * @copia.com 1")
    kit.job("TOSEND", "A.FS", to="a@copia.com")
    kit.job("TOSEND", "B.FS", to="b@copia.com")
    kit.job("TOSEND", "C.FS", to="c@copia.com")
    result = kit.cli("-v", "node", "--name", "N1", "--drain")
    assert result.returncode == 0 and kit.active() == []
    assert kit.names("SENT") == ["A.FS", "C.FS"] and kit.names("TOSEND") == ["B.FS"]
    assert var(kit.read("TOSEND", "B.FS"), "EMAIL_ERROR") == "421 4.3.2 shutting down"
    # C went out behind B, and after B's 421 the server read nothing more:
    # C went again over a new connection, with one attempt, its delivery.
    assert f"C.FS: 127.0.0.1:{server.port} ended the connection before this message; sending it again" in result.stderr
    assert len(server.connections) == 2
    assert [m.rcpt_tos for m in server.messages] == [["a@copia.com"], ["c@copia.com"]]
    [[e, *_]] = attempts(kit.read("SENT", "C.FS"))
    assert e == "E"


def test_with_smtp_chunking_off_a_server_offering_chunking_gets_data(tmp_path, smtp_server):
    server = smtp_server(pipelining=True, chunking=True)
    kit = SpoolKit(tmp_path, server.port, (), "smtp_chunking: false\n")
    kit.job("TOSEND", "A.FS", to="a@copia.com")
    assert kit.drain().returncode == 0
    assert kit.names("SENT") == ["A.FS"]
    commands = [c for conn in server.connections for c in conn.commands]
    assert "DATA" in commands and "BDAT" not in commands


def test_delivered_job_carries_status_connect_ip_and_bytecount(tmp_path, server):
    kit = kit_for(tmp_path, server)
    kit.job("TOSEND", "J.FS", to="a@copia.com")
    assert kit.drain().returncode == 0
    text = kit.read("SENT", "J.FS")
    assert var(text, "EMAIL_CONNECT_IP") == "127.0.0.1"
    assert int(var(text, "EMAIL_BYTECOUNT")) == len(server.messages[0].data) or int(var(text, "EMAIL_BYTECOUNT")) > 100
    assert "$fax_status1 6" in text and "$fax_status2 0" in text
    [[e, node, code, klass, reply]] = attempts(text)
    assert (e, node, code, klass) == ("E", "N1", "0", "S") and reply.startswith('"250')


def test_451_is_retried_after_its_delay_and_then_sent(tmp_path, server):
    server.add_rule(Rule(stage="RCPT", code=451, text="4.3.0 try later", times=1))
    kit = kit_for(tmp_path, server, '$email_retry_delays * "2S"')
    kit.job("TOSEND1", "J.FS", to="a@copia.com")
    first_try = time.time()
    assert kit.drain().returncode == 0
    text = kit.read("TOSEND1", "J.FS")
    assert var(text, "EMAIL_ERROR") == "451 4.3.0 try later"
    assert "$fax_status1 2" in text and "$fax_status2 451" in text
    assert "$fax_next_date" in text and "$fax_next_time" in text
    assert parse_job(CommandFile.parse(text.encode()), "J.FS").next_attempt >= int(first_try) + 2
    # Not due yet: a drain leaves it in its folder.
    assert kit.drain().returncode == 0
    assert kit.names("TOSEND1") == ["J.FS"] and len(server.messages) == 0
    kit.drain_until(lambda: kit.names("SENT") == ["J.FS"], timeout=20)
    assert time.time() - first_try >= 2
    text = kit.read("SENT", "J.FS")
    assert [a[2:4] for a in attempts(text)] == [["451", "E"], ["0", "S"]]
    assert "$fax_status1 6" in text and "$fax_status2 0" in text


def test_retries_running_out_send_the_job_to_fail(tmp_path, server):
    server.add_rule(Rule(stage="RCPT", code=451, text="4.3.0 try later"))
    kit = kit_for(tmp_path, server, '$email_retry_delays * "1S 1S"')
    kit.job("TOSEND", "J.FS", to="a@copia.com")
    kit.drain_until(lambda: kit.names("FAIL") == ["J.FS"], timeout=20)
    text = kit.read("FAIL", "J.FS")
    assert [a[2] for a in attempts(text)] == ["451", "451", "451"]
    assert "$fax_status2 451" in text and var(text, "EMAIL_ERROR") == "451 4.3.0 try later"


def test_fs_retry_delays_override_cfg_and_empty_list_is_final_at_once(tmp_path, server):
    server.add_rule(Rule(stage="RCPT", code=451, text="4.3.0 try later"))
    kit = kit_for(tmp_path, server, '$email_retry_delays * "1H"')
    kit.job("TOSEND", "J.FS", '$email_retry_delays E ""', to="a@copia.com")
    assert kit.drain().returncode == 0
    assert kit.names("FAIL") == ["J.FS"]


def test_email_retry_max_caps_retries_of_all_classes(tmp_path, server):
    # CopiaFacts counts retries: $email_retry_max 2 means 3 attempts in all.
    server.add_rule(Rule(stage="RCPT", code=451, text="4.3.0 try later"))
    kit = kit_for(tmp_path, server, '$email_retry_delays * "1S 1S 1S 1S 1S"', "$email_retry_max 2")
    kit.job("TOSEND", "J.FS", to="a@copia.com")
    kit.drain_until(lambda: kit.names("FAIL") == ["J.FS"], timeout=20)
    assert len(attempts(kit.read("FAIL", "J.FS"))) == 3


def test_refused_connection_is_class_c_and_retried(tmp_path):
    kit = SpoolKit(tmp_path, 1, ['$email_retry_delays * "1H"'])  # nothing listens on port 1
    kit.job("TOSEND", "J.FS", to="a@copia.com")
    assert kit.drain().returncode == 0
    text = kit.read("TOSEND", "J.FS")
    [[_, _, code, klass, _]] = attempts(text)
    assert (code, klass) == ("70", "C")
    assert "cannot connect" in var(text, "EMAIL_ERROR")


def test_message_id_is_stable_for_the_job_across_a_retry(tmp_path, server):
    server.add_rule(Rule(stage="EOD", code=451, text="4.3.0 later", times=1))
    kit = kit_for(tmp_path, server, '$email_retry_delays * "1S"')
    path = kit.job("TOSEND", "J.FS", to="a@copia.com")
    identity = parse_job(CommandFile.read(path), "J.FS").identity
    kit.drain_until(lambda: kit.names("SENT") == ["J.FS"], timeout=20)
    assert server.messages[0].message_id.startswith(f"<{identity}@")


# --- bad jobs ----------------------------------------------------------------


BAD_JOBS = {
    "NORCPT.FS": (b'$email_subject "no recipient"\n$email_text "x"\n', "no recipient"),
    "NOBODY.FS": (b"$email_address a@copia.com\n$email_body files/missing.txt\n", "missing.txt"),
    "OUTSIDE.FS": (b"$email_address a@copia.com\n$email_attach /etc/hostname\n", "attachment_roots"),
    "QUOTE.FS": (b'$email_address a@copia.com\n$email_subject "unterminated\n', "unterminated quote"),
    "JUNK.FS": (bytes(range(256)) * 4, "binary data"),
    "HEADER.FS": (b"$email_address a@copia.com\n$email_header X-Bad: a\rb\n", "CR or LF"),
    "UTF8RCPT.FS": ("$email_address jöhn@copia.com\n".encode(), "bad recipient address"),
    "UTF8FROM.FS": ("$email_address a@copia.com\n$email_esender jöhn@acme.test\n".encode(), "bad envelope sender"),
    "CHARSET.FS": (b"$email_address a@copia.com\n$email_charset undefined\n", "charset"),
}


def test_bad_jobs_land_in_fail_with_a_clear_error_and_the_node_goes_on(tmp_path, server):
    kit = kit_for(tmp_path, server)
    for name, (data, _) in BAD_JOBS.items():
        (kit.root / "TOSEND" / name).write_bytes(data)
    kit.job("TOSEND", "ZGOOD.FS", to="good@copia.com")
    result = kit.drain()
    assert result.returncode == 0
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    assert kit.names("SENT") == ["ZGOOD.FS"]
    assert kit.names("FAIL") == sorted(BAD_JOBS)
    for name, (_, expected) in BAD_JOBS.items():
        data = (kit.root / "FAIL" / name).read_bytes()
        error = [l for l in data.split(b"\n") if l.startswith(b"$var_def EMAIL_ERROR")]
        assert error and expected.encode() in error[-1], (name, error)
        assert data.startswith(BAD_JOBS[name][0][:20])
    assert len(server.messages) == 1


# --- crash, stop, lock, recover ---------------------------------------------


def test_sigkill_mid_send_loses_nothing_and_the_job_comes_back_with_outcome_66(tmp_path, server):
    rule = server.add_rule(Rule(stage="EOD", hang=True))
    kit = kit_for(tmp_path, server)
    kit.job("TOSEND2", "J.FS", to="a@copia.com")
    proc = kit.start("N1")
    wait_until(lambda: any(c.open and "DATA" in " ".join(c.commands).upper() for c in server.connections), timeout=10)
    assert [p.name for p in kit.active()] == ["J.FS.SENDING"]
    proc.kill()
    proc.wait(timeout=10)
    server.remove_rule(rule)
    assert kit.drain().returncode == 0
    assert kit.names("SENT") == ["J.FS"]
    assert kit.active() == []
    assert [a[2] for a in attempts(kit.read("SENT", "J.FS"))] == ["66", "0"]


def test_sigterm_hands_in_flight_jobs_back_without_attempt_record_and_exits_0(tmp_path, server):
    server.add_rule(Rule(stage="EOD", hang=True))
    kit = kit_for(tmp_path, server, yaml="")
    kit.config_path.write_text(kit.config_path.read_text().replace("shutdown_grace: 2", "shutdown_grace: 0.3"))
    original = kit.job("TOSEND1", "J.FS", to="a@copia.com").read_bytes()
    proc = kit.start("N1")
    wait_until(lambda: kit.active() != [], timeout=10)
    wait_until(lambda: any(c.open for c in server.connections), timeout=10)
    code, _, err = stop(proc, signal.SIGTERM)
    assert code == 0, err
    assert "Traceback" not in err
    assert (kit.root / "TOSEND1" / "J.FS").read_bytes() == original
    assert kit.active() == []


def test_sigint_stops_the_node_cleanly(tmp_path, server):
    kit = kit_for(tmp_path, server)
    proc = kit.start("N1")
    time.sleep(1.0)
    code, _, err = stop(proc, signal.SIGINT)
    assert code == 0 and "Traceback" not in err


def test_second_node_with_the_same_name_refuses_to_start(tmp_path, server):
    kit = kit_for(tmp_path, server)
    proc = kit.start("N1")
    try:
        wait_until(lambda: (kit.root / "ACTIVE" / "N1.lock").exists(), timeout=10)
        time.sleep(0.5)
        second = kit.cli("node", "--name", "N1", "--drain")
        assert second.returncode == 2
        assert "already running" in second.stderr and len(second.stderr.strip().splitlines()) == 1
    finally:
        stop(proc)


def test_recover_puts_a_dead_nodes_active_jobs_back_and_third_interruption_fails(tmp_path, server):
    kit = kit_for(tmp_path, server)
    active = kit.root / "ACTIVE" / "N7" / "TOSEND4"
    active.mkdir(parents=True)
    (active / "A.FS.SENDING").write_text("$email_address a@copia.com\n")
    interrupted_twice = "$email_address b@copia.com\n" + "$attempt_record 11/21/2026 10:00:00 E N7 66 Z \"attempt interrupted\"\n" * 2
    (active / "B.FS.SENDING").write_text(interrupted_twice)
    (active / "C.FS").write_text(interrupted_twice.replace("b@", "c@"))  # only claimed: this death does not count
    result = kit.cli("recover", "--node", "N7")
    assert result.returncode == 0, result.stderr
    assert kit.names("TOSEND4") == ["A.FS", "C.FS"]
    assert kit.names("FAIL") == ["B.FS"]
    assert [a[2] for a in attempts(kit.read("TOSEND4", "A.FS"))] == ["66"]
    assert [a[2] for a in attempts(kit.read("TOSEND4", "C.FS"))] == ["66", "66"]
    assert [a[2] for a in attempts(kit.read("FAIL", "B.FS"))] == ["66", "66", "66", "67"]


def test_interruptions_do_not_count_as_retries(tmp_path, server):
    server.add_rule(Rule(stage="RCPT", code=451, text="4.3.0 later", times=1))
    kit = kit_for(tmp_path, server, '$email_retry_delays * "1S"')
    kit.job("TOSEND", "J.FS", '$attempt_record 11/21/2026 10:00:00 E N1 66 Z "attempt interrupted"', to="a@copia.com")
    kit.drain_until(lambda: kit.names("SENT") + kit.names("FAIL") != [], timeout=20)
    assert kit.names("SENT") == ["J.FS"]


# --- watcher -----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["native", "polling"])
def test_a_job_dropped_into_a_running_node_is_sent_without_waiting_for_the_scan_timer(tmp_path, server, mode):
    kit = kit_for(tmp_path, server, yaml=f"watcher: {mode}\n")
    kit.config_path.write_text(kit.config_path.read_text().replace("scan_interval: 0.3", "scan_interval: 60"))
    proc = kit.start("N1")
    try:
        time.sleep(1.0)  # the node is up and its first scan found nothing
        tmp = kit.root / "TOSEND" / "J.TFS"
        tmp.write_text("$email_address a@copia.com\n$email_text hi\n")
        tmp.rename(kit.root / "TOSEND" / "J.FS")
        # Far sooner than the 60 s scan timer: the watcher woke the node.
        wait_until(lambda: kit.names("SENT") == ["J.FS"], timeout=15)
    finally:
        code, _, err = stop(proc)
    assert code == 0, err


def test_watcher_poll_is_the_polling_watcher(tmp_path, server):
    # Spelled as the spool's cluster section spells it (`watcher: poll`).
    kit = kit_for(tmp_path, server, yaml="watcher: poll\n")
    proc = kit.start("N1")
    try:

        def watcher_args() -> list[str]:
            for pid in children_of(proc.pid):
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        args = f.read().decode().split("\0")
                except OSError:
                    continue
                if "copiamail.spool.watcher" in args:
                    return args
            return []

        wait_until(lambda: watcher_args() != [], timeout=15)
        assert "--polling" in watcher_args()
    finally:
        code, _, err = stop(proc)
    assert code == 0, err


def test_cluster_wide_caps_are_refused_until_the_cluster_limiter_exists(tmp_path, server):
    kit = kit_for(tmp_path, server, yaml='domain:\n  "copia.com": {cluster_scope_max_outbound_connections: 2}\n')
    result = kit.cli("node", "--name", "N1", "--drain")
    assert result.returncode == 2
    assert "cluster_scope_max_outbound_connections" in result.stderr and "Traceback" not in result.stderr


# --- faults: class, EMAIL_ERROR, retry, no reuse after an error ---------------


@pytest.mark.parametrize(
    "rule,code,klass,error_part",
    [
        (Rule(stage="EOD", delay=3.0), "72", "A", "timeout"),
        (Rule(stage="EOD", drop=True), "71", "C", "dropped"),
        (Rule(stage="MAIL", code=421, text="4.3.2 shutting down"), "421", "H", "421 4.3.2 shutting down"),
        (Rule(stage="CONNECT", code=554, text="5.7.1 go away"), "554", "H", "554 5.7.1 go away"),
        (Rule(stage="RCPT", code=452, text="4.2.2 mailbox full"), "452", "B", "452 4.2.2 mailbox full"),
    ],
    ids=["timeout", "drop-after-354", "421-at-mail", "554-greeting", "452-mailbox-full"],
)
def test_temporary_failures_get_their_class_and_error_and_are_retried(tmp_path, server, rule, code, klass, error_part):
    server.add_rule(rule)
    kit = kit_for(tmp_path, server, '$email_retry_delays * "1H"')
    kit.config_path.write_text(kit.config_path.read_text().replace("smtp_timeout: 10", "smtp_timeout: 1"))
    kit.job("TOSEND", "J.FS", to="a@copia.com")
    assert kit.drain().returncode == 0
    assert kit.names("TOSEND") == ["J.FS"]
    text = kit.read("TOSEND", "J.FS")
    [[_, _, got_code, got_class, _]] = attempts(text)
    assert (got_code, got_class) == (code, klass)
    assert error_part in var(text, "EMAIL_ERROR")
    assert "$fax_status1 2" in text and "$fax_next_time" in text


def test_a_connection_is_never_reused_after_an_error(tmp_path, server):
    # A dropped connection (a refusal leaves it usable: tests/test_smtp_rules_e2e.py).
    server.add_rule(Rule(stage="RCPT", drop=True, match="bad@copia.com"))
    kit = kit_for(tmp_path, server, "$domain_limit * @copia.com 1")
    kit.job("TOSEND", "A.FS", to="bad@copia.com")
    kit.job("TOSEND", "B.FS", to="good1@copia.com")
    kit.job("TOSEND", "C.FS", to="good2@copia.com")
    assert kit.drain().returncode == 0
    assert kit.names("TOSEND") == ["A.FS"] and kit.names("SENT") == ["B.FS", "C.FS"]
    first = server.connections[0]
    assert first.messages == 0
    assert server.connections_total == 2
    assert all(m.conn_serial != first.serial for m in server.messages)


def test_a_host_stanza_naming_the_relay_by_host_name_limits_its_connections(tmp_path, server):
    server.add_rule(Rule(stage="EOD", delay=0.25))
    kit = kit_for(tmp_path, server, yaml='host:\n  "127.0.0.1": {scope_max_outbound_connections: 2}\n')
    kit.config_path.write_text(kit.config_path.read_text().replace("host: 127.0.0.1,", "host: localhost,"))
    for i in range(8):
        kit.job("TOSEND", f"J{i}.FS", to=f"u@d{i}.org")
    assert kit.drain().returncode == 0
    assert len(kit.names("SENT")) == 8
    assert server.peak == 2


# --- the review's findings: nothing stranded, queue order across shared caps --


def test_a_fifo_named_as_body_fails_the_job_instead_of_hanging_the_node(tmp_path, server):
    import os

    kit = kit_for(tmp_path, server)
    (kit.root / "files").mkdir()
    os.mkfifo(kit.root / "files" / "pipe")
    kit.job("TOSEND", "F.FS", "$email_body files/pipe", to="a@copia.com")
    kit.job("TOSEND", "G.FS", to="b@copia.com")
    assert kit.drain(timeout=30).returncode == 0
    assert kit.names("FAIL") == ["F.FS"] and kit.names("SENT") == ["G.FS"]
    assert "not a regular file" in var(kit.read("FAIL", "F.FS"), "EMAIL_ERROR")


def test_a_bad_ca_file_stops_the_node_at_start_and_touches_no_job(tmp_path, server):
    kit = SpoolKit(tmp_path, None, [], yaml=f"relay: {{host: 127.0.0.1, port: {server.port}, starttls: auto, ca_file: ./nope.pem}}\n")
    kit.job("TOSEND", "J.FS", to="a@copia.com")
    result = kit.cli("node", "--name", "N1", "--drain")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "relay.ca_file" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert kit.names("TOSEND") == ["J.FS"] and kit.active() == []


def test_sigterm_while_reconnecting_hands_the_next_job_back_untouched(tmp_path, server):
    server.add_rule(Rule(stage="QUIT", hang=True))
    kit = kit_for(tmp_path, server, "$domain_limit * @copia.com 1", yaml="messages_per_connection: 1\n")
    kit.config_path.write_text(kit.config_path.read_text().replace("shutdown_grace: 2", "shutdown_grace: 0.3"))
    kit.job("TOSEND", "A.FS", to="a@copia.com")
    original = kit.job("TOSEND", "B.FS", to="b@copia.com").read_bytes()
    proc = kit.start("N1")
    wait_until(lambda: kit.names("SENT") == ["A.FS"], timeout=15)
    wait_until(lambda: any(c.open and "QUIT" in " ".join(c.commands).upper() for c in server.connections), timeout=15)
    code, _, err = stop(proc)
    assert code == 0, err
    assert kit.active() == []
    assert (kit.root / "TOSEND" / "B.FS").read_bytes() == original + b"$var_def DOMAINBUSY_COUNT 1\n"


def test_queue_order_holds_across_domains_when_a_shared_cap_is_full(tmp_path, server):
    # One worker: two workers each keep their own domains' order, and race for
    # a shared slot (docs/operating.md, Workers).
    kit = kit_for(tmp_path, server, yaml="server_max_outbound_connections: 1\nworkers: 1\n")
    kit.job("TOSEND", "A1.FS", to="a1@a.com")
    kit.job("TOSEND", "B1.FS", to="b1@b.com")
    kit.job("TOSEND1", "A2.FS", to="a2@a.com")
    kit.job("TOSEND1", "A3.FS", to="a3@a.com")
    assert kit.drain().returncode == 0
    assert [m.rcpt_tos[0] for m in server.messages] == ["a1@a.com", "b1@b.com", "a2@a.com", "a3@a.com"]
    assert server.peak == 1


def test_an_idle_connection_gives_a_shared_slot_to_a_waiting_job_of_another_domain(tmp_path, server):
    kit = kit_for(tmp_path, server, yaml="server_max_outbound_connections: 1\n")
    kit.config_path.write_text(kit.config_path.read_text().replace("connection_idle: 0.2", "connection_idle: 120"))
    kit.job("TOSEND", "A.FS", to="a@a.com")
    kit.job("TOSEND", "B.FS", to="b@b.com")
    # Were the a.com connection to sit out its 120 s idle time holding the only
    # slot, this drain would time out.
    assert kit.drain(timeout=30).returncode == 0
    assert kit.names("SENT") == ["A.FS", "B.FS"] and server.peak == 1


def test_a_drain_ends_when_its_last_reply_comes_not_connection_idle_later(tmp_path, server):
    server.add_rule(Rule(stage="EOD", match="@b.com", delay=1.5))
    kit = kit_for(tmp_path, server)
    kit.config_path.write_text(kit.config_path.read_text().replace("connection_idle: 0.2", "connection_idle: 120")
                               .replace("scan_interval: 0.3", "scan_interval: 60"))
    kit.job("TOSEND", "A.FS", to="a@a.com")
    kit.job("TOSEND", "B.FS", to="b@b.com")
    # The drain finds nothing left while b.com's reply is still 1.5 s away;
    # were that connection to wait its 120 s for another job, or the node to
    # look again only at its next full scan a minute later, this would time out.
    assert kit.drain(timeout=30).returncode == 0
    assert kit.names("SENT") == ["A.FS", "B.FS"]


@pytest.mark.parametrize(
    "rules,addresses,peaks",
    [
        (["$domain_limit * @copia.com 1", "$domain_limit * @ 3"], ["a@copia.com"] * 4, {"copia.com": 1}),
        (["$domain_limit * copia 2"], ["copia@gmail.com"] * 5, {"gmail.com": 2}),
        (["$domain_limit * @copia.com 1"], ["a@sub.copia.com"] * 3, {"sub.copia.com": 3}),
        (["$domain_limit * @COPIA.COM 1"], ["A@Copia.Com"] * 3, {"copia.com": 1}),
        (["$domain_limit * @ 3"], ["x@any.org"] * 6, {"any.org": 3}),
    ],
    ids=["first-rule-wins", "substring-in-local-part", "subdomain-not-matched", "case-insensitive", "catch-all-count-3"],
)
def test_spec_table_rows_hold_at_a_real_server(tmp_path, server, rules, addresses, peaks):
    server.add_rule(Rule(stage="EOD", delay=0.3))
    kit = kit_for(tmp_path, server, *rules)
    for i, address in enumerate(addresses):
        kit.job("TOSEND", f"J{i}.FS", to=address)
    assert kit.drain().returncode == 0
    assert len(kit.names("SENT")) == len(addresses)
    assert dict(server.peak_by_domain) == peaks


def test_5xx_to_the_data_command_itself_is_final(tmp_path, server):
    server.add_rule(Rule(stage="DATA", code=554, text="5.7.1 no data for you"))
    kit = kit_for(tmp_path, server)
    kit.job("TOSEND", "J.FS", to="a@copia.com")
    assert kit.drain().returncode == 0
    text = kit.read("FAIL", "J.FS")
    assert "$fax_status2 554" in text and var(text, "EMAIL_ERROR") == "554 5.7.1 no data for you"


def test_two_nodes_racing_over_one_spool_send_each_job_once(tmp_path, server):
    server.add_rule(Rule(stage="EOD", delay=0.01))
    kit = kit_for(tmp_path, server, "$domain_limit * @ 4")
    for i in range(200):
        kit.job(f"TOSEND{i % 3}" if i % 3 else "TOSEND", f"J{i:04d}.FS", to=f"u{i}@d{i % 7}.org")
    procs = [kit.start(name, "--drain") for name in ("N1", "N2")]
    for p in procs:
        _out, err = p.communicate(timeout=120)
        assert p.returncode == 0 and "Traceback" not in err, err
    assert len(kit.names("SENT")) == 200 and kit.waiting() == [] and kit.active() == []
    ids = [m.message_id for m in server.messages]
    assert len(ids) == 200 and len(set(ids)) == 200
    nodes = {attempts(kit.read("SENT", n))[-1][1] for n in kit.names("SENT")}
    assert nodes == {"N1", "N2"}


def test_after_sigterm_an_in_flight_send_finishes_within_grace_and_no_new_job_starts(tmp_path, server):
    server.add_rule(Rule(stage="EOD", delay=1.0))
    kit = kit_for(tmp_path, server, "$domain_limit * @copia.com 1")
    kit.config_path.write_text(kit.config_path.read_text().replace("shutdown_grace: 2", "shutdown_grace: 10"))
    kit.job("TOSEND", "A.FS", to="a@copia.com")
    kit.job("TOSEND", "B.FS", to="b@copia.com")
    proc = kit.start("N1")
    wait_until(lambda: any(c.open and "DATA" in " ".join(c.commands).upper() for c in server.connections), timeout=15)
    code, _, err = stop(proc)
    assert code == 0, err
    assert kit.names("SENT") == ["A.FS"]
    assert kit.names("TOSEND") == ["B.FS"] and kit.active() == []
    assert len(server.messages) == 1


def test_node_creates_the_missing_spool_folders_as_queues_says(tmp_path, server):
    kit = kit_for(tmp_path, server, yaml="queues: 3\n")
    import shutil

    shutil.rmtree(kit.root)
    kit.root.mkdir()
    assert kit.drain().returncode == 0
    # STATE (the live state's folder) is made by a worker's first publish,
    # which even an empty drain may reach (while its workers agree to end).
    made = sorted(p.name for p in kit.root.iterdir() if p.is_dir() and p.name != "STATE")
    assert made == ["ACTIVE", "FAIL", "SENT", "TEMP", "TOSEND", "TOSEND1", "TOSEND2", "TOSEND3"]


def test_one_drain_over_several_folders_gives_every_outcome_in_its_place(tmp_path, server):
    """Issue 2's scenario in one run: a 550 into FAIL, a 451 retried after its
    delay then sent, retries running out into FAIL, deferred jobs carrying
    DOMAINBUSY_COUNT without an attempt record, and priority order kept."""
    server.add_rule(Rule(stage="EOD", delay=0.2))
    server.add_rule(Rule(stage="RCPT", code=550, text="5.1.1 <jane@bank.test>: User unknown", match="jane@bank.test"))
    server.add_rule(Rule(stage="RCPT", code=451, text="4.3.0 greylisted", match="grey@bank.test", times=1))
    server.add_rule(Rule(stage="RCPT", code=451, text="4.3.0 always busy", match="busy@bank.test"))
    kit = kit_for(tmp_path, server, "$domain_limit * @copia.com 1", '$email_retry_delays * "2S 2S"')
    kit.job("TOSEND3", "C1.FS", to="c1@copia.com")
    kit.job("TOSEND", "C2.FS", to="c2@copia.com")
    kit.job("TOSEND1", "C3.FS", to="c3@copia.com")
    kit.job("TOSEND2", "C4.FS", to="c4@copia.com")
    kit.job("TOSEND1", "JANE.FS", to="jane@bank.test")
    kit.job("TOSEND2", "GREY.FS", to="grey@bank.test")
    kit.job("TOSEND3", "BUSY.FS", to="busy@bank.test")
    assert kit.drain().returncode == 0
    assert kit.names("SENT") == ["C1.FS", "C2.FS", "C3.FS", "C4.FS"]
    assert kit.names("FAIL") == ["JANE.FS"]
    assert kit.names("TOSEND2") == ["GREY.FS"] and kit.names("TOSEND3") == ["BUSY.FS"]
    copia = [m.rcpt_tos[0] for m in server.messages if m.rcpt_tos[0].endswith("@copia.com")]
    assert copia == ["c2@copia.com", "c3@copia.com", "c4@copia.com", "c1@copia.com"]
    for name in ("C1.FS", "C3.FS", "C4.FS"):
        text = kit.read("SENT", name)
        assert var(text, "DOMAINBUSY_COUNT") == "1" and [a[2] for a in attempts(text)] == ["0"]
    assert var(kit.read("FAIL", "JANE.FS"), "EMAIL_ERROR") == "550 5.1.1 <jane@bank.test>: User unknown"
    kit.drain_until(lambda: "BUSY.FS" in kit.names("FAIL") and "GREY.FS" in kit.names("SENT"), timeout=30)
    assert [a[2] for a in attempts(kit.read("SENT", "GREY.FS"))] == ["451", "0"]
    busy = kit.read("FAIL", "BUSY.FS")
    assert [a[2] for a in attempts(busy)] == ["451", "451", "451"] and "$fax_status2 451" in busy


def test_a_spool_folder_writable_by_every_user_is_warned_about(tmp_path, server):
    kit = kit_for(tmp_path, server)
    (kit.root / "TOSEND").chmod(0o777)
    result = kit.drain()
    assert result.returncode == 0
    assert "TOSEND: writable by every user" in result.stderr
    (kit.root / "TOSEND").chmod(0o755)
    assert "writable by every user" not in kit.drain().stderr


@pytest.mark.parametrize(("kind", "fsync", "warned"), [
    ("ext4 without a journal", True, True), ("ext2", True, True), (None, True, False),
    ("ext4 without a journal", False, False),
])
def test_a_spool_on_a_file_system_without_ordered_metadata_is_warned_about_when_fsync_promises_power_loss_safety(
        tmp_path, monkeypatch, kind, fsync, warned):
    monkeypatch.setattr(node_module, "unordered_metadata", lambda path: kind)
    spool = Spool(tmp_path)
    spool.ensure()
    said = [w for w in spool_warnings(spool, fsync) if "lost+found" in w]
    assert said == ([f"{tmp_path}: on an {kind}, which writes folders back in no order: after a power loss a job "
                     "may be left in lost+found, in two folders, or under another job's name; keep the spool on a "
                     "file system with a journal (ext4 with one, xfs)"] if warned else [])


def test_the_node_warns_at_its_start_when_its_spools_file_system_keeps_no_order(tmp_path, server):
    kit = kit_for(tmp_path, server)
    result = kit.drain()
    assert result.returncode == 0
    assert ("lost+found" in result.stderr) == (unordered_metadata(kit.root) is not None), result.stderr
