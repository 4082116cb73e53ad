"""Several nodes on one spool (issue 4): racing nodes send each job exactly once,
and a dead node's ACTIVE jobs are taken over by a live node after its heartbeat
has been still for node_stale_after seconds, while a live node's are not; and
a node name is unique across machines."""

from __future__ import annotations

import signal
import time

import pytest
from smtpserver import Rule
from spoolkit import SpoolKit, attempts, stop, wait_until

from copiamail.spool.peers import Peers, finish_takeover, takeover_folders
from copiamail.spool.queue import Spool


def test_four_nodes_racing_over_2000_jobs_send_each_exactly_once(tmp_path, smtp_server):
    server = smtp_server()
    kit = SpoolKit(tmp_path, server.port, ["$domain_limit * @ 3"])
    for i in range(2000):
        kit.job(f"TOSEND{i % 4}" if i % 4 else "TOSEND", f"R{i:05d}.FS", to=f"u{i}@d{i % 25}.test")
    procs = [kit.start(name, "--drain") for name in ("N1", "N2", "N3", "N4")]
    for p in procs:
        _out, err = p.communicate(timeout=300)
        assert p.returncode == 0 and "Traceback" not in err, err
    assert len(kit.names("SENT")) == 2000 and kit.waiting() == [] and kit.active() == []
    ids = [m.message_id for m in server.messages]
    assert len(ids) == 2000 and len(set(ids)) == 2000
    by_node = {attempts(kit.read("SENT", n))[-1][1] for n in kit.names("SENT")}
    assert len(by_node) >= 2


def test_a_dead_nodes_jobs_are_taken_over_by_a_live_node(tmp_path, smtp_server):
    server = smtp_server()
    hang = server.add_rule(Rule(stage="EOD", hang=True))
    kit = SpoolKit(tmp_path, server.port, [], yaml="node_stale_after: 1\n")
    kit.job("TOSEND2", "J.FS", to="a@copia.com")
    n1 = kit.start("N1")
    wait_until(lambda: [p.name for p in kit.active()] == ["J.FS.SENDING"], timeout=15)
    wait_until(lambda: any(c.open and "DATA" in " ".join(c.commands).upper() for c in server.connections), timeout=15)
    n1.send_signal(signal.SIGKILL)
    n1.wait(timeout=10)
    server.remove_rule(hang)
    n2 = kit.start("N2")
    try:
        wait_until(lambda: kit.names("SENT") == ["J.FS"], timeout=30)
    finally:
        code, _, err = stop(n2)
    assert code == 0, err
    assert "took over its jobs" in err
    assert [(a[1], a[2]) for a in attempts(kit.read("SENT", "J.FS"))] == [("N2", "66"), ("N2", "0")]
    assert kit.active() == [] and not (kit.root / "ACTIVE" / "N1").exists()


def test_a_live_nodes_jobs_are_not_taken_over(tmp_path, smtp_server):
    server = smtp_server()
    server.add_rule(Rule(stage="EOD", delay=3.0))
    kit = SpoolKit(tmp_path, server.port, [], yaml="node_stale_after: 1\n")
    kit.job("TOSEND", "J.FS", to="a@copia.com")
    n1 = kit.start("N1")
    wait_until(lambda: [p.name for p in kit.active()] == ["J.FS.SENDING"], timeout=15)
    n2 = kit.start("N2")
    try:
        time.sleep(2.0)  # twice node_stale_after: N1 beats all along
        assert (kit.root / "ACTIVE" / "N1" / "TOSEND" / "J.FS.SENDING").exists()
        wait_until(lambda: kit.names("SENT") == ["J.FS"], timeout=15)
    finally:
        stop(n2)
        stop(n1)
    assert [(a[1], a[2]) for a in attempts(kit.read("SENT", "J.FS"))] == [("N1", "0")]
    assert len(server.messages) == 1


def test_a_peer_is_dead_only_after_its_heartbeat_stays_unchanged_for_stale_after(tmp_path):
    spool = Spool(tmp_path)
    spool.ensure()
    (tmp_path / "ACTIVE" / "P" / "TOSEND").mkdir(parents=True)
    (tmp_path / "ACTIVE" / "P" / "TOSEND" / "J.FS").write_text("$email_address a@b.test\n")
    now = [1000.0]
    watcher = Peers(spool, "W", stale_after=10, clock=lambda: now[0])
    peer = Peers(spool, "P", stale_after=10)
    peer.beat()
    assert watcher.check() == []  # first sight
    now[0] += 9
    assert watcher.check() == []
    peer.beat()  # alive: the content changed, the wait starts over
    now[0] += 9
    assert watcher.check() == []
    now[0] += 2
    assert watcher.check() == []  # 2 s since the change was seen
    now[0] += 9
    [(name, report)] = watcher.check()
    assert name == "P" and report.handed_back == ("J.FS",)  # only claimed: back unchanged
    assert (tmp_path / "TOSEND" / "J.FS").exists() and not (tmp_path / "ACTIVE" / "P").exists()


