"""Figures of a sink scan drawn from its token table and summary: norms per layer, sinks per layer,
attention vs norm (heat maps are in :mod:`sinkscope.viz.scan_heatmaps`).

Each figure is a pure function of the saved table and summary returning a
:class:`plotly.graph_objects.Figure`; :mod:`sinkscope.viz.scan_report` puts them on a page.

Conventions
-----------
* Layers are integers, ``0`` = embedding output; every layer axis says so.
* Patch heat maps use patch-grid coordinates: ``x = col``, ``y = row`` (row 0 at the top, the y axis is
  reversed like an image). Cell ``(row, col)`` covers ``[col - 0.5, col + 0.5] x [row - 0.5, row + 0.5]``;
  the picture underneath is stretched over ``[-0.5, cols - 0.5] x [-0.5, rows - 0.5]``.
* Heat-map colours are ``log10(norm)``, on a scale of their own for every layer of a patch heat map
  (norms grow by orders of magnitude with depth: one scale for all layers saturates the late ones); the
  colour bar is labelled with the norm itself and the hover shows the raw norm.
* Traces that tests or callers may want to find carry ``meta = {"role": ..., "layer": ...}``:
  ``"threshold"``, ``"sinks"``, ``"heatmap"``, ``"image"``, ``"sink_counts"``, ``"box"``, ``"attention"``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from sinkscope.viz import style
from sinkscope.viz.scan_common import (
    _KIND_ORDER,
    _MAX_ATTENTION_POINTS,
    _MAX_SINK_POINTS,
    _clean,
    _default_layer,
    _has_attention,
    _kinds,
    _layer_dict,
    _layer_slider,
    _log_axis,
    _model_title,
    _sig,
    _thresholds,
    _with_rule,
)

__all__ = ["attention_norm_figure", "norm_distribution_figure", "sink_count_figure"]


def norm_distribution_figure(tokens: pd.DataFrame, summary: Mapping) -> go.Figure:
    """Per-layer box plots of the L2 norm (log y axis), one box trace per token kind.

    Box statistics are precomputed (quartiles of all tokens of that kind and layer; whiskers = min/max of
    the *non-sink* tokens, so the gap to the sinks shows). Sinks are drawn as points (trace with
    ``meta["role"] == "sinks"``, at most 5000, x jittered around the layer), and the per-layer threshold as
    one horizontal tick per layer (trace with ``meta["role"] == "threshold"``; x = layer, y = threshold;
    layers whose threshold is None are omitted).
    """
    df = _clean(tokens)
    fig = go.Figure()
    for kind in _kinds(df):
        sub = df.loc[df["kind"] == kind]
        fig.add_trace(_kind_boxes(sub, kind))
    sinks = df.loc[df["is_sink"]]
    if len(sinks):
        fig.add_trace(_sink_points(sinks))

    thr = _thresholds(summary)
    if thr:
        threshold = (summary.get("rule") or {}).get("threshold") or {}
        fig.add_trace(
            go.Scatter(
                x=list(thr.keys()),
                y=[_sig(v, 6) for v in thr.values()],
                mode="markers",
                name=f"threshold ({threshold.get('kind', 'rule')})",
                marker={
                    "symbol": "line-ew-open",
                    "size": 34,
                    "color": style.THRESHOLD_COLOR,
                    "line": {"color": style.THRESHOLD_COLOR, "width": 3},
                },
                hovertemplate="layer %{x}<br>threshold %{y:.4g}<extra></extra>",
                meta={"role": "threshold"},
            )
        )

    style.apply_style(
        fig,
        _with_rule(f"L2 norm per layer — {_model_title(summary)}", summary),
        style.LABEL_LAYER,
        style.LABEL_LOG_NORM,
    )
    fig.update_layout(
        boxmode="group",
        height=480,
        legend={"orientation": "h", "y": 1.02, "yanchor": "bottom", "x": 1, "xanchor": "right"},
    )
    fig.update_yaxes(type="log", **_log_axis(list(df["norm"]) + list(thr.values())))
    fig.update_xaxes(dtick=1)
    return fig


def _kind_boxes(sub: pd.DataFrame, kind: str) -> go.Box:
    """Precomputed boxes of one token kind per layer: quartiles of all its tokens, whiskers at the
    non-sink tokens' min/max so the gap to the sinks shows (``meta = {"role": "box", "kind": k}``)."""
    xs, q1s, meds, q3s, los, his = [], [], [], [], [], []
    for layer, grp in sub.groupby("layer", sort=True):
        norms = grp["norm"].to_numpy()
        q1, med, q3 = np.quantile(norms, [0.25, 0.5, 0.75])
        rest = norms[~grp["is_sink"].to_numpy()]
        base = rest if rest.size else norms
        xs.append(int(layer))
        q1s.append(_sig(q1))
        meds.append(_sig(med))
        q3s.append(_sig(q3))
        los.append(_sig(min(base.min(), q1)))
        his.append(_sig(max(base.max(), q3)))
    return go.Box(
        x=xs,
        q1=q1s,
        median=meds,
        q3=q3s,
        lowerfence=los,
        upperfence=his,
        name=style.kind_label(kind),
        legendgroup=kind,
        marker_color=style.kind_color(kind),
        line={"color": style.kind_color(kind), "width": 1.5},
        boxpoints=False,
        meta={"role": "box", "kind": kind},
    )


