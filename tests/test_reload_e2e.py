"""SIGHUP (copiamail/node/reload.py): a node reads its YAML and CFG again.
A lowered $domain_limit holds for new connections within 3 s, measured at a
real SMTP server, with and without worker processes; a broken YAML or CFG is
refused in one line and the node goes on with the old pair; what only a
restart can change is kept, with a warning; a log file is reopened."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import signal
import subprocess
import time
from types import MappingProxyType

import pytest
from smtpserver import Rule
from spoolkit import CLI, SpoolKit, cli_env, stop, wait_until

from copiamail.config import load_config
from copiamail.config_sections import DkimKey
from copiamail.node.reload import HandedConfig, reloaded, taken_over
from copiamail.report import status_document
from copiamail.spool.queue import Spool


@pytest.mark.timeout(120)
@pytest.mark.parametrize("yaml", ["", "workers: 2\n"], ids=["one-process", "workers"])
def test_a_lowered_domain_limit_holds_at_the_server_within_3_seconds_of_sighup(tmp_path, smtp_server, yaml):
    server = smtp_server()
    server.add_rule(Rule(stage="EOD", delay=0.3))
    kit = SpoolKit(tmp_path, server.port, ["$domain_limit * @copia.com 6", "$domain_limit * @ 4"], yaml)
    for i in range(240):
        kit.job("TOSEND", f"J{i:03d}.FS", to=f"u{i}@copia.com")
    proc = kit.start("N1")
    try:
        wait_until(lambda: server.current == 6, timeout=20)
        kit.cfg_path.write_text("$domain_limit * @copia.com 2\n$domain_limit * @ 4\n", encoding="utf-8")
        hup = time.time()
        proc.send_signal(signal.SIGHUP)
        time.sleep(6)
        assert server.max_open(since=hup + 3, until=time.time()) <= 2
        assert len(kit.names("SENT")) < 240  # still sending: the limit was met, not the end of the work
        assert proc.poll() is None
    finally:
        code, _, err = stop(proc)
    assert code == 0, err
    [line] = [l for l in err.splitlines() if "SIGHUP:" in l]
    assert "configuration reloaded" in line and "(2 $domain_limit rule(s))" in line


@pytest.mark.timeout(120)
def test_a_raised_domain_limit_opens_more_connections_at_once(tmp_path, smtp_server):
    server = smtp_server()
    server.add_rule(Rule(stage="EOD", delay=0.3))
    kit = SpoolKit(tmp_path, server.port, ["$domain_limit * @copia.com 2"])
    for i in range(200):
        kit.job("TOSEND", f"J{i:03d}.FS", to=f"u{i}@copia.com")
    proc = kit.start("N1")
    try:
        wait_until(lambda: server.current == 2, timeout=20)

        def all_waiting() -> bool:  # every job not yet sent deferred once: the node holds them, no scan takes them
            [domain] = status_document(Spool(kit.root, 15), time.time())["domains"]
            return domain["deferred"] == domain["waiting"]
        wait_until(all_waiting, timeout=20, interval=0.2)
        kit.cfg_path.write_text("$domain_limit * @copia.com 5\n", encoding="utf-8")
        hup = time.time()
        proc.send_signal(signal.SIGHUP)
        # The two open connections never close (their domain's jobs keep
        # them busy): the new cap must be offered to the waiting jobs.
        wait_until(lambda: server.current == 5, timeout=3)
        assert time.time() - hup < 3
    finally:
        code, _, err = stop(proc)
    assert code == 0, err
    assert server.max_open() == 5


@pytest.mark.timeout(120)
def test_a_broken_cfg_or_yaml_is_refused_in_one_line_and_the_node_keeps_the_old_pair(tmp_path, smtp_server):
    server = smtp_server()
    server.add_rule(Rule(stage="EOD", delay=0.3))
    kit = SpoolKit(tmp_path, server.port, ["$domain_limit * @copia.com 3"])
    for i in range(150):
        kit.job("TOSEND", f"J{i:03d}.FS", to=f"u{i}@copia.com")
    good_yaml = kit.config_path.read_text()
    proc = kit.start("N1")
    try:
        wait_until(lambda: server.current == 3, timeout=20)
        # A CFG with a bad line and a limit of 1: neither may apply.
        kit.cfg_path.write_text('$domain_limit * @copia.com 1\n$domain_limit "unterminated\n', encoding="utf-8")
        proc.send_signal(signal.SIGHUP)
        time.sleep(1.5)
        # A good CFG with a YAML that does not parse: still nothing changes.
        kit.cfg_path.write_text("$domain_limit * @copia.com 1\n", encoding="utf-8")
        kit.config_path.write_text(good_yaml + "max_outbound_connections: many\n", encoding="utf-8")
        proc.send_signal(signal.SIGHUP)
        since = time.time()
        time.sleep(3)
        assert proc.poll() is None
        assert server.max_open(since=since, until=time.time()) == 3  # the old limit, in full use
    finally:
        code, _, err = stop(proc)
    assert code == 0, err
    refused = [l for l in err.splitlines() if "SIGHUP:" in l]
    assert len(refused) == 2 and all("the configuration in force stays" in l for l in refused), refused
    assert "FAXFACTS.CFG:2" in refused[0] and "max_outbound_connections" in refused[1]
    assert "Traceback" not in err


def test_what_only_a_restart_can_change_is_kept_with_a_warning(tmp_path, caplog):
    kit = SpoolKit(tmp_path, 2525, ["$domain_limit * @ 3"])
    before = load_config(kit.config_path)
    kit.config_path.write_text(kit.config_path.read_text().replace("smtp_timeout: 10", "smtp_timeout: 20")
                               + "queues: 3\nmax_outbound_connections: 7\n")
    kit.cfg_path.write_text("$domain_limit * @ 1\n")
    caplog.set_level("INFO", logger="copiamail")
    after = reloaded(lambda: load_config(kit.config_path), before)
    assert after is not None
    assert after.smtp_timeout == 10 and after.queues == before.queues  # kept
    assert after.max_outbound_connections == 7 and after.rules.domain_limits[0].count == 1  # in force
    warning = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warning == ["SIGHUP: queues, smtp_timeout change only at a restart; kept as they were"]


def test_workers_take_over_the_configuration_their_supervisor_read_whole_and_privately(tmp_path, caplog):
    # The workers do not read the files again: a file changed between two
    # reads would leave them holding different caps for one shared key.
    kit = SpoolKit(tmp_path, 2525, ["$domain_limit * @ 3"])
    config = dataclasses.replace(load_config(kit.config_path), dkim=MappingProxyType(
        {"a.test": DkimKey("a.test", "s1", tmp_path / "a.pem", b"-----BEGIN PRIVATE KEY-----")}))
    made = HandedConfig(config)
    assert made.path.startswith(f"/proc/{os.getpid()}/fd/")  # in memory, held by this process only
    kit.cfg_path.write_text("$domain_limit * @ 1\n")  # changed after the supervisor's read
    taken = taken_over(made.path)
    assert taken == config and isinstance(taken.dkim, MappingProxyType)
    assert taken is not None and taken.rules.domain_limits[0].count == 3
    made.close()
    assert taken_over(made.path) is None  # let go: one line, and the configuration in force stays
    other = tmp_path / "other.pickle"
    other.write_bytes(pickle.dumps(42))
    assert taken_over(str(other)) is None  # not a configuration
    assert sum("cannot be taken over" in r.getMessage() for r in caplog.records) == 2


@pytest.mark.timeout(60)
def test_sighup_reopens_the_log_file_for_logrotate_and_lines_are_json(tmp_path, smtp_server):
    server = smtp_server()
    kit = SpoolKit(tmp_path, server.port, ["$domain_limit * @ 2"])
    log = tmp_path / "node.log"
    proc = subprocess.Popen([*CLI, "--log-format", "json", "--log-file", str(log), "-v", "node", "--name", "N1"],
                            cwd=kit.base, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, env=cli_env(COPIAMAIL_CONFIG=str(kit.config_path)))
    try:
        kit.job("TOSEND", "A.FS", to="a@copia.com")
        wait_until(lambda: kit.names("SENT") == ["A.FS"], timeout=15)
        wait_until(lambda: "delivered" in log.read_text(), timeout=5)
        log.rename(tmp_path / "node.log.1")  # what logrotate does
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: log.exists(), timeout=5)
        kit.job("TOSEND", "B.FS", to="b@copia.com")
        wait_until(lambda: kit.names("SENT") == ["A.FS", "B.FS"], timeout=15)
        wait_until(lambda: "B.FS" in log.read_text(), timeout=5)
    finally:
        code, _, err = stop(proc)
    assert code == 0 and err == "", err  # every line went to the file
    old = [json.loads(l) for l in (tmp_path / "node.log.1").read_text().splitlines()]
    new = [json.loads(l) for l in log.read_text().splitlines()]
    [started] = [e for e in old if "started" in e["text"]]
    assert started["event"] == "log" and started["node"] == "N1" and started["level"] == "info" and "ts" in started
    [a] = [e for e in old if e["event"] == "delivered"]
    assert (a["job"], a["domain"], a["code"], a["node"]) == ("A.FS", "copia.com", 250, "N1")
    assert any(e["text"].startswith("SIGHUP: configuration reloaded") for e in new)
    [b] = [e for e in new if e["event"] == "delivered"]
    assert b["job"] == "B.FS" and not any(e.get("job") == "B.FS" for e in old)
