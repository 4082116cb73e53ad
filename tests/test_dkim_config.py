"""Config ``dkim:`` (SPEC 10, DKIM): keys read and checked when the config is
loaded; every bad entry is one line naming the YAML file, line and key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from dkimkeys import damaged_copy, make_key
from spoolkit import cli_env

from copiamail.config import load_config
from copiamail.errors import ConfigError


@pytest.fixture(scope="module")
def key_text(tmp_path_factory) -> bytes:
    return make_key(tmp_path_factory.mktemp("keys") / "acme.key").read_bytes()


def write_config(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "copiamail.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def error_of(path: Path) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(path)
    text = str(e.value)
    assert "\n" not in text
    return text


def test_a_good_dkim_config_loads_its_keys_relative_to_the_config_folder(tmp_path, key_text):
    conf = tmp_path / "etc" / "copiamail"
    (conf / "keys").mkdir(parents=True)
    (conf / "keys" / "acme.key").write_bytes(key_text)
    path = write_config(conf, 'spool: ./spool\ndkim:\n  "Acme.Test": {selector: s2026, key_file: keys/acme.key}\n')
    cfg = load_config(path)
    assert list(cfg.dkim) == ["acme.test"]
    key = cfg.dkim["acme.test"]
    assert (key.domain, key.selector, key.key_file, key.key, key.line) == (
        "acme.test", "s2026", (conf / "keys" / "acme.key").absolute(), key_text, 3)
    assert "PRIVATE KEY" not in repr(cfg)  # the key is never printed with the config
    with pytest.raises(TypeError):
        cfg.dkim["other.test"] = key  # type: ignore[index]


def test_without_dkim_nothing_is_signed(tmp_path):
    assert dict(load_config(write_config(tmp_path, "queues: 2\n")).dkim) == {}


def test_a_missing_key_file_names_the_file_line_and_key(tmp_path):
    path = write_config(tmp_path, "queues: 2\ndkim:\n  acme.test:\n    selector: s2026\n    key_file: keys/acme.key\n")
    text = error_of(path)
    assert text.startswith(f"{path}:5: key 'dkim.acme.test.key_file': cannot read {tmp_path / 'keys' / 'acme.key'}"), text


def test_a_folder_as_key_file_is_refused(tmp_path):
    (tmp_path / "keys").mkdir()
    path = write_config(tmp_path, "dkim: {acme.test: {selector: s2026, key_file: keys}}\n")
    assert "not a regular file" in error_of(path)


@pytest.mark.parametrize("content, words", [
    (b"hello\n", "not an unencrypted RSA private key"),
    (b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "not an unencrypted RSA private key"),
])
def test_a_key_dkimpy_cannot_parse_names_the_file_line_and_key(tmp_path, content, words):
    (tmp_path / "acme.key").write_bytes(content)
    path = write_config(tmp_path, "dkim:\n  acme.test:\n    selector: s2026\n    key_file: acme.key\n")
    text = error_of(path)
    assert text.startswith(f"{path}:4: key 'dkim.acme.test.key_file': {tmp_path / 'acme.key'}: {words}"), text


def test_a_short_or_damaged_key_is_refused(tmp_path, key_text):
    make_key(tmp_path / "short.key", bits=512)
    (tmp_path / "acme.key").write_bytes(key_text)
    damaged_copy(tmp_path / "acme.key", tmp_path / "damaged.key")
    assert "too short" in error_of(write_config(tmp_path, "dkim: {a.test: {selector: s, key_file: short.key}}\n"))
    assert "damaged" in error_of(write_config(tmp_path, "dkim: {a.test: {selector: s, key_file: damaged.key}}\n"))


@pytest.mark.parametrize("stanza, line, words", [
    ("  acme.test: {selector: s2026, key_file: acme.key, algorithm: ed25519}\n", 2,
     "key 'dkim.acme.test.algorithm': unknown key"),
    ("  acme.test: {key_file: acme.key}\n", 2, "key 'dkim.acme.test.selector': is required"),
    ("  acme.test: {selector: s2026}\n", 2, "key 'dkim.acme.test.key_file': is required"),
    ("  acme.test:\n", 2, "key 'dkim.acme.test.selector': is required"),
    ("  acme.test: {selector: 's 2026', key_file: acme.key}\n", 2, "key 'dkim.acme.test.selector': not a DKIM selector"),
    ("  acme.test: {selector: 7, key_file: acme.key}\n", 2, "key 'dkim.acme.test.selector': must be a non-empty string"),
    ("  'acme test': {selector: s1, key_file: acme.key}\n", 2, "key 'dkim.acme test': must be a domain name"),
    ("  acme.test: {selector: s1, key_file: acme.key}\n  ACME.test: {selector: s2, key_file: acme.key}\n", 3,
     "key 'dkim.ACME.test': domain listed twice"),
    ("  acme.test: [s2026, acme.key]\n", 2, "key 'dkim.acme.test': must be a mapping"),
])
def test_bad_dkim_entries_name_the_line_and_key(tmp_path, key_text, stanza, line, words):
    (tmp_path / "acme.key").write_bytes(key_text)
    path = write_config(tmp_path, "dkim:\n" + stanza)
    text = error_of(path)
    assert text.startswith(f"{path}:{line}: {words}"), text


def test_check_config_reports_a_bad_key_in_one_line_and_fails(tmp_path):
    (tmp_path / "spool").mkdir()
    path = write_config(tmp_path, "spool: ./spool\ndkim:\n  acme.test: {selector: s2026, key_file: missing.key}\n")
    result = subprocess.run([sys.executable, "-m", "copiamail", "check-config", "--config", str(path)],
                            capture_output=True, text=True, timeout=60, env=cli_env(), stdin=subprocess.DEVNULL)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"{path}:3: key 'dkim.acme.test.key_file': cannot read" in lines[0]


def test_check_config_accepts_a_good_key(tmp_path, key_text):
    (tmp_path / "spool").mkdir()
    (tmp_path / "acme.key").write_bytes(key_text)
    path = write_config(tmp_path, "spool: ./spool\ndkim: {acme.test: {selector: s2026, key_file: acme.key}}\n")
    result = subprocess.run([sys.executable, "-m", "copiamail", "check-config", "--config", str(path)],
                            capture_output=True, text=True, timeout=60, env=cli_env(), stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok: ")
