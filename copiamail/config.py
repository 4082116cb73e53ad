"""Configuration: ``copiamail.yaml`` (ruamel.yaml) and the CFG file, as one frozen,
validated :class:`Config`.

The YAML file is found as ``--config PATH``, else ``$COPIAMAIL_CONFIG``, else
``./copiamail.yaml``, else built-in defaults. Unknown keys and bad values raise
:class:`~copiamail.errors.ConfigError` naming the file, line and key. Relative
paths are relative to the config file's folder (to the working folder when
there is no file).

The CFG file (CopiaFacts ``FAXFACTS.CFG`` syntax) holds ``$domain_limit``,
``$email_retry_delays``, ``$email_retry_max`` and ``$email_esender``; any other
command is ignored with a warning naming file and line.
"""

from __future__ import annotations

import functools
import ipaddress
import math
import os
import re
import stat
from collections.abc import Callable, Collection, Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import YAMLError

from copiamail.errors import ConfigError, SyntaxFileError
from copiamail.jobfile import outcome
from copiamail.jobfile.dkim import is_dns_name, key_problem
from copiamail.jobfile.fsfile import CommandFile
from copiamail.jobfile.job import JobEnv, parse_address, read_mailbox, written_address
from copiamail.jobfile.rules import DomainLimitRule, parse_rule

CONFIG_ENV = "COPIAMAIL_CONFIG"
DEFAULT_CONFIG_NAME = "copiamail.yaml"


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
class ScopeCaps:
    """The caps a stanza sets (each at least 1); None where it sets none: the
    scope's pooled cap, and the cap of each domain in the scope apart."""

    scope_max_outbound_connections: int | None = None
    max_outbound_connections: int | None = None


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
    """``cluster:``, read and checked; nothing acts on it yet (there is no
    cluster-wide limiter)."""

    redis: str
    lease_seconds: int = 30


@dataclass(frozen=True)
class DkimKey:
    """A ``dkim:`` entry: the key that signs mail whose From: domain is ``domain``."""

    domain: str  # lower-case
    selector: str
    key_file: Path
    key: bytes = field(repr=False)  # the PEM, read and checked once, when the config is loaded
    line: int | None = None


@dataclass(frozen=True)
class CfgRules:
    """What the CFG file says."""

    path: Path | None = None
    domain_limits: tuple[DomainLimitRule, ...] = ()
    retry_delays: Mapping[str, tuple[outcome.RetryItem, ...]] = field(default_factory=dict)
    retry_max: int | None = None
    esender: str | None = None
    warnings: tuple[str, ...] = ()
    variables: Mapping[str, str] = field(default_factory=dict)  # $var_def, names upper-case
    fallback_delays: Mapping[str, tuple[outcome.RetryItem, ...]] = field(default_factory=dict)  # $retry_delays
    fallback_max: int | None = None  # $retry_max
    from_header: str | None = None  # $email_from, else $email_esender as written

    @property
    def retry_rules(self) -> outcome.RetryRules:
        return outcome.RetryRules(self.retry_delays, self.retry_max, self.fallback_delays, self.fallback_max)


