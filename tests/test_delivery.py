"""copiamail.delivery: the SMTP transaction on a connection aiosmtplib opened.

A scripted server on 127.0.0.1 (asyncio streams, in the test's own loop)
answers each command the way a test needs, and records what arrived when.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings
from hypothesis import given
from hypothesis import strategies as st

from copiamail.errors import DeliveryError, NotSent
from copiamail.jobfile import outcome
from copiamail.smtp.link import Link, data_block
from copiamail.smtp.session import SessionSettings, SmtpSession

EHLO_PLAIN = b"250-test.invalid\r\n250 8BITMIME\r\n"
EHLO_PIPELINING = b"250-test.invalid\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
EHLO_CHUNKING = b"250-test.invalid\r\n250-PIPELINING\r\n250-SIZE 100000\r\n250 CHUNKING\r\n"
MESSAGE = b"Subject: t\r\n\r\nbody\r\n"

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, list[bytes]], Awaitable[None]]


async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ehlo: bytes) -> None:
    writer.write(b"220 test.invalid ESMTP\r\n")
    await reader.readline()  # EHLO
    writer.write(ehlo)
    await writer.drain()


async def read_message(reader: asyncio.StreamReader) -> bytes:
    lines = []
    while (line := await reader.readline()) not in (b".\r\n", b""):
        lines.append(line)
    return b"".join(lines)


async def talk(script: Script, timeout: float = 5.0, message: bytes = MESSAGE) -> tuple[list[bytes], object]:
    """Run one SmtpSession.send against ``script``; (what the server saw, the
    Delivered or the DeliveryError)."""
    seen, [result] = await converse(script, [("c@d.test", message)], timeout)
    return seen, result


@contextlib.asynccontextmanager
async def scripted(script: Script, timeout: float, chunking: bool = True
                   ) -> AsyncIterator[tuple[SmtpSession, list[bytes]]]:
    """A server on 127.0.0.1 running ``script``, and an SmtpSession to it;
    (the session, what the server saw). On leaving, the session closes and
    the script has seen the end of the connection."""
    seen: list[bytes] = []
    served = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await script(reader, writer, seen)
        finally:
            writer.close()
            served.set()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    session = SmtpSession(SessionSettings(host="127.0.0.1", port=port, starttls="never", timeout=timeout,
                                          helo_name="client.invalid", chunking=chunking))
    try:
        yield session, seen
        await session.close()
        await asyncio.wait_for(served.wait(), 10)  # the script saw the end of the connection
    finally:
        server.close()
        await server.wait_closed()


async def converse(script: Script, sends: list[tuple[str, bytes]], timeout: float = 5.0,
                   chunking: bool = True) -> tuple[list[bytes], list[object]]:
    """One SmtpSession sends each (recipient, message) in turn, then closes;
    (what the server saw, the Delivered or DeliveryError of each send)."""
    results: list[object] = []
    async with scripted(script, timeout, chunking) as (session, seen):
        for recipient, message in sends:
            try:
                results.append(await session.send("a@b.test", recipient, message))
            except DeliveryError as e:
                results.append(e)
    return seen, results


def test_with_pipelining_offered_mail_rcpt_and_data_go_out_before_the_first_reply():
    async def script(reader, writer, seen):
        await greet(reader, writer, EHLO_PIPELINING)
        # No reply until all three commands are here: a client that waited
        # for the MAIL reply would time out.
        for _ in range(3):
            seen.append(await reader.readline())
        writer.write(b"250 sender ok\r\n250 rcpt ok\r\n354 go\r\n")
        seen.append(await read_message(reader))
        writer.write(b"250 2.0.0 queued as X\r\n")
        seen.append(await reader.readline())  # QUIT
        writer.write(b"221 bye\r\n")

    seen, result = asyncio.run(talk(script, timeout=2))
    assert seen[:3] == [b"MAIL FROM:<a@b.test>\r\n", b"RCPT TO:<c@d.test>\r\n", b"DATA\r\n"]
    assert seen[3] == MESSAGE and seen[4] == b"QUIT\r\n"
    assert result.reply == "250 2.0.0 queued as X"


def test_without_pipelining_each_command_waits_for_the_reply_before_it():
    async def script(reader, writer, seen):
        await greet(reader, writer, EHLO_PLAIN)
        seen.append(await reader.readline())  # MAIL
        await asyncio.sleep(0.2)
        # Nothing more may have arrived before the MAIL reply.
        seen.append(b"early: " + ((reader._buffer and bytes(reader._buffer)) or b""))
        writer.write(b"250 ok\r\n")
        seen.append(await reader.readline())  # RCPT
        writer.write(b"250 ok\r\n")
        seen.append(await reader.readline())  # DATA
        writer.write(b"354 go\r\n")
        await read_message(reader)
        writer.write(b"250 done\r\n")
        await reader.readline()
        writer.write(b"221 bye\r\n")

    seen, result = asyncio.run(talk(script))
    assert seen == [b"MAIL FROM:<a@b.test>\r\n", b"early: ", b"RCPT TO:<c@d.test>\r\n", b"DATA\r\n"]
    assert result.reply == "250 done"


def test_pipelined_replies_split_anywhere_and_multi_line_are_read_in_order():
    async def script(reader, writer, seen):
        await greet(reader, writer, EHLO_PIPELINING)
        for _ in range(3):
            await reader.readline()
        for chunk in (b"25", b"0 ok\r\n250-first", b" line\r\n250 second line\r", b"\n354 go\r\n"):
            writer.write(chunk)
            await writer.drain()
            await asyncio.sleep(0.01)
        await read_message(reader)
        writer.write(b"250-queued\r\n250 as Y\r\n")
        await reader.readline()
        writer.write(b"221 bye\r\n")

    _, result = asyncio.run(talk(script))
    assert result.reply == "250 queued as Y"


@pytest.mark.parametrize("pipelining", [False, True])
def test_a_refused_recipient_is_classified_at_rcpt_and_the_session_ends_with_quit(pipelining):
    async def script(reader, writer, seen):
        await greet(reader, writer, EHLO_PIPELINING if pipelining else EHLO_PLAIN)
        await reader.readline()
        writer.write(b"250 ok\r\n")
        await reader.readline()
        writer.write(b"550-5.1.1 no such user\r\n550 5.1.1 check the address\r\n")
        if pipelining:
            await reader.readline()
            writer.write(b"554 no valid recipients\r\n")
        seen.append(await reader.readline())
        writer.write(b"221 bye\r\n")
        seen.append(await reader.read())

    seen, result = asyncio.run(talk(script))
    assert isinstance(result, DeliveryError)
    assert (result.code, result.stage, result.permanent) == (550, "RCPT", True)
    assert result.text == "550 5.1.1 no such user 5.1.1 check the address"
    assert seen == [b"QUIT\r\n", b""]  # no message; QUIT, not a dropped connection (RFC 5321 4.1.1.10)


@pytest.mark.parametrize("pipelining", [False, True])
@pytest.mark.parametrize("refused", ["MAIL", "RCPT", "DATA", "EOD"])
def test_after_a_refusal_the_next_message_rides_on_the_same_connection_after_rset(pipelining, refused):
    async def script(reader, writer, seen):
        await greet(reader, writer, EHLO_PIPELINING if pipelining else EHLO_PLAIN)
        # The first message: refused at its stage; pipelined, every command
        # of the group was sent and gets its reply.
        answers = {"MAIL": [b"550 5.7.1 no\r\n", b"503 5.5.1 no sender\r\n", b"503 5.5.1 no recipient\r\n"],
                   "RCPT": [b"250 ok\r\n", b"550 5.1.1 unknown\r\n", b"554 5.5.1 no valid recipients\r\n"],
                   "DATA": [b"250 ok\r\n", b"250 ok\r\n", b"554 5.7.1 no\r\n"],
                   "EOD": [b"250 ok\r\n", b"250 ok\r\n", b"354 go\r\n"]}[refused]
        for answer in answers:
            seen.append(await reader.readline())
            writer.write(answer)
            if not pipelining and answer[:1] != b"2":
                break
        if refused == "EOD":
            await read_message(reader)
            writer.write(b"552 5.3.4 too big\r\n")
        for reply in (b"250 reset\r\n", b"250 ok\r\n", b"250 ok\r\n", b"354 go\r\n"):
            seen.append(await reader.readline())
            writer.write(reply)
        await read_message(reader)
        writer.write(b"250 2.0.0 queued\r\n")
        seen.append(await reader.readline())
        writer.write(b"221 bye\r\n")

    seen, (first, second) = asyncio.run(converse(script, [("x@d.test", MESSAGE), ("y@d.test", MESSAGE)]))
    assert isinstance(first, DeliveryError) and first.stage == ("DATA" if refused == "EOD" else refused)
    assert second.reply == "250 2.0.0 queued"
    assert seen[-5:] == [b"RSET\r\n", b"MAIL FROM:<a@b.test>\r\n", b"RCPT TO:<y@d.test>\r\n", b"DATA\r\n", b"QUIT\r\n"]


def answering_the_pipelined_group(replies: bytes) -> Script:
    """A server that offers PIPELINING, reads MAIL, RCPT and DATA, answers
    ``replies``, then records whatever else comes until the client closes."""
    async def script(reader, writer, seen):
        await greet(reader, writer, EHLO_PIPELINING)
        for _ in range(3):
            await reader.readline()
        writer.write(replies)
        seen.append(await reader.read())
    return script


def test_a_421_ends_the_session_without_rset_or_quit():
    # The server closes after a 421 (RFC 5321 3.8): nothing more is said.
    seen, result = asyncio.run(talk(answering_the_pipelined_group(b"250 ok\r\n421 4.3.2 closing\r\n")))
    assert isinstance(result, DeliveryError) and (result.code, result.stage) == (421, "RCPT")
    assert seen == [b""]


def test_a_354_to_a_pipelined_data_after_a_refused_recipient_drops_the_connection():
    # The server waits for a message that must never come: nothing more is
    # sent (not even a final dot, which could deliver an empty message).
    script = answering_the_pipelined_group(b"250 ok\r\n550 5.1.1 unknown\r\n354 go ahead\r\n")
    seen, result = asyncio.run(talk(script))
    assert isinstance(result, DeliveryError) and (result.code, result.stage) == (550, "RCPT")
    assert seen == [b""]


def test_a_malformed_reply_fails_the_stage_with_aiosmtplibs_text():
    async def script(reader, writer, seen):
        await greet(reader, writer, EHLO_PLAIN)
        await reader.readline()
        writer.write(b"hello there\r\n")
        await reader.read()

    _, result = asyncio.run(talk(script))
    assert isinstance(result, DeliveryError)
    assert (result.code, result.stage) == (-1, "MAIL")
    assert result.text == "-1 Malformed SMTP response line: hello there"


def test_a_reply_the_client_did_not_ask_for_is_not_taken_for_a_later_one():
    async def script(reader, writer, seen):
        await greet(reader, writer, EHLO_PLAIN)
        writer.write(b"250 unasked\r\n")  # before any command of the transaction
        await writer.drain()
        await asyncio.sleep(0.2)
        await reader.readline()
        writer.write(b"451 4.3.0 try later\r\n")
        await reader.read()

    _, result = asyncio.run(talk(script))
    assert isinstance(result, DeliveryError)
    assert (result.code, result.stage) == (451, "MAIL")


def test_a_server_that_goes_silent_times_out_at_the_stage_it_was_asked():
    _, result = asyncio.run(talk(answering_the_pipelined_group(b"250 ok\r\n"), timeout=0.5))
    assert isinstance(result, DeliveryError)
    assert (result.code, result.stage) == (outcome.TIMED_OUT.code, "RCPT")
    assert result.text == "timeout at RCPT: Timed out waiting for server response"


@given(st.lists(st.sampled_from([b"a", b".", b"..", b"\r", b"\n", b"\r\n", b" ", b"x.y"]), max_size=30).map(b"".join))
def test_data_block_is_what_aiosmtplib_sends_after_data(message):
    expected = PERIOD_REGEX.sub(b"..", normalize_message_line_endings(message)) + b".\r\n"
    assert data_block(message) == expected


def test_a_reply_trickled_byte_by_byte_still_times_out_once_the_timeout_is_over():
    async def script(reader, writer, seen):
        await greet(reader, writer, EHLO_PLAIN)
        await reader.readline()
        for byte in b"250 slowly, one byte at a time\r\n":
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.1)
        await reader.read()

    _, result = asyncio.run(talk(script, timeout=1.0))
    assert isinstance(result, DeliveryError)
    assert (result.code, result.stage) == (outcome.TIMED_OUT.code, "MAIL")


def test_after_a_timeout_the_rest_of_a_message_still_being_uploaded_never_reaches_the_server():
    # The server stops reading after 354; the client times out at DATA with
    # most of the message still in its buffer. Sent on after the error, the
    # final dot could make the server accept a message recorded as failed.
    big = b"x" * 998 + b"\r\n"

    async def script(reader, writer, seen):
        await greet(reader, writer, EHLO_PLAIN)
        for reply in (b"250 ok\r\n", b"250 ok\r\n", b"354 go\r\n"):
            await reader.readline()
            writer.write(reply)
        await asyncio.sleep(1.5)  # past the client's timeout, reading nothing
        rest = b""
        try:
            while chunk := await reader.read(1 << 20):
                rest += chunk
        except ConnectionResetError:
            pass
        seen.append(rest[-5:])

    seen, result = asyncio.run(talk(script, timeout=0.5, message=big * 16_000))  # 16 MB
    assert isinstance(result, DeliveryError) and result.code == outcome.TIMED_OUT.code
    assert seen != [b"\r\n.\r\n"]


def test_size_offered_without_a_limit_is_declared_and_nothing_is_refused():
    async def script(reader, writer, seen):
        await greet(reader, writer, b"250-test.invalid\r\n250 SIZE\r\n")
        for reply in (b"250 ok\r\n", b"250 ok\r\n", b"354 go\r\n"):
            seen.append(await reader.readline())
            writer.write(reply)
        await read_message(reader)
        writer.write(b"250 queued\r\n")
        await reader.readline()
        writer.write(b"221 bye\r\n")

    seen, result = asyncio.run(talk(script, message=b"x" * 5000 + b"\r\n"))
    assert result.reply == "250 queued"
    assert seen[0] == b"MAIL FROM:<a@b.test> SIZE=5002\r\n"


async def read_bdat(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """A BDAT command and its chunk: (the command line, the chunk)."""
    line = await reader.readline()
    return line, await reader.readexactly(int(line.split()[1]))


def test_with_chunking_offered_the_message_goes_as_one_bdat_in_the_write_of_mail_and_rcpt():
    message = b"Subject: t\n\n.leading dot\nbody\n"  # lone LFs, and a line a DATA upload would stuff

    async def script(reader, writer, seen):
        await greet(reader, writer, EHLO_CHUNKING)
        # No reply until the whole group is here: a client that waited for
        # a reply before the chunk would time out.
        seen.append(await reader.readline())
        seen.append(await reader.readline())
        seen.extend(await read_bdat(reader))
        writer.write(b"250 sender ok\r\n250 rcpt ok\r\n250 2.0.0 queued as Z\r\n")
        seen.append(await reader.readline())
        writer.write(b"221 bye\r\n")

    seen, result = asyncio.run(talk(script, timeout=2, message=message))
    chunk = b"Subject: t\r\n\r\n.leading dot\r\nbody\r\n"
    assert seen == [b"MAIL FROM:<a@b.test> SIZE=%d\r\n" % len(chunk), b"RCPT TO:<c@d.test>\r\n",
                    b"BDAT %d LAST\r\n" % len(chunk), chunk, b"QUIT\r\n"]
    assert result.reply == "250 2.0.0 queued as Z" and result.bytecount == len(message)


@pytest.mark.parametrize("ehlo", [b"250-test.invalid\r\n250 CHUNKING\r\n", EHLO_CHUNKING], ids=["no-pipelining", "off"])
def test_chunking_without_pipelining_or_turned_off_sends_data(ehlo):
    async def script(reader, writer, seen):
        await greet(reader, writer, ehlo)
        pipelined = b"PIPELINING" in ehlo
        for reply in (b"250 ok\r\n", b"250 ok\r\n", b"354 go\r\n"):
            seen.append((await reader.readline()).split(b" SIZE=")[0].rstrip(b"\r\n"))
            if not pipelined:
                writer.write(reply)
        if pipelined:
            writer.write(b"250 ok\r\n250 ok\r\n354 go\r\n")
        await read_message(reader)
        writer.write(b"250 queued\r\n")
        await reader.readline()
        writer.write(b"221 bye\r\n")

    seen, [result] = asyncio.run(converse(script, [("c@d.test", MESSAGE)], chunking=b"PIPELINING" not in ehlo))
    assert seen == [b"MAIL FROM:<a@b.test>", b"RCPT TO:<c@d.test>", b"DATA"]
    assert result.reply == "250 queued"


@pytest.mark.parametrize("refused", ["MAIL", "RCPT", "BDAT"])
def test_after_a_refusal_of_a_chunked_message_the_next_rides_on_the_same_connection_after_rset(refused):
    async def script(reader, writer, seen):
        await greet(reader, writer, EHLO_CHUNKING)
        answers = {"MAIL": b"550 5.7.1 no\r\n503 5.5.1 no sender\r\n503 5.5.1 no recipient\r\n",
                   "RCPT": b"250 ok\r\n550 5.1.1 unknown\r\n554 5.5.1 no valid recipients\r\n",
                   "BDAT": b"250 ok\r\n250 ok\r\n554 5.7.1 refused\r\n"}[refused]
        await reader.readline()
        await reader.readline()
        await read_bdat(reader)  # the chunk is read whatever the replies (RFC 3030)
        writer.write(answers)
        seen.append(await reader.readline())
        writer.write(b"250 reset\r\n")
        seen.append(await reader.readline())
        seen.append(await reader.readline())
        seen.append((await read_bdat(reader))[0])
        writer.write(b"250 ok\r\n250 ok\r\n250 2.0.0 queued\r\n")
        seen.append(await reader.readline())
        writer.write(b"221 bye\r\n")

    seen, (first, second) = asyncio.run(converse(script, [("x@d.test", MESSAGE), ("y@d.test", MESSAGE)]))
    assert isinstance(first, DeliveryError)
    assert (first.stage, first.permanent) == ({"BDAT": "DATA"}.get(refused, refused), True)
    assert second.reply == "250 2.0.0 queued"
    assert seen == [b"RSET\r\n", b"MAIL FROM:<a@b.test> SIZE=%d\r\n" % len(MESSAGE), b"RCPT TO:<y@d.test>\r\n",
                    b"BDAT %d LAST\r\n" % len(MESSAGE), b"QUIT\r\n"]


def test_a_chunked_message_over_the_offered_size_is_refused_before_a_byte_is_sent():
    async def script(reader, writer, seen):
        await greet(reader, writer, EHLO_CHUNKING)
        seen.append(await reader.readline())
        writer.write(b"221 bye\r\n")

    seen, result = asyncio.run(talk(script, message=b"x" * 100_000 + b"\r\n"))
    assert isinstance(result, DeliveryError) and (result.code, result.stage) == (552, "MAIL")
    assert "Message size 100002 exceeds the fixed limit 100000" in result.text
    assert seen == [b"QUIT\r\n"]


async def converse_behind(script: Script, recipients: list[str], timeout: float = 5.0,
                          messages: dict[str, bytes] | None = None) -> tuple[list[bytes], list[object], list[bool]]:
    """As the node's connections do: each message sent behind the one in
    flight where the session can (one deep); (what the server saw, the
    Delivered or DeliveryError of each send, whether each went behind)."""
    loop = asyncio.get_running_loop()
    sends: list[asyncio.Task[object]] = []
    behind: list[bool] = []
    results: list[object] = []
    async with scripted(script, timeout) as (session, seen):

        async def send(recipient: str) -> object:
            try:
                return await session.send("a@b.test", recipient, (messages or {}).get(recipient, MESSAGE),
                                          on_written=send_behind)
            except DeliveryError as e:
                return e

        def send_behind() -> bool:
            if len(sends) < len(recipients) and len(sends) == len(behind) and session.can_send_behind():
                behind.append(True)
                sends.append(loop.create_task(send(recipients[len(sends)])))
                return True
            return False

        while len(results) < len(recipients):
            if len(sends) == len(results):
                behind.append(False)
                sends.append(loop.create_task(send(recipients[len(sends)])))
            results.append(await sends[len(results)])
            send_behind()
    return seen, results, behind


async def read_group(reader: asyncio.StreamReader, seen: list[bytes]) -> None:
    """One chunked transaction as written: MAIL, RCPT and BDAT (an RSET first, behind another)."""
    while not (line := await reader.readline()).startswith(b"BDAT") and line:
        seen.append(line.split(b" SIZE=")[0].rstrip(b"\r\n"))
    seen.append(line.split()[0])
    await reader.readexactly(int(line.split()[1]))


def test_with_chunking_the_next_message_goes_out_behind_the_one_in_flight_before_its_replies():
    async def script(reader, writer, seen):
        await greet(reader, writer, EHLO_CHUNKING)
        # Nothing is answered until both transactions are here: a client that
        # waited for the first one's replies would time out.
        await read_group(reader, seen)
        await read_group(reader, seen)
        writer.write(b"250 ok\r\n250 ok\r\n250 2.0.0 queued as A\r\n")
        await read_group(reader, seen)  # the third goes behind the second once the first is read
        writer.write(b"250 reset\r\n250 ok\r\n250 ok\r\n250 2.0.0 queued as B\r\n")
        writer.write(b"250 reset\r\n250 ok\r\n250 ok\r\n250 2.0.0 queued as C\r\n")
        seen.append(await reader.readline())
        writer.write(b"221 bye\r\n")

    seen, results, behind = asyncio.run(converse_behind(script, ["x@d.test", "y@d.test", "z@d.test"], timeout=3))
    assert [r.reply for r in results] == ["250 2.0.0 queued as A", "250 2.0.0 queued as B", "250 2.0.0 queued as C"]
    assert behind == [False, True, True]
    assert seen == [b"MAIL FROM:<a@b.test>", b"RCPT TO:<x@d.test>", b"BDAT",
                    b"RSET", b"MAIL FROM:<a@b.test>", b"RCPT TO:<y@d.test>", b"BDAT",
                    b"RSET", b"MAIL FROM:<a@b.test>", b"RCPT TO:<z@d.test>", b"BDAT", b"QUIT\r\n"]


def test_a_refusal_of_the_message_in_flight_leaves_the_one_behind_it_to_be_delivered():
    async def script(reader, writer, seen):
        await greet(reader, writer, EHLO_CHUNKING)
        await read_group(reader, seen)
        await read_group(reader, seen)
        writer.write(b"250 ok\r\n550 5.1.1 unknown\r\n554 5.5.1 no valid recipients\r\n")
        writer.write(b"250 reset\r\n250 ok\r\n250 ok\r\n250 2.0.0 queued\r\n")
        seen.append(await reader.readline())  # no RSET of its own: the one behind carried it
        writer.write(b"221 bye\r\n")

    seen, (first, second), behind = asyncio.run(converse_behind(script, ["x@d.test", "y@d.test"], timeout=3))
    assert isinstance(first, DeliveryError) and (first.code, first.stage, first.permanent) == (550, "RCPT", True)
    assert second.reply == "250 2.0.0 queued" and behind == [False, True]
    assert seen[-2:] == [b"BDAT", b"QUIT\r\n"]


@pytest.mark.parametrize("end", ["421", "silence"])
def test_when_the_message_in_flight_ends_the_connection_the_one_behind_is_not_sent_or_dropped_at_mail(end):
    async def script(reader, writer, seen):
        await greet(reader, writer, EHLO_CHUNKING)
        await read_group(reader, seen)
        await read_group(reader, seen)
        if end == "421":
            writer.write(b"250 ok\r\n250 ok\r\n421 4.3.2 shutting down\r\n")
        await reader.read()  # until the client drops it

    _, (first, second), behind = asyncio.run(converse_behind(script, ["x@d.test", "y@d.test"], timeout=1))
    assert behind == [False, True]
    assert isinstance(first, DeliveryError) and not first.permanent
    assert (first.code, first.stage) == ((421, "DATA") if end == "421" else (outcome.TIMED_OUT.code, "MAIL"))
    assert isinstance(second, DeliveryError) and (second.stage, second.permanent) == ("MAIL", False)
    if end == "421":
        # After its 421 the server reads nothing more: the one behind was no attempt.
        assert isinstance(second, NotSent) and "ended the connection before this message" in second.text
    else:
        # Its chunk was sent, and the server may have read it: an attempt, retried.
        assert not isinstance(second, NotSent)
        assert second.code == outcome.CONNECTION_LOST.code and "connection dropped at MAIL" in second.text


def test_with_data_a_message_behind_one_that_timed_out_was_never_sent():
    async def script(reader, writer, seen):
        await greet(reader, writer, EHLO_PIPELINING)
        for _ in range(3):
            await reader.readline()
        writer.write(b"250 ok\r\n250 ok\r\n354 go\r\n")
        await read_message(reader)
        for _ in range(4):
            seen.append((await reader.readline()).split(b" SIZE=")[0].rstrip(b"\r\n"))
        await reader.read()  # silence until the client drops it

    seen, (first, second), behind = asyncio.run(converse_behind(script, ["x@d.test", "y@d.test"], timeout=1))
    assert behind == [False, True] and seen == [b"RSET", b"MAIL FROM:<a@b.test>", b"RCPT TO:<y@d.test>", b"DATA"]
    assert isinstance(first, DeliveryError) and first.code == outcome.TIMED_OUT.code
    assert isinstance(second, NotSent)


def test_with_pipelining_and_data_the_next_message_goes_out_behind_the_end_of_the_one_in_flight():
    async def script(reader, writer, seen):
        await greet(reader, writer, EHLO_PIPELINING)
        for _ in range(3):
            seen.append((await reader.readline()).split(b" SIZE=")[0].rstrip(b"\r\n"))
        writer.write(b"250 ok\r\n250 ok\r\n354 go\r\n")
        seen.append(await read_message(reader))
        # No reply to the first message yet: the second's commands come anyway.
        for _ in range(4):
            seen.append((await reader.readline()).split(b" SIZE=")[0].rstrip(b"\r\n"))
        writer.write(b"250 queued A\r\n250 reset\r\n250 ok\r\n250 ok\r\n354 go\r\n")
        seen.append(await read_message(reader))  # its message only after its own 354
        writer.write(b"250 queued B\r\n")
        seen.append(await reader.readline())
        writer.write(b"221 bye\r\n")

    seen, results, behind = asyncio.run(converse_behind(script, ["x@d.test", "y@d.test"], timeout=3))
    assert [r.reply for r in results] == ["250 queued A", "250 queued B"] and behind == [False, True]
    assert seen == [b"MAIL FROM:<a@b.test>", b"RCPT TO:<x@d.test>", b"DATA", MESSAGE,
                    b"RSET", b"MAIL FROM:<a@b.test>", b"RCPT TO:<y@d.test>", b"DATA", MESSAGE, b"QUIT\r\n"]


def test_the_end_of_a_message_and_the_start_of_the_one_behind_it_go_in_one_send(monkeypatch):
    # One send a message instead of two, and one read for the server: the
    # message's upload waits for the commands of the one behind it, which
    # start in the callback scheduled just before.
    sends: list[bytes] = []
    taken_over = Link.__init__

    def recording(self, transport, *args, **kwargs):
        write = transport.write
        transport.write = lambda data: (sends.append(bytes(data)), write(data))[1]
        taken_over(self, transport, *args, **kwargs)

    monkeypatch.setattr(Link, "__init__", recording)
    test_with_pipelining_and_data_the_next_message_goes_out_behind_the_end_of_the_one_in_flight()
    upload = data_block(MESSAGE)
    assert [w for w in sends if upload in w] == [upload + b"RSET\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<y@d.test>\r\nDATA\r\n",
                                                 upload]


@pytest.mark.parametrize("chunking", [True, False], ids=["bdat", "data"])
def test_a_message_whose_follower_never_comes_still_goes_out_at_the_next_turn(chunking):
    # on_written said a message would follow at once, and none did (it
    # failed before its first command): the held end of this one is not kept
    # waiting for it.
    async def script(reader, writer, seen):
        await greet(reader, writer, EHLO_CHUNKING if chunking else EHLO_PIPELINING)
        if chunking:
            await read_group(reader, seen)
            writer.write(b"250 ok\r\n250 ok\r\n250 queued\r\n")
        else:
            for _ in range(3):
                seen.append((await reader.readline()).split(b" SIZE=")[0].rstrip(b"\r\n"))
            writer.write(b"250 ok\r\n250 ok\r\n354 go\r\n")
            seen.append(await read_message(reader))
            writer.write(b"250 queued\r\n")
        seen.append(await reader.readline())
        writer.write(b"221 bye\r\n")

    async def go() -> object:
        async with scripted(script, 2.0, chunking) as (session, _):
            return await session.send("a@b.test", "c@d.test", MESSAGE, on_written=lambda: True)

    assert asyncio.run(go()).reply == "250 queued"


def test_a_data_refused_before_the_message_sends_nothing_behind_it():
    async def script(reader, writer, seen):
        await greet(reader, writer, EHLO_PIPELINING)
        for _ in range(3):
            await reader.readline()
        writer.write(b"250 ok\r\n250 ok\r\n554 5.5.1 no\r\n")
        seen.append((await reader.readline()).rstrip(b"\r\n"))  # the next one's own RSET, after the refusal
        writer.write(b"250 reset\r\n")
        for _ in range(3):
            seen.append((await reader.readline()).split(b" SIZE=")[0].rstrip(b"\r\n"))
        writer.write(b"250 ok\r\n250 ok\r\n354 go\r\n")
        await read_message(reader)
        writer.write(b"250 queued\r\n")
        seen.append(await reader.readline())
        writer.write(b"221 bye\r\n")

    seen, (first, second), behind = asyncio.run(converse_behind(script, ["x@d.test", "y@d.test"], timeout=3))
    assert isinstance(first, DeliveryError) and first.stage == "DATA" and behind == [False, False]
    assert second.reply == "250 queued"
    assert seen == [b"RSET", b"MAIL FROM:<a@b.test>", b"RCPT TO:<y@d.test>", b"DATA", b"QUIT\r\n"]


def test_without_pipelining_no_message_goes_behind_another():
    async def script(reader, writer, seen):
        await greet(reader, writer, EHLO_PLAIN)
        for _ in range(2):
            for reply in (b"250 ok\r\n", b"250 ok\r\n", b"354 go\r\n"):
                seen.append((await reader.readline()).rstrip(b"\r\n"))
                writer.write(reply)
            await read_message(reader)
            writer.write(b"250 queued\r\n")
        seen.append(await reader.readline())
        writer.write(b"221 bye\r\n")

    seen, results, behind = asyncio.run(converse_behind(script, ["x@d.test", "y@d.test"], timeout=3))
    assert [r.reply for r in results] == ["250 queued", "250 queued"] and behind == [False, False]
    assert b"RSET" not in seen


def test_a_refusal_of_the_message_ahead_while_the_one_behind_is_still_uploading_keeps_the_connection():
    big = b"Subject: big\r\n\r\n" + b"x" * 998 + b"\r\n"
    big = big * 8000  # 8 MB: more than the socket buffers hold, so its end is still unsent

    async def script(reader, writer, seen):
        await greet(reader, writer, b"250-test.invalid\r\n250-PIPELINING\r\n250 CHUNKING\r\n")
        await read_group(reader, seen)
        await asyncio.sleep(0.2)  # the one behind fills the buffers meanwhile
        writer.write(b"250 ok\r\n550 5.1.1 unknown\r\n554 5.5.1 no valid recipients\r\n")
        await read_group(reader, seen)
        writer.write(b"250 reset\r\n250 ok\r\n250 ok\r\n250 2.0.0 queued\r\n")
        seen.append(await reader.readline())
        writer.write(b"221 bye\r\n")

    seen, (first, second), behind = asyncio.run(
        converse_behind(script, ["x@d.test", "y@d.test"], timeout=5, messages={"y@d.test": big}))
    assert behind == [False, True]
    # Its own bytes were all sent: the refusal leaves the dialogue known, and
    # the unsent bytes are the next message's, which goes on.
    assert isinstance(first, DeliveryError) and (first.code, first.stage) == (550, "RCPT")
    assert not isinstance(second, DeliveryError), second.text
    assert second.reply == "250 2.0.0 queued"
    assert seen[-1] == b"QUIT\r\n"


@pytest.mark.parametrize("rset", [b"421 4.3.2 closing\r\n", b"502 5.5.2 RSET not here\r\n"])
def test_the_reply_to_the_rset_of_a_message_behind_is_no_refusal_of_it(rset):
    async def script(reader, writer, seen):
        await greet(reader, writer, EHLO_CHUNKING)
        await read_group(reader, seen)
        await read_group(reader, seen)
        writer.write(b"250 ok\r\n250 ok\r\n250 2.0.0 queued as A\r\n" + rset)
        if rset.startswith(b"421"):
            await reader.read()
            return
        writer.write(b"250 ok\r\n250 ok\r\n250 2.0.0 queued as B\r\n")
        seen.append(await reader.readline())
        writer.write(b"221 bye\r\n")

    _, (first, second), behind = asyncio.run(converse_behind(script, ["x@d.test", "y@d.test"], timeout=3))
    assert first.reply == "250 2.0.0 queued as A" and behind == [False, True]
    if rset.startswith(b"421"):
        assert isinstance(second, NotSent)  # the server closes: it read nothing after its 421
    else:
        assert second.reply == "250 2.0.0 queued as B"  # the reply to MAIL says the transaction began
