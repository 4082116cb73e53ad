"""The hidden limits of a throttling receiver, and what it recorded.

``ReceiverLimits`` is the part of ``SMTPTestServer`` (tests/smtpserver.py)
that behaves like a large mailbox provider: it has limits the sender is not
told, answers a sender that goes over them with the provider's own reply
text, and records everything an engine's behaviour can be judged by.  It
knows no SMTP; the server asks it at each stage.  Every limit can be changed
while the server runs (``SMTPTestServer.set_limits``); a change holds from
the next event on.

The limits, per client IP (the ``source``):

``max_connections_per_source`` / ``over_limit_reply`` / ``over_limit_delay``
    A connection that arrives while that many are open from its source gets
    ``over_limit_reply`` instead of the greeting (after ``over_limit_delay``
    seconds) and is closed.  Default text: Postfix's
    ``smtpd_client_connection_count_limit`` reply.
``max_message_rate`` / ``rate_reply`` / ``rate_stage``
    ``(N, seconds)``, or ``"N/s"``, ``"N/m"``, ``"N/h"``: at most N messages in
    any window of that many seconds (a sliding window).  A message over it
    is answered with ``rate_reply`` at ``rate_stage`` (``"RCPT"``, its first
    recipient, or ``"MAIL"``) and not counted.  Default text: Gmail's
    ``450 4.2.1 ... receiving mail too quickly``.
``max_messages_per_connection`` / ``per_connection_reply``
    The (N+1)th MAIL FROM on one connection gets ``per_connection_reply``
    and the connection is closed.  Default text: Yahoo's.
``latency``
    Seconds the receiver waits before its end-of-data reply.
``suspend(seconds, reply=None, stage=None)``
    For that long, every MAIL FROM (``stage="MAIL"``, default) or every new
    connection (``stage="CONNECT"``) gets ``suspend_reply`` and is closed.
    Default text: Yahoo's ``[TSS04]``.  ``resume()`` ends it early.

Reply texts are whole replies (``"421 4.7.0 ..."``; ``\\n`` between lines of
a multi-line reply, each line with its code) and may use ``{host}`` (the
server's name) and ``{ip}`` (the client's address).  A reply with code 421
closes the connection.

The records (lists that only grow; times are ``time.time()``):

``throttle_replies``
    Every throttle reply sent, as ``ThrottleReply``: a ``str`` (the reply as
    sent) that also carries ``at``, ``kind`` (``connections``, ``rate``,
    ``per_connection``, ``suspend``), ``source``, ``stage`` and ``open``
    (connections open from that source when it was sent, its own included).
``connection_events``
    ``ConnectionEvent(at, source, opened, open_from_source, open_total)``
    for every connection opened and closed, counts taken after the event.
``message_starts``
    ``MessageStart(at, source, admitted)`` for every MAIL FROM; ``admitted``
    is false when a throttle reply refused that message (at MAIL, or at its
    recipients when the rate is judged at RCPT).

``max_open(...)`` and ``max_messages_in_window(...)`` read them: "after the
first throttle reply and 2 s to settle, never more than 3 open" is
``limits.max_open(since=limits.throttle_replies[0].at + 2) <= 3``.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, NamedTuple

__all__ = [
    "EXIM_CONNECTIONS",
    "GMAIL_RATE",
    "KINDS",
    "MICROSOFT_CONNECTIONS",
    "MICROSOFT_RATE",
    "POSTFIX_CONNECTIONS",
    "YAHOO_PER_CONNECTION",
    "YAHOO_SUSPEND",
    "ConnectionEvent",
    "MessageStart",
    "ReceiverLimits",
    "ThrottleReply",
    "parse_rate",
]

# Real receivers' replies (public postmaster pages, MTA sources).
POSTFIX_CONNECTIONS = "421 4.7.0 {host} Error: too many connections from {ip}"
EXIM_CONNECTIONS = "421 {host}: Too many concurrent SMTP connections; please try again later"
MICROSOFT_CONNECTIONS = "451 4.7.652 The mail server [{ip}] has exceeded the maximum number of connections. (S3115)"
GMAIL_RATE = ("450 4.2.1 The user you are trying to contact is receiving mail too quickly. "
              "Please resend your message at a later time.")
MICROSOFT_RATE = "451 4.7.650 The mail server [{ip}] has been temporarily rate limited due to IP reputation. (S843)"
YAHOO_PER_CONNECTION = "421 Max message per connection reached, closing transmission channel"
YAHOO_SUSPEND = ("421 4.7.0 [TSS04] Messages from {ip} temporarily deferred due to unexpected volume "
                 "or user complaints - 4.16.55.1")

KINDS = ("connections", "rate", "per_connection", "suspend")
_PERIODS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_SETTABLE = {
    "max_connections_per_source", "over_limit_reply", "over_limit_delay",
    "max_message_rate", "rate_reply", "rate_stage",
    "max_messages_per_connection", "per_connection_reply",
    "latency", "suspend_reply", "suspend_stage",
}


def parse_rate(rate: Any) -> tuple[int, float] | None:
    """``None``, ``(N, seconds)`` or ``"N/s"`` / ``"N/m"`` / ``"N/h"`` -> ``(N, seconds)``."""
    if rate is None:
        return None
    if isinstance(rate, str):
        count, _, unit = rate.partition("/")
        if unit not in _PERIODS:
            raise ValueError(f"a rate is N/s, N/m or N/h, not {rate!r}")
        rate = (int(count), _PERIODS[unit])
    n, seconds = int(rate[0]), float(rate[1])
    if n < 1 or seconds <= 0:
        raise ValueError(f"a rate needs N >= 1 and a period > 0, not {rate!r}")
    return n, seconds


class ThrottleReply(str):
    """One throttle reply as sent (the string), with when, why and to whom."""

    at: float
    kind: str
    source: str
    stage: str
    open: int

    def __new__(cls, text: str, *, at: float, kind: str, source: str, stage: str, open: int) -> ThrottleReply:
        self = super().__new__(cls, text)
        self.at, self.kind, self.source, self.stage, self.open = at, kind, source, stage, open
        return self

    @property
    def text(self) -> str:
        return str(self)

    @property
    def code(self) -> int:
        return int(self[:3])

    def __repr__(self) -> str:
        return f"ThrottleReply({str(self)!r}, kind={self.kind}, source={self.source}, stage={self.stage}, open={self.open})"


class ConnectionEvent(NamedTuple):
    at: float
    source: str
    opened: bool  # False: closed
    open_from_source: int
    open_total: int


@dataclass
class MessageStart:
    at: float
    source: str
    admitted: bool


class ReceiverLimits:
    """The hidden limits and the records; see the module docstring.  All
    methods are thread-safe (they take ``cond``, the server's condition, and
    notify it when a record is added)."""

    def __init__(self, hostname: str, cond: threading.Condition | None = None, **settings: Any) -> None:
        self.hostname = hostname
        self._cond = cond or threading.Condition(threading.RLock())
        self.max_connections_per_source: int | None = None
        self.over_limit_reply = POSTFIX_CONNECTIONS
        self.over_limit_delay = 0.0
        self.max_message_rate: tuple[int, float] | None = None
        self.rate_reply = GMAIL_RATE
        self.rate_stage = "RCPT"
        self.max_messages_per_connection: int | None = None
        self.per_connection_reply = YAHOO_PER_CONNECTION
        self.latency = 0.0
        self.suspend_reply = YAHOO_SUSPEND
        self.suspend_stage = "MAIL"
        self._suspended_until = 0.0  # time.monotonic()
        self._open: Counter[str] = Counter()
        self._open_total = 0
        self._windows: dict[str, deque[float]] = {}  # source -> admitted message times (monotonic)
        self._throttle_replies: list[ThrottleReply] = []
        self._events: list[ConnectionEvent] = []
        self._starts: list[MessageStart] = []
        self.set(**settings)

    # -- the limits ------------------------------------------------------------
    def set(self, **settings: Any) -> None:
        """Change limits (names as in the module docstring); the rest stay."""
        unknown = set(settings) - _SETTABLE
        if unknown:
            raise TypeError(f"unknown receiver limits {sorted(unknown)}; known: {sorted(_SETTABLE)}")
        for name in ("rate_stage", "suspend_stage"):
            if name in settings:
                settings[name] = str(settings[name]).upper()
        if settings.get("rate_stage", "RCPT") not in ("MAIL", "RCPT"):
            raise ValueError("rate_stage is MAIL or RCPT")
        if settings.get("suspend_stage", "MAIL") not in ("MAIL", "CONNECT"):
            raise ValueError("suspend_stage is MAIL or CONNECT")
        for name in ("max_connections_per_source", "max_messages_per_connection"):
            value = settings.get(name)
            if value is not None and int(value) < 0:
                raise ValueError(f"{name} must be >= 0 or None")
        if "max_message_rate" in settings:
            settings["max_message_rate"] = parse_rate(settings["max_message_rate"])
        with self._cond:
            for name, value in settings.items():
                setattr(self, name, value)

    def suspend(self, seconds: float, reply: str | None = None, stage: str | None = None) -> None:
        """Answer every MAIL FROM (or new connection) with the suspend reply for ``seconds``."""
        settings: dict[str, Any] = {}
        if reply is not None:
            settings["suspend_reply"] = reply
        if stage is not None:
            settings["suspend_stage"] = stage
        self.set(**settings)
        with self._cond:
            self._suspended_until = time.monotonic() + seconds

    def resume(self) -> None:
        with self._cond:
            self._suspended_until = 0.0

    @property
    def suspended(self) -> bool:
        return time.monotonic() < self._suspended_until

    # -- events (called by the server) -----------------------------------------
    def opened(self, source: str) -> bool:
        """A connection from ``source`` arrived; True if it is beyond the
        connection limit (judged as it arrives, itself counted)."""
        with self._cond:
            self._open[source] += 1
            self._open_total += 1
            self._events.append(ConnectionEvent(time.time(), source, True, self._open[source], self._open_total))
            limit = self.max_connections_per_source
            return limit is not None and self._open[source] > limit

    def closed(self, source: str) -> None:
        with self._cond:
            self._open[source] -= 1
            self._open_total -= 1
            self._events.append(ConnectionEvent(time.time(), source, False, self._open[source], self._open_total))
            if self._open[source] <= 0:
                del self._open[source]
            self._cond.notify_all()

    def at_connect(self, source: str, over_limit: bool) -> ThrottleReply | None:
        """The reply that replaces the greeting, if any (suspension first)."""
        if self.suspend_stage == "CONNECT" and self.suspended:
            return self._reply("suspend", "CONNECT", source, self.suspend_reply)
        if over_limit:
            return self._reply("connections", "CONNECT", source, self.over_limit_reply)
        return None

    def at_mail(self, source: str, mails_on_connection: int) -> tuple[ThrottleReply | None, MessageStart]:
        """A MAIL FROM, the ``mails_on_connection``-th on its connection: the
        reply, if any, and the message's start record."""
        reply = None
        if self.suspend_stage == "MAIL" and self.suspended:
            reply = self._reply("suspend", "MAIL", source, self.suspend_reply)
        elif self.max_messages_per_connection is not None and mails_on_connection > self.max_messages_per_connection:
            reply = self._reply("per_connection", "MAIL", source, self.per_connection_reply)
        elif self.rate_stage == "MAIL":
            reply = self._rate(source, "MAIL")
        start = MessageStart(time.time(), source, reply is None)
        with self._cond:
            self._starts.append(start)
        return reply, start

    def at_first_rcpt(self, source: str, start: MessageStart | None) -> ThrottleReply | None:
        """A RCPT of the message ``start``, none of whose recipients was admitted yet."""
        if self.rate_stage != "RCPT":
            return None
        reply = self._rate(source, "RCPT")
        with self._cond:
            if start is not None:
                start.admitted = reply is None
        return reply

    def _rate(self, source: str, stage: str) -> ThrottleReply | None:
        with self._cond:
            rate = self.max_message_rate
            if rate is None:
                return None
            n, seconds = rate
            now = time.monotonic()
            window = self._windows.setdefault(source, deque())
            while window and window[0] <= now - seconds:
                window.popleft()
            if len(window) < n:
                window.append(now)
                return None
            return self._reply("rate", stage, source, self.rate_reply)

    def _reply(self, kind: str, stage: str, source: str, text: str) -> ThrottleReply:
        with self._cond:
            reply = ThrottleReply(text.format(host=self.hostname, ip=source), at=time.time(), kind=kind,
                                  source=source, stage=stage, open=self._open[source])
            self._throttle_replies.append(reply)
            self._cond.notify_all()
            return reply

    # -- the records -------------------------------------------------------------
    @property
    def throttle_replies(self) -> list[ThrottleReply]:
        with self._cond:
            return list(self._throttle_replies)

    def clear_throttle_replies(self) -> None:
        """Forget the throttle replies sent so far (a test's second run starts afresh)."""
        with self._cond:
            self._throttle_replies.clear()

    @property
    def connection_events(self) -> list[ConnectionEvent]:
        with self._cond:
            return list(self._events)

    @property
    def message_starts(self) -> list[MessageStart]:
        with self._cond:
            return list(self._starts)

    def max_open(self, since: float | None = None, until: float | None = None, source: str | None = None) -> int:
        """The most connections open at once (from ``source``, or in all)
        between ``since`` and ``until`` (``time.time()`` values; None: the
        first and the last event), counting those already open at ``since``."""
        peak = current = 0
        for e in self.connection_events:
            if source is not None and e.source != source:
                continue
            current = e.open_from_source if source is not None else e.open_total
            if until is not None and e.at > until:
                break
            if since is not None and e.at < since:
                peak = current  # open at ``since``, unless it changes before
                continue
            peak = max(peak, current)
        return peak

    def max_messages_in_window(self, seconds: float, since: float | None = None, until: float | None = None,
                               source: str | None = None, admitted_only: bool = False) -> int:
        """The most MAIL FROMs (admitted ones only, if asked) in any window
        of ``seconds`` between ``since`` and ``until``."""
        times = [s.at for s in self.message_starts
                 if (source is None or s.source == source) and (s.admitted or not admitted_only)
                 and (since is None or s.at >= since) and (until is None or s.at <= until)]
        best = 0
        for i, t in enumerate(times):  # times are in order: those in [t, t + seconds)
            best = max(best, bisect.bisect_left(times, t + seconds, lo=i) - i)
        return best

    def by_kind(self) -> Counter[str]:
        return Counter(r.kind for r in self.throttle_replies)
