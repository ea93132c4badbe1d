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
