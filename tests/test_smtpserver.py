"""Self-tests of the SMTP test server (tests/smtpserver.py), with aiosmtplib as
the client.  Each test is bounded by run()'s overall timeout."""

from __future__ import annotations

import asyncio
import os
import smtplib
import ssl
import threading
import time

import aiosmtplib
import pytest
from aiosmtplib import (
    SMTPConnectResponseError,
    SMTPConnectTimeoutError,
    SMTPDataError,
    SMTPRecipientsRefused,
    SMTPResponseException,
    SMTPSenderRefused,
    SMTPServerDisconnected,
    SMTPTimeoutError,
)
from receiverlimits import (
    EXIM_CONNECTIONS,
    GMAIL_RATE,
    MICROSOFT_RATE,
    YAHOO_PER_CONNECTION,
    YAHOO_SUSPEND,
    parse_rate,
)
from smtpserver import Rule, SMTPTestServer

FROM = "sender@copiamail.test"


def run(coro, timeout: float = 5.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def msg(mid: str = "<m1@copiamail.test>", to: str = "a@x.test") -> bytes:
    return (f"From: {FROM}\r\nTo: {to}\r\nSubject: test\r\nMessage-ID: {mid}\r\n"
            f"\r\nHello.\r\n").encode()


def client(server: SMTPTestServer, **kw) -> aiosmtplib.SMTP:
    kw.setdefault("start_tls", False)
    kw.setdefault("timeout", 2)
    return aiosmtplib.SMTP(hostname=server.host, port=server.port, **kw)


async def send(server, to, data=None, **kw):
    async with client(server, **kw) as c:
        return await c.sendmail(FROM, to, data or msg())


# --------------------------------------------------------------------------
# basics, recording


def test_records_message(smtp_server):
    srv = smtp_server()
    assert srv.host == "127.0.0.1" and srv.port > 0
    errors, _ = run(send(srv, ["a@x.test", "b@y.test"], msg("<abc@x>")))
    assert errors == {}
    (m,) = srv.wait_for(1, timeout=2)
    assert m.mail_from == FROM
    assert m.rcpt_tos == ["a@x.test", "b@y.test"]
    assert m.message_id == "<abc@x>"
    assert b"Hello." in m.data and m.data.startswith(b"From: ")
    assert m.peer == "127.0.0.1" and m.peer_port > 0
    assert m.conn_serial == srv.connections[0].serial
    assert abs(m.received_at - time.time()) < 5
    assert m.login is None and m.tls is False
    assert m.parsed()["Subject"] == "test"
    srv.wait_idle(2)
    conn = srv.connections[0]
    assert conn.commands[:3] == ["EHLO", "MAIL", "RCPT"] and conn.commands[-1] == "QUIT"
    assert conn.messages == 1 and not conn.open


def test_wait_for_times_out(smtp_server):
    srv = smtp_server()
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        srv.wait_for(1, timeout=0.2)
    assert time.monotonic() - t0 < 1


def test_only_loopback_hosts():
    with pytest.raises(ValueError):
        SMTPTestServer(host="0.0.0.0")
    with pytest.raises(ValueError):
        SMTPTestServer(host="localhost")


def test_other_loopback_address(smtp_server):
    srv = smtp_server(host="127.0.0.3")
    run(send(srv, ["a@x.test"]))
    assert srv.wait_for(1)[0].rcpt_tos == ["a@x.test"]


def test_context_manager_and_no_leaks():
    def fds():
        return len(os.listdir("/proc/self/fd"))

    with SMTPTestServer() as warm:
        run(send(warm, ["a@x.test"]))
    threads0, fds0 = threading.active_count(), fds()
    for _ in range(10):
        srv = SMTPTestServer(rules=[Rule(stage="DATA", hang=True)])
        with srv:
            async def hold(srv: SMTPTestServer) -> None:
                c = client(srv)
                await c.connect()
                await c.ehlo()
                await c.mail(FROM)
                await c.rcpt("a@x.test")
                # stop the server while this connection hangs in DATA
                task = asyncio.ensure_future(c.data(msg()))
                await asyncio.sleep(0.01)
                srv.stop()
                with pytest.raises(SMTPServerDisconnected):
                    await task
                c.close()
            run(hold(srv))
        assert not srv.running and srv.current == 0
    assert threading.active_count() == threads0
    assert fds() <= fds0 + 2


# --------------------------------------------------------------------------
# counting


def test_peak_three_simultaneous(smtp_server):
    srv = smtp_server()

    async def go():
        cs = [client(srv) for _ in range(3)]
        await asyncio.gather(*(c.connect() for c in cs))
        srv.wait_connections(3, 2)
        assert srv.current == 3
        for c in cs:
            await c.quit()

    run(go())
    srv.wait_idle(2)
    assert srv.peak == 3 and srv.current == 0 and srv.connections_total == 3
    srv.reset_counters()
    assert srv.peak == 0 and srv.connections_total == 0
    run(send(srv, ["a@x.test"]))
    srv.wait_idle(2)
    assert srv.peak == 1 and srv.connections_total == 1


def test_peak_by_source(smtp_server):
    srv = smtp_server()

    async def go():
        cs = [client(srv, source_address=("127.0.0.2", 0)) for _ in range(2)]
        cs.append(client(srv))
        await asyncio.gather(*(c.connect() for c in cs))
        srv.wait_connections(3, 2)
        assert srv.current_by_source == {"127.0.0.2": 2, "127.0.0.1": 1}
        for c in cs:
            await c.quit()

    run(go())
    srv.wait_idle(2)
    assert srv.peak_by_source["127.0.0.2"] == 2
    assert srv.peak_by_source["127.0.0.1"] == 1
    assert srv.peak_by_source["127.0.0.9"] == 0
    assert srv.current_by_source == {}
    assert srv.peak == 3


def test_peak_by_domain(smtp_server):
    srv = smtp_server()

    async def go():
        a, b, c = client(srv), client(srv), client(srv)
        for x in (a, b, c):
            await x.connect()
        await a.sendmail(FROM, ["p@copia.com"], msg())
        await b.sendmail(FROM, ["q@COPIA.com", "r@other.test"], msg())
        await c.sendmail(FROM, ["s@other.test"], msg())
        # a keeps counting for copia.com while open, even sending elsewhere
        await a.sendmail(FROM, ["t@third.test"], msg())
        assert srv.current_by_domain == {"copia.com": 2, "other.test": 2, "third.test": 1}
        await a.quit()
        await b.quit()
        d = client(srv)
        await d.connect()
        await d.sendmail(FROM, ["u@copia.com"], msg())
        await d.quit()
        await c.quit()

    run(go())
    srv.wait_idle(2)
    assert srv.peak_by_domain["copia.com"] == 2
    assert srv.peak_by_domain["other.test"] == 2
    assert srv.peak_by_domain["third.test"] == 1
    assert srv.current_by_domain == {}
    assert len(srv.messages) == 5


def test_peak_by_domain_counts_refused_rcpt(smtp_server):
    srv = smtp_server(rules=[Rule(stage="RCPT", code=550, match="@copia.com")])
    with pytest.raises(SMTPRecipientsRefused):
        run(send(srv, ["x@copia.com"]))
    assert srv.peak_by_domain["copia.com"] == 1


# --------------------------------------------------------------------------
# fault rules


def test_rcpt_550_partial_refusal(smtp_server):
    srv = smtp_server()
    srv.add_rule(Rule(stage="RCPT", code=550, text="5.1.1 <bad@x.test>: User unknown",
                      match="bad@x.test"))
    errors, _ = run(send(srv, ["good@x.test", "bad@x.test"]))
    assert list(errors) == ["bad@x.test"]
    assert errors["bad@x.test"].code == 550
    assert "User unknown" in errors["bad@x.test"].message
    assert srv.wait_for(1)[0].rcpt_tos == ["good@x.test"]


def test_rcpt_all_refused(smtp_server):
    srv = smtp_server(rules=[Rule(stage="RCPT", code=550, text="5.1.1 User unknown")])
    with pytest.raises(SMTPRecipientsRefused) as ei:
        run(send(srv, ["a@x.test", "b@x.test"]))
    assert [e.code for e in ei.value.recipients] == [550, 550]
    assert srv.messages == []


def test_rule_times_then_accept(smtp_server):
    srv = smtp_server()
    rule = srv.add_rule(Rule(stage="RCPT", code=451, text="4.3.0 try later", times=2,
                             match="a@x.test"))
    for _ in range(2):
        with pytest.raises(SMTPRecipientsRefused) as ei:
            run(send(srv, ["a@x.test"]))
        assert ei.value.recipients[0].code == 451
    run(send(srv, ["a@x.test"]))
    assert rule.fired == 2 and rule.spent
    assert len(srv.wait_for(1)) == 1


def test_domain_match_and_specific_before_catch_all(smtp_server):
    srv = smtp_server()
    srv.add_rule(Rule(stage="RCPT", code=452, text="4.5.3 too many"))
    srv.add_rule(Rule(stage="RCPT", code=550, match="@bad.test"))
    errors_exc = None
    try:
        run(send(srv, ["z@bad.test", "y@ok.test"]))
    except SMTPRecipientsRefused as e:
        errors_exc = e
    assert [r.code for r in errors_exc.recipients] == [550, 452]
    srv.clear_rules()
    run(send(srv, ["z@bad.test"]))


def test_mail_stage_reject(smtp_server):
    srv = smtp_server(rules=[Rule(stage="MAIL", code=550, text="5.7.1 sender blocked")])
    with pytest.raises(SMTPSenderRefused) as ei:
        run(send(srv, ["a@x.test"]))
    assert ei.value.code == 550


def test_data_command_reject(smtp_server):
    srv = smtp_server(rules=[Rule(stage="DATA", code=554, text="5.5.0 no valid recipients")])
    with pytest.raises(SMTPDataError) as ei:
        run(send(srv, ["a@x.test"]))
    assert ei.value.code == 554 and srv.messages == []


def test_eod_552_reject(smtp_server):
    srv = smtp_server(rules=[Rule(stage="EOD", code=552, text="5.3.4 message too big",
                                  match="a@x.test")])
    with pytest.raises(SMTPDataError) as ei:
        run(send(srv, ["a@x.test"]))
    assert ei.value.code == 552 and srv.messages == []
    run(send(srv, ["b@x.test"]))
    assert srv.wait_for(1)[0].rcpt_tos == ["b@x.test"]


def test_eod_custom_success_reply_records(smtp_server):
    srv = smtp_server(rules=[Rule(stage="EOD", code=250, text="2.0.0 Ok: queued as ABC123")])
    _, text = run(send(srv, ["a@x.test"]))
    assert "ABC123" in text
    assert len(srv.wait_for(1)) == 1


def test_multiline_reply(smtp_server):
    srv = smtp_server(rules=[Rule(stage="RCPT", code=550, text="5.1.1 first\n5.1.1 second")])
    with pytest.raises(SMTPRecipientsRefused) as ei:
        run(send(srv, ["a@x.test"]))
    assert ei.value.recipients[0].message == "5.1.1 first\n5.1.1 second"


def test_421_then_close(smtp_server):
    srv = smtp_server(rules=[Rule(stage="MAIL", code=421, text="4.7.0 too many connections")])

    async def go():
        c = client(srv)
        await c.connect()
        with pytest.raises(SMTPSenderRefused) as ei:
            await c.sendmail(FROM, ["a@x.test"], msg())
        assert ei.value.code == 421
        assert not c.is_connected  # aiosmtplib closes by itself on 421

    run(go())
    srv.wait_idle(2)
    assert srv.connections[0].closed_at is not None


def test_421_at_rcpt_server_closes(smtp_server):
    srv = smtp_server(rules=[Rule(stage="RCPT", code=421, match="b@x.test")])

    async def go():
        c = client(srv)
        await c.connect()
        # first RCPT accepted, second gets 421 and the link is gone
        with pytest.raises(SMTPServerDisconnected):
            await c.sendmail(FROM, ["a@x.test", "b@x.test", "c@x.test"], msg())

    run(go())
    srv.wait_idle(2)
    assert srv.messages == []


def test_drop_after_354(smtp_server):
    srv = smtp_server(rules=[Rule(stage="EOD", drop=True)])

    async def go():
        c = client(srv)
        await c.connect()
        with pytest.raises(SMTPServerDisconnected):
            await c.sendmail(FROM, ["a@x.test"], msg())

    run(go())
    srv.wait_idle(2)
    assert srv.messages == []
    assert srv.connections[0].commands[-1] == "DATA"


def test_drop_at_rcpt(smtp_server):
    srv = smtp_server(rules=[Rule(stage="RCPT", drop=True)])
    with pytest.raises(SMTPServerDisconnected):
        run(send(srv, ["a@x.test"]))
    srv.wait_idle(2)


def test_delay(smtp_server):
    srv = smtp_server(rules=[Rule(stage="RCPT", delay=0.3)])
    t0 = time.monotonic()
    run(send(srv, ["a@x.test"]))
    assert 0.3 <= time.monotonic() - t0 < 1.5
    assert len(srv.wait_for(1)) == 1


def test_delay_holds_connections_for_limit_tests(smtp_server):
    srv = smtp_server(rules=[Rule(stage="EOD", delay=0.3)])

    async def go():
        await asyncio.gather(*(send(srv, [f"r{i}@copia.com"]) for i in range(4)))

    run(go())
    srv.wait_idle(2)
    assert srv.peak == 4 and srv.peak_by_domain["copia.com"] == 4
    assert len(srv.messages) == 4


def test_delay_provokes_client_timeout(smtp_server):
    srv = smtp_server(rules=[Rule(stage="DATA", delay=1.0)])

    async def go():
        c = client(srv, timeout=0.3)
        await c.connect()
        with pytest.raises(SMTPTimeoutError):
            await c.sendmail(FROM, ["a@x.test"], msg())
        assert not c.is_connected

    run(go())
    srv.wait_idle(2)  # server side closes as soon as the client goes away
    assert srv.messages == []


def test_no_greeting(smtp_server):
    srv = smtp_server(rules=[Rule(stage="CONNECT", hang=True)])

    async def go():
        c = client(srv, timeout=0.3)
        t0 = time.monotonic()
        with pytest.raises(SMTPConnectTimeoutError):
            await c.connect()
        assert time.monotonic() - t0 < 1.5

    run(go())
    assert srv.connections_total == 1
    srv.wait_idle(2)


def test_greeting_554(smtp_server):
    srv = smtp_server(rules=[Rule(stage="GREETING", code=554, text="5.7.1 go away")])

    async def go():
        c = client(srv)
        with pytest.raises(SMTPConnectResponseError) as ei:
            await c.connect()
        assert ei.value.code == 554

    run(go())
    srv.wait_idle(2)

    async def raw():
        r, w = await asyncio.open_connection(srv.host, srv.port)
        assert (await r.readline()).startswith(b"554 5.7.1 go away")
        w.write(b"EHLO me\r\n")
        assert (await r.readline()).startswith(b"503")
        w.write(b"QUIT\r\n")
        assert (await r.readline()).startswith(b"221")
        w.close()

    run(raw())


def test_rules_change_while_running(smtp_server):
    srv = smtp_server()
    r = srv.add_rule(Rule(stage="RCPT", code=450))
    with pytest.raises(SMTPRecipientsRefused):
        run(send(srv, ["a@x.test"]))
    srv.remove_rule(r)
    run(send(srv, ["a@x.test"]))
    assert srv.rules == []


def test_rule_source_match(smtp_server):
    srv = smtp_server(rules=[Rule(stage="MAIL", code=421, source="127.0.0.2")])
    with pytest.raises(SMTPSenderRefused):
        run(send(srv, ["a@x.test"], source_address=("127.0.0.2", 0)))
    run(send(srv, ["a@x.test"]))
    assert srv.wait_for(1)[0].peer == "127.0.0.1"


def test_rule_validation():
    with pytest.raises(ValueError):
        Rule(stage="BOGUS")
    with pytest.raises(ValueError):
        Rule(stage="RCPT", code=550, drop=True)
    assert Rule(stage="helo").stage == "EHLO"
    assert Rule(stage="RCPT", code=421).closes
    assert not Rule(stage="RCPT", code=451).closes


# --------------------------------------------------------------------------
# STARTTLS


def test_starttls_verified(smtp_server, tls_cert):
    srv = smtp_server(starttls=True)
    assert srv.cert_path == tls_cert.cert_path

    async def go():
        # start_tls=None: aiosmtplib upgrades on its own when STARTTLS is offered
        async with client(srv, start_tls=None, cert_bundle=srv.cert_path) as c:
            assert c.get_transport_info("sslcontext") is not None
            await c.sendmail(FROM, ["a@x.test"], msg())

    run(go())
    (m,) = srv.wait_for(1)
    assert m.tls is True and srv.connections[0].tls


def test_starttls_untrusted_cert_fails(smtp_server):
    srv = smtp_server(starttls=True)

    async def go():
        c = client(srv, start_tls=True)  # system CAs only: our cert is not trusted
        with pytest.raises((ssl.SSLError, SMTPServerDisconnected, aiosmtplib.SMTPException)):
            await c.connect()

    run(go())
    srv.wait_idle(2)


def test_require_starttls(smtp_server):
    srv = smtp_server(starttls=True, require_starttls=True)
    with pytest.raises(SMTPSenderRefused) as ei:
        run(send(srv, ["a@x.test"]))
    assert ei.value.code == 530
    run(send(srv, ["a@x.test"], start_tls=True, cert_bundle=srv.cert_path))
    assert srv.wait_for(1)[0].tls


def test_starttls_fails(smtp_server):
    srv = smtp_server(starttls_fails=True)

    async def go():
        c = client(srv, start_tls=None)  # auto: tries STARTTLS because advertised
        with pytest.raises(SMTPResponseException) as ei:
            await c.connect()
        assert ei.value.code == 454
        c2 = client(srv)  # start_tls=False: plain text works
        await c2.connect()
        await c2.ehlo()
        assert c2.supports_extension("starttls")
        await c2.sendmail(FROM, ["a@x.test"], msg())
        await c2.quit()

    run(go())
    assert srv.wait_for(1)[0].tls is False


# --------------------------------------------------------------------------
# AUTH


@pytest.mark.parametrize("method", ["auth_plain", "auth_login"])
def test_auth(smtp_server, method):
    srv = smtp_server(auth=("user", "s3cret"), auth_required=True)

    async def go():
        async with client(srv) as c:
            await c.ehlo()
            assert {"plain", "login"} <= set(c.server_auth_methods)
            with pytest.raises(SMTPSenderRefused) as ei:
                await c.sendmail(FROM, ["a@x.test"], msg())
            assert ei.value.code == 530
            await getattr(c, method)("user", "s3cret")
            await c.sendmail(FROM, ["a@x.test"], msg())

    run(go())
    (m,) = srv.wait_for(1)
    assert m.login == "user" and srv.connections[0].login == "user"


def test_auth_bad_password(smtp_server):
    srv = smtp_server(auth={"user": "s3cret"})

    async def go():
        c = client(srv, username="user", password="wrong")
        with pytest.raises(aiosmtplib.SMTPAuthenticationError) as ei:
            await c.connect()
        assert ei.value.code == 535

    run(go())


def test_no_auth_not_advertised(smtp_server):
    srv = smtp_server()

    async def go():
        async with client(srv) as c:
            await c.ehlo()
            assert not c.supports_extension("auth")

    run(go())


def test_a_connection_beyond_the_clients_limit_gets_the_throttle_reply_and_the_others_go_on(smtp_server):
    srv = smtp_server(max_connections_per_source=1)
    first = smtplib.SMTP(srv.host, srv.port, timeout=5)
    with pytest.raises(smtplib.SMTPConnectError) as refused:
        smtplib.SMTP(srv.host, srv.port, timeout=5)
    assert refused.value.smtp_code == 421 and b"too many connections from 127.0.0.1" in refused.value.smtp_error
    first.sendmail("a@x.test", ["b@y.test"], b"Subject: hi\r\n\r\nhello\r\n")
    first.quit()
    srv.wait_for(1, timeout=5)
    assert srv.throttle_replies == ["421 4.7.0 mx.smtp-test.invalid Error: too many connections from 127.0.0.1"]


# --------------------------------------------------------------------------
# The throttling receiver's hidden limits (tests/receiverlimits.py)

BODY = b"Subject: hi\r\n\r\nhello\r\n"


def smtp(srv: SMTPTestServer) -> smtplib.SMTP:
    c = smtplib.SMTP(srv.host, srv.port, timeout=5)
    c.ehlo("client.copiamail.test")
    return c


def test_the_connection_limits_reply_is_the_receivers_own_and_is_recorded_with_its_evidence(smtp_server):
    srv = smtp_server(max_connections_per_source=2, over_limit_reply=EXIM_CONNECTIONS, server_hostname="mx.exim.test")
    first, second = smtp(srv), smtp(srv)
    with pytest.raises(smtplib.SMTPConnectError) as refused:
        smtplib.SMTP(srv.host, srv.port, timeout=5)
    assert refused.value.smtp_code == 421
    assert refused.value.smtp_error == b"mx.exim.test: Too many concurrent SMTP connections; please try again later"
    [reply] = srv.throttle_replies
    assert reply == "421 mx.exim.test: Too many concurrent SMTP connections; please try again later"  # a str, as before
    assert (reply.kind, reply.source, reply.stage, reply.open, reply.code) == ("connections", "127.0.0.1", "CONNECT", 3, 421)
    assert time.time() - 5 < reply.at <= time.time()
    for c in (first, second):
        c.sendmail(FROM, ["b@y.test"], BODY)
        c.quit()
    srv.wait_for(2, timeout=5)


def test_the_connection_limit_can_be_raised_while_the_receiver_runs(smtp_server):
    srv = smtp_server(max_connections_per_source=1)
    first = smtp(srv)
    with pytest.raises(smtplib.SMTPConnectError):
        smtplib.SMTP(srv.host, srv.port, timeout=5)
    srv.wait_until(lambda: srv.current == 1, what="the refused connection closed")
    srv.set_limits(max_connections_per_source=3)
    others = [smtp(srv), smtp(srv)]
    assert srv.max_connections_per_source == 3 and len(srv.throttle_replies) == 1
    for c in [first, *others]:
        c.quit()
    srv.max_connections_per_source = None  # the old attribute still works
    assert srv.limits.max_connections_per_source is None


def test_a_message_over_the_rate_gets_gmails_reply_at_rcpt_and_the_window_slides(smtp_server):
    srv = smtp_server(max_message_rate=(3, 2.0))
    c = smtp(srv)
    for i in range(3):
        c.sendmail(FROM, [f"u{i}@gmail.test"], BODY)
    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        c.sendmail(FROM, ["u3@gmail.test"], BODY)
    code, text = refused.value.recipients["u3@gmail.test"]
    assert code == 450 and text.decode() == GMAIL_RATE[4:]
    [reply] = srv.throttle_replies
    assert (reply.kind, reply.stage, reply.open) == ("rate", "RCPT", 1)
    c.rset()
    time.sleep(2.05)  # the first three leave the window
    c.sendmail(FROM, ["u4@gmail.test"], BODY)
    c.quit()
    assert len(srv.wait_for(4)) == 4
    starts = srv.message_starts
    assert [s.admitted for s in starts] == [True, True, True, False, True]
    assert srv.max_messages_in_window(2.0) == 4 and srv.max_messages_in_window(2.0, admitted_only=True) == 3


def test_the_rate_can_be_judged_at_mail_from_with_microsofts_reply(smtp_server):
    srv = smtp_server(max_message_rate="1/m", rate_stage="mail", rate_reply=MICROSOFT_RATE)
    c = smtp(srv)
    c.sendmail(FROM, ["a@outlook.test"], BODY)
    with pytest.raises(smtplib.SMTPSenderRefused) as refused:
        c.sendmail(FROM, ["b@outlook.test"], BODY)
    assert refused.value.smtp_code == 451
    assert refused.value.smtp_error.decode() == MICROSOFT_RATE[4:].format(ip="127.0.0.1")
    assert [(r.kind, r.stage) for r in srv.throttle_replies] == [("rate", "MAIL")]
    c.rset()
    c.quit()


def test_the_message_after_the_per_connection_cap_gets_yahoos_421_and_the_connection_closes(smtp_server):
    srv = smtp_server(max_messages_per_connection=2)
    c = smtp(srv)
    for i in range(2):
        c.sendmail(FROM, [f"u{i}@yahoo.test"], BODY)
    with pytest.raises(smtplib.SMTPSenderRefused) as refused:
        c.sendmail(FROM, ["u2@yahoo.test"], BODY)
    assert refused.value.smtp_code == 421 and refused.value.smtp_error.decode() == YAHOO_PER_CONNECTION[4:]
    srv.wait_idle()
    [reply] = srv.throttle_replies
    assert (reply.kind, reply.stage, reply.open) == ("per_connection", "MAIL", 1)
    [conn] = srv.connections
    assert conn.messages == 2 and conn.lost_after is None  # closed by the server
    c2 = smtp(srv)  # a new connection starts a new count
    c2.sendmail(FROM, ["u3@yahoo.test"], BODY)
    c2.quit()


def test_latency_delays_every_end_of_data_reply(smtp_server):
    srv = smtp_server(latency=0.3)
    c = smtp(srv)
    t0 = time.monotonic()
    c.sendmail(FROM, ["a@x.test"], BODY)
    assert time.monotonic() - t0 >= 0.3
    srv.set_limits(latency=0)
    t0 = time.monotonic()
    c.sendmail(FROM, ["b@x.test"], BODY)
    assert time.monotonic() - t0 < 0.3
    c.quit()


def test_a_suspension_answers_every_mail_from_with_yahoos_tss04_for_its_window(smtp_server):
    srv = smtp_server()
    srv.suspend(0.6)
    c = smtp(srv)
    with pytest.raises(smtplib.SMTPSenderRefused) as refused:
        c.sendmail(FROM, ["a@yahoo.test"], BODY)
    assert refused.value.smtp_code == 421
    assert refused.value.smtp_error.decode() == YAHOO_SUSPEND[4:].format(ip="127.0.0.1")
    assert [(r.kind, r.stage) for r in srv.throttle_replies] == [("suspend", "MAIL")]
    time.sleep(0.7)
    c = smtp(srv)
    c.sendmail(FROM, ["a@yahoo.test"], BODY)
    c.quit()


def test_a_suspension_at_connect_refuses_the_greeting_until_resumed(smtp_server):
    srv = smtp_server()
    srv.suspend(60, stage="CONNECT")
    with pytest.raises(smtplib.SMTPConnectError) as refused:
        smtplib.SMTP(srv.host, srv.port, timeout=5)
    assert b"[TSS04]" in refused.value.smtp_error
    srv.resume()
    smtp(srv).quit()
    assert [(r.kind, r.stage) for r in srv.throttle_replies] == [("suspend", "CONNECT")]


def test_the_timeline_of_connections_answers_how_many_were_open_after_a_moment(smtp_server):
    srv = smtp_server()
    a, b, c = smtp(srv), smtp(srv), smtp(srv)
    a.quit()
    srv.wait_until(lambda: srv.current == 2, what="one closed")
    mark = time.time()
    time.sleep(0.01)
    b.quit()
    srv.wait_until(lambda: srv.current == 1, what="two closed")
    d = smtp(srv)
    events = srv.connection_events
    assert [(e.opened, e.open_total) for e in events] == [
        (True, 1), (True, 2), (True, 3), (False, 2), (False, 1), (True, 2)]
    assert all(e.source == "127.0.0.1" and e.open_from_source == e.open_total for e in events)
    assert srv.max_open() == 3
    assert srv.max_open(since=mark) == 2  # the two open at the mark
    assert srv.max_open(since=mark, source="127.0.0.9") == 0
    assert srv.max_open(until=events[1].at) == 2
    c.quit()
    d.quit()


def test_unknown_or_bad_limits_are_refused():
    srv = SMTPTestServer()
    with pytest.raises(TypeError, match="unknown receiver limits"):
        srv.set_limits(max_conections=3)
    with pytest.raises(ValueError):
        srv.set_limits(rate_stage="DATA")
    with pytest.raises(ValueError):
        srv.set_limits(max_message_rate="3/d")
    assert parse_rate("120/m") == (120, 60.0) and parse_rate((5, 2)) == (5, 2.0) and parse_rate(None) is None


@pytest.mark.parametrize("text, kind", [
    (EXIM_CONNECTIONS, "connections"),
    ("421 4.7.0 {host} Error: too many connections from {ip}", "connections"),
    (GMAIL_RATE, "rate"),
    (MICROSOFT_RATE, "rate"),
    (YAHOO_PER_CONNECTION, "per_connection"),
    (YAHOO_SUSPEND, "suspend"),
])
def test_the_receivers_texts_are_the_kinds_copiamail_knows(text, kind):
    from copiamail.throttle import shipped_table

    line = text.format(host="mx.test", ip="127.0.0.1")
    assert shipped_table().kind(int(line[:3]), line[4:]) == kind


def test_receivers_route_each_domain_by_mx_to_its_own_throttling_receiver():
    import dns.resolver
    from throttling import Receivers

    with Receivers({"a.test": dict(max_connections_per_source=1), "b.test": dict(latency=0.01)}) as rx:
        r = dns.resolver.Resolver(configure=False)
        r.nameservers, r.port = [rx.dns.host], rx.dns.port
        for domain, address in (("a.test", "127.0.2.1"), ("b.test", "127.0.2.2")):
            [mx] = r.resolve(domain, "MX")
            assert str(mx.exchange) == f"mx.{domain}." and [a.address for a in r.resolve(mx.exchange, "A")] == [address]
            assert rx[domain].address == (address, rx.port)
        assert rx.transport_map() == f"a.test smtp:[127.0.2.1]:{rx.port}\nb.test smtp:[127.0.2.2]:{rx.port}\n"
        assert f"mx_port: {rx.port}\n" in rx.copiamail_yaml() and f"port: {rx.dns.port}" in rx.copiamail_yaml()
        held = smtplib.SMTP("127.0.2.1", rx.port, timeout=5)
        with pytest.raises(smtplib.SMTPConnectError):
            smtplib.SMTP("127.0.2.1", rx.port, timeout=5)
        with smtplib.SMTP("127.0.2.2", rx.port, timeout=5) as c:
            c.sendmail(FROM, ["u@b.test"], BODY)
        held.quit()
        assert rx.messages == 1 and [x.kind for x in rx.throttle_replies] == ["connections"]
        assert rx.last_message_at() == rx["b.test"].messages[0].received_at
        assert rx.report() == [
            "a.test (allows 1 connections): peak 2 open, 0 msgs, throttle replies: connections 1",
            "b.test (allows any number of connections): peak 1 open, 1 msgs, throttle replies: none",
        ]
        assert rx.errors() == []


def test_with_chunking_it_takes_a_message_in_bdat_chunks_and_reads_a_refused_chunk_whole(smtp_server):
    srv = smtp_server(chunking=True)
    with smtplib.SMTP(srv.host, srv.port, timeout=5) as c:
        c.ehlo("client.copiamail.test")
        assert c.has_extn("chunking")
        assert c.mail(FROM)[0] == 250 and c.rcpt("a@x.test")[0] == 250
        c.send(b"BDAT 12\r\nSubject: s\r\n")
        assert c.getreply()[0] == 250
        c.send(b"BDAT 8 LAST\r\n\r\n.dot\r\n")  # nothing in a chunk is unstuffed
        assert c.getreply()[0] == 250
        # No transaction: refused, and its chunk is read whole, not taken for commands.
        c.send(b"BDAT 3 LAST\r\nabc")
        assert c.getreply()[0] == 503
        assert c.noop()[0] == 250
    srv.wait_for(1, timeout=2)
    assert [m.data for m in srv.messages] == [b"Subject: s\r\n\r\n.dot\r\n"]
