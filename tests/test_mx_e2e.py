"""Direct MX delivery end to end: a real DNS server on 127.0.0.1 answering from
a table, SMTP servers on 127.0.0.2, 127.0.0.3 ... (one port, as mx_port says),
and the `copiamail node` CLI with no relay (SPEC 5, issue 3)."""

from __future__ import annotations

import pytest
from smtpserver import Rule, SMTPTestServer
from spoolkit import SpoolKit, attempts, var


@pytest.fixture
def mx_servers():
    """mx_servers(n): n started SMTP servers on 127.0.0.2 ... 127.0.0.(n+1), one port."""
    servers: list[SMTPTestServer] = []

    def make(n: int) -> list[SMTPTestServer]:
        first = SMTPTestServer(host="127.0.0.2").start()
        servers.append(first)
        for i in range(1, n):
            servers.append(SMTPTestServer(host=f"127.0.0.{2 + i}", port=first.port).start())
        return servers[-n:]

    yield make
    for s in servers:
        s.stop()
    assert not [e for s in servers for e in s.errors]


def mx_kit(tmp_path, dns_server, port, *cfg, yaml=""):
    return SpoolKit(tmp_path, None, cfg, yaml=(
        f"dns: {{nameservers: [127.0.0.1], port: {dns_server.port}, timeout: 2}}\n"
        f"mx_port: {port}\n" + yaml
    ))


def test_mail_goes_to_the_most_preferred_mx(tmp_path, dns_server, mx_servers):
    mx1, mx2 = mx_servers(2)
    dns_server.add("a.test", "MX", "20 mx2.a.test.", "10 mx1.a.test.")
    dns_server.add("mx1.a.test", "A", "127.0.0.2")
    dns_server.add("mx2.a.test", "A", "127.0.0.3")
    kit = mx_kit(tmp_path, dns_server, mx1.port)
    for i in range(3):
        kit.job("TOSEND", f"J{i}.FS", to=f"u{i}@a.test")
    assert kit.drain().returncode == 0
    assert len(kit.names("SENT")) == 3
    assert len(mx1.messages) == 3 and mx2.messages == []
    assert var(kit.read("SENT", "J0.FS"), "EMAIL_CONNECT_IP") == "127.0.0.2"


def test_a_refusing_mx_is_skipped_for_the_next_within_the_same_attempt(tmp_path, dns_server, mx_servers):
    (mx2,) = mx_servers(1)  # 127.0.0.2 listens; 127.0.0.9 (the first MX) does not
    dns_server.add("b.test", "MX", "10 dead.b.test.", "20 live.b.test.")
    dns_server.add("dead.b.test", "A", "127.0.0.9")
    dns_server.add("live.b.test", "A", "127.0.0.2")
    kit = mx_kit(tmp_path, dns_server, mx2.port)
    kit.job("TOSEND", "J.FS", to="u@b.test")
    assert kit.drain().returncode == 0
    text = kit.read("SENT", "J.FS")
    assert [a[2] for a in attempts(text)] == ["0"]  # the dead host cost no attempt
    assert var(text, "EMAIL_CONNECT_IP") == "127.0.0.2"


def test_a_full_host_sends_the_job_to_the_next_mx(tmp_path, dns_server, mx_servers):
    mx1, mx2 = mx_servers(2)
    for s in (mx1, mx2):
        s.add_rule(Rule(stage="EOD", delay=0.4))
    dns_server.add("c.test", "MX", "10 mx1.c.test.", "20 mx2.c.test.")
    dns_server.add("mx1.c.test", "A", "127.0.0.2")
    dns_server.add("mx2.c.test", "A", "127.0.0.3")
    kit = mx_kit(tmp_path, dns_server, mx1.port, yaml='host:\n  "mx1.c.test": {scope_max_outbound_connections: 1}\n')
    for i in range(4):
        kit.job("TOSEND", f"J{i}.FS", to=f"u{i}@c.test")
    assert kit.drain().returncode == 0
    assert len(kit.names("SENT")) == 4
    assert mx1.peak == 1
    assert mx2.peak >= 2
    assert len(mx1.messages) + len(mx2.messages) == 4


