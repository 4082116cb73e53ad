"""$domain_limit rules: SPEC 3, every row of its table and every rule."""

from pathlib import Path

import pytest

from copiamail.errors import ConfigError
from copiamail.jobfile.fsfile import CommandFile
from copiamail.jobfile.rules import DomainLimitRule, match, parse_rule, shadowed


def rules_from(*lines: str) -> tuple[DomainLimitRule, ...]:
    cf = CommandFile.parse(("\n".join(lines) + "\n").encode(), "FAXFACTS.CFG")
    return tuple(parse_rule(c, cf.path) for c in cf.commands())


# SPEC 3's table, row by row: (rules in order, node, address, limited domain, count)
SPEC_TABLE = [
    (["$domain_limit * @copia.com 2"], "N1", "a@copia.com", "copia.com", 2),
    (["$domain_limit * @copia. 2"], "N1", "a@copia.net", "copia.net", 2),
    (["$domain_limit * @ 3"], "N1", "x@any.org", "any.org", 3),
    (["$domain_limit * @copia.com 1", "$domain_limit * @ 3"], "N1", "a@copia.com", "copia.com", 1),
    (["$domain_limit N2 @copia.com 1"], "N1", "a@copia.com", None, None),
    (["$domain_limit * copia 2"], "N1", "copia@gmail.com", "gmail.com", 2),
    (["$domain_limit * @copia.com"], "N1", "a@sub.copia.com", None, None),
    (["$domain_limit * @COPIA.COM"], "N1", "A@Copia.Com", "copia.com", 1),
]


@pytest.mark.parametrize("lines,node,address,domain,count", SPEC_TABLE)
def test_spec_table_row_gives_the_limited_domain_and_count(lines, node, address, domain, count):
    result = match(rules_from(*lines), node, address)
    if domain is None:
        assert result is None
    else:
        assert result is not None
        assert (result.domain, result.count) == (domain, count)


def test_substring_rule_gives_each_matching_domain_its_own_limit():
    rules = rules_from("$domain_limit * @copia. 2")
    com = match(rules, "N1", "a@copia.com")
    net = match(rules, "N1", "b@copia.net")
    assert com.domain == "copia.com" and net.domain == "copia.net"
    assert com.rule is net.rule


def test_first_matching_rule_applies_and_later_rules_are_not_consulted():
    rules = rules_from("$domain_limit * @ 3", "$domain_limit * @copia.com 1")
    assert match(rules, "N1", "a@copia.com").count == 3


def test_rule_for_another_node_is_skipped_and_the_next_rule_applies():
    rules = rules_from("$domain_limit N2 @copia.com 1", "$domain_limit * @ 5")
    assert match(rules, "N1", "a@copia.com").count == 5
    assert match(rules, "N2", "a@copia.com").count == 1


def test_node_name_matches_case_insensitively():
    rules = rules_from("$domain_limit n1 @copia.com 4")
    assert match(rules, "N1", "a@copia.com").count == 4


def test_domain_is_taken_after_the_last_at_sign_and_lower_cased():
    rules = rules_from("$domain_limit * @ 2")
    assert match(rules, "N1", '"a@b"@Example.ORG').domain == "example.org"


def test_count_defaults_to_one():
    assert rules_from("$domain_limit * @copia.com")[0].count == 1


@pytest.mark.parametrize("bad", ["0", "-1", "x", "1.5"])
def test_count_must_be_a_positive_integer_and_the_error_names_file_and_line(bad):
    with pytest.raises(ConfigError) as e:
        rules_from("; comment", f"$domain_limit * @copia.com {bad}")
    assert "FAXFACTS.CFG:2" in str(e.value)
    assert "positive integer" in str(e.value)


def test_missing_domain_text_is_an_error_naming_the_line():
    with pytest.raises(ConfigError) as e:
        rules_from("$domain_limit *")
    assert "FAXFACTS.CFG:1" in str(e.value)


def test_rule_remembers_its_file_and_line_for_explain():
    rule = rules_from("", "$domain_limit * @copia.com 2")[0]
    assert rule.where() == f"{Path('FAXFACTS.CFG')}:2"


def test_shadowed_finds_a_rule_that_an_earlier_broader_rule_always_wins():
    rules = rules_from("$domain_limit * @ 3", "$domain_limit * @copia.com 1")
    [(rule, earlier)] = shadowed(rules)
    assert rule.text == "@copia.com" and earlier.text == "@"


def test_shadowed_ignores_an_earlier_rule_for_another_node_only():
    rules = rules_from("$domain_limit N2 @ 3", "$domain_limit * @copia.com 1")
    assert shadowed(rules) == []


def test_shadowed_ignores_a_narrower_earlier_rule():
    rules = rules_from("$domain_limit * @copia.com 1", "$domain_limit * @ 3")
    assert shadowed(rules) == []
