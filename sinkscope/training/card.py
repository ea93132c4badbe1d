"""The model card of the projector (and LoRA adapters) that ships with ``mini-llava``.

``make mini-llava`` trains stage 1 and stage 2 into ``runs/mini-llava/`` and then runs
``python -m sinkscope.training.card runs/mini-llava``, which

1. copies ``vqa/projector.safetensors`` (and ``vqa/lora.safetensors``) into
   ``sinkscope/models/weights/`` (where ``load_model("mini-llava")`` finds them),
2. evaluates the trained model (``default`` and ``no-image`` variants) and ``mini-llava-untrained``
   on the **test** split (:data:`TEST_LIMITS` items per set), and the stage-2 snapshots on the
   **validation** split (the learning curve),
3. writes the card, ``sinkscope/models/weights/mini_llava_card.json``: data, steps, time, the
   accuracies per task type and per task with their baselines, the learning curve, and the
   accuracy on :func:`fixed_subset` (which a slow test reproduces from the shipped weights).

Nothing here is fitted to the test split: the card only reads it.

>>> sorted(TEST_LIMITS)
['digits', 'lfw-faces', 'shapes', 'textile']
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd

from ..evaluation.items import VQAItem, load_items
from ..evaluation.run import evaluate
from ..models.mini_llava import SELECT_STRATEGY, SHIPPED_LORA, SHIPPED_PROJECTOR, build_mini_llava

#: test items per set (``--limit``): 30 per shapes task, 60 per real set (30 per textile task)
TEST_LIMITS = {"shapes": 240, "textile": 60, "lfw-faces": 60, "digits": 60}
#: validation items per set for each point of the learning curve (the targets are on shapes)
CURVE_LIMITS = {"shapes": 64}
CARD = SHIPPED_PROJECTOR.with_name("mini_llava_card.json")
#: the first ``FIXED_PER_SET`` test items of every set: the subset the shipped weights must reproduce
FIXED_PER_SET = {"shapes": 48, "textile": 16, "lfw-faces": 8, "digits": 8}


def _items(limits: dict[str, int], split: str) -> list[VQAItem]:
    return [it for name, n in limits.items() for it in load_items(name, split=split, limit=n)]


def fixed_subset() -> list[VQAItem]:
    """The test items whose accuracy the card records for the reproduction test (80 questions).

    >>> len(fixed_subset()), sorted({i.task_type for i in fixed_subset()})
    (80, ['global', 'local', 'mixed'])
    """
    return _items(FIXED_PER_SET, "test")


def by_type(results: pd.DataFrame, variant: str = "default") -> dict[str, Any]:
    """``{task or task type: {n, accuracy, ci, chance, majority}}`` from an eval's ``results``.

    >>> t = pd.DataFrame([dict(variant="default", task="*", task_type="all", n=4, accuracy=0.5,
    ...                        ci_low=0.0, ci_high=1.0, chance=0.5, majority=0.75)])
    >>> by_type(t)["all"]["accuracy"]
    0.5
    """
    out = {}
    for _, r in results[results.variant == variant].iterrows():
        key = r.task_type if r.task == "*" else r.task
        out[key] = {
            "n": int(r.n),
            "accuracy": round(float(r.accuracy), 4),
            "ci": [round(float(r.ci_low), 4), round(float(r.ci_high), 4)],
            "chance": None if pd.isna(r.chance) else round(float(r.chance), 4),
            "majority": round(float(r.majority), 4),
        }
    return out


def _curve(runs: Path, progress: bool) -> list[dict[str, Any]]:
    """Validation accuracy per task type of every stage-2 snapshot (:data:`CURVE_LIMITS` items)."""
    items = _items(CURVE_LIMITS, "validation")
    log = {r["step"]: r for r in map(json.loads, (runs / "vqa" / "train_log.jsonl").read_text().splitlines())}
    points = sorted((runs / "vqa" / "snapshots").glob("projector-step-*.safetensors"))
    rows = []
    for proj in points:
        step = int(proj.stem.rsplit("-", 1)[1])
        if step not in log:  # a snapshot past the step the run stopped after
            continue
        lora = proj.with_name(proj.name.replace("projector-", "lora-"))
        ad = build_mini_llava(projector=proj, lora=lora if lora.exists() else None, name=f"mini-llava@{step}")
        res = evaluate(ad, items, out=runs / "curve" / f"step-{step:06d}", resume=True, progress=progress)
        acc = {k: v["accuracy"] for k, v in by_type(res.results).items() if k in ("global", "local", "mixed", "all")}
        rows.append({"step": step, "conversations_seen": log[step]["seen"], **acc})
    return rows


def train_seconds(log: list[dict[str, Any]]) -> float:
    """Wall time of a training log whose clock restarts at every resume (sum of each segment).

    >>> train_seconds([{"s": 1.0}, {"s": 2.0}, {"s": 0.5}, {"s": 1.5}])
    3.5
    """
    total, last = 0.0, 0.0
    for r in log:
        if r["s"] < last:
            total += last
        last = r["s"]
    return round(total + last, 1)


def write_card(runs: str | Path, progress: bool = True) -> dict[str, Any]:
    """Install ``runs``'s stage-2 weights into the package and write :data:`CARD` (see above)."""
    runs = Path(runs)
    t0 = time.perf_counter()
    SHIPPED_PROJECTOR.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(runs / "vqa" / "projector.safetensors", SHIPPED_PROJECTOR)
    lora = runs / "vqa" / "lora.safetensors"
    if lora.exists():
        shutil.copy(lora, SHIPPED_LORA)
    else:
        SHIPPED_LORA.unlink(missing_ok=True)
    align = json.loads((runs / "align" / "summary.json").read_text())
    vqa = json.loads((runs / "vqa" / "summary.json").read_text())
    for stage, summ in (("align", align), ("vqa", vqa)):
        lines = (runs / stage / "train_log.jsonl").read_text().splitlines()
        summ["seconds"] = train_seconds([json.loads(x) for x in lines if x.strip()])
    test = _items(TEST_LIMITS, "test")
    trained = build_mini_llava(projector=SHIPPED_PROJECTOR, lora=SHIPPED_LORA if lora.exists() else None)
    res = evaluate(trained, test, variants=("default", "no-image"), out=runs / "eval-trained", resume=True, progress=progress)
    base = evaluate("mini-llava-untrained", test, out=runs / "eval-untrained", resume=True, progress=progress)
    fixed_ids = {i.id for i in fixed_subset()}
    pred = res.predictions[(res.predictions.variant == "default") & res.predictions.id.isin(fixed_ids)]
    keep = ("steps", "batch_size", "lr", "sequences_seen", "final_loss", "seconds", "examples", "mixed_precision")
    keep2 = (*keep, "stopped_at", "turns", "n_per_task", "real", "lora")
    card = {
        "model": "mini-llava",
        "weights": [SHIPPED_PROJECTOR.name] + ([SHIPPED_LORA.name] if lora.exists() else []),
        "regenerate": "make mini-llava",
        "seed": vqa["seed"],
        "frozen": "DINOv2-S (hidden_states[-2], 256 patch tokens) and SmolLM2-135M-Instruct's own weights",
        "stage1_align": {k: align.get(k) for k in keep},
        "stage2_vqa": {k: vqa.get(k) for k in keep2},
        "data": "training splits only: stage 1, captions of shapes scenes; stage 2, shapes questions "
        "(answers balanced per task, up to `turns` per scene) and at most 150 questions of each real set",
        "test_items": TEST_LIMITS,
        "test": {
            "trained": by_type(res.results),
            "image_removed": by_type(res.results, "no-image"),
            "untrained": by_type(base.results),
        },
        "learning_curve_validation": _curve(runs, progress),
        "fixed_subset": {
            "per_set": FIXED_PER_SET,
            "n": len(pred),
            "accuracy": round(float(pred.correct.mean()), 4),
        },
        "card_seconds": round(time.perf_counter() - t0, 1),
    }
    CARD.write_text(json.dumps(card, indent=1) + "\n")
    return card


