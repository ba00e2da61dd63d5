"""The built site in a headless browser, offline: pages load without JavaScript errors and without a
request leaving localhost, formulas render with the bundled MathJax, the explorers respond to input,
Chinese search works, internal links and cross-references resolve, and the Colab buttons open .ipynb
notebooks. Screenshots of the chapter pages are kept in _build/screenshots/."""

import functools
import http.server
import re
import shutil
import threading
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urldefrag, urljoin, urlparse

import pytest
from conftest import HTML, ROOT

pytestmark = pytest.mark.book

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SHOTS = ROOT / "_build" / "screenshots"
# Flags for a sandboxed machine with no network (see the environment notes): no background traffic.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


def pages() -> list[Path]:
    return sorted(p for p in HTML.rglob("*.html") if "_static" not in p.parts and "_sources" not in p.parts)


@pytest.fixture(scope="module")
def site(build_log):
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(HTML))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


@pytest.fixture(scope="module")
def browser(site):
    if CHROMIUM is None:
        pytest.fail("chromium is not installed (.ci/run installs it with apt-get)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield browser
        browser.close()


LOCAL = re.compile(r"^(http://127\.0\.0\.1[:/]|data:|blob:|about:)")


def _open(browser, url: str, errors: list[str], requests: list[str] | None = None):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    # Offline, as a reader without network would be: anything not on localhost is refused (and noted).
    page.route(re.compile(r"^(?!http://127\.0\.0\.1).*"), lambda route: route.abort())
    page.on("pageerror", lambda exc: errors.append(f"{url}: {exc}"))
    if requests is not None:
        page.on("request", lambda request: requests.append(request.url))
    page.goto(url, wait_until="load")
    return page


def _wait_for_mathjax(page) -> None:
    page.wait_for_function("() => window.MathJax && MathJax.startup && MathJax.startup.promise", timeout=20_000)
    page.evaluate("() => MathJax.startup.promise")


def test_no_request_leaves_localhost(browser, site):
    """Every page, with its scripts, styles, fonts and MathJax, loads from the site itself."""
    outside: list[str] = []
    errors: list[str] = []
    for path in pages():
        requests: list[str] = []
        page = _open(browser, site + path.relative_to(HTML).as_posix(), errors, requests)
        page.wait_for_load_state("networkidle")
        if page.locator(".math").count():
            _wait_for_mathjax(page)  # MathJax loads its fonts and extensions lazily
        page.close()
        assert any(r.startswith(site) for r in requests), f"no request recorded for {path.name}"
        outside += [f"{path.name}: {r}" for r in requests if not LOCAL.match(r)]
    assert not outside, "requests leaving the machine:\n" + "\n".join(sorted(set(outside)))


@pytest.mark.parametrize("chapter", ["01_formats", "02_loss_scaling", "04_bf16_fp16"])
def test_formulas_render_offline(browser, site, chapter):
    """MathJax (bundled in _static, no CDN) turns every formula into rendered math: no raw TeX is left."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    errors: list[str] = []
    page = _open(browser, f"{site}book/{chapter}.html", errors)
    formulas = page.locator("span.math, div.math").count()
    assert formulas >= 3, f"{chapter} has {formulas} formulas"
    _wait_for_mathjax(page)
    assert page.locator("mjx-container").count() >= formulas
    assert page.locator("mjx-merror").count() == 0, "a formula MathJax could not parse"
    # the reader's text outside code: no TeX delimiter may be left unrendered
    prose = page.evaluate("""() => {
        const main = document.querySelector("main").cloneNode(true);
        main.querySelectorAll("pre, code, script, style, mjx-container, .cell_output").forEach(e => e.remove());
        return main.innerText; }""")
    raw = [m.group(0) for m in re.finditer(r".{0,30}(\\\(|\\\[|\$\$|\\frac|\^\{).{0,30}", prose)]
    assert not raw, f"raw TeX in {chapter}: {raw[:3]}"
    first = page.locator("mjx-container").first
    first.scroll_into_view_if_needed()
    box = first.bounding_box()
    assert box and box["width"] > 5 and box["height"] > 5, "a rendered formula has no size (fonts missing?)"
    page.screenshot(path=str(SHOTS / f"math_{chapter}.png"))  # the viewport, with the first formula in it
    assert not errors, errors


def test_every_page_loads_without_javascript_errors(browser, site):
    SHOTS.mkdir(parents=True, exist_ok=True)
    errors: list[str] = []
    checked = 0
    for path in pages():
        rel = path.relative_to(HTML).as_posix()
        page = _open(browser, site + rel, errors)
        if rel.startswith("book/"):
            page.screenshot(path=str(SHOTS / (path.stem + ".png")), full_page=False)
        page.close()
        checked += 1
    assert checked >= 10
    assert not errors, "JavaScript errors:\n" + "\n".join(errors)


@pytest.mark.parametrize("chapter, count", [("01_formats", 1), ("02_loss_scaling", 1), ("03_amp", 1), ("05_fp8", 1)])
def test_explorers_respond_to_input_offline(browser, site, chapter, count):
    errors: list[str] = []
    page = _open(browser, f"{site}book/{chapter}.html", errors)
    explorers = page.locator(".mixprec-explorer")
    assert explorers.count() >= count
    for i in range(explorers.count()):
        root = explorers.nth(i)
        field = root.locator("input, select").first
        before = root.inner_text()
        assert before.strip(), f"explorer {i} in {chapter} rendered nothing"
        kind = field.get_attribute("type") or "select"
        if kind == "select":  # the FP8 scaling explorer: choose the last option
            field.select_option(index=field.locator("option").count() - 1)
        else:
            new_value = {"range": "20", "number": "7000", "text": "65520"}[kind]
            field.evaluate("(el, v) => { el.value = v; el.dispatchEvent(new Event('input', {bubbles: true})); }", new_value)
        after = root.inner_text()
        assert after != before, f"explorer {i} ({kind}) in {chapter} did not respond to input"
    assert not errors, errors


def test_chinese_search_finds_the_formats_chapter(browser, site):
    errors: list[str] = []
    page = _open(browser, site + "search.html?q=%E6%AC%A1%E6%AD%A3%E8%A7%84%E6%95%B0", errors)  # 次正规数
    page.wait_for_selector("#search-results li a", timeout=20_000)
    links = page.eval_on_selector_all("#search-results li a", "els => els.map(e => e.getAttribute('href'))")
    assert any("01_formats" in href for href in links), links
    assert not errors, errors


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.hrefs: list[str] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "a" and attrs.get("href"):
            self.hrefs.append(attrs["href"])


@functools.cache
def _parse(path: Path) -> _Links:
    parser = _Links()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def test_no_broken_internal_links_or_cross_references(build_log):
    broken = []
    for path in pages():
        base = "http://site/" + path.relative_to(HTML).as_posix()
        for href in _parse(path).hrefs:
            url, fragment = urldefrag(urljoin(base, href))
            parsed = urlparse(url)
            if parsed.netloc != "site":
                continue
            target = HTML / unquote(parsed.path.lstrip("/"))
            if target.is_dir():
                target = target / "index.html"
            if not target.exists():
                broken.append(f"{path.name}: {href} (no file)")
            elif fragment and target.suffix == ".html" and unquote(fragment) not in _parse(target).ids:
                broken.append(f"{path.name}: {href} (no anchor)")
    assert not broken, "broken links:\n" + "\n".join(sorted(set(broken)))


def test_colab_buttons_open_generated_notebooks(build_log):
    chapters = sorted((HTML / "book").glob("0*.html"))
    assert len(chapters) >= 7
    for path in chapters:
        colab = [h for h in _parse(path).hrefs if "colab.research.google.com" in h]
        assert colab, f"{path.name} has no Colab button"
        assert all(h.endswith(f"/book/{path.stem}.ipynb") and "/blob/colab/" in h for h in colab), colab
        page = path.read_text(encoding="utf-8")
        assert 'class="notebook-links"' in page and "在 Colab 中打开" in page, f"{path.name}: no notebook links under the title"
        download = [h for h in _parse(path).hrefs if h.startswith("https://raw.githubusercontent.com/")]
        assert download and all(h.endswith(f"/colab/book/{path.stem}.ipynb") for h in download), download
    assert "notebook-links" not in (HTML / "book" / "intro.html").read_text(encoding="utf-8")  # front matter: no notebook


def test_every_figure_has_a_number_and_a_caption(build_log):
    """Issue 20: every image a chapter's code draws sits in a numbered, captioned figure (图 2.1 …)."""
    loose = []
    for path in sorted((HTML / "book").glob("*.html")):
        page = path.read_text(encoding="utf-8")
        for match in re.finditer(r'<img [^>]*src="\.\./_images/[^"]+"', page):
            figure_start = page.rfind("<figure", 0, match.start())
            figure_end = page.rfind("</figure>", 0, match.start())
            caption = page.find('class="caption-number"', match.start())
            if figure_start <= figure_end or caption == -1 or caption > page.find("</figure>", match.start()):
                loose.append(f"{path.name}: {match.group(0)[:80]}")
    assert not loose, "images without a numbered caption:\n" + "\n".join(loose)
