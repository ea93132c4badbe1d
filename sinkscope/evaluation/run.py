"""``sinkscope eval``: score a model on VQA items, per task type, per task and per variant.

For every item and variant the model answers one question: by log-likelihood over the item's
``choices`` (multiple choice; ``mode="choice"``), or by greedy generation with exact match after
normalisation (``mode="generate"``; the default for items without choices). Variants:

- ``default``: the model as loaded;
- ``no-image``: the same question with the image removed (the blind baseline of a model that
  answers from the text alone);
- the visual-token interventions of :mod:`~sinkscope.interventions.tokens` (``both``,
  ``sinks-front``, ``sinks-end``, ``sink-only``, ``nonsink-only``, ``random-k``,
  ``lowest-norm-k``), under one sink rule (``sink_rule``; default
  :func:`~sinkscope.interventions.default_rule`, named in the summary with its reason) and one
  position policy (``positions``). ``results`` then compares every variant with ``both`` on the
  same items (``paired.csv``: the accuracy difference with a paired bootstrap interval and
  McNemar's exact p-value) and ``tokens_fed.parquet`` holds, per item and variant, where every
  ViT token went;
- ``var``: VAR (:mod:`~sinkscope.interventions.var`), the LLM's attention moved from its sink
  tokens to the image, with ``var_config`` (default: Kang et al.'s settings); the sink dims it
  used are in the summary;
- ``tt-register``: a test-time register in the vision tower
  (:mod:`~sinkscope.interventions.registers`), with ``tt_config`` or, by default, the top 10
  register neurons found on 32 training-split shapes scenes (norm >= 5x the image median at the
  fed layer; a tower without such outliers has none, and the run says so).

Output folder::

    predictions.jsonl   one object per item and variant (appended as it goes: resumable)
    results.csv         accuracy per task and per task type, with bootstrap intervals and chance
    paired.csv          (interventions) each variant minus ``both`` per task type, paired
    tokens_fed.parquet  (interventions) one row per ViT token of each item's image per variant
    summary.json        settings, the per-type table, baselines and (for MME items) MME's score

A killed run resumes with ``resume=True``: items already in ``predictions.jsonl`` are not asked
again, and no line is duplicated. ``sinkscope.run(EvalConfig(...))`` adds ``eval.html``.

>>> res = evaluate("tiny-llava", "shapes", limit=8, progress=False)
>>> sorted(res.results.task_type.unique())
['all', 'global', 'local', 'mixed']
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .. import ownership
from .._utils import SinkscopeError, package_versions, progress_bar
from ..diysink import dual_projector
from ..interventions import (
    TOKEN_VARIANTS,
    VAR,
    TestTimeRegister,
    TokenIntervention,
    default_rule,
    rule_from,
    tt_register,
    var,
)
from ..interventions.tokens import check_rule
from ..interventions.var import check_dims
from ..models import load_model
from .dual import DUAL_VARIANTS, ROUTING_COLUMNS, DualVariant, dual_variants, plan_item
from .items import VQAItem, limit_items, load_items
from .mme import COGNITION, PERCEPTION, mme_score
from .scoring import build_prompt, generate_answer, intervened, is_correct, score_choices
from .stats import bootstrap_ci, paired_difference

#: variants that change the model's attention (one context per run)
ATTENTION_VARIANTS = ("var", "tt-register")
VARIANTS = ("default", "no-image") + TOKEN_VARIANTS + ATTENTION_VARIANTS + DUAL_VARIANTS
MODES = ("auto", "choice", "generate")
OUTPUT_FILES = (
    "predictions.jsonl", "results.csv", "summary.json", "paired.csv", "tokens_fed.parquet", "tokens_fed.jsonl",
    "routing.parquet",
)  # fmt: skip
#: the variant the interventions are compared with (the same path, nothing moved)
REFERENCE = "both"


@dataclass
class EvalResult:
    """What an evaluation produced: ``predictions`` (one row per item and variant), ``results``
    (accuracy table), ``summary``, ``out`` and (through ``sinkscope.run``) ``config``."""

    predictions: pd.DataFrame
    results: pd.DataFrame
    summary: dict[str, Any]
    out: Path | None = None
    config: Any = None
    timings: dict[str, float] = field(default_factory=dict)
    paired: pd.DataFrame | None = None
    tokens_fed: pd.DataFrame | None = None
    routing: pd.DataFrame | None = None


def answer_item(
    adapter,
    item: VQAItem,
    variant: str = "default",
    mode: str = "auto",
    chat: bool | str = "auto",
    intervention: TokenIntervention | None = None,
) -> dict[str, Any]:
    """Ask ``item`` under ``variant``; the prediction record (``prediction``, ``correct``, ``scores``).
    A token variant runs ``intervention`` (default: that variant under the model's
    :func:`~sinkscope.interventions.default_rule`); its record adds ``n_visual_fed`` and
    ``n_sinks``, and ``_fed`` (the ``tokens_fed`` table, not JSON: :func:`evaluate` stores it).

    >>> from sinkscope.evaluation.items import load_items
    >>> rec = answer_item(load_model("tiny-llava"), load_items("shapes", limit=1)[0])
    >>> sorted(rec)[:4], len(rec["scores"])
    (['answer', 'choices', 'correct', 'id'], 8)
    """
    if variant not in VARIANTS:
        raise SinkscopeError(f"variant {variant!r}: expected one of {', '.join(VARIANTS)}")
    if variant == "var" and getattr(adapter, "_sinkscope_var_live", None) is None:
        with var(adapter, intervention if isinstance(intervention, VAR) else None):
            return answer_item(adapter, item, variant, mode=mode, chat=chat, intervention=intervention)
    if variant == "tt-register" and not isinstance(intervention, TestTimeRegister):
        raise SinkscopeError("variant tt-register: pass intervention=TestTimeRegister(...) (evaluate finds one)")
    t0 = time.perf_counter()
    image = None if variant == "no-image" else item.image.load()
    extra: dict[str, Any] = {}
    ctx: Any = contextlib.nullcontext()
    token = variant if variant in TOKEN_VARIANTS else None
    if variant in DUAL_VARIANTS:  # the dual connector's route (and the router's decision) for this item
        spec = intervention if isinstance(intervention, DualVariant) else dual_variants(adapter, [variant])[variant]
        plan = plan_item(adapter, spec, image, item.question, min_side=item.min_side)
        extra, ctx, token = dict(plan.record), plan.context(adapter), plan.token_variant
        if token is not None:
            intervention = TokenIntervention(token, rule=dual_projector(adapter).rule)
    with ctx:
        rec = _answer(adapter, item, image, variant, token, mode, chat, intervention, extra)
    rec["seconds"] = round(time.perf_counter() - t0, 4)
    return rec


def _answer(adapter, item, image, variant, token, mode, chat, intervention, extra) -> dict[str, Any]:
    prompt = build_prompt(adapter, image, item.prompt_text(), chat=chat, suffix="", min_side=item.min_side)
    if token is not None:
        spec = intervention if intervention is not None else TokenIntervention(token, rule=default_rule(adapter)[0])
        if spec.variant != token:
            raise SinkscopeError(f"variant {variant!r} asked with an intervention for {spec.variant!r}")
        prompt = intervened(adapter, prompt, spec)
        fed = prompt.fed
        extra = {**extra, "n_visual_fed": int(fed["llm_position"].notna().sum()), "n_sinks": int(fed["is_vit_sink"].sum()), "_fed": fed}
    use_choice = mode == "choice" or (mode == "auto" and item.choices)
    if use_choice:
        if not item.choices:
            raise SinkscopeError(f"item {item.id}: mode 'choice' needs answer choices")
        scores = score_choices(adapter, prompt, item.choices)
        prediction = item.choices[int(np.argmax(scores))]
        score_map = {c: round(float(s), 6) for c, s in zip(item.choices, scores)}
        top = [c for c, s in score_map.items() if s == max(score_map.values())]
        if len(top) > 1:  # equal to the stored precision: the first in list order was taken
            extra, prediction = {**extra, "tie": top}, top[0]
    else:
        prediction, score_map = generate_answer(adapter, prompt), None
    return {
        **item.to_record(),
        "variant": variant,
        "mode": "choice" if use_choice else "generate",
        "prediction": prediction,
        "correct": bool(is_correct(prediction, item.answer, item.choices)),
        "scores": score_map,
        "n_prompt_tokens": prompt.n_tokens,
        **extra,
    }


def _done(path: Path) -> dict[tuple[str, str], dict]:
    """Records already in ``predictions.jsonl`` (a torn last line from a kill is dropped)."""
    out: dict[tuple[str, str], dict] = {}
    if not path.exists():
        return out
    good = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        out[(rec["id"], rec["variant"])] = rec
        good.append(line)
    path.write_text("".join(g + "\n" for g in good), encoding="utf-8")  # rewrite without a torn line
    return out


def results_table(pred: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Accuracy per (variant, task) and per (variant, task type) - ``task`` is ``*`` on the type
    rows and ``task_type`` ``all`` on the overall row - with percentile bootstrap intervals,
    chance (mean of 1 / number of choices; NaN for open questions) and the majority baseline
    (the most frequent answer of each task among the items)."""
    rows = []
    for variant, pv in pred.groupby("variant", sort=False):
        groups = [(t, tt, g) for (t, tt), g in pv.groupby(["task", "task_type"], sort=True)]
        groups += [("*", tt, g) for tt, g in pv.groupby("task_type", sort=True)]
        groups.append(("*", "all", pv))
        for task, ttype, g in groups:
            correct = g["correct"].to_numpy(bool)
            lo, hi = bootstrap_ci(correct, n_boot=n_boot, seed=seed)
            n_choices = g["choices"].map(lambda c: len(c) if isinstance(c, list) and c else np.nan)
            majority = g.groupby("task")["answer"].agg(lambda a: a.value_counts().iloc[0] / len(a))
            sizes = g.groupby("task").size()
            rows.append(
                {
                    "variant": variant,
                    "task": task,
                    "task_type": ttype,
                    "n": int(len(g)),
                    "accuracy": float(correct.mean()),
                    "ci_low": lo,
                    "ci_high": hi,
                    "chance": float(np.nanmean(1.0 / n_choices)) if n_choices.notna().any() else float("nan"),
                    "majority": float((majority * sizes).sum() / sizes.sum()),
                }
            )
    return pd.DataFrame(rows)


