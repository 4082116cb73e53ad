"""Holds (copiamail/spool/holds.py, `copiamail hold` and `release`): what a hold
names, how a node sees one, and that a held domain's jobs stay untouched while a
running node goes on with the others."""

from __future__ import annotations

import os
import time

import pytest
from smtpserver import Rule
from spoolkit import SpoolKit, stop, wait_until

from copiamail.spool.holds import Hold, Holds, add_hold, holds_in, remove_hold


def test_a_hold_names_a_domain_a_queue_or_a_job_in_any_case(tmp_path):
    holds = Holds(tmp_path)
    assert not holds.held("TOSEND", "A.FS", "a.test")
    assert add_hold(tmp_path, Hold.domain("A.Test")) and not add_hold(tmp_path, Hold.domain("a.test"))
    add_hold(tmp_path, Hold.queue(3))
    add_hold(tmp_path, Hold.job("x.fs"))
    assert holds_in(tmp_path) == {Hold.domain("a.test"), Hold.queue(3), Hold.job("X.FS")}
    assert holds.held("TOSEND", "A.FS", "A.TEST")
    assert holds.held("tosend3", "B.FS", "b.test") and not holds.held("TOSEND2", "B.FS", "b.test")
    assert holds.held("TOSEND", "X.FS", "b.test") and not holds.held("TOSEND", "Y.FS", "b.test")
    assert remove_hold(tmp_path, Hold.domain("a.test")) and not remove_hold(tmp_path, Hold.domain("a.test"))
    assert not holds.held("TOSEND", "A.FS", "a.test")


def test_a_node_sees_a_hold_made_within_the_same_tick_of_the_clock(tmp_path):
    holds = Holds(tmp_path)
    (tmp_path / "HOLD").mkdir()
    assert not holds.held("TOSEND", "A.FS", "a.test")
    add_hold(tmp_path, Hold.domain("a.test"))
    time.sleep(1.05)  # the folder is read again at least every second, whatever its time says
    assert holds.held("TOSEND", "A.FS", "a.test")


def test_hold_and_release_say_what_they_did_and_refuse_nonsense_in_one_line(tmp_path):
    kit = SpoolKit(tmp_path)
    result = kit.cli("hold", "--domain", "a.test", "--queue", "0", "spool/TOSEND/00000001.FS")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["held: domain a.test", "held: queue TOSEND", "held: job 00000001.FS"]
    assert "domain a.test" in kit.cli("status", "--json").stdout
    assert kit.cli("hold", "--domain", "A.TEST").stdout.strip() == "already held: domain a.test"
    result = kit.cli("release", "--domain", "a.test", "--queue", "0", "00000001.FS", "--domain", "b.test")
    assert result.stdout.splitlines() == ["released: domain a.test", "not held: domain b.test",
                                          "released: queue TOSEND", "released: job 00000001.FS"]
    for args in (("hold",), ("hold", "--domain", "a/b"), ("release", "notes.txt"), ("hold", "--queue", "100")):
        bad = kit.cli(*args)
        assert bad.returncode == 2 and "Traceback" not in bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1 and bad.stderr.startswith("copiamail: ")


@pytest.mark.timeout(120)
def test_a_held_domain_stops_within_two_seconds_its_jobs_untouched_and_the_others_go_on(tmp_path, smtp_server):
    server = smtp_server()
    server.add_rule(Rule(stage="EOD", delay=0.4))
    kit = SpoolKit(tmp_path, server.port, ["$domain_limit * @ 1"])
    for i in range(8):
        kit.job("TOSEND", f"A{i}.FS", to=f"u{i}@a.test")
        kit.job("TOSEND", f"B{i}.FS", to=f"v{i}@b.test")

    def sent_to(domain: str) -> int:
        return sum(1 for m in server.messages if m.rcpt_tos[0].endswith("@" + domain))

    proc = kit.start("N1")
    try:
        wait_until(lambda: sent_to("a.test") >= 1, timeout=15)
        assert kit.cli("hold", "--domain", "a.test").returncode == 0
        time.sleep(2.0)  # a hold reaches the node within 2 s; the send it had started ends
        held = {p.name: p.read_bytes() for p in (kit.root / "TOSEND").iterdir() if p.name.startswith("A")}
        a_sent, b_sent = sent_to("a.test"), sent_to("b.test")
        assert a_sent < 8 and held
        time.sleep(3.0)
        assert sent_to("a.test") == a_sent  # nothing more to the held domain
        assert {p.name: p.read_bytes() for p in (kit.root / "TOSEND").iterdir()
                if p.name.startswith("A")} == held  # its jobs untouched: not claimed, not rewritten
        assert sent_to("b.test") > b_sent  # the other domain went on
        assert kit.cli("release", "--domain", "a.test").returncode == 0
        wait_until(lambda: len(kit.names("SENT")) == 16, timeout=30)
    finally:
        code, _, err = stop(proc)
    assert code == 0, err
    assert kit.names("FAIL") == [] and len(server.messages) == 16  # each sent once


def test_a_node_looks_at_the_hold_folder_at_most_every_look_every_seconds(tmp_path):
    holds = Holds(tmp_path, look_every=0.2)
    (tmp_path / "HOLD").mkdir()
    assert not holds.held("TOSEND", "A.FS", "a.test")
    add_hold(tmp_path, Hold.domain("a.test"))
    assert not holds.held("TOSEND", "A.FS", "a.test")  # within look_every of the last look
    time.sleep(0.25)
    os.utime(tmp_path / "HOLD", ns=(0, 1))  # a time of its own, whatever the clock's tick
    assert holds.held("TOSEND", "A.FS", "a.test")
