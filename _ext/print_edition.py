"""The PDF as a book: what the LaTeX builder alone changes.

- The chapters of a part without ``numbered: true`` in ``_toc.yml`` (the appendices) are unnumbered,
  as on the site, so "第 N 章" means the same chapter in both editions.
- Code cells tagged ``hide-input`` print their output only: on the site their code is one click
  away; on paper it would be pages of plotting code.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from docutils import nodes
from sphinx import addnodes

UNNUMBERED = r"\setcounter{secnumdepth}{-1}\renewcommand{\chaptermark}[1]{\markboth{#1}{}}"


def first_unnumbered_chapter(toc: dict) -> str | None:
    """The docname of the first chapter after the numbered parts, or None."""
    seen_numbered = False
    for part in toc.get("parts", []):
        if part.get("numbered"):
            seen_numbered = True
        elif seen_numbered and part.get("chapters"):
            return part["chapters"][0]["file"]
    return None


def print_edition(app, doctree, docname):
    if app.builder.format != "latex":
        return
    for cell in list(doctree.findall(nodes.container)):
        if "tag_hide-input" in cell.get("classes", []):
            for child in list(cell.children):
                if "cell_input" in child.get("classes", []):
                    cell.remove(child)
    toc_path = Path(app.srcdir) / "_toc.yml"
    first = first_unnumbered_chapter(yaml.safe_load(toc_path.read_text(encoding="utf-8"))) if toc_path.exists() else None
    for start in doctree.findall(addnodes.start_of_file):
        if start.get("docname") == first:
            start.parent.insert(start.parent.index(start), nodes.raw("", UNNUMBERED, format="latex"))
            break


def setup(app):
    app.connect("doctree-resolved", print_edition)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
