"""copiamail.config: copiamail.yaml and the CFG file (SPEC 2 "The CFG file", SPEC 5)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from copiamail.config import (
    CONFIG_ENV,
    Config,
    RelayConfig,
    ScopeCaps,
    find_config,
    load_cfg,
    load_config,
    read_password,
)
from copiamail.errors import ConfigError
from copiamail.jobfile import outcome

# SPEC 5, verbatim.
SPEC_YAML = r'''spool: ./spool
cfg: ./FAXFACTS.CFG               # $domain_limit and retry rules
queues: 15
attachment_roots: [./spool]
esender: mailer@example.com        # default envelope sender (after FS and CFG)
shutdown_grace: 10                 # seconds in-flight sends get after SIGTERM
relay: {host: 127.0.0.1, port: 2525, starttls: auto, username: null, password_file: null}
# no relay: deliver straight to the recipient domain's MX hosts
dns: {nameservers: [127.0.0.1], port: 53, timeout: 5}
mx_port: 25                        # port used on MX hosts (tests use another)
server_max_outbound_connections: 100     # this node's total
max_outbound_connections: 32             # per binding and domain
binding_group:
  pool1:
    domain:
      "yahoo.com": {scope_max_outbound_connections: 6}  # Binding_Group::Domain
    binding:
      b1:
        bind_address: 127.0.0.2
        domain:
          "yahoo.com": {scope_max_outbound_connections: 2}  # Binding::Domain
      b2: {bind_address: 127.0.0.3}
binding:
  b3: {bind_address: 127.0.0.4}
domain:
  "/^(wanadoo|orange)\\.fr$/": {scope_max_outbound_connections: 3}  # Global::Domain, pooled
  "/^(aol|yahoo)\\.com$/": {max_outbound_connections: 5}            # each domain apart
host:
  "mx.shared.test": {scope_max_outbound_connections: 4}   # Global::Host: per IP, all bindings
default_binding_group: pool1
cluster: {redis: "redis://127.0.0.1:6379/0", lease_seconds: 30}
# cluster_scope_max_outbound_connections: N in any domain or host stanza is cluster-wide
'''

SAMPLE_CFG = '''; copiamail CFG
$domain_limit * @example.com 2
$domain_limit N1 @ 3
$domain_limit * @copia.com
$email_retry_delays * "30S 5 2H"
$email_retry_delays B ""
$email_retry_max 6
$email_esender statements@acme.test
'''


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


@pytest.fixture
def clean(tmp_path, monkeypatch):
    """An empty working folder and no $COPIAMAIL_CONFIG."""
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def load_yaml(tmp_path: Path, text: str, cfg: str | None = None) -> Config:
    if cfg is not None:
        write(tmp_path / "FAXFACTS.CFG", cfg)
    return load_config(write(tmp_path / "copiamail.yaml", text))


def config_error(tmp_path: Path, text: str, cfg: str | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_yaml(tmp_path, text, cfg)
    return info.value


def assert_names(err: ConfigError, path: Path, line: int, *words: str) -> None:
    s = str(err)
    assert "\n" not in s
    assert s.startswith(f"{path.absolute()}:{line}: "), s
    assert err.line == line
    for w in words:
        assert w in s, s


# --- the SPEC 5 example ----------------------------------------------------------


def test_the_full_spec_5_example_parses(tmp_path, clean):
    cfg = load_yaml(tmp_path, SPEC_YAML, SAMPLE_CFG)
    base = tmp_path.absolute()
    assert cfg.path == base / "copiamail.yaml"
    assert cfg.spool == base / "spool"
    assert cfg.cfg_path == base / "FAXFACTS.CFG"
    assert cfg.queues == 15
    assert cfg.attachment_roots == (base / "spool",)
    assert cfg.esender == "mailer@example.com"
    assert cfg.shutdown_grace == 10.0
    assert cfg.relay == RelayConfig(host="127.0.0.1", port=2525, starttls="auto", username=None, password_file=None)
    assert cfg.dns.nameservers == ("127.0.0.1",) and cfg.dns.port == 53 and cfg.dns.timeout == 5.0
    assert cfg.mx_port == 25
    assert cfg.server_max_outbound_connections == 100
    assert cfg.max_outbound_connections == 32

    [pool1] = cfg.binding_groups
    assert pool1.name == "pool1" and pool1.bindings == ("b1", "b2")
    [gd] = pool1.domains
    assert gd.key == "yahoo.com" and gd.caps == ScopeCaps(scope_max_outbound_connections=6)
    b1, b2, b3 = cfg.binding("b1"), cfg.binding("b2"), cfg.binding("b3")
    assert (b1.bind_address, b1.group) == ("127.0.0.2", "pool1")
    assert [(d.key, d.caps.scope_max_outbound_connections) for d in b1.domains] == [("yahoo.com", 2)]
    assert (b2.bind_address, b2.group, b2.domains) == ("127.0.0.3", "pool1", ())
    assert (b3.bind_address, b3.group) == ("127.0.0.4", None)
    assert cfg.binding_group("pool1") is pool1
    assert cfg.binding("nope") is None

    pooled, apart = cfg.domains
    assert pooled.key == r"/^(wanadoo|orange)\.fr$/"
    assert pooled.caps.scope_max_outbound_connections == 3
    assert pooled.matches("wanadoo.fr") and pooled.matches("orange.fr")
    assert not pooled.matches("wanadooxfr") and not pooled.matches("mail.orange.fr")
    assert apart.caps == ScopeCaps(max_outbound_connections=5)
    assert apart.matches("aol.com") and apart.matches("yahoo.com")

    [host] = cfg.hosts
    assert host.key == "mx.shared.test" and host.caps.scope_max_outbound_connections == 4
    assert cfg.default_binding_group == "pool1"
    assert cfg.cluster.redis == "redis://127.0.0.1:6379/0" and cfg.cluster.lease_seconds == 30
    assert [str(r) for r in cfg.rules.domain_limits] == [
        "$domain_limit * @example.com 2", "$domain_limit N1 @ 3", "$domain_limit * @copia.com 1",
    ]


def test_the_spec_example_without_its_cfg_line_parses(tmp_path, clean):
    text = SPEC_YAML.replace("cfg: ./FAXFACTS.CFG", "")
    cfg = load_yaml(tmp_path, text)
    assert cfg.cfg_path is None
    assert cfg.rules.domain_limits == ()


def test_a_cfg_line_naming_a_missing_file_is_an_error_naming_it(tmp_path, clean):
    err = config_error(tmp_path, "cfg: ./MISSING.CFG\n")
    assert "MISSING.CFG" in str(err)


def test_an_empty_config_file_gives_the_defaults(tmp_path, clean):
    cfg = load_yaml(tmp_path, "")
    assert cfg.spool == tmp_path.absolute() / "spool"
    assert cfg.queues == 15


# --- defaults and discovery ------------------------------------------------------


def test_defaults_without_a_config_file(clean):
    cfg = load_config()
    assert cfg.path is None
    assert cfg.spool == clean.absolute() / "spool"
    assert cfg.cfg_path is None
    assert cfg.queues == 15
    assert cfg.relay is None
    assert cfg.mx_port == 25
    assert cfg.shutdown_grace == 10.0
    assert cfg.server_max_outbound_connections == 100
    assert cfg.max_outbound_connections == 32
    assert cfg.binding_groups == () and cfg.bindings == () and cfg.domains == () and cfg.hosts == ()
    assert cfg.default_binding_group is None and cfg.cluster is None
    assert cfg.roots == (cfg.spool,)
    assert cfg.rules.domain_limits == ()


def test_dot_slash_copiamail_yaml_is_found_in_the_working_folder(clean):
    write(clean / "copiamail.yaml", "queues: 3\n")
    assert find_config(None) == Path("copiamail.yaml")
    cfg = load_config()
    assert cfg.queues == 3
    assert cfg.path == clean.absolute() / "copiamail.yaml"


def test_copiamail_config_env_wins_over_dot_slash_copiamail_yaml(clean, tmp_path, monkeypatch):
    write(clean / "copiamail.yaml", "queues: 3\n")
    env = write(tmp_path / "elsewhere" / "env.yaml", "queues: 7\n")
    monkeypatch.setenv(CONFIG_ENV, str(env))
    assert load_config().queues == 7


def test_an_explicit_config_wins_over_copiamail_config(clean, tmp_path, monkeypatch):
    env = write(tmp_path / "env.yaml", "queues: 7\n")
    explicit = write(tmp_path / "explicit.yaml", "queues: 9\n")
    monkeypatch.setenv(CONFIG_ENV, str(env))
    assert load_config(explicit).queues == 9


def test_an_empty_copiamail_config_is_ignored(clean, monkeypatch):
    write(clean / "copiamail.yaml", "queues: 3\n")
    monkeypatch.setenv(CONFIG_ENV, "")
    assert load_config().queues == 3


def test_copiamail_config_naming_a_missing_file_is_an_error(clean, monkeypatch):
    monkeypatch.setenv(CONFIG_ENV, "/nonexistent/copiamail.yaml")
    with pytest.raises(ConfigError, match=r"/nonexistent/copiamail.yaml.*COPIAMAIL_CONFIG"):
        load_config()


def test_an_explicit_missing_config_is_an_error(clean):
    with pytest.raises(ConfigError, match=r"missing\.yaml"):
        load_config("missing.yaml")


def test_relative_paths_are_relative_to_the_config_files_folder(clean, tmp_path):
    conf = tmp_path / "etc" / "copiamail"
    write(conf / "rules.cfg", "$domain_limit * @ 2\n")
    write(conf / "copiamail.yaml", """\
        spool: ./data/spool
        cfg: rules.cfg
        attachment_roots: [att, ../shared]
        relay: {host: relay.test, password_file: secret/pw}
        """)
    cfg = load_config(conf / "copiamail.yaml")
    base = conf.absolute()
    assert cfg.spool == base / "data" / "spool"
    assert cfg.cfg_path == base / "rules.cfg"
    assert cfg.attachment_roots == (base / "att", base / ".." / "shared")
    assert cfg.relay.password_file == base / "secret" / "pw"
    assert cfg.rules.domain_limits[0].count == 2


def test_a_relative_config_path_still_resolves_against_the_files_folder(clean):
    write(clean / "sub" / "c.yaml", "spool: q\n")
    cfg = load_config("sub/c.yaml")
    assert cfg.spool == clean.absolute() / "sub" / "q"


def test_absolute_paths_are_kept(clean, tmp_path):
    cfg = load_yaml(tmp_path, f"spool: {tmp_path / 'abs'}\n")
    assert cfg.spool == tmp_path / "abs"


def test_without_a_spool_key_the_spool_is_next_to_the_config_file(clean, tmp_path):
    cfg = load_yaml(tmp_path / "conf", "queues: 2\n")
    assert cfg.spool == (tmp_path / "conf").absolute() / "spool"


# --- unknown keys -------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,line,key",
    [
        ("queues: 15\nqueus: 3\n", 2, "queus"),
        ("relay:\n  host: 127.0.0.1\n  hots: x\n", 3, "relay.hots"),
        ("relay: {host: 127.0.0.1, hots: x}\n", 1, "relay.hots"),
        ("dns:\n  nameserver: [1.1.1.1]\n", 2, "dns.nameserver"),
        ("cluster:\n  redis: redis://x\n  lease: 3\n", 3, "cluster.lease"),
        (
            "binding_group:\n  pool1:\n    binding:\n      b1:\n        bind_adress: 127.0.0.2\n",
            5,
            "binding_group.pool1.binding.b1.bind_adress",
        ),
        ("binding_group:\n  pool1:\n    bindings: {b1: {}}\n", 3, "binding_group.pool1.bindings"),
        ("binding:\n  b3:\n    bind_address: 127.0.0.4\n    max_outbound: 3\n", 4, "binding.b3.max_outbound"),
        ("domain:\n  x.test:\n    scope_max: 3\n", 3, "domain.x.test.scope_max"),
        (
            "binding:\n  b3:\n    domain:\n      x.test:\n        max_outbund_connections: 3\n",
            5,
            "binding.b3.domain.x.test.max_outbund_connections",
        ),
        ("host:\n  mx.test:\n\n    scope_max_outbound: 2\n", 4, "host.mx.test.scope_max_outbound"),
        # a key holding a dot (a flattened "relay.host") is found on its own line
        ("queues: 2\nrelay.host: 127.0.0.1\n", 2, "relay.host"),
        ("queues: 2\nrelay:\n  host: x\n  a.b: 1\n", 4, "relay.a.b"),
        ("queues: 2\n5: 1\n", 2, "5"),
    ],
)
def test_every_unknown_key_is_an_error_naming_file_line_and_key(tmp_path, clean, text, line, key):
    err = config_error(tmp_path, text)
    assert_names(err, tmp_path / "copiamail.yaml", line, f"'{key}'", "unknown key")


# --- bad values ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,line,key",
    [
        ("queues: -1\n", 1, "queues"),
        ("queues: many\n", 1, "queues"),
        ("queues: 100\n", 1, "queues"),
        ("queues: true\n", 1, "queues"),
        ("esender: mailer@x.test\nrelay:\n  host: h\n  starttls: maybe\n", 4, "relay.starttls"),
        ("relay: {host: h, port: 0}\n", 1, "relay.port"),
        ("relay: {port: 25}\n", 1, "relay.host"),
        ("\nmx_port: 0\n", 2, "mx_port"),
        ("mx_port: 65536\n", 1, "mx_port"),
        ("server_max_outbound_connections: 0\n", 1, "server_max_outbound_connections"),
        ("max_outbound_connections: 0\n", 1, "max_outbound_connections"),
        ("domain:\n  x.test: {scope_max_outbound_connections: 0}\n", 2, "domain.x.test.scope_max_outbound_connections"),
        ("domain:\n  x.test:\n    max_outbound_connections: -2\n", 3, "domain.x.test.max_outbound_connections"),
        (
            "host:\n  mx.test:\n    cluster_scope_max_outbound_connections: 2\n",
            3,
            "host.mx.test.cluster_scope_max_outbound_connections",
        ),
        (
            "binding_group:\n  pool1:\n    scope_max_outbound_connections: 0\n    binding: {b1: {}}\n",
            3,
            "binding_group.pool1.scope_max_outbound_connections",
        ),
        ("domain:\n  x.test: {}\n  \"/(unclosed/\": {max_outbound_connections: 2}\n", 3, "domain./(unclosed/"),
        ("binding:\n  b3:\n    bind_address: 127.0.0.999\n", 3, "binding.b3.bind_address"),
        ("binding:\n  b3: {bind_address: mail.example.com}\n", 2, "binding.b3.bind_address"),
        (
            "binding_group:\n  pool1:\n    binding: {b1: {}}\ndefault_binding_group: pool2\n",
            4,
            "default_binding_group",
        ),
        ("esender: not-an-address\n", 1, "esender"),
        ("shutdown_grace: -1\n", 1, "shutdown_grace"),
        ("watcher: inotify\n", 1, "watcher"),
        ("fsync: perhaps\n", 1, "fsync"),
        ("attachment_roots: ./spool\n", 1, "attachment_roots"),
        ("cluster: {lease_seconds: 3}\n", 1, "cluster.redis"),
        ("binding_group:\n  pool1: {}\n", 2, "binding_group.pool1"),
        ("queues: 1\nbinding_group:\n  pool.one: {}\n", 3, "binding_group.pool.one"),
        ("dns:\n  nameservers: [127.0.0.1, dns.example]\n", 2, "dns.nameservers"),
        ("spool: 5\n", 1, "spool"),
    ],
)
def test_bad_values_are_errors_naming_file_line_and_key(tmp_path, clean, text, line, key):
    err = config_error(tmp_path, text)
    assert_names(err, tmp_path / "copiamail.yaml", line, f"'{key}'")


@pytest.mark.parametrize("text,line", [("queues: 2\nrelay: 5\n", 2), ("domain:\n  x.test: 5\n", 2), ("binding:\n  b1: 5\n", 2)])
def test_a_value_that_should_be_a_mapping_names_file_line_and_key(tmp_path, clean, text, line):
    err = config_error(tmp_path, text)
    assert_names(err, tmp_path / "copiamail.yaml", line, "must be a mapping")


@pytest.mark.parametrize("text,key", [("queues: 2\nrelay: 5\n", "relay"), ("domain:\n  x.test: 5\n", "domain.x.test")])
def test_a_value_that_should_be_a_mapping_names_at_least_file_and_key(tmp_path, clean, text, key):
    err = config_error(tmp_path, text)
    assert str(tmp_path / "copiamail.yaml") in str(err) and f"'{key}'" in str(err)


def test_a_bad_regex_error_says_regex(tmp_path, clean):
    err = config_error(tmp_path, 'domain:\n  "/a(b/": {max_outbound_connections: 2}\n')
    assert "regex" in str(err)


def test_a_default_binding_group_naming_a_plain_binding_is_an_error(tmp_path, clean):
    err = config_error(tmp_path, "binding:\n  b3: {bind_address: 127.0.0.4}\ndefault_binding_group: b3\n")
    assert_names(err, tmp_path / "copiamail.yaml", 3, "default_binding_group", "b3")


def test_a_binding_defined_twice_is_an_error(tmp_path, clean):
    err = config_error(tmp_path, "binding_group:\n  g: {binding: {b1: {}}}\nbinding:\n  b1: {}\n")
    assert "b1" in str(err) and str(tmp_path / "copiamail.yaml") in str(err)


def test_an_ipv6_bind_address_is_accepted(tmp_path, clean):
    cfg = load_yaml(tmp_path, "binding:\n  b6: {bind_address: '::1'}\n")
    assert cfg.binding("b6").bind_address == "::1"


@pytest.mark.parametrize(
    "text,line",
    [
        ("queues: 15\nrelay: {host: x\n", 3),
        ("queues: 15\n  spool: x\n", 2),
        ("a: [1, 2\n", 2),
        ("queues: 1\nqueues: 2\n", 2),
    ],
)
def test_a_yaml_syntax_error_names_file_and_line(tmp_path, clean, text, line):
    err = config_error(tmp_path, text)
    s = str(err)
    assert s.startswith(f"{(tmp_path / 'copiamail.yaml').absolute()}:")
    assert err.line is not None and abs(err.line - line) <= 1, s
    assert "\n" not in s


def test_a_top_level_that_is_not_a_mapping_is_an_error_naming_the_file(tmp_path, clean):
    err = config_error(tmp_path, "- a\n- b\n")
    assert str(tmp_path / "copiamail.yaml") in str(err)


# --- the CFG file -----------------------------------------------------------------


def test_cfg_domain_limit_rules_keep_file_and_line(tmp_path):
    path = write(tmp_path / "FAXFACTS.CFG", SAMPLE_CFG)
    rules = load_cfg(path)
    assert [(r.node, r.text, r.count, r.line) for r in rules.domain_limits] == [
        ("*", "@example.com", 2, 2), ("N1", "@", 3, 3), ("*", "@copia.com", 1, 4),
    ]
    assert all(r.path == path for r in rules.domain_limits)
    assert rules.domain_limits[1].where() == f"{path}:3"
    assert rules.path == path


def test_cfg_retry_delays_retry_max_and_esender_are_read(tmp_path):
    rules = load_cfg(write(tmp_path / "FAXFACTS.CFG", SAMPLE_CFG))
    assert dict(rules.retry_delays) == {"*": (30, 300, 7200), "B": ()}
    assert rules.retry_max == 6
    assert rules.esender == "statements@acme.test"
    assert rules.warnings == ()


def test_cfg_commands_are_case_insensitive_and_comments_and_crlf_are_fine(tmp_path):
    path = tmp_path / "F.CFG"
    path.write_bytes(b"\xef\xbb\xbf; c\r\n  $DOMAIN_LIMIT  *  @x.test  4 ; four\r\n\r\n$Email_Retry_Max 2\r\n")
    rules = load_cfg(path)
    assert [(r.text, r.count, r.line) for r in rules.domain_limits] == [("@x.test", 4, 2)]
    assert rules.retry_max == 2


@pytest.mark.parametrize("count", ["0", "x", "-1", "1.5"])
def test_a_domain_limit_count_that_is_not_a_positive_integer_names_file_and_line(tmp_path, count):
    path = write(tmp_path / "FAXFACTS.CFG", f"; header\n$domain_limit * @a.test 2\n$domain_limit * @b.test {count}\n")
    with pytest.raises(ConfigError) as info:
        load_cfg(path)
    assert str(info.value).startswith(f"{path}:3: ")
    assert info.value.line == 3


@pytest.mark.parametrize(
    "line",
    [
        "$domain_limit *",
        "$domain_limit * @a 1 2",
        "$email_retry_max -1",
        "$email_retry_max x",
        '$email_retry_delays P "5"',
        '$email_retry_delays * "5 x"',
        "$email_retry_delays",
        "$email_esender not-an-address",
        '$domain_limit * "@a',
        "not a command",
    ],
)
def test_other_bad_cfg_lines_are_errors_naming_file_and_line(tmp_path, line):
    path = write(tmp_path / "FAXFACTS.CFG", f"$domain_limit * @ 1\n{line}\n")
    with pytest.raises(ConfigError) as info:
        load_cfg(path)
    assert str(info.value).startswith(f"{path}:2: "), str(info.value)


def test_a_bad_cfg_through_the_yaml_is_an_error_naming_the_cfg_file_and_line(tmp_path, clean):
    err = config_error(tmp_path, "cfg: ./FAXFACTS.CFG\n", "\n\n$domain_limit * @x 0\n")
    assert str(err).startswith(f"{(tmp_path / 'FAXFACTS.CFG').absolute()}:3: ")


def test_any_other_cfg_command_is_a_warning_naming_file_and_line_not_an_error(tmp_path):
    path = write(tmp_path / "FAXFACTS.CFG", "$domain_limit * @ 1\n$fax_retries 3\n; x\n$Email_Subject hi\n")
    rules = load_cfg(path)
    assert len(rules.domain_limits) == 1
    assert len(rules.warnings) == 2
    assert rules.warnings[0].startswith(f"{path}:2: ") and "fax_retries" in rules.warnings[0]
    assert rules.warnings[1].startswith(f"{path}:4: ") and "email_subject" in rules.warnings[1]


def test_a_missing_cfg_file_is_an_error_naming_it(tmp_path):
    with pytest.raises(ConfigError, match=r"NOPE\.CFG"):
        load_cfg(tmp_path / "NOPE.CFG")


# --- overrides --------------------------------------------------------------------


def test_with_overrides_spool_and_relay_host_port(tmp_path, clean):
    cfg = load_yaml(tmp_path, "relay: {host: old.test, port: 2525, starttls: never}\nqueues: 4\n")
    out = cfg.with_overrides(spool=Path("rel/spool"), relay="127.0.0.1:2626")
    assert out.spool == clean.absolute() / "rel" / "spool"
    assert out.relay.host == "127.0.0.1" and out.relay.port == 2626
    assert out.relay.starttls == "never"  # the rest of the relay stanza is kept
    assert out.queues == 4
    assert cfg.relay.host == "old.test"  # the original is unchanged (frozen)


def test_with_overrides_relay_without_port_uses_25_and_creates_a_relay(clean):
    cfg = load_config()
    out = cfg.with_overrides(relay="smtp.test")
    assert out.relay == RelayConfig(host="smtp.test", port=25)
    assert out.spool == cfg.spool


def test_with_overrides_nothing_changes_nothing(clean):
    cfg = load_config()
    assert cfg.with_overrides() == cfg


@pytest.mark.parametrize("relay", ["h:0", "h:x", "h:70000", "h:"])
def test_with_overrides_bad_relay_port_is_a_config_error(clean, relay):
    with pytest.raises(ConfigError, match="--relay"):
        load_config().with_overrides(relay=relay)


@pytest.mark.parametrize(
    "text,host,port",
    [("mx.test", "mx.test", 25), ("mx.test:2525", "mx.test", 2525), ("[::1]:2526", "::1", 2526), ("[::1]", "::1", 25), ("::1", "::1", 25), ("127.0.0.1:25", "127.0.0.1", 25)],
)
def test_relay_option_takes_host_port_and_ipv6(text, host, port):
    from copiamail.config import parse_host_port

    assert parse_host_port(text, "--relay") == (host, port)


@pytest.mark.parametrize("text", ["mx.test:x", "mx.test:0", ":25", "[::1", "[::1]x"])
def test_relay_option_refuses_a_bad_host_or_port(text):
    from copiamail.config import parse_host_port
    from copiamail.errors import ConfigError

    with pytest.raises(ConfigError):
        parse_host_port(text, "--relay")


# --- workers ---------------------------------------------------------------------------


def test_workers_defaults_to_auto_one_per_cpu_and_is_read(tmp_path):
    import os

    cpus = len(os.sched_getaffinity(0))
    assert load_yaml(tmp_path, "spool: s\n").workers is None
    assert load_yaml(tmp_path, "spool: s\n").worker_count == min(cpus, 64)
    assert load_yaml(tmp_path, "spool: s\nworkers: auto\n").worker_count == min(cpus, 64)
    assert load_yaml(tmp_path, "spool: s\nworkers: 4\n").worker_count == 4


@pytest.mark.parametrize("value", ["0", "65", "two", "1.5", "Auto", "true"])
def test_workers_outside_1_to_64_is_refused_naming_the_key(tmp_path, value):
    err = config_error(tmp_path, f"spool: s\nworkers: {value}\n")
    assert_names(err, tmp_path / "copiamail.yaml", 2, "workers")


def test_more_workers_than_a_shared_cap_has_slots_is_accepted(tmp_path):
    # The workers share the node's count of a shared cap: none needs a slot of its own.
    cfg = load_yaml(tmp_path, "spool: s\nworkers: 3\nhost:\n  mx.test: {scope_max_outbound_connections: 1}\n")
    assert cfg.worker_count == 3


def test_a_cap_of_one_domain_does_not_limit_the_number_of_workers(tmp_path):
    cfg = load_yaml(tmp_path, 'spool: s\nworkers: 4\ndomain:\n  "copia.com": {scope_max_outbound_connections: 1}\n')
    assert cfg.workers == 4


def test_path_map_keys_are_matched_in_any_case_and_folders_are_relative_to_the_config(tmp_path):
    cfg = load_yaml(tmp_path, 'path_map: {"C:\\\\Copia\\\\": copia/, "D:\\\\Long\\\\Prefix\\\\": /srv/x}\n')
    assert cfg.path_map == (("d:\\long\\prefix\\", "/srv/x/"), ("c:\\copia\\", str(tmp_path / "copia") + "/"))


def test_path_map_must_map_to_a_folder_path(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_yaml(tmp_path, 'path_map:\n  "C:\\\\Copia\\\\": 3\n')
    assert "path_map" in str(e.value) and ":2:" in str(e.value)


def test_a_cfg_from_the_copiafacts_manual_is_read(tmp_path):
    path = write(tmp_path / "FAXFACTS.CFG", "\n".join([
        "$email_settings 5000 3 35000 10000",
        '$email_retry_delays 1-4 A "5 10 I30"',
        '$email_retry_delays * B "14:30W 2H"',
        "$email_retry_max 7",
        '$email_esender "Acme Billing" <billing@acme.test>',
        "$var_def COMPANY Acme",
        '$retry_delays * "1"',
        "$retry_max 2",
        "$domain_limit * @copia.com 2",
    ]) + "\n")
    rules = load_cfg(path)
    assert rules.warnings == ()
    assert rules.retry_delays["A"][:2] == (300, 600) and rules.retry_delays["A"][2].relay
    assert rules.retry_delays["B"][0] == outcome.RetryAt(None, 14, 30, "W")
    assert (rules.retry_max, rules.fallback_max) == (7, 2) and rules.fallback_delays == {"*": (60,)}
    assert rules.esender == "billing@acme.test" and rules.variables == {"COMPANY": "Acme"}


def test_cfg_email_from_and_esender_as_written_give_the_default_from_header(tmp_path):
    path = write(tmp_path / "FAXFACTS.CFG", '$email_esender "Acme Mailer" <mailer@acme.test>\n')
    assert load_cfg(path).from_header == '"Acme Mailer" <mailer@acme.test>'
    path = write(tmp_path / "FAXFACTS.CFG", '$email_esender mailer@acme.test\n$email_from "Acme" <info@acme.test>\n')
    assert load_cfg(path).from_header == '"Acme" <info@acme.test>' and load_cfg(path).esender == "mailer@acme.test"


# --- the cluster ---------------------------------------------------------------------

CLUSTER_YAML = 'cluster: {redis: "rediss://redis.example:6380/2", password_file: redis.pw, lease_seconds: 12}\n'


def test_cluster_caps_are_read_at_the_top_level_and_in_domain_and_host_stanzas(tmp_path, clean):
    cfg = load_yaml(tmp_path, CLUSTER_YAML + textwrap.dedent("""\
        cluster_scope_max_outbound_connections: 500
        domain:
          gmail.com: {cluster_scope_max_outbound_connections: 20, cluster_max_message_rate: "100/s"}
        host:
          mx.shared.test: {cluster_scope_max_outbound_connections: 6}
        """))
    assert cfg.cluster is not None and cfg.cluster.redis == "rediss://redis.example:6380/2"
    assert cfg.cluster.password_file == tmp_path / "redis.pw" and cfg.cluster.lease_seconds == 12
    assert cfg.cluster_scope_max_outbound_connections == 500
    assert cfg.domains[0].caps.cluster_scope_max_outbound_connections == 20
    assert str(cfg.domains[0].caps.cluster_max_message_rate) == "100/s"
    assert cfg.hosts[0].caps.cluster_scope_max_outbound_connections == 6


@pytest.mark.parametrize(
    "text,line,key,words",
    [
        ("cluster_scope_max_outbound_connections: 5\n", 1, "cluster_scope_max_outbound_connections", "cluster.redis"),
        ("domain:\n  a.test:\n    max_outbound_connections: 2\n    cluster_max_message_rate: 5/s\n", 4,
         "domain.a.test.cluster_max_message_rate", "cluster.redis"),
        (CLUSTER_YAML + "host:\n  mx.test: {cluster_max_message_rate: 5/s}\n", 3,
         "host.mx.test.cluster_max_message_rate", "domain: stanzas"),
        (CLUSTER_YAML + "binding:\n  b1:\n    cluster_scope_max_outbound_connections: 2\n", 4,
         "binding.b1.cluster_scope_max_outbound_connections", "top level"),
        (CLUSTER_YAML + "binding:\n  b1:\n    domain:\n      a.test: {cluster_scope_max_outbound_connections: 2}\n",
         5, "binding.b1.domain.a.test.cluster_scope_max_outbound_connections", "top level"),
        ('cluster: {redis: "redis://:hunter2@h:6379/0"}\n', 1, "cluster.redis", "password_file"),
        ('cluster: {redis: "http://h"}\n', 1, "cluster.redis", "rediss://"),
        ('cluster:\n  redis: "redis://h:6379/x"\n', 2, "cluster.redis", "number"),
        ('cluster: {redis: "redis://h", lease_seconds: 0}\n', 1, "cluster.lease_seconds", ""),
    ],
)
def test_bad_cluster_settings_are_one_line_naming_file_line_and_key(tmp_path, clean, text, line, key, words):
    err = config_error(tmp_path, text)
    assert_names(err, tmp_path / "copiamail.yaml", line, key)
    assert words in str(err) and "hunter2" not in str(err)


def test_an_unreadable_redis_password_file_is_one_line_at_node_start(tmp_path, clean):
    cfg = load_yaml(tmp_path, CLUSTER_YAML)
    with pytest.raises(ConfigError) as info:
        read_password(cfg, "cluster")
    assert "cluster.password_file" in str(info.value) and "redis.pw" in str(info.value)
    (tmp_path / "redis.pw").write_text("s3cret\n")
    assert read_password(cfg, "cluster") == "s3cret"
