"""Flow figures, drawn from the saved tables of a ``sinkscope flow`` run (never the model);
:mod:`sinkscope.viz.flow_report` puts them, with the findings, on a page.

- :func:`rollout_figure` - rollout maps from CLS, the sinks and a non-sink control;
- :func:`sink_maps_figure` - rollout (top row) and relevance maps (bottom row) of sink vs non-sink
  tokens side by side;
- :func:`vit_group_attention_figure` - attention received by token group in every ViT block;
- :func:`norm_bin_figure` - paper Fig. 3A: LLM attention by ViT-norm bin, per LLM layer;
- :func:`llm_group_attention_figure` - LLM attention to visual token groups, layer x group;
- :func:`knockout_figure` - knockout curves.

>>> from PIL import Image
>>> from sinkscope.models import paint_markers
>>> Image.fromarray(paint_markers(np.full((32, 32, 3), 90, np.uint8), [(1, 2)])).save("cat.png")  # a planted sink
>>> from sinkscope.flow.run import run_flow
>>> from sinkscope.viz.flow_report import load_flow
>>> _ = run_flow("tiny-llava+sinks", images=["cat.png"], out="runs/flow", progress=False)
>>> tables, summary = load_flow("runs/flow")
>>> fig = sink_maps_figure(tables["rollout"], tables["relevance"], "cat.png", summary)
>>> [a.text for a in fig.layout.annotations]
['rollout from CLS (0)', 'rollout from sink (7)', 'rollout from non-sink (9)',
 'relevance of CLS (0)', 'relevance of sink (7)', 'relevance of non-sink (9)']
>>> [heading for heading, _ in flow_figures(tables, summary)]
['Sink vs non-sink pathways in the ViT - cat.png', 'Attention received by token group in the ViT',
 'LLM attention by ViT norm (paper Fig. 3A)', 'LLM attention to visual token groups', 'Attention knockout',
 'Sinks on redundant patches (Darcet et al.)', 'Relevancy of the answer beside rollout - cat.png']
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from . import style
from .page import model_name as _model_name

#: Display names of rollout / relevance start tokens.
_START_LABEL = {"cls": "CLS", "sink": "sink", "nonsink": "non-sink"}
#: The paper's three groups of visual tokens in the LLM, in plot order.
LLM_GROUPS = ("non-sink", "vit-propagated sink", "llm-emerged sink")


def _vit_rule(summary: dict | None) -> str:
    s = summary or {}
    rule = s.get("vit_rule") or (s.get("propagation") or {}).get("vit_rule") or {}
    text = str(rule.get("description", "")) if isinstance(rule, dict) else str(rule)
    layer = s.get("vit_layer") or {}
    if isinstance(layer, dict) and "layer" in layer:  # runs before 0.3 did not record it
        feature = "feature layer" in str(layer.get("source", ""))
        text += f" at ViT layer {layer['layer']}" + (" (the feature layer)" if feature else "")
    return text


def _grid(d: pd.DataFrame) -> pd.DataFrame:
    return d.pivot_table(index="row", columns="col", values="value", aggfunc="mean")


def _start_marker(d: pd.DataFrame, token: int) -> tuple[int, int] | None:
    hit = d[d.token == token]
    return (int(hit.row.iloc[0]), int(hit.col.iloc[0])) if len(hit) else None


def _starts(r: pd.DataFrame, max_sinks: int) -> list[tuple[int, str]]:
    starts = list(dict.fromkeys(zip(r.start.astype(int), r.start_kind)))
    sinks = [s for s in starts if s[1] == "sink"][:max_sinks]
    return [s for s in starts if s[1] == "cls"] + sinks + [s for s in starts if s[1] == "nonsink"]


def rollout_figure(
    rollout: pd.DataFrame, image: str, summary: dict | None = None, max_sinks: int = 4
) -> go.Figure:
    """Rollout maps over the patch grid of one image, one panel per start token (CLS, up to
    ``max_sinks`` sinks, the non-sink control); an x marks a start token that is a patch."""
    r = rollout[rollout.image == image]
    if not len(r):
        raise ValueError(f"no rollout rows for image {image!r}")
    starts = _starts(r, max_sinks)
    fig = make_subplots(
        rows=1,
        cols=len(starts),
        subplot_titles=[f"from {_START_LABEL.get(k, k)} (token {s})" for s, k in starts],
    )
    for j, (s, k) in enumerate(starts, start=1):
        d = r[r.start == s]
        grid = _grid(d)
        fig.add_trace(
            go.Heatmap(
                z=grid.to_numpy(),
                x=grid.columns,
                y=grid.index,
                coloraxis="coloraxis",
                meta={"role": "rollout", "start": int(s), "start_kind": k},
                hovertemplate="row %{y}, col %{x}<br>rollout %{z:.4f}<extra></extra>",
            ),
            row=1,
            col=j,
        )
        rc = _start_marker(d, s)
        if rc is not None:
            fig.add_trace(_marker(rc, k), row=1, col=j)
        fig.update_yaxes(autorange="reversed", row=1, col=j)
    # one colour scale shared by every panel, so panels compare by colour
    fig.update_layout(
        coloraxis={"colorscale": style.NORM_COLORSCALE, "colorbar": {"title": "rollout weight"}}
    )
    style.apply_style(
        fig,
        title=f"Attention rollout - {image} - {_model_name(summary)} - sinks: {_vit_rule(summary)}",
        x_title=style.LABEL_PATCH_COL,
        y_title=style.LABEL_PATCH_ROW,
    )
    return fig


def _marker(rc: tuple[int, int], kind: str) -> go.Scatter:
    return go.Scatter(
        x=[rc[1]],
        y=[rc[0]],
        mode="markers",
        marker={
            "symbol": "x",
            "size": 12,
            "color": style.SINK_COLOR if kind == "sink" else "white",
            "line": {"width": 1, "color": "black"},
        },
        showlegend=False,
        hovertemplate=f"start token ({_START_LABEL.get(kind, kind)}) at row %{{y}}, col %{{x}}<extra></extra>",
        meta={"role": "start_marker", "kind": kind, "row": rc[0], "col": rc[1]},
    )


def sink_maps_figure(
    rollout: pd.DataFrame,
    relevance: pd.DataFrame,
    image: str,
    summary: dict | None = None,
    max_sinks: int = 2,
) -> go.Figure:
    """Sink vs non-sink tokens side by side: rollout from each token (top row) and its relevance
    map - the attention its column receives at the last ViT block, head-averaged (bottom row).

    Columns: CLS, up to ``max_sinks`` sinks, the non-sink control. An x marks the token itself.
    """
    r = rollout[rollout.image == image]
    v = relevance[relevance.image == image]
    if not len(r) and not len(v):
        raise ValueError(f"no rollout or relevance rows for image {image!r}")
    starts = _starts(r, max_sinks) if len(r) else []
    if not starts:
        starts = [(int(t), k) for t, k in dict.fromkeys(zip(v.token.astype(int), v.kind))]
    layer = int(v.layer.iloc[0]) if len(v) else None
    titles = [f"rollout from {_START_LABEL.get(k, k)} ({s})" for s, k in starts] + [
        f"relevance of {_START_LABEL.get(k, k)} ({s})" for s, k in starts
    ]
    fig = make_subplots(rows=2, cols=len(starts), subplot_titles=titles, vertical_spacing=0.12)
    for j, (s, k) in enumerate(starts, start=1):
        for i, tab in enumerate(((r[r.start == s] if len(r) else r), (v[v.token == s] if len(v) else v)), 1):
            if not len(tab):
                continue
            grid = _grid(tab)  # relevance: mean over heads
            fig.add_trace(
                go.Heatmap(
                    z=grid.to_numpy(),
                    x=grid.columns,
                    y=grid.index,
                    coloraxis="coloraxis" if i == 1 else "coloraxis2",
                    meta={"role": "rollout" if i == 1 else "relevance", "start": s, "start_kind": k},
                    hovertemplate="row %{y}, col %{x}<br>%{z:.4f}<extra></extra>",
                ),
                row=i,
                col=j,
            )
            # the token's own grid cell: rollout rows list every patch as ``token`` (relevance rows
            # name the probed token, not the key, so they cannot place the mark)
            rc = _start_marker(r[r.start == s], s) if len(r) else None
            if rc is not None:
                fig.add_trace(_marker(rc, k), row=i, col=j)
            fig.update_yaxes(autorange="reversed", row=i, col=j)
    fig.update_xaxes(title_text=style.LABEL_PATCH_COL, row=2)
    fig.update_yaxes(title_text=style.LABEL_PATCH_ROW, col=1)
    style.apply_style(
        fig,
        title=(
            f"Sink vs non-sink pathways - {image} - {_model_name(summary)}<br><sup>top: rollout from the token; "
            f"bottom: attention its key receives at block {layer}, mean over heads; sinks: {_vit_rule(summary)}</sup>"
        ),
    )
    # one colour scale per row, shared by its panels, so tokens compare by colour
    fig.update_layout(
        height=560,
        margin={"t": 110},
        coloraxis={
            "colorscale": style.NORM_COLORSCALE,
            "colorbar": {"title": "rollout weight", "y": 0.79, "len": 0.42},
        },
        coloraxis2={
            "colorscale": "Magma",
            "colorbar": {"title": "attention (fraction)", "y": 0.21, "len": 0.42},
        },
    )
    return fig


def vit_group_attention_figure(by_group: pd.DataFrame, summary: dict | None = None) -> go.Figure:
    """Attention received per token (mean over images) by token group in every ViT block, with the
    uniform share 1/N as a dotted line."""
    d = by_group.dropna(subset=["mean_attention"])
    if not len(d):
        raise ValueError("the group-attention table has no values")
    fig = go.Figure()
    colors = {
        "cls": style.kind_color("cls"),
        "registers": style.kind_color("register"),
        "sinks": style.SINK_COLOR,
        "non-sinks": style.kind_color("patch"),
    }
    for g, dd in d.groupby("group", sort=False):
        m = dd.groupby("layer")["mean_attention"].mean()
        fig.add_trace(
            go.Scatter(
                x=m.index,
                y=m.to_numpy() * 100,
                mode="lines+markers",
                name=str(g),
                line={"color": colors.get(str(g), style.OTHER_COLOR)},
                meta={"role": "group", "group": str(g)},
                hovertemplate=f"{g}<br>block %{{x}}<br>%{{y:.3f}}% per token<extra></extra>",
            )
        )
    u = float(d["uniform"].mean()) * 100
    fig.add_hline(
        y=u,
        line={"dash": "dot", "color": style.THRESHOLD_COLOR},
        annotation_text=f"uniform 1/N = {u:.2f}%",
        annotation_position="top right",
    )
    style.apply_style(
        fig,
        title=f"ViT attention received by token group - {_model_name(summary)} - sinks: {_vit_rule(summary)}",
        x_title="ViT block (index)",
        y_title="attention received per token (%)",
    )
    if d.layer.nunique() <= 40:
        fig.update_xaxes(dtick=1)
    return fig


def llm_group_attention_figure(visual_tokens: pd.DataFrame, summary: dict | None = None) -> go.Figure:
    """LLM attention to the paper's groups of visual tokens, as a heat map: LLM layer (rows) x group
    (columns), value = mean attention per token (%) from the text queries, head-averaged."""
    vt = visual_tokens
    cols = sorted((c for c in vt.columns if c.startswith("attn_L")), key=lambda c: int(c[6:]))
    if not cols:
        raise ValueError("visual_tokens has no per-layer attention columns (attn_L<i>)")
    groups = {
        "non-sink": (~vt.is_vit_sink) & (vt.llm_sink_layers == 0),
        "vit-propagated sink": vt.is_vit_sink,
        "llm-emerged sink": (~vt.is_vit_sink) & (vt.llm_sink_layers > 0),
    }
    z = np.full((len(cols), len(LLM_GROUPS)), np.nan)
    counts = []
    for j, g in enumerate(LLM_GROUPS):
        sel = groups[g].to_numpy()
        counts.append(int(sel.sum()))
        if sel.any():
            z[:, j] = vt.loc[sel, cols].to_numpy().mean(0) * 100
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=[f"{g} (n={n})" for g, n in zip(LLM_GROUPS, counts)],
            y=[int(c[6:]) for c in cols],
            colorscale="Magma",
            colorbar={"title": "attention per token (%)"},
            meta={"role": "llm_groups", "counts": counts},
            hovertemplate="LLM layer %{y}<br>%{x}<br>%{z:.3f}%<extra></extra>",
        )
    )
    prop = (summary or {}).get("propagation") or {}
    llm_rule = (prop.get("llm_rule") or {}).get("description", "")
    style.apply_style(
        fig,
        title=(
            f"LLM attention to visual token groups - {_model_name(summary)}<br><sup>ViT sinks: {_vit_rule(summary)}; "
            f"queries: {prop.get('queries', '')}<br>LLM sinks: {llm_rule}</sup>"
        ),
        x_title="visual token group",
        y_title="LLM layer (block index)",
    )
    fig.update_layout(margin={"t": 110})
    if len(cols) <= 16:
        fig.update_yaxes(dtick=1)
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
        title=f"LLM attention by ViT norm (bins of {w}) - {_model_name(summary)} - ViT sinks: {_vit_rule(summary)}",
        x_title="ViT L2 norm at the feature layer (bin start)",
        y_title="LLM layer (block index)",
    )
    if len(piv.index) <= 40:
        fig.update_yaxes(dtick=1)
    return fig


def _ko_window(summary: dict, ko: pd.DataFrame) -> str:
    w = (summary.get("knockout") or {}).get("window")
    if w is None and len(ko):
        w = int((ko.window_end - ko.window_start).max()) + 1
    return f"{w} layers" if w is not None else "window"


def knockout_figure(ko: pd.DataFrame, summary: dict) -> go.Figure:
    """Change in the answer's probability per knocked-out window, one curve per source -> target,
    one point per window centre (``layer``; older tables without it: the window's first layer)."""
    fig = go.Figure()
    centred = "layer" in ko.columns
    xcol = "layer" if centred else "window_start"
    for (src, tgt), d in ko.groupby(["source", "target"], sort=False):
        fig.add_trace(
            go.Scatter(
                x=d[xcol],
                y=d.relative_change * 100,
                mode="lines+markers",
                name=f"{src} -> {tgt}",
                meta={"role": "knockout", "source": src, "target": tgt},
            )
        )
    fig.add_hline(y=0, line={"dash": "dot", "color": style.THRESHOLD_COLOR})
    style.apply_style(
        fig,
        title=f"Attention knockout - {_model_name(summary)} - ViT sinks: {_vit_rule(summary)}",
        x_title=(
            f"LLM layer at the centre of the blocked window ({_ko_window(summary, ko)}, clipped at the edges)"
            if centred
            else "first LLM layer of the blocked window"
        ),
        y_title="change in answer probability (%)",
    )
    if ko[xcol].nunique() <= 40:
        fig.update_xaxes(dtick=1)
    return fig


def flow_figures(
    tables: dict[str, pd.DataFrame], summary: dict, max_images: int = 4
) -> list[tuple[str, go.Figure]]:
    """Every figure a flow run's tables support, as ``(section heading, figure)`` pairs in report
    order (figures a table cannot support are left out, never drawn empty)."""
    out: list[tuple[str, go.Figure]] = []
    ro, rel = tables.get("rollout"), tables.get("relevance")
    images = list(dict.fromkeys(ro.image)) if ro is not None and len(ro) else []
    for image in images[:max_images]:
        if rel is not None and len(rel):
            out.append(
                (f"Sink vs non-sink pathways in the ViT - {image}", sink_maps_figure(ro, rel, image, summary))
            )
        else:
            out.append((f"Attention rollout - {image}", rollout_figure(ro, image, summary)))
    g = tables.get("vit_attention_by_group")
    if g is not None and len(g) and g["mean_attention"].notna().any():
        out.append(("Attention received by token group in the ViT", vit_group_attention_figure(g, summary)))
    if tables.get("attention_by_bin") is not None and len(tables["attention_by_bin"]):
        out.append(
            (
                "LLM attention by ViT norm (paper Fig. 3A)",
                norm_bin_figure(tables["attention_by_bin"], summary),
            )
        )
    vt = tables.get("visual_tokens")
    if vt is not None and len(vt) and any(c.startswith("attn_L") for c in vt.columns):
        out.append(("LLM attention to visual token groups", llm_group_attention_figure(vt, summary)))
    if tables.get("knockout") is not None and len(tables["knockout"]):
        out.append(("Attention knockout", knockout_figure(tables["knockout"], summary)))
    red = tables.get("redundancy")
    if red is not None and len(red) and red["neighbour_cos"].notna().any():
        from .redundancy import redundancy_figure

        out.append(("Sinks on redundant patches (Darcet et al.)", redundancy_figure(red, summary)))
    rv = tables.get("relevancy")
    if rv is not None and len(rv):
        from .relevancy import relevancy_figure

        for image in list(dict.fromkeys(rv.image_name.astype(str)))[:max_images]:
            out.append(
                (f"Relevancy of the answer beside rollout - {image}", relevancy_figure(rv, image, summary))
            )
    return out


__all__ = [
    "LLM_GROUPS",
    "flow_figures",
    "knockout_figure",
    "llm_group_attention_figure",
    "norm_bin_figure",
    "rollout_figure",
    "sink_maps_figure",
    "vit_group_attention_figure",
]
