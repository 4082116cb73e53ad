"""Limits that learn (copiamail.scheduling.adaptive), the message rates that
space starts (pacing), and how the limits of a connection carry them."""

from __future__ import annotations

import asyncio
import itertools
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from copiamail.config import Config, DomainStanza, HostStanza, MessageRate, ScopeCaps, load_config
from copiamail.errors import ConfigError
from copiamail.scheduling.adaptive import AdaptiveLimits, Learned, learned_in_spool, read_state, state_file
from copiamail.scheduling.limits import Pace, Scopes, adaptive_limit
from copiamail.scheduling.pacing import SLACK, Pacer
from copiamail.throttle import ThrottleKind

REPLY = "421 4.7.0 mx Error: too many connections from 192.0.2.1"


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _limits(file: Path | None = None, clock: Clock | None = None, **kw) -> AdaptiveLimits:
    options = {"suspend": 900.0, "recover_after": 3, "recover_seconds": 60.0}
    options.update(kw)
    return AdaptiveLimits(file, clock=clock or Clock(), **options)


def _throttle(a: AdaptiveLimits, kind=ThrottleKind.CONNECTIONS, open_connections=4, messages=0, key="k",
              ceiling=10, monotonic=5.0) -> bool:
    return a.throttled(key, ceiling, kind, REPLY, open_connections=open_connections, messages=messages,
                       monotonic=monotonic)


# --- connections -------------------------------------------------------------

def test_a_connections_reply_lowers_the_cap_below_the_connections_open_when_it_came():
    a = _limits()
    assert a.cap("k", 10) == 10
    assert _throttle(a, open_connections=4)
    assert a.cap("k", 10) == 3
    learned = a.get("k")
    assert learned is not None and learned.kind == "connections" and learned.reply == REPLY


def test_a_learned_cap_is_never_below_one_nor_above_the_ceiling():
    a = _limits()
    _throttle(a, open_connections=1)
    assert a.cap("k", 10) == 1
    b = _limits()
    _throttle(b, open_connections=8)
    assert b.cap("k", 10) == 7 and b.cap("k", 5) == 5  # a ceiling lowered since: it holds
    c = _limits()
    assert not _throttle(c, open_connections=30)  # more than the ceiling were open: nothing to lower
    assert c.cap("k", 10) == 10 and c.get("k") is None


def test_a_reply_that_shows_more_connections_than_the_cap_does_not_raise_it():
    a = _limits()
    _throttle(a, open_connections=3)
    assert not _throttle(a, open_connections=6)
    assert a.cap("k", 10) == 2


def test_a_connection_opened_before_the_lowering_and_then_accepted_raises_the_cap_to_what_was_accepted():
    a = _limits()
    _throttle(a, open_connections=2, monotonic=10.0)  # its siblings not yet greeted: learned 1
    assert a.cap("k", 10) == 1
    assert a.accepted("k", 3, opened=9.0)
    assert a.cap("k", 10) == 3
    assert not a.accepted("k", 5, opened=11.0)  # opened under the lowered cap: no evidence
    assert a.cap("k", 10) == 3



def test_a_cap_lowered_after_a_connection_opened_makes_its_refusal_late_evidence_not_a_new_lesson():
    a = _limits()
    assert not a.lowered_after("k", opened=4.0)  # never lowered
    _throttle(a, open_connections=3, monotonic=10.0)
    assert a.lowered_after("k", opened=9.0)
    assert not a.lowered_after("k", opened=11.0) and not a.lowered_after("other", opened=9.0)


# --- recovery ----------------------------------------------------------------

def test_recovery_takes_clean_deliveries_and_time_then_rises_one_step_to_the_ceiling_and_forgets():
    clock = Clock()
    a = _limits(clock=clock, recover_after=3, recover_seconds=60)
    _throttle(a, open_connections=3, ceiling=4)  # learned 2 of 4
    for _ in range(5):
        assert not a.delivered("k")  # not yet 60 s since the change
    clock.now += 61
    assert a.delivered("k")  # 3 clean deliveries and 60 s: one step
    assert a.cap("k", 4) == 3
    assert not a.delivered("k") and not a.delivered("k")
    clock.now += 61
    assert a.delivered("k")
    assert a.cap("k", 4) == 4 and a.get("k") is None  # at the ceiling: nothing learned is left


