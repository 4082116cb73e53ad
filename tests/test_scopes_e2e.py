"""End to end: the scoped connection limits of SPEC 5 (Momentum's
scope_max_outbound_connections / max_outbound_connections, the node total and
$domain_limit together), each reached and never exceeded at a real SMTP server.

Every test sends through ONE relay, the test server on 127.0.0.1. Bindings use
127.0.0.2, 127.0.0.3 ... as source addresses (Linux loopback), and the server
reports the source IP of every connection. A delay at end of data holds the
connections open long enough for each cap to be reached; each test sends about
three times the cap, so reaching it is not luck of timing.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable

import pytest
from smtpserver import Rule, SMTPTestServer
from spoolkit import SpoolKit

B1, B2, B3 = "127.0.0.2", "127.0.0.3", "127.0.0.4"
RELAY = "127.0.0.1"

POOL1 = (
    "binding_group:\n"
    "  pool1:\n"
    "    binding:\n"
    f"      b1: {{bind_address: {B1}}}\n"
    f"      b2: {{bind_address: {B2}}}\n"
)


@pytest.fixture
def server(smtp_server):
    srv = smtp_server()
    srv.add_rule(Rule(stage="EOD", delay=0.25))
    return srv


# --- helpers --------------------------------------------------------------------


def kit_for(tmp_path, server: SMTPTestServer, yaml: str = "", cfg: Iterable[str] = ()) -> SpoolKit:
    return SpoolKit(tmp_path, server.port, cfg, yaml)


def jobs(kit: SpoolKit, addresses: Iterable[str], *lines: str, prefix: str = "J") -> int:
    """One job per address in TOSEND, named in the order given; returns how many."""
    n = 0
    for n, address in enumerate(addresses, 1):
        kit.job("TOSEND", f"{prefix}{n:03d}.FS", *lines, to=address)
    return n


def interleave(*domains: str, each: int) -> list[str]:
    """each addresses per domain, the domains taking turns in queue order."""
    return [f"u{i}@{d}" for i in range(each) for d in domains]


def drain_all_sent(kit: SpoolKit, server: SMTPTestServer, count: int) -> None:
    """Drain the node; every job ends in SENT, none in ACTIVE, FAIL or a TOSEND
    folder, and the server has received each one and seen every connection close."""
    result = kit.drain(timeout=60)
    assert result.returncode == 0, result.stderr
    assert len(kit.names("SENT")) == count, (kit.names("SENT"), kit.names("FAIL"), kit.waiting(), result.stderr)
    assert kit.names("FAIL") == []
    assert kit.waiting() == []
    assert kit.active() == []
    assert len(server.messages) == count
    server.wait_idle(timeout=5)


def pooled_peak(server: SMTPTestServer, domains: Iterable[str] | None = None, sources: Iterable[str] | None = None) -> int:
    """The most connections open at once at the server that carried mail for any
    of ``domains`` (all, if None) from any of ``sources`` (all, if None),
    counted over each connection's whole life (open to close), so it is never
    lower than the engine's own count. At an exact tie of timestamps a close is
    counted before an open."""
    want_d = {d.lower() for d in domains} if domains is not None else None
    want_s = set(sources) if sources is not None else None
    events: list[tuple[float, int]] = []
    for c in server.connections:
        if want_d is not None and not (c.rcpt_domains & want_d):
            continue
        if want_s is not None and c.peer not in want_s:
            continue
        events.append((c.opened_at, 1))
        events.append((c.closed_at if c.closed_at is not None else math.inf, -1))
    events.sort()
    peak = current = 0
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    return peak


def sources(server: SMTPTestServer) -> set[str]:
    return {c.peer for c in server.connections}


# --- the helper itself ------------------------------------------------------------


def test_pooled_peak_agrees_with_the_servers_own_counters_for_one_domain(tmp_path, server):
    kit = kit_for(tmp_path, server, cfg=["$domain_limit * @one.test 3"])
    n = jobs(kit, interleave("one.test", "two.test", each=6))
    drain_all_sent(kit, server, n)
    assert pooled_peak(server, ["one.test"]) == server.peak_by_domain["one.test"] == 3
    assert pooled_peak(server) == server.peak
    assert pooled_peak(server, sources=[RELAY]) == server.peak_by_source[RELAY]


# --- 1. Global::Domain, a regex stanza's scope_max pools its domains ---------------


def test_pooled_regex_scope_caps_wanadoo_and_orange_together_at_3(tmp_path, server):
    kit = kit_for(tmp_path, server, yaml='domain:\n  "/^(wanadoo|orange)\\\\.fr$/": {scope_max_outbound_connections: 3}\n')
    n = jobs(kit, interleave("wanadoo.fr", "orange.fr", each=6))
    drain_all_sent(kit, server, n)
    assert pooled_peak(server, ["wanadoo.fr", "orange.fr"]) == 3
    # Both domains really shared the pool (neither alone could have 3 while the other had mail open).
    assert server.peak_by_domain["wanadoo.fr"] >= 1 and server.peak_by_domain["orange.fr"] >= 1
    assert server.peak == 3


def test_pooled_regex_scope_leaves_a_domain_it_does_not_match_alone(tmp_path, server):
    kit = kit_for(tmp_path, server, yaml='domain:\n  "/^(wanadoo|orange)\\\\.fr$/": {scope_max_outbound_connections: 3}\n')
    n = jobs(kit, interleave("wanadoo.fr", "orange.fr", "free.fr", each=6))
    drain_all_sent(kit, server, n)
    assert pooled_peak(server, ["wanadoo.fr", "orange.fr"]) == 3
    # free.fr does not match the whole-domain regex: all 6 at once.
    assert server.peak_by_domain["free.fr"] == 6


# --- 2. a regex stanza's max_outbound_connections limits each domain apart ---------


def test_per_domain_regex_max_gives_aol_and_yahoo_5_each_at_the_same_time(tmp_path, server):
    kit = kit_for(tmp_path, server, yaml='domain:\n  "/^(aol|yahoo)\\\\.com$/": {max_outbound_connections: 5}\n')
    n = jobs(kit, interleave("aol.com", "yahoo.com", each=15))
    drain_all_sent(kit, server, n)
    assert server.peak_by_domain["aol.com"] == 5
    assert server.peak_by_domain["yahoo.com"] == 5
    assert pooled_peak(server, ["aol.com", "yahoo.com"]) == 10
    assert server.peak == 10


# --- 3. Binding::Domain --------------------------------------------------------------


BINDING_B1_X2 = (
    "binding:\n"
    "  b1:\n"
    f"    bind_address: {B1}\n"
    "    domain:\n"
    '      "x.test": {scope_max_outbound_connections: 2}\n'
)


def test_binding_domain_scope_caps_x_test_at_2_all_from_the_bindings_address(tmp_path, server):
    kit = kit_for(tmp_path, server, yaml=BINDING_B1_X2)
    n = jobs(kit, [f"u{i}@x.test" for i in range(6)], "$var_def EMAIL_BINDING b1")
    drain_all_sent(kit, server, n)
    assert sources(server) == {B1}
    assert {m.peer for m in server.messages} == {B1}
    assert server.peak_by_source[B1] == 2
    assert server.peak_by_domain["x.test"] == 2
    assert server.peak == 2


def test_binding_domain_scope_does_not_limit_jobs_on_the_default_binding(tmp_path, server):
    kit = kit_for(tmp_path, server, yaml=BINDING_B1_X2)
    bound = jobs(kit, [f"b{i}@x.test" for i in range(6)], "$var_def EMAIL_BINDING b1", prefix="A")
    free = jobs(kit, [f"f{i}@x.test" for i in range(6)], prefix="B")
    drain_all_sent(kit, server, bound + free)
    assert sources(server) == {B1, RELAY}
    assert server.peak_by_source[B1] == 2
    assert Counter(m.peer for m in server.messages) == {B1: 6, RELAY: 6}
    # The default binding has only the default max_outbound_connections (32).
    assert server.peak_by_source[RELAY] == 6


def test_binding_domain_scope_does_not_limit_another_domain_on_that_binding(tmp_path, server):
    kit = kit_for(tmp_path, server, yaml=BINDING_B1_X2)
    n = jobs(kit, interleave("x.test", "other.test", each=6), "$var_def EMAIL_BINDING b1")
    drain_all_sent(kit, server, n)
    assert sources(server) == {B1}
    assert server.peak_by_domain["x.test"] == 2
    assert server.peak_by_domain["other.test"] == 6


# --- 4. Binding_Group::Domain, across the group's bindings ---------------------------


POOL1_Y3 = POOL1 + "    domain:\n" '      "y.test": {scope_max_outbound_connections: 3}\n'


def assert_group_spread(server: SMTPTestServer) -> None:
    """3 at once for y.test over both bindings, the least loaded binding first:
    b1, b2, then b1 again (a tie goes by name); never all on one address."""
    assert server.peak_by_domain["y.test"] == 3
    assert pooled_peak(server, ["y.test"]) == 3
    assert server.peak == 3
    assert sources(server) == {B1, B2}
    first3 = sorted(server.connections, key=lambda c: c.serial)[:3]
    assert Counter(c.peer for c in first3) == {B1: 2, B2: 1}
    # With 3 slots over 2 bindings, least-loaded-first never puts 3 on one address.
    assert server.peak_by_source[B1] == 2
    assert 1 <= server.peak_by_source[B2] <= 2


def test_binding_group_domain_scope_caps_y_test_at_3_across_both_bindings(tmp_path, server):
    kit = kit_for(tmp_path, server, yaml=POOL1_Y3)
    n = jobs(kit, [f"u{i}@y.test" for i in range(9)], "$var_def EMAIL_BINDING_GROUP pool1")
    drain_all_sent(kit, server, n)
    assert_group_spread(server)


def test_default_binding_group_applies_the_group_domain_scope_to_jobs_without_a_binding(tmp_path, server):
    kit = kit_for(tmp_path, server, yaml=POOL1_Y3 + "default_binding_group: pool1\n")
    n = jobs(kit, [f"u{i}@y.test" for i in range(9)])
    drain_all_sent(kit, server, n)
    assert_group_spread(server)
    assert RELAY not in sources(server)


def test_binding_group_domain_scope_counts_jobs_that_name_a_binding_of_the_group(tmp_path, server):
    # Binding_Group::Domain: "across all the bindings in that Binding Group",
    # whichever way a job came to one of them.
    kit = kit_for(tmp_path, server, yaml=POOL1_Y3)
    a = jobs(kit, [f"a{i}@y.test" for i in range(5)], "$var_def EMAIL_BINDING b1", prefix="A")
    b = jobs(kit, [f"b{i}@y.test" for i in range(5)], "$var_def EMAIL_BINDING b2", prefix="B")
    drain_all_sent(kit, server, a + b)
    assert pooled_peak(server, ["y.test"]) == 3
    assert server.peak == 3
    assert Counter(m.peer for m in server.messages) == {B1: 5, B2: 5}


def test_binding_group_scope_and_binding_scope_both_hold_the_smaller_wins(tmp_path, server):
    # SPEC 5's example: the group allows 6 for the domain, binding b1 only 2 of them.
    yaml = (
        "binding_group:\n"
        "  pool1:\n"
        "    domain:\n"
        '      "y.test": {scope_max_outbound_connections: 4}\n'
        "    binding:\n"
        "      b1:\n"
        f"        bind_address: {B1}\n"
        "        domain:\n"
        '          "y.test": {scope_max_outbound_connections: 1}\n'
        f"      b2: {{bind_address: {B2}}}\n"
    )
    kit = kit_for(tmp_path, server, yaml=yaml)
    n = jobs(kit, [f"u{i}@y.test" for i in range(12)], "$var_def EMAIL_BINDING_GROUP pool1")
    drain_all_sent(kit, server, n)
    assert server.peak_by_source[B1] == 1
    assert server.peak_by_source[B2] == 3
    assert server.peak_by_domain["y.test"] == 4


# --- 5. the node total ---------------------------------------------------------------


def test_server_max_outbound_connections_caps_the_node_over_many_domains_at_4(tmp_path, server):
    kit = kit_for(tmp_path, server, yaml="server_max_outbound_connections: 4\n")
    n = jobs(kit, [f"u@d{i}.test" for i in range(12)])
    drain_all_sent(kit, server, n)
    assert server.peak == 4
    assert pooled_peak(server) == 4
    assert all(p == 1 for p in server.peak_by_domain.values())


def test_server_max_outbound_connections_counts_every_binding(tmp_path, server):
    # One worker: "least loaded first" weighs the bindings by one process's connections,
    # so the even 2/2 split this test reads is one worker's choice (the node total holds either way).
    kit = kit_for(tmp_path, server, yaml="workers: 1\nserver_max_outbound_connections: 4\n" + POOL1)
    n = jobs(kit, [f"u@d{i}.test" for i in range(12)], "$var_def EMAIL_BINDING_GROUP pool1")
    drain_all_sent(kit, server, n)
    assert server.peak == 4
    assert sources(server) == {B1, B2}
    assert server.peak_by_source[B1] == 2 and server.peak_by_source[B2] == 2


def test_global_scope_max_outbound_connections_behaves_like_server_max(tmp_path, server):
    kit = kit_for(tmp_path, server, yaml="scope_max_outbound_connections: 3\n")
    n = jobs(kit, [f"u@d{i}.test" for i in range(9)])
    drain_all_sent(kit, server, n)
    assert server.peak == 3


# --- 6. $domain_limit and a scope together: the smaller holds ------------------------


def test_domain_limit_2_under_a_scope_of_5_holds_at_2(tmp_path, server):
    kit = kit_for(tmp_path, server, yaml='domain:\n  "d.test": {scope_max_outbound_connections: 5}\n',
                  cfg=["$domain_limit * @d.test 2"])
    n = jobs(kit, [f"u{i}@d.test" for i in range(6)])
    drain_all_sent(kit, server, n)
    assert server.peak_by_domain["d.test"] == 2
    assert server.peak == 2


def test_global_domain_scope_2_under_a_domain_limit_of_5_holds_at_2(tmp_path, server):
    kit = kit_for(tmp_path, server, yaml='domain:\n  "d.test": {scope_max_outbound_connections: 2}\n',
                  cfg=["$domain_limit * @d.test 5"])
    n = jobs(kit, [f"u{i}@d.test" for i in range(6)])
    drain_all_sent(kit, server, n)
    assert server.peak_by_domain["d.test"] == 2
    assert server.peak == 2


def test_domain_limit_counts_across_bindings_while_the_group_scope_is_larger(tmp_path, server):
    # $domain_limit limits this node's connections for the domain, from every binding.
    kit = kit_for(tmp_path, server, yaml=POOL1_Y3, cfg=["$domain_limit * @y.test 2"])
    n = jobs(kit, [f"u{i}@y.test" for i in range(6)], "$var_def EMAIL_BINDING_GROUP pool1")
    drain_all_sent(kit, server, n)
    assert server.peak_by_domain["y.test"] == 2
    assert sources(server) == {B1, B2}
    assert server.peak_by_source[B1] == 1 and server.peak_by_source[B2] == 1


# --- 7. max_outbound_connections: per binding and domain -----------------------------


def test_global_max_outbound_connections_counts_per_binding_and_domain(tmp_path, server):
    kit = kit_for(tmp_path, server, yaml="max_outbound_connections: 2\n" + POOL1)
    n = jobs(kit, interleave("m.test", "n.test", each=6), "$var_def EMAIL_BINDING_GROUP pool1")
    drain_all_sent(kit, server, n)
    # 2 per binding per domain: 4 per domain over the two bindings, 8 in all.
    assert server.peak_by_domain["m.test"] == 4
    assert server.peak_by_domain["n.test"] == 4
    for src in (B1, B2):
        assert pooled_peak(server, ["m.test"], [src]) == 2
        assert pooled_peak(server, ["n.test"], [src]) == 2
    assert server.peak == 8


def test_global_max_outbound_connections_on_the_default_binding(tmp_path, server):
    kit = kit_for(tmp_path, server, yaml="max_outbound_connections: 2\n")
    n = jobs(kit, interleave("m.test", "n.test", each=6))
    drain_all_sent(kit, server, n)
    assert server.peak_by_domain["m.test"] == 2 and server.peak_by_domain["n.test"] == 2
    assert server.peak == 4


def test_max_outbound_connections_in_a_global_domain_stanza_overrides_the_global_key(tmp_path, server):
    kit = kit_for(tmp_path, server, yaml='max_outbound_connections: 2\ndomain:\n  "big.test": {max_outbound_connections: 4}\n')
    n = jobs(kit, interleave("big.test", "small.test", each=8))
    drain_all_sent(kit, server, n)
    assert server.peak_by_domain["big.test"] == 4
    assert server.peak_by_domain["small.test"] == 2


def test_max_outbound_connections_in_a_binding_domain_stanza_overrides_for_that_binding_only(tmp_path, server):
    yaml = (
        "max_outbound_connections: 3\n"
        "binding_group:\n"
        "  pool1:\n"
        "    binding:\n"
        "      b1:\n"
        f"        bind_address: {B1}\n"
        "        domain:\n"
        '          "z.test": {max_outbound_connections: 1}\n'
        f"      b2: {{bind_address: {B2}}}\n"
    )
    kit = kit_for(tmp_path, server, yaml=yaml)
    n = jobs(kit, [f"u{i}@z.test" for i in range(12)], "$var_def EMAIL_BINDING_GROUP pool1")
    drain_all_sent(kit, server, n)
    assert server.peak_by_source[B1] == 1
    assert server.peak_by_source[B2] == 3
    assert server.peak_by_domain["z.test"] == 4


def test_max_outbound_connections_in_a_binding_group_domain_stanza_covers_each_binding_of_the_group(tmp_path, server):
    yaml = POOL1 + "    domain:\n" '      "g.test": {max_outbound_connections: 2}\n'
    kit = kit_for(tmp_path, server, yaml=yaml)
    n = jobs(kit, [f"u{i}@g.test" for i in range(12)], "$var_def EMAIL_BINDING_GROUP pool1")
    drain_all_sent(kit, server, n)
    assert server.peak_by_source[B1] == 2 and server.peak_by_source[B2] == 2
    assert server.peak_by_domain["g.test"] == 4


def test_max_outbound_connections_set_on_a_binding_covers_every_domain_of_that_binding(tmp_path, server):
    # SPEC 5: "max_outbound_connections always counts per binding and domain;
    # where it is set decides which bindings and domains it covers." Set on a
    # binding, it covers that binding and every domain.
    yaml = "binding:\n" f"  b1: {{bind_address: {B1}, max_outbound_connections: 1}}\n"
    kit = kit_for(tmp_path, server, yaml=yaml)
    n = jobs(kit, interleave("p.test", "q.test", each=4), "$var_def EMAIL_BINDING b1")
    drain_all_sent(kit, server, n)
    assert server.peak_by_domain["p.test"] == 1 and server.peak_by_domain["q.test"] == 1
    assert server.peak_by_source[B1] == 2


def test_max_outbound_connections_set_on_a_binding_group_covers_each_of_its_bindings(tmp_path, server):
    yaml = POOL1 + "    max_outbound_connections: 1\n"
    kit = kit_for(tmp_path, server, yaml=yaml)
    n = jobs(kit, [f"u{i}@r.test" for i in range(6)], "$var_def EMAIL_BINDING_GROUP pool1")
    drain_all_sent(kit, server, n)
    assert server.peak_by_source[B1] == 1 and server.peak_by_source[B2] == 1
    assert server.peak_by_domain["r.test"] == 2


# --- Global::Host: the relay's IP, from every binding --------------------------------


def test_host_scope_on_the_relays_ip_counts_connections_from_every_binding(tmp_path, server):
    yaml = POOL1 + f'host:\n  "{RELAY}": {{scope_max_outbound_connections: 3}}\n'
    kit = kit_for(tmp_path, server, yaml=yaml)
    n = jobs(kit, [f"u@h{i}.test" for i in range(9)], "$var_def EMAIL_BINDING_GROUP pool1")
    drain_all_sent(kit, server, n)
    assert server.peak == 3
    assert sources(server) == {B1, B2}


def test_scope_max_set_on_a_binding_caps_that_bindings_connections_over_all_domains(tmp_path, server):
    yaml = "binding:\n" f"  b1: {{bind_address: {B1}, scope_max_outbound_connections: 3}}\n"
    kit = kit_for(tmp_path, server, yaml=yaml)
    n = jobs(kit, interleave("p.test", "q.test", "r.test", each=4), "$var_def EMAIL_BINDING b1")
    drain_all_sent(kit, server, n)
    assert server.peak_by_source[B1] == 3


def test_scope_max_set_on_a_binding_group_caps_its_bindings_together_over_all_domains(tmp_path, server):
    yaml = POOL1 + "    scope_max_outbound_connections: 3\n"
    kit = kit_for(tmp_path, server, yaml=yaml)
    n = jobs(kit, interleave("p.test", "q.test", "r.test", each=4), "$var_def EMAIL_BINDING_GROUP pool1")
    drain_all_sent(kit, server, n)
    assert pooled_peak(server, ["p.test", "q.test", "r.test"], [B1, B2]) == 3
    assert server.peak_by_source[B1] >= 1 and server.peak_by_source[B2] >= 1