def test_a_domain_without_mx_gets_its_mail_at_its_a_record(tmp_path, dns_server, mx_servers):
    (srv,) = mx_servers(1)
    dns_server.add("plain.test", "A", "127.0.0.2")
    kit = mx_kit(tmp_path, dns_server, srv.port)
    kit.job("TOSEND", "J.FS", to="u@plain.test")
    assert kit.drain().returncode == 0
    assert kit.names("SENT") == ["J.FS"] and len(srv.messages) == 1


def test_nxdomain_fails_the_job_at_once_as_class_d(tmp_path, dns_server, mx_servers):
    # SPEC 4: a domain that does not exist fails at once, as Postfix bounces it.
    (srv,) = mx_servers(1)
    kit = mx_kit(tmp_path, dns_server, srv.port, '$email_retry_delays * "1H"')
    kit.job("TOSEND2", "J.FS", to="u@nowhere.test")
    assert kit.drain().returncode == 0
    assert kit.names("FAIL") == ["J.FS"]
    text = kit.read("FAIL", "J.FS")
    [[_, _, code, klass, _]] = attempts(text)
    assert (code, klass) == ("80", "D")
    assert var(text, "EMAIL_ERROR") == "DNS: nowhere.test: no such domain (NXDOMAIN)"
    assert "$fax_status1 6" in text and "$fax_status2 80" in text and "$fax_next_time" not in text


def retried_once(kit: SpoolKit, to: str) -> tuple[str, str, str]:
    """Drain one job for ``to``; it must be back in TOSEND for a retry: its
    (outcome, class, EMAIL_ERROR)."""
    kit.job("TOSEND", "J.FS", to=to)
    assert kit.drain().returncode == 0
    text = kit.read("TOSEND", "J.FS")
    assert "$fax_status1 2" in text and "$fax_next_time" in text
    [[_, _, code, klass, _]] = attempts(text)
    return code, klass, var(text, "EMAIL_ERROR")


def test_servfail_is_a_class_d_retry(tmp_path, dns_server, mx_servers):
    (srv,) = mx_servers(1)
    dns_server.add("broken.test", "MX", "10 mx.broken.test.")
    dns_server.servfail("broken.test")
    kit = mx_kit(tmp_path, dns_server, srv.port, '$email_retry_delays * "1H"')
    code, klass, error = retried_once(kit, "u@broken.test")
    assert (code, klass) == ("81", "D") and "broken.test" in error


def test_a_mail_host_name_that_does_not_exist_is_a_class_d_retry(tmp_path, dns_server, mx_servers):
    # The domain exists; its MX names a host that does not: the domain's DNS
    # is at fault and may be mended, so the job is not failed for good.
    (srv,) = mx_servers(1)
    dns_server.add("typo.test", "MX", "10 mx.tpyo.test.")
    kit = mx_kit(tmp_path, dns_server, srv.port, '$email_retry_delays * "1H"')
    assert retried_once(kit, "u@typo.test") == ("81", "D", "DNS: mx.tpyo.test: no such host (NXDOMAIN)")


def test_a_dns_timeout_is_a_class_d_retry(tmp_path, dns_server, mx_servers):
    (srv,) = mx_servers(1)
    dns_server.add("slow.test", "A", "127.0.0.2")
    dns_server.delay("slow.test", 5)
    kit = mx_kit(tmp_path, dns_server, srv.port, '$email_retry_delays * "1H"')
    kit.config_path.write_text(kit.config_path.read_text().replace("timeout: 2", "timeout: 0.5"))
    kit.job("TOSEND", "J.FS", to="u@slow.test")
    assert kit.drain().returncode == 0
    [[_, _, code, klass, _]] = attempts(kit.read("TOSEND", "J.FS"))
    assert (code, klass) == ("81", "D")


def test_a_null_mx_fails_the_job_for_good(tmp_path, dns_server, mx_servers):
    (srv,) = mx_servers(1)
    dns_server.add("nomail.test", "MX", "0 .")
    kit = mx_kit(tmp_path, dns_server, srv.port)
    kit.job("TOSEND", "J.FS", to="u@nomail.test")
    assert kit.drain().returncode == 0
    assert "accepts no mail" in var(kit.read("FAIL", "J.FS"), "EMAIL_ERROR")


