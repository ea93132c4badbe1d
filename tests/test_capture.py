"""Capture: parity with Hugging Face (eager), attention received, hook hygiene, early stop."""

from __future__ import annotations

import pytest
import torch

from sinkscope import SinkscopeError, load_model
from sinkscope.capture import Capture, capture, count_hooks, parse_layers, uniform_share

from .conftest import VISION_TINY, H, W


def _vision_module(ad):
    return getattr(ad, "vision", ad).model


def _hf_outputs(ad, batch):
    """HF's own hidden states and attentions, eager, for the same batch."""
    if ad.family == "causal-lm":
        m = ad.model
        m.set_attn_implementation("eager")
        try:
            out = m(
                input_ids=batch.tensors["input_ids"],
                attention_mask=batch.attention_mask,
                output_hidden_states=True,
                output_attentions=True,
            )
        finally:
            m.set_attn_implementation("sdpa")
        return out.hidden_states, out.attentions
    vis = getattr(ad, "vision", ad)
    m = vis.model
    m.set_attn_implementation("eager")
    try:
        out = m(**vis.forward_kwargs(batch), output_hidden_states=True, output_attentions=True)
    finally:
        m.set_attn_implementation("sdpa")
    return out.hidden_states, out.attentions


def _batch(ad, marked_images):
    if ad.family == "causal-lm":
        return ad.prepare(["what is the color of the sky ?", "a dog and a cat", "the cat"])
    return ad.prepare(marked_images)


@pytest.mark.parametrize("name", VISION_TINY + ["tiny-llama"])
def test_hidden_states_and_attention_match_huggingface(name, marked_images):
    ad = load_model(name + "+sinks", image_size=(H, W) if name != "tiny-llama" else None)
    batch = _batch(ad, marked_images)
    L = ad.n_layers
    with torch.no_grad():
        cap = capture(ad, batch, layers="all", attention="all", keep=list(range(L + 1)))
        hs, attns = _hf_outputs(ad, batch)
    assert len(hs) == L + 1 and cap.layers == list(range(L + 1))
    mask = batch.attention_mask
    for layer in range(L + 1):
        ref = hs[layer].float()
        if mask is not None:  # padded positions are not compared
            ref = ref * mask[..., None]
            got = cap.hidden[layer] * mask[..., None]
        else:
            got = cap.hidden[layer]
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        norms = ref.norm(dim=-1)
        torch.testing.assert_close(
            cap.norms[:, layer] * (mask if mask is not None else 1), norms, atol=1e-4, rtol=1e-5
        )
    for b in range(L):
        a = attns[b].float()  # [batch, head, query, key]
        if mask is None:
            expected = a.mean(dim=(1, 2))
        else:
            m = mask[:, None, :, None].float()
            expected = ((a * m).sum(2) / m.sum(2)).mean(1)
        torch.testing.assert_close(cap.attn_received[b], expected, atol=1e-6, rtol=1e-5)
        # received attention over all keys sums to 1 (each query row does)
        if mask is None:
            torch.testing.assert_close(
                cap.attn_received[b].sum(-1), torch.ones(len(batch)), atol=1e-5, rtol=0
            )


def test_last_llm_layer_is_the_final_norm_output_like_hf():
    ad = load_model("tiny-llama+sinks")
    batch = ad.prepare(["the cat is on the tree"])
    cap = capture(ad, batch, layers=[ad.n_layers], keep=[ad.n_layers])
    out = ad.model(input_ids=batch.tensors["input_ids"], output_hidden_states=True)
    torch.testing.assert_close(cap.hidden[ad.n_layers], out.hidden_states[-1], atol=1e-6, rtol=1e-6)
    # rms-normed: norm ~ sqrt(D) for every token (norm weight 1 in a random model; eps shaves a little)
    assert torch.allclose(cap.norms[0, 0], torch.full_like(cap.norms[0, 0], 8.0), atol=5e-3)


@pytest.mark.parametrize("name", ["tiny-dinov2", "tiny-llama"])
def test_no_hook_remains_after_normal_run_and_after_an_exception(name, marked_images):
    ad = load_model(name + "+sinks", image_size=(H, W) if name != "tiny-llama" else None)
    batch = _batch(ad, marked_images)
    capture(ad, batch, layers="all")  # let transformers install its own lazy hooks first
    ad.forward(batch, output_hidden_states=True)
    before = count_hooks(ad.model)
    configs = [ad.attention(b).config for b in range(ad.n_layers)]
    impl = ad.config._attn_implementation

    capture(ad, batch, layers="all", attention="all", dims=True, mlp=[0, 1])
    assert count_hooks(ad.model) == before

    class Boom(RuntimeError):
        pass

    cap = Capture(ad, layers="all", attention="all")

    def exploding(layer, h):
        if layer == 2:
            raise Boom("inside a hook")

    cap._record_layer = exploding
    with pytest.raises(Boom):
        with cap:
            assert count_hooks(ad.model) > before
            cap.run(batch)
    assert count_hooks(ad.model) == before
    assert [ad.attention(b).config for b in range(ad.n_layers)] == configs  # same objects back
    assert ad.config._attn_implementation == impl == "sdpa"


