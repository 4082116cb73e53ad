"""copiamail.outcome: classes, delays and the retry rule (SPEC 4)."""

from __future__ import annotations

import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from copiamail.jobfile import outcome
from copiamail.jobfile.outcome import (
    CLASSES,
    DEFAULT_RETRY_DELAYS,
    delays_for,
    parse_delays,
    parse_retry_class,
    retry_delay,
)

RETRY_CLASSES = "ABCDEH"  # the classes of a temporary failure

# --- parse_delays -----------------------------------------------------------------


def test_parse_delays_reads_seconds_minutes_and_hours():
    assert parse_delays("30S 5 2H") == (30, 300, 7200)


def test_parse_delays_plain_number_is_minutes():
    assert parse_delays("5 20 60 240 720") == (300, 1200, 3600, 14400, 43200)


def test_parse_delays_units_are_case_insensitive_and_m_means_minutes():
    assert parse_delays("30s 10m 10M 1h") == (30, 600, 600, 3600)


def test_parse_delays_accepts_tabs_extra_spaces_and_commas():
    assert parse_delays("  1\t2,3 ,4  ") == (60, 120, 180, 240)


@pytest.mark.parametrize("text", ["", "   ", "\t"])
def test_parse_delays_empty_list_is_empty(text):
    assert parse_delays(text) == ()


def test_parse_delays_keeps_zero():
    assert parse_delays("0 0S") == (0, 0)


@pytest.mark.parametrize("text", ["x", "5X", "-5", "+5", "1.5", "S", "H5", "5 SS", "5HH", "2D", "five", "30S 5 soon"])
def test_parse_delays_bad_item_raises_value_error_naming_it(text):
    with pytest.raises(ValueError) as e:
        parse_delays(text)
    bad = next(item for item in text.replace(",", " ").split() if item not in ("5", "30S"))
    assert repr(bad) in str(e.value)


@given(st.lists(st.tuples(st.integers(0, 8000), st.sampled_from(["", "S", "s", "M", "m", "H", "h"])), max_size=8))
def test_parse_delays_reads_every_written_list(items):
    text = " ".join(f"{n}{unit}" for n, unit in items)
    factor = {"": 60, "S": 1, "M": 60, "H": 3600}
    assert parse_delays(text) == tuple(n * factor[unit.upper()] for n, unit in items)


@given(st.text(max_size=20))
def test_parse_delays_raises_only_value_errors(text):
    try:
        result = parse_delays(text)
    except ValueError:
        return
    assert all(isinstance(d, int) and d >= 0 for d in result)


# --- parse_retry_class ------------------------------------------------------------------


@pytest.mark.parametrize("klass", list(CLASSES) + ["*"])
def test_parse_retry_class_accepts_each_class_and_star(klass):
    assert parse_retry_class(klass) == klass


@pytest.mark.parametrize("klass", list(CLASSES.lower()))
def test_parse_retry_class_is_case_insensitive(klass):
    assert parse_retry_class(klass) == klass.upper()


@pytest.mark.parametrize("text", ["", "X", "P", "AB", "**", "1", " A", "?"])
def test_parse_retry_class_refuses_anything_else(text):
    with pytest.raises(ValueError):
        parse_retry_class(text)


def test_classes_are_the_copiafacts_letters():
    assert tuple("ABCDEHSZ") == (outcome.TIMEOUT, outcome.MAILBOX, outcome.CONNECTION, outcome.DOMAIN, outcome.SMTP_OTHER,
            outcome.HOST_REJECTED, outcome.SUCCESS, outcome.FAILURE)
    # CopiaFacts retries A-H and J-O; I is an ignored failure, S success, Z final.
    assert set(CLASSES) == set("ABCDEFGHJKLMNO") | {"I", "S", "Z"}


# --- delays_for: FS over CFG over the default ---------------------------------------------

FS_B = {"B": (1,)}
FS_STAR = {"*": (2,)}
CFG_B = {"B": (3,)}
CFG_STAR = {"*": (4,)}


@pytest.mark.parametrize(
    "fs, cfg, expected",
    [
        ({**FS_B, **FS_STAR}, {**CFG_B, **CFG_STAR}, (1,)),  # the FS class list first
        (FS_STAR, {**CFG_B, **CFG_STAR}, (2,)),  # then the FS '*' list
        ({}, {**CFG_B, **CFG_STAR}, (3,)),  # then the CFG class list
        ({"C": (9,)}, CFG_STAR, (4,)),  # then the CFG '*' list
        ({"C": (9,)}, {"C": (8,)}, DEFAULT_RETRY_DELAYS["*"]),  # then the default
        ({}, {}, DEFAULT_RETRY_DELAYS["*"]),
    ],
)
def test_delays_for_takes_fs_class_then_fs_star_then_cfg_class_then_cfg_star_then_default(fs, cfg, expected):
    assert delays_for("B", fs, cfg) == expected