def evaluate(
    model: Any,
    tasks: str | list[str] = "shapes",
    out: str | Path | None = None,
    split: str = "test",
    limit: int | None = None,
    variants: tuple[str, ...] | list[str] = ("default",),
    mode: str = "auto",
    chat: bool | str = "auto",
    resume: bool = False,
    overwrite: bool = False,
    device: str | None = None,
    dtype: str | None = None,
    seed: int = 0,
    n_boot: int = 1000,
    sink_rule: Any = None,
    positions: str = "reindex",
    var_config: VAR | dict | None = None,
    tt_config: TestTimeRegister | dict | None = None,
    router: str | Path | None = None,
    progress: bool = True,
) -> EvalResult:
    """Evaluate ``model`` (a name, path or adapter) on ``tasks`` (see
    :func:`~sinkscope.evaluation.items.load_items`; or a list of
    :class:`~sinkscope.evaluation.items.VQAItem`, used as given); write the outputs into ``out``
    when given. ``sink_rule`` (a :class:`~sinkscope.interventions.VisualSinkRule` or its short
    string, e.g. ``"norm:100"``, ``"topk:4"``) and ``positions`` (``reindex`` / ``keep``) set the
    token variants; ``seed`` also seeds ``random-k``; ``var_config`` sets ``var`` (a
    :class:`~sinkscope.interventions.VAR` or its dict). The DIYSink variants
    (:mod:`~sinkscope.evaluation.dual`) need a model with the dual connector; ``rew`` uses
    ``router`` (default: the model folder's ``router/``), and the paired tests then compare with
    ``baseline``."""
    t0 = time.perf_counter()
    if mode not in MODES:
        raise SinkscopeError(f"mode {mode!r}: expected one of {', '.join(MODES)}")
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise SinkscopeError(f"variant {bad[0]!r}: expected one of {', '.join(VARIANTS)}")
    if router is not None and "rew" not in variants:  # before any model loads
        raise SinkscopeError(f"router {router}: only variant rew uses a router, and it is not asked")
    if not isinstance(tasks, str) and tasks and all(isinstance(t, VQAItem) for t in tasks):
        items = limit_items(tasks, limit)  # MME's images whole, and two questions each
        tasks = sorted({it.task for it in items})
    else:
        items = load_items(tasks, split=split, limit=limit)
    settings = _settings(model, tasks, split, limit, variants, mode, chat, seed, sink_rule, positions, var_config, tt_config, router, dtype)
    pred_path = _prepare_out(out, resume, overwrite, settings)
    ad = model if hasattr(model, "model") else load_model(model, device=device, dtype=dtype)
    if not hasattr(ad, "build_inputs"):
        raise SinkscopeError(
            f"model {getattr(ad, 'name', model)!r} is not a vision-language (LLaVA-style) model"
        )
    specs, why = _interventions(ad, variants, sink_rule, positions, seed)
    var_cfg = VAR(**var_config) if isinstance(var_config, dict) else (var_config or VAR())
    if "var" in variants:
        check_dims(ad, var_cfg)
    var_dims: tuple[int, ...] | None = None
    tt_cfg = _tt_config(ad, tt_config) if "tt-register" in variants else None
    done = _done(pred_path) if pred_path is not None and resume else {}
    configs: dict[str, Any] = {**specs, **({"var": var_cfg} if "var" in variants else {})}
    configs.update(dual_variants(ad, variants, router))
    if tt_cfg is not None:
        configs["tt-register"] = tt_cfg
    _check_resumed(done, configs)
    todo = [(it, v) for v in variants for it in items if (it.id, v) not in done]
    if "rew" in configs:  # the questions ReW routes, embedded in batches once
        configs["rew"].prepare([it.question for it, v in todo if v == "rew"])
    records = list(done.values())
    bar = progress_bar(len(todo), progress, f"eval {ad.name}", unit="q")
    t1 = time.perf_counter()
    fed_path = pred_path.with_name("tokens_fed.jsonl") if pred_path is not None else None
    fed_new: list[pd.DataFrame] = []
    with _appender(pred_path) as write, _appender(fed_path) as write_fed, contextlib.ExitStack() as stack:
        for it, v in todo:
            if v != getattr(stack, "variant", None):  # one context per variant, for the whole run
                stack.close()
                stack.variant = v
                if v == "var":
                    var_dims = stack.enter_context(var(ad, var_cfg)).sink_dims
                elif v == "tt-register":
                    stack.enter_context(tt_register(ad, tt_cfg))
            extra = configs.get(v)
            rec = answer_item(ad, it, v, mode=mode, chat=chat, intervention=extra)
            if extra is not None:
                rec["intervention"] = extra.describe()
            fed = rec.pop("_fed", None)
            if fed is not None:
                fed = fed.drop(columns=["rule", "variant", "batch_row"]).assign(id=it.id, variant=v)
                fed_new.append(fed)
                write_fed({"id": it.id, "variant": v, "rows": fed.drop(columns=["id", "variant"]).to_dict(orient="list")})
            records.append(rec)
            write(rec)
            bar.update(1)
    bar.close()
    keep = {(it.id, v) for v in variants for it in items}
    pred = pd.DataFrame([r for r in records if (r["id"], r["variant"]) in keep])
    results = results_table(pred, n_boot=n_boot, seed=seed)
    reference = "baseline" if "baseline" in variants else REFERENCE
    paired = paired_table(pred, n_boot=n_boot, seed=seed, reference=reference)
    summary = _summary(ad, tasks, split, limit, variants, mode, results, pred, len(todo), t0, t1)
    if configs:
        summary["interventions"] = {"paired_with": reference, "paired": paired.to_dict(orient="records")}
    if any(v in DUAL_VARIANTS for v in variants):
        summary["diysink"] = _dual_summary(ad, configs, pred)
    if specs:
        rule = next(iter(specs.values())).rule
        summary["interventions"].update(
            rule=rule.to_dict(), rule_description=rule.describe(), rule_reason=why,
            positions=positions, seed=seed, tokens_fed=_fed_counts(pred),
        )  # fmt: skip
    if tt_cfg is not None:
        summary["tt_register"] = {**tt_cfg.to_dict(), "description": tt_cfg.describe()}
    if "var" in variants:
        summary["var"] = {**var_cfg.to_dict(), "description": var_cfg.describe(), "sink_dims_used": var_dims}
    res = EvalResult(
        pred, results, summary, Path(out) if out is not None else None, timings=summary["timings"]
    )
    res.paired = paired
    res.routing = _routing_table(pred)
    if out is not None:
        write_eval_outputs(res)
        if specs or any(c.token_variant for c in configs.values() if isinstance(c, DualVariant)):
            _write_fed(res.out, fed_path)
        if res.routing is not None:
            res.routing.to_parquet(res.out / "routing.parquet", index=False)
    else:
        res.tokens_fed = pd.concat(fed_new, ignore_index=True) if fed_new else None
    return res


