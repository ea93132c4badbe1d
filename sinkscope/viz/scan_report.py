"""A scan's part of a report: its section (findings, summary table, figures) and ``report.html``.

The same :func:`build_scan_section` makes a scan's own ``report.html`` (:func:`write_scan_report`,
called by the scan) and its section of ``sinkscope report`` (:func:`scan_section`, from the saved
folder), so both summarise a run with the same findings. The figures live in
:mod:`sinkscope.viz.scan_figures` and :mod:`sinkscope.viz.scan_heatmaps` (re-exported here), the
sentences in :mod:`sinkscope.viz.scan_findings`, the page writer in :mod:`sinkscope.viz.page`.

>>> from sinkscope.scanning import scan
>>> res = scan("tiny-dinov2+sinks", out="runs/scan", progress=False)
>>> write_scan_report("runs/scan/report.html", res.tokens, res.summary, res.pixels)
PosixPath('runs/scan/report.html')
>>> tokens, summary, pixels = load_scan_run("runs/scan")      # the same section, from the saved folder
>>> scan_section("runs/scan").title
'Scan - tiny-dinov2+sinks'
"""

from __future__ import annotations

import html
import pathlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from sinkscope._utils import SinkscopeError
from sinkscope.runs import read_summary, read_table
from sinkscope.viz.page import RunSection, write_page
from sinkscope.viz.page import model_name as _name
from sinkscope.viz.scan_common import _clean, _has_attention, _model_title
from sinkscope.viz.scan_figures import attention_norm_figure, norm_distribution_figure, sink_count_figure
from sinkscope.viz.scan_findings import _summary_block, rule_findings, scan_findings
from sinkscope.viz.scan_heatmaps import patch_heatmap_figure, text_norm_figure

__all__ = [
    "attention_norm_figure",
    "build_scan_section",
    "load_scan_run",
    "norm_distribution_figure",
    "patch_heatmap_figure",
    "rule_findings",
    "scan_findings",
    "scan_section",
    "sink_count_figure",
    "text_norm_figure",
    "write_scan_report",
]

_NOTES = {
    "norms": "Boxes: quartiles of each token kind; whiskers: min/max of the non-sink tokens. Points: sink tokens. "
    "Black ticks: the rule's per-layer threshold on the norm axis (missing where the rule has none).",
    "counts": "Bars: tokens the scan's sink rule flags per layer, summed over images; when the scan ran several "
    "rules (--method all), the other rules' tokens are drawn beside, each labelled.",
    "image": "Heat map of log L2 norm over the patch grid (x = column, y = row), over the image the model saw, "
    "coloured on each layer's own range (the colour bar gives it); rings mark sinks. Use the slider to change "
    "layer; CLS/register tokens are listed under each title.",
    "text": "Heat map of log L2 norm, layer x token position; rings mark sinks.",
}


def load_scan_run(run_dir: str | Path) -> tuple[pd.DataFrame, dict, dict[str, np.ndarray]]:
    """``tokens``, ``summary`` and the pictures the model saw (from ``seen/``) of a scan run; a
    missing or corrupt file fails in one line naming it."""
    d = Path(run_dir)
    tokens = read_table(d / "tokens.parquet")
    summary = read_summary(d)
    from PIL import Image

    from ..scanning import seen_pictures

    pixels = {}
    for name, f in seen_pictures(d).items():
        try:
            pixels[name] = np.asarray(Image.open(f).convert("RGB"))
        except OSError:  # a damaged picture: the heat map is drawn without it
            continue
    return tokens, summary, pixels


def _image_order(df: pd.DataFrame, summary: Mapping) -> list[str]:
    ok_names = [str(e.get("image")) for e in summary.get("images") or [] if e.get("status", "ok") == "ok"]
    present = list(pd.unique(df["image"]))
    return [n for n in ok_names if n in set(present)] + [n for n in present if n not in set(ok_names)]


def _add(sec: RunSection, heading: str, fig, div_id: str, note: str | None = None) -> None:
    sec.figures.append((heading, fig))
    sec.ids[heading] = div_id
    if note:
        sec.notes[heading] = note


