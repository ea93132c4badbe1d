"""Figure functions on saved results of real runs with planted sinks (known answers), and the
combined ``sinkscope report``.

Fixtures run, once per module, a scan of ``tiny-dinov2+sinks`` (markers at known patches, saved
activations), a probe and a flow run of ``tiny-llava+sinks`` into temporary folders; every figure
is then drawn from those folders only.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from sinkscope.cli import main
from sinkscope.models.tiny import paint_markers
from sinkscope.viz.embedding import token_embeddings, umap_figure
from sinkscope.viz.flow_report import (
    knockout_figure,
    llm_group_attention_figure,
    load_flow,
    norm_bin_figure,
    rollout_figure,
    sink_maps_figure,
    vit_group_attention_figure,
)
from sinkscope.viz.probe_report import probe_figure
from sinkscope.viz.report import build_sections, report_figure_count, run_kind, write_report

# marker (= planted sink) position of each scanned image on the 4x4 grid of a 32x32 input
MARKS = {f"im{i}.png": (i % 4, (i * 3) % 4) for i in range(6)}
FLOW_MARK = (2, 1)


def _role(fig, role):
    return [t for t in fig.data if isinstance(t.meta, dict) and t.meta.get("role") == role]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    imgs = root / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    for name, rc in MARKS.items():
        a = rng.integers(60, 160, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(paint_markers(a, [rc])).save(imgs / name)
    scan = root / "scan"
    assert (
        main(
            ["scan", "--model", "tiny-dinov2+sinks", "--images", str(imgs), "--method", "all"]
            + ["--save-layers", "4", "--out", str(scan), "--no-report", "-q"]
        )
        == 0
    )
    flow_img = root / "flow.png"
    Image.fromarray(paint_markers(np.full((32, 32, 3), 110, np.uint8), [FLOW_MARK])).save(flow_img)
    flow = root / "flow"
    assert (
        main(
            ["flow", "--model", "tiny-llava+sinks", "--images", str(flow_img), "--prompt", "what is this ?"]
            + [
                "--vit-threshold",
                "100",
                "--window",
                "2",
                "--analysis",
                "rollout",
                "--analysis",
                "propagation",
            ]
            + ["--analysis", "knockout", "--out", str(flow)]
        )
        == 0
    )
    data = root / "data"
    for cls, color in (("a", (200, 30, 0)), ("b", (0, 30, 200))):
        (data / cls).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (32, 32), tuple(min(255, v + 7 * i) for v in color)).save(
                data / cls / f"{i}.png"
            )
    probe = root / "probe"
    assert (
        main(
            [
                "probe",
                "--model",
                "tiny-dinov2+sinks",
                "--dataset",
                str(data),
                "--folds",
                "3",
                "--layers",
                "0,2,4",
            ]
            + ["--groups", "cls,mean", "--out", str(probe), "-q", "--no-cache"]
        )
        == 0
    )
    return {"scan": scan, "flow": flow, "probe": probe}


# -- flow figures ----------------------------------------------------------------------------
def test_sink_maps_put_markers_on_the_planted_sink_and_name_rule_and_model(runs):
    tables, summary = load_flow(runs["flow"])
    fig = sink_maps_figure(tables["rollout"], tables["relevance"], "flow.png", summary)
    roll, rel = _role(fig, "rollout"), _role(fig, "relevance")
    kinds = [t.meta["start_kind"] for t in roll]
    assert kinds == ["cls", "sink", "nonsink"] and len(rel) == 3  # one column per start token
    assert all(np.asarray(t.z).shape == (4, 4) for t in roll + rel)
    marks = {t.meta["kind"]: (t.meta["row"], t.meta["col"]) for t in _role(fig, "start_marker")}
    assert marks["sink"] == FLOW_MARK
    assert marks["nonsink"] != FLOW_MARK
    # the sink's rollout row peaks on the sink itself; relevance = head mean of the saved table
    z = np.asarray(roll[1].z)
    assert np.unravel_index(z.argmax(), z.shape) == FLOW_MARK
    sink_tok = int(roll[1].meta["start"])
    r = tables["relevance"]
    direct = r[r.token == sink_tok].groupby(["row", "col"])["value"].mean().unstack().to_numpy()
    np.testing.assert_allclose(np.asarray(rel[1].z), direct, rtol=1e-12)
    # one colour scale per row: panels compare by colour
    assert {t.coloraxis for t in roll} == {"coloraxis"} and {t.coloraxis for t in rel} == {"coloraxis2"}
    title = fig.layout.title.text
    assert "tiny-llava+sinks" in title and ">= 100" in title
    assert (
        fig.layout.xaxis4.title.text == "patch column (index)"
        and fig.layout.yaxis.title.text == "patch row (index)"
    )


def test_rollout_figure_one_panel_per_start_with_sink_marker(runs):
    tables, summary = load_flow(runs["flow"])
    fig = rollout_figure(tables["rollout"], "flow.png", summary)
    assert len(_role(fig, "rollout")) == tables["rollout"].start.nunique() == 3
    (sink_mark,) = [t for t in _role(fig, "start_marker") if t.meta["kind"] == "sink"]
    assert (sink_mark.y[0], sink_mark.x[0]) == FLOW_MARK
    with pytest.raises(ValueError, match="no rollout rows"):
        rollout_figure(tables["rollout"], "missing.png", summary)


def test_vit_group_attention_lines_and_uniform_line(runs):
    tables, summary = load_flow(runs["flow"])
    g = tables["vit_attention_by_group"]
    fig = vit_group_attention_figure(g, summary)
    groups = [t.meta["group"] for t in _role(fig, "group")]
    assert set(groups) == set(g.dropna(subset=["mean_attention"]).group)  # empty groups (registers) left out
    sinks = next(t for t in fig.data if t.meta["group"] == "sinks")
    direct = (
        g[g.group == "sinks"].dropna().groupby("layer")["mean_attention"].mean() * 100
    )  # sinks from block 2
    np.testing.assert_allclose(np.asarray(sinks.y), direct.to_numpy())
    (line,) = fig.layout.shapes
    assert line.y0 == pytest.approx(100 / 17)  # uniform 1/N with CLS + 16 patches
    assert fig.layout.yaxis.title.text == "attention received per token (%)"


def test_norm_bins_put_the_planted_sink_in_the_top_bin(runs):
    tables, summary = load_flow(runs["flow"])
    vt, bb = tables["visual_tokens"], tables["attention_by_bin"]
    fig = norm_bin_figure(bb, summary)
    (hm,) = fig.data
    top = float(bb.bin_lo.max())
    sink_norm = float(vt[vt.is_vit_sink].vit_norm.iloc[0])
    assert top <= sink_norm < top + 5 and list(hm.x)[-1] == f"{top:g}"
    assert bb[bb.bin_lo == top].n_tokens.eq(1).all()
    piv = bb.pivot(index="layer", columns="bin_lo", values="mean_attention").to_numpy() * 100
    np.testing.assert_allclose(np.asarray(hm.z), piv)
    assert "ViT sinks" in fig.layout.title.text and fig.layout.yaxis.title.text == "LLM layer (block index)"


def test_llm_group_heatmap_equals_direct_means(runs):
    tables, summary = load_flow(runs["flow"])
    vt = tables["visual_tokens"]
    fig = llm_group_attention_figure(vt, summary)
    (hm,) = fig.data
    z = np.asarray(hm.z, dtype=float)
    cols = [c for c in vt.columns if c.startswith("attn_L")]
    assert z.shape == (len(cols), 3) and list(hm.y) == list(range(len(cols)))
    assert hm.meta["counts"][1] == int(vt.is_vit_sink.sum()) == 1
    np.testing.assert_allclose(z[:, 1], vt.loc[vt.is_vit_sink, cols].to_numpy().mean(0) * 100)
    non = (~vt.is_vit_sink) & (vt.llm_sink_layers == 0)
    np.testing.assert_allclose(z[:, 0], vt.loc[non, cols].to_numpy().mean(0) * 100)
    assert hm.x[1].startswith("vit-propagated sink (n=1)")


def test_knockout_curves_one_per_source_target(runs):
    tables, summary = load_flow(runs["flow"])
    ko = tables["knockout"]
    fig = knockout_figure(ko, summary)
    pairs = ko[["source", "target"]].drop_duplicates()
    assert len(_role(fig, "knockout")) == len(pairs)
    t0 = _role(fig, "knockout")[0]
    d = ko[(ko.source == t0.meta["source"]) & (ko.target == t0.meta["target"])]
    np.testing.assert_allclose(np.asarray(t0.y), d.relative_change.to_numpy() * 100)
    assert fig.layout.shapes[0].y0 == 0 and "%" in fig.layout.yaxis.title.text


# -- probe and UMAP --------------------------------------------------------------------------
def test_probe_figure_bands_lines_chance(runs):
    t = pd.read_csv(runs["probe"] / "probe.csv")
    summary = json.loads((runs["probe"] / "summary.json").read_text())
    fig = probe_figure(t, "label", summary)
    n_groups = t.group.nunique()
    assert len(_role(fig, "band")) == len(_role(fig, "accuracy")) == len(_role(fig, "shuffle")) == n_groups
    assert fig.layout.shapes[0].y0 == pytest.approx(float(t.chance.max())) == pytest.approx(0.5)
    assert fig.layout.yaxis.title.text == "accuracy (held-out folds)"
    assert "tiny-dinov2+sinks" in fig.layout.title.text
    # a group no image had tokens for is not drawn, and the title says so
    t2 = pd.concat([t, t[t.group == "cls"].assign(group="sink", accuracy=np.nan, accuracy_std=np.nan)])
    fig2 = probe_figure(t2, "label", summary)
    assert "sink" not in {tr.meta["group"] for tr in _role(fig2, "accuracy")}
    assert "not drawn: sink" in fig2.layout.title.text


def test_umap_colours_planted_sinks_and_hovers_grid_position(runs):
    X, meta = token_embeddings(runs["scan"], layer=4)
    assert len(X) == len(meta) == 6 * 17
    sinks = meta[meta.role == "sink"]
    assert sorted(zip(sinks.image, zip(sinks.row.astype(int), sinks.col.astype(int)))) == sorted(
        MARKS.items()
    )
    fig = umap_figure(X, meta, seed=0)
    groups = {t.meta["group"]: t for t in _role(fig, "umap")}
    assert set(groups) == {"sink", "non-sink", "CLS"} and len(groups["sink"].x) == 6
    cd = np.asarray(groups["sink"].customdata)
    assert {(str(c[0]), str(c[2])) for c in cd} == {(n, f"row {r}, col {c}") for n, (r, c) in MARKS.items()}
    # fixed seed: the same picture twice
    again = umap_figure(X, meta, seed=0)
    np.testing.assert_allclose(np.asarray(again.data[0].x), np.asarray(fig.data[0].x), rtol=1e-5)
    assert "seed 0" in fig.layout.title.text and "UMAP 1" in fig.layout.xaxis.title.text
    with pytest.raises(ValueError, match="at least 5 tokens, got 3"):
        umap_figure(X[:3], meta.iloc[:3])
    with pytest.raises(ValueError, match="no column 'label'"):
        umap_figure(X, meta, color="label", coords=np.zeros((len(X), 2)))


# -- the combined report ---------------------------------------------------------------------
def test_report_combines_runs_with_findings_and_is_self_contained(runs, tmp_path):
    dirs = [runs["scan"], runs["probe"], runs["flow"]]
    assert [run_kind(d) for d in dirs] == ["scan", "probe", "flow"]
    secs = build_sections(dirs)
    scan_text = " ".join(secs[0].findings)
    for r, c in list(MARKS.values())[:2]:
        assert f"(row {r}, col {c})" in scan_text  # the planted positions are named
    assert "1 of them are ViT sinks" in " ".join(secs[2].findings)
    out = write_report(dirs, tmp_path / "r.html", sections=secs)
    page = out.read_text()
    n = sum(len(s.figures) for s in secs)
    ids = re.findall(r"<div id=\"(fig-[\w-]+)\"", page)
    assert n == report_figure_count(dirs) and len(ids) == len(set(ids)) == n  # one unique div per figure
    assert {"fig-norms", "fig-counts"} <= set(ids)  # the scan section keeps the ids of its own report.html
    assert page.count("plotly.js v") <= 2  # plotly.js embedded once
    assert not re.search(r"<script[^>]+src=", page)  # nothing fetched from the network


def test_report_cli_and_bad_folders(runs, tmp_path, capsys):
    out = tmp_path / "rep.html"
    assert main(["report", str(runs["flow"]), "--out", str(out), "--title", "T"]) == 0
    assert out.exists() and "<title>T</title>" in out.read_text()
    assert main(["report", str(tmp_path / "nope")]) == 1
    assert "no such run folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 1
    assert "not a sinkscope run" in capsys.readouterr().err


def test_combined_report_renders_in_headless_chromium(runs, tmp_path):
    """The combined report in a real browser: every figure drawn (UMAP in WebGL included), no
    JavaScript error, no network request; a full-page screenshot is kept as a test artifact."""
    import os
    from pathlib import Path

    from .browser import render_report, require_browser

    require_browser()
    dirs = [runs["scan"], runs["probe"], runs["flow"]]
    secs = build_sections(dirs)
    out = write_report(dirs, tmp_path / "combined.html", sections=secs)
    art = Path(
        os.environ.get("SINKSCOPE_TEST_ARTIFACTS") or Path(__file__).resolve().parents[1] / "test-artifacts"
    )
    art.mkdir(parents=True, exist_ok=True)
    chk = render_report(out, screenshot_path=art / "combined-report.png", timeout_s=90)
    assert chk.ok, chk.problems()
    assert chk.n_figures == chk.n_rendered == sum(len(s.figures) for s in secs)
    assert any("UMAP" in t for t in chk.titles) and any("Sink vs non-sink" in t for t in chk.titles)


def _findings(page: str) -> list[str]:
    """The findings list items of every section of a page, unescaped."""
    import html

    blocks = re.findall(r"<div class='findings'><b>Findings</b><ul>(.*?)</ul></div>", page, re.S)
    return [html.unescape(li) for b in blocks for li in re.findall(r"<li>(.*?)</li>", b, re.S)]


def test_scan_report_and_sinkscope_report_give_the_same_findings(runs, tmp_path):
    """A scan's own report.html and `sinkscope report` on the same folder summarise it alike."""
    imgs = runs["scan"].parent / "imgs"
    d = tmp_path / "scan"
    argv = ["scan", "--model", "tiny-dinov2+sinks", "--images", str(imgs), "--method", "all", "-q"]
    assert main(argv + ["--out", str(d)]) == 0
    own = _findings((d / "report.html").read_text())
    assert main(["report", str(d), "--out", str(tmp_path / "r.html")]) == 0
    combined = _findings((tmp_path / "r.html").read_text())
    assert own == combined == build_sections([d])[0].findings
    assert any("(row " in f for f in own)  # the planted sinks are named
    assert any(f.startswith("The attention rule (also run") for f in own)  # --method all: the other rules


