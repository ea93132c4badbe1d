"""Benchmark: attention knockout (Zhang et al.) - the fast route against one full forward per window.

mini-llava (real DINOv2-S + untrained projector + real SmolLM2-135M, 30 LLM layers), one embedded
photo and the default flow question, the five source -> target pairs of ``sinkscope flow``
(image -> question, image / ViT sinks / non-sinks / question -> last), window 9, one window
centred on every LLM layer (clipped at the edges); interleaved repeats, medians:

- ``fast``: :func:`sinkscope.flow.knockout.knockout_pairs` (``method="fast"``) - one unblocked run
  records every decoder layer's input, call arguments and keys/values; each window reruns only
  layers ``start..L-1`` on the positions from the first target on, windows and pairs batched;
- ``reference``: the same windows and pairs, one full forward of the model per window with
  :func:`~sinkscope.flow.knockout.blocked_edges` (the route knockout used before; ``method="reference"``);
- ``old_default`` (``--old``): what ``sinkscope flow`` ran before issue 9 item 5 - windows starting at
  layers 0..L-9 (22 windows), "question" including the last position, one full forward per window.

The fast and reference tables are compared first (every repeat): ``p_answer``, ``p_base`` and
``delta`` must agree to ``--tol`` (1e-5), otherwise the script aborts. ``--flow`` also runs the
default ``sinkscope flow`` once (in-process, ``run_flow``) and reports its wall time and per-analysis
timings (``--flow-skip attribution`` leaves an analysis out).

    .venv/bin/python benchmarks/bench_knockout.py [--repeats 3] [--stride 1] [--old] [--flow]
        [--flow-skip attribution] [--out benchmarks/results/knockout.json]

Measured 2026-11-29 (2 vCPU shared with other agents' jobs; torch 2.13 CPU, transformers 5.24;
265 tokens; 3 pairs ran, the ViT-sink pairs being empty at the default rule): window 9 on every
layer, 2 interleaved repeats (load average ~2): fast 1.14 s, reference 64.7 s (57x), tables equal
to 3.5e-6; the same at load average 4-6: fast 27.7 s, reference 1096 s (one repeat, 40x);
``--stride 3``, 2 repeats: 14.0 s vs 168 s (12x, the fast route's fixed unblocked run weighs more).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

PROMPT = "What is the main object in the image?"  # run_flow's default prompt
PAIRS = [
    ("image", "question"),
    ("image", "last"),
    ("vit_sinks", "last"),
    ("nonsinks", "last"),
    ("question", "last"),
]


def _setup():
    from sinkscope import load_model
    from sinkscope.data import sample_images
    from sinkscope.flow.propagation import propagation
    from sinkscope.sinks import NormRule

    ad = load_model("mini-llava")
    img = sample_images(1)[0].load()
    prop = propagation(ad, [img], PROMPT, vit_rule=NormRule(relative=5.0))  # run_flow's default rule
    vt = prop.visual_tokens
    inp = ad.build_inputs([img], PROMPT)
    kw = {k: inp[k] for k in ("input_ids", "attention_mask")}
    kw["pixel_values"] = inp["pixel_values"].to(ad.dtype)
    seq = int(kw["input_ids"].shape[1])
    img_pos = vt.llm_position.tolist()
    groups = {
        "image": img_pos,
        "vit_sinks": vt[vt.is_vit_sink].llm_position.tolist(),
        "nonsinks": vt[~vt.is_vit_sink].llm_position.tolist(),
        "question": list(range(max(img_pos) + 1, seq - 1)),
        "last": [seq - 1],
    }
    # as sinkscope flow: no empty group, and no "nonsinks" pair when it equals "image" (no ViT sink)
    pairs = [(s, t) for s, t in PAIRS if groups[s] and groups[t] and (s != "nonsinks" or groups["vit_sinks"])]
    return ad, kw, groups, pairs


def old_default(run, lm, groups, pairs, window=9):
    """The knockout of ``sinkscope flow`` before this change: windows starting at 0..L-window,
    "question" up to and including the last position, one full forward per window."""
    from sinkscope.flow.knockout import _last_probs, blocked_edges

    seq = groups["last"][0] + 1
    old_groups = dict(groups, question=list(range(max(groups["image"]) + 1, seq)))
    base = _last_probs(run)
    ans = int(base.argmax())
    out = []
    for s, t in pairs:
        ps = []
        for start in range(0, lm.n_layers - window + 1):
            with blocked_edges(lm, range(start, start + window), old_groups[s], old_groups[t]):
                ps.append(float(_last_probs(run)[ans]))
        out.append(ps)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--window", type=int, default=9)
    ap.add_argument(
        "--stride", type=int, default=1, help="step between window centres (default: every layer)"
    )
    ap.add_argument("--tol", type=float, default=1e-5)
    ap.add_argument(
        "--old", action="store_true", help="also time the old default (22 windows, full forwards)"
    )
    ap.add_argument("--flow", action="store_true", help="also time the default `sinkscope flow` once")
    ap.add_argument(
        "--flow-skip",
        action="append",
        default=[],
        help="leave an analysis out of the --flow run (repeatable; e.g. attribution)",
    )
    ap.add_argument("--out", default="benchmarks/results/knockout.json")
    a = ap.parse_args()
    from sinkscope.flow.knockout import knockout_pairs

    ad, kw, groups, pairs = _setup()
    head = ad.model.get_output_embeddings()
    run = lambda: ad.model(**kw)  # noqa: E731
    idx = [(groups[s], groups[t]) for s, t in pairs]
    seq = int(kw["input_ids"].shape[1])

    def fast():
        return knockout_pairs(run, ad.llm, idx, a.window, stride=a.stride, head=head, method="fast")

    def reference():
        return knockout_pairs(run, ad.llm, idx, a.window, stride=a.stride, head=head, method="reference")

    methods = {"fast": fast, "reference": reference}
    if a.old:
        methods["old_default"] = lambda: old_default(run, ad.llm, groups, pairs, a.window)
    errs = []
    with torch.no_grad():
        fast()  # warm-up: imports, allocator pools, eager attention's first call
        run()
        times = {k: [] for k in methods}
        names = list(methods)
        for r in range(a.repeats):
            order = names[r % len(names) :] + names[: r % len(names)]
            res = {}
            for k in order:
                t = time.perf_counter()
                res[k] = methods[k]()
                times[k].append(time.perf_counter() - t)
                print(f"  repeat {r + 1}: {k:12s} {times[k][-1]:8.2f} s", flush=True)
            err = max(
                float(np.abs(f[c].to_numpy() - g[c].to_numpy()).max())
                for f, g in zip(res["fast"], res["reference"])
                for c in ("p_answer", "p_base", "delta")
            )
            errs.append(err)
            if not err <= a.tol:
                sys.exit(
                    f"fast and reference knockout tables differ by {err:.2e} (> {a.tol:g}): not comparable"
                )
    med = {k: statistics.median(v) for k, v in times.items()}
    ref = res["reference"]
    n_windows = len(ref[0])
    print(
        f"mini-llava, {seq} tokens, {ad.llm.n_layers} LLM layers, {len(pairs)} pairs x {n_windows} windows "
        f"(window {a.window}, centred, clipped, stride {a.stride}), {a.repeats} interleaved repeats (median), "
        f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}"
    )
    for k, v in med.items():
        print(f"  {k:12s} {v:8.2f} s  ({med['reference'] / v:5.1f}x faster than reference)")
    speedup = med["reference"] / med["fast"]
    print(f"max |fast - reference| over p_answer, p_base, delta: {max(errs):.1e} (tolerance {a.tol:g})")
    print(f"target: fast >= 3x faster than reference -> {speedup:.1f}x {'met' if speedup >= 3 else 'MISSED'}")
    result = {
        "model": "mini-llava",
        "tokens": seq,
        "pairs": [f"{s} -> {t}" for s, t in pairs],
        "group_sizes": {k: len(v) for k, v in groups.items()},
        "window": a.window,
        "stride": a.stride,
        "windows_per_pair": n_windows,
        "median_s": med,
        "raw_s": times,
        "speedup_fast_vs_reference": speedup,
        "max_abs_err_fast_vs_reference": max(errs),
        "target_met": speedup >= 3,
        "torch_threads": torch.get_num_threads(),
        "load_average_1min_at_end": os.getloadavg()[0],
        "cpu": platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    if a.flow:
        from sinkscope.flow.run import ANALYSES, run_flow

        analyses = [x for x in ANALYSES if x not in a.flow_skip]

        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            cpu = time.process_time()
            s = run_flow(ad, analyses=analyses, out=tmp, progress=False)["summary"]
            wall, cpu = time.perf_counter() - t, time.process_time() - cpu
        result["flow_default"] = {
            "analyses": analyses,
            "wall_s": wall,
            "process_cpu_s": cpu,
            "timings": s["timings"],
            "knockout_route": (s.get("knockout") or {}).get("route"),
        }
        print(
            f"default flow on mini-llava (model already loaded): {wall:.1f} s wall, {cpu:.1f} s CPU; {s['timings']}"
        )
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
