"""scripts/bench: its deferral part runs end to end (the part that needs
neither Postfix nor root) and reports what issue 5 asks for."""

from __future__ import annotations

import re
import subprocess
import sys
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
