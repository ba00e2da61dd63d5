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
