"""copiamail.dkim_signing: signatures a receiver verifies (dkimpy with the
public key record), the header set, keys refused, and which jobs are signed."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import MappingProxyType

import pytest
from dkimkeys import damaged_copy, make_key, public_record, signature_tags, verifies

from copiamail.config import Config, DkimKey
from copiamail.errors import JobError
from copiamail.jobfile import outcome
from copiamail.jobfile.dkim import from_domain, is_dns_name, key_problem, sign, sign_for_job
from copiamail.jobfile.fsfile import CommandFile
from copiamail.jobfile.job import parse_job
from copiamail.jobfile.message import build_message
from copiamail.jobfile.model import Job

NOW = 1_795_000_000.0
SENDER = "bounce@acme.test"
RECORD_NAME = "s2026._domainkey.acme.test"


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("keys")
    make_key(d / "acme.key")
    make_key(d / "other.key")
    return d


@pytest.fixture(scope="module")
def acme_key(keys) -> bytes:
    return (keys / "acme.key").read_bytes()


@pytest.fixture(scope="module")
def records(keys) -> dict[str, bytes]:
    return {RECORD_NAME: public_record(keys / "acme.key")}


def job_of(root: Path, *lines: str) -> Job:
    text = "\n".join(["$email_address jane@example.com", "$email_from Billing <billing@acme.test>", *lines]) + "\n"
    path = root / "J1.FS"
    return parse_job(CommandFile.parse(text.encode("utf-8"), path), "J1.FS")


def built(root: Path, *lines: str) -> bytes:
    return build_message(job_of(root, *lines), spool_root=root, attachment_roots=(root,), sender=SENDER, now=NOW)


# --- sign: the signature verifies on the bytes sent ------------------------------


def test_a_signed_message_verifies_with_the_published_key(tmp_path, acme_key, records):
    message = built(tmp_path, '$email_subject "Your statement"', '$email_text "Dear Jane,"')
    signed = sign(message, "acme.test", "s2026", acme_key)
    assert signed.startswith(b"DKIM-Signature: ")
    assert signed.endswith(message)  # the message itself is sent exactly as built
    assert verifies(signed, records)


def test_the_signature_is_rsa_sha256_relaxed_relaxed_for_the_domain_and_selector(tmp_path, acme_key):
    signed = sign(built(tmp_path, '$email_subject "x"', '$email_text "hi"'), "acme.test", "s2026", acme_key)
    tags = signature_tags(signed)
    assert (tags["a"], tags["c"], tags["d"], tags["s"]) == ("rsa-sha256", "relaxed/relaxed", "acme.test", "s2026")


def test_a_changed_body_or_header_or_another_key_does_not_verify(tmp_path, keys, acme_key, records):
    signed = sign(built(tmp_path, '$email_subject "Your statement"', '$email_text "Pay 10 EUR"'),
                  "acme.test", "s2026", acme_key)
    assert not verifies(signed.replace(b"Pay 10 EUR", b"Pay 99 EUR"), records)
    assert not verifies(signed.replace(b"Your statement", b"Your invoice!!"), records)
    assert not verifies(signed, {RECORD_NAME: public_record(keys / "other.key")})
    assert not verifies(signed, {})


def test_the_usual_headers_are_signed_where_present(tmp_path, acme_key):
    plain = sign(built(tmp_path, '$email_subject "x"', '$email_text "hi"'), "acme.test", "s2026", acme_key)
    assert signature_tags(plain)["h"].split(":") == [
        "from", "to", "subject", "date", "message-id", "mime-version", "content-type", "content-transfer-encoding"]
    more = sign(built(tmp_path, '$email_subject "x"', '$email_text "hi"', "$email_header Reply-To: desk@acme.test",
                      "$email_header Cc: boss@acme.test", "$email_header X-Campaign: 7"),
                "acme.test", "s2026", acme_key)
    assert signature_tags(more)["h"].split(":") == [
        "from", "to", "subject", "date", "message-id", "mime-version", "content-type", "content-transfer-encoding",
        "reply-to", "cc"]
    no_subject = sign(built(tmp_path, '$email_text "hi"'), "acme.test", "s2026", acme_key)
    assert "subject" not in signature_tags(no_subject)["h"].split(":")


def test_a_quoted_printable_body_is_signed_as_encoded(tmp_path, acme_key, records):
    message = built(tmp_path, '$email_subject "Grüße"', '$email_text "Schöne Grüße aus Köln, ' + "x" * 90 + '"')
    assert b"Content-Transfer-Encoding: quoted-printable" in message
    assert verifies(sign(message, "acme.test", "s2026", acme_key), records)


def test_a_multipart_message_with_a_base64_attachment_verifies(tmp_path, acme_key, records):
    (tmp_path / "report.pdf").write_bytes(bytes(range(256)) * 40)
    message = built(tmp_path, '$email_subject "Report"', '$email_text "attached"', "$email_attach report.pdf")
    assert b"multipart/mixed" in message and b"Content-Transfer-Encoding: base64" in message
    assert verifies(sign(message, "acme.test", "s2026", acme_key), records)


def test_a_key_file_with_windows_line_endings_signs(tmp_path, acme_key, records):
    message = built(tmp_path, '$email_subject "x"', '$email_text "hi"')
    crlf = acme_key.replace(b"\n", b"\r\n")
    assert key_problem(crlf) is None
    assert verifies(sign(message, "acme.test", "s2026", crlf), records)


def test_a_pkcs1_key_signs_as_well(tmp_path, keys, acme_key, records):
    pkcs1 = damaged_copy(keys / "acme.key", tmp_path / "pkcs1.key", change=0).read_bytes()
    assert pkcs1.startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    assert key_problem(pkcs1) is None
    assert verifies(sign(built(tmp_path, '$email_text "hi"'), "acme.test", "s2026", pkcs1), records)


# --- keys dkimpy cannot sign with -----------------------------------------------


def test_garbage_is_not_a_key(tmp_path):
    assert "not an unencrypted RSA private key" in key_problem(b"hello")
    assert "not an unencrypted RSA private key" in key_problem(b"-----BEGIN PRIVATE KEY-----\n!!!\n-----END PRIVATE KEY-----\n")
    assert "not an unencrypted RSA private key" in key_problem(b"")


def test_a_key_under_1024_bits_is_refused(tmp_path):
    problem = key_problem(make_key(tmp_path / "short.key", bits=512).read_bytes())
    assert problem is not None and "512-bit" in problem and "1024" in problem


def test_a_key_whose_numbers_disagree_is_refused(tmp_path, keys):
    problem = key_problem(damaged_copy(keys / "acme.key", tmp_path / "bad.key").read_bytes())
    assert problem is not None and "damaged" in problem


def test_signing_with_a_bad_key_or_name_is_a_dkim_job_error(tmp_path, acme_key):
    message = built(tmp_path, '$email_text "hi"')
    for domain, selector, key in [("acme.test", "s2026", b"garbage"), ("acme.test", "s 2026", acme_key),
                                  ("acme.test;x=1", "s2026", acme_key)]:
        with pytest.raises(JobError) as e:
            sign(message, domain, selector, key)
        assert e.value.outcome == outcome.DKIM_FAILED.code == 65
        assert "DKIM signing failed" in str(e.value)


# --- names ------------------------------------------------------------------------


def test_from_domain_reads_the_from_header_as_built():
    assert from_domain(b"To: a@b.test\r\nFrom: \"Doe, J\" <J@Acme.Test>\r\n\r\nbody") == "acme.test"
    assert from_domain(b"From:\r\n =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n <billing@acme.test>\r\nTo: x@y.test\r\n\r\n") == "acme.test"
    assert from_domain(b"To: a@b.test\r\n\r\nFrom: x@evil.test\r\n") is None
    assert from_domain(b"From: nobody\r\n\r\n") is None


@pytest.mark.parametrize("name, ok", [("s2026", True), ("mail.acme-1.test", True), ("", False), ("a b", False),
                                      ("-x", False), ("x.", False), ("x;y", False), ("sélecteur", False)])
def test_selectors_and_domains_are_dns_names(name, ok):
    assert is_dns_name(name) is ok


# --- sign_for_job: which jobs are signed, with which key --------------------------


def config_with(root: Path, acme_key: bytes | None = None, **kw) -> Config:
    dkim = {} if acme_key is None else {"acme.test": DkimKey("acme.test", "s2026", root / "acme.key", acme_key)}
    return replace(Config(), spool=root, dkim=MappingProxyType(dkim), **kw)


def test_without_dkim_config_or_job_key_the_message_is_returned_as_it_is(tmp_path):
    message = built(tmp_path, '$email_text "hi"')
    assert sign_for_job(message, job_of(tmp_path, '$email_text "hi"'), config_with(tmp_path), tmp_path) is message


def test_config_dkim_signs_mail_from_its_domain_only(tmp_path, acme_key, records):
    cfg = config_with(tmp_path, acme_key)
    job = job_of(tmp_path, '$email_text "hi"')
    message = built(tmp_path, '$email_text "hi"')
    assert verifies(sign_for_job(message, job, cfg, tmp_path), records)
    # From: as the job's own header wrote it decides, not the envelope sender.
    other = built(tmp_path, '$email_text "hi"', "$email_header From: news@other.test")
    assert sign_for_job(other, job, cfg, tmp_path) is other


def test_a_job_key_signs_with_the_selector_of_its_var_def(tmp_path, keys, records):
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "job.key").write_bytes((keys / "acme.key").read_bytes())
    lines = ('$email_text "hi"', "$email_dkim_keyfile keys\\job.key", "$var_def DKIM_SELECTOR s2026")
    signed = sign_for_job(built(tmp_path, *lines), job_of(tmp_path, *lines), config_with(tmp_path), tmp_path)
    assert signature_tags(signed)["s"] == "s2026" and verifies(signed, records)


def test_a_job_key_wins_over_the_config_key(tmp_path, keys, acme_key):
    (tmp_path / "other.key").write_bytes((keys / "other.key").read_bytes())
    lines = ('$email_text "hi"', "$email_dkim_keyfile other.key", "$var_def DKIM_SELECTOR s2027")
    signed = sign_for_job(built(tmp_path, *lines), job_of(tmp_path, *lines), config_with(tmp_path, acme_key), tmp_path)
    assert verifies(signed, {"s2027._domainkey.acme.test": public_record(keys / "other.key")})


def test_a_job_key_path_is_mapped_with_path_map(tmp_path, keys, records):
    (tmp_path / "copia").mkdir()
    (tmp_path / "copia" / "acme.key").write_bytes((keys / "acme.key").read_bytes())
    cfg = config_with(tmp_path, path_map=(("c:\\copia\\", str(tmp_path / "copia") + "/"),))
    lines = ('$email_text "hi"', "$email_dkim_keyfile C:\\Copia\\acme.key", "$var_def DKIM_SELECTOR s2026")
    assert verifies(sign_for_job(built(tmp_path, *lines), job_of(tmp_path, *lines), cfg, tmp_path), records)


def dkim_error(tmp_path: Path, *lines: str, cfg: Config | None = None) -> JobError:
    job = job_of(tmp_path, '$email_text "hi"', *lines)
    with pytest.raises(JobError) as e:
        sign_for_job(built(tmp_path, '$email_text "hi"', *lines), job, cfg or config_with(tmp_path), tmp_path)
    assert e.value.outcome == outcome.DKIM_FAILED.code
    return e.value


def test_a_job_key_that_cannot_be_used_fails_the_job_naming_its_line(tmp_path, keys):
    (tmp_path / "good.key").write_bytes((keys / "acme.key").read_bytes())
    (tmp_path / "bad.key").write_bytes(b"not a key\n")
    cases = [
        (("$email_dkim_keyfile missing.key", "$var_def DKIM_SELECTOR s1"), "missing.key"),
        (("$email_dkim_keyfile bad.key", "$var_def DKIM_SELECTOR s1"), "not an unencrypted RSA private key"),
        (("$email_dkim_keyfile good.key",), "$var_def DKIM_SELECTOR"),
        (("$email_dkim_keyfile good.key", "$var_def DKIM_SELECTOR bad;selector"), "bad selector"),
        (("$email_dkim_keyfile /etc/hostname", "$var_def DKIM_SELECTOR s1"), "outside attachment_roots"),
        (("$email_dkim_keyfile C:\\keys\\a.key", "$var_def DKIM_SELECTOR s1"), "path_map"),
    ]
    for lines, words in cases:
        err = dkim_error(tmp_path, *lines)
        assert err.line == 4, (lines, str(err))  # the $email_dkim_keyfile line
        assert words in err.message, (lines, err.message)


def test_a_missing_job_key_is_refused_even_when_the_config_has_one(tmp_path, acme_key):
    err = dkim_error(tmp_path, "$email_dkim_keyfile missing.key", "$var_def DKIM_SELECTOR s1",
                     cfg=config_with(tmp_path, acme_key))
    assert "DKIM key file" in err.message and "missing.key" in err.message


def test_the_job_command_is_read_last_occurrence_first(tmp_path):
    job = job_of(tmp_path, '$email_text "hi"', "$email_dkim_keyfile a.key", '$email_dkim_keyfile "b c.key"')
    assert job.dkim_keyfile == ("b c.key", 5)
    with pytest.raises(JobError) as e:
        job_of(tmp_path, '$email_text "hi"', "$email_dkim_keyfile")
    assert e.value.outcome == outcome.BAD_JOB.code