def _sink_points(sinks: pd.DataFrame) -> go.Scatter:
    """Sink tokens as points (at most 5000, x jittered around the layer; ``meta["role"] == "sinks"``)."""
    if len(sinks) > _MAX_SINK_POINTS:
        sinks = sinks.sample(_MAX_SINK_POINTS, random_state=0)
    jitter = np.random.default_rng(0).uniform(-0.25, 0.25, size=len(sinks))
    return go.Scatter(
        x=np.round(sinks["layer"].to_numpy() + jitter, 3),
        y=sinks["norm"].to_numpy(dtype=np.float32),
        mode="markers",
        name="sinks",
        marker={
            "color": style.SINK_COLOR,
            "size": 7,
            "opacity": 0.85,
            "line": {"color": [style.kind_color(k) for k in sinks["kind"]], "width": 1.5},
        },
        customdata=np.stack(
            [
                sinks["image"].to_numpy(),
                sinks["token"].to_numpy(),
                sinks["kind"].to_numpy(),
                sinks["layer"].to_numpy(),
            ],
            axis=1,
        ),
        hovertemplate="sink: %{customdata[0]}<br>layer %{customdata[3]}, token %{customdata[1]} (%{customdata[2]})"
        "<br>L2 norm %{y:.4g}<extra></extra>",
        meta={"role": "sinks"},
    )


