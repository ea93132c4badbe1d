"""Test-time registers (issue 13) on towers with planted sinks: the register neurons found by
``register_neurons`` move the outlier onto the added token, for CLIP, SigLIP and DINOv2 towers,
alone and inside LLaVA; the model is untouched afterwards."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sinkscope._utils import SinkscopeError
from sinkscope.interventions import TestTimeRegister, register_effect, tt_register
from sinkscope.models.tiny import Plant, load_tiny, paint_markers
from sinkscope.neurons import register_neurons
from sinkscope.sinks import NormRule

CELLS = [(1, 2)]


def _images(n=3):
    rng = np.random.default_rng(0)
    return [paint_markers(rng.integers(0, 200, (32, 32, 3), dtype=np.uint8), CELLS) for _ in range(n)]


@pytest.mark.parametrize("name", ["tiny-clip", "tiny-siglip", "tiny-dinov2"])
def test_the_planted_outlier_moves_onto_the_added_token(name):
    ad = load_tiny(name, plant=Plant(layer=2))
    images = _images()
    found = register_neurons(ad, images, detection_layer=-1, rule=NormRule(threshold=100), progress=False)
    cfg = TestTimeRegister.from_table(found, k=1)
    assert cfg.neurons == ((1, 0),)  # the planted neuron: block plant.layer - 1, neuron 0
    eff = register_effect(ad, images, cfg)
    late = eff[eff.layer >= 2]
    assert (late.max_patch_ratio_before > 10).all()
    assert (late.max_patch_ratio_after < 2).all()  # the outlier falls below 2x the image median
    assert (late.register_norm > 0.5 * late.max_patch_norm_before).all()  # the added token takes it
    inputs = ad.prepare(images[:1])
    with torch.no_grad():
        before = ad.model(**ad.forward_kwargs(inputs)).last_hidden_state
        with tt_register(ad, cfg):
            inside = ad.model(**ad.forward_kwargs(inputs)).last_hidden_state
        after = ad.model(**ad.forward_kwargs(inputs)).last_hidden_state
    assert inside.shape[1] == before.shape[1] + 1  # a tower alone returns the register last
    assert torch.equal(before, after)


def test_inside_llava_the_projector_never_sees_the_register():
    ad = load_tiny("tiny-llava", plant=Plant(layer=2))
    img = _images(1)[0]
    inp = ad.build_inputs([img], "<image> What is in the picture?")
    call = {k: inp[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    m = ad.model.model
    cfg = TestTimeRegister(neurons=((1, 0),))
    with torch.no_grad():
        feats = m.get_image_features(pixel_values=call["pixel_values"], vision_feature_layer=-2,
                                     vision_feature_select_strategy="default").hidden_states[-2]  # fmt: skip
        logits = ad.model(**call).logits
        with tt_register(ad, cfg):
            out = m.get_image_features(pixel_values=call["pixel_values"], vision_feature_layer=-2,
                                       vision_feature_select_strategy="default")  # fmt: skip
            inside = ad.model(**call).logits
        again = ad.model(**call).logits
    assert out.pooler_output[0].shape[0] == 16 and all(h.shape[1] == 17 for h in out.hidden_states if h is not None)
    sink = 1 + 1 * 4 + 2  # ViT token of patch (1, 2)
    norms_before, norms_after = feats[0].norm(dim=-1), out.hidden_states[-2][0].norm(dim=-1)
    assert norms_before[sink] > 10 * norms_before[1:].median()
    assert norms_after[sink] < 2 * norms_after[1:].median()
    assert inside.shape == logits.shape and not torch.allclose(inside, logits)
    assert torch.equal(again, logits)


@pytest.mark.parametrize("patches", ["zero", "mean"])
def test_the_register_neuron_activations(patches):
    """At the register neuron the added token gets the patches' extreme activation (sign kept);
    the patches get zero or their mean; CLS and the other neurons are untouched."""
    ad = load_tiny("tiny-clip", plant=Plant(layer=2))
    inputs = ad.prepare(_images(1))
    seen = {}

    def probe(key):
        return lambda mod, args: seen.__setitem__(key, args[0].detach().clone())

    fc2 = ad.mlp_out(1)
    first = fc2.register_forward_pre_hook(probe("before"))  # runs before the register's hook
    try:
        with torch.no_grad(), tt_register(ad, TestTimeRegister(((1, 0),), patches=patches)):
            last = fc2.register_forward_pre_hook(probe("after"))  # runs after it
            ad.model(**ad.forward_kwargs(inputs))
            last.remove()
    finally:
        first.remove()
    b, a = seen["before"][0], seen["after"][0]
    n = b.shape[0] - 1  # the register is the last token
    orig = b[1:n, 0]
    extreme = orig[orig.abs().argmax()]
    assert float(a[n, 0]) == float(extreme) and abs(float(extreme)) > 1
    want = torch.zeros_like(orig) if patches == "zero" else torch.full_like(orig, float(orig.mean()))
    torch.testing.assert_close(a[1:n, 0], want)
    assert torch.equal(a[0], b[0]) and torch.equal(a[:, 1:], b[:, 1:])  # CLS and other neurons untouched


def test_bad_settings():
    ad = load_tiny("tiny-clip")
    with pytest.raises(SinkscopeError, match="block 9"):
        with tt_register(ad, TestTimeRegister(((9, 0),))):
            pass
    with pytest.raises(SinkscopeError, match="zero or mean"):
        TestTimeRegister(((1, 0),), patches="median")
    with pytest.raises(SinkscopeError, match="at least one"):
        TestTimeRegister(())


def test_eval_tt_register_variant(tmp_path):
    """``--variant tt-register`` on a LLaVA with planted ViT sinks: with the register neurons found
    on marked images the scores change and the summary names the neurons; without outliers in the
    calibration scenes the default search fails in one line."""
    from sinkscope.evaluation.run import evaluate

    ad = load_tiny("tiny-llava", plant=Plant(layer=2))
    found = register_neurons(ad.vision, _images(), detection_layer=3, rule=NormRule(threshold=100), progress=False)
    cfg = TestTimeRegister.from_table(found, k=1)
    kw = dict(limit=4, variants=("both", "tt-register"), progress=False)
    res = evaluate(ad, "shapes", tt_config=cfg, out=tmp_path / "e", **kw)
    assert res.summary["tt_register"]["neurons"] == [[1, 0]]
    s = res.predictions.set_index(["variant", "id"]).scores
    assert any(s["tt-register", i] != s["both", i] for i in s["both"].index)
    assert "test-time register" in res.predictions[res.predictions.variant == "tt-register"].intervention.iloc[0]
    with pytest.raises(SinkscopeError, match="no sink positions at layer 3"):
        evaluate(ad, "shapes", **kw)  # shapes scenes have no pure marker-red patch: no outlier to find
