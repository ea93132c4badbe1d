"""Benchmark: what sinkscope's in-hook reductions cost against a bare forward and the usual HF route.

Runs on ``dinov2-small`` (real DINOv2 ViT-S/14) over the embedded sample images, on CPU, under
``torch.no_grad``. All methods are timed interleaved in one process (round-robin over the methods
within each repeat, starting at a rotating method, after a warm-up round); each time is a full pass
over all batches, and the median over repeats is reported against ``bare_eager`` (= 1.00x).

Before timing, the script checks that the methods compute the same thing (sinkscope's norms equal
the usual route's to 1e-4 relative; attention received to 1e-5) and aborts if not.

Then it measures peak RSS of the forward path (and optionally of the full ``scan`` API) in fresh
subprocesses on 16 and on 64 images (the embedded images repeated), and reports the growth.

    .venv/bin/python benchmarks/bench_scan.py [--images 16] [--batch-size 8] [--repeats 11]
                                              [--out benchmarks/results/scan.json]

See benchmarks/README.md for what each row means.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MODEL = "dinov2-small"
METHODS = (
    "bare_eager",
    "bare_sdpa",
    "sinkscope_norms",
    "sinkscope_attention",
    "hf_hidden_states_norms",
    "hf_attentions_received",
)
TARGETS = {  # method -> max ratio to bare_eager
    "sinkscope_norms": 1.05,
    "sinkscope_attention": 1.15,
}
USUAL_ROUTE_REFERENCE = 1.40  # the ratio the usual route is said to reach (printed for comparison)
MEM_GROWTH_TARGET = 10.0  # percent, 64 vs 16 images, sinkscope forward path
NORM_RTOL = 1e-4
ATTN_ATOL = 1e-5


# -- helpers ------------------------------------------------------------------------------------
def image_items(n: int):
    """``n`` embedded images; beyond 16 the 16 are repeated (renamed so names stay unique)."""
    from sinkscope.data import ImageItem, sample_images

    base = sample_images(min(n, 16))
    return [ImageItem(f"{base[i % len(base)].name}#{i // len(base)}", base[i % len(base)].source,
                      base[i % len(base)].loader) for i in range(n)]  # fmt: skip


def load_pair(model: str):
    """The same checkpoint twice: SDPA (sinkscope's default) and eager (the HF routes)."""
    from sinkscope import load_model

    ad = load_model(model)  # attn_implementation="sdpa"
    ade = load_model(model, attn_implementation="eager")
    assert ad.model.config._attn_implementation == "sdpa", ad.model.config._attn_implementation
    assert ade.model.config._attn_implementation == "eager", ade.model.config._attn_implementation
    sa, sb = ad.model.state_dict(), ade.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), "weights differ"
    return ad, ade


def hf_norms(hidden_states) -> torch.Tensor:
    """fp32 L2 norms of every hidden state -> ``[B, L+1, N]``."""
    return torch.stack([h.float().norm(dim=-1) for h in hidden_states], dim=1)


def hf_received(attentions) -> torch.Tensor:
    """Attention each key receives, mean over heads and queries -> ``[B, L, N]``."""
    return torch.stack([a.float().mean(dim=(1, 2)) for a in attentions], dim=1)


def cap_received(bc) -> torch.Tensor:
    return torch.stack([bc.attn_received[b] for b in sorted(bc.attn_received)], dim=1)


