"""``/metrics``: the status document (:mod:`copiamail.report`) in
Prometheus' text format, made with ``prometheus_client``'s metric families
at each scrape (nothing is kept between scrapes: the spool is the record).

Labels stay bounded whatever the spool holds: per node at most
:data:`MAX_KEYS` limit keys (those with the most connections; the rest summed
under ``key="(other)"``), and per-domain series only for the
:data:`MAX_DOMAINS` busiest domains (the rest under ``domain="(other)"``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from copiamail.spool.livestate import TRANSACTION_BUCKETS

MAX_KEYS = 50
MAX_DOMAINS = 20
OTHER = "(other)"
# The node counters behind copiamail_messages_total, by outcome label.
OUTCOMES = (("sent", "sent"), ("failed", "failed"), ("retry", "retried"), ("deferred", "deferred"))


def _bounded(items: list[tuple[str, int, int]], most: int) -> list[tuple[str, int, int]]:
    """(label, a, b) items, the first ``most`` of them kept and the rest summed under ``(other)``."""
    if len(items) <= most:
        return items
    rest = items[most:]
    return items[:most] + [(OTHER, sum(a for _, a, _ in rest), sum(b for _, _, b in rest))]


class StatusCollector(Collector):
    """The metrics of one status document, which ``document()`` gives at each scrape."""

    def __init__(self, document: Any) -> None:
        self._document = document

    def collect(self) -> Iterator[Metric]:
        doc: dict[str, Any] = self._document()
        messages = CounterMetricFamily("copiamail_messages", "Messages by outcome, per node, since the node started.",
                                       labels=["node", "outcome"])
        up = GaugeMetricFamily("copiamail_node_up", "1 while the node publishes its state, 0 once it is stale.",
                               labels=["node"])
        beat = GaugeMetricFamily("copiamail_node_heartbeat_age_seconds", "Seconds since the node last published.",
                                 labels=["node"])
        connections = GaugeMetricFamily("copiamail_connections", "Connections open per limit key.", labels=["node", "key"])
        limit = GaugeMetricFamily("copiamail_limit", "The cap of each limit key now (learned or configured).",
                                  labels=["node", "key"])
        times = HistogramMetricFamily("copiamail_smtp_transaction_seconds",
                                      "SMTP transactions, MAIL FROM to the reply to the message.", labels=["node"])
        for n in doc["nodes"]:
            node = n["name"]
            for label, counter in OUTCOMES:
                messages.add_metric([node, label], n["counters"].get(counter, 0))
            up.add_metric([node], 1 if n["alive"] else 0)
            beat.add_metric([node], n["heartbeat_age_seconds"] or 0.0)
            keys = sorted(((k, v["open"], v["cap"]) for k, v in n["keys"].items()), key=lambda t: (-t[1], -t[2], t[0]))
            for key, opened, cap in _bounded(keys, MAX_KEYS):
                connections.add_metric([node, key], opened)
                limit.add_metric([node, key], cap)
            counts, total = n["transactions"]["counts"], n["transactions"]["sum"]
            cumulative, buckets = 0, []
            for bound, count in zip((*TRANSACTION_BUCKETS, float("inf")), counts, strict=True):
                cumulative += count
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
            times.add_metric([node], buckets, total)
        yield from (messages, up, beat, connections, limit, times)
        queue = GaugeMetricFamily("copiamail_queue_jobs", "Job files per spool folder.", labels=["folder"])
        oldest = GaugeMetricFamily("copiamail_oldest_job_age_seconds", "Age of the oldest waiting job per folder.",
                                   labels=["folder"])
        for f in doc["folders"]:
            queue.add_metric([f["folder"]], f["jobs"])
            if f["oldest_age_seconds"] is not None:
                oldest.add_metric([f["folder"]], f["oldest_age_seconds"])
        waiting = GaugeMetricFamily("copiamail_domain_waiting_jobs", "Jobs waiting per recipient domain (the busiest).",
                                    labels=["domain"])
        open_per_domain = GaugeMetricFamily("copiamail_domain_connections",
                                            "Connections open per recipient domain, every node (the busiest).",
                                            labels=["domain"])
        domains = [(d["domain"], d["waiting"], d["connections"]) for d in doc["domains"]]
        for domain, jobs, opened in _bounded(domains, MAX_DOMAINS):
            waiting.add_metric([domain], jobs)
            open_per_domain.add_metric([domain], opened)
        yield from (queue, oldest, waiting, open_per_domain)


def metrics_registry(document: Any) -> CollectorRegistry:
    """A registry holding only the collector of ``document()``'s metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatusCollector(document))
    return registry
