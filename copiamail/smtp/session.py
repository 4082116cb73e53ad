"""SMTP sessions, and the classification of what a server says.

A :class:`SmtpSession` is one connection to one host, used by one task at a time
(never shared). It opens lazily on the first :meth:`SmtpSession.send` and
carries one message after another. A refusal (a 4xx or 5xx reply to MAIL,
RCPT, DATA or the message) leaves the dialogue in a known state: the
connection stays, reset with RSET before the next message, and ends with
QUIT (RFC 5321). Any other error (a timeout, a lost connection, a 421, a reply
that cannot be trusted) drops it at once, never to be reused, since its state
is not known; the next send reopens lazily. Every failure comes out as a
:class:`~copiamail.errors.DeliveryError` with the reply code (or the engine's
outcome code), the CopiaFacts class, the text for ``EMAIL_ERROR``, and whether
it is final (a 5xx at MAIL, RCPT or DATA).

aiosmtplib opens the connection: connect, greeting, EHLO (HELO), STARTTLS and
AUTH. The transactions (MAIL, RCPT, DATA, the message) and QUIT then run on the
same transport through :class:`_Link`, which reads replies in order, so that
MAIL, RCPT and DATA go out in one write where the server offers PIPELINING
(RFC 2920). aiosmtplib awaits one reply per command and drops any reply that
arrives early, so it cannot pipeline; per message, its three round trips and
its layers cost the node more CPU than the rest of the send. The replies are
read and classified exactly as aiosmtplib would (same texts for timeouts and
lost connections).
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import ssl
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import aiosmtplib

from copiamail.config import is_fqdn, is_ip
from copiamail.errors import ConfigError, DeliveryError
from copiamail.jobfile import outcome

MAIL, RCPT, DATA, CONNECT = "MAIL", "RCPT", "DATA", "CONNECT"

_ENHANCED = re.compile(r"^\s*([245])\.(\d{1,3})\.(\d{1,3})\b")
_STAGE_CLASS = {MAIL: outcome.HOST_REJECTED, RCPT: outcome.MAILBOX, DATA: outcome.SMTP_OTHER, CONNECT: outcome.HOST_REJECTED}


@dataclass(frozen=True)
class Delivered:
    reply: str
    ip: str
    bytecount: int


@dataclass(frozen=True)
class SessionSettings:
    """How to reach and greet one host."""

    host: str
    port: int
    source_address: str | None = None
    starttls: str = "auto"  # auto | always | never
    tls_context: ssl.SSLContext | None = None
    username: str | None = None
    password: str | None = None
    timeout: float = 60.0
    helo_name: str | None = None  # None: the address literal of the connection's local address
    server_name: str | None = None  # the name its certificate must carry (None: host)
    relay: bool = False  # the host is the configured relay (error texts name its keys)


def make_tls_context(verify: bool, ca_file: Path | None) -> ssl.SSLContext:
    """The TLS context for STARTTLS: certificates verified against ``ca_file``
    (or the system store) unless ``verify`` is off. Built once per node, so a
    bad CA file stops the node at start instead of failing every job."""
    if not verify:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    try:
        return ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    except (OSError, ssl.SSLError) as e:
        why = getattr(e, "strerror", None) or e
        raise ConfigError(f"key 'relay.ca_file': cannot load CA certificates: {why}", ca_file) from None


def resolve_relay(host: str, port: int) -> tuple[str, ...]:
    """The relay's IP addresses (so that host stanzas naming an IP apply to it).
    Resolved once at start; a name that does not resolve now fails at connect."""
    if is_ip(host):
        return (host,)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return ()
    return tuple(dict.fromkeys(str(i[4][0]) for i in infos))


def machine_helo_name() -> str | None:
    """The machine's fully qualified domain name, for EHLO where ``helo_name``
    is not set; None when it has none (a bare host name, ``localhost``).
    Then each connection greets with the address literal of its own local
    address (:func:`address_literal`): RFC 5321 4.1.3 asks for the address
    the connection comes from, which is what the server sees. Asks the
    resolver, and may block: called once at node start, never per connection."""
    name = socket.getfqdn()
    return name if is_fqdn(name) else None


def address_literal(ip: str) -> str:
    """``[192.0.2.1]`` or ``[IPv6:2001:db8::1]`` (RFC 5321 4.1.3)."""
    return f"[IPv6:{ip}]" if ":" in ip else f"[{ip}]"


def reply_text(code: int, message: str) -> str:
    """``550 5.1.1 <x@y>: User unknown``: one line, as written into EMAIL_ERROR."""
    return " ".join(f"{code} {message}".split())


def classify(code: int, message: str, stage: str) -> DeliveryError:
    """A server's refusal at ``stage`` as a DeliveryError with its CopiaFacts class."""
    m = _ENHANCED.match(message)
    if code == 421:
        klass = outcome.HOST_REJECTED
    elif m is not None:
        # RFC 3463: X.1.* addressing and X.2.* mailbox status are mailbox
        # errors, X.7.* security or policy means the host refused us.
        klass = {"1": outcome.MAILBOX, "2": outcome.MAILBOX, "7": outcome.HOST_REJECTED}.get(m.group(2), outcome.SMTP_OTHER)
    elif stage == RCPT:
        klass = outcome.MAILBOX if code in (450, 550, 551, 552, 553) else outcome.SMTP_OTHER
    else:
        klass = _STAGE_CLASS.get(stage, outcome.SMTP_OTHER)
    permanent = 500 <= code < 600 and stage in (MAIL, RCPT, DATA)
    return DeliveryError(code, klass, reply_text(code, message), permanent, stage)


