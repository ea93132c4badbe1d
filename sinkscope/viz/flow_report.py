"""A flow run's part of a report: findings from its tables, its section (every figure of
:func:`~sinkscope.viz.flow_figures.flow_figures`, re-exported here, and the small tables) and
``flow.html``. Tables are read through :mod:`sinkscope.runs`.

>>> import numpy as np
>>> from PIL import Image
>>> from sinkscope.models import paint_markers
>>> Image.fromarray(paint_markers(np.full((32, 32, 3), 90, np.uint8), [(1, 2)])).save("cat.png")  # a planted sink
>>> from sinkscope.flow.run import run_flow
>>> _ = run_flow("tiny-llava+sinks", images=["cat.png"], analyses=("rollout", "propagation"),
...              out="runs/flow", progress=False)
>>> tables, summary = load_flow("runs/flow")
>>> flow_findings(tables, summary)[2:4]
['16 visual tokens reach the LLM; 1 of them are ViT sinks.',
 'Averaged over LLM layers, a ViT sink receives 4.62% of the attention of text tokens after the first image (prefill), 1.00x a non-sink visual token (4.61%).']
>>> write_flow_report("runs/flow/flow.html", tables, summary)
PosixPath('runs/flow/flow.html')
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..runs import read_summary, read_table
from .flow_figures import (
    LLM_GROUPS,
    flow_figures,
    knockout_figure,
    llm_group_attention_figure,
    norm_bin_figure,
    rollout_figure,
    sink_maps_figure,
    vit_group_attention_figure,
)
from .page import RunSection, write_page
from .page import model_name as _name
from .page import pct as _pct


def load_flow(run_dir: str | Path) -> tuple[dict[str, pd.DataFrame], dict]:
    """The tables (``*.csv``, ``visual_tokens.parquet``) and ``summary.json`` of a flow run; a
    missing or corrupt file fails in one line naming it.

    >>> from sinkscope.flow.run import run_flow
    >>> _ = run_flow("tiny-llava+sinks", analyses=("rollout", "knockout"), out="runs/ko", progress=False)
    >>> tables, summary = load_flow("runs/ko")
    >>> sorted(tables), summary["model"]["name"]
    (['knockout', 'relevance', 'rollout', 'vit_attention_by_group'], 'tiny-llava+sinks')
    """
    d = Path(run_dir)
    summary = read_summary(d)
    tables = {f.stem: read_table(f) for f in sorted(d.glob("*.csv"))}
    if (d / "visual_tokens.parquet").exists():
        tables["visual_tokens"] = read_table(d / "visual_tokens.parquet")
    return tables, summary


def flow_findings(tables: dict[str, pd.DataFrame], summary: dict) -> list[str]:
    """What the flow tables say: ViT sinks among visual tokens, their LLM attention vs non-sinks,
    the knockout window with the largest effect."""
    prompt = f"; prompt: {summary['prompt']!r}" if summary.get("prompt") else ""
    out = [f"{_name(summary)}{prompt}; ViT sinks: {(summary.get('vit_rule') or {}).get('description', '?')}."]
    layer = summary.get("vit_layer")
    if isinstance(layer, dict) and "layer" in layer:
        out.append(
            f"The ViT analyses (sinks, rollout, relevance) stop at ViT layer {layer['layer']} of "
            f"{layer.get('n_layers', '?')}: {layer.get('source', '')}."
        )
    queries = (summary.get("propagation") or {}).get("queries", "the text tokens")
    vt = tables.get("visual_tokens")
    if vt is not None and len(vt):
        n_s = int(vt.is_vit_sink.sum())
        out.append(f"{len(vt)} visual tokens reach the LLM; {n_s} of them are ViT sinks.")
        if n_s and (~vt.is_vit_sink).any():
            s = vt[vt.is_vit_sink].attention_received.mean()
            o = vt[~vt.is_vit_sink].attention_received.mean()
            out.append(
                f"Averaged over LLM layers, a ViT sink receives {_pct(s)} of the attention of {queries}, "
                f"{s / o:.2f}x a non-sink visual token ({_pct(o)})."
            )
        em = int(((~vt.is_vit_sink) & (vt.llm_sink_layers > 0)).sum())
        out.append(f"{em} visual token(s) become sinks only inside the LLM (LLM-emerged).")
        lr = (summary.get("propagation") or {}).get("llm_rule") or {}
        if isinstance(lr, dict) and "sink_dims" in lr:
            src = lr.get("sink_dims_source_description") or lr.get("sink_dims_source", "?")
            dims = ", ".join(str(d) for d in lr["sink_dims"]) or "none"
            out.append(f"LLM sink dims: {dims} (from {src}).")
        note = (summary.get("propagation") or {}).get("llm_rule_note")
        if note:
            out.append("Caution: " + note + ".")
    g = tables.get("vit_attention_by_group")
    if g is not None and len(g) and g.mean_attention.notna().any():
        last = g[g.layer == g.layer.max()].groupby("group")["mean_attention"].mean().dropna()
        out.append(
            f"ViT block {int(g.layer.max())} (the last one analysed), attention per token by group: "
            + ", ".join(f"{k} {_pct(v)}" for k, v in last.items())
            + f" (uniform {_pct(float(g.uniform.mean()))})."
        )
    ko = tables.get("knockout")
    ko = ko.dropna(subset=["relative_change"]) if ko is not None and "relative_change" in ko else None
    if ko is not None and len(ko):
        worst = ko.loc[ko.relative_change.abs().idxmax()]
        where = (
            f"in the window centred on LLM layer {int(worst.layer)} (layers {int(worst.window_start)}-"
            f"{int(worst.window_end)})"
            if "layer" in ko.columns
            else f"from LLM layer {int(worst.window_start)}"
        )
        out.append(
            f"Largest knockout effect: blocking {worst.source} -> {worst.target} {where} changes the answer "
            f"probability by {100 * worst.relative_change:+.1f}%."
        )
    red = summary.get("redundancy")
    if isinstance(red, dict) and isinstance(red.get("mean_cos"), dict):
        mc = red["mean_cos"]

        def _cos(v):
            return "n/a (no sink)" if v is None else f"{v:.2f}"

        out.append(
            f"Redundancy (Darcet et al.): mean cosine to grid neighbours at the input layer - sinks "
            f"{_cos(mc.get('input_sink'))}, non-sinks {_cos(mc.get('input_nonsink'))}; at ViT layer "
            f"{red.get('detection_layer')} - sinks {_cos(mc.get('detection_sink'))}, non-sinks "
            f"{_cos(mc.get('detection_nonsink'))} ({red.get('n_sinks', 0)} sinks)."
        )
    rv = summary.get("relevancy")
    if isinstance(rv, dict) and isinstance(rv.get("relevancy"), dict):
        share = rv["relevancy"].get("sink_share")
        out.append(
            f"Relevancy (Chefer et al.) of the answer {rv.get('answer_token')!r} on the image patches: "
            + (
                f"{100 * share:.1f}% on the {rv.get('n_vit_sinks', 0)} ViT sink(s)."
                if share is not None
                else "n/a."
            )
        )
    ps = summary.get("paper_settings")
    if isinstance(ps, dict):
        out.append(
            "Settings: the paper's Fig. 3A settings (generated tokens, ViT norm >= 100, bins of 5)."
            if ps.get("matches")
            else "Settings differ from the paper's Fig. 3A: " + "; ".join(ps.get("differences", [])) + "."
        )
    if summary.get("warning"):
        out.append(str(summary["warning"]))
    return out


def build_flow_section(tables: dict[str, pd.DataFrame], summary: dict, path: str | Path) -> RunSection:
    """Findings, every figure the tables support and the small tables of a flow run."""
    return RunSection(
        "flow",
        Path(path),
        f"Information pathways - {_name(summary)}",
        findings=flow_findings(tables, summary),
        figures=flow_figures(tables, summary),
        tables_html=flow_tables_html(tables),
        warning=str(summary.get("warning") or ""),
    )


def flow_section(run_dir: str | Path) -> RunSection:
    """The section of a saved flow run (``sinkscope report``)."""
    tables, summary = load_flow(run_dir)
    return build_flow_section(tables, summary, run_dir)


def flow_tables_html(tables: dict[str, pd.DataFrame]) -> str:
    """The small result tables of a flow run as HTML (group means, decoded top words)."""
    extra = ""
    if "attention_by_group" in tables and len(tables["attention_by_group"]):
        extra += "<h2>Mean attention per visual token</h2>" + tables["attention_by_group"].to_html(
            index=False
        )
    if "decode" in tables and len(tables["decode"]):
        top1 = tables["decode"][tables["decode"]["rank"] == 1]
        extra += "<h2>Isolated visual tokens decoded (top word)</h2>" + top1.to_html(index=False)
    return extra


def write_flow_report(path: str | Path, tables: dict[str, pd.DataFrame], summary: dict) -> Path:
    """``flow.html``: the findings, every figure of :func:`flow_figures` and the small tables, as
    one self-contained page in the style of ``sinkscope report``."""
    sec = build_flow_section(tables, summary, Path(path).parent)
    return write_page([sec], path, title=f"sinkscope flow - {_name(summary)}")


__all__ = [
    "LLM_GROUPS",
    "build_flow_section",
    "flow_figures",
    "flow_findings",
    "flow_section",
    "flow_tables_html",
    "knockout_figure",
    "llm_group_attention_figure",
    "load_flow",
    "norm_bin_figure",
    "rollout_figure",
    "sink_maps_figure",
    "vit_group_attention_figure",
    "write_flow_report",
]
