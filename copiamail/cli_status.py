"""``copiamail status``: the spool's folders, its waiting jobs per domain, what
every live node is doing (from :mod:`copiamail.spool.livestate`), and the
limits learned from throttle replies; as tables, live (``--watch``), or JSON."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import click

from copiamail.cli_common import common, config, open_spool
from copiamail.scheduling.adaptive import learned_in_spool, local_time
from copiamail.spool.holds import holds_in
from copiamail.spool.listing import ListedJob, list_jobs
from copiamail.spool.livestate import WorkerState, read_states
from copiamail.spool.queue import Spool

RECENT_FAILURES = 10  # failures --json and the table show, newest first


def _domain_limit(states: list[WorkerState], domain: str) -> int | None:
    """The cap of ``domain``'s own limit key as the live nodes publish it
    (its ``$domain_limit`` key, else its per-binding key), summed over nodes."""
    caps: list[int] = []
    for s in states:
        own = s.keys.get(f"domain_limit:{domain}")
        per_binding = [k.cap for key, k in s.keys.items()
                       if key.startswith("binding_domain:") and key.endswith(f":{domain}")]
        if own is not None:
            caps.append(own.cap)
        elif per_binding:
            caps.append(sum(per_binding))
    return sum(caps) if caps else None


def status_document(spool: Spool, now: float) -> dict[str, Any]:
    """What ``status --json`` prints: ``folders`` (jobs and the oldest job's
    age per folder), ``domains`` (waiting jobs, connections open on every live
    node, the domain's limit), ``nodes`` (each live or stale worker state
    summed per node) and the newest ``failures``."""
    counts = spool.counts()
    queued: list[ListedJob] = list(list_jobs(spool, now, ["TOSEND"]))
    oldest: dict[str, float] = {}
    for job in queued:
        oldest[job.folder] = max(oldest.get(job.folder, 0.0), job.age)
    folders = [{"folder": f, "jobs": n, "oldest_age_seconds": round(oldest[f], 1) if f in oldest else None}
               for f, n in counts.items()]
    states = read_states(spool.root, now)
    alive = [s for s in states if s.alive]
    waiting: Counter[str] = Counter(j.domain or "(none)" for j in queued)
    open_now: Counter[str] = Counter()
    for s in alive:
        open_now.update(s.domains)
    domains = [{"domain": d, "waiting": waiting.get(d, 0), "connections": open_now.get(d, 0),
                "limit": _domain_limit(alive, d)}
               for d in sorted(set(waiting) | set(open_now), key=lambda d: (-waiting.get(d, 0) - open_now.get(d, 0), d))]
    nodes: dict[str, dict[str, Any]] = {}
    for s in states:
        n = nodes.setdefault(s.node, {"name": s.node, "alive": False, "workers": 0, "connections": 0, "host": s.host,
                                      "heartbeat_age_seconds": None, "counters": Counter(), "keys": {}})
        n["workers"] += 1
        n["alive"] = n["alive"] or s.alive
        n["connections"] += s.connections if s.alive else 0
        age = round(max(0.0, now - s.updated), 1)
        n["heartbeat_age_seconds"] = age if n["heartbeat_age_seconds"] is None else min(n["heartbeat_age_seconds"], age)
        n["counters"].update(s.counters)
        for key, k in s.keys.items():
            entry = n["keys"].setdefault(key, {"open": 0, "cap": 0, "configured": None})
            entry["open"] += k.open
            entry["cap"] += k.cap
            if k.configured is not None:
                entry["configured"] = (entry["configured"] or 0) + k.configured
    for n in nodes.values():
        n["counters"] = dict(n["counters"])
    failed = sorted(list_jobs(spool, now, ["FAIL"]), key=lambda j: j.age)[:RECENT_FAILURES]
    failures = [{"name": j.name, "recipient": j.recipient, "domain": j.domain, "age_seconds": round(j.age, 1),
                 "error": j.error} for j in failed]
    return {"spool": str(spool.root), "folders": folders, "domains": domains, "nodes": list(nodes.values()),
            "failures": failures, "holds": sorted(str(h) for h in holds_in(spool.root))}


def _tables(spool: Spool) -> Any:
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    doc = status_document(spool, time.time())
    parts: list[Any] = []
    folders = Table(title=f"spool {spool.root}")
    for column in ("folder", "jobs", "oldest"):
        folders.add_column(column, justify="left" if column == "folder" else "right")
    for f in doc["folders"]:
        name = f["folder"]
        if f["jobs"] or not name.upper().startswith("TOSEND") or name.upper() == "TOSEND":
            age = f["oldest_age_seconds"]
            folders.add_row(name, str(f["jobs"]), "" if age is None else f"{age:.0f}s")
    parts.append(folders)
    domains = Table(title="per domain: waiting jobs, connections open on the live nodes, limit")
    for column in ("domain", "waiting", "connections", "limit"):
        domains.add_column(column, justify="left" if column == "domain" else "right")
    for d in doc["domains"]:
        domains.add_row(Text(d["domain"]), str(d["waiting"]), str(d["connections"]),
                        "" if d["limit"] is None else str(d["limit"]))
    parts.append(domains)
    if doc["holds"]:
        parts.append(Text("held (copiamail release lifts): " + ", ".join(doc["holds"])))
    if doc["nodes"]:
        nodes = Table(title="nodes: connections per limit key (open / cap now / configured)")
        for column in ("node", "alive", "beat", "sent", "failed", "deferred", "key", "open", "cap", "configured"):
            nodes.add_column(column)
        for n in doc["nodes"]:
            head = [n["name"], "yes" if n["alive"] else "stale", f"{n['heartbeat_age_seconds']:.0f}s ago",
                    str(n["counters"].get("sent", 0)), str(n["counters"].get("failed", 0)),
                    str(n["counters"].get("deferred", 0))]
            keys = sorted(n["keys"].items()) or [("", None)]
            for i, (key, k) in enumerate(keys):
                row = head if i == 0 else [""] * len(head)
                nodes.add_row(*row, Text(key), *(("", "", "") if k is None else
                                                  (str(k["open"]), str(k["cap"]),
                                                   "" if k["configured"] is None else str(k["configured"]))))
        parts.append(nodes)
    if doc["failures"]:
        failures = Table(title="recent failures")
        for column in ("job", "recipient", "EMAIL_ERROR"):
            failures.add_column(column)
        for f in doc["failures"]:
            failures.add_row(Text(f["name"]), Text(f["recipient"]), Text(f["error"] or ""))
        parts.append(failures)
    learned = learned_in_spool(spool.root)
    if learned:
        adaptive = Table(title="limits learned from throttle replies")
        for column in ("key", "node", "learned", "since", "reply"):
            adaptive.add_column(column)
        for key, (node, what) in sorted(learned.items()):
            adaptive.add_row(Text(key), node, what.describe() or "as configured", local_time(what.at),
                             Text(f"{what.kind}: {what.reply}"))
        parts.append(adaptive)
    return Group(*parts)


@click.command()
@click.option("--watch", is_flag=True, help="Refresh every second until interrupted.")
@click.option("--json", "as_json", is_flag=True, help="Print the status as one JSON object.")
@common
def status(watch: bool, as_json: bool, config_file: Path | None, spool_dir: Path | None) -> None:
    """Jobs per folder and per domain, what every node is doing, recent failures."""
    from rich.console import Console

    spool = open_spool(config(config_file, spool_dir))
    if as_json and not watch:
        click.echo(json.dumps(status_document(spool, time.time()), indent=1))
        return
    console = Console()
    if not watch:
        console.print(_tables(spool))
        return
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if console.is_terminal and not as_json:
        from rich.live import Live

        with Live(_tables(spool), console=console, refresh_per_second=2) as live:
            while not stop.wait(1):
                live.update(_tables(spool))
        return
    # Piped or redirected: one frame per refresh, each complete when written.
    while True:
        if as_json:
            click.echo(json.dumps(status_document(spool, time.time())))
        else:
            console.print(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')}")
            console.print(_tables(spool))
            console.file.flush()
        if stop.wait(1):
            return
