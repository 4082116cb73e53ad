"""scripts/bench: its deferral part runs end to end (the part that needs
neither Postfix nor root) and reports what issue 5 asks for; its throttled
part shares the jobs, computes the ideal and formats its figures as its
report says, and runs its fixed configuration end to end at a small scale."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from pathlib import Path

from spoolkit import cli_env

BENCH = Path(__file__).resolve().parent.parent / "scripts" / "bench"


def test_bench_deferral_part_reports_writes_per_job_domainbusy_and_cpu(tmp_path):
    r = subprocess.run([sys.executable, str(BENCH), "--only", "deferral", "--deferral-jobs", "40", "--delay", "0.01",
                        "--workdir", str(tmp_path), "--workers", "2"], capture_output=True, text=True, timeout=300, env=cli_env())
    assert r.returncode == 0, r.stderr + r.stdout
    out = r.stdout
    assert re.search(r"copiamail, one slow domain\s+40 msgs", out), out
    writes = float(re.search(r"spool writes/job: ([\d.]+)", out).group(1))
    assert 1.0 <= writes <= 3.0, out
    assert re.search(r"DOMAINBUSY_COUNT p99: \d+", out), out
    assert re.search(r"node CPU share of a core, whole run: [\d.]+%", out), out
    assert list(tmp_path.iterdir()) == []  # the work directory is removed


def test_bench_limit_bound_part_reports_the_share_of_the_ideal(tmp_path):
    r = subprocess.run([sys.executable, str(BENCH), "--only", "limit-bound", "--bound-jobs", "40", "--bound-domains", "4",
                        "--latency", "0.01", "--rounds", "1", "--skip-postfix", "--workdir", str(tmp_path)],
                       capture_output=True, text=True, timeout=300, env=cli_env())
    assert r.returncode == 0, r.stderr + r.stdout
    out = r.stdout
    assert "ideal 4 x 2 / 0.01 = 800 msgs/s" in out, out
    assert re.search(r"copiamail, round 1\s+40 msgs", out), out
    share = float(re.search(r"share of the ideal: ([\d.]+)", out).group(1))
    assert 0 < share <= 1.05, out
    assert "spool writes/job: " in out and "postfix, round" not in out
    assert re.search(r"copiamail: median share of the ideal [\d.]+", out), out
    assert re.search(r"sink replies written late by: mean [\d.]+ ms, p99 [\d.]+ ms", out), out
    assert list(tmp_path.iterdir()) == []


class _Wire:
    """A transport that keeps what the slow sink writes, with the loop time of each write."""

    def __init__(self) -> None:
        self.writes: list[tuple[float, bytes]] = []

    def write(self, data: bytes) -> None:
        self.writes.append((asyncio.get_running_loop().time(), data))

    def is_closing(self) -> bool:
        return False


def test_the_slow_sink_times_each_reply_from_the_previous_ones_due_time_not_its_late_write():
    bench = load_bench()

    async def run() -> tuple[list[float], _Wire, list[float]]:
        accepted: list[float] = []
        late: list[float] = []
        session = bench._SlowSession(0.05, accepted, True, late)
        wire = _Wire()
        session.connection_made(wire)
        session.data_received(b"EHLO c\r\n")
        start = asyncio.get_running_loop().time()
        message = b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nBDAT 3 LAST\r\nabc"
        session.data_received(message + message)  # the second sent behind the first
        # The sink's process is busy for 60 ms just when the first reply falls due.
        await asyncio.sleep(0.04)
        time.sleep(0.06)
        while len(accepted) < 2:
            await asyncio.sleep(0.005)
        return [t - start for t, data in wire.writes if b"queued" in data], wire, late

    replies, _, late = asyncio.run(run())
    # The first reply is written 50 ms late; the second was due 100 ms after
    # the arrival and goes at once, not 50 ms after that late write (150 ms).
    assert replies[0] >= 0.095
    assert replies[-1] < 0.14
    assert len(late) == 2 and late[0] >= 0.04


def load_bench():
    """scripts/bench as a module (its helpers, without running it)."""
    import importlib.machinery
    import importlib.util

    if "copiamail_bench" in sys.modules:
        return sys.modules["copiamail_bench"]
    loader = importlib.machinery.SourceFileLoader("copiamail_bench", str(BENCH))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[loader.name] = module  # its dataclasses look their module up
    loader.exec_module(module)
    return module


def test_throttled_jobs_are_shared_in_proportion_to_the_connections_each_receiver_allows():
    bench = load_bench()
    assert bench.throttled_shares(2000, (2, 3, 5, None), 10) == [200, 300, 500, 1000]
    assert bench.throttled_shares(40, (2, 3, 5, None), 10) == [4, 6, 10, 20]
    assert bench.throttled_shares(7, (2, 3, 5, None), 10) == [1, 1, 2, 3]  # largest remainders, summing to 7
    assert bench.throttled_shares(30, (2, 50), 10) == [5, 25]  # a limit above the ceiling counts as the ceiling
    order = bench.interleaved([200, 300, 500, 1000])
    assert [order.count(d) for d in range(4)] == [200, 300, 500, 1000]
    assert [order[:20].count(d) for d in range(4)] == [2, 3, 5, 10]  # spread evenly over the queue


def test_the_stolen_ticks_are_read_from_the_eighth_figure_of_the_cpu_line():
    bench = load_bench()
    assert bench.steal_ticks("cpu  24154 57 44808 484915 1398 0 3558 14 0 0\n") == 14
    assert bench.steal_ticks("cpu  24154 57 44808 484915\n") == 0  # an old kernel's line gives none
    assert bench.steal_ticks() >= 0  # this machine's own line


def test_the_ideal_rate_is_the_connections_allowed_over_the_latency():
    bench = load_bench()
    assert bench.ideal_rate((2, 3, 5, None), 10, 0.05) == 400
    t = bench.Throttled(2000, 0.05, 10, 2048, 600, 2)
    assert t.shares == [200, 300, 500, 1000] and t.ideal == 400
    header = "\n".join(t.header())
    assert "allows 2, 3, 5, unlimited connections" in header
    assert "(unlimited counted as the ceiling 10): 200, 300, 500, 1000" in header
    assert "ideal: (2+3+5+10) connections / 0.05 s = 400 msgs/s (5.00 s)" in header


def test_the_throttled_figures_read_as_the_report_says():
    bench = load_bench()
    figures = bench.throttled_figures(1990, 10.0, 400.0, 110, {"connections": 100, "rate": 10}, 10, 2000)
    assert figures == {
        "ratio to the ideal": "0.50 (199 of 400 msgs/s)",
        "throttle replies received": "110 (connections 100, rate 10)",
        "jobs in FAIL": "10",
        "attempts throttled": "110 of 2100 (5.2%)",
    }
    late = bench.throttled_figures(1500, 600.0, 400.0, 0, {}, 0, 2000)
    assert late["throttle replies received"] == "0" and late["jobs left undelivered when the time ran out"] == "500"


def test_bench_throttled_part_runs_the_fixed_and_exact_configurations_end_to_end(tmp_path):
    r = subprocess.run([sys.executable, str(BENCH), "--only", "throttled", "--configs", "fixed,adaptive,exact",
                        "--throttled-jobs", "40", "--latency", "0.01", "--retry", "1", "--throttled-timeout", "120",
                        "--workdir", str(tmp_path), "--workers", "2"], capture_output=True, text=True, timeout=300, env=cli_env())
    assert r.returncode == 0, r.stderr + r.stdout
    out = r.stdout
    assert "jobs per domain in proportion to the connections allowed (unlimited counted as the ceiling 10): 4, 6, 10, 20" in out
    assert "ideal: (2+3+5+10) connections / 0.01 s = 2000 msgs/s (0.02 s)" in out
    fixed = out.split("copiamail fixed @ 10", 1)[1]
    assert re.match(r"\s+40 msgs", fixed), out
    assert re.search(r"ratio to the ideal: [\d.]+ \(\d+ of 2000 msgs/s\)", fixed), out
    assert re.search(r"throttle replies received: \d+", fixed) and "jobs in FAIL: 0" in fixed, out
    throttled = re.search(r"attempts throttled: (\d+) of (\d+)", fixed)
    assert int(throttled.group(2)) == 40 + int(throttled.group(1)), out
    assert re.search(r"t1\.bench \(allows 2 connections\): peak \d+ open, 4 msgs", fixed), out
    assert re.search(r"jobs accepted by: 50% [\d.]+ s, 90% [\d.]+ s, 99% [\d.]+ s, last [\d.]+ s", fixed), out
    assert re.search(r"copiamail exact\s+40 msgs", out), out
    # Until copiamail knows `adaptive: true`, that configuration is skipped with one line.
    assert "copiamail adaptive @ 10" in out or "copiamail adaptive: skipped, this copiamail refuses its configuration" in out
    assert list(tmp_path.iterdir()) == []  # the work directory is removed


def test_the_arrival_line_shows_where_a_slow_tail_starts():
    bench = load_bench()
    times = [0.1 * i for i in range(1, 99)] + [30.0, 40.0]  # 100 jobs, two of them late
    assert bench.arrival_line(times, 100) == "50% 5.00 s, 90% 9.00 s, 99% 30.00 s, last 40.00 s"
    assert bench.arrival_line([1.0, 2.0], 4) == "50% 2.00 s, 90% never, 99% never, last 2.00 s"
