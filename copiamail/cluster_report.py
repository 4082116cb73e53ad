"""The cluster's leases as Redis holds them now, for ``status``, ``explain``
and the web page: per cluster-wide limit key, its cap (as this config sets
it), the live leases, and which nodes hold them. Read with a short timeout,
never written; Redis unreachable is said in the document, not raised."""

from __future__ import annotations

from collections import Counter
from typing import Any

from copiamail.config import Config
from copiamail.config_checks import is_ip
from copiamail.scheduling.cluster import sync_client, why_down
from copiamail.scheduling.limits import CLUSTER_PREFIX
from copiamail.scheduling.redis_leases import EPOCH_KEY, lease_key

_MAX_KEYS = 1000  # lease sets listed at most (a cluster has one per capped domain, host and the total)


def cluster_caps(config: Config) -> dict[str, int]:
    """The cap of every cluster-wide key ``config`` names beforehand (a host
    stanza's only when it is keyed by IP address: by name, its addresses
    are known only once looked up)."""
    caps: dict[str, int] = {}
    if config.cluster_scope_max_outbound_connections is not None:
        caps[f"{CLUSTER_PREFIX}total"] = config.cluster_scope_max_outbound_connections
    for stanza in config.domains:
        if (cap := stanza.caps.cluster_scope_max_outbound_connections) is not None:
            caps[f"{CLUSTER_PREFIX}domain:{stanza.key}"] = cap
    for host in config.hosts:
        cap = host.caps.cluster_scope_max_outbound_connections
        if cap is not None and is_ip(host.key):
            caps[f"{CLUSTER_PREFIX}host:{host.key}"] = min(cap, caps.get(f"{CLUSTER_PREFIX}host:{host.key}", cap))
    return caps


def cluster_leases(config: Config, timeout: float = 1.0) -> dict[str, Any] | None:
    """None without ``cluster:``; else ``redis`` (its URL), ``error`` (why
    it cannot be read, or None), ``quiet_seconds`` (no lease is granted for
    that long: Redis lost its leases lately), and ``keys``: per key ``key``,
    ``cap`` (None: not known from this config), ``leases`` and ``nodes``
    (leases per node)."""
    import redis

    cluster = config.cluster
    if cluster is None:
        return None
    caps = cluster_caps(config)
    doc: dict[str, Any] = {"redis": cluster.redis, "error": None, "quiet_seconds": 0.0,
                           "keys": [{"key": k, "cap": c, "leases": 0, "nodes": {}} for k, c in sorted(caps.items())]}
    client = sync_client(config, timeout)
    try:
        seconds, micros = client.time()
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        quiet = client.get(EPOCH_KEY)
        doc["quiet_seconds"] = round(max(0, int(quiet) - now_ms) / 1000, 1) if quiet is not None else 0.0
        prefix = lease_key("")
        found = [k.decode() if isinstance(k, bytes) else str(k)
                 for _, k in zip(range(_MAX_KEYS), client.scan_iter(match=prefix + "*", count=200), strict=False)]
        keys = sorted(set(caps) | {k[len(prefix):] for k in found})
        doc["keys"] = []
        for key in keys:
            members = client.zrangebyscore(lease_key(key), f"({now_ms}", "+inf")
            nodes = Counter((m.decode() if isinstance(m, bytes) else str(m)).split(".", 1)[0] for m in members)
            doc["keys"].append({"key": key, "cap": caps.get(key), "leases": len(members), "nodes": dict(nodes)})
    except (redis.RedisError, OSError) as e:
        doc["error"] = why_down(e)
    finally:
        client.close()
    return doc
