"""The built book in a real browser: every page opened in headless Chromium.

``python -m vstain.book.browser book/_build/html`` (what ``make check-book`` runs) opens each HTML page
of a jupyter-book build in headless Chromium and fails when

- a page does not load, or throws a JavaScript error;
- a local resource (image, script, stylesheet) does not load, or an ``<img>`` or a local link points
  at a file that is not on disk;
- a 3D viewer (:mod:`vstain.plots.viewer`) does not answer its z-slider or channel menu;
- the results page lacks Table 4.1, the confusion matrices, a 3D viewer or a code cell collapsed
  behind a toggle (the ``hide-input`` tag the pipeline gives to code that only loads or draws).

It saves a 1280x2000 screenshot of each page under ``<html>/../screenshots/``. Requests to other
hosts (MathJax's CDN) are reported but do not fail the check: the machines that build the book are
offline, a reader's browser is not.

Chromium is driven by :mod:`vstain.book.devtools`; each check here is a small function of what the
page probe returned.
"""
from __future__ import annotations

import argparse
import base64
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

from .devtools import DevTools, find_chromium

SKIP_DIRS = {"_static", "_sources", "_images", "_sphinx_design_static", "_panels_static"}

# Run in the page after load: make lazy images load, wait for every image to settle, report those
# that did not decode and the text and tables the results check needs.
_PAGE_PROBE = """
(async () => {
  const imgs = Array.from(document.images).filter(i => !i.closest('.vstain-viewer'));  // viewers: below
  for (const i of imgs) { i.loading = 'eager'; }
  await Promise.race([
    Promise.all(imgs.map(i => i.complete ? null : new Promise(r => { i.onload = i.onerror = r; }))),
    new Promise(r => setTimeout(r, 15000)),
  ]);
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
    await Promise.race([MathJax.startup.promise, new Promise(r => setTimeout(r, 20000))]);
  }
  const main = document.querySelector('main') || document.body;
  const viewers = [];  // each vstain viewer: move its z-slider and its channel menu, see what changed
  for (const root of document.querySelectorAll('.vstain-viewer')) {
    const slider = root.querySelector('input.vv-z'), menu = root.querySelector('select.vv-channel');
    const srcs = () => Array.from(root.querySelectorAll('.vv-xy img')).map(i => i.getAttribute('src') || '');
    const line = () => (root.querySelector('.vv-zline') || {style: {}}).style.top;
    const v = {id: root.id, depth: slider ? Number(slider.max) + 1 : 0, controls: !!(slider && menu)};
    if (v.controls) {
      const z0 = slider.value, c0 = menu.value, before = srcs(), line0 = line();
      slider.value = String((Number(z0) + 1) % v.depth);
      slider.dispatchEvent(new Event('input', {bubbles: true}));
      const afterZ = srcs();
      menu.value = String((Number(c0) + 1) % menu.options.length);
      menu.dispatchEvent(new Event('change', {bubbles: true}));
      const afterC = srcs();
      const shown = Array.from(root.querySelectorAll('.vv-xy img')).filter(i => i.style.visibility !== 'hidden');
      Object.assign(v, {images: before.length, empty: shown.filter(i => !i.getAttribute('src')).length,
                        line_moved: line() !== line0,
                        z_changed: afterZ.filter((s, i) => s !== before[i]).length, bf_changed: afterZ[0] !== before[0],
                        channel_changed: afterC.filter((s, i) => s !== afterZ[i]).length});
      slider.value = z0; menu.value = c0;  // back to the first view for the screenshot
      slider.dispatchEvent(new Event('input', {bubbles: true}));
      const decoded = await Promise.all(Array.from(root.querySelectorAll('.vv-box img'))
        .filter(i => i.getAttribute('src')).map(i => i.decode().then(() => true, () => false)));
      v.undecoded = decoded.filter(ok => !ok).length;
    }
    viewers.push(v);
  }
  return JSON.stringify({
    viewers: viewers,
    hidden_inputs: document.querySelectorAll('.tag_hide-input').length,
    title: document.title,
    broken: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.currentSrc || i.src),
    loaded: imgs.filter(i => i.complete && i.naturalWidth > 0).length,
    text: main.innerText,
    tables: Array.from(main.querySelectorAll('table')).map(t => t.innerText.slice(0, 2000)),
    math: document.querySelectorAll('.math').length,
    typeset: document.querySelectorAll('mjx-container').length,
    mathjax: (Array.from(document.scripts).map(s => s.src).find(u => /mathjax/i.test(u))) || '',
  });
})()
"""


