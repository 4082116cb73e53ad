"""The spool and its nodes as they are now, as one JSON-ready document: what
``status --json`` prints, ``/api/status`` serves, and the ``status`` tables,
the web page and ``/metrics`` are made from.

It is read from the spool (the job files, ``HOLD/``, the nodes' live state in
``STATE/`` and the learned limits in ``LIMITS/``), so it covers every node on
the spool, on any machine, and from Redis for a cluster's leases; reading it
changes nothing."""

from __future__ import annotations

import operator
from collections import Counter
from typing import Any

from copiamail.cluster_report import cluster_leases
from copiamail.config import Config
from copiamail.scheduling.adaptive import learned_in_spool
from copiamail.spool.holds import holds_in
from copiamail.spool.listing import ListedJob, list_jobs
from copiamail.spool.livestate import WorkerState, read_states
from copiamail.spool.queue import Spool

RECENT = 10  # failures and replies the document lists, newest first


def _limit_of(state: WorkerState, domain: str) -> tuple[int, int | None] | None:
    """The cap now and the configured cap of ``domain``'s own limit key in
    one worker (its ``$domain_limit`` key, else its per-binding keys summed)."""
    own = state.keys.get(f"domain_limit:{domain}")
    if own is not None:
        return own.cap, own.configured
    per_binding = [k for key, k in state.keys.items() if key.startswith("binding_domain:") and key.endswith(f":{domain}")]
    if not per_binding:
        return None
    configured = [k.configured for k in per_binding if k.configured is not None]
    return sum(k.cap for k in per_binding), (sum(configured) if configured else None)


def _per_node(alive: list[WorkerState], domain: str) -> dict[str, dict[str, int | None]]:
    """Per live node: connections open to ``domain``, and its limit now and configured."""
    out: dict[str, dict[str, int | None]] = {}
    for s in alive:
        limit = _limit_of(s, domain)
        opened = s.domains.get(domain, 0)
        if limit is None and not opened:
            continue
        entry = out.setdefault(s.node, {"connections": 0, "limit": None, "configured": None})
        entry["connections"] = (entry["connections"] or 0) + opened
        if limit is not None:
            entry["limit"] = (entry["limit"] or 0) + limit[0]
            if limit[1] is not None:
                entry["configured"] = (entry["configured"] or 0) + limit[1]
    return out


def _domains(queued: list[ListedJob], alive: list[WorkerState]) -> list[dict[str, Any]]:
    waiting: Counter[str] = Counter(j.domain or "(none)" for j in queued)
    deferred: Counter[str] = Counter(j.domain or "(none)" for j in queued if j.busy_count > 0)
    later: Counter[str] = Counter(j.domain or "(none)" for j in queued if "next try" in j.state)
    held: Counter[str] = Counter(j.domain or "(none)" for j in queued if j.held)
    open_now: Counter[str] = Counter()
    for s in alive:
        open_now.update(s.domains)
    out = []
    for d in sorted(set(waiting) | set(open_now), key=lambda d: (-waiting.get(d, 0) - open_now.get(d, 0), d)):
        nodes = _per_node(alive, d)
        limits = [n["limit"] for n in nodes.values() if n["limit"] is not None]
        out.append({"domain": d, "waiting": waiting.get(d, 0), "deferred": deferred.get(d, 0),
                    "retry_later": later.get(d, 0), "held": held.get(d, 0), "connections": open_now.get(d, 0),
                    "limit": sum(limits) if limits else None, "nodes": nodes})
    return out


