"""Figure kinds: name -> function drawing a plotly figure from one saved run directory.

A kind's render function takes a :class:`RunData` (the tables and ``summary.json`` of one run
directory, read lazily; never the model) plus the figure's ``options`` as keyword arguments, and
returns a :class:`plotly.graph_objects.Figure`. It calls the figure functions of
:mod:`sinkscope.viz`. Adding a kind is one line::

    register_kind("umap", "scan", lambda run, layer=12: umap_figure(*token_embeddings(run.dir, layer)))

after which ``kind = "umap"`` (with ``options = { layer = 6 }``) may appear in the figure list.
The list is validated against the render function's signature, so keep options as keyword
arguments with defaults.

>>> import sinkscope
>>> _ = sinkscope.run(sinkscope.ScanConfig(model="tiny-dinov2+sinks", images=("embedded:2",), out="runs/scan"),
...                   progress=False)
>>> fig = KINDS["sink_count"].render(RunData("runs/scan"))
>>> sorted(k for k, kind in KINDS.items() if kind.analysis == "scan")
['attention_norm', 'norm_distribution', 'patch_heatmap', 'sink_count', 'text_norm', 'umap']
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..runs import read_summary, read_table

RenderFn = Callable[..., Any]  # (RunData, **options) -> plotly.graph_objects.Figure


class RunData:
    """The saved results of one analysis run (a run folder written by ``sinkscope.run``).

    ``table(name)`` reads ``name.parquet`` or ``name.csv`` (``tokens`` of a scan, ``probe`` of a
    probe, ``rollout``/``attention_by_bin``/``knockout``/... of a flow); ``summary`` is
    ``summary.json``; ``picture(image)`` is the image a scan's model saw (``seen/``).

    >>> from sinkscope.scanning import scan
    >>> _ = scan("tiny-dinov2+sinks", images=["embedded:1"], out="runs/scan-tiny", progress=False)
    >>> run = RunData("runs/scan-tiny")
    >>> run.tables(), run.table("tokens").columns[:3].tolist(), run.summary["model"]["name"]
    (['tokens'], ['image', 'layer', 'token'], 'tiny-dinov2+sinks')
    """

    def __init__(self, path: str | Path):
        self.dir = Path(path)
        self._tables: dict[str, pd.DataFrame] = {}

    def __repr__(self) -> str:
        return f"RunData({str(self.dir)!r})"

    @cached_property
    def summary(self) -> dict[str, Any]:
        """``summary.json`` of the run (model, rule, thresholds, images, versions, timings)."""
        return read_summary(self.dir)

    @cached_property
    def meta(self) -> dict[str, Any]:
        """``run.json`` written by the regeneration (run id, fingerprint, timings), if any."""
        p = self.dir / "run.json"
        return json.loads(p.read_text()) if p.exists() else {}

    def tables(self) -> list[str]:
        """Names of the tables in the run directory."""
        return sorted({p.stem for p in self.dir.iterdir() if p.suffix in (".parquet", ".csv")})

    def table(self, name: str) -> pd.DataFrame:
        """The table ``name`` (``name.parquet`` or ``name.csv``), read once; ValueError naming the tables there if absent."""
        if name not in self._tables:
            for ext in (".parquet", ".csv"):
                p = self.dir / f"{name}{ext}"
                if p.exists():
                    self._tables[name] = read_table(p)
                    break
            else:
                raise ValueError(
                    f"run {self.dir.name} has no table {name!r} (it has: {', '.join(self.tables()) or 'none'}); "
                    "does the run's analysis produce it?"
                )
        return self._tables[name]

    def image_names(self) -> list[str]:
        """Images of the run in input order (scanned-ok images for a scan)."""
        imgs = self.summary.get("images") or []
        return [
            str(e.get("image")) if isinstance(e, dict) else str(e)
            for e in imgs
            if not isinstance(e, dict) or e.get("status", "ok") == "ok"
        ]

    def picture(self, image: str) -> np.ndarray | None:
        """The (resized) picture a scan's model saw, from ``seen/`` via ``progress.jsonl``; None if not kept."""
        from ..scanning import seen_pictures

        f = seen_pictures(self.dir).get(str(image))
        if f is None:
            return None
        from PIL import Image

        return np.asarray(Image.open(f).convert("RGB"))


