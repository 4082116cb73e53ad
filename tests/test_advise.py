"""`copiamail advise`, piece by piece: the evidence read from job files, the
counts proposed, where a line goes in the CFG file (no earlier rule may
shadow it, every other byte kept), and the command's text, JSON and errors."""

from __future__ import annotations

import json
import tempfile
from datetime import date
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from spoolkit import SpoolKit

from copiamail.advice import advise, write
from copiamail.advice.evidence import gather, read_job
from copiamail.advice.placing import INSERT, UPDATE, place, place_all, rules_of, write_cfg
from copiamail.config import load_config
from copiamail.jobfile.fsfile import CommandFile, tokenize
from copiamail.jobfile.rules import DomainLimitRule, match, shadowed
from copiamail.spool.queue import Spool

POSTFIX = "421 4.7.0 mx.a.test Error: too many connections from 127.0.0.1"


def copiamail_record(day: str, clock: str, code: int, text: str, node: str = "N1", klass: str = "E") -> str:
    """An attempt record as copiamail writes it (CopiaFacts' fields, then the node)."""
    return f'$attempt_record {day} {clock} 0 0 0 {code} {klass} 0 0 0 E1 0 {clock} - "{text}" {node}'


def copiafacts_record(day: str, clock: str, code: int, klass: str = "E") -> str:
    """An attempt record as CopiaFacts writes it: its fifteen fields, no reply text, no node."""
    return f"$attempt_record {day} {clock} 0 0 0 {code} {klass} 0 0 0 E1 0 {clock} {clock}"


def make_kit(tmp_path: Path, *cfg: str, yaml: str = "") -> SpoolKit:
    tmp_path.mkdir(parents=True, exist_ok=True)
    kit = SpoolKit(tmp_path, None, cfg, yaml)
    for folder in ("SENT", "FAIL"):
        (kit.root / folder).mkdir()
    return kit


def throttled_job(kit: SpoolKit, folder: str, name: str, to: str, *records: str, connections: int | None = None,
                  error: str = POSTFIX) -> Path:
    lines = [*records, f'$var_def EMAIL_ERROR "{error}"']
    if connections is not None:
        lines.append(f"$var_def EMAIL_CONNECTIONS {connections}")
    return kit.job(folder, name, '$email_subject "statement"', *lines, to=to)


def run_advise(kit: SpoolKit, since: date | None = None):
    return advise(load_config(kit.config_path), since)


# --- evidence -------------------------------------------------------------


def test_email_connections_belongs_to_the_jobs_last_throttled_attempt(tmp_path):
    kit = make_kit(tmp_path)
    path = throttled_job(kit, "TOSEND", "J.FS", "u@a.test",
                         copiamail_record("11/20/2026", "10:00:00", 421, POSTFIX),
                         copiamail_record("11/21/2026", "10:00:00", 421, POSTFIX),
                         copiamail_record("11/22/2026", "10:00:00", 451, "451 4.3.0 temporary failure"),
                         connections=5)
    table = load_config(kit.config_path).throttle_table
    found = read_job(path, table)
    assert [(t.when.day, t.connections) for t in found] == [(20, None), (21, 5)]
    assert {t.domain for t in found} == {"a.test"} and {t.node for t in found} == {"N1"}


def test_a_record_without_reply_text_takes_email_error_only_if_it_is_the_last_failed_one(tmp_path):
    kit = make_kit(tmp_path)
    path = throttled_job(kit, "FAIL", "J.FS", "u@a.test",
                         copiafacts_record("11/20/2026", "10:00:00", 421),
                         copiafacts_record("11/21/2026", "10:00:00", 421),
                         error="421 Too many connections")
    [only] = read_job(path, load_config(kit.config_path).throttle_table)
    assert only.when.day == 21 and only.node == "*" and only.text == "421 Too many connections"


