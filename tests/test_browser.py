"""The HTML reports in a real browser (headless Chromium, offline): scan, probe and flow reports
built by the library from tiny models with planted sinks, plus one broken page proving the
harness fails when it should.

Each report must raise no JS error, request nothing off the machine, and draw every figure its
writer embedded (counted on the Python side by watching ``plotly.io.to_html``). Full-page
screenshots and a JSON of each check go to ``$SINKSCOPE_TEST_ARTIFACTS`` (default:
``test-artifacts/`` in the repository root). Skipped without Chromium, except under CI.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
import pytest
from PIL import Image

from sinkscope.models.tiny import paint_markers

from .browser import BrowserCheck, render_report, require_browser
from .conftest import CELLS, H, W

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", autouse=True)
def _browser():
    require_browser()  # skip (or, under CI, fail) the whole module up front when there is no browser


@pytest.fixture(scope="module")
def artifacts() -> Path:
    d = Path(os.environ.get("SINKSCOPE_TEST_ARTIFACTS") or ROOT / "test-artifacts")
    d.mkdir(parents=True, exist_ok=True)
    return d


@contextlib.contextmanager
def counting_figures():
    """Record every figure a report writer turns into HTML (all of them go through plotly.io.to_html)."""
    calls: list[dict] = []
    real = pio.to_html

    def spy(fig, *args, **kwargs):
        calls.append({"figure": fig, "div_id": kwargs.get("div_id")})
        return real(fig, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pio, "to_html", spy)
        yield calls


def _check(html: Path, name: str, artifacts: Path) -> BrowserCheck:
    chk = render_report(html, screenshot_path=artifacts / f"{name}.png")
    record = dataclasses.asdict(chk) | {"screenshot": str(chk.screenshot), "ok": chk.ok}
    (artifacts / f"{name}.json").write_text(json.dumps(record, indent=1, ensure_ascii=False))
    return chk


def _assert_clean(chk: BrowserCheck, n_expected: int) -> None:
    assert n_expected > 0
    assert not chk.js_errors, chk.problems()
    assert not chk.failed_requests, chk.problems()  # self-contained: nothing from the network
    assert not chk.timed_out, chk.problems()
    assert chk.n_figures == n_expected, chk.problems()
    assert chk.n_rendered == chk.n_figures, chk.problems()
    assert len(chk.titles) == chk.n_figures
    png = Image.open(chk.screenshot)
    assert png.width >= 1000 and png.height > 600
    assert np.asarray(png.convert("L")).std() > 5  # not a blank page


def _save(img: np.ndarray, path: Path) -> Path:
    Image.fromarray(img).save(path)
    return path


# ----------------------------------------------------------------------------------------------- reports


@pytest.fixture(scope="module")
def scan_report(tmp_path_factory, marked_images):
    from sinkscope import scan, write_result_page

    d = tmp_path_factory.mktemp("browser-scan")
    # two images with planted sinks, one without, at a non-default size (6 x 5 patch grid)
    paths = [str(_save(marked_images[i], d / f"img{i}.png")) for i in (0, 1, 3)]
    res = scan(
        "tiny-dinov2+sinks",
        paths,
        method="all",  # attention too: the report gains its attention figure
        threshold=100,
        image_size=(H, W),
        out=d / "out",
        progress=False,
        report=False,
    )
    with counting_figures() as figs:
        write_result_page(res)
    return d / "out" / "report.html", res, figs


@pytest.fixture(scope="module")
def probe_report(tmp_path_factory):
    from sinkscope import probe

    d = tmp_path_factory.mktemp("browser-probe")
    for cls, color in (("a", (200, 30, 0)), ("b", (0, 30, 200))):
        (d / "data" / cls).mkdir(parents=True)
        for i in range(6):
            img = np.full((H, W, 3), [min(255, v + 7 * i) for v in color], np.uint8)
            _save(paint_markers(img, CELLS[i % 3]), d / "data" / cls / f"{i}.png")
    with counting_figures() as figs:
        res = probe(
            "tiny-dinov2+sinks",
            str(d / "data"),
            labels=["label", "row"],  # a classification and a position-regression figure
            groups=["cls", "mean", "random", "sink"],
            layers=[0, 2, 4],
            folds=3,
            image_size=(H, W),
            out=d / "out",
            cache=False,
            progress=False,
            n_jobs=1,
        )
    return d / "out" / "probe.html", res, figs


@pytest.fixture(scope="module")
def flow_report(tmp_path_factory):
    from sinkscope.cli import main

    d = tmp_path_factory.mktemp("browser-flow")
    img = _save(paint_markers(np.full((32, 32, 3), 110, np.uint8), [(2, 1)]), d / "m.png")
    out = d / "out"
    argv = ["flow", "--model", "tiny-llava+sinks", "--images", str(img), "--prompt", "what is this ?"]
    argv += ["--vit-threshold", "100", "--window", "2", "--out", str(out)]
    with counting_figures() as figs:
        assert main(argv) == 0
    return out / "flow.html", out, figs


# ------------------------------------------------------------------------------------------------- tests


def test_scan_report_renders_offline(scan_report, artifacts):
    html, res, figs = scan_report
    chk = _check(html, "scan-report", artifacts)
    _assert_clean(chk, len(figs))
    ids = [f.id for f in chk.figures]
    # the browser shows what the writer embedded, in order (div ids where the writer set them)
    assert all(c["div_id"] in (None, i) for c, i in zip(figs, ids)), (ids, [c["div_id"] for c in figs])
    n_images = sum(e["status"] == "ok" for e in res.summary["images"])
    assert n_images == 3
    # the parts every scan report has (test_scan_report pins the same ids)
    always = {"fig-norms", "fig-counts", "fig-attention"}
    assert always | {f"fig-image-{i}" for i in range(n_images)} <= set(ids)
    assert any(t.startswith("L2 norm per layer") for t in chk.titles)


def test_scan_heatmap_at_the_default_layer_is_not_one_flat_colour(scan_report, artifacts):
    """Issue 10: with one colour scale for all layers the default (late) layer was uniformly
    saturated. Each image's visible heat map - the default layer - must spread over its colours."""
    html, res, _ = scan_report
    chk = _check(html, "scan-report-heatmaps", artifacts)
    maps = {h["figure"]: h for h in chk.heatmaps if (h["meta"] or {}).get("role") == "heatmap"}
    assert set(maps) == {f"fig-image-{i}" for i in range(3)}, chk.heatmaps
    tokens = res.tokens
    for fid, h in maps.items():
        layer = h["meta"]["layer"]
        assert h["n_values"] == 30  # the 6 x 5 grid
        # the colour range is the layer's own: from its smallest to its largest patch norm
        name = [e["image"] for e in res.summary["images"] if e["status"] == "ok"][int(fid.rsplit("-", 1)[1])]
        p = tokens[(tokens.image == name) & (tokens.layer == layer) & (tokens.kind == "patch")].norm
        assert (h["zmin"], h["zmax"]) == pytest.approx((np.log10(p.min()), np.log10(p.max())), rel=1e-4)
        assert h["spread"] > 0.1 and h["n_colour_bins"] >= 3, h