def test_one_lookup_serves_every_job_of_a_domain(tmp_path, dns_server, mx_servers):
    (srv,) = mx_servers(1)
    dns_server.add("many.test", "MX", "10 mx.many.test.")
    dns_server.add("mx.many.test", "A", "127.0.0.2")
    kit = mx_kit(tmp_path, dns_server, srv.port)
    for i in range(20):
        kit.job("TOSEND", f"J{i:02d}.FS", to=f"u{i}@many.test")
    assert kit.drain().returncode == 0
    assert len(kit.names("SENT")) == 20
    assert [q for q in dns_server.queries if q[0] == "many.test"] == [("many.test", "MX")]


def test_two_mx_names_on_one_ip_share_a_host_limit(tmp_path, dns_server, mx_servers):
    (srv,) = mx_servers(1)
    srv.add_rule(Rule(stage="EOD", delay=0.3))
    dns_server.add("wanadoo.fr", "MX", "10 smtp.wanadoo.test.")
    dns_server.add("orange.fr", "MX", "10 smtp.orange.test.")
    dns_server.add("smtp.wanadoo.test", "A", "127.0.0.2")
    dns_server.add("smtp.orange.test", "A", "127.0.0.2")
    # The stanza names one of the two MX names only: the limit is the address's.
    kit = mx_kit(tmp_path, dns_server, srv.port, yaml='host:\n  "smtp.wanadoo.test": {scope_max_outbound_connections: 3}\n')
    for i in range(6):
        kit.job("TOSEND", f"W{i}.FS", to=f"w{i}@wanadoo.fr")
        kit.job("TOSEND", f"O{i}.FS", to=f"o{i}@orange.fr")
    assert kit.drain().returncode == 0
    assert len(kit.names("SENT")) == 12
    assert srv.peak == 3
    assert srv.peak_by_domain["orange.fr"] >= 1 and srv.peak_by_domain["wanadoo.fr"] >= 1


def test_a_host_limit_by_ip_holds_across_mx_names(tmp_path, dns_server, mx_servers):
    (srv,) = mx_servers(1)
    srv.add_rule(Rule(stage="EOD", delay=0.3))
    for d in ("d1.test", "d2.test", "d3.test"):
        dns_server.add(d, "MX", f"10 mx.{d}.")
        dns_server.add(f"mx.{d}", "A", "127.0.0.2")
    kit = mx_kit(tmp_path, dns_server, srv.port, yaml='host:\n  "127.0.0.2": {scope_max_outbound_connections: 2}\n')
    for d in ("d1.test", "d2.test", "d3.test"):
        for i in range(3):
            kit.job("TOSEND", f"{d}-{i}.FS", to=f"u{i}@{d}")
    assert kit.drain().returncode == 0
    assert len(kit.names("SENT")) == 9 and srv.peak == 2


def test_domain_limit_holds_in_direct_delivery(tmp_path, dns_server, mx_servers):
    (srv,) = mx_servers(1)
    srv.add_rule(Rule(stage="EOD", delay=0.25))
    dns_server.add("e.test", "MX", "10 mx.e.test.")
    dns_server.add("mx.e.test", "A", "127.0.0.2")
    kit = mx_kit(tmp_path, dns_server, srv.port, "$domain_limit * @e.test 2")
    for i in range(6):
        kit.job("TOSEND", f"J{i}.FS", to=f"u{i}@e.test")
    assert kit.drain().returncode == 0
    assert len(kit.names("SENT")) == 6 and srv.peak_by_domain["e.test"] == 2


def test_explain_lists_the_limits_for_each_mail_host(tmp_path, dns_server, mx_servers):
    (srv,) = mx_servers(1)
    dns_server.add("f.test", "MX", "10 mx1.f.test.", "20 mx2.f.test.")
    dns_server.add("mx1.f.test", "A", "127.0.0.2")
    dns_server.add("mx2.f.test", "A", "127.0.0.3")
    kit = mx_kit(tmp_path, dns_server, srv.port, "$domain_limit * @f.test 2", yaml='host:\n  "mx2.f.test": {scope_max_outbound_connections: 1}\n')
    out = kit.cli("explain", "u@f.test").stdout
    assert "mx1.f.test" in out and "127.0.0.2" in out and "mx2.f.test" in out
    assert "host:127.0.0.3" in out and "domain_limit:f.test" in out


