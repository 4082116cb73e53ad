"""copiamail/node/services.py: the heartbeat goes on beating while a long
takeover recovery runs (in a thread, with a spool of its own), and a
takeover is reported to the scheduler."""

from __future__ import annotations

import asyncio
import threading
import time

from copiamail.node.services import beat, watch_peers


class SlowPeers:
    """Peers whose check is a takeover that takes ``seconds`` of blocking work."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.beats: list[float] = []
        self.checks = 0
        self.checked_in: set[str] = set()

    def beat(self) -> None:
        self.beats.append(time.monotonic())

    def check(self) -> list[tuple[str, object]]:
        self.checks += 1
        self.checked_in.add(threading.current_thread().name)
        if self.checks > 1:
            return []
        time.sleep(self.seconds)  # reading, rewriting and fsyncing thousands of recovered jobs
        return [("N2", object())]


def test_the_heartbeat_keeps_beating_while_a_long_takeover_recovery_runs():
    peers = SlowPeers(1.0)
    takeovers: list[float] = []

    async def run() -> None:
        tasks = [asyncio.create_task(beat(peers, 0.1)),  # type: ignore[arg-type]
                 asyncio.create_task(watch_peers(peers, lambda: takeovers.append(time.monotonic()), 0.1))]  # type: ignore[arg-type]
        await asyncio.sleep(1.5)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    started = time.monotonic()
    asyncio.run(run())
    during = [b for b in peers.beats if started + 0.2 < b < started + 0.9]
    assert len(during) >= 5  # about every 0.1 s while the recovery blocked its thread
    assert len(takeovers) == 1 and takeovers[0] - started >= 1.0  # reported once it was done
    assert threading.main_thread().name not in peers.checked_in
