"""Adaptive limits end to end: a real node against a real SMTP server that
limits connections per client, throttles, or asks for a rest; what the
server saw, and what the spool holds after."""

from __future__ import annotations

import json
import time

from smtpserver import Rule
from spoolkit import SpoolKit, stop, var


def _peak_after(server, since: float) -> int:
    """The most connections from us open at once at the server after ``since``
    (time.time()), refused ones included."""
    events = []
    for c in server.connections:
        start = max(c.opened_at, since)
        end = c.closed_at if c.closed_at is not None else time.time()
        if end > since:
            events += [(start, 1), (end, -1)]
    peak = now = 0
    for _, step in sorted(events, key=lambda e: (e[0], e[1])):
        now += step
        peak = max(peak, now)
    return peak


def _learned(kit: SpoolKit) -> dict:
    keys: dict = {}
    for f in sorted((kit.root / "LIMITS").glob("*.json")):
        keys.update(json.loads(f.read_text())["keys"])
    return keys


def _jobs(kit: SpoolKit, n: int, domain: str = "a.test", prefix: str = "J") -> None:
    for i in range(n):
        kit.job("TOSEND", f"{prefix}{i:04d}.FS", to=f"user{i}@{domain}")


def test_adaptive_limit_settles_at_what_the_receiver_allows_and_loses_no_job(tmp_path, smtp_server):
    server = smtp_server(max_connections_per_source=3)
    server.add_rule(Rule(stage="EOD", delay=0.02))
    kit = SpoolKit(tmp_path, server.port, ["$domain_limit * @ 10"], "adaptive: true\n")
    _jobs(kit, 600)
    kit.drain(timeout=180)
    assert len(kit.names("SENT")) == 600 and kit.names("FAIL") == [] and kit.waiting() == []
    replies = server.throttle_replies
    assert 1 <= len(replies) <= 30  # at most 5% of the jobs
    first = min(c.opened_at for c in server.connections if c.over_limit)
    assert _peak_after(server, first + 1.0) <= 3
    # A job refused for the connection was not charged an attempt: every job
    # went out at its first attempt, and those sent back say why.
    sent_back = 0
    for name in kit.names("SENT"):
        text = kit.read("SENT", name)
        assert text.count("$attempt_record") == 1
        if var(text, "EMAIL_ERROR") is not None:
            assert "too many connections" in var(text, "EMAIL_ERROR") and var(text, "DOMAINBUSY_COUNT") is not None
            sent_back += 1
    assert 1 <= sent_back <= len(replies)
    learned = _learned(kit)["domain_limit:a.test"]
    assert learned["connections"] == 3 and learned["ceiling"] == 10 and learned["kind"] == "connections"
    assert "too many connections" in learned["reply"]


def test_a_learned_limit_climbs_back_when_the_receiver_allows_more_but_never_above_the_ceiling(tmp_path, smtp_server):
    server = smtp_server(max_connections_per_source=2)
    server.add_rule(Rule(stage="EOD", delay=0.02))
    kit = SpoolKit(tmp_path, server.port, ["$domain_limit * @ 4"],
                   "adaptive: true\nadaptive_recover_after: 10\nadaptive_recover_seconds: 0.5\n")
    _jobs(kit, 150)
    kit.drain(timeout=120)
    # Learned 2; with a recovery this quick it may be trying 3 when the run ends.
    assert _learned(kit)["domain_limit:a.test"]["connections"] in (2, 3)
    server.max_connections_per_source = 10
    server.reset_counters()
    server.clear_throttle_replies()
    started = time.time()
    _jobs(kit, 600, prefix="K")
    kit.drain(timeout=180)
    assert len(kit.names("SENT")) == 750 and kit.names("FAIL") == []
    assert server.throttle_replies == []
    assert 3 <= _peak_after(server, started) <= 4  # climbed, up to the ceiling of 4 and no further
    assert "domain_limit:a.test" not in _learned(kit)  # back at the ceiling: nothing learned is left


