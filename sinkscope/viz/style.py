"""Shared look of sinkscope figures: one palette, one template, axis labels with units.

Every figure in :mod:`sinkscope.viz` takes its colours, fonts and axis titles from here so that a
token kind has the same colour in every plot and every axis names its unit.
"""

from __future__ import annotations

import plotly.graph_objects as go

#: plotly template every figure starts from.
TEMPLATE = "plotly_white"

#: Font stack used in figures and in the HTML report.
FONT_FAMILY = "Inter, 'Segoe UI', Helvetica, Arial, sans-serif"
FONT_SIZE = 13

#: Token kind -> colour (colour-blind-safe Okabe-Ito hues).
KIND_COLORS: dict[str, str] = {
    "cls": "#E69F00",  # orange
    "register": "#009E73",  # bluish green
    "patch": "#0072B2",  # blue
    "text": "#CC79A7",  # reddish purple
}
#: Colour of anything that is not one of the known kinds.
OTHER_COLOR = "#7F7F7F"
#: Colour of sink markers (points, rings on heat maps).
SINK_COLOR = "#D55E00"  # vermillion
#: Colour of per-layer threshold marks.
THRESHOLD_COLOR = "#222222"
#: Colour of the emergence-layer annotation.
EMERGENCE_COLOR = "#CC79A7"
#: Sequential colour scale for norm heat maps (perceptually uniform).
NORM_COLORSCALE = "Viridis"

#: Human-readable kind names.
KIND_LABELS: dict[str, str] = {
    "cls": "CLS",
    "register": "register",
    "patch": "patch",
    "text": "text",
}

#: Axis titles (always with units).
LABEL_NORM = "L2 norm"
LABEL_LOG_NORM = "L2 norm (log scale)"
LABEL_LAYER = "layer (0 = embeddings)"
LABEL_ATTENTION = "attention received (fraction)"
LABEL_SINK_COUNT = "sink tokens (count)"
LABEL_TOKEN = "token position (index in sequence)"
LABEL_PATCH_COL = "patch column (index)"
LABEL_PATCH_ROW = "patch row (index)"


def sink_markers(rows, cols, name: str, **kwargs) -> go.Scatter:
    """An x on each sink's grid cell of a patch map (``row``/``col`` sequences); ``kwargs`` go to
    ``go.Scatter`` (e.g. ``showlegend``). Hover names the cell.

    >>> sink_markers([1], [2], "ViT sink").marker.symbol
    'x'
    """
    return go.Scatter(
        x=cols,
        y=rows,
        mode="markers",
        marker={"symbol": "x", "size": 11, "color": SINK_COLOR, "line": {"width": 1}},
        name=name,
        meta={"role": "sink_marker"},
        hovertemplate=f"{name} at row %{{y}}, col %{{x}}<extra></extra>",
        **kwargs,
    )


def kind_color(kind: str) -> str:
    """Colour of a token kind (grey for unknown kinds)."""
    return KIND_COLORS.get(kind, OTHER_COLOR)


def kind_label(kind: str) -> str:
    """Display name of a token kind."""
    return KIND_LABELS.get(kind, str(kind))


def apply_style(
    fig: go.Figure, title: str | None = None, x_title: str | None = None, y_title: str | None = None
) -> go.Figure:
    """Apply the sinkscope template, font, title and axis titles to ``fig`` in place and return it."""
    fig.update_layout(
        template=TEMPLATE,
        font={"family": FONT_FAMILY, "size": FONT_SIZE},
        hoverlabel={"font": {"family": FONT_FAMILY}},
        legend={"bgcolor": "rgba(255,255,255,0.7)"},
        margin={"l": 70, "r": 30, "t": 60, "b": 60},
    )
    if title is not None:
        fig.update_layout(title={"text": title, "x": 0.0, "xanchor": "left"})
    if x_title is not None:
        fig.update_xaxes(title_text=x_title)
    if y_title is not None:
        fig.update_yaxes(title_text=y_title)
    return fig