def test_attempts_after_the_switch_to_the_alternative_address_are_its_domains(tmp_path):
    kit = make_kit(tmp_path)
    path = kit.job("TOSEND", "J.FS", '$email_subject "x"', "$email_alt_address u@alt.test",
                   copiamail_record("11/20/2026", "10:00:00", 421, POSTFIX),
                   copiamail_record("11/20/2026", "11:00:00", 550, "550 5.1.1 unknown", klass="B"),
                   "$var_def EMAIL_USING_ALT 1",
                   copiamail_record("11/21/2026", "10:00:00", 421, POSTFIX, node='"node 1"'),
                   f'$var_def EMAIL_ERROR "{POSTFIX}"', to="u@main.test")
    found = read_job(path, load_config(kit.config_path).throttle_table)
    # A node field that is no node name (another writer's) gives a line for every node.
    assert [(t.domain, t.node) for t in found] == [("main.test", "N1"), ("alt.test", "*")]


def test_since_keeps_attempts_of_that_day_and_later(tmp_path):
    kit = make_kit(tmp_path, "$domain_limit * @ 8")
    throttled_job(kit, "SENT", "OLD.FS", "u@old.test", copiamail_record("11/20/2026", "23:59:59", 421, POSTFIX), connections=3)
    throttled_job(kit, "SENT", "NEW.FS", "u@new.test", copiamail_record("11/21/2026", "00:00:00", 421, POSTFIX), connections=3)
    assert [p.domain for p, _ in run_advise(kit).items] == ["new.test", "old.test"]
    assert [p.domain for p, _ in run_advise(kit, date(2026, 11, 21)).items] == ["new.test"]
    assert run_advise(kit, date(2026, 11, 22)).items == ()


def test_a_bad_job_file_is_skipped_with_a_warning_naming_it(tmp_path):
    kit = make_kit(tmp_path)
    throttled_job(kit, "TOSEND3", "GOOD.FS", "u@a.test", copiamail_record("11/21/2026", "10:00:00", 421, POSTFIX))
    (kit.root / "FAIL" / "BAD.FS").write_text('$email_address "u@a.test\n')
    (kit.root / "SENT" / "NOADDR.FS").write_text(copiamail_record("11/21/2026", "10:00:00", 421, POSTFIX) + "\n")
    evidence = gather(Spool(kit.root), load_config(kit.config_path).throttle_table)
    assert len(evidence.throttled) == 1 and evidence.files == 3
    assert len(evidence.warnings) == 2
    assert any(str(kit.root / "FAIL" / "BAD.FS") in w and "unterminated quote" in w for w in evidence.warnings)
    assert any(str(kit.root / "SENT" / "NOADDR.FS") in w for w in evidence.warnings)


def test_an_operators_own_pattern_counts_as_a_throttle_reply(tmp_path):
    kit = make_kit(tmp_path, "$domain_limit * @ 4", yaml="throttle_replies: mine.yaml\n")
    (tmp_path / "mine.yaml").write_text('- {pattern: "^451 .*slow down, friend", kind: connections}\n')
    throttled_job(kit, "TOSEND", "J.FS", "u@a.test",
                  copiamail_record("11/21/2026", "10:00:00", 451, "451 4.7.1 slow down, friend"), connections=3)
    [(proposal, _)] = run_advise(kit).items
    assert (proposal.kind.value, proposal.proposed_limit) == ("connections", 2)


# --- proposals ------------------------------------------------------------


def test_a_domain_with_no_throttle_reply_gets_no_line(tmp_path):
    kit = make_kit(tmp_path, "$domain_limit * @ 8")
    throttled_job(kit, "TOSEND", "A.FS", "u@a.test", copiamail_record("11/21/2026", "10:00:00", 421, POSTFIX), connections=3)
    throttled_job(kit, "TOSEND", "B.FS", "u@b.test", copiamail_record("11/21/2026", "10:00:00", 451, "451 4.3.0 try later"),
                  error="451 4.3.0 try later")
    kit.job("SENT", "C.FS", '$email_subject "x"', copiamail_record("11/21/2026", "10:00:00", 0, "250 ok", klass="S"),
            to="u@c.test")
    assert [p.domain for p, _ in run_advise(kit).items] == ["a.test"]


