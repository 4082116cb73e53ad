"""The SMTP dialogue after the greeting: :class:`Link` writes commands and
hands out the server's replies in order; :func:`data_block` makes the bytes
sent after DATA, and :func:`bdat_block` the chunk that replaces them.

aiosmtplib opens the connection: connect, greeting, EHLO (HELO), STARTTLS and
AUTH (:mod:`copiamail.smtp.session`). The transactions (MAIL, RCPT, DATA, the
message) and QUIT then run on the same transport through :class:`Link`, which
reads replies in order, so that MAIL, RCPT and DATA go out in one write where
the server offers PIPELINING (RFC 2920). aiosmtplib awaits one reply per
command and drops any reply that arrives early, so it cannot pipeline; per
message, its three round trips and its layers cost the node more CPU than the
rest of the send. Where the server also offers CHUNKING (RFC 3030), the
message itself goes in that same write, as one ``BDAT <size> LAST`` chunk: a
message costs one round trip instead of two. The replies are read exactly as
aiosmtplib would read them (same texts for timeouts and lost connections);
tests/test_session_internals.py holds this module to each aiosmtplib internal
it relies on.
"""

from __future__ import annotations

import asyncio
import re
from collections import deque

from copiamail.deadline import Deadline


class Lost(Exception):
    """The connection ended while a reply was awaited (the text says how)."""


class ReplyTimeout(Exception):
    """No complete reply within the timeout."""


class Refused(Exception):
    """A reply that refuses (its code and text), or one that cannot be read
    (code :data:`UNREADABLE`)."""

    def __init__(self, code: int, message: str) -> None:
        self.code, self.message = code, message


# As aiosmtplib's SMTPProtocol reads replies (tests/test_session_internals.py
# holds each to it): the longest line and reply it takes, the code of a reply
# it cannot read, and its words for what went wrong, so that EMAIL_ERROR reads
# the same whichever of the two read the reply.
MAX_LINE = 8192
MAX_REPLY = MAX_LINE * 4
UNREADABLE = -1
TOO_LONG = "Response too long"
MALFORMED = "Malformed SMTP response line: "
CONNECTION_LOST = "Connection lost"
UNEXPECTED_EOF = "Unexpected EOF received"
NO_REPLY = "Timed out waiting for server response"
_LINE_ENDS = re.compile(rb"\r\n|\n|\r(?!\n)")
_LEADING_DOT = re.compile(rb"(?m)^\.")


def crlf_lines(message: bytes) -> bytes:
    """The message with CRLF line ends, ending in CRLF (RFC 5321 2.3.8)."""
    rest = message.replace(b"\r\n", b"")
    if b"\r" in rest or b"\n" in rest:  # a lone CR or LF: every line end made CRLF
        message = _LINE_ENDS.sub(b"\r\n", message)
    if not message.endswith(b"\r\n"):
        message += b"\r\n"
    return message


def data_block(message: bytes) -> bytes:
    """The message as sent after DATA: CRLF line ends, ending in CRLF, each
    leading dot doubled, then the final ``.`` line (RFC 5321 4.5.2)."""
    message = crlf_lines(message)
    if message.startswith(b".") or b"\n." in message:
        message = _LEADING_DOT.sub(b"..", message)
    return message + b".\r\n"


def bdat_block(message: bytes) -> bytes:
    """The message as one last chunk (RFC 3030): ``BDAT <size> LAST`` and the
    message with CRLF line ends, as it is (a chunk has a length, not an end
    mark, so nothing in it is escaped)."""
    message = crlf_lines(message)
    return b"BDAT %d LAST\r\n" % len(message) + message


def message_block(message: bytes, chunked: bool) -> tuple[bytes, int]:
    """What carries ``message``: its :func:`bdat_block` (``chunked``) or its
    :func:`data_block`; and its size as sent, which ``SIZE=`` declares (RFC
    1870: dot-stuffing counted, so never less than the server counts)."""
    if chunked:
        block = bdat_block(message)
        return block, len(block) - block.index(b"\r\n") - 2
    block = data_block(message)
    return block, len(block) - 3  # the final ".\r\n"


