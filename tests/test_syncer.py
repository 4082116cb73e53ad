"""copiamail.syncer: fsyncs in a child process, answered on the event loop."""

from __future__ import annotations

import asyncio
import errno
import os
import re
import signal
from pathlib import Path

import pytest
from smtpserver import Rule
from spoolkit import SpoolKit, children_of, wait_until

from copiamail.spool.syncer import MAX_FDS, Syncer


def open_files(folder: Path, n: int) -> list[int]:
    fds = []
    for i in range(n):
        fd = os.open(folder / f"f{i}", os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, b"result\n")
        fds.append(fd)
    return fds


async def submit(syncer: Syncer, fds: list[int], timeout: float = 10) -> list[int] | None:
    answer: asyncio.Future[list[int] | None] = asyncio.get_running_loop().create_future()
    assert syncer.submit(fds, answer.set_result)
    return await asyncio.wait_for(answer, timeout)


def test_each_file_handed_over_is_answered_with_errno_zero_in_order(tmp_path):
    async def run() -> list[int] | None:
        syncer = Syncer.start(lambda: None)
        assert syncer is not None
        try:
            return await submit(syncer, open_files(tmp_path, 3))
        finally:
            syncer.close()

    assert asyncio.run(run()) == [0, 0, 0]


def test_a_batch_larger_than_one_message_is_answered_once_for_all_its_files(tmp_path):
    async def run() -> list[int] | None:
        syncer = Syncer.start(lambda: None)
        assert syncer is not None
        try:
            return await submit(syncer, open_files(tmp_path, MAX_FDS * 2 + 7))
        finally:
            syncer.close()

    assert asyncio.run(run()) == [0] * (MAX_FDS * 2 + 7)


@pytest.mark.parametrize(("one_commit", "pipe_errno"), [(False, errno.EINVAL), (True, errno.ESPIPE)])
def test_a_file_that_cannot_be_synced_gets_its_errno(tmp_path, one_commit, pipe_errno):
    # A pipe cannot be fsynced (EINVAL) nor written back (ESPIPE): the answer
    # says so for that file only.
    async def run() -> list[int] | None:
        syncer = Syncer.start(lambda: None, one_commit=one_commit)
        assert syncer is not None
        r, w = os.pipe()
        try:
            return await submit(syncer, [open_files(tmp_path, 1)[0], r, open_files(tmp_path / "more", 1)[0]])
        finally:
            os.close(w)
            syncer.close()

    (tmp_path / "more").mkdir()
    assert asyncio.run(run()) == [0, pipe_errno, 0]


def test_a_syncer_making_one_commit_a_request_answers_each_file_in_order(tmp_path):
    async def run() -> list[int] | None:
        syncer = Syncer.start(lambda: None, one_commit=True)
        assert syncer is not None
        try:
            return await submit(syncer, open_files(tmp_path, MAX_FDS + 3))
        finally:
            syncer.close()

    assert asyncio.run(run()) == [0] * (MAX_FDS + 3)


def test_when_the_syncer_dies_batches_in_flight_get_none_and_later_ones_are_refused(tmp_path):
    lost: list[bool] = []

    async def run() -> tuple[list[int] | None, bool]:
        syncer = Syncer.start(lambda: lost.append(True))
        assert syncer is not None
        await submit(syncer, open_files(tmp_path, 1))  # it is up
        os.kill(syncer._pid, signal.SIGSTOP)
        answer: asyncio.Future[list[int] | None] = asyncio.get_running_loop().create_future()
        assert syncer.submit(open_files(tmp_path, 2), answer.set_result)
        os.kill(syncer._pid, signal.SIGKILL)
        got = await asyncio.wait_for(answer, 10)
        refused = not syncer.submit(open_files(tmp_path, 1), lambda errnos: None)
        syncer.close()
        return got, refused

    got, refused = asyncio.run(run())
    assert got is None and refused and lost == [True]


def test_the_syncer_process_ends_when_the_node_closes_it(tmp_path):
    syncer = Syncer.start(lambda: None)
    assert syncer is not None
    pid = syncer._pid
    syncer.close()
    assert not Path(f"/proc/{pid}").exists()


def test_a_second_close_does_nothing(monkeypatch):
    import copiamail.spool.syncer as syncer_module

    waits: list[int] = []
    real = syncer_module.reap_child

    def counted(pid: int, timeout: float) -> bool:
        waits.append(pid)
        return real(pid, timeout)

    monkeypatch.setattr(syncer_module, "reap_child", counted)
    syncer = Syncer.start(lambda: None)
    assert syncer is not None
    syncer.close()
    syncer.close()  # as the writer's close does after a settle that gave the syncer up
    assert waits == [syncer._pid]


def test_a_node_whose_syncer_is_killed_goes_on_and_sends_every_job_once(tmp_path, smtp_server):
    server = smtp_server()
    server.add_rule(Rule(stage="EOD", delay=0.05))  # 1 s of sending: the syncer is killed well before the end
    kit = SpoolKit(tmp_path, server.port, ["$domain_limit * @ 2"], "workers: 1\n")  # one syncer, the node's child
    names = [f"J{i:03d}.FS" for i in range(40)]
    for i, name in enumerate(names):
        kit.job("TOSEND", name, to=f"u{i}@d.example")
    proc = kit.start("N1", "--drain")
    wait_until(lambda: len(kit.names("SENT")) >= 5, timeout=30)
    [syncer] = [p for p in children_of(proc.pid) if b"copiamail.spool.watcher" not in Path(f"/proc/{p}/cmdline").read_bytes()]
    os.kill(syncer, signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    # The node learns of it from the syncer's socket closing ("the syncer
    # process ended") or, when a batch is handed over first, from that
    # hand-over failing ("cannot hand files to the syncer").
    assert re.search(r"(the syncer process ended|cannot hand files to the syncer: .*); "
                     r"results are fsynced by the node itself from now on", err), err
    assert kit.names("SENT") == names and kit.active() == []
    assert sorted(m.rcpt_tos[0] for m in server.messages) == sorted(f"u{i}@d.example" for i in range(40))


def test_an_answer_short_of_files_counts_as_eio_for_every_file_of_the_request(tmp_path):
    # The kernel hands the syncer no more descriptors than its open-file limit
    # allows (inherited from the node): those it never saw are not durable.
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # 40, or enough for the syncer's socket pair to find free numbers below
    # the limit whatever descriptors earlier tests in this process left open;
    # the syncer closes all but its own, so it is left far short of 120.
    low = sum(1 for fd in os.listdir("/proc/self/fd") if int(fd) < 100)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(40, low + 10), hard))
    try:
        syncer = Syncer.start(lambda: None)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert syncer is not None
    fds = open_files(tmp_path, 120)

    async def run() -> list[int] | None:
        try:
            return await submit(syncer, fds)
        finally:
            syncer.close()

    assert asyncio.run(run()) == [errno.EIO] * 120


def test_a_syncer_that_fails_at_start_exits_and_never_runs_the_callers_code(tmp_path, monkeypatch):
    import copiamail.spool.syncer as syncer_mod

    def broken(sock, node):
        raise OSError(errno.EMFILE, "no descriptor left")

    monkeypatch.setattr(syncer_mod, "_serve", broken)
    syncer = Syncer.start(lambda: None)
    (tmp_path / f"after-start-{os.getpid()}").write_text("")  # the child must never get here
    assert syncer is not None
    _, status = os.waitpid(syncer._pid, 0)
    assert os.waitstatus_to_exitcode(status) == 1
    assert [p.name for p in tmp_path.iterdir()] == [f"after-start-{os.getpid()}"]
    syncer._sock.close()
