"""Heartbeats, and taking over the jobs of a node that died (issue 4).

Every running node rewrites ``ACTIVE/<node>.alive`` (write then rename) every
few seconds with a counter that changes at each beat. Another node that sees
jobs in ``ACTIVE/<peer>/`` watches that file: when its content has not changed
for ``node_stale_after`` seconds *of the watcher's own monotonic clock*, the
peer is taken for dead. Only content is compared, never mtimes, so clocks that
differ between machines on a shared spool do not matter (DESIGN: "do not
trust mtimes across machines").

Taking over is one rename: ``ACTIVE/<peer>`` becomes ``ACTIVE/<me>~from~<peer>~<n>``.
On a shared spool several nodes may try at once; the rename is atomic, so one
wins and the others find nothing. The winner then recovers that folder exactly
as a restarting node recovers its own (committed results finished, interrupted
jobs back to their folders with outcome 66, FAIL at the third interruption),
and removes it.

What this needs, and its limit: a node taken for dead must really be dead. A
node that is alive but cannot write its heartbeat for ``node_stale_after``
seconds (a stalled share, a paused machine) may deliver a job the taker has
already put back, so the job is sent twice (with the same Message-ID). Set
``node_stale_after`` well above any stall you expect; 0 turns taking over off
(a dead node's jobs then wait for its restart or ``copiamail recover``).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from filelock import FileLock, Timeout

from .recovery import RecoveryReport, recover
from .spool import ACTIVE, Spool

log = logging.getLogger("copiamail")

TAKEOVER_MARK = "~from~"


def heartbeat_interval(stale_after: float) -> float:
    """How often to beat: often enough that a live node is never taken for dead."""
    if stale_after <= 0:
        return 10.0
    return max(0.2, min(10.0, stale_after / 5))


@dataclass
class _Seen:
    content: bytes | None
    since: float


class Peers:
    """One node's heartbeat, and its watch over the other nodes' ACTIVE folders."""

    def __init__(self, spool: Spool, node: str, stale_after: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.spool = spool
        self.node = node
        self.stale_after = stale_after
        self.clock = clock
        self._beats = 0
        self._seen: dict[str, _Seen] = {}
        self._ident = f"{socket.gethostname()} {os.getpid()}"

    def alive_path(self, node: str) -> Path:
        return self.spool.root / ACTIVE / f"{node}.alive"

    def beat(self) -> None:
        """Rewrite this node's heartbeat (a rename, so readers see all or nothing)."""
        self._beats += 1
        path = self.alive_path(self.node)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            tmp.write_text(f"{self._ident} {self._beats}\n", encoding="utf-8")
            os.replace(tmp, path)
        except OSError as e:
            log.warning("%s: cannot write the heartbeat: %s", path, e.strerror)

    def stop(self) -> None:
        """A clean stop: the heartbeat goes, unless jobs stay in ACTIVE (results
        a full disk kept from being written): then it stays, frozen, and a peer
        takes those over after node_stale_after."""
        if self.spool.holds_jobs(self.node):
            return
        try:
            self.alive_path(self.node).unlink()
        except OSError:
            pass

    def check(self) -> list[tuple[str, RecoveryReport]]:
        """Take over every peer seen dead; returns what was recovered from whom."""
        if self.stale_after <= 0:
            return []
        out: list[tuple[str, RecoveryReport]] = []
        now = self.clock()
        base = self.spool.root / ACTIVE
        try:
            peers = [p.name for p in base.iterdir() if p.is_dir() and p.name != self.node]
        except FileNotFoundError:
            return out
        for peer in peers:
            if TAKEOVER_MARK in peer:
                if peer.startswith(self.node + TAKEOVER_MARK):
                    out.append((peer, self._recover_taken(peer)))  # ours, left by a crash mid-takeover
                continue
            if not self.spool.holds_jobs(peer):
                self._seen.pop(peer, None)
                continue
            content = self._read(peer)
            seen = self._seen.get(peer)
            if seen is None or seen.content != content:
                self._seen[peer] = _Seen(content, now)
                continue
            if now - seen.since < self.stale_after or self._locked_here(peer):
                continue
            taken = self._take(peer)
            self._seen.pop(peer, None)
            if taken is not None:
                log.warning("node %s: no heartbeat for %.0f s; took over its jobs", peer, now - seen.since)
                out.append((peer, self._recover_taken(taken)))
        return out

    def _read(self, peer: str) -> bytes | None:
        try:
            return self.alive_path(peer).read_bytes()
        except OSError:
            return None

    def _locked_here(self, peer: str) -> bool:
        # A peer on this machine holds its lock file while it runs: alive,
        # whatever its heartbeat says. (On a network share the lock proves
        # nothing, and the heartbeat decides.)
        lock = FileLock(str(self.spool.lock_path(peer)))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            return True
        lock.release()
        return False

    def _take(self, peer: str) -> str | None:
        base = self.spool.root / ACTIVE
        for n in range(1, 1000):
            name = f"{self.node}{TAKEOVER_MARK}{peer}~{n}"
            if (base / name).exists():
                continue
            try:
                os.rename(base / peer, base / name)
            except FileNotFoundError:
                return None  # another node took it first
            except OSError:
                continue
            return name
        return None

    def _recover_taken(self, folder: str) -> RecoveryReport:
        report = recover(self.spool, folder, recorder=self.node)
        try:
            for qdir in (self.spool.root / ACTIVE / folder).iterdir():
                qdir.rmdir()
            (self.spool.root / ACTIVE / folder).rmdir()
        except OSError as e:
            log.warning("%s: left behind after a takeover: %s", folder, e.strerror)
        return report
