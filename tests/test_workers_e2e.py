"""End to end: one node run as several worker processes (``workers:``), against a
real SMTP server on 127.0.0.1, reading the spool afterwards."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from smtpserver import Rule
from spoolkit import SpoolKit, children_of, stop, wait_until


@pytest.fixture
def server(smtp_server):
    return smtp_server()


def domains_of_both_workers(n: int) -> list[str]:
    """``n`` domains that, between them, go to both of two workers: any two
    or more do, since the workers are given the domains in turn."""
    assert n >= 2
    return [f"d{i}.example" for i in range(n)]


def test_two_workers_send_every_job_once_and_keep_each_domain_limit(tmp_path, server):
    server.add_rule(Rule(stage="EOD", delay=0.05))
    kit = SpoolKit(tmp_path, server.port, ["$domain_limit * @ 2"], "workers: 2\n")
    domains = domains_of_both_workers(6)
    for i in range(60):
        kit.job("TOSEND", f"J{i:03d}.FS", to=f"u{i}@{domains[i % 6]}")
    result = kit.drain()
    assert result.returncode == 0, result.stderr
    assert len(kit.names("SENT")) == 60
    assert kit.waiting() == [] and kit.names("FAIL") == []
    assert sorted(m.rcpt_tos[0] for m in server.messages) == sorted(f"u{i}@{domains[i % 6]}" for i in range(60))
    for d in domains:
        assert server.peak_by_domain[d] == 2
    assert "sent 60, failed 0" in result.stdout


def test_a_shared_cap_is_counted_for_the_node_so_it_is_never_exceeded(tmp_path, server):
    server.add_rule(Rule(stage="EOD", delay=0.1))
    kit = SpoolKit(tmp_path, server.port, ["$domain_limit * @ 3"], "workers: 2\nserver_max_outbound_connections: 3\n")
    domains = domains_of_both_workers(4)
    for i in range(40):
        kit.job("TOSEND", f"J{i:03d}.FS", to=f"u{i}@{domains[i % 4]}")
    assert kit.drain().returncode == 0
    assert len(kit.names("SENT")) == 40
    assert server.peak == 3


POOLED = '''workers: 2
domain:
  "/.*\\\\.pool/": {scope_max_outbound_connections: 4}
'''


def test_with_two_workers_one_domain_of_a_pooled_cap_uses_all_of_it_and_never_more(tmp_path, server):
    # Every job is for one domain of the pool, so one worker sends them all:
    # the pool's cap is the node's, not divided between the workers.
    server.add_rule(Rule(stage="EOD", delay=0.1))
    kit = SpoolKit(tmp_path, server.port, ["$domain_limit * @ 10"], POOLED)
    busy = "a.pool"
    others = ["x1.pool", "x2.pool"]  # given in turn: at least one goes to the other worker
    for i in range(60):
        kit.job("TOSEND", f"J{i:03d}.FS", to=f"u{i}@{busy}")
    result = kit.drain()
    assert result.returncode == 0, result.stderr
    assert len(kit.names("SENT")) == 60
    assert server.peak_by_domain[busy] == 4
    assert server.peak == 4
    # Then the pool's domains of both workers at once: together never above 4.
    server.reset_counters()
    for i in range(60):
        kit.job("TOSEND", f"K{i:03d}.FS", to=f"u{i}@{([busy] + others)[i % 3]}")
    assert kit.drain().returncode == 0
    assert len(kit.names("SENT")) == 120
    assert server.peak == 4
    assert all(server.peak_by_domain[d] >= 1 for d in [busy, *others])


def test_a_shared_cap_of_one_runs_with_any_number_of_workers(tmp_path, server):
    server.add_rule(Rule(stage="EOD", delay=0.02))
    kit = SpoolKit(tmp_path, server.port, [], "server_max_outbound_connections: 1\n")
    domains = domains_of_both_workers(4)
    for i in range(20):
        kit.job("TOSEND", f"J{i:03d}.FS", to=f"u{i}@{domains[i % 4]}")
    result = kit.cli("node", "--name", "N1", "--drain", "--workers", "3")
    assert result.returncode == 0, result.stderr
    assert len(kit.names("SENT")) == 20 and kit.names("FAIL") == []
    assert server.peak == 1


def test_sigterm_stops_every_worker_and_hands_back_their_jobs(tmp_path, server):
    server.add_rule(Rule(stage="EOD", delay=1.0))
    kit = SpoolKit(tmp_path, server.port, ["$domain_limit * @ 1"], "workers: 2\n")
    domains = domains_of_both_workers(2)
    for i in range(8):
        kit.job("TOSEND", f"J{i:03d}.FS", to=f"u{i}@{domains[i % 2]}")
    proc = kit.start()
    wait_until(lambda: server.current >= 2, timeout=15)
    code, _, err = stop(proc, signal.SIGTERM)
    assert code == 0, err
    assert "Traceback" not in err
    assert kit.active() == []
    assert len(kit.names("SENT")) + len(kit.waiting()) == 8


def test_a_killed_node_takes_its_workers_with_it_and_the_next_start_recovers(tmp_path, server):
    server.add_rule(Rule(stage="EOD", delay=30))
    kit = SpoolKit(tmp_path, server.port, ["$domain_limit * @ 1"], "workers: 2\n")
    domains = domains_of_both_workers(2)
    for i in range(4):
        kit.job("TOSEND", f"J{i:03d}.FS", to=f"u{i}@{domains[i % 2]}")
    proc = kit.start()
    wait_until(lambda: server.current >= 2, timeout=15)
    workers = [p for p in children_of(proc.pid) if b"copiamail.spool.watcher" not in Path(f"/proc/{p}/cmdline").read_bytes()]
    assert len(workers) == 2
    proc.kill()
    proc.wait(timeout=10)
    wait_until(lambda: not any(os.path.exists(f"/proc/{p}") and Path(f"/proc/{p}/stat").read_text().split()[2] != "Z"
                               for p in workers), timeout=10)
    assert kit.active() != []  # the claimed jobs are still there
    server.clear_rules()
    result = kit.drain()
    assert result.returncode == 0, result.stderr
    assert len(kit.names("SENT")) == 4


@pytest.mark.parametrize("cfg", [[], ["$domain_limit * @ 4"]], ids=["node-total-only", "with-a-domain-limit"])
def test_two_busy_domains_in_two_workers_share_a_shared_cap_without_stalling_and_keep_it_full(tmp_path, server, cfg):
    # Both workers' jobs wait on the node total at once: each leaves what it
    # frees over its half to the other, and neither may stall the cap.
    server.add_rule(Rule(stage="EOD", delay=0.02))
    kit = SpoolKit(tmp_path, server.port, cfg, "workers: 2\nserver_max_outbound_connections: 4\n")
    for i in range(150):
        kit.job("TOSEND", f"A{i:03d}.FS", to=f"u{i}@a.example")
        kit.job("TOSEND", f"B{i:03d}.FS", to=f"u{i}@b.example")
    result = kit.drain(timeout=120)
    assert result.returncode == 0, result.stderr
    assert len(kit.names("SENT")) == 300 and kit.names("FAIL") == []
    order = [m.rcpt_tos[0].split("@")[1] for m in server.messages]
    assert set(order[100:200]) == {"a.example", "b.example"}  # side by side, not one after the other
    assert server.peak == 4


def test_a_domain_that_fills_a_shared_cap_makes_room_for_one_that_arrives_in_the_other_worker(tmp_path, server):
    # a.example's own domain limit frees as its connections yield: its jobs
    # must not take back the shared slots left to b.example.
    server.add_rule(Rule(stage="EOD", delay=0.02))
    kit = SpoolKit(tmp_path, server.port, ["$domain_limit * @ 4"], "workers: 2\nserver_max_outbound_connections: 4\n")
    kit.job("TOSEND", "B000.FS", to="first@b.example")  # b.example is the second domain met: the other worker
    for i in range(600):
        kit.job("TOSEND", f"A{i:03d}.FS", to=f"u{i}@a.example")
    proc = kit.start("N1")
    try:
        wait_until(lambda: len(server.messages) >= 60, timeout=60)
        for i in range(1, 41):
            kit.submit("TOSEND", f"B{i:03d}.FS", to=f"u{i}@b.example")
        wait_until(lambda: len(kit.names("SENT")) == 641, timeout=120)
    finally:
        code, _, err = stop(proc)
    assert code == 0, err
    order = [m.rcpt_tos[0].split("@")[1] for m in server.messages]
    late = [i for i, d in enumerate(order) if d == "b.example"][1:]
    assert len(late) == 40
    # Half the cap each: b.example's 40 went out within about 80 messages of
    # its first, while a.example still had hundreds to send (taken back by
    # a.example, the slots left b.example to the end: 601 to 640).
    assert late[-1] < 300 and late[-1] - late[0] < 160, (late[0], late[-1])
    assert server.peak == 4


def test_in_a_drain_a_worker_with_nothing_left_takes_domains_from_one_still_sending_several(tmp_path, server):
    # The domains are given in turn as first met: the two big ones to worker
    # 1, the two small ones to worker 2, which is done at once and asks. Worker
    # 1 leaves it the second of its busy domains; each domain's limit holds
    # for the node throughout, and every job is sent once.
    server.add_rule(Rule(stage="EOD", delay=0.05))
    kit = SpoolKit(tmp_path, server.port, ["$domain_limit * @ 2"], "workers: 2\n")
    first = ["a-big.example", "a-small.example", "b-big.example", "b-small.example"]
    for i, domain in enumerate(first):
        kit.job("TOSEND", f"J{i:03d}.FS", to=f"u{i}@{domain}")
    for i in range(4, 84):
        kit.job("TOSEND", f"J{i:03d}.FS", to=f"u{i}@{('a-big.example', 'b-big.example')[i % 2]}")
    result = kit.drain()
    assert result.returncode == 0, result.stderr
    assert len(kit.names("SENT")) == 84 and kit.waiting() == [] and kit.names("FAIL") == []
    assert len(server.messages) == 84
    by_worker: dict[str, set[str]] = {}
    for name in kit.names("SENT"):
        text = kit.read("SENT", name)
        domain = text.split("@", 1)[1].split()[0]
        worker = [line.split()[11] for line in text.splitlines() if line.startswith("$attempt_record")][-1]
        by_worker.setdefault(domain, set()).add(worker)
    assert by_worker["a-big.example"] == {"E1"}
    assert by_worker["b-big.example"] == {"E1", "E2"}  # moved to worker 2 while it still had jobs
    assert by_worker["a-small.example"] == by_worker["b-small.example"] == {"E2"}
    for domain in ("a-big.example", "b-big.example"):
        assert server.peak_by_domain[domain] == 2
