"""Visual-token order and selection (issue 13): on ``tiny-llava`` with planted ViT sinks, where the
sinks go under each variant, the position ids under each policy, parity with a forward built by
hand, batches with padding equal their items one by one, and nothing left behind."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sinkscope._utils import SinkscopeError
from sinkscope.interventions import TOKEN_VARIANTS, TokenIntervention, VisualSinkRule, apply_tokens, intervene
from sinkscope.models.tiny import Plant, load_tiny, paint_markers

N_FED = 16  # tiny-llava: 32 px, 8 px patches, CLS dropped
RULE = "norm:100"  # the planted sinks have norm ~800 at the fed layer; ordinary tokens ~8


@pytest.fixture(scope="module")
def ad():
    return load_tiny("tiny-llava", plant=Plant(layer=2))


def _image(cells):
    rng = np.random.default_rng(len(cells))
    return paint_markers(rng.integers(0, 120, (32, 32, 3), dtype=np.uint8), cells)


def _inputs(ad, cells=((1, 2),), question="What is in the picture?"):
    inp = ad.build_inputs([_image(list(cells))], "<image> " + question)
    return {k: inp[k] for k in ("input_ids", "attention_mask", "pixel_values")}


def _first_image_pos(inp):
    return int((inp["input_ids"][0] == 4).nonzero()[0])


def test_the_rule_finds_the_planted_sink(ad):
    out = apply_tokens(ad, _inputs(ad), TokenIntervention("both", rule=RULE))
    sinks = out.fed[out.fed.is_vit_sink]
    assert sinks[["row", "col"]].values.tolist() == [[1, 2]]
    assert out.fed.norm[~out.fed.is_vit_sink].max() < 100 < sinks.norm.min()
    assert set(out.fed.rule) == {VisualSinkRule("norm", threshold=100).describe()}


@pytest.mark.parametrize("variant", ["sinks-front", "sinks-end", "sink-only", "nonsink-only"])
def test_the_planted_sink_goes_where_the_variant_says(ad, variant):
    inp = _inputs(ad)
    start = _first_image_pos(inp)
    fed = apply_tokens(ad, inp, TokenIntervention(variant, rule=RULE)).fed
    sink = fed[fed.is_vit_sink].iloc[0]
    shown = fed.dropna(subset=["llm_position"])
    if variant == "sinks-front":
        assert sink.llm_position == start and len(shown) == N_FED
    elif variant == "sinks-end":
        assert sink.llm_position == start + N_FED - 1 and len(shown) == N_FED
    elif variant == "sink-only":
        assert shown.vit_token.tolist() == [sink.vit_token] and sink.llm_position == start
    else:
        assert pd_isna(sink.llm_position) and len(shown) == N_FED - 1 and not shown.is_vit_sink.any()


def pd_isna(x) -> bool:
    import pandas as pd

    return bool(pd.isna(x))


def test_position_policies(ad):
    inp = _inputs(ad)
    start, n = _first_image_pos(inp), inp["input_ids"].shape[1]
    re = apply_tokens(ad, inp, TokenIntervention("sinks-front", rule=RULE, positions="reindex"))
    assert re.kwargs["position_ids"][0].tolist() == list(range(n))
    keep = apply_tokens(ad, inp, TokenIntervention("sinks-front", rule=RULE, positions="keep"))
    ids = keep.kwargs["position_ids"][0].tolist()
    sink_vit = int(keep.fed[keep.fed.is_vit_sink].vit_token.iloc[0])  # ViT token 1 + 1*4 + 2 = 7
    assert ids[start] == start + sink_vit - 1  # the moved sink carries its original id
    assert sorted(ids) == list(range(n))  # a permutation: nothing dropped
    drop = apply_tokens(ad, inp, TokenIntervention("nonsink-only", rule=RULE, positions="keep"))
    ids = drop.kwargs["position_ids"][0].tolist()
    assert len(ids) == n - 1 and start + sink_vit - 1 not in ids  # a gap where the sink was
    assert ids[-1] == n - 1  # the text after the image keeps its ids
    row = drop.fed.dropna(subset=["llm_position"]).iloc[0]
    assert row.position_id == ids[row.llm_position]


def _by_hand(ad, inp, order, positions):
    """The LLM input built by hand: text embeddings, the image features in ``order``."""
    m = ad.model
    ids = inp["input_ids"][0]
    feats = m.model.get_image_features(
        pixel_values=inp["pixel_values"], vision_feature_layer=-2, vision_feature_select_strategy="default"
    ).pooler_output[0]
    start = _first_image_pos(inp)
    text = m.get_input_embeddings()(ids)
    embeds = torch.cat([text[:start], feats[order], text[start + N_FED :]])[None]
    orig = list(range(len(ids)))
    kept = orig[:start] + [start + j for j in order] + orig[start + N_FED :]
    pos = kept if positions == "keep" else list(range(len(kept)))
    return embeds, torch.tensor([pos])


@pytest.mark.parametrize("positions", ["reindex", "keep"])
@pytest.mark.parametrize("variant", ["sinks-front", "sinks-end", "sink-only", "nonsink-only"])
def test_logits_equal_a_forward_built_by_hand(ad, variant, positions):
    inp = _inputs(ad)
    sink = 6  # fed index of ViT token 7, the planted (1, 2) patch
    rest = [j for j in range(N_FED) if j != sink]
    order = {"sinks-front": [sink] + rest, "sinks-end": rest + [sink], "sink-only": [sink], "nonsink-only": rest}[variant]
    embeds, pos = _by_hand(ad, inp, order, positions)
    with torch.no_grad():
        want = ad.model(inputs_embeds=embeds, position_ids=pos, attention_mask=torch.ones_like(pos)).logits
        with intervene(ad, TokenIntervention(variant, rule=RULE, positions=positions)):
            got = ad.model(**inp).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_both_is_the_plain_forward_and_the_model_is_untouched_after(ad):
    inp = _inputs(ad)
    with torch.no_grad():
        before = ad.model(**inp).logits
        with intervene(ad, TokenIntervention("both", rule=RULE)):
            same = ad.model(**inp).logits
        with pytest.raises(RuntimeError, match="inside"), intervene(ad, TokenIntervention("sink-only", rule=RULE)):
            assert ad.model(**inp).logits.shape[1] < before.shape[1]
            raise RuntimeError("inside")
        after = ad.model(**inp).logits
    torch.testing.assert_close(same, before, rtol=1e-5, atol=1e-5)
    assert torch.equal(after, before)
    assert not ad.model._forward_pre_hooks and "generate" not in vars(ad.model)


def _pad(rows, side, pad_id=0):
    n = max(r["input_ids"].shape[1] for r in rows)
    ids, mask = [], []
    for r in rows:
        k = n - r["input_ids"].shape[1]
        fill = torch.full((1, k), pad_id, dtype=torch.long)
        zero = torch.zeros((1, k), dtype=torch.long)
        ids.append(torch.cat([fill, r["input_ids"]] if side == "left" else [r["input_ids"], fill], 1))
        mask.append(torch.cat([zero, r["attention_mask"]] if side == "left" else [r["attention_mask"], zero], 1))
    pv = torch.cat([r["pixel_values"] for r in rows])
    return {"input_ids": torch.cat(ids), "attention_mask": torch.cat(mask), "pixel_values": pv}


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("variant", [v for v in TOKEN_VARIANTS if v != "both"])
def test_a_padded_batch_equals_its_items_one_by_one(ad, variant, side):
    """Two images with one and two sinks, prompts of different lengths: each row's logits at its
    real tokens equal the item run alone (both position policies)."""
    a = _inputs(ad, [(1, 2)], "What is in the picture?")
    b = _inputs(ad, [(0, 0), (3, 3)], "Is there a red cat in the picture on the left?")
    batch = _pad([a, b], side)
    for positions in ("reindex", "keep"):
        spec = TokenIntervention(variant, rule=RULE, positions=positions, seed=3)
        with torch.no_grad(), intervene(ad, spec) as iv:
            got = ad.model(**batch).logits
            alone = [ad.model(**x).logits[0] for x in (a, b)]
        mask = iv.fed[0]
        assert mask.groupby("image").is_vit_sink.sum().tolist() == [1, 2]
        n_real = [x.shape[0] for x in alone]
        for row, want in enumerate(alone):
            seq = got[row, -n_real[row] :] if side == "left" else got[row, : n_real[row]]
            torch.testing.assert_close(seq, want, rtol=1e-4, atol=1e-4)


def test_generate_inside_the_context(ad):
    """Greedy generation under ``keep`` equals generating by hand from the built embeddings with
    position ids that go on from the prompt's last id; the output starts with the prompt's ids."""
    inp = _inputs(ad)
    spec = TokenIntervention("nonsink-only", rule=RULE, positions="keep")
    with torch.no_grad():
        with intervene(ad, spec) as iv:
            out = ad.model.generate(**inp, max_new_tokens=4, do_sample=False)
        rest = [j for j in range(N_FED) if j != 6]
        embeds, pos = _by_hand(ad, inp, rest, "keep")
        want = ad.model.generate(
            inputs_embeds=embeds, position_ids=pos, attention_mask=torch.ones_like(pos), max_new_tokens=4, do_sample=False
        )
    n = inp["input_ids"].shape[1]
    assert torch.equal(out[:, :n], inp["input_ids"]) and torch.equal(out[:, n:], want)
    assert int(iv.last_position[0]) == n - 1


def test_rules_and_errors(ad):
    inp = _inputs(ad, [(0, 1), (2, 2)])
    top = apply_tokens(ad, inp, TokenIntervention("sink-only", rule="topk:3")).fed
    assert top.is_vit_sink.sum() == 3 and set(top[top.is_vit_sink].norm) >= set(top.nlargest(2, "norm").norm)
    rel = apply_tokens(ad, inp, TokenIntervention("both", rule="norm:x10")).fed
    assert rel.is_vit_sink.sum() == 2
    auto = apply_tokens(ad, _inputs(ad, [(2, 2)]), TokenIntervention("both", rule="norm")).fed
    assert auto[auto.is_vit_sink][["row", "col"]].values.tolist() == [[2, 2]]  # the gap rule, per image
    assert not apply_tokens(ad, inp, TokenIntervention("both", rule="norm")).fed.is_vit_sink.any()  # 2/16 > 10%
    att = apply_tokens(ad, inp, TokenIntervention("both", rule="attention:2")).fed
    assert att.is_vit_sink.sum() == 2
    low = apply_tokens(ad, inp, TokenIntervention("lowest-norm-k", rule=RULE)).fed
    shown = low.dropna(subset=["llm_position"])
    assert len(shown) == 2 and shown.norm.max() <= low[~low.is_vit_sink].norm.nsmallest(2).max()
    with pytest.raises(SinkscopeError, match="select strategy drops CLS"):
        apply_tokens(ad, inp, TokenIntervention("both", rule="cls"))
    with pytest.raises(SinkscopeError, match="variant 'sinks-middle'"):
        TokenIntervention("sinks-middle")
    with pytest.raises(SinkscopeError, match="sink rule 'topk:x'"):
        TokenIntervention("both", rule="topk:x")
    with pytest.raises(SinkscopeError, match="pixel_values"):
        apply_tokens(ad, {"input_ids": inp["input_ids"]}, TokenIntervention())


def test_labels_follow_their_text_and_a_capture_sees_the_intervened_sequence(ad):
    """Training-style calls keep each text label on its token (image positions -100), and a
    Capture of the LLM opened around the context measures the sequence the LLM really got."""
    from sinkscope.capture import Capture

    inp = _inputs(ad)
    labels = inp["input_ids"].clone()
    labels[labels == ad.image_token_id] = -100
    out = apply_tokens(ad, {**inp, "labels": labels}, TokenIntervention("sink-only", rule=RULE))
    new = out.kwargs["labels"][0]
    text = labels[0][labels[0] != -100]
    assert new[new != -100].tolist() == text.tolist() and int((new == -100).sum()) == 1  # the one sink fed
    with torch.no_grad(), Capture(ad.llm, layers=[1]) as cap, intervene(ad, TokenIntervention("sink-only", rule=RULE)):
        got = cap.run_fn(lambda: ad.model(**inp))
    assert got.norms.shape[-1] == inp["input_ids"].shape[1] - (N_FED - 1)