def test_a_peer_with_an_empty_active_folder_is_left_alone(tmp_path):
    spool = Spool(tmp_path)
    spool.ensure()
    (tmp_path / "ACTIVE" / "P" / "TOSEND").mkdir(parents=True)
    now = [0.0]
    watcher = Peers(spool, "W", stale_after=1, clock=lambda: now[0])
    for _ in range(3):
        now[0] += 5
        assert watcher.check() == []
    assert (tmp_path / "ACTIVE" / "P").exists()


def test_taking_over_is_off_with_node_stale_after_0(tmp_path):
    spool = Spool(tmp_path)
    spool.ensure()
    (tmp_path / "ACTIVE" / "P" / "TOSEND").mkdir(parents=True)
    (tmp_path / "ACTIVE" / "P" / "TOSEND" / "J.FS").write_text("$email_address a@b.test\n")
    now = [0.0]
    watcher = Peers(spool, "W", stale_after=0, clock=lambda: now[0])
    for _ in range(3):
        now[0] += 1000
        assert watcher.check() == []


def _any_job_file_has_a_record(kit, node: str, code: str) -> bool:
    for path in kit.root.rglob("J.FS*"):
        try:
            if any(a[1:3] == [node, code] for a in attempts(path.read_text(errors="replace"))):
                return True
        except (OSError, ValueError):  # moved between the listing and the read, or half written
            continue
    return False


def _start(kit, name, **env):
    import subprocess

    from spoolkit import CLI, cli_env

    return subprocess.Popen(
        [*CLI, "node", "--name", name], cwd=kit.base, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL, env=cli_env(COPIAMAIL_CONFIG=str(kit.config_path), **env),
    )


def test_the_heartbeat_alone_keeps_a_live_node_on_another_machine_from_being_taken_over(tmp_path, smtp_server):
    from copiamail.spool.peers import IGNORE_LOCKS_ENV

    server = smtp_server()
    server.add_rule(Rule(stage="EOD", delay=3.0))
    kit = SpoolKit(tmp_path, server.port, [], yaml="node_stale_after: 1\n")
    kit.job("TOSEND", "J.FS", to="a@copia.com")
    n1 = _start(kit, "N1")
    wait_until(lambda: [p.name for p in kit.active()] == ["J.FS.SENDING"], timeout=15)
    n2 = _start(kit, "N2", **{IGNORE_LOCKS_ENV: "1"})  # N2 cannot see N1's lock: as if on another machine
    try:
        wait_until(lambda: kit.names("SENT") == ["J.FS"], timeout=20)
    finally:
        _, _, err2 = stop(n2)
        stop(n1)
    assert "took over" not in err2
    assert [(a[1], a[2]) for a in attempts(kit.read("SENT", "J.FS"))] == [("N1", "0")]
    assert len(server.messages) == 1


def test_without_a_heartbeat_a_node_on_another_machine_would_be_taken_over(tmp_path, smtp_server):
    """The control for the test above: the same run, but N1 never beats."""
    from copiamail.spool.peers import IGNORE_LOCKS_ENV, NO_HEARTBEAT_ENV

    server = smtp_server()
    server.add_rule(Rule(stage="EOD", hang=True))  # N1's send stays in flight however slow the machine
    kit = SpoolKit(tmp_path, server.port, [], yaml="node_stale_after: 1\n")
    kit.job("TOSEND", "J.FS", to="a@copia.com")
    n1 = _start(kit, "N1", **{NO_HEARTBEAT_ENV: "1"})
    wait_until(lambda: [p.name for p in kit.active()] == ["J.FS.SENDING"], timeout=15)
    n2 = _start(kit, "N2", **{IGNORE_LOCKS_ENV: "1"})
    try:
        # The lasting trace of a takeover: N2's outcome-66 record in the job (N1,
        # alive, may claim the job again right after, so its folder comes back).
        wait_until(lambda: _any_job_file_has_a_record(kit, "N2", "66"), timeout=60)
    finally:
        _, _, err2 = stop(n2)
        stop(n1)
    assert "took over" in err2