class _Lost(Exception):
    """The connection ended while a reply was awaited (the text says how)."""


class _Timeout(Exception):
    """No complete reply within the timeout."""


class _Refused(Exception):
    def __init__(self, code: int, message: str) -> None:
        self.code, self.message = code, message


# As aiosmtplib's SMTPProtocol reads replies (tests/test_session_internals.py
# holds each to it): the longest line and reply it takes, the code of a reply
# it cannot read, and its words for what went wrong, so that EMAIL_ERROR reads
# the same whichever of the two read the reply.
_MAX_LINE = 8192
_MAX_REPLY = _MAX_LINE * 4
_UNREADABLE = -1
_TOO_LONG = "Response too long"
_MALFORMED = "Malformed SMTP response line: "
_CONNECTION_LOST = "Connection lost"
_UNEXPECTED_EOF = "Unexpected EOF received"
_NO_REPLY = "Timed out waiting for server response"
_LINE_ENDS = re.compile(rb"\r\n|\n|\r(?!\n)")
_LEADING_DOT = re.compile(rb"(?m)^\.")


def data_block(message: bytes) -> bytes:
    """The message as sent after DATA: CRLF line ends, ending in CRLF, each
    leading dot doubled, then the final ``.`` line (RFC 5321 4.5.2)."""
    rest = message.replace(b"\r\n", b"")
    if b"\r" in rest or b"\n" in rest:  # a lone CR or LF: every line end made CRLF
        message = _LINE_ENDS.sub(b"\r\n", message)
    if not message.endswith(b"\r\n"):
        message += b"\r\n"
    if message.startswith(b".") or b"\n." in message:
        message = _LEADING_DOT.sub(b"..", message)
    return message + b".\r\n"