def _routing_table(pred: pd.DataFrame) -> pd.DataFrame | None:
    """One row per routed item (``cot`` / ``rew``): :data:`~sinkscope.evaluation.dual.ROUTING_COLUMNS`."""
    if "route" not in pred.columns:
        return None
    rows = pred[pred["route"].notna()]
    if not len(rows):
        return None
    return rows.reindex(columns=list(ROUTING_COLUMNS)).reset_index(drop=True)


def _dual_summary(ad, configs: dict, pred: pd.DataFrame) -> dict[str, Any]:
    """The connector's rule and history, seconds per question per variant, CoT's routes and
    fallbacks, ReW's mean weights per task type."""
    dual = dual_projector(ad)
    d = dict(getattr(ad.model.config, "diysink", {}) or {})
    out: dict[str, Any] = {
        "rule": dual.rule.to_dict(), "rule_description": dual.rule.describe(), "weights": dual.weights.tolist(),
        "history": d.get("history", []),
        "variants": {v: c.describe() for v, c in configs.items() if isinstance(c, DualVariant)},
    }  # fmt: skip
    if "seconds" in pred.columns:
        out["seconds_per_question"] = {v: round(float(g["seconds"].median()), 4) for v, g in pred.groupby("variant") if g["seconds"].notna().any()}
    for name in ("cot", "cot-score"):
        cot = pred[pred.variant == name]
        if not len(cot):
            continue
        out[name] = {"routes": {str(k): int(n) for k, n in cot["route"].value_counts().items()},
                      "fallbacks": int(cot["fallback"].fillna(False).astype(bool).sum()), "n": len(cot),
                      "routing_s_median": round(float(cot["routing_s"].median()), 4)}  # fmt: skip
    rew = pred[pred.variant == "rew"]
    if len(rew):
        out["rew"] = {"router": configs["rew"].router, "routing_s_median": round(float(rew["routing_s"].median()), 4),
                      "mean_weights": {tt: [round(float(g["w_sink"].mean()), 4), round(float(g["w_nonsink"].mean()), 4)]
                                       for tt, g in rew.groupby("task_type")}}  # fmt: skip
    return out


