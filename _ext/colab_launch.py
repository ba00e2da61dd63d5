"""A "Colab" launch button on every notebook chapter, pointing at the generated .ipynb, and under
each chapter's title: links to open it in Colab or download it, and the machine the page was built on.

Jupyter Book's own Colab button points Colab at the chapter's MyST .md file, which Colab cannot
open. ``tools/colab_notebooks.py`` makes one .ipynb per chapter, and the GPU workflow publishes them
on the ``colab_branch`` branch under the same paths (``book/<chapter>.ipynb``). The repository comes
from ``_config.yml`` (``repository.url``), like every other link of the book.
"""

from __future__ import annotations

from pathlib import Path

COLAB = "https://colab.research.google.com/github"
RAW = "https://raw.githubusercontent.com"


def colab_url(repository_url: str, branch: str, pagename: str) -> str:
    parts = repository_url.rstrip("/").removesuffix(".git").split("/")
    if len(parts) < 5 or parts[2] != "github.com":
        raise ValueError(f"Colab opens notebooks from GitHub; repository.url is {repository_url!r}")
    return f"{COLAB}/{parts[3]}/{parts[4]}/blob/{branch}/{pagename}.ipynb"


def notebook_url(repository_url: str, branch: str, pagename: str) -> str:
    """The chapter's .ipynb itself, to download (readers without Colab open it in Jupyter or Kaggle)."""
    owner_repo = colab_url(repository_url, branch, pagename).removeprefix(COLAB + "/").split("/blob/")[0]
    return f"{RAW}/{owner_repo}/{branch}/{pagename}.ipynb"


_BUILT_ON: list[str] = []


def built_on() -> str:
    """The machine this build executes the chapters on, in one line (computed once per build)."""
    if not _BUILT_ON:
        import html

        import torch
        from mixprec import hw

        info = hw.device_info()
        native = "、".join(f.upper() for f, ok in info.native.items() if ok and f != "fp32") or "无"
        _BUILT_ON.append(html.escape(f"本页构建于 {info.name}（{info.device.upper()}），PyTorch {torch.__version__}，"
                                     f"原生支持的低精度格式：{native}，{hw.profile()} 档位"))
    return _BUILT_ON[0]


def badge(colab: str, download: str) -> str:
    return (f'<p class="notebook-links"><a class="reference external" href="{colab}">在 Colab 中打开</a>'
            f' · <a class="reference external" href="{download}" download>下载笔记本（.ipynb）</a>'
            f'<br><span class="built-on">{built_on()}</span></p>')


def add_colab_button(app, pagename, templatename, context, doctree):
    source = Path(app.env.doc2path(pagename))
    if source.suffix != ".md" or not source.read_text(encoding="utf-8").startswith("---\njupytext") or pagename == app.config.root_doc:
        return  # not a chapter with a notebook (the preface is front matter)
    repository = app.config.html_theme_options.get("repository_url", "")
    url = colab_url(repository, app.config.colab_branch, pagename)
    download = notebook_url(repository, app.config.colab_branch, pagename)
    buttons = [{"type": "link", "text": "Colab", "tooltip": "在 Colab 中打开（GPU）", "icon": "_static/images/logo_colab.png", "url": url},
               {"type": "link", "text": ".ipynb", "tooltip": "下载本章的笔记本", "icon": "fas fa-download", "url": download}]
    context.setdefault("header_buttons", []).append(
        {"type": "group", "tooltip": "运行本章", "icon": "fas fa-rocket", "buttons": buttons, "label": "launch-buttons"}
    )
    body = context.get("body", "")
    if "</h1>" in body:  # a visible link under the chapter's title, not only in the toolbar
        context["body"] = body.replace("</h1>", "</h1>" + badge(url, download), 1)


def setup(app):
    app.add_config_value("colab_branch", "colab", "html")
    app.connect("html-page-context", add_colab_button, priority=501)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
