"""Test-time registers (issue 13) on towers with planted sinks: the register neurons found by
``register_neurons`` move the outlier onto the added token, for CLIP, SigLIP and DINOv2 towers,
alone and inside LLaVA; the model is untouched afterwards. Issue 25: the reference's details,
with known answers - the zero token enters CLIP's block 0 as the pre-layernorm's bias, one
``sign_max`` over all tokens and register neurons of a block, neuron scores per image and then
over the images that have a sink."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers as T

from sinkscope._utils import SinkscopeError
from sinkscope.interventions import TestTimeRegister, register_effect, tt_register
from sinkscope.interventions.registers import sign_max
from sinkscope.models.tiny import Plant, load_tiny, paint_markers
from sinkscope.models.vision import VisionAdapter
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
    """At the register neuron the added token gets the extreme activation over all tokens (sign
    kept); the patches get zero or their mean; CLS and the other neurons are untouched."""
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
    extreme = b[:, 0][b[:, 0].abs().argmax()]  # over every token: CLS and the register included
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


def _block0_input(ad, images, cfg):
    """The hidden states entering block 0 (and ``hidden_states[0]``) under ``tt_register``."""
    seen = {}

    def grab(mod, args, kwargs):
        seen["in"] = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).detach().clone()

    with torch.no_grad(), tt_register(ad, cfg):
        # registered after the register's own hooks, so it sees what block 0 really reads
        h = ad.blocks()[0].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            hs = ad.model(**ad.forward_kwargs(ad.prepare(images)), output_hidden_states=True).hidden_states
        finally:
            h.remove()
    return seen["in"], hs[0]


def test_the_zero_token_enters_clip_block_0_as_the_pre_layernorm_bias():
    """A plain transformers CLIP tower whose pre-layernorm has a non-zero bias: the added zero token
    passes the pre-norm as the reference's does (appended before ``ln_pre``), so block 0 reads
    LayerNorm(0) = the bias there (before issue 25: 0); the other tokens are as without it."""
    torch.manual_seed(0)
    cfg = T.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                             image_size=32, patch_size=8)  # fmt: skip
    model = T.CLIPVisionModel(cfg).eval()
    bias = torch.linspace(-2.0, 3.0, 32)
    with torch.no_grad():
        model.pre_layrnorm.bias.copy_(bias)
    ad = VisionAdapter(model, "clip-with-bias", image_size=(32, 32))
    images = _images(2)
    inside, hs0 = _block0_input(ad, images, TestTimeRegister(((0, 0),)))
    assert inside.shape[1] == 1 + 16 + 1  # CLS, 4 x 4 patches, the register last
    torch.testing.assert_close(inside[:, -1], bias.expand(2, -1), atol=1e-6, rtol=0)
    assert float(inside[:, -1].norm(dim=-1).min()) > 8  # not the zero vector (||bias|| = 8.5)
    torch.testing.assert_close(hs0[:, -1], bias.expand(2, -1), atol=1e-6, rtol=0)  # hidden_states[0] too
    with torch.no_grad():
        plain = ad.model(**ad.forward_kwargs(ad.prepare(images)), output_hidden_states=True).hidden_states[0]
    torch.testing.assert_close(inside[:, :-1], plain, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name,n_tokens", [("tiny-siglip", 16), ("tiny-dinov2", 17), ("tiny-dinov2-reg", 21)])
def test_without_a_pre_norm_the_token_enters_block_0_as_zero(name, n_tokens):
    """SigLIP and DINOv2 (with trained registers too) have no norm between the embeddings and block
    0: the added token enters it as exactly 0, after every token of the embeddings (patches, and
    DINOv2's CLS and trained registers)."""
    ad = load_tiny(name)
    inside, _ = _block0_input(ad, _images(1), TestTimeRegister(((0, 0),)))
    assert inside.shape[1] == n_tokens + 1
    assert torch.equal(inside[0, -1], torch.zeros(inside.shape[-1]))
    assert float(inside[0, -17:-1].norm(dim=-1).min()) > 0  # the 16 patches just before it are not


def test_sign_max_is_the_one_signed_extreme_of_the_block():
    """Two register neurons of block 1, activations written by hand (0 elsewhere) for 4 images:
    the register gets ONE value on both neurons - the largest |activation| over every token (CLS and
    the register included) and both neurons, sign kept, -a on a tie - not one extreme per neuron
    over the patches (before issue 25: [18.98, -7.5], [12, 0], [5, -5], [3, 0])."""
    ad = load_tiny("tiny-clip")
    ids, n = [0, 3], 17  # CLIP at 32 px: CLS, 16 patches, the register at 17
    written = {  # image -> [(token, neuron, value)]
        0: [(5, 0, 18.98), (9, 3, 1.62), (2, 3, -7.5)],
        1: [(0, 3, -30.0), (4, 0, 12.0)],  # CLS holds the extreme
        2: [(6, 0, 5.0), (7, 3, -5.0)],  # a tie: the negative one
        3: [(n, 0, 9.0), (8, 0, 3.0)],  # the register's own activation counts
    }

    def write(mod, args):
        act = args[0].clone()
        act[:, :, ids] = 0
        for img, cells in written.items():
            for tok, neuron, v in cells:
                act[img, tok, neuron] = v
        return (act, *args[1:])

    seen = {}
    fc2 = ad.mlp_out(1)
    first = fc2.register_forward_pre_hook(write)  # runs before the register's hook
    try:
        with torch.no_grad(), tt_register(ad, TestTimeRegister(((1, 0), (1, 3)))):
            last = fc2.register_forward_pre_hook(lambda m, a: seen.__setitem__("act", a[0].clone()))
            ad.model(**ad.forward_kwargs(ad.prepare(_images(4))))
            last.remove()
    finally:
        first.remove()
    act = seen["act"]
    want = torch.tensor([[18.98, 18.98], [-30.0, -30.0], [-5.0, -5.0], [9.0, 9.0]])
    torch.testing.assert_close(act[:, n][:, ids], want)
    assert torch.equal(act[:, 1:n][:, :, ids], torch.zeros(4, 16, 2))  # patches zeroed
    assert float(act[1, 0, 3]) == -30.0 and float(act[0, 0, 0]) == 0.0  # CLS keeps its own
    x = torch.tensor([[[1.0, -3.0], [2.0, 0.5]], [[4.0, 0.0], [-4.0, 1.0]], [[0.5, 0.25], [0.0, 0.0]]])
    got = sign_max(x)
    assert got.tolist() == [-3.0, -4.0, 0.5]


def test_neuron_scores_are_per_image_means_over_the_images_with_a_sink():
    """Block 0's neuron 5 (writing nothing, so the sinks stay put) gets hand-written activations.
    Image A: sinks at tokens 7 and 9 with |2| and |4|; image B: one sink (token 1) at 10; image C:
    no sink, 100 on CLS and 50 on a patch. The reference's score: ((2 + 4) / 2 + 10) / 2 = 6.5
    (C skipped); pooled over positions (before issue 25) 16 / 3 = 5.33, C counted as 0: 13 / 3.
    The other positions alike: (0 + 0 + 150 / 17) / 3."""
    ad = load_tiny("tiny-clip", plant=Plant(layer=2))
    with torch.no_grad():
        ad.mlp_out(0).weight[:, 5] = 0
    rng = np.random.default_rng(1)
    bg = [rng.integers(0, 200, (32, 32, 3), dtype=np.uint8) for _ in range(3)]
    images = [paint_markers(bg[0], [(1, 2), (2, 0)]), paint_markers(bg[1], [(0, 0)]), bg[2]]
    written = {0: [(7, 2.0), (9, -4.0)], 1: [(1, 10.0)], 2: [(0, 100.0), (5, -50.0)]}

    def write(mod, args):
        act = args[0].clone()
        act[:, :, 5] = 0
        for img, cells in written.items():
            for tok, v in cells:
                act[img, tok, 5] = v
        return (act, *args[1:])

    h = ad.mlp_out(0).register_forward_pre_hook(write)
    try:
        found = register_neurons(ad, images, detection_layer=2, rule=NormRule(threshold=100), progress=False)
    finally:
        h.remove()
    row = found.table.set_index(["block", "neuron"]).loc[(0, 5)]
    assert (found.n_sink_positions, found.n_sink_images, found.n_other_positions) == (3, 2, 15 + 16 + 17)
    assert float(row.mean_abs_sink) == pytest.approx(6.5, abs=1e-5)
    assert float(row.mean_abs_other) == pytest.approx(150 / 17 / 3, abs=1e-5)
    assert found.table.iloc[0][["block", "neuron"]].tolist() == [1, 0]  # the planted neuron still first
