"""Running a chapter outside the book build, as a plain notebook (Colab, Jupyter).

The chapters call myst-nb's ``glue`` to put computed numbers into the prose, and the prose uses MyST
roles ({glue:text}, {ref}, {cite:p}) that only the book build understands. In a notebook made by
``tools/colab_notebooks.py`` the setup cell calls ``install()``, which provides ``myst_nb.glue``
when myst-nb is absent, and each paragraph that shows a computed number is a hidden code cell calling
``markdown(...)``: it fills in the numbers and displays the paragraph.
"""

from __future__ import annotations

import re
import sys
import types

GLUED: dict[str, object] = {}

_GLUE_TEXT = re.compile(r"\{glue:text\}`([^`:]+)(?::([^`]*))?`")
_ROLE = re.compile(r"\{(?:ref|numref|doc)\}`(?:([^`<]*?)\s*<([^`>]+)>|([^`]+))`")
_CITE = re.compile(r"\{cite:[pt]\}`([^`]+)`")


def glue(name: str, value, display: bool = True) -> None:
    """Stand-in for ``myst_nb.glue``: remember ``value`` under ``name``, and show it if asked."""
    GLUED[name] = value
    if display:
        from IPython.display import display as show

        show(value)


def install() -> None:
    """Make ``from myst_nb import glue`` work without myst-nb (as on Colab)."""
    try:
        import myst_nb  # noqa: F401
    except ImportError:
        module = types.ModuleType("myst_nb")
        module.glue = glue
        sys.modules["myst_nb"] = module


def fill(text: str) -> str:
    """MyST prose as plain Markdown: glued values filled in, cross-references and citations as text."""

    def glued(match: re.Match) -> str:
        name, spec = match.group(1), match.group(2)
        if name not in GLUED:
            return f"`{name}`"
        value = GLUED[name]
        try:
            return format(value, spec or "")
        except (TypeError, ValueError):
            return str(value)

    text = _GLUE_TEXT.sub(glued, text)
    text = _ROLE.sub(lambda m: m.group(1) or m.group(3), text)
    return _CITE.sub(lambda m: "[" + m.group(1) + "]", text)


def markdown(text: str):
    """Display MyST prose with its glued numbers filled in."""
    from IPython.display import Markdown, display

    display(Markdown(fill(text)))


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A Markdown table; each cell is written with ``str`` (escape markup in the values first)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


_FENCE = re.compile(r"^(`{3,}|:{3,})[^\n]*\n.*?^\1\s*$", re.M | re.S)
_CJK = re.compile(r"[\u4e00-\u9fff]")
READING_SPEED = 300  # Chinese characters a minute, a common estimate for technical prose


def reading_minutes(paths) -> dict[str, float]:
    """Minutes to read each MyST chapter's prose (CJK characters outside code, front matter and
    directives such as exercises, at ``READING_SPEED``), keyed by the chapter's title."""
    from pathlib import Path

    out = {}
    for path in paths:
        text = Path(path).read_text(encoding="utf-8")
        text = text.split("\n---\n", 1)[1] if text.startswith("---\n") else text
        title = next((line[2:].strip() for line in text.splitlines() if line.startswith("# ")), Path(path).stem)
        out[title] = len(_CJK.findall(_FENCE.sub("", text))) / READING_SPEED
    return out
