"""A parsed :class:`~copiamail.jobfile.model.Job` as the bytes of an RFC 5322 message.

:func:`build_message` returns the whole message with CRLF line endings, ready for
SMTP DATA (not dot-stuffed: the SMTP client does that).

Headers, in this order: ``From`` (``$email_from``, else the envelope sender),
``To`` (EMAILTO_LIST, else the recipient as written), ``Cc`` (EMAILCC_LIST,
when set), ``Subject`` (only when the job has one; non-ASCII is written as RFC
2047 encoded words, B or Q as ``$email_charset`` asks), ``Date`` (``now`` in
local time with its offset), ``Message-ID`` (``<identity@sender-domain>``: the
same for every build of the job, so a retry is recognisably the same message),
``MIME-Version``, ``X-Mailer: copiamail VERSION``, then the job's
``$email_header`` lines in file order. A job header named From, To, Cc,
Subject, Date, Message-ID or X-Mailer replaces ours (the last one counts;
``X-Mailer none`` drops it); one naming
MIME-Version, Content-Type or Content-Transfer-Encoding is refused, since the
engine writes those to match the body; any other is added. A header name or
value holding CR, LF or NUL is refused (``BAD_HEADER``).

Body: the ``$email_text`` lines (each ending in a line break) and the contents of
the ``$email_body`` files (UTF-8, else cp1252; added as they are) in file order,
with line breaks made CRLF and a final line break added when missing. It is
text/html when ``<html`` (any case) occurs in its first three lines or one of its
files ends in ``.htm``/``.html``, else text/plain. Charset: ``$email_charset``
(default UTF-8), written under its MIME name; text it cannot encode fails the
job (``BAD_CHARSET``). Transfer encoding: 7bit for ASCII with lines of at most
998 bytes, else quoted-printable or base64, whichever is shorter.

The ``$email_alttext``/``$email_altbody`` part makes a multipart/alternative with
the HTML body last (when neither or both are HTML: the alternative part first).
Attachments make a multipart/mixed: the body first, then each file in base64
with its given content type, else one guessed from its name, else
application/octet-stream, and ``Content-Disposition: attachment`` with its name.

Paths: a relative path is taken from ``spool_root``. Its real path (symlinks and
``..`` followed) must lie inside one of ``attachment_roots`` (real paths too; an
empty tuple means the spool root), else ``OUTSIDE_ROOTS``; a file that cannot be
read is ``MISSING_FILE``. Every error is a :class:`~copiamail.errors.JobError`
carrying its outcome code and, for a file, the job line that names it.

A single text part in UTF-8 or US-ASCII (no alternative, no attachment), the
common case, is written directly; everything else goes through the stdlib
``email`` package. Both paths share the header code.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import email.charset
import email.header
import hashlib
import mimetypes
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.message import MIMEPart
from email.policy import SMTP
from pathlib import Path, PurePath
from types import MappingProxyType

from copiamail import __version__
from copiamail.errors import JobError
from copiamail.jobfile import outcome
from copiamail.jobfile.addresses import message_id_domain
from copiamail.jobfile.files import JobFiles
from copiamail.jobfile.headers import check_header
from copiamail.jobfile.localtime import once_a_second
from copiamail.jobfile.model import Attachment, BodyItem, Job
from copiamail.jobfile.owned import engine_variables
from copiamail.jobfile.variables import GRAVE, UndefinedVariable, chained, expand

# 7bit, not the SMTP policy's 8bit: the server may lack 8BITMIME, and the
# transfer encoding is chosen here anyway.
_POLICY = SMTP.clone(cte_type="7bit")
_MAX_HEADER_LINE = 78  # RFC 5322 2.1.1: lines SHOULD be at most 78 characters

# Headers the engine writes; a job header with one of the first names replaces
# ours, one with the second kind would contradict the body and is refused.
_OUR_HEADERS = ("From", "To", "Cc", "Subject", "Date", "Message-ID", "MIME-Version", "X-Mailer")
_REPLACEABLE = MappingProxyType(
    {"from": "From", "to": "To", "cc": "Cc", "subject": "Subject", "date": "Date", "message-id": "Message-ID",
     "x-mailer": "X-Mailer"}
)
# Headers whose value holds addresses: encoded words would break them, so the
# email package writes them (it encodes display names only).
_X_MAILER = f"copiamail {__version__}"
_ADDRESS_HEADERS = frozenset({"from", "to", "cc", "bcc", "reply-to", "sender", "resent-from", "resent-to"})

_PLAIN_VALUE = re.compile(r"[\t\x20-\x7e]*\Z")
_SAFE_IDENTITY = re.compile(r"[A-Za-z0-9._-]{1,64}\Z")
# Not strftime's %a and %b: those follow the locale.
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_HTML_SUFFIXES = (".htm", ".html")
_MAX_7BIT_LINE = 998  # RFC 5322 2.1.1, without the CRLF
_ASCII_TEXT = "".join(chr(c) for c in range(32, 127)) + "\t\r\n"
_ASCII_BYTES = bytes(range(128))  # deleting these from data leaves its 8-bit bytes
# Python codecs that are not charsets a mail reader knows, though "".encode() accepts them.
_NOT_CHARSETS = frozenset({"unicode-escape", "raw-unicode-escape", "idna", "punycode", "undefined", "charmap", "utf-7"})
# Compressed files: mimetypes reports the inner type plus an encoding, but the
# bytes sent are the compressed ones.
_COMPRESSED = MappingProxyType({
    "gzip": "application/gzip", "bzip2": "application/x-bzip2", "xz": "application/x-xz",
    "compress": "application/x-compress", "br": "application/x-brotli",
})


def build_message(
    job: Job,
    *,
    spool_root: Path,
    attachment_roots: tuple[Path, ...],
    sender: str,
    now: float | None = None,
    path_map: tuple[tuple[str, str], ...] = (),
) -> bytes:
    """The job's message as bytes with CRLF line endings; raises JobError (see module doc)."""
    return _build(job, spool_root, attachment_roots, sender, now, force_email=False, path_map=path_map)


