"""copiamail.scheduling.connections: open connections, the slots they hold,
idle connections waiting for a job of their domain, and host limits learned
late. No SMTP: sessions are made but never opened."""

from __future__ import annotations

import asyncio

from copiamail.config import BindingConfig, Config, HostStanza, ScopeCaps
from copiamail.jobfile.fsfile import CommandFile
from copiamail.jobfile.job import Job, parse_job
from copiamail.scheduling.connections import Connection, Connections, starttls_for
from copiamail.scheduling.limiter import LocalLimiter
from copiamail.scheduling.limits import Scopes
from copiamail.scheduling.routing import Item, Target

CONFIG = Config(hosts=(HostStanza("mx.big.test", ScopeCaps(scope_max_outbound_connections=1)),))
B1 = BindingConfig("b1", "127.0.0.2")


def mx(ip: str, names: tuple[str, ...] = ("mx.a.test",)) -> Target:
    return Target(ip, 25, (ip,), names, "auto", None, False, names[0])


def relay(starttls: str = "never") -> Target:
    return Target("192.0.2.1", 2525, ("192.0.2.1",), ("relay.test",), starttls, None, True, login=("me", "pw"))


def job(*lines: str) -> Job:
    return parse_job(CommandFile.parse(("$email_address u@a.test\n$email_text hi\n" + "".join(l + "\n" for l in lines)).encode()), "J")


class Rig:
    def __init__(self) -> None:
        self.scopes = Scopes(CONFIG, "N1")
        self.limiter = LocalLimiter()
        self.connections = Connections(self.scopes, self.limiter, 30.0, "me.example.com")

    def open(self, domain: str, target: Target, binding: BindingConfig | None = None) -> Connection:
        limits = self.scopes.limits(f"u@{domain}", domain, binding, target.ips, target.names)
        assert self.limiter.try_acquire(limits) is None
        return self.connections.open(domain, f"u@{domain}", binding, limits, target, starttls_for(target, job()))


def test_a_connection_is_counted_open_with_its_session_settings_until_it_closes():
    rig = Rig()
    conn = rig.open("a.test", relay(), B1)
    s = conn.session.settings
    assert (s.host, s.port, s.source_address, s.username, s.password, s.timeout, s.helo_name, s.relay, s.starttls) == (
        "192.0.2.1", 2525, "127.0.0.2", "me", "pw", 30.0, "me.example.com", True, "never")
    assert len(rig.connections) == 1 and rig.connections.serves("a.test") and not rig.connections.serves("b.test")
    assert rig.connections.open_count(B1) == 1 and rig.connections.open_count(None) == 0
    assert rig.limiter.in_use("server") == 1
    rig.connections.closed(conn)
    assert len(rig.connections) == 0 and rig.limiter.in_use("server") == 0 and rig.limiter.in_use("binding_domain:b1:a.test") == 0


def test_usetls_and_reqtls_use_starttls_where_a_target_says_never():
    assert starttls_for(relay("never"), job()) == "never"
    assert starttls_for(relay("never"), job("$email_options useTLS")) == "auto"
    assert starttls_for(relay("never"), job("$email_options reqTLS")) == "auto"
    assert starttls_for(relay("always"), job("$email_options useTLS")) == "always"


def test_a_host_name_learned_late_makes_open_connections_to_its_address_count_against_its_limit():
    rig = Rig()
    to_ip = rig.open("a.test", mx("10.0.0.7"))
    rig.open("b.test", mx("10.0.0.8", ("mx.b.test",)))
    rig.connections.learned_host("10.0.0.7", ("mx.a.test", "mx.big.test"))
    assert [l.key for l in to_ip.limits if l.key.startswith("host:")] == ["host:10.0.0.7"]
    assert rig.limiter.in_use("host:10.0.0.7") == 1
    rig.connections.learned_host("10.0.0.7", ("mx.a.test", "mx.big.test"))  # known already: counted once
    assert rig.limiter.in_use("host:10.0.0.7") == 1
    rig.connections.closed(to_ip)
    assert rig.limiter.in_use("host:10.0.0.7") == 0


def test_a_relay_connection_is_not_a_mail_host_connection():
    rig = Rig()
    conn = rig.open("a.test", Target("10.0.0.7", 25, ("10.0.0.7",), ("relay.test",), "auto", None, True))
    rig.connections.learned_host("10.0.0.7", ("mx.big.test",))
    assert not any(l.key.startswith("host:") for l in conn.limits)


