"""The ViT side of a flow run as tidy tables: attention rollout, relevance maps and attention by
token group, inside the ViT up to one layer (:func:`vit_flow_tables`).

- ``rollout``: rollout through the blocks below the layer from CLS, from every sink at the layer
  and from one non-sink patch (the control), over the patch grid
  (``image, start, start_kind, token, row, col, value``);
- ``relevance``: the attention column per head at the last block of CLS, the sinks and that
  non-sink (``image, layer, token, kind, head, row, col, value``);
- ``vit_attention_by_group``: attention received per token group in every block
  (``image, layer, group, n_tokens, mean_attention, uniform``).

>>> from sinkscope.models import load_model
>>> from sinkscope.models.tiny import paint_markers
>>> img = paint_markers(np.full((32, 32, 3), 90, np.uint8), [(1, 2)])   # a planted sink at (1, 2)
>>> t = vit_flow_tables(load_model("tiny-dinov2+sinks"), [img], ["img"], "norm:x5")
>>> sorted(t), sorted(set(t["rollout"].start_kind))
(['relevance', 'rollout', 'vit_attention_by_group'], ['cls', 'nonsink', 'sink'])
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from .._utils import SinkscopeError
from ..capture import Capture
from ..interventions.rules import VisualSinkRule, patch_mask, resolve_rule
from ..models.base import TokenLayout
from .rollout import attention_by_group, relevance_map, rollout


def vit_flow_tables(
    vis, arrays, names, vit_rule: Any = None, upto: int | None = None
) -> dict[str, pd.DataFrame]:
    """Inside the ViT, up to layer ``upto`` (hidden-state index; default the last layer; a VLM
    passes its feature layer): rollout through blocks ``0..upto-1`` from CLS and from every sink
    at layer ``upto`` on the patch grid, relevance maps (attention column per head at block
    ``upto-1``) of CLS, the sinks and one non-sink patch, and the attention received by token
    group in every block up to it. ``vit_rule``: the ViT sink rule, applied to the patches of
    each image at each layer (anything :func:`~sinkscope.interventions.rule_from` reads; ``None``:
    the model's :func:`~sinkscope.interventions.default_rule`)."""
    L = vis.n_layers if upto is None else int(upto)
    if not 1 <= L <= vis.n_layers:
        raise SinkscopeError(f"ViT layer {L} is outside 1..{vis.n_layers}: rollout needs at least one block")
    rule = resolve_rule(vis, vit_rule, cls=False)[0].check_for("flow rollout", layer=L, n_layers=vis.n_layers)
    batch = vis.prepare(arrays, names)
    lay = batch.layouts[0]
    with Capture(vis, layers=list(range(L + 1)), keep_attention=list(range(L)), stop_early=True) as cap:
        bc = cap.run(batch)
    attn = bc.attn_maps  # block -> [batch, heads, q, k]
    roll, rel, grp = [], [], []
    for i, name in enumerate(names):
        sinks_at = _sinks_by_layer(bc.norms[i], lay, rule, L)
        starts = _start_tokens(lay, sinks_at[L])
        R = np.asarray(rollout([attn[b][i] for b in range(L)]))
        roll += _rollout_rows(R, lay, starts, name)
        rel += _relevance_rows(attn[L - 1][i], lay, starts, name, L - 1)
        for b in range(L):
            grp += _group_rows(attn[b][i], lay, sinks_at[b], name, b)
    return {
        "rollout": pd.DataFrame(roll),
        "relevance": pd.DataFrame(rel),
        "vit_attention_by_group": pd.DataFrame(grp),
    }


def _patches(lay: TokenLayout) -> list[int]:
    return list(range(lay.n_prefix, lay.n_tokens))


def _sinks_by_layer(norms, lay: TokenLayout, rule: VisualSinkRule, L: int) -> dict[int, list[int]]:
    """Layer ``0..L`` -> the patch tokens ``rule`` calls sinks there (``norms``: one image's
    ``[layers, tokens]``)."""
    mask = patch_mask(rule, norms[: L + 1, lay.n_prefix : lay.n_tokens])  # each layer's patches alone
    return {b: [lay.n_prefix + int(j) for j in np.nonzero(mask[b])[0]] for b in range(L + 1)}


def _start_tokens(lay: TokenLayout, sinks: list[int]) -> list[tuple[int, str]]:
    """``(token, kind)`` the maps start from: CLS (if any), every sink, and one non-sink patch
    (the middle one of the non-sinks) as the control."""
    non = [t for t in _patches(lay) if t not in sinks]
    starts = ([(0, "cls")] if lay.n_cls else []) + [(t, "sink") for t in sinks]
    return starts + ([(non[len(non) // 2], "nonsink")] if non else [])


def _rollout_rows(R: np.ndarray, lay: TokenLayout, starts, name: str) -> list[dict[str, Any]]:
    """One row per (start token, patch): the rollout value ``R[start, patch]``."""
    rows = []
    for start, kind in starts:
        for t in _patches(lay):
            r, c = lay.row_col(t)
            rows.append(
                {
                    "image": name,
                    "start": start,
                    "start_kind": kind,
                    "token": t,
                    "row": r,
                    "col": c,
                    "value": float(R[start, t]),
                }
            )
    return rows


def _relevance_rows(attn, lay: TokenLayout, starts, name: str, layer: int) -> list[dict[str, Any]]:
    """One row per (probe token, head, grid cell): the token's attention column at ``layer``."""
    rows = []
    for tok, kind in starts:
        m = np.asarray(relevance_map(attn, lay, tok, direction="column"))  # [heads, rows, cols]
        for h in range(m.shape[0]):
            for r in range(m.shape[1]):
                for c in range(m.shape[2]):
                    rows.append(
                        {
                            "image": name,
                            "layer": layer,
                            "token": tok,
                            "kind": kind,
                            "head": h,
                            "row": r,
                            "col": c,
                            "value": float(m[h, r, c]),
                        }
                    )
    return rows


def _group_rows(attn, lay: TokenLayout, sinks: list[int], name: str, layer: int) -> list[dict[str, Any]]:
    """One row per token group (CLS, registers, sinks, non-sinks): the mean attention it receives."""
    groups = {
        "cls": list(range(lay.n_cls)),
        "registers": list(range(lay.n_cls, lay.n_prefix)),
        "sinks": sinks,
        "non-sinks": [t for t in _patches(lay) if t not in sinks],
    }
    return [
        {
            "image": name,
            "layer": layer,
            "group": g,
            "n_tokens": len(groups[g]),
            "mean_attention": v,
            "uniform": 1.0 / lay.n_tokens,
        }
        for g, v in attention_by_group(attn, groups).items()
    ]


__all__ = ["vit_flow_tables"]