def test_early_stop_skips_later_blocks_and_keeps_results(marked_images):
    ad = load_model("tiny-vit+sinks", image_size=(H, W))
    batch = ad.prepare(marked_images)
    calls = []
    handles = [
        blk.register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i, blk in enumerate(ad.blocks())
    ]
    try:
        early = capture(ad, batch, layers=[1, 2])
        assert calls == [0, 1]
        calls.clear()
        full = capture(ad, batch, layers="all", stop_early=False)
        assert calls == [0, 1, 2, 3]
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(early.norms, full.norms[:, 1:3])


def test_attention_only_on_requested_blocks(marked_images):
    ad = load_model("tiny-siglip", image_size=(H, W))
    cap = capture(ad, ad.prepare(marked_images[:2]), layers=[0], attention=[1])
    assert sorted(cap.attn_received) == [1]
    assert cap.attn_received_heads[1].shape == (2, 4, 30)  # [batch, head, key]


def test_dims_statistics(marked_images):
    ad = load_model("tiny-dinov2+sinks", image_size=(H, W))
    cap = capture(ad, ad.prepare(marked_images[:1]), dims=True, topk=3, keep=[3])
    x = cap.hidden[3][0]
    vals, idx = x.abs().topk(3, dim=-1)
    torch.testing.assert_close(cap.top_vals[0, 3], vals)
    assert torch.equal(cap.top_dims[0, 3], idx)
    torch.testing.assert_close(cap.rms[0, 3], x.pow(2).mean(-1).sqrt())
    torch.testing.assert_close(cap.median_abs[0, 3], x.abs().flatten().median())


def test_parse_layers_and_errors():
    assert parse_layers("all", 4) == [0, 1, 2, 3, 4]
    assert parse_layers("1:3,-1", 12) == [1, 2, 12]
    assert parse_layers([0, -2], 4) == [0, 3]
    with pytest.raises(SinkscopeError, match="layer 9 is out of range"):
        parse_layers("9", 4)
    with pytest.raises(SinkscopeError, match="bad layer selection"):
        parse_layers("first", 4)


def test_uniform_share_causal_matches_brute_force():
    n = 6
    A = torch.tril(torch.ones(n, n))
    A = A / A.sum(1, keepdim=True)
    assert torch.allclose(torch.tensor(uniform_share(n, causal=True)), A.mean(0).double())


@pytest.mark.parametrize("arch", ["opt", "gpt2", "qwen2"])
def test_other_decoders_match_huggingface(arch):
    """The last layer is the final norm's output wherever the decoder keeps it (OPT: decoder.final_layer_norm)."""
    import transformers as T

    from sinkscope.models import CausalLMAdapter
    from sinkscope.models.base import ModelInputs, TokenLayout

    torch.manual_seed(0)
    cfg, cls = {
        "opt": (
            T.OPTConfig(
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                ffn_dim=64,
                vocab_size=50,
                word_embed_proj_dim=32,
                eos_token_id=2,
                bos_token_id=1,
                pad_token_id=0,
            ),
            T.OPTForCausalLM,
        ),
        "gpt2": (
            T.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=50, bos_token_id=1, eos_token_id=2),
            T.GPT2LMHeadModel,
        ),
        "qwen2": (
            T.Qwen2Config(
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=1,
                intermediate_size=64,
                vocab_size=50,
            ),
            T.Qwen2ForCausalLM,
        ),
    }[arch]
    m = cls(cfg).eval()
    ad = CausalLMAdapter(m, arch)
    ids = torch.randint(3, 50, (2, 7))
    batch = ModelInputs({"input_ids": ids}, [TokenLayout(n_text=7)] * 2, ["a", "b"])
    with torch.no_grad():
        cap = capture(ad, batch, keep=[0, 1, 2], attention="all")
        hs = m(input_ids=ids, output_hidden_states=True).hidden_states
    for i in range(3):
        torch.testing.assert_close(cap.hidden[i], hs[i], atol=1e-5, rtol=1e-5)


def test_layer_slices_with_negative_and_empty_bounds():
    assert parse_layers("-3:", 12) == [10, 11, 12]
    assert parse_layers(":-1", 4) == [0, 1, 2, 3]
    with pytest.raises(SinkscopeError, match="selects no layer"):
        parse_layers("2:1", 4)


def test_only_layer_zero_stops_before_the_first_block(marked_images):
    ad = load_model("tiny-vit", image_size=(H, W))
    calls = []
    h = ad.blocks()[0].register_forward_hook(lambda m, a, o: calls.append(1))
    try:
        cap = capture(ad, ad.prepare(marked_images[:1]), layers=[0])
    finally:
        h.remove()
    assert calls == [] and cap.norms.shape == (1, 1, 31)


def test_an_mlp_reducer_sees_what_keep_would_keep_and_leaves_no_hook(marked_images):
    """Capture(mlp=..., mlp_reducer=fn) hands each block's neuron activations to fn inside the
    hook (register neurons use it instead of hooks of their own); nothing is left on the model."""
    from sinkscope import load_model

    ad = load_model("tiny-clip+sinks", image_size=(48, 40))
    batch = ad.prepare(marked_images[:2])
    with Capture(ad, layers=None, mlp=[0, 2]) as c:
        kept = c.run(batch).mlp_abs
    seen = {}
    with Capture(ad, layers=None, mlp=[0, 2], mlp_reducer=lambda b, a: seen.__setitem__(b, a.abs().cpu())) as c:
        got = c.run(batch)
    assert sorted(seen) == [0, 2] and not got.mlp_abs
    for b in (0, 2):
        torch.testing.assert_close(seen[b], kept[b])
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in ad.model.modules())
