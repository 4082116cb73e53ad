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
from smtpserver import Rule, TLSCert, fully_qualified, make_self_signed_cert
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


def verified_mx_drain(tmp_path, dns_server, smtp_server, cert: TLSCert, domain: str) -> tuple[SpoolKit, object]:
    """A job for ``domain``, whose one MX (mx.DOMAIN, 127.0.0.2) presents
    ``cert``, drained with mx_tls_verify: true and ``cert`` trusted."""
    server = smtp_server(host="127.0.0.2", starttls=True, tls_cert=cert)
    dns_server.add(domain, "MX", f"10 mx.{domain}.")
    dns_server.add(f"mx.{domain}", "A", "127.0.0.2")
    kit = mx_kit(tmp_path, dns_server, server.port, '$email_retry_delays * "1H"', yaml="mx_tls_verify: true\n")
    kit.job("TOSEND", "J.FS", to=f"u@{domain}")
    drain_trusting(kit, cert)
    return kit, server


def test_with_mx_tls_verify_an_mx_certificate_for_its_host_name_passes(tmp_path, dns_server, smtp_server, mx_cert):
    kit, server = verified_mx_drain(tmp_path, dns_server, smtp_server, mx_cert, "example.test")
    assert kit.names("SENT") == ["J.FS"], kit.read("TOSEND", "J.FS")
    [message] = server.messages
    assert message.tls


def test_with_mx_tls_verify_a_certificate_for_another_name_is_refused(tmp_path, dns_server, smtp_server, mx_cert):
    kit, server = verified_mx_drain(tmp_path, dns_server, smtp_server, mx_cert, "other.test")
    text = kit.read("TOSEND", "J.FS")
    [[_, _, code, klass, _]] = attempts(text)
    assert (code, klass) == ("73", "C")
    assert var(text, "EMAIL_ERROR") == (
        "TLS: certificate of mx.other.test (127.0.0.2) not trusted: Hostname mismatch, certificate is not valid "
        "for 'mx.other.test' (mx_tls_verify: true checks MX certificates against the system's CAs)")
    assert server.messages == []


# --- 15: QUIT after a refused command; a refused RCPT keeps the connection ---


@pytest.mark.parametrize("pipelining", [False, True], ids=["plain", "pipelining"])
def test_after_a_refused_recipient_the_next_job_rides_on_the_same_connection(tmp_path, smtp_server, pipelining):
    server = smtp_server(pipelining=pipelining)
    server.add_rule(Rule(stage="RCPT", code=550, text="5.1.1 <bad@copia.com>: Recipient address rejected: User unknown",
                         match="bad@copia.com"))
    kit = SpoolKit(tmp_path, server.port, ["$domain_limit * @copia.com 1"])
    kit.job("TOSEND", "A.FS", to="bad@copia.com")
    kit.job("TOSEND", "B.FS", to="good@copia.com")
    assert kit.drain().returncode == 0
    assert kit.names("FAIL") == ["A.FS"] and kit.names("SENT") == ["B.FS"]
    assert var(kit.read("FAIL", "A.FS"), "EMAIL_ERROR") == "550 5.1.1 <bad@copia.com>: Recipient address rejected: User unknown"
    [conn] = server.connections
    [message] = server.messages
    assert message.conn_serial == conn.serial and message.rcpt_tos == ["good@copia.com"]
    assert "RSET" in conn.commands and conn.commands[-1] == "QUIT"
    assert conn.lost_after is None


@pytest.mark.parametrize("stage,code,text", [
    ("EOD", 552, "5.3.4 Message size exceeds fixed limit"),
    ("MAIL", 553, "5.7.1 <bad@acme.test>: Sender address rejected: Access denied"),
    ("EHLO", 550, "5.7.1 Client host rejected: Access denied"),
], ids=["eod-552", "mail-553", "ehlo-550"])
def test_a_refused_command_is_followed_by_quit_not_a_lost_connection(tmp_path, smtp_server, stage, code, text):
    server = smtp_server()
    server.add_rule(Rule(stage=stage, code=code, text=text))
    kit = SpoolKit(tmp_path, server.port, ['$email_retry_delays * "1H"'])
    kit.job("TOSEND", "A.FS", "$email_esender bad@acme.test", to="a@copia.com")
    assert kit.drain().returncode == 0
    folder = "TOSEND" if stage == "EHLO" else "FAIL"
    assert var(kit.read(folder, "A.FS"), "EMAIL_ERROR") == f"{code} {text}"
    assert server.messages == []
    [conn] = server.connections
    assert conn.commands[-1] == "QUIT" and conn.lost_after is None, conn.commands


