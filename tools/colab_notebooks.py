"""Make one Colab notebook per chapter from the MyST sources.

    python tools/colab_notebooks.py --out _build/colab            # mixprec from the repository at HEAD
    python tools/colab_notebooks.py --out /tmp/nb --source ./code  # mixprec from a local checkout (CI)

Each notebook starts with a setup cell that installs mixprec at the same commit as the site (never
torch: Colab's own is used) and a CJK font for the plots, and asks Colab for a GPU. The repository
URL comes from ``_config.yml`` (``repository.url``), the one place it is set. MyST that Colab cannot
render is rewritten: ``literalinclude`` becomes the included source, admonitions become quotes,
exercises become headings, and paragraphs with computed numbers become hidden cells that fill them in
(``mixprec.notebook``). Notebooks are written to ``<out>/book/<chapter>.ipynb``, the paths the book's
Colab buttons point at on the published ``colab`` branch.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
from pathlib import Path

import jupytext
import nbformat
import yaml

ROOT = Path(__file__).resolve().parents[1]

SETUP = '''# 运行本章前的准备（Colab 或任何 Jupyter）：安装与网站同一版本的 mixprec，以及画图用的中文字体。
# 不会重装 PyTorch：mixprec 只要求 torch>=2.4，使用环境自带的版本。
MIXPREC_SOURCE = {source!r}

import os, shutil, subprocess, sys
subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", MIXPREC_SOURCE], check=True)
has_cjk = shutil.which("fc-list") and subprocess.run(["fc-list", ":lang=zh"], capture_output=True, text=True).stdout.strip()
if not has_cjk and shutil.which("apt-get") and hasattr(os, "geteuid") and os.geteuid() == 0:
    subprocess.run("apt-get -qq update && apt-get -qq install -y fonts-noto-cjk", shell=True, check=False)

from mixprec import notebook
notebook.install()  # myst_nb.glue, when myst-nb is not installed
'''


def repository_url() -> str:
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    return config["repository"]["url"].rstrip("/")


def chapters() -> list[str]:
    """Docnames of the chapters in the table of contents, in order."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    names = []  # the preface is front matter: no notebook
    for part in toc.get("parts", []):
        names += [c["file"] for c in part.get("chapters", [])]
    return [n for n in names if (ROOT / f"{n}.md").read_text(encoding="utf-8").startswith("---\njupytext")]


def _python_object(path: Path, name: str) -> str:
    """The lines literalinclude's ``:pyobject:`` shows: Sphinx's own ModuleAnalyzer finds the object."""
    from sphinx.pycode import ModuleAnalyzer

    _, start, end = ModuleAnalyzer.for_file(str(path), "").find_tags()[name]
    return "\n".join(path.read_text(encoding="utf-8").splitlines()[start - 1 : end])


_INCLUDE = re.compile(r"```\{literalinclude\} (\S+)\n(?::[^\n]*\n)*?:pyobject: (\S+)\n(?::[^\n]*\n)*```")
_ADMONITION = re.compile(r":::\{admonition\} ([^\n]*)\n(?::class:[^\n]*\n)?(.*?)\n:::", re.S)
_EXERCISE = re.compile(r"```\{exercise\} ([^\n]*)\n:label: ([^\n]*)\n(.*?)\n```", re.S)
_SOLUTION_START = re.compile(r"````\{solution-start\}[^\n]*\n(?::class:[^\n]*\n)?````")
_SOLUTION_END = re.compile(r"````\{solution-end\}\n````")
_LABEL = re.compile(r"^\([\w-]+\)=\n", re.M)
_BIBLIOGRAPHY = re.compile(r"```\{bibliography\}\n(?::[^\n]*\n)*```")


# Exercises as a reader uses them: a blank cell to answer in after each exercise, and the solution
# folded until asked for (its prose in <details>, its code in a Colab form cell, which shows only the title).
STARTER_MARK = "<!--starter:"
SOLUTION_START, SOLUTION_END = "<!--solution-start-->", "<!--solution-end-->"
SOLUTION_TITLE = "#@title 解答（代码已折叠：双击展开，或直接运行）\n"
_MARKS = re.compile(r"(<!--starter:[\w-]+-->|<!--solution-start-->|<!--solution-end-->)")
_CHECKER_CALL = re.compile(r"^\s*(check_\w+\(.*)$", re.M)


