"""The sections of ``copiamail.yaml`` as frozen dataclasses: the relay, DNS,
the caps of a scope, domain and host stanzas, bindings and their groups, the
cluster, DKIM keys. Their defaults live here only; :mod:`copiamail.config_keys`
reads each section into its class."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class RelayConfig:
    """``relay:`` (or ``retry_relay:``): the SMTP server that takes every
    message instead of the recipient domains' MX hosts."""

    host: str
    port: int = 25
    starttls: str = "auto"  # auto | always | never
    username: str | None = None
    password_file: Path | None = None
    tls_verify: bool = True
    ca_file: Path | None = None
    password_file_line: int | None = field(default=None, compare=False)  # in the YAML file, for errors


@dataclass(frozen=True)
class DnsConfig:
    """``dns:``: where MX and address lookups go (no nameservers: the system's)."""

    nameservers: tuple[str, ...] = ()
    port: int = 53
    timeout: float = 5.0


@dataclass(frozen=True)
class WebConfig:
    """``web:``: where ``copiamail web`` listens (``HOST:PORT``), and the file
    holding the bearer token every request must carry (None: no token, which
    only a loopback address may do without)."""

    listen: str = "127.0.0.1:8025"
    token_file: Path | None = None


@dataclass(frozen=True)
class MessageRate:
    """``max_message_rate: "N/s" | "N/m" | "N/h"``: at most ``count`` messages
    started in any window of ``period`` seconds."""

    count: int
    period: float

    @property
    def spacing(self) -> float:
        """The seconds between two message starts that keep the rate smooth."""
        return self.period / self.count

    def __str__(self) -> str:
        unit = {1.0: "s", 60.0: "m", 3600.0: "h"}.get(self.period)
        return f"{self.count}/{unit}" if unit else f"{self.count}/{self.period:g}s"


@dataclass(frozen=True)
class ScopeCaps:
    """The caps a stanza sets (each at least 1); None where it sets none: the
    scope's pooled cap, and the cap of each domain in the scope apart.
    ``adaptive``: whether the stanza's limits learn from throttle replies
    (None: as the top level says)."""

    scope_max_outbound_connections: int | None = None
    max_outbound_connections: int | None = None
    max_deliveries_per_connection: int | None = None  # messages one connection carries
    max_message_rate: MessageRate | None = None
    adaptive: bool | None = None
    # Held in Redis for every node of the cluster (top level, domain and host stanzas only).
    cluster_scope_max_outbound_connections: int | None = None
    cluster_max_message_rate: MessageRate | None = None  # domain stanzas only


@dataclass(frozen=True)
class DomainStanza:
    """A ``domain:`` entry and the caps it sets: for an exact domain ``key``
    is that domain (lower-case); for ``/regex/`` it is the key as written and
    ``pattern`` the regex, matched against the whole domain in any case.
    ``line`` is its line in the YAML file."""

    key: str
    caps: ScopeCaps
    pattern: re.Pattern[str] | None = None
    line: int | None = None

    def matches(self, domain: str) -> bool:
        if self.pattern is not None:
            return self.pattern.fullmatch(domain) is not None
        return self.key.lower() == domain


@dataclass(frozen=True)
class BindingConfig:
    """A binding: a source address to connect from (None: the system's
    choice), its caps and domain stanzas, and the group it is in, if any."""

    name: str
    bind_address: str | None = None
    caps: ScopeCaps = ScopeCaps()
    domains: tuple[DomainStanza, ...] = ()
    group: str | None = None


@dataclass(frozen=True)
class BindingGroupConfig:
    """A binding group: the names of its bindings, its caps and domain stanzas."""

    name: str
    bindings: tuple[str, ...] = ()
    caps: ScopeCaps = ScopeCaps()
    domains: tuple[DomainStanza, ...] = ()


@dataclass(frozen=True)
class HostStanza:
    """A ``host:`` entry: a mail host's name or IP address (lower-case), the
    caps it sets, and its line in the YAML file."""

    key: str
    caps: ScopeCaps
    line: int | None = None


@dataclass(frozen=True)
class ClusterConfig:
    """``cluster:``: the Redis server that holds the cluster-wide limits
    (``redis://`` or ``rediss://`` URL, never with a password in it), the file
    holding its password, and how long a connection's lease lasts unrenewed."""

    redis: str
    password_file: Path | None = None
    lease_seconds: int = 30
    password_file_line: int | None = field(default=None, compare=False)  # in the YAML file, for errors


@dataclass(frozen=True)
class DkimKey:
    """A ``dkim:`` entry: the key that signs mail whose From: domain is ``domain``."""

    domain: str  # lower-case
    selector: str
    key_file: Path
    key: bytes = field(repr=False)  # the PEM, read and checked once, when the config is loaded
    line: int | None = None
