"""Load every page of the built documentation site in headless Chromium and fail on what a reader would hit.

The site directory (``site/`` from ``nox -s docs``) is served on ``127.0.0.1`` on a free port by a thread of this
process; Debian's Chromium (``/usr/bin/chromium``) is driven through ``/usr/bin/chromedriver`` with Selenium
(nothing is downloaded: Selenium Manager is bypassed by giving it the driver path). Each page is checked for

* console errors (``SEVERE`` entries of the browser log, uncaught exceptions included),
* requests to the local server that failed (404s for pages, scripts, styles, images),
* broken internal links: ``<a href>`` targets on the local site that do not exist, and ``#fragments`` that name
  no element of the target page,
* missing images: ``<img>`` elements that did not load (``naturalWidth == 0``),
* empty API sections: a mkdocstrings object (module, class, function) rendered with no documentation inside
  (an attribute whose declaration is shown but has no docstring is a warning), a top-level module section that documents no public name and has almost no text of its
  own, and an API page (``.../api/`` or ``api.html``) with no rendered object at all.

Failures to load resources from *other* hosts (web fonts, for example, on a machine without network access) are
reported as warnings, not errors, unless ``--strict-external`` is given.

Screenshots of the home page and one package page are saved into ``--screenshots``. The run is bounded by
``--timeout`` seconds in total; the exit status is 0 when no error was found, 1 otherwise, 2 when Chromium or its
driver is missing.

Usage::

    python tools/browser_check.py --site site --screenshots site-screenshots
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urldefrag, urlsplit

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,900",
]

# A top-level module section with no documented member needs at least this much text (a prose-only section such
# as ``options: {members: false}`` is fine; a bare one-line docstring is not).
MIN_MODULE_TEXT = 100

# Runs in the page after load: everything the checks need, in one round trip.
PAGE_PROBE_JS = r"""
const out = {links: [], images: [], ids: [], apiObjects: [], title: document.title};
for (const a of document.querySelectorAll('a[href]')) {
  out.links.push({href: a.href, raw: a.getAttribute('href'), text: (a.textContent || '').trim().slice(0, 60)});
}
for (const img of document.images) {
  out.images.push({src: img.currentSrc || img.src, complete: img.complete, width: img.naturalWidth});
}
for (const el of document.querySelectorAll('[id]')) out.ids.push(el.id);
for (const el of document.querySelectorAll('a[name]')) out.ids.push(el.getAttribute('name'));
for (const obj of document.querySelectorAll('div.doc.doc-object')) {
  const kind = [...obj.classList].find(c => c.startsWith('doc-') && c !== 'doc-object') || 'doc-?';
  const heading = obj.querySelector('.doc-object-name') || obj.querySelector('.doc-heading');
  const contents = [...obj.children].find(c => c.classList.contains('doc-contents'));
  const text = contents ? contents.innerText.trim() : '';
  out.apiObjects.push({
    kind: kind,
    name: heading ? heading.innerText.replace(/[¶#]\s*$/, '').trim().slice(0, 80) : '(no heading)',
    textLength: text.length,
    children: contents ? contents.querySelectorAll('div.doc.doc-object').length : 0,
    signature: !![...obj.children].find(c => c.classList.contains('doc-signature')),
    top: !obj.parentElement.closest('div.doc.doc-object'),
  });
}
return out;
"""


@dataclass
class Report:
    """Errors and warnings collected over the whole site."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    pages: int = 0
    links_checked: int = 0
    images_checked: int = 0
    api_objects: int = 0
    screenshots: list[str] = field(default_factory=list)
    external_failures: dict[str, list[str]] = field(default_factory=dict)  # source URL -> pages

    def error(self, page: str, message: str) -> None:
        """Record an error found on ``page``."""
        self.errors.append(f"{page}: {message}")

    def warn(self, page: str, message: str) -> None:
        """Record a warning found on ``page``."""
        self.warnings.append(f"{page}: {message}")

    def external(self, page: str, source: str) -> None:
        """Record that ``source`` (on another host) failed to load on ``page`` (summarised at the end)."""
        self.external_failures.setdefault(source, []).append(page)


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Static file handler that remembers failed requests instead of printing every request."""

    failures: list[str]

    def log_message(self, format: str, *args: object) -> None:
        pass

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        self.failures.append(f"{code} {self.path}")
        super().send_error(code, message, explain)


def serve(site: Path) -> tuple[http.server.ThreadingHTTPServer, str, list[str]]:
    """Serve ``site`` on 127.0.0.1 on a free port from a daemon thread; returns (server, base URL, failures)."""
    failures: list[str] = []
    handler = functools.partial(type("Handler", (_Handler,), {"failures": failures}), directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    return server, f"http://{host}:{port}/", failures


def site_pages(site: Path) -> list[str]:
    """URL paths (relative to the site root) of every HTML page, the home page first."""
    pages = []
    for html in sorted(site.rglob("*.html")):
        rel = html.relative_to(site).as_posix()
        if rel == "index.html":
            continue
        pages.append(rel[: -len("index.html")] if rel.endswith("/index.html") else rel)
    return ["", *pages]


def resolve_local(site: Path, path: str) -> Path | None:
    """The file that the static server would answer for URL ``path`` (no query, no fragment), or None."""
    rel = unquote(path).lstrip("/")
    target = (site / rel).resolve()
    if not str(target).startswith(str(site.resolve())):
        return None
    if target.is_dir():
        target = target / "index.html"
    return target if target.is_file() else None


def make_driver(chromium: str, chromedriver: str, profile: Path, page_timeout: float):
    """A headless Chromium driven by Selenium through Debian's chromedriver, with a fresh profile."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=chromedriver, log_output=os.devnull)
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(page_timeout)
    driver.set_script_timeout(page_timeout)
    return driver


def wait_loaded(driver, timeout: float) -> None:
    """Wait until the document and its images have finished loading."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        state = driver.execute_script(
            "return document.readyState === 'complete' && [...document.images].every(i => i.complete);"
        )
        if state:
            return
        time.sleep(0.05)


def check_site(
    site: Path,
    screenshots: Path | None,
    package_page: str | None = None,
    chromium: str = CHROMIUM,
    chromedriver: str = CHROMEDRIVER,
    timeout: float = 300.0,
    page_timeout: float = 30.0,
    strict_external: bool = False,
) -> Report:
    """Run every check on the built site in ``site`` and return the report (see the module docstring).

    Args:
        site: the built site directory (with ``index.html``).
        screenshots: directory for ``home.png`` and ``package.png``; None to skip screenshots.
        package_page: site-relative URL path of the package page to screenshot (default: the first of
            ``es-layers/``, ``sign-optim/``, ... that exists, else the first non-home page).
        chromium: path of the Chromium binary.
        chromedriver: path of the matching chromedriver.
        timeout: bound on the whole run in seconds; pages not reached in time are reported as errors.
        page_timeout: bound on loading one page.
        strict_external: treat failed loads from other hosts as errors instead of warnings.
    """
    site = site.resolve()
    report = Report()
    if not (site / "index.html").is_file():
        report.error(str(site), "no index.html: build the site first (nox -s docs)")
        return report
    pages = site_pages(site)
    if package_page is None:
        for name in ("es-layers/", "sign-optim/", "zero-order/", "dni/", "discounted-cumsum/"):
            if name in pages:
                package_page = name
                break
        else:
            package_page = pages[1] if len(pages) > 1 else ""
    shots = {"": "home.png", package_page: "package.png"} if screenshots else {}
    if screenshots:
        screenshots.mkdir(parents=True, exist_ok=True)

    deadline = time.monotonic() + timeout
    server, base, failures = serve(site)
    profile = Path(tempfile.mkdtemp(prefix="altgrad-chromium-"))
    ids_cache: dict[str, set[str]] = {}
    pending_fragments: list[tuple[str, str, str]] = []  # (page, target path, fragment)
    driver = None
    try:
        driver = make_driver(chromium, chromedriver, profile, page_timeout)
        for page in pages:
            if time.monotonic() > deadline:
                report.error(page, f"not checked: the {timeout:.0f} s bound ran out")
                continue
            label = "/" + page
            failures.clear()
            try:
                driver.get(base + page)
            except Exception as exc:  # a page that does not load in page_timeout
                report.error(label, f"did not load: {type(exc).__name__}: {str(exc).splitlines()[0]}")
                continue
            wait_loaded(driver, page_timeout)
            report.pages += 1
            probe = driver.execute_script(PAGE_PROBE_JS)
            time.sleep(0.05)  # let late console messages (async scripts) arrive
            _check_console(report, label, driver.get_log("browser"), base, strict_external)
            for failure in failures:
                report.error(label, f"local request failed: {failure}")
            ids_cache[_page_key(site, page)] = set(probe["ids"])
            _check_links(report, site, label, page, probe["links"], base, pending_fragments, ids_cache)
            _check_images(report, label, probe["images"], base, strict_external)
            _check_api(report, label, page, probe["apiObjects"])
            if page in shots:
                _screenshot(driver, screenshots / shots[page])
                report.screenshots.append(str(screenshots / shots[page]))
    finally:
        if driver is not None:
            driver.quit()
        server.shutdown()
        server.server_close()
        shutil.rmtree(profile, ignore_errors=True)

    for label, key, fragment in pending_fragments:
        ids = ids_cache.get(key)
        if ids is None:  # a target that is not a page we loaded (e.g. a plain file): read its ids statically
            continue
        if fragment not in ids:
            report.error(label, f"broken anchor: #{fragment} is not an id on {key}")
    return report


def _page_key(site: Path, page: str) -> str:
    target = resolve_local(site, page)
    return target.relative_to(site).as_posix() if target else page


def _check_console(report: Report, label: str, entries: list[dict], base: str, strict_external: bool) -> None:
    for entry in entries:
        if entry.get("level") != "SEVERE":
            continue
        message = entry.get("message", "")
        source = message.split(" ", 1)[0]
        external = source.startswith("http") and not source.startswith(base)
        if external and not strict_external:
            report.external(label, source)
        else:
            report.error(label, f"console error: {message[:300]}")


def _check_links(
    report: Report,
    site: Path,
    label: str,
    page: str,
    links: list[dict],
    base: str,
    pending_fragments: list[tuple[str, str, str]],
    ids_cache: dict[str, set[str]],
) -> None:
    for link in links:
        href = link["href"]
        if not href.startswith(base):
            continue  # external, mailto:, javascript: ... are not ours to check
        report.links_checked += 1
        url, fragment = urldefrag(href)
        path = urlsplit(url).path
        target = resolve_local(site, path)
        if target is None:
            report.error(label, f"broken link: {link['raw']!r} ({link['text']!r}) -> {path} does not exist")
            continue
        if fragment and target.suffix == ".html":
            key = target.relative_to(site).as_posix()
            pending_fragments.append((label, key, unquote(fragment)))


def _check_images(report: Report, label: str, images: list[dict], base: str, strict_external: bool) -> None:
    for image in images:
        report.images_checked += 1
        if image["complete"] and image["width"] > 0:
            continue
        src = image["src"]
        if src.startswith((base, "data:")) or strict_external:
            report.error(label, f"missing image: {src}")
        else:
            report.warn(label, f"external image did not load: {src}")


def _check_api(report: Report, label: str, page: str, objects: list[dict]) -> None:
    report.api_objects += len(objects)
    if ("api/" in page or page.endswith("api.html")) and not objects:
        report.error(label, "empty API page: no object documentation was rendered")
    for obj in objects:
        if obj["textLength"] == 0 and obj["children"] == 0:
            if obj["kind"] == "doc-attribute" and obj["signature"]:
                # The attribute's declaration and value are shown; only a description is missing.
                report.warn(label, f"attribute {obj['name']!r} is rendered without a docstring")
            else:
                report.error(label, f"empty API section: {obj['kind']} {obj['name']!r} has no documentation")
        elif (
            obj["top"]
            and obj["kind"] == "doc-module"
            and obj["children"] == 0
            and obj["textLength"] < MIN_MODULE_TEXT
        ):
            report.error(
                label,
                f"empty API section: module {obj['name']!r} documents no public name and has almost no text "
                f"({obj['textLength']} characters)",
            )


def _screenshot(driver, path: Path) -> None:
    """Full-page PNG through the DevTools protocol (falls back to the viewport)."""
    import base64

    try:
        metrics = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})
        size = metrics.get("cssContentSize") or metrics["contentSize"]
        width, height = 1280, min(int(size["height"]), 6000)
        shot = driver.execute_cdp_cmd(
            "Page.captureScreenshot",
            {
                "format": "png",
                "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1},
            },
        )
        path.write_bytes(base64.b64decode(shot["data"]))
    except Exception:
        driver.save_screenshot(str(path))


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--site", type=Path, default=Path("site"), help="built site directory (default: site)"
    )
    parser.add_argument(
        "--screenshots", type=Path, default=None, help="directory for home.png and package.png"
    )
    parser.add_argument(
        "--package-page", default=None, help="site-relative path of the package page to capture"
    )
    parser.add_argument("--chromium", default=os.environ.get("CHROMIUM", CHROMIUM))
    parser.add_argument("--chromedriver", default=os.environ.get("CHROMEDRIVER", CHROMEDRIVER))
    parser.add_argument("--timeout", type=float, default=300.0, help="bound on the whole check, seconds")
    parser.add_argument("--page-timeout", type=float, default=30.0, help="bound on loading one page, seconds")
    parser.add_argument("--strict-external", action="store_true", help="failed external loads are errors")
    parser.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")
    args = parser.parse_args(argv)

    for name, path, package in (
        ("Chromium", args.chromium, "chromium"),
        ("chromedriver", args.chromedriver, "chromium-driver"),
    ):
        if not Path(path).is_file():
            print(
                f"error: {name} not found at {path}. Install Debian's packages first:\n"
                f"    apt-get update && apt-get install -y chromium chromium-driver\n"
                f"(the {package!r} package; no browser is downloaded by this check)",
                file=sys.stderr,
            )
            return 2
    start = time.monotonic()
    report = check_site(
        args.site,
        args.screenshots,
        package_page=args.package_page,
        chromium=args.chromium,
        chromedriver=args.chromedriver,
        timeout=args.timeout,
        page_timeout=args.page_timeout,
        strict_external=args.strict_external,
    )
    elapsed = time.monotonic() - start
    for warning in report.warnings:
        print(f"warning: {warning}")
    for source, pages in report.external_failures.items():
        print(f"warning: external resource failed to load on {len(pages)} page(s) (no network?): {source}")
    for error in report.errors:
        print(f"ERROR: {error}")
    for shot in report.screenshots:
        print(f"screenshot: {shot}")
    print(
        f"browser check: {report.pages} pages, {report.links_checked} internal links, {report.images_checked} images, "
        f"{report.api_objects} API objects; {len(report.errors)} errors, "
        f"{len(report.warnings) + len(report.external_failures)} warnings "
        f"({elapsed:.1f} s)"
    )
    if args.json:
        args.json.write_text(json.dumps(report.__dict__, indent=2))
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
