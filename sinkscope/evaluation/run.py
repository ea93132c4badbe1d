"""``sinkscope eval``: score a model on VQA items, per task type, per task and per variant.

For every item and variant the model answers one question: by log-likelihood over the item's
``choices`` (multiple choice; ``mode="choice"``), or by greedy generation with exact match after
normalisation (``mode="generate"``; the default for items without choices). Variants:

- ``default``: the model as loaded;
- ``no-image``: the same question with the image removed (the blind baseline of a model that
  answers from the text alone).

Output folder::

    predictions.jsonl   one object per item and variant (appended as it goes: resumable)
    results.csv         accuracy per task and per task type, with bootstrap intervals and chance
    summary.json        settings, the per-type table, baselines and (for MME items) MME's score

A killed run resumes with ``resume=True``: items already in ``predictions.jsonl`` are not asked
again, and no line is duplicated. ``sinkscope.run(EvalConfig(...))`` adds ``eval.html``.

>>> res = evaluate("tiny-llava", "shapes", limit=8, progress=False)
>>> sorted(res.results.task_type.unique())
['all', 'global', 'local', 'mixed']
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .._utils import SinkscopeError, check_out_folder, package_versions, progress_bar
from ..models import load_model
from .items import VQAItem, load_items
from .mme import COGNITION, PERCEPTION, mme_score
from .scoring import build_prompt, generate_answer, is_correct, score_choices
from .stats import bootstrap_ci

VARIANTS = ("default", "no-image")
MODES = ("auto", "choice", "generate")
OUTPUT_FILES = ("predictions.jsonl", "results.csv", "summary.json")


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


def answer_item(
    adapter, item: VQAItem, variant: str = "default", mode: str = "auto", chat: bool | str = "auto"
) -> dict[str, Any]:
    """Ask ``item`` under ``variant``; the prediction record (``prediction``, ``correct``, ``scores``).

    >>> from sinkscope.evaluation.items import load_items
    >>> rec = answer_item(load_model("tiny-llava"), load_items("shapes", limit=1)[0])
    >>> sorted(rec)[:4], len(rec["scores"])
    (['answer', 'choices', 'correct', 'id'], 8)
    """
    if variant not in VARIANTS:
        raise SinkscopeError(f"variant {variant!r}: expected one of {', '.join(VARIANTS)}")
    image = None if variant == "no-image" else item.image.load()
    prompt = build_prompt(adapter, image, item.question, chat=chat, min_side=item.min_side)
    use_choice = mode == "choice" or (mode == "auto" and item.choices)
    if use_choice:
        if not item.choices:
            raise SinkscopeError(f"item {item.id}: mode 'choice' needs answer choices")
        scores = score_choices(adapter, prompt, item.choices)
        prediction = item.choices[int(np.argmax(scores))]
        score_map = {c: round(float(s), 6) for c, s in zip(item.choices, scores)}
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
    progress: bool = True,
) -> EvalResult:
    """Evaluate ``model`` (a name, path or adapter) on ``tasks`` (see
    :func:`~sinkscope.evaluation.items.load_items`; or a list of
    :class:`~sinkscope.evaluation.items.VQAItem`, used as given); write the outputs into ``out``
    when given."""
    t0 = time.perf_counter()
    if mode not in MODES:
        raise SinkscopeError(f"mode {mode!r}: expected one of {', '.join(MODES)}")
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise SinkscopeError(f"variant {bad[0]!r}: expected one of {', '.join(VARIANTS)}")
    if not isinstance(tasks, str) and tasks and all(isinstance(t, VQAItem) for t in tasks):
        items = list(tasks)[:limit] if limit else list(tasks)
        tasks = sorted({it.task for it in items})
    else:
        items = load_items(tasks, split=split, limit=limit)
    pred_path = _prepare_out(out, resume, overwrite)
    ad = model if hasattr(model, "model") else load_model(model, device=device, dtype=dtype)
    if not hasattr(ad, "build_inputs"):
        raise SinkscopeError(
            f"model {getattr(ad, 'name', model)!r} is not a vision-language (LLaVA-style) model"
        )
    done = _done(pred_path) if pred_path is not None and resume else {}
    todo = [(it, v) for v in variants for it in items if (it.id, v) not in done]
    records = list(done.values())
    bar = progress_bar(len(todo), progress, f"eval {ad.name}", unit="q")
    t1 = time.perf_counter()
    with _appender(pred_path) as write:
        for it, v in todo:
            rec = answer_item(ad, it, v, mode=mode, chat=chat)
            records.append(rec)
            write(rec)
            bar.update(1)
    bar.close()
    keep = {(it.id, v) for v in variants for it in items}
    pred = pd.DataFrame([r for r in records if (r["id"], r["variant"]) in keep])
    results = results_table(pred, n_boot=n_boot, seed=seed)
    summary = _summary(ad, tasks, split, limit, variants, mode, results, pred, len(todo), t0, t1)
    res = EvalResult(
        pred, results, summary, Path(out) if out is not None else None, timings=summary["timings"]
    )
    if out is not None:
        write_eval_outputs(res)
    return res


def _prepare_out(out, resume: bool, overwrite: bool) -> Path | None:
    if out is None:
        return None
    d = Path(out)
    check_out_folder(d)
    theirs = (
        [p.name for p in d.iterdir() if p.name not in OUTPUT_FILES + ("config.json", "eval.html")]
        if d.is_dir()
        else []
    )
    if theirs and not overwrite:
        raise SinkscopeError(
            f"{d} holds files that are not an evaluation's ({', '.join(sorted(theirs)[:3])}); choose a new folder"
        )
    ours = d / "predictions.jsonl"
    if ours.exists() and not (resume or overwrite):
        raise SinkscopeError(
            f"{d} holds an earlier evaluation; pass resume=True (--resume) to continue it or overwrite=True"
        )
    d.mkdir(parents=True, exist_ok=True)
    if overwrite and not resume and ours.exists():
        ours.unlink()
    return ours


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
        "by_task_type": types.to_dict(orient="records"),
        "timings": {
            "load_s": round(t1 - t0, 3),
            "answer_s": round(time.perf_counter() - t1, 3),
            "questions_this_run": n_new,
            "s_per_question": round((time.perf_counter() - t1) / max(n_new, 1), 4),
        },
        "versions": package_versions(("sinkscope", "torch", "transformers")),
    }
    # MME's score for items from MME (the hub set or a manifest named like it) in its categories
    from_mme = pred["source"].astype(str).str.contains("mme", case=False)
    mme = pred[from_mme & pred["task"].isin(PERCEPTION + COGNITION)]
    if len(mme):
        summary["mme"] = {
            v: mme_score(g.assign(category=g["task"]).to_dict(orient="records"))
            for v, g in mme.groupby("variant")
        }
    return summary


def write_eval_outputs(res: EvalResult) -> None:
    """``results.csv`` and ``summary.json`` into ``res.out`` (``predictions.jsonl`` is written as it goes)."""
    assert res.out is not None
    res.results.to_csv(res.out / "results.csv", index=False, float_format="%.6f")
    (res.out / "summary.json").write_text(json.dumps(res.summary, indent=1, default=str))


def load_eval(out: str | Path) -> EvalResult:
    """An evaluation read back from its folder."""
    d = Path(out)
    pred = pd.read_json(d / "predictions.jsonl", lines=True)
    return EvalResult(pred, pd.read_csv(d / "results.csv"), json.loads((d / "summary.json").read_text()), d)


__all__ = [
    "MODES",
    "OUTPUT_FILES",
    "VARIANTS",
    "EvalResult",
    "answer_item",
    "evaluate",
    "load_eval",
    "results_table",
    "write_eval_outputs",
]
