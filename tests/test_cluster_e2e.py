"""Cluster-wide limits held in Redis, end to end: nodes as separate
processes on one spool, a real redis-server, and the test SMTP server's own
count of simultaneous connections per recipient domain."""

from __future__ import annotations

import signal
import subprocess
import time

from smtpserver import Rule
from spoolkit import SpoolKit, attempts, stop, wait_until

CLUSTER = "cluster: {{redis: '{url}', lease_seconds: {lease}}}\n"


def _kit(tmp_path, server, redis, yaml: str, cfg=("$domain_limit * @ 4",), lease: int = 3) -> SpoolKit:
    return SpoolKit(tmp_path, server.port, list(cfg), yaml=CLUSTER.format(url=redis.url, lease=lease) + yaml)


def _jobs(kit: SpoolKit, n: int, domains: list[str]) -> None:
    for i in range(n):
        kit.job(f"TOSEND{i % 4}" if i % 4 else "TOSEND", f"R{i:05d}.FS", to=f"u{i}@{domains[i % len(domains)]}")


def _drain_all(kit: SpoolKit, names: list[str], timeout: float = 120) -> list[str]:
    procs = [kit.start(name, "--drain") for name in names]
    deadline = time.monotonic() + timeout
    errs = []
    for p in procs:
        try:
            _out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _code, _out, err = stop(p)
            raise AssertionError(f"a node did not finish its drain: {err}") from None
        assert p.returncode == 0 and "Traceback" not in err, err
        errs.append(err)
    return errs


def _sent_once(kit: SpoolKit, server, n: int) -> None:
    assert len(kit.names("SENT")) == n and kit.waiting() == [] and kit.active() == [] and kit.names("FAIL") == []
    ids = [m.message_id for m in server.messages]
    assert len(ids) == n and len(set(ids)) == n


def _peak_overlap(server, domains: set[str] | None = None) -> int:
    """The most connections open at one instant whose recipients are in
    ``domains`` (None: any), from the server's own open and close times."""
    events = []
    for c in server.connections:
        if c.rcpt_domains and (domains is None or c.rcpt_domains & domains):
            events += [(c.opened_at, 1), (c.closed_at or time.time(), -1)]
    peak = n = 0
    for _, step in sorted(events, key=lambda e: (e[0], e[1])):
        n += step
        peak = max(peak, n)
    return peak


def test_four_nodes_keep_each_domains_cluster_cap_over_2000_jobs(tmp_path, smtp_server, redis_server):
    server = smtp_server()
    server.add_rule(Rule(stage="EOD", delay=0.01))
    redis = redis_server()
    domains = [f"d{i}.test" for i in range(5)]
    stanzas = "".join(f"  {d}: {{cluster_scope_max_outbound_connections: 3}}\n" for d in domains)
    kit = _kit(tmp_path, server, redis, "domain:\n" + stanzas)
    _jobs(kit, 2000, domains)
    _drain_all(kit, ["N1", "N2", "N3", "N4"])
    _sent_once(kit, server, 2000)
    peaks = server.peak_by_domain
    assert all(peaks[d] <= 3 for d in domains), peaks
    assert max(peaks[d] for d in domains) == 3, peaks  # the cap is used, not only kept


def test_a_pooled_regex_cap_holds_over_all_its_domains_and_other_domains_flow(tmp_path, smtp_server, redis_server):
    server = smtp_server()
    server.add_rule(Rule(stage="EOD", delay=0.01))
    redis = redis_server()
    pooled = [f"d{i}.pool.test" for i in range(5)]
    kit = _kit(tmp_path, server, redis,
               "domain:\n  '/.*\\.pool\\.test/': {cluster_scope_max_outbound_connections: 4}\n")
    _jobs(kit, 1000, [*pooled, "free.test"])
    _drain_all(kit, ["N1", "N2", "N3", "N4"])
    _sent_once(kit, server, 1000)
    assert _peak_overlap(server, set(pooled)) <= 4
    assert _peak_overlap(server, set(pooled)) == 4  # all five domains share 4 slots, and use them
    assert server.peak_by_domain["free.test"] > 4  # no cluster cap: each node's $domain_limit only


