"""Render a sink scan (tidy token table + summary) into one self-contained, offline HTML report.

The report embeds plotly.js inline exactly once (first figure) and references nothing on the network.
Each figure is also available on its own as a pure function returning a :class:`plotly.graph_objects.Figure`.

Conventions
-----------
* Layers are integers, ``0`` = embedding output; every layer axis says so.
* Patch heat maps use patch-grid coordinates: ``x = col``, ``y = row`` (row 0 at the top, the y axis is
  reversed like an image). Cell ``(row, col)`` covers ``[col - 0.5, col + 0.5] x [row - 0.5, row + 0.5]``;
  the picture underneath is stretched over ``[-0.5, cols - 0.5] x [-0.5, rows - 0.5]``.
* Heat-map colours are ``log10(norm)``; the colour bar is labelled with the norm itself and the hover
  shows the raw norm.
* Traces that tests or callers may want to find carry ``meta = {"role": ..., "layer": ...}``:
  ``"threshold"``, ``"sinks"``, ``"heatmap"``, ``"image"``, ``"sink_counts"``, ``"box"``, ``"attention"``.
"""

from __future__ import annotations

import base64
import html
import io
import math
import pathlib
from collections.abc import Mapping

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio

from sinkscope.viz import style

__all__ = [
    "write_scan_report",
    "norm_distribution_figure",
    "sink_count_figure",
    "patch_heatmap_figure",
    "text_norm_figure",
    "attention_norm_figure",
]

_KIND_ORDER = ("patch", "cls", "register", "text")
_MAX_SINK_POINTS = 5000  # sink points drawn in the distribution figure
_MAX_ATTENTION_POINTS = 2000  # points per layer in the attention figure (sinks and non-patch always kept)
_MAX_PICTURE_SIDE = 512  # embedded pictures are downscaled to this many pixels on the long side
_MAX_TEXT_TOKENS = 4096  # token positions drawn in the text heat map
_PLOTLY_CONFIG = {"displaylogo": False, "responsive": True}


# --------------------------------------------------------------------------------------------- helpers


def _sig(x: float, digits: int = 4) -> float | None:
    """Round to ``digits`` significant digits (``None`` for missing / non-finite)."""
    if x is None:
        return None
    x = float(x)
    if not math.isfinite(x):
        return None
    if x == 0:
        return 0.0
    return round(x, digits - 1 - int(math.floor(math.log10(abs(x)))))


