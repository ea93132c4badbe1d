"""DIYSink (issue 14) on ``tiny-llava`` with planted ViT sinks: the dual connector's known answers
(copies with weights 1 equal the original model under ``sinks-front``; the weights scale each
group; ``base`` is the original), batches with different sink counts, several images per prompt,
``generate``, save -> load (sinkscope and plain transformers), what each training stage changes,
a killed run resumed, CoT parsing, and the evaluation variants against the token interventions."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sinkscope import load_model
from sinkscope._utils import SinkscopeError
from sinkscope.diysink import (
    CoTRouter,
    DualProjector,
    ReWRouter,
    cot_route,
    make_dual,
    normalise_weights,
    parse_choice,
    routing,
    save_dual,
)
from sinkscope.diysink.routers import IMAGE_CHOICES, QUESTION_CHOICES
from sinkscope.interventions import TokenIntervention, intervene
from sinkscope.models.tiny import Plant, load_tiny, paint_markers
from sinkscope.training import diysink as D

RULE = "norm:100"  # the planted sinks have norm ~800 at the fed layer; ordinary tokens ~8
N_FED = 16
TRAIN_RULE = "topk:2"  # the training scenes carry no planted marker: two sinks per image, always


def _tiny():
    return load_tiny("tiny-llava", plant=Plant(layer=2))


def _image(cells, seed=None):
    rng = np.random.default_rng(len(cells) if seed is None else seed)
    return paint_markers(rng.integers(0, 120, (32, 32, 3), dtype=np.uint8), cells)


def _inputs(ad, images, question="What is in the picture?"):
    inp = ad.build_inputs(images, " ".join(["<image>"] * len(images)) + " " + question)
    return {k: inp[k] for k in ("input_ids", "attention_mask", "pixel_values")}


def _pad(rows, pad_id=0):
    n = max(r["input_ids"].shape[1] for r in rows)
    ids = [torch.cat([r["input_ids"], torch.full((1, n - r["input_ids"].shape[1]), pad_id)], 1) for r in rows]
    mask = [torch.cat([r["attention_mask"], torch.zeros((1, n - r["attention_mask"].shape[1]), dtype=torch.long)], 1) for r in rows]
    return {"input_ids": torch.cat(ids), "attention_mask": torch.cat(mask), "pixel_values": torch.cat([r["pixel_values"] for r in rows])}


def _sinks_front_logits(ad, inp):
    with torch.no_grad(), intervene(ad, TokenIntervention("sinks-front", rule=RULE)):
        return ad.model(**inp).logits


def test_a_fresh_dual_connector_is_the_original_model_under_sinks_front():
    """Both MLPs copies of the projector, weights 1: the dual model's logits equal the original
    model with its sinks moved to the front - for a batch whose images have 1 and 2 sinks (right
    padding), and for one prompt with two images."""
    ad = _tiny()
    a = _inputs(ad, [_image([(1, 2)])])
    b = _inputs(ad, [_image([(0, 0), (3, 3)])], "Is there a red cat in the picture on the left?")
    batch = _pad([a, b])
    two = _inputs(ad, [_image([(1, 2)]), _image([(0, 0), (3, 3)])])
    want_batch, want_two = _sinks_front_logits(ad, batch), _sinks_front_logits(ad, two)
    with torch.no_grad():
        plain = ad.model(**batch).logits
    dual = make_dual(ad, rule=RULE)
    assert dual.sink_mask(torch.randn(1, 4, 64)).shape == (1, 4)
    with torch.no_grad():
        got_batch, got_two = ad.model(**batch).logits, ad.model(**two).logits
        with routing(ad, mode="base"):  # the frozen original projector, every token in ViT order
            base = ad.model(**batch).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got_batch[real], want_batch[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_two, want_two, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(base[real], plain[real], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got_batch[real], plain[real], atol=1e-3)  # the order did change


def test_the_weights_scale_each_group_and_sinks_come_first():
    proj = torch.nn.Linear(3, 2)
    dual = DualProjector(proj, rule="topk:1", weights=(2.0, 0.5))
    x = torch.tensor([[[1.0, 0, 0], [0, 7.0, 0], [0, 0, 2.0]], [[9.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0]]])
    y = dual(x)
    with torch.no_grad():
        want = torch.stack([
            torch.stack([2 * proj(x[0, 1]), 0.5 * proj(x[0, 0]), 0.5 * proj(x[0, 2])]),
            torch.stack([2 * proj(x[1, 0]), 0.5 * proj(x[1, 1]), 0.5 * proj(x[1, 2])]),
        ])  # fmt: skip
    torch.testing.assert_close(y, want)
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # per-image weights from a router
    with routing(dual, weights=w):
        y2 = dual(x)
    assert float(y2.detach()[0, 1:].abs().max()) == 0 and float(y2.detach()[1, :1].abs().max()) == 0
    assert dual.route.weights is None  # the route is undone
    with pytest.raises(RuntimeError), routing(dual, mode="sink-only"):
        raise RuntimeError("boom")
    assert dual.route.mode == "dual"  # ... after an exception too
    torch.testing.assert_close(normalise_weights(torch.tensor([0.0, 0.0]), "softmax"), torch.tensor([0.5, 0.5]))
    with pytest.raises(SinkscopeError, match="attention rule"):
        DualProjector(proj, rule="attention:2")
    with pytest.raises(SinkscopeError, match="layer 3"):
        DualProjector(proj, rule="topk:2@3")


def test_generate_equals_the_original_under_sinks_front():
    ad = _tiny()
    inp = _inputs(ad, [_image([(1, 2)])])
    with torch.no_grad(), intervene(ad, TokenIntervention("sinks-front", rule=RULE)):
        want = ad.model.generate(**inp, max_new_tokens=5, do_sample=False)
    make_dual(ad, rule=RULE)
    with torch.no_grad():
        got = ad.model.generate(**inp, max_new_tokens=5, do_sample=False)
    assert torch.equal(got, want)


def test_save_pretrained_then_load_model_and_plain_transformers(tmp_path):
    """The dual model saved with ``save_pretrained`` loads back with ``sinkscope.load_model`` and
    with plain transformers after ``register()``: same logits, same rule, same weights."""
    import transformers as T

    import sinkscope.diysink

    ad = _tiny()
    make_dual(ad, rule=RULE, weights=(1.5, 0.75))
    with torch.no_grad():
        ad.projector.f_sink.linear_1.weight.mul_(1.1)  # the copies differ, as after training
    inp = _inputs(ad, [_image([(1, 2)])])
    with torch.no_grad():
        want = ad.model(**inp).logits
    save_dual(ad, tmp_path / "m")
    back = load_model(str(tmp_path / "m"))
    assert type(back.projector).__name__ == "DualProjector" and back.model.config.model_type == "diysink_llava"
    assert back.projector.rule.describe() == ad.projector.rule.describe()
    assert back.projector.weights.tolist() == [1.5, 0.75]
    with torch.no_grad():
        torch.testing.assert_close(back.model(**inp).logits, want)
    sinkscope.diysink.register()
    m = T.AutoModelForImageTextToText.from_pretrained(str(tmp_path / "m"))
    with torch.no_grad():
        torch.testing.assert_close(m(**inp).logits, want)
    assert T.AutoProcessor.from_pretrained(str(tmp_path / "m")).tokenizer is not None


def _state(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model" / "model.safetensors"))


KW = dict(n_per_task=2, real=(), batch_size=2, lr=1e-2, progress=False)


def test_stage_one_changes_only_its_own_mlp(tmp_path):
    D.init_diysink(_tiny(), tmp_path / "d0", rule=TRAIN_RULE)
    res = D.train_diysink(str(tmp_path / "d0"), tmp_path / "d1", stage="1", mlps=("sink",), steps=3, **KW)
    assert res.summary["trained"] == ["f_sink"] and len(res.log) == 3
    assert res.summary["sinks_per_image"]["min"] == res.summary["sinks_per_image"]["max"] == 2
    before, after = _state(tmp_path / "d0"), _state(tmp_path / "d1")
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.split(".")[-3:-2] == ["f_sink"] and "multi_modal_projector." in k for k in changed)
    hist = json.loads((tmp_path / "d1" / "model" / "config.json").read_text())["diysink"]["history"]
    assert [h["step"] for h in hist] == ["init", "stage 1"]


def test_the_router_stage_changes_only_the_router_and_gradients_reach_it(tmp_path):
    ad = _tiny()
    make_dual(ad, rule=RULE)
    # gradients from the LM loss reach R through the frozen LLM
    from sinkscope.training.examples import encode, vqa_examples
    from sinkscope.training.features import tower_features

    for p in ad.model.parameters():
        p.requires_grad_(False)
    ex = vqa_examples(n_per_task=1, turns=1, real=())[0]
    feats = tower_features(ad, [ex.image.load()], min_side=1)[0]
    router = ReWRouter(dim=8, hidden=4)
    torch.nn.init.normal_(router.net[2].weight)  # away from the zero start, so every layer gets a gradient
    loss = D.dual_loss(ad.model, [(*encode(ad, ex, N_FED), feats)], ad.image_token_id, weights=router(torch.randn(1, 8)))
    loss.backward()
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in router.parameters())
    assert all(p.grad is None for p in ad.model.parameters())
    # the stage: the model's weights bit-identical, the router trained and saved
    D.init_diysink(_tiny(), tmp_path / "d0", rule=TRAIN_RULE)
    res = D.train_diysink(str(tmp_path / "d0"), tmp_path / "r", stage="router", samples=6, epochs=2, batch_size=3, lr=1e-2, progress=False)
    assert res.summary["steps"] == 4 and res.summary["trained"] == ["router"]
    before, after = _state(tmp_path / "d0"), _state(tmp_path / "r")
    assert all(torch.equal(before[k], after[k]) for k in before)
    r = ReWRouter.load(tmp_path / "r" / "model" / "router")
    assert float(r.net[2].weight.detach().abs().max()) > 0  # it moved from its zero start


@pytest.mark.parametrize("stage", ["2", "router"])
def test_a_killed_run_resumes_to_the_same_weights(tmp_path, monkeypatch, stage):
    D.init_diysink(_tiny(), tmp_path / "d0", rule=TRAIN_RULE)
    kw = dict(KW, save_every=2) if stage == "2" else dict(samples=6, epochs=2, batch_size=2, lr=1e-2, save_every=2, progress=False)
    if stage == "2":
        kw["steps"] = 5
    D.train_diysink(str(tmp_path / "d0"), tmp_path / "full", stage=stage, **kw)
    real, calls = D.dual_loss, []

    def dying(*a, **k):
        if len(calls) == 3:  # killed during step 4: steps 1-2 are checkpointed, step 3 is lost
            raise KeyboardInterrupt
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(D, "dual_loss", dying)
    with pytest.raises(KeyboardInterrupt):
        D.train_diysink(str(tmp_path / "d0"), tmp_path / "cut", stage=stage, **kw)
    monkeypatch.setattr(D, "dual_loss", real)
    with pytest.raises(SinkscopeError, match="resume"):
        D.train_diysink(str(tmp_path / "d0"), tmp_path / "cut", stage=stage, **kw)
    D.train_diysink(str(tmp_path / "d0"), tmp_path / "cut", stage=stage, resume=True, **kw)
    a, b = _state(tmp_path / "full"), _state(tmp_path / "cut")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    if stage == "router":
        ra = load_file(str(tmp_path / "full" / "model" / "router" / "router.safetensors"))
        rb = load_file(str(tmp_path / "cut" / "model" / "router" / "router.safetensors"))
        for k in ra:
            torch.testing.assert_close(ra[k], rb[k], rtol=0, atol=0)
    steps = [json.loads(x)["step"] for x in (tmp_path / "cut" / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1))


def test_stage_two_with_lora_merges_into_the_saved_llm(tmp_path):
    D.init_diysink(_tiny(), tmp_path / "d0", rule=TRAIN_RULE)
    res = D.train_diysink(str(tmp_path / "d0"), tmp_path / "s2", stage="2", steps=3, lora_rank=2, llm_lr=1e-2, **KW)
    assert res.summary["lora"]["rank"] == 2 and (tmp_path / "s2" / "lora.safetensors").is_file()
    before, after = _state(tmp_path / "d0"), _state(tmp_path / "s2")
    assert before.keys() == after.keys()  # no peft keys left: a plain dual model
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any("language_model" in k for k in changed) and any(".f_nonsink." in k for k in changed)
    assert not any(".base." in k or "vision_tower" in k for k in changed)
    assert load_model(str(tmp_path / "s2")).projector.rule.describe() == load_model(str(tmp_path / "d0")).projector.rule.describe()


@pytest.mark.parametrize("llm", ["lora", "full", "frozen"])
def test_stage_two_trains_the_llm_by_default_and_baseline_says_which_llm(tmp_path, llm):
    """Stage 2 is the paper's usual LVLM fine-tuning: connector and LLM (LoRA by default, every
    weight with ``full``); ``frozen`` keeps the connector-only option. An evaluation's ``baseline``
    then names the fine-tuned LLM it runs with."""
    from sinkscope.evaluation.dual import dual_variants

    D.init_diysink(_tiny(), tmp_path / "d0", rule=TRAIN_RULE)
    kw = {} if llm == "lora" else {"llm": llm}
    res = D.train_diysink(str(tmp_path / "d0"), tmp_path / "s2", stage="2", steps=2, **kw, **KW)
    assert res.summary["llm"] == llm and (res.summary["lora"] or {}).get("rank") == (16 if llm == "lora" else None)
    before, after = _state(tmp_path / "d0"), _state(tmp_path / "s2")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    llm_changed = {k for k in changed if "language_model" in k}
    assert any(".f_sink." in k for k in changed) and any(".f_nonsink." in k for k in changed)
    assert bool(llm_changed) == (llm != "frozen")
    if llm == "full":  # every weight of the LLM trains, norms included (LoRA touches the projections only)
        assert any("layernorm" in k or ".norm." in k for k in llm_changed)
    elif llm == "lora":
        assert not any("layernorm" in k or ".norm." in k for k in llm_changed)
    base = dual_variants(load_model(str(tmp_path / "s2")), ["baseline"])["baseline"].describe()
    if llm == "frozen":
        assert "with the original LLM" in base
    else:
        assert f"the LLM fine-tuned in stage 2 ({llm}, 2 steps; not the original)" in base


def test_cot_parsing_on_canned_answers(monkeypatch):
    assert parse_choice("Simple.", IMAGE_CHOICES) == "simple"
    assert parse_choice("It's a real-world photograph", IMAGE_CHOICES) == "complex"
    assert parse_choice("Looks complex to me, not simple", IMAGE_CHOICES) == "complex"  # the first one named
    assert parse_choice("", IMAGE_CHOICES) is None and parse_choice("blue", IMAGE_CHOICES) is None
    assert parse_choice("A LOCAL detail", QUESTION_CHOICES) == "local"
    assert parse_choice("holistic", QUESTION_CHOICES) == "global"
    assert [cot_route(a, b) for a, b in [("simple", "global"), ("complex", "local"), ("simple", "local"), ("complex", "global")]] == [
        "sink-only", "nonsink-only", "both", "both"
    ]  # fmt: skip
    answers = iter(["simple", "I cannot tell"])
    monkeypatch.setattr(CoTRouter, "ask", lambda self, *a, **k: next(answers))
    d = CoTRouter().route(None, None, "What colour is the background?")
    assert (d.image_kind, d.question_kind, d.route, d.fallback) == ("simple", None, "both", True)
    answers = iter(["Simple.", "Global"])
    d = CoTRouter().route(None, None, "What colour is the background?")
    assert (d.route, d.fallback) == ("sink-only", False) and d.seconds >= 0


def test_cot_score_mode_is_the_option_words_log_likelihood():
    """``mode="score"``: each option's score is its tokens' mean log-probability after the prompt,
    as one full forward of prompt + option gives it (the batched, padded forward must not change
    it); the route follows the higher scores and never falls back."""
    ad = _tiny()
    make_dual(ad, rule=RULE)
    img = _image([(1, 2)])
    cot = CoTRouter(mode="score")
    got = cot.score(ad, img, cot.image_prompt, ("simple", "complex"))
    inp, _ = cot._inputs(ad, img, cot.image_prompt, None)
    ids = inp["input_ids"]
    for option, score in got.items():
        opt = torch.tensor([ad.tokenizer(" " + option, add_special_tokens=False).input_ids])
        with torch.no_grad():
            logits = ad.model(input_ids=torch.cat([ids, opt], 1), pixel_values=inp["pixel_values"]).logits
        lp = torch.log_softmax(logits[0, ids.shape[1] - 1 : -1].float(), -1)
        assert score == pytest.approx(float(lp[torch.arange(opt.shape[1]), opt[0]].mean()), abs=1e-5)
    d = cot.route(ad, img, "What colour is the background?")
    assert not d.fallback and d.image_kind == max(got, key=got.get)
    assert d.route == cot_route(d.image_kind, d.question_kind)
    with pytest.raises(SinkscopeError, match="CoT mode 'guess'"):
        CoTRouter(mode="guess")


def test_eval_variants_against_the_token_interventions(tmp_path, monkeypatch):
    """``baseline`` answers as the original model, ``dual`` as the original under ``sinks-front``,
    ``dual-sink-only`` / ``dual-nonsink-only`` as ``sink-only`` / ``nonsink-only`` (the MLPs are
    still copies), to the score; CoT and ReW write their routing."""
    from sinkscope.evaluation import evaluate
    from sinkscope.evaluation.items import load_items

    items = load_items("shapes", limit=4)
    orig = evaluate(_tiny(), items, variants=("default", "sinks-front", "sink-only", "nonsink-only"), sink_rule=RULE, progress=False)
    D.init_diysink(_tiny(), tmp_path / "d0", rule=RULE)
    D.train_diysink(str(tmp_path / "d0"), tmp_path / "r", stage="router", samples=3, epochs=1, batch_size=3, progress=False)
    answers = iter(["simple", "global", "complex", "local"] * 10)
    monkeypatch.setattr(CoTRouter, "ask", lambda self, *a, **k: next(answers))
    res = evaluate(str(tmp_path / "r"), items, variants=("baseline", "dual", "dual-sink-only", "dual-nonsink-only", "cot", "rew"),
                   out=tmp_path / "ev", progress=False)  # fmt: skip
    pairs = {"baseline": "default", "dual": "sinks-front", "dual-sink-only": "sink-only", "dual-nonsink-only": "nonsink-only"}
    for mine, theirs in pairs.items():
        got = res.predictions[res.predictions.variant == mine].set_index("id")["scores"]
        want = orig.predictions[orig.predictions.variant == theirs].set_index("id")["scores"]
        for i in want.index:
            assert got[i].keys() == want[i].keys()
            np.testing.assert_allclose(list(got[i].values()), list(want[i].values()), atol=2e-5)
    routing_table = __import__("pandas").read_parquet(tmp_path / "ev" / "routing.parquet")
    cot = routing_table[routing_table.variant == "cot"]
    assert cot.route.tolist() == ["sink-only", "nonsink-only", "sink-only", "nonsink-only"]
    rew = routing_table[routing_table.variant == "rew"]
    assert len(rew) == 4 and np.allclose(rew.w_sink + rew.w_nonsink, 2.0)  # x2-softmax
    s = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert s["interventions"]["paired_with"] == "baseline"
    assert set(s["diysink"]["seconds_per_question"]) == set(pairs) | {"cot", "rew"}
    assert s["diysink"]["cot"]["fallbacks"] == 0 and s["diysink"]["cot"]["routes"] == {"sink-only": 2, "nonsink-only": 2}
    from sinkscope.viz.eval_report import eval_section

    sec = eval_section(tmp_path / "ev")  # the eval page's section: routing findings and figure
    assert any(f.startswith("CoT routing: sink-only 2, nonsink-only 2 of 4") for f in sec.findings)
    assert "DIYSink: latency and router weights" in [title for title, _ in sec.figures]
    fed = __import__("pandas").read_parquet(tmp_path / "ev" / "tokens_fed.parquet")
    assert set(fed.variant) == {"dual-sink-only", "dual-nonsink-only", "cot"}
    with pytest.raises(SinkscopeError, match="no dual connector"):
        evaluate(_tiny(), items, variants=("dual",), progress=False)
    with pytest.raises(SinkscopeError, match="no ReW router"):
        evaluate(str(tmp_path / "d0"), items, variants=("rew",), progress=False)


def test_cli_init_train_eval(tmp_path, capsys):
    from sinkscope.cli import main

    d0, d1, ev = (str(tmp_path / n) for n in ("d0", "d1", "ev"))
    assert main(["diysink", "init", "--model", "tiny-llava+sinks", "--sink-rule", RULE, "--out", d0, "-q"]) == 0
    assert main(["diysink", "train", "--model", d0, "--stage", "2", "--steps", "2", "--n-per-task", "2", "--no-real", "--out", d1, "-q"]) == 0
    assert main(["eval", "--model", d1, "--tasks", "shapes", "--limit", "2", "--variant", "baseline,dual", "--out", ev, "-q"]) == 0
    out = capsys.readouterr().out
    assert "stage 2: 2 steps" in out and "DIYSink: ViT sinks: L2 norm >= 100" in out
    assert main(["diysink", "train", "--model", d0, "--stage", "router", "--steps", "3", "--out", str(tmp_path / "x")]) == 2
    assert main(["diysink", "init", "--model", "tiny-llava", "--sink-rule", "attention:2", "--out", str(tmp_path / "y")]) == 2
    from sinkscope import load_run

    assert load_run(ev).summary["diysink"]["history"][-1]["step"] == "stage 2"
    # d1 has no router of its own: --router names one (a run config field, passed to evaluate)
    ReWRouter(384).save(tmp_path / "rt")
    ev2 = str(tmp_path / "ev2")
    args = ["eval", "--model", d1, "--tasks", "shapes", "--limit", "2", "--variant", "rew", "--router", str(tmp_path / "rt")]
    assert main([*args, "--out", ev2, "-q"]) == 0
    assert load_run(ev2).summary["diysink"]["rew"]["router"] == str(tmp_path / "rt")


def test_accelerate_launch_trains_the_router_on_two_processes(tmp_path):
    """``accelerate launch --num_processes 2`` (CPU, DDP) trains the ReW router on ``tiny-llava``;
    the saved router loads and moved from its start, the model's weights are untouched."""
    from tests.test_distributed import BIN, _accelerate

    D.init_diysink(_tiny(), tmp_path / "d0", rule=TRAIN_RULE)
    out = tmp_path / "r"
    r = _accelerate(
        [str(BIN / "sinkscope")], "diysink", "train", "--model", str(tmp_path / "d0"), "--stage", "router",
        "--samples", "8", "--epochs", "2", "--batch-size", "2", "--out", str(out), "-q", timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["num_processes"] == 2 and s["steps"] == 4  # 8 questions / (2 per process x 2) x 2 epochs
    router = ReWRouter.load(out / "model" / "router")
    assert float(router.net[2].weight.detach().abs().max()) > 0
    before, after = _state(tmp_path / "d0"), _state(out)
    assert all(torch.equal(before[k], after[k]) for k in before)
