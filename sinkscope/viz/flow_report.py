"""Flow figures: rollout maps, attention by ViT-norm bin per LLM layer, knockout curves."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from . import style


def rollout_figure(rollout: pd.DataFrame, image: str) -> go.Figure:
    """Rollout maps over the patch grid of one image, one panel per start token (CLS, sinks)."""
    r = rollout[rollout.image == image]
    starts = list(dict.fromkeys(zip(r.start, r.start_kind)))[:6]
    fig = make_subplots(
        rows=1,
        cols=max(1, len(starts)),
        subplot_titles=[f"from {k} (token {s})" for s, k in starts] or ["(no start token)"],
    )
    for j, (s, _k) in enumerate(starts, start=1):
        d = r[r.start == s]
        grid = d.pivot(index="row", columns="col", values="value")
        fig.add_trace(
            go.Heatmap(
                z=grid.to_numpy(),
                x=grid.columns,
                y=grid.index,
                colorscale=style.NORM_COLORSCALE,
                showscale=j == len(starts),
                colorbar={"title": "rollout weight"},
                meta={"role": "rollout", "start": int(s)},
            ),
            row=1,
            col=j,
        )
        fig.update_yaxes(autorange="reversed", row=1, col=j)
    style.apply_style(
        fig, title=f"Attention rollout - {image}", x_title="patch column (index)", y_title="patch row (index)"
    )
    return fig


def norm_bin_figure(by_bin: pd.DataFrame, summary: dict) -> go.Figure:
    """Paper Fig. 3A: mean attention received per visual token, LLM layer x ViT-norm bin."""
    piv = by_bin.pivot(index="layer", columns="bin_lo", values="mean_attention")
    fig = go.Figure(
        go.Heatmap(
            z=piv.to_numpy() * 100,
            x=[f"{c:g}" for c in piv.columns],
            y=piv.index,
            colorscale="Magma",
            colorbar={"title": "attention per token (%)"},
            meta={"role": "norm_bins"},
            hovertemplate="LLM layer %{y}<br>ViT norm bin %{x}<br>%{z:.3f}%<extra></extra>",
        )
    )
    w = (summary.get("propagation") or {}).get("bin_width", "")
    style.apply_style(
        fig,
        title=f"LLM attention by ViT norm (bins of {w}) - {summary.get('model', {}).get('name')}",
        x_title="ViT L2 norm at the feature layer (bin start)",
        y_title="LLM layer (block index)",
    )
    return fig


def knockout_figure(ko: pd.DataFrame, summary: dict) -> go.Figure:
    """Change in the answer's probability per knocked-out window, one curve per source -> target."""
    fig = go.Figure()
    for (src, tgt), d in ko.groupby(["source", "target"], sort=False):
        fig.add_trace(
            go.Scatter(
                x=d.window_start,
                y=d.relative_change * 100,
                mode="lines+markers",
                name=f"{src} -> {tgt}",
                meta={"role": "knockout", "source": src, "target": tgt},
            )
        )
    fig.add_hline(y=0, line={"dash": "dot", "color": style.THRESHOLD_COLOR})
    style.apply_style(
        fig,
        title=f"Attention knockout - {summary.get('model', {}).get('name')}",
        x_title="first LLM layer of the blocked window",
        y_title="change in answer probability (%)",
    )
    return fig


def write_flow_report(path: str | Path, tables: dict[str, pd.DataFrame], summary: dict) -> Path:
    import plotly.io as pio

    figs = []
    if "rollout" in tables and len(tables["rollout"]):
        for image in list(dict.fromkeys(tables["rollout"].image))[:4]:
            figs.append(rollout_figure(tables["rollout"], image))
    if "attention_by_bin" in tables:
        figs.append(norm_bin_figure(tables["attention_by_bin"], summary))
    if "knockout" in tables:
        figs.append(knockout_figure(tables["knockout"], summary))
    parts = [pio.to_html(f, full_html=False, include_plotlyjs=(i == 0)) for i, f in enumerate(figs)]
    extra = ""
    if "attention_by_group" in tables:
        extra += "<h2>Mean attention per visual token</h2>" + tables["attention_by_group"].to_html(
            index=False
        )
    if "decode" in tables:
        top1 = tables["decode"][tables["decode"]["rank"] == 1]
        extra += "<h2>Isolated visual tokens decoded (top word)</h2>" + top1.to_html(index=False)
    warn = f"<p style='color:#a00'><b>{summary['warning']}</b></p>" if summary.get("warning") else ""
    html = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>sinkscope flow</title>"
        "<style>body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}"
        "table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px}</style>"
        f"</head><body><h1>Information pathways - {summary.get('model', {}).get('name')}</h1>{warn}"
        f"<p>prompt: {summary.get('prompt')!s} &middot; images: {', '.join(map(str, summary.get('images', [])))}"
        f" &middot; ViT sink rule: {summary.get('vit_rule', {}).get('description', '')}</p>"
        f"{''.join(parts)}{extra}</body></html>"
    )
    Path(path).write_text(html, encoding="utf-8")
    return Path(path)


__all__ = ["knockout_figure", "norm_bin_figure", "rollout_figure", "write_flow_report"]
