"""The Link's held bytes (a message's end kept back for the start of the one
behind it, so both go in one send) and its reply timeouts (copiamail/smtp/link.py)."""

from __future__ import annotations

import asyncio

from copiamail.smtp.link import Link, Lost, ReplyTimeout


class RecordingTransport(asyncio.Transport):
    """A transport that records each write and can be made to close."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closing = False
        self.aborted = False

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default

    def get_write_buffer_size(self) -> int:
        return 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))

    def abort(self) -> None:
        self.aborted = self.closing = True

    def close(self) -> None:
        self.closing = True


def link_and_transport() -> tuple[Link, RecordingTransport]:
    transport = RecordingTransport()
    return Link(transport, pipelining=True, size=None), transport


def test_held_bytes_go_with_the_next_write_in_one_send():
    link, transport = link_and_transport()
    link.write(b"end of message\r\n.\r\n", 1, hold=True)
    assert transport.writes == [] and not link.sent_up_to(link.written)
    link.write(b"RSET\r\nMAIL FROM:<a@b.test>\r\n", 2)
    assert transport.writes == [b"end of message\r\n.\r\nRSET\r\nMAIL FROM:<a@b.test>\r\n"]
    assert link.sent_up_to(link.written) and link.owed == 3


def test_held_bytes_go_at_the_loops_next_turn_when_nothing_joins_them():
    async def go() -> list[list[bytes]]:
        link, transport = link_and_transport()
        link.write(b"message\r\n.\r\n", 1, hold=True)
        link.flush_soon()
        link.flush_soon()  # once is enough
        seen = [list(transport.writes)]
        await asyncio.sleep(0)
        seen.append(list(transport.writes))
        await asyncio.sleep(0)
        seen.append(list(transport.writes))
        return seen

    assert asyncio.run(go()) == [[], [b"message\r\n.\r\n"], [b"message\r\n.\r\n"]]


def test_a_reply_is_never_awaited_for_bytes_still_held():
    async def go() -> tuple[list[bytes], tuple[int, str]]:
        link, transport = link_and_transport()
        link.write(b"QUIT\r\n", 1, hold=True)
        asyncio.get_running_loop().call_later(0.01, link.data_received, b"221 bye\r\n")
        reply = await link.reply(1.0)
        return transport.writes, reply

    assert asyncio.run(go()) == ([b"QUIT\r\n"], (221, "bye"))


def test_held_bytes_of_a_connection_that_ended_are_dropped_and_count_as_cut_short():
    link, transport = link_and_transport()
    link.write(b"message\r\n.\r\n", 1, hold=True)
    link.connection_lost(None)
    link.flush()
    assert transport.writes == [] and link.cut_short


def test_an_abort_with_bytes_held_counts_them_as_cut_short_and_never_sends_them():
    link, transport = link_and_transport()
    link.write(b"message\r\n.\r\n", 1, hold=True)
    link.abort()
    link.flush()
    assert transport.aborted and transport.writes == [] and link.cut_short


def test_a_reply_times_out_at_its_own_deadline_though_an_earlier_reply_had_a_longer_one():
    async def go() -> tuple[str, float]:
        link, _ = link_and_transport()
        loop = asyncio.get_running_loop()
        link.write(b"NOOP\r\n", 1)
        loop.call_later(0.01, link.data_received, b"250 ok\r\n")
        await link.reply(30.0)  # its timer, 30 s ahead, outlives the reply
        link.write(b"NOOP\r\n", 1)
        started = loop.time()
        try:
            await link.reply(0.05)
        except ReplyTimeout:
            return "timed out", loop.time() - started
        return "answered", loop.time() - started

    outcome, waited = asyncio.run(go())
    assert outcome == "timed out" and 0.04 <= waited < 1.0


def test_a_reply_is_not_timed_out_by_the_deadline_of_the_reply_before_it():
    async def go() -> list[tuple[int, str]]:
        link, _ = link_and_transport()
        loop = asyncio.get_running_loop()
        link.write(b"NOOP\r\n", 1)
        loop.call_later(0.01, link.data_received, b"250 first\r\n")
        first = await link.reply(0.05)  # its timer fires at 0.05 s, while the next reply waits
        link.write(b"NOOP\r\n", 1)
        loop.call_later(0.12, link.data_received, b"250 second\r\n")
        return [first, await link.reply(0.5)]

    assert asyncio.run(go()) == [(250, "first"), (250, "second")]


def test_a_link_that_ended_leaves_no_timer_behind():
    async def go() -> int:
        link, _ = link_and_transport()
        link.write(b"NOOP\r\n", 1)
        asyncio.get_running_loop().call_later(0.01, link.data_received, b"250 ok\r\n")
        await link.reply(30.0)
        link.connection_lost(None)
        return len([h for h in asyncio.get_running_loop()._scheduled if not h.cancelled()])  # type: ignore[attr-defined]

    assert asyncio.run(go()) == 0


def test_a_reply_awaited_after_the_connection_was_lost_fails_at_once_and_leaves_no_timer():
    async def go() -> tuple[str, int]:
        link, _ = link_and_transport()
        link.write(b"NOOP\r\n", 1)
        link.connection_lost(None)
        try:
            await link.reply(60.0)
        except Lost:
            outcome = "lost"
        else:
            outcome = "answered"
        return outcome, len([h for h in asyncio.get_running_loop()._scheduled if not h.cancelled()])  # type: ignore[attr-defined]

    assert asyncio.run(go()) == ("lost", 0)