def test_delays_for_empty_fs_list_counts_as_a_list():
    assert delays_for("B", {"B": ()}, CFG_B) == ()
    assert delays_for("B", {"*": ()}, CFG_B) == ()


def test_delays_for_without_levels_is_the_default():
    assert delays_for("A") == DEFAULT_RETRY_DELAYS["*"]


def test_default_retry_delays_are_5_20_60_240_720_minutes():
    assert {"*": parse_delays("5 20 60 240 720")} == DEFAULT_RETRY_DELAYS


# --- retry_delay ---------------------------------------------------------------------------


@given(st.lists(st.integers(0, 10**5), max_size=6), st.sampled_from(RETRY_CLASSES))
def test_the_nth_retry_of_a_class_waits_the_nth_delay_until_the_list_is_used_up(delays, klass):
    earlier: list[str] = []
    waits = []
    while True:
        wait = retry_delay(klass, earlier, tuple(delays), None)
        if wait is None:
            break
        waits.append(wait)
        earlier.append(klass)
        assert len(waits) <= len(delays)
    assert waits == delays


def test_retry_delay_first_failure_waits_the_first_delay():
    assert retry_delay("E", [], (30, 300, 7200), None) == 30
    assert retry_delay("E", ["E"], (30, 300, 7200), None) == 300
    assert retry_delay("E", ["E", "E"], (30, 300, 7200), None) == 7200


def test_retry_delay_returns_none_when_the_list_is_used_up():
    assert retry_delay("E", ["E", "E", "E"], (30, 300, 7200), None) is None


def test_retry_delay_empty_list_makes_the_class_final_at_once():
    assert retry_delay("B", [], (), None) is None


def test_retries_are_counted_per_class_independently():
    delays = (10, 20, 30)
    assert retry_delay("A", ["C", "C", "C", "E"], delays, None) == 10
    assert retry_delay("C", ["A", "C", "E", "C"], delays, None) == 30
    assert retry_delay("C", ["A", "C", "E", "C", "C"], delays, None) is None
    assert retry_delay("E", ["A", "C", "E", "C", "C"], delays, None) == 20


@given(st.lists(st.sampled_from(RETRY_CLASSES), max_size=12), st.sampled_from(RETRY_CLASSES))
def test_retry_delay_depends_only_on_earlier_failures_of_the_same_class(earlier, klass):
    delays = tuple(range(1, 6))
    same = [c for c in earlier if c == klass]
    assert retry_delay(klass, earlier, delays, None) == retry_delay(klass, same, delays, None)


def test_retry_max_caps_retries_of_all_classes_together():
    # CopiaFacts counts retries: $email_retry_max 2 allows 3 attempts.
    delays = (1, 2, 3, 4, 5)
    assert retry_delay("A", [], delays, 2) == 1  # attempt 1 failed: retry 1
    assert retry_delay("B", ["A"], delays, 2) == 1  # attempt 2 failed: retry 2
    assert retry_delay("C", ["A", "B"], delays, 2) is None  # attempt 3 was the last


def test_retry_max_of_zero_allows_no_retry():
    assert retry_delay("A", [], (1, 2), 0) is None


def test_retry_max_none_means_no_cap():
    assert retry_delay("A", ["B"] * 100, (7,), None) == 7


@given(
    st.lists(st.sampled_from(RETRY_CLASSES), min_size=1, max_size=15),
    st.integers(1, 10),
    st.lists(st.integers(0, 1000), max_size=4),
)
def test_a_job_failing_again_and_again_stops_at_the_first_exhausted_class_or_at_retry_max(failures, retry_max, delays):
    # Each failure is one attempt; the job is tried again while retry_delay says so.
    earlier: list[str] = []
    attempts = 0
    for klass in failures:
        attempts += 1
        wait = retry_delay(klass, earlier, tuple(delays), retry_max)
        nth = earlier.count(klass) + 1
        if wait is None:
            assert attempts > retry_max or nth > len(delays)
            break
        assert attempts <= retry_max
        assert wait == delays[nth - 1]
        earlier.append(klass)
    assert attempts <= retry_max + 1


# --- outcome codes -----------------------------------------------------------------------------