@dataclass(frozen=True)
class Config:
    path: Path | None = None
    spool: Path = Path("spool")
    cfg_path: Path | None = None
    queues: int = 15
    attachment_roots: tuple[Path, ...] = ()
    esender: str = "mailer@localhost"
    shutdown_grace: float = 10.0
    relay: RelayConfig | None = None
    retry_relay: RelayConfig | None = None  # where a retry list's I items send their retries
    dns: DnsConfig = DnsConfig()
    mx_port: int = 25
    server_max_outbound_connections: int = 100
    server_reserve_outbound_connections: int = 0
    max_outbound_connections: int = 32
    binding_groups: tuple[BindingGroupConfig, ...] = ()
    bindings: tuple[BindingConfig, ...] = ()
    domains: tuple[DomainStanza, ...] = ()
    hosts: tuple[HostStanza, ...] = ()
    default_binding_group: str | None = None
    cluster: ClusterConfig | None = None
    scan_interval: float = 5.0
    watcher: str = "native"  # native | polling
    smtp_timeout: float = 60.0
    messages_per_connection: int = 100
    connection_idle: float = 1.0
    fsync: bool = True
    helo_name: str | None = None
    mx_tls_verify: bool = False
    node_stale_after: float = 300.0
    workers: int = 1
    # Windows path prefixes (lower-case, as written in jobs) and the local
    # folders they stand for, longest prefix first.
    path_map: tuple[tuple[str, str], ...] = ()
    write_settle: float = 5.0
    variables: Mapping[str, str] = field(default_factory=dict)  # `variables:`, names upper-case
    dkim: Mapping[str, DkimKey] = field(default_factory=lambda: MappingProxyType({}))  # by From: domain
    rules: CfgRules = CfgRules()

    @functools.cached_property
    def job_env(self) -> JobEnv:
        """What jobs' `NAME references draw on besides the job: the CFG's
        $var_def over config ``variables:``, and the default envelope sender."""
        return JobEnv({**self.variables, **self.rules.variables}, self.rules.esender or self.esender,
                      self.rules.from_header)

    @property
    def roots(self) -> tuple[Path, ...]:
        """attachment_roots, defaulting to the spool root."""
        return self.attachment_roots or (self.spool,)

    def binding(self, name: str) -> BindingConfig | None:
        return next((b for b in self.bindings if b.name == name), None)

    def binding_group(self, name: str) -> BindingGroupConfig | None:
        return next((g for g in self.binding_groups if g.name == name), None)

    def shared_caps(self) -> list[tuple[str, int]]:
        """The caps that count connections of more than one domain (key, cap):
        the node total, binding and group totals, the pooled cap of a regex
        stanza, a host's cap. With ``workers`` > 1 each is divided between the
        workers; a cap of one domain alone is not (its domain has one worker)."""
        out = [("server_max_outbound_connections", self.server_max_outbound_connections)]

        def pooled(stanzas: tuple[DomainStanza, ...], where: str) -> None:
            for s in stanzas:
                if s.pattern is not None and s.caps.scope_max_outbound_connections is not None:
                    out.append((f"{where}.domain.{s.key}.scope_max_outbound_connections", s.caps.scope_max_outbound_connections))

        for g in self.binding_groups:
            if g.caps.scope_max_outbound_connections is not None:
                out.append((f"binding_group.{g.name}.scope_max_outbound_connections", g.caps.scope_max_outbound_connections))
            pooled(g.domains, f"binding_group.{g.name}")
        for b in self.bindings:
            where = f"binding_group.{b.group}.binding.{b.name}" if b.group else f"binding.{b.name}"
            if b.caps.scope_max_outbound_connections is not None:
                out.append((f"{where}.scope_max_outbound_connections", b.caps.scope_max_outbound_connections))
            pooled(b.domains, where)
        pooled(self.domains, "")
        for h in self.hosts:
            if h.caps.scope_max_outbound_connections is not None:
                out.append((f"host.{h.key}.scope_max_outbound_connections", h.caps.scope_max_outbound_connections))
        return [(k.lstrip("."), cap) for k, cap in out]

    def with_overrides(self, spool: Path | None = None, relay: str | None = None,
                       relay_ca_file: Path | None = None, relay_tls_verify: bool | None = None) -> Config:
        """The CLI's ``--spool DIR``, ``--relay HOST[:PORT]``, ``--relay-ca FILE``
        (relay.ca_file) and ``--relay-no-verify`` (relay.tls_verify: false) on
        top of the file; the last two need a relay and exclude each other."""
        cfg = self
        if spool is not None:
            cfg = replace(cfg, spool=Path(spool).absolute())
        if relay is not None:
            host, port = parse_host_port(relay, "--relay")
            base = cfg.relay or RelayConfig(host=host)
            cfg = replace(cfg, relay=replace(base, host=host, port=port))
        if relay_ca_file is not None or relay_tls_verify is not None:
            if cfg.relay is None:
                raise ConfigError("--relay-ca and --relay-no-verify need a relay (--relay HOST[:PORT] or relay: in the config)")
            if relay_ca_file is not None and relay_tls_verify is False:
                raise ConfigError("--relay-ca and --relay-no-verify exclude each other (a CA file is for verifying)")
            tls = replace(cfg.relay, ca_file=Path(relay_ca_file).absolute()) if relay_ca_file is not None else cfg.relay
            cfg = replace(cfg, relay=replace(tls, tls_verify=relay_tls_verify) if relay_tls_verify is not None else tls)
        return cfg


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


# --- YAML -------------------------------------------------------------------


