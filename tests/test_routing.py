"""copiamail.scheduling.routing: where a job's connection goes (relay, retry
relay, mail hosts by preference, down hosts, names learned late), without a
node or a DNS server: a fake resolver and fake clocks. And `copiamail explain`,
which asks the same router."""

from __future__ import annotations

import asyncio
import itertools
import ssl
import time
from pathlib import Path

import pytest
from spoolkit import SpoolKit

from copiamail.cli import _mail_hosts
from copiamail.config import Config, HostStanza, RelayConfig, ScopeCaps, load_config
from copiamail.errors import ConfigError, DeliveryError
from copiamail.jobfile import outcome, records
from copiamail.jobfile.fsfile import CommandFile
from copiamail.jobfile.job import Job, parse_job
from copiamail.scheduling.limits import limits_for
from copiamail.scheduling.routing import HOST_DOWN_SECONDS, Item, Router, pause_key, relay_target
from copiamail.scheduling.shared_slots import SharedSlots
from copiamail.smtp.mx import MxHost, Route
from copiamail.smtp.startup import make_tls_context
from copiamail.spool.queue import Claimed

NOW = 1_000_000.0


class FakeResolver:
    """The MxResolver's interface over tables. A route is fresh until ``stale``
    is set; every lookup is counted."""

    def __init__(self, routes: dict[str, tuple[MxHost, ...]], addresses: dict[str, tuple[str, ...]] | None = None) -> None:
        self.routes = routes
        self.address_table = addresses or {}
        self.known: dict[str, Route] = {}
        self.stale = False
        self.lookups: list[str] = []

    def cached(self, domain: str) -> Route | None:
        return None if self.stale else self.known.get(domain)

    def last_known(self, domain: str) -> Route | None:
        return self.known.get(domain)

    async def route(self, domain: str) -> Route:
        self.lookups.append(domain)
        await asyncio.sleep(0)
        if domain not in self.routes:
            raise DeliveryError(outcome.DNS_FAILED.code, outcome.DNS_FAILED.klass, f"DNS: {domain}: no such domain", True, "DNS")
        self.known[domain] = Route(domain, self.routes[domain], NOW + 300)
        return self.known[domain]

    async def addresses(self, name: str) -> tuple[str, ...]:
        if name not in self.address_table:
            raise DeliveryError(outcome.DNS_TEMPORARY.code, outcome.DNS_TEMPORARY.klass, f"DNS: {name}: timed out", False, "DNS")
        return self.address_table[name]


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def fs(address: str = "u@a.test", *lines: str) -> CommandFile:
    return CommandFile.parse(("\n".join([f"$email_address {address}", '$email_text "hi"', *lines]) + "\n").encode())


def job(cf: CommandFile) -> Job:
    return parse_job(cf, "J.FS")


def failed(cf: CommandFile, klass: str = "C") -> CommandFile:
    """``cf`` after an attempt that failed for a while (class ``klass``)."""
    return records.retry(cf, "N1", 451, klass, "4.3.0 try later", NOW, NOW)


def item(cf: CommandFile) -> Item:
    return Item(Claimed("N1", "TOSEND", "J.FS", "/nowhere/J.FS"), cf, job(cf))


RELAY = RelayConfig("192.0.2.1", 2525, starttls="never")
SPARE = RelayConfig("192.0.2.9", 2526, starttls="never")
A_TEST = (MxHost("mx1.a.test", 10, ("10.0.0.1", "10.0.0.2")), MxHost("mx2.a.test", 20, ("10.0.0.3",)))


def direct(routes=None, addresses=None, hosts=(), **kw) -> tuple[Router, FakeResolver]:
    resolver = FakeResolver(routes if routes is not None else {"a.test": A_TEST}, addresses)
    return Router(Config(hosts=hosts), resolver=resolver, clock=Clock(), **kw), resolver


# --- relays --------------------------------------------------------------------------------


def test_with_a_relay_every_job_goes_to_the_relay_and_no_resolver_is_made():
    router = Router(Config(relay=RELAY), "secret")
    [target] = router.targets(job(fs()))
    assert (target.host, target.port, target.ips, target.names, target.relay) == ("192.0.2.1", 2525, ("192.0.2.1",), ("192.0.2.1",), True)
    assert router.targets(job(fs("v@b.test")))[0] is target  # the same target: jobs ride on its connections
    assert target.login is None and not router.looking_up


def test_a_relay_with_a_user_name_logs_in_with_the_password_given():
    router = Router(Config(relay=RelayConfig("192.0.2.1", username="me")), "secret")
    assert router.relay is not None and router.relay.login == ("me", "secret")