def test_the_count_is_below_the_smallest_throttled_count_of_all_jobs(tmp_path):
    kit = make_kit(tmp_path, "$domain_limit * @ 8")
    for i, n in enumerate([6, 4, 7]):
        throttled_job(kit, "FAIL", f"J{i}.FS", f"u{i}@a.test",
                      copiamail_record("11/21/2026", f"10:0{i}:00", 421, POSTFIX), connections=n)
    [(p, placement)] = run_advise(kit).items
    assert (p.replies, p.connections, p.current_limit, p.proposed_limit) == (3, 4, 8, 3)
    assert p.line == "$domain_limit N1 @a.test 3" and placement is not None and placement.action == INSERT
    assert (p.first.minute, p.last.minute) == (0, 2)


@pytest.mark.parametrize("connections,limit,proposed,line", [
    (1, 8, 1, "$domain_limit N1 @a.test 1"),  # a reply at one connection: 1, never 0
    (2, 8, 1, "$domain_limit N1 @a.test 1"),
    (None, 2, 1, "$domain_limit N1 @a.test 1"),  # no count: one less than the limit
    (None, 1, 1, None),  # already 1: never below, nothing to change
    (9, 4, 8, None),  # the limit in force is already below the evidence
])
def test_never_below_1_and_no_line_when_the_limit_in_force_is_low_enough(tmp_path, connections, limit, proposed, line):
    kit = make_kit(tmp_path, f"$domain_limit * @ {limit}")
    throttled_job(kit, "TOSEND", "J.FS", "u@a.test", copiamail_record("11/21/2026", "10:00:00", 421, POSTFIX),
                  connections=connections)
    [(p, placement)] = run_advise(kit).items
    assert (p.proposed_limit, p.line) == (proposed, line)
    assert (placement is None) == (line is None)


def test_the_limit_in_force_is_the_nodes_own_rule_else_the_per_domain_cap(tmp_path):
    kit = make_kit(tmp_path, "$domain_limit N2 @ 1", "$domain_limit n1 @a. 6", yaml="max_outbound_connections: 12\n")
    throttled_job(kit, "TOSEND", "A.FS", "u@a.test", copiafacts_record("11/21/2026", "10:00:00", 421),
                  error="421 Too many connections")
    throttled_job(kit, "TOSEND", "B.FS", "u@b.test", copiamail_record("11/21/2026", "10:00:00", 421, POSTFIX))
    throttled_job(kit, "TOSEND", "C.FS", "u@a.test", copiamail_record("11/21/2026", "10:00:00", 421, POSTFIX))
    got = {(p.domain, p.node): (p.current_limit, p.proposed_limit) for p, _ in run_advise(kit).items}
    # CopiaFacts' record names no node: the `*` rules alone; none applies to a.test, so the cap of 12.
    assert got == {("a.test", "*"): (12, 11), ("a.test", "N1"): (6, 5), ("b.test", "N1"): (12, 11)}


def test_a_pooled_domain_is_flagged(tmp_path):
    kit = make_kit(tmp_path, yaml='domain:\n  "/^(wanadoo|orange)\\\\.fr$/": {scope_max_outbound_connections: 3}\n')
    throttled_job(kit, "TOSEND", "J.FS", "u@orange.fr", copiamail_record("11/21/2026", "10:00:00", 421, POSTFIX), connections=3)
    [(p, _)] = run_advise(kit).items
    assert p.pooled == "/^(wanadoo|orange)\\.fr$/"


# --- placing --------------------------------------------------------------


def cfg_of(*lines: str, newline: str = "\n") -> CommandFile:
    return CommandFile.parse("".join(line + newline for line in lines).encode(), "FAXFACTS.CFG")


def rule(node: str, text: str, count: int) -> DomainLimitRule:
    return DomainLimitRule(node, text, count)


def test_a_new_rule_goes_before_the_first_rule_that_would_shadow_it():
    cf = cfg_of("; limits", "$domain_limit * @b.test 1", "$domain_limit * @a. 4", "$domain_limit * @ 8")
    new, placement = place(cf, rule("*", "@a.test", 2))
    assert new.lines == ("; limits\n", "$domain_limit * @b.test 1\n", "$domain_limit * @a.test 2\n",
                         "$domain_limit * @a. 4\n", "$domain_limit * @ 8\n")
    assert placement.action == INSERT and placement.anchor is not None and placement.anchor.line == 3


