"""`sinkscope flow` end to end: tiny-llava with planted sinks (fast) and mini-llava (real weights)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from sinkscope.cli import main
from sinkscope.models.tiny import paint_markers


@pytest.fixture()
def marked(tmp_path):
    p = tmp_path / "m.png"
    Image.fromarray(paint_markers(np.full((32, 32, 3), 110, np.uint8), [(2, 1)])).save(p)
    return p


def test_flow_cli_on_tiny_llava_writes_every_table(tmp_path, marked):
    out = tmp_path / "f"
    rc = main(
        [
            "flow",
            "--model",
            "tiny-llava+sinks",
            "--images",
            str(marked),
            "--prompt",
            "what is this ?",
            "--vit-threshold",
            "100",
            "--window",
            "2",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    vt = pd.read_parquet(out / "visual_tokens.parquet")
    for c in (
        "image",
        "vit_token",
        "kind",
        "row",
        "col",
        "vit_norm",
        "is_vit_sink",
        "llm_position",
        "llm_sink_layers",
        "attention_received",
    ):
        assert c in vt.columns
    s = vt[vt.is_vit_sink]
    assert (
        s[["row", "col"]].astype(int).values.tolist() == [[2, 1]]
        and int(s.vit_token.iloc[0]) == 1 + 2 * 4 + 1
    )
    for f in (
        "attention_by_bin.csv",
        "attention_by_group.csv",
        "knockout.csv",
        "decode.csv",
        "attribution.csv",
        "rollout.csv",
        "summary.json",
        "flow.html",
    ):
        assert (out / f).stat().st_size > 50, f
    ko = pd.read_csv(out / "knockout.csv")
    assert set(zip(ko.source, ko.target)) >= {("image", "question"), ("vit_sinks", "last")}
    assert len(ko) == 5 * 4
    ro = pd.read_csv(out / "rollout.csv")
    assert set(ro.start_kind) == {"cls", "sink", "nonsink"}
    assert ro.groupby("start").value.sum().between(0, 1.0 + 1e-6).all()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["vit_rule"]["threshold"] == {"kind": "absolute", "value": 100.0}
    html = (out / "flow.html").read_text()
    assert "Attention knockout" in html and "LLM attention by ViT norm" in html


@pytest.mark.slow
def test_mini_llava_runs_every_analysis(tmp_path):
    out = tmp_path / "mini"
    rc = main(
        [
            "flow",
            "--model",
            "mini-llava-untrained",
            "--analysis",
            "all",
            "--stride",
            "7",
            "--attribution-steps",
            "4",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert "untrained" in summary["warning"]
    vt = pd.read_parquet(out / "visual_tokens.parquet")
    assert len(vt) == 257 and vt.llm_position.is_monotonic_increasing  # CLS + 256 patches (full strategy)
    assert (pd.read_csv(out / "attribution.csv").shape[0]) == 257


def test_vit_only_rollout_relevance_and_group_attention(tmp_path):
    from sinkscope import load_model
    from sinkscope.flow.run import run_flow

    ad = load_model("tiny-dinov2+sinks", image_size=(48, 40))
    img = paint_markers(np.full((48, 40, 3), 100, np.uint8), [(1, 2), (4, 3)])
    from sinkscope.data import ImageItem

    res = run_flow(
        ad, images=[ImageItem("m", "m", loader=lambda: img)], vit_threshold=100, out=tmp_path / "v"
    )
    t = res["tables"]
    # a ViT: the VLM analyses are skipped; rollout and Darcet's redundancy apply
    assert set(t) == {"rollout", "relevance", "vit_attention_by_group", "redundancy"}
    assert sorted(t["rollout"].query("start_kind == 'sink'").start.unique()) == [1 + 1 * 5 + 2, 1 + 4 * 5 + 3]
    rel = t["relevance"]
    assert set(rel.kind) == {"cls", "sink", "nonsink"} and rel["head"].nunique() == 4
    g = t["vit_attention_by_group"]
    assert g[(g.layer == 0) & (g.group == "sinks")].n_tokens.item() == 0  # sinks emerge at layer 2
    assert g[(g.layer == 3) & (g.group == "sinks")].n_tokens.item() == 2
    assert not (tmp_path / "v" / "flow.html").exists()  # the analysis writes tables; pages are viz's
    from sinkscope.viz import write_result_page

    assert write_result_page(res) == tmp_path / "v" / "flow.html"