class _Reader:
    """Walks the YAML tree, naming file, line and key in every error."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.base = path.parent if path is not None else Path.cwd()

    def error(self, node: Any, key: str, message: str, leaf: Any = None) -> ConfigError:
        # ``leaf`` is the key as it stands in ``node`` when it may hold a dot.
        leaf = key.rsplit(".", 1)[-1] if leaf is None else leaf
        return ConfigError(f"key '{key}': {message}", self.path, self.line(node, leaf))

    @staticmethod
    def line(node: Any, leaf: Any) -> int | None:
        """The line of key ``leaf`` in ``node`` (else of ``node`` itself)."""
        if isinstance(node, CommentedMap) and leaf in node:
            try:
                return node.lc.key(leaf)[0] + 1
            except (KeyError, TypeError, AttributeError):
                pass
        if isinstance(node, (CommentedMap, CommentedSeq)):
            return node.lc.line + 1
        return None

    def child(self, parent: CommentedMap, leaf: Any, full: str, allowed: Collection[str] | None) -> CommentedMap:
        """``parent[leaf]`` as a mapping (empty when null) with only ``allowed`` keys
        (any key when None); the error for a non-mapping names the key's line."""
        node = parent[leaf]
        if node is None:
            return CommentedMap()
        if not isinstance(node, CommentedMap):
            raise self.error(parent, full, f"must be a mapping, got {node!r}", leaf=leaf)
        return self.mapping(node, full, allowed if allowed is not None else {str(k) for k in node})

    def mapping(self, node: Any, key: str, allowed: Collection[str]) -> CommentedMap:
        if not isinstance(node, CommentedMap):
            if not key:
                raise ConfigError("the top level must be a mapping of keys", self.path, self.line(node, None) or 1)
            raise ConfigError(f"key '{key}': must be a mapping", self.path)
        for k in node:
            if str(k) not in allowed:
                raise self.error(node, f"{key}.{k}" if key else str(k), "unknown key", leaf=k)
        return node

    def integer(self, m: CommentedMap, key: str, full: str, lo: int, hi: int | None = None) -> int:
        v = m[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
            span = f"from {lo} to {hi}" if hi is not None else f"at least {lo}"
            raise self.error(m, full, f"must be an integer {span}, got {v!r}")
        return v

    def number(self, m: CommentedMap, key: str, full: str, lo: float) -> float:
        v = m[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < lo:
            raise self.error(m, full, f"must be a number of at least {lo}, got {v!r}")
        return float(v)

    def string(self, m: CommentedMap, key: str, full: str, choices: tuple[str, ...] | None = None) -> str:
        v = m[key]
        if not isinstance(v, str) or not v or "\x00" in v:
            raise self.error(m, full, f"must be a non-empty string, got {v!r}")
        if choices is not None and v not in choices:
            raise self.error(m, full, f"must be one of {', '.join(choices)}, got {v!r}")
        return v

    def boolean(self, m: CommentedMap, key: str, full: str) -> bool:
        v = m[key]
        if not isinstance(v, bool):
            raise self.error(m, full, f"must be true or false, got {v!r}")
        return v

    def pathval(self, m: CommentedMap, key: str, full: str) -> Path:
        return (self.base / self.string(m, key, full)).absolute()


# How one key's value is read: ``read(reader, mapping, key, full)`` returns the
# value of ``mapping[key]`` (there, and not null), named ``full`` in errors.
_Read = Callable[[_Reader, CommentedMap, str, str], Any]


def _integer(lo: int, hi: int | None = None) -> _Read:
    return lambda r, m, key, full: r.integer(m, key, full, lo, hi)


def _number(lo: float) -> _Read:
    return lambda r, m, key, full: r.number(m, key, full, lo)


def _choice(*choices: str) -> _Read:
    return lambda r, m, key, full: r.string(m, key, full, choices)


_string: _Read = _Reader.string
_boolean: _Read = _Reader.boolean
_path: _Read = _Reader.pathval


def _values(r: _Reader, m: CommentedMap, keys: Mapping[str, _Read], full: str) -> dict[str, Any]:
    """What ``m`` (named ``full``) sets of ``keys``, each read by its reader, in
    the order of ``keys``; a key that is missing or null is left out (its
    field keeps its default)."""
    return {key: read(r, m, key, f"{full}.{key}" if full else key)
            for key, read in keys.items() if m.get(key) is not None}


def _required(cls: type) -> tuple[str, ...]:
    """The fields of dataclass ``cls`` that have no default."""
    return tuple(f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING)


def _section(r: _Reader, parent: CommentedMap, key: str, full: str, cls: type[Any],
             keys: Mapping[str, _Read]) -> tuple[CommentedMap, Any]:
    """``parent[key]``, a mapping of ``keys`` only, read into dataclass ``cls``
    (whose fields without a default it must give): the mapping and the value."""
    m = r.child(parent, key, full, keys)
    for name in _required(cls):
        if m.get(name) is None:
            raise r.error(m, f"{full}.{name}", "is required")
    return m, cls(**_values(r, m, keys, full))


def _section_of(cls: type[Any], keys: Mapping[str, _Read]) -> _Read:
    """The reader of a mapping read into dataclass ``cls`` (see :func:`_section`)."""
    return lambda r, m, key, full: _section(r, m, key, full, cls, keys)[1]


_RELAY_KEYS: Mapping[str, _Read] = MappingProxyType({
    "host": _string, "port": _integer(1, 65535), "starttls": _choice("auto", "always", "never"),
    "username": _string, "password_file": _path, "tls_verify": _boolean, "ca_file": _path,
})


def _relay(r: _Reader, parent: CommentedMap, key: str, full: str) -> RelayConfig:
    m, relay = _section(r, parent, key, full, RelayConfig, _RELAY_KEYS)
    return replace(relay, password_file_line=r.line(m, "password_file"))


def _nameservers(r: _Reader, m: CommentedMap, key: str, full: str) -> tuple[str, ...]:
    ns = m[key]
    if not isinstance(ns, CommentedSeq) or not all(isinstance(x, str) and is_ip(x) for x in ns):
        raise r.error(m, full, "must be a list of IP addresses")
    return tuple(ns)


_DNS_KEYS: Mapping[str, _Read] = MappingProxyType({
    "nameservers": _nameservers, "port": _integer(1, 65535), "timeout": _number(0.1),
})
_CLUSTER_KEYS: Mapping[str, _Read] = MappingProxyType({"redis": _string, "lease_seconds": _integer(1)})

# Accepted in every stanza so that it is refused with a reason, not as unknown.
_CLUSTER_CAP = "cluster_scope_max_outbound_connections"
_CAP_KEYS: Mapping[str, _Read] = MappingProxyType({f.name: _integer(1) for f in fields(ScopeCaps)})
_STANZA_KEYS = frozenset({*_CAP_KEYS, _CLUSTER_CAP})


def _caps(r: _Reader, m: CommentedMap, full: str) -> ScopeCaps:
    if m.get(_CLUSTER_CAP) is not None:
        # Refused rather than enforced per node: a cluster-wide cap held by one
        # node alone would be a limit users believe in and that does not hold.
        raise r.error(m, f"{full}.{_CLUSTER_CAP}" if full else _CLUSTER_CAP,
                      "cluster-wide limits are not available yet; use scope_max_outbound_connections (per node)")
    return ScopeCaps(**_values(r, m, _CAP_KEYS, full))


def _domains(r: _Reader, parent: CommentedMap, full: str) -> tuple[DomainStanza, ...]:
    if parent.get("domain") is None:
        return ()
    m = r.child(parent, "domain", full, None)
    exact: list[DomainStanza] = []
    regex: list[DomainStanza] = []
    for key in m:
        if not isinstance(key, str) or not key:
            raise r.error(m, f"{full}.{key}", "a domain key must be a domain name or /regex/", leaf=key)
        name = key
        stanza_key = f"{full}.{name}"
        body = r.child(m, key, stanza_key, _STANZA_KEYS)
        line = m.lc.key(key)[0] + 1
        caps = _caps(r, body, stanza_key)
        if len(name) >= 2 and name.startswith("/") and name.endswith("/"):
            try:
                pattern = re.compile(name[1:-1], re.IGNORECASE)
            except (re.error, OverflowError, RecursionError) as e:
                raise ConfigError(f"key '{stanza_key}': bad regex: {e}", r.path, line) from None
            regex.append(DomainStanza(name, caps, pattern, line))
        else:
            exact.append(DomainStanza(name.lower(), caps, None, line))
    # Exact stanzas are tried first, then regex stanzas in order.
    return tuple(exact + regex)


def _binding(r: _Reader, parent: CommentedMap, name: Any, full: str, group: str | None) -> BindingConfig:
    m = r.child(parent, name, full, {"bind_address", "domain", *_STANZA_KEYS})
    addr = r.string(m, "bind_address", f"{full}.bind_address") if m.get("bind_address") is not None else None
    if addr is not None:
        try:
            ipaddress.ip_address(addr)
        except ValueError:
            raise r.error(m, f"{full}.bind_address", f"not an IP address: {addr!r}") from None
    return BindingConfig(str(name), addr, _caps(r, m, full), _domains(r, m, f"{full}.domain"), group)


def _hosts(r: _Reader, m: CommentedMap, key: str, full: str) -> tuple[HostStanza, ...]:
    hm = r.child(m, key, full, None)
    for h in hm:
        if not isinstance(h, str) or not h:
            raise r.error(hm, f"{full}.{h}", "a host key must be a host name or an IP address", leaf=h)
    return tuple(
        HostStanza(str(h).lower(), _caps(r, r.child(hm, h, f"{full}.{h}", _STANZA_KEYS), f"{full}.{h}"), hm.lc.key(h)[0] + 1)
        for h in hm
    )


# A PEM RSA key of 4096 bits is about 3 KiB; a larger file is not a key.
_MAX_KEY_FILE = 64 * 1024


def _dkim(r: _Reader, parent: CommentedMap, key: str, full: str) -> Mapping[str, DkimKey]:
    """``dkim``: ``{domain: {selector, key_file}}``. Each key is read and checked
    here, so a missing or bad key stops the node at start (and check-config
    names it) rather than failing every message."""
    m = r.child(parent, key, full, None)
    out: dict[str, DkimKey] = {}
    for domain in m:
        where = f"{full}.{domain}"
        if not isinstance(domain, str) or not is_dns_name(domain):
            raise r.error(m, where, "must be a domain name (the From: domain to sign for)", leaf=domain)
        if domain.lower() in out:
            raise r.error(m, where, "domain listed twice", leaf=domain)
        body = r.child(m, domain, where, {"selector", "key_file"})
        for needed in ("selector", "key_file"):
            if body.get(needed) is None:
                raise r.error(m, f"{where}.{needed}", "is required", leaf=domain)
        selector = r.string(body, "selector", f"{where}.selector")
        if not is_dns_name(selector):
            raise r.error(body, f"{where}.selector", f"not a DKIM selector (letters, digits, '-' and '.'): {selector!r}")
        key_file = r.pathval(body, "key_file", f"{where}.key_file")
        try:
            info = key_file.stat()
            if not stat.S_ISREG(info.st_mode) or info.st_size > _MAX_KEY_FILE:
                raise r.error(body, f"{where}.key_file", f"{key_file} is not a key file (not a regular file of at most 64 KiB)")
            key_pem = key_file.read_bytes()
        except OSError as e:
            raise r.error(body, f"{where}.key_file", f"cannot read {key_file}: {e.strerror or e}") from None
        problem = key_problem(key_pem)
        if problem is not None:
            raise r.error(body, f"{where}.key_file", f"{key_file}: {problem}")
        out[domain.lower()] = DkimKey(domain.lower(), selector, key_file, key_pem, m.lc.key(domain)[0] + 1)
    return MappingProxyType(out)


def _variables(r: _Reader, parent: CommentedMap, key: str, full: str) -> dict[str, str]:
    """``variables:``: NAME: value, as a CFG's ``$var_def NAME value``."""
    m = r.child(parent, key, full, None)
    out = {}
    for name, value in m.items():
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_]{1,32}", name):
            raise r.error(m, f"{full}.{name}", "a variable name is letters, digits and '_' (at most 32)", leaf=name)
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise r.error(m, f"{full}.{name}", "must be a text or a number", leaf=name)
        out[name.upper()] = str(value)
    return out


def _path_map(r: _Reader, parent: CommentedMap, key: str, full: str) -> tuple[tuple[str, str], ...]:
    """``path_map``: Windows path prefixes as jobs write them (matched in any
    case) to local folders (relative to the config file's folder)."""
    m = r.child(parent, key, full, None)
    out = []
    for prefix, folder in m.items():
        where = f"{full}.{prefix}"
        if not isinstance(prefix, str) or not prefix:
            raise r.error(m, full, "keys must be path prefixes such as 'C:\\Copia\\'", leaf=prefix)
        if not isinstance(folder, str) or not folder or "\x00" in folder:
            raise r.error(m, where, "must be a local folder path", leaf=prefix)
        local = os.fspath((r.base / folder).absolute())
        if folder.endswith("/") or prefix.endswith(("\\", "/")):
            local = os.path.join(local, "")
        out.append((prefix.lower(), local))
    return tuple(sorted(out, key=lambda pair: -len(pair[0])))


def _esender(r: _Reader, m: CommentedMap, key: str, full: str) -> str:
    sender = r.string(m, key, full)
    if parse_address(sender) is None:
        raise r.error(m, full, f"not an e-mail address: {sender!r}")
    return sender


def _helo_name(r: _Reader, m: CommentedMap, key: str, full: str) -> str:
    name = r.string(m, key, full)
    if not (is_fqdn(name) or is_address_literal(name)):
        raise r.error(m, full, f"must be a fully qualified domain name (mail.example.com) or an address "
                               f"literal ([192.0.2.1]), got {name!r}")
    return name


def _folders(r: _Reader, m: CommentedMap, key: str, full: str) -> tuple[Path, ...]:
    roots = m[key]
    if not isinstance(roots, CommentedSeq) or not all(isinstance(x, str) and x and "\x00" not in x for x in roots):
        raise r.error(m, full, "must be a list of folder paths")
    return tuple((r.base / x).absolute() for x in roots)


# One top-level key read into ``kw``, the keyword arguments of Config that
# the file sets: ``step(reader, top mapping, key, kw)``.
_Step = Callable[[_Reader, CommentedMap, str, dict[str, Any]], None]


def _field(read: _Read, name: str | None = None) -> _Step:
    """The step of a key that sets one Config field (``name``, else the key's
    own name) when the file gives it."""
    def step(r: _Reader, m: CommentedMap, key: str, kw: dict[str, Any]) -> None:
        if m.get(key) is not None:
            kw[name or key] = read(r, m, key, key)
    return step


def _global_scope_cap(r: _Reader, m: CommentedMap, key: str, kw: dict[str, Any]) -> None:
    if m.get(key) is not None:
        # In the global scope it behaves like server_max_outbound_connections (Momentum).
        node_cap = kw.get("server_max_outbound_connections", Config.server_max_outbound_connections)
        kw["server_max_outbound_connections"] = min(node_cap, r.integer(m, key, key, 1))


def _binding_groups(r: _Reader, m: CommentedMap, key: str, kw: dict[str, Any]) -> None:
    """``binding_group``: the groups, and the bindings defined in them."""
    groups: list[BindingGroupConfig] = []
    bindings: list[BindingConfig] = []
    if m.get(key) is not None:
        gm = r.child(m, key, key, None)
        for gname in gm:
            full = f"{key}.{gname}"
            g = r.child(gm, gname, full, {"binding", "domain", *_STANZA_KEYS})
            names: list[str] = []
            if g.get("binding") is not None:
                bm = r.child(g, "binding", f"{full}.binding", None)
                for bname in bm:
                    bindings.append(_binding(r, bm, bname, f"{full}.binding.{bname}", str(gname)))
                    names.append(str(bname))
            if not names:
                raise r.error(gm, full, "a binding group needs at least one binding", leaf=gname)
            groups.append(BindingGroupConfig(str(gname), tuple(names), _caps(r, g, full), _domains(r, g, f"{full}.domain")))
    kw["binding_groups"] = tuple(groups)
    kw["bindings"] = tuple(bindings)


def _bindings(r: _Reader, m: CommentedMap, key: str, kw: dict[str, Any]) -> None:
    """``binding``: the bindings of no group, after those of the groups; a
    name defined twice (in any two places) is refused."""
    bindings = list(kw.get("bindings", ()))
    if m.get(key) is not None:
        bm = r.child(m, key, key, None)
        bindings += [_binding(r, bm, bname, f"{key}.{bname}", None) for bname in bm]
    seen: set[str] = set()
    for b in bindings:
        if b.name in seen:
            raise ConfigError(f"key 'binding.{b.name}': binding defined twice", r.path)
        seen.add(b.name)
    kw["bindings"] = tuple(bindings)


def _default_binding_group(r: _Reader, m: CommentedMap, key: str, kw: dict[str, Any]) -> None:
    if m.get(key) is not None:
        name = r.string(m, key, key)
        if name not in {g.name for g in kw.get("binding_groups", ())}:
            raise r.error(m, key, f"no binding group named {name!r}")
        kw[key] = name


# The top-level keys of copiamail.yaml, each with how it is read, in the order
# they are read: of several bad keys, the first here is the one reported.
# Every default is the Config field's; a key that is missing or null keeps it.
_TOP_LEVEL: Mapping[str, _Step] = MappingProxyType({
    "spool": _field(_path),
    "cfg": _field(_path, "cfg_path"),
    "queues": _field(_integer(0, 99)),
    "mx_port": _field(_integer(1, 65535)),
    "server_max_outbound_connections": _field(_integer(1)),
    "server_reserve_outbound_connections": _field(_integer(0)),
    "max_outbound_connections": _field(_integer(1)),
    "messages_per_connection": _field(_integer(1)),
    "workers": _field(_integer(1, 64)),
    "scope_max_outbound_connections": _global_scope_cap,
    "shutdown_grace": _field(_number(0.0)),
    "scan_interval": _field(_number(0.05)),
    "smtp_timeout": _field(_number(0.1)),
    "connection_idle": _field(_number(0.0)),
    "node_stale_after": _field(_number(0.0)),
    "write_settle": _field(_number(0.0)),
    "esender": _field(_esender),
    "watcher": _field(_choice("native", "polling")),
    "fsync": _field(_boolean),
    "mx_tls_verify": _field(_boolean),
    "helo_name": _field(_helo_name),
    "attachment_roots": _field(_folders),
    "variables": _field(_variables),
    "path_map": _field(_path_map),
    "dkim": _field(_dkim),
    "relay": _field(_relay),
    "retry_relay": _field(_relay),
    "dns": _field(_section_of(DnsConfig, _DNS_KEYS)),
    "binding_group": _binding_groups,
    "binding": _bindings,
    "domain": _field(lambda r, m, key, full: _domains(r, m, full), "domains"),
    "host": _field(_hosts, "hosts"),
    "default_binding_group": _default_binding_group,
    "cluster": _field(_section_of(ClusterConfig, _CLUSTER_KEYS)),
})
_TOP_KEYS = frozenset(_TOP_LEVEL)  # every key the top level may hold


def find_config(explicit: Path | str | None) -> Path | None:
    """The config file to read: explicit, then $COPIAMAIL_CONFIG, then ./copiamail.yaml."""
    if explicit is not None:
        p = Path(explicit)
        if not p.is_file():
            raise ConfigError("config file not found", p)
        return p
    env = os.environ.get(CONFIG_ENV)
    if env:
        p = Path(env)
        if not p.is_file():
            raise ConfigError(f"config file not found (named by ${CONFIG_ENV})", p)
        return p
    p = Path(DEFAULT_CONFIG_NAME)
    return p if p.is_file() else None


def load_config(explicit: Path | str | None = None) -> Config:
    """Find, read and validate the configuration and its CFG file; without a
    file, the defaults (relative paths from the working folder)."""
    path = find_config(explicit)
    if path is None:
        return parse_config(CommentedMap(), None)
    path = path.absolute()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read: {e}", path) from None
    try:
        data = YAML(typ="rt").load(text)
    except YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"YAML syntax: {problem}", path, line) from None
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        # ruamel's constructors: a tagged value they cannot build (!!int x,
        # a date that does not exist), or nesting too deep to read.
        raise ConfigError(f"YAML value cannot be read: {type(e).__name__}: {e}", path) from None
    if data is None:
        data = CommentedMap()
    try:
        return parse_config(data, path)
    except RecursionError:
        raise ConfigError("YAML nested too deeply", path) from None


