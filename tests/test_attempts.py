"""copiamail.scheduling.attempts: one delivery attempt over a connection and
the result it leads to. A fake session, spool and router: no SMTP, no disk
beyond tmp_path."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from copiamail.config import Config, RelayConfig
from copiamail.errors import DeliveryError
from copiamail.jobfile import outcome
from copiamail.jobfile.fsfile import CommandFile
from copiamail.jobfile.job import parse_job
from copiamail.scheduling.adaptive import AdaptiveLimits
from copiamail.scheduling.attempts import Attempts, refused_at_connect
from copiamail.scheduling.connections import Connection
from copiamail.scheduling.limits import Limit
from copiamail.scheduling.results import Tally
from copiamail.scheduling.routing import Item, Target
from copiamail.smtp.session import CONNECT, Delivered
from copiamail.spool.queue import Claimed, Destination

NOW = 1_700_000_000.0


class FakeSession:
    def __init__(self, answer: Delivered | BaseException, messages: int = 0) -> None:
        self.answer = answer
        self.messages = messages
        self.sent: list[tuple[str, str, bytes]] = []
        self.aborted = False

    async def ready(self) -> None:
        """Connected and greeted; a host that fails before any SMTP command fails here."""
        if isinstance(self.answer, DeliveryError) and self.answer.stage == CONNECT:
            raise self.answer

    async def send(self, sender: str, recipient: str, data: bytes, require_tls: bool = False,
                   on_written: Callable[[], None] | None = None) -> Delivered:
        self.sent.append((sender, recipient, data))
        if on_written is not None:
            on_written()
        if isinstance(self.answer, BaseException):
            raise self.answer
        self.messages += 1
        return self.answer

    def abort(self) -> None:
        self.aborted = True


class FakeSpool:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.marked: list[str] = []
        self.sending: list[str] = []

    def mark_sending(self, claimed: Claimed) -> Claimed:
        self.sending.append(claimed.name)
        return claimed

    def mark_delivered(self, claimed: Claimed) -> tuple[Claimed, None]:
        self.marked.append(claimed.name)
        return Claimed(claimed.node, claimed.queue, claimed.name, claimed.file + ".D"), None


class FakeRouter:
    def __init__(self, next_host: bool) -> None:
        self.next_host = next_host
        self.failed: list[str] = []
        self.refusals: list[str] = []

    def refused(self, target: Target) -> None:
        self.refusals.append(target.host)

    def host_failed(self, target: Target, domain: str, tried: set[str]) -> bool:
        self.failed.append(target.host)
        tried.add(target.host)
        return self.next_host


TARGET = Target("10.0.0.1", 25, ("10.0.0.1",), ("mx.a.test",), "auto", None, False, "mx.a.test")


def attempt(tmp_path: Path, answer: Delivered | BaseException, *lines: str, next_host: bool = False, messages: int = 0,
            adaptive: AdaptiveLimits | None = None, opened: float = 0.0, greeted: int = 0):
    text = "\n".join(["$email_address u@a.test", '$email_subject "s"', '$email_text "hi"', *lines]) + "\n"
    cf = CommandFile.parse(text.encode())
    item = Item(Claimed("N1", "TOSEND2", "J.FS", str(tmp_path / "J.FS")), cf, parse_job(cf, "J.FS"))
    session = FakeSession(answer, messages)
    limits = (Limit("domain_limit:a.test", 10, "$domain_limit", ceiling=10),) if adaptive is not None else ()
    conn = Connection("a.test", "u@a.test", None, limits, TARGET, session, 100, opened=opened)  # type: ignore[arg-type]
    spool, router = FakeSpool(tmp_path), FakeRouter(next_host)
    attempts = Attempts(Config(esender="bulk@sender.test", relay=RelayConfig("192.0.2.1")), spool, "N1", router,  # type: ignore[arg-type]
                        worker=1, clock=lambda: NOW, adaptive=adaptive, greeted_sharing=lambda conn, key: greeted)
    result = asyncio.run(attempts.attempt(conn, item))
    return result, item, session, spool, router


def var(cf: CommandFile, name: str) -> str | None:
    return cf.var(name)


def test_a_delivered_message_is_marked_delivered_and_goes_to_sent(tmp_path):
    result, _, session, spool, _ = attempt(tmp_path, Delivered("250 2.0.0 queued", "10.0.0.1", 123))
    assert session.sent[0][:2] == ("bulk@sender.test", "u@a.test") and b"Subject: s" in session.sent[0][2]
    assert spool.sending == spool.marked == ["J.FS"] and result.claimed.path.name == "J.FS.D"
    assert (result.dest, result.tally) == (Destination.SENT, Tally.SENT)
    assert var(result.cf, "EMAIL_CONNECT_IP") == "10.0.0.1" and var(result.cf, "EMAIL_BYTECOUNT") == "123"


def test_a_temporary_refusal_is_retried_later(tmp_path):
    error = DeliveryError(451, "C", "4.3.0 try later", False, "RCPT")
    result, *_ = attempt(tmp_path, error)
    assert (result.dest, result.tally) == (Destination.BACK, Tally.RETRIED)
    assert var(result.cf, "EMAIL_ERROR") == "4.3.0 try later" and "fax_next_date" in result.cf.text.lower()


def test_a_permanent_refusal_fails(tmp_path):
    result, *_ = attempt(tmp_path, DeliveryError(550, "E", "5.1.1 no such user", True, "RCPT"))
    assert (result.dest, result.tally) == (Destination.FAIL, Tally.FAILED)
    assert var(result.cf, "EMAIL_ERROR") == "5.1.1 no such user"


def test_a_permanent_refusal_with_an_alternative_address_goes_back_for_it(tmp_path):
    result, *_ = attempt(tmp_path, DeliveryError(550, "E", "5.1.1 no such user", True, "RCPT"),
                         "$email_alt_address other@b.test")
    assert (result.dest, result.tally) == (Destination.BACK, Tally.RETRIED) and var(result.cf, "EMAIL_USING_ALT") == "1"


def test_a_mail_host_that_fails_before_any_smtp_command_sends_the_job_to_the_next(tmp_path):
    refused = DeliveryError(outcome.CONNECT_FAILED.code, outcome.CONNECT_FAILED.klass, "connection refused", False, CONNECT)
    result, item, _, spool, router = attempt(tmp_path, refused, next_host=True)
    assert result is None and item.tried == {"10.0.0.1"} and router.failed == ["10.0.0.1"]
    assert spool.sending == []  # not marked: its transaction never started


def test_the_last_mail_host_failing_before_any_smtp_command_costs_an_attempt(tmp_path):
    refused = DeliveryError(outcome.CONNECT_FAILED.code, outcome.CONNECT_FAILED.klass, "connection refused", False, CONNECT)
    result, *_ = attempt(tmp_path, refused, next_host=False)
    assert result is not None and result.tally is Tally.RETRIED and var(result.cf, "EMAIL_ERROR") == "connection refused"


def test_a_failure_after_the_greeting_never_moves_on_to_another_host(tmp_path):
    result, _, _, _, router = attempt(tmp_path, DeliveryError(421, "C", "busy", False, "MAIL"), next_host=True)
    assert result is not None and router.failed == []


def test_a_job_that_cannot_be_built_fails_with_its_line(tmp_path):
    result, _, session, _, _ = attempt(tmp_path, Delivered("250 ok", "10.0.0.1", 1), "$email_attach missing.pdf")
    assert session.sent == [] and result.tally is Tally.FAILED
    assert (var(result.cf, "EMAIL_ERROR") or "").startswith("line 4: ")


def test_an_internal_error_aborts_the_session_and_is_retried(tmp_path):
    result, _, session, _, _ = attempt(tmp_path, RuntimeError("boom"))
    assert session.aborted and result.tally is Tally.RETRIED
    assert var(result.cf, "EMAIL_ERROR") == "internal error: RuntimeError: boom"


@pytest.mark.parametrize("messages,connected", [(0, False), (3, True)])
def test_the_attempt_record_tells_the_queue_the_worker_and_whether_a_connection_was_made(tmp_path, messages, connected):
    # A connection that failed before any SMTP command was never made, unless
    # it was reused (made for an earlier message).
    refused = DeliveryError(outcome.CONNECTION_LOST.code, outcome.CONNECTION_LOST.klass, "dropped", False, CONNECT)
    result, *_ = attempt(tmp_path, refused, messages=messages)
    [record] = [l for l in result.cf.text.splitlines() if l.lower().startswith("$attempt_record")]
    fields = record.split()
    assert (fields[9], fields[11]) == ("2", "E2")  # TOSEND2, the second worker
    assert fields[13] != "-" and (fields[14] != "-") == connected


@pytest.mark.parametrize("error,refusal", [
    (DeliveryError(outcome.CONNECT_FAILED.code, outcome.CONNECT_FAILED.klass, "connection refused", False, CONNECT), True),
    (DeliveryError(421, "H", "4.7.0 too many connections from 127.0.0.1", False, CONNECT), True),
    (DeliveryError(450, "H", "try later", False, CONNECT), True),
    (DeliveryError(outcome.TIMED_OUT.code, outcome.TIMED_OUT.klass, "timeout connecting", False, CONNECT), False),
    (DeliveryError(outcome.CONNECTION_LOST.code, outcome.CONNECTION_LOST.klass, "closed", False, CONNECT), False),
    (DeliveryError(554, "H", "5.7.1 go away", False, CONNECT), False),
    (DeliveryError(421, "H", "4.7.0 too many connections", False, "MAIL"), False),
])
def test_a_refusal_at_connect_is_a_refused_connection_or_a_4xx_greeting(tmp_path, error, refusal):
    assert refused_at_connect(error) is refusal
    _, _, _, _, router = attempt(tmp_path, error)
    assert router.refusals == (["10.0.0.1"] if refusal else [])


TOO_MANY = DeliveryError(421, "H", "4.7.0 too many connections from 127.0.0.1", False, CONNECT)


def _adaptive() -> AdaptiveLimits:
    return AdaptiveLimits(None, suspend=900.0, recover_after=100, recover_seconds=60.0, clock=lambda: NOW)


def test_under_adaptive_a_connections_refusal_that_lowers_the_cap_pauses_nothing_and_charges_no_attempt(tmp_path):
    limits = _adaptive()
    result, item, _, _, router = attempt(tmp_path, TOO_MANY, adaptive=limits)
    assert result is None and item.busy_reply is not None  # it waits for a slot, as a deferred job
    assert limits.cap("domain_limit:a.test", 10) == 1 and router.refusals == []


def test_under_adaptive_a_connections_refusal_of_a_lone_connection_at_a_cap_of_one_pauses_its_host(tmp_path):
    # Nothing left to lower: the receiver counts connections the key does not
    # see (other domains on the host). Reopened at once, it refuses again.
    limits = _adaptive()
    attempt(tmp_path, TOO_MANY, adaptive=limits, opened=0.0)  # learned 1
    result, item, _, _, router = attempt(tmp_path, TOO_MANY, adaptive=limits, opened=time.monotonic())
    assert result is None and item.busy_reply is not None
    assert router.refusals == ["10.0.0.1"]


def test_under_adaptive_the_refusal_of_a_connection_opened_before_the_cap_was_lowered_pauses_nothing(tmp_path):
    # Opened in the same burst as the one that taught the lesson: late evidence of it.
    limits = _adaptive()
    opened = time.monotonic()
    attempt(tmp_path, TOO_MANY, adaptive=limits, opened=opened)
    _, _, _, _, router = attempt(tmp_path, TOO_MANY, adaptive=limits, opened=opened)
    assert router.refusals == []


def test_under_adaptive_a_connections_refusal_on_a_key_still_full_of_other_connections_pauses_nothing(tmp_path):
    # Counted against its cap by other connections (another worker's, before a
    # reload lowered it): it waits on its cap, and a pause would only cost time.
    limits = _adaptive()
    attempt(tmp_path, TOO_MANY, adaptive=limits, opened=0.0, greeted=3)  # learned 3
    _, _, _, _, router = attempt(tmp_path, TOO_MANY, adaptive=limits, opened=time.monotonic(), greeted=3)
    assert limits.cap("domain_limit:a.test", 10) == 3 and router.refusals == []
