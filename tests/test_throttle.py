"""The throttle-reply table: every shipped pattern against the real reply it
comes from, replies that are no throttle replies, and the operator's own file."""

from __future__ import annotations

from pathlib import Path

import pytest

from copiamail.config import load_config
from copiamail.errors import ConfigError
from copiamail.throttle import ThrottleKind, read_patterns, shipped_table

C, R, P, S = ThrottleKind.CONNECTIONS, ThrottleKind.RATE, ThrottleKind.PER_CONNECTION, ThrottleKind.SUSPEND

# Real receivers' replies, as received (code, text), and the kind each means.
REAL_REPLIES = [
    (421, "4.7.0 mx.example.net Error: too many connections from 192.0.2.7", C),  # Postfix smtpd
    (421, "mx.example.net: Too many concurrent SMTP connections; please try again later", C),  # Exim
    (451, "4.7.652 The mail server [192.0.2.7] has exceeded the maximum number of connections. (S3115)", C),  # Microsoft
    (421, "4.3.2 The maximum number of concurrent connections has exceeded a limit, closing transmission channel", C),
    (421, "mwinf5c42 ME Trop de connexions, veuillez verifier votre configuration. Too many connections, slow down. "
          "OFR004_104 [104]", C),  # Orange
    (421, "Connection refused, too many sessions from 192.0.2.7. Please lower the number of concurrent sessions. IB007",
     C),  # GoDaddy
    (421, "Too many connections", C),  # 163.com
    (452, "4.3.2 Connection rate limit exceeded.", C),  # Sendmail
    (421, "4.7.28 [192.0.2.7] Our system has detected an unusual rate of unsolicited mail originating from your IP "
          "address. To protect our users from spam, mail sent from your IP address has been temporarily rate limited.",
     R),  # Gmail
    (450, "4.2.1 The user you are trying to contact is receiving mail too quickly. Please resend your message at a "
          "later time.", R),  # Gmail
    (451, "4.7.650 The mail server [192.0.2.7] has been temporarily rate limited due to IP reputation. (S843)", R),
    (421, "mx.web.de Too many messages have been received in a short period of time", R),  # web.de / GMX
    (421, "Max message per connection reached, closing transmission channel", P),  # Yahoo
    (421, "4.4.2 The mail server [192.0.2.7] has exceeded maximum number of messages per connection", P),  # Microsoft
    (421, "4.7.0 [TSS04] Messages from 192.0.2.7 temporarily deferred due to unexpected volume or user complaints - "
          "4.16.55.1; see https://postmaster.yahooinc.com/error-codes", S),  # Yahoo
    (451, "4.7.500 Server busy. Please try again later from [192.0.2.7]. (S77714)", S),  # Microsoft
    (421, "4.7.0 Try again later, closing connection. (EHLO) d75a77b69052e-4a.3 - gsmtp", S),  # Gmail
]


@pytest.mark.parametrize("code,text,kind", REAL_REPLIES, ids=[f"{c}-{k}-{i}" for i, (c, _, k) in enumerate(REAL_REPLIES)])
def test_a_real_receivers_throttle_reply_is_classified_by_its_kind(code, text, kind):
    assert shipped_table().kind(code, text) is kind


def test_every_shipped_pattern_is_the_first_match_of_some_real_reply():
    table = shipped_table()
    first = {id(table.match(code, text)) for code, text, _ in REAL_REPLIES}
    unused = [e.pattern.pattern for e in table.patterns if id(e) not in first]
    assert unused == []


def test_every_shipped_pattern_says_where_its_text_comes_from():
    assert all(e.source.strip() for e in shipped_table().patterns)


@pytest.mark.parametrize("code,text", [
    (451, "4.3.0 temporary failure"),
    (550, "5.1.1 <jane@example.com>: Recipient address rejected: User unknown in virtual mailbox table"),
    (550, "5.1.1 user unknown"),
    (452, "4.2.2 Mailbox full"),
    (421, "4.4.2 mx.example.net Error: timeout exceeded"),
    (554, "5.7.1 Service unavailable; Client host [192.0.2.7] blocked using zen.spamhaus.org"),
    (250, "2.0.0 Ok: queued, too many connections from 192.0.2.7 would be refused"),  # no refusal
])
def test_a_reply_that_is_no_throttle_reply_gets_no_kind(code, text):
    assert shipped_table().kind(code, text) is None


def test_the_operators_own_patterns_are_tried_before_the_shipped_ones(tmp_path: Path):
    (tmp_path / "mine.yaml").write_text("- pattern: 'too many connections'\n  kind: suspend\n"
                                        "- {pattern: 'slow down, friend', kind: rate}\n")
    (tmp_path / "copiamail.yaml").write_text("throttle_replies: mine.yaml\n")
    table = load_config(tmp_path / "copiamail.yaml").throttle_table
    assert table.kind(421, "4.7.0 host Error: too many connections from 192.0.2.7") is ThrottleKind.SUSPEND
    assert table.kind(451, "Slow down, friend") is ThrottleKind.RATE
    assert table.kind(450, "4.2.1 receiving mail too quickly") is ThrottleKind.RATE  # the shipped table still counts
    assert table.match(451, "slow down, friend").line == 3


@pytest.mark.parametrize("text,line,message", [
    ("- pattern: '('\n  kind: rate\n", 1, "is no regular expression"),
    ("- pattern: ok\n  kind: rate\n- pattern: fine\n  kind: fast\n", 3, "kind must be one of connections, rate, "
                                                                       "per_connection, suspend, got 'fast'"),
    ("- pattern: ok\n  kind: rate\n  why: no\n", 1, "the keys pattern, kind and (optionally) source"),
    ("pattern: ok\nkind: rate\n", 1, "must be a list"),
    ("- kind: rate\n", 1, "needs a pattern"),
    ("- [unclosed\n", 2, "YAML syntax"),
])
def test_a_bad_throttle_file_is_one_line_naming_the_file_and_the_entry(tmp_path: Path, text, line, message):
    (tmp_path / "mine.yaml").write_text(text)
    with pytest.raises(ConfigError) as e:
        read_patterns(tmp_path / "mine.yaml")
    assert message in str(e.value) and f"mine.yaml:{line}:" in str(e.value)
    assert "\n" not in str(e.value)


def test_a_missing_throttle_file_names_the_config_key_and_its_line(tmp_path: Path):
    (tmp_path / "copiamail.yaml").write_text("fsync: false\nthrottle_replies: nope.yaml\n")
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "copiamail.yaml")
    assert "copiamail.yaml:2:" in str(e.value) and "key 'throttle_replies'" in str(e.value)
    assert "nope.yaml" in str(e.value)
