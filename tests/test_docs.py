"""The user documentation (README.md, CHANGELOG.md, docs/*.md) against the repository.

- README.md is the front door: at most 12,000 bytes;
- every markdown link stays inside the repository and points at a file (and a
  heading) that exists; no page names a web address;
- the README's quick start is what .ci/run runs;
- every top-level key copiamail.yaml accepts is in docs/configuration.md;
- the FS job, CFG and YAML the README quotes are the files in samples/, byte for byte;
- no page cites the internal spec's sections or issue numbers.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def top_level_config_keys() -> set[str]:
    """Every top-level key copiamail.yaml accepts (the one place the test asks the code)."""
    from copiamail.config import _TOP_KEYS

    return set(_TOP_KEYS)


README = REPO / "README.md"
README_MAX_BYTES = 12_000
PAGES = [README, REPO / "CHANGELOG.md", *sorted((REPO / "docs").glob("*.md"))]

# The quick start: one command installs and runs the demo on the shipped
# samples, one runs the whole suite. Users copy them; they do not change.
QUICK_START = [
    "python3 -m pip install -e '.[test]' && python3 -m copiamail demo",
    "python3 -m pytest",
]

# The samples the README quotes whole.
QUOTED_SAMPLES = [
    "samples/spool/TOSEND2/00012345.FS",  # an FS job
    "samples/FAXFACTS.CFG",  # a CFG
    "samples/copiamail.yaml",  # a YAML configuration
]

_FENCE = re.compile(r"^(```|~~~)")
# A code span may run over lines, never over a blank line (the paragraph ends).
_CODE_SPAN = re.compile(r"(?<!`)(`+)(?!`)((?:(?!\n[ \t]*\n).)+?)(?<!`)\1(?!`)", re.S)
_INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE_DEFINITION = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")


def without_fences(text: str) -> str:
    """``text`` without its fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return "\n".join(lines)


def prose(text: str) -> str:
    """``text`` without fenced code blocks and code spans: what is read as markdown."""
    return _CODE_SPAN.sub("", without_fences(text))


def links(text: str) -> list[str]:
    body = prose(text)
    return _INLINE_LINK.findall(body) + _REFERENCE_DEFINITION.findall(body)


def slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it."""
    text = _CODE_SPAN.sub(lambda m: m.group(2), heading).strip().lower()
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link keeps its text
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    out: set[str] = set()
    seen: dict[str, int] = {}
    for line in without_fences(page.read_text(encoding="utf-8")).splitlines():
        m = _HEADING.match(line)
        if m is None:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def page_id(page: Path) -> str:
    return str(page.relative_to(REPO))


def test_the_readme_is_at_most_12000_bytes():
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes; move detail into docs/"


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_link_stays_in_the_repository_and_its_target_exists(page):
    root = REPO.resolve()
    problems = []
    for target in links(page.read_text(encoding="utf-8")):
        if not target:
            problems.append("an empty link")
            continue
        if _SCHEME.match(target) or target.startswith("//"):
            problems.append(f"{target}: outside the repository")
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page.resolve()
        if not resolved.is_relative_to(root):
            problems.append(f"{target}: outside the repository")
        elif not resolved.exists():
            problems.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            problems.append(f"{target}: no heading #{anchor} in {resolved.relative_to(root)}")
    assert problems == []


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_no_page_names_a_web_address(page):
    assert re.findall(r"\b(?:https?|ftp)://\S+", prose(page.read_text(encoding="utf-8"))) == []


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_no_page_cites_spec_sections_or_issue_numbers(page):
    text = page.read_text(encoding="utf-8")
    assert re.findall(r"\bSPEC\s*\d+", text) == []
    assert re.findall(r"\bissues?\s*#?\d+", text, re.IGNORECASE) == []
    assert "shared/SPEC" not in text and "SPEC.md" not in text


def quick_start_commands() -> list[str]:
    section = README.read_text(encoding="utf-8").split("## Quick start", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block is not None, "the quick start has no ```sh block"
    return [line.strip() for line in block.group(1).splitlines() if line.strip()]


def test_the_quick_start_is_the_two_commands_users_copy():
    assert quick_start_commands() == QUICK_START


def test_the_quick_start_runs_what_ci_runs():
    def plain(command: str) -> str:
        return " ".join(word for word in command.split() if word != "-q")  # CI's pip is quiet

    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
          if line.strip().startswith("python3 -m ")]
    install_and_demo, test = quick_start_commands()
    install, demo = (part.strip() for part in install_and_demo.split("&&"))
    assert plain(install) in [plain(c) for c in ci]
    assert demo == "python3 -m copiamail demo"
    assert test in ci


def test_every_top_level_config_key_is_in_the_configuration_reference():
    page = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    missing = sorted(k for k in top_level_config_keys() if f"| `{k}` |" not in page)
    assert missing == [], "keys copiamail.yaml accepts that docs/configuration.md does not list"


@pytest.mark.parametrize("sample", QUOTED_SAMPLES)
def test_the_readme_quotes_the_sample_byte_for_byte(sample):
    text = README.read_text(encoding="utf-8")
    m = re.search(rf"`{re.escape(sample)}`:?\s*\n\s*\n```[^\n]*\n(.*?)^```", text, re.S | re.M)
    assert m is not None, f"README.md names `{sample}` and quotes it in the code block after it"
    assert m.group(1).encode("utf-8") == (REPO / sample).read_bytes()


def test_the_systemd_units_in_samples_start_commands_copiamail_accepts():
    import configparser
    import shlex
    import subprocess
    import sys

    units = sorted((REPO / "samples" / "systemd").glob("*.service"))
    assert [u.name for u in units] == ["copiamail-node@.service", "copiamail-web.service"]
    for unit in units:
        parser = configparser.ConfigParser(interpolation=None, strict=False)
        parser.read_string(unit.read_text(encoding="utf-8"))
        argv = shlex.split(parser["Service"]["ExecStart"].replace("%i", "N1"))
        assert argv[0].endswith("/copiamail")
        result = subprocess.run([sys.executable, "-m", "copiamail", *argv[1:], "--help"], capture_output=True,
                                text=True, timeout=60, cwd=REPO)
        assert result.returncode == 0, (unit.name, result.stderr)
