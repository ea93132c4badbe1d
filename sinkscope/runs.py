"""Run any analysis from its config, and read any saved run back as a typed result.

``execute(config)`` dispatches on the config's type (:mod:`sinkscope.config`), runs the analysis
and, when the config names an output folder, writes ``config.json`` beside the analysis' tables.
This module is the one reader and writer of run folders; pages are drawn one layer up
(:mod:`sinkscope.viz`), and ``sinkscope.run`` (:mod:`sinkscope.api`) does both. A run
folder is read back by :func:`load_run`, whose result holds the config, the summary and the tables:
``run(load_run(DIR).config)`` reruns it (same tables for the same seed).

>>> res = execute(ScanConfig(model="tiny-dinov2+sinks", images=("embedded:2",), out="runs/tiny"), progress=False)
>>> load_run("runs/tiny").tokens.equals(res.tokens)
True
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pandas as pd

from . import ownership
from ._utils import SinkscopeError, read_jsonl
from .config import (
    SCHEMA_VERSION,
    DecodeConfig,
    DIYSinkInitConfig,
    DIYSinkTrainConfig,
    EvalConfig,
    FlowConfig,
    ProbeConfig,
    RunConfig,
    ScanConfig,
    TrainProjectorConfig,
)

CONFIG_FILE = "config.json"


def execute(config: RunConfig, progress: bool = True):
    """Run the analysis ``config`` describes and write its tables and ``config.json`` (no page:
    ``sinkscope.run`` adds that); return its typed result (``ScanResult``, ``ProbeResult``,
    ``FlowResult`` or ``DecodeResult``), each holding ``config``.

    >>> res = execute(ScanConfig(model="tiny-dinov2+sinks", images=("embedded:1",)), progress=False)
    >>> res.config.method, int(res.tokens.layer.max())
    ('norm', 4)
    """
    if isinstance(config, RunConfig):
        config.check_runnable()
        check_folders(config)  # before any model loads
    if isinstance(config, ScanConfig):
        res = _run_scan(config, progress)
    elif isinstance(config, ProbeConfig):
        res = _run_probe(config, progress)
    elif isinstance(config, FlowConfig):
        res = _run_flow(config, progress)
    elif isinstance(config, DecodeConfig):
        res = _run_decode(config, progress)
    elif isinstance(config, EvalConfig):
        res = _run_eval(config, progress)
    elif isinstance(config, TrainProjectorConfig):
        res = _run_train_projector(config, progress)
    elif isinstance(config, DIYSinkInitConfig):
        from .training.diysink import init_diysink

        res = init_diysink(config.model, config.out, rule=config.sink_rule, progress=progress)
    elif isinstance(config, DIYSinkTrainConfig):
        res = _run_diysink_train(config, progress)
    else:
        raise SinkscopeError(f"run: not an analysis config: {type(config).__name__}")
    res.config = config
    rank = (getattr(res, "summary", None) or {}).get("distributed", {}).get("rank", 0)
    if config.out is not None and not rank:  # one writer: the main process
        config.save(Path(config.out) / CONFIG_FILE)
        ownership.record(config.out)  # the marker lists what the run wrote
    return res


#: config fields that only change how a run goes, never its results: left out of the settings a
#: probe's or flow's marker records (eval, train-projector and diysink say theirs where they resume)
HOW_IT_RUNS = frozenset({"out", "resume", "overwrite", "report", "device", "n_jobs", "cache", "cache_dir"})


def check_folders(config: RunConfig) -> None:
    """Every folder ``config`` writes follows :mod:`sinkscope.ownership` (new, empty or this
    command's own): ``out`` and ``cache_dir`` are checked here, before any model loads, and a
    ``probe`` / ``flow`` folder is claimed (the other analyses claim theirs as they start, where
    a resume is compared with the stored settings). A refusal is one line
    (:class:`~sinkscope.ownership.FolderRefused`, exit status 2 from the command line).

    >>> check_folders(ScanConfig(out="runs/brand-new-scan"))  # a new folder: nothing to refuse
    """
    kind = config.analysis
    out = getattr(config, "out", None)
    flags = {"resume": bool(getattr(config, "resume", False)), "overwrite": bool(getattr(config, "overwrite", False))}
    cache = getattr(config, "cache_dir", None)
    if cache is not None:
        ownership.check(cache, "feature-cache", ownership.OUTPUTS["feature-cache"], option="--cache-dir")
    if out is None:
        return
    ownership.check(out, kind, ownership.OUTPUTS[kind], **flags)
    if kind in ("probe", "flow") and not int(os.environ.get("RANK", "0") or 0):
        settings = {k: v for k, v in config.to_dict().items() if k not in HOW_IT_RUNS}
        ownership.claim(out, kind, ownership.OUTPUTS[kind], settings, **flags)


def _run_scan(c: ScanConfig, progress: bool):
    from .data import image_items
    from .scanning import scan

    images = image_items(c.images) if c.images else None
    return scan(
        model=c.model,
        images=images,
        texts=list(c.texts) if c.texts else None,
        method=c.method,
        layers=c.layers,
        batch_size=c.batch_size,
        out=c.out,
        resume=c.resume,
        overwrite=c.overwrite,
        device=c.device,
        dtype=c.dtype,
        image_size=c.image_size,
        progress=progress,
        save_layers=c.save_layers,
        save_dtype=c.save_dtype,
        threshold=c.threshold,
        relative=c.relative,
        attn_factor=c.attn_factor,
        attn_fraction=c.attn_fraction,
        tau=c.tau,
        massive_abs=c.massive_abs,
        massive_ratio=c.massive_ratio,
        dims_min_layer=c.dims_min_layer,
        auto_scope="image" if c.auto_per_image else "layer",
    )


def _run_probe(c: ProbeConfig, progress: bool):
    from .interventions.rules import given_rule
    from .probing import probe

    rule = given_rule(c.sink_rule, c.threshold, c.relative)  # None: the model's default rule
    return probe(
        model=c.model,
        dataset=c.dataset,
        labels=list(c.labels) if c.labels else None,
        groups=list(c.groups),
        layers=c.layers,
        folds=c.folds,
        seed=c.seed,
        rule=rule,
        max_images=c.max_images,
        batch_size=c.batch_size,
        image_size=c.image_size,
        device=c.device,
        dtype=c.dtype,
        out=c.out,
        cache=c.cache,
        progress=progress,
        n_jobs=c.n_jobs,
    )


def _run_flow(c: FlowConfig, progress: bool):
    from .flow.run import ANALYSES, run_flow

    return run_flow(
        model=c.model,
        images=list(c.images) if c.images else None,
        prompt=c.prompt,
        analyses=tuple(c.analyses) if c.analyses else ANALYSES,
        out=c.out,
        sink_rule=c.sink_rule,
        vit_threshold=c.vit_threshold,
        vit_relative=c.vit_relative,
        llm_tau=c.llm_tau,
        generate=c.generate,
        window=c.window,
        stride=c.stride,
        bin_width=c.bin_width,
        decode_nonsinks=c.decode_nonsinks,
        top_k=c.top_k,
        attribution_steps=c.attribution_steps,
        device=c.device,
        dtype=c.dtype,
        seed=c.seed,
        progress=progress,
        chat=c.chat,
        sink_dims_from=c.sink_dims_from,
        variants=c.variants,
        positions=c.positions,
    )


def _run_decode(c: DecodeConfig, progress: bool):
    from .flow.decoding import check_decode_out, decode_rate
    from .interventions.rules import given_rule

    if c.out is not None:
        check_decode_out(c.out, c.overwrite)  # before the model runs
    rule = given_rule(c.sink_rule, c.vit_threshold, c.vit_relative, c.top_norm)  # None: the model's default
    res = decode_rate(
        c.model,
        c.dataset,
        words={k: list(v) for k, v in c.words} if c.words else None,
        rule=rule,
        label=c.label,
        top_k=c.top_k,
        nonsinks_per_image=c.nonsinks or None,
        max_images=c.max_images or None,
        seed=c.seed,
        method=c.method,
        ci=c.ci,
        confidence=c.confidence,
        batch_size=c.batch_size,
        device=c.device,
        dtype=c.dtype,
        progress=progress,
    )
    if c.out is not None:
        res.save(c.out, overwrite=c.overwrite)
        res.out = Path(c.out)
    return res


def _run_eval(c: EvalConfig, progress: bool):
    from .evaluation.run import evaluate

    return evaluate(
        c.model,
        list(c.tasks),
        out=c.out,
        split=c.split,
        limit=c.limit,
        variants=c.variants,
        mode=c.mode,
        chat={"auto": "auto", "yes": True, "no": False}[c.chat],
        resume=c.resume,
        overwrite=c.overwrite,
        device=c.device,
        dtype=c.dtype,
        seed=c.seed,
        n_boot=c.n_boot,
        sink_rule=c.sink_rule,
        positions=c.positions,
        var_config=c.var,
        tt_config=c.tt_register,
        router=c.router,
        progress=progress,
    )


def _run_train_projector(c: TrainProjectorConfig, progress: bool):
    from .training import train_projector

    fields = ("stage", "steps", "batch_size", "lr", "warmup", "n_per_task", "turns", "seed", "save_every", "lora_rank", "lora_lr", "mixed_precision", "stop_after", "init_lora", "styles")
    return train_projector(
        c.model,
        out=c.out,
        real=c.real,
        real_limit=c.real_limit,
        snapshot_every=c.snapshot_every,
        resume=c.resume,
        init=c.init,
        cache_dir=c.cache_dir,
        device=c.device,
        progress=progress,
        **{k: getattr(c, k) for k in fields},
    )


def _run_diysink_train(c: DIYSinkTrainConfig, progress: bool):
    from dataclasses import fields

    from .training.diysink import train_diysink

    kw = {f.name: getattr(c, f.name) for f in fields(c) if f.name not in ("model", "out")}
    return train_diysink(c.model, c.out, progress=progress, **kw)


# -- reading run folders back ---------------------------------------------------------------------


def run_kind(run_dir: str | Path) -> str:
    """``scan``, ``probe`` or ``flow``: from ``config.json``, else from the files a run wrote."""
    d = Path(run_dir)
    if (d / CONFIG_FILE).exists():
        try:
            cfg = json.loads((d / CONFIG_FILE).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SinkscopeError(f"{d / CONFIG_FILE}: not a run config (invalid JSON: {getattr(e, 'msg', e)})") from None
        if not isinstance(cfg, dict) or "analysis" not in cfg:
            what = "null" if cfg is None else type(cfg).__name__ if not isinstance(cfg, dict) else "an object without 'analysis'"
            raise SinkscopeError(f"{d / CONFIG_FILE}: not a run config (expected a JSON object naming its analysis, got {what})")
        return str(cfg["analysis"])
    if (d / "tokens.parquet").exists():
        return "scan"
    if (d / "decode_rate.csv").exists():
        return "decode"
    if (d / "predictions.jsonl").exists():
        return "eval"
    if (d / "probe.csv").exists():
        return "probe"
    if (d / "summary.json").exists() and any(d.glob("*.csv")) or (d / "visual_tokens.parquet").exists():
        return "flow"
    raise SinkscopeError(f"{d}: not a sinkscope run folder (no {CONFIG_FILE}, tokens.parquet, probe.csv or flow tables)")


def read_summary(run_dir: str | Path) -> dict[str, Any]:
    """A run's ``summary.json`` (one line naming the file when it is missing or corrupt)."""
    p = Path(run_dir) / "summary.json"
    if not p.is_file():
        raise SinkscopeError(f"{p}: missing; is {run_dir} a finished sinkscope run?")
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SinkscopeError(f"{p}: corrupt summary ({getattr(e, 'msg', e)})") from None


def read_table(path: str | Path) -> pd.DataFrame:
    """One saved table (``.parquet`` or ``.csv``); a corrupt file fails in one line naming it."""
    p = Path(path)
    try:
        if p.suffix == ".parquet":
            return pd.read_parquet(p)
        return pd.read_csv(p)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()
    except Exception as e:  # pyarrow / parser errors come in many types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SinkscopeError(f"{p}: cannot read the table ({first})") from None


def read_train_log(path: Path) -> list[dict[str, Any]]:
    """A training run's ``train_log.jsonl``, one dict per step (``[]`` when absent: diysink init)."""
    return read_jsonl(path) if path.is_file() else []


def read_config(run_dir: str | Path) -> RunConfig | None:
    """The run's config, or ``None`` for a folder written before configs were saved."""
    p = Path(run_dir) / CONFIG_FILE
    return RunConfig.load(p) if p.exists() else None


def load_run(run_dir: str | Path):
    """The typed result of a saved run (scan, probe, flow, decode, eval, or a train-projector /
    diysink run as a :class:`~sinkscope.training.projector.TrainResult`), with its config when saved.

    >>> res = execute(ScanConfig(model="tiny-dinov2+sinks", images=("embedded:2",), out="runs/load"), progress=False)
    >>> back = load_run("runs/load")
    >>> back.config.analysis, len(back.tokens), back.config == res.config
    ('scan', 170, True)
    """
    d = Path(run_dir)
    if not d.is_dir():
        raise SinkscopeError(f"run folder {d} does not exist")
    kind = run_kind(d)
    config = read_config(d)
    summary = read_summary(d)
    if kind == "scan":
        from .scanning import ScanResult
        from .sinks import SinkReport, rules_from_dicts

        tokens = read_table(d / "tokens.parquet")
        report = SinkReport.from_tokens(tokens, rules_from_dicts(summary.get("rules", [])))
        return ScanResult(report, summary, out=d, config=config)
    if kind == "probe":
        from .probing import ProbeResult

        return ProbeResult(read_table(d / "probe.csv"), summary, None, out=d, config=config)
    if kind == "flow":
        from .flow.run import FlowResult

        tables = {f.stem: read_table(f) for f in sorted(d.glob("*.csv"))}
        for name in ("visual_tokens", "tokens_fed"):
            if (d / f"{name}.parquet").exists():
                tables[name] = read_table(d / f"{name}.parquet")
        return FlowResult(tables, summary, config=config, out=d, timings=dict(summary.get("timings", {})))
    if kind == "decode":
        from .flow.decoding import DecodeResult

        res = DecodeResult(read_table(d / "decode_tokens.csv"), read_table(d / "decode_rate.csv"), summary)
        res.config, res.out = config, d
        return res
    if kind == "eval":
        from .evaluation.run import EvalResult

        if not (d / "predictions.jsonl").is_file():
            raise SinkscopeError(f"{d / 'predictions.jsonl'}: missing; is {d} a finished eval run?")
        try:
            pred = pd.read_json(d / "predictions.jsonl", lines=True, dtype=False)
        except ValueError as e:
            raise SinkscopeError(f"{d / 'predictions.jsonl'}: cannot read ({str(e).splitlines()[0]})") from None
        return EvalResult(pred, read_table(d / "results.csv"), summary, out=d, config=config)
    if kind in ("train-projector", "diysink-init", "diysink-train"):
        from .training.diysink import DIYSinkResult
        from .training.projector import TrainResult

        cls = TrainResult if kind == "train-projector" else DIYSinkResult
        return cls(d, read_train_log(d / "train_log.jsonl"), summary, config=config)
    raise SinkscopeError(f"{d}: a {kind!r} run cannot be loaded by this version of sinkscope")


__all__ = ["CONFIG_FILE", "SCHEMA_VERSION", "execute", "load_run", "read_summary", "read_table", "run_kind"]
