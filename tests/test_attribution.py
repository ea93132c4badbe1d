"""captum attribution of the answer to each visual token (tiny-llava with a planted ViT sink)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sinkscope import load_model, paint_markers
from sinkscope.flow.attribution import _tower_features, attribute_visual_tokens


@pytest.fixture(scope="module")
def setup():
    ad = load_model("tiny-llava+sinks")
    img = paint_markers(np.full((32, 32, 3), 120, np.uint8), [(1, 2)])
    return ad, ad.build_inputs([img], "<image> what is the color of the cat ?")


def test_integrated_gradients_are_complete(setup):
    ad, inp = setup
    a = attribute_visual_tokens(ad, inp, n_steps=128, internal_batch_size=32)
    assert len(a) == 16 and a.convergence_delta[0] < 5e-3  # captum's own completeness gap
    # completeness, computed independently: logit with real visual embeddings minus with zeros
    ids, am = inp["input_ids"], inp["attention_mask"]
    emb = ad.model.model.get_input_embeddings()(ids)
    img = ids[0] == ad.image_token_id
    with torch.no_grad():
        feats = ad.projector(_tower_features(ad, inp["pixel_values"]))[0]
        real = emb.clone()
        real[0, img] = feats
        zero = emb.clone()
        zero[0, img] = 0.0
        f = lambda e: ad.model(inputs_embeds=e, attention_mask=am).logits[0, -1, int(a.answer_id[0])]  # noqa: E731
        diff = float(f(real) - f(zero))
    assert a.attribution.sum() == pytest.approx(diff, abs=5e-3) and abs(diff) > 0.05


def test_ablation_equals_a_direct_zeroing_of_one_token(setup):
    ad, inp = setup
    a = attribute_visual_tokens(ad, inp, method="ablation", internal_batch_size=4)
    ids, am = inp["input_ids"], inp["attention_mask"]
    emb = ad.model.model.get_input_embeddings()(ids)
    img_pos = torch.nonzero(ids[0] == ad.image_token_id).flatten()
    with torch.no_grad():
        feats = ad.projector(_tower_features(ad, inp["pixel_values"]))[0]
        full = emb.clone()
        full[0, img_pos] = feats
        j = 6  # the planted sink's feature (token 7 minus CLS)
        cut = full.clone()
        cut[0, img_pos[j]] = 0.0
        f = lambda e: ad.model(inputs_embeds=e, attention_mask=am).logits[0, -1, int(a.answer_id[0])]  # noqa: E731
        expected = float(f(full) - f(cut))
    assert a.attribution[j] == pytest.approx(expected, rel=1e-4, abs=1e-6)


def _logit_diff(ad, inp, answer_id):
    """logit(real visual embeddings) - logit(zero visual embeddings), computed directly."""
    ids, am = inp["input_ids"], inp["attention_mask"]
    emb = ad.model.model.get_input_embeddings()(ids)
    img = ids[0] == ad.image_token_id
    with torch.no_grad():
        feats = ad.projector(_tower_features(ad, inp["pixel_values"]))[0]
        real, zero = emb.clone(), emb.clone()
        real[0, img] = feats
        zero[0, img] = 0.0
        f = lambda e: ad.model(inputs_embeds=e, attention_mask=am).logits[0, -1, answer_id]  # noqa: E731
        return float(f(real) - f(zero))


def test_default_steps_reach_the_completeness_tolerance(setup, caplog):
    ad, inp = setup
    with caplog.at_level("WARNING", logger="sinkscope"):
        a = attribute_visual_tokens(ad, inp)  # defaults (16 steps used to leave a gap of 0.13 of 0.25)
    diff = _logit_diff(ad, inp, int(a.answer_id[0]))
    assert a.logit_diff[0] == pytest.approx(diff, abs=1e-5) and abs(diff) > 0.2
    assert a.converged.all() and a.n_steps[0] >= 64
    assert a.convergence_delta[0] <= 0.05 * abs(diff)
    assert a.delta_tolerance[0] == pytest.approx(0.05 * abs(diff))
    assert abs(a.attribution.sum() - diff) <= 0.05 * abs(diff)
    assert a.attrs["convergence"]["tried"][-1]["convergence_delta"] == pytest.approx(a.convergence_delta[0])
    assert "did not converge" not in caplog.text


def test_steps_double_until_the_tolerance_and_warn_at_the_cap(setup, caplog):
    ad, inp = setup
    a = attribute_visual_tokens(ad, inp, n_steps=8, max_steps=256)
    tried = [t["n_steps"] for t in a.attrs["convergence"]["tried"]]
    assert tried[0] == 8 and tried == [8 * 2**i for i in range(len(tried))] and len(tried) >= 3
    assert a.converged[0] and a.convergence_delta[0] <= a.delta_tolerance[0]
    with caplog.at_level("WARNING", logger="sinkscope"):
        capped = attribute_visual_tokens(ad, inp, n_steps=4, max_steps=8)
    assert [t["n_steps"] for t in capped.attrs["convergence"]["tried"]] == [4, 8]
    assert not capped.converged[0] and capped.n_steps[0] == 8
    assert capped.convergence_delta[0] > capped.delta_tolerance[0]
    assert "integrated gradients did not converge" in caplog.text and "at 8 steps" in caplog.text


def test_a_jump_at_the_baseline_is_reported_and_not_fought_with_more_steps(setup, caplog):
    ad, inp = setup
    img = inp["input_ids"][0] == ad.image_token_id

    def jump_at_zero(module, args, kwargs):  # exactly-zero visual embeddings act differently
        h = kwargs.get("hidden_states", args[0] if args else None)
        z = (h[:, img] == 0).flatten(1).all(1)
        if z.any():
            h = h.clone()
            h[z.nonzero().flatten()[:, None], img.nonzero().flatten()[None, :]] = 3.0
            return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})
        return None

    layer0 = ad.model.model.language_model.layers[0]
    handle = layer0.register_forward_pre_hook(jump_at_zero, with_kwargs=True)
    try:
        with caplog.at_level("WARNING", logger="sinkscope"):
            a = attribute_visual_tokens(ad, inp, n_steps=16, max_steps=256)
    finally:
        handle.remove()
    assert abs(a.baseline_jump[0]) > a.delta_tolerance[0] and not a.converged[0]
    assert [t["n_steps"] for t in a.attrs["convergence"]["tried"]] == [16]  # no doubling
    assert "cannot converge" in caplog.text and "first token" in caplog.text
    clean = attribute_visual_tokens(ad, inp)
    assert abs(clean.baseline_jump[0]) < clean.delta_tolerance[0]
