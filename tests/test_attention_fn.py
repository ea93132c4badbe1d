"""sinkscope_attention: the reducing attention function against Hugging Face's eager attention.

The capture computes attention received inside the attention function (SDPA for the block output,
the softmax only for the chosen query rows). These tests compare it with ``output_attentions`` of
the same model in eager mode, for several decoder architectures (GQA, learned positions, padding)
and a query subset, and check that the cheap row path - not a full eager pass - was taken.
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import sinkscope.capture.attention as capture_mod
from sinkscope.capture import Capture, count_hooks
from sinkscope.models.base import ModelInputs, TokenLayout
from sinkscope.models.text import CausalLMAdapter

SMALL = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48)


def _models():
    torch.manual_seed(0)
    return {
        "llama-gqa": LlamaForCausalLM(LlamaConfig(**SMALL, num_key_value_heads=2)),
        "qwen2": Qwen2ForCausalLM(Qwen2Config(**SMALL, num_key_value_heads=1)),
        "gpt2": GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64)),
        "opt": OPTForCausalLM(
            OPTConfig(
                vocab_size=64,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                ffn_dim=48,
                word_embed_proj_dim=32,
                max_position_embeddings=64,
            )
        ),
    }


def _inputs(seq: int = 12):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 60, (2, seq), generator=g)
    mask = torch.ones(2, seq, dtype=torch.long)
    mask[1, seq - 3 :] = 0  # right padding on the second item
    layouts = [TokenLayout(n_text=seq), TokenLayout(n_text=seq - 3)]
    return ModelInputs({"input_ids": ids}, layouts, ["a", "b"], attention_mask=mask)


@pytest.mark.parametrize("arch", ["llama-gqa", "qwen2", "gpt2", "opt"])
@pytest.mark.parametrize("subset", [False, True])
def test_reduced_attention_equals_huggingface_eager(arch, subset, monkeypatch):
    model = _models()[arch].eval()
    ad = CausalLMAdapter(model, arch)
    batch = _inputs()
    mask = batch.attention_mask
    qmask = mask.bool().clone()
    if subset:  # the last three valid queries of each item: a row subset (< half of the queries)
        qmask[:] = False
        qmask[0, 9:12] = True
        qmask[1, 6:9] = True
        # the cheap path must be taken: no full eager pass for the reduction
        monkeypatch.setattr(capture_mod, "_eager_of", lambda m: pytest.fail("full eager pass taken"))
    with torch.no_grad():
        hooks_before = count_hooks(model)
        impl_before = model.config._attn_implementation
        with Capture(ad, layers="all", attention="all") as cap:
            got = cap.run_fn(lambda: ad.forward(batch), attention_mask=mask, query_mask=qmask)
        assert count_hooks(model) == hooks_before and model.config._attn_implementation == impl_before
        model.set_attn_implementation("eager")
        ref = ad.forward(batch, output_attentions=True).attentions
        model.set_attn_implementation(impl_before)
    q = qmask[:, None, :, None].float()
    for b in range(ad.n_layers):
        expected = (ref[b].float() * q).sum(2) / q.sum(2)  # [batch, head, key]
        torch.testing.assert_close(got.attn_received_heads[b], expected, atol=1e-6, rtol=1e-5)


def test_block_outputs_unchanged_by_the_reducing_function():
    """The hidden states under the capture equal a plain forward's (SDPA vs eager: 1e-5)."""
    model = _models()["llama-gqa"].eval()
    ad = CausalLMAdapter(model, "llama")
    batch = _inputs()
    with torch.no_grad():
        plain = ad.forward(batch, output_hidden_states=True).hidden_states
        with Capture(ad, layers="all", attention="all", keep=[0, 1, 2]) as cap:
            got = cap.run(batch)
    valid = batch.attention_mask[..., None].float()
    for layer in range(3):
        torch.testing.assert_close(
            got.hidden[layer] * valid, plain[layer].float() * valid, atol=1e-5, rtol=1e-5
        )


def test_keep_attention_returns_full_maps_equal_to_huggingface():
    model = _models()["gpt2"].eval()
    ad = CausalLMAdapter(model, "gpt2")
    batch = _inputs()
    with torch.no_grad():
        with Capture(ad, layers=None, keep_attention=[1]) as cap:
            got = cap.run(batch)
        model.set_attn_implementation("eager")
        ref = ad.forward(batch, output_attentions=True).attentions
        model.set_attn_implementation("sdpa")
    assert sorted(got.attn_maps) == [1] and sorted(got.attn_received) == [1]
    torch.testing.assert_close(got.attn_maps[1], ref[1].float(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 4])