def test_a_retry_whose_list_item_has_the_i_prefix_goes_to_the_retry_relay():
    router = Router(Config(relay=RELAY, retry_relay=SPARE), clock=Clock())
    fresh = fs("u@a.test", '$email_retry_delays * "I1S"')
    assert router.targets(job(fresh)) == [router.relay]
    assert router.targets(job(failed(fresh))) == [router.retry_relay]


def test_a_retry_whose_list_item_has_no_i_prefix_takes_the_usual_route():
    router = Router(Config(relay=RELAY, retry_relay=SPARE), clock=Clock())
    assert router.targets(job(failed(fs("u@a.test", '$email_retry_delays * "1S I1S"')))) == [router.relay]


def test_only_a_retry_through_the_retry_relay_rides_on_its_connections():
    router = Router(Config(relay=RELAY, retry_relay=SPARE), clock=Clock())
    assert router.relay is not None and router.retry_relay is not None
    retry = job(failed(fs("u@a.test", '$email_retry_delays * "I1S"')))
    first = job(fs("u@a.test", '$email_retry_delays * "I1S"'))
    assert router.same_route(router.retry_relay, retry) and not router.same_route(router.relay, retry)
    assert router.same_route(router.relay, first) and not router.same_route(router.retry_relay, first)
    assert Router(Config(relay=RELAY)).same_route(Router(Config(relay=RELAY)).relay, retry)  # no retry relay: any


# --- mail hosts ------------------------------------------------------------------------------


def test_an_unknown_route_must_be_looked_up_then_gives_every_address_by_preference():
    router, resolver = direct()
    assert router.targets(job(fs())) is None
    asyncio.run(resolver.route("a.test"))
    targets = router.targets(job(fs()))
    assert [(t.host, t.server_name, t.relay) for t in targets] == [
        ("10.0.0.1", "mx1.a.test", False), ("10.0.0.2", "mx1.a.test", False), ("10.0.0.3", "mx2.a.test", False)]
    assert all(t.port == 25 and t.starttls == "auto" and t.ips == (t.host,) for t in targets)


def test_a_stale_route_still_serves_jobs_already_waiting_but_not_new_ones():
    router, resolver = direct()
    asyncio.run(resolver.route("a.test"))
    resolver.stale = True
    assert router.targets(job(fs()), fresh=True) is None
    assert len(router.targets(job(fs()), fresh=False)) == 3


def test_a_host_found_down_goes_last_while_others_remain_and_an_attempt_tries_each_once():
    router, resolver = direct(monotonic=(mono := Clock(50.0)))
    asyncio.run(resolver.route("a.test"))
    first = router.targets(job(fs()))[0]
    tried: set[str] = set()
    assert router.host_failed(first, "a.test", tried)  # two addresses left
    assert tried == {"10.0.0.1"}
    assert [t.host for t in router.targets(job(fs()), tried=tried)] == ["10.0.0.2", "10.0.0.3"]
    assert [t.host for t in router.targets(job(fs()))] == ["10.0.0.2", "10.0.0.3"]  # another job: skips it too
    for host in ("10.0.0.2", "10.0.0.3"):
        target = next(t for t in router.targets(job(fs()), tried=tried) if t.host == host)
        router.host_failed(target, "a.test", tried)
    assert tried == {"10.0.0.1", "10.0.0.2", "10.0.0.3"}
    # All tried and down: the attempt ends; the next one may try them again.
    assert [t.host for t in router.targets(job(fs()), tried=tried)] == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    mono.now += HOST_DOWN_SECONDS + 1
    assert [t.host for t in router.targets(job(fs()))] == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]


def test_the_last_host_failing_leaves_no_next_host():
    router, resolver = direct({"a.test": (MxHost("mx.a.test", 10, ("10.0.0.1",)),)})
    asyncio.run(resolver.route("a.test"))
    assert not router.host_failed(router.targets(job(fs()))[0], "a.test", set())


def test_a_relay_that_fails_is_never_marked_down():
    router = Router(Config(relay=RELAY))
    tried: set[str] = set()
    assert not router.host_failed(router.relay, "a.test", tried) and tried == set()


# --- names of addresses ------------------------------------------------------------------------


