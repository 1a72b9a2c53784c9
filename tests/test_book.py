"""The built HTML book, as a reader meets it: every page of the TOC in headless Chromium.

The book is built from the sources as they are, into a fresh folder (a warning fails the build, as
in `make book`), served on the loopback and read by Debian's chromium through Playwright.
Screenshots of the intro and of a lab are kept in _build/screenshots/ for a person to look at.
"""
import contextlib
import functools
import html.parser
import http.server
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"   # Debian's
SCREENSHOTS = ROOT / "_build" / "screenshots"

pytestmark = pytest.mark.requires("browser")


def toc_files() -> list[str]:
    """Every file of _toc.yml, the root first, in reading order, without suffix."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]]

    def walk(entries):
        for entry in entries:
            files.append(entry["file"])
            walk(entry.get("sections", []))
    for part in toc["parts"]:
        walk(part["chapters"])
    return files


@contextlib.contextmanager
def chromium():
    """Debian's chromium, headless, driven by Playwright (which brings no browser of its own here)."""
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        # --no-sandbox: Chromium's sandbox refuses to start as root, which the labs need
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The book built from the current sources, served on the loopback: yields (base URL, folder)."""
    out = tmp_path_factory.mktemp("book")
    started = time.monotonic()
    build = subprocess.run([Path(sys.executable).parent / "jupyter-book", "build", ".", "-W", "--keep-going",
                            "--path-output", out], cwd=ROOT, capture_output=True, text=True, timeout=600)
    log = build.stdout + build.stderr
    warnings = [line for line in log.splitlines() if "WARNING" in line or "ERROR" in line]
    assert build.returncode == 0, "the book does not build:\n" + ("\n".join(warnings) or log[-4000:])
    print(f"\nbook built in {time.monotonic() - started:.0f} s")
    folder = out / "_build" / "html"
    handler = functools.partial(Quiet, directory=str(folder))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        yield f"http://127.0.0.1:{server.server_address[1]}/", folder
        server.shutdown()


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


@pytest.fixture(scope="module")
def tab(browser):
    """One tab for every page; what it logs as an error is collected per page."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.errors = []
    page.on("console", lambda m: m.type == "error" and page.errors.append(f"console: {m.text}"))
    page.on("pageerror", lambda e: page.errors.append(f"script: {e}"))
    page.on("requestfailed", lambda r: page.errors.append(f"request failed: {r.url} ({r.failure})"))
    page.on("response", lambda r: r.status >= 400 and page.errors.append(f"HTTP {r.status}: {r.url}"))
    yield page
    context.close()


def visit(tab, url):
    tab.errors.clear()
    tab.goto(url, wait_until="load")
    return tab


