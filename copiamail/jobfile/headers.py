"""The headers a job may set (``$email_header``): a name of printable ASCII
without a colon, a value the engine can send as written, and none of the
headers the engine writes to match the body."""

from __future__ import annotations

import re
from email.utils import parsedate_to_datetime

from copiamail.errors import JobError
from copiamail.jobfile import outcome

HEADER_NAME = re.compile(r"^[!-9;-~]+$")
# Headers the engine writes to match the body: a job cannot set them.
ENGINE_HEADERS = frozenset({"mime-version", "content-type", "content-transfer-encoding"})


def check_header(name: str, value: str) -> None:
    """Refuse a job header the engine cannot send as asked (JobError,
    BAD_HEADER): a bad name, one the engine writes to match the body, a CR,
    LF or NUL, a Date that is no date, a Message-ID that is not printable ASCII."""
    if not HEADER_NAME.match(name):
        raise JobError(f"bad header name {name!r}", outcome.BAD_HEADER.code)
    key = name.lower()
    if key in ENGINE_HEADERS:
        raise JobError(f"header {name} is written by the engine and cannot be set", outcome.BAD_HEADER.code)
    if "\r" in value or "\n" in value or "\0" in value:
        raise JobError(f"header {name} contains CR, LF or NUL", outcome.BAD_HEADER.code)
    if key == "date":
        try:
            parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            raise JobError(f"bad Date header {value!r}", outcome.BAD_HEADER.code) from None
    if key == "message-id" and not (value.isascii() and value.isprintable()):
        raise JobError(f"header {name}: an identifier must be printable ASCII", outcome.BAD_HEADER.code)
