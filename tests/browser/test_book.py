"""The course site (`make book`, issue 15) in a real browser.

The site is built once into a temporary folder (book/build_book.py: README, docs/, the course guide, the executed
report notebooks, the student notebooks as downloads), served by Python's http.server on 127.0.0.1 and crawled
in headless Chromium (Debian's, driven by Playwright) from index.html through every internal link. Checked:
every internal link answers 200 and its #anchor exists on the target page; every image loads (naturalWidth > 0);
no page logs a console error or asks for anything off the site (it must work offline); each executed notebook's
page shows a figure; the student-notebook page links every file of course/student and each download is that file.
The landing page's screenshot goes to reports/screenshots/book.png.

The site needs the executed notebooks. Those of `make report` (reports/tiny/executed/, git-ignored) are used when
they are there and current (each one's stamp matches its notebook in notebooks/). The others (a fresh clone: all)
come from nbval when `make test` ran it over notebooks/ in the same session (tests/conftest.py keeps what its
kernels printed and drew and moves this test after them; those ran with every default, so the stage notebooks
show live training where the report shows the reference checkpoints). What is still missing is executed with its
default parameters (live training off, as in the report) into a temporary folder, two at a time
(build_book.execute_notebooks: about 4 minutes for all on two cores), once per session. BOOK_EXECUTE=1 executes
them all whatever the report holds. Which way it went, and how long execution took, is printed.
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

from labkit.core.paths import project_root

pytestmark = pytest.mark.slow

ROOT = project_root()
SHOTS = ROOT / "reports" / "screenshots"
sys.path.insert(0, str(ROOT / "book"))

import build_book  # noqa: E402  (book/ is not a package: the build script lives there)

NBVAL_NOTEBOOKS = "labkit-nbval-notebooks"  # tests/conftest.py registers it: the notebooks nbval executed

# After load: every image made eager and awaited (a lazy one below the fold would never load), then the page's
# links, images and ids (anchor targets).
PAGE_FACTS = """async () => {
  const images = [...document.images];
  const described = images.map(image => image.getAttribute("src") ||
    `an <img> without src, in "${(image.parentElement.textContent || "").trim().slice(0, 80)}"`);
  for (const image of images) image.loading = "eager";
  const loaded = Promise.all(images.map(image => image.complete ? null : new Promise(done => {
    image.addEventListener("load", done); image.addEventListener("error", done); })));
  await Promise.race([loaded, new Promise(done => setTimeout(done, 30000))]);
  return {
    links: [...document.querySelectorAll("a[href]")].map(a => ({href: a.href, raw: a.getAttribute("href")})),
    images: images.map((image, i) => ({src: described[i], width: image.naturalWidth,
                                  output: image.closest(".cell_output") !== null})),
    ids: [...document.querySelectorAll("[id]")].map(e => e.id)
           .concat([...document.querySelectorAll("a[name]")].map(a => a.name)),
    text: document.body.innerText,
  };
}"""


def _say(config, text: str) -> None:
    """A line on the terminal, past pytest's output capture."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:
        print(text)
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line(text)


