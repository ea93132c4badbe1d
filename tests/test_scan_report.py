"""Tests of the HTML scan report and its figures (synthetic scan: 2 images, 4 layers, CLS + 4x5 grid)."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
from plotly.offline import get_plotlyjs

from sinkscope.viz import write_scan_report
from sinkscope.viz.scan_report import (
    attention_norm_figure,
    norm_distribution_figure,
    patch_heatmap_figure,
    sink_count_figure,
    text_norm_figure,
)

ROWS, COLS, LAYERS = 4, 5, 4
SINK_ROW, SINK_COL, SINK_FROM = 1, 3, 2
SINK_TOKEN = 1 + SINK_ROW * COLS + SINK_COL  # token 0 is CLS
THRESHOLDS = {"0": None, "1": 90.0, "2": 100.0, "3": 110.0}
IMAGES = ["cat.jpg", "dog.png"]


def _tokens(with_attention: bool = False) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    recs = []
    for image in IMAGES:
        for layer in range(LAYERS):
            recs.append(
                dict(
                    image=image,
                    layer=layer,
                    token=0,
                    kind="cls",
                    row=None,
                    col=None,
                    norm=30.0 + layer,
                    is_sink=False,
                )
            )
            for r in range(ROWS):
                for c in range(COLS):
                    sink = (r, c) == (SINK_ROW, SINK_COL) and layer >= SINK_FROM
                    norm = 500.0 if sink else float(20.0 + rng.normal(0, 2))
                    recs.append(
                        dict(
                            image=image,
                            layer=layer,
                            token=1 + r * COLS + c,
                            kind="patch",
                            row=r,
                            col=c,
                            norm=norm,
                            is_sink=sink,
                        )
                    )
    df = pd.DataFrame(recs)
    df["row"] = df["row"].astype("Int64")
    df["col"] = df["col"].astype("Int64")
    if with_attention:
        att = np.where(df["is_sink"], 0.4, 0.02)
        att = np.where(df["layer"] == 0, np.nan, att)
        df["attention_received"] = att
        df["rms_ratio"] = 3.0
    return df


def _summary(tokens: pd.DataFrame) -> dict:
    per_layer = {
        str(layer): {"n_sinks": int(g["is_sink"].sum()), "n_tokens": len(g)}
        for layer, g in tokens.groupby("layer")
    }
    return {
        "model": {"name": "toy-vit-s16", "family": "vit"},
        "layout": {"n_cls": 1, "n_registers": 0, "patch_size": 16},
        "rule": {
            "method": "norm",
            "threshold": {"kind": "absolute", "value": 100.0},
            "description": "L2 norm > 100 (absolute) — toy rule",
            "per_layer_threshold": dict(THRESHOLDS),
        },
        "per_layer": per_layer,
        "emergence_layer": SINK_FROM,
        "sink_dims": [7, 42],
        "images": [{"image": n, "status": "ok", "reason": None, "grid": [ROWS, COLS]} for n in IMAGES]
        + [{"image": "broken.gif", "status": "failed", "reason": "cannot identify image file", "grid": None}],
    }


def _picture(seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 255, size=(ROWS * 16, COLS * 16, 3), dtype=np.uint8)


def _by_role(fig: go.Figure, role: str) -> list:
    return [t for t in fig.data if isinstance(t.meta, dict) and t.meta.get("role") == role]


@pytest.fixture
def scan():
    tokens = _tokens()
    return tokens, _summary(tokens)


def test_report_is_self_contained(tmp_path, scan):
    tokens, summary = scan
    out = write_scan_report(tmp_path / "sub" / "report.html", tokens, summary, images={"cat.jpg": _picture()})
    assert out.exists() and out.suffix == ".html"
    page = out.read_text(encoding="utf-8")
    bundle = get_plotlyjs()
    assert bundle[:300] in page  # plotly.js inline ...
    assert page.count(bundle[:300]) == 1  # ... exactly once
    assert not re.search(r"<script[^>]*\bsrc\s*=\s*['\"]?(https?:)?//", page, re.IGNORECASE)
    assert "toy-vit-s16" in page and "L2 norm &gt; 100 (absolute)" in page
    for div in ("fig-norms", "fig-counts", "fig-image-0", "fig-image-1"):
        assert f'id="{div}"' in page
    assert "fig-attention" not in page  # no attention column
    assert re.search(
        r"data:image(/|\\u002f)jpeg;base64,", page
    )  # the one picture supplied (JSON may escape "/")


def test_failed_images_are_listed(tmp_path, scan):
    tokens, summary = scan
    page = write_scan_report(tmp_path / "r.html", tokens, summary).read_text(encoding="utf-8")
    assert "broken.gif" in page
    assert "cannot identify image file" in page
    assert "1 failed" in page


def test_max_images(tmp_path, scan):
    tokens, summary = scan
    page = write_scan_report(tmp_path / "r.html", tokens, summary, max_images=1).read_text(encoding="utf-8")
    assert 'id="fig-image-0"' in page and 'id="fig-image-1"' not in page
    assert "1 more" in page


def test_norm_distribution_threshold_and_sinks(scan):
    tokens, summary = scan
    fig = norm_distribution_figure(tokens, summary)
    (thr,) = _by_role(fig, "threshold")
    assert list(np.asarray(thr.x)) == [1, 2, 3]  # layer 0 has no threshold -> omitted
    assert np.allclose(np.asarray(thr.y, dtype=float), [90.0, 100.0, 110.0])
    assert fig.layout.yaxis.type == "log"
    assert fig.layout.yaxis.title.text.startswith("L2 norm")
    assert fig.layout.xaxis.title.text == "layer (0 = embeddings)"
    boxes = {t.meta["kind"]: t for t in _by_role(fig, "box")}
    assert set(boxes) == {"patch", "cls"}
    assert list(boxes["patch"].x) == [0, 1, 2, 3]
    # whiskers stop at the non-sink tokens: the upper fence of layer 3 is far below the sink
    assert boxes["patch"].upperfence[3] < 100
    (sinks,) = _by_role(fig, "sinks")
    assert len(sinks.y) == 4 and np.allclose(np.asarray(sinks.y, dtype=float), 500.0)
    assert sorted(np.round(np.asarray(sinks.x, dtype=float))) == [2, 2, 3, 3]  # x = layer +- 0.25 jitter


def test_sink_count_bars(scan):
    tokens, summary = scan
    fig = sink_count_figure(tokens, summary)
    (bar,) = _by_role(fig, "sink_counts")
    assert list(np.asarray(bar.x)) == [0, 1, 2, 3]
    assert (
        list(np.asarray(bar.y))
        == [summary["per_layer"][str(i)]["n_sinks"] for i in range(LAYERS)]
        == [0, 0, 2, 2]
    )
    assert any("layer 2" in a.text for a in fig.layout.annotations)  # emergence annotated


def test_patch_heatmap_layers_and_sink_position(scan):
    tokens, summary = scan
    fig = patch_heatmap_figure(tokens, summary, "cat.jpg", image=_picture())
    heatmaps = _by_role(fig, "heatmap")
    assert [h.meta["layer"] for h in heatmaps] == list(range(LAYERS))
    assert all(np.asarray(h.z).shape == (ROWS, COLS) for h in heatmaps)
    assert sum(bool(h.visible) for h in heatmaps) == 1
    # convention: x = col, y = row
    sinks = {t.meta["layer"]: t for t in _by_role(fig, "sinks")}
    assert list(np.asarray(sinks[2].x)) == [SINK_COL] and list(np.asarray(sinks[2].y)) == [SINK_ROW]
    assert len(sinks[0].x) == 0 and len(sinks[1].x) == 0
    # hover data: token index and raw norm at (row, col)
    cd = np.asarray(heatmaps[2].customdata)
    assert cd[SINK_ROW, SINK_COL, 0] == SINK_TOKEN and cd[SINK_ROW, SINK_COL, 1] == pytest.approx(500.0)
    assert np.asarray(heatmaps[2].z)[SINK_ROW, SINK_COL] == pytest.approx(np.log10(500.0))
    # the picture sits under the grid, stretched over [-0.5, cols - 0.5] x [-0.5, rows - 0.5]
    (img,) = _by_role(fig, "image")
    assert isinstance(img, go.Image) and fig.data[0] is img
    assert img.x0 - img.dx / 2 == pytest.approx(-0.5) and img.dx * COLS * 16 == pytest.approx(COLS)
    # slider: one step per layer, each showing image + that layer's heat map and sinks
    steps = fig.layout.sliders[0].steps
    assert len(steps) == LAYERS
    vis = steps[2].args[0]["visible"]
    assert vis[0] is True and sum(vis) == 3
    assert "CLS t0" in steps[2].args[1]["title.text"]


def test_patch_heatmap_without_picture(scan):
    tokens, summary = scan
    fig = patch_heatmap_figure(tokens, summary, "dog.png")
    assert not _by_role(fig, "image")
    assert len(_by_role(fig, "heatmap")) == LAYERS
    with pytest.raises(ValueError):
        patch_heatmap_figure(tokens, summary, "nope.jpg")


def test_text_model_report(tmp_path):
    recs = []
    for layer in range(3):
        for t in range(12):
            sink = t == 0 and layer >= 1
            recs.append(
                dict(
                    image="prompt-0",
                    layer=layer,
                    token=t,
                    kind="text",
                    row=pd.NA,
                    col=pd.NA,
                    norm=800.0 if sink else 5.0 + t,
                    is_sink=sink,
                )
            )
    tokens = pd.DataFrame(recs).astype({"row": "Int64", "col": "Int64"})
    summary = {
        "model": {"name": "toy-lm", "family": "llama"},
        "layout": {"n_cls": 0, "n_registers": 0, "patch_size": None},
        "rule": {
            "method": "norm",
            "threshold": {"kind": "auto", "value": None},
            "description": "auto valley",
            "per_layer_threshold": {"0": None, "1": 100.0, "2": None},
        },
        "per_layer": {
            "0": {"n_sinks": 0, "n_tokens": 12},
            "1": {"n_sinks": 1, "n_tokens": 12},
            "2": {"n_sinks": 1, "n_tokens": 12},
        },
        "emergence_layer": 1,
        "sink_dims": [],
        "images": [{"image": "prompt-0", "status": "ok", "reason": None, "grid": None}],
    }
    fig = text_norm_figure(tokens, summary)
    (hm,) = _by_role(fig, "heatmap")
    assert np.asarray(hm.z).shape == (3, 12)
    (sinks,) = _by_role(fig, "sinks")
    assert list(np.asarray(sinks.x)) == [0, 0] and list(np.asarray(sinks.y)) == [1, 2]
    assert fig.layout.yaxis.title.text == "layer (0 = embeddings)"
    page = write_scan_report(tmp_path / "lm.html", tokens, summary).read_text(encoding="utf-8")
    assert 'id="fig-text-0"' in page and "fig-image-0" not in page


def test_attention_section(tmp_path):
    tokens = _tokens(with_attention=True)
    summary = _summary(tokens)
    fig = attention_norm_figure(tokens, summary)
    layers = sorted({t.meta["layer"] for t in fig.data})
    assert layers == [1, 2, 3]  # layer 0 has no attention values
    assert fig.layout.yaxis.title.text.startswith("attention received (fraction)")
    assert fig.layout.xaxis.title.text == "L2 norm"
    page = write_scan_report(tmp_path / "a.html", tokens, summary).read_text(encoding="utf-8")
    assert 'id="fig-attention"' in page
    with pytest.raises(ValueError):
        attention_norm_figure(_tokens(), summary)


def test_titles_name_model_rule_and_threshold(scan):
    tokens, summary = scan
    rule = summary["rule"]["description"]
    for fig in (norm_distribution_figure(tokens, summary), sink_count_figure(tokens, summary)):
        assert "toy-vit-s16" in fig.layout.title.text and rule.replace(">", "&gt;") in fig.layout.title.text
    heat = patch_heatmap_figure(tokens, summary, "cat.jpg")
    steps = heat.layout.sliders[0].steps
    assert "threshold at this layer 100" in steps[2].args[1]["title.text"]  # layer 2's threshold
    assert "threshold at this layer" not in steps[0].args[1]["title.text"]  # layer 0 has none


def test_heatmap_colours_each_layer_on_its_own_range():
    """Norms grow 10x per layer (as in a real ViT): one scale for all layers would paint the last
    layer in one saturated colour; each layer gets its own range, so its structure shows."""
    rng = np.random.default_rng(0)
    tokens = _tokens()
    tokens["norm"] = tokens["norm"] * 10.0 ** tokens["layer"] * rng.uniform(0.5, 1.5, len(tokens))
    tokens["is_sink"] = False
    fig = patch_heatmap_figure(tokens, _summary(tokens), "cat.jpg")
    heatmaps = _by_role(fig, "heatmap")
    for h in heatmaps:
        p = tokens[
            (tokens.image == "cat.jpg") & (tokens.layer == h.meta["layer"]) & (tokens.kind == "patch")
        ].norm
        assert (h.zmin, h.zmax) == pytest.approx((np.log10(p.min()), np.log10(p.max())), rel=1e-6)
        u = (np.asarray(h.z, dtype=float) - h.zmin) / (h.zmax - h.zmin)
        assert u.std() > 0.15  # spread over the colour scale, not one flat colour
        assert f"layer {h.meta['layer']}" in h.colorbar.title.text
    assert len({round(h.zmin, 3) for h in heatmaps}) == LAYERS  # a range per layer, not one for all
    assert heatmaps[-1].zmin > heatmaps[0].zmax  # the ranges really differ by orders of magnitude


def test_other_rules_are_drawn_and_said_beside_the_main_rule(tmp_path):
    """--method all on a model without norm sinks (DINOv2-S): the norm rule finds nothing, the
    attention rule finds the CLS token - the sink-count figure and the findings show it, labelled."""
    tokens = _tokens(with_attention=True)
    tokens["is_sink"] = False
    tokens["is_sink_norm"] = False
    tokens["is_sink_attention"] = (tokens["kind"] == "cls") & (tokens["layer"] >= 1)
    summary = _summary(tokens)
    summary["rule"]["method"] = "norm"
    summary["emergence_layer"] = None
    fig = sink_count_figure(tokens, summary)
    (main,) = _by_role(fig, "sink_counts")
    assert list(np.asarray(main.y)) == [0, 0, 0, 0] and main.name.startswith("norm rule")
    (attn,) = _by_role(fig, "rule_counts")  # one kind flagged: one stack
    assert attn.meta == {"role": "rule_counts", "rule": "attention", "kind": "cls"}
    assert attn.name == "attention rule (attention received): CLS"
    assert list(np.asarray(attn.y)) == [0, 2, 2, 2]  # the CLS of both images from layer 1
    assert fig.layout.showlegend
    page = write_scan_report(tmp_path / "r.html", tokens, summary).read_text(encoding="utf-8")
    assert "No sink token was found" in page
    assert (
        "The attention rule (also run; its tokens are not counted as sinks above) flags CLS in 2 of 2 item(s) "
        "at layers 1-3." in page
    )
    assert "So this model&#x27;s sink is its CLS token" in page


def test_a_norm_only_scan_says_how_to_see_the_attention_sink(scan):
    from sinkscope.viz.scan_report import scan_findings

    tokens, summary = scan
    tokens = tokens.assign(is_sink=False)
    text = " ".join(scan_findings(tokens, summary))
    assert "recorded no attention" in text and "--method all" in text
    assert "recorded no attention" not in " ".join(scan_findings(*scan))  # it found sinks: nothing to add
