"""First-day operator problems (issue 11), as an operator meets them: the
`copiamail` CLI in a subprocess, its output, exit code and the spool after."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest
from smtpserver import Rule
from spoolkit import CLI, SpoolKit, attempts, children_of, cli_env, run_on_a_terminal, wait_until

from copiamail.spool.jobview import NEXT_TRY_FORMAT


@pytest.fixture
def server(smtp_server):
    return smtp_server()


def start_in_own_group(kit: SpoolKit, *args: str) -> subprocess.Popen[str]:
    """A node in a process group of its own, as a shell's foreground job is:
    a terminal's hang-up goes to that whole group."""
    return subprocess.Popen(
        [*CLI, *args], cwd=kit.base, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL, env=cli_env(COPIAMAIL_CONFIG=str(kit.config_path)), start_new_session=True,
    )


def all_job_texts(kit: SpoolKit) -> dict[str, str]:
    return {str(p.relative_to(kit.root)): p.read_text(encoding="utf-8")
            for p in kit.root.rglob("*") if p.is_file() and p.name.upper().endswith(".FS")}


def descendants(pid: int) -> list[int]:
    out = []
    for child in children_of(pid):
        out += [child, *descendants(child)]
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# --- 3: SIGHUP ---------------------------------------------------------------------


@pytest.mark.parametrize("yaml", ["", "workers: 2\n"], ids=["one-process", "workers"])
def test_a_hang_up_of_the_whole_process_group_does_not_stop_the_node(tmp_path, server, yaml):
    server.add_rule(Rule(stage="EOD", delay=1.0))
    kit = SpoolKit(tmp_path, server.port, ["$domain_limit * @ 2"], yaml)
    for i in range(6):
        kit.job("TOSEND", f"J{i}.FS", to=f"u{i}@d{i % 3}.example")
    proc = start_in_own_group(kit, "node", "--name", "N1")
    try:
        wait_until(lambda: server.current >= 1 and kit.active() != [], timeout=15)
        family = descendants(proc.pid)
        assert family, "the node has no child process (watcher, syncer, workers)"
        os.killpg(proc.pid, signal.SIGHUP)
        time.sleep(1.0)
        assert proc.poll() is None, proc.communicate()
        assert [p for p in family if not alive(p)] == []
        wait_until(lambda: len(kit.names("SENT")) == 6, timeout=30)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "SIGHUP: configuration reloaded" in err  # and nothing else: the node went on
    assert "Traceback" not in err
    assert kit.active() == []
    for name, text in all_job_texts(kit).items():
        assert "66" not in [a[2] for a in attempts(text)], (name, text)


def test_a_hang_up_during_a_drain_lets_it_finish(tmp_path, server):
    server.add_rule(Rule(stage="EOD", delay=0.5))
    kit = SpoolKit(tmp_path, server.port, ["$domain_limit * @ 1"])
    for i in range(4):
        kit.job("TOSEND", f"J{i}.FS", to=f"u{i}@copia.com")
    proc = start_in_own_group(kit, "node", "--name", "N1", "--drain")
    wait_until(lambda: server.current >= 1, timeout=15)
    os.killpg(proc.pid, signal.SIGHUP)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert kit.names("SENT") == ["J0.FS", "J1.FS", "J2.FS", "J3.FS"]
    assert kit.active() == []
    assert all("66" not in [a[2] for a in attempts(t)] for t in all_job_texts(kit).values())


# --- 5: what is a job, in which folder -----------------------------------------------


def status_rows(out: str) -> dict[str, str]:
    """``folder -> jobs`` from the folder table `status` prints."""
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in re.split(r"[│|┃]", line) if c.strip()]
        if len(cells) >= 2 and cells[1].isdigit() and cells[0] not in rows:  # folder, jobs, oldest
            rows[cells[0]] = cells[1]
    return rows