def test_report_names_a_corrupt_table_or_summary_in_one_line(runs, tmp_path, capsys):
    import shutil

    for broken, text in (("tokens.parquet", "cannot read the table"), ("summary.json", "corrupt summary")):
        d = tmp_path / broken
        shutil.copytree(runs["scan"], d)
        (d / broken).write_bytes(b"\x00not a " + broken.encode())
        assert main(["report", str(d), "--out", str(tmp_path / "r.html")]) == 1
        err = capsys.readouterr().err.strip()
        assert str(d / broken) in err and text in err, err
        assert "Traceback" not in err and len(err.splitlines()) == 1
    d = tmp_path / "flow-broken"
    shutil.copytree(runs["flow"], d)
    (d / "visual_tokens.parquet").write_bytes(b"PAR1 truncated")
    assert main(["report", str(d), "--out", str(tmp_path / "r.html")]) == 1
    assert str(d / "visual_tokens.parquet") in capsys.readouterr().err
    d = tmp_path / "config-broken"
    shutil.copytree(runs["probe"], d)
    (d / "config.json").write_text("{not json")
    assert main(["report", str(d), "--out", str(tmp_path / "r.html")]) == 1
    err = capsys.readouterr().err.strip()
    assert str(d / "config.json") in err and len(err.splitlines()) == 1, err


