"""End to end: the SMTP fault matrix (issue 4).

For each fault a real `copiamail node --drain` sends two jobs for one domain
(`$domain_limit * @copia.com 1`, so one after the other) to an SMTPTestServer
on 127.0.0.1: ``A.FS`` meets the fault, ``B.FS`` (a healthy job sent after it)
shows that the node goes on, and whether the connection which saw the error
carried it. The selected cases run side by side (see ``runs``); each test
checks its own case, from the job files and the server's records:

* the attempt record of ``A.FS``: outcome code and CopiaFacts class (docs/outcomes.md,
  "Outcome codes");
* ``EMAIL_ERROR``: exactly the server's reply on one line (``CODE TEXT``), or
  the engine's own message for its codes (71, 72, 73);
* a final failure (5xx at MAIL, RCPT, DATA or after the final dot) in ``FAIL``
  with ``$fax_status1 6`` and ``$fax_status2`` = the code; a temporary one back
  in its own TOSEND folder with ``$fax_status1 2``, ``$fax_status2`` = the code
  and ``$fax_next_date/time`` one hour on (``$email_retry_delays * "1H"``);
* after a refusal (a reply other than 421 to MAIL, RCPT, DATA or the end of
  data) the dialogue is in a known state: ``B.FS`` went out over the same
  connection after RSET, and it ended with QUIT (SPEC 4); after any other
  fault ``B.FS`` went out over a NEW connection: the erroring one carried no
  later MAIL.

Each fault in the transaction (MAIL, RCPT, DATA, the end of data) runs twice:
once against a server without PIPELINING (one command, one reply), and once,
as ``<name>+pipelining``, against one that offers it, so that MAIL, RCPT and
DATA go out in one write and the replies are read in turn.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import pytest
from smtpserver import ConnectionInfo, Rule, SMTPTestServer, TLSCert
from spoolkit import SpoolKit

from copiamail.jobfile.fsfile import CommandFile
from copiamail.jobfile.job import parse_job
from copiamail.jobfile.model import Job

BAD_SENDER = "bad@acme.test"      # A's envelope sender (MAIL rules match it)
BAD_RCPT = "bad@copia.com"        # A's recipient (RCPT, DATA and EOD rules match it)
GOOD_RCPT = "good@copia.com"      # B: the healthy job sent after A
RETRY = 3600                      # $email_retry_delays * "1H"

# The engine's own messages, as copiamail/smtp/session.py writes them ({where} is
# the relay's host:port).
TIMEOUT_AT = "timeout at {stage}: Timed out waiting for server response"
NO_GREETING = "timeout connecting to {where}: Timed out waiting for server ready message"
DROPPED_AT = "connection dropped at {stage}: Unexpected EOF received"
STARTTLS_454 = "STARTTLS failed at {where}: 454 4.7.0 TLS not available due to temporary reason"


def at(stage: str, code: int | None = None, text: str = "", **kw) -> Callable[[], Rule]:
    """A rule for A only: by envelope sender at MAIL, by recipient at RCPT,
    DATA and EOD; stages before MAIL have no address, so the rule fires once
    (on A's connection, the first one) unless told otherwise."""
    def make() -> Rule:
        options = dict(kw)
        if stage == "MAIL":
            options.setdefault("match", BAD_SENDER)
        elif stage in ("RCPT", "DATA", "EOD"):
            options.setdefault("match", BAD_RCPT)
        else:
            options.setdefault("times", 1)
        return Rule(stage=stage, code=code, text=text, **options)
    return make


@dataclass
class Fault:
    rule: Callable[[], Rule] | None
    code: int | None = None        # A's outcome (None: A is delivered)
    klass: str = ""
    error: str = ""                # exact EMAIL_ERROR; {where} is host:port
    final: bool = False            # FAIL (True) or back in TOSEND for a retry
    server: dict = field(default_factory=dict)
    relay: str = "starttls: never"
    timeout: float | None = None   # smtp_timeout (default 10 s)
    b_fails_too: bool = False      # a server-wide fault: B meets it as well
    refusal: bool = False          # a refusal in the transaction: B rides on A's connection
    xfail: str = ""                # a known bug of copiamail (strict xfail)

    @property
    def delivered(self) -> bool:
        return self.code is None


def rejected(stage: str, code: int, text: str, klass: str, *, times: int | None = None, **fault) -> Fault:
    """The server answers A with ``code text`` at ``stage``; EMAIL_ERROR is that
    reply as sent; a 5xx at MAIL, RCPT, DATA or EOD is final, the rest retried."""
    assert "\n" not in text
    rule = at(stage, code, text, **({"times": times} if times is not None else {}))
    in_transaction = stage in ("MAIL", "RCPT", "DATA", "EOD")
    final = code >= 500 and in_transaction
    return Fault(rule, code, klass, f"{code} {text}", final=final, refusal=in_transaction and code != 421, **fault)


FAULTS: dict[str, Fault] = {
    # --- 4xx and 5xx with RFC 3463 enhanced codes: X.1/X.2 B, X.7 H, else E
    "mail-451-4.3.0": rejected("MAIL", 451, "4.3.0 Temporary system failure", "E"),
    "mail-450-4.7.1": rejected("MAIL", 450, "4.7.1 Sender greylisted, try later", "H"),
    "mail-553-5.1.8": rejected("MAIL", 553, "5.1.8 Sender address domain does not exist", "B"),
    "mail-550-5.7.1": rejected("MAIL", 550, "5.7.1 Sender rejected by policy", "H"),
    "rcpt-450-4.2.1": rejected("RCPT", 450, "4.2.1 <bad@copia.com>: Mailbox busy, try later", "B"),
    "rcpt-452-4.2.2": rejected("RCPT", 452, "4.2.2 <bad@copia.com>: Mailbox full", "B"),
    "rcpt-451-4.4.3": rejected("RCPT", 451, "4.4.3 Directory server failure", "E"),
    "rcpt-550-5.1.1": rejected("RCPT", 550, "5.1.1 <bad@copia.com>: User unknown", "B"),
    "rcpt-551-5.1.6": rejected("RCPT", 551, "5.1.6 User has moved; please try <b@other.test>", "B"),
    "rcpt-552-5.2.2": rejected("RCPT", 552, "5.2.2 <bad@copia.com>: Mailbox full", "B"),
    "rcpt-554-5.7.1": rejected("RCPT", 554, "5.7.1 <bad@copia.com>: Relay access denied", "H"),
    "data-451-4.3.0": rejected("DATA", 451, "4.3.0 Try again later", "E"),
    "data-554-5.7.1": rejected("DATA", 554, "5.7.1 Message refused", "H"),
    "data-552-5.3.4": rejected("DATA", 552, "5.3.4 Message too big for system", "E"),
    "eod-451-4.7.1": rejected("EOD", 451, "4.7.1 Greylisted, come back later", "H"),
    "eod-452-4.3.1": rejected("EOD", 452, "4.3.1 Insufficient system storage", "E"),
    "eod-552-5.3.4": rejected("EOD", 552, "5.3.4 Message size exceeds fixed maximum", "E"),
    "eod-554-5.6.0": rejected("EOD", 554, "5.6.0 Message content rejected", "E"),
    "eod-550-5.2.1": rejected("EOD", 550, "5.2.1 Mailbox disabled", "B"),
    # --- without enhanced codes: MAIL H; RCPT B for 450, 550-553, else E; DATA E
    "mail-451-plain": rejected("MAIL", 451, "Requested action aborted: local error", "H"),
    "mail-553-plain": rejected("MAIL", 553, "Sender address rejected", "H"),
    "rcpt-450-plain": rejected("RCPT", 450, "Mailbox unavailable", "B"),
    "rcpt-451-plain": rejected("RCPT", 451, "Local error in processing", "E"),
    "rcpt-452-plain": rejected("RCPT", 452, "Too many recipients", "E"),
    "rcpt-550-plain": rejected("RCPT", 550, "No such user here", "B"),
    "rcpt-551-plain": rejected("RCPT", 551, "User not local", "B"),
    "rcpt-552-plain": rejected("RCPT", 552, "Exceeded storage allocation", "B"),
    "rcpt-553-plain": rejected("RCPT", 553, "Mailbox name not allowed", "B"),
    "rcpt-554-plain": rejected("RCPT", 554, "Transaction failed", "E"),
    "data-451-plain": rejected("DATA", 451, "Local error in processing", "E"),
    "data-554-plain": rejected("DATA", 554, "Transaction failed", "E"),
    "eod-451-plain": rejected("EOD", 451, "Local error in processing", "E"),
    "eod-552-plain": rejected("EOD", 552, "Message too large", "E"),
    # --- a multi-line reply is one line in EMAIL_ERROR
    "rcpt-550-multiline": Fault(
        at("RCPT", 550, "5.1.1 <bad@copia.com>: User unknown\n5.1.1 Please check the address"),
        550, "B", "550 5.1.1 <bad@copia.com>: User unknown 5.1.1 Please check the address", final=True, refusal=True),
    "eod-451-multiline": Fault(
        at("EOD", 451, "4.7.1 Greylisted\n4.7.1 See https://example.test/greylisting"),
        451, "H", "451 4.7.1 Greylisted 4.7.1 See https://example.test/greylisting", refusal=True),
    # --- 421 and the server closes: class H anywhere, retried
    "ehlo-421-close": rejected("EHLO", 421, "4.3.2 Service shutting down", "H"),
    "mail-421-close": rejected("MAIL", 421, "4.3.2 Service shutting down", "H"),
    "rcpt-421-close": rejected("RCPT", 421, "4.4.5 Too many connections", "H"),
    "data-421-close": rejected("DATA", 421, "4.3.2 Service shutting down", "H"),
    "eod-421-close": rejected("EOD", 421, "4.3.2 Service shutting down", "H"),
    "mail-421-plain": rejected("MAIL", 421, "Service not available, closing channel", "H"),
    # --- the connection itself
    "eod-drop-after-354": Fault(at("EOD", drop=True), 71, "C", DROPPED_AT.format(stage="DATA")),
    "rcpt-drop": Fault(at("RCPT", drop=True), 71, "C", DROPPED_AT.format(stage="RCPT")),
    # A server that accepts the connection and closes it without a greeting
    # dropped it (71), it did not refuse it (70).
    "greeting-drop": Fault(at("CONNECT", drop=True), 71, "C", "{where} closed the connection before its greeting"),
    # --- EHLO (and the HELO fallback) refused with 5xx: not MAIL, RCPT or
    # DATA, so retried (docs/outcomes.md: everything else is retried), whatever starttls says.
    "ehlo-550-auto": rejected("EHLO", 550, "5.7.1 Client host rejected", "H", times=2, relay="starttls: auto"),
    "ehlo-550-never": rejected("EHLO", 550, "5.7.1 Client host rejected", "H", times=2),
    "no-greeting": Fault(at("CONNECT", hang=True), 72, "A", NO_GREETING, timeout=1),
    "greeting-554-5.7.1": rejected("CONNECT", 554, "5.7.1 No SMTP service for you", "H"),
    "greeting-554-plain": rejected("CONNECT", 554, "No SMTP service here", "H"),
    # --- slow replies: within smtp_timeout delivered, beyond it class A, 72
    "mail-slow-within": Fault(at("MAIL", delay=0.3), timeout=1),
    "rcpt-slow-within": Fault(at("RCPT", delay=0.3), timeout=1),
    "eod-slow-within": Fault(at("EOD", delay=0.3), timeout=1),
    "mail-slow-beyond": Fault(at("MAIL", delay=2.5), 72, "A", TIMEOUT_AT.format(stage="MAIL"), timeout=1),
    "rcpt-slow-beyond": Fault(at("RCPT", delay=2.5), 72, "A", TIMEOUT_AT.format(stage="RCPT"), timeout=1),
    "eod-slow-beyond": Fault(at("EOD", delay=2.5), 72, "A", TIMEOUT_AT.format(stage="DATA"), timeout=1),
    # --- STARTTLS
    # The server offers STARTTLS and refuses it (454) once; B then does TLS.
    "starttls-454-always": Fault(
        at("STARTTLS", 454, "4.7.0 TLS not available due to temporary reason"), 73, "C", STARTTLS_454,
        server=dict(starttls=True), relay="starttls: always, ca_file: {ca}"),
    # starttls: auto does not fall back to plain text after a refused STARTTLS
    # (aiosmtplib upgrades whenever the server offers it): the same 73, retried.
    "starttls-454-auto": Fault(
        at("STARTTLS", 454, "4.7.0 TLS not available due to temporary reason"), 73, "C", STARTTLS_454,
        server=dict(starttls=True), relay="starttls: auto, ca_file: {ca}"),
    # A server that always refuses it (starttls_fails): B meets it too.
    "starttls-fails-always": Fault(
        None, 73, "C", STARTTLS_454, server=dict(starttls_fails=True), relay="starttls: always", b_fails_too=True),
    "starttls-fails-auto": Fault(
        None, 73, "C", STARTTLS_454, server=dict(starttls_fails=True), relay="starttls: auto", b_fails_too=True),
    # The server requires STARTTLS, the relay says never: aiosmtpd's 530 at MAIL
    # has no enhanced code, so class H (a refusal at MAIL), and a 5xx at MAIL is
    # final: every job fails at once.
    "starttls-required-but-never": Fault(
        None, 530, "H", "530 Must issue a STARTTLS command first", final=True,
        server=dict(starttls=True, require_starttls=True), relay="starttls: never", b_fails_too=True),
    # --- AUTH refused: class H, retried (never final). aiosmtplib tries each
    # mechanism the server offers (PLAIN and LOGIN): both are refused, on A's
    # connection only.
    "auth-535": Fault(
        at("AUTH", 535, "5.7.8 Authentication credentials invalid", times=2), 535, "H",
        "535 5.7.8 Authentication credentials invalid",
        server=dict(auth=("user", "secret")), relay="starttls: never, username: user, password_file: ./password"),
}


def read_job(kit: SpoolKit, folder: str, name: str) -> tuple[str, CommandFile, Job]:
    path = kit.root / folder / name
    cf = CommandFile.read(path)
    return path.read_text(encoding="utf-8"), cf, parse_job(cf, name)


def mails(conn: ConnectionInfo) -> int:
    return sum(1 for c in conn.commands if c.upper() == "MAIL")


# --- running the cases --------------------------------------------------------
#
# Each case is one `copiamail node --drain` (a Python process start, then the
# SMTP exchange): about two seconds, mostly waiting. The cases the session
# selected are run side by side (each with its own server and spool) the first
# time one of them is asked for; each test then checks its own case.


@dataclass
class Run:
    kit: SpoolKit
    server: SMTPTestServer
    started: float
    ended: float


def run_case(fault: Fault, base, tls_cert: TLSCert) -> Run:
    options = dict(fault.server)
    if options.get("starttls"):
        options["tls_cert"] = tls_cert
    server = SMTPTestServer(**options)
    if fault.rule is not None:
        server.add_rule(fault.rule())
    server.start()
    try:
        relay = fault.relay.format(ca=tls_cert.cert_path)
        kit = SpoolKit(base, None, ["$domain_limit * @copia.com 1", '$email_retry_delays * "1H"'],
                       yaml=f"relay: {{host: 127.0.0.1, port: {server.port}, {relay}}}\n")
        if fault.timeout is not None:
            config = kit.config_path.read_text().replace("smtp_timeout: 10", f"smtp_timeout: {fault.timeout}")
            kit.config_path.write_text(config)
        (base / "password").write_text("secret\n")
        kit.job("TOSEND", "A.FS", f"$email_esender {BAD_SENDER}", to=BAD_RCPT)
        kit.job("TOSEND", "B.FS", "$email_esender good@acme.test", to=GOOD_RCPT)
        started = time.time()
        result = kit.drain(timeout=30)
        ended = time.time()
        assert result.returncode == 0, result.stderr
        server.wait_idle(timeout=5)
    finally:
        server.stop()
    assert not server.errors, f"SMTP test server raised: {server.errors!r}"
    return Run(kit, server, started, ended)


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory, tls_cert) -> Iterator[dict[str, Future]]:
    wanted = [item.callspec.params["name"] for item in request.session.items
              if item.module is sys.modules[__name__] and hasattr(item, "callspec")]
    with ThreadPoolExecutor(max_workers=6) as pool:
        yield {name: pool.submit(run_case, fault_of(name), tmp_path_factory.mktemp(name), tls_cert) for name in wanted}


