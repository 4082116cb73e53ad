"""A real SMTP server for copiamail's functional tests.

``SMTPTestServer`` runs an aiosmtpd SMTP protocol on its own event loop in a
background thread, bound to a loopback address (127.0.0.0/8 only) on an
ephemeral port by default.  It

* counts open TCP connections exactly, at the protocol level
  (``connection_made`` / ``connection_lost``): overall, per source IP and per
  recipient domain, with current values and peaks;
* records every accepted message (``Message`` records in ``server.messages``);
* injects faults per stage and per recipient via ``Rule`` objects, which can be
  added and removed while the server runs;
* optionally offers STARTTLS (self-signed certificate made with the openssl
  CLI), or advertises STARTTLS and then refuses it with 454;
* optionally offers AUTH PLAIN / LOGIN, allowed without TLS, and records the
  login with each message.
* behaves, if asked, like a throttling receiver with hidden limits (tests/
  receiverlimits.py): connections per client, a sliding message rate, messages
  per connection, a latency per message and a suspension, each answered with a
  real provider's reply text and changeable while it runs; it records every
  throttle reply sent (``throttle_replies``), every connection opened and
  closed (``connection_events``) and every MAIL FROM (``message_starts``).

Usage::

    with SMTPTestServer(auth=("user", "pw")) as srv:
        srv.add_rule(Rule(stage="RCPT", code=451, text="4.3.0 try later",
                          times=2, match="a@x.test"))
        ...  # send to srv.host, srv.port
        srv.wait_for(1, timeout=2)
        assert srv.messages[0].rcpt_tos == ["a@x.test"]
        assert srv.peak == 1

Stages (``Rule.stage``):

``CONNECT``   the greeting banner (alias ``GREETING``)
``EHLO``      EHLO or HELO (alias ``HELO``)
``STARTTLS``, ``AUTH``, ``MAIL``, ``RCPT``, ``RSET``, ``NOOP``, ``QUIT``, ``VRFY``
``DATA``      the DATA command itself (a rule reply replaces the 354)
``EOD``       end of data: after the message text and the final dot
              (alias ``DATA_END``); a rule reply with code < 400 still accepts
              and records the message, code >= 400 rejects it

What a rule matches against (``Rule.match``, exact address, or ``"@domain"``
for a whole domain, case-insensitive; ``None`` matches everything): the sender
at MAIL, the recipient at RCPT, any recipient of the envelope at DATA and EOD.
At other stages only rules without ``match`` apply.  ``Rule.source`` limits a
rule to connections from one source IP.

Which rule wins: rules with ``match`` or ``source`` are consulted before
catch-all rules; within each group the earliest added wins.  A rule that has
fired ``times`` times is spent and no longer matches.

What a rule does, in this order: wait ``delay`` seconds; then ``hang`` (never
reply; the connection stays open until the client closes it, the idle timeout
fires or the server stops), or ``drop`` (close the connection without a reply),
or reply ``code`` ``text`` (``text`` may hold ``\\n`` for a multi-line reply) and,
if ``close`` (default: ``code == 421``), close the connection afterwards.  A rule
with none of ``hang``/``drop``/``code`` only delays, then the command is
processed normally.  A non-220 ``CONNECT`` reply that does not close makes the
server answer every later command except QUIT with 503, as RFC 5321 3.1 asks.
"""

from __future__ import annotations

import asyncio
import atexit
import email.parser
import email.policy
import functools
import ipaddress
import logging
import re
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import (
    SMTP,
    AuthResult,
    Envelope,
    LoginPassword,
    Session,
    TLSSetupException,
)
from receiverlimits import (
    POSTFIX_CONNECTIONS,
    ConnectionEvent,
    MessageStart,
    ReceiverLimits,
    ThrottleReply,
)

log = logging.getLogger("smtpserver")


class _QuietDeprecation(logging.Filter):
    """aiosmtpd 1.4 logs a warning on every successful AUTH about its own use of
    the deprecated Session.login_data; drop that line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "login_data is deprecated" not in record.getMessage()


logging.getLogger("mail.log").addFilter(_QuietDeprecation())

__all__ = [
    "STAGES",
    "ConnectionInfo",
    "Message",
    "Rule",
    "SMTPTestServer",
    "TLSCert",
    "default_cert",
    "fully_qualified",
    "make_self_signed_cert",
]

STAGES = frozenset({
    "CONNECT", "EHLO", "STARTTLS", "AUTH", "MAIL", "RCPT", "DATA", "EOD",
    "RSET", "NOOP", "QUIT", "VRFY", "HELP",
})
_STAGE_ALIASES = {"GREETING": "CONNECT", "BANNER": "CONNECT", "HELO": "EHLO",
                  "DATA_END": "EOD", "DOT": "EOD", "BDAT": "DATA"}


# --------------------------------------------------------------------------
# Certificates


@dataclass(frozen=True)
class TLSCert:
    """A self-signed server certificate; ``cert_path`` doubles as the CA
    bundle a client must trust (aiosmtplib ``cert_bundle=cert.cert_path``)."""

    cert_path: str
    key_path: str

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.cert_path, self.key_path)
        return ctx

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.cert_path)


def make_self_signed_cert(directory: str | Path, cn: str = "localhost",
                          names: Iterable[str] = ("IP:127.0.0.1", "DNS:localhost")) -> TLSCert:
    """Make an EC P-256 self-signed certificate with the openssl CLI into
    ``directory``, valid for ``names`` (subjectAltName entries: by default IP
    127.0.0.1 and DNS localhost; ``("DNS:mx.example.test",)`` for an MX host
    checked by its name alone)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    cert, key = d / "smtp-test-cert.pem", d / "smtp-test-key.pem"
    cmd = [
        "openssl", "req", "-x509", "-newkey", "ec",
        "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", str(key), "-out", str(cert), "-days", "7",
        "-subj", f"/CN={cn}",
        "-addext", f"subjectAltName={','.join(names)}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,digitalSignature,keyCertSign",
        "-addext", "extendedKeyUsage=serverAuth",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"openssl failed ({proc.returncode}): {proc.stderr}")
    return TLSCert(str(cert), str(key))


