"""Every key of ``copiamail.yaml``: how each is read and checked, and the
table of the top-level keys in the order they are read. The scopes of
connection limits (stanzas, bindings, groups, hosts) are read by
:mod:`copiamail.config_scopes`. The values go into the dataclasses of
:mod:`copiamail.config_sections`, and the top level into the keyword
arguments of :class:`copiamail.config.Config`."""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ruamel.yaml.comments import CommentedMap, CommentedSeq

from copiamail.config_checks import is_address_literal, is_fqdn, is_ip, parse_listen, redis_url_problem
from copiamail.config_scopes import (
    DOMAIN_CLUSTER,
    read_binding_groups,
    read_bindings,
    read_default_binding_group,
    read_domains,
    read_global_scope_cap,
    read_hosts,
)
from copiamail.config_sections import ClusterConfig, DkimKey, DnsConfig, RelayConfig, WebConfig
from copiamail.config_yaml import (
    Read,
    Reader,
    boolean,
    choice,
    duration,
    integer,
    number,
    path,
    rate,
    section,
    section_of,
    string,
)
from copiamail.errors import ConfigError
from copiamail.jobfile.addresses import parse_address
from copiamail.jobfile.dkim import is_dns_name, key_problem
from copiamail.throttle import ThrottlePattern, read_patterns

_RELAY_KEYS: Mapping[str, Read] = MappingProxyType({
    "host": string, "port": integer(1, 65535), "starttls": choice("auto", "always", "never"),
    "username": string, "password_file": path, "tls_verify": boolean, "ca_file": path,
})


def _relay(r: Reader, parent: CommentedMap, key: str, full: str) -> RelayConfig:
    m, relay = section(r, parent, key, full, RelayConfig, _RELAY_KEYS)
    return replace(relay, password_file_line=r.line(m, "password_file"))


def _nameservers(r: Reader, m: CommentedMap, key: str, full: str) -> tuple[str, ...]:
    ns = m[key]
    if not isinstance(ns, CommentedSeq) or not all(isinstance(x, str) and is_ip(x) for x in ns):
        raise r.error(m, full, "must be a list of IP addresses")
    return tuple(ns)


_DNS_KEYS: Mapping[str, Read] = MappingProxyType({
    "nameservers": _nameservers, "port": integer(1, 65535), "timeout": number(0.1),
})
_CLUSTER_KEYS: Mapping[str, Read] = MappingProxyType({
    "redis": string, "password_file": path, "lease_seconds": integer(1)})


def _cluster(r: Reader, parent: CommentedMap, key: str, full: str) -> ClusterConfig:
    m, cluster = section(r, parent, key, full, ClusterConfig, _CLUSTER_KEYS)
    problem = redis_url_problem(cluster.redis)
    if problem is not None:
        raise r.error(m, f"{full}.redis", problem)
    return replace(cluster, password_file_line=r.line(m, "password_file"))


def _listen(r: Reader, m: CommentedMap, key: str, full: str) -> str:
    text = string(r, m, key, full)
    try:
        parse_listen(text)
    except ValueError as e:
        raise r.error(m, full, str(e)) from None
    return text


_WEB_KEYS: Mapping[str, Read] = MappingProxyType({"listen": _listen, "token_file": path})


# A PEM RSA key of 4096 bits is about 3 KiB; a larger file is not a key.
_MAX_KEY_FILE = 64 * 1024


def _dkim(r: Reader, parent: CommentedMap, key: str, full: str) -> Mapping[str, DkimKey]:
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


def _variables(r: Reader, parent: CommentedMap, key: str, full: str) -> dict[str, str]:
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


def _path_map(r: Reader, parent: CommentedMap, key: str, full: str) -> tuple[tuple[str, str], ...]:
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


def _esender(r: Reader, m: CommentedMap, key: str, full: str) -> str:
    sender = r.string(m, key, full)
    if parse_address(sender) is None:
        raise r.error(m, full, f"not an e-mail address: {sender!r}")
    return sender


def _helo_name(r: Reader, m: CommentedMap, key: str, full: str) -> str:
    name = r.string(m, key, full)
    if not (is_fqdn(name) or is_address_literal(name)):
        raise r.error(m, full, f"must be a fully qualified domain name (mail.example.com) or an address "
                               f"literal ([192.0.2.1]), got {name!r}")
    return name