class _Link(asyncio.Protocol):
    """A connection after its greeting (taken over from aiosmtplib): writes
    commands and hands out the server's replies in order. A reply that
    arrives when none is awaited is dropped (as aiosmtplib does), so a stray
    line can never be taken for the answer to a later command."""

    def __init__(self, transport: asyncio.Transport, pipelining: bool, size: int | None) -> None:
        self.encrypted = False  # STARTTLS made it TLS
        self.pipelining = pipelining
        self.size = size  # SIZE as offered (RFC 1870): None not offered, 0 no fixed limit
        self._transport = transport
        self._buffer = bytearray()
        self._replies: deque[tuple[int, str]] = deque()
        self._expected = 0  # replies owed for commands written, not yet parsed
        self._ended: str | None = None
        self._bad: _Refused | None = None
        self._waiter: asyncio.Future[None] | None = None
        transport.set_protocol(self)

    @property
    def usable(self) -> bool:
        return self._ended is None and self._bad is None and not self._transport.is_closing()

    @property
    def owed(self) -> int:
        """Replies still to be read for commands written."""
        return len(self._replies) + self._expected

    @property
    def unsent(self) -> bool:
        """Whether written bytes still wait in the buffer (a message upload
        the server answered before it was all sent)."""
        return self._transport.get_write_buffer_size() > 0

    def peer_ip(self) -> str | None:
        info = self._transport.get_extra_info("peername")
        return str(info[0]) if info else None

    def write(self, data: bytes, replies: int) -> None:
        """Send ``data`` (``replies`` commands)."""
        if self._ended is not None or self._transport.is_closing():
            raise _Lost(_CONNECTION_LOST)
        self._expected += replies
        self._transport.write(data)

    async def reply(self, timeout: float | None) -> tuple[int, str]:
        """The next reply, as (code, text with lines joined by LF), within
        ``timeout`` seconds for the whole reply (a server that trickles a
        reply byte by byte does not get a new timeout for each byte)."""
        if self._replies:
            return self._replies.popleft()
        loop = asyncio.get_running_loop()
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            self._wake()

        timer = loop.call_later(timeout, expire) if timeout else None
        try:
            while not self._replies:
                if self._bad is not None:
                    raise self._bad
                if self._ended is not None:
                    raise _Lost(self._ended)
                if expired:
                    raise _Timeout()
                self._waiter = loop.create_future()
                await self._waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()
        return self._replies.popleft()

    def close(self) -> None:
        """Close after QUIT: what is still buffered is sent first."""
        self._ended = self._ended or _CONNECTION_LOST
        self._transport.close()

    def abort(self) -> None:
        """Drop the connection at once, discarding anything not yet sent: after
        an error or a timeout, the rest of a message still being uploaded must
        not reach the server (it could accept a message recorded as failed)."""
        self._ended = self._ended or _CONNECTION_LOST
        self._transport.abort()

    # asyncio.Protocol

    def data_received(self, data: bytes) -> None:
        if self._expected <= 0:
            return
        self._buffer += data
        if len(self._buffer) > _MAX_REPLY:
            self._fail(_UNREADABLE, _TOO_LONG)
            return
        start = 0
        while self._expected > 0:
            parsed = self._parse(start)
            if parsed is None:
                break
            start, reply = parsed
            self._replies.append(reply)
            self._expected -= 1
        del self._buffer[:start]
        if self._expected <= 0:
            self._buffer.clear()
        self._wake()

    def _parse(self, start: int) -> tuple[int, tuple[int, str]] | None:
        """One complete reply from ``start`` in the buffer: (where it ends,
        the reply); None if it is not all here yet."""
        lines: list[bytes] = []
        offset = start
        while True:
            end = self._buffer.find(b"\n", offset)
            if end == -1:
                return None
            line = bytes(self._buffer[offset:end + 1])
            if len(line) > _MAX_LINE:
                self._fail(_UNREADABLE, _TOO_LONG)
                return None
            try:
                code = int(line[:3])
            except ValueError:
                self._fail(_UNREADABLE, _MALFORMED + line.decode("utf-8", errors="ignore"))
                return None
            offset = end + 1
            lines.append(line[4:].strip(b" \t\r\n"))
            if line[3:4] != b"-":
                return offset, (code, b"\n".join(lines).decode("utf-8", "surrogateescape"))

    def _fail(self, code: int, message: str) -> None:
        self._bad = _Refused(code, message)
        self._expected = 0
        self._buffer.clear()
        self._wake()

    def eof_received(self) -> bool:
        self._ended = self._ended or _UNEXPECTED_EOF
        self._wake()
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._ended = self._ended or _CONNECTION_LOST
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


_SSL_SOURCE = re.compile(r"^\[[A-Z0-9_: ]+\]\s*|\s*\(_ssl\.c:\d+\)$")


def _without_ssl_source(text: str) -> str:
    """An OpenSSL message as a sentence: ``[SSL: WRONG_VERSION_NUMBER] wrong
    version number (_ssl.c:1006)`` is ``wrong version number``."""
    return _SSL_SOURCE.sub("", text).rstrip(".") or text


