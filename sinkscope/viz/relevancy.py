"""Relevancy map figure: Chefer-style relevancy of the answer beside attention rollout.

Drawn from the ``relevancy.csv`` table of a ``sinkscope flow`` run (or
:func:`sinkscope.flow.relevancy.vlm_relevancy`), never from the model.

>>> from PIL import Image
>>> from sinkscope.models import paint_markers
>>> Image.fromarray(paint_markers(np.full((32, 32, 3), 90, np.uint8), [(1, 2)])).save("cat.png")  # a planted sink
>>> from sinkscope.flow.run import run_flow
>>> from sinkscope.viz.flow_report import load_flow
>>> _ = run_flow("tiny-llava+sinks", images=["cat.png"], analyses=("relevancy",), out="runs/flow", progress=False)
>>> tables, summary = load_flow("runs/flow")
>>> fig = relevancy_figure(tables["relevancy"], "cat.png", summary)
>>> [a.text for a in fig.layout.annotations]
['relevancy: LLM + ViT, at the ViT input patches', 'relevancy in the LLM only (feature-layer tokens)',
 'attention rollout: LLM + ViT, at the ViT input patches']
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from . import style

#: (column, panel title) of the maps, in panel order.
PANELS = (
    ("relevancy", "relevancy: LLM + ViT, at the ViT input patches"),
    ("relevancy_llm", "relevancy in the LLM only (feature-layer tokens)"),
    ("rollout", "attention rollout: LLM + ViT, at the ViT input patches"),
)


def _model(summary: dict | None) -> str:
    m = (summary or {}).get("model", {})
    return str(m.get("name", "?")) if isinstance(m, dict) else str(m)


def relevancy_figure(table: pd.DataFrame, image: str | int, summary: dict | None = None) -> go.Figure:
    """Relevancy of the answer token on the patch grid of one image (``image_name`` or index),
    beside the LLM-only relevancy and attention rollout from the same pass. Each map is shown
    relative to its own maximum (hover gives the raw value); ViT sinks are marked with x.

    >>> from sinkscope.flow.relevancy import vlm_relevancy
    >>> from sinkscope.models import load_model, paint_markers
    >>> img = paint_markers(np.full((32, 32, 3), 90, np.uint8), [(1, 2)])
    >>> res = vlm_relevancy(load_model("tiny-llava+sinks"), [img], "What is in the picture?")
    >>> fig = relevancy_figure(res.table, "image0", {"relevancy": res.summary})
    >>> len(fig.data), res.table.query("is_vit_sink")[["row", "col"]].values.tolist()
    (6, [[1.0, 2.0]])
    """
    patches = table[table.kind == "patch"]
    t = patches[patches.image_name.astype(str) == str(image)]
    if not len(t):  # an image index
        t = patches[patches.image.astype(str) == str(image)]
    if not len(t):
        raise ValueError(f"no relevancy rows for image {image!r}")
    name = str(t.image_name.iloc[0])
    rs = (summary or {}).get("relevancy", summary or {}) or {}
    fl = rs.get("feature_layer", "?")
    fig = make_subplots(rows=1, cols=len(PANELS), subplot_titles=[p[1] for p in PANELS])
    sinks = t[t.is_vit_sink.astype(bool)]
    for j, (col, _title) in enumerate(PANELS, start=1):
        grid = t.pivot_table(index="row", columns="col", values=col, aggfunc="mean")
        z = grid.to_numpy()
        top = np.nanmax(z) if np.isfinite(z).any() else np.nan
        rel = z / top if np.isfinite(top) and top > 0 else z
        fig.add_trace(
            go.Heatmap(
                z=rel,
                x=grid.columns,
                y=grid.index,
                customdata=z,
                coloraxis="coloraxis",
                meta={"role": "map", "value": col, "image": name},
                hovertemplate="row %{y}, col %{x}<br>%{customdata:.4g} (%{z:.2f} of max)<extra></extra>",
            ),
            row=1,
            col=j,
        )
        if len(sinks):
            fig.add_trace(style.sink_markers(sinks.row, sinks.col, "ViT sink", showlegend=j == 1), row=1, col=j)
        fig.update_yaxes(autorange="reversed", row=1, col=j)
    fig.update_xaxes(title_text=style.LABEL_PATCH_COL)
    fig.update_yaxes(title_text=style.LABEL_PATCH_ROW, col=1)
    fig.update_layout(
        coloraxis={"colorscale": "Magma", "cmin": 0, "cmax": 1, "colorbar": {"title": "fraction of map max"}},
        margin={"t": 120},
    )
    share = (rs.get("relevancy") or {}).get("sink_share")
    share_txt = f"; share of relevancy on ViT sinks {share:.1%}" if isinstance(share, float) else ""
    rule = (rs.get("vit_rule") or {}).get("description", "")
    style.apply_style(
        fig,
        title=(
            f"Relevancy of the answer {rs.get('answer_token', '')!r} - {name} - {_model(summary)}<br><sup>"
            f"Chefer et al.: mean over heads of max(0, grad x attention), R <- R + Abar R, through the LLM, "
            f"then ViT blocks 0..{fl - 1 if isinstance(fl, int) else '?'} (feature layer {fl}){share_txt}"
            f"<br>ViT sinks at layer {fl}: {rule}</sup>"
        ),
    )
    return fig


__all__ = ["PANELS", "relevancy_figure"]