def test_an_idle_connection_gets_the_job_handed_to_it_or_closes_when_told_or_when_the_time_is_up():
    rig = Rig()
    handed: list[Item] = []

    async def go() -> list[object]:
        a = rig.open("a.test", relay())
        b = rig.open("a.test", relay())
        c = rig.open("a.test", relay())
        item = Item(None, None, job())  # type: ignore[arg-type]
        waits = [asyncio.ensure_future(rig.connections.wait_idle(conn, seconds, handed.append))
                 for conn, seconds in ((a, 5), (b, 5), (c, 0.05))]
        await asyncio.sleep(0)
        assert list(rig.connections.idle_of("a.test")) == [a, b, c] and a.idle and rig.connections.idle_of("b.test") == ()
        a.handoff.set_result(item)  # type: ignore[union-attr]
        assert not a.idle
        rig.connections.close_one_holding("server")  # the first idle one that holds it: b
        out = [await w for w in waits]
        assert rig.connections.idle_of("a.test") == () and a.handoff is None
        return out

    first, second, third = asyncio.run(go())
    assert isinstance(first, Item) and second is None and third is None and handed == []


def test_a_slot_freed_for_a_waiting_job_is_not_taken_from_an_idle_connection_of_its_own_domain():
    rig = Rig()

    async def go() -> tuple[bool, bool]:
        own = rig.open("a.test", relay())
        other = rig.open("b.test", relay())
        waits = [asyncio.ensure_future(rig.connections.wait_idle(conn, 5, lambda item: None)) for conn in (own, other)]
        await asyncio.sleep(0)
        # A job of a.test waits on the server total: a.test's idle connection
        # can carry it, so b.test's is the one told to close.
        rig.connections.close_one_holding("server", other_than="a.test")
        closed = (not own.idle, not other.idle)
        rig.connections.close_idle()
        await asyncio.gather(*waits)
        return closed

    assert asyncio.run(go()) == (False, True)


def test_close_idle_tells_every_idle_connection_to_close():
    rig = Rig()

    async def go() -> list[Item | None]:
        conns = [rig.open(d, relay()) for d in ("a.test", "b.test")]
        waits = [asyncio.ensure_future(rig.connections.wait_idle(c, 5, lambda item: None)) for c in conns]
        await asyncio.sleep(0)
        rig.connections.close_idle()
        return [await w for w in waits]

    assert asyncio.run(go()) == [None, None]


def test_a_connection_that_goes_idle_after_close_idle_closes_at_once_while_lingering_is_off():
    # The race a drain's end meets: close_idle() ran while this connection was
    # still waiting for its last result; it goes idle just after.
    rig = Rig()

    async def go() -> tuple[Item | None, float]:
        conn = rig.open("a.test", relay())
        rig.connections.close_idle()
        rig.connections.linger = False
        loop = asyncio.get_running_loop()
        started = loop.time()
        item = await rig.connections.wait_idle(conn, 60, lambda item: None)
        return item, loop.time() - started

    item, waited = asyncio.run(go())
    assert item is None and waited < 30


def test_a_job_handed_over_just_before_a_cancellation_is_handed_back():
    rig = Rig()
    handed: list[Item] = []
    item = Item(None, None, job())  # type: ignore[arg-type]

    async def go() -> None:
        conn = rig.open("a.test", relay())
        wait = asyncio.ensure_future(rig.connections.wait_idle(conn, 5, handed.append))
        await asyncio.sleep(0)
        conn.handoff.set_result(item)  # type: ignore[union-attr]
        wait.cancel()  # before the task has taken the job
        try:
            await wait
        except asyncio.CancelledError:
            pass

    asyncio.run(go())
    assert handed == [item]


def test_a_connection_whose_wait_is_cancelled_is_no_longer_idle():
    rig = Rig()

    async def go() -> bool:
        conn = rig.open("a.test", relay())
        wait = asyncio.ensure_future(rig.connections.wait_idle(conn, 5, lambda it: None))
        await asyncio.sleep(0)
        wait.cancel()
        idle = conn.idle  # no job can be handed to it any more, even before the task has seen its cancellation
        try:
            await wait
        except asyncio.CancelledError:
            pass
        return idle

    assert asyncio.run(go()) is False


def test_an_idle_connection_whose_time_is_up_has_its_handoff_answered_by_the_timer():
    rig = Rig()

    async def go() -> tuple[object, asyncio.Future[object]]:
        conn = rig.open("a.test", relay())
        wait = asyncio.ensure_future(rig.connections.wait_idle(conn, 0.01, lambda it: None))
        await asyncio.sleep(0)
        handoff = conn.handoff
        assert conn.idle and handoff is not None
        return await wait, handoff

    got, handoff = asyncio.run(go())
    # Answered (not cancelled) the instant the time ran out: the connection
    # stopped being idle then, so no job could be handed to it meanwhile.
    assert got is None and handoff.done() and not handoff.cancelled() and handoff.result() is None


