"""The limiter is a seam: the scheduler counts every slot through the Limiter
it is given (here one that records each call, and one with lower caps of its
own), so another limiter (adaptive caps, Redis) plugs in without touching the
scheduler. And a node's totals cross the worker pipe by field name."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from pathlib import Path

from copiamail.config import Config, RelayConfig
from copiamail.node.workers import decode_stats, encode_stats
from copiamail.scheduling.limiter import Limiter, LocalLimiter
from copiamail.scheduling.limits import Limit
from copiamail.scheduling.results import Stats
from copiamail.scheduling.scheduler import Scheduler
from copiamail.smtp.sink import SmtpSink
from copiamail.spool.queue import Spool


class RecordingLimiter:
    """A LocalLimiter that records what the scheduler asks of it; ``cap``
    lowers every cap to at most that (a limiter may know better caps)."""

    def __init__(self, cap: int | None = None) -> None:
        self.inner = LocalLimiter()
        self.cap = cap
        self.calls: list[str] = []
        self.peak: dict[str, int] = {}

    def _capped(self, limits: Sequence[Limit]) -> list[Limit]:
        if self.cap is None:
            return list(limits)
        return [dataclasses.replace(l, cap=min(l.cap, self.cap)) for l in limits]

    def try_acquire(self, limits: Sequence[Limit]) -> Limit | None:
        self.calls.append("try_acquire")
        full = self.inner.try_acquire(self._capped(limits))
        for l in limits:
            self.peak[l.key] = max(self.peak.get(l.key, 0), self.inner.in_use(l.key))
        return None if full is None else next(l for l in limits if l.key == full.key)

    def release(self, limits: Sequence[Limit]) -> None:
        self.calls.append("release")
        self.inner.release(limits)

    def in_use(self, key: str) -> int:
        return self.inner.in_use(key)

    def force_acquire(self, limits: Sequence[Limit]) -> None:
        self.calls.append("force_acquire")
        self.inner.force_acquire(limits)

    def yields(self, key: str, cap: int) -> bool:
        return self.inner.yields(key, cap)

    def leaves(self, key: str, cap: int) -> bool:
        return self.inner.leaves(key, cap)

    def greeted_elsewhere(self, key: str) -> int:
        return self.inner.greeted_elsewhere(key)


def drain(tmp_path: Path, limiter: Limiter, jobs: int) -> tuple[Stats, Spool]:
    spool = Spool(tmp_path / "spool", 15, fsync=False)
    spool.ensure()
    for i in range(jobs):
        (spool.root / "TOSEND" / f"J{i:02d}.FS").write_text(f'$email_address u{i}@a.test\n$email_text "hi"\n')
    with SmtpSink(delay=0.02) as sink:
        config = Config(spool=spool.root, fsync=False, relay=RelayConfig(sink.host, sink.port, starttls="never"),
                        scan_interval=0.2, connection_idle=0.1, shutdown_grace=2.0)
        scheduler = Scheduler(config, spool, "N1", limiter=limiter)
        stats = asyncio.run(scheduler.run(drain=True))
    return stats, spool


def test_the_scheduler_takes_and_gives_back_every_slot_through_the_limiter_it_is_given(tmp_path):
    limiter = RecordingLimiter()
    stats, _ = drain(tmp_path, limiter, 6)
    assert stats.sent == 6
    assert "try_acquire" in limiter.calls and limiter.calls.count("release") >= 1
    assert limiter.in_use("server") == 0 and limiter.in_use("binding_domain:default:a.test") == 0


def test_caps_the_limiter_holds_are_kept_without_the_scheduler_knowing_them(tmp_path):
    limiter = RecordingLimiter(cap=1)
    stats, _ = drain(tmp_path, limiter, 5)
    assert stats.sent == 5 and limiter.peak["binding_domain:default:a.test"] == 1


def test_without_a_limiter_the_scheduler_counts_in_its_own_process():
    scheduler = Scheduler(Config(relay=RelayConfig("192.0.2.1")), Spool(Path("/nonexistent"), 15, False), "N1")
    assert isinstance(scheduler.limiter, LocalLimiter)


# --- Stats on the worker pipe ---------------------------------------------------------------------


def test_a_workers_totals_cross_the_pipe_by_field_name():
    stats = Stats(sent=5, failed=1, retried=2, deferred=30, handed_back=4)
    wire = encode_stats(stats)
    assert wire == b"sent=5 failed=1 retried=2 deferred=30 handed_back=4"
    assert decode_stats(wire) == stats
    assert decode_stats(b"handed_back=4 deferred=30 retried=2 failed=1 sent=5") == stats  # any order


def test_totals_with_a_field_unknown_missing_repeated_or_not_a_number_are_refused():
    for bad in (b"sent=5 failed=1 retried=2 deferred=30", b"sent=5 failed=1 retried=2 deferred=30 handed_back=4 extra=1",
                b"sent=5 sent=5 failed=1 retried=2 deferred=30 handed_back=4", b"sent=x failed=1 retried=2 deferred=30 handed_back=4",
                b"5 1 2 30 4"):
        assert decode_stats(bad) is None, bad
