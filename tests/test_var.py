"""VAR (issue 13): on ``tiny-llava`` whose LLM has a planted BOS sink, attention rows still sum to
one, selected rows lose exactly ``1 - p`` of their sink mass to the non-sink image tokens,
everything else is unchanged, ``p = 1`` is the plain model, and cached generation equals a full
forward; the model is untouched afterwards."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sinkscope._utils import SinkscopeError
from sinkscope.interventions import VAR, var
from sinkscope.models.tiny import Plant, load_tiny, plant_text_sinks

CFG = dict(tau=5.0, start_layer=1, alpha=0.05)  # width 64: |x[d]|/RMS is at most 8


@pytest.fixture(scope="module")
def ad():
    ad = load_tiny("tiny-llava")
    plant_text_sinks(ad.llm, Plant(layer=1, token_ids=(1,)))
    proj = ad.model.model.multi_modal_projector.linear_2
    with torch.no_grad():  # image features stay off the plant's trigger channel
        proj.weight[63].zero_()
        proj.bias[63].zero_()
    return ad


def _call(ad, question="What is in the picture?"):
    img = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    inp = ad.build_inputs([img], "<image> " + question)
    return {k: inp[k] for k in ("input_ids", "attention_mask", "pixel_values")}


def _eager_probs(ad, call):
    """Every layer's attention probabilities of the plain model (transformers' eager path)."""
    lm = ad.model.model.language_model
    old = lm.config._attn_implementation
    lm.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = ad.model(**call, output_attentions=True)
    finally:
        lm.set_attn_implementation(old)
    return {i: a.float() for i, a in enumerate(out.attentions)}


def test_rows_sum_to_one_and_selected_rows_move_exactly_the_sink_mass(ad):
    call = _call(ad)
    cfg = VAR(**CFG)
    with torch.no_grad(), var(ad, cfg, record=True) as live:
        ad.model(**call)
    assert live.sink_dims == (7,)
    plain = _eager_probs(ad, call)
    image = (call["input_ids"] == ad.image_token_id)[0]
    n_selected = 0
    touched = {r["layer"] for r in live.records}
    assert touched == {1, 2}  # from start_layer to the last layer but one
    for rec in live.records:
        before, after, sel = rec["before"], rec["after"], rec["selected"]
        if rec["layer"] == 1:  # the first layer VAR touches sees the plain model's attention
            torch.testing.assert_close(before, plain[1], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(after.sum(-1), torch.ones_like(after.sum(-1)), atol=1e-6, rtol=0)
        sinks = live.last_sinks[rec["layer"]][0]
        assert sinks[0] and int(sinks.sum()) == 1  # BOS, the planted sink, only
        mass_before, mass_after = before[..., sinks].sum(-1), after[..., sinks].sum(-1)
        torch.testing.assert_close(mass_after[sel], cfg.p * mass_before[sel], atol=1e-6, rtol=0)
        torch.testing.assert_close(after[~sel], before[~sel], atol=1e-6, rtol=0)  # unselected rows unchanged
        text = ~image & ~sinks
        torch.testing.assert_close(after[..., text], before[..., text], atol=1e-6, rtol=0)  # only image gains
        gain = (after - before)[..., image & ~sinks]
        assert (gain >= -1e-7).all()
        # in proportion to their attention: each non-sink image token gains freed / base of its own share
        ns = before[..., image & ~sinks]
        factor = 1 + (1 - cfg.p) * mass_before / ns.sum(-1)
        torch.testing.assert_close(after[..., image & ~sinks][sel], (ns * factor[..., None])[sel], atol=1e-6, rtol=0)
        n_selected += int(sel.sum())
    assert n_selected > 0  # the test exercises the redistribution


def test_untouched_layers_and_p_one_equal_the_plain_model(ad):
    call = _call(ad)
    with torch.no_grad():
        plain = ad.model(**call, output_hidden_states=True)
        with var(ad, VAR(**{**CFG, "p": 1.0})):
            same = ad.model(**call).logits
        with var(ad, VAR(**CFG)):
            changed = ad.model(**call, output_hidden_states=True)
    torch.testing.assert_close(same, plain.logits, atol=1e-5, rtol=1e-5)
    for layer in (0, 1):  # hidden_states[1] is layer 0's output: VAR starts at layer 1
        torch.testing.assert_close(changed.hidden_states[layer], plain.hidden_states[layer], atol=1e-6, rtol=0)
    assert not torch.allclose(changed.logits, plain.logits, atol=1e-4)


def test_generation_under_var_equals_a_full_forward(ad):
    """Each cached decoding step's logits equal a full forward of the whole sequence under VAR
    (the sink and image flags of cached keys are kept)."""
    call = _call(ad)
    with torch.no_grad(), var(ad, VAR(**CFG)):
        out = ad.model.generate(**call, max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
        seq = out.sequences
        full = ad.model(input_ids=seq[:, :-1], attention_mask=torch.ones_like(seq[:, :-1]),
                        pixel_values=call["pixel_values"]).logits  # fmt: skip
    n = call["input_ids"].shape[1]
    for step, logits in enumerate(out.logits):
        torch.testing.assert_close(logits[0], full[0, n - 1 + step], atol=1e-4, rtol=1e-4)


def test_nothing_is_left_behind_and_bad_settings_fail(ad):
    call = _call(ad)
    lm = ad.model.model.language_model
    impl = lm.config._attn_implementation
    with torch.no_grad():
        before = ad.model(**call).logits
        with pytest.raises(RuntimeError, match="inside"), var(ad, VAR(**CFG)):
            raise RuntimeError("inside")
        after = ad.model(**call).logits
    assert torch.equal(before, after) and lm.config._attn_implementation == impl
    assert not any(hasattr(ad.llm.attention(i), "_sinkscope_var") for i in range(ad.llm.n_layers))
    assert all(not b._forward_pre_hooks for b in ad.llm.blocks()) and not ad.model._forward_pre_hooks
    with pytest.raises(SinkscopeError, match="VAR p"):
        VAR(p=1.5)
    with pytest.raises(SinkscopeError, match="start_layer 3"):
        with var(ad, VAR(start_layer=3)):
            pass


def test_eval_var_variant(ad, tmp_path):
    """``--variant var``: with p = 1 the scores are the plain model's; with p = 0.6 they change,
    the summary names the sink dims it used, and candidate scoring (a cache cropped back after each
    candidate) equals one full forward per candidate under VAR."""
    from sinkscope.evaluation.items import load_items
    from sinkscope.evaluation.run import evaluate
    from sinkscope.evaluation.scoring import build_prompt, score_choices, score_choices_direct

    one = evaluate(ad, "shapes", limit=4, variants=("both", "var"), var_config={**CFG, "p": 1.0}, progress=False)
    p = one.predictions.set_index(["variant", "id"]).scores
    for item_id in p["both"].index:
        np.testing.assert_allclose(list(p["var", item_id].values()), list(p["both", item_id].values()), atol=1e-5)
    res = evaluate(ad, "shapes", limit=4, variants=("both", "var"), var_config=CFG, out=tmp_path / "e", progress=False)
    assert res.summary["var"]["sink_dims_used"] == (7,) and res.summary["var"]["p"] == 0.6
    s = res.predictions.set_index(["variant", "id"]).scores
    assert any(s["var", i] != s["both", i] for i in s["both"].index)
    it = load_items("shapes", limit=1)[0]
    prompt = build_prompt(ad, it.image.load(), it.question)
    with torch.no_grad(), var(ad, VAR(**CFG)):
        np.testing.assert_allclose(
            score_choices(ad, prompt, it.choices), score_choices_direct(ad, prompt, it.choices), atol=1e-5
        )


@pytest.mark.parametrize("cpu_lse", [True, False])
def test_the_fused_route_equals_the_eager_one(ad, cpu_lse, monkeypatch):
    """Without anyone reading the probabilities VAR runs one fused SDPA call; its logits equal the
    eager route's (``record=True`` forces that one), in prefill and in cached generation - with the
    CPU kernel's log-sum-exp and with the two-call route other devices take."""
    import sys

    monkeypatch.setattr(sys.modules["sinkscope.interventions.var"], "_CPU_LSE", cpu_lse)
    call = _call(ad)
    with torch.no_grad():
        with var(ad, VAR(**CFG), record=True) as live:
            eager = ad.model(**call).logits
            g1 = ad.model.generate(**call, max_new_tokens=3, do_sample=False)
        assert live.records  # the eager route did run
        with var(ad, VAR(**CFG)) as live:
            fused = ad.model(**call).logits
            g2 = ad.model.generate(**call, max_new_tokens=3, do_sample=False)
        assert not live.records
    torch.testing.assert_close(fused, eager, atol=1e-5, rtol=1e-5)
    assert torch.equal(g1, g2)