def test_a_takeover_left_halfway_by_a_dead_taker_is_taken_over_in_turn(tmp_path):
    spool = Spool(tmp_path)
    spool.ensure()
    taken = tmp_path / "ACTIVE" / "W~from~P~1" / "TOSEND"
    taken.mkdir(parents=True)
    (taken / "J.FS").write_text("$email_address a@b.test\n")
    now = [0.0]
    watcher = Peers(spool, "N3", stale_after=10, clock=lambda: now[0])
    assert watcher.check() == []  # first sight of the still heartbeat of W
    now[0] += 11
    [(_name, report)] = watcher.check()
    assert report.handed_back == ("J.FS",)
    assert (tmp_path / "TOSEND" / "J.FS").exists() and list((tmp_path / "ACTIVE").glob("*~from~*")) == []


def test_a_node_recovers_its_own_half_done_takeover(tmp_path):
    spool = Spool(tmp_path)
    spool.ensure()
    mine = tmp_path / "ACTIVE" / "N3~from~P~1" / "TOSEND1"
    mine.mkdir(parents=True)
    (mine / "J.FS").write_text("$email_address a@b.test\n")
    [(name, report)] = Peers(spool, "N3", stale_after=0).check()
    assert name == "N3~from~P~1" and report.handed_back == ("J.FS",)
    assert (tmp_path / "TOSEND1" / "J.FS").exists()


def test_the_heartbeat_moves_on_by_rename_only(tmp_path):
    spool = Spool(tmp_path)
    spool.ensure()
    p = Peers(spool, "N1", stale_after=10)
    p.beat()
    first = sorted(x.name for x in (tmp_path / "ACTIVE").iterdir() if x.name.startswith("N1.alive"))
    p.beat()
    second = sorted(x.name for x in (tmp_path / "ACTIVE").iterdir() if x.name.startswith("N1.alive"))
    assert len(first) == len(second) == 1 and first != second
    assert first[0].endswith(".1") and second[0].endswith(".2")
    assert (tmp_path / "ACTIVE" / second[0]).stat().st_size == 0


def test_a_restarted_node_never_shows_the_heartbeat_it_showed_before(tmp_path):
    spool = Spool(tmp_path)
    spool.ensure()
    before = Peers(spool, "N1", stale_after=10)
    before.beat()
    shown = sorted(x.name for x in (tmp_path / "ACTIVE").iterdir() if x.name.startswith("N1.alive"))
    after = Peers(spool, "N1", stale_after=10)  # the same node, started again
    after.beat()
    now = sorted(x.name for x in (tmp_path / "ACTIVE").iterdir() if x.name.startswith("N1.alive"))
    assert len(now) == 1 and now != shown


def test_takeover_folders_are_a_nodes_own_unfinished_takeovers_in_name_order(tmp_path):
    spool = Spool(tmp_path)
    spool.ensure()
    for name in ("N3~from~P~2", "N3~from~P~1", "N31~from~P~1", "P~from~N3~1", "N3"):
        (tmp_path / "ACTIVE" / name).mkdir()
    (tmp_path / "ACTIVE" / "N3~from~Q~1").write_text("not a folder")
    assert takeover_folders(spool, "N3") == ["N3~from~P~1", "N3~from~P~2"]
    assert takeover_folders(Spool(tmp_path / "none"), "N3") == []


def test_finishing_a_takeover_leaves_what_recovery_does_not_know_and_says_so(tmp_path, caplog):
    spool = Spool(tmp_path)
    spool.ensure()
    taken = tmp_path / "ACTIVE" / "N3~from~P~1" / "TOSEND"
    taken.mkdir(parents=True)
    (taken / "J.FS.SENDING").write_text("$email_address a@b.test\n")
    (taken / "notes.txt").write_text("someone's")
    report = finish_takeover(spool, "N3~from~P~1", "N3")
    assert report.returned == ("J.FS",)
    assert (taken / "notes.txt").read_text() == "someone's"
    assert "left behind after a takeover" in caplog.text


# --- node names unique across machines ---------------------------------------------


def test_a_heartbeat_of_ones_own_name_from_this_host_is_an_earlier_run_and_not_watched(tmp_path):
    from copiamail.spool.peers import alive_elsewhere, host_tag

    spool = Spool(tmp_path)
    spool.ensure()
    assert alive_elsewhere(spool, "N1", watch=5, sleep=lambda s: pytest.fail("watched")) is None
    (tmp_path / "ACTIVE" / f"N1.alive.{host_tag()}-0011aabb.7").touch()  # left by a SIGKILLed N1 here
    assert alive_elsewhere(spool, "N1", watch=5, sleep=lambda s: pytest.fail("watched")) is None