def test_a_folder_named_like_a_job_is_not_counted_as_waiting(tmp_path, server):
    kit = SpoolKit(tmp_path, server.port, [])
    (kit.root / "TOSEND" / "B005.FS").mkdir()
    kit.job("TOSEND", "A.FS", to="a@copia.com")
    assert status_rows(kit.cli("status").stdout)["TOSEND"] == "1"
    assert kit.drain().returncode == 0
    assert status_rows(kit.cli("status").stdout)["TOSEND"] == "0"


def test_a_lower_case_queue_folder_is_that_queue(tmp_path, server):
    server.add_rule(Rule(stage="RCPT", code=451, text="4.3.0 later", match="late@copia.com"))
    kit = SpoolKit(tmp_path, server.port, ['$domain_limit * @ 1', '$email_retry_delays * "1H"'])
    (kit.root / "TOSEND1").rmdir()
    (kit.root / "tosend1").mkdir()
    kit.job("tosend1", "A.FS", to="a@copia.com")
    kit.job("tosend1", "LATE.FS", to="late@copia.com")
    kit.job("TOSEND2", "B.FS", to="b@copia.com")
    assert status_rows(kit.cli("status").stdout)["tosend1"] == "2"
    assert kit.drain().returncode == 0
    assert kit.names("SENT") == ["A.FS", "B.FS"]
    assert [m.rcpt_tos[0] for m in server.messages] == ["a@copia.com", "b@copia.com"]  # queue 1 before 2
    # The retry is written back into the folder it came from, as that is named.
    assert kit.names("tosend1") == ["LATE.FS"] and [a[2] for a in attempts(kit.read("tosend1", "LATE.FS"))] == ["451"]
    assert not (kit.root / "TOSEND1").exists()


# --- 10: what a node logs --------------------------------------------------------------

STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d copiamail: "


def outcome_kit(tmp_path, server) -> SpoolKit:
    server.add_rule(Rule(stage="RCPT", code=550, text="5.1.1 <jane@copia.com>: User unknown", match="jane@copia.com"))
    server.add_rule(Rule(stage="RCPT", code=451, text="4.3.0 greylisted", match="grey@copia.com"))
    kit = SpoolKit(tmp_path, server.port, ["$domain_limit * @ 1", '$email_retry_delays * "1H"'])
    kit.job("TOSEND", "A.FS", to="a@copia.com")
    kit.job("TOSEND", "JANE.FS", to="jane@copia.com")
    kit.job("TOSEND", "GREY.FS", to="grey@copia.com")
    return kit


def test_a_running_node_logs_its_start_retries_failures_and_stop_with_a_timestamp(tmp_path, server):
    kit = outcome_kit(tmp_path, server)
    proc = kit.start("N1")
    try:
        wait_until(lambda: kit.names("SENT") == ["A.FS"] and kit.names("FAIL") == ["JANE.FS"]
                   and "451" in kit.read("TOSEND", "GREY.FS"), timeout=20)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    lines = err.splitlines()
    assert lines and all(re.match(STAMP, line) for line in lines), err
    [start] = [l for l in lines if "started" in l]
    assert "node N1" in start and f"spool {kit.root}" in start and f"relay 127.0.0.1:{server.port}" in start
    assert str(kit.cfg_path) in start
    [retry] = [l for l in lines if "GREY.FS" in l]
    assert "grey@copia.com" in retry and "retry" in retry and "451 4.3.0 greylisted" in retry
    [failure] = [l for l in lines if "JANE.FS" in l]
    assert "jane@copia.com" in failure and "failed" in failure and "550 5.1.1" in failure
    assert re.search(STAMP + r"node N1 stopped: sent 1, failed 1, retry later 1", lines[-1]), err
    assert not any("A.FS" in l for l in lines)  # deliveries only from -v on