def test_every_name_an_address_is_known_by_travels_with_its_targets_and_is_reported():
    learned: list[tuple[str, tuple[str, ...]]] = []
    shared = (MxHost("mx.a.test", 10, ("10.0.0.7",)),)
    router, resolver = direct({"a.test": shared, "b.test": (MxHost("mx.b.test", 10, ("10.0.0.7",)),)},
                              on_learned=lambda ip, names: learned.append((ip, names)))
    asyncio.run(resolver.route("a.test"))
    asyncio.run(resolver.route("b.test"))
    assert router.targets(job(fs()))[0].names == ("mx.a.test",)
    assert router.targets(job(fs("v@b.test")))[0].names == ("mx.a.test", "mx.b.test")
    assert router.targets(job(fs()))[0].names == ("mx.a.test", "mx.b.test")
    assert learned == [("10.0.0.7", ("mx.a.test",)), ("10.0.0.7", ("mx.a.test", "mx.b.test"))]


def test_host_stanza_names_are_resolved_and_those_that_fail_are_tried_again():
    hosts = (HostStanza("big.mx.test", ScopeCaps(scope_max_outbound_connections=2)),
             HostStanza("slow.mx.test", ScopeCaps(scope_max_outbound_connections=1)),
             HostStanza("10.9.9.9", ScopeCaps(scope_max_outbound_connections=1)))
    router, resolver = direct(addresses={"big.mx.test": ("10.0.0.1",)}, hosts=hosts)
    assert asyncio.run(router.learn_host_names()) == ["slow.mx.test"]  # an IP key needs no lookup
    resolver.address_table["slow.mx.test"] = ("10.0.0.3",)
    assert asyncio.run(router.learn_host_names()) == []
    assert asyncio.run(router.learn_host_names()) == []  # nothing left to ask
    asyncio.run(resolver.route("a.test"))
    names = {t.host: t.names for t in router.targets(job(fs()))}
    assert names == {"10.0.0.1": ("big.mx.test", "mx1.a.test"), "10.0.0.2": ("mx1.a.test",),
                     "10.0.0.3": ("mx2.a.test", "slow.mx.test")}


def test_with_a_relay_host_stanza_names_are_not_looked_up():
    router = Router(Config(relay=RELAY, hosts=(HostStanza("x.test", ScopeCaps(scope_max_outbound_connections=1)),)))
    assert asyncio.run(router.learn_host_names()) == []


# --- lookups -----------------------------------------------------------------------------------


def test_one_lookup_per_domain_however_many_jobs_wait_and_each_job_is_routed_after_it():
    routed: list[tuple[list[str], DeliveryError | None]] = []
    router, resolver = direct({"a.test": A_TEST},
                              on_routed=lambda items, error: routed.append(([i.job.address for i in items], error)))

    async def go() -> None:
        for address in ("u1@a.test", "u2@a.test", "u@b.test"):
            router.look_up(item(fs(address)))
        assert router.looking_up
        while router.looking_up:
            await asyncio.sleep(0)

    asyncio.run(go())
    assert sorted(resolver.lookups) == ["a.test", "b.test"]
    assert routed[0] == (["u1@a.test", "u2@a.test"], None)
    assert routed[1][0] == ["u@b.test"] and routed[1][1] is not None and routed[1][1].permanent


def test_thousands_of_jobs_waiting_on_one_lookup_are_routed_in_slices_letting_the_loop_run_between():
    from copiamail.scheduling.routing import ROUTED_SLICE

    events: list[str | int] = []
    router, _ = direct({"a.test": A_TEST}, on_routed=lambda items, error: events.append(len(items)))

    async def beat() -> None:  # what else runs on the loop: a heartbeat, open connections
        while True:
            events.append("beat")
            await asyncio.sleep(0)

    async def go() -> None:
        for i in range(1000):
            router.look_up(item(fs(f"u{i}@a.test")))
        beating = asyncio.get_running_loop().create_task(beat())
        while router.looking_up:
            await asyncio.sleep(0)
        beating.cancel()

    asyncio.run(go())
    slices = [e for e in events if e != "beat"]
    assert sum(slices) == 1000 and max(slices) == ROUTED_SLICE and len(slices) == 5
    positions = [i for i, e in enumerate(events) if e != "beat"]
    assert all("beat" in events[a + 1:b] for a, b in itertools.pairwise(positions))  # the loop ran between


def test_closing_cancels_lookups_and_gives_back_the_jobs_not_yet_routed():
    routed: list[list[Item]] = []
    router, _ = direct(on_routed=lambda items, error: routed.append(items))

    async def go() -> list[Item]:
        router.look_up(item(fs()))
        return await router.close()

    left = asyncio.run(go())
    # The lookup never started: the job is given back by close; had it
    # started, the cancelled lookup would have routed it (with no error).
    assert [i.job.address for i in left] + [i.job.address for items in routed for i in items] == ["u@a.test"]
    assert not router.looking_up


# --- explain asks the same router ------------------------------------------------------------------


