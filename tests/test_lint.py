"""ruff on the code, and the Chinese prose rules (spacing between CJK and Latin, full-width punctuation)."""

import shutil
import subprocess
from pathlib import Path

import autocorrect_py
import pytest

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "book").glob("*.md"))


def test_ruff_clean():
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.fail("ruff is not installed (it is in requirements.txt)")
    res = subprocess.run([ruff, "check", "code", "tests", "tools", "bench", "_ext"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_chinese_prose(path):
    result = autocorrect_py.lint_for(path.read_text(encoding="utf-8"), path.name)
    problems = [f"{path.name}:{r.line}:{r.col}: {r.old!r} -> {r.new!r}" for r in result.lines]
    assert not problems, "autocorrect finds:\n" + "\n".join(problems)


def test_prose_linter_catches_mistakes():
    bad = "这是test文本,它有123个字。\n"
    assert len(autocorrect_py.lint_for(bad, "x.md").lines) == 1


def test_workflows_match_the_github_schema():
    checker = shutil.which("check-jsonschema")
    if checker is None:
        pytest.fail("check-jsonschema is not installed (it is in requirements.txt)")
    workflows = sorted(str(p) for p in (ROOT / ".github" / "workflows").glob("*.yml"))
    assert len(workflows) >= 2
    res = subprocess.run([checker, "--builtin-schema", "vendor.github-workflows", *workflows], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_workflows_are_locked_down():
    import yaml

    for path in (ROOT / ".github" / "workflows").glob("*.yml"):
        text = path.read_text()
        flow = yaml.safe_load(text)
        assert "permissions" in flow, f"{path.name}: no top-level permissions"
        uses = [line.split("uses:")[1].split("#")[0].strip() for line in text.splitlines() if "uses:" in line]
        assert all("@" in u and len(u.split("@")[1]) == 40 for u in uses), f"{path.name}: unpinned actions {uses}"
        assert "secrets." not in text, f"{path.name}: no secrets are needed"
    gpu = yaml.safe_load((ROOT / ".github" / "workflows" / "gpu-book.yml").read_text())
    triggers = gpu[True] if True in gpu else gpu["on"]  # YAML 1.1 reads the key "on" as True
    assert "pull_request" not in triggers and "pull_request_target" not in triggers


# --- the book's own conventions (issue 20) -------------------------------------------------------
import re  # noqa: E402

_CODE = re.compile(r"^(`{3,}|:{3,})[^\n]*\n.*?^\1\s*$|`[^`\n]+`", re.M | re.S)
LITERAL_CHAPTER = re.compile(r"第\s*[0-9０-９一二三四五六七八九十]+\s*(?:[–—~-]\s*[0-9]+\s*)?章")
ASCII_QUOTE_NEAR_CJK = re.compile(r'[\u4e00-\u9fff，。：；、！？（）]"|"[\u4e00-\u9fff，。：；、！？（）]')


def prose(text: str) -> str:
    """A chapter without its code: fenced blocks and directives' bodies, and inline code."""
    return _CODE.sub("", text)


def conventions(text: str) -> list[str]:
    problems = []
    for match in LITERAL_CHAPTER.finditer(text):
        problems.append(f"literal chapter number {match.group(0)!r}: use {{numref}}`ch-...` (the course unit is 第 9 讲)")
    for line in prose(text).splitlines():
        if ASCII_QUOTE_NEAR_CJK.search(line):
            problems.append(f"ASCII quote in Chinese prose (write “ ”): {line.strip()[:60]!r}")
        if "源材料" in line:
            problems.append(f"'源材料' means nothing to a reader (say 常见说法): {line.strip()[:60]!r}")
    return problems


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_book_conventions(path):
    """No literal "第 N 章" anywhere in a chapter (the PDF and the site number chapters themselves), no
    ASCII quotes beside Chinese (smartquotes turns them into two right quotes), no "源材料"."""
    problems = conventions(path.read_text(encoding="utf-8"))
    assert not problems, f"{path.name}:\n" + "\n".join(problems)


def test_conventions_linter_catches_mistakes():
    assert len(conventions('见第 3 章和第 1–7 章。\n这是"讲故事模型"。\n正如源材料所说。\n')) == 4
    assert conventions('见{numref}`ch-amp`。\n```python\nprint("第 3 章")\n```\n这是“讲故事模型”，`x = "a"`。\n') == [
        "literal chapter number '第 3 章': use {numref}`ch-...` (the course unit is 第 9 讲)"]


FIGURE_NAME = re.compile(r"^\s*name: (fig-[\w-]+)\s*$", re.M)


def test_every_figure_is_referenced_from_the_text():
    """Issue 20: a figure carries a number and a caption (myst-nb figure metadata) and the prose points
    at it with {numref}; a figure nobody refers to is one the reader may never look at."""
    text = "\n".join(p.read_text(encoding="utf-8") for p in CHAPTERS)
    names = FIGURE_NAME.findall(text)
    assert len(names) == len(set(names)), f"figure names used twice: {sorted({n for n in names if names.count(n) > 1})}"
    unreferenced = [n for n in names if f"{{numref}}`{n}`" not in text]
    assert not unreferenced, f"figures never referenced with {{numref}}: {unreferenced}"
