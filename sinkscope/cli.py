"""The ``sinkscope`` command line.

Examples::

    sinkscope scan                                   # dinov2-small on the embedded images
    sinkscope scan --model tiny-dinov2+sinks --method all --out runs/tiny
    sinkscope scan --model openai/clip-vit-large-patch14-336 --images photos/ --threshold 100 \\
                   --device cuda --dtype float16 --out runs/clip
    sinkscope scan --model smollm2-135m --text "The capital of France is" --method dims
    sinkscope scan --images photos/ --out runs/x --resume   # continue an interrupted scan
    sinkscope probe --dataset lfw-faces --out runs/probe    # linear probes per layer and token group
    sinkscope flow --out runs/flow                   # information pathways on mini-llava
    sinkscope decode --out runs/decode               # sink vs non-sink tokens decoding to the object word
    sinkscope report runs/x runs/probe runs/flow --out report.html   # one offline HTML page
    sinkscope figures                                # regenerate figures/out from figures/figures.toml
    sinkscope models                                 # embedded model names
"""

from __future__ import annotations

import argparse
import logging
import sys

from ._utils import SinkscopeError

SCAN_EXAMPLES = """examples:
  sinkscope scan
  sinkscope scan --model tiny-dinov2+sinks --method all --out runs/tiny
  sinkscope scan --model openai/clip-vit-large-patch14-336 --images photos/ --threshold 100 \\
                 --layers 23 --device cuda --dtype float16 --out runs/clip
  sinkscope scan --model llava-hf/llava-1.5-7b-hf --images list.csv --method all --out runs/llava
  sinkscope scan --model smollm2-135m --text "The capital of France is" --method dims --tau 20
  sinkscope scan --images photos/ --out runs/x --resume
"""


PROBE_EXAMPLES = """examples:
  sinkscope probe                                       # dinov2-small on lfw-faces, all layers
  sinkscope probe --dataset textile --max-images 600 --groups cls,mean,random --out runs/textile
  sinkscope probe --model openai/clip-vit-large-patch14-336 --dataset photos.csv --label object \\
                  --label lighting --threshold 100 --groups sink,nonsink,cls,matched --device cuda
  sinkscope probe --dataset digits --label col --groups random,sink   # position regression (R2)
"""


FLOW_EXAMPLES = """examples:
  sinkscope flow                                     # mini-llava (untrained projector) on one embedded photo
  sinkscope flow --model tiny-llava+sinks --analysis propagation --analysis knockout --stride 2
  sinkscope flow --model llava-hf/llava-1.5-7b-hf --images cat.jpg --prompt "What animal is this?" \\
                 --vit-threshold 100 --generate 8 --device cuda --dtype float16 --out runs/llava-flow
  sinkscope flow --model dinov2-small --analysis rollout    # ViT only
"""


DECODE_EXAMPLES = """examples:
  sinkscope decode                                   # mini-llava on 40 lfw-faces images (top-2-norm surrogate sinks)
  sinkscope decode --dataset digits --max-images 100 --out runs/decode-digits
  sinkscope decode --model llava-hf/llava-1.5-7b-hf --dataset cats_people.csv --word cat=cat,cats,kitten \\
                   --word person=person,man,woman --vit-threshold 100 --max-images 0 --device cuda
"""


REPORT_EXAMPLES = """examples:
  sinkscope report sinkscope-out                             # the default scan's run folder
  sinkscope report runs/scan runs/probe runs/flow --out report.html
  sinkscope report runs/clip --title "CLIP ViT-L/14-336 sinks" --out clip.html
"""


