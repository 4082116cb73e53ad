"""SMTP sessions.

A :class:`SmtpSession` is one connection to one host, used by one
connection's run (never shared between runs). It opens lazily on the first :meth:`SmtpSession.send` and
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
AUTH. The transactions then run on its transport through
:class:`~copiamail.smtp.link.Link`, pipelined where the server allows it
(one transaction may be written behind the one in flight, before its last
reply: :meth:`SmtpSession.send`);
:mod:`copiamail.smtp.replies` classifies what the server says, and
:mod:`copiamail.smtp.startup` makes what a node settles once (the TLS context,
the relay's addresses, the EHLO name).
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn, cast

import aiosmtplib

from copiamail.errors import DeliveryError, NotSent
from copiamail.jobfile import outcome
from copiamail.smtp.link import CONNECTION_LOST, NO_REPLY, Link, Lost, Refused, ReplyTimeout, message_block
from copiamail.smtp.replies import CONNECT, DATA, MAIL, RCPT, classify, reply_text


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
    chunking: bool = True  # send the message as one BDAT where the server offers CHUNKING


def address_literal(ip: str) -> str:
    """``[192.0.2.1]`` or ``[IPv6:2001:db8::1]`` (RFC 5321 4.1.3)."""
    return f"[IPv6:{ip}]" if ":" in ip else f"[{ip}]"


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


def _write_start(link: Link, behind: bool, mail: bytes, rcpt: bytes, block: bytes, hold: bool) -> int:
    """Write what starts a transaction before any reply is awaited; how many
    replies it owes. ``behind`` another transaction still in flight, it
    starts with RSET: the one ahead may yet be refused part way, and this
    one must begin from a known state whatever that one's outcome. ``hold``:
    a message written whole (a chunk) is held for the next write
    (:func:`_written`)."""
    if behind:
        link.write(b"RSET\r\n" + mail + rcpt + (block if link.chunking else b"DATA\r\n"), 4, hold and link.chunking)
        return 4
    if link.chunking:
        link.write(mail + rcpt + block, 3, hold)
    elif link.pipelining:
        link.write(mail + rcpt + b"DATA\r\n", 3)
    else:
        link.write(mail, 1)
        return 1
    return 3


def _written(link: Link, on_written: Callable[[], bool]) -> None:
    """A transaction is written whole, its last bytes held: ``on_written()``
    says whether another transaction follows at once (one written behind
    it, started by a callback it scheduled); then the held bytes go with
    that one's start, in one send, else now."""
    follows = False
    try:
        follows = on_written()
    finally:
        if follows:
            link.flush_soon()
        else:
            link.flush()


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
        self._link: Link | None = None
        self._reset_due = False  # a transaction was refused: RSET before the next one
        self._reading: asyncio.Future[None] | None = None  # done once the transaction in flight is read
        self._in_flight = 0  # transactions written whose replies are still being read
        self._unwritten = 0  # of those, the ones whose message is still to be written (after DATA's 354)
        self.messages = 0
        self.peer_ip = ""

    @property
    def greeted(self) -> bool:
        """Whether the connection is open and past its greeting and EHLO."""
        return self._link is not None and self._link.usable

    @property
    def starts_at_once(self) -> bool:
        """Whether the next transaction's MAIL FROM goes out without a round
        trip first: the connection is greeted and owes no RSET."""
        return self.greeted and not self._reset_due

    async def _open(self) -> Link:
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
            raise _engine(outcome.CONNECTION_LOST, f"connection dropped at MAIL: {CONNECTION_LOST}", MAIL)
        pipelining = smtp.supports_extension("pipelining")
        # One BDAT chunk only where commands may be pipelined: the chunk goes
        # out with MAIL and RCPT, unseen by a server that refuses either.
        link = Link(transport, pipelining, _offered_size(smtp),
                    chunking=self.settings.chunking and pipelining and smtp.supports_extension("chunking"))
        link.encrypted = transport.get_extra_info("sslcontext") is not None
        self.peer_ip = link.peer_ip() or s.host
        self.messages = 0
        return link

    def can_send_behind(self) -> bool:
        """Whether a message may go now behind the one in flight, before its
        replies: where commands may be pipelined, once the one in flight is
        written whole (its last chunk, or its message after DATA: RFC 2920
        3.1 lets a group start with a message's content), and one deep."""
        link = self._link
        return (self._in_flight == 1 and self._unwritten == 0 and link is not None and link.pipelining
                and link.usable and not self._reset_due)

    async def send(self, sender: str, recipient: str, data: bytes, require_tls: bool = False,
                   on_written: Callable[[], bool] | None = None) -> Delivered:
        """Deliver one message; raises DeliveryError on any failure (the
        connection stays after a refusal, see :meth:`_after_refusal`, and is
        dropped after anything else). Both addresses were checked when the
        job was read (ASCII, no control characters). With ``require_tls``
        ($email_options reqTLS) nothing is sent over a connection without TLS:
        the job fails (outcome 160) before MAIL FROM.

        ``on_written`` is called once the transaction is written whole (with
        DATA: its message), before its last reply is read; it returns whether
        a second send starts at once (scheduled by it to run next): then the
        end of this one waits for that one's first bytes, to go in one send
        with them (once that one's message is built; at the loop's next turn
        whatever comes). A second send may
        then start while this one waits (:meth:`can_send_behind`): its
        commands go out at once, behind an RSET (with DATA, its message after
        its own 354), and its replies are read after this one's. The reply to
        its RSET refuses nothing (a 421 excepted: the server closes). Should
        this one end the connection, the one behind raises
        :class:`~copiamail.errors.NotSent` where the server cannot have taken
        it (a 421 came first, its chunk's end was never sent, or its message
        waited for a 354), else fails as dropped at MAIL: its chunk was sent
        whole, so it counts as attempted."""
        await self._behind_or_ready()
        ahead = self._reading
        link = self._link
        assert link is not None
        if require_tls and not link.encrypted:
            s = self.settings
            raise DeliveryError(outcome.TLS_REQUIRED.code, outcome.TLS_REQUIRED.klass,
                                f"{s.host}:{s.port} offers no TLS and the job requires it (reqTLS); not sent", True, MAIL)
        block, size = message_block(data, link.chunking)
        mail = b"MAIL FROM:<" + sender.encode("ascii") + b">"
        if link.size is not None:
            # A message over the server's limit is refused here, before a byte
            # of it is uploaded.
            if link.size and size > link.size:
                s = self.settings
                raise classify(552, f"5.3.4 Message size {size} exceeds the fixed limit {link.size} that "
                                    f"{s.host}:{s.port} advertises (SIZE); not sent", MAIL)
            mail += b" SIZE=%d" % size
        mail += b"\r\n"
        rcpt = b"RCPT TO:<" + recipient.encode("ascii") + b">\r\n"
        code, text = await self._transaction(link, ahead, mail, rcpt, block, on_written)
        self.messages += 1
        return Delivered(reply_text(code, text), self.peer_ip, len(data))

    async def _transaction(self, link: Link, ahead: asyncio.Future[None] | None, mail: bytes, rcpt: bytes,
                           block: bytes, on_written: Callable[[], bool] | None) -> tuple[int, str]:
        """Write one transaction (behind ``ahead``, the one in flight, if
        any) and read its replies; the final reply, or a DeliveryError."""
        timeout = self.settings.timeout
        stage = MAIL
        left = 0  # replies owed to this transaction, not yet read
        mine: asyncio.Future[None] | None = None
        unwritten = not link.chunking  # its message is written only after DATA's 354
        try:
            left = _write_start(link, ahead is not None, mail, rcpt, block, on_written is not None)
            end = link.written  # where this transaction's bytes end in the stream
            mine = self._reading = asyncio.get_running_loop().create_future()
            self._in_flight += 1
            if unwritten:
                self._unwritten += 1
            elif on_written is not None:
                _written(link, on_written)
            if ahead is not None:
                await asyncio.shield(ahead)
                if link is not self._link:  # the one ahead ended the connection
                    self._ended_ahead(link)
                code, text = await link.reply(timeout)  # to its own RSET
                left -= 1
                if code == 421:
                    link.closing = True
                    self.abort()
                    self._ended_ahead(link)
                # Any other refusal of RSET is no refusal of the message: the
                # reply to MAIL, next, says whether the transaction began.
            code, text = await link.reply(timeout)
            left -= 1
            if code != 250:
                raise Refused(code, text)
            stage = RCPT
            if not link.pipelining:
                link.write(rcpt, 1)
                left += 1
                end = link.written
            code, text = await link.reply(timeout)
            left -= 1
            if code not in (250, 251):
                raise Refused(code, text)
            stage = DATA
            if not link.chunking:
                if not link.pipelining:
                    link.write(b"DATA\r\n", 1)
                    left += 1
                    end = link.written
                code, text = await link.reply(timeout)
                left -= 1
                if code != 354:
                    raise Refused(code, text)
                link.write(block, 1, on_written is not None)
                left += 1
                end = link.written
                self._unwritten -= 1
                unwritten = False
                if on_written is not None:
                    _written(link, on_written)
            code, text = await link.reply(timeout)
            left -= 1
            if code != 250:
                raise Refused(code, text)
            return code, text
        except ReplyTimeout:
            self.abort()
            if ahead is not None and unwritten:
                raise self._not_sent() from None  # behind another, its message never left
            raise _engine(outcome.TIMED_OUT, f"timeout at {stage}: {NO_REPLY}", stage) from None
        except Lost as e:
            self.abort()
            if ahead is not None and unwritten:
                raise self._not_sent() from None
            raise _engine(outcome.CONNECTION_LOST, f"connection dropped at {stage}: {e}", stage) from None
        except Refused as e:
            error = classify(e.code, e.message, stage)
            await self._after_refusal(link, e.code, left, end)
            raise error from None
        except OSError as e:
            self.abort()
            raise _engine(outcome.CONNECTION_LOST, f"connection failed at {stage}: {e}", stage) from None
        except BaseException:
            # Cancelled mid-transaction (shutdown): the connection is in an
            # unknown state and must not be reused.
            self.abort()
            raise
        finally:
            if mine is not None:
                self._in_flight -= 1
                if unwritten:
                    self._unwritten -= 1
                if self._reading is mine:
                    self._reading = None
                mine.set_result(None)

    def _ended_ahead(self, link: Link) -> NoReturn:
        """The transaction ahead of one written behind it ended ``link``:
        :class:`NotSent` where the server cannot have taken this one (after
        a 421 it read nothing more; its chunk's end was still unsent when the
        link was dropped; with DATA, its message waited for its 354), else
        :class:`Lost` (its chunk was sent whole: an attempt)."""
        if link.closing or link.cut_short or not link.chunking:
            raise self._not_sent()
        raise Lost(CONNECTION_LOST)

    def _not_sent(self) -> NotSent:
        s = self.settings
        return NotSent(outcome.CONNECTION_LOST.code, outcome.CONNECTION_LOST.klass,
                       f"{s.host}:{s.port} ended the connection before this message", False, MAIL)

    async def _behind_or_ready(self) -> None:
        """Wait until this send may start: at once behind the transaction in
        flight where it can (:meth:`can_send_behind`), else once that one's
        replies are read, on a connection ready for it (:meth:`_ready`)."""
        while self._reading is not None and not self.can_send_behind():
            await asyncio.shield(self._reading)
        if self._reading is None:
            await self._ready()

    async def ready(self) -> None:
        """Open the connection now (or reset it after a refusal), so that the
        next :meth:`send` starts its transaction at once (behind the one in
        flight, where it may); raises DeliveryError as :meth:`send` does when
        it cannot be opened."""
        await self._behind_or_ready()

    async def _ready(self) -> Link:
        """The connection for the next transaction: the open one, reset with
        RSET after a refusal; a new one where there is none, or where the old
        one does not take the RSET."""
        link = self._link
        if link is not None and link.usable and self._reset_due:
            self._reset_due = False
            try:
                link.write(b"RSET\r\n", 1)
                code, _ = await link.reply(self.settings.timeout)
            except (Lost, ReplyTimeout, Refused, OSError):
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

    async def _after_refusal(self, link: Link, code: int, owed: int, end: int) -> None:
        """After the server refused a command of the transaction: the dialogue
        is in a known state, so the connection stays, to be reset (RSET) for
        the next message or closed with QUIT (RFC 5321 4.1.1.5, 3.8).

        The ``owed`` replies still due to this transaction's pipelined
        commands are read first (a transaction behind it reads its own, and
        carries its own RSET); ``end``: where its bytes end in the stream
        (:attr:`Link.written`). It is
        dropped instead where its state is not known or not safe: a 421 (the
        server closes it), a malformed reply, a reply that came while part of
        the message was still unsent (the rest must never reach the server),
        or a 354 among the owed replies (the server waits for a message)."""
        if code == 421 or code < 0 or not link.sent_up_to(end):
            link.closing = code == 421
            self.abort()
            return
        try:
            for _ in range(owed):
                later, _ = await link.reply(min(5.0, self.settings.timeout))
                if later in (354, 421):
                    link.closing = later == 421
                    self.abort()
                    return
        except (Lost, ReplyTimeout, Refused):
            self.abort()
            return
        except BaseException:
            self.abort()
            raise
        self._reset_due = self._in_flight == 1  # none behind it

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
        except (Lost, ReplyTimeout, Refused, OSError):
            pass
        finally:
            link.close()