def parse_config(data: Any, path: Path | None) -> Config:
    """The Config that YAML tree ``data`` (read from ``path``; None: no file)
    describes, with its CFG file read; ConfigError naming file, line and key."""
    r = _Reader(path)
    m = r.mapping(data, "", _TOP_KEYS)
    # A relative path is taken from the config file's folder, the default spool too.
    kw: dict[str, Any] = {"path": path, "spool": (r.base / Config.spool).absolute()}
    for key, step in _TOP_LEVEL.items():
        step(r, m, key, kw)
    cfg = Config(**kw)
    if cfg.server_reserve_outbound_connections >= cfg.server_max_outbound_connections:
        raise r.error(m, "server_reserve_outbound_connections", "must be smaller than server_max_outbound_connections")
    problem = workers_problem(cfg)
    if problem is not None:
        raise r.error(m, "workers", problem)
    if cfg.cfg_path is not None:
        cfg = replace(cfg, rules=load_cfg(cfg.cfg_path))
    return cfg


def workers_problem(cfg: Config) -> str | None:
    """Why ``cfg.workers`` cannot run, or None. More workers than a shared cap
    has slots is refused: a worker with no slot of the node total (or of a
    pooled cap) could never send its domains."""
    for key, cap in cfg.shared_caps():
        if cap < cfg.workers:
            return (f"{cfg.workers} workers share '{key}' ({cap}), which needs at least one slot per worker; "
                    f"use at most {cap} workers or raise the cap")
    return None


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


