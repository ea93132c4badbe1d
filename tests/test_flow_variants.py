"""``sinkscope flow --variant`` (issue 13): the attention the LLM gives each token group under an
intervention, against ``both``."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from sinkscope import SinkscopeError
from sinkscope.flow.variants import attention_by_variant
from sinkscope.models.tiny import Plant, load_tiny, paint_markers, plant_text_sinks


@pytest.fixture(scope="module")
def ad():
    ad = load_tiny("tiny-llava", plant=Plant(layer=2))
    plant_text_sinks(ad.llm, Plant(layer=1, token_ids=(1,)))
    proj = ad.model.model.multi_modal_projector.linear_2
    with torch.no_grad():
        proj.weight[63].zero_()
        proj.bias[63].zero_()
    return ad


def _img():
    return paint_markers(np.random.default_rng(0).integers(0, 200, (32, 32, 3), dtype=np.uint8), [(1, 2)])


def test_groups_follow_the_tokens_and_shares_sum_to_one(ad):
    t = attention_by_variant(ad, [_img()], "What is in the picture?", ["sinks-front", "sink-only", "nonsink-only"],
                             sink_rule="norm:100")  # fmt: skip
    assert t.variant.unique().tolist() == ["both", "sinks-front", "sink-only", "nonsink-only"]
    total = t.groupby(["variant", "layer"]).share.sum()
    np.testing.assert_allclose(total.to_numpy(), 1.0, atol=1e-5)  # rows of attention sum to one
    n = t[t.layer == 0].pivot(index="variant", columns="group", values="n_tokens")
    assert n.loc["both", "vit-sink"] == 1 and n.loc["both", "vit-nonsink"] == 15
    assert n.loc["sink-only", "vit-nonsink"] == 0 and n.loc["nonsink-only", "vit-sink"] == 0
    assert n.loc["sinks-front"].equals(n.loc["both"])


def test_var_moves_attention_from_the_first_token_to_the_image(ad):
    """VAR forks heads only in a layer whose image holds a visual sink (issue 25, as its reference
    code): here layer 1 makes image token 5 a massive-activation sink, so layer 2 moves attention
    from the first token to the image and layer 1 (BOS the only sink) moves none."""

    def massive(mod, args, kwargs, out):
        h = out[0] if isinstance(out, tuple) else out
        h = h + 400.0 * ((kwargs["position_ids"] == 5)[..., None] & (torch.arange(h.shape[-1]) == 7)).to(h.dtype)
        return (h, *out[1:]) if isinstance(out, tuple) else h

    kw = dict(sink_rule="norm:100")
    cfg = {"tau": 5.0, "start_layer": 1, "alpha": 0.05}
    handle = ad.llm.blocks()[1].register_forward_hook(massive, with_kwargs=True)
    try:
        same = attention_by_variant(ad, [_img()], "What is in the picture?", ["var"], var_config={**cfg, "p": 1.0}, **kw)
        moved = attention_by_variant(ad, [_img()], "What is in the picture?", ["var"], var_config=cfg, **kw)
    finally:
        handle.remove()
    a, b = same[same.variant == "both"], same[same.variant == "var"]
    np.testing.assert_allclose(a.share.to_numpy(), b.share.to_numpy(), atol=1e-5)
    s = moved.pivot_table(index=["layer", "group"], columns="variant", values="share")
    first = s.xs("first-token", level="group")
    assert first.loc[2, "var"] < first.loc[2, "both"] - 1e-4  # the layer with a visual sink
    np.testing.assert_allclose(first.loc[[0, 1], "var"], first.loc[[0, 1], "both"], atol=1e-6)  # before it
    image = s.xs("vit-nonsink", level="group")
    assert image.loc[2, "var"] > image.loc[2, "both"]
    np.testing.assert_allclose(image.loc[[0, 1], "var"], image.loc[[0, 1], "both"], atol=1e-6)


def test_flow_cli_with_variants(tmp_path):
    from sinkscope import load_run, run
    from sinkscope.cli import main

    out = tmp_path / "flow"
    argv = ["flow", "--model", "tiny-llava+sinks", "--analysis", "propagation", "--variant", "sinks-front,sink-only",
            "--sink-rule", "topk:2", "-q", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    t = pd.read_csv(out / "attention_by_variant.csv")
    assert set(t.variant) == {"both", "sinks-front", "sink-only"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["variants"]["variants"] == ["both", "sinks-front", "sink-only"]
    again = run(load_run(out).config.replace(out=str(tmp_path / "again")), progress=False)
    pd.testing.assert_frame_equal(again.tables["attention_by_variant"].reset_index(drop=True), t, atol=1e-6)
    with pytest.raises(SinkscopeError, match="variants: unknown 'sideways'"):
        from sinkscope import FlowConfig

        FlowConfig(variants=("sideways",))