@dataclass(frozen=True)
class FigureKind:
    """A registered kind: which analysis's results it draws, how, and its default PNG size."""

    analysis: str  # scan | probe | flow | eval
    render: RenderFn
    width: int = 1000
    height: int = 600
    doc: str = ""


#: Kind name -> :class:`FigureKind`. Extend with :func:`register_kind`.
KINDS: dict[str, FigureKind] = {}


def register_kind(
    name: str, analysis: str, render: RenderFn, width: int = 1000, height: int = 600, doc: str | None = None
) -> FigureKind:
    """Register (or replace) the figure kind ``name`` drawing ``analysis`` results with ``render``.

    >>> from sinkscope.viz.scan_figures import sink_count_figure
    >>> kind = register_kind("counts", "scan", lambda run: sink_count_figure(run.table("tokens"), run.summary))
    >>> KINDS["counts"] is kind, kind.analysis
    (True, 'scan')
    >>> del KINDS["counts"]                                     # (leave the registry as it was)
    """
    doc = doc if doc is not None else (inspect.getdoc(render) or "").split("\n")[0]
    KINDS[name] = FigureKind(analysis, render, width, height, doc)
    return KINDS[name]


def _first(values: list[str], wanted: str | None, what: str) -> str:
    if wanted is not None:
        if str(wanted) not in values:
            raise ValueError(f"no {what} {wanted!r} in the run; it has: {', '.join(values[:12])}")
        return str(wanted)
    if not values:
        raise ValueError(f"the run has no {what}")
    return values[0]


def _accepts(fn: Callable, name: str) -> bool:
    return name in inspect.signature(fn).parameters


# -- scan ---------------------------------------------------------------------------------------


def norm_distribution(run: RunData) -> Any:
    """Per-layer L2-norm distributions (log scale) with the rule's threshold."""
    from ..viz.scan_report import norm_distribution_figure

    return norm_distribution_figure(run.table("tokens"), run.summary)


def sink_count(run: RunData) -> Any:
    """Sink tokens per layer (emergence)."""
    from ..viz.scan_report import sink_count_figure

    return sink_count_figure(run.table("tokens"), run.summary)


def patch_heatmap(run: RunData, image: str | None = None) -> Any:
    """Patch-grid norm heat map of one image (default: the first) over the picture, with a layer slider."""
    from ..viz.scan_report import patch_heatmap_figure

    name = _first(run.image_names(), image, "image")
    return patch_heatmap_figure(run.table("tokens"), run.summary, name, run.picture(name))


def attention_norm(run: RunData) -> Any:
    """Attention received vs L2 norm per layer (needs a scan with method attention or all)."""
    from ..viz.scan_report import attention_norm_figure

    return attention_norm_figure(run.table("tokens"), run.summary)


def text_norm(run: RunData, sequence: str | None = None) -> Any:
    """Language model: layer x token-position norm heat map of one prompt (default: the first)."""
    from ..viz.scan_report import text_norm_figure

    name = _first(run.image_names(), sequence, "sequence") if sequence is not None else None
    return text_norm_figure(run.table("tokens"), run.summary, name)


def umap(run: RunData, layer: int | None = None, color: str = "role", seed: int = 0) -> Any:
    """UMAP of the token embeddings at one saved layer (default: the last; needs ``save_layers``), by role."""
    from ..viz.embedding import scan_umap_figure

    return scan_umap_figure(run.dir, layer=layer, color=color, seed=seed)


# -- probe --------------------------------------------------------------------------------------