# --------------------------------------------------------------------------------------------
# What is on disk
# --------------------------------------------------------------------------------------------
class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images: list[str] = []
        self.links: list[str] = []
        self.redirect: str | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "meta" and (a.get("http-equiv") or "").lower() == "refresh" and "url=" in (a.get("content") or ""):
            self.redirect = a["content"].split("url=", 1)[1].strip()
            self.links.append(self.redirect)
        elif tag == "img" and a.get("src"):
            self.images.append(a["src"])
        elif tag == "a" and a.get("href"):
            self.links.append(a["href"])


def _local_target(page: Path, ref: str) -> Path | None:
    """The file a relative reference points at, or None for other hosts, anchors, data: URIs."""
    parts = urlsplit(ref)
    if parts.scheme or parts.netloc or not parts.path:
        return None
    return (page.parent / unquote(parts.path)).resolve()


def _refs(page: Path) -> _Refs:
    refs = _Refs()
    refs.feed(page.read_text(errors="replace"))
    return refs


def missing_on_disk(page: Path) -> tuple[list[str], list[str]]:
    """``<img src>`` and ``<a href>`` (and a redirect's target) of a page that point at local
    files that do not exist."""
    refs = _refs(page)
    imgs = [r for r in refs.images if (t := _local_target(page, r)) is not None and not t.exists()]
    links = [r for r in refs.links if (t := _local_target(page, r)) is not None and not t.exists()]
    return imgs, links


def html_pages(html_dir: Path) -> list[Path]:
    """Every HTML page of a build, except Sphinx's static and source copies."""
    return sorted(p for p in html_dir.rglob("*.html") if not SKIP_DIRS & set(p.relative_to(html_dir).parts[:-1]))


# --------------------------------------------------------------------------------------------
# The check
# --------------------------------------------------------------------------------------------
@dataclass
class PageReport:
    page: str  # relative to the html folder
    errors: list[str] = field(default_factory=list)
    external: list[str] = field(default_factory=list)  # requests to other hosts that failed (offline)
    images: int = 0  # images that loaded
    viewers: int = 0  # 3D viewers whose controls were tried
    screenshot: str = ""
    title: str = ""


RESULTS_MIN_FIGURES = 4  # Figures 4.1 (the confusion matrices), 4.2, 4.3 and 4.4


def check_results_page(probe: dict) -> list[str]:
    """Table 4.1, the confusion matrices, a 3D viewer and a collapsed code cell must be on the results page."""
    errors = []
    text = probe.get("text", "")
    if "Table 4.1" not in text:
        errors.append("results page: no 'Table 4.1' in the text")
    metric_tables = [t for t in probe.get("tables", []) if sum(m in t for m in ("SSIM", "MSE", "MAE", "PCC")) >= 3]
    if not metric_tables:
        errors.append("results page: no table with the SSIM/MSE/MAE/PCC columns of Table 4.1")
    if "Figure 4.1" not in text or "confusion" not in text.lower():
        errors.append("results page: no 'Figure 4.1' section with the confusion matrices")
    if not probe.get("viewers"):
        errors.append("results page: no 3D viewer (.vstain-viewer) of the test FOVs")
    if not probe.get("hidden_inputs"):
        errors.append("results page: no code cell collapsed behind a toggle (.tag_hide-input)")
    if probe.get("loaded", 0) < RESULTS_MIN_FIGURES:
        errors.append(f"results page: {probe.get('loaded', 0)} figures loaded, expected at least "
                      f"{RESULTS_MIN_FIGURES} (Figures 4.1-4.4)")
    return errors