# -- training in chunks (issue 26): each chunk goes on from the weights the last one left ----------

#: validation items a chunk is scored on (20 per shapes task): the shipping decision reads these
CHUNK_LIMITS = {"shapes": 160}
#: where a chunk's weights go when they do not ship: the next chunk goes on from them
CANDIDATE_PROJECTOR = SHIPPED_PROJECTOR.with_name("mini_llava_candidate_projector.safetensors")
CANDIDATE_LORA = SHIPPED_PROJECTOR.with_name("mini_llava_candidate_lora.safetensors")
TYPES = ("global", "local", "mixed", "all")


def validation_scores(projector: str | Path, lora: str | Path | None, out: Path, progress: bool = True) -> dict[str, Any]:
    """Accuracy per task type (and ``n``) of mini-llava with these weights on :data:`CHUNK_LIMITS`
    validation items (the model's default variant; CLS and patches fed)."""
    ad = build_mini_llava(projector=projector, lora=lora, name="mini-llava@chunk")
    res = evaluate(ad, _items(CHUNK_LIMITS, "validation"), out=out, resume=True, progress=progress)
    table = by_type(res.results)
    return {t: table[t]["accuracy"] for t in TYPES if t in table} | {"n": table["all"]["n"]}


def should_ship(new: dict[str, Any], old: dict[str, Any] | None) -> bool:
    """A chunk ships when its validation accuracy went up: ``all`` higher and no task type lower.

    >>> should_ship({"global": .6, "local": .5, "mixed": .5, "all": .53}, {"global": .6, "local": .4, "mixed": .5, "all": .5})
    True
    >>> should_ship({"global": .7, "local": .3, "mixed": .6, "all": .55}, {"global": .6, "local": .4, "mixed": .5, "all": .5})
    False
    """
    if old is None:
        return True
    return new["all"] > old["all"] and all(new[t] >= old[t] for t in ("global", "local", "mixed"))