def _build(
    job: Job,
    spool_root: Path,
    attachment_roots: tuple[Path, ...],
    sender: str,
    now: float | None,
    force_email: bool,
    path_map: tuple[tuple[str, str], ...] = (),
) -> bytes:
    if not job.subject and not job.body and not job.alt and not job.attachments:
        # CopiaFacts: "each e-mail item must have at least one of a subject,
        # a body or an attachment". Most often a typo lost them.
        raise JobError("nothing to send: no $email_subject, no body and no attachment", outcome.BAD_JOB.code)
    head = _header_block(job, sender, time.time() if now is None else now)
    charset, encodable = _mime_charset(job.charset)
    files = JobFiles(spool_root, attachment_roots, path_map)
    lookup = None
    if job.env is not None:
        env = job.env

        # CopiaFacts expands `NAME in e-mail body files too (made only when a
        # file holds a grave accent).
        def lookup() -> Callable[[str], str | None]:
            return chained(job.variables, env.variables, engine_variables(job.name, sender, job.identity))
    main = _load_body(job.body, files, lookup)
    alt = _load_body(job.alt, files, lookup) if job.alt else None
    attachments = [_load_attachment(a, files) for a in job.attachments]
    cte = job.body_encoding
    if alt is None and not attachments and charset in ("utf-8", "us-ascii") and not force_email:
        return head + _simple_part(main, charset, cte)
    related_id = f"{_identity(job)}@{message_id_domain(sender)}"
    return head + _mime_part(main, alt, attachments, charset, encodable, _identity(job), cte, related_id)


# --- headers -----------------------------------------------------------------


def _header_block(job: Job, sender: str, now: float) -> bytes:
    ours: dict[str, str | None] = {
        "From": job.from_header if job.from_header is not None else sender,
        "To": job.to_list or (job.to_header if job.to_header is not None else job.address),
        "Cc": job.cc_list,
        "Subject": job.subject,
        "Date": _date(now),
        "Message-ID": f"<{_identity(job)}@{message_id_domain(sender)}>",
        "MIME-Version": "1.0",
        "X-Mailer": _X_MAILER,
    }
    extra: list[tuple[str, str]] = []
    for name, value in job.headers:
        check_header(name, value)
        key = name.lower()
        if key == "x-mailer" and value.lower() == "none":
            ours["X-Mailer"] = None  # CopiaFacts: "none" suppresses the X-Mailer header
        elif key in _REPLACEABLE:
            ours[_REPLACEABLE[key]] = value
        else:
            extra.append((name, value))
    encoding = job.header_encoding
    lines = [_header_line(n, v, encoding, job.charset) for n in _OUR_HEADERS if (v := ours[n]) is not None]
    lines.extend(_header_line(n, v, encoding, job.charset) for n, v in extra)
    try:
        return "".join(lines).encode("ascii", "surrogateescape")
    except UnicodeEncodeError:
        raise JobError("a header cannot be written in ASCII", outcome.BAD_HEADER.code) from None