def test_places_name_the_relay_or_each_mail_host_address_then_the_retry_relay():
    router, _ = direct(retry_password=None)
    places = asyncio.run(router.places("a.test"))
    assert [label for label, _ in places] == ["MX 10 mx1.a.test (10.0.0.1)", "MX 10 mx1.a.test (10.0.0.2)",
                                              "MX 20 mx2.a.test (10.0.0.3)"]
    assert [t for _, t in places] == router.targets(job(fs()))
    relayed = Router(Config(relay=RELAY, retry_relay=SPARE))
    assert [label for label, _ in asyncio.run(relayed.places("a.test"))] == [
        "relay 192.0.2.1:2525", "retry relay 192.0.2.9:2526, for retries that an I item sends there"]


def test_explain_lists_the_retry_relay_and_its_limits_as_the_node_routes_retries_there(tmp_path):
    # Before: explain computed its own route, the relay only, while the node
    # sent a retry whose list item has the I prefix to retry_relay, under that
    # host's limit. Now both ask the Router.
    kit = SpoolKit(tmp_path, 2525, ['$email_retry_delays * "I1S"'], yaml=(
        "retry_relay: {host: 127.0.0.5, port: 2526, starttls: never}\n"
        'host:\n  "127.0.0.5": {scope_max_outbound_connections: 3}\n'))
    out = kit.cli("explain", "u@a.test").stdout
    assert "to relay 127.0.0.1:2525" in out
    assert "to retry relay 127.0.0.5:2526" in out
    assert "host:127.0.0.5" in out.split("retry relay")[1]
    cfg = load_config(kit.config_path)
    node = Router(cfg, clock=Clock())
    explained = {(ips, names) for _, ips, names in _mail_hosts(cfg, "a.test")}
    for cf in (fs("u@a.test"), failed(fs("u@a.test"))):
        [target] = node.targets(job(cf))
        assert (target.ips, target.names) in explained
    retry = node.targets(job(failed(fs("u@a.test"))))[0]
    assert "host:127.0.0.5" in {l.key for l in limits_for(cfg, "N1", "u@a.test", "a.test", None, retry.ips, retry.names)}


@pytest.mark.parametrize("relayed", [True, False])
def test_explain_and_the_node_name_the_same_places(tmp_path, dns_server, relayed):
    dns_server.add("a.test", "MX", "10 mx1.a.test.", "20 mx2.a.test.")
    dns_server.add("mx1.a.test", "A", "127.0.0.2")
    dns_server.add("mx2.a.test", "A", "127.0.0.2", "127.0.0.3")
    dns_server.add("big.test", "A", "127.0.0.3")
    kit = SpoolKit(tmp_path, 2525 if relayed else None, yaml=(
        f"dns: {{nameservers: [127.0.0.1], port: {dns_server.port}, timeout: 2}}\n"
        'host:\n  "big.test": {scope_max_outbound_connections: 1}\n'))
    cfg = load_config(kit.config_path)
    node = Router(cfg, on_routed=lambda items, error: None)

    async def node_targets() -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
        await node.learn_host_names()  # as the scheduler does at its start
        if node.targets(job(fs())) is None:
            node.look_up(item(fs()))
            while node.looking_up:
                await asyncio.sleep(0.01)
        return sorted((tuple(sorted(t.ips)), t.names) for t in node.targets(job(fs())))

    # Compared as sets of places: the DNS server gives a host's A records in
    # any order, and each side asks it separately.
    explained = sorted((tuple(sorted(ips)), names) for _, ips, names in _mail_hosts(cfg, "a.test"))
    assert explained == asyncio.run(node_targets())


def test_a_host_that_refused_a_connection_is_paused_for_refusal_pause_then_offered_again():
    unpaused: list[str] = []
    router = Router(Config(relay=RelayConfig("192.0.2.1"), refusal_pause=0.2), on_unpaused=unpaused.append)
    relay = router.relay
    assert relay is not None

    async def scenario() -> tuple[object, object, object]:
        router.refused(relay)
        during = router.paused(relay)
        router.refused(relay)  # a second refusal does not extend or double the pause
        await asyncio.sleep(0.4)
        return during, router.paused(relay), list(unpaused)

    during, after, offered = asyncio.run(scenario())
    assert during is not None and during.key == pause_key("192.0.2.1") and during.cap == 0
    assert after is None and offered == [pause_key("192.0.2.1")]



