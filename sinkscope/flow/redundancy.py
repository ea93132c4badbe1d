"""Darcet et al.'s redundancy analysis: are sinks sitting on patches that repeat their neighbours?

Darcet et al. (ICLR 2024, "Vision Transformers Need Registers", Sec. 2.1) observe that high-norm
outlier tokens appear on patches that are *redundant*: the cosine similarity of the patch's input
embedding to its **4 grid neighbours** (up, down, left, right) is high. This module measures it:

- :func:`neighbour_similarity` - pure function: per patch, the mean cosine similarity of its
  hidden vector to its grid neighbours (``neighbourhood=4``, Darcet's choice, or ``8`` with the
  diagonals). Patches on the border average over the neighbours they have (2 or 3 of 4). CLS and
  register tokens are dropped using the :class:`~sinkscope.models.base.TokenLayout`
  (``n_prefix``, ``grid``), never ``sqrt(N)``.
- :func:`redundancy_table` - one row per (image, layer, patch) with the similarity and whether
  the patch is a sink at the detection layer; :func:`redundancy_summary` - sinks vs non-sinks.
- :func:`redundancy` - runs both on any ViT adapter (or a LLaVA's tower) with
  :class:`sinkscope.capture.Capture` (``keep=[0, detection_layer]``).

The input layer is layer ``0`` = ``hidden_states[0]``: the patch embedding *plus* the position
embedding (and CLIP's pre-norm), i.e. the input of the first block. Darcet et al. measured right
after the patch embedding; with learned position embeddings the two differ by the position term.

>>> lay = TokenLayout(n_cls=1, grid=(1, 3))
>>> h = np.array([[9.0, 9.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])   # CLS, then 3 patches
>>> neighbour_similarity(h, lay).round(3).tolist()
[[1.0, 0.5, 0.0]]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from .._utils import SinkscopeError
from ..interventions.rules import patch_mask, resolve_rule, rule_record
from ..models.base import Adapter, TokenLayout

NEIGHBOURHOODS = {
    4: ((-1, 0), (1, 0), (0, -1), (0, 1)),
    8: ((-1, 0), (1, 0), (0, -1), (0, 1), (-1, -1), (-1, 1), (1, -1), (1, 1)),
}


def _np(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to(torch.float64).cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _patch_grid(hidden: np.ndarray, layout: TokenLayout) -> np.ndarray:
    """``[..., N, D]`` (all tokens) or ``[..., n_patches, D]`` -> ``[..., rows, cols, D]``."""
    if layout.grid is None:
        raise SinkscopeError("redundancy needs a vision layout with a patch grid (got a text layout)")
    rows, cols = layout.grid
    n = hidden.shape[-2]
    if n == layout.n_tokens:
        hidden = hidden[..., layout.n_prefix :, :]
    elif n != layout.n_patches:
        raise SinkscopeError(
            f"hidden states have {n} tokens; the layout has {layout.n_tokens} tokens "
            f"({layout.n_prefix} prefix + {rows}x{cols} patches)"
        )
    return hidden.reshape(*hidden.shape[:-2], rows, cols, hidden.shape[-1])


def neighbour_similarity(hidden: Any, layout: TokenLayout, neighbourhood: int = 4) -> np.ndarray:
    """Mean cosine similarity of every patch to its grid neighbours -> ``[..., rows, cols]``.

    ``hidden``: ``[N, D]`` or ``[batch, N, D]`` hidden states of all ``layout.n_tokens`` tokens
    (CLS / registers are dropped via ``layout.n_prefix``) or of the patches only. ``neighbourhood``:
    ``4`` (up, down, left, right - Darcet et al.) or ``8`` (plus diagonals). Border patches
    average over the neighbours inside the grid; a 1x1 grid gives NaN. A zero vector has cosine
    0 with everything. float64 numpy out.

    >>> lay = TokenLayout(grid=(2, 2))
    >>> h = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    >>> neighbour_similarity(h, lay).round(3).tolist()     # (0,0): mean(cos to (0,1), (1,0))
    [[0.5, 0.854], [0.354, 0.707]]
    """
    if neighbourhood not in NEIGHBOURHOODS:
        raise SinkscopeError(f"neighbourhood={neighbourhood} must be 4 or 8")
    g = _patch_grid(_np(hidden), layout)  # [..., R, C, D]
    norm = np.linalg.norm(g, axis=-1, keepdims=True)
    u = g / np.where(norm > 0, norm, 1.0)
    rows, cols = g.shape[-3], g.shape[-2]
    total = np.zeros(g.shape[:-1])
    count = np.zeros((rows, cols))
    for dr, dc in NEIGHBOURHOODS[neighbourhood]:
        # cells (r, c) whose neighbour (r + dr, c + dc) lies inside the grid
        r0, r1 = max(0, -dr), rows - max(0, dr)
        c0, c1 = max(0, -dc), cols - max(0, dc)
        if r1 <= r0 or c1 <= c0:
            continue
        a = u[..., r0:r1, c0:c1, :]
        b = u[..., r0 + dr : r1 + dr, c0 + dc : c1 + dc, :]
        total[..., r0:r1, c0:c1] += (a * b).sum(-1)
        count[r0:r1, c0:c1] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        return total / count


def redundancy_table(
    hidden: Mapping[int, Any],
    layout: TokenLayout,
    is_sink: Any,
    names: Sequence[str] | None = None,
    neighbourhood: int = 4,
    detection_layer: int | None = None,
) -> pd.DataFrame:
    """One row per (image, layer, patch): ``image, layer, token, row, col, norm, neighbour_cos,
    is_sink`` (+ ``layer_role``: ``"input"`` for layer 0, ``"detection"`` for ``detection_layer``).

    ``hidden``: layer -> ``[batch, N, D]`` (or ``[N, D]``) hidden states; ``is_sink``:
    ``[batch, n_patches]`` (or ``[batch, N]``, prefix dropped) booleans - the sinks found at the
    detection layer, the same for every layer of the table (sinks vs non-sinks *positions*).

    >>> lay = TokenLayout(grid=(1, 2))
    >>> t = redundancy_table({0: np.eye(2)}, lay, [[True, False]])
    >>> t[["layer", "row", "col", "neighbour_cos", "is_sink"]].values.tolist()
    [[0, 0, 0, 0.0, True], [0, 0, 1, 0.0, False]]
    """
    sink = np.asarray(is_sink, dtype=bool)
    if sink.ndim == 1:
        sink = sink[None]
    if sink.shape[-1] == layout.n_tokens and layout.n_tokens != layout.n_patches:
        sink = sink[:, layout.n_prefix :]
    if sink.shape[-1] != layout.n_patches:
        raise SinkscopeError(
            f"is_sink has {sink.shape[-1]} entries per image, the grid {layout.n_patches} patches"
        )
    rows, cols = layout.grid
    rr, cc = np.divmod(np.arange(layout.n_patches), cols)
    frames = []
    for layer in sorted(hidden):
        h = _np(hidden[layer])
        if h.ndim == 2:
            h = h[None]
        if h.shape[0] != sink.shape[0]:
            raise SinkscopeError(f"layer {layer}: {h.shape[0]} images in hidden, {sink.shape[0]} in is_sink")
        sim = neighbour_similarity(h, layout, neighbourhood).reshape(h.shape[0], -1)
        norms = np.linalg.norm(_patch_grid(h, layout), axis=-1).reshape(h.shape[0], -1)
        for i in range(h.shape[0]):
            role = "input" if layer == 0 else "detection" if layer == detection_layer else "other"
            frames.append(
                pd.DataFrame(
                    {
                        "image": names[i] if names is not None else i,
                        "layer": int(layer),
                        "layer_role": role,
                        "token": layout.n_prefix + np.arange(layout.n_patches),
                        "row": rr,
                        "col": cc,
                        "norm": norms[i],
                        "neighbour_cos": sim[i],
                        "is_sink": sink[i],
                    }
                )
            )
    if not frames:
        raise SinkscopeError("redundancy_table: no layer given")
    return pd.concat(frames, ignore_index=True)


def redundancy_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Sinks vs non-sinks per layer: ``layer, layer_role, group, n, mean_cos, median_cos, std_cos``.

    >>> t = pd.DataFrame({"layer": 0, "layer_role": "input", "is_sink": [True, False, False],
    ...                   "neighbour_cos": [0.9, 0.2, 0.4]})
    >>> redundancy_summary(t)[["group", "n", "mean_cos"]].values.tolist()
    [['non-sink', 2, 0.3...], ['sink', 1, 0.9]]
    """
    t = table.assign(group=np.where(table.is_sink, "sink", "non-sink"))
    g = t.groupby(["layer", "layer_role", "group"]).neighbour_cos
    out = pd.DataFrame(
        {"n": g.size(), "mean_cos": g.mean(), "median_cos": g.median(), "std_cos": g.std(ddof=0)}
    ).reset_index()
    return out