def _header_line(name: str, value: str, encoding: str | None = None, charset: str = "utf-8") -> str:
    # Printable ASCII excludes CR, LF and NUL, so the common case needs no other test.
    if len(name) + len(value) <= _MAX_HEADER_LINE - 2 and value.isascii() and value.isprintable():
        return f"{name}: {value}\r\n"
    if "\r" in value or "\n" in value or "\0" in value:
        raise JobError(f"header {name} contains CR, LF or NUL", outcome.BAD_HEADER.code)
    if len(name) + len(value) <= _MAX_HEADER_LINE - 2 and _PLAIN_VALUE.match(value):
        return f"{name}: {value}\r\n"
    if encoding is not None and not value.isascii() and name.lower() not in _ADDRESS_HEADERS:
        # $email_charset's header encoding: encoded words in that charset, B or Q as asked.
        return f"{name}: {_encoded_words(name, value, encoding, charset)}\r\n"
    # Long or non-ASCII: the email package folds and RFC 2047-encodes. Its
    # parsers are known to raise assorted exceptions on odd input; any of them
    # means the header cannot be written.
    try:
        return _POLICY.header_factory(name, value).fold(policy=_POLICY)
    except Exception as e:
        raise JobError(f"header {name} cannot be written: {e}", outcome.BAD_HEADER.code) from None


def _encoded_words(name: str, value: str, encoding: str, charset: str) -> str:
    mime_charset = email.charset.Charset(_mime_charset(charset)[0])
    mime_charset.header_encoding = email.charset.BASE64 if encoding == "base64" else email.charset.QP
    try:
        return email.header.Header(value, mime_charset, header_name=name).encode(linesep="\r\n")
    except UnicodeError:
        raise JobError(f"header {name} cannot be written in {charset}", outcome.BAD_CHARSET.code) from None


@once_a_second
def _date(t: time.struct_time) -> str:
    """``email.utils.formatdate(now, localtime=True)``, in a tenth of its time
    (called with ``now``; ``t`` is its local time, see :func:`once_a_second`)."""
    offset = (t.tm_gmtoff or 0) // 60
    sign = "-" if offset < 0 else "+"
    hours, minutes = divmod(abs(offset), 60)
    return (
        f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year:04d} "
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} {sign}{hours:02d}{minutes:02d}"
    )



def _identity(job: Job) -> str:
    if _SAFE_IDENTITY.match(job.identity):
        return job.identity
    # A Job built without parse_job: derive a stable identity from what it says.
    seed = job.identity or repr((job.name, job.address, job.subject, job.body, job.alt, job.attachments,
                                 job.from_header, job.headers))
    return hashlib.sha256(seed.encode("utf-8", "surrogateescape")).hexdigest()[:32]


# --- charset -----------------------------------------------------------------


def _mime_charset(name: str) -> tuple[str, bool]:
    """The charset's MIME name, and whether ASCII text encodes to itself in it
    (if not, as for UTF-16, the body can only be sent in base64)."""
    try:
        codec = codecs.lookup(name).name
        "".encode(codec)
    except LookupError:
        raise JobError(f"unknown charset {name!r}", outcome.BAD_CHARSET.code) from None
    if codec in _NOT_CHARSETS:
        raise JobError(f"{name!r} is not a MIME charset", outcome.BAD_CHARSET.code)
    if codec in ("utf-8", "utf-8-sig"):
        return "utf-8", True  # no BOM in mail
    if codec == "ascii":
        return "us-ascii", True
    if codec.startswith("iso8859-"):
        mime = "iso-8859-" + codec[8:]
    elif re.fullmatch(r"cp125\d", codec):
        mime = "windows-" + codec[2:]
    elif codec.startswith("iso2022_"):
        mime = "iso-2022-" + codec[8:].replace("_", "-")
    else:
        mime = codec.replace("_", "-")
    try:
        codecs.lookup(mime)
    except LookupError:
        mime = name.lower()
    try:
        compatible = _ASCII_TEXT.encode(mime) == _ASCII_TEXT.encode("ascii")
    except UnicodeError:
        compatible = False
    return mime, compatible