def test_a_node_rule_goes_before_the_domains_own_star_rule_which_stays_live():
    cf = cfg_of("$domain_limit * @a.test 5", "$domain_limit * @ 8")
    new, placement = place(cf, rule("N1", "@a.test", 2))
    rules = tuple(rules_of(new))
    assert [str(r) for r in rules] == ["$domain_limit N1 @a.test 2", "$domain_limit * @a.test 5", "$domain_limit * @ 8"]
    assert shadowed(rules) == [] and placement.action == INSERT


def test_the_same_node_and_text_has_its_count_changed_in_place_and_nothing_else():
    raw = '  $DOMAIN_LIMIT   n1\t"@A.Test"  5   ; set by hand\r\n'
    cf = CommandFile.parse(("$domain_limit * @x.test 3\r\n" + raw + "$domain_limit * @ 8\r\n").encode())
    new, placement = place(cf, rule("N1", "@a.test", 2))
    assert placement.action == UPDATE
    assert new.lines == ("$domain_limit * @x.test 3\r\n", '  $DOMAIN_LIMIT   n1\t"@A.Test"  2   ; set by hand\r\n',
                         "$domain_limit * @ 8\r\n")


def test_a_rule_written_without_a_count_gets_one():
    new, placement = place(cfg_of("$domain_limit N1 @a.test ; one", "$domain_limit * @ 8"), rule("N1", "@a.test", 1))
    assert placement.action == UPDATE and new.lines[0] == "$domain_limit N1 @a.test 1 ; one\n"


def test_unshadowed_goes_after_the_last_rule_else_at_the_end():
    cf = cfg_of("$domain_limit * @b.test 2", "$domain_limit * @a.test.example 3", '$email_retry_delays * "1H"')
    new, placement = place(cf, rule("*", "@a.test", 2))
    # Before the @a.test.example rule it would shadow that one: so after it.
    assert new.lines[2] == "$domain_limit * @a.test 2\n" and placement.anchor is None
    assert shadowed(tuple(rules_of(new))) == []
    bare = CommandFile.parse(b'$email_retry_delays * "1H"')  # no rule, no final line ending
    new, _ = place(bare, rule("*", "@a.test", 2))
    assert new.to_bytes() == b'$email_retry_delays * "1H"\n$domain_limit * @a.test 2\n'


def test_a_crlf_file_stays_crlf_and_keeps_its_bom():
    data = b"\xef\xbb\xbf; limits\r\n$domain_limit * @ 8\r\n$email_retry_max 3\r\n"
    new, _ = place_all(CommandFile.parse(data), [rule("N1", "@a.test", 2), rule("*", "@a.test", 3)])
    assert new.to_bytes() == (b"\xef\xbb\xbf; limits\r\n$domain_limit N1 @a.test 2\r\n$domain_limit * @a.test 3\r\n"
                              b"$domain_limit * @ 8\r\n$email_retry_max 3\r\n")


def test_the_star_rule_placed_first_still_lets_the_node_rule_go_before_it():
    new, _ = place_all(cfg_of("$domain_limit * @ 8"), [rule("*", "@a.test", 3), rule("N1", "@a.test", 2)])
    assert [str(r) for r in rules_of(new)] == ["$domain_limit N1 @a.test 2", "$domain_limit * @a.test 3", "$domain_limit * @ 8"]


TEXTS = ["@", "@a", "@a.", "@a.test", "@b.test", "a.test", ".test", "test", "x", "@a.testing", "bob@a.test"]
NODES = ["*", "N1", "n1", "N2"]
ENDINGS = ["\n", "\r\n"]


