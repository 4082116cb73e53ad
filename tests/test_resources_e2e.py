"""Resources (issue 4): a full disk on the spool (ENOSPC, simulated), a 50 MB
attachment, a 100,000-line FS file, and file descriptors that stay bounded."""

from __future__ import annotations

import hashlib
import os
import time

from smtpserver import Rule
from spoolkit import CLI, SpoolKit, attempts, cli_env, stop, var, wait_until

from copiamail.spool.crashpoints import FULL_DISK_ENV


def test_a_full_disk_pauses_the_node_and_loses_nothing_nor_sends_twice(tmp_path, smtp_server):
    import subprocess

    server = smtp_server()
    kit = SpoolKit(tmp_path, server.port, ["$domain_limit * @ 1"])
    kit.job("TOSEND", "A.FS", to="a@copia.com")
    kit.job("TOSEND", "B.FS", to="b@copia.com")
    c_before = kit.job("TOSEND", "C.FS", to="c@copia.com").read_bytes()
    flag = tmp_path / "disk-is-full"
    flag.write_text("")
    proc = subprocess.Popen(
        [*CLI, "node", "--name", "N1"], cwd=kit.base, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL, env=cli_env(COPIAMAIL_CONFIG=str(kit.config_path), **{FULL_DISK_ENV: str(flag)}),
    )
    try:
        wait_until(lambda: len(server.messages) >= 1, timeout=15)
        time.sleep(1.5)  # several scans while the disk is full
        # A was delivered but its result cannot be written. Its connection
        # writes a result while it sends the next message, so B, which waited
        # for that connection, went too: one message more, then no new job.
        # Both stay claimed, marked delivered (their result files are named,
        # their data could not be written); C is untouched.
        assert [m.rcpt_tos for m in server.messages] == [["a@copia.com"], ["b@copia.com"]]
        assert sorted(p.name for p in kit.active()) == ["A.FS.SENDING", "A.FS.SENT", "B.FS.SENDING", "B.FS.SENT"]
        assert (kit.root / "TOSEND" / "C.FS").read_bytes() == c_before
        flag.unlink()
        wait_until(lambda: kit.names("SENT") == ["A.FS", "B.FS", "C.FS"], timeout=15)
    finally:
        code, _, err = stop(proc)
    assert code == 0
    assert "cannot write job results" in err and "No space left on device" in err
    assert "Traceback" not in err
    assert len(server.messages) == 3  # neither A nor B was sent again
    for name in ("A.FS", "B.FS", "C.FS"):
        assert [a[2] for a in attempts(kit.read("SENT", name))] == ["0"]
    assert kit.active() == []


def test_a_node_stopped_while_the_disk_is_full_keeps_the_job_for_its_next_start(tmp_path, smtp_server):
    import subprocess

    server = smtp_server()
    kit = SpoolKit(tmp_path, server.port, [])
    kit.job("TOSEND", "A.FS", to="a@copia.com")
    flag = tmp_path / "disk-is-full"
    flag.write_text("")
    proc = subprocess.Popen(
        [*CLI, "node", "--name", "N1"], cwd=kit.base, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL, env=cli_env(COPIAMAIL_CONFIG=str(kit.config_path), **{FULL_DISK_ENV: str(flag)}),
    )
    wait_until(lambda: len(server.messages) == 1, timeout=15)
    code, _, err = stop(proc)
    assert code == 0 and "could not be written" in err
    # Not lost: marked delivered (its result file named, a rename), it is
    # finished at the next start...
    assert [p.name for p in kit.active()] == ["A.FS.SENDING", "A.FS.SENT"]
    flag.unlink()
    assert kit.drain().returncode == 0
    assert kit.names("SENT") == ["A.FS"]
    assert len(server.messages) == 1  # ...and not sent again


def test_a_50_mb_attachment_is_sent_whole(tmp_path, smtp_server):
    server = smtp_server(size_limit=200 * 1024 * 1024)
    kit = SpoolKit(tmp_path, server.port, [])
    (kit.root / "files").mkdir()
    blob = os.urandom(1 << 20) * 50
    (kit.root / "files" / "big.bin").write_bytes(blob)
    kit.job("TOSEND", "BIG.FS", "$email_attach files/big.bin application/octet-stream", to="a@copia.com")
    assert kit.drain(timeout=180).returncode == 0
    assert kit.names("SENT") == ["BIG.FS"]
    [part] = list(server.messages[0].parsed().iter_attachments())
    got = part.get_content()
    assert len(got) == len(blob) and hashlib.sha256(got).digest() == hashlib.sha256(blob).digest()
    assert int(var(kit.read("SENT", "BIG.FS"), "EMAIL_BYTECOUNT")) > 50 * 1024 * 1024


def test_a_100000_line_fs_file_is_sent_and_deferred_with_every_line_kept(tmp_path, smtp_server):
    server = smtp_server()
    server.add_rule(Rule(stage="EOD", delay=0.5))
    kit = SpoolKit(tmp_path, server.port, ["$domain_limit * @ 1"])
    kit.job("TOSEND", "A.FS", to="a@copia.com")
    lines = [f'$email_text "line {i}"' for i in range(100_000)]
    original = kit.job("TOSEND", "HUGE.FS", *lines, to="b@copia.com").read_bytes()
    assert kit.drain(timeout=180).returncode == 0
    text = kit.read("SENT", "HUGE.FS")
    assert text.startswith(original.decode())  # deferred once, then sent: every line kept, in order
    assert var(text, "DOMAINBUSY_COUNT") == "1"
    body = next(m for m in server.messages if m.rcpt_tos == ["b@copia.com"]).parsed().get_content()
    assert body.count("\n") >= 100_000 and "line 99999" in body


def test_file_descriptors_stay_bounded_over_many_jobs(tmp_path, smtp_server):
    import subprocess

    server = smtp_server()
    server.add_rule(Rule(stage="EOD", delay=0.01))
    kit = SpoolKit(tmp_path, server.port, ["$domain_limit * @ 2"], yaml="server_max_outbound_connections: 20\n")
    for i in range(600):
        kit.job(f"TOSEND{i % 4}" if i % 4 else "TOSEND", f"J{i:04d}.FS", to=f"u{i}@d{i % 30}.test")
    proc = subprocess.Popen(
        [*CLI, "node", "--name", "N1", "--drain"], cwd=kit.base, text=True, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=cli_env(COPIAMAIL_CONFIG=str(kit.config_path)),
    )
    peak = 0
    while proc.poll() is None:
        try:
            peak = max(peak, len(os.listdir(f"/proc/{proc.pid}/fd")))
        except FileNotFoundError:
            break
        time.sleep(0.02)
    proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert len(kit.names("SENT")) == 600
    # 20 connections, the watcher, the lock, stdio and the loop: far below 600.
    assert 0 < peak < 100, peak