def test_ended_pauses_names_the_pause_keys_whose_pause_is_over_and_nothing_else():
    router = Router(Config(relay=RelayConfig("192.0.2.1"), refusal_pause=0.2))
    relay = router.relay
    assert relay is not None
    keys = [pause_key("192.0.2.1"), pause_key("192.0.2.9"), "domain_limit:a.test"]

    async def scenario() -> tuple[list[str], list[str]]:
        router.refused(relay)
        during = router.ended_pauses(keys)
        await asyncio.sleep(0.3)
        return during, router.ended_pauses(keys)

    during, after = asyncio.run(scenario())
    assert during == [pause_key("192.0.2.9")]  # never paused here: nothing left to end it
    assert after == [pause_key("192.0.2.1"), pause_key("192.0.2.9")]

def test_a_refusal_in_one_worker_pauses_the_host_for_every_worker_of_the_node():
    # Each worker has its own Router; the pause goes through the table they share.
    table = SharedSlots.create(64)
    unpaused: list[tuple[str, str]] = []
    config = Config(relay=RelayConfig("192.0.2.1"), refusal_pause=0.3)
    first = Router(config, on_unpaused=lambda key: unpaused.append(("first", key)), shared=table)
    second = Router(config, on_unpaused=lambda key: unpaused.append(("second", key)), shared=table)
    alone = Router(config)  # a node of one process: no table
    relay = first.relay
    assert relay is not None

    async def scenario() -> tuple[object, object, object, object]:
        before = second.paused(relay)
        first.refused(relay)
        during, elsewhere = second.paused(relay), alone.paused(relay)
        await asyncio.sleep(0.5)
        return before, during, elsewhere, second.paused(relay)

    before, during, elsewhere, after = asyncio.run(scenario())
    assert before is None and elsewhere is None and after is None
    assert during is not None and during.key == pause_key("192.0.2.1") and during.cap == 0
    # The second worker's jobs that waited on the pause are offered the host when it ends.
    assert sorted(unpaused) == [("first", pause_key("192.0.2.1")), ("second", pause_key("192.0.2.1"))]


def test_a_pause_another_worker_made_longer_is_offered_at_its_later_end():
    # Worker 1's connection, already on its way, is refused 0.2 s after
    # worker 0's: the table's end is the later one, and worker 0's timer must
    # not offer the host before it (each job would only wait again).
    table = SharedSlots.create(64)
    unpaused: list[tuple[str, float]] = []
    config = Config(relay=RelayConfig("192.0.2.1"), refusal_pause=0.3)
    first = Router(config, on_unpaused=lambda key: unpaused.append(("first", time.monotonic())), shared=table)
    second = Router(config, on_unpaused=lambda key: unpaused.append(("second", time.monotonic())), shared=table)
    relay = first.relay
    assert relay is not None

    async def scenario() -> float:
        first.refused(relay)
        await asyncio.sleep(0.2)
        second.refused(relay)
        end = table.paused_until(pause_key("192.0.2.1"), time.monotonic())
        await asyncio.sleep(0.1)
        assert first.paused(relay) is not None  # past its own 0.3 s, within the later end
        await asyncio.sleep(0.4)
        return end

    end = asyncio.run(scenario())
    assert sorted(who for who, _ in unpaused) == ["first", "second"]
    assert all(at >= end for _, at in unpaused)


def test_refusal_pause_0_pauses_nothing():
    router = Router(Config(relay=RelayConfig("192.0.2.1"), refusal_pause=0))
    assert router.relay is not None
    router.refused(router.relay)
    assert router.paused(router.relay) is None


# --- the relay's TLS context ---------------------------------------------------


def test_a_relay_with_starttls_never_makes_its_tls_context_only_for_a_connection_that_uses_tls():
    # Reading the system's certificate store costs 20 ms of every node's
    # start; with starttls: never only a job with useTLS or reqTLS needs it.
    make_tls_context.cache_clear()
    target = relay_target(RelayConfig("127.0.0.1", 2525, starttls="never", tls_verify=False), None)
    assert target is not None and target.tls is not None
    assert make_tls_context.cache_info().currsize == 0
    assert target.tls.context().verify_mode == ssl.CERT_NONE  # the relay's tls_verify: false holds
    assert make_tls_context.cache_info().currsize == 1


def test_a_relay_that_uses_starttls_or_names_a_ca_file_makes_its_context_at_once(tmp_path, tls_cert):
    make_tls_context.cache_clear()
    relay_target(RelayConfig("127.0.0.1", 2525, starttls="auto"), None)
    assert make_tls_context.cache_info().currsize == 1
    relay_target(RelayConfig("127.0.0.1", 2525, starttls="never", ca_file=Path(tls_cert.cert_path)), None)
    assert make_tls_context.cache_info().currsize == 2
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match="ca_file"):
        relay_target(RelayConfig("127.0.0.1", 2525, starttls="never", ca_file=bad), None)
