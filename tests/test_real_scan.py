"""Real pretrained weights (offline): what sinkscope reports on them, checked against HF directly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sinkscope import load_model, scan

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dinov2_scan():
    return scan("dinov2-small", method="all", progress=False)  # 9 embedded photographs, 224 px


def test_dinov2_small_has_no_norm_sinks_under_the_default_rule(dinov2_scan):
    t = dinov2_scan.tokens
    assert dinov2_scan.summary["n_ok"] == 9 and dinov2_scan.summary["layout"]["grid"] == [16, 16]
    assert not t.loc[t.kind == "patch", "is_sink_norm"].any()
    assert all(v is None for v in dinov2_scan.report.detections[0].per_layer_threshold.values())
    # measured: no patch exceeds 5x its image's median patch norm in any layer
    p = t[t.kind == "patch"]
    ratio = p.norm / p.groupby(["image", "layer"]).norm.transform("median")
    assert 1.2 < ratio.max() < 5.0


def test_dinov2_small_attention_rule_finds_the_cls_token(dinov2_scan):
    t = dinov2_scan.tokens
    att = t[t.attention_received.notna()]
    # the most-attended token per (image, layer): CLS in most of them
    top = att.loc[att.groupby(["image", "layer"]).attention_received.idxmax()]
    assert (top.kind == "cls").mean() > 0.7
    cls_sink = att[att.kind == "cls"].groupby("image").is_sink_attention.sum()
    assert (cls_sink >= 6).all()  # CLS is an attention sink in at least half of the 12 blocks, every image
    # and it receives 2-17% of the attention against a uniform share of 1/257
    cls = att[att.kind == "cls"]
    assert cls.attention_received.median() > 10 / 257


def test_smollm2_dims_rule_finds_the_first_token_massive_activation():
    prompts = [
        "The capital of France is Paris. The capital of Germany is",
        "Describe the image in one sentence.",
    ]
    res = scan("smollm2-135m", texts=prompts, method="dims", progress=False)
    t = res.tokens
    first = t[t.token == 0]
    assert first.groupby("image").is_sink.sum().min() >= 10  # a sink across the middle layers
    mid = t[t.layer.between(12, 24)]
    ratio = mid.norm / mid.groupby(["image", "layer"]).norm.transform("median")
    r0 = ratio[mid.token == 0]
    assert 50 < r0.min() and r0.max() < 250  # measured: 65-170x the median norm
    # the named dims include the channel where token 0 peaks, computed straight from HF
    ad = load_model("smollm2-135m")
    ids = ad.tokenizer(prompts[0], return_tensors="pt").input_ids
    with torch.no_grad():
        hs = ad.model(input_ids=ids, output_hidden_states=True).hidden_states
    peak = int(hs[15][0, 0].abs().argmax())
    assert res.summary["sink_dims"] and peak in res.summary["sink_dims"]
    assert float(hs[15][0, 0].abs().max() / hs[15][0, 0].pow(2).mean().sqrt()) >= 20
    assert np.isfinite(t.norm).all()


def test_smollm2_attention_rule_finds_the_first_token():
    """Causal statistic (Gu et al.): mean attention from the queries that see the token."""
    prompt = (
        "The capital of France is Paris. The capital of Germany is Berlin, and the capital of Italy is Rome."
    )
    res = scan("smollm2-135m", texts=[prompt], method="attention", progress=False)
    s = res.tokens[res.tokens.is_sink]
    assert set(s.token) == {0}
    assert s.layer.nunique() >= 20  # token 0 is the attention sink in most of the 30 blocks
