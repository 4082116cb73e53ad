"""What copiamail.smtp.session and copiamail.smtp.link rely on inside aiosmtplib.

aiosmtplib opens each connection (connect, greeting, EHLO, STARTTLS, AUTH);
then ``Link`` takes its transport over and reads the replies itself, the way
aiosmtplib's ``SMTPProtocol`` reads them. None of that is aiosmtplib's public
API, so setup.cfg pins its major version, and every test here fails with a
message naming the aiosmtplib internal that changed: revise ``Link`` (and
``data_block``) to match before moving the pin.
"""

from __future__ import annotations

import asyncio
import gc
import inspect

import aiosmtplib
import aiosmtplib.protocol
import pytest
from aiosmtplib.protocol import SMTPProtocol

from copiamail.smtp import link as smtp_link
from copiamail.smtp.link import Link, data_block

PINNED_MAJOR = 5  # setup.cfg: aiosmtplib>=5.1,<6


def changed(internal: str, what: str) -> str:
    """The message of a failed check: which internal changed, and how."""
    return (f"aiosmtplib {aiosmtplib.__version__}: {internal} is not what copiamail.smtp relies on "
            f"({what}); revise Link before moving the aiosmtplib pin in setup.cfg")


def test_the_installed_aiosmtplib_is_the_pinned_major_version():
    major = int(aiosmtplib.__version__.split(".")[0])
    assert major == PINNED_MAJOR, changed("the version", f"major {major}, pinned {PINNED_MAJOR}")


# --- the transport Link takes over -----------------------------------------------------


async def _stub_server() -> tuple[asyncio.base_events.Server, list[bytes]]:
    """An SMTP server that greets, answers EHLO (PIPELINING, SIZE) and then
    answers every command with 250; what it received."""
    received: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 stub.invalid ESMTP\r\n")
        while line := await reader.readline():
            received.append(line)
            if line.upper().startswith(b"EHLO"):
                writer.write(b"250-stub.invalid\r\n250-PIPELINING\r\n250 SIZE 1000\r\n")
            else:
                writer.write(b"250 2.0.0 ok\r\n")
        writer.close()

    return await asyncio.start_server(serve, "127.0.0.1", 0), received


def test_the_connection_after_ehlo_can_be_taken_over_from_smtp_protocol_transport():
    async def run() -> None:
        server, received = await _stub_server()
        port = server.sockets[0].getsockname()[1]
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=5, start_tls=False, local_hostname="[127.0.0.1]")
        await smtp.connect()
        await smtp.ehlo()
        assert isinstance(getattr(smtp, "protocol", None), SMTPProtocol), changed(
            "SMTP.protocol", "the SMTPProtocol of the open connection")
        transport = getattr(smtp.protocol, "transport", None)
        assert isinstance(transport, asyncio.Transport), changed(
            "SMTPProtocol.transport", f"the connection's asyncio transport, got {transport!r}")
        buffered = getattr(smtp.protocol, "_buffer", None)
        assert buffered is not None and len(buffered) == 0, changed(
            "SMTPProtocol._buffer", "empty once a reply has been read: nothing of the server's is held back")
        assert smtp.supports_extension("pipelining") and smtp.esmtp_extensions.get("size") == "1000", changed(
            "SMTP.supports_extension / SMTP.esmtp_extensions", "the extensions of the EHLO reply, by lower-case name")

        link = Link(transport, pipelining=True, size=1000)
        del smtp
        gc.collect()
        assert not transport.is_closing(), changed(
            "SMTP / SMTPProtocol finalization", "a dropped SMTP object must not close the transport taken over")
        link.write(b"RSET\r\nNOOP\r\n", 2)
        assert [await link.reply(5), await link.reply(5)] == [(250, "2.0.0 ok")] * 2
        link.write(b"QUIT\r\n", 1)
        await link.reply(5)
        link.close()
        server.close()
        await server.wait_closed()
        assert received[-3:] == [b"RSET\r\n", b"NOOP\r\n", b"QUIT\r\n"]

    asyncio.run(run())


def test_neither_smtp_nor_its_protocol_closes_anything_when_collected():
    for cls in (aiosmtplib.SMTP, SMTPProtocol):
        finalizers = [c.__name__ for c in cls.__mro__ if "__del__" in vars(c)]
        assert not finalizers, changed(f"{cls.__name__}.__del__", f"no finalizer (found in {finalizers})")


# --- the reply parser Link repeats -------------------------------------------------------


class _Transport(asyncio.Transport):
    """Enough of a transport for a protocol that is never connected."""

    def __init__(self) -> None:
        super().__init__()
        self.protocol: asyncio.BaseProtocol | None = None

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default

    def write(self, data: bytes | bytearray | memoryview) -> None:
        pass


