"""End to end: copiamail as the SMTP client RFC 5321 asks for (SPEC 4, last
bullet; issue 11, points 12-18), against test servers that enforce the rules
a Postfix smtpd enforces, and the `copiamail node` CLI.

Each test reads what a user reads: the job files in the spool afterwards
(folder, attempt record, ``EMAIL_ERROR``) and what the server saw (commands,
bytes, how each connection ended).
"""

from __future__ import annotations

import socket

from spoolkit import SpoolKit, attempts, var


def free_port() -> int:
    """A loopback port nothing listens on (bound once, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- 12b: a refused connection, said once ------------------------------------


def test_a_refused_connection_is_one_plain_statement(tmp_path):
    port = free_port()
    kit = SpoolKit(tmp_path, port, ['$email_retry_delays * "1H"'])
    kit.job("TOSEND", "J.FS", to="a@copia.com")
    assert kit.drain().returncode == 0
    text = kit.read("TOSEND", "J.FS")
    assert var(text, "EMAIL_ERROR") == f"cannot connect to 127.0.0.1:{port}: connection refused"
    [[_, _, code, klass, _]] = attempts(text)
    assert (code, klass) == ("70", "C")