def _tt_config(ad, given) -> TestTimeRegister:
    """The test-time register of a run: ``given`` (a config or its dict), else the top 10 register
    neurons of ``ad``'s tower on 32 training-split shapes scenes (norm >= 5x the median at the fed layer)."""
    if isinstance(given, TestTimeRegister):
        return given
    if isinstance(given, dict) and given.get("neurons"):
        return TestTimeRegister(**given)
    patches = (given or {}).get("patches", "zero") if isinstance(given, dict) else "zero"
    from ..neurons import register_neurons
    from ..sinks import NormRule
    from . import shapes

    scenes = [np.asarray(shapes.render(shapes.scene(i, "train"))) for i in range(32)]
    found = register_neurons(ad.vision, scenes, detection_layer=ad.feature_layer, rule=NormRule(relative=5.0), progress=False)
    return TestTimeRegister.from_table(found, k=10, patches=patches)


def _interventions(ad, variants, sink_rule, positions, seed) -> tuple[dict[str, TokenIntervention], str | None]:
    """One :class:`TokenIntervention` per token variant asked, and why its rule was chosen."""
    token = [v for v in variants if v in TOKEN_VARIANTS]
    if not token:
        return {}, None
    if sink_rule is None:
        rule, why = default_rule(ad)
    else:
        rule, why = rule_from(sink_rule), "given"
    check_rule(ad, rule)  # a layer past the ViT, or topk:K with every token a sink: one line, before any answer
    return {v: TokenIntervention(v, positions=positions, rule=rule, seed=seed) for v in token}, why