REPLIES = [
    b"250 OK\r\n",
    b"250-first\r\n250-second\r\n250 last\r\n",
    b"250 line feed only\n",
    b"550 5.1.1 <x@y.test>: unknown \t \r\n",
    b"354\r\n",
    b"250-a\r\n250 b\r\n250 the next reply\r\n",
    b"250 caf\xe9 \xff\r\n",
    b"250-not yet\r\n250 b",
    b"250 not yet",
    b"hello there\r\n",
    b"25x bad code\r\n",
    b"250-" + b"x" * 9000 + b"\r\n250 end\r\n",
]


def _aiosmtplib_reads(data: bytes) -> tuple[object, bytes]:
    protocol = SMTPProtocol(asyncio.new_event_loop())
    buffer = getattr(protocol, "_buffer", None)
    read = getattr(protocol, "_read_response_from_buffer", None)
    assert isinstance(buffer, bytearray) and read is not None, changed(
        "SMTPProtocol._buffer / _read_response_from_buffer", "the buffer of received bytes and the reply parser")
    buffer.extend(data)
    try:
        response = read()
    except aiosmtplib.SMTPResponseException as e:
        return ("refused", e.code, e.message), b""
    if response is None:
        return None, bytes(buffer)
    return (response.code, response.message), bytes(buffer)


def _link_reads(data: bytes) -> tuple[object, bytes]:
    link = Link(_Transport(), pipelining=False, size=None)
    link._buffer += data
    parsed = link._parse(0)
    if link._bad is not None:
        return ("refused", link._bad.code, link._bad.message), b""
    if parsed is None:
        return None, bytes(link._buffer)
    end, reply = parsed
    return reply, bytes(link._buffer[end:])


@pytest.mark.parametrize("data", REPLIES)
def test_link_reads_a_reply_as_smtp_protocol_reads_it(data):
    expected = _aiosmtplib_reads(data)
    assert _link_reads(data) == expected, changed(
        "SMTPProtocol._read_response_from_buffer", f"{data[:40]!r} read as {expected!r}")


def test_the_limits_on_reply_length_are_aiosmtplibs():
    assert getattr(aiosmtplib.protocol, "MAX_LINE_LENGTH", None) == smtp_link.MAX_LINE, changed(
        "protocol.MAX_LINE_LENGTH", f"{smtp_link.MAX_LINE} bytes")
    assert getattr(aiosmtplib.protocol, "MAX_RESPONSE_LENGTH", None) == smtp_link.MAX_REPLY, changed(
        "protocol.MAX_RESPONSE_LENGTH", f"{smtp_link.MAX_REPLY} bytes")