def test_cli_forwards_figures_to_the_regeneration_command(capsys):
    assert main(["figures", "--list"]) == 0
    out = capsys.readouterr().out
    assert "paper-flow-llava" in out and "paper" in out
    with pytest.raises(SystemExit) as e:
        main(["report", "--help"])
    assert e.value.code == 0 and "examples:" in capsys.readouterr().out


def test_report_reads_flow_runs_of_any_analysis_and_names_the_queries(runs, tmp_path):
    img = tmp_path / "f.png"
    Image.fromarray(paint_markers(np.full((32, 32, 3), 110, np.uint8), [FLOW_MARK])).save(img)
    ko = tmp_path / "ko"
    base = ["flow", "--model", "tiny-llava+sinks", "--images", str(img), "--vit-threshold", "100"]
    assert main(base + ["--analysis", "knockout", "--window", "2", "--out", str(ko)]) == 0
    assert run_kind(ko) == "flow"
    (sec,) = build_sections([ko])
    assert [h for h, _ in sec.figures] == ["Attention knockout"]
    gen = tmp_path / "gen"
    assert main(base + ["--analysis", "propagation", "--generate", "2", "--out", str(gen)]) == 0
    (sec,) = build_sections([gen])
    assert any("of the attention of 2 generated tokens" in f for f in sec.findings)


