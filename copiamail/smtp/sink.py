"""An embedded SMTP sink on 127.0.0.1 for ``copiamail demo`` (aiosmtpd).

It accepts every message, except that a recipient whose local part starts with
``unknown`` is refused with ``550 5.1.1 ... User unknown``, so the demo shows a
job landing in FAIL with the server's reply in EMAIL_ERROR. ``delay`` holds each
DATA a moment so that connection limits visibly defer jobs.
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from typing import Any, cast

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

_MESSAGE_ID = re.compile(rb"^Message-ID:\s*(<[^>\r\n]*>)", re.IGNORECASE | re.MULTILINE)


class _Handler:
    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.received = 0
        self.message_ids: Counter[str] = Counter()

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]) -> str:
        if address.lower().startswith("unknown"):
            return f"550 5.1.1 <{address}>: User unknown"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.delay:
            await asyncio.sleep(self.delay)
        self.received += 1
        m = _MESSAGE_ID.search(envelope.original_content or b"")
        if m is not None:
            self.message_ids[m.group(1).decode("ascii", "replace")] += 1
        return f"250 2.0.0 Ok: queued as DEMO{self.received:05d}"


class _EphemeralController(Controller):
    # aiosmtpd's start() connects to (hostname, port) to check the server is up;
    # with port 0 that must be the port the OS actually chose.
    def _trigger_server(self) -> None:
        assert self.server is not None
        # aiosmtpd types it an AbstractServer; it is the event loop's Server.
        self.port = cast(asyncio.Server, self.server).sockets[0].getsockname()[1]
        super()._trigger_server()


class SmtpSink:
    """A started-on-demand sink: ``with SmtpSink() as sink: sink.port``."""

    def __init__(self, host: str = "127.0.0.1", delay: float = 0.0) -> None:
        self.handler = _Handler(delay)
        self._controller = _EphemeralController(self.handler, hostname=host, port=0)
        self.host = host
        self.port = 0

    def __enter__(self) -> SmtpSink:
        self._controller.start()
        self.port = self._controller.port
        return self

    def __exit__(self, *exc: Any) -> None:
        self._controller.stop()

    @property
    def received(self) -> int:
        return self.handler.received

    @property
    def message_ids(self) -> Counter[str]:
        """How many times each Message-ID was received (copies show as > 1)."""
        return self.handler.message_ids
