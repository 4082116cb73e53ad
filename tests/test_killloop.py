"""scripts/killloop.py in a smaller size (its full run, 1,000 jobs and 25
kills, is quoted in docs/reliability.md): nothing lost or stuck, and no
innocent job in FAIL with outcome 67. 20 kills: without the settle time for
interrupted jobs, this seed sent 20 jobs to FAIL."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_kill_loop_script_loses_nothing_and_leaves_nothing_stuck():
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "killloop.py"), "--jobs", "400", "--kills", "20", "--seed", "7"],
        capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "kills 20" in result.stdout
    assert "lost 0, stuck 0, in two places 0, under another name 0, temporary files left 0" in result.stdout
    assert "failed 0 (interrupted three times)" in result.stdout  # no innocent job in FAIL with outcome 67