def _untrusted(s: SessionSettings, e: ssl.SSLCertVerificationError) -> str:
    """EMAIL_ERROR for a certificate that did not verify: whose, why, and
    which settings decide, in one line."""
    name = s.server_name or s.host
    whose = f"{name} ({s.host})" if name != s.host else name
    why = _without_ssl_source(str(e.verify_message or e.strerror or e))
    if s.relay:
        advice = "set relay.ca_file or --relay-ca FILE, or relay.tls_verify: false or --relay-no-verify"
    else:
        advice = "mx_tls_verify: true checks MX certificates against the system's CAs"
    return f"TLS: certificate of {whose} not trusted: {why} ({advice})"


def _why_not_connected(e: aiosmtplib.SMTPConnectError) -> str:
    """Why a connection could not be made, once (``connection refused``):
    aiosmtplib's message repeats the address, and asyncio's OSError text
    (``Connect call failed ('127.0.0.1', 25)``) a third time."""
    cause = e.__cause__
    if isinstance(cause, socket.gaierror):
        reason = str(cause.strerror or cause)
    elif isinstance(cause, OSError) and cause.errno:
        reason = os.strerror(cause.errno)
    else:
        reason = str(cause or e.message)
    return reason[:1].lower() + reason[1:]


def _engine(code: outcome.OutcomeCode, detail: str, stage: str = CONNECT) -> DeliveryError:
    return DeliveryError(code.code, code.klass, detail, False, stage)


async def _greet(smtp: aiosmtplib.SMTP) -> None:
    """EHLO, or HELO where the server refuses EHLO (RFC 5321 4.1.1.1)."""
    try:
        await smtp.ehlo()
    except aiosmtplib.SMTPHeloError:
        if not smtp.is_connected:
            raise
        await smtp.helo()


def _offered_size(smtp: aiosmtplib.SMTP) -> int | None:
    """The SIZE extension as the server's EHLO offers it (RFC 1870 4): None
    when not offered, else its limit in bytes, 0 for none (no number, or 0)."""
    if not smtp.supports_extension("size"):
        return None
    value = smtp.esmtp_extensions.get("size", "").strip()
    return int(value) if value.isascii() and value.isdigit() else 0


async def _quit(smtp: aiosmtplib.SMTP, refused: int, timeout: float) -> None:
    """QUIT and close after the server refused ``refused`` while the session
    was being opened (RFC 5321 4.1.1.10); only close after a 421, with which
    the server closes. Never raises."""
    try:
        if refused != 421 and smtp.is_connected:
            await smtp.quit(timeout=min(5.0, timeout))
    except (aiosmtplib.SMTPException, OSError):
        pass
    finally:
        smtp.close()