@dataclass
class RedundancyResult:
    """The per-patch table, the sinks-vs-non-sinks summary table and a JSON-able summary."""

    table: pd.DataFrame
    by_group: pd.DataFrame
    summary: dict[str, Any] = field(default_factory=dict)


def _vision_of(adapter: Adapter) -> tuple[Adapter, int]:
    """The ViT adapter and its default detection layer (a LLaVA's feature layer, else the last)."""
    from ..models.llava import LlavaAdapter

    if isinstance(adapter, LlavaAdapter):
        return adapter.vision, adapter.feature_layer
    if getattr(adapter, "layout_for", None) is None:
        raise SinkscopeError(
            f"redundancy needs a vision transformer (or a LLaVA); {adapter.name!r} is {adapter.family!r}"
        )
    return adapter, adapter.n_layers


def redundancy(
    adapter: Adapter,
    images: Sequence[Any],
    names: Sequence[str] | None = None,
    detection_layer: int | None = None,
    rule: Any = None,
    neighbourhood: int = 4,
    batch_size: int = 8,
) -> RedundancyResult:
    """Darcet et al.'s redundancy analysis on a ViT adapter or a LLaVA's vision tower.

    Sinks are the patches ``rule`` marks at ``detection_layer`` in each image (anything
    :func:`~sinkscope.interventions.rule_from` reads; default: the model's
    :func:`~sinkscope.interventions.default_rule`, recorded with its reason); ``detection_layer`` defaults to a LLaVA's feature layer
    (``vision_feature_layer``, -2 for LLaVA-1.5) or a ViT's last layer. The neighbour cosine
    similarity is measured at layer 0 (input) and at the detection layer.

    >>> from sinkscope.models import load_model, paint_markers
    >>> img = paint_markers(np.full((32, 32, 3), 90, np.uint8), [(1, 2)])   # one planted sink
    >>> res = redundancy(load_model("tiny-dinov2+sinks"), [img])
    >>> res.by_group[["layer", "layer_role", "group", "n", "mean_cos"]].round(2)   # the red marker vs grey patches
       layer layer_role     group   n  mean_cos
    0      0      input  non-sink  15      0.91
    1      0      input      sink   1     -0.15
    2      4  detection  non-sink  15      0.92
    3      4  detection      sink   1     -0.02
    """
    from ..capture import Capture

    vis, default_layer = _vision_of(adapter)
    L = vis.n_layers
    det = default_layer if detection_layer is None else int(detection_layer) % (L + 1)
    rule, why = resolve_rule(adapter, rule, cls=False)
    rule.check_for("flow redundancy", layer=det, n_layers=L)
    names = list(names) if names is not None else [f"image{i}" for i in range(len(images))]
    if len(names) != len(images):
        raise SinkscopeError(f"{len(images)} images but {len(names)} names")
    if not len(images):
        raise SinkscopeError("redundancy: no image given")
    keep = sorted({0, det})
    tables = []
    for s in range(0, len(images), batch_size):
        batch = vis.prepare(list(images[s : s + batch_size]), names[s : s + batch_size])
        lay = batch.layouts[0]
        with Capture(vis, layers=None, keep=keep) as cap:
            bc = cap.run(batch)
        hd = {k: bc.hidden[k] for k in keep}
        # sinks at the detection layer: the rule on each image's patches
        sink = patch_mask(rule, bc.hidden[det][:, lay.n_prefix :].float().norm(dim=-1))
        tables.append(redundancy_table(hd, lay, sink, batch.names, neighbourhood, detection_layer=det))
    table = pd.concat(tables, ignore_index=True)
    by_group = redundancy_summary(table)

    def mean(role: str, group: str) -> float | None:
        v = by_group[(by_group.layer_role == role) & (by_group.group == group)].mean_cos
        return float(v.iloc[0]) if len(v) and np.isfinite(v.iloc[0]) else None

    summary = {
        "vision_model": vis.name,
        "input_layer": 0,
        "detection_layer": det,
        "detection_layer_source": "given"
        if det != default_layer
        else "LLaVA vision_feature_layer"
        if vis is not adapter
        else "last ViT layer",
        "neighbourhood": f"{neighbourhood}-neighbourhood"
        + (" (up, down, left, right)" if neighbourhood == 4 else " (with diagonals)"),
        "rule": rule_record(rule, why),
        "n_images": len(images),
        "n_patches": int((table.layer == det).sum()),
        "n_sinks": int(table[table.layer == det].is_sink.sum()),
        "mean_cos": {
            f"{role}_{g.replace('-', '')}": mean(role, g)
            for role in ("input", "detection")
            for g in ("sink", "non-sink")
        },
    }
    return RedundancyResult(table, by_group, summary)


__all__ = [
    "NEIGHBOURHOODS",
    "RedundancyResult",
    "neighbour_similarity",
    "redundancy",
    "redundancy_summary",
    "redundancy_table",
]
