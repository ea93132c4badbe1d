"""Benchmark: `sinkscope probe`'s fitting against a plain per-layer scikit-learn loop.

Same stored features (dinov2-small on a seeded subset of the `textile` set, all 13 layers,
groups cls / mean / random), same outer splits, same C grid. Interleaved repeats, medians.

- ``sinkscope``: :func:`sinkscope.probing.run_probes` - every (layer, group) with one set of
  image-grouped stratified splits, inner grouped C selection with warm starts along the C path,
  a label-shuffle control per fold, parallel over (layer, group) on all cores.
- ``sklearn_loop``: what one writes by hand - for each layer and group,
  ``cross_val_score(make_pipeline(StandardScaler(), LogisticRegressionCV(Cs, cv=3)), X, y, cv=splits)``,
  sequentially, with no shuffle control (so it does less work).

Accuracies must agree within 0.01 for every (layer, group), else the script reports it.

    .venv/bin/python benchmarks/bench_probe.py [--images 600] [--repeats 3] [--out benchmarks/results/probe.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegressionCV
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from sinkscope import load_model
from sinkscope.data import load_dataset
from sinkscope.probing import DEFAULT_CS, extract_group_features, outer_splits, run_probes

GROUPS = ("cls", "mean", "random")


def sklearn_loop(feats, splits, y, Cs):
    acc = {}
    for layer in feats.layers:
        for g in GROUPS:
            X = feats.x[(layer, g)]
            pipe = make_pipeline(
                StandardScaler(),
                LogisticRegressionCV(
                    Cs=list(Cs), cv=StratifiedKFold(3), max_iter=2000, tol=1e-4, scoring="accuracy"
                ),
            )
            acc[(layer, g)] = float(np.mean(cross_val_score(pipe, X, y, cv=splits)))
    return acc


def main():
    warnings.simplefilter("ignore", FutureWarning)  # sklearn 1.9 announces LogisticRegressionCV changes
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/probe.json")
    a = ap.parse_args()

    t0 = time.perf_counter()
    data = load_dataset("textile").subsample(a.images, a.seed)
    feats = extract_group_features(
        load_model("dinov2-small"), data, "all", GROUPS, seed=a.seed, progress=True
    )
    t_feat = time.perf_counter() - t0
    print(
        f"features: {len(feats.names)} images x {len(feats.layers)} layers x {len(GROUPS)} groups "
        f"({'cached' if feats.meta.get('cached') else f'{t_feat:.1f} s'})"
    )
    y = feats.labels["label"].to_numpy()
    splits = outer_splits(y, np.arange(len(y)), a.folds, a.seed)

    times = {"sinkscope": [], "sklearn_loop": []}
    results = {}
    for r in range(a.repeats):
        order = ["sinkscope", "sklearn_loop"] if r % 2 == 0 else ["sklearn_loop", "sinkscope"]
        for m in order:
            t = time.perf_counter()
            if m == "sinkscope":
                table = run_probes(feats, labels=["label"], groups=list(GROUPS), folds=a.folds, seed=a.seed)
                results[m] = {(int(r_.layer), r_.group): float(r_.accuracy) for r_ in table.itertuples()}
            else:
                results[m] = sklearn_loop(feats, splits, y, DEFAULT_CS)
            times[m].append(time.perf_counter() - t)
            print(f"repeat {r}: {m:13s} {times[m][-1]:.1f} s")
    med = {m: statistics.median(v) for m, v in times.items()}
    diffs = {
        f"{k[0]}/{k[1]}": results["sinkscope"][k] - results["sklearn_loop"][k]
        for k in results["sklearn_loop"]
    }
    worst = max(abs(d) for d in diffs.values())
    ratio = med["sinkscope"] / med["sklearn_loop"]
    print(
        f"\nmedian: sinkscope {med['sinkscope']:.1f} s, plain sklearn loop {med['sklearn_loop']:.1f} s, "
        f"ratio {ratio:.2f}x ({'faster' if ratio < 1 else 'SLOWER'})"
    )
    print(
        f"largest accuracy difference over {len(diffs)} (layer, group): {worst:.4f} "
        f"({'within' if worst <= 0.01 else 'OUTSIDE'} 0.01)"
    )
    best = {g: max(results["sinkscope"][(layer, g)] for layer in feats.layers) for g in GROUPS}
    print("best accuracy per group:", {g: round(v, 3) for g, v in best.items()})
    out = {
        "images": len(feats.names),
        "layers": feats.layers,
        "groups": list(GROUPS),
        "folds": a.folds,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "median_s": med,
        "raw_s": times,
        "ratio_sinkscope_over_sklearn": ratio,
        "max_abs_accuracy_diff": worst,
        "accuracy_sinkscope": {f"{k[0]}/{k[1]}": v for k, v in results["sinkscope"].items()},
        "accuracy_diff": diffs,
        "best_accuracy": best,
        "note": "the sinkscope row also fits a label-shuffle control per fold; the plain loop does not",
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