@st.composite
def cfg_files(draw) -> bytes:
    ending = draw(st.sampled_from(ENDINGS))
    lines = []
    for _ in range(draw(st.integers(0, 7))):
        kind = draw(st.sampled_from(["rule", "rule", "rule", "comment", "other", "blank"]))
        if kind == "rule":
            count = draw(st.one_of(st.just(""), st.integers(1, 9).map(lambda n: f" {n}")))
            lines.append(f"{draw(st.sampled_from(['', '  ']))}$domain_limit {draw(st.sampled_from(NODES))} "
                         f"{draw(st.sampled_from(TEXTS))}{count}")
        elif kind == "comment":
            lines.append("; kept as written")
        elif kind == "other":
            lines.append('$email_retry_delays * "5 20"')
        else:
            lines.append("")
    text = ending.join(lines) + (ending if draw(st.booleans()) else "")
    return (b"\xef\xbb\xbf" if draw(st.booleans()) else b"") + text.encode()


proposals = st.tuples(st.sampled_from(["*", "N1", "N2"]), st.sampled_from(["a.test", "b.test", "a.testing"]),
                      st.integers(1, 9))


@settings(max_examples=300, deadline=None)
@given(cfg_files(), proposals)
def test_a_placed_rule_applies_shadows_nothing_new_and_keeps_every_other_byte(data, proposal):
    node, domain, count = proposal
    old = CommandFile.parse(data)
    new, placement = place(old, rule(node, f"@{domain}", count))
    rules = tuple(rules_of(new))
    # It applies to its domain on its node, and check-config finds nothing new to warn of.
    applied = match(rules, node, f"u@{domain}")
    assert applied is not None and applied.count == count
    assert (applied.rule.node.lower(), applied.rule.text.lower()) == (node.lower(), f"@{domain}")
    assert len(shadowed(rules)) == len(shadowed(tuple(rules_of(old))))
    # Every other line kept byte for byte.
    assert new.bom == old.bom and CommandFile.parse(new.to_bytes()).lines == new.lines
    if placement.action == UPDATE:
        assert len(new.lines) == len(old.lines)
        changed = [i for i, (a, b) in enumerate(zip(old.lines, new.lines, strict=True)) if a != b]
        assert len(changed) <= 1
        for i in changed:
            before, after = tokenize(old.lines[i].rstrip("\r\n")), tokenize(new.lines[i].rstrip("\r\n"))
            assert before[:3] == after[:3] and after[3] == str(count)
            assert old.lines[i][len(old.lines[i].rstrip("\r\n")):] == new.lines[i][len(new.lines[i].rstrip("\r\n")):]
    else:
        def same(i: int) -> bool:
            return i < len(old.lines) and new.lines[i].rstrip("\r\n") == old.lines[i].rstrip("\r\n")

        inserted = next(i for i in range(len(new.lines)) if not same(i))
        assert new.lines[inserted].rstrip("\r\n") == str(placement.rule)
        kept = new.lines[:inserted] + new.lines[inserted + 1:]
        assert len(kept) == len(old.lines) and kept[:-1] == old.lines[:-1]
        if old.lines:  # the last line is kept too; it may have got a line ending
            assert kept[-1] == old.lines[-1] or (not old.lines[-1].endswith("\n") and kept[-1].startswith(old.lines[-1]))
        if old.lines and all(line.endswith("\r\n") for line in old.lines):
            assert new.lines[inserted].endswith("\r\n")


@settings(max_examples=60, deadline=None)
@given(cfg_files(), st.lists(proposals, min_size=1, max_size=4, unique_by=lambda p: (p[0], p[1])))
def test_write_then_read_back_keeps_every_old_line(data, many):
    with tempfile.TemporaryDirectory() as folder:
        base = Path(folder)
        (base / "FAXFACTS.CFG").write_bytes(data)
        (base / "copiamail.yaml").write_text("spool: ./spool\ncfg: ./FAXFACTS.CFG\n")
        (base / "spool").mkdir()
        config = load_config(base / "copiamail.yaml")
        old = CommandFile.parse(data)
        new, placements = place_all(old, [rule(node, f"@{domain}", count) for node, domain, count in many])
        write_cfg(config.cfg_path, new)
        again = load_config(base / "copiamail.yaml")  # reads as a CFG, as check-config does
        back = CommandFile.read(base / "FAXFACTS.CFG")
        assert back.to_bytes() == new.to_bytes()
        assert len(shadowed(again.rules.domain_limits)) == len(shadowed(tuple(rules_of(old))))
        if not any(p.action == UPDATE for p in placements):
            remaining = [line.rstrip("\r\n") for line in back.lines
                         if line.rstrip("\r\n") not in {str(p.rule) for p in placements}]
            assert remaining == [line.rstrip("\r\n") for line in old.lines
                                 if line.rstrip("\r\n") not in {str(p.rule) for p in placements}]