def test_a_throttle_reply_on_the_way_up_sets_it_back_and_restarts_the_count():
    clock = Clock()
    a = _limits(clock=clock, recover_after=2, recover_seconds=0)
    _throttle(a, open_connections=3)
    a.delivered("k")
    _throttle(a, open_connections=5)  # no lower, but the clean count starts again
    assert not a.delivered("k")
    assert a.delivered("k")
    assert a.cap("k", 10) == 3
    _throttle(a, open_connections=3)
    assert a.cap("k", 10) == 2


# --- rate, per connection, suspend ------------------------------------------

def test_a_rate_reply_sets_half_the_rate_it_was_sending_at_and_recovery_brings_it_back():
    clock = Clock()
    a = _limits(clock=clock, recover_after=1, recover_seconds=0)
    for i in range(11):
        a.started("k", 100.0 + i * 0.1)  # 10 messages a second
    _throttle(a, ThrottleKind.RATE)
    assert a.rate("k") == pytest.approx(5)
    assert a.cap("k", 10) == 10  # the connection cap is untouched
    for step in (1.25, 1.25 ** 2, 1.25 ** 3):
        a.delivered("k")
        assert a.rate("k") == pytest.approx(5 * step)
    a.delivered("k")
    assert a.rate("k") is None and a.get("k") is None  # back at the rate that was throttled


def test_the_refusal_of_a_message_started_before_the_rate_was_lowered_teaches_nothing_more():
    a = _limits()
    for i in range(11):
        a.started("k", 100.0 + i * 0.1)
    assert a.throttled("k", 10, ThrottleKind.RATE, REPLY, open_connections=1, messages=0, monotonic=101.0,
                       started=100.9)
    assert not a.throttled("k", 10, ThrottleKind.RATE, REPLY, open_connections=1, messages=0, monotonic=101.1,
                           started=100.95)  # in flight when the rate was lowered
    assert a.rate("k") == pytest.approx(5)
    for i in range(11):
        a.started("k", 102.0 + i * 0.2)  # 5 a second, as learned
    assert a.throttled("k", 10, ThrottleKind.RATE, REPLY, open_connections=1, messages=0, monotonic=104.5,
                       started=104.0)
    assert a.rate("k") == pytest.approx(2.5)


def test_a_burst_is_counted_as_the_receiver_counts_it_over_a_second_not_extrapolated():
    a = _limits()
    for i in range(20):
        a.started("k", 100.0 + i * 0.0035)  # 20 starts in 70 ms as four connections open
    _throttle(a, ThrottleKind.RATE)
    assert a.rate("k") == pytest.approx(19 / 2)  # 19 a second to the receiver, halved; not 270 / 2


def test_a_steady_fast_sender_is_measured_over_its_last_second():
    a = _limits()
    for i in range(301):
        a.started("k", 100.0 + i / 200)  # 200 a second for a second and a half
    _throttle(a, ThrottleKind.RATE)
    assert a.rate("k") == pytest.approx(100, rel=0.02)


def test_a_rate_reply_with_nothing_sent_yet_teaches_nothing():
    a = _limits()
    assert not _throttle(a, ThrottleKind.RATE)
    assert a.rate("k") is None


def test_a_per_connection_reply_caps_messages_below_the_count_that_got_it():
    a = _limits(recover_after=1, recover_seconds=0)
    _throttle(a, ThrottleKind.PER_CONNECTION, messages=5)  # the 6th message was refused
    assert a.per_connection("k") == 5
    a.delivered("k")
    assert a.per_connection("k") is None  # 6 was what got the reply: forgotten, to be tried again


def test_a_suspend_reply_stops_the_key_until_adaptive_suspend_is_over():
    clock = Clock()
    a = _limits(clock=clock, suspend=900)
    _throttle(a, ThrottleKind.SUSPEND)
    assert a.suspended_until("k") == clock.now + 900
    clock.now += 901
    assert a.suspended_until("k") is None and a.get("k") is None


# --- the state file ----------------------------------------------------------

def test_what_was_learned_is_saved_atomically_and_read_back_after_a_restart(tmp_path):
    path = state_file(tmp_path, "N1", 0)
    a = _limits(path)
    _throttle(a, open_connections=3)
    assert path.name == "N1.w1.json" and not list(path.parent.glob(".*.tmp"))
    data = json.loads(path.read_text())
    assert data["keys"]["k"]["connections"] == 2 and data["keys"]["k"]["reply"] == REPLY
    again = _limits(path, load=read_state(path))
    assert again.cap("k", 10) == 2
    assert learned_in_spool(tmp_path)["k"][0] == "N1"


