#!/usr/bin/env python3
"""Kill a node at random moments many times during a drain, then drain, and
count what was lost, duplicated and stuck.

    python3 scripts/killloop.py [--jobs 1000] [--kills 25] [--seed 1]

A temporary spool gets --jobs jobs over 10 domains in TOSEND..TOSEND3 with
`$domain_limit * @ 2`; an embedded SMTP sink on 127.0.0.1 holds each message
0.2 s so the drain takes long enough to be killed. Node N1 is started and
SIGKILLed after a random 0.2-0.8 s, --kills times (bounded also by
--max-seconds); then one `node --drain` finishes the work. It prints:

- lost: jobs in no folder at all (must be 0)
- stuck: jobs still in a TOSEND folder or ACTIVE after the final drain (must be 0)
- temporary files left in ACTIVE or TEMP (must be 0)
- failed: jobs in FAIL (interrupted three times: outcome 67)
- duplicated: messages the sink received more than once, all with one
  Message-ID per job: the documented at-least-once window (a kill while the
  node waits for the server's reply to the end of DATA)
- in two places / under another name: a job found in more than one folder, or
  published again as NAME~1.FS (must be 0)

Exit status 0 when lost, stuck and temporary files are all 0.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from copiamail.smtp.sink import SmtpSink  # noqa: E402  # importable only once the checkout is on sys.path

QUEUES = ["TOSEND", "TOSEND1", "TOSEND2", "TOSEND3"]


def job_files(root: Path, folders: list[str]) -> dict[str, list[str]]:
    """Every job file name (and the job name of a result file) -> the folders it is in."""
    out: dict[str, list[str]] = {}
    for folder in folders:
        d = root / folder
        if d.is_dir():
            for p in d.rglob("*"):
                name = p.name.split(".FS.")[0] + ".FS" if ".FS." in p.name else p.name
                if p.is_file() and name.upper().endswith(".FS"):
                    out.setdefault(name, []).append(folder)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--kills", type=int, default=25)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--max-seconds", type=float, default=600)
    ap.add_argument("--keep", action="store_true", help="keep the temporary spool")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    base = Path(tempfile.mkdtemp(prefix="copiamail-killloop-"))
    root = base / "spool"
    for q in QUEUES:
        (root / q).mkdir(parents=True)
    names = []
    for i in range(args.jobs):
        name = f"K{i:06d}.FS"
        (root / QUEUES[i % len(QUEUES)] / name).write_text(
            f"$email_address user{i}@d{i % 10}.test\n$email_subject \"kill loop {i}\"\n$email_text \"job {i}\"\n"
        )
        names.append(name)
    (base / "FAXFACTS.CFG").write_text("$domain_limit * @ 2\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    started = time.monotonic()
    kills = 0
    with SmtpSink(delay=0.2) as sink:
        (base / "copiamail.yaml").write_text(
            "spool: ./spool\ncfg: ./FAXFACTS.CFG\nscan_interval: 0.5\nconnection_idle: 0.2\nshutdown_grace: 1\n"
            f"relay: {{host: 127.0.0.1, port: {sink.port}, starttls: never}}\n"
        )
        cmd = [sys.executable, "-m", "copiamail", "--config", str(base / "copiamail.yaml")]
        while kills < args.kills and time.monotonic() - started < args.max_seconds:
            if not job_files(root, QUEUES + ["ACTIVE"]):
                break
            proc = subprocess.Popen([*cmd[:3], "node", "--name", "N1", *cmd[3:]], cwd=base, env=env,
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(rng.uniform(0.2, 0.8))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
        final = subprocess.run([*cmd[:3], "node", "--name", "N1", "--drain", *cmd[3:]], cwd=base, env=env,
                               stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=args.max_seconds)
        ids = dict(sink.message_ids)
    where = job_files(root, QUEUES + ["ACTIVE", "SENT", "FAIL"])
    lost = [n for n in names if n not in where]
    stuck = [n for n, f in where.items() if any(x in QUEUES or x == "ACTIVE" for x in f)]
    twice = [n for n, f in where.items() if len(f) > 1]
    strangers = [n for n in where if n not in set(names)]  # e.g. a job published again as NAME~1.FS
    # Inside node folders of ACTIVE, and in TEMP; the lock and heartbeat files
    # beside the node folders are the nodes' own, not jobs.
    temp = [p for p in list((root / "ACTIVE").rglob("*")) + list((root / "TEMP").rglob("*"))
            if p.is_file() and p.parent != root / "ACTIVE"]
    sent = sum(1 for f in where.values() if f == ["SENT"])
    failed = sum(1 for f in where.values() if f == ["FAIL"])
    duplicated = sum(n - 1 for n in ids.values() if n > 1)
    print(f"jobs {args.jobs}, kills {kills} (SIGKILL at random moments), then one drain "
          f"(exit {final.returncode}) in {time.monotonic() - started:.1f} s")
    print(f"sent {sent}, failed {failed} (interrupted three times), lost {len(lost)}, stuck {len(stuck)}, "
          f"in two places {len(twice)}, under another name {len(strangers)}, temporary files left {len(temp)}")
    print(f"messages received {sum(ids.values())} for {len(ids)} jobs; duplicated {duplicated} "
          f"(the at-least-once window: a kill while waiting for the server's reply to the end of DATA)")
    if args.keep:
        print(f"spool kept at {root}")
    else:
        shutil.rmtree(base)
    whole = sent + failed == args.jobs
    return 0 if whole and not lost and not stuck and not twice and not strangers and not temp and final.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
