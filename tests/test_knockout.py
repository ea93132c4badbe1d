"""Attention knockout and isolated-token decoding: known answers, and the model left unchanged."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from sinkscope import load_model, paint_markers
from sinkscope._utils import SinkscopeError
from sinkscope.capture import count_hooks
from sinkscope.flow.knockout import (
    KNOCKOUT_COLUMNS,
    blocked_edges,
    decode_isolated,
    knockout,
    knockout_pairs,
    knockout_windows,
)

PROMPT = "<image> what is the color of the cat ?"


@pytest.fixture(scope="module")
def setup():
    ad = load_model("tiny-llava+sinks")
    img = paint_markers(np.full((32, 32, 3), 120, np.uint8), [(1, 2)])
    inp = ad.build_inputs([img], PROMPT)
    kw = {k: inp[k] for k in ("input_ids", "pixel_values", "attention_mask")}
    return ad, kw


def _groups(ad, kw):
    ids = kw["input_ids"][0]
    seq = len(ids)
    img = torch.nonzero(ids == ad.image_token_id).flatten().tolist()
    return img, list(range(img[-1] + 1, seq - 1)), [seq - 1]


def test_one_window_per_layer_centred_and_clipped():
    assert knockout_windows(4, window=3) == [(0, 0, 1), (1, 0, 2), (2, 1, 3), (3, 2, 3)]
    w = knockout_windows(30, window=9)
    assert [c for c, _, _ in w] == list(range(30))
    assert w[0] == (0, 0, 4) and w[4] == (4, 0, 8) and w[15] == (15, 11, 19) and w[-1] == (29, 25, 29)
    assert all(s <= c <= e and e - s + 1 <= 9 for c, s, e in w)
    assert all(e - s + 1 == 9 for c, s, e in w if 4 <= c <= 25)  # unclipped in the middle
    # even windows: the extra layer before the centre, as the reference's
    # range(max(0, l - w // 2), min(L, l + ceil(w / 2))); a window larger than the model: every layer
    assert knockout_windows(4, window=2) == [(0, 0, 0), (1, 0, 1), (2, 1, 2), (3, 2, 3)]
    for L, win in ((12, 4), (30, 8), (5, 6), (7, 1)):
        ref = [range(max(0, c - win // 2), min(L, c + math.ceil(win / 2))) for c in range(L)]
        assert [(s, e) for _, s, e in knockout_windows(L, window=win)] == [(r[0], r[-1]) for r in ref]
    assert knockout_windows(3, window=9) == [(0, 0, 2), (1, 0, 2), (2, 0, 2)]
    assert [c for c, _, _ in knockout_windows(30, 9, stride=4)] == list(range(0, 30, 4))


def test_empty_source_changes_nothing_and_all_image_tokens_do(setup):
    ad, kw = setup
    run = lambda: ad.model(**kw)  # noqa: E731
    img, question, last = _groups(ad, kw)
    for method in ("fast", "reference"):
        empty = knockout(run, ad.llm, source=[], target=last, window=2, method=method)
        assert list(empty.columns) == list(KNOCKOUT_COLUMNS)
        assert empty.layer.tolist() == list(range(ad.llm.n_layers))  # one point per layer
        assert np.abs(empty.delta).max() < 1e-6, method
        # nothing to block also when the target is empty
        none = knockout(run, ad.llm, source=img, target=[], window=2, method=method)
        assert np.abs(none.delta).max() < 1e-6, method
        full = knockout(run, ad.llm, source=img, target=question, window=2, method=method)
        assert np.abs(full.delta).max() > 1e-4
        assert np.allclose(full.p_base, empty.p_base, atol=1e-6)
        assert empty.attrs["route"] == method


def test_fast_route_equals_full_forward_reference(setup):
    """The fast route (states below each window reused, windows and pairs batched) gives the
    table of one full forward per window with ``blocked_edges``."""
    ad, kw = setup
    run = lambda: ad.model(**kw)  # noqa: E731
    img, question, last = _groups(ad, kw)
    head = ad.model.get_output_embeddings()
    pairs = [(img, question), (img, last), (img[:2], last), (question, last), (question[:2], question[2:])]
    for window, stride in ((1, 1), (2, 1), (3, 2), (9, 1)):
        fast = knockout_pairs(run, ad.llm, pairs, window, stride=stride, head=head, method="fast")
        # small chunks: the batching (several chunks, items starting at different layers) changes nothing
        small = knockout_pairs(
            run, ad.llm, pairs, window, stride=stride, head=head, method="fast", max_rows=3
        )
        ref = [knockout(run, ad.llm, s, t, window, stride=stride, method="reference") for s, t in pairs]
        for f, sm, r in zip(fast, small, ref):
            assert f.attrs["route"] == "fast" and r.attrs["route"] == "reference"
            assert (
                (
                    f[["layer", "window_start", "window_end", "answer_id"]]
                    == r[["layer", "window_start", "window_end", "answer_id"]]
                )
                .all()
                .all()
            )
            for c in ("p_answer", "p_base", "delta"):
                np.testing.assert_allclose(f[c], r[c], atol=1e-5, rtol=0)
                np.testing.assert_allclose(sm[c], f[c], atol=1e-6, rtol=0)
            assert f.attrs["check_max_abs_prob_err"] < 1e-6
        assert max(np.abs(r.delta).max() for r in ref) > 1e-4  # the blocks do something


def test_fast_route_falls_back_where_it_cannot_rerun_the_layers(setup, caplog):
    ad, kw = setup
    run = lambda: ad.model(**kw)  # noqa: E731
    img, _, last = _groups(ad, kw)
    head = ad.model.get_output_embeddings()
    wrong = torch.nn.Linear(head.in_features, head.out_features, bias=False)  # not the model's head
    ref = knockout(run, ad.llm, img, last, window=2, method="reference")
    with caplog.at_level("WARNING", logger="sinkscope"):
        auto = knockout(run, ad.llm, img, last, window=2, head=wrong)
    assert auto.attrs["route"] == "reference" and "fast route does not apply" in caplog.text
    np.testing.assert_allclose(auto.p_answer, ref.p_answer, atol=1e-7)
    with pytest.raises(SinkscopeError, match="fast knockout"):
        knockout(run, ad.llm, img, last, window=2, head=wrong, method="fast")


def test_flow_groups_are_disjoint_and_question_excludes_the_last_position(tmp_path):
    from sinkscope.data import ImageItem
    from sinkscope.flow.run import run_flow

    ad = load_model("tiny-llava+sinks")
    img = paint_markers(np.full((32, 32, 3), 120, np.uint8), [(1, 2)])
    item = ImageItem("marked", "array:marked", loader=lambda: img)
    res = run_flow(ad, [item], prompt=PROMPT, analyses=["knockout"], window=2, progress=False, out=tmp_path)
    info = res["summary"]["knockout"]
    seq = ad.build_inputs([img], PROMPT)["input_ids"].shape[1]
    g = info["groups"]
    assert g["last"] == 1 and g["image"] == g["vit_sinks"] + g["nonsinks"]
    n_image = int((ad.build_inputs([img], PROMPT)["input_ids"][0] == ad.image_token_id).sum())
    assert g["image"] == n_image and g["question"] == seq - 1 - (n_image + 1)  # BOS, image, question, last
    ko = res["tables"]["knockout"]
    assert set(zip(ko.source, ko.target)) == {
        ("image", "question"),
        ("image", "last"),
        ("vit_sinks", "last"),
        ("nonsinks", "last"),
        ("question", "last"),
    }
    assert (ko.groupby(["source", "target"]).layer.apply(list) == [list(range(ad.llm.n_layers))] * 5).all()
    assert info["route"] == "fast" and "clipped" in info["windows"]
    csv = pd.read_csv(tmp_path / "knockout.csv")
    assert {"source", "target", "layer", "window_start", "window_end", "p_answer", "p_base", "delta"} <= set(
        csv.columns
    )
    from sinkscope.viz import write_result_page

    assert "Attention knockout" in write_result_page(res).read_text()  # the page, drawn one layer up


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
    last = [kw["input_ids"].shape[1] - 1]
    head = ad.model.get_output_embeddings()
    for method in ("fast", "reference"):
        knockout(lambda: ad.model(**kw), ad.llm, [1, 2, 3], last, window=3, head=head, method=method)
    with pytest.raises(RuntimeError):
        with blocked_edges(ad.llm, [0, 1], [1], [2]):
            raise RuntimeError("boom")

    def failing_run():  # an error in the unblocked run, with the recording hooks in place
        ad.model(**kw)
        raise RuntimeError("boom in the base run")

    with pytest.raises(RuntimeError, match="base run"):
        knockout(failing_run, ad.llm, [1, 2, 3], last, window=3, head=head, method="fast")

    class FailingHead(torch.nn.Module):  # an error while the layers are rerun
        def forward(self, x):
            raise ValueError("boom in the head")

    with pytest.raises(ValueError, match="head"):
        knockout(lambda: ad.model(**kw), ad.llm, [1, 2, 3], last, window=3, head=FailingHead(), method="fast")
    with torch.no_grad():
        after = ad.model(**kw).logits
    assert torch.equal(before, after) and count_hooks(ad.model) == hooks
    assert ad.llm.config._attn_implementation == "sdpa"
    assert ad.model.config._attn_implementation == "sdpa"
    for layer in ad.llm.blocks():
        assert layer.self_attn.config._attn_implementation == "sdpa"


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


@pytest.mark.slow
def test_fast_route_equals_reference_on_mini_llava():
    """A real LLM (SmolLM2-135M, 30 layers, grouped-query attention) behind the untrained
    projector: the fast route gives the reference table; every fourth window centre."""
    from sinkscope.data import sample_images

    ad = load_model("mini-llava-untrained")
    inp = ad.build_inputs([sample_images(1)[0].load()], "What is the main object in the image?")
    kw = {k: inp[k] for k in ("input_ids", "pixel_values", "attention_mask")}
    run = lambda: ad.model(**kw)  # noqa: E731
    img, question, last = _groups(ad, kw)
    pairs = [(img, question), (img, last), (question, last)]
    head = ad.model.get_output_embeddings()
    fast = knockout_pairs(run, ad.llm, pairs, 9, stride=4, head=head, method="fast")
    for f, (s, t) in zip(fast, pairs):
        r = knockout(run, ad.llm, s, t, 9, stride=4, method="reference")
        assert f.attrs["route"] == "fast" and f.layer.tolist() == list(range(0, 30, 4))
        for c in ("p_answer", "p_base", "delta"):
            np.testing.assert_allclose(f[c], r[c], atol=1e-5, rtol=0)