def check_viewers(probe: dict) -> list[str]:
    """Every 3D viewer of a page (:mod:`vstain.plots.viewer`) must answer its controls: moving the
    z-slider changes the brightfield's XY image and moves the XZ sections' z-line, choosing another
    channel changes a channel image, and no image is left without a source."""
    errors = []
    for v in probe.get("viewers", []):
        name = f"viewer {v.get('id') or '(no id)'}"
        if not v.get("controls"):
            errors.append(f"{name}: no z-slider (input.vv-z) or channel menu (select.vv-channel)")
            continue
        if v.get("depth", 0) < 2:
            errors.append(f"{name}: its z-slider has {v.get('depth')} position(s); a volume needs at least 2")
            continue
        if v.get("empty"):
            errors.append(f"{name}: {v['empty']} of {v.get('images')} XY images are shown without a source")
        if v.get("undecoded"):
            errors.append(f"{name}: {v['undecoded']} image(s) do not decode")
        if not v.get("bf_changed") or not v.get("line_moved"):
            errors.append(f"{name}: moving the z-slider did not change the brightfield image "
                          f"({'changed' if v.get('bf_changed') else 'same'}) or move the z-line "
                          f"({'moved' if v.get('line_moved') else 'still'})")
        if not v.get("channel_changed"):
            errors.append(f"{name}: choosing another channel changed no image")
    return errors


def _classify_network_failures(events: list[dict]) -> tuple[list[str], list[str]]:
    urls = {}
    for ev in events:
        if ev["method"] == "Network.requestWillBeSent":
            urls[ev["params"]["requestId"]] = ev["params"]["request"]["url"]
    local, external = [], []
    for ev in events:
        p = ev.get("params", {})
        if ev["method"] == "Network.loadingFailed" and not p.get("canceled"):
            url = urls.get(p["requestId"], "?")
            (local if url.startswith("file:") else external).append(f"{url} ({p.get('errorText')})")
        elif ev["method"] == "Network.responseReceived" and p["response"].get("status", 200) >= 400:
            url = p["response"]["url"]
            (local if url.startswith("file:") else external).append(f"{url} (HTTP {p['response']['status']})")
    return local, external


def _page_errors(events: list[dict]) -> list[str]:
    errors = []
    for ev in events:
        p = ev.get("params", {})
        if ev["method"] == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            errors.append(f"JavaScript exception: {d.get('exception', {}).get('description') or d.get('text')}")
        elif ev["method"] == "Log.entryAdded" and p["entry"]["level"] == "error" and p["entry"]["source"] != "network":
            errors.append(f"console ({p['entry']['source']}): {p['entry']['text']}")
        elif ev["method"] == "Runtime.consoleAPICalled" and p.get("type") == "error":
            args = " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", []))
            errors.append(f"console.error: {args}")
    return errors


