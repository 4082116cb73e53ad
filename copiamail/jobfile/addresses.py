"""Addresses as jobs and CFG files write them: a plain address checked as SMTP
sends it, a mailbox (display name and address) as CopiaFacts reads it, the
text of an address command as written, the ``$email_address`` lines of a
file found fast, and the domain of a job's Message-ID."""

from __future__ import annotations

import re
from email.utils import parseaddr
from typing import NamedTuple

from copiamail.jobfile.fsfile import Command, CommandFile

# RFC 5321: a dot-atom local part (no leading, trailing or double dot) or a
# quoted one, and a domain of non-empty labels.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_DOMAIN = rf"{_LABEL}(?:\.{_LABEL})*"
_ADDRESS = re.compile(rf"^[^\s<>()\[\],;:\"@.]+(?:\.[^\s<>()\[\],;:\"@.]+)*@{_DOMAIN}$")
_QUOTED_LOCAL = re.compile(rf'^"[^"\r\n]*"@{_DOMAIN}$')


def written_address(cmd: Command, cf: CommandFile) -> str:
    """An address command's text as CopiaFacts takes it: the rest of the line
    as written, double quotes kept; one token quoted whole (the older form
    ``$email_from "Acme Billing <billing@acme.test>"``) is read unquoted."""
    text = cf.as_written(cmd)
    if len(cmd.args) == 1 and text.startswith('"') and text.endswith('"'):
        text = cmd.args[0]
    return text


class Mailbox(NamedTuple):
    """An address as a job writes it: ``address`` for SMTP, its ``domain``
    (lower-case), and ``header``: the text for a header where it carries
    more than the address (a display name), else None."""

    address: str
    domain: str
    header: str | None


_AROUND_AT = re.compile(r"[ \t]*@[ \t]*")


def read_mailbox(text: str) -> Mailbox | None:
    """A mailbox as CopiaFacts reads ``$email_address``: the address is the
    text between ``<`` and the first ``>`` where there is one, else the
    whole text with blanks next to the ``@`` dropped; double quotes around
    the address are dropped. None if no valid address is found."""
    text = text.strip(" \t")
    close = text.find(">")
    header: str | None = None
    if close >= 0:
        opening = text.rfind("<", 0, close)
        if opening < 0:
            return None
        candidate = text[opening + 1:close].strip(" \t")
        if text[:opening].strip(" \t") or text[close + 1:].strip(" \t"):
            header = text
    else:
        # Text beside a bare address would be guesswork: it needs <...>.
        candidate = _AROUND_AT.sub("@", text)
    if len(candidate) > 2 and candidate.startswith('"') and candidate.endswith('"') and candidate.count('"') == 2:
        candidate = candidate[1:-1]
    parsed = parse_address(candidate)
    if parsed is None:
        return None
    return Mailbox(parsed[0], parsed[1], header)


def parse_address(text: str) -> tuple[str, str] | None:
    """``(address, domain)`` of a plain address, ``<address>`` allowed; None if
    malformed. ASCII only: a non-ASCII address needs SMTPUTF8, which copiamail
    does not send."""
    text = text.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1]
    if not text.isascii() or not (_ADDRESS.match(text) or _QUOTED_LOCAL.match(text)):
        return None
    return text, text.rsplit("@", 1)[1].lower()


# A line whose command is $email_address (any case), and the rest of it.
_ADDRESS_LINE = re.compile(r"^[ \t]*\$email_address(?=[ \t]|\r?$)(.*)$", re.IGNORECASE | re.MULTILINE)


def address_lines(text: str) -> list[str]:
    """What follows ``$email_address`` on each line that starts with it (any
    case, after blanks): ``_ADDRESS_LINE.findall(text)``, found faster in
    ASCII text (tested against it) with ``str.find`` on the lowered text.
    Not for other text: there, case folding can match other letters (the
    long s, the Kelvin sign) and change lengths."""
    if not text.isascii():
        return _ADDRESS_LINE.findall(text)
    low = text.lower()
    found = []
    at = low.find("$email_address")
    while at != -1:
        after = at + 14
        line_start = low.rfind("\n", 0, at) + 1
        if not low[line_start:at].strip(" \t"):
            next_char = low[after:after + 1]
            if next_char in ("", " ", "\t", "\n") or (next_char == "\r" and low[after + 1:after + 2] in ("", "\n")):
                end = low.find("\n", after)
                found.append(text[after:] if end == -1 else text[after:end])
        at = low.find("$email_address", after)
    return found


_DOT_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*\Z")


def message_id_domain(sender: str) -> str:
    """The domain of a job's Message-ID: its envelope sender's, else localhost."""
    address = parseaddr(sender)[1] if "<" in sender else sender.strip()
    domain = address.rpartition("@")[2]
    if _DOT_ATOM.match(domain):
        return domain.lower()
    try:
        domain = domain.encode("idna").decode("ascii")
    except UnicodeError:
        return "localhost"
    return domain.lower() if _DOT_ATOM.match(domain) else "localhost"
