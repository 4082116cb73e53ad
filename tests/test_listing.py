"""Listing a spool's jobs (`copiamail list`, copiamail/spool/listing.py): the
folders, ages, states and last EMAIL_ERROR it shows, its filters, and the CLI's
lines, JSON and one-line errors."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from spoolkit import SpoolKit

from copiamail.spool.listing import folder_choice, list_jobs
from copiamail.spool.queue import Spool

NOW = 2_000_000_000.0


def _write(path: Path, *lines: str, age: float = 0.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    os.utime(path, (NOW - age, NOW - age))
    return path


@pytest.fixture
def spool(tmp_path) -> Spool:
    s = Spool(tmp_path / "spool", queues=3)
    s.ensure()
    root = s.root
    _write(root / "TOSEND" / "A.FS", "$email_address a@copia.com", age=30)
    _write(root / "TOSEND" / "B.FS", "$email_address b@Other.Test", "$var_def EMAIL_ERROR 451 4.3.0 try later",
           "$fax_next_date 01/01/2099", "$fax_next_time 00:00:00", age=7200)
    _write(root / "TOSEND3" / "C.FS", '$email_address "Doe, Jane" <jane@copia.com>', age=90)
    _write(root / "ACTIVE" / "N1" / "TOSEND" / "D.FS", "$email_address d@copia.com", age=1)
    _write(root / "ACTIVE" / "N1" / "TOSEND" / "E.FS.DELIVERED", "$email_address e@copia.com", age=1)
    _write(root / "SENT" / "F.FS", "$email_address f@copia.com", age=3 * 86400)
    _write(root / "FAIL" / "G.FS", "$email_address g@other.test",
           "$var_def EMAIL_ERROR 550 5.1.1 <g@other.test>: User unknown", age=600)
    return s


def _names(jobs) -> list[tuple[str, str]]:
    return [(j.folder, j.name) for j in jobs]


def test_by_default_the_queue_active_and_fail_are_listed_in_queue_order_and_sent_is_not(spool):
    assert _names(list_jobs(spool, NOW)) == [("TOSEND", "A.FS"), ("TOSEND", "B.FS"), ("TOSEND3", "C.FS"),
                                             ("ACTIVE/N1", "D.FS"), ("ACTIVE/N1", "E.FS"), ("FAIL", "G.FS")]


def test_each_job_shows_its_age_size_recipient_domain_state_and_last_error(spool):
    jobs = {j.name: j for j in list_jobs(spool, NOW, ["TOSEND", "ACTIVE", "SENT", "FAIL"])}
    assert jobs["A.FS"].age == pytest.approx(30) and jobs["A.FS"].state == "waiting (due)"
    assert jobs["A.FS"].size == len("$email_address a@copia.com\n") and jobs["A.FS"].error is None
    assert jobs["B.FS"].state.startswith("waiting (next try 01/01/2099")
    assert jobs["B.FS"].domain == "other.test" and jobs["B.FS"].error == "451 4.3.0 try later"
    assert jobs["C.FS"].recipient == 'Doe, Jane <jane@copia.com>' and jobs["C.FS"].domain == "copia.com"
    assert jobs["D.FS"].state == "in flight on node N1"
    assert jobs["E.FS"].state == "in flight on node N1 (delivered; its result is being written)"
    assert jobs["F.FS"].state == "delivered" and jobs["F.FS"].age == pytest.approx(3 * 86400)
    assert jobs["G.FS"].state == "failed" and jobs["G.FS"].error == "550 5.1.1 <g@other.test>: User unknown"


def test_a_sending_job_is_shown_delivered_once_its_result_file_marks_it_so(spool):
    active = spool.root / "ACTIVE" / "N1" / "TOSEND"
    _write(active / "H.FS.SENDING", "$email_address h@copia.com", age=1)
    assert {j.name: j.state for j in list_jobs(spool, NOW, ["ACTIVE"])}["H.FS"] == "in flight on node N1 (sending)"
    _write(active / "H.FS.SENT", "", age=0)
    jobs = [j for j in list_jobs(spool, NOW, ["ACTIVE"]) if j.name.startswith("H.")]
    assert [(j.name, j.state) for j in jobs] == [("H.FS", "in flight on node N1 (delivered; its result is being written)")]


def test_folders_domain_and_error_filter_the_listing(spool):
    assert _names(list_jobs(spool, NOW, ["TOSEND3"])) == [("TOSEND3", "C.FS")]
    assert _names(list_jobs(spool, NOW, ["SENT"])) == [("SENT", "F.FS")]
    assert [j.name for j in list_jobs(spool, NOW, domain="OTHER.test")] == ["B.FS", "G.FS"]
    assert [j.name for j in list_jobs(spool, NOW, error=re.compile(r"^5\d\d"))] == ["G.FS"]
    assert [j.name for j in list_jobs(spool, NOW, domain="copia.com", error=re.compile("."))] == []


def test_a_folder_is_named_in_any_case_and_nothing_else_is_a_folder():
    assert [folder_choice(f) for f in ("tosend", "ToSend12", "active", "Sent", "FAIL")] == \
        ["TOSEND", "TOSEND12", "ACTIVE", "SENT", "FAIL"]
    for bad in ("TEMP", "LIMITS", "TOSENDX", "../FAIL"):
        with pytest.raises(ValueError):
            folder_choice(bad)


def test_an_unreadable_job_is_listed_not_skipped(spool):
    path = spool.root / "TOSEND" / "H.FS"
    path.write_bytes(b'$email_address "unterminated\n\xff\xfe\x00binary')
    listed = {j.name: j for j in list_jobs(spool, NOW, ["TOSEND"])}
    assert "H.FS" in listed and listed["H.FS"].state == "waiting (due)"


# --- the CLI ------------------------------------------------------------------

def test_list_prints_a_line_per_job_with_its_error_below_and_a_count(tmp_path):
    kit = SpoolKit(tmp_path)
    kit.job("TOSEND", "A.FS", to="a@copia.com")
    kit.job("TOSEND2", "B.FS", "$var_def EMAIL_ERROR 421 4.7.0 too many connections", to="b@copia.com")
    result = kit.cli("list")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:2] == ["A.FS", "TOSEND"] and "a@copia.com  waiting (due)" in lines[0]
    assert lines[1].split()[:2] == ["B.FS", "TOSEND2"]
    assert lines[2].strip() == "421 4.7.0 too many connections"
    assert lines[-1] == "-- 2 job(s)"


def test_list_json_is_one_array_a_script_can_read(tmp_path):
    kit = SpoolKit(tmp_path)
    kit.job("TOSEND", "A.FS", "$var_def EMAIL_ERROR <script>x</script>", to="a@copia.com")
    result = kit.cli("list", "--json", "--domain", "copia.com")
    assert result.returncode == 0, result.stderr
    [job] = json.loads(result.stdout)
    assert job["name"] == "A.FS" and job["folder"] == "TOSEND" and job["domain"] == "copia.com"
    assert job["error"] == "<script>x</script>" and job["state"] == "waiting (due)"
    assert set(job) == {"name", "folder", "path", "age_seconds", "size", "recipient", "domain", "state", "error",
                        "held", "domainbusy_count"}
    assert job["held"] is False and job["domainbusy_count"] == 0


def test_a_held_job_lists_and_shows_as_held_with_its_deferral_count(tmp_path):
    kit = SpoolKit(tmp_path)
    kit.job("TOSEND", "A.FS", "$var_def DOMAINBUSY_COUNT 3", to="a@held.test")
    kit.job("TOSEND", "B.FS", to="b@copia.com")
    assert kit.cli("hold", "--domain", "held.test").returncode == 0
    a, b = json.loads(kit.cli("list", "--json").stdout)
    assert (a["held"], a["state"], a["domainbusy_count"]) == (True, "held, waiting (due)", 3)
    assert (b["held"], b["state"]) == (False, "waiting (due)")
    assert kit.cli("show", "spool/TOSEND/A.FS").stdout.startswith("job        held, waiting (due): ")
    assert kit.cli("show", "spool/TOSEND/B.FS").stdout.startswith("job        waiting (due): ")


@pytest.mark.parametrize("args, words", [
    (("--folder", "TEMP"), "--folder"),
    (("--error", "("), "--error"),
])
def test_list_refuses_a_bad_folder_or_pattern_in_one_line(tmp_path, args, words):
    kit = SpoolKit(tmp_path)
    result = kit.cli("list", *args)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("copiamail: ") and words in line