def test_another_hosts_heartbeat_of_ones_own_name_is_watched_and_alive_if_it_moves(tmp_path):
    from copiamail.spool.peers import alive_elsewhere, host_tag

    spool = Spool(tmp_path)
    spool.ensure()
    beat = tmp_path / "ACTIVE" / f"N1.alive.{host_tag('box2.example')}-0011aabb.1"
    beat.touch()
    assert alive_elsewhere(spool, "N1", watch=0.5) is None  # still: a dead N1 there, its jobs are ours to recover
    moves = iter(range(2, 100))

    def sleep_while_it_beats(seconds: float) -> None:
        nonlocal beat
        nxt = beat.with_name(f"N1.alive.box2_example-0011aabb.{next(moves)}")
        beat.rename(nxt)
        beat = nxt

    assert alive_elsewhere(spool, "N1", watch=5, sleep=sleep_while_it_beats) == "box2_example"


@pytest.mark.timeout(60)
def test_a_second_node_of_the_same_name_on_another_machine_refuses_while_the_first_lives(tmp_path, smtp_server):
    import shutil
    import subprocess

    from spoolkit import CLI, cli_env

    from copiamail.spool.peers import IGNORE_LOCKS_ENV

    if shutil.which("unshare") is None:
        pytest.fail("unshare (util-linux) is needed to make the other machine")
    server = smtp_server()
    kit = SpoolKit(tmp_path, server.port, [], yaml="node_stale_after: 1\n")
    # The other machine: its own host name (a UTS namespace), and our lock unseen.
    other = ["unshare", "--uts", "sh", "-c", 'hostname box2 && exec "$@"', "sh", *CLI, "node", "--name", "N1", "--drain"]
    env = cli_env(COPIAMAIL_CONFIG=str(kit.config_path), **{IGNORE_LOCKS_ENV: "1"})
    n1 = _start(kit, "N1")
    try:
        wait_until(lambda: list((kit.root / "ACTIVE").glob("N1.alive.*")) != [], timeout=15)
        second = subprocess.run(other, cwd=kit.base, capture_output=True, text=True, timeout=30, env=env,
                                stdin=subprocess.DEVNULL)
        assert second.returncode == 2, second.stderr
        [line] = [l for l in second.stderr.splitlines() if l.startswith("copiamail: ")]
        assert "node N1 is running on " in line and "unique across machines" in line
        assert n1.poll() is None
    finally:
        code, _, err = stop(n1)
    assert code == 0, err
    # N1 gone (its heartbeat removed at its stop): the other machine's N1 starts.
    kit.job("TOSEND", "J.FS", to="a@copia.com")
    again = subprocess.run(other, cwd=kit.base, capture_output=True, text=True, timeout=30, env=env,
                           stdin=subprocess.DEVNULL)
    assert again.returncode == 0, again.stderr
    assert kit.names("SENT") == ["J.FS"]


def test_a_peer_is_judged_by_the_larger_node_stale_after_of_the_two_and_the_difference_is_said(tmp_path, caplog):
    spool = Spool(tmp_path)
    spool.ensure()
    (tmp_path / "ACTIVE" / "P" / "TOSEND").mkdir(parents=True)
    (tmp_path / "ACTIVE" / "P" / "TOSEND" / "J.FS").write_text("$email_address a@b.test\n")
    Peers(spool, "P", stale_after=30).beat()  # P beats every 6 s, and may stall up to 30 s
    now = [0.0]
    watcher = Peers(spool, "W", stale_after=2, clock=lambda: now[0])
    assert watcher.check() == []  # first sight
    now[0] += 10  # five times W's own setting: P is alive by its own
    assert watcher.check() == [] and (tmp_path / "ACTIVE" / "P").exists()
    assert "node P has node_stale_after 30, this node 2: it is judged by the larger" in caplog.text
    now[0] += 21
    [(name, _report)] = watcher.check()
    assert name == "P"


def test_a_heartbeat_name_carries_its_host_and_node_stale_after(tmp_path):
    from copiamail.spool.peers import _beat_token, host_tag

    spool = Spool(tmp_path)
    spool.ensure()
    Peers(spool, "N-1", stale_after=2.5).beat()
    [name] = [p.name for p in (tmp_path / "ACTIVE").iterdir() if p.name.startswith("N-1.alive.")]
    assert _beat_token(name, "N-1") == (host_tag(), 2.5)
    assert _beat_token("N1.alive.old-host-00aa11bb.4", "N1") == ("old-host", None)  # an earlier version's name
