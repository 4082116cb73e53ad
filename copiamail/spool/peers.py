"""Heartbeats, and taking over the jobs of a node that died.

Every running node moves its heartbeat on every few seconds: an empty file
``ACTIVE/<node>.alive.<host>-<token>-m<ms>.<n>`` renamed to ``<n+1>`` (the
token is new at each start; ``<ms>`` is the node's ``node_stale_after`` in
milliseconds; a rename needs no free disk space, so a node on a full disk
still beats). A node's name is unique across machines: a node starting as N1
where N1's heartbeat comes from another host watches it first, and refuses
to start if it moves (:func:`alive_elsewhere`).

Another node that sees jobs in ``ACTIVE/<peer>/`` watches those names: when
they have not changed for ``node_stale_after`` seconds *of the watcher's own
monotonic clock*, the peer is taken for dead. The setting is one for the
whole spool: a peer is judged by the larger of the watcher's value and the
one its heartbeat declares (it beats at a fifth of its own), so nodes
configured differently never take a live one for dead; the difference is
logged. Only names are compared, never mtimes: on a shared spool an mtime
comes from another machine's clock, which may differ from ours. A takeover
folder (below) is watched through its taker's heartbeat, so a taker that
dies halfway is taken over in turn.

Taking over is one rename: ``ACTIVE/<peer>`` becomes ``ACTIVE/<me>~from~<peer>~<n>``.
On a shared spool several nodes may try at once; the rename is atomic, so one
wins and the others find nothing. The winner then recovers that folder exactly
as a restarting node recovers its own (committed results finished, jobs it
was sending back to their folders with outcome 66, FAIL at the third
interruption, jobs only claimed back unchanged), and removes it. A node runs
its checks in a thread of their own (:func:`copiamail.node.services.watch_peers`),
so a long recovery never stops its own heartbeat.

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
import re
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from copiamail.spool.layout import ACTIVE
from copiamail.spool.queue import Spool
from copiamail.spool.recovery import RecoveryReport, recover

log = logging.getLogger("copiamail")

TAKEOVER_MARK = "~from~"
# Test-only: behave as if every peer ran on another machine (its lock unseen),
# so tests on one machine show that the heartbeat alone decides.
IGNORE_LOCKS_ENV = "COPIAMAIL_IGNORE_PEER_LOCKS"
# Test-only: a node that runs but never beats (to show the heartbeat matters).
NO_HEARTBEAT_ENV = "COPIAMAIL_NO_HEARTBEAT"
# The longest a live node waits between two beats (heartbeat_interval), and
# how long a starting node watches another host's heartbeat of its own name.
MAX_BEAT_INTERVAL = 10.0
WATCH_FOREIGN_BEAT = 1.5 * MAX_BEAT_INTERVAL


def host_tag(host: str | None = None) -> str:
    """This machine's name (or ``host``) as a heartbeat file shows it: letters,
    digits and ``-`` only."""
    return re.sub(r"[^A-Za-z0-9-]", "_", host if host is not None else socket.gethostname()) or "_"


def _beat_token(name: str, node: str) -> tuple[str | None, float | None]:
    """The host tag and the declared ``node_stale_after`` (seconds) in heartbeat
    file ``name`` of ``node``; None for what the name does not carry."""
    token = name[len(f"{node}.alive."):].rpartition(".")[0]
    stale: float | None = None
    head, dash, last = token.rpartition("-")
    if dash and last[:1] == "m" and last[1:].isascii() and last[1:].isdigit():
        stale, token = int(last[1:]) / 1000, head
    host, dash, _ = token.rpartition("-")
    return (host if dash else None), stale


def _beat_host(name: str, node: str) -> str | None:
    return _beat_token(name, node)[0]


def beat_files(root: Path, node: str) -> list[str] | None:
    """The names of ``node``'s heartbeat files in the spool at ``root``; None
    if ACTIVE cannot be listed."""
    prefix = f"{node}.alive."
    try:
        return sorted(n for n in os.listdir(root / ACTIVE) if n.startswith(prefix))
    except OSError:
        return None


def heartbeat_interval(stale_after: float) -> float:
    """How often to beat: often enough that a live node is never taken for dead."""
    if stale_after <= 0:
        return MAX_BEAT_INTERVAL
    return max(0.2, min(MAX_BEAT_INTERVAL, stale_after / 5))


@dataclass
class _Seen:
    content: tuple[str, ...]
    since: float


class Peers:
    """One node's heartbeat, and its watch over the other nodes' ACTIVE folders."""

    def __init__(self, spool: Spool, node: str, stale_after: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.spool = spool
        self.node = node
        self.stale_after = stale_after
        self.clock = clock
        self._beats = 0
        self._token = f"{host_tag()}-{secrets.token_hex(4)}-m{round(max(0.0, stale_after) * 1000)}"
        self._current: Path | None = None
        self._seen: dict[str, _Seen] = {}
        self._told: set[str] = set()  # peers whose other node_stale_after was logged

    def beat(self) -> None:
        """Move this node's heartbeat on: ``ACTIVE/<node>.alive.<n>`` is renamed
        to the next ``n``. A rename needs no free disk space, so a node whose
        disk is full still shows it is alive."""
        if os.environ.get(NO_HEARTBEAT_ENV):
            return
        base = self.spool.root / ACTIVE
        self._beats += 1
        # A token new at every start: a node that restarts before its second
        # beat never shows the name it showed before it died.
        nxt = base / f"{self.node}.alive.{self._token}.{self._beats}"
        try:
            if self._current is None:
                for old in beat_files(self.spool.root, self.node) or []:
                    (base / old).unlink()
                nxt.touch()
            else:
                os.rename(self._current, nxt)
            self._current = nxt
        except OSError as e:
            log.warning("%s: cannot move the heartbeat on: %s", nxt, e.strerror)
            self._current = None

    def stop(self) -> None:
        """A clean stop: the heartbeat goes, unless jobs stay in ACTIVE (results
        a full disk kept from being written): then it stays, frozen, and a peer
        takes those over after node_stale_after."""
        if self.spool.holds_jobs(self.node) or self._current is None:
            return
        try:
            self._current.unlink()
        except OSError:
            pass

    def check(self) -> list[tuple[str, RecoveryReport]]:
        """Take over the jobs of every node seen dead; returns what was recovered
        from which folder. Never raises: a failure is logged and tried again at
        the next check."""
        out: list[tuple[str, RecoveryReport]] = []
        try:
            self._check(out)
        except Exception as e:
            log.error("checking other nodes failed: %s", e)
        return out

    def _check(self, out: list[tuple[str, RecoveryReport]]) -> None:
        now = self.clock()
        base = self.spool.root / ACTIVE
        try:
            folders = [p.name for p in base.iterdir() if p.is_dir() and p.name != self.node]
        except FileNotFoundError:
            return
        for folder in folders:
            # A takeover folder belongs to its taker: ours is recovered now (a
            # crash cut our takeover short); another's when its taker is dead.
            owner = folder.split(TAKEOVER_MARK, 1)[0]
            if owner == self.node:
                out.append((folder, finish_takeover(self.spool, folder, self.node)))
                continue
            if self.stale_after <= 0:
                continue
            if not self.spool.holds_jobs(folder):
                self._seen.pop(folder, None)
                continue
            names = beat_files(self.spool.root, owner)
            if names is None:
                continue  # cannot tell: never take a node for dead on a listing error
            content = tuple(names)
            seen = self._seen.get(folder)
            if seen is None or seen.content != content:
                self._seen[folder] = _Seen(content, now)
                continue
            if now - seen.since < self._stale_after_for(owner, names) or self._locked_here(owner):
                continue
            taken = self._take(folder)
            self._seen.pop(folder, None)
            if taken is not None:
                log.warning("node %s: no heartbeat for %.0f s; took over its jobs", owner, now - seen.since)
                out.append((folder, finish_takeover(self.spool, taken, self.node)))

    def _stale_after_for(self, peer: str, names: list[str]) -> float:
        """How long ``peer``'s heartbeat may stand still: the larger of this
        node's ``node_stale_after`` and the one ``peer`` declares (a peer that
        takes nothing over, 0, beats every MAX_BEAT_INTERVAL: five of those)."""
        declared = max((s for s in (_beat_token(n, peer)[1] for n in names) if s is not None), default=None)
        if declared is None or declared == self.stale_after:
            return self.stale_after
        if declared <= 0:
            declared = 5 * MAX_BEAT_INTERVAL
        if peer not in self._told:
            self._told.add(peer)
            log.warning("node %s has node_stale_after %g, this node %g: it is judged by the larger; set one value "
                        "for every node of the spool", peer, declared, self.stale_after)
        return max(self.stale_after, declared)

    def _locked_here(self, peer: str) -> bool:
        # A peer on this machine holds its lock file while it runs: alive,
        # whatever its heartbeat says. On a network share a lock proves nothing
        # (and may fail): then the heartbeat alone decides.
        if os.environ.get(IGNORE_LOCKS_ENV):
            return False
        lock = FileLock(str(self.spool.lock_path(peer)))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            return True
        except OSError:
            return False
        lock.release()
        return False

    def _take(self, folder: str) -> str | None:
        base = self.spool.root / ACTIVE
        for n in range(1, 1000):
            name = f"{self.node}{TAKEOVER_MARK}{folder}~{n}"
            if (base / name).exists():
                continue
            try:
                os.rename(base / folder, base / name)
            except FileNotFoundError:
                return None  # another node took it first
            except OSError:
                continue
            return name
        return None


def alive_elsewhere(spool: Spool, node: str, watch: float = WATCH_FOREIGN_BEAT,
                   sleep: Callable[[float], None] = time.sleep) -> str | None:
    """The host where a node named ``node`` runs now, seen by its heartbeat
    moving within ``watch`` seconds; None if none does. Called by a node
    that holds its own lock on this machine: a heartbeat left by an earlier
    run here is dead, so only another host's is watched (every one, with
    the test-only IGNORE_LOCKS_ENV)."""
    here = None if os.environ.get(IGNORE_LOCKS_ENV) else host_tag()

    def beats() -> set[str]:
        return {n for n in beat_files(spool.root, node) or [] if _beat_host(n, node) != here}

    first = beats()
    if not first:
        return None
    log.info("node %s: a heartbeat of that name from another host (%s); watching it for %.0f s before starting",
             node, ", ".join(sorted(filter(None, (_beat_host(n, node) for n in first)))) or "?", watch)
    deadline = time.monotonic() + watch
    while time.monotonic() < deadline:
        sleep(0.2)
        now = beats()
        if now != first and now:
            return _beat_host(sorted(now - first or now)[0], node) or "another host"
    return None


def takeover_folders(spool: Spool, node: str) -> list[str]:
    """The folders in ACTIVE that node ``node`` took over from dead peers and
    has not finished with (it stopped halfway), in name order."""
    base = spool.root / ACTIVE
    try:
        names = [p.name for p in base.iterdir() if p.is_dir()]
    except FileNotFoundError:
        return []
    return sorted(n for n in names if TAKEOVER_MARK in n and n.split(TAKEOVER_MARK, 1)[0] == node)


def finish_takeover(spool: Spool, folder: str, node: str) -> RecoveryReport:
    """Recover the jobs of ``folder`` (a dead peer's ACTIVE folder that node
    ``node`` took over) as that peer would at its restart, recorded as
    ``node``'s, then remove the folder. Anything recovery does not know is
    left in it, with a warning, rather than deleted."""
    report = recover(spool, folder, recorder=node)
    path = spool.root / ACTIVE / folder
    try:
        for qdir in path.iterdir():
            qdir.rmdir()
        path.rmdir()
    except OSError as e:
        log.warning("%s: left behind after a takeover: %s", folder, e.strerror)
    return report
