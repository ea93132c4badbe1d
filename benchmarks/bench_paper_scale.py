"""Benchmark: sinkscope at the paper's shapes (CLIP ViT-L/14-336, LLaVA-1.5-7B layers), random weights.

No hub: both models are built from configs with seeded random weights (what is timed does not
depend on the values; the statistics are checked against the usual route first, so like is
compared with like).

- **ViT** - a ``CLIPVisionModel`` with CLIP ViT-L/14-336's config (24 layers, width 1024, 16
  heads, 336 px -> 577 tokens); ``--images`` of the embedded photos per batch. Rows as in
  ``bench_scan.py``: ``bare_eager`` (baseline), ``bare_sdpa``, ``sinkscope_norms``,
  ``sinkscope_attention`` (norms + attention received for every block, every query),
  ``hf_hidden_states_norms`` and ``hf_attentions_received`` (the usual routes).
- **LLaVA** - LLaVA-1.5's layout (that ViT, layer -2, CLS dropped: 576 image tokens, a 2-layer GELU
  projector) with a Llama LLM of LLaVA-1.5-7B's layer shape (width 4096, 32 heads, MLP 11008,
  vocabulary 32064) but only ``--llm-layers`` layers (default 4; the 7B has 32), and a prompt
  padded to ``--tokens`` (default 620). Rows: ``bare_eager`` (baseline), ``bare_sdpa``,
  ``sinkscope_llm_attention`` (attention received from every query in every LLM layer),
  ``sinkscope_propagation`` (:func:`sinkscope.flow.propagation.propagation`),
  ``sinkscope_knockout`` (the fast knockout, image -> last, one window over all layers) and
  ``hf_output_attentions`` (the usual route: eager, ``output_attentions`` + hidden states).

Interleaved repeats after a warm-up, medians, ratios to ``bare_eager`` and ``bare_sdpa`` (wall
clock, and process CPU time, which other tenants of a shared machine disturb less). Peak memory
added by each route: in a fresh process per route, after one warm-up call, freed pages handed back
(``malloc_trim``), the peak-RSS counter reset (``/proc/self/clear_refs``), one call, ``VmHWM``
minus the RSS before it (CPU). ``--device cuda --dtype float16`` runs the same on a GPU
(memory then from ``torch.cuda.max_memory_allocated``).

    .venv/bin/python benchmarks/bench_paper_scale.py [--part vit|llava|all] [--images 2]
        [--llm-layers 4] [--tokens 620] [--repeats 5] [--device cpu] [--dtype float32]
        [--out benchmarks/results/paper_scale.json]
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scan import cap_received, hf_norms, hf_received, machine_info  # noqa: E402

VIT_TARGETS = {"sinkscope_norms": 1.02, "sinkscope_attention": 1.10}  # x bare eager
LLAVA_TARGETS = {"sinkscope_propagation": 1.10}  # x bare eager
SDPA_TARGET = 1.05  # attention statistics x bare SDPA
ATTN_ATOL = 1e-5


def vit_config():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
        hidden_act="quick_gelu",
    )


def image_processor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )


def _random_init(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Seeded N(0, 0.02) weights, zero biases, unit norms: the scale of a trained transformer."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model.eval()


def _build(cls, cfg):
    from transformers.initialization import no_init_weights

    with no_init_weights():
        model = cls(cfg)
    return _random_init(model)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _status_mb(key: str) -> float:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key))
    return int(line.split()[1]) / 1024


def peak_added_mb(fn, device: str) -> float:
    """The memory one call of ``fn`` adds at its peak over what was held before it."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    rss0 = _status_mb("VmRSS")
    fn()
    return _status_mb("VmHWM") - rss0


def memory_rows(a, part: str, routes: dict) -> dict:
    """Peak memory added by one call of each route, each in a fresh process (a route run after
    others inherits their allocator state: eager's 40 MB weight buffers raise glibc's mmap
    threshold, and later routes' buffers then come from fragmented arenas)."""
    if a.no_memory:
        return {}
    names = ("bare_sdpa", *[k for k in routes if k.startswith(("sinkscope", "hf_"))])
    trials: dict[str, list[float]] = {k: [] for k in names}
    for _ in range(a.mem_trials):  # interleaved: glibc's arenas make single processes vary a lot
        for k in names:
            argv = [sys.executable, str(Path(__file__).resolve()), "--part", part, "--_mem", k,
                    "--images", str(a.images), "--llm-layers", str(a.llm_layers), "--tokens", str(a.tokens),
                    "--device", a.device, "--dtype", str(a.dtype).removeprefix("torch.")]  # fmt: skip
            p = subprocess.run(["sh", "-c", " ".join(shlex.quote(x) for x in argv) + "; exit $?"],
                               capture_output=True, text=True)  # fmt: skip
            if p.returncode != 0:
                sys.exit(f"memory worker {part}/{k} failed:\n{p.stderr[-2000:]}")
            trials[k].append(json.loads(p.stdout.strip().splitlines()[-1])["peak_added_mb"])
    print("peak memory added per fresh process (MB): " + "; ".join(f"{k} {v}" for k, v in trials.items()))
    return {k: statistics.median(v) for k, v in trials.items()}