def test_a_restarted_node_keeps_its_learned_limit_and_meets_no_burst_of_throttle_replies(tmp_path, smtp_server,
                                                                                           monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")  # status prints one row per line
    server = smtp_server(max_connections_per_source=2)
    server.add_rule(Rule(stage="EOD", delay=0.02))
    kit = SpoolKit(tmp_path, server.port, ["$domain_limit * @ 10"], "adaptive: true\n")
    _jobs(kit, 100)
    kit.drain(timeout=120)
    assert len(server.throttle_replies) >= 1
    assert _learned(kit)["domain_limit:a.test"]["connections"] == 2
    status = kit.cli("status", timeout=60)
    assert status.returncode == 0 and "domain_limit:a.test" in status.stdout
    assert "2 connections (of 10)" in status.stdout and "connections:" in status.stdout
    explain = kit.cli("explain", "x@a.test", "--node", "N1", timeout=60)
    assert explain.returncode == 0, explain.stderr
    assert "learned 2 of 10" in explain.stdout and "too many connections" in explain.stdout
    server.reset_counters()
    server.clear_throttle_replies()
    _jobs(kit, 200, prefix="K")
    kit.drain(timeout=120)
    assert len(kit.names("SENT")) == 300 and server.throttle_replies == []
    assert server.peak_by_source["127.0.0.1"] <= 2


def test_a_suspend_reply_stops_the_domain_leaves_its_jobs_untouched_and_others_go_on(tmp_path, smtp_server):
    server = smtp_server()
    rest = server.add_rule(Rule(stage="RCPT", code=421, times=1, match="@a.test", text=(
        "4.7.0 [TSS04] Messages from 127.0.0.1 temporarily deferred due to unexpected volume or user complaints")))
    server.add_rule(Rule(stage="EOD", delay=0.05))
    kit = SpoolKit(tmp_path, server.port, ["$domain_limit * @ 1"],
                   "adaptive: true\nadaptive_suspend: 4\nwrite_settle: 0\n")
    _jobs(kit, 10, "a.test", "A")
    node = kit.start()
    try:
        try:
            server.wait_until(lambda: rest.spent, timeout=10)
        except TimeoutError:
            raise AssertionError(stop(node)) from None
        time.sleep(0.3)
        before = {n: kit.read("TOSEND", n) for n in kit.names("TOSEND")}
        mails_to_a = sum(1 for m in server.messages if m.rcpt_tos[0].endswith("@a.test"))
        # Another domain, arriving during the suspension: renamed in, as
        # submitters do (with write_settle 0, a file written in place may be
        # read half-written, and fail for want of a recipient).
        for i in range(20):
            kit.submit("TOSEND", f"B{i:04d}.FS", to=f"user{i}@b.test")
        server.wait_until(lambda: sum(1 for m in server.messages if m.rcpt_tos[0].endswith("@b.test")) == 20, timeout=10)
        after = {n: kit.read("TOSEND", n) for n in kit.names("TOSEND")}
        assert {n: t for n, t in after.items() if n.startswith("A")} == before
        assert sum(1 for m in server.messages if m.rcpt_tos[0].endswith("@a.test")) == mails_to_a
        assert _learned(kit)["domain_limit:a.test"]["kind"] == "suspend"
        # Once the suspension is over the domain is sent again (all but the
        # job that got the reply, which waits for its retry).
        server.wait_until(lambda: sum(1 for m in server.messages if m.rcpt_tos[0].endswith("@a.test")) >= 9,
                          timeout=15)
    finally:
        _, _, err = stop(node)
    assert "Traceback" not in err
    assert kit.names("FAIL") == []


def _most_in_any_window(times: list[float], period: float) -> int:
    times = sorted(times)
    most = j = 0
    for i, t in enumerate(times):
        while times[j] <= t - period:
            j += 1
        most = max(most, i - j + 1)
    return most


def test_max_message_rate_is_never_exceeded_in_any_window_at_the_server(tmp_path, smtp_server):
    server = smtp_server()
    # One worker: the server's clock is its own loop's, in this test's process;
    # with two workers busy beside it on two CPUs, it stamped a message 100 ms
    # late, beside the next one (a rate holds per worker: a.test has one).
    kit = SpoolKit(tmp_path, server.port, ["$domain_limit * @ 5"],
                   'workers: 1\ndomain:\n  a.test: {max_message_rate: "10/s"}\n')
    _jobs(kit, 35, "a.test", "A")
    _jobs(kit, 30, "b.test", "B")
    started = time.time()
    kit.drain(timeout=60)
    assert len(kit.names("SENT")) == 65
    a_times = [m.received_at for m in server.messages if m.rcpt_tos[0].endswith("@a.test")]
    b_times = [m.received_at for m in server.messages if m.rcpt_tos[0].endswith("@b.test")]
    assert _most_in_any_window(a_times, 1.0) <= 10
    assert max(a_times) - started >= 3.0  # 35 messages at 10/s take over three seconds
    assert _most_in_any_window(b_times, 1.0) > 10  # another domain is not held to it


def test_a_per_connection_reply_teaches_a_cap_that_the_node_keeps_from_then_on(tmp_path, smtp_server):
    server = smtp_server(max_messages_per_connection=5)
    kit = SpoolKit(tmp_path, server.port, ["$domain_limit * @ 1", '$email_retry_delays * "1S 1S 1S 1S"'],
                   "adaptive: true\n")
    _jobs(kit, 40)
    kit.drain_until(lambda: len(kit.names("SENT")) == 40, timeout=120)
    assert kit.names("FAIL") == []
    assert len(server.throttle_replies) == 1 and server.throttle_replies[0].kind == "per_connection"
    learned = _learned(kit)["domain_limit:a.test"]
    assert learned["per_connection"] == 5 and learned["kind"] == "per_connection"
    assert max(c.messages for c in server.connections) <= 5


def test_a_rate_reply_teaches_a_slower_rate_and_the_receiver_is_not_throttled_again(tmp_path, smtp_server):
    server = smtp_server(max_message_rate="20/s")
    kit = SpoolKit(tmp_path, server.port, ["$domain_limit * @ 4", '$email_retry_delays * "1S 1S 1S 1S"'],
                   "adaptive: true\n")
    _jobs(kit, 150)
    kit.drain_until(lambda: len(kit.names("SENT")) == 150, timeout=180)
    assert kit.names("FAIL") == []
    replies = server.throttle_replies
    assert 1 <= len(replies) <= 12 and {r.kind for r in replies} == {"rate"}
    learned = _learned(kit)["domain_limit:a.test"]
    assert learned["rate"] is not None and learned["rate"] <= 20
    last = max(r.at for r in replies)
    admitted = [s.at for s in server.limits.message_starts if s.admitted and s.at > last]
    assert len(admitted) > 50  # most of the run came after the lesson, and went through


def test_with_two_workers_a_host_that_limits_connections_is_learned_from_all_of_the_nodes_connections(tmp_path,
                                                                                                       smtp_server):
    # Four domains on one host that allows 4 connections from us; the workers
    # share the host's cap. A worker that judged a refusal by its own
    # connections alone learned 1 or 2 and then, counted against the whole
    # node's connections, could hardly open any (a drain twice as long). The
    # receiver refuses after 0.3 s, as a loaded one does: by then the other
    # worker has told its connections (a refusal within its 20 ms of telling
    # is judged without them, as one before a sibling's greeting is).
    server = smtp_server(max_connections_per_source=4, over_limit_delay=0.3)
    server.add_rule(Rule(stage="EOD", delay=0.05))
    kit = SpoolKit(tmp_path, server.port, ["$domain_limit * @ 10"],
                   'workers: 2\nadaptive: true\nhost:\n  "127.0.0.1": {scope_max_outbound_connections: 10}\n')
    for i in range(600):
        kit.job("TOSEND", f"J{i:04d}.FS", to=f"user{i}@{'abcd'[i % 4]}.test")
    kit.drain(timeout=180)
    assert len(kit.names("SENT")) == 600 and kit.names("FAIL") == [] and kit.waiting() == []
    learned = [json.loads(f.read_text())["keys"].get("host:127.0.0.1")
               for f in sorted((kit.root / "LIMITS").glob("*.json"))]
    caps = [entry["connections"] for entry in learned if entry is not None]
    assert caps and all(cap >= 3 for cap in caps), caps
    assert len(server.throttle_replies) <= 30


def test_domains_that_share_a_receiver_counting_all_our_connections_meet_no_storm_of_refusals(tmp_path, smtp_server):
    # Four domains on one receiver that allows 4 connections from us, no host
    # stanza: each domain's key sees only its own connections. The workers'
    # domains learned 1 or 2 each, and a domain at 1 whose lone connection
    # was refused (the others held the receiver's 4) reopened at once: 3,600
    # to 6,500 refusals a drain. Now its host rests for refusal_pause.
    server = smtp_server(max_connections_per_source=4)
    server.add_rule(Rule(stage="EOD", delay=0.05))
    kit = SpoolKit(tmp_path, server.port, ["$domain_limit * @ 10"], "workers: 2\nadaptive: true\nrefusal_pause: 2\n")
    for i in range(600):
        kit.job("TOSEND", f"J{i:04d}.FS", to=f"user{i}@{'abcd'[i % 4]}.pool")
    kit.drain(timeout=180)
    assert len(kit.names("SENT")) == 600 and kit.names("FAIL") == [] and kit.waiting() == []
    assert len(server.throttle_replies) <= 100
    assert all(kit.read("SENT", name).count("$attempt_record") == 1 for name in kit.names("SENT"))
