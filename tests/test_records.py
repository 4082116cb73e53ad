"""copiamail.records: the lines the engine writes into a job (SPEC 2)."""

from __future__ import annotations

import re
import time

import pytest

from copiamail.jobfile import records
from copiamail.jobfile.fsfile import CommandFile
from copiamail.jobfile.job import parse_job

# SPEC 2, "An example".
EXAMPLE = b'''; monthly statement, customer 4711
$email_address jane.doe@example.com
$email_esender statements@acme.test
$email_from "Acme Billing <billing@acme.test>"
$email_subject "Your statement for ""November"""
$email_text "Dear Jane,"
$email_body statements/4711.txt
$email_attach statements/4711.pdf application/pdf
$var_def CUSTOMER 4711
'''

# 11/21/2026 14:03:07 in the node's local time.
NOW = time.mktime((2026, 11, 21, 14, 3, 7, 0, 0, -1))
REPLY_550 = "550 5.1.1 <jane.doe@example.com>: User unknown"
# CopiaFacts' field order: DATE TIME TYPE SKIPPED SCHED OUTCOME CLASS SENT TOSEND FLAGS BOARDLINE BAUD CALL
# CONNECT ANSWERBACK, then the node.
RECORD = re.compile(rb'^\$attempt_record \d\d/\d\d/\d{4} \d\d:\d\d:\d\d 0 0 0 \d+ [A-Z] 0 \d+ 0 E\d+ 0 \S+ \S+ ".*" \S+$')


def cf(data: bytes = EXAMPLE) -> CommandFile:
    return CommandFile.parse(data)


def added(before: bytes, after: CommandFile) -> list[bytes]:
    out = after.to_bytes()
    assert out.startswith(before), "every line of the job is kept, in order"
    return out[len(before):].splitlines()


def busy(c: CommandFile) -> int:
    v = c.var("DOMAINBUSY_COUNT")
    return int(v) if v is not None else 0


# --- deferred ------------------------------------------------------------------


def test_local_stamp_is_mm_dd_yyyy_and_hh_mm_ss_in_local_time():
    assert records.local_stamp(NOW) == ("11/21/2026", "14:03:07")


def test_deferred_adds_domainbusy_count_1_when_missing_and_nothing_else():
    out = records.deferred(cf(), busy(cf()))
    assert added(EXAMPLE, out) == [b"$var_def DOMAINBUSY_COUNT 1"]


def test_deferred_increments_domainbusy_count_in_place_and_touches_nothing_else():
    before = EXAMPLE.replace(b"$var_def CUSTOMER", b"$var_def DOMAINBUSY_COUNT 4\n$var_def CUSTOMER")
    c = cf(before)
    out = records.deferred(c, busy(c)).to_bytes()
    assert out == before.replace(b"DOMAINBUSY_COUNT 4", b"DOMAINBUSY_COUNT 5")


def test_repeated_deferrals_keep_one_domainbusy_line():
    c = cf()
    for _ in range(3):
        c = records.deferred(c, busy(c))
    assert added(EXAMPLE, c) == [b"$var_def DOMAINBUSY_COUNT 3"]
    assert parse_job(c, "X.FS").domainbusy_count == 3


def test_deferred_writes_no_attempt_record_status_or_next_time():
    out = records.deferred(cf(), 0).to_bytes()
    for word in (b"attempt_record", b"fax_status", b"fax_next", b"EMAIL_ERROR"):
        assert word not in out


def test_deferred_keeps_crlf_line_endings():
    before = EXAMPLE.replace(b"\n", b"\r\n")
    out = records.deferred(cf(before), 0).to_bytes()
    assert out == before + b"$var_def DOMAINBUSY_COUNT 1\r\n"


# --- failed --------------------------------------------------------------------


def test_the_spec_example_after_one_deferral_and_a_rejected_attempt():
    c = records.deferred(cf(), 0)
    c = records.failed(c, "N1", 550, "B", REPLY_550, NOW)
    assert c.to_bytes() == EXAMPLE + (
        b"$var_def DOMAINBUSY_COUNT 1\n"
        b'$attempt_record 11/21/2026 14:03:07 0 0 0 550 B 0 0 0 E1 0 - - "550 5.1.1 <jane.doe@example.com>: User unknown" N1\n'
        b'$var_def EMAIL_ERROR "550 5.1.1 <jane.doe@example.com>: User unknown"\n'
        b"$fax_status1 6\n"
        b"$fax_status2 550\n"
    )