def sink_count_figure(tokens: pd.DataFrame, summary: Mapping) -> go.Figure:
    """Bar chart of the number of sink tokens per layer (summed over images).

    Heights come from ``summary["per_layer"][layer]["n_sinks"]`` (counted from ``tokens`` for layers the
    summary lacks); the hover adds the token count and the breakdown by kind. The emergence layer is
    annotated with an arrow. When the table holds the flags of the scan's other rules (``--method all``:
    ``is_sink_attention``, ``is_sink_dims``), each gets its own labelled bars beside the main rule's
    (``meta = {"role": "rule_counts", "rule": m}``): DINOv2-S has no high-norm sink, yet the attention
    rule finds its CLS token, and the default view should say so.
    """
    df = _clean(tokens)
    per_layer = _layer_dict(summary.get("per_layer"))
    counted = df.loc[df["is_sink"]].groupby("layer").size()
    totals = df.groupby("layer").size()
    by_kind = df.loc[df["is_sink"]].groupby(["layer", "kind"]).size()
    layers = sorted(set(per_layer) | set(int(x) for x in totals.index))
    counts, n_tokens, breakdown = [], [], []
    for layer in layers:
        entry = per_layer.get(layer) or {}
        n = entry.get("n_sinks") if isinstance(entry, Mapping) else None
        counts.append(int(n) if n is not None else int(counted.get(layer, 0)))
        nt = entry.get("n_tokens") if isinstance(entry, Mapping) else None
        n_tokens.append(int(nt) if nt is not None else int(totals.get(layer, 0)))
        parts = [
            f"{style.kind_label(k)} {int(by_kind[(layer, k)])}"
            for k in _KIND_ORDER + tuple(sorted(set(df["kind"]) - set(_KIND_ORDER)))
            if (layer, k) in by_kind.index
        ]
        breakdown.append(", ".join(parts) or "none")
    frac = [c / t if t else 0.0 for c, t in zip(counts, n_tokens, strict=True)]
    main = (
        str((summary.get("rule") or {}).get("method", "")) if isinstance(summary.get("rule"), Mapping) else ""
    )
    others = [m for m in _RULE_STYLE if m != main and f"is_sink_{m}" in df.columns]
    fig = go.Figure(
        go.Bar(
            x=layers,
            y=counts,
            offsetgroup="main",
            marker_color=style.SINK_COLOR,
            name=f"{main} rule (the scan's sink rule)" if others and main else "sinks",
            customdata=np.array(
                [[t, _sig(f, 3), b] for t, f, b in zip(n_tokens, frac, breakdown, strict=True)], dtype=object
            ),
            hovertemplate="layer %{x}<br>%{y} sinks of %{customdata[0]} tokens (%{customdata[1]:.2%})"
            "<br>by kind: %{customdata[2]}<extra></extra>",
            meta={"role": "sink_counts"},
        )
    )
    top = max(counts, default=0)
    for m in others:
        top = max(top, _add_rule_bars(fig, df, m, layers))
    emergence = summary.get("emergence_layer")
    title = f"Sink tokens per layer — {_model_title(summary)}"
    if emergence is not None and int(emergence) in layers:
        e = int(emergence)
        fig.add_annotation(
            x=e,
            y=counts[layers.index(e)],
            text=f"sinks emerge: layer {e}",
            showarrow=True,
            arrowhead=2,
            arrowcolor=style.EMERGENCE_COLOR,
            ax=-50,
            ay=-40,
            font={"color": style.EMERGENCE_COLOR},
        )
        fig.add_vline(x=e - 0.5, line={"color": style.EMERGENCE_COLOR, "dash": "dot", "width": 1.5})
    else:
        title += " (no emergence layer)"
    style.apply_style(fig, _with_rule(title, summary), style.LABEL_LAYER, style.LABEL_SINK_COUNT)
    fig.update_layout(height=380, showlegend=bool(others), bargap=0.15, barmode="group")
    if others:  # the legend under the axis: above it, it would cover the title's rule line
        fig.update_layout(
            height=460,
            margin={"b": 110},
            legend={"orientation": "h", "y": -0.2, "yanchor": "top", "x": 0, "xanchor": "left"},
        )
    fig.update_xaxes(dtick=1)
    fig.update_yaxes(rangemode="tozero", tickformat=",d", dtick=1 if top <= 10 else None)
    return fig


#: The scan's rules other than the main one, as bars of the sink-count figure: (label, colour).
_RULE_STYLE = {
    "norm": ("norm rule", style.SINK_COLOR),
    "attention": ("attention rule (attention received)", "#56B4E9"),
    "dims": ("dims rule (massive activations)", "#999999"),
}


def _add_rule_bars(fig: go.Figure, df: pd.DataFrame, method: str, layers: list[int]) -> int:
    """Bars of the tokens one more rule flags per layer, stacked by token kind (kind colours,
    ``meta = {"role": "rule_counts", "rule": m, "kind": k}``); returns the tallest stack."""
    hit = df.loc[df[f"is_sink_{method}"].fillna(False).astype(bool)]
    label = _RULE_STYLE[method][0]
    base = np.zeros(len(layers), dtype=int)
    for kind in _kinds(hit) if len(hit) else [None]:  # a rule that flags nothing: one empty, named trace
        per = hit.loc[hit["kind"] == kind].groupby("layer").size()
        ys = np.array([int(per.get(layer, 0)) for layer in layers], dtype=int)
        name = f"{label}: {style.kind_label(kind) if kind else 'no token'}"
        fig.add_trace(
            go.Bar(
                x=layers,
                y=ys,
                base=base.copy(),
                offsetgroup=method,
                name=name,
                marker={
                    "color": style.kind_color(kind),
                    "line": {"color": _RULE_STYLE[method][1], "width": 2},
                },
                hovertemplate=f"{name}<br>layer %{{x}}: %{{y}} token(s)<extra></extra>",
                meta={"role": "rule_counts", "rule": method, "kind": kind},
            )
        )
        base += ys
    return int(base.max(initial=0))


