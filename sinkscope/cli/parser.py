"""The argument parser of ``sinkscope``: one small function per subcommand.

:func:`build_parser` makes the top-level parser and calls ``_add_scan``, ``_add_probe``,
``_add_flow``, ``_add_decode``, ``_add_report``, ``_add_figures`` and ``_add_models`` in turn, each
adding its subparser with its options (the longer ones in two or three parts, in the order
``--help`` lists them). The examples each ``--help`` ends with live in :mod:`sinkscope.cli.examples`.

>>> a = build_parser().parse_args(["scan", "--model", "tiny-dinov2+sinks", "--method", "all"])
>>> a.command, a.model, a.method, a.batch_size
('scan', 'tiny-dinov2+sinks', 'all', 8)
"""

from __future__ import annotations

import argparse

from .diysink_cmd import add_diysink
from .eval_cmd import add_eval
from .examples import (
    DECODE_EXAMPLES,
    FLOW_EXAMPLES,
    MAIN_EXAMPLES,
    PROBE_EXAMPLES,
    REPORT_EXAMPLES,
    SCAN_EXAMPLES,
)
from .train_cmd import add_train

#: the help of every ``--sink-rule`` of probe, flow and decode (the grammar of ``sinkscope eval --sink-rule``)
RULE_HELP = (
    "the ViT sink rule: norm (the automatic norm gap of each image), norm:100 (absolute; the paper's for "
    "CLIP-L/14-336), norm:x4 (x the image's median), topk:4 (a surrogate), attention:4, cls; @LAYER picks the "
    "ViT layer - as sinkscope eval --sink-rule (default: the model's - the automatic gap, or the rule a "
    "built-in model declares, topk:4 on dinov2-small and mini-llava - named with its reason in summary.json)"
)


def _add_rule_options(p: argparse.ArgumentParser, what: str, **old: str) -> None:
    """``--sink-rule`` and its old spellings ``old`` (flag -> the rule it stands for), one of them."""
    x = p.add_mutually_exclusive_group()
    x.add_argument("--sink-rule", default=None, metavar="RULE", help=f"{RULE_HELP}; {what}")
    for flag, spelled in old.items():
        kind = int if spelled.startswith("topk") else float
        x.add_argument(flag, type=kind, default=None, metavar=spelled.split(":")[1].lstrip("x"),
                       help=f"old spelling of --sink-rule {spelled}")  # fmt: skip


def _image_size(s: str):
    """``--image-size``: ``224`` -> 224, ``336x448`` (or ``336,448``) -> (height, width).

    >>> _image_size("224"), _image_size("336x448")
    (224, (336, 448))
    """
    try:
        parts = [int(x) for x in s.lower().replace("x", ",").split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"bad image size {s!r}: use 224 or 336x448 (height x width)"
        ) from None
    return parts[0] if len(parts) == 1 else tuple(parts[:2])


def build_parser() -> argparse.ArgumentParser:
    """The ``sinkscope`` parser: ``-v`` and one subcommand (``dest="command"``; None when omitted).

    >>> p = build_parser()
    >>> p.parse_args(["probe", "--dataset", "digits", "--label", "col"]).label
    ['col']
    >>> p.parse_args([]).command is None
    True
    """
    p = argparse.ArgumentParser(
        prog="sinkscope",
        description="Find and measure attention sinks in vision transformers, LVLMs and LLMs.",
        epilog=MAIN_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_add_scan, _add_probe, _add_flow, _add_decode, add_eval, add_train, add_diysink, _add_report, _add_figures, _add_models):
        add(sub)
    _no_abbreviations(p)
    return p


def _no_abbreviations(parser: argparse.ArgumentParser) -> None:
    """Turn argparse's prefix matching off on ``parser`` and every subcommand's parser (``flow
    --var`` must not be read as ``--variant``; ``eval --limi 2`` is an unrecognized argument)."""
    parser.allow_abbrev = False
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _no_abbreviations(sub)


def _add_scan(sub) -> None:
    """``sinkscope scan``: the inputs here, then the sink rules and the run options."""
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
    _add_scan_rules(s)
    _add_scan_run_options(s)


def _add_scan_rules(s: argparse.ArgumentParser) -> None:
    """The option groups of the three sink rules of ``scan``: norm, attention, dims."""
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


def _add_scan_run_options(s: argparse.ArgumentParser) -> None:
    """``scan``: layers, batching, device and dtype, stored activations, the output folder."""
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


def _add_probe(sub) -> None:
    """``sinkscope probe``: model, dataset, labels, token groups, folds, sink rule, output."""
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
    _add_rule_options(pr, "applied to the patches at every probed layer (no @LAYER)",
                      **{"--threshold": "norm:T", "--relative": "norm:xR"})  # fmt: skip
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


def _add_flow(sub) -> None:
    """``sinkscope flow``: model, images, prompt and analyses here, then the other options."""
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
    _add_flow_options(fl)


def _add_flow_options(fl: argparse.ArgumentParser) -> None:
    """``flow``: the ViT and LLM sink rules, generation, knockout, bins, device, output."""
    _add_rule_options(fl, "used by every analysis and --variant",
                      **{"--vit-threshold": "norm:T", "--vit-relative": "norm:xR"})  # fmt: skip
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
        "--attribution-steps",
        type=int,
        default=64,
        help="integrated-gradients steps to start from, doubled (up to 256) until the attributions add up "
        "to the logit difference within 5%% (default: %(default)s)",
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
    fl.add_argument(
        "--variant",
        action="append",
        help="repeatable or comma-separated interventions (both, sinks-front, sinks-end, sink-only, nonsink-only, "
        "random-k, lowest-norm-k, var): the attention the LLM gives each token group under each, against both "
        "-> attention_by_variant.csv and tokens_fed.parquet (the tokens each fed the LLM, as sinkscope eval writes)",
    )
    fl.add_argument(
        "--positions", default="reindex", choices=("reindex", "keep"), help="position ids for --variant"
    )


def _add_decode(sub) -> None:
    """``sinkscope decode``: model, dataset, object words and sink rule, then the other options."""
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
    _add_rule_options(dc, "at the vision feature layer",
                      **{"--vit-threshold": "norm:T", "--vit-relative": "norm:xR", "--top-norm": "topk:N"})  # fmt: skip
    _add_decode_options(dc)


def _add_decode_options(dc: argparse.ArgumentParser) -> None:
    """``decode``: top-k, subsets, decoding method, interval, batching, device, output."""
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


def _add_report(sub) -> None:
    """``sinkscope report RUN_DIR...``: one HTML page from saved runs."""
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


def _add_figures(sub) -> None:
    """``sinkscope figures``: listed for ``--help`` only; ``main`` hands its arguments to
    ``python -m sinkscope.figures`` before parsing (hence ``add_help=False``)."""
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


def _add_models(sub) -> None:
    """``sinkscope models``: the embedded model names."""
    sub.add_parser(
        "models",
        help="list the embedded models",
        description="List the embedded (offline) model names.",
        epilog="examples:\n  sinkscope models\n  sinkscope scan --model tiny-clip+sinks   # a listed name",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