@dataclass(frozen=True)
class _Body:
    text: str  # line breaks are "\n"; ends with one
    html: bool
    pieces: tuple[tuple[str, int], ...]  # (text, job line): to name the line of an unencodable character


def _load_body(items: tuple[BodyItem, ...], files: JobFiles,
               lookup: Callable[[], Callable[[str], str | None]] | None = None) -> _Body:
    pieces: list[tuple[str, int]] = []
    html_file = False
    for item in items:
        if item.kind == "file":
            data, _ = files.read(item.value, item.line)
            text = _decode(data)
            if lookup is not None and GRAVE in text:
                try:
                    text = expand(text, lookup())
                except UndefinedVariable as e:
                    raise JobError(f"undefined variable `{e.name} in {item.value!r}", outcome.BAD_JOB.code,
                                   line=item.line) from None
            pieces.append((text, item.line))
            html_file = html_file or item.value.lower().endswith(_HTML_SUFFIXES)
        else:
            pieces.append((item.value + "\n", item.line))
    text = "".join([t for t, _ in pieces])
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.endswith("\n"):
        text += "\n"
    # The first three lines: up to the third line break.
    end = text.find("\n")
    if end >= 0:
        end = text.find("\n", end + 1)
        if end >= 0:
            end = text.find("\n", end + 1)
    head = text[:end] if end >= 0 else text
    return _Body(text, html_file or "<html" in head.lower(), tuple(pieces))


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")  # a BOM is not text
    except UnicodeDecodeError:
        pass
    try:
        return data.decode("cp1252")
    except UnicodeDecodeError:
        # The five bytes cp1252 leaves undefined stand for the C1 control of
        # the same number, as in browsers, rather than failing the job.
        table = {}
        for b in range(0x80, 0xA0):
            try:
                table[b] = bytes([b]).decode("cp1252")
            except UnicodeDecodeError:
                pass
        return data.decode("latin-1").translate(table)


@dataclass(frozen=True)
class _Loaded:
    """An attachment read: the name shown, its content type, its bytes, and
    whether it is embedded (an inline part of a multipart/related)."""

    filename: str
    ctype: str
    data: bytes
    embedded: bool


def _load_attachment(att: Attachment, files: JobFiles) -> _Loaded:
    data, _ = files.read(att.path, att.line)
    # The name as the job wrote it: a symlink's target name is not the sender's to show.
    filename = att.name or PurePath(files.local(att.path, att.line)).name
    ctype = att.content_type
    if ctype is None:
        guessed, encoding = mimetypes.guess_type(filename, strict=False)
        if encoding is not None:
            guessed = _COMPRESSED.get(encoding)
        ctype = guessed or "application/octet-stream"
    return _Loaded(filename, ctype.lower(), data, att.embedded)


# --- body encoding -----------------------------------------------------------


def _encode(body: _Body, charset: str, linesep: str) -> bytes:
    try:
        return body.text.replace("\n", linesep).encode(charset)
    except UnicodeEncodeError as e:
        bad = e.object[e.start:e.end]
        line = None
        for text, number in body.pieces:
            try:
                text.encode(charset)
            except UnicodeEncodeError:
                line = number
                break
        raise JobError(f"the body cannot be written in {charset}: {bad!r}", outcome.BAD_CHARSET.code,
                       line=line) from None


def _choose_cte(data: bytes, asked: str | None = None) -> str:
    """7bit, quoted-printable or base64 for ``data`` (with CRLF line breaks);
    ``asked`` ($email_charset's encoding) is used for text that is not 7bit."""
    eight_bit = len(data.translate(None, _ASCII_BYTES))
    # 8bit is never sent: copiamail does not ask servers for 8BITMIME, so a
    # request for it is met with the 7-bit-safe choice below.
    if asked in ("base64", "quoted-printable") and (eight_bit or b"\0" in data or asked == "base64"):
        return asked
    if not eight_bit and b"\0" not in data and (
            len(data) <= _MAX_7BIT_LINE or max(map(len, data.split(b"\n"))) <= _MAX_7BIT_LINE + len(b"\r")):
        return "7bit"
    # Quoted-printable writes each 8-bit byte in three; base64 every three bytes in four.
    return "base64" if eight_bit * 6 > len(data) else "quoted-printable"


