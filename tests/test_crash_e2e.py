"""The crash matrix (issue 4): SIGKILL a node at each step of a job's path, start
it again, and check that every job ends in SENT or FAIL, none is sent twice
except in the documented window (end of DATA to the commit), and no temporary
or result file is left in ACTIVE.

Steps inside the spool protocol are reached with the test-only crash points of
copiamail/spool/crashpoints.py; steps inside the SMTP dialogue by a server that stalls
there while the test kills the node."""

from __future__ import annotations

import os
import signal

import pytest
from smtpserver import Rule
from spoolkit import SpoolKit, attempts, cli_env, var, wait_until

from copiamail.spool.crashpoints import CRASH_ENV


def start_with_crash(kit: SpoolKit, point: str):
    import subprocess

    from spoolkit import CLI

    return subprocess.Popen(
        # One process: the crash point kills the process the scheduler runs in
        # (a worker's death taking its node down is tested in test_workers_e2e).
        [*CLI, "node", "--name", "N1", "--workers", "1"], cwd=kit.base, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL, env=cli_env(COPIAMAIL_CONFIG=str(kit.config_path), **{CRASH_ENV: point}),
    )


def leftovers(kit: SpoolKit) -> list[str]:
    """Anything in ACTIVE's node folders: claimed jobs, results, temporary files."""
    return sorted(str(p.relative_to(kit.root)) for p in kit.active())


@pytest.mark.parametrize(
    "point,attempt_codes",
    [
        # Only claimed: it goes back unchanged, nothing counts.
        ("claimed", ["0"]),
        # Its SMTP transaction about to start: an interruption (66).
        ("sending", ["66", "0"]),
        # After the server's 250 the job is marked delivered (a rename: its
        # result file named, its data not yet written); a crash from then on
        # finishes it to SENT and never sends it again.
        ("delivered", ["0"]),
        ("writing-SENT", ["0"]),
        ("written-SENT", ["0"]),
        ("committed-SENT", ["0"]),
    ],
)
def test_crash_points_on_the_way_to_sent(tmp_path, smtp_server, point, attempt_codes):
    server = smtp_server()
    kit = SpoolKit(tmp_path, server.port, [])
    kit.job("TOSEND1", "J.FS", to="a@copia.com")
    proc = start_with_crash(kit, point)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert kit.names("SENT") == [] or point == "committed-SENT"
    assert kit.drain().returncode == 0
    assert kit.names("SENT") == ["J.FS"] and kit.waiting() == [] and leftovers(kit) == []
    assert [a[2] for a in attempts(kit.read("SENT", "J.FS"))] == attempt_codes
    assert len(server.messages) == 1  # sent exactly once


@pytest.mark.parametrize("point", ["writing-FAIL", "written-FAIL", "committed-FAIL"])
def test_crash_points_on_the_way_to_fail(tmp_path, smtp_server, point):
    server = smtp_server()
    server.add_rule(Rule(stage="RCPT", code=550, text="5.1.1 unknown"))
    kit = SpoolKit(tmp_path, server.port, [])
    kit.job("TOSEND", "J.FS", to="a@copia.com")
    assert start_with_crash(kit, point).wait(timeout=30) == -signal.SIGKILL
    assert kit.drain().returncode == 0
    assert kit.names("FAIL") == ["J.FS"] and leftovers(kit) == []
    assert var(kit.read("FAIL", "J.FS"), "EMAIL_ERROR") == "550 5.1.1 unknown"


@pytest.mark.parametrize("point,codes", [("writing-BACK", ["66", "0"]), ("written-BACK", ["66", "0"]), ("committed-BACK", ["451", "0"])])
def test_crash_in_the_middle_of_a_retry_write(tmp_path, smtp_server, point, codes):
    server = smtp_server()
    server.add_rule(Rule(stage="RCPT", code=451, text="4.3.0 later", times=1))
    kit = SpoolKit(tmp_path, server.port, ['$email_retry_delays * "1S"'])
    kit.job("TOSEND", "J.FS", to="a@copia.com")
    assert start_with_crash(kit, point).wait(timeout=30) == -signal.SIGKILL
    kit.drain_until(lambda: kit.names("SENT") == ["J.FS"], timeout=30)
    assert leftovers(kit) == []
    got = [a[2] for a in attempts(kit.read("SENT", "J.FS"))]
    # Written but not committed: the retry record is dropped with the result and
    # the attempt counts as interrupted; the next try meets a healthy server.
    assert got == codes
    assert len(server.messages) == 1