def _check_resumed(done: dict, specs: dict[str, Any]) -> None:
    for (item_id, v), rec in done.items():
        if v in specs and rec.get("intervention") != specs[v].describe():
            raise SinkscopeError(
                f"resumed run answered {item_id!r} under {v} as '{rec.get('intervention')}', "
                f"not '{specs[v].describe()}'; use a new folder for another sink rule or position policy"
            )


def paired_table(pred: pd.DataFrame, n_boot: int = 1000, seed: int = 0, reference: str = REFERENCE) -> pd.DataFrame:
    """Every variant minus ``reference`` on the items both answered, per task type and overall:
    ``diff``, a paired bootstrap interval and McNemar's exact p-value (empty without ``reference``)."""
    cols = ["variant", "task_type", "n", "accuracy", "reference_accuracy", "diff", "ci_low", "ci_high", "p_mcnemar"]
    if reference not in set(pred.get("variant", [])):
        return pd.DataFrame(columns=cols)
    ref = pred[pred.variant == reference].set_index("id")["correct"]
    types = pred.drop_duplicates("id").set_index("id")["task_type"]
    rows = []
    for v, g in pred[pred.variant != reference].groupby("variant", sort=False):
        mine = g.set_index("id")["correct"]
        both = mine.index.intersection(ref.index)
        for tt in sorted(types.loc[both].unique()) + ["all"]:
            ids = both if tt == "all" else both[types.loc[both].to_numpy() == tt]
            a, b = mine.loc[ids].to_numpy(bool), ref.loc[ids].to_numpy(bool)
            d = paired_difference(a, b, n_boot=n_boot, seed=seed)
            rows.append({"variant": v, "task_type": tt, "n": len(ids), "accuracy": float(a.mean()),
                         "reference_accuracy": float(b.mean()), **d})  # fmt: skip
    return pd.DataFrame(rows, columns=cols)


