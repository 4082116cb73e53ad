"""copiamail.recovery: a node's interrupted jobs go back to their folders (SPEC 1)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from copiamail.jobfile import outcome
from copiamail.jobfile.fsfile import CommandFile
from copiamail.jobfile.job import parse_job
from copiamail.jobfile.records import local_stamp
from copiamail.spool.queue import Spool
from copiamail.spool.recovery import RecoveryReport, recover

NOW = time.mktime((2026, 11, 21, 14, 3, 7, 0, 0, -1))
JOB = (
    b"; customer 4711\r\n"
    b"$email_address jane@example.com\r\n"
    b'$email_subject "Hi ""you"""\r\n'
    b"$var_def CUSTOMER 4711\r\n"
)


def make_spool(tmp_path: Path) -> Spool:
    sp = Spool(tmp_path / "spool", queues=15, fsync=False)
    sp.ensure()
    return sp


def crash_with(sp: Spool, queue: str, name: str, data: bytes, node: str = "N1", sending: bool = True) -> Path:
    """A job ``node`` was sending (state 2a; with ``sending`` False, only
    claimed: state 2) when it died."""
    d = sp.active_dir(node) / queue
    d.mkdir(parents=True, exist_ok=True)
    path = d / (f"{name}.SENDING" if sending else name)
    path.write_bytes(data)
    return path


def active_files(sp: Spool) -> list[Path]:
    return [p for p in (sp.root / "ACTIVE").rglob("*") if p.is_file()]


def record_line(node: str, code: int, klass: str, text: str, now: float = NOW, queue: int = 0) -> bytes:
    """An attempt record in CopiaFacts' field order, as the engine writes it."""
    date, clock = local_stamp(now)
    return f'$attempt_record {date} {clock} 0 0 0 {code} {klass} 0 {queue} 0 E1 0 - - "{text}" {node}'.encode()


def test_recover_adds_an_outcome_66_attempt_record_and_returns_the_job_to_its_own_folder(tmp_path):
    sp = make_spool(tmp_path)
    crash_with(sp, "TOSEND5", "X.FS", JOB)
    report = recover(sp, "N1", now=NOW)
    assert report == RecoveryReport(returned=("X.FS",), failed=())
    back = sp.folder("TOSEND5") / "X.FS"
    data = back.read_bytes()
    assert data == JOB + record_line("N1", 66, "Z", "attempt interrupted", queue=5) + b"\r\n"
    assert b" 0 0 0 66 Z 0 5 " in data
    assert active_files(sp) == []
    for folder in ("TOSEND", "SENT", "FAIL"):
        assert os.listdir(sp.folder(folder)) == []


def test_an_interruption_is_not_counted_as_a_retry(tmp_path):
    sp = make_spool(tmp_path)
    crash_with(sp, "TOSEND", "X.FS", JOB)
    recover(sp, "N1", now=NOW)
    job = parse_job(CommandFile.read(sp.folder("TOSEND") / "X.FS"), "X.FS")
    [rec] = job.attempts
    assert rec.outcome == outcome.INTERRUPTED.code
    assert not rec.counts_as_retry
    assert job.interruptions == 1
    assert [a.klass for a in job.attempts if a.counts_as_retry] == []
    # the job is due again at once: no next time, no status, no EMAIL_ERROR
    assert job.next_attempt is None
    assert b"$fax_status" not in (sp.folder("TOSEND") / "X.FS").read_bytes()
    assert b"EMAIL_ERROR" not in (sp.folder("TOSEND") / "X.FS").read_bytes()


def test_the_rest_of_the_file_is_byte_identical_except_the_appended_lines(tmp_path):
    sp = make_spool(tmp_path)
    data = "\ufeff".encode() + b"  ; indented comment\n\n$EMAIL_ADDRESS  a@b.example\t; trailing\n$var_def X \"a \"\"b\"\"\"\n"
    crash_with(sp, "TOSEND2", "X.FS", data)
    recover(sp, "N1", now=NOW)
    out = (sp.folder("TOSEND2") / "X.FS").read_bytes()
    assert out.startswith(data)
    appended = out[len(data):]
    assert appended.count(b"\n") == 1
    assert appended.startswith(b"$attempt_record ")