def attention_norm_figure(tokens: pd.DataFrame, summary: Mapping) -> go.Figure:
    """Attention received vs L2 norm, one layer at a time (slider), coloured by token kind.

    x = L2 norm (log), y = attention received (fraction; log when all values are > 0). Sinks have a
    thick vermillion outline. At most 2000 points per layer (sinks and non-patch tokens always kept,
    patch tokens sampled with a fixed seed). Traces carry ``meta = {"role": "attention", "layer": L,
    "kind": k}``. Raises ``ValueError`` when the table has no attention values.
    """
    if not _has_attention(tokens):
        raise ValueError("tokens has no attention_received values")
    df = _clean(tokens)
    df = df.assign(attention_received=pd.to_numeric(df["attention_received"], errors="coerce").astype(float))
    df = df.loc[df["attention_received"].notna()]
    layers = sorted(int(x) for x in pd.unique(df["layer"]))
    if not layers:
        raise ValueError("tokens has no rows with both a positive norm and an attention value")
    active = _default_layer(df, layers)
    kinds = _kinds(df)
    fig = go.Figure()
    for layer in layers:
        sub = df.loc[df["layer"] == layer]
        keep = sub["is_sink"] | (sub["kind"] != "patch")
        rest = sub.loc[~keep]
        budget = max(0, _MAX_ATTENTION_POINTS - int(keep.sum()))
        if len(rest) > budget:
            rest = rest.sample(budget, random_state=0)
        sub = pd.concat([sub.loc[keep], rest])
        for kind in kinds:
            k = sub.loc[sub["kind"] == kind]
            fig.add_trace(
                go.Scatter(
                    x=k["norm"].to_numpy(dtype=np.float32),
                    y=k["attention_received"].to_numpy(dtype=np.float32),
                    mode="markers",
                    name=style.kind_label(kind),
                    legendgroup=kind,
                    showlegend=True,
                    marker={
                        "color": style.kind_color(kind),
                        "size": np.where(k["is_sink"], 10, 6).astype(np.int8),
                        "opacity": 0.75,
                        "line": {
                            "color": style.SINK_COLOR,
                            "width": np.where(k["is_sink"], 2.5, 0).astype(np.float32),
                        },
                    },
                    customdata=k["token"].to_numpy(dtype=np.int32),
                    text=(k["image"] + np.where(k["is_sink"], " (sink)", "")).tolist(),
                    hovertemplate="%{text}, token %{customdata}<br>L2 norm %{x:.4g}"
                    f"<br>attention received %{{y:.3g}}<extra>{style.kind_label(kind)}, layer {layer}</extra>",
                    visible=layer == active,
                    meta={"role": "attention", "layer": layer, "kind": kind},
                )
            )
    n = len(kinds)
    visible = [[i == j for j in range(len(layers)) for _ in range(n)] for i in range(len(layers))]
    style.apply_style(
        fig,
        _with_rule(f"Attention received vs L2 norm — {_model_title(summary)}", summary),
        style.LABEL_NORM,
        style.LABEL_ATTENTION,
    )
    log_y = bool((df["attention_received"] > 0).all())
    fig.update_layout(height=520, sliders=[_layer_slider(layers, active, visible)])
    fig.update_xaxes(type="log", **_log_axis(df["norm"]))
    fig.update_yaxes(
        type="log" if log_y else "linear",
        **(_log_axis(df["attention_received"]) if log_y else {}),
        title_text=style.LABEL_ATTENTION + (" (log scale)" if log_y else ""),
    )
    return fig