def _fmt(x: float | None) -> str:
    """Short human format of a number (4 significant digits)."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{float(x):.4g}"


def _layer_dict(d: Mapping | None) -> dict[int, object]:
    """``{"3": v}`` -> ``{3: v}`` (JSON keys are strings)."""
    out: dict[int, object] = {}
    for key, value in (d or {}).items():
        try:
            out[int(key)] = value
        except (TypeError, ValueError):
            continue
    return out


def _thresholds(summary: Mapping) -> dict[int, float]:
    """Per-layer thresholds on the norm axis; layers without one (None / NaN / <= 0) are left out."""
    rule = summary.get("rule") or {}
    out = {}
    for layer, value in _layer_dict(rule.get("per_layer_threshold")).items():
        if value is None:
            continue
        try:
            v = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(v) and v > 0:
            out[layer] = v
    return dict(sorted(out.items()))


def _sink_mask(df: pd.DataFrame) -> np.ndarray:
    if "is_sink" not in df.columns:
        return np.zeros(len(df), dtype=bool)
    return df["is_sink"].fillna(False).astype(bool).to_numpy()


def _clean(tokens: pd.DataFrame) -> pd.DataFrame:
    """Rows with a finite, positive norm (log axes need > 0), image as str, layer/token as int."""
    df = tokens
    norm = pd.to_numeric(df["norm"], errors="coerce")
    df = df.loc[
        np.isfinite(norm.to_numpy(dtype=float, na_value=np.nan))
        & (norm.to_numpy(dtype=float, na_value=0) > 0)
    ]
    df = df.assign(
        image=df["image"].astype(str),
        layer=df["layer"].astype(int),
        token=df["token"].astype(int),
        kind=df["kind"].astype(str),
        norm=df["norm"].astype(float),
        is_sink=_sink_mask(df),
    )
    return df


def _kinds(df: pd.DataFrame) -> list[str]:
    present = list(pd.unique(df["kind"]))
    return [k for k in _KIND_ORDER if k in present] + sorted(k for k in present if k not in _KIND_ORDER)


def _model_title(summary: Mapping) -> str:
    model = summary.get("model") or {}
    name = model.get("name") or "unknown model"
    family = model.get("family")
    return f"{name} ({family})" if family else str(name)


def _rule_caption(summary: Mapping, layer: int | None = None) -> str:
    """``rule: <description>`` plus the threshold (at ``layer`` when given) for figure subtitles."""
    rule = summary.get("rule") or {}
    desc = str(rule.get("description", "")) if isinstance(rule, Mapping) else str(rule)
    if not desc:
        return ""
    if layer is not None:
        thr = _thresholds(summary).get(int(layer))
        if thr is not None:
            desc += f"; threshold at this layer {thr:.4g}"
    return "rule: " + html.escape(desc)


def _with_rule(title: str, summary: Mapping) -> str:
    cap = _rule_caption(summary)
    return title + (f"<br><sup>{cap}</sup>" if cap else "")


def _log_ticks(lo: float, hi: float) -> tuple[list[float], list[str]]:
    """Colour-bar ticks for a ``log10`` colour axis from ``lo`` to ``hi`` (both log10 values)."""
    vals = []
    for e in range(math.floor(lo) - 1, math.ceil(hi) + 1):
        for m in (1, 2, 5):
            v = m * 10.0**e
            if 10**lo <= v * (1 + 1e-9) and v <= 10**hi * (1 + 1e-9):
                vals.append(v)
    if len(vals) > 8:
        vals = [v for v in vals if f"{v:g}".lstrip("0.").startswith("1")] or vals[:: len(vals) // 6]
    if len(vals) < 2:
        vals = [10**lo, 10**hi]
    return [math.log10(v) for v in vals], [f"{v:,.0f}" if v >= 1 else f"{v:.3g}" for v in vals]


def _log_axis(values) -> dict:
    """Explicit 1-2-5 ticks (data units, written out in full) for a log axis over ``values``, so a
    range under one decade still gets labelled ticks."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v) & (v > 0)]
    if v.size == 0:
        return {}
    lo, hi = math.log10(v.min()), math.log10(v.max())
    if hi - lo < 1e-6:
        lo, hi = lo - 0.1, hi + 0.1
    tv, _ = _log_ticks(lo, hi)
    vals = [10**t for t in tv]
    return {"tickvals": vals, "ticktext": [f"{x:,.0f}" if x >= 10 else f"{x:.3g}" for x in vals]}


def _log_range(norms: np.ndarray) -> tuple[float, float]:
    logs = np.log10(norms[np.isfinite(norms) & (norms > 0)])
    if logs.size == 0:
        return 0.0, 1.0
    lo, hi = float(logs.min()), float(logs.max())
    if hi - lo < 1e-6:
        lo, hi = lo - 0.1, hi + 0.1
    return lo, hi


def _picture_uri(image: np.ndarray) -> tuple[str, int, int]:
    """``(data URI, height, width)`` of an image array; the URI holds a (possibly downscaled) JPEG."""
    from PIL import Image

    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    height, width = arr.shape[:2]
    pil = Image.fromarray(arr).convert("RGB")
    if max(height, width) > _MAX_PICTURE_SIDE:
        pil.thumbnail((_MAX_PICTURE_SIDE, _MAX_PICTURE_SIDE))
    buf = io.BytesIO()
    pil.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), height, width


def _grid_of(summary: Mapping, image_name: str, patches: pd.DataFrame) -> tuple[int, int]:
    for entry in summary.get("images") or []:
        if str(entry.get("image")) == image_name and entry.get("grid"):
            rows, cols = entry["grid"]
            return int(rows), int(cols)
    if patches.empty:
        raise ValueError(f"image {image_name!r}: no patch tokens with a row/col and no grid in the summary")
    return int(patches["row"].max()) + 1, int(patches["col"].max()) + 1


