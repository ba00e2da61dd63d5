"""The PDF edition: built with xelatex from the HTML build's execution (no chapter runs twice), with
Chinese fonts and nothing missing: glyphs, chapter titles, glued numbers, figures."""

import re
import shutil
import subprocess

import pytest
import yaml
from conftest import HTML, ROOT

pytestmark = pytest.mark.book

LATEX = ROOT / "_build" / "latex"


def _chapters() -> list[str]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text(encoding="utf-8"))
    return [c["file"] for part in toc["parts"] for c in part["chapters"]]


def _title(docname: str) -> str:
    for line in (ROOT / f"{docname}.md").read_text(encoding="utf-8").splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    raise AssertionError(f"{docname} has no title")


def _squash(text: str) -> str:
    return re.sub(r"\s+", "", text)


@pytest.fixture(scope="module")
def pdf(pdf_log):
    pdfs = sorted(LATEX.glob("*.pdf"))
    assert len(pdfs) == 1, f"expected one PDF in {LATEX}: {pdfs}"
    return pdfs[0]


@pytest.fixture(scope="module")
def pdf_text(pdf):
    assert shutil.which("pdftotext"), "pdftotext is missing (poppler-utils, installed by .ci/run)"
    return subprocess.run(["pdftotext", "-enc", "UTF-8", str(pdf), "-"], capture_output=True, text=True, check=True).stdout


def test_pdf_reuses_the_html_build_execution(pdf_log):
    assert "Executing notebook" not in pdf_log, "the PDF build executed chapters again"
    # either Sphinx reuses the HTML build's environment (no source is read again), or it reads every
    # chapter back from the execution cache
    reused = re.search(r"updating environment: .*0 added, 0 changed, 0 removed", pdf_log)
    assert reused or pdf_log.count("Using cached notebook") >= len([d for d in _chapters() if "references" not in d])


def test_no_missing_glyphs(pdf):
    log = (LATEX / pdf.with_suffix(".log").name).read_text(encoding="utf-8", errors="replace")
    missing = sorted(set(re.findall(r"Missing character: There is no (.+?) in font", log)))
    assert not missing, f"characters without a glyph in the PDF: {missing}"
    fonts = subprocess.run(["pdffonts", str(pdf)], capture_output=True, text=True, check=True).stdout
    assert "NotoSerifCJK" in fonts or "NotoSansCJK" in fonts, f"no Noto CJK font embedded:\n{fonts}"


def test_page_count(pdf):
    info = subprocess.run(["pdfinfo", str(pdf)], capture_output=True, text=True, check=True).stdout
    pages = int(re.search(r"Pages:\s+(\d+)", info).group(1))
    # each chapter page of the site is several printed pages; a PDF that lost chapters is much shorter
    chapters = [d for d in _chapters() if d.split("/")[-1][:2].isdigit()]
    assert pages >= 8 * len(chapters), f"{pages} pages for {len(chapters)} chapters"


def test_every_chapter_title_in_the_text(pdf_text):
    text = _squash(pdf_text)
    missing = [_title(d) for d in _chapters() if _squash(_title(d)) not in text]
    assert not missing, f"chapter titles missing from the PDF: {missing}"


def test_glued_numbers_in_the_text(pdf_text):
    """A sample of each chapter's glued numbers (as the HTML build rendered them) is in the PDF's text."""
    text = _squash(pdf_text)
    checked, missing = 0, []
    for docname in _chapters():
        page = (HTML / f"{docname}.html").read_text(encoding="utf-8")
        glued = [g for g in re.findall(r'<span class="pasted-text">([^<]+)</span>', page) if re.search(r"\d", g)]
        for value in glued[:: max(1, len(glued) // 5)][:5]:
            checked += 1
            if _squash(value) not in text:
                missing.append(f"{docname}: {value}")
    assert checked >= 20, f"only {checked} glued numbers found in the HTML pages"
    assert not missing, f"glued numbers missing from the PDF: {missing}"


def test_figures_included(pdf):
    """Every figure of the site (chapter images, glued figures included) is in the PDF."""
    site_figures = set()
    for docname in _chapters():
        page = (HTML / f"{docname}.html").read_text(encoding="utf-8")
        site_figures |= set(re.findall(r'<img[^>]+src="\.\./_images/([^"]+)"', page))
    tex = "".join(p.read_text(encoding="utf-8") for p in LATEX.glob("*.tex"))
    included = set(re.findall(r"\\sphinxincludegraphics(?:\[[^\]]*\])?\{\{?([^}]+?)\}?\}", tex))
    assert len(site_figures) >= 20, site_figures
    missing = sorted(f for f in site_figures if not any(f.rsplit(".", 1)[0] in i for i in included))
    assert not missing, f"figures of the site missing from the PDF: {missing}"
    listing = subprocess.run(["pdfimages", "-list", str(pdf)], capture_output=True, text=True, check=True).stdout
    images = [line for line in listing.splitlines()[2:] if " image " in line]
    assert len(images) >= len(site_figures), f"{len(images)} images in the PDF, {len(site_figures)} on the site"


def test_no_python_object_reprs_in_the_text(pdf_text):
    leaks = re.findall(r"<mixprec\.[\w.]+ at 0x[0-9a-f]+>|CheckResult\(passed=", pdf_text)
    assert not leaks, f"{len(leaks)} outputs print as Python objects, e.g. {leaks[:3]}"


def test_chapter_numbers_agree_with_the_site(pdf_text):
    """Issue 20: "第 N 章" is the same chapter on the site and in the PDF: the preface is front matter,
    the numbered part is numbered alike, the appendices are unnumbered in both."""
    text = _squash(pdf_text)
    numbered = 0
    for docname in _chapters():
        page = (HTML / f"{docname}.html").read_text(encoding="utf-8")
        h1 = re.findall(r"<h1>(.*?)</h1>", page, re.S)[-1]  # the article's heading, after the theme's print-only one
        site = re.search(r'<span class="section-number">(\d+)\.', h1)
        title = _squash(_title(docname))
        if site:
            numbered += 1
            assert f"第{site.group(1)}章{title}" in text, f"{docname}: 第 {site.group(1)} 章 on the site, not in the PDF"
        else:
            assert not re.search(rf"第\d+章{re.escape(title)}", text), f"{docname}: unnumbered on the site, numbered in the PDF"
    assert numbered >= 8
    assert "第1章前言" not in text and "Chapter" not in pdf_text and "Bibliography" not in pdf_text
