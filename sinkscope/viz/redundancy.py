"""Redundancy figure (Darcet et al.): neighbour cosine similarity of sinks vs non-sinks.

Drawn from the ``redundancy.csv`` table of a ``sinkscope flow`` run (or
:func:`sinkscope.flow.redundancy.redundancy`), never from the model.

>>> import numpy as np
>>> from PIL import Image
>>> from sinkscope.models import paint_markers
>>> Image.fromarray(paint_markers(np.full((32, 32, 3), 90, np.uint8), [(1, 2)])).save("cat.png")  # a planted sink
>>> from sinkscope.flow.run import run_flow
>>> from sinkscope.viz.flow_report import load_flow
>>> _ = run_flow("tiny-dinov2+sinks", images=["cat.png"], analyses=("redundancy",), out="runs/flow", progress=False)
>>> tables, summary = load_flow("runs/flow")
>>> fig = redundancy_figure(tables["redundancy"], summary)
>>> [a.text for a in fig.layout.annotations]
['sinks vs non-sinks, all images', 'cat.png: input (layer 0)']
"""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from . import style


def _red_summary(summary: dict | None) -> dict:
    s = summary or {}
    return s.get("redundancy", s) if isinstance(s.get("redundancy", s), dict) else {}


def _model(summary: dict | None) -> str:
    m = (summary or {}).get("model", {})
    return str(m.get("name", "?")) if isinstance(m, dict) else str(m)


def _layer_label(layer: int, role: str) -> str:
    return {"input": f"input (layer {layer})", "detection": f"detection (layer {layer})"}.get(
        role, f"layer {layer}"
    )


def redundancy_figure(
    table: pd.DataFrame, summary: dict | None = None, image: str | None = None
) -> go.Figure:
    """Left: neighbour cosine similarity of sink vs non-sink patches at the input layer and the
    detection layer (box plots over all images). Right: the input-layer similarity map of one
    ``image`` (default the first with a sink) on the patch grid, sinks marked with x.

    >>> import numpy as np
    >>> from sinkscope.flow.redundancy import redundancy
    >>> from sinkscope.models import load_model, paint_markers
    >>> img = paint_markers(np.full((32, 32, 3), 90, np.uint8), [(1, 2)])
    >>> res = redundancy(load_model("tiny-dinov2+sinks"), [img], names=["marked"])
    >>> fig = redundancy_figure(res.table, {"redundancy": res.summary})
    >>> fig.layout.annotations[1].text
    'marked: input (layer 0)'
    """
    t = table.dropna(subset=["neighbour_cos"])
    if not len(t):
        raise ValueError("the redundancy table has no values")
    rs = _red_summary(summary)
    layers = t[["layer", "layer_role"]].drop_duplicates().sort_values("layer")
    if image is None:
        with_sink = t[t.is_sink.astype(bool)].image
        image = with_sink.iloc[0] if len(with_sink) else t.image.iloc[0]
    first_layer = int(layers.layer.iloc[0])
    fig = make_subplots(
        rows=1,
        cols=2,
        column_widths=[0.55, 0.45],
        subplot_titles=[
            "sinks vs non-sinks, all images",
            f"{image}: {_layer_label(first_layer, layers.layer_role.iloc[0])}",
        ],
    )
    groups = (("non-sink", False, style.kind_color("patch")), ("sink", True, style.SINK_COLOR))
    for name, flag, color in groups:
        d = t[t.is_sink.astype(bool) == flag]
        labels = [_layer_label(int(r.layer), r.layer_role) for r in d[["layer", "layer_role"]].itertuples()]
        for layer, role in layers.itertuples(index=False):
            sel = (d.layer == layer).to_numpy()
            fig.add_trace(
                go.Box(
                    x=[lab for lab, s in zip(labels, sel) if s],
                    y=d.neighbour_cos[sel],
                    name=f"{name} (n={int(sel.sum())})",
                    legendgroup=name,
                    showlegend=bool(layer == first_layer),
                    marker_color=color,
                    boxmean=True,
                    offsetgroup=name,
                    meta={"role": "box", "group": name, "layer": int(layer), "layer_role": role},
                ),
                row=1,
                col=1,
            )
    fig.update_layout(boxmode="group")
    m = t[(t.image == image) & (t.layer == first_layer)]
    grid = m.pivot_table(index="row", columns="col", values="neighbour_cos")
    fig.add_trace(
        go.Heatmap(
            z=grid.to_numpy(),
            x=grid.columns,
            y=grid.index,
            colorscale=style.NORM_COLORSCALE,
            colorbar={"title": "cosine to neighbours", "x": 1.02},
            meta={"role": "map", "image": str(image), "layer": first_layer},
            hovertemplate="row %{y}, col %{x}<br>mean cosine %{z:.3f}<extra></extra>",
        ),
        row=1,
        col=2,
    )
    s = m[m.is_sink.astype(bool)]
    if len(s):
        fig.add_trace(style.sink_markers(s.row, s.col, "sink (detection layer)"), row=1, col=2)
    fig.update_yaxes(autorange="reversed", title_text=style.LABEL_PATCH_ROW, row=1, col=2)
    fig.update_xaxes(title_text=style.LABEL_PATCH_COL, row=1, col=2)
    fig.update_yaxes(title_text="mean cosine similarity to grid neighbours", row=1, col=1)
    hood = rs.get("neighbourhood", "4-neighbourhood")
    rule = (rs.get("rule") or {}).get("description", "")
    det = rs.get("detection_layer", int(layers.layer.iloc[-1]))
    style.apply_style(
        fig,
        title=(
            f"Sinks on redundant patches (Darcet et al.) - {_model(summary)}<br><sup>{hood}; "
            f"input = layer 0 (patch + position embedding), detection = layer {det} "
            f"({rs.get('detection_layer_source', '')}); sinks at layer {det}: {rule}</sup>"
        ),
    )
    fig.update_layout(margin={"t": 110})
    return fig


__all__ = ["redundancy_figure"]
