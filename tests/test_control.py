"""Cancelling a waiting job, flushing and requeueing (copiamail/spool/control.py,
`copiamail cancel`, `flush`, `requeue`). For cancel:
outcome 68 in FAIL, taken by a rename so a node that claims the job first wins,
an interrupted cancel finished by the next one, and a cancel racing a running
node losing nothing and leaving nothing in two places."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from smtpserver import Rule
from spoolkit import SpoolKit, attempts, stop, var, wait_until

from copiamail.errors import SpoolError
from copiamail.spool.control import CANCEL_SUFFIX, cancel, finish_cancels, requeue
from copiamail.spool.queue import Spool


@pytest.fixture
def spool(tmp_path) -> Spool:
    s = Spool(tmp_path / "spool", queues=3)
    s.ensure()
    return s


def _job(spool: Spool, queue: str, name: str, to: str = "a@copia.com") -> os.PathLike[str]:
    path = spool.root / queue / name
    path.write_text(f"$email_address {to}\n$email_subject hello\n", encoding="utf-8")
    return path


def test_a_cancelled_job_goes_to_fail_with_outcome_68_and_its_lines_kept(spool):
    path = _job(spool, "TOSEND2", "A.FS")
    where = cancel(spool, path, 1_700_000_000.0)
    assert where == spool.root / "FAIL" / "A.FS" and not os.path.exists(path)
    text = where.read_text()
    assert text.startswith("$email_address a@copia.com\n$email_subject hello\n")
    [record] = attempts(text)
    assert record[1:4] == ["cancel", "68", "Z"]
    assert var(text, "EMAIL_ERROR") == "cancelled by the operator" and "$fax_status1 6" in text
    assert os.listdir(spool.root / "FAIL") == ["A.FS"]


def test_a_job_that_is_in_flight_finished_or_gone_is_not_cancelled(spool):
    active = spool.root / "ACTIVE" / "N1" / "TOSEND"
    active.mkdir(parents=True)
    (active / "B.FS").write_text("$email_address b@copia.com\n")
    (spool.root / "SENT" / "C.FS").write_text("$email_address c@copia.com\n")
    for path, why in ((active / "B.FS", "in flight on node N1"), (spool.root / "SENT" / "C.FS", "not waiting"),
                      (spool.root / "TOSEND" / "GONE.FS", "no longer waiting"), (spool.root / "TOSEND" / "x.txt", "not a job")):
        with pytest.raises(SpoolError, match=why):
            cancel(spool, path, 0.0)
    assert (active / "B.FS").exists() and (spool.root / "SENT" / "C.FS").exists()


def test_a_name_taken_in_fail_gives_the_cancelled_job_another(spool):
    (spool.root / "FAIL" / "A.FS").write_text("an older failure\n")
    where = cancel(spool, _job(spool, "TOSEND", "A.FS"), 0.0)
    assert where.name == "A~1.FS" and (spool.root / "FAIL" / "A.FS").read_text() == "an older failure\n"


def test_a_cancel_interrupted_after_the_take_is_finished_by_the_next(spool):
    path = _job(spool, "TOSEND", "A.FS")
    os.rename(path, spool.root / "FAIL" / f"A.FS{CANCEL_SUFFIX}")  # a crash right after step 1
    [where] = finish_cancels(spool, 0.0)
    assert where == spool.root / "FAIL" / "A.FS" and attempts(where.read_text())[0][2] == "68"
    assert os.listdir(spool.root / "FAIL") == ["A.FS"]
    assert finish_cancels(spool, 0.0) == []


def test_cancel_says_what_it_did_and_one_line_for_each_job_it_could_not(tmp_path):
    kit = SpoolKit(tmp_path)
    kit.job("TOSEND", "A.FS", to="a@copia.com")
    result = kit.cli("cancel", "spool/TOSEND/A.FS", "spool/TOSEND/B.FS")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stdout.startswith("cancelled: spool/TOSEND/A.FS -> ")
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("copiamail: ") and "B.FS: no longer waiting" in line
    assert kit.names("FAIL") == ["A.FS"]


@pytest.mark.timeout(120)
def test_cancels_racing_a_running_node_lose_nothing_and_leave_nothing_in_two_places(tmp_path, smtp_server):
    server = smtp_server()
    server.add_rule(Rule(stage="EOD", delay=0.25))  # about 8 a second: the cancels meet the node halfway
    kit = SpoolKit(tmp_path, server.port, ["$domain_limit * @ 2"])
    names = [f"J{i:03d}.FS" for i in range(120)]
    for name in names:
        kit.job("TOSEND", name, to=f"{name.lower()}@copia.com")
    proc = kit.start("N1")
    outcomes: dict[str, int] = {}

    def cancel_all() -> None:
        # From the end of the queue towards the node, one command each: the
        # first ones find their jobs waiting, the last ones race the node.
        for name in names[::-2]:
            outcomes[name] = kit.cli("cancel", f"spool/TOSEND/{name}").returncode

    try:
        wait_until(lambda: len(server.messages) >= 2, timeout=15)
        canceller = threading.Thread(target=cancel_all)
        canceller.start()
        canceller.join(90)
        wait_until(lambda: len(kit.names("SENT")) + len(kit.names("FAIL")) == 120, timeout=60)
    finally:
        code, _, err = stop(proc)
    assert code == 0, err
    sent, failed = set(kit.names("SENT")), set(kit.names("FAIL"))
    assert sent | failed == set(names) and not sent & failed  # every job once, in one place
    cancelled = {n for n, rc in outcomes.items() if rc == 0}
    assert cancelled == failed and cancelled  # what cancel said it cancelled is what is in FAIL
    for name in failed:
        assert attempts(kit.read("FAIL", name))[-1][2] == "68"
    assert sorted(m.rcpt_tos[0] for m in server.messages) == sorted(f"{n.lower()}@copia.com" for n in sent)
    assert not list((kit.root / "FAIL").glob("*.CANCEL")) and kit.active() == []


# --- flush ----------------------------------------------------------------------

LATER = ("$fax_next_date 01/01/2099", "$fax_next_time 00:00:00")


def _later_job(spool: Spool, queue: str, name: str, to: str) -> os.PathLike[str]:
    path = spool.root / queue / name
    path.write_text("\n".join((f"$email_address {to}", *LATER)) + "\n", encoding="utf-8")
    return path


def test_flush_makes_jobs_waiting_for_a_retry_time_due_now_and_leaves_the_rest(spool):
    from copiamail.jobfile.fsfile import CommandFile
    from copiamail.spool.control import flush_jobs
    from copiamail.spool.holds import Hold, add_hold
    from copiamail.spool.jobview import engine_lines, readable_commands

    a = _later_job(spool, "TOSEND", "A.FS", "a@copia.com")
    b = _later_job(spool, "TOSEND3", "B.FS", "b@other.test")
    c = _later_job(spool, "TOSEND", "C.FS", "c@held.test")
    due = _job(spool, "TOSEND", "D.FS")
    due_before, held_before = due.read_bytes(), c.read_bytes()
    add_hold(spool.root, Hold.domain("held.test"))
    now = time.time()
    assert flush_jobs(spool, now, domain="copia.com") == [a]
    assert sorted(p.name for p in flush_jobs(spool, now)) == ["B.FS"]
    for path in (a, b):
        text = path.read_text()
        assert text.startswith(f"$email_address {'a@copia.com' if path == a else 'b@other.test'}\n")
        assert engine_lines(readable_commands(CommandFile.read(path)))[2] <= now
    assert due.read_bytes() == due_before and c.read_bytes() == held_before  # already due; held
    assert not any(p.name.endswith(".FLUSH") for q in ("TOSEND", "TOSEND3") for p in (spool.root / q).iterdir())


def test_a_flush_interrupted_after_the_take_is_finished_by_the_next(spool):
    from copiamail.spool.control import FLUSH_SUFFIX, flush_jobs

    path = _later_job(spool, "TOSEND", "A.FS", "a@copia.com")
    os.rename(path, f"{path}{FLUSH_SUFFIX}")
    assert flush_jobs(spool, time.time()) == [path] and path.exists()
    assert os.listdir(spool.root / "TOSEND") == ["A.FS"]


@pytest.mark.timeout(60)
def test_flush_sends_a_running_nodes_jobs_that_waited_for_their_retry(tmp_path, smtp_server):
    server = smtp_server()
    kit = SpoolKit(tmp_path, server.port, ["$domain_limit * @ 2"])
    for i in range(5):
        kit.job("TOSEND", f"L{i}.FS", *LATER, to=f"l{i}@copia.com")
    kit.job("TOSEND", "N.FS", to="n@copia.com")
    proc = kit.start("N1")
    try:
        wait_until(lambda: kit.names("SENT") == ["N.FS"], timeout=15)
        time.sleep(0.5)
        assert len(server.messages) == 1  # the others wait for 2099
        result = kit.cli("flush")
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines()[-1] == "-- 5 job(s) made due"
        wait_until(lambda: len(kit.names("SENT")) == 6, timeout=15)
    finally:
        code, _, err = stop(proc)
    assert code == 0, err
    assert len(server.messages) == 6 and kit.names("FAIL") == [] and kit.names("TOSEND") == []


# --- requeue --------------------------------------------------------------------


def _failed_job(spool: Spool, name: str, queue: int, to: str = "a@copia.com", text: str = "550 no such user") -> Path:
    """A job as a node leaves it in FAIL: one attempt record naming its TOSEND queue, its error, $fax_status1 6."""
    from copiamail.jobfile import records
    from copiamail.jobfile.fsfile import CommandFile

    folder = "TOSEND" if queue == 0 else f"TOSEND{queue}"
    spool.ensure()
    path = _job(spool, folder, name, to)
    version = records.failed(CommandFile.read(path), "N1", 550, "Z", text, time.time(), records.Where(queue, 1))
    dest = spool.root / "FAIL" / name
    dest.write_bytes(version.to_bytes())
    os.unlink(path)
    return dest


def test_a_requeued_job_goes_back_to_the_folder_it_came_from_unchanged_with_a_fresh_retry_budget(spool):
    from copiamail.jobfile.fsfile import CommandFile
    from copiamail.jobfile.job import parse_job

    failed = _failed_job(spool, "A.FS", 2)
    before = failed.read_bytes()
    where = requeue(spool, failed)
    assert where == spool.root / "TOSEND2" / "A.FS" and not failed.exists()
    assert where.read_bytes() == before  # history kept: moved, not rewritten
    job = parse_job(CommandFile.read(where), "A.FS")
    assert len(job.attempts) == 1 and job.restarted and job.earlier_retries == []


def test_requeue_takes_a_free_name_and_refuses_what_is_not_a_failed_job_of_the_spool(spool):
    failed = _failed_job(spool, "A.FS", 0)
    (spool.root / "TOSEND" / "A.FS").write_text("$email_address other@copia.com\n")
    where = requeue(spool, failed)
    assert where.name == "A~1.FS" and (spool.root / "TOSEND" / "A.FS").read_text() == "$email_address other@copia.com\n"
    waiting = _job(spool, "TOSEND1", "W.FS")
    (spool.root / "FAIL" / "H.FS").write_text("$email_address h@copia.com\n$fax_status1 2\n")
    for path, why in ((waiting, "not in"), (spool.root / "FAIL" / "GONE.FS", "no longer in FAIL"),
                      (spool.root / "FAIL" / "H.FS", "last \\$fax_status1 is not 6")):
        with pytest.raises(SpoolError, match=why):
            requeue(spool, path)
    assert waiting.exists() and (spool.root / "FAIL" / "H.FS").exists()


def test_requeue_selects_by_domain_and_error_and_says_what_it_did(tmp_path):
    kit = SpoolKit(tmp_path)
    spool = Spool(kit.root, queues=3)
    _failed_job(spool, "A.FS", 1, "a@copia.com", "550 mailbox full")
    _failed_job(spool, "B.FS", 1, "b@other.test", "550 mailbox full")
    _failed_job(spool, "C.FS", 3, "c@copia.com", "554 spam")
    result = kit.cli("requeue")
    assert result.returncode == 2 and "name what to requeue" in result.stderr
    result = kit.cli("requeue", "--domain", "copia.com", "--error", "full")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"requeued: {kit.root / 'FAIL' / 'A.FS'} -> {kit.root / 'TOSEND1' / 'A.FS'}",
                                          "-- 1 job(s) requeued"]
    result = kit.cli("requeue", "--since", "1970-01-01")
    assert result.returncode == 0 and result.stdout.splitlines()[-1] == "-- 2 job(s) requeued"
    assert kit.names("FAIL") == [] and kit.names("TOSEND1") == ["A.FS", "B.FS"] and kit.names("TOSEND3") == ["C.FS"]
    result = kit.cli("requeue", "spool/FAIL/A.FS")
    assert result.returncode == 2 and "no longer in FAIL" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.timeout(120)
def test_requeues_racing_each_other_and_a_claiming_node_lose_nothing_and_leave_nothing_in_two_places(tmp_path, smtp_server):
    server = smtp_server()
    server.add_rule(Rule(stage="EOD", delay=0.1))
    kit = SpoolKit(tmp_path, server.port, ["$domain_limit * @ 2"])
    spool = Spool(kit.root, queues=3)
    failed = [f"F{i:03d}.FS" for i in range(60)]
    for name in failed:
        _failed_job(spool, name, 2, f"{name.lower()}@copia.com")
    fresh = [f"N{i:03d}.FS" for i in range(60)]
    for name in fresh:
        kit.job("TOSEND2", name, to=f"{name.lower()}@copia.com")
    proc = kit.start("N1")
    results: list[int] = []

    def requeue_all() -> None:
        results.append(kit.cli("requeue", "--since", "1970-01-01").returncode)

    def requeue_one_by_one() -> None:
        for name in failed[::3]:
            kit.cli("requeue", f"spool/FAIL/{name}")

    try:
        wait_until(lambda: len(server.messages) >= 2, timeout=15)  # the node is claiming from TOSEND2
        threads = [threading.Thread(target=requeue_all), threading.Thread(target=requeue_all),
                   threading.Thread(target=requeue_one_by_one)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        wait_until(lambda: len(kit.names("SENT")) == 120, timeout=60)
    finally:
        code, _, err = stop(proc)
    assert code == 0, err
    assert results == [0, 0]
    assert kit.names("SENT") == sorted(failed + fresh) and kit.names("FAIL") == [] and kit.active() == []
    assert sorted(m.rcpt_tos[0] for m in server.messages) == sorted(f"{n.lower()}@copia.com" for n in failed + fresh)
    for name in failed:  # its history kept: the failure, then the delivery
        assert [a[2] for a in attempts(kit.read("SENT", name))] == ["550", "0"]