def test_the_clusters_total_holds_over_every_domain(tmp_path, smtp_server, redis_server):
    server = smtp_server()
    server.add_rule(Rule(stage="EOD", delay=0.01))
    redis = redis_server()
    kit = _kit(tmp_path, server, redis, "cluster_scope_max_outbound_connections: 5\n")
    _jobs(kit, 1000, [f"d{i}.test" for i in range(5)])
    _drain_all(kit, ["N1", "N2", "N3", "N4"])
    _sent_once(kit, server, 1000)
    assert server.peak == 5 and _peak_overlap(server) <= 5


def test_a_killed_nodes_leases_expire_and_the_others_use_its_slots(tmp_path, smtp_server, redis_server):
    server = smtp_server()
    hang = server.add_rule(Rule(stage="EOD", hang=True))
    redis = redis_server()
    kit = _kit(tmp_path, server, redis, "node_stale_after: 1\ndomain:\n  d.test: {cluster_scope_max_outbound_connections: 2}\n",
               lease=3)
    for i in range(12):
        kit.job("TOSEND", f"J{i:02d}.FS", to=f"u{i}@d.test")
    n1 = kit.start("N1")
    wait_until(lambda: server.current == 2 and len([p for p in kit.active() if p.name.endswith(".SENDING")]) == 2,
               timeout=30)
    n2 = kit.start("N2")
    try:
        time.sleep(2.0)  # N2 runs, and N1's leases keep it out
        assert server.connections_total == 2
        server.remove_rule(hang)
        n1.send_signal(signal.SIGKILL)
        n1.wait(timeout=10)
        killed = time.time()
        wait_until(lambda: server.connections_total > 2, timeout=15)
        first = min(c.opened_at for c in server.connections[2:])
        # Not before N1's leases could have expired (renewed every second:
        # at least 2 s left at the kill), and within lease_seconds (plus a read).
        assert 1.5 <= first - killed <= 3 + 1.0, first - killed
        wait_until(lambda: len(kit.names("SENT")) == 12, timeout=60)
    finally:
        code, _, err = stop(n2)
    assert code == 0 and "Traceback" not in err, err
    assert kit.active() == [] and kit.waiting() == [] and kit.names("FAIL") == []
    assert server.peak_by_domain["d.test"] <= 2
    assert sorted(len(m.message_id or "") > 0 for m in server.messages).count(True) == 12
    interrupted = [n for n in kit.names("SENT") if [a[2] for a in attempts(kit.read("SENT", n))] == ["66", "0"]]
    assert len(interrupted) == 2  # the two N1 was sending: recovered by N2, sent once more


def _count_to(server, domain: str) -> int:
    return sum(1 for m in server.messages if any(r.endswith("@" + domain) for r in m.rcpt_tos))


def test_redis_killed_and_restarted_midway_no_cap_exceeded_nothing_failed_free_domains_flow(
        tmp_path, smtp_server, redis_server):
    server = smtp_server()
    server.add_rule(Rule(stage="EOD", delay=0.02))
    server.add_rule(Rule(stage="EOD", match="@free.test", delay=0.05))
    redis = redis_server()
    capped = ["c0.test", "c1.test"]
    stanzas = "".join(f"  {d}: {{cluster_scope_max_outbound_connections: 2}}\n" for d in capped)
    # free.test: one connection per node, so it is still sending when Redis goes
    kit = _kit(tmp_path, server, redis, "workers: 2\ndomain:\n" + stanzas, lease=2,
               cfg=("$domain_limit free.test @ 1", "$domain_limit * @ 4"))
    _jobs(kit, 900, [*capped, "free.test", "free.test"])
    nodes = [kit.start(name) for name in ("N1", "N2")]
    try:
        wait_until(lambda: _count_to(server, "c0.test") >= 20, timeout=30)
        redis.kill()
        down = time.time()
        free_then = _count_to(server, "free.test")
        time.sleep(4.0)
        assert _count_to(server, "free.test") > free_then  # uncapped mail flows while Redis is gone
        capped_later = sum(_count_to(server, d) for d in capped)
        time.sleep(2.0)
        # Connections that could not renew closed after their message: nothing more under the caps.
        assert sum(_count_to(server, d) for d in capped) == capped_later
        assert kit.names("FAIL") == []
        redis.start()  # same port, empty: no leases, no epoch
        wait_until(lambda: len(kit.names("SENT")) == 900, timeout=120)
        assert time.time() - down > 6
    finally:
        errs = [stop(p)[2] for p in nodes]
    assert all("Traceback" not in e for e in errs), errs
    _sent_once(kit, server, 900)
    assert all(server.peak_by_domain[d] <= 2 for d in capped), server.peak_by_domain
    for err in errs:
        # one warning a minute at most per worker (the first here), and one line when Redis is back
        assert 1 <= err.count("cannot be used") <= 2, err
        assert "answers again" in err