# 12 tiny images: a test fold of the 'sink' group can hold one class only (sklearn warns; irrelevant here)
@pytest.mark.filterwarnings("ignore:A single label was found:UserWarning")
def test_probe_report_renders_offline(probe_report, artifacts):
    html, res, figs = probe_report
    chk = _check(html, "probe-report", artifacts)
    _assert_clean(chk, len(figs))
    labels = list(res.table.label.unique())
    assert len(figs) == len(labels) == 2  # one figure per probed label
    for label, title in zip(labels, chk.titles):
        assert f"'{label}'" in title


def test_flow_report_renders_offline(flow_report, artifacts):
    from sinkscope.viz.flow_report import flow_figures, load_flow

    html, out, figs = flow_report
    chk = _check(html, "flow-report", artifacts)
    _assert_clean(chk, len(figs))
    tables, summary = load_flow(out)
    assert len(flow_figures(tables, summary)) == len(figs)  # the report holds every figure the tables support


def test_harness_catches_a_broken_page(tmp_path, artifacts):
    """A JS error, a console error, a network request and a plot div plotly never draws are all reported."""
    good = pio.to_html(
        go.Figure(go.Scatter(x=[0, 1, 2], y=[1, 3, 2]), layout={"title": {"text": "fine"}}),
        full_html=False,
        include_plotlyjs=True,
    )
    page = tmp_path / "broken.html"
    page.write_text(
        "<!DOCTYPE html><html><head><meta charset='utf-8'></head><body>"
        + good
        + "<div class='js-plotly-plot' id='never-drawn' style='height:300px'></div>"
        + "<img src='http://example.invalid/pixel.png' alt=''>"
        + "<script>console.error('deliberate console error');</script>"
        + "<script>undefinedFunctionForTheTest();</script>"
        + "</body></html>",
        encoding="utf-8",
    )
    chk = render_report(page, screenshot_path=artifacts / "broken-page.png", timeout_s=3)
    assert not chk.ok
    assert chk.timed_out
    assert chk.n_figures == 2 and chk.n_rendered == 1 < chk.n_figures
    assert [f.id for f in chk.figures if not f.rendered] == ["never-drawn"]
    assert any("undefinedFunctionForTheTest" in e for e in chk.js_errors), chk.js_errors
    assert any("deliberate console error" in e for e in chk.js_errors), chk.js_errors
    assert any("example.invalid" in r for r in chk.failed_requests), chk.failed_requests
    assert chk.titles == ["fine", ""]
    assert "never-drawn" in chk.problems()
