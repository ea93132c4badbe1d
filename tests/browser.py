"""Open a self-contained HTML report in a real (headless) Chromium and say what it did.

Reusable by any test of an HTML page with plotly figures::

    from .browser import render_report

    chk = render_report(tmp_path / "report.html", screenshot_path=artifacts / "report.png")
    assert chk.ok, chk.problems()            # no JS errors, no network, every figure drawn
    assert chk.n_figures == n_expected

The page is opened from a ``file://`` URL with every request other than ``file:``, ``data:``,
``blob:`` and ``about:`` aborted *and recorded* in :attr:`BrowserCheck.failed_requests` (a
self-contained report makes none), so the check also proves the report works offline.

Chromium: ``$SINKSCOPE_CHROMIUM``, else ``/usr/bin/chromium`` (Debian's; ``make browser``
installs it), else ``chromium`` on ``PATH``; it is driven by the ``playwright`` package and never
downloaded. Without a browser (or without playwright) the calling test is skipped - except under
CI (``$CI`` set and not ``0``/``false``/``no``), where a missing browser fails the test.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

#: Flags for Chromium in a closed network: no sandbox (containers), no GPU, no background traffic.
CHROMIUM_ARGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)
#: URL schemes a self-contained page may load; anything else is aborted and recorded.
LOCAL_SCHEMES = ("file:", "data:", "blob:", "about:")

# A figure counts as drawn when plotly built it (``_fullLayout``), it has its SVG root and at least
# one trace element: scatter/bar/box traces (``.trace``), heat maps (``.hm``), image traces
# (``.im``), pie slices, or a WebGL canvas of nonzero size (scattergl etc.) - and the div has a size.
_TRACE_SELECTOR = ".trace, .hm, .im, .slice, .contourlevel"

_FIGURES_JS = r"""(sel) => Array.from(document.querySelectorAll('.js-plotly-plot')).map((gd, i) => {
    const svg = gd.querySelector('.main-svg');
    const traces = gd.querySelectorAll(sel).length;
    const gl = Array.from(gd.querySelectorAll('canvas')).filter(c => c.width > 0 && c.height > 0).length;
    const t = gd.querySelector('.gtitle');
    const lines = t ? Array.from(t.querySelectorAll('tspan.line')) : [];
    const title = !t ? '' : (lines.length ? lines.map(l => l.textContent) : [t.textContent])
        .map(s => s.replace(/\u200b/g, '').trim()).filter(s => s).join('\n');
    const box = gd.getBoundingClientRect();
    const tb = t ? t.getBoundingClientRect() : null;
    const overlaps = (a, b) => a.left < b.right && b.left < a.right && a.top < b.bottom && b.top < a.bottom;
    const areas = Array.from(gd.querySelectorAll('.nsewdrag')).map(e => e.getBoundingClientRect());
    return {
        id: gd.id || `#${i}`,
        built: !!gd._fullLayout,
        has_svg: !!svg,
        n_trace_elements: traces,
        n_gl_canvases: gl,
        n_data: Array.isArray(gd.data) ? gd.data.length : 0,
        title: title,
        width: Math.round(box.width),
        height: Math.round(box.height),
        title_clipped: !!tb && tb.width > 0 && (tb.left < box.left - 1 || tb.right > box.right + 1),
        title_overlaps_plot: !!tb && tb.width > 0 && areas.some(a => overlaps(tb, a)),
    };
})"""

_ALL_BUILT_JS = """() => {
    if (document.readyState !== 'complete') return false;
    const gds = Array.from(document.querySelectorAll('.js-plotly-plot'));
    return gds.every(gd => gd._fullLayout && gd.querySelector('.main-svg'));
}"""


# Every visible heat map of the page as plotly drew it (``_fullData``: zmin/zmax resolved): how its
# values spread over its colour range - ``spread`` is the standard deviation of (z - zmin) / (zmax -
# zmin) clipped to [0, 1], ``n_colour_bins`` how many tenths of the colour scale hold a value. A
# heat map of one flat colour has spread 0 and one bin.
_HEATMAPS_JS = r"""() => Array.from(document.querySelectorAll('.js-plotly-plot')).flatMap((gd, i) =>
    (gd._fullData || []).filter(t => t.type === 'heatmap' && t.visible === true).map(t => {
        const z = [];
        for (const row of (t.z || [])) for (const v of row) if (v !== null && Number.isFinite(v)) z.push(v);
        const lo = t.zmin, hi = t.zmax, span = hi - lo;
        const u = z.map(v => span > 0 ? Math.min(1, Math.max(0, (v - lo) / span)) : 0);
        const mean = u.reduce((a, b) => a + b, 0) / Math.max(1, u.length);
        const sd = Math.sqrt(u.reduce((a, b) => a + (b - mean) ** 2, 0) / Math.max(1, u.length));
        return {
            figure: gd.id || `#${i}`,
            meta: (gd.data[t.index] || {}).meta || null,
            n_values: z.length,
            zmin: lo,
            zmax: hi,
            spread: sd,
            n_colour_bins: new Set(u.map(x => Math.min(9, Math.floor(x * 10)))).size,
        };
    }))"""


@dataclass
class FigureInfo:
    """One ``.js-plotly-plot`` div as the browser sees it."""

    id: str
    built: bool  # plotly attached ``_fullLayout``
    has_svg: bool  # ``.main-svg`` exists
    n_trace_elements: int  # DOM elements matching the trace selector
    n_gl_canvases: int  # non-empty canvases (WebGL traces)
    n_data: int  # ``gd.data.length``
    title: str  # text of the figure title (``.gtitle``; its lines joined by newlines), '' when none
    width: int
    height: int
    title_clipped: bool = False  # the title runs past the figure's left/right edge (informative)
    title_overlaps_plot: bool = False  # the title's box intersects a plot area (informative)

    @property
    def rendered(self) -> bool:
        drawn = self.n_trace_elements > 0 or self.n_gl_canvases > 0
        return self.built and self.has_svg and drawn and self.width > 0 and self.height > 0


@dataclass
class BrowserCheck:
    """What a real browser made of an HTML report (see :func:`render_report`)."""

    url: str
    js_errors: list[str] = field(default_factory=list)  # uncaught page errors + console.error messages
    failed_requests: list[str] = field(default_factory=list)  # non-local requests (aborted) + failed loads
    n_figures: int = 0  # ``.js-plotly-plot`` divs
    n_rendered: int = 0  # of those, drawn with at least one trace element
    titles: list[str] = field(default_factory=list)  # figure titles from the DOM, page order, '' if none
    figures: list[FigureInfo] = field(default_factory=list)
    heatmaps: list[dict] = field(default_factory=list)  # visible heat maps and their colour spread
    timed_out: bool = False  # not every figure was built within ``timeout_s``
    screenshot: Path | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """No JS errors, no requests off the machine, every figure drawn (and at least one figure)."""
        return (
            not self.js_errors
            and not self.failed_requests
            and self.n_figures > 0
            and self.n_rendered == self.n_figures
        )

    def problems(self) -> str:
        """A readable list of what is wrong, for assertion messages."""
        out = [f"page {self.url}"]
        out += [f"JS error: {e}" for e in self.js_errors]
        out += [f"request: {r}" for r in self.failed_requests]
        out += [
            f"figure {f.id} not rendered (built={f.built}, svg={f.has_svg}, "
            f"trace elements={f.n_trace_elements}, canvases={f.n_gl_canvases}, data={f.n_data})"
            for f in self.figures
            if not f.rendered
        ]
        if self.timed_out:
            out.append("timed out waiting for plotly")
        if self.n_figures == 0:
            out.append("no plotly figure on the page")
        return "\n".join(out)


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def chromium_path() -> str | None:
    """The Chromium executable to use, or None."""
    env = os.environ.get("SINKSCOPE_CHROMIUM")
    if env:
        return env if os.path.exists(env) else None
    if os.path.exists("/usr/bin/chromium"):
        return "/usr/bin/chromium"
    return shutil.which("chromium")


def require_browser() -> str:
    """The Chromium path; skips the calling test without one - fails it under CI."""
    path = chromium_path()
    problem = None
    if path is None:
        where = os.environ.get("SINKSCOPE_CHROMIUM") or "/usr/bin/chromium or chromium on PATH"
        problem = f"no Chromium ({where}; `make browser` installs Debian's)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            problem = "the playwright package is not installed (dev dependency)"
    if problem:
        if _in_ci():
            pytest.fail(f"browser test under CI: {problem}", pytrace=False)
        pytest.skip(f"browser test skipped: {problem}")
    return path


def render_report(
    html_path: str | Path,
    screenshot_path: str | Path | None = None,
    timeout_s: float = 60,
    viewport: tuple[int, int] = (1280, 900),
) -> BrowserCheck:
    """Open ``html_path`` (file:// URL) in headless Chromium, wait until plotly built every figure
    (at most ``timeout_s``; a figure that never renders is reported, not raised), optionally save
    a full-page PNG, and return a :class:`BrowserCheck`."""
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    exe = require_browser()
    html_path = Path(html_path).resolve()
    if not html_path.is_file():
        raise FileNotFoundError(html_path)
    url = html_path.as_uri()
    chk = BrowserCheck(url=url)
    t0 = time.perf_counter()

    def on_route(route):
        req_url = route.request.url
        if req_url.startswith(LOCAL_SCHEMES):
            route.continue_()
        else:
            chk.failed_requests.append(f"{route.request.method} {req_url} (external; blocked)")
            route.abort("blockedbyclient")

    def on_request_failed(req):
        if req.url.startswith(LOCAL_SCHEMES):  # external ones are already recorded by on_route
            chk.failed_requests.append(f"{req.method} {req.url} ({req.failure})")

    def on_console(msg):
        if msg.type == "error":
            loc = msg.location or {}
            where = f" [{loc.get('url', '')}:{loc.get('lineNumber', '')}]" if loc.get("url") else ""
            chk.js_errors.append(f"console.error: {msg.text}{where}")

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=list(CHROMIUM_ARGS))
        try:
            page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
            page.on("pageerror", lambda err: chk.js_errors.append(f"uncaught: {err}"))
            page.on("console", on_console)
            page.on("requestfailed", on_request_failed)
            page.route("**/*", on_route)
            page.goto(url, wait_until="load", timeout=timeout_s * 1000)
            try:
                page.wait_for_function(_ALL_BUILT_JS, timeout=timeout_s * 1000, polling=100)
            except PlaywrightError:
                chk.timed_out = True
            # let plotly finish asynchronous drawing (images of heat maps, autosize) before measuring
            page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
            chk.figures = [FigureInfo(**f) for f in page.evaluate(_FIGURES_JS, _TRACE_SELECTOR)]
            chk.n_figures = len(chk.figures)
            chk.n_rendered = sum(f.rendered for f in chk.figures)
            chk.titles = [f.title for f in chk.figures]
            chk.heatmaps = page.evaluate(_HEATMAPS_JS)
            if screenshot_path is not None:
                screenshot_path = Path(screenshot_path)
                screenshot_path.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(screenshot_path), full_page=True)
                chk.screenshot = screenshot_path
        finally:
            browser.close()
    chk.seconds = time.perf_counter() - t0
    return chk