def starter_cell(title: str, checker_calls: list[str]) -> str:
    lines = [f"# 练习：{title}", "# 在这里写你的解答，然后运行本单元。", ""]
    if checker_calls:
        names = sorted({call.split("(")[0] for call in checker_calls})
        lines += ["# 写好后用检查器核对（参数与解答中的调用相同）：", f"# from mixprec.exercises import {', '.join(names)}"]
        lines += [f"# {call.strip()}" for call in checker_calls]
    return "\n".join(lines)


def solution_checker_calls(cells) -> dict[str, list[str]]:
    """For each exercise label, the checker calls (``check_...(...)``) its solution's code makes."""
    calls: dict[str, list[str]] = {}
    current = None
    for cell in cells:
        if cell.cell_type == "markdown":
            for match in re.finditer(r"solution-start\} (\S+)|solution-end", cell.source):
                current = match.group(1)
            continue
        if current is not None:
            calls.setdefault(current, []).extend(_CHECKER_CALL.findall(cell.source))
    return calls


_LABELLED_HEADING = re.compile(r"^\(([\w-]+)\)=\n+#+ (.+)$", re.M)
_FIGURE_NAME = re.compile(r"^mystnb:\n(?:  .*\n)*?    name: ([\w-]+)$", re.M)
_REFERENCE = re.compile(r"\{(numref|ref)\}`([\w-]+)`")