@pytest.mark.parametrize("point", ["writing-BACK", "written-BACK", "committed-BACK"])
def test_crash_in_the_middle_of_a_deferral_write(tmp_path, smtp_server, point):
    server = smtp_server()
    server.add_rule(Rule(stage="EOD", delay=0.5))
    kit = SpoolKit(tmp_path, server.port, ["$domain_limit * @copia.com 1"])
    kit.job("TOSEND", "A.FS", to="a@copia.com")
    kit.job("TOSEND", "B.FS", to="b@copia.com")
    assert start_with_crash(kit, point).wait(timeout=30) == -signal.SIGKILL
    assert kit.drain().returncode == 0
    assert kit.names("SENT") == ["A.FS", "B.FS"] and leftovers(kit) == []
    b = kit.read("SENT", "B.FS")
    if point == "committed-BACK":
        # Deferred once before the crash and once after it (A was back first).
        assert var(b, "DOMAINBUSY_COUNT") == "2" and [a[2] for a in attempts(b)] == ["0"]
    else:
        # The deferral was not committed: B comes back as interrupted instead.
        assert [a[2] for a in attempts(b)][-1] == "0"
    assert len({m.message_id for m in server.messages}) == 2


@pytest.mark.parametrize(
    "rule",
    [
        Rule(stage="CONNECT", hang=True),  # while connecting (no greeting yet)
        Rule(stage="RCPT", hang=True),  # after MAIL
        Rule(stage="DATA", hang=True),  # DATA sent, no 354 yet
        Rule(stage="EOD", hang=True),  # the message is out, no 250 yet: the window
    ],
    ids=["connecting", "after-MAIL", "at-DATA", "after-end-of-data"],
)
def test_sigkill_during_the_smtp_dialogue(tmp_path, smtp_server, rule):
    server = smtp_server()
    hang = server.add_rule(rule)
    kit = SpoolKit(tmp_path, server.port, [])
    kit.job("TOSEND", "J.FS", to="a@copia.com")
    proc = kit.start("N1")
    stage = {"CONNECT": None, "RCPT": "RCPT", "DATA": "DATA", "EOD": "DATA"}[rule.stage]
    wait_until(lambda: any(c.open and (stage is None or stage in " ".join(c.commands).upper()) for c in server.connections), timeout=15)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    server.remove_rule(hang)
    assert kit.drain().returncode == 0
    assert kit.names("SENT") == ["J.FS"] and leftovers(kit) == []
    # Killed while still connecting, its transaction had not started: it goes
    # back unchanged and the interruption does not count.
    expected = ["0"] if rule.stage == "CONNECT" else ["66", "0"]
    assert [a[2] for a in attempts(kit.read("SENT", "J.FS"))] == expected
    # A hung end of data never answered 250, so the server kept no copy: the
    # job is sent once, by the node that recovered it.
    assert len(server.messages) == 1


def test_no_temporary_file_survives_a_crash_loop(tmp_path, smtp_server):
    server = smtp_server()
    server.add_rule(Rule(stage="EOD", delay=0.05))
    kit = SpoolKit(tmp_path, server.port, ["$domain_limit * @ 2"])
    for i in range(30):
        kit.job(f"TOSEND{i % 3}" if i % 3 else "TOSEND", f"J{i:02d}.FS", to=f"u{i}@d{i % 4}.test")
    for point in ["claimed", "delivered", "written-SENT", "committed-SENT", "written-BACK", "committed-BACK"]:
        proc = start_with_crash(kit, point)
        proc.wait(timeout=30)
    assert kit.drain().returncode == 0
    assert kit.waiting() == [] and leftovers(kit) == []
    assert not [p for p in kit.root.rglob("*") if p.name.endswith((".tmp", ".TFS", ".SENT", ".FAIL", ".BACK"))]
    # Every job is done; one caught in flight by three of the six crashes is
    # moved to FAIL as interrupted three times (outcome 67), by design.
    failed = kit.names("FAIL")
    assert len(kit.names("SENT")) + len(failed) == 30
    assert all([a[2] for a in attempts(kit.read("FAIL", n))][-1] == "67" for n in failed)
    # Every job in SENT reached the server (a job caught in the window after its
    # 250 may have reached it before ending in FAIL as interrupted).
    received = {m.message_id for m in server.messages}
    assert len(kit.names("SENT")) <= len(received) <= 30
    assert os.listdir(kit.root / "TEMP") == []


def test_sigkill_while_the_message_text_is_being_sent(tmp_path, smtp_server):
    import os as _os

    server = smtp_server(size_limit=200 * 1024 * 1024)
    server.add_rule(Rule(stage="EOD", delay=5))  # should the text get through, no 250 comes back in time
    kit = SpoolKit(tmp_path, server.port, [])
    (kit.root / "files").mkdir()
    (kit.root / "files" / "big.bin").write_bytes(_os.urandom(1 << 20) * 30)
    kit.job("TOSEND", "J.FS", "$email_attach files/big.bin", to="a@copia.com")
    proc = kit.start("N1")
    wait_until(lambda: any(c.open and "DATA" in " ".join(c.commands).upper() for c in server.connections), timeout=30, interval=0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    server.clear_rules()
    assert kit.drain(timeout=120).returncode == 0
    assert kit.names("SENT") == ["J.FS"] and leftovers(kit) == []
    assert [a[2] for a in attempts(kit.read("SENT", "J.FS"))] == ["66", "0"]
    assert len(server.messages) == 1
