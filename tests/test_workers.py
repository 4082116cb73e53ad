"""copiamail.node.workers: what the supervisor writes to a worker's pipe when
the worker reads it more slowly than events come (a burst of submissions)."""

from __future__ import annotations

import asyncio
import fcntl
import os

import pytest

from copiamail.node import workers
from copiamail.osutil import NulRecords

F_SETPIPE_SZ = 1031  # Linux


def deliver(pending: list[bytes], read_every: float = 0.002) -> list[bytes]:
    """Hand ``pending`` to the supervisor's writer for a worker whose pipe
    holds one page and who reads it every ``read_every`` seconds; what the
    worker receives, in order."""
    r, w = os.pipe()
    fcntl.fcntl(w, F_SETPIPE_SZ, 4096)
    os.set_blocking(w, False)
    os.set_blocking(r, False)
    worker = workers._Worker(0, 0, w, NulRecords(r))
    received: list[bytes] = []

    async def run() -> None:
        worker.pending = list(pending)
        workers._send(worker)
        assert worker.blocked  # the burst is larger than the pipe
        reader = NulRecords(r)
        deadline = asyncio.get_running_loop().time() + 20
        while asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(read_every)
            received.extend(reader.read() or [])
            if not worker.blocked and not worker.pending and not worker.scan_owed:
                await asyncio.sleep(read_every)
                received.extend(reader.read() or [])
                return
        raise AssertionError("the supervisor never finished writing")

    try:
        asyncio.run(run())
    finally:
        os.close(r)
        os.close(w)
    return received


def hints(n: int) -> list[bytes]:
    return [b"H/spool/TOSEND/%08d.FS" % i for i in range(n)]


def test_a_burst_larger_than_the_pipe_reaches_the_worker_whole_and_in_order():
    # Replaced by a scan request, these jobs would wait write_settle seconds:
    # a scan cannot tell that they were renamed in.
    burst = hints(3000)
    assert deliver(burst) == burst


def test_past_the_cap_watcher_events_become_one_scan_request_and_a_stop_is_kept(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(workers, "_MAX_OWED", 100)
    got = deliver([*hints(1000), b"Q"])
    assert got.count(b"R") == 1 and got.count(b"Q") == 1
    assert len(got) < 1000


def test_past_the_cap_sighups_records_are_kept_with_the_last_configuration_handed_over(
        monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(workers, "_MAX_OWED", 100)
    got = deliver([*hints(600), b"L", b"C/tmp/first", *hints(600), b"C/tmp/second", b"Q"])
    assert [r for r in got if r[:1] in (b"L", b"C", b"Q")] == [b"L", b"C/tmp/second", b"Q"]