# --- the command ----------------------------------------------------------


def test_json_lists_every_field_and_write_inserts_the_lines(tmp_path):
    kit = make_kit(tmp_path)
    kit.cfg_path.write_bytes(b"; ours\r\n$domain_limit * @ 8\r\n")
    throttled_job(kit, "TOSEND", "J.FS", "u@a.test", copiamail_record("11/21/2026", "10:00:00", 421, POSTFIX), connections=3)
    result = kit.cli("advise", "--format", "json")
    assert result.returncode == 0, result.stderr
    [item] = json.loads(result.stdout)
    assert {k: item[k] for k in ("domain", "kind", "replies", "connections", "current_limit", "proposed_limit", "line",
                                 "example", "node", "action", "written")} == {
        "domain": "a.test", "kind": "connections", "replies": 1, "connections": 3, "current_limit": 8,
        "proposed_limit": 2, "line": "$domain_limit N1 @a.test 2", "example": POSTFIX, "node": "N1",
        "action": "insert", "written": False}
    assert item["first"] == item["last"] == "2026-11-21 10:00:00"
    assert kit.cfg_path.read_bytes() == b"; ours\r\n$domain_limit * @ 8\r\n"  # without --write: untouched
    result = kit.cli("advise", "--write")
    assert result.returncode == 0 and "wrote 1 line(s)" in result.stdout, result.stderr
    assert kit.cfg_path.read_bytes() == b"; ours\r\n$domain_limit N1 @a.test 2\r\n$domain_limit * @ 8\r\n"
    check = kit.cli("check-config")
    assert check.returncode == 0 and "warning" not in check.stdout + check.stderr
    again = kit.cli("advise", "--write", "--format", "json")  # nothing new to write
    assert json.loads(again.stdout)[0]["line"] is None
    assert kit.cfg_path.read_bytes() == b"; ours\r\n$domain_limit N1 @a.test 2\r\n$domain_limit * @ 8\r\n"


def test_copiafacts_files_without_email_connections_get_one_less_than_the_limit(tmp_path):
    # As CopiaFacts leaves them: its own attempt records (no reply text, no
    # node), the reply in EMAIL_ERROR, no EMAIL_CONNECTIONS; jobs in all three places.
    kit = make_kit(tmp_path, "; CopiaFacts limits", "$domain_limit * @copia.com 4", "$domain_limit * @ 6")
    exchange = "421 4.3.2 The maximum number of concurrent connections has exceeded a limit, closing transmission channel"
    throttled_job(kit, "SENT", "00000001.FS", "jane@copia.com", copiafacts_record("11/20/2026", "09:00:00", 421),
                  copiafacts_record("11/20/2026", "09:05:00", 0, "S"), error=exchange)
    throttled_job(kit, "FAIL", "00000002.FS", "joe@copia.com", copiafacts_record("11/20/2026", "09:01:00", 421),
                  error=exchange)
    throttled_job(kit, "TOSEND2", "00000003.FS", "ann@orange.fr", copiafacts_record("11/21/2026", "08:00:00", 421),
                  error="421 mwinf5c42 ME Trop de connexions, veuillez verifier votre configuration.")
    kit.job("FAIL", "00000004.FS", '$email_subject "x"', copiafacts_record("11/21/2026", "08:00:00", 550, "B"),
            '$var_def EMAIL_ERROR "550 5.1.1 unknown user"', to="bob@example.org")
    result = kit.cli("advise", "--format", "json")
    assert result.returncode == 0, result.stderr
    got = {i["domain"]: (i["node"], i["connections"], i["current_limit"], i["proposed_limit"], i["line"])
           for i in json.loads(result.stdout)}
    assert got == {"copia.com": ("*", None, 4, 3, "$domain_limit * @copia.com 3"),
                   "orange.fr": ("*", None, 6, 5, "$domain_limit * @orange.fr 5")}
    old = kit.cfg_path.read_bytes()
    assert kit.cli("advise", "--write").returncode == 0
    # copia.com had its own rule: its count changed in place; the rest kept.
    assert kit.cfg_path.read_bytes() == old.replace(b"@copia.com 4", b"@copia.com 3").replace(
        b"$domain_limit * @ 6", b"$domain_limit * @orange.fr 5\n$domain_limit * @ 6")
    check = kit.cli("check-config")
    assert check.returncode == 0 and "warning" not in check.stdout + check.stderr