def make_methods(ad, ade, inputs):
    """name -> callable doing one full pass over all batches and returning its reduced results."""
    from sinkscope.capture import Capture

    pvs = [inp.tensors["pixel_values"] for inp in inputs]

    def bare_eager():
        return [ade.model(pixel_values=pv).last_hidden_state for pv in pvs]

    def bare_sdpa():
        return [ad.model(pixel_values=pv).last_hidden_state for pv in pvs]

    def sinkscope_norms():
        with Capture(ad, layers="all") as cap:
            return [cap.run(inp) for inp in inputs]

    def sinkscope_attention():
        with Capture(ad, layers="all", attention="all") as cap:
            return [cap.run(inp) for inp in inputs]

    def hf_hidden_states_norms():
        out = []
        for pv in pvs:
            o = ade.model(pixel_values=pv, output_hidden_states=True)
            out.append(hf_norms(o.hidden_states))
        return out

    def hf_attentions_received():
        out = []
        for pv in pvs:
            o = ade.model(pixel_values=pv, output_hidden_states=True, output_attentions=True)
            out.append((hf_norms(o.hidden_states), hf_received(o.attentions)))
        return out

    fns = dict(
        bare_eager=bare_eager,
        bare_sdpa=bare_sdpa,
        sinkscope_norms=sinkscope_norms,
        sinkscope_attention=sinkscope_attention,
        hf_hidden_states_norms=hf_hidden_states_norms,
        hf_attentions_received=hf_attentions_received,
    )
    assert tuple(fns) == METHODS
    return fns


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs() / b.abs().clamp_min(1e-12)).max())


def verify(fns) -> dict:
    """Check that sinkscope and the usual route compute the same statistics; abort if not."""
    with torch.no_grad():
        s_norm = fns["sinkscope_norms"]()
        s_attn = fns["sinkscope_attention"]()
        h_norm = fns["hf_hidden_states_norms"]()
        h_attn = fns["hf_attentions_received"]()
    sn = torch.cat([bc.norms for bc in s_norm])
    san = torch.cat([bc.norms for bc in s_attn])
    sar = torch.cat([cap_received(bc) for bc in s_attn])
    hn = torch.cat(h_norm)
    han = torch.cat([n for n, _ in h_attn])
    har = torch.cat([r for _, r in h_attn])
    checks = {
        "norms_shape": list(sn.shape),
        "attention_received_shape": list(sar.shape),
        "norms_max_rel_err (sinkscope_norms vs hf_hidden_states_norms)": max_rel(sn, hn),
        "norms_max_rel_err (sinkscope_attention vs hf_attentions_received)": max_rel(san, han),
        "attention_received_max_abs_err": float((sar - har).abs().max()),
        "attention_received_rows_sum_to_1_err": float((har.sum(-1) - 1).abs().max()),
    }
    ok = (
        sn.shape == hn.shape
        and sar.shape == har.shape
        and checks["norms_max_rel_err (sinkscope_norms vs hf_hidden_states_norms)"] <= NORM_RTOL
        and checks["norms_max_rel_err (sinkscope_attention vs hf_attentions_received)"] <= NORM_RTOL
        and checks["attention_received_max_abs_err"] <= ATTN_ATOL
    )
    checks["ok"] = bool(ok)
    return checks


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict:
    import transformers

    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


