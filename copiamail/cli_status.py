"""``copiamail status``: the spool's folders, its waiting jobs per domain, what
every live node is doing (from :mod:`copiamail.spool.livestate`), and the
limits learned from throttle replies; as tables, live (``--watch``), or JSON."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

import click

from copiamail.cli_common import common, config, open_spool
from copiamail.config import Config
from copiamail.report import status_document
from copiamail.scheduling.adaptive import local_time
from copiamail.spool.queue import Spool


def _tables(spool: Spool, cfg: Config) -> Any:
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    doc = status_document(spool, time.time(), cfg)
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
    domains = Table(title="per domain: waiting jobs (deferred, held), connections open on the live nodes, limit")
    for column in ("domain", "waiting", "deferred", "held", "connections", "limit"):
        domains.add_column(column, justify="left" if column == "domain" else "right")
    for d in doc["domains"]:
        domains.add_row(Text(d["domain"]), str(d["waiting"]), str(d["deferred"]), str(d["held"]), str(d["connections"]),
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
    if doc["cluster"] is not None:
        parts.append(_cluster_table(doc["cluster"]))
    if doc["failures"]:
        failures = Table(title="recent failures")
        for column in ("job", "recipient", "EMAIL_ERROR"):
            failures.add_column(column)
        for f in doc["failures"]:
            failures.add_row(Text(f["name"]), Text(f["recipient"]), Text(f["error"] or ""))
        parts.append(failures)
    if doc["learned"]:
        adaptive = Table(title="limits learned from throttle replies")
        for column in ("key", "node", "learned", "since", "reply"):
            adaptive.add_column(column)
        for entry in doc["learned"]:
            adaptive.add_row(Text(entry["key"]), Text(entry["node"]), entry["learned"], local_time(entry["since"]),
                             Text(entry["reply"]))
        parts.append(adaptive)
    return Group(*parts)


def _cluster_table(cluster: dict[str, Any]) -> Any:
    from rich.table import Table
    from rich.text import Text

    title = f"cluster leases in Redis at {cluster['redis']} (leases / cap, per node)"
    if cluster["error"]:
        return Text(f"cluster: Redis at {cluster['redis']} cannot be read ({cluster['error']}); "
                    "jobs under cluster-wide limits wait")
    if cluster["quiet_seconds"]:
        title += f"; no new lease for {cluster['quiet_seconds']:g} s (Redis lost its leases lately)"
    table = Table(title=title)
    for column in ("key", "leases", "cap", "nodes"):
        table.add_column(column, justify="right" if column in ("leases", "cap") else "left")
    for k in cluster["keys"]:
        nodes = ", ".join(f"{n} {c}" for n, c in sorted(k["nodes"].items()))
        table.add_row(Text(k["key"]), str(k["leases"]), "" if k["cap"] is None else str(k["cap"]), Text(nodes))
    return table


@click.command()
@click.option("--watch", is_flag=True, help="Refresh every second until interrupted.")
@click.option("--json", "as_json", is_flag=True, help="Print the status as one JSON object.")
@common
def status(watch: bool, as_json: bool, config_file: Path | None, spool_dir: Path | None) -> None:
    """Jobs per folder and per domain, what every node is doing, recent failures."""
    from rich.console import Console

    cfg = config(config_file, spool_dir)
    spool = open_spool(cfg)
    if as_json and not watch:
        click.echo(json.dumps(status_document(spool, time.time(), cfg), indent=1))
        return
    console = Console()
    if not watch:
        console.print(_tables(spool, cfg))
        return
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if console.is_terminal and not as_json:
        from rich.live import Live

        with Live(_tables(spool, cfg), console=console, refresh_per_second=2) as live:
            while not stop.wait(1):
                live.update(_tables(spool, cfg))
        return
    # Piped or redirected: one frame per refresh, each complete when written.
    while True:
        if as_json:
            click.echo(json.dumps(status_document(spool, time.time(), cfg)))
        else:
            console.print(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')}")
            console.print(_tables(spool, cfg))
            console.file.flush()
        if stop.wait(1):
            return
