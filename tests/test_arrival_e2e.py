"""How jobs arrive (SPEC 1): renamed in, or written in place by an
application that gets the protocol wrong; and a job is judged by the file it
claimed, not by what the node remembers of it."""

from __future__ import annotations

import os
import time

import pytest
from smtpserver import Rule
from spoolkit import SpoolKit, stop, var, wait_until

PIECES = [
    "$email_address slow@example.com\n",
    '$email_subject "Written in three pieces"\n',
    '$email_text "first line of the body"\n$email_text "last line of the body"\n',
]


@pytest.fixture
def server(smtp_server):
    return smtp_server()


def write_in_pieces(path, pause: float) -> None:
    """Write PIECES into ``path`` in place through one open file, ``pause``
    seconds apart, each flushed: an application that writes a job slowly."""
    with open(path, "w", encoding="utf-8") as f:
        for i, piece in enumerate(PIECES):
            if i:
                time.sleep(pause)
            f.write(piece)
            f.flush()


def running_node(kit: SpoolKit):
    proc = kit.start("N1")
    active = kit.root / "ACTIVE"
    try:
        wait_until(lambda: active.is_dir() and any(p.name.startswith("N1.alive") for p in active.iterdir()), timeout=15)
    except BaseException:
        stop(proc)
        raise
    time.sleep(0.5)  # its watcher is up
    return proc


@pytest.mark.parametrize("keep_open, yaml", [(False, ""), (True, ""), (False, "workers: 2\n")],
                         ids=["reopened-for-each-piece", "kept-open", "two-workers"])
def test_a_job_written_in_place_in_pieces_is_sent_whole_and_keeps_every_line(tmp_path, server, keep_open, yaml):
    kit = SpoolKit(tmp_path, server.port, yaml=yaml)
    proc = running_node(kit)
    path = kit.root / "TOSEND" / "SLOW.FS"
    try:
        if keep_open:
            write_in_pieces(path, 2)
        else:
            for i, piece in enumerate(PIECES):
                if i:
                    time.sleep(2)
                with open(path, "a", encoding="utf-8") as f:
                    f.write(piece)
        wait_until(lambda: kit.names("SENT") == ["SLOW.FS"], timeout=30)
    finally:
        code, _, err = stop(proc)
    assert code == 0, err
    [msg] = server.messages
    text = msg.data.decode()
    assert "Subject: Written in three pieces" in text
    assert "first line of the body" in text and "last line of the body" in text
    sent = kit.read("SENT", "SLOW.FS")
    for piece in PIECES:
        assert piece in sent
    assert kit.waiting() == [] and kit.names("FAIL") == []


def test_a_job_renamed_in_is_not_held_back_by_the_settle_time(tmp_path, server):
    kit = SpoolKit(tmp_path, server.port, yaml="write_settle: 120\n")
    proc = running_node(kit)
    try:
        tfs = kit.root / "TOSEND" / "QUICK.TFS"
        tfs.write_text("$email_address quick@example.com\n$email_subject hi\n", encoding="utf-8")
        os.rename(tfs, kit.root / "TOSEND" / "QUICK.FS")
        wait_until(lambda: kit.names("SENT") == ["QUICK.FS"], timeout=30)
    finally:
        code, _, err = stop(proc)
    assert code == 0, err


def test_a_waiting_job_replaced_by_one_due_later_is_not_sent(tmp_path, server):
    server.add_rule(Rule(stage="EOD", delay=3))
    kit = SpoolKit(tmp_path, server.port, ["$domain_limit * @example.com 1"])
    kit.job("TOSEND", "A.FS", to="a@example.com")
    kit.job("TOSEND", "B.FS", to="b@example.com")
    proc = kit.start("N1")
    try:
        wait_until(lambda: var(kit.read("TOSEND", "B.FS"), "DOMAINBUSY_COUNT") == "1"
                   if kit.names("TOSEND") == ["B.FS"] else False, timeout=15)
        # The submitter replaces the waiting job, by rename as the protocol asks,
        # with a version due in 2099.
        replacement = kit.root / "TOSEND" / "B.TFS"
        replacement.write_text("$email_address b@example.com\n$email_subject later\n"
                               "$fax_next_date 01/01/2099\n$fax_next_time 00:00:00\n", encoding="utf-8")
        os.rename(replacement, kit.root / "TOSEND" / "B.FS")
        wait_until(lambda: kit.names("SENT") == ["A.FS"], timeout=20)
        time.sleep(1.5)  # the slot A freed has been offered
    finally:
        code, _, err = stop(proc)
    assert code == 0, err
    assert [m.rcpt_tos for m in server.messages] == [["a@example.com"]]
    assert kit.names("TOSEND") == ["B.FS"]
    assert "$fax_next_date 01/01/2099" in kit.read("TOSEND", "B.FS")


@pytest.mark.parametrize("yaml", ["", "workers: 2\n"], ids=["one-worker", "two-workers"])
def test_jobs_renamed_in_while_the_node_starts_wait_neither_for_a_scan_nor_the_settle_time(tmp_path, server, yaml):
    # A batch written beforehand and released as the node starts: some jobs
    # come after its first scan and before its watcher is up. No event tells
    # of them, and the next full scan is two minutes away (and would then
    # hold each for write_settle, as a file perhaps still being written). The
    # watcher lists them once it watches.
    kit = SpoolKit(tmp_path, server.port, yaml="write_settle: 120\n" + yaml)
    kit.config_path.write_text(kit.config_path.read_text().replace("scan_interval: 0.3", "scan_interval: 120"))
    names = [f"S{i:02d}.FS" for i in range(30)]
    staged = [kit.job("TOSEND", name.replace(".FS", ".TFS"), to=f"s{i}@example.com") for i, name in enumerate(names)]
    time.sleep(0.1)  # written before the node starts
    proc = kit.start("N1")
    try:
        for tfs, name in zip(staged, names, strict=True):  # one every 40 ms through the node's first second or so
            tfs.rename(tfs.with_name(name))
            time.sleep(0.04)
        wait_until(lambda: kit.names("SENT") == names, timeout=30)
    finally:
        code, _, err = stop(proc)
    assert code == 0, err
    assert kit.waiting() == [] and kit.names("FAIL") == []


def test_a_job_written_in_place_while_the_node_starts_is_not_taken_half_written(tmp_path, server):
    # Its writing begins after the first scan, before the watcher is up: the
    # watcher's listing must not call it complete.
    kit = SpoolKit(tmp_path, server.port, yaml="write_settle: 3\n")
    kit.config_path.write_text(kit.config_path.read_text().replace("scan_interval: 0.3", "scan_interval: 120"))
    kit.job("TOSEND", "D.FS", to="d@example.com")
    proc = kit.start("N1")
    path = kit.root / "TOSEND" / "SLOW.FS"
    try:
        wait_until(lambda: "D.FS" not in kit.names("TOSEND"), timeout=15)  # the first scan has run
        write_in_pieces(path, 1.5)
        wait_until(lambda: kit.names("SENT") == ["D.FS", "SLOW.FS"], timeout=30)
    finally:
        code, _, err = stop(proc)
    assert code == 0, err
    assert kit.names("FAIL") == []
    sent = kit.read("SENT", "SLOW.FS")
    for piece in PIECES:
        assert piece in sent
