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
    res = subprocess.run([ruff, "check", "code", "tests"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_chinese_prose(path):
    result = autocorrect_py.lint_for(path.read_text(encoding="utf-8"), path.name)
    problems = [f"{path.name}:{r.line}:{r.col}: {r.old!r} -> {r.new!r}" for r in result.lines]
    assert not problems, "autocorrect finds:\n" + "\n".join(problems)


def test_prose_linter_catches_mistakes():
    bad = "这是test文本,它有123个字。\n"
    assert len(autocorrect_py.lint_for(bad, "x.md").lines) == 1