class SmtpSession:
    """One SMTP connection (opened lazily), used by one task at a time."""

    def __init__(self, settings: SessionSettings) -> None:
        self.settings = settings
        self._link: _Link | None = None
        self._reset_due = False  # a transaction was refused: RSET before the next one
        self.messages = 0
        self.peer_ip = ""

    async def _open(self) -> _Link:
        s = self.settings
        smtp = aiosmtplib.SMTP(
            hostname=s.host, port=s.port, timeout=s.timeout, start_tls=False,
            tls_context=s.tls_context if s.starttls != "never" else None,
            source_address=(s.source_address, 0) if s.source_address else None,
            # Without a name, set below from the connection; any value here
            # keeps aiosmtplib from asking DNS for the machine's name each time.
            local_hostname=s.helo_name or "[127.0.0.1]",
        )
        where = f"{s.host}:{s.port}"
        try:
            await smtp.connect()
            if s.helo_name is None:
                smtp.local_hostname = address_literal(str(smtp.get_transport_info("sockname")[0]))
            # Greet now, not inside MAIL: a refusal of EHLO/HELO is the host's
            # (class H, retried), never a final 5xx at MAIL.
            await _greet(smtp)
            if s.starttls == "always" or (s.starttls == "auto" and smtp.supports_extension("starttls")):
                await smtp.starttls(server_hostname=s.server_name or s.host)
                await _greet(smtp)  # RFC 3207 4.2: the server forgets the first EHLO
        except aiosmtplib.SMTPConnectTimeoutError as e:
            raise _engine(outcome.TIMED_OUT, f"timeout connecting to {where}: {e.message}") from None
        except aiosmtplib.SMTPConnectResponseError as e:
            raise classify(e.code, e.message, CONNECT) from None
        except aiosmtplib.SMTPConnectError as e:
            if "EOF" in e.message:
                # Accepted, then closed before the greeting: dropped, not refused.
                raise _engine(outcome.CONNECTION_LOST, f"{where} closed the connection before its greeting") from None
            raise _engine(outcome.CONNECT_FAILED, f"cannot connect to {where}: {_why_not_connected(e)}") from None
        except aiosmtplib.SMTPTimeoutError as e:
            smtp.close()
            raise _engine(outcome.TIMED_OUT, f"timeout greeting {where}: {e.message}") from None
        except aiosmtplib.SMTPServerDisconnected as e:
            smtp.close()
            raise _engine(outcome.CONNECTION_LOST, f"{where} closed the connection: {e.message}") from None
        except aiosmtplib.SMTPResponseException as e:
            await _quit(smtp, e.code, s.timeout)
            if "STARTTLS" in e.message.upper() or e.code == 454:
                raise _engine(outcome.TLS_FAILED, f"STARTTLS failed at {where}: {reply_text(e.code, e.message)}") from None
            raise classify(e.code, e.message, CONNECT) from None
        except ssl.SSLCertVerificationError as e:
            smtp.close()
            raise _engine(outcome.TLS_FAILED, _untrusted(s, e)) from None
        except (ssl.SSLError, aiosmtplib.SMTPException) as e:
            smtp.close()
            detail = getattr(e, "message", None) or str(e)
            raise _engine(outcome.TLS_FAILED, f"TLS with {where} failed: {_without_ssl_source(detail)}") from None
        except OSError as e:
            smtp.close()
            raise _engine(outcome.CONNECT_FAILED, f"cannot connect to {where}: {e.strerror or e}") from None
        if s.username is not None:
            try:
                await smtp.login(s.username, s.password or "")
            except aiosmtplib.SMTPResponseException as e:
                await _quit(smtp, e.code, s.timeout)
                raise DeliveryError(e.code, outcome.HOST_REJECTED, reply_text(e.code, e.message), False, CONNECT) from None
            except aiosmtplib.SMTPException as e:
                smtp.close()
                raise _engine(outcome.CONNECTION_LOST, f"AUTH with {where} failed: {e}") from None
        # aiosmtplib types its transport as a BaseTransport; it is the stream
        # transport it writes every command to (its own code casts it so too).
        transport = cast(asyncio.Transport | None, smtp.protocol.transport if smtp.protocol is not None else None)
        if transport is None or transport.is_closing():
            # Closed right after the greeting: what aiosmtplib said when MAIL
            # then found the connection gone.
            smtp.close()
            raise _engine(outcome.CONNECTION_LOST, f"connection dropped at MAIL: {_CONNECTION_LOST}", MAIL)
        link = _Link(transport, smtp.supports_extension("pipelining"), _offered_size(smtp))
        link.encrypted = transport.get_extra_info("sslcontext") is not None
        self.peer_ip = link.peer_ip() or s.host
        self.messages = 0
        return link

    async def send(self, sender: str, recipient: str, data: bytes, require_tls: bool = False) -> Delivered:
        """Deliver one message; raises DeliveryError on any failure (the
        connection stays after a refusal, see :meth:`_after_refusal`, and is
        dropped after anything else). Both addresses were checked when the
        job was read (ASCII, no control characters). With ``require_tls``
        ($email_options reqTLS) nothing is sent over a connection without TLS:
        the job fails (outcome 160) before MAIL FROM."""
        link = await self._ready()
        if require_tls and not link.encrypted:
            s = self.settings
            raise DeliveryError(outcome.TLS_REQUIRED.code, outcome.TLS_REQUIRED.klass,
                                f"{s.host}:{s.port} offers no TLS and the job requires it (reqTLS); not sent", True, MAIL)
        timeout = self.settings.timeout
        block = data_block(data)
        mail = b"MAIL FROM:<" + sender.encode("ascii") + b">"
        if link.size is not None:
            # RFC 1870: the size as sent (dot-stuffing counted, so never less
            # than the server counts); a message over the server's limit is
            # refused here, before a byte of it is uploaded.
            size = len(block) - 3
            if link.size and size > link.size:
                s = self.settings
                raise classify(552, f"5.3.4 Message size {size} exceeds the fixed limit {link.size} that "
                                    f"{s.host}:{s.port} advertises (SIZE); not sent", MAIL)
            mail += b" SIZE=%d" % size
        mail += b"\r\n"
        stage = MAIL
        try:
            rcpt = b"RCPT TO:<" + recipient.encode("ascii") + b">\r\n"
            if link.pipelining:
                link.write(mail + rcpt + b"DATA\r\n", 3)
            else:
                link.write(mail, 1)
            code, text = await link.reply(timeout)
            if code != 250:
                raise _Refused(code, text)
            stage = RCPT
            if not link.pipelining:
                link.write(rcpt, 1)
            code, text = await link.reply(timeout)
            if code not in (250, 251):
                raise _Refused(code, text)
            stage = DATA
            if not link.pipelining:
                link.write(b"DATA\r\n", 1)
            code, text = await link.reply(timeout)
            if code != 354:
                raise _Refused(code, text)
            link.write(block, 1)
            code, text = await link.reply(timeout)
            if code != 250:
                raise _Refused(code, text)
        except _Timeout:
            self.abort()
            raise _engine(outcome.TIMED_OUT, f"timeout at {stage}: {_NO_REPLY}", stage) from None
        except _Lost as e:
            self.abort()
            raise _engine(outcome.CONNECTION_LOST, f"connection dropped at {stage}: {e}", stage) from None
        except _Refused as e:
            error = classify(e.code, e.message, stage)
            await self._after_refusal(link, e.code)
            raise error from None
        except OSError as e:
            self.abort()
            raise _engine(outcome.CONNECTION_LOST, f"connection failed at {stage}: {e}", stage) from None
        except BaseException:
            # Cancelled mid-transaction (shutdown): the connection is in an
            # unknown state and must not be reused.
            self.abort()
            raise
        self.messages += 1
        return Delivered(reply_text(code, text), self.peer_ip, len(data))

    async def _ready(self) -> _Link:
        """The connection for the next transaction: the open one, reset with
        RSET after a refusal; a new one where there is none, or where the old
        one does not take the RSET."""
        link = self._link
        if link is not None and link.usable and self._reset_due:
            self._reset_due = False
            try:
                link.write(b"RSET\r\n", 1)
                code, _ = await link.reply(self.settings.timeout)
            except (_Lost, _Timeout, _Refused, OSError):
                self.abort()
            except BaseException:
                self.abort()
                raise
            else:
                if code != 250:
                    await self.close()
        if self._link is None or not self._link.usable:
            self.abort()
            self._link = await self._open()
        return self._link

    async def _after_refusal(self, link: _Link, code: int) -> None:
        """After the server refused a command of the transaction: the dialogue
        is in a known state, so the connection stays, to be reset (RSET) for
        the next message or closed with QUIT (RFC 5321 4.1.1.5, 3.8).

        The replies still owed for pipelined commands are read first. It is
        dropped instead where its state is not known or not safe: a 421 (the
        server closes it), a malformed reply, a reply that came while part of
        the message was still unsent (the rest must never reach the server),
        or a 354 among the owed replies (the server waits for a message)."""
        if code == 421 or code < 0 or link.unsent:
            self.abort()
            return
        try:
            while link.owed:
                later, _ = await link.reply(min(5.0, self.settings.timeout))
                if later in (354, 421):
                    self.abort()
                    return
        except (_Lost, _Timeout, _Refused):
            self.abort()
            return
        except BaseException:
            self.abort()
            raise
        self._reset_due = True

    def abort(self) -> None:
        """Drop the connection without QUIT (after a timeout, a lost or
        broken connection, or a cancellation)."""
        self._reset_due = False
        if self._link is not None:
            self._link.abort()
            self._link = None

    async def close(self) -> None:
        """QUIT politely and close; never raises."""
        self._reset_due = False
        link, self._link = self._link, None
        if link is None:
            return
        try:
            if link.usable:
                link.write(b"QUIT\r\n", 1)
                await link.reply(min(5.0, self.settings.timeout))
        except (_Lost, _Timeout, _Refused, OSError):
            pass
        finally:
            link.close()