def mem_worker(fn, device: str) -> None:
    """In a fresh process: one warm-up call, then the peak one more call adds."""
    with torch.no_grad():
        fn()
        print(json.dumps({"peak_added_mb": round(peak_added_mb(fn, device), 1)}))


def time_routes(routes: dict, repeats: int, device: str) -> dict[str, list[float]]:
    """Interleaved: a warm-up round, then each repeat runs every route once, starting at a route
    that rotates from repeat to repeat."""
    names = list(routes)
    with torch.no_grad():
        for fn in routes.values():
            fn()
        times, cpu = {k: [] for k in names}, {k: [] for k in names}
        for r in range(repeats):
            for k in names[r % len(names) :] + names[: r % len(names)]:
                gc.collect()
                _sync(device)
                c, t = time.process_time(), time.perf_counter()
                routes[k]()
                _sync(device)
                times[k].append(time.perf_counter() - t)
                cpu[k].append(time.process_time() - c)
            print(f"  repeat {r + 1}/{repeats}: " + " ".join(f"{k}={v[-1]:.2f}" for k, v in times.items()), flush=True)
    return times, cpu


def summarise(title: str, timed: tuple, targets: dict, mem: dict) -> dict:
    """The table (wall-clock medians, their ratios, and the ratios of the process CPU-time medians,
    which other tenants of a shared machine disturb less), the targets and the memory rows."""
    times, cpu = timed
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    eager, sdpa = med["bare_eager"], med["bare_sdpa"]
    verdicts = {}
    print(f"\n{title}")
    print(f"{'route':26s} {'median s':>9s} {'vs eager':>9s} {'vs sdpa':>8s} {'cpu vs sdpa':>12s}  target")
    for k, v in med.items():
        tgt = ""
        if k in targets:
            ok = v / eager <= targets[k]
            verdicts[k] = {"target_x_eager": targets[k], "x_eager": round(v / eager, 4), "met": ok}
            tgt = f"<= {targets[k]:.2f}x eager {'met' if ok else 'MISSED'}"
        print(f"{k:26s} {v:9.3f} {v / eager:8.3f}x {v / sdpa:7.3f}x {med_cpu[k] / med_cpu['bare_sdpa']:11.3f}x  {tgt}")
    if mem:
        print("peak memory added over the loaded model, median: " + ", ".join(f"{k} {v:.0f} MB" for k, v in mem.items()))
    return {
        "median_s": med,
        "x_bare_eager": {k: v / eager for k, v in med.items()},
        "x_bare_sdpa": {k: v / sdpa for k, v in med.items()},
        "raw_s": times,
        "cpu_x_bare_sdpa": {k: v / med_cpu["bare_sdpa"] for k, v in med_cpu.items()},
        "raw_cpu_s": cpu,
        "targets": verdicts,
        "peak_added_mb": mem,
    }


