"""copiamail.variables: CopiaFacts `NAME expansion."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from copiamail.jobfile.variables import UndefinedVariable, chained, expand, expand_path

VALUES = {"NAME": "Jane", "CITY": "Amsterdam", "GREETING": "^Dear `NAME", "DEEP": "^`GREETING", "FFJOBS": "C:\\Copia\\Jobs"}
LOOKUP = chained(VALUES)


@pytest.mark.parametrize("text, expanded", [
    ("Hi `NAME", "Hi Jane"),
    ("Hi `name, from `City", "Hi Jane, from Amsterdam"),
    ("`CITY{3}!", "Ams!"),
    ("[`NAME{6+}]", "[Jane  ]"),
    ("[`CITY{4+}]", "[Amst]"),
    ('say `"hello`"', 'say "hello"'),
    ("a lone ` stays", "a lone ` stays"),
    ("`GREETING,", "Dear Jane,"),
    ("no accent at all", "no accent at all"),
])
def test_references_are_replaced_by_their_values(text, expanded):
    assert expand(text, LOOKUP) == expanded


def test_a_caret_value_is_expanded_once_only():
    assert expand("`DEEP", LOOKUP) == "^Dear `NAME"


def test_an_undefined_variable_raises_naming_it():
    with pytest.raises(UndefinedVariable) as e:
        expand("Hi `NOBODY", LOOKUP)
    assert e.value.name == "NOBODY" and "`NOBODY" in str(e.value)


def test_the_first_source_that_defines_a_name_wins():
    lookup = chained({"A": "fs"}, {"A": "cfg", "B": "cfg"}, {"B": "yaml", "C": "yaml"})
    assert expand("`A `B `C", lookup) == "fs cfg yaml"


def test_a_path_variable_at_the_start_of_a_path_expands_without_the_accent():
    assert expand_path("FFJOBS\\0001\\a.pdf", LOOKUP) == "C:\\Copia\\Jobs\\0001\\a.pdf"
    assert expand_path("`FFJOBS\\0001\\a.pdf", LOOKUP) == "C:\\Copia\\Jobs\\0001\\a.pdf"
    assert expand_path("FFJOBSX\\a.pdf", LOOKUP) == "FFJOBSX\\a.pdf"


@given(st.text(alphabet=st.characters(blacklist_characters="`")))
def test_text_without_a_grave_accent_is_unchanged(text):
    assert expand(text, LOOKUP) == text
