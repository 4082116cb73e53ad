"""Shared pytest fixtures for copiamail's tests."""

# ---------------------------------------------------------------------------
# BEGIN smtp test server fixtures (see tests/smtpserver.py)
# ---------------------------------------------------------------------------
import pytest
from dnsserver import DNSTestServer
from smtpserver import SMTPTestServer, TLSCert, make_self_signed_cert


@pytest.fixture(scope="session")
def tls_cert(tmp_path_factory) -> TLSCert:
    """Self-signed certificate (IP:127.0.0.1, DNS:localhost), made once per
    session with the openssl CLI; trust it with cert_bundle=tls_cert.cert_path."""
    return make_self_signed_cert(tmp_path_factory.mktemp("smtp-tls"))


@pytest.fixture
def smtp_server(tls_cert):
    """Factory: ``smtp_server(**options)`` returns a started SMTPTestServer
    (options as SMTPTestServer's); every server made is stopped at teardown.
    STARTTLS servers get the session's ``tls_cert`` unless given another."""
    servers: list[SMTPTestServer] = []

    def make(**options) -> SMTPTestServer:
        if options.get("starttls") and options.get("tls_cert") is None:
            options["tls_cert"] = tls_cert
        server = SMTPTestServer(**options)
        servers.append(server)
        return server.start()

    yield make
    for server in reversed(servers):
        server.stop()
    errors = [e for server in servers for e in server.errors]
    assert not errors, f"SMTP test server raised in a session: {errors!r}"


# ---------------------------------------------------------------------------
# END smtp test server fixtures
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# BEGIN dns test server fixtures (see tests/dnsserver.py)
# ---------------------------------------------------------------------------


@pytest.fixture
def dns_server():
    """A started DNSTestServer on 127.0.0.1 (ephemeral port, UDP + TCP), empty
    table; stopped at teardown, which fails if answering raised."""
    server = DNSTestServer().start()
    yield server
    server.stop()
    assert not server.errors, f"DNS test server raised: {server.errors!r}"


# ---------------------------------------------------------------------------
# END dns test server fixtures
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# redis-server (see tests/redisserver.py)
# ---------------------------------------------------------------------------


@pytest.fixture
def redis_server(tmp_path_factory):
    """Factory: ``redis_server(password=None, tls=None)`` returns a started RedisServer
    on a free loopback port; every one made is killed at teardown."""
    from redisserver import RedisServer

    servers: list[RedisServer] = []

    def make(password: str | None = None, tls: tuple[str, str] | None = None) -> RedisServer:
        server = RedisServer(tmp_path_factory.mktemp("redis"), password, tls)
        servers.append(server)
        return server.start()

    yield make
    for server in servers:
        server.kill()