def test_a_reply_too_long_in_all_is_refused_in_aiosmtplibs_words():
    loop = asyncio.new_event_loop()
    protocol = SMTPProtocol(loop)
    protocol.connection_made(_Transport())
    protocol.data_received((b"250-" + b"x" * 100 + b"\r\n") * (smtp_link.MAX_REPLY // 100))
    error = protocol._response_waiter.exception()
    assert isinstance(error, aiosmtplib.SMTPResponseException), changed("SMTPProtocol.data_received", repr(error))
    assert (error.code, error.message) == (smtp_link.UNREADABLE, smtp_link.TOO_LONG), changed(
        "SMTPProtocol.data_received", f"a reply over MAX_RESPONSE_LENGTH refused as ({error.code}, {error.message!r})")
    link = Link(_Transport(), pipelining=False, size=None)
    link.write(b"NOOP\r\n", 1)
    link.data_received((b"250-" + b"x" * 100 + b"\r\n") * (smtp_link.MAX_REPLY // 100))
    assert link._bad is not None and (link._bad.code, link._bad.message) == (error.code, error.message)
    loop.close()


def test_a_reply_nobody_asked_for_is_dropped_as_aiosmtplib_drops_it():
    loop = asyncio.new_event_loop()
    protocol = SMTPProtocol(loop)
    protocol.connection_made(_Transport())
    assert hasattr(protocol, "_response_pending"), changed(
        "SMTPProtocol._response_pending", "whether a reply is awaited; data otherwise dropped")
    protocol._response_pending = False  # the greeting was read, no command written
    protocol.data_received(b"250 stray\r\n")
    assert len(protocol._buffer) == 0 and not protocol._response_waiter.done(), changed(
        "SMTPProtocol.data_received", "a reply when none is awaited is dropped")
    link = Link(_Transport(), pipelining=False, size=None)
    link.data_received(b"250 stray\r\n")
    assert link.owed == 0 and len(link._buffer) == 0
    loop.close()


# --- its words for a lost connection and a timeout ---------------------------------------


def test_aiosmtplibs_words_for_an_end_of_file_and_a_lost_connection():
    loop = asyncio.new_event_loop()
    for end, words in (("eof_received", smtp_link.UNEXPECTED_EOF), ("connection_lost", smtp_link.CONNECTION_LOST)):
        protocol = SMTPProtocol(loop)
        protocol.connection_made(_Transport())
        getattr(protocol, end)(*(() if end == "eof_received" else (None,)))
        error = protocol._response_waiter.exception()
        assert isinstance(error, aiosmtplib.SMTPServerDisconnected) and error.message == words, changed(
            f"SMTPProtocol.{end}", f"SMTPServerDisconnected({words!r}), got {error!r}")
    loop.close()


def test_aiosmtplibs_words_for_a_reply_that_does_not_come():
    async def run() -> None:
        protocol = SMTPProtocol(asyncio.get_running_loop())
        protocol.connection_made(_Transport())
        with pytest.raises(aiosmtplib.SMTPReadTimeoutError) as info:
            await protocol.read_response(timeout=0.01)
        assert info.value.message == smtp_link.NO_REPLY, changed(
            "SMTPProtocol.read_response", f"SMTPReadTimeoutError({smtp_link.NO_REPLY!r}), got {info.value!r}")

    asyncio.run(run())


def test_data_block_uses_aiosmtplibs_line_ending_and_dot_rules():
    normalize = getattr(aiosmtplib.protocol, "normalize_message_line_endings", None)
    period = getattr(aiosmtplib.protocol, "PERIOD_REGEX", None)
    assert normalize is not None and period is not None, changed(
        "protocol.normalize_message_line_endings / PERIOD_REGEX", "how a message is written after DATA")
    for message in (b"a\nb\rc\r\n.d\n..e", b"", b".", b"x\r\n.\r\n"):
        assert data_block(message) == period.sub(b"..", normalize(message)) + b".\r\n", changed(
            "protocol.normalize_message_line_endings / PERIOD_REGEX", f"{message!r}")


# --- the public calls session makes, by name and keyword --------------------------------


@pytest.mark.parametrize("method, parameters", [
    ("__init__", ["hostname", "port", "timeout", "start_tls", "tls_context", "source_address", "local_hostname"]),
    ("connect", []),
    ("ehlo", []),
    ("helo", []),
    ("starttls", ["server_hostname"]),
    ("login", ["username", "password"]),
    ("quit", ["timeout"]),
    ("close", []),
    ("get_transport_info", ["key"]),
    ("supports_extension", ["extension"]),
])
def test_the_smtp_calls_session_makes_keep_their_names(method, parameters):
    fn = getattr(aiosmtplib.SMTP, method, None)
    assert fn is not None, changed(f"SMTP.{method}", "a method session calls")
    names = list(inspect.signature(fn).parameters)
    missing = [p for p in parameters if p not in names]
    assert not missing, changed(f"SMTP.{method}", f"parameters {parameters}, missing {missing}")


def test_the_smtp_attributes_session_reads_and_sets():
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", local_hostname="[127.0.0.1]")
    assert smtp.is_connected is False, changed("SMTP.is_connected", "False before connect")
    assert isinstance(smtp.esmtp_extensions, dict), changed("SMTP.esmtp_extensions", "a dict")
    smtp.local_hostname = "[192.0.2.1]"
    assert smtp.local_hostname == "[192.0.2.1]", changed("SMTP.local_hostname", "settable")


@pytest.mark.parametrize("error, bases, attributes", [
    # In the order SmtpSession._open catches them: each must still be what it was.
    (aiosmtplib.SMTPConnectTimeoutError, [aiosmtplib.SMTPConnectError, aiosmtplib.SMTPTimeoutError], ["message"]),
    (aiosmtplib.SMTPConnectResponseError, [aiosmtplib.SMTPConnectError, aiosmtplib.SMTPResponseException],
     ["code", "message"]),
    (aiosmtplib.SMTPConnectError, [aiosmtplib.SMTPException], ["message"]),
    (aiosmtplib.SMTPTimeoutError, [aiosmtplib.SMTPException], ["message"]),
    (aiosmtplib.SMTPServerDisconnected, [aiosmtplib.SMTPException], ["message"]),
    (aiosmtplib.SMTPHeloError, [aiosmtplib.SMTPResponseException], ["code", "message"]),
    (aiosmtplib.SMTPResponseException, [aiosmtplib.SMTPException], ["code", "message"]),
])
def test_the_errors_session_catches_keep_their_kinds_and_attributes(error, bases, attributes):
    for base in bases:
        assert issubclass(error, base), changed(error.__name__, f"a kind of {base.__name__}")
    made = error(421, "x") if "code" in attributes else error("x")
    missing = [a for a in attributes if not hasattr(made, a)]
    assert not missing, changed(error.__name__, f"attributes {attributes}, missing {missing}")