def nodes_of(states: list[WorkerState], now: float) -> list[dict[str, Any]]:
    """The document's ``nodes``: the workers' states summed per node (cheap:
    no job file is read)."""
    nodes: dict[str, dict[str, Any]] = {}
    for s in states:
        n = nodes.setdefault(s.node, {"name": s.node, "alive": False, "workers": 0, "connections": 0, "host": s.host,
                                      "heartbeat_age_seconds": None, "counters": Counter(), "keys": {},
                                      "transactions": {"counts": [0] * len(s.transactions.counts), "sum": 0.0}})
        n["workers"] += 1
        n["alive"] = n["alive"] or s.alive
        n["connections"] += s.connections if s.alive else 0
        age = round(max(0.0, now - s.updated), 1)
        n["heartbeat_age_seconds"] = age if n["heartbeat_age_seconds"] is None else min(n["heartbeat_age_seconds"], age)
        n["counters"].update(s.counters)
        times = n["transactions"]
        times["counts"] = [a + b for a, b in zip(times["counts"], s.transactions.counts, strict=True)]
        times["sum"] += s.transactions.total
        for key, k in s.keys.items():
            entry = n["keys"].setdefault(key, {"open": 0, "cap": 0, "configured": None})
            entry["open"] += k.open
            # A shared key's cap is the node's, the same in each worker; another key's is its worker's.
            combine = max if k.shared else operator.add
            entry["cap"] = combine(entry["cap"], k.cap)
            if k.configured is not None:
                entry["configured"] = combine(entry["configured"] or 0, k.configured)
    for n in nodes.values():
        n["counters"] = dict(n["counters"])
    return list(nodes.values())


def _jobs(jobs: list[ListedJob]) -> list[dict[str, Any]]:
    return [{"name": j.name, "folder": j.folder, "recipient": j.recipient, "domain": j.domain,
             "age_seconds": round(j.age, 1), "error": j.error} for j in sorted(jobs, key=lambda j: j.age)[:RECENT]]


def status_document(spool: Spool, now: float, config: Config | None = None) -> dict[str, Any]:
    """The spool now:

    - ``folders``: jobs per folder and the oldest waiting job's age;
    - ``domains``: per recipient domain, jobs ``waiting`` (of which
      ``deferred`` by a full limit at least once, ``retry_later`` waiting for a
      retry time, ``held``), ``connections`` open on every live node, the
      domain's ``limit`` summed over them, and per node its connections and
      limit (now and configured);
    - ``nodes``: each node's workers summed: alive, heartbeat age,
      connections, counters, every limit key (open, cap, configured), and
      its SMTP transaction times (counts per bucket of
      :data:`~copiamail.spool.livestate.TRANSACTION_BUCKETS`, and their sum);
    - ``failures``: the newest jobs in FAIL; ``replies``: the newest waiting
      jobs that carry a reply (a temporary failure or a throttle reply);
    - ``holds``, and ``learned``: the limits learned from throttle replies;
    - ``cluster``: under ``config``'s ``cluster:``, its leases as Redis holds
      them (:func:`~copiamail.cluster_report.cluster_leases`), else None."""
    counts = spool.counts()
    queued: list[ListedJob] = list(list_jobs(spool, now, ["TOSEND"]))
    oldest: dict[str, float] = {}
    for job in queued:
        oldest[job.folder] = max(oldest.get(job.folder, 0.0), job.age)
    folders = [{"folder": f, "jobs": n, "oldest_age_seconds": round(oldest[f], 1) if f in oldest else None}
               for f, n in counts.items()]
    states = read_states(spool.root, now)
    alive = [s for s in states if s.alive]
    learned = [{"key": key, "node": node, "learned": what.describe() or "as configured", "since": what.at,
                "reply": f"{what.kind}: {what.reply}"} for key, (node, what) in sorted(learned_in_spool(spool.root).items())]
    return {"spool": str(spool.root), "time": now, "folders": folders, "domains": _domains(queued, alive),
            "nodes": nodes_of(states, now), "failures": _jobs(list(list_jobs(spool, now, ["FAIL"]))),
            "replies": _jobs([j for j in queued if j.error]), "holds": sorted(str(h) for h in holds_in(spool.root)),
            "learned": learned, "cluster": cluster_leases(config) if config is not None else None}