PIPELINED = "+pipelining"


def fault_of(name: str) -> Fault:
    """The fault of a case name; ``<name>+pipelining``: against a server that
    offers PIPELINING."""
    base, pipelined, _ = name.partition(PIPELINED)
    fault = FAULTS[base]
    return replace(fault, server={**fault.server, "pipelining": True}) if pipelined else fault


def params():
    for name, fault in FAULTS.items():
        marks = [pytest.mark.xfail(strict=True, reason=fault.xfail)] if fault.xfail else []
        yield pytest.param(name, id=name, marks=marks)
        if name.split("-")[0] in ("mail", "rcpt", "data", "eod") or name == "starttls-required-but-never":
            yield pytest.param(name + PIPELINED, id=name + PIPELINED, marks=marks)


@pytest.mark.parametrize("name", params())
def test_smtp_fault(runs, name):
    fault = fault_of(name)
    run = runs[name].result(timeout=120)
    kit, server = run.kit, run.server
    where = f"127.0.0.1:{server.port}"
    conns = server.connections
    assert all(not c.open for c in conns)

    if fault.delivered:
        assert kit.names("SENT") == ["A.FS", "B.FS"]
        assert [m.rcpt_tos for m in server.messages] == [[BAD_RCPT], [GOOD_RCPT]]
        for job_name in ("A.FS", "B.FS"):
            text, _, job = read_job(kit, "SENT", job_name)
            assert [(a.outcome, a.klass) for a in job.attempts] == [(0, "S")]
            assert "$fax_status1 6\n" in text and "$fax_status2 0\n" in text
        # No error: B rode on A's connection.
        assert len(conns) == 1 and mails(conns[0]) == 2
        return

    # --- A: outcome code, class, EMAIL_ERROR; FAIL or back for a retry -------
    folder = "FAIL" if fault.final else "TOSEND"
    assert "A.FS" in kit.names(folder), {f: kit.names(f) for f in ("TOSEND", "SENT", "FAIL")}
    text, cf, job = read_job(kit, folder, "A.FS")
    error = fault.error.format(where=where)
    assert "\n" not in error
    [record] = job.attempts
    assert (record.node, record.outcome, record.klass, record.text) == ("N1", fault.code, fault.klass, error)
    assert cf.var("EMAIL_ERROR") == error
    assert f"$fax_status2 {fault.code}\n" in text
    if fault.final:
        assert "$fax_status1 6\n" in text
        assert "$fax_next_date" not in text and "$fax_next_time" not in text
    else:
        assert "$fax_status1 2\n" in text
        assert "$fax_next_date " in text and "$fax_next_time " in text
        # $email_retry_delays * "1H": the first retry is an hour on (rounded up to the second).
        assert math.floor(run.started) + RETRY <= job.next_attempt <= math.ceil(run.ended) + RETRY

    # --- B: the node went on, over A's connection after a refusal, else a new one
    if fault.refusal:
        [second] = conns
        assert mails(second) == 2 and "RSET" in second.commands[second.commands.index("MAIL"):]
        assert second.commands[-1] == "QUIT" and second.lost_after is None
    else:
        assert len(conns) == 2
        first, second = conns
        assert first.messages == 0 and mails(first) <= 1  # no MAIL after the error
    if fault.b_fails_too:
        # (aiosmtpd answers MAIL with 530 before STARTTLS without recording it,
        # so the connection count is what shows the two attempts here.)
        b_folder = "FAIL" if fault.final else "TOSEND"
        assert kit.names(b_folder) == ["A.FS", "B.FS"]
        _, _, b_job = read_job(kit, b_folder, "B.FS")
        assert [(a.outcome, a.klass, a.text) for a in b_job.attempts] == [(fault.code, fault.klass, error)]
        assert server.messages == []
    else:
        assert kit.names("SENT") == ["B.FS"]
        [message] = server.messages
        assert message.rcpt_tos == [GOOD_RCPT] and message.conn_serial == second.serial
        assert mails(second) == (2 if fault.refusal else 1)  # B's own, on the fresh connection unless A's stayed
        text, _, b_job = read_job(kit, "SENT", "B.FS")
        assert [(a.outcome, a.klass) for a in b_job.attempts] == [(0, "S")]
        assert "$fax_status1 6\n" in text and "$fax_status2 0\n" in text
        if fault.server.get("starttls") and "never" not in fault.relay:
            assert message.tls  # after a refused STARTTLS, B's connection did TLS
        if fault.server.get("auth"):
            assert message.login == "user"