_default_cert: TLSCert | None = None
_default_cert_lock = threading.Lock()


def default_cert() -> TLSCert:
    """A process-wide certificate in a temp dir removed at exit (used when a
    server is asked for STARTTLS without being given a certificate)."""
    global _default_cert
    with _default_cert_lock:
        if _default_cert is None:
            d = tempfile.mkdtemp(prefix="smtp-test-tls-")
            atexit.register(shutil.rmtree, d, True)
            _default_cert = make_self_signed_cert(d)
        return _default_cert


# --------------------------------------------------------------------------
# Rules and records


@dataclass(eq=False)
class Rule:
    stage: str
    code: int | None = None
    text: str = ""
    match: str | None = None
    times: int | None = None
    delay: float = 0.0
    close: bool | None = None
    drop: bool = False
    hang: bool = False
    source: str | None = None
    fired: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        stage = self.stage.upper()
        self.stage = _STAGE_ALIASES.get(stage, stage)
        if self.stage not in STAGES:
            raise ValueError(f"unknown stage {self.stage!r}; one of {sorted(STAGES)}")
        if sum((self.code is not None, self.drop, self.hang)) > 1:
            raise ValueError("code, drop and hang are mutually exclusive")
        if self.code is not None and not 200 <= self.code <= 599:
            raise ValueError(f"bad reply code {self.code}")
        if self.times is not None and self.times < 0:
            raise ValueError("times must be >= 0")
        if self.match is not None:
            self.match = self.match.strip().lower()

    @property
    def closes(self) -> bool:
        return self.code == 421 if self.close is None else bool(self.close)

    @property
    def spent(self) -> bool:
        return self.times is not None and self.fired >= self.times

    @property
    def specific(self) -> bool:
        return self.match is not None or self.source is not None

    def matches(self, stage: str, addresses: Iterable[str], peer_ip: str) -> bool:
        if self.stage != stage or self.spent:
            return False
        if self.source is not None and self.source != peer_ip:
            return False
        if self.match is None:
            return True
        for a in addresses:
            a = (a or "").lower()
            if self.match.startswith("@"):
                if a.rpartition("@")[2] == self.match[1:]:
                    return True
            elif a == self.match:
                return True
        return False

    def reply_lines(self) -> list[str]:
        assert self.code is not None
        lines = (self.text or _DEFAULT_TEXT.get(self.code, "")).split("\n")
        out = [f"{self.code}-{t}" for t in lines[:-1]]
        out.append(f"{self.code} {lines[-1]}".rstrip())
        return out


_DEFAULT_TEXT = {
    250: "2.0.0 OK",
    421: "4.3.2 Service not available, closing transmission channel",
    450: "4.2.0 Mailbox unavailable",
    451: "4.3.0 Local error in processing",
    452: "4.3.1 Insufficient system storage",
    454: "4.7.0 TLS not available due to temporary reason",
    550: "5.1.1 Mailbox unavailable",
    552: "5.3.4 Message size exceeds fixed maximum message size",
    554: "5.7.1 Transaction failed",
}


@dataclass
class Message:
    """One accepted message."""

    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    peer: str                 # client IP
    peer_port: int            # client (source) port
    conn_serial: int          # ConnectionInfo.serial of the connection it came over
    received_at: float        # time.time()
    login: str | None = None
    tls: bool = False
    mail_options: list[str] = field(default_factory=list)

    @functools.cached_property
    def message_id(self) -> str | None:
        # Parsed when asked for, not as each message arrives: a receiver that
        # parses every header block falls behind a fast client.
        return _message_id(self.data)

    def parsed(self) -> email.message.EmailMessage:
        return email.parser.BytesParser(policy=email.policy.default).parsebytes(self.data)


