"""SMTP sessions with aiosmtplib, and the classification of what a server says.

A :class:`SmtpSession` is one connection to one host, used by one task at a time
(never shared). It opens lazily on the first :meth:`SmtpSession.send`, carries
one message after another, and is closed on any error, never reused after one
(DESIGN: "close a connection on any error and reopen lazily"). Every failure
comes out as a :class:`~copiamail.errors.DeliveryError` with the reply code (or
the engine's outcome code), the CopiaFacts class, the text for ``EMAIL_ERROR``,
and whether it is final (a 5xx at MAIL, RCPT or DATA).
"""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import aiosmtplib

from . import outcome
from .config import is_ip
from .errors import ConfigError, DeliveryError

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
    helo_name: str | None = None


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
        raise ConfigError(f"key 'relay.ca_file': cannot load CA certificates: {getattr(e, 'strerror', None) or e}", ca_file) from None


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


def reply_text(code: int, message: str) -> str:
    """``550 5.1.1 <x@y>: User unknown``: one line, as written into EMAIL_ERROR."""
    return " ".join(f"{code} {message}".split())


def classify(code: int, message: str, stage: str) -> DeliveryError:
    """A server's refusal at ``stage`` as a DeliveryError (SPEC 4 classes)."""
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


def _engine(code: outcome.OutcomeCode, detail: str, stage: str = CONNECT) -> DeliveryError:
    return DeliveryError(code.code, code.klass, detail, False, stage)


class SmtpSession:
    """One SMTP connection (opened lazily), used by one task at a time."""

    def __init__(self, settings: SessionSettings) -> None:
        self.settings = settings
        self._smtp: aiosmtplib.SMTP | None = None
        self.messages = 0
        self.peer_ip = ""

    async def _open(self) -> aiosmtplib.SMTP:
        s = self.settings
        start_tls = {"auto": None, "always": True, "never": False}[s.starttls]
        smtp = aiosmtplib.SMTP(
            hostname=s.host, port=s.port, timeout=s.timeout, start_tls=start_tls,
            tls_context=s.tls_context if s.starttls != "never" else None,
            source_address=(s.source_address, 0) if s.source_address else None,
            local_hostname=s.helo_name,
        )
        where = f"{s.host}:{s.port}"
        try:
            await smtp.connect()
            # Greet now, not inside MAIL: a refusal of EHLO/HELO is the host's
            # (class H, retried), never a final 5xx at MAIL.
            if smtp.is_ehlo_or_helo_needed:
                try:
                    await smtp.ehlo()
                except aiosmtplib.SMTPHeloError:
                    if not smtp.is_connected:
                        raise
                    await smtp.helo()
        except aiosmtplib.SMTPConnectTimeoutError as e:
            raise _engine(outcome.TIMED_OUT, f"timeout connecting to {where}: {e.message}") from None
        except aiosmtplib.SMTPConnectResponseError as e:
            raise classify(e.code, e.message, CONNECT) from None
        except aiosmtplib.SMTPConnectError as e:
            if "EOF" in e.message:
                # Accepted, then closed before the greeting: dropped, not refused.
                raise _engine(outcome.CONNECTION_LOST, f"{where} closed the connection before its greeting") from None
            raise _engine(outcome.CONNECT_FAILED, f"cannot connect to {where}: {e.message}") from None
        except aiosmtplib.SMTPTimeoutError as e:
            smtp.close()
            raise _engine(outcome.TIMED_OUT, f"timeout greeting {where}: {e.message}") from None
        except aiosmtplib.SMTPServerDisconnected as e:
            smtp.close()
            raise _engine(outcome.CONNECTION_LOST, f"{where} closed the connection: {e.message}") from None
        except aiosmtplib.SMTPResponseException as e:
            smtp.close()
            if "STARTTLS" in e.message.upper() or e.code == 454:
                raise _engine(outcome.TLS_FAILED, f"STARTTLS failed at {where}: {reply_text(e.code, e.message)}") from None
            raise classify(e.code, e.message, CONNECT) from None
        except (ssl.SSLError, aiosmtplib.SMTPException) as e:
            smtp.close()
            detail = getattr(e, "message", None) or str(e)
            raise _engine(outcome.TLS_FAILED, f"TLS with {where} failed: {detail}") from None
        except OSError as e:
            smtp.close()
            raise _engine(outcome.CONNECT_FAILED, f"cannot connect to {where}: {e.strerror or e}") from None
        if s.username is not None:
            try:
                await smtp.login(s.username, s.password or "")
            except aiosmtplib.SMTPResponseException as e:
                smtp.close()
                raise DeliveryError(e.code, outcome.HOST_REJECTED, reply_text(e.code, e.message), False, CONNECT) from None
            except aiosmtplib.SMTPException as e:
                smtp.close()
                raise _engine(outcome.CONNECTION_LOST, f"AUTH with {where} failed: {e}") from None
        info = smtp.get_transport_info("peername")
        self.peer_ip = info[0] if info else s.host
        self.messages = 0
        return smtp

    async def send(self, sender: str, recipient: str, data: bytes) -> Delivered:
        """Deliver one message; raises DeliveryError (and closes) on any failure."""
        if self._smtp is None or not self._smtp.is_connected:
            self._smtp = None
            self._smtp = await self._open()
        smtp = self._smtp
        stage = MAIL
        try:
            # MAIL and RCPT through execute_command: both addresses were checked
            # when the job was read (ASCII, plain or quoted local part), so
            # aiosmtplib's second parse of each (email.utils) is not needed.
            reply = await smtp.execute_command(b"MAIL", b"FROM:<" + sender.encode("ascii") + b">")
            if reply.code != 250:
                raise aiosmtplib.SMTPSenderRefused(reply.code, reply.message, sender)
            stage = RCPT
            reply = await smtp.execute_command(b"RCPT", b"TO:<" + recipient.encode("ascii") + b">")
            if reply.code not in (250, 251):
                raise aiosmtplib.SMTPRecipientRefused(reply.code, reply.message, recipient)
            stage = DATA
            response = await smtp.data(data)
        except aiosmtplib.SMTPTimeoutError as e:
            self.abort()
            raise _engine(outcome.TIMED_OUT, f"timeout at {stage}: {e.message}", stage) from None
        except aiosmtplib.SMTPServerDisconnected as e:
            self.abort()
            raise _engine(outcome.CONNECTION_LOST, f"connection dropped at {stage}: {e.message}", stage) from None
        except aiosmtplib.SMTPResponseException as e:
            self.abort()
            raise classify(e.code, e.message, stage) from None
        except (aiosmtplib.SMTPException, OSError) as e:
            self.abort()
            raise _engine(outcome.CONNECTION_LOST, f"connection failed at {stage}: {e}", stage) from None
        except BaseException:
            # Cancelled mid-transaction (shutdown): the connection is in an
            # unknown state and must not be reused.
            self.abort()
            raise
        self.messages += 1
        return Delivered(reply_text(response.code, response.message), self.peer_ip, len(data))

    def abort(self) -> None:
        """Drop the connection without QUIT (after an error)."""
        if self._smtp is not None:
            self._smtp.close()
            self._smtp = None

    async def close(self) -> None:
        """QUIT politely and close; never raises."""
        smtp, self._smtp = self._smtp, None
        if smtp is None:
            return
        try:
            if smtp.is_connected:
                await asyncio.wait_for(smtp.quit(), timeout=min(5.0, self.settings.timeout))
        except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError):
            pass
        finally:
            smtp.close()