def test_generate_steps_credit_the_right_keys_with_and_without_a_sliding_window(window):
    """During generate() each step's queries see the cache; with a sliding window only the last W
    keys. Attention received, averaged over the generated steps, must equal the rows of those
    positions in one eager forward over the final sequence."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(**SMALL, num_key_value_heads=2, sliding_window=window)).eval()
    ad = CausalLMAdapter(model, "mistral")
    ids = torch.randint(3, 60, (1, 8), generator=torch.Generator().manual_seed(2))
    qmask = torch.zeros_like(ids, dtype=torch.bool)  # prefill queries excluded; each new token counts
    with torch.no_grad(), Capture(ad, layers=None, attention="all") as cap:
        box = {}
        got = cap.run_fn(
            lambda: box.setdefault(
                "seq", model.generate(ids, max_new_tokens=3, do_sample=False, min_new_tokens=3)
            ),
            query_mask=qmask,
        )
    seq = box["seq"][:, :-1]  # the last generated token is never fed back
    with torch.no_grad():
        model.set_attn_implementation("eager")
        ref = model(seq, output_attentions=True).attentions
        model.set_attn_implementation("sdpa")
    for b in range(ad.n_layers):
        expected = ref[b][0, :, 8:, :].float().mean(1)  # [head, key], rows of the generated steps
        torch.testing.assert_close(got.attn_received_heads[b][0], expected, atol=1e-5, rtol=1e-4)


def test_beam_search_expands_the_query_masks():
    model = _models()["llama-gqa"].eval()
    ad = CausalLMAdapter(model, "llama")
    batch = _inputs()
    mask = batch.attention_mask
    with torch.no_grad(), Capture(ad, layers=None, attention="all") as cap:
        got = cap.run_fn(
            lambda: model.generate(
                batch.tensors["input_ids"],
                attention_mask=mask,
                max_new_tokens=2,
                num_beams=2,
                do_sample=False,
            ),
            attention_mask=mask,
            query_mask=mask.bool(),
        )
    assert got.attn_received[0].shape[0] == 4  # 2 items x 2 beams
    torch.testing.assert_close(got.attn_received[0].sum(-1), torch.ones(4), atol=1e-5, rtol=0)


def test_train_mode_dropout_does_not_change_the_statistic():
    """In train() with attention dropout the statistic is the softmax itself (before dropout),
    whichever path computes it: each query row still sums to 1 over the keys."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMALL, num_key_value_heads=2, attention_dropout=0.5)).train()
    ad = CausalLMAdapter(model, "llama")
    batch = _inputs()
    mask = batch.attention_mask
    few = torch.zeros_like(mask, dtype=torch.bool)
    few[:, 2:4] = True
    with torch.no_grad():
        for qmask in (mask.bool(), few):  # eager path (all rows) and row path (2 rows)
            with Capture(ad, layers=None, attention="all") as cap:
                got = cap.run_fn(lambda: ad.forward(batch), attention_mask=mask, query_mask=qmask)
            for b in range(ad.n_layers):
                torch.testing.assert_close(got.attn_received[b].sum(-1), torch.ones(2), atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["llama-gqa", "opt"])
@pytest.mark.parametrize("chunk", [13, 40, 1 << 20])
def test_blockwise_route_equals_eager_for_any_block_size(arch, chunk, monkeypatch):
    """Every query counts: the attention runs block by block (``chunk`` weights at a time: one row
    of one head, a few rows, everything) and never as a full eager pass; the reduced attention
    equals Hugging Face's eager maps and the hidden states equal a plain forward's."""
    monkeypatch.setattr(capture_mod, "CHUNK_ELEMENTS", chunk)
    monkeypatch.setattr(capture_mod, "_eager_of", lambda m: pytest.fail("full eager pass taken"))
    model = _models()[arch].eval()
    ad = CausalLMAdapter(model, arch)
    batch = _inputs()
    mask = batch.attention_mask
    with torch.no_grad():
        plain = ad.forward(batch, output_hidden_states=True).hidden_states
        with Capture(ad, layers="all", attention="all", keep=[1, 2]) as cap:
            got = cap.run_fn(lambda: ad.forward(batch), attention_mask=mask, query_mask=mask.bool())
        model.set_attn_implementation("eager")
        ref = ad.forward(batch, output_attentions=True).attentions
        model.set_attn_implementation("sdpa")
    q = mask[:, None, :, None].float()
    valid = mask[..., None].float()
    for b in range(ad.n_layers):
        expected = (ref[b].float() * q).sum(2) / q.sum(2)
        torch.testing.assert_close(got.attn_received_heads[b], expected, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(got.hidden[b + 1] * valid, plain[b + 1] * valid, atol=1e-5, rtol=1e-5)
