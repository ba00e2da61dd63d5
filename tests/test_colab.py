"""The Colab notebooks: generated from the chapters, each with its setup cell, and each running top to
bottom in a fresh environment that has only Colab's base and what the setup cell installs."""

import json
import sys

import nbformat
import pytest
from conftest import COLAB_WORK, ROOT

sys.path.insert(0, str(ROOT / "tools"))
import colab_notebooks  # noqa: E402

pytestmark = pytest.mark.book


def test_one_notebook_per_chapter_with_a_setup_cell(tmp_path):
    local = colab_notebooks.main(["--out", str(tmp_path / "local"), "--source", str(ROOT / "code")])
    remote = colab_notebooks.main(["--out", str(tmp_path / "remote"), "--ref", "v1.2.3"])
    chapters = colab_notebooks.chapters()
    assert len(local) == len(chapters) >= 9 and "book/07_debugging" in chapters and "book/intro" not in chapters
    for a, b in zip(local, remote):
        nb_a, nb_b = nbformat.read(a, 4), nbformat.read(b, 4)
        setup_a, setup_b = nb_a.cells[0].source.splitlines(), nb_b.cells[0].source.splitlines()
        differing = [(x, y) for x, y in zip(setup_a, setup_b) if x != y]
        assert differing == [(f"MIXPREC_SOURCE = {str(ROOT / 'code')!r}",
                              "MIXPREC_SOURCE = 'git+https://github.com/mixprec/mixprec-book@v1.2.3#subdirectory=code'")]
        assert "torch" not in " ".join(line for line in setup_a if "pip" in line and "install" in line)  # never reinstalls torch
        assert "fonts-noto-cjk" in nb_a.cells[0].source
        assert nb_a.metadata["accelerator"] == "GPU" and "colab" in nb_a.metadata
        text = "\n".join(c.source for c in nb_a.cells)
        assert "{literalinclude}" not in text and ":::{admonition}" not in text and "{exercise}" not in text
        nbformat.validate(nb_a)


def test_exercises_have_a_starter_cell_and_folded_solutions(tmp_path):
    """Issue 20: in Colab each exercise is followed by a blank cell to answer in, and no solution shows
    until asked: solution code in form cells (title only), solution prose inside <details>."""
    for path in colab_notebooks.main(["--out", str(tmp_path), "--source", "x"]):
        nb = nbformat.read(path, 4)
        exercises = [i for i, c in enumerate(nb.cells) if c.cell_type == "markdown" and c.source.startswith("### 练习：")]
        for i in exercises:
            starter = nb.cells[i + 1]
            assert "starter" in starter.metadata.get("tags", []) and "在这里写你的解答" in starter.source, (path.name, nb.cells[i].source[:40])
        solutions = [c for c in nb.cells if c.source.startswith(colab_notebooks.SOLUTION_TITLE)]
        assert all(c.metadata.get("cellView") == "form" for c in solutions)
        text = "\n".join(c.source for c in nb.cells)
        assert "solution-start" not in text and "solution-end" not in text and "<!--starter" not in text, path.name
        assert text.count("<details>") == text.count("</details>")
        if path.stem.startswith("0") and path.stem != "10_summary":
            assert exercises and solutions, f"{path.name}: no exercises or no folded solution code"


def test_cross_references_read_as_on_the_site():
    known = colab_notebooks.references()
    assert known[("numref", "ch-amp")] == "第 3 章" and known[("ref", "ch-fp8")] == "FP8"
    assert colab_notebooks.resolve_references("见{numref}`ch-loss-scaling`。", known) == "见第 2 章。"


def test_literalinclude_becomes_the_real_source(tmp_path):
    nb = nbformat.read(next(p for p in colab_notebooks.main(["--out", str(tmp_path), "--source", "x"]) if p.stem == "07_debugging"), 4)
    source = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    assert "class FindFirstNonFinite(TorchDispatchMode):" in source and "def softmax_stable(" in source


def test_notebooks_run_in_a_fresh_environment(colab_run):
    summary = json.loads((COLAB_WORK / "summary.json").read_text())
    failed = [f"{s['notebook']}:\n{s['error']}" for s in summary if s["returncode"] != 0]
    assert not failed, "\n\n".join(failed)
    assert len(summary) == len(colab_notebooks.chapters())
    assert colab_run.returncode == 0
