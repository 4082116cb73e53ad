"""Throttle replies at a real SMTP server that limits connections per client:
the evidence the engine writes with each throttled attempt."""

from __future__ import annotations

import time

from smtpserver import Rule
from spoolkit import SpoolKit, stop, var, wait_until


def test_a_job_refused_by_a_connection_limit_of_2_records_3_connections_and_the_reply(tmp_path, smtp_server):
    # The receiver allows 2 connections from us and answers a third with
    # Postfix's reply; the first two stay busy (a slow end of data) while the
    # refusal comes (after a short delay, so both are past their greeting).
    server = smtp_server(max_connections_per_source=2, over_limit_delay=1.0)
    server.add_rule(Rule(stage="EOD", delay=2.0))
    kit = SpoolKit(tmp_path, server.port, ["$domain_limit * @ 3"], "messages_per_connection: 1\n")
    for i in range(3):
        kit.job("TOSEND", f"J{i}.FS", to=f"user{i}@a.test")
    kit.drain()
    server.wait_for(2, timeout=5)
    assert len(server.messages) == 2 and len(server.throttle_replies) == 1
    [throttled] = kit.names("TOSEND")
    text = kit.read("TOSEND", throttled)
    assert var(text, "EMAIL_ERROR") == "421 4.7.0 mx.smtp-test.invalid Error: too many connections from 127.0.0.1"
    assert var(text, "EMAIL_CONNECTIONS") == "3"


def test_a_refusal_that_is_no_throttle_reply_records_no_connections(tmp_path, smtp_server):
    server = smtp_server()
    server.add_rule(Rule(stage="RCPT", code=451, text="4.3.0 temporary failure"))
    kit = SpoolKit(tmp_path, server.port)
    kit.job("TOSEND", "J.FS", to="user@a.test")
    kit.drain()
    text = kit.read("TOSEND", "J.FS")
    assert var(text, "EMAIL_ERROR") == "451 4.3.0 temporary failure"
    assert var(text, "EMAIL_CONNECTIONS") is None


def _postfix_like_run(tmp_path, smtp_server, yaml: str) -> tuple[SpoolKit, object]:
    """40 jobs to a receiver that allows 2 connections from us, with
    `$domain_limit * @ 6`: the first 6 connections open at once, 4 are refused."""
    server = smtp_server(max_connections_per_source=2)
    server.add_rule(Rule(stage="EOD", delay=0.05))
    kit = SpoolKit(tmp_path, server.port, ["$domain_limit * @ 6"], yaml)
    for i in range(40):
        kit.job("TOSEND", f"J{i:02d}.FS", to=f"user{i}@a.test")
    kit.drain(timeout=120)
    return kit, server


def test_after_a_refused_connection_no_new_connection_opens_to_that_host_for_refusal_pause(tmp_path, smtp_server):
    kit, server = _postfix_like_run(tmp_path, smtp_server, "")
    # Only the connections opened before the first refusal came are refused:
    # at most 6 - 2. Their jobs are charged one attempt each; every other job
    # waited (no attempt) and went out over the two connections that stayed.
    retried = kit.names("TOSEND")
    assert len(server.throttle_replies) <= 4 and len(retried) == len(server.throttle_replies)
    assert kit.names("FAIL") == [] and len(kit.names("SENT")) == 40 - len(retried)
    assert server.peak_by_source["127.0.0.1"] <= 6
    for name in retried:
        assert kit.read("TOSEND", name).count("$attempt_record") == 1
    for name in kit.names("SENT"):
        assert kit.read("SENT", name).count("$attempt_record") == 1  # delivered at its first attempt


def test_without_the_pause_each_refused_connection_makes_room_for_another_refused_one(tmp_path, smtp_server):
    kit, server = _postfix_like_run(tmp_path, smtp_server, "refusal_pause: 0\n")
    assert len(server.throttle_replies) > 4 and len(kit.names("TOSEND")) == len(server.throttle_replies)


def test_max_deliveries_per_connection_is_never_exceeded_at_the_server(tmp_path, smtp_server):
    server = smtp_server()
    kit = SpoolKit(tmp_path, server.port, ["$domain_limit * @ 1"],
                   "domain:\n  a.test: {max_deliveries_per_connection: 3}\n")
    for i in range(10):
        kit.job("TOSEND", f"A{i}.FS", to=f"user{i}@a.test")
    for i in range(7):
        kit.job("TOSEND", f"B{i}.FS", to=f"user{i}@b.test")
    kit.drain()
    server.wait_for(17, timeout=5)
    by_connection: dict[int, set[str]] = {}
    for m in server.messages:
        by_connection.setdefault(m.conn_serial, set()).update(r.split("@")[1] for r in m.rcpt_tos)
    per_connection = {c.serial: c.messages for c in server.connections}
    a_test = [per_connection[s] for s, domains in by_connection.items() if domains == {"a.test"}]
    assert sum(a_test) == 10 and max(a_test) == 3  # 4 connections: 3, 3, 3, 1
    assert max(per_connection[s] for s, domains in by_connection.items() if domains == {"b.test"}) == 7


def test_a_refusal_met_by_one_worker_pauses_the_host_for_the_other_worker_too(tmp_path, smtp_server):
    # The receiver allows 1 connection from us. Worker 0 sends a.test: its
    # first message is slow, its second connection is refused. b.test, met
    # next, goes to worker 1: during the pause it must open nothing either.
    server = smtp_server(max_connections_per_source=1)
    server.add_rule(Rule(stage="EOD", delay=3.0))
    kit = SpoolKit(tmp_path, server.port, ["$domain_limit * @ 2"], "workers: 2\nrefusal_pause: 4\n")
    kit.submit("TOSEND", "A1.FS", to="user1@a.test")
    node = kit.start()
    try:
        wait_until(lambda: len(server.message_starts) == 1, timeout=10)
        # Past the node's first second: a job that arrives before its watcher
        # is up waits write_settle (it might be being written in place).
        time.sleep(1.0)
        kit.submit("TOSEND", "A2.FS", to="user2@a.test")
        wait_until(lambda: len(server.throttle_replies) == 1, timeout=5)
        # The node has taken the refusal in (and paused the host) once A2 is
        # back in its folder with an attempt: a job met before that may still
        # connect, as no pause can stop a connection opened before it.
        wait_until(lambda: "$attempt_record" in _text_or_empty(kit.root / "TOSEND" / "A2.FS"), timeout=5)
        opened = len(server.connections)
        kit.submit("TOSEND", "B1.FS", to="user1@b.test")
        time.sleep(1.5)
        assert len(server.throttle_replies) == 1 and len(server.connections) == opened
        wait_until(lambda: "B1.FS" in kit.names("SENT"), timeout=20)
    finally:
        code, _, err = stop(node)
    assert code == 0, err
    assert len(server.throttle_replies) == 1
    assert "A1.FS" in kit.names("SENT") and "A2.FS" in kit.names("TOSEND")  # A2: refused, charged, retried later
    b1 = kit.read("SENT", "B1.FS")
    assert b1.count("$attempt_record") == 1 and var(b1, "DOMAINBUSY_COUNT") == "1"  # it waited, uncharged


def _text_or_empty(path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return ""  # claimed meanwhile
