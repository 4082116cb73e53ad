"""Live node state (copiamail/spool/livestate.py, copiamail/scheduling/publishing.py,
`status --json`): what each worker publishes, how readers tell a live worker from a
dead one, and that `status` agrees with the SMTP server's own count of open
connections while a node sends."""

from __future__ import annotations

import json
import time

from smtpserver import Rule
from spoolkit import SpoolKit, stop, wait_until

from copiamail.spool.livestate import STALE_AFTER, KeyState, read_states, remove_state, state_path, write_state


def test_a_published_state_reads_back_whole_and_goes_when_removed(tmp_path):
    write_state(tmp_path, "N1", 0, 1000.0, {"sent": 5}, {"domain_limit:a.test": KeyState(2, 2, 4)}, {"a.test": 2})
    [state] = read_states(tmp_path, 1001.0)
    assert (state.node, state.worker, state.alive, state.connections) == ("N1", 0, True, 2)
    assert state.counters == {"sent": 5} and state.keys == {"domain_limit:a.test": KeyState(2, 2, 4)}
    assert not any(p.name.endswith(".tmp") for p in state_path(tmp_path, "N1", 0).parent.iterdir())
    remove_state(tmp_path, "N1", 0)
    remove_state(tmp_path, "N1", 0)  # already gone: fine
    assert read_states(tmp_path, 1001.0) == []


def test_a_nodes_workers_add_up_their_open_slots_and_a_shared_caps_cap_is_taken_once(tmp_path):
    from copiamail.report import nodes_of

    for worker, domain in ((0, "a.test"), (1, "b.test")):
        write_state(tmp_path, "N1", worker, 1000.0, {}, {"server": KeyState(1, 4, shared=True),
                                                          f"domain_limit:{domain}": KeyState(1, 2)}, {domain: 1})
    [node] = nodes_of(read_states(tmp_path, 1000.0), 1000.0)
    assert node["keys"]["server"] == {"open": 2, "cap": 4, "configured": None}
    assert node["keys"]["domain_limit:a.test"] == {"open": 1, "cap": 2, "configured": None}


def test_a_state_not_rewritten_for_a_while_is_stale_and_a_broken_one_is_left_out(tmp_path):
    write_state(tmp_path, "N1", 0, 1000.0, {}, {}, {})
    write_state(tmp_path, "N2", 1, 1000.0, {}, {}, {})
    state_path(tmp_path, "N3", 0).write_text("{not json")
    state_path(tmp_path, "N4", 0).write_text('{"node": "N4"}')
    states = read_states(tmp_path, 1000.0 + STALE_AFTER + 1)
    assert [(s.node, s.alive) for s in states] == [("N1", False), ("N2", False)]


def test_status_json_shows_the_connections_the_server_sees_while_a_node_sends(tmp_path, smtp_server):
    server = smtp_server()
    server.add_rule(Rule(stage="EOD", delay=6))  # every connection busy with its first message throughout
    kit = SpoolKit(tmp_path, server.port, ["$domain_limit * @a.test 2", "$domain_limit * @ 1"])
    for i in range(6):
        kit.job("TOSEND", f"A{i}.FS", to=f"u{i}@a.test")
    kit.job("TOSEND", "B0.FS", to="v@b.test")
    proc = kit.start("N1")
    try:
        wait_until(lambda: server.current == 3, timeout=15)
        time.sleep(2.2)  # one publication at least (every second), with room to spare
        doc = json.loads(kit.cli("status", "--json").stdout)
        seen = server.current_by_domain
        domains = {d["domain"]: d for d in doc["domains"]}
        assert domains["a.test"]["connections"] == seen["a.test"] == 2 and domains["a.test"]["limit"] == 2
        assert domains["b.test"]["connections"] == seen["b.test"] == 1 and domains["b.test"]["limit"] == 1
        assert domains["a.test"]["waiting"] == 4  # two in flight, four back in TOSEND
        [node] = doc["nodes"]
        assert node["name"] == "N1" and node["alive"] and node["connections"] == 3
        assert node["keys"]["domain_limit:a.test"]["open"] == 2
        assert {f["folder"]: f["jobs"] for f in doc["folders"]}["TOSEND"] == 4
    finally:
        code, _, err = stop(proc)
    assert code == 0, err
    doc = json.loads(kit.cli("status", "--json").stdout)
    assert doc["nodes"] == []  # a node that stops takes its state with it