def references() -> dict[tuple[str, str], str]:
    """What ``{numref}`` and ``{ref}`` of the book's labels read as on the site: ("numref", "ch-amp") ->
    "第 3 章", ("ref", "ch-amp") -> the chapter's title, ("numref", a figure) -> "图 3.2", ("ref", a
    section) -> its heading. Numbers follow the table of contents (numbered parts only) and the order
    of the figures in each chapter, as Sphinx numbers them."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    out: dict[tuple[str, str], str] = {}
    number = 0
    for part in toc.get("parts", []):
        for chapter in part.get("chapters", []):
            text = (ROOT / f"{chapter['file']}.md").read_text(encoding="utf-8")
            headings = _LABELLED_HEADING.findall(text)
            numbered = part.get("numbered", False)
            number += numbered
            for i, (label, heading) in enumerate(headings):
                out[("ref", label)] = heading.strip()
                if i == 0 and numbered:
                    out[("numref", label)] = f"第 {number} 章"
            for k, name in enumerate(_FIGURE_NAME.findall(text), start=1):
                out[("numref", name)] = f"图 {number}.{k}" if numbered else "图"
    return out


def resolve_references(text: str, known: dict[tuple[str, str], str]) -> str:
    return _REFERENCE.sub(lambda m: known.get((m.group(1), m.group(2)), m.group(0)), text)


def plain_markdown(text: str, chapter_dir: Path) -> str:
    """MyST directives rewritten as Markdown that Colab renders (roles are left to ``mixprec.notebook.fill``)."""
    text = resolve_references(text, references())
    text = _INCLUDE.sub(lambda m: "```python\n" + _python_object((chapter_dir / m.group(1)).resolve(), m.group(2)) + "\n```", text)
    text = _ADMONITION.sub(lambda m: f"> **{m.group(1)}**\n>\n" + "\n".join("> " + line for line in m.group(2).splitlines()), text)
    text = _EXERCISE.sub(lambda m: f"### 练习：{m.group(1)}\n\n{m.group(3)}\n\n{STARTER_MARK}{m.group(2).strip()}-->", text)
    text = _SOLUTION_START.sub(SOLUTION_START, text)
    text = _SOLUTION_END.sub(SOLUTION_END, text)
    text = _BIBLIOGRAPHY.sub("（参考文献列表见网站。）", text)
    return _LABEL.sub("", text).strip()


def _blocks(text: str) -> list[str]:
    """Markdown split into runs of paragraphs, so that only paragraphs with glued numbers become code cells
    (and headings stay Markdown, in Colab's table of contents). Fenced code is never split."""
    paragraphs, current, fenced = [], [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        if not line.strip() and not fenced and current:
            paragraphs.append("\n".join(current))
            current = []
        elif line.strip() or current:
            current.append(line)
    if current:
        paragraphs.append("\n".join(current))
    runs: list[str] = []
    for p in paragraphs:
        if runs and ("{glue:" in p) == ("{glue:" in runs[-1]) and not p.startswith("#"):
            runs[-1] += "\n\n" + p
        else:
            runs.append(p)
    return runs


def make_notebook(docname: str, source: str) -> nbformat.NotebookNode:
    from mixprec.notebook import fill

    path = ROOT / f"{docname}.md"
    nb = jupytext.read(path)
    checkers = solution_checker_calls(nb.cells)
    titles = dict((label.strip(), title) for title, label, _ in _EXERCISE.findall("\n".join(c.source for c in nb.cells if c.cell_type == "markdown")))
    cells = [nbformat.v4.new_code_cell(SETUP.format(source=source), metadata={"id": "setup"})]
    in_solution = False
    for cell in nb.cells:
        if cell.cell_type == "code":
            metadata = {k: v for k, v in cell.metadata.items() if k == "tags"}
            code = cell.source
            if in_solution:
                code, metadata["cellView"] = SOLUTION_TITLE + code, "form"
            cells.append(nbformat.v4.new_code_cell(code, metadata=metadata))
            continue
        for text in _blocks(plain_markdown(cell.source, path.parent)):
            for piece in _MARKS.split(text):
                if piece in (SOLUTION_START, SOLUTION_END):
                    in_solution = piece == SOLUTION_START
                elif piece.startswith(STARTER_MARK):
                    label = piece.removeprefix(STARTER_MARK).removesuffix("-->")
                    cells.append(nbformat.v4.new_code_cell(starter_cell(titles.get(label, label), checkers.get(label, [])),
                                                           metadata={"tags": ["starter"]}))
                elif piece.strip() and in_solution:
                    _add_markdown(cells, f"<details><summary><b>解答</b>（点击展开）</summary>\n\n{piece.strip()}\n\n</details>", fill)
                else:
                    _add_markdown(cells, piece, fill)
    out = nbformat.v4.new_notebook(cells=cells)
    out.metadata = {
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"},
        "accelerator": "GPU",
        "colab": {"provenance": [], "gpuType": "T4", "name": f"{Path(docname).name}.ipynb"},
    }
    nbformat.validate(out)
    return out


def _add_markdown(cells: list, text: str, fill) -> None:
    """Prose as a Markdown cell, or as a hidden code cell that fills in its glued numbers when run."""
    if not text.strip():
        return
    if "{glue:" in text:  # numbers computed above: fill them in when the cell runs
        code = "#@title 正文\nfrom mixprec import notebook\nnotebook.markdown(" + json.dumps(text, ensure_ascii=False) + ")"
        cells.append(nbformat.v4.new_code_cell(code, metadata={"cellView": "form"}))
    else:
        cells.append(nbformat.v4.new_markdown_cell(fill(text)))


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "_build" / "colab")
    parser.add_argument("--ref", help="commit or tag to install mixprec from (default: git HEAD)")
    parser.add_argument("--source", help="pip requirement for mixprec instead of the repository (e.g. a local ./code path)")
    args = parser.parse_args(argv)
    if args.source is None:
        ref = args.ref or subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        args.source = f"git+{repository_url()}@{ref}#subdirectory=code"
    written = []
    for docname in chapters():
        target = args.out / f"{docname}.ipynb"
        target.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(make_notebook(docname, args.source), target)
        written.append(target)
    print(f"{len(written)} notebooks in {args.out}, installing {args.source}")
    return written


if __name__ == "__main__":
    main()