@dataclass
class ConnectionInfo:
    """One TCP connection as the server saw it (updated live from the server
    thread; read simple fields only)."""

    serial: int
    peer: str
    peer_port: int
    opened_at: float
    closed_at: float | None = None
    tls: bool = False
    login: str | None = None
    rcpt_domains: set[str] = field(default_factory=set)
    commands: list[str] = field(default_factory=list)
    messages: int = 0
    helo: str | None = None  # the name of the last EHLO or HELO
    bytes_received: int = 0   # everything the client sent (after TLS: the plain text)
    # The last command before the client closed or reset the connection
    # without QUIT ("CONNECT" before any), as Postfix logs "lost connection
    # after RCPT"; None while open, after QUIT, and when the server closed it.
    lost_after: str | None = None
    over_limit: bool = False  # beyond max_connections_per_source when it arrived

    @property
    def open(self) -> bool:
        return self.closed_at is None


def _message_id(data: bytes) -> str | None:
    try:
        hdrs = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(data)
        v = hdrs.get("Message-ID")
        return str(v).strip() if v is not None else None
    except Exception:
        return None


_SIZE_PARAM = re.compile(r"\sSIZE=(\d+)", re.IGNORECASE)
_PLAIN_PATH = re.compile(r"(FROM:|TO:)<([A-Za-z0-9._+=-]+@[A-Za-z0-9.-]+|)>(?:\s|$)", re.IGNORECASE)
_HELO_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def fully_qualified(name: str) -> bool:
    """What Postfix's reject_non_fqdn_helo_hostname lets through: an address
    literal (``[192.0.2.1]``, ``[IPv6:...]``) or a name of two or more valid
    labels."""
    if name.startswith("[") and name.endswith("]"):
        inner = name[1:-1]
        try:
            ipaddress.ip_address(inner[5:] if inner[:5].lower() == "ipv6:" else inner)
        except ValueError:
            return False
        return True
    labels = name.rstrip(".").split(".")
    return len(labels) >= 2 and all(_HELO_LABEL.fullmatch(label) for label in labels)


def _check_host(host: str) -> str:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"host must be a literal 127.0.0.0/8 address, not {host!r}") from None
    if ip.version != 4 or ip not in ipaddress.ip_network("127.0.0.0/8"):
        raise ValueError(f"host must be in 127.0.0.0/8, not {host!r}")
    return str(ip)


# --------------------------------------------------------------------------
# The SMTP protocol (one instance per connection, runs in the server thread)


