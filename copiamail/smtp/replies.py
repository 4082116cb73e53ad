"""What a server says, classified: the stage of a transaction a reply answers,
the reply as one line of text (as written into ``EMAIL_ERROR``), and a
refusal as a :class:`~copiamail.errors.DeliveryError` with its CopiaFacts
class and whether it is final."""

from __future__ import annotations

import re

from copiamail.errors import DeliveryError
from copiamail.jobfile import outcome

MAIL, RCPT, DATA, CONNECT = "MAIL", "RCPT", "DATA", "CONNECT"

_ENHANCED = re.compile(r"^\s*([245])\.(\d{1,3})\.(\d{1,3})\b")
_STAGE_CLASS = {MAIL: outcome.HOST_REJECTED, RCPT: outcome.MAILBOX, DATA: outcome.SMTP_OTHER, CONNECT: outcome.HOST_REJECTED}


def reply_text(code: int, message: str) -> str:
    """``550 5.1.1 <x@y>: User unknown``: one line, as written into EMAIL_ERROR."""
    return " ".join(f"{code} {message}".split())


def classify(code: int, message: str, stage: str) -> DeliveryError:
    """A server's refusal at ``stage`` as a DeliveryError with its CopiaFacts class."""
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