def test_a_damaged_state_file_is_ignored_with_a_warning(tmp_path, caplog):
    path = state_file(tmp_path, "N1", 0)
    path.parent.mkdir()
    path.write_text("{not json")
    assert read_state(path) == {}
    assert "cannot read learned limits" in caplog.text


@given(st.integers(1, 50), st.lists(st.integers(1, 60), max_size=20))
def test_a_learned_cap_always_lies_between_one_and_the_ceiling(ceiling, opens):
    a = _limits(recover_after=1, recover_seconds=0)
    for n in opens:
        _throttle(a, open_connections=n, ceiling=ceiling)
        assert 1 <= a.cap("k", ceiling) <= ceiling
        a.delivered("k")
        assert 1 <= a.cap("k", ceiling) <= ceiling


def test_describe_says_what_was_learned_in_words():
    learned = Learned("k", 10, connections=2, rate=0.5, per_connection=7)
    assert learned.describe() == "2 connections (of 10), 30.0 messages/min, 7 messages per connection"


# --- pacing ------------------------------------------------------------------

def test_starts_are_spaced_by_the_smallest_rate_of_all_that_apply():
    now = [0.0]
    pacer = Pacer(lambda: now[0])
    fast, slow = Pace("a", 0.1, "a"), Pace("b", 0.5, "b")
    assert pacer.wait_for([fast, slow]) == 0
    pacer.take([fast, slow])
    assert pacer.wait_for([fast]) == pytest.approx(0.1 * SLACK)
    assert pacer.wait_for([fast, slow]) == pytest.approx(0.5 * SLACK)
    now[0] = 0.6
    assert pacer.wait_for([fast, slow]) == 0


def test_concurrent_starts_never_put_more_than_n_in_any_window():
    async def run() -> list[float]:
        loop = asyncio.get_running_loop()
        pacer = Pacer(loop.time)
        pace = Pace("r", 0.01, "100/s")
        starts: list[float] = []

        async def worker() -> None:
            for _ in range(10):
                await pacer.start([pace], asyncio.sleep)
                starts.append(loop.time())

        await asyncio.gather(*(worker() for _ in range(5)))
        return sorted(starts)

    starts = asyncio.run(run())
    assert len(starts) == 50
    assert all(b - a >= 0.01 for a, b in itertools.pairwise(starts))


def test_a_long_wait_closes_the_connection_first():
    closed = []

    async def run() -> None:
        now = [0.0]
        pacer = Pacer(lambda: now[0])
        pace = Pace("r", 30.0, "2/m")
        pacer.take([pace])

        async def close() -> None:
            closed.append(True)
            now[0] = 31.0  # time passes while we wait

        await pacer.start([pace], close, long_wait=20.0)

    asyncio.run(run())
    assert closed == [True]


# --- the limits a connection carries ---------------------------------------

def _config(tmp_path: Path, yaml: str, cfg: str = "$domain_limit * @ 10\n") -> Config:
    (tmp_path / "spool").mkdir(exist_ok=True)
    (tmp_path / "F.CFG").write_text(cfg)
    (tmp_path / "c.yaml").write_text(f"spool: spool\ncfg: F.CFG\n{yaml}")
    return load_config(tmp_path / "c.yaml")


def test_the_domain_limit_key_adapts_and_carries_its_learned_cap_and_its_ceiling(tmp_path):
    config = _config(tmp_path, "adaptive: true\n")
    scopes = Scopes(config, "N1", learned=lambda key, ceiling: 3 if key == "domain_limit:a.test" else ceiling)
    key = adaptive_limit(scopes.limits("u@a.test", "a.test"))
    assert key is not None and key.key == "domain_limit:a.test" and key.cap == 3 and key.ceiling == 10
    assert "learned 3 of 10" in key.scope


def test_without_adaptive_no_key_adapts(tmp_path):
    config = _config(tmp_path, "")
    assert adaptive_limit(Scopes(config, "N1", learned=lambda k, c: 1).limits("u@a.test", "a.test")) is None