def _simple_part(body: _Body, charset: str, asked: str | None = None) -> bytes:
    data = _encode(body, charset, "\r\n")
    cte = _choose_cte(data, asked)
    if cte == "quoted-printable":
        data = binascii.b2a_qp(data, quotetabs=False, istext=True, header=False)
    elif cte == "base64":
        data = base64.encodebytes(data).replace(b"\n", b"\r\n")
    subtype = "html" if body.html else "plain"
    return (
        f"Content-Type: text/{subtype}; charset=\"{charset}\"\r\n"
        f"Content-Transfer-Encoding: {cte}\r\n\r\n"
    ).encode("ascii") + data


def _text_part(body: _Body, charset: str, encodable: bool, asked: str | None = None) -> MIMEPart:
    part = MIMEPart(policy=_POLICY)
    subtype = "html" if body.html else "plain"
    if encodable:
        cte = _choose_cte(_encode(body, charset, "\r\n"), asked)
        part.set_content(body.text, subtype=subtype, charset=charset, cte=cte)
    else:
        # The email package splits encoded bytes on b"\n", which is wrong for
        # a charset like UTF-16: encode here, with CRLF, and send base64.
        part.set_content(_encode(body, charset, "\r\n"), "text", subtype, cte="base64")
        part.set_param("charset", charset)
    return part


def _mime_part(
    main: _Body,
    alt: _Body | None,
    attachments: list[_Loaded],
    charset: str,
    encodable: bool,
    identity: str,
    asked: str | None = None,
    related_id: str = "",
) -> bytes:
    """The body, its alternative (multipart/alternative), embedded parts
    (multipart/related: the N-th is ``Content-ID: <imageN.EM_MSGID>``, with
    its file name as Content-Location) and attachments (multipart/mixed)."""
    texts = [main.text] + ([alt.text] if alt is not None else [])
    part = _text_part(main, charset, encodable, asked)
    if alt is not None:
        alt_part = _text_part(alt, charset, encodable, asked)
        ordered = [part, alt_part] if alt.html and not main.html else [alt_part, part]
        part = _multipart("alternative", ordered, _boundary(identity, "alt", texts))
    embedded = [a for a in attachments if a.embedded]
    if embedded:
        inline = [part]
        for n, a in enumerate(embedded, 1):
            p = _file_part(a, "inline")
            # The body names it cid:FILE, or (the CopiaFacts manual's MHTML
            # way) cid:imageN.`EM_MSGID.
            by_name = any(f"cid:{a.filename}" in t for t in texts)
            p["Content-ID"] = f"<{a.filename}>" if by_name else f"<image{n}.{related_id}>"
            p["Content-Location"] = a.filename
            inline.append(p)
        part = _multipart("related", inline, _boundary(identity, "rel", texts))
    attached = [a for a in attachments if not a.embedded]
    if attached:
        part = _multipart("mixed", [part, *(_file_part(a, "attachment") for a in attached)],
                          _boundary(identity, "mix", texts))
    return part.as_bytes(policy=_POLICY)


def _file_part(a: _Loaded, disposition: str) -> MIMEPart:
    part = MIMEPart(policy=_POLICY)
    maintype, _, subtype = a.ctype.partition("/")
    part.set_content(a.data, maintype, subtype, disposition=disposition, filename=a.filename,
                     params={"name": a.filename})
    return part


def _multipart(subtype: str, parts: list[MIMEPart], boundary: str) -> MIMEPart:
    container = MIMEPart(policy=_POLICY)
    container["Content-Type"] = f'multipart/{subtype}; boundary="{boundary}"'
    for p in parts:
        container.attach(p)
    return container


def _boundary(identity: str, kind: str, texts: list[str]) -> str:
    # Derived from the identity so that a job's message is the same bytes at
    # each build. "=_" cannot occur in quoted-printable or base64, so only a
    # 7bit text could hold it, and then a counter makes it unique.
    boundary = f"=_{identity[:24]}.{kind}"
    n = 0
    while any(boundary in t for t in texts):
        n += 1
        boundary = f"=_{identity[:24]}.{kind}{n}"
    return boundary