@pytest.fixture(scope="session")
def executed_notebooks(request, tmp_path_factory):
    """The folder of executed notebooks the site is built from: the report's when all are current, else a
    temporary one with the current ones copied, those nbval ran whole in this session written, and the others
    (all, under BOOK_EXECUTE=1) executed."""
    report = build_book.executed_folder("tiny")
    force = os.environ.get("BOOK_EXECUTE", "") not in ("", "0")
    stale = list(build_book.REPORT_NOTEBOOKS) if force else build_book.stale_notebooks(report)
    if not stale:
        _say(request.config, f"book: the report's executed notebooks are current: building from {report}")
        return report
    folder = tmp_path_factory.mktemp("executed")
    for name in build_book.REPORT_NOTEBOOKS:
        if name not in stale:
            for suffix in (".ipynb", ".json"):
                shutil.copy2(report / f"{name}{suffix}", folder / f"{name}{suffix}")
    nbval = request.config.pluginmanager.get_plugin(NBVAL_NOTEBOOKS)
    from_nbval = [] if force or nbval is None else [name for name in stale if _write_nbval_run(nbval, name, folder)]
    if from_nbval:
        _say(request.config, f"book: {len(from_nbval)} notebook(s) as nbval executed them in this session")
        stale = [name for name in stale if name not in from_nbval]
    if not stale:
        return folder
    why = "BOOK_EXECUTE is set" if force else f"{report} lacks or holds out of date {len(stale)} of them"
    _say(request.config, f"book: executing {len(stale)} notebook(s) into {folder} ({why}): minutes")
    start = time.perf_counter()
    try:
        seconds = build_book.execute_notebooks(folder, "tiny", stale, echo=lambda line: _say(request.config, line))
    except build_book.ExecutionFailed as error:
        pytest.fail(str(error))
    _say(
        request.config,
        f"book: executed {len(seconds)} notebook(s) in {time.perf_counter() - start:.0f} s wall "
        f"({sum(seconds.values()):.0f} s of notebook time, {build_book.EXECUTE_WORKERS} at a time)",
    )
    return folder


def _write_nbval_run(nbval, name: str, folder) -> bool:
    """Write `name` as this session's nbval run of its notebook executed it (default parameters: the stage
    notebooks train live, where the report's pages show the reference checkpoints); False when nbval did not run
    it whole."""
    import nbformat

    notebook = nbval.executed(build_book.source_notebook(name))
    if notebook is None:
        return False
    nbformat.write(notebook, str(folder / f"{name}.ipynb"))
    return True


@pytest.fixture(scope="module")
def site(tmp_path_factory, executed_notebooks):
    """The site, built (quietly) into a temporary folder."""
    try:
        return build_book.build(tmp_path_factory.mktemp("book"), preset="tiny", quiet=True, executed=executed_notebooks)
    except build_book.MissingNotebooks as error:
        pytest.fail(str(error))


@pytest.fixture(scope="module")
def server(site):
    """http.server on a free port of 127.0.0.1, serving the site's HTML folder; its address."""

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(site.html)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("Debian's chromium is not installed: `make test` installs it (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    # as root Chromium needs --no-sandbox; no background networking (updates, safe browsing): the site is offline
    args = ["--disable-background-networking", "--disable-component-update", "--no-first-run"]
    args += ["--no-sandbox"] if os.geteuid() == 0 else []
    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=chromium, args=args)
        yield instance
        instance.close()


def _status(url: str, cache: dict[str, int]) -> int:
    if url not in cache:
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                response.read()
                cache[url] = response.status
        except urllib.error.HTTPError as error:
            cache[url] = error.code
        except OSError:
            cache[url] = -1
    return cache[url]


@pytest.fixture(scope="module")
def crawl(site, server, browser):
    """Every HTML page reachable from index.html through internal links: {page: facts} (facts: links, images,
    ids, text, console errors, requests that left the site), plus the links' HTTP statuses under "_status"."""
    page = browser.new_page(viewport={"width": 1300, "height": 1000})
    errors: list[str] = []
    outside: list[str] = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))

    def route(route_):
        if route_.request.url.startswith(server + "/") or route_.request.url.startswith("data:"):
            route_.continue_()
        else:  # the site must work offline: anything it fetches from elsewhere is recorded and refused
            outside.append(route_.request.url)
            route_.abort()

    page.route("**/*", route)
    pages: dict[str, dict] = {}
    statuses: dict[str, int] = {}
    queue = deque([f"{server}/index.html"])
    seen = set(queue)
    while queue:
        url = queue.popleft()
        errors.clear()
        outside.clear()
        response = page.goto(url, wait_until="load", timeout=60_000)
        facts = page.evaluate(PAGE_FACTS)
        facts.update(status=response.status if response else None, errors=list(errors), outside=list(outside))
        pages[url] = facts
        if url == f"{server}/index.html":
            SHOTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SHOTS / "book.png"))
        for link in facts["links"]:
            target = urllib.parse.urldefrag(link["href"]).url
            if not target.startswith(server + "/"):
                continue  # external (http(s) elsewhere, mailto:, javascript:)
            if target.endswith("/"):
                target += "index.html"
            if target.endswith(".html") and target not in seen and _status(target, statuses) == 200:
                seen.add(target)
                queue.append(target)
    page.close()
    return {"pages": pages, "status": statuses, "server": server}