class Link(asyncio.Protocol):
    """A connection after its greeting (taken over from aiosmtplib): writes
    commands and hands out the server's replies in order. A reply that
    arrives when none is awaited is dropped (as aiosmtplib does), so a stray
    line can never be taken for the answer to a later command."""

    def __init__(self, transport: asyncio.Transport, pipelining: bool, size: int | None,
                 chunking: bool = False) -> None:
        self.encrypted = False  # STARTTLS made it TLS
        self.pipelining = pipelining
        self.chunking = chunking  # each message goes as one BDAT (RFC 3030), pipelined with MAIL and RCPT
        self.size = size  # SIZE as offered (RFC 1870): None not offered, 0 no fixed limit
        self.closing = False  # the server said 421: it reads nothing after that reply
        self.written = 0  # bytes written since the link took over
        self.cut_short = False  # dropped with written bytes still unsent (the last written never left)
        self._transport = transport
        # Written but not yet given to the transport: a message's upload that
        # the start of the transaction behind it may join, one send for both
        # (:meth:`flush_soon`).
        self._held = b""
        self._flush_due = False
        self._buffer = bytearray()
        self._replies: deque[tuple[int, str]] = deque()
        self._expected = 0  # replies owed for commands written, not yet parsed
        self._ended: str | None = None
        self._bad: Refused | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._expired = False  # the reply awaited did not come in time
        self._deadline = Deadline(self._expire)
        transport.set_protocol(self)

    @property
    def usable(self) -> bool:
        return self._ended is None and self._bad is None and not self._transport.is_closing()

    @property
    def owed(self) -> int:
        """Replies still to be read for commands written."""
        return len(self._replies) + self._expected

    def sent_up_to(self, offset: int) -> bool:
        """Whether every byte written before ``offset`` (a value of
        :attr:`written`) has left the buffer: a message upload the server
        answered before it was all sent has not."""
        return self.written - len(self._held) - self._transport.get_write_buffer_size() >= offset

    def peer_ip(self) -> str | None:
        info = self._transport.get_extra_info("peername")
        return str(info[0]) if info else None

    def write(self, data: bytes, replies: int, hold: bool = False) -> None:
        """Send ``data`` (``replies`` commands), after what is held; with
        ``hold``, keep it back until the next write, :meth:`flush` or
        :meth:`flush_soon`."""
        if self._ended is not None or self._transport.is_closing():
            raise Lost(CONNECTION_LOST)
        self._expected += replies
        self.written += len(data)
        if self._held:
            data, self._held = self._held + data, b""
        if hold:
            self._held = data
        else:
            self._transport.write(data)

    def flush(self) -> None:
        """Send what is held now (dropped, and counted as cut short, on a
        connection that has ended)."""
        if self._held:
            data, self._held = self._held, b""
            if self._ended is None and not self._transport.is_closing():
                self._transport.write(data)
            else:
                self.cut_short = True

    def flush_soon(self) -> None:
        """Send what is held at the event loop's next turn, unless a write
        takes it along first: the next transaction, started by a callback
        already scheduled, goes out in the same send as this one's message
        (a send fewer a message, and a read fewer for the server)."""
        if self._held and not self._flush_due:
            self._flush_due = True
            asyncio.get_running_loop().call_soon(self._flush_now)

    def _flush_now(self) -> None:
        self._flush_due = False
        self.flush()

    async def reply(self, timeout: float | None) -> tuple[int, str]:
        """The next reply, as (code, text with lines joined by LF), within
        ``timeout`` seconds for the whole reply (a server that trickles a
        reply byte by byte does not get a new timeout for each byte)."""
        if self._replies:
            return self._replies.popleft()
        if not self._flush_due:
            # Never wait for the answer to bytes not sent (a flush that is
            # due sends them at the loop's next turn, before any answer).
            self.flush()
        loop = asyncio.get_running_loop()
        if timeout:
            self._deadline.start(loop, timeout)
        try:
            while not self._replies:
                if self._bad is not None:
                    raise self._bad
                if self._ended is not None:
                    raise Lost(self._ended)
                if self._expired:
                    raise ReplyTimeout()
                self._waiter = loop.create_future()
                await self._waiter
        finally:
            self._waiter = None
            self._deadline.end()
            self._expired = False
        return self._replies.popleft()

    def _expire(self) -> None:
        self._expired = True
        self._wake()

    def close(self) -> None:
        """Close after QUIT: what is still buffered is sent first."""
        self.flush()
        self._ended = self._ended or CONNECTION_LOST
        self._transport.close()

    def abort(self) -> None:
        """Drop the connection at once, discarding anything not yet sent: after
        an error or a timeout, the rest of a message still being uploaded must
        not reach the server (it could accept a message recorded as failed)."""
        self._ended = self._ended or CONNECTION_LOST
        self.cut_short = self.cut_short or bool(self._held) or self._transport.get_write_buffer_size() > 0
        self._held = b""
        self._transport.abort()

    # asyncio.Protocol

    def data_received(self, data: bytes) -> None:
        if self._expected <= 0:
            return
        self._buffer += data
        if len(self._buffer) > MAX_REPLY:
            self._fail(UNREADABLE, TOO_LONG)
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
            if len(line) > MAX_LINE:
                self._fail(UNREADABLE, TOO_LONG)
                return None
            try:
                code = int(line[:3])
            except ValueError:
                self._fail(UNREADABLE, MALFORMED + line.decode("utf-8", errors="ignore"))
                return None
            offset = end + 1
            lines.append(line[4:].strip(b" \t\r\n"))
            if line[3:4] != b"-":
                return offset, (code, b"\n".join(lines).decode("utf-8", "surrogateescape"))

    def _fail(self, code: int, message: str) -> None:
        self._bad = Refused(code, message)
        self._expected = 0
        self._buffer.clear()
        self._wake()

    def eof_received(self) -> bool:
        self._ended = self._ended or UNEXPECTED_EOF
        self._wake()
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._ended = self._ended or CONNECTION_LOST
        self._deadline.cancel()
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