class _Handler:
    def __init__(self, server: SMTPTestServer) -> None:
        self._srv = server

    async def handle_EHLO(self, proto: _TestSMTP, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        srv = self._srv
        out = [r for r in responses if srv._users or not r[4:].upper().startswith("AUTH")]
        if srv.starttls_fails and not proto._tls_protocol:
            out.insert(len(out) - 1, "250-STARTTLS")
        if srv.pipelining:
            out.insert(len(out) - 1, "250-PIPELINING")
        if srv.chunking:
            out.insert(len(out) - 1, "250-CHUNKING")
        return out

    async def handle_exception(self, error: Exception) -> str:
        # A failed STARTTLS handshake (e.g. the client rejects the certificate)
        # is an expected test scenario: aiosmtpd closes the connection and sends
        # nothing.  Anything else is a server bug: keep it in server.errors.
        if not isinstance(error, TLSSetupException):
            log.error("SMTP test server: exception in session", exc_info=error)
            self._srv.errors.append(error)
        return f"500 Error: ({type(error).__name__}) {error}"

    async def handle_DATA(self, proto: _TestSMTP, session: Session,
                          envelope: Envelope) -> str:
        return await proto._end_of_data(envelope)


class _TestSMTP(SMTP):
    def __init__(self, server: SMTPTestServer, handler: _Handler, **kwargs: Any) -> None:
        self._srv = server
        self._conn: ConnectionInfo | None = None
        self._lost = False
        self._greeted = False
        self._greeting_rejected = False
        self._mails = 0  # MAIL FROM commands on this connection
        self._start: MessageStart | None = None  # the current message's start record
        self._rcpt_admitted = False  # a recipient of the current message passed the rate limit
        self._ended_by: str | None = None  # "client" or "server": who ended the connection first
        self._chunks: list[bytes] = []  # BDAT chunks of the current message
        self._chunk: bytes | None = None  # the chunk of the BDAT command being answered
        super().__init__(handler, **kwargs)
        for name, method in list(self._smtp_methods.items()):
            self._smtp_methods[name] = functools.partial(self._dispatch, name, method)

    # -- connection accounting ------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self._conn is None
        if first:
            peer = transport.get_extra_info("peername") or ("?", 0)
            self._conn = self._srv._opened(self, peer[0], peer[1])
        super().connection_made(transport)
        if not first and self._tls_protocol is not None:
            self._conn.tls = True

    def data_received(self, data: bytes) -> None:
        if self._conn is not None:
            self._conn.bytes_received += len(data)
        super().data_received(data)

    def eof_received(self) -> bool | None:
        self._ended_by = self._ended_by or "client"
        return super().eof_received()

    def _timeout_cb(self) -> None:
        self._ended_by = self._ended_by or "server"
        super()._timeout_cb()

    def connection_lost(self, error: Exception | None) -> None:
        if error is not None:
            self._ended_by = self._ended_by or "client"  # reset by the client
        try:
            super().connection_lost(error)
        finally:
            if self._conn is not None and not self._lost:
                self._lost = True
                last = self._conn.commands[-1] if self._conn.commands else "CONNECT"
                if self._ended_by == "client" and last != "QUIT":
                    self._conn.lost_after = last
                self._srv._closed(self, self._conn)

    # -- fault injection ---------------------------------------------------
    async def _hang(self) -> None:
        await self.loop.create_future()  # until cancelled (connection lost / stop)

    def _close(self) -> None:
        self._ended_by = self._ended_by or "server"
        if self.transport is not None:
            self.transport.close()

    async def _raw_push(self, line: str) -> None:
        await SMTP.push(self, line)

    async def _apply(self, stage: str, addresses: Iterable[str]) -> Rule | None:
        """Run the rule for this stage, if any.  Returns the rule if it produced
        a reply the caller must send (code set, no close); None if the command
        should proceed normally.  Replies that close the connection, drops and
        hangs are done here and never return."""
        assert self._conn is not None
        rule = self._srv._pick_rule(stage, list(addresses), self._conn.peer)
        if rule is None:
            return None
        try:
            if rule.delay:
                await asyncio.sleep(rule.delay)
            if rule.hang:
                await self._hang()
            if rule.drop:
                self._close()
                await self._hang()
            if rule.code is None:
                return None
            if rule.closes:
                for line in rule.reply_lines():
                    await self._raw_push(line)
                self._close()
                await self._hang()
            return rule
        except asyncio.CancelledError:
            # The client went away (eof_received cancels the handler task) or the
            # server is stopping: make sure the transport gets closed too.
            self._close()
            raise

    async def _throttle(self, reply: ThrottleReply | None, close: bool = False) -> bool:
        """Send a throttle reply from the receiver's hidden limits, if any
        (closing the connection after a 421 or when ``close``); False if none."""
        if reply is None:
            return False
        try:
            for line in reply.split("\n"):
                await self._raw_push(line)
            if close or reply.code == 421:
                self._close()
                await self._hang()
        except asyncio.CancelledError:
            self._close()
            raise
        return True

    async def _refuse_at_greeting(self) -> bool:
        """Answer a connection beyond the client's limit (or one that comes
        while the receiver suspends at CONNECT) with the throttle reply and
        close it; False if it may go on."""
        assert self._conn is not None
        limits = self._srv.limits
        if not self._conn.over_limit and not (limits.suspend_stage == "CONNECT" and limits.suspended):
            return False
        try:
            if self._conn.over_limit and limits.over_limit_delay:
                await asyncio.sleep(limits.over_limit_delay)
        except asyncio.CancelledError:
            self._close()
            raise
        return await self._throttle(limits.at_connect(self._conn.peer, self._conn.over_limit), close=True)

    async def _hidden_limits(self, command: str) -> bool:
        """The receiver's hidden limits at MAIL and RCPT; True if a throttle reply was sent."""
        assert self._conn is not None
        limits = self._srv.limits
        if command == "MAIL":
            self._mails += 1
            self._rcpt_admitted = False
            reply, self._start = limits.at_mail(self._conn.peer, self._mails)
            return await self._throttle(reply, close=reply is not None and reply.kind == "per_connection")
        if command == "RCPT" and not self._rcpt_admitted and self.envelope is not None and self.envelope.mail_from:
            reply = limits.at_first_rcpt(self._conn.peer, self._start)
            self._rcpt_admitted = reply is None
            return await self._throttle(reply)
        return False

    async def push(self, status: Any) -> None:
        if not self._greeted:
            self._greeted = True
            if await self._refuse_at_greeting():
                return
            rule = await self._apply("CONNECT", ())
            if rule is not None:
                for line in rule.reply_lines():
                    await self._raw_push(line)
                if rule.code != 220:
                    self._greeting_rejected = True
                return
        await self._raw_push(status)

    def _addr(self, keyword: str, arg: str | None) -> str | None:
        if not arg:
            return None
        # A plain <local@domain> is read at once; anything else by aiosmtpd's
        # full address parser (costly: a fast client would wait for it).
        plain = _PLAIN_PATH.match(arg)
        if plain is not None and plain.group(1).upper() == keyword:
            return plain.group(2) or None
        try:
            rest = self._strip_command_keyword(keyword, arg)
            if rest is None:
                return None
            addr, _ = self._getaddr(rest)
            return addr or None
        except Exception:
            return None

    async def _dispatch(self, command: str, method: Callable, arg: str | None) -> None:
        conn = self._conn
        assert conn is not None
        conn.commands.append(command)
        if command == "BDAT":
            # RFC 3030: the chunk is read whole whatever the reply, also a
            # refusal (else its bytes would be taken for commands).
            size = re.fullmatch(r"(\d+)(?: +LAST)?", (arg or "").strip(), re.IGNORECASE)
            if size is None:
                await self._raw_push("501 5.5.4 Syntax: BDAT chunk-size [LAST]")
                self._close()
                return
            self._chunk = await self._reader.readexactly(int(size.group(1)))
        if self._greeting_rejected and command != "QUIT":
            await self._raw_push("503 5.5.1 Error: bad sequence of commands")
            return
        srv = self._srv
        stage = _STAGE_ALIASES.get(command, command)
        addresses: list[str] = []
        if command == "MAIL":
            a = self._addr("FROM:", arg)
            addresses = [a] if a else []
        elif command == "RCPT":
            a = self._addr("TO:", arg)
            if a:
                addresses = [a]
                srv._rcpt_seen(conn, a)
        elif command in ("DATA", "BDAT") and self.envelope is not None:
            addresses = list(self.envelope.rcpt_tos)
        elif command in ("EHLO", "HELO"):
            conn.helo = (arg or "").strip()

        if (command in ("MAIL", "RCPT", "DATA") and srv.auth_required
                and self.session is not None and not self.session.authenticated):
            await self._raw_push("530 5.7.0 Authentication required")
            return
        if await self._hidden_limits(command):
            return

        rule = await self._apply(stage, addresses)
        if rule is not None:
            for line in rule.reply_lines():
                await self._raw_push(line)
            return
        size = _SIZE_PARAM.search(arg or "") if command == "MAIL" else None
        if size is not None and srv.size_limit and int(size.group(1)) > srv.size_limit:
            await self._raw_push("552 5.3.4 Message size exceeds fixed limit")
            return
        if command in ("EHLO", "HELO") and srv.strict_helo and not fully_qualified(conn.helo or ""):
            await self._raw_push(f"504 5.5.2 <{conn.helo}>: Helo command rejected: need fully-qualified hostname")
            return
        if command == "STARTTLS" and srv.starttls_fails:
            await self._raw_push("454 4.7.0 TLS not available due to temporary reason")
            return
        await method(arg)
        if command == "AUTH" and self.session is not None and self.session.authenticated:
            data = self.session.auth_data
            login = getattr(data, "login", None)
            if isinstance(login, bytes):
                login = login.decode("utf-8", "replace")
            conn.login = login

    def _set_rset_state(self) -> None:
        self._chunks = []
        super()._set_rset_state()

    async def smtp_BDAT(self, arg: str | None) -> None:
        """A chunk of the message (RFC 3030; offered where the server was made
        with ``chunking``): the last one ends the message as its final dot
        would."""
        chunk, self._chunk = self._chunk or b"", None
        if self.envelope is None or not self.envelope.rcpt_tos:
            self._chunks = []
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        self._chunks.append(chunk)
        if not (arg or "").upper().rstrip().endswith("LAST"):
            await self.push(f"250 2.0.0 {len(chunk)} octets received")
            return
        content, self._chunks = b"".join(self._chunks), []
        limit = self._srv.size_limit
        if limit and len(content) > limit:
            self._set_post_data_state()
            await self.push("552 5.3.4 Error: Too much mail data")
            return
        self.envelope.content = self.envelope.original_content = content
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()
        await self.push(status)

    async def _end_of_data(self, envelope: Envelope) -> str:
        assert self._conn is not None
        latency = self._srv.limits.latency
        if latency:
            await asyncio.sleep(latency)
        rule = await self._apply("EOD", list(envelope.rcpt_tos))
        status = "250 2.0.0 OK: queued"
        if rule is not None:
            status = "\r\n".join(rule.reply_lines())
            if rule.code is not None and rule.code >= 400:
                return status
        self._srv._record(self, self._conn, envelope)
        return status


# --------------------------------------------------------------------------
# The server


class SMTPTestServer:
    """A threaded aiosmtpd server for tests.  See the module docstring.

    Options:
      host, port        bind address (127.0.0.0/8 only), port 0 = ephemeral
      starttls          offer STARTTLS (needs tls_cert; default_cert() if None)
      tls_cert          TLSCert to use
      require_starttls  refuse MAIL etc. with 530 until STARTTLS was done
      starttls_fails    advertise STARTTLS but answer it with 454
      auth              (user, password) or {user: password}: offer AUTH
                        PLAIN/LOGIN (without TLS unless auth_require_tls)
      auth_required     530 to MAIL/RCPT/DATA until authenticated
      auth_require_tls  only offer AUTH after STARTTLS
      rules             initial Rule objects
      server_hostname   name in banner / EHLO
      idle_timeout      server closes a silent connection after this many s
      size_limit        SIZE advertised and enforced (aiosmtpd default 32 MiB); a
                        MAIL FROM declaring more gets Postfix's 552 5.3.4
                        Message size exceeds fixed limit
      pipelining        advertise PIPELINING (RFC 2920); aiosmtpd reads the
                        commands in order either way
      chunking          advertise CHUNKING and take BDAT (RFC 3030); a rule at
                        DATA answers the BDAT command (its chunk read first)
      strict_helo       as Postfix's reject_non_fqdn_helo_hostname: an EHLO or
                        HELO name that is neither a fully qualified domain name
                        nor an address literal gets
                        504 5.5.2 <NAME>: Helo command rejected: need
                        fully-qualified hostname

    A throttling receiver's hidden limits (tests/receiverlimits.py; all may
    be changed while it runs with ``set_limits(**kw)``):
      max_connections_per_source, over_limit_reply, over_limit_delay
                        connections at once per client IP; the one beyond
                        gets over_limit_reply (default Postfix's) and is closed
      max_message_rate, rate_reply, rate_stage
                        (N, seconds) or "N/s": N messages in any window; the
                        one over gets rate_reply (default Gmail's 450 4.2.1) at
                        rate_stage (RCPT, default, or MAIL)
      max_messages_per_connection, per_connection_reply
                        the (N+1)th MAIL FROM on a connection gets Yahoo's 421
                        Max message per connection reached, and it is closed
      latency           seconds before every end-of-data reply
      suspend_reply, suspend_stage
                        see suspend(seconds): Yahoo's [TSS04] at MAIL or CONNECT
    Records: throttle_replies, connection_events, message_starts; read by
    max_open() and max_messages_in_window().
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        starttls: bool = False,
        tls_cert: TLSCert | None = None,
        require_starttls: bool = False,
        starttls_fails: bool = False,
        auth: Any = None,
        auth_required: bool = False,
        auth_require_tls: bool = False,
        rules: Iterable[Rule] = (),
        server_hostname: str = "mx.smtp-test.invalid",
        idle_timeout: float = 60.0,
        size_limit: int | None = None,
        pipelining: bool = False,
        chunking: bool = False,
        strict_helo: bool = False,
        max_connections_per_source: int | None = None,
        over_limit_reply: str = POSTFIX_CONNECTIONS,
        over_limit_delay: float = 0.0,
        **limits: Any,
    ) -> None:
        self.host = _check_host(host)
        self.port = int(port)
        if starttls_fails and starttls:
            raise ValueError("starttls and starttls_fails are exclusive")
        if require_starttls and not starttls:
            raise ValueError("require_starttls needs starttls=True")
        self.starttls = starttls
        self.starttls_fails = starttls_fails
        self.tls_cert = (tls_cert or default_cert()) if starttls else tls_cert
        self.require_starttls = require_starttls
        if auth is None:
            users: dict[str, str] = {}
        elif isinstance(auth, dict):
            users = {str(k): str(v) for k, v in auth.items()}
        else:
            u, p = auth
            users = {str(u): str(p)}
        self._users = users
        if auth_required and not users:
            raise ValueError("auth_required needs auth=")
        self.auth_required = auth_required
        self.auth_require_tls = auth_require_tls
        self.server_hostname = server_hostname
        self.idle_timeout = idle_timeout
        self.size_limit = size_limit
        self.pipelining = pipelining
        self.chunking = chunking
        self.strict_helo = strict_helo
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        # The receiver's hidden limits (tests/receiverlimits.py): a connection
        # beyond max_connections_per_source gets over_limit_reply as its
        # greeting (after over_limit_delay) and is closed, as Postfix's
        # smtpd_client_connection_count_limit does; rates, per-connection
        # caps, latency and suspension as the other options say.
        self.limits = ReceiverLimits(
            server_hostname, self._cond, max_connections_per_source=max_connections_per_source,
            over_limit_reply=over_limit_reply, over_limit_delay=over_limit_delay, **limits)
        self._rules: list[Rule] = []
        self.errors: list[BaseException] = []  # unexpected exceptions in sessions
        self._messages: list[Message] = []
        self._connections: list[ConnectionInfo] = []
        self._protocols: set[_TestSMTP] = set()
        self._serial = 0
        self._current = 0
        self._peak = 0
        self._total = 0
        self._cur_src: Counter[str] = Counter()
        self._peak_src: Counter[str] = Counter()
        self._cur_dom: Counter[str] = Counter()
        self._peak_dom: Counter[str] = Counter()

        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._aserver: asyncio.AbstractServer | None = None
        self._stopped = threading.Event()
        for r in rules:
            self.add_rule(r)

    # -- lifecycle ---------------------------------------------------------
    @property
    def cert_path(self) -> str | None:
        return self.tls_cert.cert_path if self.tls_cert else None

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def running(self) -> bool:
        return self._thread is not None

    def __enter__(self) -> SMTPTestServer:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<SMTPTestServer {self.host}:{self.port} current={self.current} peak={self.peak}>"

    def _smtp_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = dict(
            hostname=self.server_hostname,
            ident="copiamail-test-smtpd",
            timeout=self.idle_timeout,
            enable_SMTPUTF8=True,
            auth_require_tls=self.auth_require_tls,
        )
        if self.size_limit is not None:
            kw["data_size_limit"] = self.size_limit
        if self.starttls:
            kw["tls_context"] = self.tls_cert.server_context()
            kw["require_starttls"] = self.require_starttls
        if self._users:
            kw["authenticator"] = self._authenticate
        else:
            kw["auth_exclude_mechanism"] = ["PLAIN", "LOGIN"]
        return kw

    def start(self) -> SMTPTestServer:
        if self._thread is not None:
            raise RuntimeError("server already running")
        kwargs = self._smtp_kwargs()
        handler = _Handler(self)
        # IPPROTO_TCP named: asyncio turns Nagle off (TCP_NODELAY) only on
        # sockets whose proto says TCP, and accepted sockets inherit it. With
        # proto 0, pipelined replies after the first wait for the client's
        # delayed ACK (about 40 ms), as no real receiver makes them wait.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
            sock.listen(256)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        failure: list[BaseException] = []

        def factory() -> _TestSMTP:
            return _TestSMTP(self, handler, loop=loop, **kwargs)

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                try:
                    self._aserver = loop.run_until_complete(
                        loop.create_server(factory, sock=sock))
                except BaseException as e:  # pragma: no cover
                    sock.close()
                    failure.append(e)
                    ready.set()
                    return
                ready.set()
                loop.run_forever()
                loop.run_until_complete(self._shutdown())
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                asyncio.set_event_loop(None)
                loop.close()
                self._stopped.set()

        self._loop = loop
        self._stopped.clear()
        self._thread = threading.Thread(
            target=run, name=f"smtp-test-server-{self.host}:{self.port}", daemon=True)
        self._thread.start()
        if not ready.wait(10) or failure:
            self._thread.join(5)
            self._thread = None
            raise RuntimeError(f"SMTP test server failed to start: {failure!r}")
        return self

    async def _shutdown(self) -> None:
        assert self._aserver is not None
        self._aserver.close()
        for proto in list(self._protocols):
            proto._ended_by = proto._ended_by or "server"
            t = proto._original_transport or proto.transport
            if t is not None:
                t.abort()
        for _ in range(3):
            await asyncio.sleep(0)
        me = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not me]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        try:
            await asyncio.wait_for(self._aserver.wait_closed(), 5)
        except TimeoutError:  # pragma: no cover
            pass
        for _ in range(3):
            await asyncio.sleep(0)
        self._aserver = None

    def stop(self) -> None:
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        try:
            loop.call_soon_threadsafe(loop.stop)
        except RuntimeError:  # loop already closed
            pass
        thread.join(15)
        if thread.is_alive():  # pragma: no cover
            raise RuntimeError("SMTP test server thread did not stop")
        self._thread = None
        self._loop = None

    # -- rules -------------------------------------------------------------
    def add_rule(self, rule: Rule) -> Rule:
        with self._lock:
            self._rules.append(rule)
        return rule

    def remove_rule(self, rule: Rule) -> None:
        with self._lock:
            self._rules = [r for r in self._rules if r is not rule]

    def clear_rules(self) -> None:
        with self._lock:
            self._rules = []

    @property
    def rules(self) -> list[Rule]:
        with self._lock:
            return list(self._rules)

    def _pick_rule(self, stage: str, addresses: list[str], peer_ip: str) -> Rule | None:
        with self._lock:
            for specific in (True, False):
                for r in self._rules:
                    if r.specific == specific and r.matches(stage, addresses, peer_ip):
                        r.fired += 1
                        return r
        return None

    # -- auth ----------------------------------------------------------------
    def _authenticate(self, proto: SMTP, session: Session, envelope: Envelope,
                      mechanism: str, auth_data: Any) -> AuthResult:
        if isinstance(auth_data, LoginPassword):
            login = auth_data.login.decode("utf-8", "replace")
            password = auth_data.password.decode("utf-8", "replace")
            if login in self._users and self._users[login] == password:
                return AuthResult(success=True, auth_data=auth_data)
        return AuthResult(success=False, handled=False)

    # -- accounting (called in the server thread) ----------------------------
    def _opened(self, proto: _TestSMTP, ip: str, port: int) -> ConnectionInfo:
        with self._cond:
            self._serial += 1
            info = ConnectionInfo(self._serial, ip, port, time.time())
            self._connections.append(info)
            self._protocols.add(proto)
            self._total += 1
            self._current += 1
            self._peak = max(self._peak, self._current)
            self._cur_src[ip] += 1
            self._peak_src[ip] = max(self._peak_src[ip], self._cur_src[ip])
            # Judged as it arrives, as a receiver counts: the connections
            # open from this client at that instant, itself included.
            info.over_limit = self.limits.opened(ip)
            self._cond.notify_all()
            return info

    def _closed(self, proto: _TestSMTP, info: ConnectionInfo) -> None:
        with self._cond:
            info.closed_at = time.time()
            self._protocols.discard(proto)
            self._current -= 1
            self.limits.closed(info.peer)
            self._cur_src[info.peer] -= 1
            if self._cur_src[info.peer] <= 0:
                del self._cur_src[info.peer]
            for d in info.rcpt_domains:
                self._cur_dom[d] -= 1
                if self._cur_dom[d] <= 0:
                    del self._cur_dom[d]
            self._cond.notify_all()

    def _rcpt_seen(self, info: ConnectionInfo, address: str) -> None:
        domain = address.rpartition("@")[2].lower()
        with self._cond:
            if domain in info.rcpt_domains:
                return
            info.rcpt_domains.add(domain)
            self._cur_dom[domain] += 1
            self._peak_dom[domain] = max(self._peak_dom[domain], self._cur_dom[domain])
            self._cond.notify_all()

    def _record(self, proto: _TestSMTP, info: ConnectionInfo, env: Envelope) -> None:
        data = env.original_content or b""
        if isinstance(data, str):  # pragma: no cover
            data = data.encode("utf-8", "surrogateescape")
        msg = Message(
            mail_from=env.mail_from or "",
            rcpt_tos=list(env.rcpt_tos),
            data=bytes(data),
            peer=info.peer,
            peer_port=info.peer_port,
            conn_serial=info.serial,
            received_at=time.time(),
            login=info.login,
            tls=info.tls,
            mail_options=list(env.mail_options),
        )
        with self._cond:
            info.messages += 1
            self._messages.append(msg)
            self._cond.notify_all()

    # -- the hidden limits (any thread) ----------------------------------------
    def set_limits(self, **settings: Any) -> None:
        """Change hidden limits while the server runs (see ReceiverLimits)."""
        self.limits.set(**settings)

    def suspend(self, seconds: float, reply: str | None = None, stage: str | None = None) -> None:
        self.limits.suspend(seconds, reply, stage)

    def resume(self) -> None:
        self.limits.resume()

    @property
    def max_connections_per_source(self) -> int | None:
        return self.limits.max_connections_per_source

    @max_connections_per_source.setter
    def max_connections_per_source(self, value: int | None) -> None:
        self.limits.set(max_connections_per_source=value)

    @property
    def over_limit_reply(self) -> str:
        return self.limits.over_limit_reply

    @over_limit_reply.setter
    def over_limit_reply(self, value: str) -> None:
        self.limits.set(over_limit_reply=value)

    @property
    def over_limit_delay(self) -> float:
        return self.limits.over_limit_delay

    @over_limit_delay.setter
    def over_limit_delay(self, value: float) -> None:
        self.limits.set(over_limit_delay=value)

    @property
    def throttle_replies(self) -> list[ThrottleReply]:
        """Every throttle reply sent (str subclasses with at, kind, source, stage, open)."""
        return self.limits.throttle_replies

    def clear_throttle_replies(self) -> None:
        self.limits.clear_throttle_replies()

    @property
    def connection_events(self) -> list[ConnectionEvent]:
        return self.limits.connection_events

    @property
    def message_starts(self) -> list[MessageStart]:
        return self.limits.message_starts

    def max_open(self, since: float | None = None, until: float | None = None, source: str | None = None) -> int:
        return self.limits.max_open(since, until, source)

    def max_messages_in_window(self, seconds: float, since: float | None = None, until: float | None = None,
                               source: str | None = None, admitted_only: bool = False) -> int:
        return self.limits.max_messages_in_window(seconds, since, until, source, admitted_only)

    # -- reads (any thread) --------------------------------------------------
    @property
    def current(self) -> int:
        with self._lock:
            return self._current

    @property
    def peak(self) -> int:
        with self._lock:
            return self._peak

    @property
    def connections_total(self) -> int:
        with self._lock:
            return self._total

    @property
    def current_by_source(self) -> Counter[str]:
        with self._lock:
            return Counter(self._cur_src)

    @property
    def peak_by_source(self) -> Counter[str]:
        with self._lock:
            return Counter(self._peak_src)

    @property
    def current_by_domain(self) -> Counter[str]:
        with self._lock:
            return Counter(self._cur_dom)

    @property
    def peak_by_domain(self) -> Counter[str]:
        with self._lock:
            return Counter(self._peak_dom)

    @property
    def messages(self) -> list[Message]:
        with self._lock:
            return list(self._messages)

    @property
    def connections(self) -> list[ConnectionInfo]:
        with self._lock:
            return list(self._connections)

    def reset_counters(self) -> None:
        """Peaks drop to the current values; connections_total and the
        connections list restart (serial numbers keep counting)."""
        with self._cond:
            self._peak = self._current
            self._peak_src = Counter(self._cur_src)
            self._peak_dom = Counter(self._cur_dom)
            self._total = 0
            self._connections = [c for c in self._connections if c.open]

    def clear_messages(self) -> None:
        with self._cond:
            self._messages = []

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 5.0,
                   what: str = "condition") -> None:
        """Wait until predicate() (called under the server lock, re-checked on
        every server event) is true; TimeoutError after timeout seconds."""
        with self._cond:
            if not self._cond.wait_for(predicate, timeout):
                raise TimeoutError(f"SMTP test server: timed out after {timeout}s "
                                   f"waiting for {what} ({self!r}, "
                                   f"{len(self._messages)} messages)")

    def wait_for(self, n: int, timeout: float = 5.0) -> list[Message]:
        """Wait until at least n messages have been received; return them."""
        self.wait_until(lambda: len(self._messages) >= n, timeout, f"{n} messages")
        return self.messages

    def wait_idle(self, timeout: float = 5.0) -> None:
        """Wait until no connection is open."""
        self.wait_until(lambda: self._current == 0, timeout, "no open connections")

    def wait_connections(self, n: int, timeout: float = 5.0) -> None:
        """Wait until at least n connections are open at once."""
        self.wait_until(lambda: self._current >= n, timeout, f"{n} open connections")
