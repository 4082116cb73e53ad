"""DNSTestServer (tests/dnsserver.py), exercised with dnspython's async
resolver configured the way copiamail configures it."""

from __future__ import annotations

import asyncio
import socket
import time

import dns.asyncresolver
import dns.exception
import dns.resolver
import pytest
from dnsserver import DNSTestServer


def make_resolver(server: DNSTestServer, timeout: float = 2) -> dns.asyncresolver.Resolver:
    r = dns.asyncresolver.Resolver(configure=False)
    r.nameservers = [server.host]
    r.port = server.port
    r.timeout = r.lifetime = timeout
    return r


def resolve(server: DNSTestServer, name: str, rtype: str, **kw) -> dns.resolver.Answer:
    return asyncio.run(make_resolver(server, **kw).resolve(name, rtype))


def test_binds_loopback_udp_and_tcp_on_one_port(dns_server):
    assert dns_server.host == "127.0.0.1" and dns_server.port > 0
    assert dns_server.address == ("127.0.0.1", dns_server.port)
    with socket.create_connection(dns_server.address, timeout=2):
        pass  # the TCP side listens on the same port number


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.1", "::1", "localhost"])
def test_refuses_non_loopback_hosts(host):
    with pytest.raises(ValueError):
        DNSTestServer(host=host)


def test_mx_answers_sorted_by_preference(dns_server):
    dns_server.add("orange.fr", "MX", "20 mx2.shared.test.", "10 mx1.shared.test.",
                   "30 mx3.shared.test")
    answer = resolve(dns_server, "orange.fr", "MX")
    mx = [(r.preference, r.exchange.to_text()) for r in sorted(answer, key=lambda r: r.preference)]
    assert mx == [(10, "mx1.shared.test."), (20, "mx2.shared.test."), (30, "mx3.shared.test.")]
    assert answer.rrset.ttl == 60


def test_a_answers_and_ttls(dns_server):
    dns_server.add("mx1.shared.test", "A", "127.0.0.2", "127.0.0.3")
    dns_server.add("mx2.shared.test", "A", "127.0.0.4", ttl=5)
    dns_server.add("mx1.shared.test", "A", "127.0.0.5")  # extends the set
    answer = resolve(dns_server, "mx1.shared.test", "A")
    assert sorted(r.address for r in answer) == ["127.0.0.2", "127.0.0.3", "127.0.0.5"]
    answer = resolve(dns_server, "mx2.shared.test", "A")
    assert [r.address for r in answer] == ["127.0.0.4"]
    assert answer.rrset.ttl == 5


def test_server_default_ttl():
    with DNSTestServer(ttl=3600) as server:
        server.add("a.test", "A", "127.0.0.9")
        assert resolve(server, "a.test", "A").rrset.ttl == 3600


def test_names_case_insensitive_absolute_or_relative(dns_server):
    dns_server.add("Orange.FR.", "MX", "10 MX1.Shared.Test")
    for asked in ("orange.fr", "ORANGE.FR.", "oRaNgE.fr"):
        answer = resolve(dns_server, asked, "MX")
        assert [r.exchange.to_text().lower() for r in answer] == ["mx1.shared.test."]
    assert dns_server.queries == [("orange.fr", "MX")] * 3


def test_nodata_raises_no_answer(dns_server):
    dns_server.add("orange.fr", "MX", "10 mx1.shared.test.")
    with pytest.raises(dns.resolver.NoAnswer):
        resolve(dns_server, "orange.fr", "A")
    with pytest.raises(dns.resolver.NoAnswer):
        resolve(dns_server, "orange.fr", "AAAA")


def test_unknown_name_raises_nxdomain(dns_server):
    dns_server.add("orange.fr", "MX", "10 mx1.shared.test.")
    with pytest.raises(dns.resolver.NXDOMAIN):
        resolve(dns_server, "nowhere.test", "MX")
    with pytest.raises(dns.resolver.NXDOMAIN):
        resolve(dns_server, "sub.orange.fr", "MX")
    dns_server.nxdomain("orange.fr")
    with pytest.raises(dns.resolver.NXDOMAIN):
        resolve(dns_server, "orange.fr", "MX")
    dns_server.add("orange.fr", "MX", "10 mx9.shared.test.")
    assert [r.preference for r in resolve(dns_server, "orange.fr", "MX")] == [10]


def test_servfail_raises_no_nameservers(dns_server):
    dns_server.add("broken.test", "MX", "10 mx1.shared.test.")
    dns_server.servfail("broken.test")
    with pytest.raises(dns.resolver.NoNameservers) as info:
        resolve(dns_server, "broken.test", "MX")
    assert "SERVFAIL" in str(info.value)
    with pytest.raises(dns.resolver.NoNameservers):
        resolve(dns_server, "broken.test", "A")


def test_delay_does_not_hold_up_other_names(dns_server):
    dns_server.add("slow.test", "MX", "10 mx1.shared.test.")
    dns_server.add("fast.test", "MX", "10 mx1.shared.test.")
    dns_server.delay("slow.test", 30)

    async def both():
        r = make_resolver(dns_server, timeout=1)
        slow = asyncio.ensure_future(r.resolve("slow.test", "MX"))
        fast = await r.resolve("fast.test", "MX")  # not held up by the slow one
        assert not slow.done()
        return fast, await asyncio.gather(slow, return_exceptions=True)

    start = time.monotonic()
    fast, (slow,) = asyncio.run(both())
    elapsed = time.monotonic() - start
    assert [r.preference for r in fast] == [10]
    assert isinstance(slow, dns.resolver.LifetimeTimeout)
    assert isinstance(slow, dns.exception.Timeout)
    assert 0.9 < elapsed < 2.5