def test_a_421_is_not_answered_with_rset_or_quit(tmp_path, smtp_server):
    server = smtp_server()
    server.add_rule(Rule(stage="RCPT", code=421, text="4.7.0 Too many errors", match="bad@copia.com"))
    kit = SpoolKit(tmp_path, server.port, ["$domain_limit * @copia.com 1", '$email_retry_delays * "1H"'])
    kit.job("TOSEND", "A.FS", to="bad@copia.com")
    kit.job("TOSEND", "B.FS", to="good@copia.com")
    assert kit.drain().returncode == 0
    assert kit.names("TOSEND") == ["A.FS"] and kit.names("SENT") == ["B.FS"]
    first, second = server.connections
    assert first.commands[-1] == "RCPT" and first.lost_after is None  # the server closed it
    assert second.messages == 1


# --- 16: SIZE is declared, and a message over the limit is never uploaded ----


@pytest.mark.parametrize("pipelining", [False, True], ids=["plain", "pipelining"])
def test_a_message_over_the_servers_size_limit_fails_before_its_upload(tmp_path, smtp_server, pipelining):
    server = smtp_server(size_limit=50_000, pipelining=pipelining)
    kit = SpoolKit(tmp_path, server.port, ["$domain_limit * @copia.com 1"])
    big = kit.root / "big.bin"
    big.write_bytes(bytes(range(256)) * 800)  # 200 KB, about 270 KB in base64
    kit.job("TOSEND", "A.FS", f"$email_attach {big}", to="a@copia.com")
    kit.job("TOSEND", "B.FS", to="b@copia.com")
    assert kit.drain().returncode == 0
    assert kit.names("FAIL") == ["A.FS"] and kit.names("SENT") == ["B.FS"]
    text = kit.read("FAIL", "A.FS")
    error = var(text, "EMAIL_ERROR")
    assert error.startswith("552 5.3.4 ") and "50000" in error and "SIZE" in error
    [[_, _, code, klass, _]] = attempts(text)
    assert (code, klass) == ("552", "E") and "$fax_status2 552\n" in text
    [conn] = server.connections
    assert conn.bytes_received < 5_000  # B's message and the commands; none of A's 270 KB
    [message] = server.messages
    assert message.rcpt_tos == ["b@copia.com"]
    [declared] = [int(o[5:]) for o in message.mail_options if o.upper().startswith("SIZE=")]
    assert len(message.data) <= declared <= len(message.data) + 10  # RFC 1870: the size as sent


# --- 18: a relay's self-signed certificate: a clear line, and options --------

UNTRUSTED_RELAY = ("TLS: certificate of 127.0.0.1 not trusted: self-signed certificate (set relay.ca_file or "
                   "--relay-ca FILE, or relay.tls_verify: false or --relay-no-verify)")


def relay_kit(tmp_path) -> SpoolKit:
    kit = SpoolKit(tmp_path, None, ['$email_retry_delays * "1H"'])  # no relay: in the config
    kit.job("TOSEND", "J.FS", to="a@copia.com")
    return kit


def test_an_untrusted_relay_certificate_is_one_clear_sentence(tmp_path, smtp_server):
    server = smtp_server(starttls=True)
    kit = relay_kit(tmp_path)
    assert kit.drain("N1", "--relay", f"127.0.0.1:{server.port}").returncode == 0
    text = kit.read("TOSEND", "J.FS")
    assert var(text, "EMAIL_ERROR") == UNTRUSTED_RELAY
    [[_, _, code, klass, _]] = attempts(text)
    assert (code, klass) == ("73", "C")
    assert server.messages == []


def test_relay_ca_trusts_the_relays_own_certificate(tmp_path, smtp_server, tls_cert):
    server = smtp_server(starttls=True)
    kit = relay_kit(tmp_path)
    result = kit.drain("N1", "--relay", f"127.0.0.1:{server.port}", "--relay-ca", tls_cert.cert_path)
    assert result.returncode == 0, result.stderr
    assert kit.names("SENT") == ["J.FS"] and server.messages[0].tls


def test_relay_no_verify_sends_over_tls_without_checking(tmp_path, smtp_server):
    server = smtp_server(starttls=True)
    kit = relay_kit(tmp_path)
    result = kit.drain("N1", "--relay", f"127.0.0.1:{server.port}", "--relay-no-verify")
    assert result.returncode == 0, result.stderr
    assert kit.names("SENT") == ["J.FS"] and server.messages[0].tls


@pytest.mark.parametrize("options,expected", [
    (["--relay-no-verify"], "need a relay"),
    (["--relay", "127.0.0.1:2525", "--relay-no-verify", "--relay-ca", "{ca}"], "exclude each other"),
], ids=["without-relay", "both"])
def test_relay_tls_options_that_cannot_apply_are_one_line(tmp_path, tls_cert, options, expected):
    kit = relay_kit(tmp_path)
    result = kit.cli("node", "--name", "N1", "--drain", *[o.format(ca=tls_cert.cert_path) for o in options])
    assert result.returncode != 0 and "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert expected in line and "--relay-" in line
    assert kit.names("TOSEND") == ["J.FS"]
