"""The scan itself: settle the request, run the batches, assemble the result.

:func:`scan` is orchestration only. The request is checked and settled by
:mod:`~sinkscope.scanning.request`, each batch becomes rows by :mod:`~sinkscope.scanning.rows`,
the run folder (parts, progress log, pictures) is :mod:`~sinkscope.scanning.rundir`, and the
summary is assembled by :mod:`~sinkscope.scanning.summary`. With an output folder the parts on
disk are the record (a resumed scan reads them back); without, the rows stay in memory.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .. import distributed
from .._utils import SinkscopeError, progress_bar, release_memory
from ..capture import Capture
from ..data import ImageItem
from ..models import Adapter, load_model
from ..models.base import ModelInputs
from ..sinks import Rule, SinkReport
from .request import ScanJob, capture_settings, check_request, scan_items, settle
from .result import ScanResult, write_outputs
from .rows import batch_rows
from .rules import scan_rules
from .rundir import _RunDir, load_seen, save_seen
from .summary import scan_summary

log = logging.getLogger("sinkscope")

#: at most this many pictures the model saw are kept (``seen/`` and ``ScanResult.pixels``)
MAX_SAVED_IMAGES = 24


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
    ``out`` must be new, empty or an earlier scan's folder (its ``.sinkscope.json`` marker,
    :mod:`sinkscope.ownership`); any other folder is refused before work starts (``overwrite``
    writes beside a user's files, never over one; a fresh start in its own folder removes the
    scan's own ``parts/``, ``seen/``, ``activations/``, ``progress.jsonl``, ``tokens.parquet``).

    >>> res = scan("tiny-dinov2+sinks", method="all", progress=False)
    >>> res.summary["n_ok"], sorted(res.tokens.kind.unique()), int(res.tokens.layer.max())
    (9, ['cls', 'patch'], 4)
    """
    t_start = time.perf_counter()
    dist, device, progress = check_request(batch_size, out, overwrite, save_layers, device, progress)
    rules = scan_rules(rules, method, rule_kwargs)
    t0 = time.perf_counter()
    ad = (
        model
        if isinstance(model, Adapter)
        else load_model(model, device=device, dtype=dtype, image_size=image_size)
    )
    t_load = time.perf_counter() - t0
    items = scan_items(ad, images, texts)
    job = settle(ad, rules, items, layers, save_layers, out, image_size, batch_size, dist)
    run = _RunDir(Path(out), job.config, resume, overwrite, dist) if out is not None else None
    scanner = _Scanner(job, run, _open_store(job, out, save_dtype, resume))
    todo = scanner.resume_point(out)
    scanner.scan_batches(todo, capture_settings(job), progress)
    names, status = job.names, scanner.status
    if dist is not None:  # the main process merges every shard; the others keep their own
        names, status = distributed.gather(dist, names, status, run.done)
    all_rows = scanner.all_rows(status)
    if all_rows.empty and dist is not None and not dist.is_main:  # an empty shard: return the merged run
        dist.barrier()
        return run.read_result(rules)
    if all_rows.empty:
        raise SinkscopeError(f"no item could be scanned ({len(items)} tried; see the errors above)")
    rep = _report(all_rows, names, status, rules)
    timings = {
        "load_model_s": round(t_load, 3),
        "forward_s": round(scanner.forward_s, 3),
        "total_s": round(time.perf_counter() - t_start, 3),
        "items_this_run": len(todo),
    }
    summary = scan_summary(job, rep, names, status, timings, scanner.store)
    result = ScanResult(rep, summary, Path(out) if out is not None else None, scanner.pixels)
    _finish(result, run, dist, status)
    return result


def _open_store(job: ScanJob, out: str | Path | None, save_dtype: str, resume: bool):
    """The :class:`~sinkscope.store.ActivationStore` of the layers kept whole, or ``None``."""
    if not job.keep:
        return None
    from ..store import ActivationStore

    return ActivationStore(
        Path(out) / "activations", job.keep, model=job.ad.name, dtype=save_dtype, resume=resume
    )


def _report(
    all_rows: pd.DataFrame, names: list[str], status: dict[str, dict], rules: list[Rule]
) -> SinkReport:
    """The rules applied to every row, in the user's item order."""
    ok_names = [n for n in names if status.get(n, {}).get("status") == "ok"]
    order = {n: i for i, n in enumerate(ok_names)}
    all_rows = all_rows.sort_values(
        ["image", "layer", "token"], key=lambda s: s.map(order) if s.name == "image" else s
    )
    return SinkReport.from_tokens(all_rows.reset_index(drop=True), rules)


def _finish(result: ScanResult, run: _RunDir | None, dist: Any, status: dict[str, dict]) -> None:
    """Write the run's tables (the main process of a data-parallel scan, after merging the progress
    logs); the other processes wait until they are written."""
    if run and (dist is None or dist.is_main):
        if dist is not None:
            distributed.write_merged_progress(run.out, status)
        write_outputs(result)
    if dist is not None:  # the other processes return (with their shard) once the run is written
        dist.barrier()


