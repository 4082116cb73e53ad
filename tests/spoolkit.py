"""A spool, a config and the `copiamail` CLI, for end-to-end tests.

Each test gets its own spool under tmp_path, a copiamail.yaml pointing at the
test's SMTP server on 127.0.0.1, and runs the real CLI in a subprocess.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

CLI = [sys.executable, "-m", "copiamail"]
REPO = Path(__file__).resolve().parent.parent


def cli_env(**extra: str) -> dict[str, str]:
    """The environment for a CLI subprocess: the checkout under test comes first
    on the import path, whatever copy of copiamail pip installed last."""
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {**os.environ, "PYTHONPATH": path, **extra}


class SpoolKit:
    def __init__(self, base: Path, port: int | None = None, cfg: Iterable[str] = (), yaml: str = "", host: str = "127.0.0.1") -> None:
        self.base = base
        self.root = base / "spool"
        self.cfg_path = base / "FAXFACTS.CFG"
        self.cfg_path.write_text("\n".join(cfg) + "\n", encoding="utf-8")
        self.config_path = base / "copiamail.yaml"
        relay = f"relay: {{host: {host}, port: {port}, starttls: never}}\n" if port is not None else ""
        self.config_path.write_text(
            "spool: ./spool\n"
            "cfg: ./FAXFACTS.CFG\n"
            "scan_interval: 0.3\n"
            "connection_idle: 0.2\n"
            "smtp_timeout: 10\n"
            "shutdown_grace: 2\n"
            + relay + yaml,
            encoding="utf-8",
        )
        for d in ["TOSEND"] + [f"TOSEND{i}" for i in range(1, 16)]:
            (self.root / d).mkdir(parents=True, exist_ok=True)

    # --- jobs ----------------------------------------------------------------

    def job(self, queue: str, name: str, *lines: str, to: str | None = None) -> Path:
        body = ([f"$email_address {to}"] if to else []) + list(lines)
        if to and not any(l.startswith("$email_text") or l.startswith("$email_body") for l in lines):
            body.append(f'$email_text "hello {name}"')
        path = self.root / queue / name
        path.write_bytes(("\n".join(body) + "\n").encode("utf-8"))
        return path

    def submit(self, queue: str, name: str, *lines: str, to: str | None = None) -> Path:
        """A job handed in as a submitter does: written as ``NAME.TFS``, then
        renamed to ``name`` (the arrival a running node's watcher reports)."""
        tfs = self.job(queue, name.rpartition(".")[0] + ".TFS", *lines, to=to)
        return tfs.rename(tfs.with_name(name))

    def names(self, folder: str) -> list[str]:
        d = self.root / folder
        return sorted(p.name for p in d.iterdir() if p.name.upper().endswith(".FS")) if d.is_dir() else []

    def read(self, folder: str, name: str) -> str:
        return (self.root / folder / name).read_text(encoding="utf-8")

    def active(self) -> list[Path]:
        """Files inside node folders of ACTIVE (claimed jobs, results, temporary
        files); the lock and heartbeat files beside those folders are not jobs."""
        active = self.root / "ACTIVE"
        return sorted(p for p in active.rglob("*") if p.is_file() and p.parent != active)

    def waiting(self) -> list[str]:
        return [n for q in ["TOSEND"] + [f"TOSEND{i}" for i in range(1, 16)] for n in self.names(q)]

    # --- the CLI -------------------------------------------------------------

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*CLI, *args], cwd=self.base, capture_output=True, text=True, timeout=timeout,
            env=cli_env(COPIAMAIL_CONFIG=str(self.config_path)), stdin=subprocess.DEVNULL,
        )

    def drain(self, name: str = "N1", *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run `node --drain`; after it exits 0, no job may be left in ACTIVE
        (SPEC 1: a job is in exactly one place, and a stopped node holds none)."""
        result = self.cli("node", "--name", name, "--drain", *args, timeout=timeout)
        assert "Traceback" not in result.stderr, result.stderr
        if result.returncode == 0:
            assert self.active() == [], (self.active(), result.stderr)
        return result

    def start(self, name: str = "N1", *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [*CLI, "node", "--name", name, *args], cwd=self.base, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
            env=cli_env(COPIAMAIL_CONFIG=str(self.config_path)),
        )

    def drain_until(self, done, timeout: float = 30, name: str = "N1") -> None:
        """Drain again and again (retries fall due meanwhile) until done() holds."""
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, "drain_until: timed out"
            self.drain(name)
            if not done():
                time.sleep(0.3)


def var(text: str, name: str) -> str | None:
    found = re.findall(rf"^\$var_def {name} (.*)$", text, re.M)
    return found[-1].strip('"') if found else None


def attempts(text: str) -> list[list[str]]:
    """What each $attempt_record says, in any layout copiamail reads, as
    [E, NODE, OUTCOME, CLASS, text] (the fields of copiamail's first layout;
    the text as written, quoted where it needs quotes)."""
    from copiamail.jobfile.fsfile import CommandFile, format_arg
    from copiamail.jobfile.owned import parse_attempt

    out = []
    for cmd in CommandFile.parse(text.encode("utf-8")).commands():
        if cmd.name == "attempt_record" and (record := parse_attempt(cmd)) is not None:
            out.append(["E", record.node, str(record.outcome), record.klass, format_arg(record.text)])
    return out


def children_of(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry))
    return out


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(interval)


def stop(proc: subprocess.Popen[str], sig: int = signal.SIGTERM, timeout: float = 30) -> tuple[int, str, str]:
    proc.send_signal(sig)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # Say where it hangs (py-spy, where installed), then end it: a test
        # that fails here must not leave a process behind.
        where = subprocess.run(["py-spy", "dump", "--pid", str(proc.pid)], capture_output=True, text=True,
                               check=False).stdout if shutil.which("py-spy") else ""
        proc.kill()
        out, err = proc.communicate(timeout=timeout)
        raise AssertionError(f"did not stop within {timeout} s:\n{where}\n{err}") from None
    return proc.returncode, out, err


def run_on_a_terminal(argv: list[str], cwd: Path, env: dict[str, str], stderr_too: bool,
                      timeout: float = 60) -> tuple[int, str]:
    """Run ``argv`` with its stdout (and, with ``stderr_too``, its stderr) on a
    pseudo-terminal, as an operator's shell would; its exit code and all it
    wrote to the terminal."""
    import pty

    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=slave,
                            stderr=slave if stderr_too else subprocess.PIPE, env=env)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:
            break  # EIO: every writer has closed the terminal
        if not data:
            break
        chunks.append(data)
    proc.communicate(timeout=timeout)
    os.close(master)
    return proc.returncode, b"".join(chunks).decode("utf-8", "replace")