def _default_layer(df: pd.DataFrame, layers: list[int]) -> int:
    """The layer shown first: the one with most sinks (latest on ties), else the last layer."""
    counts = df.loc[df["is_sink"]].groupby("layer").size()
    if counts.empty:
        return layers[-1]
    best = counts.max()
    return int(max(counts.index[counts == best]))


def _layer_slider(
    layers: list[int], active: int, visible: list[list[bool]], titles: list[str] | None = None
) -> dict:
    steps = []
    for i, layer in enumerate(layers):
        args: list = [{"visible": visible[i]}]
        if titles is not None:
            args.append({"title.text": titles[i]})
        steps.append({"method": "update", "label": str(layer), "args": args})
    return {
        "active": layers.index(active),
        "currentvalue": {"prefix": "layer (0 = embeddings): ", "font": {"size": 13}},
        "pad": {"t": 60, "b": 10},
        "steps": steps,
    }


# --------------------------------------------------------------------------------------------- figures


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
        xs, q1s, meds, q3s, los, his, ns = [], [], [], [], [], [], []
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
            ns.append(int(norms.size))
        fig.add_trace(
            go.Box(
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
        )

    sinks = df.loc[df["is_sink"]]
    if len(sinks) > _MAX_SINK_POINTS:
        sinks = sinks.sample(_MAX_SINK_POINTS, random_state=0)
    if len(sinks):
        rng = np.random.default_rng(0)
        jitter = rng.uniform(-0.25, 0.25, size=len(sinks))
        fig.add_trace(
            go.Scatter(
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
        )

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


def sink_count_figure(tokens: pd.DataFrame, summary: Mapping) -> go.Figure:
    """Bar chart of the number of sink tokens per layer (summed over images).

    Heights come from ``summary["per_layer"][layer]["n_sinks"]`` (counted from ``tokens`` for layers the
    summary lacks); the hover adds the token count and the breakdown by kind. The emergence layer is
    annotated with an arrow.
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
    fig = go.Figure(
        go.Bar(
            x=layers,
            y=counts,
            marker_color=style.SINK_COLOR,
            name="sinks",
            customdata=np.array(
                [[t, _sig(f, 3), b] for t, f, b in zip(n_tokens, frac, breakdown, strict=True)], dtype=object
            ),
            hovertemplate="layer %{x}<br>%{y} sinks of %{customdata[0]} tokens (%{customdata[1]:.2%})"
            "<br>by kind: %{customdata[2]}<extra></extra>",
            meta={"role": "sink_counts"},
        )
    )
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
    fig.update_layout(height=380, showlegend=False, bargap=0.15)
    fig.update_xaxes(dtick=1)
    fig.update_yaxes(rangemode="tozero", tickformat=",d", dtick=1 if max(counts, default=0) <= 10 else None)
    return fig


def _non_patch_caption(sub: pd.DataFrame, limit: int = 8) -> str:
    """One line listing the non-patch tokens of one layer: ``CLS t0: 45.2 · register t1: 310 (sink)``."""
    other = sub.loc[sub["kind"] != "patch"].sort_values("token")
    if other.empty:
        return ""
    parts = []
    for _, r in other.head(limit).iterrows():
        mark = " (sink)" if r["is_sink"] else ""
        parts.append(f"{style.kind_label(r['kind'])} t{int(r['token'])}: {_fmt(r['norm'])}{mark}")
    if len(other) > limit:
        parts.append(f"+{len(other) - limit} more")
    return "non-patch: " + " · ".join(html.escape(p) for p in parts)


def patch_heatmap_figure(
    tokens: pd.DataFrame, summary: Mapping, image_name: str, image: np.ndarray | None = None
) -> go.Figure:
    """Patch-grid heat map of the L2 norm of one image with a layer slider.

    Traces: an optional ``go.Image`` (``meta["role"] == "image"``) stretched over the grid, then per layer
    one ``go.Heatmap`` (``meta = {"role": "heatmap", "layer": L}``) and one sink ``go.Scatter``
    (``meta = {"role": "sinks", "layer": L}``, possibly empty). Coordinates: ``x = col``, ``y = row``
    (row 0 at the top). Only the chosen layer's traces are visible; the slider toggles visibility.
    Colours are ``log10(norm)`` on one scale for all layers; the hover shows token index, row, col and
    norm; CLS / register tokens of the layer are listed under the title.
    """
    df = _clean(tokens.loc[tokens["image"].astype(str) == str(image_name)])
    if df.empty:
        raise ValueError(f"image {image_name!r} has no tokens in the table")
    patches = df.loc[(df["kind"] == "patch") & df["row"].notna() & df["col"].notna()]
    patches = patches.assign(row=patches["row"].astype(int), col=patches["col"].astype(int))
    n_rows, n_cols = _grid_of(summary, str(image_name), patches)
    layers = sorted(int(x) for x in pd.unique(df["layer"]))
    active = _default_layer(df, layers)
    lo, hi = _log_range(patches["norm"].to_numpy())
    tickvals, ticktext = _log_ticks(lo, hi)

    fig = go.Figure()
    n_fixed = 0
    if image is not None:
        uri, height, width = _picture_uri(image)
        fig.add_trace(
            go.Image(
                source=uri,
                x0=-0.5 + 0.5 * n_cols / width,
                y0=-0.5 + 0.5 * n_rows / height,
                dx=n_cols / width,
                dy=n_rows / height,
                hoverinfo="skip",
                name="image",
                meta={"role": "image"},
            )
        )
        n_fixed = 1

    marker_size = max(7, min(22, int(420 / max(n_rows, n_cols))))
    by_layer = dict(tuple(df.groupby("layer", sort=True)))
    patches_by_layer = dict(tuple(patches.groupby("layer", sort=True)))
    titles = []
    for layer in layers:
        lp = patches_by_layer.get(layer, patches.iloc[:0])
        lp = lp.loc[(lp["row"] < n_rows) & (lp["col"] < n_cols)]
        z = np.full((n_rows, n_cols), np.nan, dtype=np.float32)
        cd = np.full((n_rows, n_cols, 2), np.nan, dtype=np.float32)
        r, c = lp["row"].to_numpy(), lp["col"].to_numpy()
        z[r, c] = np.log10(lp["norm"].to_numpy())
        cd[r, c, 0] = lp["token"].to_numpy()
        cd[r, c, 1] = lp["norm"].to_numpy()
        fig.add_trace(
            go.Heatmap(
                z=z,
                x=np.arange(n_cols),
                y=np.arange(n_rows),
                customdata=cd,
                coloraxis="coloraxis",
                opacity=0.6 if image is not None else 1.0,
                hovertemplate="token %{customdata[0]:.0f}<br>row %{y}, col %{x}<br>L2 norm %{customdata[1]:.4g}<extra>layer "
                f"{layer}</extra>",
                name=f"L2 norm, layer {layer}",
                visible=layer == active,
                meta={"role": "heatmap", "layer": layer},
            )
        )
        sinks = lp.loc[lp["is_sink"]]
        fig.add_trace(
            go.Scatter(
                x=sinks["col"].to_numpy(),
                y=sinks["row"].to_numpy(),
                mode="markers",
                marker={
                    "symbol": "circle-open",
                    "size": marker_size,
                    "color": style.SINK_COLOR,
                    "line": {"width": 3, "color": style.SINK_COLOR},
                },
                customdata=np.stack(
                    [sinks["token"].to_numpy(), sinks["norm"].to_numpy(dtype=np.float32)], axis=1
                )
                if len(sinks)
                else None,
                hovertemplate="sink: token %{customdata[0]:.0f}<br>row %{y}, col %{x}<br>L2 norm %{customdata[1]:.4g}"
                f"<extra>layer {layer}</extra>",
                name="sinks",
                showlegend=False,
                visible=layer == active,
                meta={"role": "sinks", "layer": layer},
            )
        )
        n_sinks = int(by_layer[layer]["is_sink"].sum()) if layer in by_layer else 0
        title = (
            f"{html.escape(str(image_name))} — layer {layer} — {n_sinks} sink{'s' if n_sinks != 1 else ''}"
        )
        if len(sinks) != n_sinks:
            title += f" ({len(sinks)} in the grid)"
        caption = "; ".join(
            c
            for c in (_non_patch_caption(by_layer.get(layer, df.iloc[:0])), _rule_caption(summary, layer))
            if c
        )
        titles.append(title + (f"<br><sup>{caption}</sup>" if caption else ""))

    visible = []
    for i in range(len(layers)):
        vis = [True] * n_fixed
        for j in range(len(layers)):
            vis += [i == j, i == j]
        visible.append(vis)

    style.apply_style(fig, titles[layers.index(active)], style.LABEL_PATCH_COL, style.LABEL_PATCH_ROW)
    side = 440
    plot_h = side * n_rows / max(n_cols, 1)
    fig.update_layout(
        width=side + 190,
        height=int(plot_h + 250),
        margin={"l": 60, "r": 20, "t": 80, "b": 20},
        sliders=[_layer_slider(layers, active, visible, titles)],
        coloraxis={  # shared by all layers: one colour bar, one copy of the scale in the file
            "cmin": lo,
            "cmax": hi,
            "colorscale": style.NORM_COLORSCALE,
            "colorbar": {
                "title": {"text": style.LABEL_NORM, "side": "right"},
                "tickvals": tickvals,
                "ticktext": ticktext,
            },
        },
        plot_bgcolor="white",
    )
    fig.update_xaxes(
        range=[-0.5, n_cols - 0.5],
        showgrid=False,
        zeroline=False,
        constrain="domain",
        dtick=1 if n_cols <= 16 else None,
    )
    fig.update_yaxes(
        dtick=1 if n_rows <= 16 else None,
        range=[n_rows - 0.5, -0.5],
        autorange=False,
        showgrid=False,
        zeroline=False,
        scaleanchor="x",
        scaleratio=1,
        constrain="domain",
    )
    return fig


def text_norm_figure(tokens: pd.DataFrame, summary: Mapping, image_name: str | None = None) -> go.Figure:
    """Language-model view: heat map of the L2 norm, layer (y) x token position (x), log colours.

    ``image_name`` picks the sequence (prompt) when the table holds several; by default the first one.
    Sinks are ringed (trace with ``meta["role"] == "sinks"``, x = token, y = layer); the heat map trace has
    ``meta["role"] == "heatmap"``. At most 4096 token positions are drawn.
    """
    df = _clean(tokens)
    if df.empty:
        raise ValueError("no tokens with a finite positive norm to draw")
    if image_name is None:
        ok = [str(e.get("image")) for e in summary.get("images") or [] if e.get("status", "ok") == "ok"]
        present = set(df["image"])
        image_name = next((n for n in ok if n in present), df["image"].iloc[0])
    df = df.loc[df["image"] == str(image_name)]
    if df.empty:
        raise ValueError(f"sequence {image_name!r} has no tokens in the table")
    df = df.loc[df["token"] < df["token"].min() + _MAX_TEXT_TOKENS]
    layers = sorted(int(x) for x in pd.unique(df["layer"]))
    positions = sorted(int(x) for x in pd.unique(df["token"]))
    grid = df.pivot_table(index="layer", columns="token", values="norm", aggfunc="first").reindex(
        index=layers, columns=positions
    )
    norms = grid.to_numpy(dtype=np.float32)
    lo, hi = _log_range(norms)
    tickvals, ticktext = _log_ticks(lo, hi)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.log10(norms).astype(np.float32)
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=np.array(positions),
            y=np.array(layers),
            customdata=norms,
            zmin=lo,
            zmax=hi,
            colorscale=style.NORM_COLORSCALE,
            colorbar={
                "title": {"text": style.LABEL_NORM, "side": "right"},
                "tickvals": tickvals,
                "ticktext": ticktext,
            },
            hovertemplate="token %{x}, layer %{y}<br>L2 norm %{customdata:.4g}<extra></extra>",
            name="L2 norm",
            meta={"role": "heatmap"},
        )
    )
    sinks = df.loc[df["is_sink"]]
    fig.add_trace(
        go.Scatter(
            x=sinks["token"].to_numpy(),
            y=sinks["layer"].to_numpy(),
            mode="markers",
            marker={
                "symbol": "circle-open",
                "size": 9,
                "color": style.SINK_COLOR,
                "line": {"width": 2.5, "color": style.SINK_COLOR},
            },
            customdata=sinks[["kind"]].to_numpy(dtype=object) if len(sinks) else None,
            text=[_fmt(v) for v in sinks["norm"]],
            hovertemplate="sink: token %{x} (%{customdata[0]}), layer %{y}<br>L2 norm %{text}<extra></extra>",
            name="sinks",
            meta={"role": "sinks"},
        )
    )
    style.apply_style(
        fig,
        _with_rule(
            f"L2 norm by token and layer — {html.escape(str(image_name))} — {_model_title(summary)}", summary
        ),
        style.LABEL_TOKEN,
        style.LABEL_LAYER,
    )
    fig.update_layout(
        height=max(320, min(900, 22 * len(layers) + 180)),
        legend={"orientation": "h", "y": 1.02, "yanchor": "bottom", "x": 1, "xanchor": "right"},
        plot_bgcolor="white",
    )
    fig.update_yaxes(
        dtick=1 if len(layers) <= 40 else None,
        showgrid=False,
        zeroline=False,
        range=[layers[0] - 0.5, layers[-1] + 0.5],
    )
    fig.update_xaxes(showgrid=False, zeroline=False, range=[positions[0] - 0.5, positions[-1] + 0.5])
    return fig


def _has_attention(tokens: pd.DataFrame) -> bool:
    return "attention_received" in tokens.columns and bool(
        pd.to_numeric(tokens["attention_received"], errors="coerce").notna().any()
    )


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


# --------------------------------------------------------------------------------------------- page

_CSS = """
body { font-family: %(font)s; margin: 0; color: #222; background: #fafafa; }
header { background: #1f2a37; color: #fff; padding: 18px 28px; }
header h1 { margin: 0 0 4px 0; font-size: 22px; }
header .rule { color: #cfd8e3; font-size: 14px; }
main { padding: 10px 28px 40px 28px; max-width: 1400px; }
section { background: #fff; border: 1px solid #e3e6ea; border-radius: 6px; padding: 14px 18px; margin: 16px 0; }
section h2 { font-size: 17px; margin: 0 0 8px 0; }
.note { color: #555; font-size: 13px; }
table.kv { border-collapse: collapse; font-size: 14px; }
table.kv th { text-align: left; padding: 3px 16px 3px 0; color: #555; font-weight: 600; vertical-align: top; }
table.kv td { padding: 3px 0; }
table.list { border-collapse: collapse; font-size: 13px; margin-top: 8px; }
table.list th, table.list td { border-bottom: 1px solid #eee; padding: 3px 12px 3px 0; text-align: left; }
.failed { color: #b3261e; }
.grid { display: flex; flex-wrap: wrap; gap: 12px; }
.grid > div { flex: 0 0 auto; }
code { background: #f1f3f5; padding: 0 3px; border-radius: 3px; }
"""


def _summary_block(df: pd.DataFrame, summary: Mapping, shown: list[str], n_more: int) -> str:
    esc = html.escape
    images = summary.get("images") or []
    failed = [e for e in images if e.get("status") == "failed"]
    n_ok = sum(1 for e in images if e.get("status", "ok") == "ok") if images else df["image"].nunique()
    layout = summary.get("layout") or {}
    rule = summary.get("rule") or {}
    threshold = rule.get("threshold") or {}
    layers = (
        sorted(int(x) for x in pd.unique(df["layer"]))
        if len(df)
        else sorted(_layer_dict(summary.get("per_layer")))
    )
    per_layer = _layer_dict(summary.get("per_layer"))
    flags = (
        sum(int((v or {}).get("n_sinks") or 0) for v in per_layer.values())
        if per_layer
        else int(df["is_sink"].sum())
    )
    sinks = df.loc[df["is_sink"]]
    distinct = len(sinks[["image", "token"]].drop_duplicates())
    peak = ""
    if per_layer:
        best = max(per_layer.items(), key=lambda kv: int((kv[1] or {}).get("n_sinks") or 0))
        peak = f" (peak: {int((best[1] or {}).get('n_sinks') or 0)} at layer {best[0]})"
    emergence = summary.get("emergence_layer")
    dims = list(summary.get("sink_dims") or [])
    dims_text = (
        ", ".join(str(d) for d in dims[:32]) + (f", … (+{len(dims) - 32})" if len(dims) > 32 else "")
        if dims
        else "none"
    )
    thr_text = f"{threshold.get('kind', 'n/a')}" + (
        f" = {_fmt(threshold.get('value'))}" if threshold.get("value") is not None else ""
    )
    rows = [
        (
            "model",
            f"{esc(str((summary.get('model') or {}).get('name', 'unknown')))} "
            f"<span class='note'>({esc(str((summary.get('model') or {}).get('family', 'n/a')))})</span>",
        ),
        (
            "rule",
            f"{esc(str(rule.get('description', 'n/a')))} <span class='note'>(method <code>{esc(str(rule.get('method', 'n/a')))}</code>, "
            f"threshold {esc(thr_text)})</span>",
        ),
        (
            "token layout",
            f"{layout.get('n_cls', 'n/a')} CLS, {layout.get('n_registers', 'n/a')} registers, "
            f"patch size {layout.get('patch_size') if layout.get('patch_size') is not None else 'n/a'}",
        ),
        (
            "images",
            f"{len(images) if images else n_ok} scanned: {n_ok} ok, "
            f"<span class='{'failed' if failed else ''}'>{len(failed)} failed</span>",
        ),
        ("layers", f"{len(layers)} (0 = embeddings … {layers[-1]})" if layers else "none"),
        (
            "sinks",
            f"{distinct} distinct sink tokens (image, token) at any layer; {flags} sink flags summed over layers{peak}",
        ),
        (
            "emergence layer",
            esc(str(emergence)) if emergence is not None else "none (no layer with sinks in most images)",
        ),
        ("sink dims", esc(dims_text)),
    ]
    out = ["<section id='summary'><h2>Summary</h2><table class='kv'>"]
    out += [f"<tr><th>{esc(k)}</th><td>{v}</td></tr>" for k, v in rows]
    out.append("</table>")
    if failed:
        out.append(
            "<h3 class='failed' style='font-size:15px;margin:12px 0 4px 0'>Failed images</h3><ul class='failed'>"
        )
        out += [
            f"<li><code>{esc(str(e.get('image')))}</code>: {esc(str(e.get('reason') or 'no reason given'))}</li>"
            for e in failed
        ]
        out.append("</ul>")
    if n_more:
        out.append(
            f"<p class='note'>Heat maps are drawn for the first {len(shown)} images; {n_more} more are in the table only.</p>"
        )
    # Per-image table.
    ok = [e for e in images if e.get("status", "ok") == "ok"] or [
        {"image": n, "grid": None} for n in pd.unique(df["image"])
    ]
    if ok:
        first = sinks.groupby("image")["layer"].min()
        count = sinks.drop_duplicates(["image", "token"]).groupby("image").size()
        out.append(
            "<details><summary class='note'>Per-image sinks</summary><table class='list'>"
            "<tr><th>image</th><th>grid (rows × cols)</th><th>distinct sink tokens</th><th>first sink layer</th></tr>"
        )
        for e in ok[:500]:
            name = str(e.get("image"))
            grid = e.get("grid")
            grid_text = f"{grid[0]} × {grid[1]}" if grid else "–"
            out.append(
                f"<tr><td><code>{esc(name)}</code></td><td>{grid_text}</td><td>{int(count.get(name, 0))}</td>"
                f"<td>{int(first[name]) if name in first.index else '–'}</td></tr>"
            )
        out.append("</table></details>")
    out.append("</section>")
    return "\n".join(out)


def write_scan_report(
    path: str | pathlib.Path,
    tokens: pd.DataFrame,
    summary: dict,
    images: Mapping[str, np.ndarray] | None = None,
    max_images: int = 24,
) -> pathlib.Path:
    """Write the scan report as one self-contained HTML file (plotly.js inline, no network) and return its path.

    Sections: title (model, rule), summary (images ok/failed with reasons, layers, sinks, emergence
    layer, sink dims), norm distributions per layer, sink counts per layer, one heat map per image (at most
    ``max_images``; a layer-by-token heat map for text-only sequences), and attention received vs norm when
    ``tokens`` has ``attention_received`` values.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images = images or {}
    df = _clean(tokens)

    ok_names = [str(e.get("image")) for e in summary.get("images") or [] if e.get("status", "ok") == "ok"]
    present = list(pd.unique(df["image"]))
    order = [n for n in ok_names if n in set(present)] + [n for n in present if n not in set(ok_names)]
    shown = order[: max(0, int(max_images))]
    n_more = len(order) - len(shown)

    blocks: list[str] = []
    first = [True]

    def render(fig: go.Figure, div_id: str) -> str:
        out = pio.to_html(
            fig,
            full_html=False,
            include_plotlyjs=first[0],
            include_mathjax=False,
            config=_PLOTLY_CONFIG,
            div_id=div_id,
            default_width="100%",
        )
        first[0] = False
        return out

    if len(df):
        blocks.append(
            "<section id='norms'><h2>1. L2 norm per layer</h2><p class='note'>Boxes: quartiles of each token kind; "
            "whiskers: min/max of the non-sink tokens. Points: sink tokens. Black ticks: the rule's per-layer threshold "
            "on the norm axis (missing where the rule has none).</p>"
            + render(norm_distribution_figure(df, summary), "fig-norms")
            + "</section>"
        )
        blocks.append(
            "<section id='counts'><h2>2. Sink tokens per layer</h2>"
            + render(sink_count_figure(df, summary), "fig-counts")
            + "</section>"
        )
        groups = dict(tuple(df.loc[df["image"].isin(shown)].groupby("image", sort=False)))
        cells = []
        text_cells = []
        for i, name in enumerate(shown):
            sub = groups[name]
            has_grid = bool(((sub["kind"] == "patch") & sub["row"].notna() & sub["col"].notna()).any())
            try:
                if has_grid:
                    fig = patch_heatmap_figure(sub, summary, name, images.get(name))
                    cells.append(render(fig, f"fig-image-{i}"))
                else:
                    fig = text_norm_figure(sub, summary, name)
                    text_cells.append(render(fig, f"fig-text-{i}"))
            except ValueError as err:  # one bad image must not sink the report
                cells.append(
                    f"<p class='failed'>{html.escape(name)}: could not draw ({html.escape(str(err))})</p>"
                )
        if cells:
            blocks.append(
                "<section id='images'><h2>3. Patch norms per image</h2><p class='note'>Heat map of log L2 norm over the "
                "patch grid (x = column, y = row), over the image the model saw; rings mark sinks. Use the slider to change "
                "layer; CLS/register tokens are listed under each title.</p><div class='grid'>"
                + "\n".join(f"<div>{c}</div>" for c in cells)
                + "</div></section>"
            )
        if text_cells:
            blocks.append(
                "<section id='text'><h2>3. Token norms per sequence</h2><p class='note'>Heat map of log L2 norm, layer × "
                "token position; rings mark sinks.</p>" + "\n".join(text_cells) + "</section>"
            )
        if _has_attention(df):
            try:
                blocks.append(
                    "<section id='attention'><h2>4. Attention received vs L2 norm</h2>"
                    + render(attention_norm_figure(df, summary), "fig-attention")
                    + "</section>"
                )
            except ValueError:
                pass
    else:
        blocks.append("<section><p class='failed'>The token table is empty: nothing to plot.</p></section>")

    title = _model_title(summary)
    rule_text = str((summary.get("rule") or {}).get("description", ""))
    page = (
        "<!DOCTYPE html>\n<html lang='en'>\n<head>\n<meta charset='utf-8'><meta name='generator' content='sinkscope'>\n"
        f"<title>sinkscope scan — {html.escape(title)}</title>\n"
        f"<style>{_CSS % {'font': style.FONT_FAMILY}}</style>\n</head>\n<body>\n"
        f"<header><h1>Attention-sink scan: {html.escape(title)}</h1><div class='rule'>Rule: {html.escape(rule_text)}</div></header>\n"
        "<main>\n"
        + _summary_block(df, summary, shown, n_more)
        + "\n"
        + "\n".join(blocks)
        + "\n</main>\n</body>\n</html>\n"
    )
    path.write_text(page, encoding="utf-8")
    return path