def test_when_every_mail_host_is_full_the_job_is_deferred(tmp_path, dns_server, mx_servers):
    (srv,) = mx_servers(1)
    srv.add_rule(Rule(stage="EOD", delay=0.3))
    dns_server.add("g.test", "MX", "10 mx.g.test.")
    dns_server.add("mx.g.test", "A", "127.0.0.2")
    kit = mx_kit(tmp_path, dns_server, srv.port, yaml='host:\n  "mx.g.test": {scope_max_outbound_connections: 1}\n')
    for i in range(3):
        kit.job("TOSEND", f"J{i}.FS", to=f"u{i}@g.test")
    assert kit.drain().returncode == 0
    counts = sorted(var(kit.read("SENT", n), "DOMAINBUSY_COUNT") or "0" for n in kit.names("SENT"))
    assert counts == ["0", "1", "1"] and srv.peak == 1
    assert all([a[2] for a in attempts(kit.read("SENT", n))] == ["0"] for n in kit.names("SENT"))


def test_mail_hosts_that_never_greet_cost_one_attempt_and_the_drain_ends(tmp_path, dns_server, mx_servers):
    mx1, mx2 = mx_servers(2)
    for s in (mx1, mx2):
        s.add_rule(Rule(stage="CONNECT", hang=True))
    dns_server.add("h.test", "MX", "10 mx1.h.test.", "20 mx2.h.test.")
    dns_server.add("mx1.h.test", "A", "127.0.0.2")
    dns_server.add("mx2.h.test", "A", "127.0.0.3")
    kit = mx_kit(tmp_path, dns_server, mx1.port, '$email_retry_delays * "1H"')
    kit.config_path.write_text(kit.config_path.read_text().replace("smtp_timeout: 10", "smtp_timeout: 1"))
    kit.job("TOSEND", "J.FS", to="u@h.test")
    assert kit.drain(timeout=60).returncode == 0
    text = kit.read("TOSEND", "J.FS")
    [[_, _, code, klass, _]] = attempts(text)
    assert (code, klass) == ("72", "A")
    assert mx1.connections_total == 1 and mx2.connections_total == 1


def test_a_host_stanza_name_resolved_late_still_limits_the_address(tmp_path, dns_server, mx_servers):
    import time

    from spoolkit import stop, wait_until

    (srv,) = mx_servers(1)
    srv.add_rule(Rule(stage="EOD", delay=1.5))
    dns_server.add("orange.fr", "MX", "10 smtp.orange.test.")
    dns_server.add("wanadoo.fr", "MX", "10 smtp.wanadoo.test.")
    dns_server.add("smtp.orange.test", "A", "127.0.0.2")
    dns_server.add("smtp.wanadoo.test", "A", "127.0.0.2")
    dns_server.add("stanza.name.test", "A", "127.0.0.2")
    dns_server.delay("stanza.name.test", 3)  # the stanza's name does not resolve at start
    kit = mx_kit(tmp_path, dns_server, srv.port, yaml='host:\n  "stanza.name.test": {scope_max_outbound_connections: 2}\n')
    kit.config_path.write_text(kit.config_path.read_text().replace("timeout: 2", "timeout: 0.5"))
    for i in range(4):
        kit.job("TOSEND", f"O{i}.FS", to=f"o{i}@orange.fr")
    proc = kit.start("N1")
    try:
        wait_until(lambda: srv.current == 4, timeout=15)  # unknown yet: no limit on the address
        dns_server.delay("stanza.name.test", 0)
        time.sleep(1.0)  # a scan learns the name: the 4 open connections now count
        for i in range(4):
            kit.job("TOSEND", f"W{i}.FS", to=f"w{i}@wanadoo.fr")
        wait_until(lambda: len(kit.names("SENT")) == 8, timeout=30)
    finally:
        stop(proc)
    assert srv.peak == 4  # the wanadoo jobs did not add to the 4 already open
    wanadoo_opened = min(c.opened_at for c in srv.connections if "wanadoo.fr" in c.rcpt_domains)
    orange_open_then = [c for c in srv.connections if "orange.fr" in c.rcpt_domains and c.opened_at < wanadoo_opened
                        and (c.closed_at is None or c.closed_at > wanadoo_opened)]
    assert len(orange_open_then) < 2