def test_probe_findings_give_chance_per_group(runs):
    from sinkscope.viz.report import probe_findings

    t = pd.read_csv(runs["probe"] / "probe.csv")
    t2 = pd.concat([t, t[t.group == "cls"].assign(group="sink", chance=0.6)])
    text = " ".join(probe_findings(t2, {}))
    assert "cls 1.00" in text and "(chance 0.50" in text and "(chance 0.60" in text


def test_report_reads_a_decoding_run(tmp_path):
    """A decoding run folder (decode_rate.csv) gets its own section: the rate figure and findings."""
    d = tmp_path / "decode"
    d.mkdir()
    rates = pd.DataFrame(
        {
            "group": ["sink", "nonsink"],
            "scope": "all",
            "n_tokens": [10, 40],
            "n_hits": [8, 4],
            "rate": [0.8, 0.1],
        }
        | {"ci_low": [0.49, 0.04], "ci_high": [0.94, 0.23], "n_images": 10}
    )
    rates.to_csv(d / "decode_rate.csv", index=False)
    summary = {"model": {"name": "tiny-llava+sinks"}, "top_k": 5}
    summary["rates"] = {
        "sink": {"rate": 0.8, "n_hits": 8, "n_tokens": 10, "n_images": 10, "ci": [0.49, 0.94]}
    }
    (d / "summary.json").write_text(json.dumps(summary))
    assert run_kind(d) == "decode"
    (sec,) = build_sections([d])
    assert sec.kind == "decode" and [h for h, _ in sec.figures] == [
        "Decoding rate: sink vs non-sink visual tokens"
    ]
    assert sec.findings[0].startswith("Sink tokens: 80.0% decode to the object word (8 / 10 tokens")
    page = write_report([d], tmp_path / "r.html").read_text()
    assert "Word-distribution decoding - tiny-llava+sinks" in page