def _fed_counts(pred: pd.DataFrame) -> dict[str, dict[str, float]]:
    if "n_visual_fed" not in pred:
        return {}
    g = pred.dropna(subset=["n_visual_fed"]).groupby("variant")
    return {v: {"mean_visual_tokens": round(float(x.n_visual_fed.mean()), 3),
                "mean_sinks": round(float(x.n_sinks.mean()), 3)} for v, x in g}  # fmt: skip


def _write_fed(out: Path, journal: Path) -> None:
    """Fold the run's ``tokens_fed.jsonl`` journal into ``tokens_fed.parquet`` (kept from earlier
    resumed runs, one row per (item, variant, ViT token)) and remove the journal."""
    parts = []
    old = out / "tokens_fed.parquet"
    if old.exists():
        parts.append(pd.read_parquet(old))
    if journal.exists():
        for line in journal.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line from a kill: that item is asked again
            parts.append(pd.DataFrame(rec["rows"]).assign(id=rec["id"], variant=rec["variant"]))
    if not parts:
        return
    df = pd.concat(parts, ignore_index=True).drop_duplicates(["id", "variant", "image", "vit_token"], keep="last")
    for col in ("row", "col", "llm_position", "position_id"):
        df[col] = df[col].astype("Int64")
    first = ["id", "variant", "image", "vit_token", "row", "col", "norm", "is_vit_sink", "llm_position", "position_id"]
    tmp = out / "tokens_fed.parquet.tmp"
    df[first].to_parquet(tmp, index=False)
    tmp.replace(old)
    journal.unlink(missing_ok=True)


