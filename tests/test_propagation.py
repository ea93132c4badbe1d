"""ViT tokens into the LLM (Fig. 3A) on tiny-llava with planted ViT sinks, checked against
Hugging Face's own returned attentions and hidden states."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sinkscope import load_model, paint_markers
from sinkscope.capture import count_hooks
from sinkscope.flow.propagation import propagation
from sinkscope.sinks import DimsRule, topk_for_exact_dims

CELLS = [[(1, 2)], [(3, 0), (0, 3)]]
PROMPT = "<image> and <image> what is the color of the cat ?"


@pytest.fixture(scope="module")
def setup():
    ad = load_model("tiny-llava+sinks")
    imgs = [paint_markers(np.full((32, 32, 3), 90 + 60 * i, np.uint8), c) for i, c in enumerate(CELLS)]
    return ad, imgs


def test_planted_sinks_map_to_their_llm_positions_and_the_top_bin(setup):
    ad, imgs = setup
    # the paper's rule, named: image 1's two sinks are 2 of 16 patches, more than the automatic gap's 10%
    res = propagation(ad, imgs, PROMPT, vit_rule="norm:100", llm_rule=DimsRule(tau=4, massive_ratio=100, min_layer=2))
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


# -- issue 9, item 2: every output token's attention (Fig. 3A) ---------------------------------


def _hf_output_token_attention(ad, imgs, n: int) -> tuple[np.ndarray, int]:
    """``[LLM layers, visual tokens]`` head-averaged last-query-row attention of each output token
    of a greedy ``generate`` (Hugging Face's returned attentions, eager), averaged over the output
    tokens; and the number of output tokens."""
    inp = ad.build_inputs(imgs, PROMPT)
    m = ad.model
    m.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = m.generate(
                input_ids=inp["input_ids"],
                pixel_values=inp["pixel_values"],
                attention_mask=inp["attention_mask"],
                max_new_tokens=n,
                do_sample=False,
                output_attentions=True,
                return_dict_in_generate=True,
            )
    finally:
        m.set_attn_implementation("sdpa")
    positions = torch.nonzero(inp["input_ids"][0] == ad.image_token_id).flatten()
    # out.attentions: one tuple per output token (the first from the prefill), one [1, H, Q, K] per layer
    per_token = [
        torch.stack([a[0].mean(0)[-1, positions] for a in step]) for step in out.attentions
    ]  # each [layers, visual tokens]
    return torch.stack(per_token).mean(0).numpy(), len(out.attentions)


@pytest.mark.parametrize("n", [1, 3])
def test_generate_averages_every_output_token_like_hf(setup, n):
    ad, imgs = setup
    res = propagation(ad, imgs, PROMPT, generate=n)
    expected, n_out = _hf_output_token_attention(ad, imgs, n)
    vt = res.visual_tokens
    for layer in range(ad.llm.n_layers):
        got = vt[f"attn_L{layer}"].to_numpy()
        assert (got > 0).all()  # generate=1 used to give 0.0 everywhere
        np.testing.assert_allclose(got, expected[layer], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(vt.attention_received.to_numpy(), expected.mean(0), rtol=1e-4, atol=1e-7)
    assert n_out == n and res.summary["n_query_tokens"] == n
    assert res.summary["queries"] == f"{n} generated tokens"


# -- issue 9, item 3: LLM sink dims from text, exact top-k, decoder-layer inputs only ---------


@pytest.fixture(scope="module")
def text_sinks():
    """tiny-llava+sinks whose LLM also has a planted first-token (BOS) sink on dim 11."""
    from sinkscope.models.tiny import Plant, plant_text_sinks

    ad = load_model("tiny-llava+sinks")
    plant_text_sinks(ad.llm, Plant(layer=2, dims=(11,), magnitude=800.0, token_ids=(1,)))
    imgs = [paint_markers(np.full((32, 32, 3), 90 + 60 * i, np.uint8), c) for i, c in enumerate(CELLS)]
    return ad, imgs


def _massive_dims(hidden: list[torch.Tensor], rule: DimsRule) -> set[int]:
    """Channels with a massive activation (Sun et al.) in any of ``hidden`` ``[1, N, D]``, each
    against its own lower median |a| over tokens and channels."""
    found: set[int] = set()
    for h in hidden:
        a = h[0].abs()
        med = a.flatten().kthvalue((a.numel() + 1) // 2).values
        massive = (a > rule.massive_abs) & (a >= rule.massive_ratio * med)
        found |= set(torch.nonzero(massive)[:, 1].tolist())
    return found


def test_sink_dims_come_from_a_text_only_pass(text_sinks):
    ad, imgs = text_sinks
    rule = DimsRule(tau=6, massive_abs=1.0, massive_ratio=100, min_layer=2)
    res = propagation(ad, imgs, PROMPT, llm_rule=rule)
    info = res.summary["llm_rule"]
    # direct: the prompt without its image tokens through the LLM alone, decoder-layer inputs >= 2
    ids = ad.build_inputs(imgs, PROMPT)["input_ids"]
    text_ids = ids[:, ids[0] != ad.image_token_id]
    with torch.no_grad():
        hs = ad.llm.model(input_ids=text_ids, output_hidden_states=True).hidden_states
    direct = _massive_dims(list(hs[rule.min_layer : ad.llm.n_layers]), rule)
    assert set(info["sink_dims"]) == direct == {11}  # the planted first-token sink dim
    assert info["sink_dims_source"] == "text"
    # the old behaviour, still available, also takes dims the visual tokens bring
    old = propagation(ad, imgs, PROMPT, llm_rule=rule, sink_dims_from="multimodal")
    assert old.summary["llm_rule"]["sink_dims_source"] == "multimodal"
    assert set(old.summary["llm_rule"]["sink_dims"]) > {11}
    first = propagation(ad, imgs, PROMPT, llm_rule=rule, sink_dims_from="first_text_token")
    assert first.summary["llm_rule"]["sink_dims"] == [11]


def test_sink_layers_equal_the_exact_rule_on_hf_hidden_states(setup):
    """A low tau makes the rule fire on channels outside a token's top 4: only a top-k of at least
    topk_for_exact_dims keeps the count exact. Dims given, so discovery plays no part."""
    ad, imgs = setup
    dims = (0, 5, 9, 17, 23, 31, 40, 52)
    rule = DimsRule(tau=1.5, dims=dims, min_layer=1)
    res = propagation(ad, imgs, PROMPT, llm_rule=rule)
    inp = ad.build_inputs(imgs, PROMPT)
    with torch.no_grad():
        hs = ad.model(
            input_ids=inp["input_ids"], pixel_values=inp["pixel_values"], output_hidden_states=True
        ).hidden_states
    L = ad.llm.n_layers
    assert len(hs) == L + 1  # hs[L] is the final norm's output: no decoder layer reads it
    x = torch.stack([h[0] for h in hs[rule.min_layer : L]])  # [layers, seq, D]
    phi = x[..., list(dims)].abs().amax(-1) / x.pow(2).mean(-1).sqrt()
    expected = (phi >= rule.tau).sum(0)[res.visual_tokens.llm_position.tolist()]
    assert (expected > 0).any() and (expected < L - rule.min_layer).any()
    np.testing.assert_array_equal(res.visual_tokens.llm_sink_layers.to_numpy(), expected.numpy())
    info = res.summary["llm_rule"]
    assert info["sink_dims"] == list(dims) and info["sink_dims_source"] == "given"
    assert info["topk_channels"] >= topk_for_exact_dims(ad.llm.hidden_size, rule.tau) and info["topk_exact"]


def test_only_decoder_layer_inputs_are_counted(setup):
    """With tau = 0 every checked layer calls every token a sink: the count is the number of
    decoder layers from min_layer on, not one more for the final norm's output."""
    ad, imgs = setup
    L = ad.llm.n_layers
    res = propagation(ad, imgs, PROMPT, llm_rule=DimsRule(tau=0.0, dims=(3,), min_layer=1))
    assert (res.visual_tokens.llm_sink_layers == L - 1).all()
    assert res.summary["llm_rule"]["layers"] == list(range(1, L))


def test_no_text_sink_dims_is_said(setup):
    """tiny-llava's random LLM has no massive activation on text: no dims, no LLM sinks, a note."""
    ad, imgs = setup
    res = propagation(ad, imgs, PROMPT)
    info = res.summary["llm_rule"]
    assert info["sink_dims"] == [] and info["sink_dims_source"] == "text"
    assert "no LLM sink dims" in info["sink_dims_note"] and res.summary["n_llm_sink_tokens"] == 0


def test_default_topk_is_exact_for_llama2_width():
    from sinkscope.flow.propagation import llm_topk

    assert llm_topk(4096, 20.0) == topk_for_exact_dims(4096) == 10
    assert llm_topk(64, 20.0) >= topk_for_exact_dims(64)


@pytest.mark.slow
def test_mini_llava_text_only_dims_and_first_output_token():
    """Real SmolLM2 LLM: the sink dims are its own text-only massive-activation dims, and
    ``generate=1`` is the first output token's attention as Hugging Face returns it."""
    from sinkscope.data import sample_images

    ad = load_model("mini-llava-untrained")
    imgs = [it.load() for it in sample_images(1)]
    prompt = "<image> What is in the picture?"
    res = propagation(ad, imgs, prompt, chat=True, generate=1)
    info = res.summary["llm_rule"]
    rule = DimsRule(tau=20.0, min_layer=2)
    inp = ad.build_inputs(imgs, prompt, chat=True)
    ids = inp["input_ids"]
    with torch.no_grad():
        hs = ad.llm.model(
            input_ids=ids[:, ids[0] != ad.image_token_id], output_hidden_states=True
        ).hidden_states
    direct = _massive_dims(list(hs[rule.min_layer : ad.llm.n_layers]), rule)
    assert direct and set(info["sink_dims"]) == direct and info["sink_dims_source"] == "text"
    m = ad.model
    m.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = m.generate(
                input_ids=ids,
                pixel_values=inp["pixel_values"],
                attention_mask=inp["attention_mask"],
                max_new_tokens=1,
                do_sample=False,
                output_attentions=True,
                return_dict_in_generate=True,
            )
    finally:
        m.set_attn_implementation("sdpa")
    pos = res.visual_tokens.llm_position.tolist()
    for layer, a in enumerate(out.attentions[0]):
        expected = a[0].float().mean(0)[-1, pos].numpy()
        np.testing.assert_allclose(res.visual_tokens[f"attn_L{layer}"], expected, rtol=1e-3, atol=1e-7)