def check_book(
    html_dir: Path,
    screenshots: Path | None = None,
    results_page: str | None = "notebooks/07_results.html",
    chromium: str | None = None,
    full_page: bool = False,
    log=print,
    browsers: int = 3,
) -> list[PageReport]:
    """Open every page of ``html_dir`` in headless Chromium; see the module docstring.

    Args:
        html_dir: a jupyter-book ``_build/html`` folder.
        screenshots: where the PNGs go (default: ``html_dir/../screenshots``).
        results_page: the page (relative to ``html_dir``) that must hold Table 4.1, the confusion
            matrices, a 3D viewer and a collapsed code cell; None or "" to skip that check.
        chromium: the browser's path (default: ``/usr/bin/chromium`` or ``$CHROMIUM``).
        full_page: screenshot the whole page (at most 20000 px high), not the 1280x2000 window.
        browsers: Chromium instances that share the pages (a page mostly waits: for its load, its
            images, MathJax and a quiet spell that catches late errors; three opened the quick
            study's 27 pages in 12.6 s on two cores, one in 19.3 s).

    Returns:
        One report per page, in page order; the check passed when no report has errors.
    """
    html_dir = Path(html_dir).resolve()
    if not (html_dir / "index.html").exists():
        raise FileNotFoundError(f"{html_dir} holds no index.html: build the book first (make book)")
    shots = Path(screenshots) if screenshots else html_dir.parent / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    pages = html_pages(html_dir)
    reports = []
    if results_page and results_page not in [p.relative_to(html_dir).as_posix() for p in pages]:
        reports.append(PageReport(results_page, errors=[f"the results page {results_page} was not built"]))
    if browsers < 1:
        raise ValueError(f"browsers must be at least 1, got {browsers}")
    browser = find_chromium(chromium)
    if not pages:
        return reports
    groups = [pages[i::browsers] for i in range(min(browsers, len(pages)))]
    with ExitStack() as stack:  # each Chromium started here, one after another, not from a worker thread
        tools = [stack.enter_context(DevTools(browser)) for _ in groups]
        with ThreadPoolExecutor(len(groups)) as pool:
            done = list(pool.map(lambda dt, group: _check_pages(dt, group, html_dir, shots, results_page, full_page),
                                 tools, groups))
    by_page = {rep.page: (rep, lines) for group in done for rep, lines in group}
    for page in pages:
        rep, lines = by_page[page.relative_to(html_dir).as_posix()]
        reports.append(rep)
        for line in lines:
            log(line)
    return reports