def test_failed_with_an_engine_code_writes_class_z_and_the_code_as_status2():
    out = records.failed(cf(), "N2", 61, "Z", "statements/4711.pdf: no such file", NOW)
    lines = added(EXAMPLE, out)
    assert lines == [
        b'$attempt_record 11/21/2026 14:03:07 0 0 0 61 Z 0 0 0 E1 0 - - "statements/4711.pdf: no such file" N2',
        b'$var_def EMAIL_ERROR "statements/4711.pdf: no such file"',
        b"$fax_status1 6",
        b"$fax_status2 61",
    ]
    assert RECORD.match(lines[0])


def test_a_quote_in_the_error_text_is_doubled():
    out = records.failed(cf(), "N1", 550, "B", 'no "such" user', NOW)
    assert b'$var_def EMAIL_ERROR "no ""such"" user"' in out.to_bytes()
    assert out.var("EMAIL_ERROR") == 'no "such" user'


# --- delivered -----------------------------------------------------------------


def test_delivered_writes_attempt_record_0_s_connect_ip_bytecount_and_status_6_0():
    out = records.delivered(cf(), "N1", "250 2.0.0 Ok: queued as 4711", "192.0.2.7", 1234, NOW)
    lines = added(EXAMPLE, out)
    assert lines == [
        b'$attempt_record 11/21/2026 14:03:07 0 0 0 0 S 0 0 0 E1 0 - - "250 2.0.0 Ok: queued as 4711" N1',
        b"$var_def EMAIL_CONNECT_IP 192.0.2.7",
        b"$var_def EMAIL_BYTECOUNT 1234",
        b"$fax_status1 6",
        b"$fax_status2 0",
    ]
    assert RECORD.match(lines[0])


def test_delivered_after_retries_updates_status_in_place_and_keeps_the_old_records():
    c = records.retry(cf(), "N1", 421, "E", "421 busy", NOW, NOW + 300)
    c = records.delivered(c, "N1", "250 ok", "::1", 99, NOW + 400)
    out = c.to_bytes()
    assert out.count(b"$attempt_record") == 2
    assert out.count(b"$fax_status1") == 1 and b"$fax_status1 6\n" in out
    assert out.count(b"$fax_status2") == 1 and b"$fax_status2 0\n" in out
    # the earlier error stays (SPEC 2 only says it is written after a failure)
    assert c.var("EMAIL_ERROR") == "421 busy"


# --- retry ---------------------------------------------------------------------


def test_retry_writes_record_error_status_2_and_next_date_time():
    out = records.retry(cf(), "N1", 421, "E", "421 4.7.0 try later", NOW, NOW + 300)
    assert added(EXAMPLE, out) == [
        b'$attempt_record 11/21/2026 14:03:07 0 0 0 421 E 0 0 0 E1 0 - - "421 4.7.0 try later" N1',
        b'$var_def EMAIL_ERROR "421 4.7.0 try later"',
        b"$fax_status1 2",
        b"$fax_status2 421",
        b"$fax_next_date 11/21/2026",
        b"$fax_next_time 14:08:07",
    ]


@pytest.mark.parametrize(
    "offset,expected",
    [(0.0, "14:08:07"), (0.001, "14:08:08"), (0.5, "14:08:08"), (0.999, "14:08:08"), (1.0, "14:08:08")],
)
def test_retry_rounds_the_next_time_up_to_the_whole_second(offset, expected):
    out = records.retry(cf(), "N1", 421, "E", "x", NOW, NOW + 300 + offset)
    assert f"$fax_next_time {expected}".encode() in out.to_bytes()


def test_retry_next_time_is_never_before_not_before():
    for frac in (0.0, 0.2, 0.7):
        not_before = NOW + 3600 + frac
        out = records.retry(cf(), "N1", 421, "E", "x", NOW, not_before)
        job = parse_job(out, "X.FS")
        assert job.next_attempt is not None
        assert not_before <= job.next_attempt < not_before + 1
        assert not job.is_due(not_before - 0.001)


def test_retry_next_date_crosses_midnight_in_local_time():
    out = records.retry(cf(), "N1", 421, "E", "x", NOW, NOW + 12 * 3600)
    date, clock = records.local_stamp(NOW + 12 * 3600)
    assert f"$fax_next_date {date}".encode() in out.to_bytes()
    assert f"$fax_next_time {clock}".encode() in out.to_bytes()
    assert date == "11/22/2026" and clock == "02:03:07"


def test_a_second_retry_updates_status_and_next_time_in_place_while_attempt_records_accumulate():
    first = records.retry(cf(), "N1", 421, "E", "421 first", NOW, NOW + 300)
    second = records.retry(first, "N2", 451, "A", "451 second", NOW + 600, NOW + 1800)
    lines = added(EXAMPLE, second)
    assert lines == [
        b'$attempt_record 11/21/2026 14:03:07 0 0 0 421 E 0 0 0 E1 0 - - "421 first" N1',
        b'$var_def EMAIL_ERROR "451 second"',
        b"$fax_status1 2",
        b"$fax_status2 451",
        b"$fax_next_date 11/21/2026",
        b"$fax_next_time 14:33:07",
        b'$attempt_record 11/21/2026 14:13:07 0 0 0 451 A 0 0 0 E1 0 - - "451 second" N2',
    ]
    job = parse_job(second, "X.FS")
    assert [(a.node, a.outcome, a.klass) for a in job.attempts] == [("N1", 421, "E"), ("N2", 451, "A")]


