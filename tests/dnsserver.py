"""A real DNS server for copiamail's tests, answering from a table.

``DNSTestServer`` runs on its own asyncio event loop in a background thread,
bound to a loopback address (127.0.0.0/8 only; default 127.0.0.1) on an
ephemeral UDP port, and on the same port number over TCP (dnspython retries
over TCP when a UDP answer comes back truncated).  Queries are parsed and
answers built with dnspython.

Usage::

    with DNSTestServer() as dns_srv:
        dns_srv.add("orange.fr", "MX", "10 mx1.shared.test.", "20 mx2.shared.test.")
        dns_srv.add("mx1.shared.test", "A", "127.0.0.2")
        r = dns.asyncresolver.Resolver(configure=False)
        r.nameservers = [dns_srv.host]; r.port = dns_srv.port
        answer = await r.resolve("orange.fr", "MX")

API:

``DNSTestServer(host="127.0.0.1", port=0, ttl=60)``
    ``port=0`` picks a free port usable on both UDP and TCP.  ``ttl`` is the
    default TTL of added records.  Nothing is bound until ``start()``.
``start()`` / ``stop()`` / ``with server:``
    ``start()`` returns the server; ``stop()`` is idempotent, cancels delayed
    answers and closes the sockets.  ``host``, ``port``, ``address`` and
    ``running`` are attributes/properties.  A stopped server may be started
    again; it rebinds the same port.
``add(name, rtype, *values, ttl=None)``
    Adds records in zone-file syntax (``"10 mx1.test."``, ``"127.0.0.2"``,
    ``'"v=spf1 -all"'``).  Names (owner and inside the values) may be given
    absolute or relative; both mean the same absolute name.  Adding to an
    existing (name, type) extends the set.  Bad syntax raises at once
    (``dns.exception.SyntaxError``).  ``add()`` undoes ``nxdomain(name)``.
``nxdomain(name)``
    Forgets every record of ``name``: it answers NXDOMAIN.
``servfail(name)``
    ``name`` answers SERVFAIL (whatever records it has), for every type.
``delay(name, seconds)``
    Answers for ``name`` wait ``seconds`` first (to provoke client timeouts);
    other names are answered meanwhile.  ``delay(name, 0)`` removes it.
``clear()``
    Back to a fresh state: no records, no rules, no recorded queries.
``queries`` / ``tcp_queries``
    Lists of ``(name, rtype)`` received, e.g. ``("orange.fr", "MX")``: name in
    lower case without the final dot, type as text.  ``tcp_queries`` holds the
    ones that came over TCP (they are in ``queries`` as well).  Appended under
    a lock; copy them (``list(server.queries)``) to read while queries arrive.
``errors``
    Exceptions raised while answering (the ``dns_server`` fixture asserts it
    is empty at teardown).

Semantics, checked in this order for the asked name: a ``delay`` waits; a
``servfail`` name answers SERVFAIL; a name absent from the table answers
NXDOMAIN; a name with records of the asked type answers them (NOERROR, AA
flag); a name with a CNAME (and asked another type) answers the CNAME plus,
followed through the table (up to 8 links), the target's records; a name with
records but none of the asked type answers NOERROR with an empty answer
section (NODATA).  No SOA is sent with negative answers.  Queries other than
a standard QUERY with one question get NOTIMP / FORMERR; unparsable packets
are dropped.  Over UDP an answer larger than 512 bytes (or the query's EDNS
payload) is truncated with the TC flag set; over TCP it is sent whole.  On one
TCP connection, queries are answered in order.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import threading
from collections import deque
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

__all__ = ["DNSTestServer"]

_LOOPBACK = ipaddress.IPv4Network("127.0.0.0/8")
_MAX_CNAME_CHAIN = 8


def _check_host(host: str) -> str:
    try:
        addr = ipaddress.IPv4Address(host)
    except ValueError:
        raise ValueError(f"DNSTestServer host must be an IPv4 literal in 127.0.0.0/8, not {host!r}") from None
    if addr not in _LOOPBACK:
        raise ValueError(f"DNSTestServer binds only to 127.0.0.0/8, not {host!r}")
    return str(addr)


def _name(name: str | dns.name.Name) -> dns.name.Name:
    """Absolute dns.name.Name; 'a.test' and 'a.test.' are the same name."""
    if isinstance(name, dns.name.Name):
        return name if name.is_absolute() else name.concatenate(dns.name.root)
    return dns.name.from_text(name, origin=dns.name.root)


def _label(name: dns.name.Name) -> str:
    return name.to_text(omit_final_dot=True).lower()


class _UDPProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: DNSTestServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.server._spawn(self._reply(data, addr))

    def error_received(self, exc: Exception) -> None:  # ICMP from a gone client
        pass

    async def _reply(self, data: bytes, addr: Any) -> None:
        wire = await self.server._respond(data, tcp=False)
        if wire is not None and self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(wire, addr)


class _TCPProtocol(asyncio.Protocol):
    """Length-prefixed DNS over TCP; queries on one connection answered in order."""

    def __init__(self, server: DNSTestServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.pending: deque[bytes] = deque()
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server._transports.add(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server._transports.discard(self.transport)  # type: ignore[arg-type]
        self.pending.clear()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= 2:
            size = int.from_bytes(self.buffer[:2], "big")
            if len(self.buffer) < 2 + size:
                break
            self.pending.append(self.buffer[2:2 + size])
            self.buffer = self.buffer[2 + size:]
        if self.pending and not self.busy:
            self.busy = True
            self.server._spawn(self._answer_pending())

    async def _answer_pending(self) -> None:
        assert self.transport is not None
        try:
            while self.pending and not self.transport.is_closing():
                wire = await self.server._respond(self.pending.popleft(), tcp=True)
                if self.transport.is_closing():
                    break
                if wire is None:
                    self.transport.close()
                    break
                self.transport.write(len(wire).to_bytes(2, "big") + wire)
        finally:
            self.busy = False


class DNSTestServer:
    """Table-driven DNS server on 127.0.0.0/8, UDP + TCP on one port (see module doc)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, ttl: int = 60) -> None:
        self.host = _check_host(host)
        self.port = int(port)
        self.ttl = int(ttl)
        self.queries: list[tuple[str, str]] = []
        self.tcp_queries: list[tuple[str, str]] = []
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        # name -> {rdtype: RRset}; RRsets are replaced, never mutated, once stored
        self._table: dict[dns.name.Name, dict[int, dns.rrset.RRset]] = {}
        self._servfail: set[dns.name.Name] = set()
        self._delay: dict[dns.name.Name, float] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._udp: asyncio.DatagramTransport | None = None
        self._listener: socket.socket | None = None  # TCP, accepted via add_reader
        self._accepted: set[socket.socket] = set()  # accepted, no transport yet
        self._tasks: set[asyncio.Task] = set()
        self._transports: set[asyncio.BaseTransport] = set()  # TCP connections

    # -- table ---------------------------------------------------------------

    def add(self, name: str, rtype: str, *values: str, ttl: int | None = None) -> None:
        """Add ``values`` (zone-file rdata text) as ``rtype`` records of ``name``."""
        if not values:
            raise ValueError("add() needs at least one value")
        owner = _name(name)
        rdtype = dns.rdatatype.from_text(rtype) if isinstance(rtype, str) else rtype
        new = dns.rrset.from_text_list(
            owner, self.ttl if ttl is None else int(ttl), dns.rdataclass.IN, rdtype,
            list(values), origin=dns.name.root, relativize=False,
        )
        with self._lock:
            node = self._table.setdefault(owner, {})
            old = node.get(rdtype)
            if old is not None:
                merged = old.copy()
                merged.union_update(new)
                new = merged
            node[rdtype] = new

    def nxdomain(self, name: str) -> None:
        """Forget all records of ``name``; it answers NXDOMAIN."""
        with self._lock:
            self._table.pop(_name(name), None)

    def servfail(self, name: str) -> None:
        """``name`` answers SERVFAIL for every type."""
        with self._lock:
            self._servfail.add(_name(name))

    def delay(self, name: str, seconds: float) -> None:
        """Answers for ``name`` wait ``seconds`` first (0 removes the delay)."""
        with self._lock:
            if seconds > 0:
                self._delay[_name(name)] = float(seconds)
            else:
                self._delay.pop(_name(name), None)

    def clear(self) -> None:
        """Forget records, servfail/delay rules and recorded queries."""
        with self._lock:
            self._table.clear()
            self._servfail.clear()
            self._delay.clear()
            del self.queries[:]
            del self.tcp_queries[:]

    # -- lifecycle -------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> DNSTestServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<DNSTestServer {self.host}:{self.port} {state}>"

    def _bind(self) -> tuple[socket.socket, socket.socket]:
        """UDP and TCP sockets on one port; with port 0, retry until both fit."""
        last: OSError | None = None
        for _ in range(1 if self.port else 50):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                udp.bind((self.host, self.port))
                port = udp.getsockname()[1]
                tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                tcp.bind((self.host, port))
                tcp.listen(64)
            except OSError as exc:
                udp.close()
                tcp.close()
                last = exc
                continue
            udp.setblocking(False)
            tcp.setblocking(False)
            self.port = port
            return udp, tcp
        assert last is not None
        raise last

    def start(self) -> DNSTestServer:
        """Bind and serve in a background thread; returns self."""
        if self.running:
            return self
        udp, tcp = self._bind()
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(
            target=loop.run_forever, name=f"dns-test-server-{self.port}", daemon=True)
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._open(udp, tcp), loop).result(10)
        except BaseException:
            udp.close()
            tcp.close()
            self.stop()
            raise
        return self

    async def _open(self, udp: socket.socket, tcp: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        self._udp, _ = await loop.create_datagram_endpoint(lambda: _UDPProtocol(self), sock=udp)
        # Not loop.create_server(): on 3.11, Server.close() racing an accept
        # leaks the accepted socket (AssertionError in Server._attach).
        self._listener = tcp
        loop.add_reader(tcp.fileno(), self._accept)

    def stop(self) -> None:
        """Cancel pending answers, close the sockets, end the thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            if thread.is_alive():
                asyncio.run_coroutine_threadsafe(self._close(), loop).result(10)
                loop.call_soon_threadsafe(loop.stop)
                thread.join(10)
        finally:
            if not thread.is_alive():
                loop.close()
            self._loop = self._thread = None

    async def _close(self) -> None:
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._listener is not None:
            asyncio.get_running_loop().remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
        tasks = [t for t in self._tasks if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for conn in list(self._accepted):
            conn.close()
        self._accepted.clear()
        for transport in list(self._transports):
            transport.close()
        for _ in range(3):  # transports close their sockets in a later callback
            await asyncio.sleep(0)

    # -- serving ---------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _accept(self) -> None:
        assert self._listener is not None
        try:
            conn, _ = self._listener.accept()
        except OSError:  # BlockingIOError: another wakeup took it; or a reset
            return
        conn.setblocking(False)
        self._accepted.add(conn)
        self._spawn(self._adopt(conn))

    async def _adopt(self, conn: socket.socket) -> None:
        try:
            await asyncio.get_running_loop().connect_accepted_socket(
                lambda: _TCPProtocol(self), sock=conn)
        except OSError:
            conn.close()
        finally:
            self._accepted.discard(conn)

    async def _respond(self, data: bytes, tcp: bool) -> bytes | None:
        """Wire answer to the wire query ``data`` (None: send nothing)."""
        try:
            query = dns.message.from_wire(data)
        except Exception:
            return None  # not a DNS query we can parse: drop it, like many servers
        try:
            response = dns.message.make_response(query)
            if query.opcode() != dns.opcode.QUERY:
                response.set_rcode(dns.rcode.NOTIMP)
            elif len(query.question) != 1:
                response.set_rcode(dns.rcode.FORMERR)
            else:
                question = query.question[0]
                asked = (_label(question.name), dns.rdatatype.to_text(question.rdtype))
                with self._lock:
                    self.queries.append(asked)
                    if tcp:
                        self.tcp_queries.append(asked)
                    wait = self._delay.get(question.name, 0.0)
                if wait:
                    await asyncio.sleep(wait)
                rcode, answer = self._lookup(question.name, question.rdtype)
                response.flags |= dns.flags.AA
                response.set_rcode(rcode)
                response.answer = answer
            if tcp:
                return response.to_wire(max_size=65535)
            limit = max(512, query.payload) if query.edns >= 0 else 512
            return response.to_wire(max_size=limit, prefer_truncation=True)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug here: record it, answer nothing
            self.errors.append(exc)
            return None

    def _lookup(self, qname: dns.name.Name, rdtype: int) -> tuple[int, list[dns.rrset.RRset]]:
        with self._lock:
            if qname in self._servfail:
                return dns.rcode.SERVFAIL, []
            if qname not in self._table:
                return dns.rcode.NXDOMAIN, []
            answer: list[dns.rrset.RRset] = []
            name = qname
            for _ in range(_MAX_CNAME_CHAIN + 1):
                node = self._table.get(name)
                if node is None:
                    break  # dangling CNAME: the CNAME alone
                rrset = node.get(rdtype)
                if rrset is not None:
                    answer.append(rrset)
                    break
                cname = node.get(dns.rdatatype.CNAME)
                if cname is None or rdtype == dns.rdatatype.ANY:
                    break
                answer.append(cname)
                name = cname[0].target  # type: ignore[attr-defined]
            return dns.rcode.NOERROR, answer