def _prepare_out(out, resume: bool, overwrite: bool, settings: dict | None = None) -> Path | None:
    """Claim ``out`` for this evaluation (:mod:`sinkscope.ownership`: new, empty or an evaluation's
    own folder; a resume must have the same ``settings``) before any model loads; return the path of
    ``predictions.jsonl``. ``overwrite`` (without ``resume``) removes this evaluation's own answers."""
    if out is None:
        return None
    d = Path(out)
    outputs = ownership.OUTPUTS["eval"]
    old = ownership.check(d, "eval", outputs, settings, resume=resume, overwrite=overwrite)
    ours = d / "predictions.jsonl"
    if old is not None and ours.exists() and not (resume or overwrite):
        raise ownership.FolderRefused(
            f"--out {d} holds an earlier evaluation (predictions.jsonl); pass resume=True (--resume) to continue it or --overwrite"
        )
    ownership.claim(d, "eval", outputs, settings, resume=resume, overwrite=overwrite)
    if overwrite and not resume:
        for p in ownership.own_files(d):
            if p.name in ("predictions.jsonl", "tokens_fed.jsonl", "tokens_fed.parquet", "paired.csv", "routing.parquet"):
                p.unlink()
    return ours


def _settings(model, tasks, split, limit, variants, mode, chat, seed, sink_rule, positions, var_config, tt_config, router, dtype) -> dict:
    """The settings an evaluation's answers depend on: a resume must give the same. ``device``
    (the answers agree), ``n_boot`` (the intervals are recomputed from every answer at the end),
    ``out``, ``resume``, ``overwrite`` and ``progress`` only change how the run goes."""
    text = lambda v: v if v is None or isinstance(v, (str, int, float, bool, dict, list)) else str(v)  # noqa: E731
    return {
        "model": getattr(model, "name", None) or str(model),
        "tasks": [tasks] if isinstance(tasks, str) else [str(t) for t in tasks],
        "split": split, "limit": limit, "variants": list(variants), "mode": mode, "chat": chat, "seed": seed,
        "sink_rule": text(sink_rule), "positions": positions, "var": text(var_config), "tt_register": text(tt_config),
        "router": None if router is None else str(router), "dtype": dtype,
    }  # fmt: skip


