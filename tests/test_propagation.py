"""ViT tokens into the LLM (Fig. 3A) on tiny-llava with planted ViT sinks, checked against
Hugging Face's own returned attentions and hidden states."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sinkscope import load_model, paint_markers
from sinkscope.capture import count_hooks
from sinkscope.flow.propagation import propagation
from sinkscope.sinks import DimsRule

CELLS = [[(1, 2)], [(3, 0), (0, 3)]]
PROMPT = "<image> and <image> what is the color of the cat ?"


@pytest.fixture(scope="module")
def setup():
    ad = load_model("tiny-llava+sinks")
    imgs = [paint_markers(np.full((32, 32, 3), 90 + 60 * i, np.uint8), c) for i, c in enumerate(CELLS)]
    return ad, imgs


def test_planted_sinks_map_to_their_llm_positions_and_the_top_bin(setup):
    ad, imgs = setup
    res = propagation(ad, imgs, PROMPT, llm_rule=DimsRule(tau=4, massive_ratio=100, min_layer=2))
    vt = res.visual_tokens
    assert len(vt) == 2 * 16 and set(vt.kind) == {"patch"}  # default strategy: CLS dropped
    sinks = vt[vt.is_vit_sink]
    assert sorted(zip(sinks.image, sinks.row.astype(int), sinks.col.astype(int))) == sorted(
        (i, r, c) for i, cells in enumerate(CELLS) for r, c in cells
    )
    ids = ad.build_inputs(imgs, PROMPT)["input_ids"][0]
    first_img = int(torch.nonzero(ids == ad.image_token_id).min())
    for r in sinks.itertuples():  # position = start of the image's run + patch index
        start = first_img + r.image * (16 + 1)  # 16 image tokens, then the word "and"
        assert r.llm_position == start + (r.vit_token - 1)
    top_tokens = vt[np.floor(vt.vit_norm / 5) * 5 >= res.by_bin.bin_lo.max()]
    assert top_tokens.is_vit_sink.all()


def test_bin_means_equal_a_direct_computation_from_hf_attentions(setup):
    ad, imgs = setup
    res = propagation(ad, imgs, PROMPT)
    inp = ad.build_inputs(imgs, PROMPT)
    m = ad.model
    m.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = m(input_ids=inp["input_ids"], pixel_values=inp["pixel_values"], output_attentions=True)
            vit = m.model.vision_tower(pixel_values=inp["pixel_values"], output_hidden_states=True)
    finally:
        m.set_attn_implementation("sdpa")
    ids = inp["input_ids"][0]
    is_img = ids == ad.image_token_id
    q = ~is_img
    q[: int(torch.nonzero(is_img).min())] = False
    vit_norm = (
        vit.hidden_states[ad.feature_layer].norm(dim=-1)[:, 1:].reshape(-1)
    )  # CLS dropped, images in order
    positions = torch.nonzero(is_img).flatten()
    np.testing.assert_allclose(res.visual_tokens.vit_norm.to_numpy(), vit_norm.numpy(), rtol=1e-5)
    bins = torch.floor(vit_norm / 5) * 5
    for layer, a in enumerate(out.attentions):
        recv = a[0].mean(0)[q].mean(0)[positions]  # heads, then chosen queries; image keys
        for edge in torch.unique(bins):
            expected = recv[bins == edge].mean().item()
            got = res.by_bin[
                (res.by_bin.layer == layer) & (res.by_bin.bin_lo == float(edge))
            ].mean_attention.item()
            assert got == pytest.approx(expected, rel=1e-5, abs=1e-8)


def test_generation_mode_and_hooks_restored(setup):
    ad, imgs = setup
    before = count_hooks(ad.model)
    res = propagation(ad, imgs, PROMPT, generate=3)
    assert res.summary["queries"] == "3 generated tokens"
    assert np.isfinite(res.visual_tokens.attention_received).all()
    assert count_hooks(ad.model) == before
    assert ad.llm.config._attn_implementation == "sdpa"
