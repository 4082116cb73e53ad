"""The web server's parts (copiamail/web): where it may listen, the token
file, the throughput history, and /metrics' bounded labels."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from copiamail.config_checks import is_loopback, parse_listen
from copiamail.errors import ConfigError
from copiamail.spool.livestate import TRANSACTION_BUCKETS, TransactionTimes
from copiamail.web.app import Throughput, check_listen, read_token
from copiamail.web.metrics import MAX_DOMAINS, MAX_KEYS, metrics_registry


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:8025", ("127.0.0.1", 8025)),
    ("[::1]:80", ("::1", 80)),
    ("localhost:1", ("localhost", 1)),
    ("0.0.0.0:65535", ("0.0.0.0", 65535)),
])
def test_listen_addresses_parse_as_host_and_port(text, expected):
    assert parse_listen(text) == expected


@pytest.mark.parametrize("text", ["8025", ":8025", "::1:8025", "[nothost]:80", "h:0", "h:65536", "h:x"])
def test_a_listen_address_that_is_not_host_port_is_refused(text):
    with pytest.raises(ValueError):
        parse_listen(text)


def test_only_loopback_addresses_may_listen_without_a_token():
    assert is_loopback("127.0.0.1") and is_loopback("127.9.9.9") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.0.2.1") and not is_loopback("example.com")
    assert check_listen("127.0.0.1:8025", None) == ("127.0.0.1", 8025)
    with pytest.raises(ConfigError, match=r"not a loopback address; set web\.token_file"):
        check_listen("0.0.0.0:8025", None)
    assert check_listen("0.0.0.0:8025", "t") == ("0.0.0.0", 8025)


def test_the_token_file_is_one_word_and_a_bad_one_is_one_line(tmp_path):
    (tmp_path / "t").write_text("abc123\n")
    assert read_token(tmp_path / "t") == "abc123" and read_token(None) is None
    (tmp_path / "empty").write_text("\n")
    (tmp_path / "two").write_text("a b\n")
    for name, why in (("empty", "one word"), ("two", "one word"), ("missing", "No such file")):
        with pytest.raises(ConfigError, match=why):
            read_token(tmp_path / name)


def _doc(t: float, sent: dict[str, int], alive: bool = True) -> dict:
    return {"time": t, "nodes": [{"name": n, "alive": alive, "counters": {"sent": s, "failed": 0}} for n, s in sent.items()]}


def test_throughput_is_messages_per_second_between_samples_and_survives_a_node_restart():
    tp = Throughput()
    tp.record(_doc(100.0, {"N1": 10, "N2": 0}))
    tp.record(_doc(102.0, {"N1": 30, "N2": 4}))
    assert tp.points[-1]["sent_per_second"] == 12.0 and tp.per_node == {"N1": 10.0, "N2": 2.0}
    tp.record(_doc(104.0, {"N1": 6, "N2": 4}))  # N1 restarted: its counter began again
    assert tp.points[-1]["sent_per_second"] == 3.0
    tp.record(_doc(104.0, {"N1": 9}))  # no time passed: no point
    assert len(tp.points) == 2


def test_transaction_times_fall_into_their_buckets():
    times = TransactionTimes()
    for seconds in (0.001, 0.005, 0.006, 0.3, 1000.0):
        times.observe(seconds)
    assert times.counts[0] == 2 and times.counts[1] == 1 and times.counts[TRANSACTION_BUCKETS.index(0.5)] == 1
    assert times.counts[-1] == 1 and times.total == pytest.approx(1000.312)
    assert TransactionTimes.from_json(times.as_json()).counts == times.counts
    assert TransactionTimes.from_json({"counts": [1]}).counts == [0] * len(times.counts)


def test_metrics_keep_labels_bounded_however_many_keys_and_domains_there_are():
    keys = {f"domain_limit:d{i}.test": {"open": i % 3, "cap": 5, "configured": None} for i in range(300)}
    times = TransactionTimes()
    times.observe(0.02)
    doc = {"folders": [{"folder": "TOSEND", "jobs": 400, "oldest_age_seconds": 9.5}],
           "domains": [{"domain": f"d{i}.test", "waiting": 300 - i, "connections": i % 3} for i in range(300)],
           "nodes": [{"name": "N1", "alive": True, "heartbeat_age_seconds": 0.5, "counters": {"sent": 7, "failed": 2},
                      "keys": keys, "transactions": times.as_json()}]}
    text = generate_latest(metrics_registry(lambda: doc)).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert len(families["copiamail_connections"].samples) == MAX_KEYS + 1
    other = [s for s in families["copiamail_connections"].samples if s.labels["key"] == "(other)"]
    assert [s.value for s in other] == [sum(i % 3 for i in range(300)) - sum(
        s.value for s in families["copiamail_connections"].samples if s.labels["key"] != "(other)")]
    waiting = families["copiamail_domain_waiting_jobs"].samples
    assert len(waiting) == MAX_DOMAINS + 1 and sum(s.value for s in waiting) == sum(300 - i for i in range(300))
    messages = {(s.labels["outcome"]): s.value for s in families["copiamail_messages"].samples}
    assert messages == {"sent": 7, "failed": 2, "retry": 0, "deferred": 0}
    buckets = {s.labels["le"]: s.value for s in families["copiamail_smtp_transaction_seconds"].samples
               if s.name.endswith("_bucket")}
    assert buckets["0.01"] == 0 and buckets["0.025"] == 1 and buckets["+Inf"] == 1
