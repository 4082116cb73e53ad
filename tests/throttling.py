"""Several throttling receivers, one per domain, and a DNS server that routes
each domain to its own by MX.

``Receivers`` starts one ``SMTPTestServer`` per domain on its own loopback
address (127.0.2.1, 127.0.2.2, ... by default), all on one port, and a
``DNSTestServer`` on 127.0.0.1 that answers ``MX 10 mx.DOMAIN.`` and
``mx.DOMAIN. A 127.0.2.N`` for each.  A copiamail node reaches them with the
lines of ``copiamail_yaml()`` (no relay), Postfix with the lines of
``transport_map()``.  Used by tests and by ``scripts/bench --only throttled``.

Usage::

    with Receivers({"a.test": dict(max_connections_per_source=2, latency=0.05),
                    "b.test": dict(latency=0.05)}) as rx:
        ... # copiamail.yaml gets rx.copiamail_yaml()
        rx["a.test"].set_limits(max_connections_per_source=3)
        print(rx.messages, rx.throttle_replies, rx.report())
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from typing import Any

from dnsserver import DNSTestServer
from receiverlimits import ThrottleReply
from smtpserver import SMTPTestServer

__all__ = ["Receivers"]


class Receivers:
    def __init__(self, domains: dict[str, dict[str, Any]], first_address: str = "127.0.2.1",
                 dns_host: str = "127.0.0.1", port: int = 0) -> None:
        first = ipaddress.ip_address(first_address)
        self.addresses = {d: str(first + i) for i, d in enumerate(domains)}
        self.servers = {d: SMTPTestServer(host=self.addresses[d], port=port, server_hostname=f"mx.{d}", **options)
                        for d, options in domains.items()}
        self.dns = DNSTestServer(host=dns_host)
        self.port = port

    def start(self) -> Receivers:
        try:
            for server in self.servers.values():
                server.port = self.port
                server.start()
                self.port = server.port  # the first picks the port, the others share it
            self.dns.start()
            for domain, address in self.addresses.items():
                self.dns.add(domain, "MX", f"10 mx.{domain}.")
                self.dns.add(f"mx.{domain}", "A", address)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for server in self.servers.values():
            server.stop()
        self.dns.stop()

    def __enter__(self) -> Receivers:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def __getitem__(self, domain: str) -> SMTPTestServer:
        return self.servers[domain]

    # -- routes ---------------------------------------------------------------
    def copiamail_yaml(self) -> str:
        """copiamail.yaml lines that send each domain to its receiver by MX."""
        return (f"dns: {{nameservers: [{self.dns.host}], port: {self.dns.port}, timeout: 5}}\n"
                f"mx_port: {self.port}\n")

    def transport_map(self) -> str:
        """Postfix transport_maps lines: each domain to its receiver's address and port."""
        return "".join(f"{d} smtp:[{a}]:{self.port}\n" for d, a in self.addresses.items())

    # -- what the receivers saw ---------------------------------------------------
    @property
    def messages(self) -> int:
        return sum(len(s.messages) for s in self.servers.values())

    @property
    def throttle_replies(self) -> list[ThrottleReply]:
        return sorted((r for s in self.servers.values() for r in s.throttle_replies), key=lambda r: r.at)

    def last_message_at(self) -> float | None:
        times = [m.received_at for s in self.servers.values() for m in s.messages]
        return max(times) if times else None

    def errors(self) -> list[BaseException]:
        return [e for s in self.servers.values() for e in s.errors]

    def report(self, started: float | None = None) -> list[str]:
        """One line per domain: its hidden connection limit, the peak of
        connections open at once from one client, messages, throttle replies
        by kind; and, given the ``time.time()`` the run started, when its last
        message came."""
        lines = []
        for domain, server in self.servers.items():
            limit = server.max_connections_per_source
            kinds = Counter(r.kind for r in server.throttle_replies)
            peak = max(server.peak_by_source.values(), default=0)
            replies = ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())) or "none"
            line = (f"{domain} (allows {limit if limit is not None else 'any number of'} connections): "
                    f"peak {peak} open, {len(server.messages)} msgs, throttle replies: {replies}")
            messages = server.messages
            if started is not None and messages:
                line += f", last message after {max(m.received_at for m in messages) - started:.2f} s"
            lines.append(line)
        return lines
