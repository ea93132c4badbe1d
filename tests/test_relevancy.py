"""Chefer-style relevancy: hand computation on given maps and gradients, then tiny-llava end to end."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from sinkscope._utils import SinkscopeError
from sinkscope.capture import count_hooks
from sinkscope.flow.relevancy import head_mean_positive, relevancy, vlm_relevancy
from sinkscope.flow.rollout import rollout
from sinkscope.models import load_model
from sinkscope.models.tiny import paint_markers

from .conftest import photo

# Block 0: two heads. Products grad * attn per head, then clamped at 0:
#   head 1: [[1, 0, 0], [1, -1, 0], [.2, .3, .5]]   -> [[1, 0, 0], [1, 0, 0], [.2, .3, .5]]
#   head 2: [[-1, 0, 0], [0, 2, 0], [-.4, .4, 0]]   -> [[0, 0, 0], [0, 2, 0], [0, .4, 0]]
# Abar0 = mean = [[.5, 0, 0], [.5, 1, 0], [.1, .35, .25]];  R1 = I + Abar0
A0 = np.array(
    [
        [[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5]],
        [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.4, 0.4, 0.2]],
    ]
)
G0 = np.array(
    [
        [[1.0, 0.0, 0.0], [2.0, -2.0, 0.0], [1.0, 1.0, 1.0]],
        [[-1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [-1.0, 1.0, 0.0]],
    ]
)
ABAR0 = np.array([[0.5, 0.0, 0.0], [0.5, 1.0, 0.0], [0.1, 0.35, 0.25]])
R1 = np.array([[1.5, 0.0, 0.0], [0.5, 2.0, 0.0], [0.1, 0.35, 1.25]])
# Block 1: one head; grad * attn = [[0, 1, 0], [0, -1, 0], [1, 0, -1]] -> Abar1 = [[0, 1, 0], [0, 0, 0], [1, 0, 0]]
A1 = np.array([[[0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.0, 0.5]]])
G1 = np.array([[[3.0, 1.0, 3.0], [1.0, -1.0, 1.0], [2.0, 5.0, -2.0]]])
# R2 = R1 + Abar1 @ R1: Abar1 @ R1 has row 0 = R1[1], row 1 = 0, row 2 = R1[0]
ABAR1 = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
R2 = np.array([[2.0, 2.0, 0.0], [0.5, 2.0, 0.0], [1.6, 0.35, 1.25]])
# the wrong order R + R @ Abar1 gives row 0 = [1.5, 1.5, 0], row 2 = [1.35, .45, 1.25]


def test_relevancy_by_hand():
    np.testing.assert_allclose(head_mean_positive(A0, G0), ABAR0, atol=1e-12)
    np.testing.assert_allclose(relevancy([A0], [G0]), R1, atol=1e-12)
    r = relevancy([A0, A1], [G0, G1])
    np.testing.assert_allclose(r, R2, atol=1e-12)
    np.testing.assert_allclose(r.sum(axis=1), [4.0, 2.5, 3.2], atol=1e-12)  # row sums
    assert (r >= 0).all() and (np.diag(r) >= 1).all()
    # start/end select blocks like a slice; no block = identity
    np.testing.assert_allclose(relevancy([A0, A1], [G0, G1], start_layer=1), np.eye(3) + ABAR1, atol=1e-12)
    np.testing.assert_allclose(relevancy([A0, A1], [G0, G1], end_layer=0), np.eye(3), atol=1e-12)


def test_relevancy_signs_clamping_torch_and_batches():
    # only negative evidence: everything is clamped away, relevancy stays the identity
    np.testing.assert_allclose(relevancy([A0, A1], [-np.abs(G0) - 1, -np.abs(G1) - 1]), np.eye(3))
    # without the clamp the signed mean would differ (so the clamp is what the hand value checks)
    signed = (A0 * G0).mean(0)
    assert np.abs(signed - ABAR0).max() > 0.1
    # torch in, torch out; batched [batch, heads, q, k] -> [batch, q, k]
    t = relevancy([torch.tensor(A0, dtype=torch.float32)], [torch.tensor(G0, dtype=torch.float32)])
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32
    np.testing.assert_allclose(t.numpy(), R1, atol=1e-6)
    b = relevancy([np.stack([A0, A0])], [np.stack([G0, -G0])])
    assert b.shape == (2, 3, 3)
    np.testing.assert_allclose(b[0], R1, atol=1e-12)
    with pytest.raises(SinkscopeError, match="differ in shape"):
        relevancy([A0], [G1])
    with pytest.raises(SinkscopeError, match="gradients"):
        relevancy([A0, A1], [G0])


@pytest.fixture(scope="module")
def llava():
    return load_model("tiny-llava+sinks")


def _inputs(ad, images, prompt):
    inp = ad.build_inputs(images, prompt)
    return {k: inp[k] for k in ("input_ids", "attention_mask", "pixel_values")}


def test_vlm_relevancy_on_tiny_llava(llava):
    ad = llava
    images = [
        paint_markers(np.full((32, 32, 3), 120, np.uint8), [(1, 2)]),
        paint_markers(photo(1, size=(32, 32)), [(3, 0)]),
    ]
    prompt = "what is in the image ?"
    kw = _inputs(ad, images, prompt)
    with torch.no_grad():
        before = ad.model(**kw).logits  # first forward: transformers installs its own capture hooks
    n_hooks = count_hooks(ad.model)
    impls = (
        ad.model.config._attn_implementation,
        ad.model.config.vision_config._attn_implementation,
        ad.model.config.text_config._attn_implementation,
        ad.vision.model.config._attn_implementation,
        ad.llm.model.config._attn_implementation,
    )
    weights = {k: v.clone() for k, v in ad.model.state_dict().items()}

    res = vlm_relevancy(ad, images, prompt, names=["grey", "photo"])

    # the model is left as it was
    assert count_hooks(ad.model) == n_hooks
    assert impls == (
        ad.model.config._attn_implementation,
        ad.model.config.vision_config._attn_implementation,
        ad.model.config.text_config._attn_implementation,
        ad.vision.model.config._attn_implementation,
        ad.llm.model.config._attn_implementation,
    )
    assert impls[0] == "sdpa" and not ad.model.training
    assert all(p.grad is None for p in ad.model.parameters())
    assert all(torch.equal(v, weights[k]) for k, v in ad.model.state_dict().items())
    with torch.no_grad():
        torch.testing.assert_close(ad.model(**kw).logits, before)

    t = res.table
    n_vit = 1 + 16
    assert len(t) == 2 * n_vit and t.image_name.tolist() == ["grey"] * n_vit + ["photo"] * n_vit
    assert (t.relevancy >= 0).all() and (t.rollout >= 0).all()
    assert (t.relevancy_llm.dropna() >= 0).all()
    cls = t[t.kind == "cls"]
    assert (cls.llm_position == -1).all() and cls.relevancy_llm.isna().all()
    sinks = t[t.is_vit_sink][["image", "row", "col"]].values.tolist()
    assert sinks == [[0, 1, 2], [1, 3, 0]]
    s = res.summary
    assert s["answer_id"] == int(before[0, -1].argmax()) and s["feature_layer"] == ad.feature_layer == 3
    assert s["vit_blocks"] == [0, 2] and s["n_vit_sinks"] == 2
    # rollout rows sum to 1, so chaining through the ViT keeps each image's rollout mass
    g = t.groupby("image")
    np.testing.assert_allclose(g.rollout.sum(), g.rollout_llm.sum(), rtol=1e-9)
    # relevancy rows sum to >= 1 (identity + non-negative terms): the ViT can only add mass
    assert (g.relevancy.sum() >= g.relevancy_llm.sum() - 1e-12).all()

    # by hand, from the maps and gradients Hugging Face returns with output_attentions=True (on a copy)
    m2 = copy.deepcopy(ad.model)
    m2.set_attn_implementation("eager")
    out = m2(**kw, output_attentions=True, use_cache=False)
    llm = list(out.attentions)
    vit = list(out.image_outputs.attentions)[: ad.feature_layer]
    ans = s["answer_id"]
    grads = torch.autograd.grad(out.logits[0, -1, ans], llm + vit)
    gl, gv = grads[: len(llm)], grads[len(llm) :]
    r_llm = relevancy([a[0].detach() for a in llm], [g[0] for g in gl]).double().numpy()[-1]
    ro_llm = rollout([a[0].detach() for a in llm]).double().numpy()[-1]
    img_pos = np.nonzero(kw["input_ids"][0].numpy() == ad.image_token_id)[0]
    assert len(img_pos) == 32
    for k in range(2):
        r_tok = np.r_[0.0, r_llm[img_pos[16 * k : 16 * (k + 1)]]]  # CLS is not fed (strategy "default")
        ro_tok = np.r_[0.0, ro_llm[img_pos[16 * k : 16 * (k + 1)]]]
        R_vit = relevancy([a[k].detach() for a in vit], [g[k] for g in gv]).double().numpy()
        Ro_vit = rollout([a[k].detach() for a in vit]).double().numpy()
        tk = t[t.image == k]
        np.testing.assert_allclose(tk.relevancy_llm.to_numpy()[1:], r_tok[1:], rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(tk.relevancy.to_numpy(), r_tok @ R_vit, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(tk.rollout.to_numpy(), ro_tok @ Ro_vit, rtol=1e-4, atol=1e-7)
        assert tk.llm_position.tolist()[1:] == img_pos[16 * k : 16 * (k + 1)].tolist()


def test_vlm_relevancy_restores_the_model_on_error(llava):
    ad = llava
    img = np.zeros((32, 32, 3), np.uint8)
    with torch.no_grad():  # transformers installs its own capture hooks at the first forward
        ad.model(**_inputs(ad, [img], "what ?"))
    n_hooks = count_hooks(ad.model)
    with pytest.raises(IndexError):
        vlm_relevancy(ad, [img], "what ?", answer_id=10**6)  # out of the vocabulary
    assert ad.model.config._attn_implementation == "sdpa"
    assert ad.model.config.text_config._attn_implementation == "sdpa"
    assert count_hooks(ad.model) == n_hooks
    with pytest.raises(SinkscopeError, match="LLaVA"):
        vlm_relevancy(load_model("tiny-dinov2"), [img], "what ?")


def test_relevancy_figure(llava):
    from sinkscope.viz.relevancy import relevancy_figure

    img = paint_markers(np.full((32, 32, 3), 60, np.uint8), [(2, 2)])
    res = vlm_relevancy(llava, [img], "what is this ?", names=["grey"])
    fig = relevancy_figure(res.table, "grey", {"relevancy": res.summary, "model": {"name": "tiny"}})
    roles = [tr.meta.get("role") for tr in fig.data if isinstance(tr.meta, dict)]
    assert roles.count("map") == 3 and "sink_marker" in roles
    assert "layer 3" in fig.layout.title.text


def test_flow_cli_writes_relevancy_and_redundancy(tmp_path):
    import json

    import pandas as pd
    from PIL import Image

    from sinkscope.cli import main

    p = tmp_path / "m.png"
    Image.fromarray(paint_markers(np.full((32, 32, 3), 110, np.uint8), [(2, 1)])).save(p)
    out = tmp_path / "f"
    args = ["flow", "--model", "tiny-llava+sinks", "--images", str(p), "--prompt", "what is this ?"]
    rc = main([*args, "--analysis", "relevancy", "--analysis", "redundancy", "--out", str(out)])
    assert rc == 0
    rv = pd.read_csv(out / "relevancy.csv")
    assert len(rv) == 17 and (rv.relevancy >= 0).all()
    assert rv[rv.is_vit_sink][["row", "col"]].values.tolist() == [[2, 1]]
    red = pd.read_csv(out / "redundancy.csv")
    assert sorted(red.layer.unique()) == [0, 3]  # input and the feature layer
    s = json.loads((out / "summary.json").read_text())
    assert s["relevancy"]["feature_layer"] == 3 and s["redundancy"]["detection_layer"] == 3
    html = (out / "flow.html").read_text()
    assert "Relevancy of the answer beside rollout" in html and "Sinks on redundant patches" in html


@pytest.mark.slow
def test_vlm_relevancy_on_mini_llava():
    from sinkscope.data import sample_images

    ad = load_model("mini-llava-untrained")
    img = sample_images(1)[0].load()
    res = vlm_relevancy(ad, [img], "What is the main object in the image?", chat=True)
    t = res.table
    n_vit = ad.vision.prepare([img]).layouts[0].n_tokens
    assert len(t) == n_vit and (t.relevancy >= 0).all() and (t.rollout >= 0).all()
    assert (
        res.summary["feature_layer"] == ad.feature_layer
        and res.summary["vit_blocks"][-1] == ad.feature_layer - 1
    )
    assert ad.model.config._attn_implementation == "sdpa"
