"""VAR (issues 13 and 25): on ``tiny-llava`` whose LLM has a planted BOS sink (from layer 1) and an
image token made a visual sink from layer 2 on, attention rows still sum to one, selected rows lose
exactly ``1 - p`` of their sink mass to the non-sink image tokens, everything else is unchanged,
``p = 1`` is the plain model, and cached generation equals a full forward; the model is untouched
afterwards.

Known answers (issue 25): :class:`ReferenceVAR` below is a small port of the selection and
redistribution of Kang et al.'s code (``seilk/VisAttnSink``, ``src/logic/logic.py``: sink
detection before the first output token only, ``HeadFork`` with no head when the image holds no
visual sink, ``attn_redist`` on the prefill queries from ``image_end`` on), run as the model's
attention function; sinkscope's VAR changes the same (layer, head, query) rows by the same amount,
in prefill, cached decoding and ``generate``."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
import torch

from sinkscope._utils import SinkscopeError
from sinkscope.interventions import VAR, var
from sinkscope.models.tiny import Plant, load_tiny, plant_text_sinks

CFG = dict(tau=5.0, start_layer=1, alpha=0.05)  # width 64: |x[d]|/RMS is at most 8
IMAGE_SINK = 5  # the image token (position) that layer 1 makes a visual sink; the image is at 1-16


@pytest.fixture(scope="module")
def ad():
    ad = load_tiny("tiny-llava")
    plant_text_sinks(ad.llm, Plant(layer=1, token_ids=(1,)))
    proj = ad.model.model.multi_modal_projector.linear_2
    with torch.no_grad():  # image features stay off the plant's trigger channel
        proj.weight[63].zero_()
        proj.bias[63].zero_()
    ad.image_sink = IMAGE_SINK  # None: BOS is the only sink

    def massive(mod, args, kwargs, out):  # layer 1 writes a massive value on channel 7 of one image token
        if ad.image_sink is None:
            return out
        h = out[0] if isinstance(out, tuple) else out
        at = (kwargs["position_ids"] == ad.image_sink).to(h.dtype)[..., None] * (torch.arange(h.shape[-1]) == 7)
        h = h + 400.0 * at.to(h.dtype)
        return (h, *out[1:]) if isinstance(out, tuple) else h

    ad.llm.blocks()[1].register_forward_hook(massive, with_kwargs=True)
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
    image_end = int(torch.nonzero(image).max()) + 1
    n_selected = 0
    touched = {r["layer"] for r in live.records}
    assert touched == {1, 2}  # from start_layer to the last layer but one
    for rec in live.records:
        before, after, sel = rec["before"], rec["after"], rec["selected"]
        # layer 1 forks no head (no visual sink), so layer 2 too sees the plain model's attention
        torch.testing.assert_close(before, plain[rec["layer"]], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(after.sum(-1), torch.ones_like(after.sum(-1)), atol=1e-6, rtol=0)
        sinks = live.last_sinks[rec["layer"]][0]
        # BOS, the planted sink; from layer 2 on also the image token IMAGE_SINK
        assert torch.nonzero(sinks).flatten().tolist() == ([0] if rec["layer"] == 1 else [0, IMAGE_SINK])
        assert not sel[..., :image_end].any()  # the image's own rows and the text before it: never
        assert sel.any() == (rec["layer"] == 2)
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
    # hidden_states[1] is layer 0's output: VAR starts at layer 1, which has no visual sink (no change)
    for layer in (0, 1, 2):
        torch.testing.assert_close(changed.hidden_states[layer], plain.hidden_states[layer], atol=1e-6, rtol=0)
    image_end = int(torch.nonzero(call["input_ids"][0] == ad.image_token_id).max()) + 1
    for layer in (3, 4):  # after layer 2's redistribution: the tokens up to the image's end are untouched
        torch.testing.assert_close(changed.hidden_states[layer][:, :image_end], plain.hidden_states[layer][:, :image_end],
                                   atol=1e-6, rtol=0)  # fmt: skip
        assert not torch.allclose(changed.hidden_states[layer][:, image_end:], plain.hidden_states[layer][:, image_end:])
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


# --- known answers: a port of the reference's selection (Kang et al., seilk/VisAttnSink) ----------


class ReferenceVAR:
    """The reference's VAR for one prompt (batch 1), as its code does it: ``detect`` (its
    ``DimProspector``: RMS-normalised |x[d]| > tau on the sink dims, at the input of every layer
    from ``start`` on, only in the first call - the prefill), ``fork`` (its ``HeadFork``: no head
    without a visual sink; else the (batch, head, query) rows whose image attention is >= ``summ``
    with the visual sinks' share <= ``rho``) and ``redistribute`` (its ``attn_redist``: in the
    prefill only the queries from ``image_end`` on; sink attention x p, the freed mass to the
    non-sink image tokens in proportion; not in the last layer). ``records``: per redistributed
    call and layer the probabilities before and after."""

    def __init__(self, ad, input_ids, dims, tau, rho=0.5, summ=0.2, p=0.6, start=2):
        image = torch.nonzero(input_ids[0] == ad.image_token_id).flatten()
        self.im, self.pa = int(image[0]), len(image)
        self.n_layers = ad.llm.n_layers
        self.dims, self.tau, self.rho, self.summ, self.p = list(dims), tau, rho, summ, p
        self.layers = range(start, self.n_layers)
        self.sinks: dict[int, torch.Tensor] = {}
        self.forked: dict[int, list] = {}
        self.records: list[dict] = []
        self.calls = 0  # forward calls so far: the first one is the prefill

    def detect(self, layer, hidden):
        x = hidden.float()
        normed = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)).abs()
        self.sinks[layer] = torch.nonzero(normed[..., self.dims].amax(-1) > self.tau)[:, 1]

    def fork(self, probs, layer):
        s = self.sinks[layer]
        visual = s[(s >= self.im) & (s < self.im + self.pa)]
        if len(visual) == 0:
            self.forked[layer] = []
            return
        img = probs[..., self.im : self.im + self.pa]
        portion = img[..., visual - self.im].sum(-1) / (img + 1e-6).sum(-1)
        self.forked[layer] = torch.nonzero((portion <= self.rho) & (img.sum(-1) >= self.summ)).tolist()

    def redistribute(self, probs, layer):
        im, end, p = self.im, self.im + self.pa, self.p
        s = self.sinks[layer]
        in_image = (s >= im) & (s < end)
        visual, text = s[in_image], s[~in_image]
        new = probs.clone()
        for b, h, q in self.forked[layer]:
            if self.calls == 1 and q < end:  # prefill: query index = position
                continue
            row = probs[b, h, q]
            freed = (1 - p) * (row[visual].sum() + row[text].sum())
            share = row[im:end].clone()
            share[visual - im] = 0
            out = row.clone()
            out[visual] *= p
            out[text] *= p
            out[im:end] += freed * share / share.sum()
            new[b, h, q] = out
        return new

    def attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        groups = query.shape[1] // key.shape[1]
        k, v = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        scores = query @ k.transpose(2, 3) * scaling
        if attention_mask is not None:
            scores = scores + attention_mask[..., : k.shape[2]]
        probs = torch.softmax(scores.float(), -1)
        layer = module.layer_idx
        if layer in self.layers:
            self.fork(probs, layer)
            if layer < self.n_layers - 1:
                new = self.redistribute(probs, layer)
                self.records.append({"call": self.calls, "layer": layer, "before": probs, "after": new})
                probs = new
        return (probs.to(v.dtype) @ v).transpose(1, 2).contiguous(), probs


@contextmanager
def reference_var(ad, ref: ReferenceVAR):
    """Run ``ad``'s LLM with ``ref`` as its attention (eager, transformers' attention interface)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register("var-reference", lambda *a, **k: ref.attention(*a, **k))
    AttentionMaskInterface.register("var-reference", eager_mask)
    lm = ad.model.model.language_model
    old = lm.config._attn_implementation

    def count(mod, args, kwargs):
        ref.calls += 1

    def detector(layer):
        def pre(mod, args, kwargs):
            if ref.calls == 1:
                ref.detect(layer, kwargs.get("hidden_states", args[0] if args else None))

        return pre

    handles = [ad.model.register_forward_pre_hook(count, with_kwargs=True)]
    handles += [ad.llm.blocks()[i].register_forward_pre_hook(detector(i), with_kwargs=True) for i in ref.layers]
    lm.set_attn_implementation("var-reference")
    try:
        yield ref
    finally:
        lm.set_attn_implementation(old)
        for h in handles:
            h.remove()


