"""The main job: scan a model on images (or prompts) and locate its sinks.

A scan runs the model batch by batch under a :class:`~sinkscope.capture.Capture`, turns each
batch into tidy rows (one per image, layer, token) and appends them to ``OUT/parts/`` with a
progress log, so an interrupted scan resumes without recomputing or duplicating images. At the
end the rules are applied to the whole table and ``tokens.parquet``, ``summary.json`` and
``report.html`` are written.

>>> res = scan("tiny-dinov2+sinks", images=sample_images(2), out=None, progress=False)  # doctest: +SKIP
>>> res.report.sinks()                                                                  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from . import distributed
from ._utils import SinkscopeError, check_out_folder, package_versions, progress_bar
from .capture import BatchCapture, Capture, parse_layers, uniform_share
from .data import ImageItem, image_items, sample_images
from .models import Adapter, load_model
from .models.base import ModelInputs
from .sinks import (
    HEAD_COLUMN_PREFIX,
    AttentionRule,
    DimsRule,
    NormRule,
    Rule,
    SinkReport,
    gu_sink_rate,
    rule_to_dict,
    topk_for_exact_dims,
)

log = logging.getLogger("sinkscope")

METHODS = ("norm", "attention", "dims", "all")
MAX_SAVED_IMAGES = 24


def build_rules(
    method: str = "norm",
    threshold: float | None = None,
    relative: float | None = None,
    attn_factor: float = 10.0,
    attn_fraction: float | None = None,
    tau: float = 20.0,
    massive_abs: float = 100.0,
    massive_ratio: float = 1000.0,
    dims_min_layer: int = 0,
    auto_scope: str = "layer",
) -> list[Rule]:
    """The rules a scan applies, main rule first (``all``: norm, attention, dims).

    >>> [r.method for r in build_rules("all")]
    ['norm', 'attention', 'dims']
    """
    if method not in METHODS:
        raise SinkscopeError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    norm = NormRule(threshold=threshold, relative=relative, auto_scope=auto_scope)
    attn = AttentionRule(factor=None if attn_fraction is not None else attn_factor, fraction=attn_fraction)
    dims = DimsRule(tau=tau, massive_abs=massive_abs, massive_ratio=massive_ratio, min_layer=dims_min_layer)
    return {"norm": [norm], "attention": [attn], "dims": [dims], "all": [norm, attn, dims]}[method]


@dataclass
class ScanResult:
    """What :func:`scan` returns: the sink report, the summary dict and the files written."""

    report: SinkReport
    summary: dict[str, Any]
    out: Path | None = None
    pixels: dict[str, np.ndarray] = field(default_factory=dict)
    #: the :class:`~sinkscope.config.ScanConfig` of a run made by (or loaded through) ``sinkscope.run``
    config: Any = None

    @property
    def tokens(self) -> pd.DataFrame:
        return self.report.tokens

    def sinks(self) -> pd.DataFrame:
        return self.report.sinks()


def batch_rows(ad: Adapter, inputs: ModelInputs, cap: BatchCapture, causal: bool) -> pd.DataFrame:
    """Tidy rows for one captured batch: one per (item, layer, token)."""
    frames = []
    layers = np.asarray(cap.layers)
    L = ad.n_layers
    for i, (name, lay) in enumerate(zip(inputs.names, inputs.layouts)):
        n = lay.n_tokens
        nl = len(layers)
        rc = [lay.row_col(t) for t in range(n)]
        d: dict[str, Any] = {
            "image": np.repeat(name, nl * n),
            "layer": np.repeat(layers, n).astype(np.int32),
            "token": np.tile(np.arange(n, dtype=np.int32), nl),
            "kind": np.tile(np.asarray(lay.kinds(), dtype=object), nl),
            "row": pd.array(np.tile([r for r, _ in rc], nl), dtype="Int32"),
            "col": pd.array(np.tile([c for _, c in rc], nl), dtype="Int32"),
            "norm": cap.norms[i, :, :n].reshape(-1).numpy().astype(np.float32),
        }
        if cap.attn_received:
            rec = np.full((nl, n), np.nan, np.float32)
            for j, layer in enumerate(layers):
                if layer < L and int(layer) in cap.attn_received:
                    rec[j] = cap.attn_received[int(layer)][i, :n].numpy()
            d["attention_received"] = rec.reshape(-1)
            d["uniform_share"] = np.tile(uniform_share(n, causal), nl).astype(np.float32)
            if causal and cap.attn_received_heads:
                # per head, for Gu et al.'s sink rate (share of (layer, head) pairs with alpha_k > eps)
                H = next(iter(cap.attn_received_heads.values())).shape[1]
                rh = np.full((nl, n, H), np.nan, np.float32)
                for j, layer in enumerate(layers):
                    if layer < L and int(layer) in cap.attn_received_heads:
                        rh[j] = cap.attn_received_heads[int(layer)][i, :, :n].numpy().T
                for h in range(H):
                    d[f"{HEAD_COLUMN_PREFIX}{h}"] = rh[:, :, h].reshape(-1)
        if cap.top_dims is not None:
            # fixed-width columns (top_dim_0.., top_val_0..): compact, unlike per-row lists
            td = cap.top_dims[i, :, :n].reshape(nl * n, -1).numpy().astype(np.int32)
            tv = cap.top_vals[i, :, :n].reshape(nl * n, -1).numpy().astype(np.float32)
            for j in range(td.shape[1]):
                d[f"top_dim_{j}"] = td[:, j]
                d[f"top_val_{j}"] = tv[:, j]
            d["rms"] = cap.rms[i, :, :n].reshape(-1).numpy().astype(np.float32)
            d["median_abs"] = np.repeat(cap.median_abs[i].numpy(), n).astype(np.float32)
        if lay.grid is None and hasattr(ad, "token_strings"):
            d["text_token"] = np.tile(np.asarray(ad.token_strings(inputs, i), dtype=object), nl)
        frames.append(pd.DataFrame(d))
    return pd.concat(frames, ignore_index=True)


class _RunDir:
    """Resumable scan directory: ``parts/*.parquet`` + ``progress.jsonl`` + ``scan_config.json``.

    In a data-parallel scan (``dist``, :mod:`sinkscope.distributed`) process r writes
    ``parts/rank{r}-part-*.parquet``, ``progress.rank{r}.jsonl`` and ``seen/rank{r}-*.png``; only the
    main process prepares the folder, the others wait for it."""

    #: the marker a scan writes first into its folder: what proves the folder's outputs are its own
    MARKER = ".sinkscope-run"
    #: what a scan writes into its folder (and so may remove when it starts afresh)
    OUTPUTS = ("parts", "seen", "progress.jsonl", "tokens.parquet", "activations")

    def __init__(self, out: Path, config: dict, resume: bool, overwrite: bool = False, dist=None):
        self.out = out
        self.parts = out / "parts"
        self.seen = out / "seen"
        self.prefix = distributed.part_prefix(dist)
        self.progress = distributed.progress_file(out, dist)
        if dist is None or dist.is_main:
            self._prepare(config, resume, overwrite)
        if dist is not None:
            dist.barrier()  # the folder is ready (or the main process failed and the launcher ends all)

    def _prepare(self, config: dict, resume: bool, overwrite: bool) -> None:
        out = self.out
        cfg_path = out / "scan_config.json"
        self.check_owned(out, overwrite)
        if resume and cfg_path.exists():
            old = json.loads(cfg_path.read_text())
            diff = [k for k in config if old.get(k) != config[k]]
            if diff:
                raise SinkscopeError(
                    f"cannot resume {out}: its scan used other settings ({', '.join(diff)}); "
                    "drop --resume or choose another --out"
                )
        else:
            for p in [*(out / name for name in self.OUTPUTS), *distributed.stale_files(out)]:
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
        out.mkdir(parents=True, exist_ok=True)
        (out / self.MARKER).write_text(json.dumps({"kind": "scan", "written_by": "sinkscope"}) + "\n")
        self.parts.mkdir(parents=True, exist_ok=True)
        self.seen.mkdir(parents=True, exist_ok=True)
        cfg_path.write_text(json.dumps(config, indent=1))

    @classmethod
    def check_owned(cls, out: Path, overwrite: bool = False) -> None:
        """Refuse (one line) an ``--out`` that is a file, or an existing non-empty folder that no
        scan wrote (no marker and no ``scan_config.json``) unless ``overwrite``: a scan removes its
        own earlier outputs when it starts afresh and must never remove a user's files. Creates
        nothing.

        >>> _RunDir.check_owned(Path("README.md"))     # doctest: +SKIP
        SinkscopeError: --out: README.md is a file, not a folder; choose a folder
        """
        check_out_folder(out, "--out")
        if out.is_dir() and any(out.iterdir()) and not overwrite:
            if not ((out / cls.MARKER).exists() or (out / "scan_config.json").exists()):
                raise SinkscopeError(
                    f"--out {out} is a folder that sinkscope scan did not write (no {cls.MARKER}); "
                    f"it could remove {', '.join(cls.OUTPUTS)} there: choose another folder, or pass "
                    "--overwrite to replace those"
                )

    def done(self) -> dict[str, dict]:
        """Image name -> last record, over every progress log (those of all processes, newest file last)."""
        files = [p for p in distributed.progress_files(self.out) if p.exists()]
        files.sort(key=lambda p: p.stat().st_mtime)
        return {n: r for p in files for n, r in self.read_progress(p).items()}

    @staticmethod
    def read_progress(progress: Path) -> dict[str, dict]:
        """Image name -> its last logged record (a torn last line from a kill is ignored)."""
        out: dict[str, dict] = {}
        if progress.exists():
            for line in progress.read_text().splitlines():
                if line.strip():
                    try:
                        recs = json.loads(line)
                    except json.JSONDecodeError:  # a torn last line from a kill: ignore it
                        continue
                    for rec in recs if isinstance(recs, list) else [recs]:
                        out[rec["image"]] = rec
        return out

    def write_part(self, rows: pd.DataFrame) -> str:
        k = len(list(self.parts.glob(f"{self.prefix}part-*.parquet")))
        name = f"{self.prefix}part-{k:05d}.parquet"
        tmp = self.parts / (name + ".tmp")
        rows.to_parquet(tmp, index=False)
        os.replace(tmp, self.parts / name)
        return name

    def next_seen(self) -> str:
        """File name for the next kept picture in ``seen/``."""
        return f"{self.prefix}{len(list(self.seen.glob(self.prefix + '*.png'))):05d}.png"

    def read_result(self, rules: list[Rule]) -> ScanResult:
        """The finished run written in this folder (``tokens.parquet``, ``summary.json``)."""
        tokens = pd.read_parquet(self.out / "tokens.parquet")
        summary = json.loads((self.out / "summary.json").read_text())
        return ScanResult(SinkReport.from_tokens(tokens, rules), summary, self.out)

    def log(self, records: list[dict]) -> None:
        """Append one batch's records as a single line: a kill leaves the batch in or out, whole."""
        with self.progress.open("a") as fh:
            fh.write(json.dumps(records) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def load_rows(self, records: dict[str, dict]) -> pd.DataFrame:
        parts = sorted({r["part"] for r in records.values() if r.get("status") == "ok"})
        if not parts:
            return pd.DataFrame()
        frames = []
        for p in parts:  # from each part, only the images whose logged record names that part
            names = {n for n, r in records.items() if r.get("status") == "ok" and r.get("part") == p}
            df = pd.read_parquet(self.parts / p)
            frames.append(df[df["image"].isin(names)])
        return pd.concat(frames, ignore_index=True)


def seen_pictures(run_dir: str | Path) -> dict[str, Path]:
    """Image name -> the saved picture the model saw (``seen/*.png``) of a scan run folder, read
    from its ``progress.jsonl`` (later records win; a torn last line is ignored).

    >>> seen_pictures("sinkscope-out")["astronaut"]            # doctest: +SKIP
    PosixPath('sinkscope-out/seen/00000.png')
    """
    d = Path(run_dir)
    out: dict[str, Path] = {}
    for name, rec in _RunDir.read_progress(d / "progress.jsonl").items():
        f = d / "seen" / str(rec.get("seen") or "")
        if rec.get("seen") and f.is_file():
            out[name] = f
    return out


def _save_seen(path: Path, pixels: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(pixels).save(path)


def _load_seen(path: Path) -> np.ndarray | None:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB")) if path.exists() else None


def scan(
    model: str | Adapter = "dinov2-small",
    images: list[ImageItem] | list[str] | None = None,
    texts: list[str] | None = None,
    method: str = "norm",
    rules: list[Rule] | None = None,
    layers: str | list[int] | None = "all",
    batch_size: int = 8,
    out: str | Path | None = None,
    resume: bool = False,
    device: str | None = None,
    dtype: str | None = None,
    image_size: int | tuple[int, int] | None = None,
    progress: bool = True,
    save_layers: str | list[int] | None = None,
    save_dtype: str = "float32",
    overwrite: bool = False,
    **rule_kwargs,
) -> ScanResult:
    """Scan a model for sinks and (with ``out``) write ``tokens.parquet`` and ``summary.json``.

    The analysis writes no page: ``sinkscope.scan`` (this function plus ``report.html``),
    ``sinkscope.run(ScanConfig(...))`` and the CLI draw the report through :mod:`sinkscope.viz`.

    ``images``: image items or paths (files, folders, manifests); default: the embedded images.
    ``texts``: prompts, for causal LMs. ``method``: norm, attention, dims or all (the first rule
    is the main one, giving ``is_sink``); extra keyword arguments go to :func:`build_rules`.
    A corrupt image is reported in one line, recorded as failed and skipped. ``save_layers``
    keeps the full hidden states of those layers in ``OUT/activations`` (an
    :class:`~sinkscope.store.ActivationStore`: safetensors shards + manifest, resumable).
    ``out`` must be new, empty or an earlier scan's folder (its ``.sinkscope-run`` marker); any
    other folder is refused before work starts unless ``overwrite`` (which replaces the scan's
    outputs there: ``parts/``, ``seen/``, ``activations/``, ``progress.jsonl``, ``tokens.parquet``).

    >>> res = scan("tiny-dinov2+sinks", progress=False)                          # doctest: +SKIP
    >>> res.summary["emergence_layer"]                                           # doctest: +SKIP
    2
    """
    t_start = time.perf_counter()
    if batch_size < 1:
        raise SinkscopeError(f"batch size must be >= 1, got {batch_size}")
    if out is not None:  # before any work: never a user's folder, never a file
        _RunDir.check_owned(Path(out), overwrite)
    dist = distributed.context()  # None unless launched as several processes (accelerate, torchrun)
    if dist is not None:
        distributed.check_supported(out, save_layers)
        device = dist.device if device in (None, "cuda") else device  # cuda:<local rank>
        progress = progress and dist.is_main
    if rules and rule_kwargs:
        raise SinkscopeError(
            f"give either rules= or rule options ({', '.join(sorted(rule_kwargs))}), not both: "
            "the options would be ignored"
        )
    rules = rules or build_rules(method, **rule_kwargs)
    methods = {r.method for r in rules}
    t0 = time.perf_counter()
    ad = (
        model
        if isinstance(model, Adapter)
        else load_model(model, device=device, dtype=dtype, image_size=image_size)
    )
    t_load = time.perf_counter() - t0
    is_text = ad.family == "causal-lm"
    if is_text:
        if images:
            raise SinkscopeError(f"model {ad.name!r} is a language model: give --text prompts, not images")
        if not texts:
            raise SinkscopeError(f"model {ad.name!r} is a language model: give at least one --text prompt")
        items: list[Any] = [ImageItem(f"prompt{i}", t, loader=None) for i, t in enumerate(texts)]
    else:
        if texts:
            log.warning("--text is ignored for vision model %s", ad.name)
        if images is None:
            items = sample_images()
        elif images and all(isinstance(x, ImageItem) for x in images):
            items = list(images)
        else:
            items = image_items(images)
        if not items:
            raise SinkscopeError("no images to scan")
    names = [it.name for it in items]
    layer_list = parse_layers(layers, ad.n_layers)
    tau = next((r.tau for r in rules if isinstance(r, DimsRule)), 20.0)
    keep = parse_layers(save_layers, ad.n_layers) if save_layers is not None else []
    if keep and out is None:
        raise SinkscopeError(
            "saving activations (save_layers / --save-layers) needs an output folder (--out)"
        )
    config = {
        "model": ad.name,
        "methods": sorted(methods),
        "layers": layer_list,
        "save_layers": keep,
        "image_size": list(image_size) if isinstance(image_size, (tuple, list)) else image_size,
        "dtype": str(ad.dtype),
        "topk": topk_for_exact_dims(ad.hidden_size, tau) if "dims" in methods else None,
    }
    run = _RunDir(Path(out), config, resume, overwrite, dist) if out is not None else None
    done = run.done() if run else {}
    store = None
    if keep:
        from .store import ActivationStore

        store = ActivationStore(
            Path(out) / "activations", keep, model=ad.name, dtype=save_dtype, resume=resume
        )
    # finished = scanned ok with the same source; failed items are tried again
    changed = [it.name for it in items if it.name in done and done[it.name].get("source") != it.source]
    if changed:
        raise SinkscopeError(
            f"cannot resume {out}: item {changed[0]!r} now has another source than in the interrupted scan "
            "(drop --resume or choose another --out)"
        )
    done = {n: r for n, r in done.items() if r.get("status") == "ok"}
    mine = dist.shard(items) if dist else items  # a process of a data-parallel scan takes its shard
    todo = [it for it in mine if it.name not in done]
    if run and done:
        log.info("resuming %s: %d of %d items already done", run.out, len(mine) - len(todo), len(mine))

    frames: list[pd.DataFrame] = []
    status: dict[str, dict] = {n: done[n] for n in names if n in done}
    pixels: dict[str, np.ndarray] = {}
    t_forward = 0.0
    attn_blocks = [layer for layer in layer_list if layer < ad.n_layers]
    if "attention" in methods and not attn_blocks:
        raise SinkscopeError(
            f"the attention rule needs a layer below {ad.n_layers}: the last layer has no attention block reading it"
        )
    if "dims" in methods and ad.hidden_size < tau * tau:
        log.warning(
            "hidden size %d: max|x[d]|/RMS(x) cannot exceed sqrt(%d) = %.1f < tau = %g, so the dims rule "
            "cannot fire; lower --tau",
            ad.hidden_size,
            ad.hidden_size,
            ad.hidden_size**0.5,
            tau,
        )
    cap_kw = dict(
        layers=layer_list,
        attention=attn_blocks if "attention" in methods else None,
        dims="dims" in methods,
        topk=topk_for_exact_dims(ad.hidden_size, tau),
        keep=keep,
    )
    keep_seen = set(names[:MAX_SAVED_IMAGES])  # several processes: the pictures of the first items
    bar = progress_bar(len(todo), enabled=progress, desc=f"scan {ad.name}")
    with Capture(ad, **cap_kw) as cap:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            good, arrays, records = [], [], []
            for it in chunk:
                if is_text:
                    good.append(it)
                    continue
                try:
                    arr = it.load()
                    ad.check_image(arr.shape[0], arr.shape[1], it.name)
                    good.append(it)
                    arrays.append(arr)
                except SinkscopeError as e:
                    log.error("%s", e)
                    rec = {"image": it.name, "status": "failed", "reason": str(e), "source": it.source}
                    records.append(rec)
                    status[it.name] = rec
            if good:
                inputs = ad.prepare(
                    [it.source for it in good] if is_text else arrays, [it.name for it in good]
                )
                t1 = time.perf_counter()
                bc = cap.run(inputs)
                t_forward += time.perf_counter() - t1
                rows = batch_rows(ad, inputs, bc, causal=is_text)
                if store is not None:
                    store.add(inputs.names, inputs.layouts, bc.hidden)
                part = run.write_part(rows) if run else None
                if run is None:  # with an output folder the parts on disk are the record
                    frames.append(rows)
                for k, it in enumerate(good):
                    lay = inputs.layouts[k]
                    rec = {
                        "image": it.name,
                        "status": "ok",
                        "reason": None,
                        "source": it.source,
                        "part": part,
                        "grid": list(lay.grid) if lay.grid else None,
                        "n_tokens": lay.n_tokens,
                    }
                    n_saved = sum(1 for r in status.values() if r.get("seen")) if run else len(pixels)
                    first = dist is None or it.name in keep_seen
                    if inputs.pixels and n_saved < MAX_SAVED_IMAGES and first:
                        pixels[it.name] = inputs.pixels[k]
                        if run:
                            rec["seen"] = run.next_seen()
                            _save_seen(run.seen / rec["seen"], inputs.pixels[k])
                    records.append(rec)
                    status[it.name] = rec
            if run:
                run.log(records)
            bar.update(len(chunk))
    bar.close()
    if dist is not None:  # the main process merges every shard; the others keep their own
        names, status = distributed.gather(dist, names, status, run.done)

    if run:
        all_rows = run.load_rows(status)
        for n, rec in status.items():
            if rec.get("seen") and n not in pixels:
                img = _load_seen(run.seen / rec["seen"])
                if img is not None:
                    pixels[n] = img
    else:
        all_rows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    ok_names = [n for n in names if status.get(n, {}).get("status") == "ok"]
    if all_rows.empty and dist is not None and not dist.is_main:  # an empty shard: return the merged run
        dist.barrier()
        return run.read_result(rules)
    if all_rows.empty:
        raise SinkscopeError(f"no item could be scanned ({len(items)} tried; see the errors above)")
    # keep the user's item order
    order = {n: i for i, n in enumerate(ok_names)}
    all_rows = all_rows.sort_values(
        ["image", "layer", "token"], key=lambda s: s.map(order) if s.name == "image" else s
    )
    rep = SinkReport.from_tokens(all_rows.reset_index(drop=True), rules)
    first_ok = next((status[n] for n in ok_names), {})
    layout = _layout_summary(ad, first_ok)
    summary = {
        "model": ad.describe(),
        "layout": layout,
        **rep.summary(),
        "images": [
            {k: status.get(n, {}).get(k) for k in ("image", "status", "reason", "source", "grid", "n_tokens")}
            for n in names
        ],
        "n_ok": len(ok_names),
        "n_failed": sum(1 for n in names if status.get(n, {}).get("status") == "failed"),
        "config": {
            **config,
            "batch_size": batch_size,
            "device": str(ad.device),
            "rules": [rule_to_dict(r) for r in rules],
        },
        "timings": {
            "load_model_s": round(t_load, 3),
            "forward_s": round(t_forward, 3),
            "total_s": round(time.perf_counter() - t_start, 3),
            "items_this_run": len(todo),
        },
        "versions": package_versions(),
    }
    attn_rule = next((r for r in rules if isinstance(r, AttentionRule)), None)
    if is_text and attn_rule is not None:
        # Gu et al.'s metric, per head (the attention rule thresholds the head-averaged alpha)
        summary["gu_sink_rate"] = gu_sink_rate(rep.tokens, eps=attn_rule.causal_fraction, token=0)
    if store is not None:
        summary["activations"] = {"path": "activations", **store.info()}
    if getattr(ad, "planted", None):
        summary["model"]["planted"] = ad.planted.to_dict()
    if dist is not None:
        summary["distributed"] = dist.summary(len(items))
    result = ScanResult(rep, summary, Path(out) if out is not None else None, pixels)
    if run and (dist is None or dist.is_main):
        if dist is not None:
            distributed.write_merged_progress(run.out, status)
        write_outputs(result)
    if dist is not None:  # the other processes return (with their shard) once the run is written
        dist.barrier()
    return result


def _layout_summary(ad: Adapter, first_ok: dict) -> dict[str, Any]:
    vis = getattr(ad, "vision", ad)
    if ad.family == "causal-lm":
        return {"n_cls": 0, "n_registers": 0, "patch_size": None, "grid": None, "kinds": ["text"]}
    d = {
        "n_cls": vis.spec.n_cls,
        "n_registers": vis.n_registers,
        "patch_size": vis.patch_size,
        "grid": first_ok.get("grid"),
        "n_tokens": first_ok.get("n_tokens"),
        "order": "[CLS] + registers + patches (row-major)" if vis.spec.n_cls else "patches (row-major)",
    }
    if ad.family == "llava":
        d.update(
            feature_layer=ad.feature_layer,
            select_strategy=ad.select_strategy,
            image_token_id=ad.image_token_id,
        )
    return d


def write_outputs(result: ScanResult) -> None:
    """Write ``tokens.parquet`` and ``summary.json`` into ``result.out`` (each replaced atomically)."""
    out = result.out
    assert out is not None
    tmp = out / "tokens.parquet.tmp"
    result.tokens.to_parquet(tmp, index=False)
    os.replace(tmp, out / "tokens.parquet")
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(result.summary, indent=1, default=_json_default))
    os.replace(tmp, out / "summary.json")


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (torch.dtype, Path)):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")

