"""End to end: copiamail as the SMTP client RFC 5321 asks for (SPEC 4, last
bullet; issue 11, points 12-18), against test servers that enforce the rules
a Postfix smtpd enforces, and the `copiamail node` CLI.

Each test reads what a user reads: the job files in the spool afterwards
(folder, attempt record, ``EMAIL_ERROR``) and what the server saw (commands,
bytes, how each connection ended).
"""

from __future__ import annotations

import socket
import subprocess

import pytest

from smtpserver import TLSCert, fully_qualified, make_self_signed_cert
from spoolkit import CLI, SpoolKit, attempts, cli_env, var
from test_mx_e2e import mx_kit


def free_port() -> int:
    """A loopback port nothing listens on (bound once, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def drain_trusting(kit: SpoolKit, cert: TLSCert) -> subprocess.CompletedProcess[str]:
    """`node --drain` with ``cert`` as the machine's trust store (SSL_CERT_FILE:
    what mx_tls_verify checks MX certificates against)."""
    result = subprocess.run(
        [*CLI, "node", "--name", "N1", "--drain"], cwd=kit.base, capture_output=True, text=True, timeout=60,
        env=cli_env(COPIAMAIL_CONFIG=str(kit.config_path), SSL_CERT_FILE=cert.cert_path), stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    return result


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


# --- 13: the EHLO name is fully qualified -------------------------------------


def test_without_helo_name_the_node_greets_with_an_fqdn_or_its_address_literal(tmp_path, smtp_server):
    server = smtp_server(strict_helo=True)
    kit = SpoolKit(tmp_path, server.port, ['$email_retry_delays * "1H"'])
    kit.job("TOSEND", "J.FS", to="a@copia.com")
    assert kit.drain().returncode == 0
    assert kit.names("SENT") == ["J.FS"], kit.read("TOSEND", "J.FS")
    [conn] = server.connections
    assert fully_qualified(conn.helo) and conn.helo in (socket.getfqdn(), "[127.0.0.1]")


def test_the_address_literal_is_the_one_the_connection_comes_from(tmp_path, smtp_server):
    server = smtp_server(strict_helo=True)
    kit = SpoolKit(tmp_path, server.port, [], yaml="binding:\n  b3: {bind_address: 127.0.0.3}\n")
    kit.job("TOSEND", "J.FS", "$var_def EMAIL_BINDING b3", to="a@copia.com")
    assert kit.drain().returncode == 0
    assert kit.names("SENT") == ["J.FS"]
    [conn] = server.connections
    assert conn.peer == "127.0.0.3" and conn.helo in (socket.getfqdn(), "[127.0.0.3]")


def test_helo_name_from_the_config_is_sent_as_written(tmp_path, smtp_server):
    server = smtp_server(strict_helo=True)
    kit = SpoolKit(tmp_path, server.port, [], yaml="helo_name: mail.copia.test\n")
    kit.job("TOSEND", "J.FS", to="a@copia.com")
    assert kit.drain().returncode == 0
    assert kit.names("SENT") == ["J.FS"] and server.connections[0].helo == "mail.copia.test"


def test_a_bare_host_name_as_helo_name_is_refused_with_one_line(tmp_path):
    kit = SpoolKit(tmp_path, 2525, [], yaml="helo_name: mailhost\n")
    result = kit.cli("check-config")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert "copiamail.yaml:" in line and "helo_name" in line and "fully qualified" in line


# --- 14: an MX host's certificate is checked against its name -----------------


@pytest.fixture(scope="module")
def mx_cert(tmp_path_factory) -> TLSCert:
    """A self-signed certificate for the name mx.example.test only (no IP)."""
    return make_self_signed_cert(tmp_path_factory.mktemp("mx-cert"), "mx.example.test", ["DNS:mx.example.test"])


def test_with_mx_tls_verify_an_mx_certificate_for_its_host_name_passes(tmp_path, dns_server, smtp_server, mx_cert):
    server = smtp_server(host="127.0.0.2", starttls=True, tls_cert=mx_cert)
    dns_server.add("example.test", "MX", "10 mx.example.test.")
    dns_server.add("mx.example.test", "A", "127.0.0.2")
    kit = mx_kit(tmp_path, dns_server, server.port, '$email_retry_delays * "1H"', yaml="mx_tls_verify: true\n")
    kit.job("TOSEND", "J.FS", to="u@example.test")
    drain_trusting(kit, mx_cert)
    assert kit.names("SENT") == ["J.FS"], kit.read("TOSEND", "J.FS")
    [message] = server.messages
    assert message.tls


def test_with_mx_tls_verify_a_certificate_for_another_name_is_refused(tmp_path, dns_server, smtp_server, mx_cert):
    server = smtp_server(host="127.0.0.2", starttls=True, tls_cert=mx_cert)
    dns_server.add("other.test", "MX", "10 mx.other.test.")
    dns_server.add("mx.other.test", "A", "127.0.0.2")
    kit = mx_kit(tmp_path, dns_server, server.port, '$email_retry_delays * "1H"', yaml="mx_tls_verify: true\n")
    kit.job("TOSEND", "J.FS", to="u@other.test")
    drain_trusting(kit, mx_cert)
    text = kit.read("TOSEND", "J.FS")
    [[_, _, code, klass, _]] = attempts(text)
    assert (code, klass) == ("73", "C")
    assert "mx.other.test" in var(text, "EMAIL_ERROR")
    assert server.messages == []