def _name(crawl: dict, url: str) -> str:
    return url.removeprefix(crawl["server"] + "/")


def test_sources_have_no_broken_links(site):
    """Every relative link of the README, docs/, the course guide, the report and the notebooks' Markdown goes to
    a page of the site, or to a file of the checkout (copied into the site as a download)."""
    assert not site.problems, "broken links in the sources:\n" + "\n".join(site.problems)


def test_sphinx_has_no_warnings(site):
    assert not site.warnings, "Sphinx warnings:\n" + "\n".join(site.warnings)


def test_internal_links_resolve(crawl):
    broken = []
    for url, facts in crawl["pages"].items():
        for link in facts["links"]:
            target, fragment = urllib.parse.urldefrag(link["href"])
            if not target.startswith(crawl["server"] + "/"):
                continue
            if target.endswith("/"):
                target += "index.html"
            status = _status(target, crawl["status"])
            if status != 200:
                broken.append(f"{_name(crawl, url)}: link {link['raw']!r} -> HTTP {status}")
            elif fragment and target in crawl["pages"]:
                if urllib.parse.unquote(fragment) not in crawl["pages"][target]["ids"]:
                    broken.append(f"{_name(crawl, url)}: link {link['raw']!r}: no #{fragment} on that page")
    assert len(crawl["pages"]) > 10, f"only {len(crawl['pages'])} pages reachable from index.html"
    assert not broken, f"{len(broken)} broken internal links:\n" + "\n".join(broken)


def test_images_load(crawl):
    broken = [
        f"{_name(crawl, url)}: image {image['src']} did not load"
        for url, facts in crawl["pages"].items()
        for image in facts["images"]
        if image["width"] == 0
    ]
    assert not broken, "\n".join(broken)


def test_no_console_errors_and_nothing_fetched_from_elsewhere(crawl):
    problems = [
        f"{_name(crawl, url)}: console error: {error}" for url, f in crawl["pages"].items() for error in f["errors"]
    ]
    problems += [f"{_name(crawl, url)}: fetched {other}" for url, f in crawl["pages"].items() for other in f["outside"]]
    assert not problems, "\n".join(problems)


def test_every_executed_notebook_page_shows_a_figure(site, crawl):
    assert len(site.notebook_pages) == len(build_book.REPORT_NOTEBOOKS)
    for page, notebook in site.notebook_pages.items():
        url = f"{crawl['server']}/{page}"
        assert url in crawl["pages"], f"{page} ({notebook}) is not reachable from index.html"
        figures = [image for image in crawl["pages"][url]["images"] if image["output"] and image["width"] > 0]
        assert figures, f"{page} ({notebook}) shows no figure among its cell outputs"


def test_student_notebooks_are_downloads(site, crawl):
    url = f"{crawl['server']}/{site.student_page}"
    assert url in crawl["pages"], f"{site.student_page} is not reachable from index.html"
    facts = crawl["pages"][url]
    if not site.student_files:
        assert "No student notebooks have been built" in facts["text"]
    for name, path in site.student_files.items():
        basename = name.rsplit("/", 1)[-1]
        links = [link["href"] for link in facts["links"] if urllib.parse.unquote(link["href"]).endswith(f"/{basename}")]
        assert links, f"{site.student_page} has no download link for course/student/{name}"
        with urllib.request.urlopen(links[0], timeout=30) as response:
            assert response.status == 200, f"{site.student_page}: {links[0]} -> HTTP {response.status}"
            assert response.read() == path.read_bytes(), f"{site.student_page}: {links[0]} is not course/student/{name}"
