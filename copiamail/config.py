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

This module holds :class:`Config`, finding and loading it, and the checks of
the whole. Its parts, each name importable from here too: the sections'
dataclasses (:mod:`copiamail.config_sections`), the YAML tree read value by
value (:mod:`copiamail.config_yaml`) and key by key
(:mod:`copiamail.config_keys`; the scopes of limits,
:mod:`copiamail.config_scopes`), the CFG file (:mod:`copiamail.config_cfg`),
host names and addresses (:mod:`copiamail.config_checks`).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ruamel.yaml.comments import CommentedMap

from copiamail.config_cfg import CfgRules, load_cfg
from copiamail.config_checks import is_address_literal, is_fqdn, is_ip, parse_host_port
from copiamail.config_keys import TOP_KEYS as _TOP_KEYS
from copiamail.config_keys import TOP_LEVEL
from copiamail.config_sections import (
    BindingConfig,
    BindingGroupConfig,
    ClusterConfig,
    DkimKey,
    DnsConfig,
    DomainStanza,
    HostStanza,
    MessageRate,
    RelayConfig,
    ScopeCaps,
    WebConfig,
)
from copiamail.config_yaml import Reader
from copiamail.errors import ConfigError
from copiamail.jobfile.model import JobEnv
from copiamail.throttle import ThrottlePattern, ThrottleTable, shipped_table
from copiamail.yamlfile import load_yaml

__all__ = [
    "CONFIG_ENV",
    "DEFAULT_CONFIG_NAME",
    "BindingConfig",
    "BindingGroupConfig",
    "CfgRules",
    "ClusterConfig",
    "Config",
    "DkimKey",
    "DnsConfig",
    "DomainStanza",
    "HostStanza",
    "MessageRate",
    "RelayConfig",
    "ScopeCaps",
    "cluster_settings",
    "find_config",
    "is_address_literal",
    "is_fqdn",
    "is_ip",
    "load_cfg",
    "load_config",
    "parse_config",
    "parse_host_port",
    "read_password",
]

CONFIG_ENV = "COPIAMAIL_CONFIG"
DEFAULT_CONFIG_NAME = "copiamail.yaml"


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
    cluster_scope_max_outbound_connections: int | None = None  # every node's connections together
    web: WebConfig = WebConfig()  # where `copiamail web` listens, and its token
    scan_interval: float = 5.0
    watcher: str = "native"  # native | polling (or poll, the same)
    smtp_timeout: float = 60.0
    messages_per_connection: int = 100
    max_deliveries_per_connection: int | None = None  # the top level's; stanzas may set their own
    connection_idle: float = 1.0
    fsync: bool = True
    helo_name: str | None = None
    mx_tls_verify: bool = False
    smtp_chunking: bool = True  # the message as one BDAT where a server offers CHUNKING
    node_stale_after: float = 300.0
    workers: int | None = None  # None: "auto", one per CPU this process may run on (worker_count)
    # Windows path prefixes (lower-case, as written in jobs) and the local
    # folders they stand for, longest prefix first.
    path_map: tuple[tuple[str, str], ...] = ()
    write_settle: float = 5.0
    refusal_pause: float = 10.0  # seconds without new connections to a host that refused one
    max_message_rate: MessageRate | None = None  # the whole node's
    adaptive: bool = False  # limits learn from throttle replies (stanzas may say otherwise)
    adaptive_suspend: float = 900.0  # seconds a domain rests after a `suspend` reply
    adaptive_recover_after: int = 100  # clean deliveries before a learned limit rises a step
    adaptive_recover_seconds: float = 60.0  # and at least this long after its last change
    variables: Mapping[str, str] = field(default_factory=dict)  # `variables:`, names upper-case
    dkim: Mapping[str, DkimKey] = field(default_factory=lambda: MappingProxyType({}))  # by From: domain
    rules: CfgRules = CfgRules()
    throttle_replies: tuple[ThrottlePattern, ...] = ()  # `throttle_replies:`, tried before the shipped table

    @functools.cached_property
    def throttle_table(self) -> ThrottleTable:
        """The throttle replies this node knows: the operator's own first,
        then the table shipped with copiamail."""
        return shipped_table().before(self.throttle_replies)

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

    @property
    def worker_count(self) -> int:
        """The worker processes a node runs: ``workers``, or with ``auto`` one
        per CPU this process may run on (at most 64)."""
        if self.workers is not None:
            return self.workers
        return max(1, min(64, len(os.sched_getaffinity(0))))

    def binding(self, name: str) -> BindingConfig | None:
        return next((b for b in self.bindings if b.name == name), None)

    def binding_group(self, name: str) -> BindingGroupConfig | None:
        return next((g for g in self.binding_groups if g.name == name), None)

    def shared_caps(self) -> list[tuple[str, int]]:
        """The caps that count connections of more than one domain (key, cap):
        the node total, binding and group totals, the pooled cap of a regex
        stanza, a host's cap. With ``workers`` > 1 each is counted once for the
        node, in the table its workers share; a cap of one domain alone is
        counted by the one worker that sends that domain."""
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
    data = load_yaml(path)
    if data is None:
        data = CommentedMap()
    try:
        return parse_config(data, path)
    except RecursionError:
        raise ConfigError("YAML nested too deeply", path) from None