# -- memory workers (run in fresh subprocesses) ---------------------------------------------------
def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def proc_status_mb(key: str) -> float:
    """``VmRSS`` (current) or ``VmHWM`` (peak of this process image) from /proc/self/status, in MB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def mem_worker(mode: str, n: int, batch_size: int) -> dict:
    """One measurement: load, then run ``mode`` over ``n`` images, loading/preparing per batch.

    ``sinkscope``: ``Capture(layers="all", attention="all")`` on the SDPA model (the scan's
    forward path); ``hf``: the eager model with ``output_hidden_states`` + ``output_attentions``,
    reduced right away. Both keep only per-image reduced results (norms ``[L+1, N]`` and received
    attention ``[L, N]``, ~25 KB an image). ``scan``: the full :func:`sinkscope.scanning.scan` API.
    """
    from sinkscope import load_model

    items = image_items(n)
    t0 = time.perf_counter()
    per_batch: list[float] = []  # ru_maxrss after each batch: flat = bounded memory
    extra: dict = {}
    if mode == "scan":
        from sinkscope.scanning import scan

        ad = load_model(MODEL)
        before = maxrss_mb()
        with tempfile.TemporaryDirectory() as tmp:
            res = scan(ad, images=items, method="all", batch_size=batch_size, out=Path(tmp) / "run",
                       progress=False)  # fmt: skip
            kept = len(res.tokens)
            extra["tokens_table_mb"] = round(float(res.tokens.memory_usage(deep=True).sum()) / 2**20, 1)
    elif mode in ("sinkscope", "hf"):
        from sinkscope.capture import Capture

        ad = load_model(MODEL, attn_implementation="sdpa" if mode == "sinkscope" else "eager")
        before = maxrss_mb()
        keep = []
        with torch.no_grad():
            if mode == "sinkscope":
                with Capture(ad, layers="all", attention="all") as cap:
                    for s in range(0, n, batch_size):
                        inp = ad.prepare([it.load() for it in items[s : s + batch_size]])
                        bc = cap.run(inp)
                        keep.extend(zip(bc.norms.clone(), cap_received(bc)))
                        del inp, bc
                        per_batch.append(round(maxrss_mb(), 1))
            else:
                for s in range(0, n, batch_size):
                    inp = ad.prepare([it.load() for it in items[s : s + batch_size]])
                    o = ad.model(pixel_values=inp.tensors["pixel_values"], output_hidden_states=True,
                                 output_attentions=True)  # fmt: skip
                    keep.extend(zip(hf_norms(o.hidden_states), hf_received(o.attentions)))
                    del inp, o
                    per_batch.append(round(maxrss_mb(), 1))
        kept = len(keep)
    else:
        raise SystemExit(f"unknown memory mode {mode!r}")
    return {
        "mode": mode,
        "images": n,
        "kept": kept,
        "rss_after_load_mb": round(before, 1),
        "peak_rss_mb": round(maxrss_mb(), 1),  # ru_maxrss
        "vm_hwm_mb": round(proc_status_mb("VmHWM"), 1),
        "final_rss_mb": round(proc_status_mb("VmRSS"), 1),
        "peak_after_batch_mb": per_batch,
        "seconds": round(time.perf_counter() - t0, 2),
        **extra,
    }


def run_mem(mode: str, n: int, batch_size: int) -> dict:
    """Run one memory worker in a fresh process.

    On Linux ``ru_maxrss`` survives ``execve``: a child exec'd straight from this (large) process
    would report *our* peak. So the worker is started by a shell that forks it (``; exit $?``
    keeps the shell from exec'ing it), giving it a fresh high-water mark; ``VmHWM`` (per process
    image) is recorded as a cross-check.
    """
    argv = [
        sys.executable,
        __file__,
        "--_mem-worker",
        mode,
        "--images",
        str(n),
        "--batch-size",
        str(batch_size),
    ]
    cmd = ["/bin/sh", "-c", " ".join(shlex.quote(a) for a in argv) + "; exit $?"]
    env = dict(os.environ, TQDM_DISABLE="1")
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = next((ln for ln in reversed(p.stdout.splitlines()) if ln.startswith("{")), None)
    if p.returncode != 0 or line is None:
        raise SystemExit(f"memory worker {mode}/{n} failed (rc={p.returncode}):\n{p.stderr[-3000:]}")
    r = json.loads(line)
    if abs(r["vm_hwm_mb"] - r["peak_rss_mb"]) > 0.02 * r["vm_hwm_mb"]:
        print(f"  WARNING {mode}/{n}: ru_maxrss {r['peak_rss_mb']} MB != VmHWM {r['vm_hwm_mb']} MB")
    return r


def memory_section(batch_size: int, trials: int, scan_trials: int) -> dict:
    """Median peak RSS over ``trials`` fresh processes per (mode, image count), 16 and 64 alternating."""
    plan = {"sinkscope": trials, "hf": trials, "scan": scan_trials}
    out = {}
    for mode, k in plan.items():
        if k < 1:
            continue
        runs: dict[int, list[dict]] = {16: [], 64: []}
        for _ in range(k):
            for n in (16, 64):
                runs[n].append(run_mem(mode, n, batch_size))
        peak = {n: statistics.median(r["peak_rss_mb"] for r in rs) for n, rs in runs.items()}
        load = {n: statistics.median(r["rss_after_load_mb"] for r in rs) for n, rs in runs.items()}
        growth = 100.0 * (peak[64] / peak[16] - 1.0)
        out[mode] = {
            "trials": k,
            "median_peak_rss_mb": {str(n): v for n, v in peak.items()},
            "median_rss_after_load_mb": {str(n): v for n, v in load.items()},
            "peak_growth_pct": round(growth, 2),
            "runs": {str(n): rs for n, rs in runs.items()},
        }
        spread = {n: f"{min(r['peak_rss_mb'] for r in rs):.0f}-{max(r['peak_rss_mb'] for r in rs):.0f}"
                  for n, rs in runs.items()}  # fmt: skip
        print(
            f"  {mode:10s} peak RSS 16 img {peak[16]:7.1f} MB ({spread[16]}) | 64 img {peak[64]:7.1f} MB "
            f"({spread[64]}) | growth {growth:+6.2f}% | post-load RSS {load[16]:.0f} MB | {k} trial(s)",
            flush=True,
        )
        if mode == "scan":
            tab = {n: runs[n][0].get("tokens_table_mb") for n in (16, 64)}
            print(f"  {'':10s} the tidy token table it keeps: {tab[16]} MB (16 img) -> {tab[64]} MB (64 img)")
        else:
            traj = runs[64][len(runs[64]) // 2]["peak_after_batch_mb"]
            print(f"  {'':10s} peak after each batch (64 img): {' '.join(f'{v:.0f}' for v in traj)}")
    return out


# -- main ---------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=16, help="embedded images to time (<=16; default 16)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=11, help="timed rounds over all methods (default 11)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    ap.add_argument("--out", default="benchmarks/results/scan.json")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-RSS subprocesses")
    ap.add_argument("--mem-trials", type=int, default=3, help="fresh processes per memory figure (default 3)")
    ap.add_argument("--scan-mem-trials", type=int, default=3,
                    help="the same for the full scan() API (0 = skip; default 3)")  # fmt: skip
    ap.add_argument("--_mem-worker", dest="mem_worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.mem_worker:
        print(json.dumps(mem_worker(args.mem_worker, args.images, args.batch_size)), flush=True)
        return 0
    if not 1 <= args.images <= 16:
        raise SystemExit("--images must be 1..16 (the embedded images) for the timing part")

    t_all = time.perf_counter()
    info = machine_info()
    print(f"sinkscope scan benchmark - {MODEL}, {args.images} images, batch {args.batch_size}, CPU")
    print(f"torch {info['torch']}, transformers {info['transformers']}, {info['torch_threads']} threads, "
          f"{info['cpu_model']} x{info['cpu_count']}")  # fmt: skip

    ad, ade = load_pair(MODEL)
    items = image_items(args.images)
    arrays = [it.load() for it in items]
    inputs = [ad.prepare(arrays[s : s + args.batch_size]) for s in range(0, len(arrays), args.batch_size)]
    del arrays
    fns = make_methods(ad, ade, inputs)

    checks = verify(fns)  # also the first warm-up of the capture paths
    print("equivalence: " + ", ".join(f"{k}={v:.2e}" if isinstance(v, float) else f"{k}={v}"
                                      for k, v in checks.items()))  # fmt: skip
    if not checks["ok"]:
        print(f"ABORT: methods disagree (norm rtol {NORM_RTOL}, attention atol {ATTN_ATOL}); timings would "
              "not compare like with like", file=sys.stderr)  # fmt: skip
        return 1

    times: dict[str, list[float]] = {m: [] for m in METHODS}
    cpu: dict[str, list[float]] = {m: [] for m in METHODS}  # process CPU time: less hit by other load
    loadavg: list[float] = []
    t_timing = time.perf_counter()
    with torch.no_grad():
        for _ in range(args.warmup):
            for m in METHODS:
                fns[m]()
        for r in range(args.repeats):
            order = METHODS[r % len(METHODS) :] + METHODS[: r % len(METHODS)]
            for m in order:
                gc.collect()
                c0, t0 = time.process_time(), time.perf_counter()
                res = fns[m]()
                times[m].append(time.perf_counter() - t0)
                cpu[m].append(time.process_time() - c0)
                del res
            loadavg.append(os.getloadavg()[0])
            print(f"  repeat {r + 1}/{args.repeats}: "
                  + " ".join(f"{m}={times[m][-1]:.3f}" for m in METHODS), flush=True)  # fmt: skip

    t_timing = time.perf_counter() - t_timing
    med = {m: statistics.median(v) for m, v in times.items()}
    med_cpu = {m: statistics.median(v) for m, v in cpu.items()}
    ratio_cpu = {m: med_cpu[m] / med_cpu["bare_eager"] for m in METHODS}
    # repeats more than 1.5x slower than the method's best: another process took the cores
    noisy = {m: sum(t > 1.5 * min(v) for t in v) for m, v in times.items()}
    ratio = {m: med[m] / med["bare_eager"] for m in METHODS}
    ratio_sdpa = {m: med[m] / med["bare_sdpa"] for m in METHODS}

    print()
    print(
        f"{'method':24s} {'median s':>9s} {'min s':>7s} {'max s':>7s} {'vs eager':>9s} {'vs sdpa':>8s}"
        f" {'cpu-time vs eager':>17s}  target"
    )
    verdicts = {}
    for m in METHODS:
        tgt = ""
        if m in TARGETS:
            ok = ratio[m] <= TARGETS[m]
            verdicts[m] = {"target_ratio": TARGETS[m], "ratio": round(ratio[m], 4), "met": ok}
            tgt = f"<= {TARGETS[m]:.2f}x  {'met' if ok else 'MISSED'}"
        elif m == "hf_attentions_received":
            tgt = f"(usual route, said ~{USUAL_ROUTE_REFERENCE:.2f}x)"
        elif m == "bare_eager":
            tgt = "(baseline)"
        print(f"{m:24s} {med[m]:9.3f} {min(times[m]):7.3f} {max(times[m]):7.3f} {ratio[m]:8.3f}x "
              f"{ratio_sdpa[m]:7.3f}x {ratio_cpu[m]:16.3f}x  {tgt}")  # fmt: skip
    n_noisy = max(noisy.values())
    print(f"(timing section {t_timing:.0f} s; load average per repeat {min(loadavg):.1f}-{max(loadavg):.1f})")
    if n_noisy > args.repeats // 4:
        which = ", ".join(f"{m} {k}/{args.repeats}" for m, k in noisy.items() if k > args.repeats // 4)
        print(f"WARNING: repeats > 1.5x the method's best time: {which} - other processes competing for "
              "the cores, or the method's own variance (see raw_s in the JSON); treat those medians with care")  # fmt: skip

    memory = None
    if not args.no_memory:
        print("\npeak RSS (fresh subprocess each; norms + attention for all layers, batch "
              f"{args.batch_size}; 64 = the 16 images x4):")  # fmt: skip
        memory = memory_section(args.batch_size, args.mem_trials, args.scan_mem_trials)
        g = memory["sinkscope"]["peak_growth_pct"]
        ok = g < MEM_GROWTH_TARGET
        verdicts["memory_growth_sinkscope"] = {"target_pct": MEM_GROWTH_TARGET, "growth_pct": g, "met": ok}
        print(f"  sinkscope forward-path growth {g:+.2f}% : target < {MEM_GROWTH_TARGET:.0f}% "
              f"{'met' if ok else 'MISSED'}")  # fmt: skip

    result = {
        "benchmark": "bench_scan",
        "model": MODEL,
        "images": args.images,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "machine": info,
        "equivalence": checks,
        "median_s": {m: round(v, 5) for m, v in med.items()},
        "ratio_to_bare_eager": {m: round(v, 4) for m, v in ratio.items()},
        "ratio_to_bare_sdpa": {m: round(v, 4) for m, v in ratio_sdpa.items()},
        "raw_s": {m: [round(t, 5) for t in v] for m, v in times.items()},
        "median_cpu_s": {m: round(v, 5) for m, v in med_cpu.items()},
        "cpu_ratio_to_bare_eager": {m: round(v, 4) for m, v in ratio_cpu.items()},
        "raw_cpu_s": {m: [round(t, 5) for t in v] for m, v in cpu.items()},
        "noisy_repeats": noisy,
        "loadavg_1min_per_repeat": [round(x, 2) for x in loadavg],
        "targets": verdicts,
        "memory": memory,
        "wall_s": round(time.perf_counter() - t_all, 1),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    missed = [k for k, v in verdicts.items() if not v["met"]]
    print(f"\ntargets missed: {', '.join(missed)}" if missed else "\nall targets met")
    print(f"wrote {out} ({result['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
