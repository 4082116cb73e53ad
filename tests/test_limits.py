"""copiamail.scheduling.limits: the keys and caps of every limit ($domain_limit rules and the
YAML scopes), and copiamail.scheduling.limiter's LocalLimiter."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from copiamail.config import Config, load_config
from copiamail.scheduling.limiter import LocalLimiter
from copiamail.scheduling.limits import Limit, Scopes, limits_for, worker_of

# SPEC 5's example, without cluster and cfg.
SPEC_YAML = r'''
server_max_outbound_connections: 100
max_outbound_connections: 32
binding_group:
  pool1:
    domain:
      "yahoo.com": {scope_max_outbound_connections: 6}
    binding:
      b1:
        bind_address: 127.0.0.2
        domain:
          "yahoo.com": {scope_max_outbound_connections: 2}
      b2: {bind_address: 127.0.0.3}
binding:
  b3: {bind_address: 127.0.0.4}
domain:
  "/^(wanadoo|orange)\\.fr$/": {scope_max_outbound_connections: 3}
  "/^(aol|yahoo)\\.com$/": {max_outbound_connections: 5}
host:
  "mx.shared.test": {scope_max_outbound_connections: 4}
default_binding_group: pool1
'''


def config(tmp_path: Path, yaml: str = "", cfg: str | None = None) -> Config:
    text = textwrap.dedent(yaml)
    if cfg is not None:
        (tmp_path / "FAXFACTS.CFG").write_text(textwrap.dedent(cfg), encoding="utf-8")
        text = "cfg: ./FAXFACTS.CFG\n" + text
    path = tmp_path / "copiamail.yaml"
    path.write_text(text, encoding="utf-8")
    return load_config(path)


def caps(limits) -> dict[str, int]:
    out = {l.key: l.cap for l in limits}
    assert len(out) == len(limits), "a connection never counts one key twice"
    return out


def lim(cfg: Config, address: str, binding: str | None = None, node: str = "N1", ips=(), names=()):
    domain = address.rsplit("@", 1)[1].lower()
    b = cfg.binding(binding) if binding is not None else None
    return limits_for(cfg, node, address, domain, b, ips, names)


# --- $domain_limit and server --------------------------------------------------------


def test_domain_limit_key_is_per_actual_domain_so_copia_com_and_copia_net_each_get_cap_2(tmp_path):
    cfg = config(tmp_path, cfg="$domain_limit * @copia. 2\n")
    com = caps(lim(cfg, "a@copia.com"))
    net = caps(lim(cfg, "b@copia.net"))
    assert com["domain_limit:copia.com"] == 2
    assert net["domain_limit:copia.net"] == 2
    assert "domain_limit:copia.net" not in com and "domain_limit:copia.com" not in net


def test_domain_limit_key_is_the_lower_cased_domain_after_the_last_at(tmp_path):
    cfg = config(tmp_path, cfg="$domain_limit * @COPIA.COM\n")
    got = caps(limits_for(cfg, "n1", 'x"@"y@Copia.Com', "copia.com"))
    assert got["domain_limit:copia.com"] == 1


def test_the_first_matching_rule_gives_the_cap(tmp_path):
    cfg = config(tmp_path, cfg="$domain_limit * @copia.com 1\n$domain_limit * @ 3\n")
    assert caps(lim(cfg, "a@copia.com"))["domain_limit:copia.com"] == 1
    assert caps(lim(cfg, "x@any.org"))["domain_limit:any.org"] == 3


def test_a_rule_for_another_node_gives_no_domain_limit_key(tmp_path):
    cfg = config(tmp_path, cfg="$domain_limit N2 @copia.com 1\n")
    assert not any(k.startswith("domain_limit:") for k in caps(lim(cfg, "a@copia.com", node="N1")))
    assert caps(lim(cfg, "a@copia.com", node="n2"))["domain_limit:copia.com"] == 1


def test_a_rule_matching_the_local_part_limits_the_recipients_domain(tmp_path):
    cfg = config(tmp_path, cfg="$domain_limit * copia 2\n")
    assert caps(lim(cfg, "copia@gmail.com"))["domain_limit:gmail.com"] == 2


def test_the_domain_limit_scope_names_the_cfg_file_and_line(tmp_path):
    cfg = config(tmp_path, cfg="; x\n$domain_limit * @ 3\n")
    [dl] = [l for l in lim(cfg, "x@any.org") if l.key.startswith("domain_limit:")]
    assert "FAXFACTS.CFG:2" in dl.scope


def test_server_key_carries_server_max_outbound_connections(tmp_path):
    assert caps(lim(config(tmp_path), "a@b.test"))["server"] == 100
    assert caps(lim(config(tmp_path, "server_max_outbound_connections: 7\n"), "a@b.test"))["server"] == 7


def test_without_any_rule_or_stanza_only_server_and_binding_domain_apply(tmp_path):
    assert caps(lim(config(tmp_path), "a@b.test")) == {"server": 100, "binding_domain:default:b.test": 32}


# --- max_outbound_connections (binding and domain) ------------------------------------


def test_binding_domain_key_defaults_to_32_per_binding_and_domain(tmp_path):
    cfg = config(tmp_path, "binding:\n  b3: {bind_address: 127.0.0.4}\n")
    assert caps(lim(cfg, "a@x.test"))["binding_domain:default:x.test"] == 32
    assert caps(lim(cfg, "a@x.test", "b3"))["binding_domain:b3:x.test"] == 32
    assert caps(lim(cfg, "a@y.test", "b3"))["binding_domain:b3:y.test"] == 32


def test_top_level_max_outbound_connections_sets_the_binding_domain_default(tmp_path):
    cfg = config(tmp_path, "max_outbound_connections: 9\n")
    assert caps(lim(cfg, "a@x.test"))["binding_domain:default:x.test"] == 9


def test_a_domain_stanza_overrides_max_outbound_connections(tmp_path):
    cfg = config(tmp_path, "domain:\n  x.test: {max_outbound_connections: 4}\n")
    assert caps(lim(cfg, "a@x.test"))["binding_domain:default:x.test"] == 4
    assert caps(lim(cfg, "a@y.test"))["binding_domain:default:y.test"] == 32


def test_an_exact_stanza_is_tried_before_a_regex_stanza_listed_earlier(tmp_path):
    cfg = config(tmp_path, """\
        domain:
          "/^(aol|yahoo)\\\\.com$/": {max_outbound_connections: 5}
          "yahoo.com": {max_outbound_connections: 7}
        """)
    assert caps(lim(cfg, "a@yahoo.com"))["binding_domain:default:yahoo.com"] == 7
    assert caps(lim(cfg, "a@aol.com"))["binding_domain:default:aol.com"] == 5


def test_regex_stanzas_are_tried_in_order_and_match_the_whole_domain(tmp_path):
    cfg = config(tmp_path, """\
        domain:
          "/.*\\\\.example$/": {max_outbound_connections: 2}
          "/mail\\\\..*/": {max_outbound_connections: 3}
        """)
    assert caps(lim(cfg, "a@mail.example"))["binding_domain:default:mail.example"] == 2
    assert caps(lim(cfg, "a@mail.other"))["binding_domain:default:mail.other"] == 3
    assert caps(lim(cfg, "a@xmail.other"))["binding_domain:default:xmail.other"] == 32


# --- Global::Domain regex stanzas -------------------------------------------------------


def test_a_pooled_regex_gives_one_shared_key_for_every_matching_domain(tmp_path):
    cfg = config(tmp_path, SPEC_YAML)
    wanadoo = [l for l in lim(cfg, "a@wanadoo.fr") if l.key.startswith("global_domain:")]
    orange = [l for l in lim(cfg, "b@Orange.fr".lower()) if l.key.startswith("global_domain:")]
    assert len(wanadoo) == len(orange) == 1
    assert wanadoo[0].key == orange[0].key
    assert wanadoo[0].cap == orange[0].cap == 3
    # ...while each domain still has its own binding_domain key
    assert caps(lim(cfg, "a@wanadoo.fr", "b1")).keys() != caps(lim(cfg, "a@orange.fr", "b1")).keys()


def test_a_pooled_regex_shares_its_key_across_bindings(tmp_path):
    cfg = config(tmp_path, SPEC_YAML)
    keys = {l.key for b in ("b1", "b2", "b3", None) for l in lim(cfg, "a@wanadoo.fr", b) if l.key.startswith("global_domain:")}
    assert len(keys) == 1


def test_a_domain_the_pooled_regex_does_not_match_gets_no_global_key(tmp_path):
    cfg = config(tmp_path, SPEC_YAML)
    assert not any(k.startswith("global_domain:") for k in caps(lim(cfg, "a@wanadoo.com")))
    assert not any(k.startswith("global_domain:") for k in caps(lim(cfg, "a@mail.orange.fr")))


def test_a_per_domain_regex_gives_separate_binding_domain_keys_with_its_cap(tmp_path):
    cfg = config(tmp_path, SPEC_YAML)
    aol = caps(lim(cfg, "a@aol.com", "b3"))
    yahoo = caps(lim(cfg, "a@yahoo.com", "b3"))
    assert aol["binding_domain:b3:aol.com"] == 5
    assert yahoo["binding_domain:b3:yahoo.com"] == 5
    assert "binding_domain:b3:yahoo.com" not in aol
    assert not any(k.startswith("global_domain:") for k in [*aol, *yahoo])


@pytest.mark.parametrize(
    "yaml,why",
    [
        ("domain:\n  x.test: {cluster_scope_max_outbound_connections: 8}\n", "needs a Redis server"),
        ("host:\n  192.0.2.1: {cluster_scope_max_outbound_connections: 5}\n", "needs a Redis server"),
        ("binding:\n  b1: {bind_address: 127.0.0.2, cluster_scope_max_outbound_connections: 2}\n", "only in the top"),
        ("binding_group:\n  g:\n    binding: {b1: {}}\n    domain: {x.test: {cluster_scope_max_outbound_connections: 2}}\n",
         "only in the top"),
    ],
)
def test_a_cluster_cap_is_refused_without_redis_or_where_no_cluster_cap_belongs(tmp_path, yaml, why):
    from copiamail.errors import ConfigError

    with pytest.raises(ConfigError, match=why):
        config(tmp_path, yaml)


# --- bindings and groups -----------------------------------------------------------------


def test_a_binding_in_a_group_gets_binding_domain_and_binding_group_domain_keys(tmp_path):
    cfg = config(tmp_path, SPEC_YAML)
    got = caps(lim(cfg, "a@yahoo.com", "b1"))
    assert got == {
        "server": 100,
        "group_domain:pool1:yahoo.com": 6,
        "binding_scope:b1:yahoo.com": 2,
        "binding_domain:b1:yahoo.com": 5,
    }


def test_every_binding_of_a_group_shares_the_group_domain_key(tmp_path):
    cfg = config(tmp_path, SPEC_YAML)
    b1 = caps(lim(cfg, "a@yahoo.com", "b1"))
    b2 = caps(lim(cfg, "a@yahoo.com", "b2"))
    assert b2["group_domain:pool1:yahoo.com"] == b1["group_domain:pool1:yahoo.com"] == 6
    assert "binding_scope:b1:yahoo.com" not in b2
    assert not any(k.startswith("binding_scope:") for k in b2)
    assert b2["binding_domain:b2:yahoo.com"] == 5


def test_a_binding_outside_the_group_gets_no_group_key(tmp_path):
    cfg = config(tmp_path, SPEC_YAML)
    assert not any(k.startswith(("group_domain:", "binding_scope:")) for k in caps(lim(cfg, "a@yahoo.com", "b3")))


def test_group_and_binding_stanzas_only_apply_to_their_domain(tmp_path):
    cfg = config(tmp_path, SPEC_YAML)
    got = caps(lim(cfg, "a@gmail.com", "b1"))
    assert got == {"server": 100, "binding_domain:b1:gmail.com": 32}


def test_max_outbound_in_a_binding_stanza_overrides_group_and_global(tmp_path):
    cfg = config(tmp_path, """\
        domain:
          x.test: {max_outbound_connections: 10}
        binding_group:
          g:
            domain:
              x.test: {max_outbound_connections: 8}
            binding:
              b1:
                domain:
                  x.test: {max_outbound_connections: 3}
              b2: {}
        """)
    assert caps(lim(cfg, "a@x.test", "b1"))["binding_domain:b1:x.test"] == 3
    assert caps(lim(cfg, "a@x.test", "b2"))["binding_domain:b2:x.test"] == 8
    assert caps(lim(cfg, "a@x.test"))["binding_domain:default:x.test"] == 10


# --- hosts ----------------------------------------------------------------------------


def test_a_host_stanza_by_name_limits_the_ip_the_name_resolves_to(tmp_path):
    cfg = config(tmp_path, SPEC_YAML)
    got = caps(lim(cfg, "a@x.test", ips=("192.0.2.1",), names=("MX.Shared.Test",)))
    assert got["host:192.0.2.1"] == 4


def test_a_host_stanza_by_ip(tmp_path):
    cfg = config(tmp_path, "host:\n  192.0.2.9: {scope_max_outbound_connections: 2}\n")
    assert caps(lim(cfg, "a@x.test", ips=("192.0.2.9",), names=("mx.other.test",)))["host:192.0.2.9"] == 2
    assert not any(k.startswith("host:") for k in caps(lim(cfg, "a@x.test", ips=("192.0.2.8",))))


def test_the_host_key_is_shared_by_every_binding(tmp_path):
    cfg = config(tmp_path, SPEC_YAML)
    keys = {
        l.key for b in ("b1", "b2", "b3", None)
        for l in lim(cfg, "a@x.test", b, ips=("192.0.2.1",), names=("mx.shared.test",))
        if l.key.startswith("host:")
    }
    assert keys == {"host:192.0.2.1"}


def test_two_mx_names_on_one_ip_share_one_host_key(tmp_path):
    cfg = config(tmp_path, """\
        host:
          mx1.test: {scope_max_outbound_connections: 4}
          mx2.test: {scope_max_outbound_connections: 4}
        """)
    a = caps(lim(cfg, "a@x.test", ips=("192.0.2.1",), names=("mx1.test",)))
    b = caps(lim(cfg, "a@y.test", ips=("192.0.2.1",), names=("mx2.test",)))
    assert a["host:192.0.2.1"] == b["host:192.0.2.1"] == 4


@pytest.mark.parametrize("order", ["name-first", "ip-first"])
def test_where_two_stanzas_hit_one_ip_the_smaller_cap_holds(tmp_path, order):
    stanzas = ['  "mx.shared.test": {scope_max_outbound_connections: 4}', '  "192.0.2.1": {scope_max_outbound_connections: 2}']
    if order == "ip-first":
        stanzas.reverse()
    cfg = config(tmp_path, "host:\n" + "\n".join(stanzas) + "\n")
    got = caps(lim(cfg, "a@x.test", ips=("192.0.2.1",), names=("mx.shared.test",)))
    assert got["host:192.0.2.1"] == 2


def test_limits_for_the_full_spec_config_with_a_cfg_rule(tmp_path):
    cfg = config(tmp_path, SPEC_YAML, cfg="$domain_limit * @ 3\n")
    got = caps(lim(cfg, "a@orange.fr", "b2", ips=("192.0.2.1",), names=("mx.shared.test",)))
    assert got == {
        "domain_limit:orange.fr": 3,
        "server": 100,
        "binding_domain:b2:orange.fr": 32,
        r"global_domain:/^(wanadoo|orange)\.fr$/": 3,
        "host:192.0.2.1": 4,
    }


# --- LocalLimiter -------------------------------------------------------------------------


def has_room(lm: LocalLimiter, limits) -> bool:
    """Whether every limit has a free slot (the limiter has no such method: try_acquire answers it)."""
    return all(lm.in_use(l.key) < l.cap for l in limits)


A = Limit("a", 2, "a")
B = Limit("b", 1, "b")
C = Limit("c", 3, "c")


def test_acquire_takes_a_slot_of_every_limit():
    lm = LocalLimiter()
    assert lm.try_acquire([A, B, C]) is None
    assert (lm.in_use("a"), lm.in_use("b"), lm.in_use("c")) == (1, 1, 1)


def test_acquire_is_all_or_none_and_returns_the_full_limit():
    lm = LocalLimiter()
    assert lm.try_acquire([B]) is None
    assert lm.try_acquire([A, B, C]) == B
    assert (lm.in_use("a"), lm.in_use("b"), lm.in_use("c")) == (0, 1, 0)
    assert not has_room(lm, [A, B, C])
    assert has_room(lm, [A, C])


def test_acquire_returns_the_first_full_limit_in_order():
    lm = LocalLimiter()
    lm.try_acquire([B])
    lm.try_acquire([A])
    lm.try_acquire([A])
    assert lm.try_acquire([C, A, B]) == A
    assert lm.in_use("c") == 0


def test_release_gives_the_slots_back():
    lm = LocalLimiter()
    lm.try_acquire([A, B])
    assert lm.try_acquire([B]) == B
    lm.release([A, B])
    assert lm.in_use("a") == lm.in_use("b") == 0
    assert lm.try_acquire([B]) is None


def test_a_cap_is_a_ceiling_that_can_be_used_in_full():
    lm = LocalLimiter()
    assert [lm.try_acquire([C]) for _ in range(4)] == [None, None, None, C]
    assert lm.in_use("c") == 3


def test_one_key_listed_twice_in_one_acquire_never_goes_over_its_cap():
    lm = LocalLimiter()
    host = Limit("host:192.0.2.1", 1, "h")
    full = lm.try_acquire([host, host])
    assert lm.in_use(host.key) <= 1
    if full is not None:
        assert lm.in_use(host.key) == 0


def test_the_same_key_with_different_caps_respects_the_cap_given_each_time():
    lm = LocalLimiter()
    assert lm.try_acquire([Limit("k", 3, "")]) is None
    assert lm.try_acquire([Limit("k", 3, "")]) is None
    assert lm.try_acquire([Limit("k", 2, "")]) == Limit("k", 2, "")
    assert lm.in_use("k") == 2


KEYS = {"server": 3, "d1": 1, "d2": 2, "host": 2, "pool": 2}
LIMIT_SETS = [
    [Limit(k, KEYS[k], k) for k in combo]
    for combo in (
        ("server", "d1"), ("server", "d2"), ("server", "d1", "pool"), ("server", "d2", "pool", "host"),
        ("server", "host"), ("d2", "host"), ("pool",),
    )
]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, len(LIMIT_SETS) - 1), st.integers(0, 50)), max_size=80))
def test_a_random_walk_of_acquire_and_release_never_exceeds_a_cap(steps):
    lm = LocalLimiter()
    held: list[list[Limit]] = []
    model: dict[str, int] = {}
    for acquire, which, pick in steps:
        if acquire or not held:
            limits = LIMIT_SETS[which]
            room = all(model.get(l.key, 0) < l.cap for l in limits)
            assert has_room(lm, limits) == room
            full = lm.try_acquire(limits)
            if room:
                assert full is None
                held.append(limits)
                for l in limits:
                    model[l.key] = model.get(l.key, 0) + 1
            else:
                assert full in limits and model.get(full.key, 0) >= full.cap
        else:
            limits = held.pop(pick % len(held))
            lm.release(limits)
            for l in limits:
                model[l.key] -= 1
        for key, cap in KEYS.items():
            assert lm.in_use(key) == model.get(key, 0) <= cap


class LimiterMachine(RuleBasedStateMachine):
    """Connections open (all or none) and close in any order; no cap is ever exceeded."""

    @initialize()
    def start(self):
        self.lm = LocalLimiter()
        self.held: list[list[Limit]] = []

    @rule(which=st.integers(0, len(LIMIT_SETS) - 1))
    def open_connection(self, which):
        limits = LIMIT_SETS[which]
        before = {k: self.lm.in_use(k) for k in KEYS}
        full = self.lm.try_acquire(limits)
        if full is None:
            self.held.append(limits)
            for l in limits:
                assert self.lm.in_use(l.key) == before[l.key] + 1
        else:
            assert full in limits
            assert before[full.key] >= full.cap
            assert {k: self.lm.in_use(k) for k in KEYS} == before

    @precondition(lambda self: bool(self.held))
    @rule(pick=st.integers(0, 100))
    def close_connection(self, pick):
        self.lm.release(self.held.pop(pick % len(self.held)))

    @invariant()
    def never_over_a_cap_and_counts_match(self):
        for key, cap in KEYS.items():
            n = sum(1 for limits in self.held for l in limits if l.key == key)
            assert self.lm.in_use(key) == n <= cap


TestLimiterMachine = LimiterMachine.TestCase
TestLimiterMachine.settings = settings(max_examples=100, stateful_step_count=40, deadline=None)


def test_an_ip_listed_twice_gives_one_host_key(tmp_path):
    cfg = config(tmp_path, SPEC_YAML)
    got = lim(cfg, "a@x.test", ips=("192.0.2.1", "192.0.2.1"), names=("mx.shared.test",))
    assert [l.key for l in got].count("host:192.0.2.1") == 1


# --- workers: shared caps whole, counted once for the node -------------------------


@given(st.text(min_size=1, max_size=30), st.integers(1, 16))
def test_a_domain_always_goes_to_the_same_worker(domain, workers):
    assert 0 <= worker_of(domain, workers) < workers
    assert worker_of(domain, workers) == worker_of(domain, workers)
    assert worker_of(domain, 1) == 0


def test_with_workers_every_cap_is_whole_and_only_caps_that_span_domains_are_shared(tmp_path):
    cfg = config(tmp_path, SPEC_YAML, cfg="$domain_limit * @ 7\n")
    whole = {l.key: l for l in lim(cfg, "a@yahoo.com", "b1", ips=("10.0.0.1",), names=("mx.shared.test",))}
    part = {l.key: l for l in Scopes(cfg, "N1", 2).limits("a@yahoo.com", "yahoo.com", cfg.binding("b1"),
                                                           ("10.0.0.1",), ("mx.shared.test",))}
    assert part == whole
    shared = {k for k, l in whole.items() if l.shared}
    assert shared == {"server", "host:10.0.0.1"}
    # yahoo.com's exact stanzas and its $domain_limit are one domain's.
    assert {"domain_limit:yahoo.com", "binding_scope:b1:yahoo.com", "group_domain:pool1:yahoo.com"} <= whole.keys() - shared


def test_a_pooled_regex_stanza_is_shared_whole_by_the_workers(tmp_path):
    cfg = config(tmp_path, SPEC_YAML)
    pooled = {l.key: l for l in lim(cfg, "a@wanadoo.fr")}["global_domain:/^(wanadoo|orange)\\.fr$/"]
    assert pooled.shared and pooled.cap == 3
    parts = [
        {l.key: l.cap for l in Scopes(cfg, "N1", 2).limits("a@wanadoo.fr", "wanadoo.fr", cfg.binding("b1"))}[pooled.key]
        for w in (0, 1)
    ]
    assert parts == [3, 3]


def test_a_limit_is_shared_exactly_when_config_shared_caps_names_its_setting(tmp_path, monkeypatch):
    # limits.py does not keep its own list of shared scopes: it asks the config.
    cfg = config(tmp_path, SPEC_YAML, cfg="$domain_limit * @ 7\n")
    b1, wanadoo = cfg.binding("b1"), "a@wanadoo.fr"
    shared = {l.key for l in limits_for(cfg, "N1", wanadoo, "wanadoo.fr", b1, ("10.0.0.1",), ("mx.shared.test",)) if l.shared}
    assert shared == {"server", r"global_domain:/^(wanadoo|orange)\.fr$/", "host:10.0.0.1"}
    settings = dict(cfg.shared_caps())
    monkeypatch.setattr(Config, "shared_caps", lambda self: [(k, c) for k, c in settings.items() if not k.startswith("host.")])
    shared = {l.key for l in Scopes(cfg, "N1", 2).limits(wanadoo, "wanadoo.fr", b1, ("10.0.0.1",), ("mx.shared.test",))
              if l.shared}
    assert shared == {"server", r"global_domain:/^(wanadoo|orange)\.fr$/"}


def _deliveries(yaml: str, domain: str, binding: str | None = None, ips: tuple[str, ...] = ("192.0.2.9",),
                names: tuple[str, ...] = ()) -> int:
    import io

    from ruamel.yaml import YAML

    from copiamail.config import parse_config
    cfg = parse_config(YAML(typ="rt").load(io.StringIO(yaml)) or {}, None)
    b = cfg.binding(binding) if binding else None
    return Scopes(cfg, "N1").deliveries_per_connection(domain, b, ips, names)


def test_a_connection_carries_messages_per_connection_when_no_stanza_sets_a_cap():
    assert _deliveries("messages_per_connection: 40\n", "a.test") == 40


def test_max_deliveries_per_connection_the_smallest_of_every_stanza_that_applies_holds():
    yaml = ("max_deliveries_per_connection: 50\n"
            "domain:\n  a.test: {max_deliveries_per_connection: 20}\n  /.*\\.org/: {max_deliveries_per_connection: 7}\n"
            "host:\n  mx.a.test: {max_deliveries_per_connection: 9}\n  192.0.2.5: {max_deliveries_per_connection: 3}\n"
            "binding_group:\n  g:\n    max_deliveries_per_connection: 15\n"
            "    binding:\n      b1: {domain: {b.test: {max_deliveries_per_connection: 4}}}\n")
    assert _deliveries(yaml, "a.test") == 20
    assert _deliveries(yaml, "x.org") == 7
    assert _deliveries(yaml, "c.test") == 50
    assert _deliveries(yaml, "a.test", names=("MX.a.test",)) == 9
    assert _deliveries(yaml, "c.test", ips=("192.0.2.5",)) == 3
    assert _deliveries(yaml, "c.test", "b1") == 15
    assert _deliveries(yaml, "b.test", "b1") == 4


# --- cluster-wide limits ------------------------------------------------------------


CLUSTER = '''\
cluster: {redis: "redis://127.0.0.1:6379/0"}
cluster_scope_max_outbound_connections: 50
workers: 2
domain:
  "gmail.com": {cluster_scope_max_outbound_connections: 20, cluster_max_message_rate: "100/s"}
  "/^(wanadoo|orange)\\\\.fr$/": {cluster_scope_max_outbound_connections: 3}
host:
  "mx.shared.test": {cluster_scope_max_outbound_connections: 6}
'''


def test_cluster_limits_come_last_undivided_between_workers_and_a_regex_pools(tmp_path):
    cfg = config(tmp_path, CLUSTER)
    got = Scopes(cfg, "N1", 2).limits("a@gmail.com", "gmail.com", None, ("192.0.2.7",), ("mx.shared.test",))
    assert [l.key for l in got][-3:] == ["cluster:total", "cluster:domain:gmail.com", "cluster:host:192.0.2.7"]
    assert caps(got)["cluster:total"] == 50 and caps(got)["cluster:domain:gmail.com"] == 20
    assert caps(got)["cluster:host:192.0.2.7"] == 6
    w = lim(cfg, "a@wanadoo.fr")
    o = lim(cfg, "b@orange.fr")
    pooled = r"cluster:domain:/^(wanadoo|orange)\.fr$/"
    assert caps(w)[pooled] == 3 and caps(o)[pooled] == 3  # one key for both domains


def test_a_cluster_message_rate_is_a_pace_kept_whole_by_every_worker(tmp_path):
    cfg = config(tmp_path, CLUSTER)
    paces = Scopes(cfg, "N1", 2).paces("gmail.com")
    assert [(p.key, p.spacing) for p in paces] == [("cluster:rate:domain:gmail.com", 0.01)]


def test_without_cluster_caps_no_cluster_key_is_counted(tmp_path):
    cfg = config(tmp_path, 'cluster: {redis: "redis://127.0.0.1:6379/0"}\n')
    assert not any(l.key.startswith("cluster:") for l in lim(cfg, "a@gmail.com"))