def start_weights() -> tuple[Path, Path | None, str]:
    """The projector and LoRA file the next chunk goes on from (the last chunk's, shipped or a
    candidate) and which they are.

    >>> start_weights()[2] in ("shipped", "candidate")
    True
    """
    if CANDIDATE_PROJECTOR.exists():
        return CANDIDATE_PROJECTOR, CANDIDATE_LORA if CANDIDATE_LORA.exists() else None, "candidate"
    return SHIPPED_PROJECTOR, SHIPPED_LORA if SHIPPED_LORA.exists() else None, "shipped"


def add_chunk(run: str | Path, progress: bool = True) -> dict[str, Any]:
    """Score the chunk trained into ``run`` (a ``train-projector`` run that started from
    :func:`start_weights`) on the validation items, append it to the card's
    ``learning_curve_chunks`` and install its weights: as the shipped ones when
    :func:`should_ship` says the validation accuracy went up (then the card's ``fixed_subset`` is
    re-measured, so the reproduction test follows), else as the candidate the next chunk goes on
    from. The first chunk also scores the weights it started from (``chunk 0``), so the curve
    starts where training did. Returns the chunk's record."""
    run = Path(run)
    card = json.loads(CARD.read_text())
    summary = json.loads((run / "config.json").read_text()) | json.loads((run / "summary.json").read_text())
    lines = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines() if x.strip()]
    curve = card.setdefault("learning_curve_chunks", [])
    if not curve:
        proj, lora, _ = start_weights()
        before = validation_scores(proj, lora, run.parent / "chunk-00-validation", progress)
        curve.append({
            "chunk": 0, "what": "the weights shipped before issue 26 (stage 2: 2400 conversations, patches only), "
            "scored with CLS and patches fed", "conversations_total": card.get("stage2_vqa", {}).get("sequences_seen"),
            "validation": before, "shipped": True,
        })  # fmt: skip
    last_shipped = next(c["validation"] for c in reversed(curve) if c["shipped"])
    scores = validation_scores(run / "projector.safetensors", _maybe(run / "lora.safetensors"), run / "validation", progress)
    ship = should_ship(scores, last_shipped)
    seen = lines[-1]["seen"] if lines else 0
    rec = {
        "chunk": curve[-1]["chunk"] + 1,
        "from": Path(summary.get("init") or "").name or None,
        "steps": summary["steps"], "stopped_at": summary.get("stopped_at"), "batch_size": summary["batch_size"],
        "lr": summary["lr"], "lora_lr": summary.get("lora_lr"), "seed": summary["seed"],
        "styles": summary.get("styles", False), "mixed_precision": summary.get("mixed_precision"),
        "conversations": seen, "conversations_total": (curve[-1].get("conversations_total") or 0) + seen,
        "train_seconds": train_seconds(lines), "final_loss": summary.get("final_loss"),
        "validation": scores, "shipped": ship, "date": time.strftime("%Y-%m-%d"),
    }  # fmt: skip
    dest = (SHIPPED_PROJECTOR, SHIPPED_LORA) if ship else (CANDIDATE_PROJECTOR, CANDIDATE_LORA)
    shutil.copy(run / "projector.safetensors", dest[0])
    if (run / "lora.safetensors").exists():
        shutil.copy(run / "lora.safetensors", dest[1])
    if ship:
        CANDIDATE_PROJECTOR.unlink(missing_ok=True)
        CANDIDATE_LORA.unlink(missing_ok=True)
    if ship or card["fixed_subset"].get("select_strategy") != SELECT_STRATEGY:  # the shipped model's own number
        res = evaluate(build_mini_llava(projector=SHIPPED_PROJECTOR, lora=_maybe(SHIPPED_LORA)), fixed_subset(),
                       out=run / "fixed-subset", resume=True, progress=progress)  # fmt: skip
        pred = res.predictions
        card["fixed_subset"] = {"per_set": FIXED_PER_SET, "n": len(pred), "accuracy": round(float(pred.correct.mean()), 4),
                                "select_strategy": SELECT_STRATEGY, "weights_of_chunk": max(c["chunk"] for c in curve + [rec] if c["shipped"])}  # fmt: skip
    curve.append(rec)
    card["regenerate_chunk"] = "make mini-llava-chunk CHUNK=N (goes on from the shipped or the candidate weights)"
    card["select_strategy"] = SELECT_STRATEGY
    CARD.write_text(json.dumps(card, indent=1) + "\n")
    return rec


def _maybe(p: Path) -> Path | None:
    return p if p.exists() else None


if __name__ == "__main__":  # pragma: no cover - `make mini-llava` / `make mini-llava-chunk`
    if len(sys.argv) > 2 and sys.argv[1] == "chunk":
        print(json.dumps(add_chunk(sys.argv[2]), indent=1))
    elif len(sys.argv) > 1 and sys.argv[1] == "start":
        print(" ".join(f"--{opt} {p}" for opt, p in zip(("init", "init-lora"), start_weights()[:2]) if p))
    else:
        c = write_card(sys.argv[1] if len(sys.argv) > 1 else "runs/mini-llava")
        print(json.dumps({k: c["test"][k].get("all") for k in c["test"]}, indent=1))