def test_redis_absent_at_start_capped_jobs_wait_and_go_once_it_runs(tmp_path, smtp_server, redis_server):
    server = smtp_server()
    from redisserver import RedisServer

    redis = RedisServer(tmp_path)  # not started yet
    kit = _kit(tmp_path, server, redis, "domain:\n  c.test: {cluster_scope_max_outbound_connections: 2}\n", lease=1)
    for i in range(10):
        kit.job("TOSEND", f"C{i}.FS", to=f"u{i}@c.test")
        kit.job("TOSEND", f"F{i}.FS", to=f"u{i}@free.test")
    node = kit.start("N1")
    try:
        wait_until(lambda: len(kit.names("SENT")) == 10, timeout=30)
        time.sleep(1.0)
        assert sorted(kit.names("SENT")) == [f"F{i}.FS" for i in range(10)] and kit.names("FAIL") == []
        redis.start()
        wait_until(lambda: len(kit.names("SENT")) == 20, timeout=30)
    finally:
        redis.kill()
        code, _, err = stop(node)
    assert code == 0 and "Traceback" not in err, err
    assert f"Redis at {redis.url} cannot be used" in err and "wait" in err


def test_a_wrong_redis_password_is_one_line_and_never_printed(tmp_path, smtp_server, redis_server):
    server = smtp_server()
    redis = redis_server(password="right-one")
    (tmp_path / "redis.pw").write_text("Wr0ngPassw0rd\n")
    kit = _kit(tmp_path, server, redis, "domain:\n  c.test: {cluster_scope_max_outbound_connections: 2}\n")
    text = kit.config_path.read_text().replace("lease_seconds: 3}", "lease_seconds: 3, password_file: redis.pw}")
    kit.config_path.write_text(text)
    kit.job("TOSEND", "J.FS", to="u@c.test")
    result = kit.cli("node", "--name", "N1", "--drain", timeout=30)
    assert result.returncode != 0
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "refused the password in cluster.password_file" in lines[0], result.stderr
    assert "Wr0ngPassw0rd" not in result.stderr + result.stdout and "right-one" not in result.stderr
    assert kit.waiting() == ["J.FS"]
    (tmp_path / "redis.pw").write_text("right-one\n")
    assert kit.drain("N1", timeout=60).returncode == 0 and kit.names("SENT") == ["J.FS"]


def test_workers_of_several_nodes_share_a_cluster_cap(tmp_path, smtp_server, redis_server):
    server = smtp_server()
    server.add_rule(Rule(stage="EOD", delay=0.01))
    redis = redis_server()
    domains = [f"d{i}.test" for i in range(4)]
    # One pooled cap over four domains that the workers of each node divide between them.
    kit = _kit(tmp_path, server, redis, "workers: 2\ndomain:\n  '/d.\\.test/': {cluster_scope_max_outbound_connections: 3}\n")
    _jobs(kit, 600, domains)
    _drain_all(kit, ["N1", "N2"])
    _sent_once(kit, server, 600)
    assert _peak_overlap(server, set(domains)) == 3


