"""Benchmark: what an intervention adds to an evaluation (issue 13).

The same ``--items`` shapes questions are scored (multiple choice, cached candidates) under
``baseline`` (the plain model), ``sinks-front`` and ``sink-only`` (visual-token order / selection:
:func:`~sinkscope.interventions.apply_tokens` builds the LLM input once per prompt) and ``var``
(VAR in every decoder layer from 2 on, eager attention there). Interleaved repeats, medians,
ratios to the baseline. Targets: order / selection <= 1.05x, VAR <= 1.10x.

    .venv/bin/python benchmarks/bench_interventions.py [--model mini-llava] [--items 16]
        [--repeats 3] [--out benchmarks/results/interventions.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mini-llava")
    ap.add_argument("--items", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/interventions.json")
    a = ap.parse_args(argv)

    from sinkscope import load_model
    from sinkscope.evaluation.items import load_items
    from sinkscope.evaluation.scoring import build_prompt, intervened, score_choices
    from sinkscope.interventions import VAR, TokenIntervention, default_rule, var

    ad = load_model(a.model)
    items = load_items("shapes", split="test", limit=a.items)
    prompts = [(build_prompt(ad, it.image.load(), it.question), it.choices) for it in items]
    rule, why = default_rule(ad)

    def plain():
        for p, c in prompts:
            score_choices(ad, p, c)

    def tokens(variant):
        spec = TokenIntervention(variant, rule=rule)

        def run():
            for p, c in prompts:
                score_choices(ad, intervened(ad, p, spec), c)

        return run

    def with_var():
        with var(ad, VAR()):
            for p, c in prompts:
                score_choices(ad, p, c)

    routes = {"baseline": plain, "sinks-front": tokens("sinks-front"), "sink-only": tokens("sink-only"), "var": with_var}
    times: dict[str, list[float]] = {k: [] for k in routes}
    with torch.no_grad():
        plain()  # warm-up
        for _ in range(a.repeats):
            for name, fn in routes.items():
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = {k: med[k] / med["baseline"] for k in routes}
    res = {
        "model": a.model,
        "items": len(prompts),
        "repeats": a.repeats,
        "sink_rule": rule.describe(),
        "sink_rule_reason": why,
        "median_s": med,
        "ratio_to_baseline": ratio,
        "targets": {"sinks-front": 1.05, "sink-only": 1.05, "var": 1.10},
        "met": {k: ratio[k] <= t for k, t in {"sinks-front": 1.05, "sink-only": 1.05, "var": 1.10}.items()},
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "versions": {"torch": torch.__version__},
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    for k in routes:
        print(f"{k:12s} {med[k]:8.2f} s  {ratio[k]:.3f}x")
    return res


if __name__ == "__main__":
    main()