def test_engine_outcome_codes_are_unique_and_not_smtp_codes():
    codes = [c.code for c in outcome.ENGINE_CODES]
    assert len(codes) == len(set(codes))
    assert all(0 < c < 200 for c in codes)  # SMTP replies are 200 to 599 (160: CopiaFacts' reqTLS outcome)
    assert all(c.klass in CLASSES for c in outcome.ENGINE_CODES)


def test_interrupted_is_outcome_66():
    assert outcome.INTERRUPTED.code == 66
    assert outcome.INTERRUPTIONS_TO_FAIL == 3


def test_bad_job_codes_are_class_z():
    for code in (outcome.BAD_JOB, outcome.MISSING_FILE, outcome.OUTSIDE_ROOTS, outcome.BAD_HEADER, outcome.BAD_CHARSET):
        assert code.klass == "Z"


@pytest.mark.parametrize("text", ["8785H", "527041", "31622401S", "99999999999999H"])
def test_a_retry_delay_longer_than_a_year_is_refused(text):
    with pytest.raises(ValueError, match="longer than a year"):
        parse_delays(text)


# --- CopiaFacts forms: time of day, I, the LINE form, the $retry_delays fallback --------------


def test_parse_delays_reads_times_of_day_and_the_i_prefix():
    assert parse_delays("I5 14:30 08:00W 9:05N I2H") == (
        outcome.RetryAt(300, relay=True), outcome.RetryAt(None, 14, 30), outcome.RetryAt(None, 8, 0, "W"),
        outcome.RetryAt(None, 9, 5, "N"), outcome.RetryAt(7200, relay=True))


@pytest.mark.parametrize("text", ["24:00", "12:60", "12:5", "X5", "5W", "I"])
def test_parse_delays_refuses_bad_times(text):
    with pytest.raises(ValueError):
        parse_delays(text)


def test_a_time_of_day_waits_until_its_next_occurrence():
    monday_10 = time.mktime((2026, 11, 30, 10, 0, 0, 0, 0, -1))  # a Monday
    assert outcome.wait_for(outcome.RetryAt(None, 14, 30), monday_10) == 4.5 * 3600
    assert outcome.wait_for(outcome.RetryAt(None, 9, 0), monday_10) == 23 * 3600
    friday_18 = time.mktime((2026, 12, 4, 18, 0, 0, 0, 0, -1))
    # W: the next working day (Monday); N: the next non-working day (Saturday).
    assert time.localtime(friday_18 + outcome.wait_for(outcome.RetryAt(None, 8, 0, "W"), friday_18)).tm_wday == 0
    assert time.localtime(friday_18 + outcome.wait_for(outcome.RetryAt(None, 8, 0, "N"), friday_18)).tm_wday == 5


@pytest.mark.parametrize("args, expected", [
    (("1", "A", "5 10"), ("A", (300, 600))),
    (("1-4", "*", "30S"), ("*", (30,))),
    (("A", "5 10"), ("A", (300, 600))),
    (("*", "5", "10", "20"), ("*", (300, 600, 1200))),
])
def test_retry_commands_take_the_cfg_line_form_and_the_two_argument_form(args, expected):
    assert outcome.parse_retry_command(args) == expected


def test_retry_delays_are_the_fallback_only_where_no_email_list_exists():
    fallback = outcome.RetryRules(fallback_delays={"*": (60,)}, fallback_max=0)
    assert outcome.plan_retry("A", [], outcome.RetryRules(), fallback) is None  # $retry_max 0
    with_email = outcome.RetryRules(delays={"B": (5,)}, fallback_delays={"*": (60,)})
    assert outcome.plan_retry("A", [], outcome.RetryRules(), with_email).wait == 300  # the default, not $retry_delays
    assert outcome.plan_retry("A", [], outcome.RetryRules(fallback_delays={"A": (7,)}), outcome.RetryRules()).wait == 7


def test_an_i_item_retries_through_the_retry_relay():
    plan = outcome.plan_retry("C", ["C"], outcome.RetryRules(delays={"C": parse_delays("5 I10")}), outcome.RetryRules())
    assert plan == outcome.RetryPlan(600, True)


def test_retry_max_holds_whichever_list_is_used():
    # $email_retry_max with the $retry_delays fallback, and $retry_max with no list at all.
    assert outcome.plan_retry("A", ["A"], outcome.RetryRules(retry_max=1, fallback_delays={"*": (1, 1, 1)}),
                              outcome.RetryRules()) is None
    assert outcome.plan_retry("A", ["A"], outcome.RetryRules(), outcome.RetryRules(fallback_max=1)) is None


def test_a_bad_item_in_the_line_form_is_named():
    with pytest.raises(ValueError, match="bogus"):
        outcome.parse_retry_command(("1", "A", "5 bogus"))
