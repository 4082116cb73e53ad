"""Host names and addresses as a configuration writes them: IP addresses,
fully qualified names fit for EHLO, address literals, ``host:port``."""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

from copiamail.errors import ConfigError


def is_ip(text: str) -> bool:
    """Whether ``text`` is an IPv4 or IPv6 address (not a host name)."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def is_fqdn(name: str) -> bool:
    """Whether ``name`` is a fully qualified domain name as an EHLO name must be
    (RFC 5321 4.1.1.1, 2.3.5): two or more labels, a top label that is not all
    digits, and not a name that only ever means this machine (``localhost``,
    ``localhost.localdomain``)."""
    labels = name[:-1].split(".") if name.endswith(".") else name.split(".")
    return (
        len(labels) >= 2 and len(name) <= 253 and all(_LABEL.fullmatch(label) for label in labels)
        and not labels[-1].isdigit() and labels[0].lower() != "localhost" and labels[-1].lower() != "localdomain"
    )


def is_address_literal(text: str) -> bool:
    """Whether ``text`` is an RFC 5321 4.1.3 address literal: ``[192.0.2.1]``
    or ``[IPv6:2001:db8::1]``."""
    if not (text.startswith("[") and text.endswith("]")):
        return False
    inner = text[1:-1]
    if inner[:5].lower() == "ipv6:":
        return ":" in inner[5:] and is_ip(inner[5:])
    return "." in inner and is_ip(inner)


def parse_host_port(text: str, what: str) -> tuple[str, int]:
    """``host``, ``host:port``, ``[ipv6]:port`` or a bare IPv6 address (port 25)."""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ConfigError(f"{what}: bad address {text!r} (use [IPv6]:PORT)")
        port = rest[1:] if rest else "25"
    elif text.count(":") > 1:
        host, port = text, "25"
    else:
        host, sep, port = text.partition(":")
        port = port if sep else "25"
    if not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise ConfigError(f"{what}: bad host or port in {text!r}")
    return host, int(port)


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[IPv6]:PORT`` for an IPv6 address) as (host, port);
    ValueError, saying why, for anything else."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host:
        raise ValueError(f"{text!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if not is_ip(host):
            raise ValueError(f"{text!r}: {host!r} in brackets is not an IP address")
    elif ":" in host:
        raise ValueError(f"{text!r}: write an IPv6 address in brackets, [::1]:8025")
    if not port.isascii() or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r}: the port is not a number from 1 to 65535")
    return host, int(port)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an IP address or a name) is this machine's loopback only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def redis_url_problem(url: str) -> str | None:
    """Why ``url`` is not a Redis server's address as ``cluster.redis`` takes
    it (``redis://`` or ``rediss://`` (TLS), host, optional port and database
    number, no password: that goes in ``password_file``), or None."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (checks the port: ValueError when it is no number in range)
    except ValueError as e:
        return f"not a Redis URL: {e}"
    if parts.scheme not in ("redis", "rediss"):
        return "must start with redis:// or rediss:// (TLS)"
    if not parts.hostname:
        return "names no host"
    if parts.password is not None:
        # A URL is shown in logs and errors; a password in it would be too.
        return "holds a password: put it in cluster.password_file instead"
    db = parts.path.lstrip("/")
    if db and not db.isdigit():
        return f"the database must be a number, not {db!r}"
    return None