def read_password(config: Config, key: str = "relay") -> str | None:
    """The password of ``relay`` (or ``retry_relay``), read from its
    ``password_file`` (None without one); a ConfigError naming the YAML file,
    line and key when it cannot be read (check-config checks this too, so a
    node never stops on it)."""
    relay = config.relay if key == "relay" else config.retry_relay
    if relay is None or relay.password_file is None:
        return None
    try:
        return relay.password_file.read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as e:
        why = e.strerror or str(e)
    except UnicodeDecodeError:
        why = "not UTF-8 text"
    raise ConfigError(f"key '{key}.password_file': cannot read {relay.password_file}: {why}",
                      config.path, relay.password_file_line)


# --- CFG --------------------------------------------------------------------


# CFG commands of CopiaFacts' e-mail set that copiamail accepts without a
# warning and leaves to copiamail.yaml ($email_settings: DNS and SMTP timeouts).
_CFG_KNOWN_UNUSED = frozenset({"email_settings"})


def load_cfg(path: Path) -> CfgRules:
    """Read the CFG file: ``$domain_limit``, retry rules, ``$email_esender``."""
    try:
        cf = CommandFile.read(path)
    except FileNotFoundError:
        raise ConfigError("CFG file not found", path) from None
    except OSError as e:
        raise ConfigError(f"cannot read CFG file: {e.strerror}", path) from None
    except ValueError as e:  # a name the file system cannot take (NUL, a lone surrogate)
        raise ConfigError(f"bad CFG file name: {e}", repr(str(path))) from None
    try:
        commands = cf.commands()
    except SyntaxFileError as e:
        raise ConfigError(e.message, path, e.line) from None
    rules: list[DomainLimitRule] = []
    delays: dict[str, dict[str, tuple[outcome.RetryItem, ...]]] = {"email_retry_delays": {}, "retry_delays": {}}
    maxima: dict[str, int] = {}
    esender: str | None = None
    written: dict[str, str] = {}
    warnings: list[str] = []
    variables: dict[str, str] = {}
    for cmd in commands:
        if cmd.name == "domain_limit":
            rules.append(parse_rule(cmd, path))
        elif cmd.name in delays:
            try:
                klass, items = outcome.parse_retry_command(cmd.args)
            except ValueError as e:
                raise ConfigError(f"${cmd.name} {e}" if not cmd.args else str(e), path, cmd.line) from None
            delays[cmd.name][klass] = items
        elif cmd.name in ("email_retry_max", "retry_max"):
            if len(cmd.args) != 1 or not (cmd.args[0].isascii() and cmd.args[0].isdigit()):
                raise ConfigError(f"${cmd.name} needs one number of retries (0 or more)", path, cmd.line)
            maxima[cmd.name] = int(cmd.args[0])
        elif cmd.name in ("email_esender", "email_from"):
            text = written_address(cmd, cf)
            mailbox = read_mailbox(text)
            if mailbox is None:
                raise ConfigError(f"${cmd.name} needs one e-mail address (a display name may come first)",
                                  path, cmd.line)
            written[cmd.name] = text
            if cmd.name == "email_esender":
                esender = mailbox.address
        elif cmd.name == "var_def":
            if not cmd.args:
                raise ConfigError("$var_def needs a NAME", path, cmd.line)
            variables[cmd.args[0].upper()] = " ".join(cmd.args[1:])
        elif cmd.name in _CFG_KNOWN_UNUSED:
            continue
        else:
            warnings.append(f"{path}:{cmd.line}: ${cmd.name} is not used by copiamail; ignored")
    return CfgRules(path, tuple(rules), delays["email_retry_delays"], maxima.get("email_retry_max"), esender,
                    tuple(warnings), variables, delays["retry_delays"], maxima.get("retry_max"),
                    written.get("email_from") or written.get("email_esender"))
