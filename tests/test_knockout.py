"""Attention knockout and isolated-token decoding: known answers, and the model left unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sinkscope import load_model, paint_markers
from sinkscope.capture import count_hooks
from sinkscope.flow.knockout import blocked_edges, decode_isolated, knockout

PROMPT = "<image> what is the color of the cat ?"


@pytest.fixture(scope="module")
def setup():
    ad = load_model("tiny-llava+sinks")
    img = paint_markers(np.full((32, 32, 3), 120, np.uint8), [(1, 2)])
    inp = ad.build_inputs([img], PROMPT)
    kw = {k: inp[k] for k in ("input_ids", "pixel_values", "attention_mask")}
    return ad, kw


def test_empty_source_changes_nothing_and_all_image_tokens_do(setup):
    ad, kw = setup
    run = lambda: ad.model(**kw)  # noqa: E731
    last = kw["input_ids"].shape[1] - 1
    empty = knockout(run, ad.llm, source=[], target=[last], window=2)
    assert len(empty) == ad.llm.n_layers - 2 + 1
    assert np.abs(empty.delta).max() < 1e-6
    img = torch.nonzero(kw["input_ids"][0] == ad.image_token_id).flatten().tolist()
    question = list(range(img[-1] + 1, last + 1))
    full = knockout(run, ad.llm, source=img, target=question, window=2)
    assert np.abs(full.delta).max() > 1e-4
    assert (full.p_base == empty.p_base).all()


def test_blocking_really_removes_the_edges(setup):
    """With every earlier key blocked for the last query in every layer, the last position's
    output equals a run where the earlier tokens carry different content."""
    ad, kw = setup
    ids = kw["input_ids"]
    last = ids.shape[1] - 1
    others = list(range(last))

    def out(x):
        with blocked_edges(ad.llm, range(ad.llm.n_layers), others, [last]), torch.no_grad():
            return ad.llm.model(input_ids=x).last_hidden_state[0, -1]

    text = ids.clone()
    text[text == ad.image_token_id] = 5  # drop the images: a plain text input
    changed = text.clone()
    changed[0, 1:last] = 9  # every earlier token different
    torch.testing.assert_close(out(text), out(changed))
    with torch.no_grad():
        assert not torch.allclose(
            ad.llm.model(input_ids=text).last_hidden_state[0, -1],
            ad.llm.model(input_ids=changed).last_hidden_state[0, -1],
        )


def test_model_identical_before_and_after_knockout_even_on_error(setup):
    ad, kw = setup
    with torch.no_grad():
        before = ad.model(**kw).logits.clone()
    hooks = count_hooks(ad.model)
    knockout(
        lambda: ad.model(**kw), ad.llm, source=[1, 2, 3], target=[kw["input_ids"].shape[1] - 1], window=3
    )
    with pytest.raises(RuntimeError):
        with blocked_edges(ad.llm, [0, 1], [1], [2]):
            raise RuntimeError("boom")
    with torch.no_grad():
        after = ad.model(**kw).logits
    assert torch.equal(before, after) and count_hooks(ad.model) == hooks
    assert ad.llm.config._attn_implementation == "sdpa"


def test_decode_isolated_tokens(setup):
    ad, kw = setup
    seq = kw["input_ids"].shape[1]
    img = torch.nonzero(kw["input_ids"][0] == ad.image_token_id).flatten().tolist()
    d = decode_isolated(lambda: ad.model(**kw), ad.llm, img[:2], seq, ad.tokenizer, top_k=3)
    assert len(d) == 6 and set(d.position) == set(img[:2])
    assert (d.groupby("position").prob.apply(lambda p: p.is_monotonic_decreasing)).all()
    # an isolated token's decoding does not depend on the rest of the prompt
    kw2 = dict(kw, input_ids=kw["input_ids"].clone())
    kw2["input_ids"][0, -3:] = 9
    d2 = decode_isolated(lambda: ad.model(**kw2), ad.llm, img[:2], seq, ad.tokenizer, top_k=3)
    np.testing.assert_allclose(d.prob.to_numpy(), d2.prob.to_numpy(), rtol=1e-5)
    assert d.token_id.tolist() == d2.token_id.tolist()