def test_a_cluster_message_rate_holds_over_all_nodes(tmp_path, smtp_server, redis_server):
    server = smtp_server()
    redis = redis_server()
    kit = _kit(tmp_path, server, redis, "domain:\n  r.test: {cluster_max_message_rate: 10/s}\n")
    _jobs(kit, 60, ["r.test"])
    started = time.time()
    _drain_all(kit, ["N1", "N2", "N3"])
    _sent_once(kit, server, 60)
    assert server.max_messages_in_window(1.0) <= 10
    assert time.time() - started >= 5.0  # 60 messages at 10 a second, whichever node sends them


def test_status_explain_and_the_web_page_show_the_leases_per_key_and_node(tmp_path, smtp_server, redis_server):
    import json

    from test_web_e2e import CHROMIUM, Web, _chromium, _free_port

    server = smtp_server()
    hang = server.add_rule(Rule(stage="EOD", hang=True))
    redis = redis_server()
    kit = _kit(tmp_path, server, redis, "cluster_scope_max_outbound_connections: 10\n"
                                        "domain:\n  c.test: {cluster_scope_max_outbound_connections: 2}\n", lease=2)
    for i in range(4):
        kit.job("TOSEND", f"J{i}.FS", to=f"u{i}@c.test")
    node = kit.start("N1")
    web = Web(kit, f"127.0.0.1:{_free_port()}")
    try:
        wait_until(lambda: server.current == 2, timeout=30)
        doc = json.loads(kit.cli("status", "--json").stdout)
        keys = {k["key"]: k for k in doc["cluster"]["keys"]}
        assert doc["cluster"]["error"] is None and doc["cluster"]["redis"] == redis.url
        assert keys["cluster:domain:c.test"] == {"key": "cluster:domain:c.test", "cap": 2, "leases": 2,
                                                 "nodes": {"N1": 2}}
        assert keys["cluster:total"]["leases"] == 2 and keys["cluster:total"]["cap"] == 10
        assert [n["name"] for n in doc["nodes"] if n["alive"]] == ["N1"]
        tables = kit.cli("status").stdout
        assert "cluster leases" in tables and "cluster:domain:c.test" in tables and "N1 2" in tables
        explained = kit.cli("explain", "u9@c.test").stdout
        assert "cluster:domain:c.test" in explained and "cluster: 2 lease(s) held now (N1 2)" in explained
        web.wait_ready()
        api = {k["key"]: k["leases"] for k in web.status()["cluster"]["keys"]}
        assert api["cluster:domain:c.test"] == 2
        if CHROMIUM is not None:
            dom = _chromium(web.url + "/", "--dump-dom", profile=tmp_path / "chromium")
            assert 'data-leases="cluster:domain:c.test">2<' in dom
        redis.kill()
        down = json.loads(kit.cli("status", "--json").stdout)["cluster"]
        assert down["error"] and "ConnectionError" in down["error"]
        assert "cannot be read" in kit.cli("status").stdout
        server.remove_rule(hang)
    finally:
        web.stop()
        stop(node)


def test_rediss_with_a_password_keeps_the_cap(tmp_path, smtp_server, redis_server, tls_cert):
    server = smtp_server()
    server.add_rule(Rule(stage="EOD", delay=0.02))
    redis = redis_server(password="s3cret", tls=(tls_cert.cert_path, tls_cert.key_path))
    (tmp_path / "redis.pw").write_text("s3cret\n")
    kit = SpoolKit(tmp_path, server.port, ["$domain_limit * @ 4"],
                   yaml=f"cluster: {{redis: '{redis.url}', password_file: redis.pw, lease_seconds: 1}}\n"
                        "domain:\n  c.test: {cluster_scope_max_outbound_connections: 2}\n")
    _jobs(kit, 60, ["c.test"])
    _drain_all(kit, ["N1", "N2"])
    _sent_once(kit, server, 60)
    assert server.peak_by_domain["c.test"] == 2