def _add_images(
    sec: RunSection, df: pd.DataFrame, summary: Mapping, shown: list[str], pixels: Mapping
) -> None:
    groups = dict(tuple(df.loc[df["image"].isin(shown)].groupby("image", sort=False)))
    first_grid = first_text = True
    for i, name in enumerate(shown):
        sub = groups[name]
        grid = bool(((sub["kind"] == "patch") & sub["row"].notna() & sub["col"].notna()).any())
        try:
            if grid:
                fig = patch_heatmap_figure(sub, summary, name, pixels.get(name))
            else:
                fig = text_norm_figure(sub, summary, name)
        except ValueError as err:  # one bad image must not sink the report
            sec.intro_html += (
                f"<p class='failed'>{html.escape(name)}: could not draw ({html.escape(str(err))})</p>"
            )
            continue
        heading = f"Norms over {'the patch grid' if grid else 'the sequence'} - {name}"
        note = None
        if grid and first_grid:
            note, first_grid = _NOTES["image"], False
        elif not grid and first_text:
            note, first_text = _NOTES["text"], False
        _add(sec, heading, fig, f"fig-{'image' if grid else 'text'}-{i}", note)


def build_scan_section(
    tokens: pd.DataFrame,
    summary: dict,
    pixels: Mapping[str, np.ndarray] | None = None,
    path: str | Path = ".",
    max_images: int = 24,
) -> RunSection:
    """A scan's section: findings, the summary table and the figures - norms per layer with the
    thresholds, sinks per layer (every rule the scan ran), one heat map per image (at most
    ``max_images``), attention vs norm when recorded, and the UMAP when ``path`` holds activations."""
    d = Path(path)
    df = _clean(tokens)
    order = _image_order(df, summary)
    shown = order[: max(0, int(max_images))]
    sec = RunSection(
        "scan",
        d,
        f"Scan - {_name(summary)}",
        findings=scan_findings(df, summary),
        intro_html=_summary_block(df, summary, shown, len(order) - len(shown)),
    )
    if not len(df):
        sec.warning = "the token table is empty: nothing to plot"
        return sec
    heading = "L2 norm per layer, with the detection threshold"
    _add(sec, heading, norm_distribution_figure(df, summary), "fig-norms", _NOTES["norms"])
    _add(
        sec,
        "Sink tokens per layer (emergence)",
        sink_count_figure(df, summary),
        "fig-counts",
        _NOTES["counts"],
    )
    _add_images(sec, df, summary, shown, pixels or {})
    if _has_attention(df):
        try:
            _add(sec, "Attention received vs L2 norm", attention_norm_figure(df, summary), "fig-attention")
        except ValueError:
            pass
    if (d / "activations" / "manifest.json").exists():
        from .embedding import scan_umap_figure

        try:
            _add(sec, "UMAP of token embeddings", scan_umap_figure(d), "fig-umap")
        except (ValueError, SinkscopeError) as err:
            sec.intro_html += f"<p class='note'>No UMAP: {html.escape(str(err))}</p>"
    return sec


def scan_section(run_dir: str | Path, max_images: int = 6) -> RunSection:
    """The section of a saved scan run (``sinkscope report``), read through :mod:`sinkscope.runs`."""
    tokens, summary, pixels = load_scan_run(run_dir)
    return build_scan_section(tokens, summary, pixels, run_dir, max_images)


def write_scan_report(
    path: str | pathlib.Path,
    tokens: pd.DataFrame,
    summary: dict,
    images: Mapping[str, np.ndarray] | None = None,
    max_images: int = 24,
) -> pathlib.Path:
    """Write the scan report as one self-contained HTML file (plotly.js inline, no network) and return its path.

    One page with the section of :func:`build_scan_section`: findings, summary (images ok/failed with
    reasons, layers, sinks, emergence layer, sink dims), norm distributions per layer, sink counts per
    layer, one heat map per image (at most ``max_images``; a layer-by-token heat map for text-only
    sequences), and attention received vs norm when ``tokens`` has ``attention_received`` values.
    """
    path = pathlib.Path(path)
    sec = build_scan_section(tokens, summary, images, path.parent, max_images)
    return write_page([sec], path, title=f"sinkscope scan — {_model_title(summary)}", overwrite=True)
