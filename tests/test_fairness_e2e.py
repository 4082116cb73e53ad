"""No starvation (issue 3): while one big domain saturates the node's total, a
small domain that arrives later still gets its mail out within a bounded wait;
and Momentum's server_reserve_outbound_connections."""

from __future__ import annotations

from smtpserver import Rule
from spoolkit import SpoolKit, stop, wait_until


def test_five_jobs_of_a_small_domain_go_out_long_before_a_2000_job_domain_is_done(tmp_path, smtp_server):
    server = smtp_server()
    kit = SpoolKit(tmp_path, server.port, [], yaml="server_max_outbound_connections: 4\n")
    for i in range(2000):
        kit.job("TOSEND", f"B{i:05d}.FS", to=f"u{i}@big.test")
    proc = kit.start("N1")
    try:
        wait_until(lambda: len(server.messages) >= 100, timeout=60)
        # The small domain's jobs arrive later, and sort after every big one.
        for i in range(5):
            kit.submit("TOSEND", f"Z{i}.FS", to=f"s{i}@small.test")
        wait_until(lambda: len(kit.names("SENT")) == 2005, timeout=180)
    finally:
        code, _, err = stop(proc)
    assert code == 0, err
    order = [m.rcpt_tos[0].split("@")[1] for m in server.messages]
    small_at = [i for i, d in enumerate(order) if d == "small.test"]
    assert len(small_at) == 5
    # All five went out while at least three quarters of the big domain still waited.
    assert max(small_at) < 500, small_at
    assert server.peak == 4


def test_reserve_keeps_slots_of_the_node_total_for_domains_without_a_connection(tmp_path, smtp_server):
    server = smtp_server()
    server.add_rule(Rule(stage="EOD", delay=0.3))
    # One worker: which domain starts first is then the queue order this test reads.
    kit = SpoolKit(tmp_path, server.port, [], yaml="workers: 1\nserver_max_outbound_connections: 4\n"
                   "server_reserve_outbound_connections: 2\n")
    for i in range(12):
        kit.job("TOSEND", f"B{i:03d}.FS", to=f"u{i}@big.test")
    for i in range(3):
        kit.job("TOSEND1", f"S{i}.FS", to=f"s{i}@small.test")
        kit.job("TOSEND1", f"T{i}.FS", to=f"t{i}@tiny.test")
    assert kit.drain().returncode == 0
    assert len(kit.names("SENT")) == 18
    # A domain with a connection open may not take the last 2 of the 4 slots...
    assert server.peak_by_domain["big.test"] == 2
    # ...which stay for the first connection of other domains.
    assert server.peak == 4
    first_small = min(m.received_at for m in server.messages if m.rcpt_tos[0].endswith("small.test"))
    last_big = max(m.received_at for m in server.messages if m.rcpt_tos[0].endswith("big.test"))
    assert first_small < last_big


def test_without_a_reserve_one_domain_may_take_the_whole_node_total(tmp_path, smtp_server):
    server = smtp_server()
    server.add_rule(Rule(stage="EOD", delay=0.3))
    kit = SpoolKit(tmp_path, server.port, [], yaml="server_max_outbound_connections: 4\n")
    for i in range(12):
        kit.job("TOSEND", f"B{i:03d}.FS", to=f"u{i}@big.test")
    assert kit.drain().returncode == 0
    assert server.peak_by_domain["big.test"] == 4


def test_reserve_must_be_smaller_than_the_node_total(tmp_path):
    kit = SpoolKit(tmp_path, 2525, [], yaml="server_max_outbound_connections: 4\nserver_reserve_outbound_connections: 4\n")
    result = kit.cli("check-config")
    assert result.returncode == 2 and "server_reserve_outbound_connections" in result.stderr


def test_a_reserved_slot_goes_to_a_new_domain_even_behind_a_higher_priority_domain(tmp_path, smtp_server):
    server = smtp_server()
    server.add_rule(Rule(stage="EOD", delay=0.4))
    # One worker: which domain starts first is then the queue order this test reads.
    kit = SpoolKit(tmp_path, server.port, [], yaml="workers: 1\nserver_max_outbound_connections: 4\n"
                   "server_reserve_outbound_connections: 2\n")
    for i in range(16):
        kit.job("TOSEND", f"B{i:03d}.FS", to=f"u{i}@big.test")
    for i in range(2):
        kit.job("TOSEND1", f"S{i}.FS", to=f"s{i}@small.test")
    assert kit.drain().returncode == 0
    assert server.peak_by_domain["big.test"] == 2 and server.peak == 3
    last_big = max(m.received_at for m in server.messages if m.rcpt_tos[0].endswith("big.test"))
    assert all(m.received_at < last_big for m in server.messages if m.rcpt_tos[0].endswith("small.test"))


def test_round_robin_does_not_open_a_connection_per_message(tmp_path, smtp_server):
    server = smtp_server()
    kit = SpoolKit(tmp_path, server.port, [], yaml="server_max_outbound_connections: 2\n")
    for i in range(300):
        kit.job("TOSEND", f"J{i:04d}.FS", to=f"u{i}@d{i % 3}.test")
    assert kit.drain().returncode == 0
    assert len(server.messages) == 300
    assert server.connections_total <= 60, server.connections_total  # turns of 10 messages, not 1