class _Ids(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids = set()

    def handle_starttag(self, tag, attrs):
        self.ids.update(v for k, v in attrs if k in ("id", "name") and v)


@functools.cache
def ids_in(path: Path) -> frozenset:
    parser = _Ids()
    parser.feed(path.read_text(errors="replace"))
    return frozenset(parser.ids)


def target(folder: Path, base: str, url: str):
    """The file an internal link points at, and its anchor ('' for none); None if external."""
    if not url.startswith(base):
        return None
    parts = urlsplit(url)
    path = folder / unquote(parts.path).lstrip("/")
    return (path / "index.html" if url.endswith("/") or path.is_dir() else path), unquote(parts.fragment)


# Raw markup that reached the page because a role or directive was not parsed: {term}`x`,
# ```{note}, ::: fences, (label)= targets, {{ substitution }}.
RAW = re.compile(r"\{[a-z][\w:-]*\}`|^\s*```|^\s*:::|^\s*\([\w-]+\)=\s*$|\{\{[^}]*\}\}", re.M)

PAGE_TEXT = """() => {
    const article = document.querySelector('article.bd-article').cloneNode(true);
    article.querySelectorAll('pre, code, .cell_output, script, style').forEach(e => e.remove());
    return article.innerText;
}"""

DIAGRAMS = """async () => Promise.all([...document.querySelectorAll('div.graphviz object')].map(o =>
    new Promise(done => {
        const look = () => {
            const svg = o.contentDocument && o.contentDocument.querySelector('svg');
            const box = svg && svg.getBBox();
            done({data: o.getAttribute('data'), svg: !!svg, nodes: svg ? svg.querySelectorAll('g.node').length : 0,
                  width: box ? box.width : 0, height: box ? box.height : 0,
                  text: svg ? svg.textContent : ''});
        };
        o.contentDocument && o.contentDocument.readyState === 'complete' ? look() : o.addEventListener('load', look);
        setTimeout(look, 5000);
    })))"""

CELLS = """() => [...document.querySelectorAll('div.cell')].map(c => {
    const out = c.querySelector('.cell_output');
    return out ? (out.innerText.trim().length + out.querySelectorAll('img, svg, .jupyter-widgets').length) : -1;
})"""


def graphviz_blocks(source: Path) -> int:
    return len(re.findall(r"^\s*```\{graphviz\}", source.read_text(), re.M)) if source.suffix == ".md" else 0


def code_cells(notebook: Path) -> list[bool]:
    """For each code cell the book shows, whether the notebook has outputs for it."""
    cells = json.loads(notebook.read_text())["cells"]
    return [bool(c.get("outputs")) for c in cells if c["cell_type"] == "code"
            and "remove-cell" not in c.get("metadata", {}).get("tags", [])]


@pytest.mark.parametrize("name", toc_files())
def test_page(site, tab, name):
    base, folder = site
    page = visit(tab, base + name + ".html")
    problems = list(page.errors)

    links = page.eval_on_selector_all("a[href]", "as => as.map(a => a.href)")
    for url in sorted(set(links)):
        found = target(folder, base, url)
        if found is None:
            continue
        path, anchor = found
        if not path.is_file():
            problems.append(f"link to a missing page: {url}")
        elif anchor and path.suffix == ".html" and anchor not in ids_in(path):
            problems.append(f"link to a missing anchor: {url}")

    source = next(p for p in (ROOT / f"{name}.md", ROOT / f"{name}.ipynb") if p.exists())
    diagrams = page.evaluate(DIAGRAMS)
    if len(diagrams) != graphviz_blocks(source):
        problems.append(f"{graphviz_blocks(source)} graphviz diagrams in the source, {len(diagrams)} on the page")
    for d in diagrams:
        if not (d["svg"] and d["nodes"] and d["width"] > 10 and d["height"] > 10) or "rror" in d["text"][:200]:
            problems.append(f"diagram {d['data']} did not render as an SVG: {d}")

    for m in RAW.finditer(page.evaluate(PAGE_TEXT)):
        problems.append(f"raw markup on the page: {m.group(0).strip()!r}")
    for what in ("problematic", "system-message"):
        problems += [f"{what}: {t}" for t in page.eval_on_selector_all(f".{what}", "es => es.map(e => e.innerText)")]

    if source.suffix == ".ipynb":
        expected, shown = code_cells(source), page.evaluate(CELLS)
        if len(expected) != len(shown):
            problems.append(f"{len(expected)} code cells in the notebook, {len(shown)} on the page")
        for i, (has, size) in enumerate(zip(expected, shown)):
            if has and size <= 0:
                problems.append(f"code cell {i}: the notebook has outputs, the page shows none")

    if name in ("book/intro", "labs/24-container-from-scratch"):
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=SCREENSHOTS / f"{Path(name).name}.png")
    assert not problems, f"{name}:\n  " + "\n  ".join(problems)


def test_search_finds_cgroup(site, tab):
    base, _ = site
    page = visit(tab, base + "search.html?q=cgroup")
    page.wait_for_selector("#search-results ul.search li", timeout=15000)
    hits = page.eval_on_selector_all("#search-results ul.search li a", "as => as.map(a => a.textContent)")
    assert any("cgroup" in h.lower() for h in hits), hits
    assert not page.errors, page.errors


# The first Chinese character on the glossary page, drawn in the page's own font, beside a code
# point no font has (U+10FFFD, which every browser draws as the missing-glyph box, "tofu").
GLYPH = r"""() => {
    const walker = document.createTreeWalker(document.querySelector('article'), NodeFilter.SHOW_TEXT);
    let node;
    while ((node = walker.nextNode()) && !/\p{Script=Han}/u.test(node.textContent));
    const ch = node.textContent.match(/\p{Script=Han}/u)[0];
    const style = getComputedStyle(node.parentElement);
    const canvas = document.createElement('canvas');
    canvas.width = canvas.height = 64;
    const ctx = canvas.getContext('2d', {willReadFrequently: true});
    ctx.font = `48px ${style.fontFamily}`;
    const draw = c => {
        ctx.clearRect(0, 0, 64, 64);
        ctx.fillText(c, 4, 52);
        return Array.from(ctx.getImageData(0, 0, 64, 64).data).join(',');
    };
    return {ch, font: style.fontFamily, width: ctx.measureText(ch).width,
            tofu: draw(ch) === draw('\u{10FFFD}'), ink: draw(ch).split(',').some(v => v !== '0')};
}"""


@pytest.mark.requires("cjk-font")
def test_chinese_text_has_real_glyphs(site, tab):
    base, _ = site
    page = visit(tab, base + "book/appendix/glossary.html")
    page.evaluate("document.fonts.ready")
    glyph = page.evaluate(GLYPH)
    # a CJK glyph is one em wide (48 px here); the tofu box of a Latin fallback font is narrower
    assert glyph["ink"] and not glyph["tofu"] and 44 <= glyph["width"] <= 52, (
        f"{glyph['ch']!r} in {glyph['font']} draws as a missing-glyph box ({glyph['width']:.0f} px wide): "
        "install a CJK font (apt-get install fonts-noto-cjk; make test does, as root)")