def parse_config(data: Any, path: Path | None) -> Config:
    """The Config that YAML tree ``data`` (read from ``path``; None: no file)
    describes, with its CFG file read; ConfigError naming file, line and key."""
    r = Reader(path)
    m = r.mapping(data, "", _TOP_KEYS)
    # A relative path is taken from the config file's folder, the default spool
    # too; the global scope cap may lower the node total (see TOP_LEVEL).
    kw: dict[str, Any] = {"path": path, "spool": (r.base / Config.spool).absolute(),
                          "server_max_outbound_connections": Config.server_max_outbound_connections}
    for key, step in TOP_LEVEL.items():
        step(r, m, key, kw)
    cfg = Config(**kw)
    if cfg.server_reserve_outbound_connections >= cfg.server_max_outbound_connections:
        raise r.error(m, "server_reserve_outbound_connections", "must be smaller than server_max_outbound_connections")
    if cfg.cluster is None:
        for key in cluster_settings(cfg)[:1]:
            raise ConfigError(f"key '{key}': a cluster-wide limit needs a Redis server (cluster.redis)",
                              path, _key_line(r, m, key))
    if cfg.cfg_path is not None:
        cfg = replace(cfg, rules=load_cfg(cfg.cfg_path))
    return cfg


def _key_line(r: Reader, m: CommentedMap, key: str) -> int | None:
    """The line of ``key`` (``a.b.c`` as :func:`cluster_settings` names it) in the YAML top level ``m``."""
    kind, _, rest = key.partition(".")
    if not rest:
        return r.line(m, key)
    stanzas = m.get(kind)
    stanza, _, leaf = rest.rpartition(".")
    for name in stanzas if isinstance(stanzas, CommentedMap) else ():
        if str(name).lower() == stanza.lower():
            return r.line(stanzas[name], leaf)
    return r.line(m, kind)


def cluster_settings(cfg: Config) -> list[str]:
    """Where ``cfg`` sets a cluster-wide limit: each key as the YAML file names it."""
    found: list[str] = []
    if cfg.cluster_scope_max_outbound_connections is not None:
        found.append("cluster_scope_max_outbound_connections")
    for kind, stanzas in (("domain", cfg.domains), ("host", cfg.hosts)):
        for stanza in stanzas:
            for name in ("cluster_scope_max_outbound_connections", "cluster_max_message_rate"):
                if getattr(stanza.caps, name) is not None:
                    found.append(f"{kind}.{stanza.key}.{name}")
    return found


def read_password(config: Config, key: str = "relay") -> str | None:
    """The password of ``relay`` (or ``retry_relay``, or ``cluster``: Redis's),
    read from its ``password_file`` (None without one); a ConfigError naming
    the YAML file, line and key when it cannot be read (check-config checks
    this too, so a node never stops on it)."""
    relay = {"relay": config.relay, "retry_relay": config.retry_relay, "cluster": config.cluster}[key]
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
