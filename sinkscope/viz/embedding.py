"""UMAP of token embeddings at one layer, coloured by role (sink / non-sink / CLS / register) or label.

The embeddings come from a scan run saved with ``--save-layers`` (the activation store in
``RUN/activations``); roles come from the same run's ``tokens.parquet`` (its rule's ``is_sink``).

>>> from PIL import Image
>>> from sinkscope.models import paint_markers
>>> from sinkscope.scanning import scan
>>> for i in range(4):                                      # one planted sink per image, in row i
...     Image.fromarray(paint_markers(np.full((32, 32, 3), 60 * i, np.uint8), [(i, 1)])).save(f"img{i}.png")
>>> _ = scan("tiny-dinov2+sinks", images=[f"img{i}.png" for i in range(4)], save_layers=[4],
...          out="runs/scan", progress=False)
>>> X, meta = token_embeddings("runs/scan", layer=4)
>>> X.shape, meta.role.value_counts().to_dict()
((68, 64), {'non-sink': 60, 'CLS': 4, 'sink': 4})
>>> fig = umap_figure(X, meta, color="role", title_info="tiny-dinov2+sinks, layer 4")
>>> [t.name for t in fig.data]
['non-sink (60)', 'CLS (4)', 'sink (4)']

UMAP is seeded (``seed``, default 0): the same tokens give the same picture. Non-sink patch and text tokens
are subsampled (``max_tokens``) while every sink, CLS and register token is kept.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from .._utils import SinkscopeError
from . import style

#: Role -> colour: sinks share the sink colour of every other figure.
ROLE_COLORS = {
    "sink": style.SINK_COLOR,
    "non-sink": style.kind_color("patch"),
    "CLS": style.kind_color("cls"),
    "register": style.kind_color("register"),
    "text": style.kind_color("text"),
}
#: Fewest tokens a UMAP is drawn for.
MIN_POINTS = 5


def token_roles(kind: pd.Series, is_sink: pd.Series) -> pd.Series:
    """``sink`` for sink tokens, else ``CLS`` / ``register`` / ``non-sink`` (patches) / ``text``."""
    base = kind.map({"cls": "CLS", "register": "register", "patch": "non-sink", "text": "text"}).fillna(
        "non-sink"
    )
    return base.where(~is_sink.astype(bool), "sink")


def token_embeddings(
    run_dir: str | Path,
    layer: int,
    max_tokens: int = 4000,
    seed: int = 0,
    labels: dict[str, str] | None = None,
) -> tuple[np.ndarray, pd.DataFrame]:
    """Hidden states of every stored token at ``layer`` and one metadata row per token.

    ``meta`` columns: ``image, token, kind, row, col, norm, is_sink, role`` (+ ``label`` when
    ``labels`` maps image names to labels). Non-sink patch and text tokens beyond ``max_tokens`` are dropped at
    random (seeded); sinks, CLS and registers are always kept.
    """
    run = Path(run_dir)
    store_dir = run / "activations"
    if not (store_dir / "manifest.json").exists():
        raise SinkscopeError(f"{run}: no saved activations; rerun the scan with --save-layers {layer}")
    from ..store import ActivationStore

    store = ActivationStore.open(store_dir)
    if layer not in store.layers:
        raise SinkscopeError(f"{run}: layer {layer} was not saved (saved layers: {store.layers})")
    tokens = pd.read_parquet(run / "tokens.parquet")
    tok = tokens[tokens.layer == layer].set_index(["image", "token"])
    xs, rows = [], []
    for name, h in store.iter_layer(layer):
        n = h.shape[0]
        xs.append(h.float().numpy())
        for t in range(n):
            key = (name, t)
            r = tok.loc[key] if key in tok.index else None
            rows.append(
                {
                    "image": name,
                    "token": t,
                    "kind": r["kind"] if r is not None else "patch",
                    "row": r["row"] if r is not None else None,
                    "col": r["col"] if r is not None else None,
                    "norm": float(r["norm"]) if r is not None else float(np.linalg.norm(xs[-1][t])),
                    "is_sink": bool(r["is_sink"]) if r is not None else False,
                }
            )
    if not xs:
        raise SinkscopeError(f"{run}: the activation store is empty")
    X = np.concatenate(xs)
    meta = pd.DataFrame(rows)
    meta["role"] = token_roles(meta["kind"], meta["is_sink"])
    if labels is not None:
        meta["label"] = meta["image"].map(labels).fillna("?")
    keep = meta.role.isin(["sink", "CLS", "register"])  # patches and text tokens are subsampled
    non = np.flatnonzero(~keep.to_numpy())
    budget = max(0, max_tokens - int(keep.sum()))
    if len(non) > budget:
        non = np.sort(np.random.default_rng(seed).choice(non, size=budget, replace=False))
    idx = np.sort(np.concatenate([np.flatnonzero(keep.to_numpy()), non]))
    return X[idx], meta.iloc[idx].reset_index(drop=True)


def umap_coordinates(
    X: np.ndarray, seed: int = 0, n_neighbors: int = 15, min_dist: float = 0.1
) -> np.ndarray:
    """2-D UMAP of ``X`` ``[n, d]`` (seeded; ``n_neighbors`` capped at ``n - 1``)."""
    n = len(X)
    if n < MIN_POINTS:
        raise ValueError(f"UMAP needs at least {MIN_POINTS} tokens, got {n}: save more images or layers")
    import umap

    reducer = umap.UMAP(
        n_components=2,
        n_neighbors=min(n_neighbors, n - 1),
        min_dist=min_dist,
        random_state=seed,
        n_jobs=1,
        init="spectral" if n > n_neighbors + 1 else "random",
    )
    return reducer.fit_transform(np.asarray(X, dtype=np.float32))


def umap_figure(
    X: np.ndarray,
    meta: pd.DataFrame,
    color: str = "role",
    seed: int = 0,
    n_neighbors: int = 15,
    min_dist: float = 0.1,
    title_info: str = "",
    coords: np.ndarray | None = None,
    subtitle: str = "",
) -> go.Figure:
    """Scatter of the UMAP of ``X`` with one trace per value of ``meta[color]`` (``role`` or
    ``label``); hover shows the image, token index and grid position. ``coords`` skips UMAP
    (pass precomputed 2-D coordinates). Raises ``ValueError`` for fewer than 5 tokens."""
    if len(X) != len(meta):
        raise ValueError(f"{len(X)} embeddings but {len(meta)} metadata rows")
    if color not in meta.columns:
        raise ValueError(f"no column {color!r} to colour by (columns: {', '.join(meta.columns)})")
    xy = umap_coordinates(X, seed, n_neighbors, min_dist) if coords is None else np.asarray(coords)
    fig = go.Figure()
    order = ["non-sink", "text", "register", "CLS", "sink"]  # sinks drawn last, on top
    values = list(pd.unique(meta[color]))
    if color == "role":
        values = [v for v in order if v in values] + [v for v in values if v not in order]
    palette = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#F0E442", "#D55E00", "#000000"]
    for i, v in enumerate(values):
        sel = (meta[color] == v).to_numpy()
        m = meta[sel]
        grid = [
            f"row {int(r)}, col {int(c)}" if pd.notna(r) else "no grid position" for r, c in zip(m.row, m.col)
        ]
        fig.add_trace(
            go.Scattergl(
                x=xy[sel, 0],
                y=xy[sel, 1],
                mode="markers",
                name=f"{v} ({int(sel.sum())})",
                marker={
                    "size": 9 if v == "sink" else 5,
                    "color": ROLE_COLORS.get(v, palette[i % len(palette)])
                    if color == "role"
                    else palette[i % len(palette)],
                    "line": {"width": 0.5, "color": "black"} if v == "sink" else None,
                    "opacity": 0.95 if v == "sink" else 0.6,
                },
                customdata=np.stack(
                    [m.image.astype(str), m.token.astype(int), grid, m.norm.round(2)], axis=1
                ),
                hovertemplate="%{customdata[0]}<br>token %{customdata[1]} (%{customdata[2]})<br>"
                "L2 norm %{customdata[3]}<extra>" + str(v) + "</extra>",
                meta={"role": "umap", "group": str(v)},
            )
        )
    style.apply_style(
        fig,
        title=f"UMAP of token embeddings{' - ' + title_info if title_info else ''}"
        + f"<br><sup>seed {seed}{'; ' + subtitle if subtitle else ''}</sup>",
        x_title="UMAP 1 (arbitrary units)",
        y_title="UMAP 2 (arbitrary units)",
    )
    return fig


def scan_umap_figure(run_dir: str | Path, layer: int | None = None, color: str = "role", **kw) -> go.Figure:
    """:func:`umap_figure` straight from a scan run (``layer`` defaults to the last saved layer);
    the title names the model, layer and sink rule."""
    run = Path(run_dir)
    summary = json.loads((run / "summary.json").read_text())
    if layer is None:
        from ..store import ActivationStore

        if not (run / "activations" / "manifest.json").exists():
            raise SinkscopeError(f"{run}: no saved activations; rerun the scan with --save-layers")
        layer = ActivationStore.open(run / "activations").layers[-1]
    X, meta = token_embeddings(run, layer, seed=kw.get("seed", 0))
    model = (
        (summary.get("model") or {}).get("name", "?")
        if isinstance(summary.get("model"), dict)
        else summary.get("model")
    )
    rule = (summary.get("rule") or {}).get("description", "")
    return umap_figure(
        X, meta, color=color, title_info=f"{model}, layer {layer}<br><sup>sinks: {rule}</sup>", **kw
    )


__all__ = ["scan_umap_figure", "token_embeddings", "token_roles", "umap_coordinates", "umap_figure"]