class _appender:
    """Appends one JSON line per record and flushes it (a kill loses at most the line being written)."""

    def __init__(self, path: Path | None):
        self.path, self.f = path, None

    def __enter__(self):
        if self.path is not None:
            self.f = self.path.open("a", encoding="utf-8")
        return self.write

    def write(self, rec: dict) -> None:
        if self.f is not None:
            self.f.write(json.dumps(rec) + "\n")
            self.f.flush()

    def __exit__(self, *exc):
        if self.f is not None:
            self.f.close()


def _summary(ad, tasks, split, limit, variants, mode, results, pred, n_new, t0, t1) -> dict[str, Any]:
    types = results[results.task == "*"].drop(columns="task")
    summary: dict[str, Any] = {
        "analysis": "eval",
        "model": {"name": ad.name, "projector_trained": getattr(ad, "projector_trained", None)},
        "tasks": tasks if isinstance(tasks, str) else ",".join(tasks),
        "split": split,
        "limit": limit,
        "variants": list(variants),
        "mode": mode,
        "n_items": int(pred["id"].nunique()),
        "ties": {  # choice questions whose top score was shared: the first tied choice was taken
            str(v): int(g["tie"].map(lambda t: isinstance(t, list) and len(t) > 1).sum()) if "tie" in g else 0
            for v, g in pred.groupby("variant", sort=False)
        },
        "by_task_type": types.to_dict(orient="records"),
        "timings": {
            "load_s": round(t1 - t0, 3),
            "answer_s": round(time.perf_counter() - t1, 3),
            "questions_this_run": n_new,
            "s_per_question": round((time.perf_counter() - t1) / max(n_new, 1), 4),
        },
        "versions": package_versions(("sinkscope", "torch", "transformers")),
    }
    # MME's score for MME's items (they carry question_id, the key pairing an image's two questions)
    from_mme = pred["question_id"].notna() if "question_id" in pred else pd.Series(False, index=pred.index)
    mme = pred[from_mme & pred["task"].isin(PERCEPTION + COGNITION)]
    if len(mme):
        summary["mme"] = {
            v: mme_score(g.assign(category=g["task"]).to_dict(orient="records"))
            for v, g in mme.groupby("variant")
        }
    return summary


def write_eval_outputs(res: EvalResult) -> None:
    """``results.csv``, ``paired.csv`` (with token variants) and ``summary.json`` into ``res.out``
    (``predictions.jsonl`` is written as it goes)."""
    assert res.out is not None
    res.results.to_csv(res.out / "results.csv", index=False, float_format="%.6f")
    if res.paired is not None and len(res.paired):
        res.paired.to_csv(res.out / "paired.csv", index=False, float_format="%.6f")
    (res.out / "summary.json").write_text(json.dumps(res.summary, indent=1, default=str))


def load_eval(out: str | Path) -> EvalResult:
    """An evaluation read back from its folder."""
    d = Path(out)
    for name in ("predictions.jsonl", "results.csv", "summary.json"):
        if not (d / name).is_file():
            raise SinkscopeError(f"eval run {d}: {name} is missing (the run did not finish, or the file was moved)")
    try:
        pred = pd.read_json(d / "predictions.jsonl", lines=True)
        summary = json.loads((d / "summary.json").read_text())
        res = EvalResult(pred, pd.read_csv(d / "results.csv"), summary, d)
    except ValueError as e:  # JSONDecodeError, pandas' parse errors
        raise SinkscopeError(f"eval run {d}: a file does not parse ({str(e).splitlines()[0]})") from None
    if (d / "paired.csv").exists():
        res.paired = pd.read_csv(d / "paired.csv")
    if (d / "tokens_fed.parquet").exists():
        res.tokens_fed = pd.read_parquet(d / "tokens_fed.parquet")
    return res


__all__ = [
    "MODES",
    "OUTPUT_FILES",
    "VARIANTS",
    "EvalResult",
    "answer_item",
    "evaluate",
    "load_eval",
    "paired_table",
    "results_table",
    "write_eval_outputs",
]