def test_a_final_failure_after_a_retry_turns_status1_to_6_in_place():
    c = records.retry(cf(), "N1", 421, "E", "421 first", NOW, NOW + 300)
    c = records.failed(c, "N1", 421, "E", "421 again", NOW + 400)
    out = c.to_bytes()
    assert out.count(b"$fax_status1") == 1 and b"$fax_status1 6\n" in out
    assert out.count(b"$fax_status2") == 1 and b"$fax_status2 421\n" in out
    assert out.count(b"$attempt_record") == 2
    assert out.count(b"EMAIL_ERROR") == 1 and c.var("EMAIL_ERROR") == "421 again"


def test_engine_lines_already_written_by_the_submitter_are_updated_in_place():
    before = EXAMPLE + b"$fax_status1 0\n; keep me\n$fax_next_time 00:00:00\n"
    out = records.retry(cf(before), "N1", 421, "E", "x", NOW, NOW + 60)
    text = out.to_bytes()
    assert text.count(b"$fax_status1") == 1
    assert text.count(b"$fax_next_time") == 1
    assert b"$fax_status1 2\n; keep me\n$fax_next_time 14:04:07\n" in text


# --- interrupted ---------------------------------------------------------------


def test_interrupted_appends_only_an_attempt_record():
    out = records.interrupted(cf(), "N1", 66, "Z", "attempt interrupted", NOW)
    assert added(EXAMPLE, out) == [b'$attempt_record 11/21/2026 14:03:07 0 0 0 66 Z 0 0 0 E1 0 - - "attempt interrupted" N1']


@pytest.fixture
def tz_minus5(monkeypatch):
    """The node's local time is UTC-5 (a POSIX TZ string: no tz database needed)."""
    monkeypatch.setenv("TZ", "EST+5")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_a_new_time_zone_of_the_same_names_but_another_offset_gives_its_own_stamp(monkeypatch):
    epoch = 1795269787  # 11/21/2026 14:03:07 UTC
    stamps = []
    for zone in ("EST+5", "EST+4"):  # both named ('EST', 'EST')
        monkeypatch.setenv("TZ", zone)
        time.tzset()
        stamps.append(records.local_stamp(epoch))
    monkeypatch.undo()
    time.tzset()
    assert stamps == [("11/21/2026", "09:03:07"), ("11/21/2026", "10:03:07")]


def test_stamps_are_in_the_nodes_local_time_not_utc(tz_minus5):
    epoch = 1795269787  # 11/21/2026 14:03:07 UTC
    assert time.gmtime(epoch)[:6] == (2026, 11, 21, 14, 3, 7)
    assert records.local_stamp(epoch) == ("11/21/2026", "09:03:07")
    out = records.retry(cf(), "N1", 421, "E", "x", epoch, epoch - 10 * 3600 + 0.25).to_bytes()
    assert b"$attempt_record 11/21/2026 09:03:07 0 0 0 421 E " in out
    assert b"$fax_next_date 11/20/2026\n$fax_next_time 23:03:08\n" in out


def test_a_job_moved_back_by_hand_counts_only_the_attempts_of_its_new_run():
    from copiamail.jobfile.job import parse_job

    def job(c):
        return parse_job(c, "X.FS")

    c = cf()
    for _ in range(2):
        c = records.retry(c, "N1", 421, "E", "421 busy", NOW, NOW + 1)
    c = records.failed(c, "N1", 421, "E", "421 busy", NOW)
    assert job(c).restarted and job(c).earlier_retries == []  # moved back by hand: afresh
    c = records.retry(c, "N1", 421, "E", "421 busy", NOW, NOW + 1, records.Where(restarted=True))
    assert not job(c).restarted and job(c).earlier_retries == ["E"]
    c = records.retry(c, "N1", 421, "E", "421 busy", NOW, NOW + 1)
    assert job(c).earlier_retries == ["E", "E"]
    c = records.failed(c, "N1", 421, "E", "421 busy", NOW)
    assert job(c).restarted and job(c).earlier_retries == []  # and again
    c = records.retry(c, "N1", 421, "E", "421 busy", NOW, NOW + 1, records.Where(restarted=True))
    assert job(c).earlier_retries == ["E"]
    assert c.to_bytes().count(b"$attempt_record") == 7