def probe(run: RunData, label: str | None = None) -> Any:
    """Probe accuracy vs layer per token group, error bands and chance (default: the first label)."""
    from ..viz.probe_report import probe_figure

    t = run.table("probe")
    labels = [str(x) for x in pd.unique(t["label"])]
    return probe_figure(t, _first(labels, label, "label"), run.summary)


# -- flow ---------------------------------------------------------------------------------------


def rollout(run: RunData, image: str | None = None) -> Any:
    """Attention rollout maps over the patch grid of one image (default: the first)."""
    from ..viz.flow_report import rollout_figure

    t = run.table("rollout")
    name = _first([str(x) for x in pd.unique(t["image"])], image, "image")
    kw = {"summary": run.summary} if _accepts(rollout_figure, "summary") else {}
    return rollout_figure(t, name, **kw)


def sink_maps(run: RunData, image: str | None = None, max_sinks: int = 2) -> Any:
    """Sink vs non-sink side by side: rollout (top) and last-block relevance maps (bottom) of one image."""
    from ..viz.flow_report import sink_maps_figure

    t = run.table("rollout")
    name = _first([str(x) for x in pd.unique(t["image"])], image, "image")
    return sink_maps_figure(t, run.table("relevance"), name, run.summary, max_sinks=max_sinks)


def vit_group_attention(run: RunData) -> Any:
    """Attention received per token by group (CLS, registers, sinks, non-sinks) in every ViT block."""
    from ..viz.flow_report import vit_group_attention_figure

    return vit_group_attention_figure(run.table("vit_attention_by_group"), run.summary)


def llm_group_attention(run: RunData) -> Any:
    """LLM attention to non-sink / ViT-propagated / LLM-emerged sink visual tokens, layer x group."""
    from ..viz.flow_report import llm_group_attention_figure

    return llm_group_attention_figure(run.table("visual_tokens"), run.summary)


def norm_bin(run: RunData) -> Any:
    """Paper Fig. 3A: mean LLM attention per visual token by ViT-norm bin, per LLM layer."""
    from ..viz.flow_report import norm_bin_figure

    return norm_bin_figure(run.table("attention_by_bin"), run.summary)


def knockout(run: RunData) -> Any:
    """Attention knockout: change in the answer's probability per blocked window of LLM layers."""
    from ..viz.flow_report import knockout_figure

    return knockout_figure(run.table("knockout"), run.summary)


# -- the registry: one line per kind ------------------------------------------------------------
register_kind("norm_distribution", "scan", norm_distribution)
register_kind("sink_count", "scan", sink_count, height=450)
register_kind("patch_heatmap", "scan", patch_heatmap, width=800, height=800)
register_kind("attention_norm", "scan", attention_norm)
register_kind("text_norm", "scan", text_norm)
register_kind("umap", "scan", umap, width=900, height=700)
register_kind("probe", "probe", probe)
register_kind("rollout", "flow", rollout, width=1200, height=450)
register_kind("sink_maps", "flow", sink_maps, width=1200, height=750)
register_kind("vit_group_attention", "flow", vit_group_attention)
register_kind("llm_group_attention", "flow", llm_group_attention)
register_kind("norm_bin", "flow", norm_bin)
register_kind("knockout", "flow", knockout)


def eval_accuracy(run: RunData) -> Any:
    """Accuracy per task type and variant with 95% bootstrap intervals and chance (an eval run)."""
    from ..viz.eval_report import accuracy_figure

    return accuracy_figure(run.table("results"))


register_kind("eval_accuracy", "eval", eval_accuracy)


def eval_paired(run: RunData) -> Any:
    """Each intervention's accuracy minus ``both``'s on the same items, per task type, with paired
    bootstrap intervals (an eval run with token variants, VAR or a test-time register)."""
    from ..viz.eval_report import paired_figure

    return paired_figure(run.table("paired"), run.summary.get("interventions", {}).get("paired_with", "both"))


register_kind("eval_paired", "eval", eval_paired)