def test_the_second_interruption_still_returns_the_job(tmp_path):
    sp = make_spool(tmp_path)
    crash_with(sp, "TOSEND1", "X.FS", JOB)
    recover(sp, "N1", now=NOW)
    once = (sp.folder("TOSEND1") / "X.FS").read_bytes()
    os.rename(sp.folder("TOSEND1") / "X.FS", crash_with(sp, "TOSEND1", "X.FS", b""))
    report = recover(sp, "N1", now=NOW + 60)
    assert report.returned == ("X.FS",) and report.failed == ()
    twice = (sp.folder("TOSEND1") / "X.FS").read_bytes()
    assert twice.startswith(once)
    assert twice.count(b" 66 Z ") == 2


def test_the_third_interruption_sends_the_job_to_fail_with_outcome_67_and_email_error(tmp_path):
    sp = make_spool(tmp_path)
    data = JOB + record_line("N1", 66, "Z", "attempt interrupted") + b"\r\n"
    data += record_line("N2", 421, "E", "421 busy") + b"\r\n"
    data += record_line("N1", 66, "Z", "attempt interrupted") + b"\r\n"
    crash_with(sp, "TOSEND3", "X.FS", data)
    report = recover(sp, "N1", now=NOW)
    assert report == RecoveryReport(returned=(), failed=("X.FS",))
    assert os.listdir(sp.folder("TOSEND3")) == []
    out = (sp.folder("FAIL") / "X.FS").read_bytes()
    assert out.startswith(data)
    lines = out[len(data):].split(b"\r\n")
    assert lines[-1] == b""
    assert lines[0] == record_line("N1", 66, "Z", "attempt interrupted", queue=3)
    assert lines[1].startswith(b"$attempt_record ") and b" 0 0 0 67 Z 0 3 " in lines[1] and lines[1].endswith(b" N1")
    assert b'$var_def EMAIL_ERROR "interrupted 3 times"' in lines
    assert b"$fax_status1 6" in lines
    assert b"$fax_status2 67" in lines
    job = parse_job(CommandFile.read(sp.folder("FAIL") / "X.FS"), "X.FS")
    assert job.interruptions == 3
    assert active_files(sp) == []


def test_a_job_only_claimed_goes_back_unchanged_and_never_counts(tmp_path):
    sp = make_spool(tmp_path)
    crash_with(sp, "TOSEND3", "X.FS", JOB, sending=False)
    for i in range(5):  # a node that keeps dying while this job waits for its turn
        assert recover(sp, "N1", now=NOW + i) == RecoveryReport(handed_back=("X.FS",))
        assert (sp.folder("TOSEND3") / "X.FS").read_bytes() == JOB
        os.rename(sp.folder("TOSEND3") / "X.FS", crash_with(sp, "TOSEND3", "X.FS", b"", sending=False))
    assert os.listdir(sp.folder("FAIL")) == []


def test_three_crashes_in_a_row_end_in_fail(tmp_path):
    sp = make_spool(tmp_path)
    crash_with(sp, "TOSEND", "X.FS", JOB)
    for i in range(2):
        assert recover(sp, "N1", now=NOW + i).returned == ("X.FS",)
        os.rename(sp.folder("TOSEND") / "X.FS", crash_with(sp, "TOSEND", "X.FS", b""))
    assert recover(sp, "N1", now=NOW + 2).failed == ("X.FS",)
    assert (sp.folder("FAIL") / "X.FS").exists()


def test_committed_results_are_finished_not_recovered_as_interrupted(tmp_path):
    sp = make_spool(tmp_path)
    d = sp.active_dir("N1") / "TOSEND2"
    d.mkdir(parents=True)
    (d / "S.FS.SENT").write_bytes(b"sent version\n")
    (d / "F.FS.FAIL").write_bytes(b"failed version\n")
    (d / "B.FS.BACK").write_bytes(b"back version\n")
    (d / "U.FS.SENDING").write_bytes(JOB)
    (d / "U.FS.BACK").write_bytes(b"uncommitted\n")
    report = recover(sp, "N1", now=NOW)
    assert report == RecoveryReport(returned=("U.FS",), failed=())
    assert (sp.folder("SENT") / "S.FS").read_bytes() == b"sent version\n"
    assert (sp.folder("FAIL") / "F.FS").read_bytes() == b"failed version\n"
    assert (sp.folder("TOSEND2") / "B.FS").read_bytes() == b"back version\n"
    u = (sp.folder("TOSEND2") / "U.FS").read_bytes()
    assert u.startswith(JOB) and b" 66 " in u
    assert sorted(os.listdir(sp.folder("SENT"))) == ["S.FS"]
    assert active_files(sp) == []


