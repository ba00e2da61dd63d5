"""Build the whole book with execution and warnings as errors, then check what it produced."""

import json
from pathlib import Path

import pytest
from conftest import HTML, ROOT

pytestmark = pytest.mark.book


def test_config_raises_on_errors():
    config = (ROOT / "_config.yml").read_text()
    assert "nb_execution_raise_on_error: true" in config
    assert "execute_notebooks: cache" in config  # keyed by mixprec's source (_ext/execution_cache.py)
    assert "sphinx-mathjax-offline" in config
    assert "html_search_language: zh" in config


def _notebook_chapters() -> list[Path]:
    return sorted(p for p in (ROOT / "book").glob("*.md") if p.read_text(encoding="utf-8").startswith("---\njupytext"))


def test_every_chapter_executed_fresh(build_log):
    """The test build starts from an empty cache: every chapter runs, none is taken from an earlier build."""
    chapters = _notebook_chapters()
    assert len(chapters) >= 9
    for path in chapters:
        assert f"{path}: Executing notebook" in build_log, f"{path.name} was not executed by the test build"
    assert "Using cached notebook" not in build_log


def test_build_has_no_warnings(build_log):
    # -W already fails the build on a Sphinx warning; a missing CJK glyph is raised inside the cell
    assert "Glyph" not in build_log and "missing from font" not in build_log


def test_chapters_rendered(build_log):
    page = (HTML / "book" / "01_formats.html").read_text()
    assert "MixprecFloat.mount" in page  # the explorer's script is in the static page
    assert page.count("<img") >= 6  # the figures
    assert "{glue" not in page  # every glue reference resolved
    assert "<table" in page  # computed tables render as tables
    assert page.count("✔ 正确") >= 3  # each exercise's reference solution passes its checker in the built page
    page = (HTML / "book" / "02_loss_scaling.html").read_text()
    assert "MixprecScale.mount" in page and page.count("<img") >= 3 and "{glue" not in page and "<table" in page
    assert page.count("✔ 正确") >= 1
    page = (HTML / "book" / "03_amp.html").read_text()
    assert "MixprecMemory.mount" in page and page.count("<img") >= 1 and "{glue" not in page and page.count("<table") >= 6
    assert page.count("✔ 正确") >= 1
    page = (HTML / "book" / "04_bf16_fp16.html").read_text()
    assert page.count("<img") >= 5 and "{glue" not in page and page.count("<table") >= 6 and page.count("✔ 正确") >= 3
    page = (HTML / "book" / "05_fp8.html").read_text()
    assert "MixprecFp8.mount" in page and page.count("<img") >= 2 and "{glue" not in page and page.count("<table") >= 4 and page.count("✔ 正确") >= 1
    page = (HTML / "book" / "06_fp4.html").read_text()
    assert "MixprecFloat.mount" in page and page.count("<img") >= 2 and "{glue" not in page and page.count("<table") >= 4
    assert page.count("✔ 正确") >= 2
    page = (HTML / "book" / "07_debugging.html").read_text()
    assert page.count("<img") >= 6 and "{glue" not in page and page.count("<table") >= 3 and page.count("✔ 正确") >= 1
    page = (HTML / "book" / "08_story_generation.html").read_text()
    assert page.count("<img") >= 2 and "{glue" not in page and page.count("<table") >= 6 and page.count("✔ 正确") >= 1
    page = (HTML / "book" / "09_distributed.html").read_text()
    assert page.count("<img") >= 3 and "{glue" not in page and page.count("<table") >= 4 and page.count("✔ 正确") >= 1
    for name in ("10_summary", "misconceptions"):
        assert "{glue" not in (HTML / "book" / f"{name}.html").read_text()
    for name in ("intro", "references"):
        assert (HTML / "book" / f"{name}.html").exists()
    references = (HTML / "book" / "references.html").read_text()
    assert "Shleifer" in references and "1802.00930" in references  # the sources' two wrong author lists, corrected


def test_chinese_search_index(build_log):
    text = (HTML / "searchindex.js").read_text()
    index = json.loads(text[text.index("(") + 1 : text.rindex(")")])
    formats_doc = index["docnames"].index("book/01_formats")
    # jieba split the Chinese prose into words, so a search for 次正规数 reaches the formats chapter
    # (Sphinx files a word under titleterms, not terms, for a page that has it in a heading)
    docs = [index[kind].get("次正规数") for kind in ("terms", "titleterms")]
    docs = [d for entry in docs if entry is not None for d in (entry if isinstance(entry, list) else [entry])]
    assert formats_doc in docs, f"次正规数 does not lead to the formats chapter: {docs}"
    assert "LANGUAGE: 'zh-CN'" in (HTML / "_static" / "documentation_options.js").read_text()


def test_prose_has_no_placeholder_values(build_log):
    """A glued None, NaN or inf in a sentence means a computation found nothing: the sentence would state a non-result."""
    import html
    import re

    for page in sorted((HTML / "book").glob("*.html")):
        text = page.read_text()
        for tag in ("script", "style", "pre", "code", "table"):  # code, outputs and tables may legitimately show nan/inf/None
            text = re.sub(rf"<{tag}\b.*?</{tag}>", "", text, flags=re.S)
        prose = html.unescape(re.sub(r"<[^>]+>", " ", text))
        hits = [m.group(0) for m in re.finditer(r".{0,40}\b(None|nan%|NaN%|nan|inf%)\b.{0,20}", prose)]
        assert not hits, f"{page.name}: {hits[:3]}"