def test_the_last_slots_of_the_node_total_are_kept_for_domains_with_no_connection_open():
    scopes = Scopes(Config(server_max_outbound_connections=3, server_reserve_outbound_connections=2), "N1")
    limiter = LocalLimiter()
    connections = Connections(scopes, limiter, 30.0, None)
    assert connections.reserved("a.test") is None  # nothing open
    limits = scopes.limits("u@a.test", "a.test")
    assert limiter.try_acquire(limits) is None
    connections.open("a.test", "u@a.test", None, limits, relay(), "never")
    assert connections.reserved("a.test") == scopes.server  # 1 in use >= 3 - 2: a.test has one already
    assert connections.reserved("b.test") is None  # a domain without a connection may take a kept slot


def test_a_worker_tells_every_greeted_connection_of_each_shared_key_that_learns_adaptive_there_or_not():
    # A pooled stanza's key learns on the connections of one mail host and is
    # merely counted on another host's, whose own adaptive key is the host's:
    # the other workers must hear of both, as this worker counts both itself.
    from types import SimpleNamespace

    from copiamail.scheduling.limits import Limit

    rig = Rig()
    pool = Limit("global_domain:/x/", 10, "pooled", shared=True)
    host = Limit("host:192.0.2.1", 10, "host", shared=True, ceiling=10)
    counted = rig.connections.open("a.test", "u@a.test", None, (pool, host), mx("192.0.2.1"), "never")
    learns = rig.connections.open("b.test", "u@b.test", None, (Limit(pool.key, 10, "pooled", shared=True, ceiling=10),),
                                  mx("192.0.2.2"), "never")
    opening = rig.connections.open("c.test", "u@c.test", None, (pool,), mx("192.0.2.3"), "never")
    assert rig.connections.greeted_by_shared_key() == {}  # none past its greeting yet
    for conn in (counted, learns):
        conn.session._link = SimpleNamespace(usable=True)
    assert rig.connections.greeted_by_shared_key() == {pool.key: 2, host.key: 1}
    assert rig.connections.greeted_sharing(opening, pool.key) == 2
    rig.connections.closed(counted)
    assert rig.connections.greeted_by_shared_key() == {pool.key: 1}


def test_without_a_shared_key_that_learns_a_worker_tells_nothing():
    from types import SimpleNamespace

    rig = Rig()
    conn = rig.open("a.test", relay())
    conn.session._link = SimpleNamespace(usable=True)
    assert rig.connections.greeted_by_shared_key() == {}


def test_an_idle_connection_closes_at_its_own_time_though_an_earlier_idle_wait_had_a_later_one():
    rig = Rig()

    async def go() -> tuple[Item | None, Item | None, float]:
        conn = rig.open("a.test", relay())
        loop = asyncio.get_running_loop()
        first = asyncio.ensure_future(rig.connections.wait_idle(conn, 30, lambda item: None))
        await asyncio.sleep(0)
        conn.handoff.set_result(Item(None, None, job()))  # type: ignore[union-attr, arg-type]
        got = await first  # its 30 s timer is still running
        started = loop.time()
        closed = await rig.connections.wait_idle(conn, 0.05, lambda item: None)
        return got, closed, loop.time() - started

    got, closed, waited = asyncio.run(go())
    assert isinstance(got, Item) and closed is None and 0.04 <= waited < 1.0


def test_an_idle_connection_is_not_closed_at_the_time_of_an_earlier_idle_wait():
    rig = Rig()

    async def go() -> tuple[Item | None, bool]:
        conn = rig.open("a.test", relay())
        first = asyncio.ensure_future(rig.connections.wait_idle(conn, 0.05, lambda item: None))
        await asyncio.sleep(0)
        conn.handoff.set_result(Item(None, None, job()))  # type: ignore[union-attr, arg-type]
        await first  # its timer fires at 0.05 s, during the next wait
        second = asyncio.ensure_future(rig.connections.wait_idle(conn, 0.3, lambda item: None))
        await asyncio.sleep(0.15)
        still_idle = conn.idle
        item = Item(None, None, job())  # type: ignore[arg-type]
        conn.handoff.set_result(item)  # type: ignore[union-attr]
        return await second, still_idle

    got, still_idle = asyncio.run(go())
    assert still_idle and isinstance(got, Item)
