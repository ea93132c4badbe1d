"""Benchmark: the evaluation harness and projector training (issue 12).

1. **Multiple-choice scoring** on ``shapes`` items (8 colours, 6 counts, 3 kinds, yes/no):
   ``cached`` - :func:`sinkscope.evaluation.scoring.score_choices`, one prompt forward and each
   candidate's later tokens on the cached prompt - against ``direct`` - one full forward of prompt +
   candidate per candidate (:func:`~sinkscope.evaluation.scoring.score_choices_direct`). The scores
   are compared first (to ``--tol``), then timed, interleaved, medians.
2. **A training epoch** over ``--images`` conversations: ``cached`` - tower features from a
   :class:`~sinkscope.training.features.FeatureCache` filled beforehand (what ``train-projector``
   does) - against ``tower`` - the vision tower recomputed for every step; projector forward and
   backward through the frozen LLM in both. Interleaved, medians.

    .venv/bin/python benchmarks/bench_eval.py [--model mini-llava] [--items 16] [--images 8]
        [--repeats 3] [--out benchmarks/results/eval.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def bench_scoring(ad, n_items: int, repeats: int, tol: float) -> dict:
    from sinkscope.evaluation.items import load_items
    from sinkscope.evaluation.scoring import build_prompt, score_choices, score_choices_direct

    items = load_items("shapes", split="test", limit=n_items)
    prompts = [(build_prompt(ad, it.image.load(), it.question), it.choices) for it in items]
    worst = max(
        float(np.abs(score_choices(ad, p, c) - score_choices_direct(ad, p, c)).max()) for p, c in prompts
    )
    if worst > tol:
        raise SystemExit(f"cached and direct scores differ by {worst:g} > {tol:g}")
    times: dict[str, list[float]] = {"cached": [], "direct": []}
    for _ in range(repeats):
        for name, fn in (("cached", score_choices), ("direct", score_choices_direct)):
            t = time.perf_counter()
            for p, c in prompts:
                fn(ad, p, c)
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "items": len(items),
        "candidates": sum(len(c) for _, c in prompts),
        "max_abs_diff": worst,
        "median_s": med,
        "speedup": med["direct"] / med["cached"],
    }


def bench_training(ad, n_images: int, repeats: int) -> dict:
    from sinkscope.training import projector as P
    from sinkscope.training.examples import encode, vqa_examples
    from sinkscope.training.features import FeatureCache, tower_features

    exs = vqa_examples(n_per_task=max(2, n_images), turns=4, real=())[:n_images]
    proj = P._projector(ad.model)
    for p in ad.model.parameters():
        p.requires_grad_(False)
    for p in proj.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(proj.parameters(), lr=1e-4)
    with tempfile.TemporaryDirectory() as tmp:
        cache = FeatureCache(ad, Path(tmp) / "features")
        t = time.perf_counter()
        cache.ensure([e.image for e in exs], progress=False)
        fill_s = time.perf_counter() - t

        def epoch(from_cache: bool) -> float:
            t0 = time.perf_counter()
            for k in range(0, len(exs), 2):
                part = exs[k : k + 2]
                feats = (
                    [cache.get(e.image.name) for e in part]
                    if from_cache
                    else list(tower_features(ad, [e.image.load() for e in part]))
                )
                batch = [(*encode(ad, e, f.shape[0]), f) for e, f in zip(part, feats)]
                P._step_loss(ad.model, proj, batch, ad.image_token_id).backward()
                opt.zero_grad()
            return time.perf_counter() - t0

        times: dict[str, list[float]] = {"cached": [], "tower": []}
        for _ in range(repeats):
            times["cached"].append(epoch(True))
            times["tower"].append(epoch(False))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"images": len(exs), "cache_fill_s": fill_s, "median_s": med, "speedup": med["tower"] / med["cached"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mini-llava")
    ap.add_argument("--items", type=int, default=16)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--out", default="benchmarks/results/eval.json")
    a = ap.parse_args()
    from sinkscope import load_model

    ad = load_model(a.model)
    res = {
        "model": a.model,
        "machine": {"cpu_count": torch.get_num_threads(), "platform": platform.platform()},
        "scoring": bench_scoring(ad, a.items, a.repeats, a.tol),
        "training": bench_training(ad, a.images, a.repeats),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    s, t = res["scoring"], res["training"]
    print(f"scoring  {s['items']} items, {s['candidates']} candidates: cached {s['median_s']['cached']:.2f} s, "
          f"direct {s['median_s']['direct']:.2f} s -> {s['speedup']:.1f}x (max |diff| {s['max_abs_diff']:.1e})")
    print(f"training {t['images']} conversations: cached features {t['median_s']['cached']:.2f} s, "
          f"tower each step {t['median_s']['tower']:.2f} s -> {t['speedup']:.1f}x (cache filled in {t['cache_fill_s']:.1f} s)")


if __name__ == "__main__":
    main()