def test_delay_beyond_product_lifetime_raises_lifetime_timeout(dns_server):
    dns_server.add("slow.test", "MX", "10 mx1.shared.test.")
    dns_server.delay("slow.test", 30)
    start = time.monotonic()  # the product's settings: timeout = lifetime = 2
    with pytest.raises(dns.resolver.LifetimeTimeout):
        resolve(dns_server, "slow.test", "MX")
    assert 1.9 < time.monotonic() - start < 2.9


def test_short_delay_is_answered(dns_server):
    dns_server.add("slowish.test", "A", "127.0.0.2")
    dns_server.delay("slowish.test", 0.3)
    start = time.monotonic()
    assert [r.address for r in resolve(dns_server, "slowish.test", "A")] == ["127.0.0.2"]
    assert time.monotonic() - start >= 0.3
    dns_server.delay("slowish.test", 0)
    start = time.monotonic()
    resolve(dns_server, "slowish.test", "A")
    assert time.monotonic() - start < 0.3


def test_queries_recorded(dns_server):
    dns_server.add("orange.fr", "MX", "10 mx1.shared.test.")
    dns_server.add("mx1.shared.test", "A", "127.0.0.2")
    resolve(dns_server, "orange.fr", "MX")
    resolve(dns_server, "mx1.shared.test", "A")
    with pytest.raises(dns.resolver.NoAnswer):
        resolve(dns_server, "mx1.shared.test", "AAAA")
    with pytest.raises(dns.resolver.NXDOMAIN):
        resolve(dns_server, "Nope.Test.", "MX")
    assert dns_server.queries == [
        ("orange.fr", "MX"), ("mx1.shared.test", "A"),
        ("mx1.shared.test", "AAAA"), ("nope.test", "MX"),
    ]
    assert dns_server.tcp_queries == []
    dns_server.clear()
    assert dns_server.queries == []
    with pytest.raises(dns.resolver.NXDOMAIN):  # records gone too
        resolve(dns_server, "orange.fr", "MX")


def test_truncated_udp_answer_falls_back_to_tcp(dns_server):
    addresses = [f"127.0.{i // 250}.{i % 250 + 1}" for i in range(100)]
    dns_server.add("big.test", "A", *addresses)
    answer = resolve(dns_server, "big.test", "A")
    assert sorted(r.address for r in answer) == sorted(addresses)
    assert dns_server.queries == [("big.test", "A"), ("big.test", "A")]
    assert dns_server.tcp_queries == [("big.test", "A")]


def test_cname_is_followed(dns_server):
    dns_server.add("alias.test", "CNAME", "real.test.")
    dns_server.add("real.test", "MX", "10 mx1.shared.test.")
    answer = resolve(dns_server, "alias.test", "MX")
    assert answer.canonical_name.to_text() == "real.test."
    assert [r.preference for r in answer] == [10]


def test_bad_record_text_raises_in_add(dns_server):
    with pytest.raises(dns.exception.SyntaxError):
        dns_server.add("orange.fr", "MX", "mx1.shared.test.")  # no preference


def test_two_servers_at_once(dns_server):
    with DNSTestServer() as other:
        assert other.port != dns_server.port
        dns_server.add("orange.fr", "MX", "10 one.test.")
        other.add("orange.fr", "MX", "10 two.test.")

        async def both():
            return await asyncio.gather(
                make_resolver(dns_server).resolve("orange.fr", "MX"),
                make_resolver(other).resolve("orange.fr", "MX"))

        first, second = asyncio.run(both())
    assert [r.exchange.to_text() for r in first] == ["one.test."]
    assert [r.exchange.to_text() for r in second] == ["two.test."]
    assert dns_server.queries == other.queries == [("orange.fr", "MX")]


def test_other_loopback_address_and_restart():
    try:
        server = DNSTestServer(host="127.0.0.2").start()
    except OSError:  # pragma: no cover - systems without all of 127/8
        pytest.skip("127.0.0.2 not bindable here")
    try:
        server.add("x.test", "A", "127.0.0.7")
        assert [r.address for r in resolve(server, "x.test", "A")] == ["127.0.0.7"]
        port = server.port
        server.stop()
        assert not server.running
        server.start()
        assert server.port == port
        assert [r.address for r in resolve(server, "x.test", "A")] == ["127.0.0.7"]
    finally:
        server.stop()
    assert not server.errors


def test_stop_with_answers_pending_is_quick_and_leaks_nothing():
    import gc
    import threading
    import warnings

    import dns.message
    import dns.query

    def client(send, server):  # its timeout or EOF is expected: the server stops
        try:
            send(dns.message.make_query("slow.test", "A"), server.host,
                 port=server.port, timeout=0.3)
        except (dns.exception.DNSException, OSError, EOFError):
            pass

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        for _ in range(3):
            server = DNSTestServer().start()
            server.add("slow.test", "A", "127.0.0.2")
            server.delay("slow.test", 30)
            clients = [threading.Thread(target=client, args=(send, server), daemon=True)
                       for send in (dns.query.udp, dns.query.tcp)]
            for thread in clients:
                thread.start()
            with socket.create_connection(server.address, timeout=1):
                pass  # a connection accepted just before stop()
            time.sleep(0.05)
            start = time.monotonic()
            server.stop()
            assert time.monotonic() - start < 1
            assert not server.errors
            for thread in clients:
                thread.join(2)
            gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]
