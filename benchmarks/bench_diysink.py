"""Benchmark: what DIYSink costs (issue 14).

Four measurements on one model (default ``mini-llava``), medians of interleaved repeats:

1. **training step**: a stage-2 DIYSink step (dual connector, both MLPs trained, sinks first) against
   a plain projector training step (the original projector trained) on the same batch of cached
   tower features: forward, backward, AdamW step. Target <= 1.15x.
2. **cached features**: an epoch of DIYSink steps reading the tower's features from the cache
   against the same epoch recomputing the tower for every batch. Target >= 3x faster. The tower
   alone over the epoch's images is timed too: ``(cached epoch + tower) / cached epoch`` is the
   most any cache can give (it removes the tower and nothing else), reported beside the ratio.
   Measured for stage 2 (every visual token through the dual connector) and for stage 1 of the
   sink MLP (only the sinks reach the LLM, so the LLM's share of the epoch is small).
3. **ReW routing**: embed the question with the frozen sentence encoder and run ``R``, per
   question: one at a time (online) and in one batch of the run's questions (as ``sinkscope eval``
   does). Target <= 10 ms.
4. **CoT routing**: the two questions to the model (greedy ``generate``) per question, against the
   time of answering the question itself (multiple choice, cached candidates): the paper's
   TinyLLaVA-0.5B went from 0.09 s to 0.25 s per question (+0.16 s).

    .venv/bin/python benchmarks/bench_diysink.py [--model mini-llava] [--batch-size 4]
        [--epoch 8] [--questions 8] [--repeats 5] [--out benchmarks/results/diysink.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mini-llava")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--epoch", type=int, default=8, help="examples per timed epoch (cached vs recomputed)")
    ap.add_argument("--questions", type=int, default=8, help="questions routed (ReW, CoT)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/diysink.json")
    a = ap.parse_args(argv)

    from sinkscope import load_model
    from sinkscope.diysink import CoTRouter, QuestionEncoder, ReWRouter, make_dual, routing
    from sinkscope.evaluation.items import load_items
    from sinkscope.evaluation.scoring import build_prompt, score_choices
    from sinkscope.training.diysink import dual_loss
    from sinkscope.training.examples import encode, vqa_examples
    from sinkscope.training.features import FeatureCache, tower_features
    from sinkscope.training.projector import _step_loss

    torch.manual_seed(0)
    ad = load_model(a.model)
    m = ad.model
    plain_projector = copy.deepcopy(m.model.multi_modal_projector)
    dual = make_dual(ad)
    for p in m.parameters():
        p.requires_grad_(False)
    for p in list(dual.f_sink.parameters()) + list(dual.f_nonsink.parameters()) + list(plain_projector.parameters()):
        p.requires_grad_(True)
    tok = ad.image_token_id
    exs = vqa_examples(n_per_task=2, real=(), seed=0)[: max(a.batch_size, a.epoch)]
    tmp = tempfile.TemporaryDirectory()
    cache = FeatureCache(ad, Path(tmp.name) / "features")
    cache.ensure([e.image for e in exs], progress=False, min_side=1)
    n_img = cache.get(exs[0].image.name).shape[0]
    encoded = [encode(ad, e, n_img) for e in exs]

    def batch_of(idx, feats=None):
        return [(*encoded[i], cache.get(exs[i].image.name) if feats is None else feats[k]) for k, i in enumerate(idx)]

    opt_plain = torch.optim.AdamW(plain_projector.parameters(), lr=1e-5)
    opt_dual = torch.optim.AdamW(list(dual.f_sink.parameters()) + list(dual.f_nonsink.parameters()), lr=1e-5)
    first = list(range(a.batch_size))

    def plain_step():
        loss = _step_loss(m, plain_projector, batch_of(first), tok)
        loss.backward()
        opt_plain.step()
        opt_plain.zero_grad()

    def dual_step():
        loss = dual_loss(m, batch_of(first), tok, "dual")
        loss.backward()
        opt_dual.step()
        opt_dual.zero_grad()

    epoch_batches = [list(range(s, min(s + a.batch_size, a.epoch))) for s in range(0, a.epoch, a.batch_size)]

    def epoch(recompute: bool, mode: str = "dual"):
        def run():
            for idx in epoch_batches:
                feats = tower_features(ad, [exs[i].image.load() for i in idx], min_side=1) if recompute else None
                loss = dual_loss(m, batch_of(idx, feats), tok, mode)
                loss.backward()
                opt_dual.step()
                opt_dual.zero_grad()

        return run

    def tower_only():  # what a cache can save at most: the tower over the epoch's images
        for idx in epoch_batches:
            tower_features(ad, [exs[i].image.load() for i in idx], min_side=1)

    # stage 2 (both MLPs on every visual token) and stage 1 of the sink MLP (only the sinks reach
    # the LLM: a short sequence, so the tower is a larger share of the epoch)
    routes = {"plain_step": plain_step, "diysink_step": dual_step, "epoch_cached": epoch(False),
              "epoch_recomputed": epoch(True), "epoch_cached_stage1_sink": epoch(False, "sink-only"),
              "epoch_recomputed_stage1_sink": epoch(True, "sink-only"), "tower_only": tower_only}  # fmt: skip
    times: dict[str, list[float]] = {k: [] for k in routes}
    m.train(False)
    for fn in routes.values():  # warm-up
        fn()
    for r in range(a.repeats):
        names = list(routes)[r % len(routes) :] + list(routes)[: r % len(routes)]
        for name in names:
            t = time.perf_counter()
            routes[name]()
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}

    # routing: ReW per question, CoT per question against answering it
    items = load_items("shapes", split="test", limit=a.questions)
    enc = QuestionEncoder()
    router = ReWRouter(enc.dim)
    rew_s, rew_batched_s = [], []
    questions = [it.question for it in items]
    with torch.no_grad():
        router(enc([items[0].question]))  # warm-up
        for _ in range(a.repeats):
            for q in questions:  # online: one question at a time
                t = time.perf_counter()
                router(enc([q]))
                rew_s.append(time.perf_counter() - t)
            t = time.perf_counter()  # an evaluation: the run's questions embedded in one batch first
            router(enc(questions))
            rew_batched_s.append((time.perf_counter() - t) / len(questions))
    cot, cot_score = CoTRouter(), CoTRouter(mode="score")
    cot_s, cot_score_s, answer_s, fallbacks = [], [], [], 0
    with torch.no_grad(), routing(ad, mode="dual"):
        for it in items:
            img = it.image.load()
            t = time.perf_counter()
            score_choices(ad, build_prompt(ad, img, it.question), it.choices)
            answer_s.append(time.perf_counter() - t)
            d = cot.route(ad, img, it.question)
            cot_s.append(d.seconds)
            fallbacks += d.fallback
            cot_score_s.append(cot_score.route(ad, img, it.question).seconds)
    res = {
        "model": a.model,
        "batch_size": a.batch_size,
        "epoch_examples": a.epoch,
        "repeats": a.repeats,
        "visual_tokens": n_img,
        "sink_rule": dual.rule.describe(),
        "median_s": med,
        "diysink_step_vs_plain": med["diysink_step"] / med["plain_step"],
        "cached_epoch_speedup": med["epoch_recomputed"] / med["epoch_cached"],
        # Amdahl: a cache removes the tower and nothing else, so (cached epoch + tower) / cached
        # epoch is the most it can give; the measured speed-up should reach it
        "cached_epoch_bound": (med["epoch_cached"] + med["tower_only"]) / med["epoch_cached"],
        "tower_share_of_recomputed_epoch": med["tower_only"] / med["epoch_recomputed"],
        "cached_epoch_speedup_stage1_sink": med["epoch_recomputed_stage1_sink"] / med["epoch_cached_stage1_sink"],
        "cached_epoch_bound_stage1_sink": (med["epoch_cached_stage1_sink"] + med["tower_only"]) / med["epoch_cached_stage1_sink"],
        "rew_ms_per_question": 1000 * statistics.median(rew_s),
        "rew_ms_per_question_batched": 1000 * statistics.median(rew_batched_s),
        "cot_s_per_question": statistics.median(cot_s),
        "cot_score_s_per_question": statistics.median(cot_score_s),
        "answer_s_per_question": statistics.median(answer_s),
        "cot_fallbacks": f"{fallbacks} of {len(items)}",
        "paper_cot_extra_s": 0.16,
        "targets": {
            "diysink_step_vs_plain": "<= 1.15", "cached_epoch_speedup": ">= 3", "cached_epoch_speedup_stage1_sink": ">= 3",
            "rew_ms_per_question": "<= 10",
            "rew_ms_per_question_batched": "<= 10",
        },  # fmt: skip
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
    }
    res["met"] = {
        "diysink_step_vs_plain": res["diysink_step_vs_plain"] <= 1.15,
        "cached_epoch_speedup": res["cached_epoch_speedup"] >= 3,
        "cached_epoch_speedup_stage1_sink": res["cached_epoch_speedup_stage1_sink"] >= 3,
        "rew_ms_per_question": res["rew_ms_per_question"] <= 10,
        "rew_ms_per_question_batched": res["rew_ms_per_question_batched"] <= 10,
    }
    print(f"model {a.model}, batch {a.batch_size}, {n_img} visual tokens; sink rule: {res['sink_rule']}")
    for k, v in med.items():
        print(f"  {k:18} {v * 1000:9.1f} ms (median of {a.repeats})")
    print(f"DIYSink step / plain projector step: {res['diysink_step_vs_plain']:.3f}x (target <= 1.15x)")
    print(
        f"epoch recomputing the tower / cached: {res['cached_epoch_speedup']:.2f}x (target >= 3x); the tower is "
        f"{100 * res['tower_share_of_recomputed_epoch']:.0f}% of a recomputed epoch, so no cache can give more than "
        f"{res['cached_epoch_bound']:.2f}x here"
    )
    print(
        f"stage 1 of the sink MLP (only the sinks fed): {res['cached_epoch_speedup_stage1_sink']:.2f}x "
        f"(target >= 3x; bound {res['cached_epoch_bound_stage1_sink']:.2f}x)"
    )
    print(
        f"ReW routing: {res['rew_ms_per_question']:.1f} ms per question one at a time, "
        f"{res['rew_ms_per_question_batched']:.1f} ms in a batch of {len(questions)} (target <= 10 ms)"
    )
    print(
        f"CoT routing: {res['cot_s_per_question']:.3f} s per question on top of {res['answer_s_per_question']:.3f} s "
        f"answering it (paper: +0.16 s on 0.09 s); fallbacks {res['cot_fallbacks']}; "
        f"scored options: {res['cot_score_s_per_question']:.3f} s"
    )
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1))
    tmp.cleanup()
    return res


if __name__ == "__main__":
    main()