def _changed(rec):
    """The ``[H, Q]`` rows a record's redistribution changed."""
    return (rec["after"] != rec["before"]).any(-1)[0]


@pytest.mark.parametrize("alpha", [0.2, 0.78])
def test_prefill_changes_the_reference_rows_by_the_reference_amount(ad, alpha):
    """Layer 1 (BOS sink only) forks no head; layer 2 (BOS and an image sink) changes only rows of
    queries after the image: the same (head, query) rows as the port, by the same amount. alpha 0.2:
    every such row qualifies; 0.78: only some (image attention there is 0.69-0.89)."""
    call = _call(ad)
    n = call["input_ids"].shape[1]
    image_end = int(torch.nonzero(call["input_ids"][0] == ad.image_token_id).max()) + 1
    ref = ReferenceVAR(ad, call["input_ids"], (7,), tau=CFG["tau"], summ=alpha, start=CFG["start_layer"])
    with torch.no_grad():
        with reference_var(ad, ref):
            ref_logits = ad.model(**call).logits
        with var(ad, VAR(**{**CFG, "alpha": alpha}), record=True) as live:
            eager = ad.model(**call).logits
        with var(ad, VAR(**{**CFG, "alpha": alpha})) as live_fused:
            fused = ad.model(**call).logits
    assert not live_fused.records
    assert {k: v.tolist() for k, v in ref.sinks.items()} == {1: [0], 2: [0, IMAGE_SINK], 3: [0, IMAGE_SINK]}
    assert [r["layer"] for r in ref.records] == [r["layer"] for r in live.records] == [1, 2]
    for mine, theirs in zip(live.records, ref.records):
        torch.testing.assert_close(mine["before"], theirs["before"], atol=1e-6, rtol=0)
        assert torch.equal(_changed(mine), _changed(theirs))
        torch.testing.assert_close(mine["after"] - mine["before"], theirs["after"] - theirs["before"], atol=1e-6, rtol=0)
        assert torch.equal(mine["selected"][0], _changed(theirs))
    assert int(_changed(live.records[0]).sum()) == 0  # was 88 of 92 rows before issue 25
    rows = _changed(live.records[1])
    assert not rows[:, :image_end].any()  # the 64 image rows (and BOS's) changed before issue 25
    heads = ad.model.config.text_config.num_attention_heads
    if alpha == 0.2:
        assert int(rows.sum()) == heads * (n - image_end)
    else:
        assert 0 < int(rows.sum()) < heads * (n - image_end)
    torch.testing.assert_close(eager, ref_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused, ref_logits, atol=1e-5, rtol=1e-5)


