"""The scopes of connection limits in ``copiamail.yaml``: the caps a stanza
sets, domain stanzas (exact and ``/regex/``), bindings and binding groups,
host stanzas, and the global scope's cap on the node total; each read into its
dataclass of :mod:`copiamail.config_sections`. The ``read_...`` functions are
steps or readers of :data:`copiamail.config_keys.TOP_LEVEL`."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import fields
from types import MappingProxyType
from typing import Any

from ruamel.yaml.comments import CommentedMap

from copiamail.config_sections import BindingConfig, BindingGroupConfig, DomainStanza, HostStanza, ScopeCaps
from copiamail.config_yaml import Read, Reader, boolean, integer, rate, values
from copiamail.errors import ConfigError

_CLUSTER_CAP = "cluster_scope_max_outbound_connections"
_CLUSTER_RATE = "cluster_max_message_rate"
_CAP_KEYS: Mapping[str, Read] = MappingProxyType({
    "scope_max_outbound_connections": integer(1), "max_outbound_connections": integer(1),
    "max_deliveries_per_connection": integer(1), "max_message_rate": rate, "adaptive": boolean,
    _CLUSTER_CAP: integer(1), _CLUSTER_RATE: rate,
})
assert set(_CAP_KEYS) == {f.name for f in fields(ScopeCaps)}
_STANZA_KEYS = frozenset(_CAP_KEYS)
# The cluster keys each kind of stanza may hold; the others are accepted by
# every stanza only to be refused with the reason, not as unknown.
DOMAIN_CLUSTER = frozenset({_CLUSTER_CAP, _CLUSTER_RATE})
HOST_CLUSTER = frozenset({_CLUSTER_CAP})


def _caps(r: Reader, m: CommentedMap, full: str, cluster: frozenset[str] = frozenset()) -> ScopeCaps:
    for key in sorted({_CLUSTER_CAP, _CLUSTER_RATE} - cluster):
        if m.get(key) is not None:
            where = ("the top level and domain: and host: stanzas" if key == _CLUSTER_CAP
                     else "domain: stanzas")
            raise r.error(m, f"{full}.{key}", f"a cluster-wide limit is set only in {where}")
    return ScopeCaps(**values(r, m, _CAP_KEYS, full))


def read_domains(r: Reader, parent: CommentedMap, full: str,
                 cluster: frozenset[str] = frozenset()) -> tuple[DomainStanza, ...]:
    """The ``domain`` stanzas of ``parent`` (named ``full``); none without
    any. ``cluster``: the cluster-wide keys they may set (the top level's)."""
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
        caps = _caps(r, body, stanza_key, cluster)
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


def _binding(r: Reader, parent: CommentedMap, name: Any, full: str, group: str | None) -> BindingConfig:
    m = r.child(parent, name, full, {"bind_address", "domain", *_STANZA_KEYS})
    addr = r.string(m, "bind_address", f"{full}.bind_address") if m.get("bind_address") is not None else None
    if addr is not None:
        try:
            ipaddress.ip_address(addr)
        except ValueError:
            raise r.error(m, f"{full}.bind_address", f"not an IP address: {addr!r}") from None
    return BindingConfig(str(name), addr, _caps(r, m, full), read_domains(r, m, f"{full}.domain"), group)


def read_hosts(r: Reader, m: CommentedMap, key: str, full: str) -> tuple[HostStanza, ...]:
    """``host``: a stanza per mail host, named or by IP address."""
    hm = r.child(m, key, full, None)
    for h in hm:
        if not isinstance(h, str) or not h:
            raise r.error(hm, f"{full}.{h}", "a host key must be a host name or an IP address", leaf=h)
    return tuple(
        HostStanza(str(h).lower(), _caps(r, r.child(hm, h, f"{full}.{h}", _STANZA_KEYS), f"{full}.{h}", HOST_CLUSTER),
                   hm.lc.key(h)[0] + 1)
        for h in hm
    )


def read_global_scope_cap(r: Reader, m: CommentedMap, key: str, kw: dict[str, Any]) -> None:
    """``scope_max_outbound_connections`` at the top level: it lowers the node
    total that ``kw`` holds (the field's default, or the file's)."""
    if m.get(key) is not None:
        # In the global scope it behaves like server_max_outbound_connections (Momentum).
        kw["server_max_outbound_connections"] = min(kw["server_max_outbound_connections"], r.integer(m, key, key, 1))


def read_binding_groups(r: Reader, m: CommentedMap, key: str, kw: dict[str, Any]) -> None:
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
            groups.append(BindingGroupConfig(str(gname), tuple(names), _caps(r, g, full), read_domains(r, g, f"{full}.domain")))
    kw["binding_groups"] = tuple(groups)
    kw["bindings"] = tuple(bindings)


def read_bindings(r: Reader, m: CommentedMap, key: str, kw: dict[str, Any]) -> None:
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


def read_default_binding_group(r: Reader, m: CommentedMap, key: str, kw: dict[str, Any]) -> None:
    """``default_binding_group``: a group the file defines."""
    if m.get(key) is not None:
        name = r.string(m, key, key)
        if name not in {g.name for g in kw.get("binding_groups", ())}:
            raise r.error(m, key, f"no binding group named {name!r}")
        kw[key] = name
