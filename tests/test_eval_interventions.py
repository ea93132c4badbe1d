"""``sinkscope eval --variant`` with visual-token interventions (issue 13): ``both`` reproduces the
plain model, cached scoring stays exact on intervened prompts, tokens_fed.parquet, paired
differences, resume, and a run's config.json reproducing its tables."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from sinkscope import SinkscopeError, load_model
from sinkscope.evaluation.items import load_items
from sinkscope.evaluation.run import answer_item, evaluate, paired_table
from sinkscope.evaluation.scoring import (
    build_prompt,
    generate_answer,
    intervened,
    score_choices,
    score_choices_direct,
)
from sinkscope.interventions import TokenIntervention, intervene

VARIANTS = ("both", "sinks-front", "sink-only", "nonsink-only", "random-k")


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llava")


def test_both_reproduces_the_plain_model(tiny):
    for it in load_items("shapes", limit=3):
        plain = answer_item(tiny, it, "default")
        both = answer_item(tiny, it, "both", intervention=TokenIntervention("both", rule="topk:2"))
        np.testing.assert_allclose(list(both["scores"].values()), list(plain["scores"].values()), atol=1e-5)
        assert both["n_visual_fed"] == 16 and both["n_sinks"] == 2


@pytest.mark.parametrize("positions", ["reindex", "keep"])
def test_cached_scoring_is_exact_on_an_intervened_prompt(tiny, positions):
    """With ``keep`` the candidate tokens must go on from the prompt's last position id, not the
    cache length: the cached scores equal one full forward per candidate either way."""
    it = load_items("shapes", limit=1)[0]
    base = build_prompt(tiny, it.image.load(), it.question)
    prompt = intervened(tiny, base, TokenIntervention("nonsink-only", rule="topk:3", positions=positions))
    assert prompt.n_tokens == base.n_tokens - 3
    choices = (*it.choices, "a very long answer indeed")
    np.testing.assert_allclose(score_choices(tiny, prompt, choices), score_choices_direct(tiny, prompt, choices), atol=1e-5)


def test_generation_from_an_intervened_prompt_equals_the_context(tiny):
    it = load_items("shapes", limit=1)[0]
    spec = TokenIntervention("sinks-end", rule="topk:2", positions="keep")
    base = build_prompt(tiny, it.image.load(), it.question)
    text = generate_answer(tiny, intervened(tiny, base, spec), max_new_tokens=5)
    with intervene(tiny, spec):
        out = tiny.model.generate(**base.inputs, max_new_tokens=5, do_sample=False)
    assert text == tiny.tokenizer.decode(out[0, base.n_tokens :], skip_special_tokens=True).strip()


def test_paired_table_by_hand():
    pred = pd.DataFrame(
        {
            "id": ["a", "b", "c", "d"] * 2,
            "task_type": ["global", "global", "local", "local"] * 2,
            "variant": ["both"] * 4 + ["sink-only"] * 4,
            "correct": [True, False, True, False, True, True, False, False],
        }
    )
    t = paired_table(pred, n_boot=200).set_index("task_type")
    assert t.loc["global", "diff"] == 0.5 and t.loc["local", "diff"] == -0.5 and t.loc["all", "diff"] == 0.0
    assert t.loc["all", "p_mcnemar"] == 1.0 and t.loc["all", "n"] == 4
    assert paired_table(pred[pred.variant != "both"]).empty  # nothing to pair with


def test_a_run_with_variants_and_its_config_reproduce_the_tables(tmp_path):
    from sinkscope import load_run, run
    from sinkscope.cli import main

    out = tmp_path / "cli"
    argv = ["eval", "--model", "tiny-llava", "--tasks", "shapes", "--limit", "6", "--variant", ",".join(VARIANTS),
            "--sink-rule", "topk:2", "--positions", "keep", "--seed", "3", "-q", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["variants"] == list(VARIANTS) and cfg["sink_rule"] == "topk:2" and cfg["positions"] == "keep"
    fed = pd.read_parquet(out / "tokens_fed.parquet")
    need = {"image", "vit_token", "row", "col", "is_vit_sink", "llm_position", "position_id"}
    assert need <= set(fed.columns) and len(fed) == 6 * len(VARIANTS) * 16
    per = fed.groupby("variant").apply(lambda g: g.llm_position.notna().sum() / 6, include_groups=False)
    assert per.to_dict() == {"both": 16, "sinks-front": 16, "sink-only": 2, "nonsink-only": 14, "random-k": 2}
    sink_only = fed[fed.variant == "sink-only"]
    assert (sink_only.llm_position.notna() == sink_only.is_vit_sink).all()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interventions"]["rule"]["k"] == 2 and "highest-norm" in summary["interventions"]["rule_description"]
    assert "Each intervention minus both" in (out / "eval.html").read_text()
    again = run(load_run(out).config.replace(out=str(tmp_path / "again")), progress=False)
    pd.testing.assert_frame_equal(again.results, pd.read_csv(out / "results.csv"), check_exact=False, atol=1e-6)
    pd.testing.assert_frame_equal(again.paired, pd.read_csv(out / "paired.csv"), check_exact=False, atol=1e-6)


def test_a_killed_run_resumes_and_a_changed_rule_is_refused(tiny, tmp_path, eval_calls):
    out = tmp_path / "ev"
    kw = dict(limit=4, variants=("both", "sink-only"), sink_rule="topk:2", progress=False)
    eval_calls(die_after=7)
    with pytest.raises(KeyboardInterrupt):
        evaluate(tiny, "shapes", out=out, **kw)
    eval_calls()
    with pytest.raises(SinkscopeError, match=r"sink_rule differs \(stored 'topk:2', now 'topk:3'\)"):
        evaluate(tiny, "shapes", out=out, resume=True, **{**kw, "sink_rule": "topk:3"})
    res = evaluate(tiny, "shapes", out=out, resume=True, **kw)
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 8 and len({(json.loads(x)["id"], json.loads(x)["variant"]) for x in lines}) == 8
    fed = pd.read_parquet(out / "tokens_fed.parquet")
    assert len(fed) == 8 * 16 and not (out / "tokens_fed.jsonl").exists()
    fresh = evaluate(tiny, "shapes", **kw)
    key = ["id", "variant"]
    pd.testing.assert_series_equal(
        res.predictions.sort_values(key).reset_index(drop=True).prediction,
        fresh.predictions.sort_values(key).reset_index(drop=True).prediction,
    )
    with pytest.raises(SinkscopeError, match="sink rule topk: needs k >= 1"):
        evaluate(tiny, "shapes", sink_rule="topk:", **{k: v for k, v in kw.items() if k != "sink_rule"})
