"""The retry policy, as pure functions: what a failed attempt leads to, and
whether a job's next attempt goes through ``retry_relay``.

A failed attempt is retried when it is temporary and the job's retry list
(FS, then CFG, then the built-in default; see
:func:`~copiamail.jobfile.outcome.plan_retry`) has a retry left for its
class. Otherwise it is final: the job tries its alternative address
(``$email_alt_address``, not yet tried) if it has one, except when the
failure was that the server could not give the TLS the job requires (the
alternative would need it too); else it fails. A retry whose list item
carries the ``I`` prefix goes through ``retry_relay`` instead of the usual
route.
"""

from __future__ import annotations

from dataclasses import dataclass

from copiamail.errors import DeliveryError
from copiamail.jobfile import outcome
from copiamail.jobfile.job import Job


@dataclass(frozen=True)
class RetryLater:
    """Try again in ``wait`` seconds (``relay``: through retry_relay)."""

    wait: float
    relay: bool


@dataclass(frozen=True)
class TryAlternative:
    """The address failed for good: send to the job's alternative address."""

    address: str


@dataclass(frozen=True)
class GiveUp:
    """The job fails (FAIL)."""


Verdict = RetryLater | TryAlternative | GiveUp


def after_error(job: Job, error: DeliveryError, rules: outcome.RetryRules, now: float) -> Verdict:
    """What the failed attempt ``error`` of ``job`` leads to, under the CFG's
    retry ``rules``, at time ``now`` (a retry at a time of day is planned from it)."""
    plan = None if error.permanent else outcome.plan_retry(error.klass, job.earlier_retries, job.retry_rules, rules, now)
    if plan is not None:
        return RetryLater(plan.wait, plan.relay)
    if job.alt_address is not None and error.code != outcome.TLS_REQUIRED.code:
        return TryAlternative(job.alt_address)
    return GiveUp()


def through_retry_relay(job: Job, rules: outcome.RetryRules, now: float) -> bool:
    """Whether the next attempt of ``job`` is a retry that its retry list sends
    through ``retry_relay`` (an ``I`` item): the retry its last counted
    failure planned."""
    counted = job.earlier_retries
    if not counted:
        return False
    plan = outcome.plan_retry(counted[-1], counted[:-1], job.retry_rules, rules, now)
    return plan is not None and plan.relay
