"""A "Colab" launch button on every notebook chapter, pointing at the generated .ipynb.

Jupyter Book's own Colab button points Colab at the chapter's MyST .md file, which Colab cannot
open. ``tools/colab_notebooks.py`` makes one .ipynb per chapter, and the GPU workflow publishes them
on the ``colab_branch`` branch under the same paths (``book/<chapter>.ipynb``). The repository comes
from ``_config.yml`` (``repository.url``), like every other link of the book.
"""

from __future__ import annotations

from pathlib import Path

COLAB = "https://colab.research.google.com/github"


def colab_url(repository_url: str, branch: str, pagename: str) -> str:
    parts = repository_url.rstrip("/").removesuffix(".git").split("/")
    if len(parts) < 5 or parts[2] != "github.com":
        raise ValueError(f"Colab opens notebooks from GitHub; repository.url is {repository_url!r}")
    return f"{COLAB}/{parts[3]}/{parts[4]}/blob/{branch}/{pagename}.ipynb"


def add_colab_button(app, pagename, templatename, context, doctree):
    source = Path(app.env.doc2path(pagename))
    if source.suffix != ".md" or not source.read_text(encoding="utf-8").startswith("---\njupytext"):
        return  # not a notebook chapter
    url = colab_url(app.config.html_theme_options.get("repository_url", ""), app.config.colab_branch, pagename)
    button = {"type": "link", "text": "Colab", "tooltip": "在 Colab 中打开（GPU）", "icon": "_static/images/logo_colab.png", "url": url}
    context.setdefault("header_buttons", []).append(
        {"type": "group", "tooltip": "运行本章", "icon": "fas fa-rocket", "buttons": [button], "label": "launch-buttons"}
    )


def setup(app):
    app.add_config_value("colab_branch", "colab", "html")
    app.connect("html-page-context", add_colab_button, priority=501)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
