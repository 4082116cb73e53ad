"""copiamail.smtp.startup: what a node works out once, at start."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from copiamail.errors import ConfigError
from copiamail.smtp.startup import make_tls_context


def test_a_tls_context_is_made_once_per_process_for_each_setting(tls_cert):
    ca = Path(tls_cert.cert_path)
    made = make_tls_context(True, ca)
    assert make_tls_context(True, ca) is made
    assert make_tls_context(False, ca) is not made


def test_a_ca_file_that_cannot_be_loaded_fails_each_time_and_loads_once_it_is_fixed(tmp_path, tls_cert):
    ca = tmp_path / "ca.pem"
    ca.write_text("not a certificate\n")
    for _ in range(2):
        with pytest.raises(ConfigError, match=r"relay\.ca_file"):
            make_tls_context(True, ca)
    ca.write_bytes(Path(tls_cert.cert_path).read_bytes())
    assert make_tls_context(True, ca) is make_tls_context(True, ca)


def test_a_node_that_sends_through_a_relay_does_not_import_the_dns_resolver():
    # dnspython costs 50 to 90 ms at every start; only MX lookups need it.
    code = ("import sys, copiamail.cli, copiamail.node.node, copiamail.scheduling.scheduler; "
            "print(sorted(m for m in sys.modules if m == 'dns' or m.startswith('dns.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