def test_a_binary_junk_job_in_active_is_recovered_without_exception(tmp_path):
    sp = make_spool(tmp_path)
    junk = bytes(range(256)) * 3 + b"\x00\xff\xfe"
    crash_with(sp, "TOSEND4", "JUNK.FS", junk)
    report = recover(sp, "N1", now=NOW)
    assert report.returned == ("JUNK.FS",)
    out = (sp.folder("TOSEND4") / "JUNK.FS").read_bytes()
    assert out.startswith(junk)
    assert b"$attempt_record " in out[len(junk):]
    assert active_files(sp) == []


def test_recover_leaves_other_nodes_jobs_alone(tmp_path):
    sp = make_spool(tmp_path)
    theirs = crash_with(sp, "TOSEND", "Y.FS", JOB, node="N2")
    crash_with(sp, "TOSEND", "X.FS", JOB, node="N1")
    assert recover(sp, "N1", now=NOW).returned == ("X.FS",)
    assert theirs.read_bytes() == JOB
    assert os.listdir(sp.folder("TOSEND")) == ["X.FS"]


def test_recover_with_nothing_to_do_returns_an_empty_report(tmp_path):
    sp = make_spool(tmp_path)
    assert recover(sp, "N1", now=NOW) == RecoveryReport()


def test_a_recovered_job_never_replaces_a_job_that_took_its_name(tmp_path):
    sp = make_spool(tmp_path)
    crash_with(sp, "TOSEND", "X.FS", JOB)
    (sp.folder("TOSEND") / "X.FS").write_bytes(b"another job\n")
    recover(sp, "N1", now=NOW)
    assert (sp.folder("TOSEND") / "X.FS").read_bytes() == b"another job\n"
    assert (sp.folder("TOSEND") / "X~1.FS").read_bytes().startswith(JOB)


def test_a_job_the_server_accepted_before_a_crash_is_finished_to_sent_not_sent_again(tmp_path):
    from copiamail.spool.queue import Spool
    from copiamail.spool.recovery import recover

    sp = Spool(tmp_path)
    sp.ensure()
    d = tmp_path / "ACTIVE" / "N1" / "TOSEND2"
    d.mkdir(parents=True)
    (d / "J.FS.DELIVERED").write_text("$email_address a@b.test\n")
    report = recover(sp, "N1")
    assert report.sent == ("J.FS",) and report.returned == ()
    text = (tmp_path / "SENT" / "J.FS").read_text()
    assert " 0 0 0 0 S 0 2 0 E1 0 " in text and text.split("\n")[1].endswith(" N1") and "$fax_status1 6" in text and "$fax_status2 0" in text
    assert not (tmp_path / "TOSEND2" / "J.FS").exists()


@pytest.mark.parametrize("mark", [b"", b"half a resu", b"junk \x00\xff left in a spare\n"])
def test_a_sending_job_with_its_sent_result_beside_it_was_delivered_whatever_the_result_holds(tmp_path, mark):
    # The result file beside a sending job is its delivered mark, named
    # before its data is written and synced: the job is finished from its own
    # copy, never from the mark, and never sent again.
    sp = make_spool(tmp_path)
    d = sp.active_dir("N1") / "TOSEND2"
    d.mkdir(parents=True)
    (d / "J.FS.SENDING").write_bytes(JOB)
    (d / "J.FS.SENT").write_bytes(mark)
    report = recover(sp, "N1", now=NOW)
    assert report == RecoveryReport(sent=("J.FS",))
    text = (sp.folder("SENT") / "J.FS").read_bytes()
    assert text.startswith(JOB) and b"$fax_status2 0" in text and (not mark or mark not in text)
    assert os.listdir(sp.folder("TOSEND2")) == [] and active_files(sp) == []
