"""End to end (SPEC 10, DKIM): `copiamail node` signs what it sends, and the
message the SMTP server on 127.0.0.1 received verifies with dkimpy against the
published key; a job that cannot be signed fails and nothing is sent."""

from __future__ import annotations

import pytest
from dkimkeys import make_key, public_record, signature_tags, verifies
from spoolkit import SpoolKit, attempts, var


@pytest.fixture
def server(smtp_server):
    return smtp_server()


@pytest.fixture(scope="module")
def key_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("dkim-keys")
    make_key(d / "acme.key")
    make_key(d / "job.key")
    return d


def test_config_dkim_signs_mail_from_its_domain_and_the_server_copy_verifies(tmp_path, server, key_dir):
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "acme.key").write_bytes((key_dir / "acme.key").read_bytes())
    kit = SpoolKit(tmp_path, server.port, yaml='dkim: {"acme.test": {selector: s2026, key_file: keys/acme.key}}\n')
    kit.job("TOSEND", "A1.FS", "$email_from Acme Billing <billing@acme.test>", '$email_subject "Grüße, Jane"',
            '$email_text "Schöne Grüße: your statement is attached."', to="jane@example.com")
    kit.job("TOSEND", "B1.FS", "$email_from news@other.test", '$email_subject "hi"', to="joe@example.com")
    result = kit.drain()
    assert result.returncode == 0, result.stderr
    assert kit.names("SENT") == ["A1.FS", "B1.FS"]
    received = {m.rcpt_tos[0]: m.data for m in server.messages}
    signed = received["jane@example.com"]
    assert signed.startswith(b"DKIM-Signature: ")
    tags = signature_tags(signed)
    assert (tags["a"], tags["c"], tags["d"], tags["s"]) == ("rsa-sha256", "relaxed/relaxed", "acme.test", "s2026")
    assert verifies(signed, {"s2026._domainkey.acme.test": public_record(key_dir / "acme.key")})
    assert not verifies(signed, {"s2026._domainkey.acme.test": public_record(key_dir / "job.key")})
    # A From: domain the config does not list goes unsigned.
    assert b"DKIM-Signature" not in received["joe@example.com"]


def test_a_job_key_signs_with_its_dkim_selector(tmp_path, server, key_dir):
    kit = SpoolKit(tmp_path, server.port)
    (kit.root / "keys").mkdir()
    (kit.root / "keys" / "job.key").write_bytes((key_dir / "job.key").read_bytes())
    (kit.root / "report.pdf").write_bytes(bytes(range(256)) * 20)
    kit.job("TOSEND", "J1.FS", "$email_from billing@Acme.Test", '$email_subject "Report"',
            "$email_dkim_keyfile keys\\job.key", "$var_def DKIM_SELECTOR jobs1", "$email_attach report.pdf",
            to="jane@example.com")
    result = kit.drain()
    assert result.returncode == 0, result.stderr
    assert kit.names("SENT") == ["J1.FS"]
    [message] = server.messages
    assert verifies(message.data, {"jobs1._domainkey.acme.test": public_record(key_dir / "job.key")})


def test_a_job_whose_key_file_is_missing_fails_and_nothing_is_sent(tmp_path, server, key_dir):
    (tmp_path / "acme.key").write_bytes((key_dir / "acme.key").read_bytes())
    # The config has a key for the domain too: a job that names its own key is
    # never sent with another one, nor unsigned.
    kit = SpoolKit(tmp_path, server.port, yaml='dkim: {"acme.test": {selector: s2026, key_file: acme.key}}\n')
    kit.job("TOSEND", "M1.FS", "$email_from billing@acme.test", '$email_subject "x"',
            "$email_dkim_keyfile keys/missing.key", "$var_def DKIM_SELECTOR s1", to="jane@example.com")
    result = kit.drain()
    assert result.returncode == 0, result.stderr
    assert kit.names("FAIL") == ["M1.FS"]
    assert server.messages == []
    text = kit.read("FAIL", "M1.FS")
    error = var(text, "EMAIL_ERROR")
    assert error is not None and error.startswith("line 4: DKIM key file: cannot read 'keys/missing.key'"), error
    assert "$fax_status2 65" in text
    assert [a[2:4] for a in attempts(text)] == [["65", "Z"]]


def test_a_job_key_without_a_selector_fails_and_nothing_is_sent(tmp_path, server, key_dir):
    kit = SpoolKit(tmp_path, server.port)
    (kit.root / "job.key").write_bytes((key_dir / "job.key").read_bytes())
    kit.job("TOSEND", "S1.FS", "$email_from billing@acme.test", '$email_subject "x"', "$email_dkim_keyfile job.key",
            to="jane@example.com")
    assert kit.drain().returncode == 0
    assert kit.names("FAIL") == ["S1.FS"]
    assert server.messages == []
    assert "needs $var_def DKIM_SELECTOR" in var(kit.read("FAIL", "S1.FS"), "EMAIL_ERROR")


def test_a_node_whose_config_key_cannot_be_read_does_not_start(tmp_path, server):
    kit = SpoolKit(tmp_path, server.port, yaml='dkim: {"acme.test": {selector: s2026, key_file: gone.key}}\n')
    kit.job("TOSEND", "A1.FS", "$email_from billing@acme.test", '$email_subject "x"', to="jane@example.com")
    result = kit.drain()
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "key 'dkim.acme.test.key_file': cannot read" in lines[0], result.stderr
    assert kit.names("TOSEND") == ["A1.FS"] and server.messages == []