# -- ViT-L/14-336 -------------------------------------------------------------------------------
def vit_part(a) -> dict:
    from transformers import CLIPVisionModel

    from sinkscope.capture import Capture
    from sinkscope.data import sample_images
    from sinkscope.models.vision import VisionAdapter

    t0 = time.perf_counter()
    model = _build(CLIPVisionModel, vit_config()).to(a.device, a.dtype)
    model.set_attn_implementation("sdpa")
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    ad = VisionAdapter(model, "clip-vit-l-336-shape", image_processor(), image_size=(336, 336))
    inp = ad.prepare([it.load() for it in sample_images(a.images)])
    inp.tensors["pixel_values"] = inp.tensors["pixel_values"].to(a.device, a.dtype)
    pv = inp.tensors["pixel_values"]
    n_tok = inp.layouts[0].n_tokens
    print(f"ViT-L/14-336 shape: {n_tok} tokens, 24 layers, batch {a.images}; built in {time.perf_counter() - t0:.0f} s")

    def usual_attention():
        o = eager(pixel_values=pv, output_hidden_states=True, output_attentions=True)
        return hf_norms(o.hidden_states), hf_received(o.attentions)

    def sinkscope_attention():
        with Capture(ad, layers="all", attention="all") as cap:
            return cap.run(inp)

    def sinkscope_norms():
        with Capture(ad, layers="all") as cap:
            return cap.run(inp)

    routes = {
        "bare_eager": lambda: eager(pixel_values=pv).last_hidden_state,
        "bare_sdpa": lambda: model(pixel_values=pv).last_hidden_state,
        "sinkscope_norms": sinkscope_norms,
        "sinkscope_attention": sinkscope_attention,
        "hf_hidden_states_norms": lambda: hf_norms(eager(pixel_values=pv, output_hidden_states=True).hidden_states),
        "hf_attentions_received": usual_attention,
    }
    if a.mem:
        return mem_worker(routes[a.mem], a.device)
    with torch.no_grad():  # equivalence first
        bc = sinkscope_attention()
        norms, received = usual_attention()
        err_attn = float((cap_received(bc).float() - received.float()).abs().max())
        err_norm = float(((bc.norms.float() - norms.float()).abs() / norms.float().abs()).max())
    check_equivalent(err_attn, err_norm, a.dtype)
    times = time_routes(routes, a.repeats, a.device)
    res = summarise(f"ViT-L/14-336 shape ({n_tok} tokens, batch {a.images})", times, VIT_TARGETS,
                    memory_rows(a, "vit", routes))  # fmt: skip
    res["targets"]["sinkscope_attention_x_sdpa"] = _sdpa_target(res, "sinkscope_attention")
    res["targets"]["sinkscope_attention_below_usual"] = _below_usual(res, "sinkscope_attention", "hf_attentions_received")
    res.update(tokens=n_tok, batch=a.images, equivalence={"attention_abs": err_attn, "norms_rel": err_norm})
    return res


def check_equivalent(err_attn: float, err_norm: float, dtype: torch.dtype) -> None:
    """Print the agreement with the usual route; stop when the attention statistics differ."""
    print(f"equivalence: attention received max abs err {err_attn:.1e}, norms max rel err {err_norm:.1e}")
    if err_attn > ATTN_ATOL * (1 if dtype == torch.float32 else 100):
        sys.exit("sinkscope's attention received differs from the usual route: not comparable")


def _sdpa_target(res: dict, route: str) -> dict:
    x = res["x_bare_sdpa"][route]
    print(f"{route}: {x:.3f}x bare SDPA (target <= {SDPA_TARGET:.2f}x) {'met' if x <= SDPA_TARGET else 'MISSED'}")
    return {"target_x_sdpa": SDPA_TARGET, "x_sdpa": round(x, 4), "met": x <= SDPA_TARGET}


def _below_usual(res: dict, route: str, usual: str) -> dict:
    t, m = res["median_s"], res["peak_added_mb"]
    ok = t[route] < t[usual] and (not m or m[route] < m[usual])
    print(f"{route} below the usual route ({usual}) in time{' and memory' if m else ''}: {'met' if ok else 'MISSED'}")
    return {"met": ok}


# -- LLaVA with LLaVA-1.5-7B's layer shape --------------------------------------------------------
class _Parts:
    def __init__(self, image_processor, tokenizer):
        self.image_processor, self.tokenizer = image_processor, tokenizer