def test_no_visual_sink_forks_no_head(ad):
    """With BOS the only sink (no image sink) VAR changes no row, as the reference: the logits are
    the plain model's (before issue 25, 88 of 92 rows changed in each of layers 1 and 2)."""
    call = _call(ad)
    ad.image_sink = None
    try:
        with torch.no_grad():
            plain = ad.model(**call).logits
            ref = ReferenceVAR(ad, call["input_ids"], (7,), tau=CFG["tau"], summ=CFG["alpha"], start=CFG["start_layer"])
            with reference_var(ad, ref):
                ref_logits = ad.model(**call).logits
            with var(ad, VAR(**CFG), record=True) as live:
                eager = ad.model(**call).logits
            with var(ad, VAR(**CFG)):
                fused = ad.model(**call).logits
    finally:
        ad.image_sink = IMAGE_SINK
    assert {k: v.tolist() for k, v in ref.sinks.items()} == {1: [0], 2: [0], 3: [0]}
    assert ref.forked == {1: [], 2: [], 3: []}
    assert [r["layer"] for r in live.records] == [1, 2]
    for rec in live.records:
        assert live.last_sinks[rec["layer"]][0].tolist()[:2] == [True, False]  # BOS is a sink, in every layer
        assert not rec["selected"].any() and torch.equal(rec["after"], rec["before"])
    for logits in (ref_logits, eager, fused):
        torch.testing.assert_close(logits, plain, atol=1e-5, rtol=1e-5)