def _image_size(s: str):
    try:
        parts = [int(x) for x in s.lower().replace("x", ",").split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"bad image size {s!r}: use 224 or 336x448 (height x width)"
        ) from None
    return parts[0] if len(parts) == 1 else tuple(parts[:2])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sinkscope",
        description="Find and measure attention sinks in vision transformers, LVLMs and LLMs.",
        epilog=__doc__.split("Examples::", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser(
        "scan",
        help="locate sinks: tokens.parquet, summary.json, report.html",
        description="Scan a model on images (or prompts) and locate its sinks by norm, attention received "
        "and sink dimensions. With no arguments: dinov2-small on the embedded sample images.",
        epilog=SCAN_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument(
        "--model",
        default="dinov2-small",
        help="embedded name, local directory or hub id (default: %(default)s)",
    )
    s.add_argument(
        "--images",
        action="append",
        metavar="PATH",
        help="image file, folder or CSV/TSV/JSONL manifest (repeatable); 'embedded' or 'embedded:16' "
        "for the bundled images (default)",
    )
    s.add_argument("--text", action="append", metavar="PROMPT", help="prompt for a causal LM (repeatable)")
    s.add_argument(
        "--method",
        choices=["norm", "attention", "dims", "all"],
        default="norm",
        help="detection rule; 'all' applies every rule, norm first (default: %(default)s)",
    )
    g = s.add_argument_group("norm rule (default: automatic gap detection)")
    x = g.add_mutually_exclusive_group()
    x.add_argument(
        "--threshold", type=float, help="absolute L2-norm threshold (paper: 100 for CLIP-L in LLaVA)"
    )
    x.add_argument("--relative", type=float, help="threshold as a multiple of the image's median patch norm")
    g.add_argument(
        "--auto-per-image",
        action="store_true",
        help="automatic rule: find the norm gap in each image separately instead of pooling each layer "
        "over all images (an image's sinks then do not depend on the others)",
    )
    g = s.add_argument_group("attention rule")
    g.add_argument(
        "--attn-factor",
        type=float,
        default=10.0,
        help="sink when received >= F x uniform share (default: %(default)s)",
    )
    g.add_argument("--attn-fraction", type=float, help="sink when received >= this absolute share instead")
    g = s.add_argument_group("dims rule")
    g.add_argument(
        "--tau",
        type=float,
        default=20.0,
        help="max |x[d]|/RMS(x) threshold over sink dims (default: %(default)s)",
    )
    g.add_argument(
        "--massive-abs",
        type=float,
        default=100.0,
        help="massive activation: |a| > this (default: %(default)s)",
    )
    g.add_argument(
        "--massive-ratio",
        type=float,
        default=1000.0,
        help="... and >= this x median |a| (default: %(default)s)",
    )
    g.add_argument(
        "--dims-min-layer",
        type=int,
        default=0,
        help="first layer the dims rule checks (default: %(default)s)",
    )
    s.add_argument(
        "--layers", default="all", help="layers to scan: all, 0,3,5 or 4:9 (0 = embeddings; default: all)"
    )
    s.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default: %(default)s)")
    s.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: where the model loads)")
    s.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "float16", "bfloat16"],
        help="model dtype (norms are fp32 anyway)",
    )
    s.add_argument(
        "--image-size",
        type=_image_size,
        default=None,
        help="resize inputs to 224 or HxW (no crop) instead of the processor's default",
    )
    s.add_argument(
        "--save-layers",
        default=None,
        metavar="LAYERS",
        help="also store full hidden states of these layers in OUT/activations (safetensors shards)",
    )
    s.add_argument(
        "--save-dtype",
        default="float32",
        choices=["float32", "float16", "bfloat16"],
        help="dtype of stored activations (default: %(default)s)",
    )
    s.add_argument("--out", default="sinkscope-out", help="output folder (default: %(default)s)")
    s.add_argument("--resume", action="store_true", help="continue an interrupted scan in --out")
    s.add_argument(
        "--overwrite",
        action="store_true",
        help="--out may be a folder sinkscope did not write: replace the scan's outputs there",
    )
    s.add_argument("--no-report", action="store_true", help="skip report.html")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    pr = sub.add_parser(
        "probe",
        help="linear probes on sink / non-sink / CLS / pooled tokens: probe.csv, summary.json, probe.html",
        description="Capture one vector per (image, layer, token group) once (cached), then fit image-grouped, "
        "stratified k-fold L2 logistic-regression probes for every layer and group, with a label-shuffle control.",
        epilog=PROBE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pr.add_argument(
        "--model",
        default="dinov2-small",
        help="embedded name, local directory or hub id (default: %(default)s)",
    )
    pr.add_argument(
        "--dataset",
        default="lfw-faces",
        help="lfw-faces, digits, textile, samples, a class-subfolder directory, a CSV/JSONL manifest, "
        "imagefolder:DIR or hf:NAME (default: %(default)s)",
    )
    pr.add_argument(
        "--label",
        action="append",
        help="label column(s) to probe (repeatable; 'row'/'col' = position "
        "regression of single-token groups); default: every label column",
    )
    pr.add_argument(
        "--groups",
        default="cls,mean,random,sink,nonsink,nonsink_random",
        help="token groups: cls, registers, mean, random, sink, nonsink, nonsink_random, matched "
        "(default: %(default)s)",
    )
    pr.add_argument("--layers", default="all", help="layers: all, 0,3,5 or 4:9 (default: all)")
    pr.add_argument("--folds", type=int, default=5, help="outer folds (default: %(default)s)")
    pr.add_argument(
        "--seed", type=int, default=0, help="seed for splits, random tokens, shuffles (default: %(default)s)"
    )
    x = pr.add_mutually_exclusive_group()
    x.add_argument("--threshold", type=float, help="sink rule: absolute L2-norm threshold")
    x.add_argument(
        "--relative",
        type=float,
        default=None,
        help="sink rule: multiple of the image's median patch norm (default 5)",
    )
    pr.add_argument("--max-images", type=int, help="random subset of this many images (seeded)")
    pr.add_argument(
        "--batch-size", type=int, default=16, help="images per forward pass (default: %(default)s)"
    )
    pr.add_argument(
        "--image-size", type=_image_size, default=None, help="resize inputs to 224 or HxW (no crop)"
    )
    pr.add_argument("--device", default=None)
    pr.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    pr.add_argument("--no-cache", action="store_true", help="recompute features even if cached")
    pr.add_argument("--jobs", type=int, default=None, help="parallel probe fits (default: all cores)")
    pr.add_argument("--out", default="sinkscope-probe", help="output folder (default: %(default)s)")
    pr.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    fl = sub.add_parser(
        "flow",
        help="attention flow: rollout, ViT->LLM propagation, knockout, decoding, attribution -> tables + flow.html",
        description="Trace information pathways inside the ViT (rollout) and from ViT tokens into the LLM of a "
        "LLaVA-style model (attention by ViT-norm bin, knockout, isolated-token decoding, captum attribution).",
        epilog=FLOW_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    fl.add_argument(
        "--model",
        default="mini-llava",
        help="a LLaVA-style model, or a ViT for rollout only (default: %(default)s)",
    )
    fl.add_argument(
        "--images",
        action="append",
        metavar="PATH",
        help="image file/folder/manifest (repeatable); default: one embedded photo",
    )
    fl.add_argument(
        "--prompt",
        default="What is the main object in the image?",
        help="the question (one <image> marker per image, or none)",
    )
    fl.add_argument(
        "--analysis",
        action="append",
        choices=[
            "rollout",
            "propagation",
            "knockout",
            "decode",
            "attribution",
            "redundancy",
            "relevancy",
            "all",
        ],
        help="analyses to run (repeatable; default: all)",
    )
    x = fl.add_mutually_exclusive_group()
    x.add_argument(
        "--vit-threshold", type=float, help="ViT sink rule: absolute norm threshold (paper: 100 for CLIP-L)"
    )
    x.add_argument(
        "--vit-relative",
        type=float,
        default=5.0,
        help="ViT sink rule: x image median norm (default: %(default)s)",
    )
    fl.add_argument(
        "--llm-tau",
        type=float,
        default=20.0,
        help="LLM sink rule: max|x[d]|/RMS over sink dims (default: %(default)s)",
    )
    fl.add_argument(
        "--generate",
        type=int,
        default=0,
        help="average attention of N generated tokens instead of the prompt's text",
    )
    fl.add_argument(
        "--window", type=int, default=9, help="knockout window in LLM layers (default: %(default)s)"
    )
    fl.add_argument(
        "--stride", type=int, default=1, help="step between knockout windows (default: %(default)s)"
    )
    fl.add_argument("--bin-width", type=float, default=5.0, help="ViT-norm bin width (default: %(default)s)")
    fl.add_argument(
        "--attribution-steps", type=int, default=64, help="integrated-gradients steps to start from, doubled (up to 256) until the attributions add up to the logit difference within 5%% (default: %(default)s)"
    )
    fl.add_argument("--device", default=None)
    fl.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    fl.add_argument("--out", default="sinkscope-flow", help="output folder (default: %(default)s)")
    fl.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    fl.add_argument(
        "--chat",
        action="store_true",
        help="wrap the prompt in the tokenizer's chat template (text, not an image, starts the sequence)",
    )
    fl.add_argument(
        "--sink-dims-from",
        choices=["text", "first_text_token", "multimodal"],
        default="text",
        help="where the LLM sink dims are discovered: a text-only pass of the prompt (Kang et al.; "
        "default), its first text token, or the whole multimodal sequence",
    )

    dc = sub.add_parser(
        "decode",
        help="word-distribution decoding: share of sink vs non-sink visual tokens decoding to the object word",
        description="Isolate visual tokens inside the LLM of a LLaVA-style model, decode each through the LM "
        "head, and report the share of sink vs non-sink tokens whose top-k words name the image's label "
        "(binomial CIs) -> decode_rate.csv, decode_tokens.csv, summary.json, decode.html.",
        epilog=DECODE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    dc.add_argument("--model", default="mini-llava", help="a LLaVA-style model (default: %(default)s)")
    dc.add_argument(
        "--dataset",
        default="lfw-faces",
        help="lfw-faces, digits (built-in word lists) or any labelled set with --word (default: %(default)s)",
    )
    dc.add_argument("--label", default=None, help="label column (default: the first)")
    dc.add_argument(
        "--word",
        action="append",
        metavar="LABEL=W1,W2",
        help="object words of a label (repeatable; replaces the built-in list), e.g. --word cat=cat,kitten",
    )
    x = dc.add_mutually_exclusive_group()
    x.add_argument("--vit-threshold", type=float, help="sink rule: absolute ViT norm at the feature layer")
    x.add_argument("--vit-relative", type=float, help="sink rule: x the image's median patch norm")
    x.add_argument(
        "--top-norm",
        type=int,
        metavar="N",
        help="surrogate sink rule: the N highest-norm patches per image (default on mini-llava: 2, since "
        "DINOv2-S has no norm outliers; elsewhere the default is --vit-relative 5)",
    )
    dc.add_argument(
        "--top-k", type=int, default=5, help="decoded tokens checked per token (default: %(default)s)"
    )
    dc.add_argument(
        "--nonsinks",
        type=int,
        default=8,
        help="random non-sink patches per image; 0 = all (default: %(default)s)",
    )
    dc.add_argument(
        "--max-images", type=int, default=40, help="stratified random subset; 0 = all (default: %(default)s)"
    )
    dc.add_argument(
        "--seed", type=int, default=0, help="seed of the subset and non-sinks (default: %(default)s)"
    )
    dc.add_argument(
        "--method",
        choices=["batched", "mask"],
        default="batched",
        help="batched one-token sequences (exact for isolated tokens) or one masked full forward per token",
    )
    dc.add_argument("--ci", choices=["wilson", "clopper-pearson"], default="wilson", help="binomial interval")
    dc.add_argument("--confidence", type=float, default=0.95, help="interval level (default: %(default)s)")
    dc.add_argument("--batch-size", type=int, default=8, help="images per forward (default: %(default)s)")
    dc.add_argument("--device", default=None)
    dc.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    dc.add_argument("--out", default="sinkscope-decode", help="output folder (default: %(default)s)")
    dc.add_argument(
        "--overwrite",
        action="store_true",
        help="replace decode outputs in a folder sinkscope decode did not write",
    )
    dc.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    r = sub.add_parser(
        "report",
        help="one self-contained HTML report from saved runs",
        description="Combine the figures of one or more saved runs (scan, probe, flow; recognised by their "
        "files) into one HTML page with plotly.js embedded, plus a short summary of the findings. "
        "Needs only the saved tables, never the model.",
        epilog=REPORT_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    r.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders written by scan / probe / flow")
    r.add_argument("--out", default="sinkscope-report.html", help="HTML file to write (default: %(default)s)")
    r.add_argument("--title", default=None, help="page title (default: built from the runs)")
    r.add_argument(
        "--overwrite", action="store_true", help="replace --out even when sinkscope did not write it"
    )

    sub.add_parser(
        "figures",
        help="regenerate every figure of figures/figures.toml (python -m sinkscope.figures)",
        description="Regenerate the project's figures from the declarative list; the options are those of "
        "`python -m sinkscope.figures --help`.",
        epilog="examples:\n  sinkscope figures\n  sinkscope figures --list\n  sinkscope figures --only dinov2-norms --force\n"
        "  sinkscope figures --tier paper      # CLIP ViT-L/14-336 and LLaVA-1.5-7B from the hub, GPU",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,
    )
    sub.add_parser(
        "models",
        help="list the embedded models",
        description="List the embedded (offline) model names.",
        epilog="examples:\n  sinkscope models\n  sinkscope scan --model tiny-clip+sinks   # a listed name",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return p


def _cmd_report(a: argparse.Namespace) -> int:
    from .viz.report import build_sections, check_report_target, write_report

    _config(lambda: check_report_target(a.out, a.overwrite))  # a usage error, before reading any run
    secs = []
    for d in a.runs:
        print(f"reading {d} ...", flush=True)
        secs += build_sections([d])
    for s in secs:
        print(f"{s.kind:6s} {s.path}: {len(s.figures)} figures")
        for f in s.findings:
            print(f"  - {f}")
    path = write_report(a.runs, a.out, title=a.title, sections=secs, overwrite=a.overwrite)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, self-contained)")
    return 0


class UsageError(SinkscopeError):
    """A bad option value: reported in one line with exit status 2, before any work."""


def _config(make):
    """Build a run config from parsed options; a refused value is a usage error (exit 2)."""
    try:
        cfg = make()
        if hasattr(cfg, "check_runnable"):
            cfg.check_runnable()  # e.g. --device cuda on a machine without CUDA
        return cfg
    except SinkscopeError as e:
        raise UsageError(str(e)) from None


def _tuple(values) -> tuple | None:
    return tuple(values) if values else None


def scan_config(a: argparse.Namespace):
    """``sinkscope scan`` options -> :class:`~sinkscope.config.ScanConfig`."""
    from .config import ScanConfig

    return ScanConfig(
        model=a.model,
        images=_tuple(a.images),
        texts=_tuple(a.text),
        method=a.method,
        threshold=a.threshold,
        relative=a.relative,
        auto_per_image=a.auto_per_image,
        attn_factor=a.attn_factor,
        attn_fraction=a.attn_fraction,
        tau=a.tau,
        massive_abs=a.massive_abs,
        massive_ratio=a.massive_ratio,
        dims_min_layer=a.dims_min_layer,
        layers=a.layers,
        batch_size=a.batch_size,
        device=a.device,
        dtype=a.dtype,
        image_size=a.image_size,
        save_layers=a.save_layers,
        save_dtype=a.save_dtype,
        out=a.out,
        resume=a.resume,
        overwrite=a.overwrite,
        report=not a.no_report,
    )


def _cmd_scan(a: argparse.Namespace) -> int:
    from .api import run

    res = run(_config(lambda: scan_config(a)), progress=not a.quiet)
    if (res.summary.get("distributed") or {}).get("rank", 0):
        return 0  # under accelerate / torchrun only the main process reports the merged run
    s = res.summary
    print(
        f"model: {s['model']['name']} ({s['model']['family']}), {s['n_ok']} scanned, {s['n_failed']} failed"
    )
    for r in s["rules"]:
        print(f"rule: {r['description']} -> {r['n_sinks']} sink token-layers")
    sinks = res.report.sinks()
    print(
        f"sink tokens (main rule): {len(sinks)}; emergence layer: {s['emergence_layer']}; sink dims: {s['sink_dims']}"
    )
    if len(sinks):
        print(sinks.head(10).to_string(index=False))
    print(
        f"wrote {res.out / 'tokens.parquet'}, {res.out / 'summary.json'}"
        + ("" if a.no_report else f", {res.out / 'report.html'}")
    )
    return 0


def probe_config(a: argparse.Namespace):
    """``sinkscope probe`` options -> :class:`~sinkscope.config.ProbeConfig`."""
    from .config import ProbeConfig

    return ProbeConfig(
        model=a.model,
        dataset=a.dataset,
        labels=_tuple(a.label),
        groups=tuple(g.strip() for g in a.groups.split(",") if g.strip()),
        layers=a.layers,
        folds=a.folds,
        seed=a.seed,
        threshold=a.threshold,
        relative=a.relative,
        max_images=a.max_images,
        batch_size=a.batch_size,
        image_size=a.image_size,
        device=a.device,
        dtype=a.dtype,
        cache=not a.no_cache,
        n_jobs=a.jobs,
        out=a.out,
    )


def _cmd_probe(a: argparse.Namespace) -> int:
    from .api import run

    res = run(_config(lambda: probe_config(a)), progress=not a.quiet)
    t = res.table
    for label in t.label.unique():
        piv = t[t.label == label].pivot(index="layer", columns="group", values="accuracy").round(3)
        print(f"label {label!r} (chance {t[t.label == label].chance.max():.3f}):")
        print(piv.to_string())
    print(f"sink rule: {res.summary['rule']['description']}")
    print(f"wrote {res.out / 'probe.csv'}, {res.out / 'summary.json'}, {res.out / 'probe.html'}")
    return 0


def flow_config(a: argparse.Namespace):
    """``sinkscope flow`` options -> :class:`~sinkscope.config.FlowConfig`."""
    from .config import FlowConfig

    analyses = None if not a.analysis or "all" in a.analysis else tuple(dict.fromkeys(a.analysis))
    return FlowConfig(
        model=a.model,
        images=_tuple(a.images),
        prompt=a.prompt,
        analyses=analyses,
        vit_threshold=a.vit_threshold,
        vit_relative=a.vit_relative,
        llm_tau=a.llm_tau,
        generate=a.generate,
        window=a.window,
        stride=a.stride,
        bin_width=a.bin_width,
        attribution_steps=a.attribution_steps,
        device=a.device,
        dtype=a.dtype,
        chat=a.chat,
        sink_dims_from=a.sink_dims_from,
        out=a.out,
    )


def _cmd_flow(a: argparse.Namespace) -> int:
    from .api import run

    res = run(_config(lambda: flow_config(a)), progress=not a.quiet)
    s = res["summary"]
    if s.get("warning"):
        print(f"note: {s['warning']}")
    for name, why in (s.get("analyses_skipped") or {}).items():
        print(f"skipped: {name} ({why})")
    note = (s.get("propagation") or {}).get("llm_rule_note")
    if note:
        print(f"caution: {note}")
    for name, df in res["tables"].items():
        print(f"{name}: {len(df)} rows")
    if "attention_by_group" in res["tables"]:
        print(res["tables"]["attention_by_group"].to_string(index=False))
    print(f"wrote tables, summary.json and flow.html to {a.out}")
    return 0


def decode_config(a: argparse.Namespace):
    """``sinkscope decode`` options -> :class:`~sinkscope.config.DecodeConfig`."""
    from .config import DecodeConfig

    words: dict[str, list[str]] = {}
    for spec in a.word or []:
        lab, sep, ws = spec.partition("=")
        if not sep or not lab.strip() or not ws.strip():
            raise SinkscopeError(f"bad --word {spec!r}: use LABEL=WORD1,WORD2")
        words.setdefault(lab.strip(), []).extend(w.strip() for w in ws.split(",") if w.strip())
    return DecodeConfig(
        model=a.model,
        dataset=a.dataset,
        label=a.label,
        words=tuple((k, tuple(v)) for k, v in words.items()) or None,
        vit_threshold=a.vit_threshold,
        vit_relative=a.vit_relative,
        top_norm=a.top_norm,
        top_k=a.top_k,
        nonsinks=a.nonsinks,
        max_images=a.max_images,
        seed=a.seed,
        method=a.method,
        ci=a.ci,
        confidence=a.confidence,
        batch_size=a.batch_size,
        device=a.device,
        dtype=a.dtype,
        out=a.out,
        overwrite=a.overwrite,
    )


def _cmd_decode(a: argparse.Namespace) -> int:
    from .api import run

    res = run(_config(lambda: decode_config(a)), progress=not a.quiet)
    s = res.summary
    if s.get("warning"):
        print(f"note: {s['warning']}")
    print(f"sink rule: {s['sink_rule']['description']}")
    cols = ["group", "scope", "n_images", "n_tokens", "n_hits", "rate", "ci_low", "ci_high"]
    print(res.rates[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"wrote decode_rate.csv, decode_tokens.csv, summary.json and decode.html to {a.out}")
    return 0


def _cmd_models(a: argparse.Namespace) -> int:
    from .models import list_models

    for name, desc in list_models().items():
        print(f"{name:18s} {desc}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["figures"]:  # its own parser: every option of python -m sinkscope.figures
        from .figures.cli import main as figures_main

        return figures_main(argv[1:])
    parser = build_parser()
    a = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if a.verbose else logging.INFO, format="%(levelname)s: %(message)s"
    )
    for noisy in ("transformers", "urllib3", "huggingface_hub", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if a.command is None:
        parser.print_help()
        return 2
    try:
        cmds = {
            "scan": _cmd_scan,
            "probe": _cmd_probe,
            "flow": _cmd_flow,
            "report": _cmd_report,
            "decode": _cmd_decode,
            "models": _cmd_models,
        }
        return cmds[a.command](a)
    except UsageError as e:
        print(f"sinkscope {a.command}: error: {e}", file=sys.stderr)
        return 2
    except SinkscopeError as e:
        print(f"sinkscope: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("sinkscope: interrupted; finished images are kept - rerun with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