def test_v_adds_deliveries_and_deferrals_and_vv_no_library_debug_lines(tmp_path, server):
    kit = outcome_kit(tmp_path, server)
    quiet = kit.cli("node", "--name", "N1", "--drain")
    assert quiet.returncode == 0 and "delivered" not in quiet.stderr and "deferred:" not in quiet.stderr
    for i in range(2):
        kit.job("TOSEND", f"B{i}.FS", to=f"b{i}@copia.com")
    verbose = kit.cli("-v", "node", "--name", "N1", "--drain")
    assert verbose.returncode == 0, verbose.stderr
    assert re.search(STAMP + r"B0\.FS to b0@copia\.com delivered \(127\.0\.0\.1\): 250", verbose.stderr), verbose.stderr
    assert re.search(STAMP + r"B1\.FS to b1@copia\.com deferred", verbose.stderr), verbose.stderr
    kit.job("TOSEND", "C.FS", to="c@copia.com")
    debug = kit.cli("-vv", "node", "--name", "N1", "--drain")
    assert debug.returncode == 0 and "C.FS to c@copia.com delivered" in debug.stderr
    assert all(re.match(STAMP, line) for line in debug.stderr.splitlines()), debug.stderr


# --- 7: log lines and the progress bar on one terminal ----------------------------------

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def test_log_lines_start_on_their_own_line_below_the_progress_bar(tmp_path, server):
    server.add_rule(Rule(stage="EOD", delay=0.4))
    server.add_rule(Rule(stage="RCPT", code=550, text="5.1.1 User unknown", match="jane@copia.com"))
    kit = SpoolKit(tmp_path, server.port, ["$domain_limit * @ 1"])
    for i in range(3):
        kit.job("TOSEND", f"J{i}.FS", to=f"u{i}@copia.com")
    kit.job("TOSEND", "J9.FS", to="jane@copia.com")
    code, out = run_on_a_terminal([*CLI, "node", "--name", "N1", "--drain"], tmp_path, stderr_too=True,
                                  env=cli_env(COPIAMAIL_CONFIG=str(kit.config_path), TERM="xterm", COLUMNS="100"))
    assert code == 0, out
    assert "4/4" in out and "J9.FS to jane@copia.com failed" in out
    for m in re.finditer(r"copiamail: ", out):
        line_start = max(out.rfind("\n", 0, m.start()), out.rfind("\r", 0, m.start())) + 1
        before = ANSI.sub("", out[line_start:m.start()])
        assert re.fullmatch(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d )?", before), repr(out[line_start:m.end() + 40])


# --- 4: show ------------------------------------------------------------------------------