def test_text_output_names_the_evidence(tmp_path):
    kit = make_kit(tmp_path, "$domain_limit * @ 8")
    throttled_job(kit, "TOSEND", "J.FS", "u@a.test", copiamail_record("11/21/2026", "10:00:00", 421, POSTFIX), connections=3)
    out = kit.cli("advise").stdout
    assert "a.test (node N1): 1 throttle reply (connections: 1) between 2026-11-21 10:00:00 and 2026-11-21 10:00:00" in out
    assert f"example: {POSTFIX}" in out and "propose: $domain_limit N1 @a.test 2" in out
    empty = make_kit(tmp_path / "empty")
    assert "nothing to propose" in empty.cli("advise").stdout


def one_line_error(result) -> str:
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    [line] = result.stderr.strip().splitlines()
    return line


def test_user_errors_are_one_line_naming_the_file(tmp_path):
    kit = make_kit(tmp_path, "$domain_limit * @ 8")
    assert str(tmp_path / "nope") in one_line_error(kit.cli("advise", "--spool", str(tmp_path / "nope")))
    assert "--since" in one_line_error(kit.cli("advise", "--since", "21/11/2026"))
    throttled_job(kit, "TOSEND", "J.FS", "u@a.test", copiamail_record("11/21/2026", "10:00:00", 421, POSTFIX), connections=3)
    kit.cfg_path.unlink()
    kit.cfg_path.mkdir()  # a CFG that cannot be read, even by root
    line = one_line_error(kit.cli("advise"))
    assert str(kit.cfg_path) in line and "cannot read" in line


def test_write_without_a_cfg_file_is_one_line(tmp_path):
    kit = make_kit(tmp_path)
    kit.config_path.write_text(kit.config_path.read_text().replace("cfg: ./FAXFACTS.CFG\n", ""))
    throttled_job(kit, "TOSEND", "J.FS", "u@a.test", copiamail_record("11/21/2026", "10:00:00", 421, POSTFIX), connections=3)
    line = one_line_error(kit.cli("advise", "--write"))
    assert "cfg:" in line and str(kit.config_path) in line


def test_a_bad_job_file_is_a_warning_on_stderr_and_the_rest_is_advised(tmp_path):
    kit = make_kit(tmp_path, "$domain_limit * @ 8")
    throttled_job(kit, "TOSEND", "J.FS", "u@a.test", copiamail_record("11/21/2026", "10:00:00", 421, POSTFIX), connections=3)
    (kit.root / "FAIL" / "BAD.FS").write_bytes(b"$email_address u@a.test\n\x00\x01binary\n")
    result = kit.cli("advise", "--format", "json")
    assert result.returncode == 0 and "Traceback" not in result.stderr
    assert [i["domain"] for i in json.loads(result.stdout)] == ["a.test"]
    [warning] = result.stderr.strip().splitlines()
    assert warning.startswith("copiamail: warning: ") and str(kit.root / "FAIL" / "BAD.FS") in warning


def test_the_library_write_returns_how_many_lines(tmp_path):
    kit = make_kit(tmp_path, "$domain_limit * @ 8")
    throttled_job(kit, "TOSEND", "J.FS", "u@a.test", copiamail_record("11/21/2026", "10:00:00", 421, POSTFIX), connections=3)
    config = load_config(kit.config_path)
    assert write(config, advise(config)) == 1
    assert write(load_config(kit.config_path), advise(load_config(kit.config_path))) == 0
