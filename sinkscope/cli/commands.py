"""What each ``sinkscope`` subcommand does with its parsed options.

For ``scan``, ``probe``, ``flow`` and ``decode`` there are two steps: ``scan_config(args)`` (and
the like) turns the options into a run config of :mod:`sinkscope.config`, and ``_cmd_scan(args)``
builds it through :func:`_config` (a refused value becomes a :class:`UsageError`, exit status 2,
before any work), runs it with :func:`sinkscope.api.run` and prints a short summary. ``report`` and
``models`` need no config. :data:`COMMANDS` maps each subcommand name to its ``_cmd_*`` function.

>>> from sinkscope.cli.parser import build_parser
>>> args = build_parser().parse_args(["scan", "--model", "tiny-dinov2+sinks", "--threshold", "100"])
>>> cfg = scan_config(args)
>>> cfg.model, cfg.threshold, cfg.report
('tiny-dinov2+sinks', 100.0, True)
"""

from __future__ import annotations

import argparse

from .._utils import SinkscopeError


class UsageError(SinkscopeError):
    """A bad option value: reported in one line with exit status 2, before any work."""


def _config(make):
    """Build a run config from parsed options; a refused value is a usage error (exit 2).

    >>> from sinkscope.cli.parser import build_parser
    >>> _config(lambda: scan_config(build_parser().parse_args(["scan", "--batch-size", "0"])))
    Traceback (most recent call last):
    ...
    sinkscope.cli.commands.UsageError: batch_size: must be an integer >= 1, got 0
    """
    try:
        cfg = make()
        if hasattr(cfg, "check_runnable"):
            cfg.check_runnable()  # e.g. --device cuda on a machine without CUDA
        return cfg
    except SinkscopeError as e:
        raise UsageError(str(e)) from None


def _tuple(values) -> tuple | None:
    """A repeated option's list as a tuple; None when it was not given."""
    return tuple(values) if values else None


def scan_config(a: argparse.Namespace):
    """``sinkscope scan`` options -> :class:`~sinkscope.config.ScanConfig`."""
    from ..config import ScanConfig

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
    """Run ``sinkscope scan`` and print the sinks it found."""
    from ..api import run

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
    from ..config import ProbeConfig

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
        sink_rule=a.sink_rule,
        max_images=a.max_images,
        batch_size=a.batch_size,
        image_size=a.image_size,
        device=a.device,
        dtype=a.dtype,
        cache=not a.no_cache,
        n_jobs=a.jobs,
        out=a.out,
    )


def _other_process() -> bool:
    """True in a process of a data-parallel run other than the main one (``RANK`` > 0)."""
    import os

    return int(os.environ.get("RANK", "0") or 0) > 0


def _cmd_probe(a: argparse.Namespace) -> int:
    """Run ``sinkscope probe`` and print the accuracy of every layer and token group."""
    from ..api import run

    res = run(_config(lambda: probe_config(a)), progress=not a.quiet)
    if _other_process():  # under accelerate launch the main process prints the run once
        return 0
    t = res.table
    for label in t.label.unique():
        piv = t[t.label == label].pivot(index="layer", columns="group", values="accuracy").round(3)
        print(f"label {label!r} (chance {t[t.label == label].chance.max():.3f}):")
        print(piv.to_string())
    rule = res.summary["rule"]
    print(f"sink rule: {rule['description']} ({rule.get('reason', 'given')})")
    print(f"wrote {res.out / 'probe.csv'}, {res.out / 'summary.json'}, {res.out / 'probe.html'}")
    return 0


def flow_config(a: argparse.Namespace):
    """``sinkscope flow`` options -> :class:`~sinkscope.config.FlowConfig`."""
    from ..config import FlowConfig

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
        variants=tuple(v.strip() for arg in (a.variant or []) for v in arg.split(",") if v.strip()),
        sink_rule=a.sink_rule,
        positions=a.positions,
        out=a.out,
    )


def _cmd_flow(a: argparse.Namespace) -> int:
    """Run ``sinkscope flow`` and print its notes and the size of every table."""
    from ..api import run

    res = run(_config(lambda: flow_config(a)), progress=not a.quiet)
    if _other_process():
        return 0
    s = res["summary"]
    if s.get("warning"):
        print(f"note: {s['warning']}")
    rule = s.get("vit_rule") or {}
    print(f"ViT sink rule: {rule.get('description')} ({rule.get('reason', 'given')})")
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
    """``sinkscope decode`` options -> :class:`~sinkscope.config.DecodeConfig`.

    Each ``--word LABEL=W1,W2`` adds words to its label:

    >>> from sinkscope.cli.parser import build_parser
    >>> a = build_parser().parse_args(["decode", "--word", "cat=cat,cats", "--word", "cat=kitten"])
    >>> decode_config(a).words
    (('cat', ('cat', 'cats', 'kitten')),)
    """
    from ..config import DecodeConfig

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
        sink_rule=a.sink_rule,
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
    """Run ``sinkscope decode`` and print the decoding rate of sink and non-sink tokens."""
    from ..api import run

    res = run(_config(lambda: decode_config(a)), progress=not a.quiet)
    s = res.summary
    if s.get("warning"):
        print(f"note: {s['warning']}")
    print(f"sink rule: {s['sink_rule']['description']} ({s['sink_rule'].get('reason', 'given')})")
    cols = ["group", "scope", "n_images", "n_tokens", "n_hits", "rate", "ci_low", "ci_high"]
    print(res.rates[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"wrote decode_rate.csv, decode_tokens.csv, summary.json and decode.html to {a.out}")
    return 0


def _cmd_report(a: argparse.Namespace) -> int:
    """Write one HTML page from saved runs (``sinkscope report``), printing what each run adds."""
    from ..viz.report import build_sections, check_report_target, write_report

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


def _cmd_models(a: argparse.Namespace) -> int:
    """Print the embedded model names (``sinkscope models``).

    >>> _cmd_models(None)
    dinov2-small       real DINOv2 ViT-S/14 ...
    ...
    0
    """
    from ..models import list_models

    for name, desc in list_models().items():
        print(f"{name:18s} {desc}")
    return 0


#: Subcommand name -> the function that runs it (``figures`` has its own parser: see ``main``).
COMMANDS = {
    "scan": _cmd_scan,
    "probe": _cmd_probe,
    "flow": _cmd_flow,
    "report": _cmd_report,
    "decode": _cmd_decode,
    "models": _cmd_models,
}