@dataclass
class _Scanner:
    """The batch loop of one scan and what it gathers: each item's last record (``status``), the
    rows (``frames``) and the pictures the model saw (``pixels``), both in memory only when there
    is no run folder, and the time spent in forward passes."""

    job: ScanJob
    run: _RunDir | None
    store: Any = None
    status: dict[str, dict] = field(default_factory=dict)
    frames: list[pd.DataFrame] = field(default_factory=list)
    pixels: dict[str, np.ndarray] = field(default_factory=dict)
    forward_s: float = 0.0
    #: whose pictures a process of a data-parallel scan keeps: those of the first items of the run
    first_names: set[str] = field(init=False, default_factory=set)

    def __post_init__(self) -> None:
        self.first_names = set(self.job.names[:MAX_SAVED_IMAGES])

    def resume_point(self, out: str | Path | None) -> list[ImageItem]:
        """The items this process still has to scan; the finished ones (scanned ok with the same
        source) go into ``status``, failed ones are tried again."""
        job, run = self.job, self.run
        done = run.done() if run else {}
        changed = [
            it.name for it in job.items if it.name in done and done[it.name].get("source") != it.source
        ]
        if changed:
            raise SinkscopeError(
                f"cannot resume {out}: item {changed[0]!r} now has another source than in the interrupted "
                "scan (drop --resume or choose another --out)"
            )
        done = {n: r for n, r in done.items() if r.get("status") == "ok"}
        mine = job.dist.shard(job.items) if job.dist else job.items  # a data-parallel process: its shard
        todo = [it for it in mine if it.name not in done]
        if run and done:
            log.info("resuming %s: %d of %d items already done", run.out, len(mine) - len(todo), len(mine))
        self.status = {n: done[n] for n in job.names if n in done}
        return todo

    def scan_batches(self, todo: list[ImageItem], capture_kw: dict[str, Any], progress: bool) -> None:
        """Scan ``todo`` batch by batch, logging each batch's records as one line."""
        job = self.job
        bar = progress_bar(len(todo), enabled=progress, desc=f"scan {job.ad.name}")
        with Capture(job.ad, **capture_kw) as cap:
            for start in range(0, len(todo), job.batch_size):
                chunk = todo[start : start + job.batch_size]
                good, arrays, records = self._load(chunk)
                if good:
                    records += self._forward(cap, good, arrays)
                if self.run:
                    self.run.log(records)
                release_memory()  # the batch's buffers, so the peak does not creep up with the batches
                bar.update(len(chunk))
        bar.close()

    def _load(self, chunk: list[ImageItem]) -> tuple[list[ImageItem], list[np.ndarray], list[dict]]:
        """The items of ``chunk`` that load (and their arrays), and a failed record for the others
        (each reported in one line)."""
        good, arrays, records = [], [], []
        for it in chunk:
            if self.job.is_text:
                good.append(it)
                continue
            try:
                arr = it.load()
                self.job.ad.check_image(arr.shape[0], arr.shape[1], it.name)
                good.append(it)
                arrays.append(arr)
            except SinkscopeError as e:
                log.error("%s", e)
                rec = {"image": it.name, "status": "failed", "reason": str(e), "source": it.source}
                records.append(rec)
                self.status[it.name] = rec
        return good, arrays, records

    def _forward(self, cap: Capture, good: list[ImageItem], arrays: list[np.ndarray]) -> list[dict]:
        """Run one batch, write its rows (and kept activations), and return its ok records."""
        job, run = self.job, self.run
        inputs = job.ad.prepare(
            [it.source for it in good] if job.is_text else arrays, [it.name for it in good]
        )
        t1 = time.perf_counter()
        bc = cap.run(inputs)
        self.forward_s += time.perf_counter() - t1
        rows = batch_rows(job.ad, inputs, bc, causal=job.is_text)
        if self.store is not None:
            self.store.add(inputs.names, inputs.layouts, bc.hidden)
        part = run.write_part(rows) if run else None
        if run is None:  # with an output folder the parts on disk are the record
            self.frames.append(rows)
        records = []
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
            self._keep_picture(rec, inputs, k)
            records.append(rec)
            self.status[it.name] = rec
        return records

    def _keep_picture(self, rec: dict, inputs: ModelInputs, k: int) -> None:
        """Keep the picture item ``k`` of the batch was seen as, up to :data:`MAX_SAVED_IMAGES`
        (a data-parallel scan: those of the first items); with a run folder it goes to ``seen/``."""
        run = self.run
        n_saved = sum(1 for r in self.status.values() if r.get("seen")) if run else len(self.pixels)
        first = self.job.dist is None or rec["image"] in self.first_names
        if inputs.pixels and n_saved < MAX_SAVED_IMAGES and first:
            if run:  # on disk only: read back at the end, so memory does not grow with the run
                rec["seen"] = run.next_seen()
                save_seen(run.seen / rec["seen"], inputs.pixels[k])
            else:
                self.pixels[rec["image"]] = inputs.pixels[k]

    def all_rows(self, status: dict[str, dict]) -> pd.DataFrame:
        """Every scanned row (from the parts on disk, or in memory), and the kept pictures of items
        scanned earlier (a resumed run) or by other processes read back from ``seen/``."""
        if not self.run:
            return pd.concat(self.frames, ignore_index=True) if self.frames else pd.DataFrame()
        for n, rec in status.items():
            if rec.get("seen") and n not in self.pixels:
                img = load_seen(self.run.seen / rec["seen"])
                if img is not None:
                    self.pixels[n] = img
        return self.run.load_rows(status)