def llava_part(a) -> dict:
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from sinkscope.capture import Capture
    from sinkscope.data import sample_images
    from sinkscope.flow.knockout import knockout_pairs
    from sinkscope.flow.propagation import propagation
    from sinkscope.models.llava import LlavaAdapter
    from sinkscope.models.tiny import tiny_tokenizer

    t0 = time.perf_counter()
    text = LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_attention_heads=32,
        num_key_value_heads=32,
        num_hidden_layers=a.llm_layers,
        vocab_size=32064,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    cfg = LlavaConfig(
        vision_config=vit_config(),
        text_config=text,
        image_token_id=4,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_seq_length=576,
    )
    model = _build(LlavaForConditionalGeneration, cfg).to(a.device, a.dtype)
    model.set_attn_implementation("sdpa")
    ad = LlavaAdapter(model, "llava-7b-layer-shape", _Parts(image_processor(), tiny_tokenizer()), image_size=(336, 336))
    img = sample_images(1)[0].load()
    words = "what is the main object in this picture and what color is it ? describe it please".split()
    prompt = "<image> " + " ".join(words[i % len(words)] for i in range(a.tokens - 576 - 1))
    inp = ad.build_inputs([img], prompt)
    kw = {k: inp[k].to(a.device) for k in ("input_ids", "attention_mask")}
    kw["pixel_values"] = inp["pixel_values"].to(a.device, a.dtype)
    seq = int(kw["input_ids"].shape[1])
    img_pos = ad.image_token_positions(kw["input_ids"])[0].tolist()
    print(f"LLaVA, LLaVA-1.5-7B layer shape x {a.llm_layers} layers: {seq} LLM tokens ({len(img_pos)} image); "
          f"built in {time.perf_counter() - t0:.0f} s")  # fmt: skip
    head = model.get_output_embeddings()

    def with_eager(fn):
        model.set_attn_implementation("eager")
        try:
            return fn()
        finally:
            model.set_attn_implementation("sdpa")

    def usual():
        out = model(**kw, output_attentions=True, output_hidden_states=True)
        recv = torch.stack([w[0].float().mean((0, 1)) for w in out.attentions])  # every query
        return recv, torch.stack([h[0].float().norm(dim=-1) for h in out.hidden_states])

    def llm_attention():
        with Capture(ad.llm, layers="all", attention="all") as cap:
            return cap.run_fn(lambda: model(**kw), attention_mask=kw["attention_mask"],
                              query_mask=kw["attention_mask"].bool())  # fmt: skip

    def knock():
        run = lambda: model(**kw)  # noqa: E731
        return knockout_pairs(run, ad.llm, [(img_pos, [seq - 1])], window=a.llm_layers, head=head, method="fast")

    routes = {
        "bare_eager": lambda: with_eager(lambda: model(**kw)),
        "bare_sdpa": lambda: model(**kw),
        "sinkscope_llm_attention": llm_attention,
        "sinkscope_propagation": lambda: propagation(ad, [img], prompt),
        "sinkscope_knockout": knock,
        "hf_output_attentions": lambda: with_eager(usual),
    }
    if a.mem:
        return mem_worker(routes[a.mem], a.device)
    with torch.no_grad():  # equivalence first
        got = llm_attention()
        recv, norms = with_eager(usual)
        ours = torch.stack([got.attn_received[b][0].float() for b in range(ad.llm.n_layers)])
        err_attn = float((ours - recv).abs().max())
        err_norm = float(((got.norms[0].float() - norms).abs() / norms.abs()).max())
    check_equivalent(err_attn, err_norm, a.dtype)
    times = time_routes(routes, a.repeats, a.device)
    res = summarise(f"LLaVA, 7B layer shape x {a.llm_layers} layers ({seq} tokens)", times, LLAVA_TARGETS,
                    memory_rows(a, "llava", routes))  # fmt: skip
    res["targets"]["sinkscope_llm_attention_x_sdpa"] = _sdpa_target(res, "sinkscope_llm_attention")
    res["targets"]["sinkscope_llm_attention_below_usual"] = _below_usual(res, "sinkscope_llm_attention", "hf_output_attentions")
    if res["peak_added_mb"]:
        m = res["peak_added_mb"]
        added = m["sinkscope_propagation"] - m["bare_sdpa"]
        usual_added = m["hf_output_attentions"] - m["bare_sdpa"]
        ok = added <= usual_added / 2
        print(f"propagation's memory over bare SDPA {added:.0f} MB vs the usual route's {usual_added:.0f} MB "
              f"(target <= half) {'met' if ok else 'MISSED'}")  # fmt: skip
        res["targets"]["propagation_memory_half_usual"] = {"added_mb": added, "usual_added_mb": usual_added, "met": ok}
    res.update(tokens=seq, llm_layers=a.llm_layers, equivalence={"attention_abs": err_attn, "norms_rel": err_norm})
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["vit", "llava", "all"], default="all")
    ap.add_argument("--images", type=int, default=2, help="images per ViT batch (default 2)")
    ap.add_argument("--llm-layers", type=int, default=4, help="LLM layers of the 7B shape (default 4; the 7B has 32)")
    ap.add_argument("--tokens", type=int, default=620, help="LLM prompt length, 576 image tokens included")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--mem-trials", type=int, default=2, help="fresh processes per route for memory (median)")
    ap.add_argument("--out", default="benchmarks/results/paper_scale.json")
    ap.add_argument("--_mem", dest="mem", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.dtype = getattr(torch, a.dtype)
    if a.mem:  # a memory worker (see memory_rows)
        (vit_part if a.part == "vit" else llava_part)(a)
        return 0
    if a.device == "cpu" and not Path("/proc/self/clear_refs").exists():
        a.no_memory = True
    t0 = time.perf_counter()
    result = {"machine": machine_info(), "device": a.device, "dtype": str(a.dtype), "repeats": a.repeats}
    print(f"torch {result['machine']['torch']}, {result['machine']['torch_threads']} threads, "
          f"{result['machine']['cpu_model']}, {a.device} {a.dtype}")  # fmt: skip
    if a.part in ("vit", "all"):
        result["vit"] = vit_part(a)
        gc.collect()
    if a.part in ("llava", "all"):
        result["llava"] = llava_part(a)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    missed = [f"{p}:{k}" for p in ("vit", "llava") if p in result for k, v in result[p]["targets"].items() if not v["met"]]
    print(f"\ntargets missed: {', '.join(missed)}" if missed else "\nall targets met")
    print(f"wrote {out} ({result['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