def _throttle_replies(r: Reader, m: CommentedMap, key: str, full: str) -> tuple[ThrottlePattern, ...]:
    """``throttle_replies: FILE``: the operator's own throttle replies. A file
    that cannot be read is named with this key's line; a bad entry with the
    file's own line."""
    file = r.pathval(m, key, full)
    try:
        return read_patterns(file)
    except ConfigError as e:
        if e.line is None:
            raise r.error(m, full, f"{file}: {e.message}") from None
        raise


def _folders(r: Reader, m: CommentedMap, key: str, full: str) -> tuple[Path, ...]:
    roots = m[key]
    if not isinstance(roots, CommentedSeq) or not all(isinstance(x, str) and x and "\x00" not in x for x in roots):
        raise r.error(m, full, "must be a list of folder paths")
    return tuple((r.base / x).absolute() for x in roots)


# One top-level key read into ``kw``, the keyword arguments of Config that
# the file sets: ``step(reader, top mapping, key, kw)``.
_Step = Callable[[Reader, CommentedMap, str, dict[str, Any]], None]


def _workers(r: Reader, m: CommentedMap, key: str, kw: dict[str, Any]) -> None:
    if m.get(key) == "auto":
        kw[key] = None
    elif m.get(key) is not None:
        if isinstance(m[key], str):
            raise r.error(m, key, f"must be auto or an integer from 1 to 64, got {m[key]!r}")
        kw[key] = r.integer(m, key, key, 1, 64)


def _field(read: Read, name: str | None = None) -> _Step:
    """The step of a key that sets one Config field (``name``, else the key's
    own name) when the file gives it."""
    def step(r: Reader, m: CommentedMap, key: str, kw: dict[str, Any]) -> None:
        if m.get(key) is not None:
            kw[name or key] = read(r, m, key, key)
    return step


# The top-level keys of copiamail.yaml, each with how it is read, in the order
# they are read: of several bad keys, the first here is the one reported.
# Every default is the Config field's; a key that is missing or null keeps it.
# ``kw`` comes to the first step holding server_max_outbound_connections (the
# field's default), which the global scope_max_outbound_connections may lower.
TOP_LEVEL: Mapping[str, _Step] = MappingProxyType({
    "spool": _field(path),
    "cfg": _field(path, "cfg_path"),
    "queues": _field(integer(0, 99)),
    "mx_port": _field(integer(1, 65535)),
    "server_max_outbound_connections": _field(integer(1)),
    "server_reserve_outbound_connections": _field(integer(0)),
    "max_outbound_connections": _field(integer(1)),
    "messages_per_connection": _field(integer(1)),
    "max_deliveries_per_connection": _field(integer(1)),
    "workers": _workers,
    "scope_max_outbound_connections": read_global_scope_cap,
    "cluster_scope_max_outbound_connections": _field(integer(1)),
    "shutdown_grace": _field(number(0.0)),
    "scan_interval": _field(number(0.05)),
    "smtp_timeout": _field(number(0.1)),
    "connection_idle": _field(number(0.0)),
    "node_stale_after": _field(number(0.0)),
    "write_settle": _field(number(0.0)),
    "refusal_pause": _field(number(0.0)),
    "max_message_rate": _field(rate),
    "adaptive": _field(boolean),
    "adaptive_suspend": _field(duration),
    "adaptive_recover_after": _field(integer(1)),
    "adaptive_recover_seconds": _field(duration),
    "esender": _field(_esender),
    "watcher": _field(choice("native", "polling", "poll")),
    "fsync": _field(boolean),
    "mx_tls_verify": _field(boolean),
    "smtp_chunking": _field(boolean),
    "helo_name": _field(_helo_name),
    "attachment_roots": _field(_folders),
    "variables": _field(_variables),
    "path_map": _field(_path_map),
    "dkim": _field(_dkim),
    "throttle_replies": _field(_throttle_replies),
    "relay": _field(_relay),
    "retry_relay": _field(_relay),
    "dns": _field(section_of(DnsConfig, _DNS_KEYS)),
    "binding_group": read_binding_groups,
    "binding": read_bindings,
    "domain": _field(lambda r, m, key, full: read_domains(r, m, full, DOMAIN_CLUSTER), "domains"),
    "host": _field(read_hosts, "hosts"),
    "default_binding_group": read_default_binding_group,
    "cluster": _field(_cluster),
    "web": _field(section_of(WebConfig, _WEB_KEYS)),
})
TOP_KEYS = frozenset(TOP_LEVEL)  # every key the top level may hold
