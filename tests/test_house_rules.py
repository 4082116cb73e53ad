"""The house's size rules, kept by a test so that they keep holding: no module
over 600 lines, no class over 450, no function over 100; the scheduler's
``__init__`` sets at most 15 attributes; no product module cites an issue
number or a section of an outside document."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "copiamail"
MODULES = sorted(PACKAGE.rglob("*.py"))


def _name(path: Path) -> str:
    return str(path.relative_to(PACKAGE.parent))


def _defs(tree: ast.AST) -> list[ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)]


def _lines(node: ast.AST) -> int:
    return node.end_lineno - node.lineno + 1  # type: ignore[attr-defined,operator]


@pytest.mark.parametrize("path", MODULES, ids=_name)
def test_no_module_is_over_600_lines(path: Path) -> None:
    assert len(path.read_text().splitlines()) <= 600


@pytest.mark.parametrize("path", MODULES, ids=_name)
def test_no_class_is_over_450_lines_and_no_function_over_100(path: Path) -> None:
    too_long = []
    for node in _defs(ast.parse(path.read_text())):
        limit = 450 if isinstance(node, ast.ClassDef) else 100
        if _lines(node) > limit:
            too_long.append(f"{node.name}: {_lines(node)} lines (at most {limit})")
    assert too_long == []


def test_the_schedulers_init_sets_at_most_15_attributes() -> None:
    tree = ast.parse((PACKAGE / "scheduling" / "scheduler.py").read_text())
    [scheduler] = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Scheduler"]
    [init] = [n for n in scheduler.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"]
    attributes = {
        target.attr
        for node in ast.walk(init)
        for target in (node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)])
        if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self"
    }
    assert len(attributes) <= 15, sorted(attributes)


_CITATION = re.compile(r"\b(?:SPEC|issue)s?\s+§?\d+", re.IGNORECASE)


@pytest.mark.parametrize("path", [*MODULES, PACKAGE.parent / "setup.cfg", PACKAGE.parent / "README.md"], ids=_name)
def test_no_product_file_cites_an_issue_or_a_spec_section(path: Path) -> None:
    cited = [line.strip() for line in path.read_text().splitlines() if _CITATION.search(line)]
    assert cited == []
