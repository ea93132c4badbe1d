"""One captured batch as tidy rows: one per (item, layer, token).

The columns: ``image, layer, token, kind, row, col, norm``; with attention captured
``attention_received`` and ``uniform_share`` (and, for a causal LM, one column per head); with
the dims rule ``top_dim_*``/``top_val_*``, ``rms`` and ``median_abs``; for text ``text_token``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from ..capture import BatchCapture, uniform_share
from ..models import Adapter
from ..models.base import ModelInputs
from ..sinks import HEAD_COLUMN_PREFIX


def batch_rows(ad: Adapter, inputs: ModelInputs, cap: BatchCapture, causal: bool) -> pd.DataFrame:
    """Tidy rows for one captured batch: one per (item, layer, token).

    >>> from sinkscope.capture import capture
    >>> from sinkscope.data import sample_images
    >>> from sinkscope.models import load_model
    >>> ad = load_model("tiny-dinov2+sinks")
    >>> inputs = ad.prepare([it.load() for it in sample_images(1)], ["astronaut"])
    >>> rows = batch_rows(ad, inputs, capture(ad, inputs, layers=[1, 2]), causal=False)
    >>> list(rows.columns), sorted(set(rows.layer))
    (['image', 'layer', 'token', 'kind', 'row', 'col', 'norm'], [1, 2])
    """
    frames = []
    layers = np.asarray(cap.layers)
    for i, (name, lay) in enumerate(zip(inputs.names, inputs.layouts)):
        n = lay.n_tokens
        nl = len(layers)
        rc = [lay.row_col(t) for t in range(n)]
        d: dict[str, Any] = {
            "image": np.repeat(name, nl * n),
            "layer": np.repeat(layers, n).astype(np.int32),
            "token": np.tile(np.arange(n, dtype=np.int32), nl),
            "kind": np.tile(np.asarray(lay.kinds(), dtype=object), nl),
            "row": pd.array(np.tile([r for r, _ in rc], nl), dtype="Int32"),
            "col": pd.array(np.tile([c for _, c in rc], nl), dtype="Int32"),
            "norm": cap.norms[i, :, :n].reshape(-1).numpy().astype(np.float32),
        }
        if cap.attn_received:
            d.update(_attention_columns(cap, i, n, layers, ad.n_layers, causal))
        if cap.top_dims is not None:
            d.update(_dims_columns(cap, i, n, nl))
        if lay.grid is None and hasattr(ad, "token_strings"):
            d["text_token"] = np.tile(np.asarray(ad.token_strings(inputs, i), dtype=object), nl)
        frames.append(pd.DataFrame(d))
    return pd.concat(frames, ignore_index=True)


def _attention_columns(
    cap: BatchCapture, i: int, n: int, layers: np.ndarray, L: int, causal: bool
) -> dict[str, np.ndarray]:
    """Attention received by each token of item ``i`` (NaN at the last layer, which no attention
    block reads), the uniform share, and for a causal LM the same per head."""
    nl = len(layers)
    d: dict[str, np.ndarray] = {}
    rec = np.full((nl, n), np.nan, np.float32)
    for j, layer in enumerate(layers):
        if layer < L and int(layer) in cap.attn_received:
            rec[j] = cap.attn_received[int(layer)][i, :n].numpy()
    d["attention_received"] = rec.reshape(-1)
    d["uniform_share"] = np.tile(uniform_share(n, causal), nl).astype(np.float32)
    if causal and cap.attn_received_heads:
        # per head, for Gu et al.'s sink rate (share of (layer, head) pairs with alpha_k > eps)
        H = next(iter(cap.attn_received_heads.values())).shape[1]
        rh = np.full((nl, n, H), np.nan, np.float32)
        for j, layer in enumerate(layers):
            if layer < L and int(layer) in cap.attn_received_heads:
                rh[j] = cap.attn_received_heads[int(layer)][i, :, :n].numpy().T
        for h in range(H):
            d[f"{HEAD_COLUMN_PREFIX}{h}"] = rh[:, :, h].reshape(-1)
    return d


def _dims_columns(cap: BatchCapture, i: int, n: int, nl: int) -> dict[str, np.ndarray]:
    """The dims rule's statistics of item ``i``: fixed-width columns (``top_dim_0``..,
    ``top_val_0``..; compact, unlike per-row lists), ``rms`` and the layer's ``median_abs``."""
    d: dict[str, np.ndarray] = {}
    td = cap.top_dims[i, :, :n].reshape(nl * n, -1).numpy().astype(np.int32)
    tv = cap.top_vals[i, :, :n].reshape(nl * n, -1).numpy().astype(np.float32)
    for j in range(td.shape[1]):
        d[f"top_dim_{j}"] = td[:, j]
        d[f"top_val_{j}"] = tv[:, j]
    d["rms"] = cap.rms[i, :, :n].reshape(-1).numpy().astype(np.float32)
    d["median_abs"] = np.repeat(cap.median_abs[i].numpy(), n).astype(np.float32)
    return d
