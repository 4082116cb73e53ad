"""copiamail.scheduling.retry: what a failed attempt leads to, and whether a
retry goes through retry_relay (pure functions: a job, an error, the CFG's
retry rules and a time in; a verdict out)."""

from __future__ import annotations

from copiamail.errors import DeliveryError
from copiamail.jobfile import outcome, records
from copiamail.jobfile.fsfile import CommandFile
from copiamail.jobfile.job import Job, parse_job
from copiamail.jobfile.outcome import RetryRules, parse_delays
from copiamail.scheduling.retry import GiveUp, RetryLater, TryAlternative, after_error, through_retry_relay

NOW = 1_000_000.0
NO_RULES = RetryRules()


def fs(*lines: str) -> CommandFile:
    return CommandFile.parse(("\n".join(["$email_address u@a.test", '$email_text "hi"', *lines]) + "\n").encode())


def failures(cf: CommandFile, *classes: str) -> CommandFile:
    """``cf`` after temporary failures of these classes, in turn."""
    for klass in classes:
        cf = records.retry(cf, "N1", 451, klass, "try later", NOW, NOW)
    return cf


def job(cf: CommandFile) -> Job:
    return parse_job(cf, "J.FS")


def temporary(klass: str = "C", code: int = 451) -> DeliveryError:
    return DeliveryError(code, klass, "4.3.0 try later", False)


def permanent(code: int = 550) -> DeliveryError:
    return DeliveryError(code, "E", "5.1.1 no such user", True)


def test_a_temporary_failure_is_retried_after_the_first_delay_of_the_default_list():
    assert after_error(job(fs()), temporary(), NO_RULES, NOW) == RetryLater(300, False)


def test_the_nth_failure_of_a_class_waits_the_nth_delay_of_its_list():
    cf = fs('$email_retry_delays C "1S 2S 3S"')
    assert after_error(job(failures(cf, "C", "C")), temporary("C"), NO_RULES, NOW) == RetryLater(3, False)
    # Failures of another class do not use up this class's list.
    assert after_error(job(failures(cf, "D", "D")), temporary("C"), NO_RULES, NOW) == RetryLater(1, False)


def test_the_cfg_rules_apply_where_the_job_sets_none():
    cfg = RetryRules(delays={"*": parse_delays("7S")})
    assert after_error(job(fs()), temporary(), cfg, NOW) == RetryLater(7, False)
    assert after_error(job(fs('$email_retry_delays * "9S"')), temporary(), cfg, NOW) == RetryLater(9, False)


def test_when_the_list_is_used_up_the_job_fails():
    cf = fs('$email_retry_delays * "1S"')
    assert isinstance(after_error(job(failures(cf, "C")), temporary(), NO_RULES, NOW), GiveUp)


def test_email_retry_max_counts_retries_over_all_classes():
    cf = fs('$email_retry_delays * "1S 1S 1S"', "$email_retry_max 2")
    assert isinstance(after_error(job(failures(cf, "C")), temporary("D"), NO_RULES, NOW), RetryLater)
    assert isinstance(after_error(job(failures(cf, "C", "D")), temporary("C"), NO_RULES, NOW), GiveUp)


def test_a_permanent_failure_is_never_retried():
    assert isinstance(after_error(job(fs()), permanent(), NO_RULES, NOW), GiveUp)


def test_a_final_failure_tries_the_alternative_address_if_the_job_has_one():
    cf = fs("$email_alt_address other@b.test", '$email_retry_delays * "1S"')
    assert after_error(job(cf), permanent(), NO_RULES, NOW) == TryAlternative("other@b.test")
    assert after_error(job(failures(cf, "C")), temporary(), NO_RULES, NOW) == TryAlternative("other@b.test")
    # While retries remain, the address itself is retried.
    assert after_error(job(cf), temporary(), NO_RULES, NOW) == RetryLater(1, False)


def test_tls_required_and_not_offered_does_not_try_the_alternative():
    cf = fs("$email_alt_address other@b.test")
    error = DeliveryError(outcome.TLS_REQUIRED.code, outcome.TLS_REQUIRED.klass, "no TLS", True)
    assert isinstance(after_error(job(cf), error, NO_RULES, NOW), GiveUp)


def test_an_i_item_plans_the_retry_through_the_retry_relay():
    cf = fs('$email_retry_delays * "1S I2S"')
    assert after_error(job(cf), temporary(), NO_RULES, NOW) == RetryLater(1, False)
    assert after_error(job(failures(cf, "C")), temporary(), NO_RULES, NOW) == RetryLater(2, True)


def test_the_next_attempt_goes_through_the_retry_relay_when_the_last_failure_planned_it():
    cf = fs('$email_retry_delays * "1S I2S 3S"')
    assert not through_retry_relay(job(cf), NO_RULES, NOW)  # a first attempt
    assert not through_retry_relay(job(failures(cf, "C")), NO_RULES, NOW)  # the 1S retry
    assert through_retry_relay(job(failures(cf, "C", "C")), NO_RULES, NOW)  # the I2S retry
    assert not through_retry_relay(job(failures(cf, "C", "C", "C")), NO_RULES, NOW)


def test_the_cfg_list_can_send_a_retry_through_the_retry_relay():
    cfg = RetryRules(delays={"*": parse_delays("I1S")})
    assert through_retry_relay(job(failures(fs(), "C")), cfg, NOW)
    assert not through_retry_relay(job(failures(fs(), "C")), NO_RULES, NOW)
