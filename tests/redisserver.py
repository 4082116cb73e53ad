"""A real ``redis-server`` (Debian's package) on a free loopback port, for
the cluster tests: started, killed with SIGKILL and restarted on the same
port (empty, as a Redis without persistence comes back)."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    def __init__(self, workdir: Path, password: str | None = None, tls: tuple[str, str] | None = None) -> None:
        """``tls``: (certificate, key) files: the server speaks only TLS, and
        its ``url`` is ``rediss://`` trusting that certificate."""
        binary = shutil.which("redis-server")
        assert binary, "redis-server is missing: .ci/run installs it (apt-get install redis-server)"
        self.binary = binary
        self.workdir = workdir
        self.password = password
        self.tls = tls
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.tls is not None:
            return f"rediss://127.0.0.1:{self.port}/0?ssl_ca_certs={self.tls[0]}"
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self.workdir), "--protected-mode", "no"]
        if self.password:
            args += ["--requirepass", self.password]
        if self.tls is not None:
            args[1:3] = ["--port", "0", "--tls-port", str(self.port)]
            args += ["--tls-cert-file", self.tls[0], "--tls-key-file", self.tls[1], "--tls-ca-cert-file", self.tls[0],
                     "--tls-auth-clients", "no"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None

    def client(self):  # a sync client, for tests that look inside
        import redis

        return redis.Redis.from_url(self.url, password=self.password, socket_timeout=2)
