"""What a node works out once, at start, to reach mail hosts and greet them:
the TLS context for STARTTLS, the relay's addresses, the machine's name for
EHLO. Each may fail or block, so none of it is done per connection."""

from __future__ import annotations

import functools
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from copiamail.config_checks import is_fqdn, is_ip
from copiamail.config_sections import RelayConfig
from copiamail.errors import ConfigError


@functools.cache
def make_tls_context(verify: bool, ca_file: Path | None) -> ssl.SSLContext:
    """The TLS context for STARTTLS: certificates verified against ``ca_file``
    (or the system store) unless ``verify`` is off. Built once per node, so a
    bad CA file stops the node at start instead of failing every job.

    Made once per process for each pair of arguments: the node makes it
    before it forks its workers, which inherit it (reading the system's
    store takes 35 ms, at the start of every worker otherwise). A file that
    cannot be loaded raises each time (an error is not kept)."""
    if not verify:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    try:
        return ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    except (OSError, ssl.SSLError) as e:
        why = getattr(e, "strerror", None) or e
        raise ConfigError(f"key 'relay.ca_file': cannot load CA certificates: {why}", ca_file) from None


@dataclass(frozen=True)
class TlsSettings:
    """How STARTTLS checks a mail host's certificate: against ``ca_file``
    (None: the system's store) unless ``verify`` is off."""

    verify: bool
    ca_file: Path | None = None

    def context(self) -> ssl.SSLContext:
        """The TLS context (:func:`make_tls_context`: made at the first call
        in a process, then the same one)."""
        return make_tls_context(self.verify, self.ca_file)


def relay_tls(relay: RelayConfig) -> TlsSettings:
    """The TLS settings of ``relay``. Its context is made now where its
    connections use STARTTLS, or it names a CA file (one that cannot be
    loaded stops the node at its start); with ``starttls: never`` and the
    system's store, only a job with ``$email_options useTLS`` or ``reqTLS``
    needs one, and it is made at that job's connection: reading the store
    costs 20 ms of every node's start."""
    tls = TlsSettings(relay.tls_verify, relay.ca_file)
    if relay.starttls != "never" or relay.ca_file is not None:
        tls.context()
    return tls


def resolve_relay(host: str, port: int) -> tuple[str, ...]:
    """The relay's IP addresses (so that host stanzas naming an IP apply to it).
    Resolved once at start; a name that does not resolve now fails at connect."""
    if is_ip(host):
        return (host,)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return ()
    return tuple(dict.fromkeys(str(i[4][0]) for i in infos))


def machine_helo_name() -> str | None:
    """The machine's fully qualified domain name, for EHLO where ``helo_name``
    is not set; None when it has none (a bare host name, ``localhost``).
    Then each connection greets with the address literal of its own local
    address (:func:`copiamail.smtp.session.address_literal`): RFC 5321 4.1.3
    asks for the address the connection comes from, which is what the server
    sees. Asks the resolver, and may block: called once at node start, never
    per connection."""
    name = socket.getfqdn()
    return name if is_fqdn(name) else None