def _check_pages(dt: DevTools, pages: list[Path], html_dir: Path, shots: Path, results_page: str | None,
                 full_page: bool) -> list[tuple[PageReport, list[str]]]:
    """:func:`check_book` for some of the pages, in one Chromium: each page's report and its log
    lines. A browser that stops answering raises, naming the page it was on."""
    out = []
    rel = "about:blank"
    try:
        target = dt.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        sid = dt.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Network", "Log"):
            dt.send(f"{domain}.enable", session=sid)
        w, h = dt.window
        dt.send("Emulation.setDeviceMetricsOverride",
                {"width": w, "height": h, "deviceScaleFactor": 1, "mobile": False}, session=sid)
        for page in pages:
            rel = page.relative_to(html_dir).as_posix()
            rep = PageReport(rel)
            if _refs(page).redirect is not None:  # jupyter-book's index.html: a meta refresh to the root page
                imgs, links = missing_on_disk(page)
                rep.errors += [f"redirect to a missing file: {u}" for u in links]
                out.append((rep, [f"  {rel:<40} {'redirect' if not rep.errors else 'BROKEN redirect'}"]))
                continue
            dt.drain(0.05)
            dt.events.clear()
            nav = dt.send("Page.navigate", {"url": page.as_uri()}, session=sid)
            if nav.get("errorText"):
                rep.errors.append(f"navigation failed: {nav['errorText']}")
                out.append((rep, [f"  {rel:<40} 1 error(s)", f"      {rep.errors[0]}"]))
                continue
            if dt.wait_event("Page.loadEventFired", timeout=60) is None:
                rep.errors.append("the page did not finish loading within 60 s")
            res = dt.send("Runtime.evaluate", {"expression": _PAGE_PROBE, "awaitPromise": True,
                                               "returnByValue": True}, session=sid, timeout=60)
            if "exceptionDetails" in res:
                rep.errors.append(f"the page probe failed: {res['exceptionDetails'].get('text')}")
            probe = json.loads(res.get("result", {}).get("value") or "{}")
            dt.drain(0.3)
            rep.title, rep.images = probe.get("title", ""), probe.get("loaded", 0)
            rep.viewers = len(probe.get("viewers", []))
            rep.errors += check_viewers(probe)
            rep.errors += _page_errors(dt.events)
            local, rep.external = _classify_network_failures(dt.events)
            rep.errors += [f"local resource failed to load: {u}" for u in local]
            rep.errors += [f"image did not load: {u}" for u in probe.get("broken", []) if u.startswith("file:")]
            rep.external += [f"image {u}" for u in probe.get("broken", []) if not u.startswith("file:")]
            imgs, links = missing_on_disk(page)
            rep.errors += [f"<img src> not on disk: {u}" for u in imgs]
            rep.errors += [f"link to a missing file: {u}" for u in links]
            if probe.get("math") and probe.get("mathjax", "").startswith("file:") and not probe.get("typeset"):
                rep.errors.append(f"{probe['math']} equation(s) left as raw LaTeX: the local MathJax typeset none")
            if rel == results_page:
                rep.errors += check_results_page(probe)
            if full_page:  # a window as tall as the page, then back to the normal window
                height = dt.send("Page.getLayoutMetrics", session=sid)["cssContentSize"]["height"]
                dt.send("Emulation.setDeviceMetricsOverride", {"width": w, "height": int(min(height, 20000)),
                                                               "deviceScaleFactor": 1, "mobile": False}, session=sid)
            shot = dt.send("Page.captureScreenshot", {"format": "png"}, session=sid, timeout=60)
            if full_page:
                dt.send("Emulation.setDeviceMetricsOverride",
                        {"width": w, "height": h, "deviceScaleFactor": 1, "mobile": False}, session=sid)
            png = shots / (rel[: -len(".html")].replace("/", "__") + ".png")
            png.write_bytes(base64.b64decode(shot["data"]))
            rep.screenshot = str(png)
            status = "ok" if not rep.errors else f"{len(rep.errors)} error(s)"
            out.append((rep, [f"  {rel:<40} {status:<12} images {rep.images:>3}  -> {png.name}",
                              *(f"      {e}" for e in rep.errors)]))
    except (TimeoutError, RuntimeError) as exc:
        raise type(exc)(f"{rel}: {exc}") from exc
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vstain.book.browser", description=__doc__.split("\n\n")[0])
    ap.add_argument("html_dir", type=Path, nargs="?", default=Path("book/_build/html"))
    ap.add_argument("--screenshots", type=Path, help="default: <html_dir>/../screenshots")
    ap.add_argument("--results-page", default="notebooks/07_results.html",
                    help="page that must hold Table 4.1 and the confusion matrices ('' to skip)")
    ap.add_argument("--chromium", help="path to the browser (default /usr/bin/chromium)")
    ap.add_argument("--full-page", action="store_true", help="screenshot whole pages, not the 1280x2000 window")
    args = ap.parse_args(argv)
    print(f"[browser] checking {args.html_dir} in headless Chromium")
    try:
        reports = check_book(args.html_dir, args.screenshots, args.results_page or None, args.chromium,
                             args.full_page)
    except (FileNotFoundError, TimeoutError, RuntimeError) as exc:
        print(f"[browser] ERROR: {exc}", file=sys.stderr)
        return 2
    bad = [r for r in reports if r.errors]
    external = sorted({u for r in reports for u in r.external})
    if external:
        print(f"[browser] {len(external)} request(s) to other hosts failed (offline machine; not an error):")
        for u in external[:10]:
            print(f"    {u}")
    for r in bad:
        print(f"[browser] FAIL {r.page}:", file=sys.stderr)
        for e in r.errors:
            print(f"    {e}", file=sys.stderr)
    shots = {Path(r.screenshot).parent for r in reports if r.screenshot}
    print(f"[browser] {len(reports) - len(bad)} of {len(reports)} pages ok; "
          f"screenshots in {', '.join(map(str, shots))}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