def show(kit: SpoolKit, path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return kit.cli("show", *args, str(path))


@pytest.mark.parametrize("bad_line", [b'$email_subject "open', b"\x00\x01\x02binary\xff", b"$email_text no address here"],
                         ids=["unterminated-quote", "binary", "no-address"])
def test_show_of_a_failed_job_that_does_not_parse_prints_its_email_error_first(tmp_path, bad_line):
    kit = SpoolKit(tmp_path, 2525, [])
    (kit.root / "FAIL").mkdir()
    address = b"" if b"no address" in bad_line else b"$email_address a@copia.com\n"
    path = kit.root / "FAIL" / "BAD.FS"
    path.write_bytes(address + bad_line + b"\n"
                     b'$attempt_record 11/21/2026 10:00:00 E N1 65 Z "bad job"\n'
                     b'$var_def EMAIL_ERROR "65 line 2: unterminated quote"\n')
    result = show(kit, path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "BAD.FS" in result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("job") and "failed" in lines[0]
    engine = [l for l in lines if not l.startswith(("job", "recipient"))]
    assert engine[0].startswith("EMAIL_ERROR") and "65 line 2: unterminated quote" in engine[0]
    assert any(l.startswith("attempt") and "N1 65 Z bad job" in l for l in engine)
    if address:
        assert "a@copia.com" in result.stdout


def test_show_starts_with_the_state_and_shows_a_next_try_only_while_waiting(tmp_path, server):
    server.add_rule(Rule(stage="RCPT", code=451, text="4.3.0 later", match="late@copia.com", times=1))
    kit = SpoolKit(tmp_path, server.port, ['$email_retry_delays * "2S"'])
    kit.job("TOSEND", "LATE.FS", to="late@copia.com")
    kit.job("TOSEND", "NEW.FS", to="new@copia.com")
    (kit.root / "ACTIVE" / "N7" / "TOSEND3").mkdir(parents=True)
    kit.job("ACTIVE/N7/TOSEND3", "FLY.FS", to="fly@copia.com")
    assert show(kit, kit.root / "TOSEND" / "NEW.FS").stdout.startswith("job        waiting (due)")
    assert show(kit, kit.root / "ACTIVE" / "N7" / "TOSEND3" / "FLY.FS").stdout.startswith("job        in flight on node N7")
    (kit.root / "ACTIVE" / "N7" / "TOSEND3" / "FLY.FS").unlink()
    assert kit.drain().returncode == 0
    waiting = show(kit, kit.root / "TOSEND" / "LATE.FS").stdout
    due = re.match(r"job        waiting \(next try (\d\d/\d\d/\d{4} \d\d:\d\d:\d\d)\)", waiting)
    assert due, waiting
    # The retry time is written rounded up to the second: up to 3 s after
    # the attempt, not 2. Wait until the time shown has passed.
    time.sleep(max(0.0, datetime.strptime(due.group(1), NEXT_TRY_FORMAT).timestamp() - time.time()) + 0.2)
    kit.drain()
    delivered = show(kit, kit.root / "SENT" / "LATE.FS")
    assert delivered.returncode == 0 and delivered.stdout.startswith("job        delivered")
    assert "next try" not in delivered.stdout and "$fax_next_date" in kit.read("SENT", "LATE.FS")


def test_show_message_prints_the_mime_message_as_it_would_be_sent(tmp_path):
    kit = SpoolKit(tmp_path, 2525, ["$email_esender bounces@copia.com"])
    path = kit.job("TOSEND", "J.FS", '$email_subject "Your statement"', '$email_text "Dear Jane,"', to="jane@copia.com")
    result = show(kit, path, "--message")
    assert result.returncode == 0, result.stderr
    assert "Subject: Your statement" in result.stdout and "To: jane@copia.com" in result.stdout
    assert "From: bounces@copia.com" in result.stdout and "Dear Jane," in result.stdout
    assert "Message-ID:" in result.stdout


# --- 6: a spool that does not exist, or is none -----------------------------------------


@pytest.mark.parametrize("command", [["node", "--name", "N1", "--drain"], ["submit", "--to", "a@copia.com", "--subject", "s"],
                                     ["status"],
                                     ["recover", "--node", "N1"], ["check-config"], ["explain", "a@copia.com"]])
def test_a_mistyped_spool_is_refused_in_one_line_and_nothing_is_made(tmp_path, command):
    kit = SpoolKit(tmp_path, 2525, [])
    typo = tmp_path / "spoool"
    result = kit.cli(*command, "--spool", str(typo))
    assert result.returncode == 2, (result.stdout, result.stderr)
    [line] = result.stderr.strip().splitlines()
    assert str(typo) in line and "no such spool folder" in line
    assert not typo.exists()


def test_status_on_a_folder_that_is_no_spool_says_so(tmp_path):
    kit = SpoolKit(tmp_path, 2525, [])
    result = kit.cli("status", "--spool", str(tmp_path))
    assert result.returncode == 2
    assert "not a spool" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_init_makes_a_spool_that_submit_and_node_then_use(tmp_path, server):
    kit = SpoolKit(tmp_path, server.port, [])
    fresh = tmp_path / "new-spool"
    made = kit.cli("init", "--spool", str(fresh))
    assert made.returncode == 0 and str(fresh) in made.stdout
    assert sorted(p.name for p in fresh.iterdir()) == sorted(["ACTIVE", "FAIL", "SENT", "TEMP", "TOSEND"] + [f"TOSEND{i}" for i in range(1, 16)])
    assert kit.cli("submit", "--to", "a@copia.com", "--subject", "s", "--spool", str(fresh)).returncode == 0
    assert kit.drain("N1", "--spool", str(fresh)).returncode == 0
    assert len(list((fresh / "SENT").glob("*.FS"))) == 1


def test_a_node_makes_the_missing_folders_of_an_existing_spool(tmp_path, server):
    kit = SpoolKit(tmp_path, server.port, [])
    for d in kit.root.iterdir():
        if d.name != "TOSEND":
            d.rmdir()
    kit.job("TOSEND", "J.FS", to="a@copia.com")
    assert kit.drain().returncode == 0
    assert kit.names("SENT") == ["J.FS"] and (kit.root / "TOSEND15").is_dir()


# --- 8: status --watch, piped -------------------------------------------------------------


def test_status_watch_piped_prints_a_frame_per_refresh_and_stops_cleanly_on_sigterm(tmp_path):
    import selectors

    kit = SpoolKit(tmp_path, 2525, [])
    kit.job("TOSEND", "J.FS", to="a@copia.com")
    proc = subprocess.Popen([*CLI, "status", "--watch"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, env=cli_env(COPIAMAIL_CONFIG=str(kit.config_path)))
    seen = b""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + 20
    try:
        while seen.count(b"spool ") < 2 and time.monotonic() < deadline:
            if sel.select(timeout=0.5):
                seen += os.read(proc.stdout.fileno(), 65536)
        assert seen.count(b"spool ") >= 2, seen
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0 and err == b"", err
    assert b"TOSEND" in seen


# --- 9: an unreadable relay.password_file --------------------------------------------------


def test_an_unreadable_password_file_is_named_by_yaml_file_line_and_key(tmp_path, server):
    kit = SpoolKit(tmp_path, None, [], yaml=(
        "relay:\n"
        f"  host: 127.0.0.1\n"
        f"  port: {server.port}\n"
        "  username: mailer\n"
        "  password_file: /nope\n"
    ))
    kit.job("TOSEND", "J.FS", to="a@copia.com")
    expected = f"{kit.config_path}:11: key 'relay.password_file': cannot read /nope: No such file or directory"
    for command in (["check-config"], ["node", "--name", "N1", "--drain"]):
        result = kit.cli(*command)
        assert result.returncode == 2, (command, result.stdout, result.stderr)
        assert result.stderr.strip().splitlines() == [f"copiamail: {expected}"], result.stderr
    assert kit.names("TOSEND") == ["J.FS"]


# --- 12: smaller ones ---------------------------------------------------------------------------


def test_a_yaml_whose_top_level_is_a_list_says_so(tmp_path):
    kit = SpoolKit(tmp_path, 2525, [])
    kit.config_path.write_text("- spool: ./spool\n- queues: 3\n")
    result = kit.cli("check-config")
    assert result.returncode == 2
    assert result.stderr.strip() == f"copiamail: {kit.config_path}:1: the top level must be a mapping of keys"


def test_demo_with_a_dir_that_exists_does_not_ask_for_dir(tmp_path):
    (tmp_path / "mine").mkdir()
    env = {k: v for k, v in cli_env().items() if k != "COPIAMAIL_CONFIG"}
    result = subprocess.run([*CLI, "demo", "--dir", str(tmp_path / "mine")], cwd=tmp_path, capture_output=True, text=True,
                            timeout=60, stdin=subprocess.DEVNULL, env=env)
    assert result.returncode == 2 and "not an earlier demo spool" in result.stderr
    assert "pass --dir" not in result.stderr
    (tmp_path / "demo-spool").mkdir()
    default = subprocess.run([*CLI, "demo"], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                             stdin=subprocess.DEVNULL, env=env)
    assert default.returncode == 2 and "--dir" in default.stderr


def test_the_drain_summary_gives_a_rate_for_a_single_slow_message(tmp_path, server):
    server.add_rule(Rule(stage="EOD", delay=2.5))
    kit = SpoolKit(tmp_path, server.port, [])
    kit.job("TOSEND", "J.FS", to="a@copia.com")
    result = kit.drain()
    assert result.returncode == 0, result.stderr
    assert "sent 1" in result.stdout and "(0 msgs/s)" not in result.stdout
    assert re.search(r"\(0\.\d+ msgs/s\)", result.stdout), result.stdout
