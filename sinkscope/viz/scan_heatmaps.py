"""Heat maps of a sink scan: the L2 norm over one image's patch grid (layer slider) and, for text
models, over layer x token position. Conventions: see :mod:`sinkscope.viz.scan_figures`.
"""

from __future__ import annotations

import html
from collections.abc import Mapping

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from sinkscope.viz import style
from sinkscope.viz.scan_common import (
    _MAX_TEXT_TOKENS,
    _clean,
    _default_layer,
    _fmt,
    _grid_of,
    _layer_slider,
    _log_range,
    _log_ticks,
    _model_title,
    _picture_uri,
    _rule_caption,
    _with_rule,
)

__all__ = ["patch_heatmap_figure", "text_norm_figure"]


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


def _layer_heatmap(
    lp: pd.DataFrame, n_rows: int, n_cols: int, layer: int, visible: bool, over_picture: bool
) -> go.Heatmap:
    """One layer's heat map of ``log10(norm)`` over the grid, coloured on that layer's own range."""
    z = np.full((n_rows, n_cols), np.nan, dtype=np.float32)
    cd = np.full((n_rows, n_cols, 2), np.nan, dtype=np.float32)
    r, c = lp["row"].to_numpy(), lp["col"].to_numpy()
    z[r, c] = np.log10(lp["norm"].to_numpy())
    cd[r, c, 0] = lp["token"].to_numpy()
    cd[r, c, 1] = lp["norm"].to_numpy()
    lo, hi = _log_range(lp["norm"].to_numpy())
    tickvals, ticktext = _log_ticks(lo, hi)
    return go.Heatmap(
        z=z,
        x=np.arange(n_cols),
        y=np.arange(n_rows),
        customdata=cd,
        zmin=lo,
        zmax=hi,
        colorscale=style.NORM_COLORSCALE,
        colorbar={
            "title": {"text": f"{style.LABEL_NORM} (layer {layer} scale)", "side": "right"},
            "tickvals": tickvals,
            "ticktext": ticktext,
        },
        opacity=0.6 if over_picture else 1.0,
        hovertemplate="token %{customdata[0]:.0f}<br>row %{y}, col %{x}<br>L2 norm %{customdata[1]:.4g}<extra>layer "
        f"{layer}</extra>",
        name=f"L2 norm, layer {layer}",
        visible=visible,
        meta={"role": "heatmap", "layer": layer, "zmin": lo, "zmax": hi},
    )


def patch_heatmap_figure(
    tokens: pd.DataFrame, summary: Mapping, image_name: str, image: np.ndarray | None = None
) -> go.Figure:
    """Patch-grid heat map of the L2 norm of one image with a layer slider.

    Traces: an optional ``go.Image`` (``meta["role"] == "image"``) stretched over the grid, then per layer
    one ``go.Heatmap`` (``meta = {"role": "heatmap", "layer": L}``) and one sink ``go.Scatter``
    (``meta = {"role": "sinks", "layer": L}``, possibly empty). Coordinates: ``x = col``, ``y = row``
    (row 0 at the top). Only the chosen layer's traces are visible; the slider toggles visibility.
    Colours are ``log10(norm)`` on each layer's own scale (its patches' smallest to largest norm; the
    colour bar of the visible layer says which), so the structure of every layer shows - norms grow by
    orders of magnitude with depth, and one scale for all layers saturated the late ones. The hover
    shows token index, row, col and norm; CLS / register tokens of the layer are listed under the title.
    """
    df = _clean(tokens.loc[tokens["image"].astype(str) == str(image_name)])
    if df.empty:
        raise ValueError(f"image {image_name!r} has no tokens in the table")
    patches = df.loc[(df["kind"] == "patch") & df["row"].notna() & df["col"].notna()]
    patches = patches.assign(row=patches["row"].astype(int), col=patches["col"].astype(int))
    n_rows, n_cols = _grid_of(summary, str(image_name), patches)
    layers = sorted(int(x) for x in pd.unique(df["layer"]))
    active = _default_layer(df, layers)

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
        fig.add_trace(_layer_heatmap(lp, n_rows, n_cols, layer, layer == active, image is not None))
        sinks = lp.loc[lp["is_sink"]]
        fig.add_trace(_sink_rings(sinks, layer, layer == active, marker_size))
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
    fig.update_layout(sliders=[_layer_slider(layers, active, visible, titles)])
    return _grid_layout(fig, n_rows, n_cols)


def _sink_rings(sinks: pd.DataFrame, layer: int, visible: bool, size: int) -> go.Scatter:
    """Open vermillion rings on one layer's sink patches (``meta = {"role": "sinks", "layer": L}``)."""
    return go.Scatter(
        x=sinks["col"].to_numpy(),
        y=sinks["row"].to_numpy(),
        mode="markers",
        marker={
            "symbol": "circle-open",
            "size": size,
            "color": style.SINK_COLOR,
            "line": {"width": 3, "color": style.SINK_COLOR},
        },
        customdata=np.stack([sinks["token"].to_numpy(), sinks["norm"].to_numpy(dtype=np.float32)], axis=1)
        if len(sinks)
        else None,
        hovertemplate="sink: token %{customdata[0]:.0f}<br>row %{y}, col %{x}<br>L2 norm %{customdata[1]:.4g}"
        f"<extra>layer {layer}</extra>",
        name="sinks",
        showlegend=False,
        visible=visible,
        meta={"role": "sinks", "layer": layer},
    )


def _grid_layout(fig: go.Figure, n_rows: int, n_cols: int) -> go.Figure:
    """Square cells, row 0 at the top, ticks on every patch of a small grid."""
    side = 440
    fig.update_layout(
        width=side + 190,
        height=int(side * n_rows / max(n_cols, 1) + 250),
        margin={"l": 60, "r": 20, "t": 80, "b": 20},
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