def test_tokens_fed_after_the_prefill_are_never_sinks(ad):
    """Cached decoding: a BOS token fed after the prompt has a sink's hidden state but is not a sink
    (the reference detects sinks before the first output token only); each step's logits equal the
    port's, and so do ``generate``'s."""
    from sinkscope.evaluation.scoring import CACHE_ARG, _cache_of
    from sinkscope.interventions.var import phi

    call = _call(ad)
    n = call["input_ids"].shape[1]
    steps = [torch.tensor([[1]]), torch.tensor([[8]])]  # BOS (a planted sink), then a word

    def decode():
        out = ad.model(**call, use_cache=True)
        logits, cache = [out.logits[:, -1]], _cache_of(out)
        for i, ids in enumerate(steps):
            mask = torch.ones(1, n + i + 1, dtype=call["attention_mask"].dtype)
            out = ad.model(input_ids=ids, attention_mask=mask, use_cache=True, **{CACHE_ARG: cache})
            logits.append(out.logits[:, -1])
            cache = _cache_of(out)
        return torch.cat(logits)

    with torch.no_grad():
        full = torch.cat([call["input_ids"], *steps], 1)
        hs = ad.model(input_ids=full, attention_mask=torch.ones_like(full), pixel_values=call["pixel_values"],
                      output_hidden_states=True).hidden_states  # fmt: skip
        assert all(phi(hs[layer][0, n], (7,)) > 7.9 for layer in (1, 2))  # BOS at n: a sink's state
        ref = ReferenceVAR(ad, call["input_ids"], (7,), tau=CFG["tau"], summ=CFG["alpha"], start=CFG["start_layer"])
        with reference_var(ad, ref):
            ref_steps = decode()
        ref_gen = ReferenceVAR(ad, call["input_ids"], (7,), tau=CFG["tau"], summ=CFG["alpha"], start=CFG["start_layer"])
        with reference_var(ad, ref_gen):
            g_ref = ad.model.generate(**call, max_new_tokens=4, do_sample=False, output_logits=True,
                                      return_dict_in_generate=True)  # fmt: skip
        for record in (True, False):  # the eager route (short calls take it anyway) and the default
            with var(ad, VAR(**CFG), record=record) as live:
                mine = decode()
                sinks = {layer: live.last_sinks[layer][0].tolist() for layer in (1, 2)}
                g = ad.model.generate(**call, max_new_tokens=4, do_sample=False, output_logits=True,
                                      return_dict_in_generate=True)  # fmt: skip
            assert sinks == {1: [True] + [False] * (n + 1), 2: [i in (0, IMAGE_SINK) for i in range(n + 2)]}
            torch.testing.assert_close(mine, ref_steps, atol=1e-5, rtol=1e-5)
            assert torch.equal(g.sequences, g_ref.sequences)
            for a, b in zip(g.logits, g_ref.logits):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # the reference redistributed some decoding rows (layer 2 has the image sink)
    assert any(r["call"] > 1 and r["layer"] == 2 and _changed(r).any() for r in ref.records)
