"""`copiamail advise` end to end: a node without adaptive limits sends to three
receivers, each its own domain's MX on its own loopback address (a real DNS
server routes them): one allows 2 connections from us, one 4, one any number.
advise reads the spool the run left and proposes limits for the first two;
after --write, check-config is clean, every old CFG line is kept, and a new
run gets no throttle reply."""

from __future__ import annotations

import json

import pytest
from smtpserver import Rule, SMTPTestServer
from spoolkit import SpoolKit

CFG = b'; limits for every domain\r\n$domain_limit * @ 8\r\n$email_retry_delays * "1H"\r\n'
LIMITS = {"two.test": 2, "four.test": 4, "free.test": None}


@pytest.fixture
def receivers(dns_server):
    """One SMTP server per domain of LIMITS, on 127.0.0.2, .3, .4 (one port),
    each the domain's only MX, allowing that many connections from a client."""
    servers: dict[str, SMTPTestServer] = {}
    try:
        port = 0
        for i, (domain, limit) in enumerate(LIMITS.items()):
            host = f"127.0.0.{2 + i}"
            # The refusal comes after a short wait, as the slow greeting of a
            # busy receiver: the connections it allowed are past their
            # greeting by then, so the count recorded is theirs plus one.
            server = SMTPTestServer(host=host, port=port, max_connections_per_source=limit, over_limit_delay=0.5).start()
            port = server.port
            servers[domain] = server
            dns_server.add(domain, "MX", f"10 mx.{domain}.")
            dns_server.add(f"mx.{domain}", "A", host)
        yield servers
    finally:
        for server in servers.values():
            server.stop()
    assert not [e for s in servers.values() for e in s.errors]


def removed(new: bytes, old: bytes) -> list[bytes]:
    """The lines of ``new`` that are not ``old``'s, given that ``old``'s lines
    appear in ``new`` in order (asserted): the lines inserted."""
    old_lines, extra = old.splitlines(keepends=True), []
    i = 0
    for line in new.splitlines(keepends=True):
        if i < len(old_lines) and line == old_lines[i]:
            i += 1
        else:
            extra.append(line)
    assert i == len(old_lines), "an old line was changed or lost"
    return extra


def test_advise_proposes_what_the_receivers_allow_and_a_rerun_is_not_throttled(tmp_path, dns_server, receivers):
    port = receivers["two.test"].port
    kit = SpoolKit(tmp_path, None, (), yaml=(
        f"dns: {{nameservers: [127.0.0.1], port: {dns_server.port}, timeout: 2}}\n"
        f"mx_port: {port}\n"
        "messages_per_connection: 1\n"  # a connection per message: concurrency, not reuse
        "refusal_pause: 2\n"
    ))
    kit.cfg_path.write_bytes(CFG)
    for server in receivers.values():
        server.add_rule(Rule(stage="EOD", delay=1.0))  # the first connections stay busy
    for domain in LIMITS:
        for i in range(12):
            kit.job("TOSEND", f"{domain.split('.')[0]}{i:02d}.FS", to=f"user{i}@{domain}")
    assert kit.drain(timeout=120).returncode == 0
    assert len(receivers["two.test"].throttle_replies) > 0 and len(receivers["four.test"].throttle_replies) > 0
    assert receivers["free.test"].throttle_replies == []

    result = kit.cli("advise", "--format", "json")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    advice = {item["domain"]: item for item in json.loads(result.stdout)}
    assert set(advice) == {"two.test", "four.test"}
    for domain, item in advice.items():
        assert item["kind"] == "connections" and item["node"] == "N1" and item["current_limit"] == 8
        assert 1 <= item["proposed_limit"] <= LIMITS[domain], item
        assert item["replies"] == len(receivers[domain].throttle_replies)
        assert item["example"] == receivers[domain].throttle_replies[0]
        assert item["line"] == f"$domain_limit N1 @{domain} {item['proposed_limit']}"

    result = kit.cli("advise", "--write")
    assert result.returncode == 0, result.stderr
    written = kit.cfg_path.read_bytes()
    inserted = removed(written, CFG)  # every old line kept, byte for byte
    assert sorted(inserted) == sorted(f"{advice[d]['line']}\r\n".encode() for d in advice)
    check = kit.cli("check-config")
    assert check.returncode == 0 and "warning" not in check.stdout + check.stderr, check.stdout + check.stderr

    # The same receivers, new jobs: the limits written hold them below every receiver's limit.
    for server in receivers.values():
        server.clear_rules()
        server.add_rule(Rule(stage="EOD", delay=0.3))
        server.clear_throttle_replies()
    sent_before = set(kit.names("SENT"))
    for domain in LIMITS:
        for i in range(10):
            kit.job("TOSEND", f"new-{domain.split('.')[0]}{i:02d}.FS", to=f"again{i}@{domain}")
    assert kit.drain(timeout=120).returncode == 0
    assert {name: s.throttle_replies for name, s in receivers.items()} == {name: [] for name in receivers}
    assert len(set(kit.names("SENT")) - sent_before) == 30
    assert not [n for n in kit.waiting() if n.startswith("new-")]