def test_a_host_stanza_or_a_pooled_stanza_is_the_key_that_adapts(tmp_path):
    config = _config(tmp_path, "host:\n  192.0.2.5: {scope_max_outbound_connections: 4, adaptive: true}\n"
                               "domain:\n  /big\\..*/: {scope_max_outbound_connections: 6, adaptive: true}\n")
    scopes = Scopes(config, "N1")
    key = adaptive_limit(scopes.limits("u@a.test", "a.test", host_ips=("192.0.2.5",)))
    assert key is not None and key.key == "host:192.0.2.5"
    key = adaptive_limit(scopes.limits("u@big.test", "big.test"))
    assert key is not None and key.key == "global_domain:/big\\..*/"
    assert adaptive_limit(scopes.limits("u@a.test", "a.test")) is None  # neither stanza applies


def test_a_stanza_can_turn_adaptive_off_for_its_domain(tmp_path):
    config = _config(tmp_path, "adaptive: true\ndomain:\n  a.test: {adaptive: false}\n")
    scopes = Scopes(config, "N1")
    assert adaptive_limit(scopes.limits("u@a.test", "a.test")) is None
    assert adaptive_limit(scopes.limits("u@b.test", "b.test")) is not None


def test_message_rates_apply_from_every_scope_and_shared_ones_are_divided_between_workers(tmp_path):
    config = _config(tmp_path, 'max_message_rate: "100/s"\n'
                               'domain:\n  a.test: {max_message_rate: "60/m"}\n  /.*x.*/: {max_message_rate: "10/s"}\n'
                               'host:\n  192.0.2.5: {max_message_rate: "3600/h"}\n')
    paces = {p.key: p.spacing for p in Scopes(config, "N1").paces("a.test", None, ("192.0.2.5",))}
    assert paces == {"rate:node": 0.01, "rate:domain:a.test": 1.0, "rate:host:192.0.2.5": 1.0}
    paces = {p.key: p.spacing for p in Scopes(config, "N1", 2).paces("ax.test")}
    assert paces == {"rate:node": 0.02, "rate:domain:/.*x.*/": 0.2}


# --- configuration -----------------------------------------------------------

@pytest.mark.parametrize(("text", "rate"), [("10/s", MessageRate(10, 1.0)), ("300/m", MessageRate(300, 60.0)),
                                            (" 5000 / H ", MessageRate(5000, 3600.0))])
def test_max_message_rate_is_read_as_count_per_period(tmp_path, text, rate):
    assert _config(tmp_path, f'max_message_rate: "{text}"\n').max_message_rate == rate


@pytest.mark.parametrize("bad", ["10", "0/s", "10/d", "ten/s", "1.5/s"])
def test_a_bad_message_rate_names_the_key_and_line(tmp_path, bad):
    with pytest.raises(ConfigError) as e:
        _config(tmp_path, f'domain:\n  a.test: {{max_message_rate: "{bad}"}}\n')
    assert "domain.a.test.max_message_rate" in str(e.value) and "c.yaml" in str(e.value)


def test_adaptive_keys_and_durations_are_read(tmp_path):
    config = _config(tmp_path, "adaptive: true\nadaptive_suspend: 2h\nadaptive_recover_after: 7\n"
                               "adaptive_recover_seconds: 90s\n")
    assert (config.adaptive, config.adaptive_suspend, config.adaptive_recover_after,
            config.adaptive_recover_seconds) == (True, 7200.0, 7, 90.0)
    assert _config(tmp_path, "adaptive_suspend: 30\n").adaptive_suspend == 30.0
    with pytest.raises(ConfigError, match="adaptive_suspend"):
        _config(tmp_path, "adaptive_suspend: soon\n")
    with pytest.raises(ConfigError, match="adaptive"):
        _config(tmp_path, "adaptive: yes please\n")


def test_stanzas_carry_adaptive_and_rates(tmp_path):
    config = _config(tmp_path, 'domain:\n  a.test: {adaptive: true, max_message_rate: "5/s"}\n'
                               "host:\n  mx.a.test: {adaptive: false}\n")
    assert config.domains == (DomainStanza("a.test", ScopeCaps(max_message_rate=MessageRate(5, 1.0), adaptive=True),
                                           line=4),)
    assert config.hosts == (HostStanza("mx.a.test", ScopeCaps(adaptive=False), line=6),)
