"""The token groups a probe reads, and one pooled vector per (image, layer, group).

``cls``, ``registers``, ``mean`` (of patches), ``random`` (one random patch, the same at every
layer: Darcet's protocol), ``sink`` (mean of the image's sink patches), ``nonsink`` (mean of the
other patches), ``nonsink_random`` (one random non-sink patch) and ``matched`` (for each sink, the
nearest non-sink patch on the grid, ties by the closest norm: a position- and norm-matched
control). Sink membership is the run's ViT sink rule
(:class:`~sinkscope.interventions.VisualSinkRule`), applied to each image's patches at each layer.
"""

from __future__ import annotations

import numpy as np
import torch

from ..interventions.rules import VisualSinkRule, patch_mask

GROUPS = ("cls", "registers", "mean", "random", "sink", "nonsink", "nonsink_random", "matched")
SINGLE_TOKEN_GROUPS = ("random", "nonsink_random")
#: Groups probed by default. ``nonsink`` pools nearly every patch (a global average pool) while
#: ``sink`` pools the image's few sinks, so ``nonsink_random`` (one random non-sink patch) is the
#: single-token control the paper's non-sink accuracy (0.512 for CLIP) is closer to.
DEFAULT_GROUPS = ("cls", "mean", "random", "sink", "nonsink", "nonsink_random")

_NAN2 = np.array([np.nan, np.nan], np.float32)


def _mean_of(h: torch.Tensor, tokens, rc: np.ndarray, p0: int, grid: bool):
    """(mean vector, token count, mean (row, col)) of ``tokens``; NaNs when there are none.

    >>> v, n, where = _mean_of(torch.ones(5, 3), [2, 4], np.array([[0, 0], [0, 1], [1, 0], [1, 1.]]), 1, True)
    >>> v.tolist(), n, where.tolist()
    ([1.0, 1.0, 1.0], 2, [0.5, 1.0])
    """
    if len(tokens) == 0:
        return np.full(h.shape[1], np.nan, np.float32), 0, _NAN2
    where = rc[np.asarray(tokens) - p0].mean(0) if grid else _NAN2
    return h[torch.as_tensor(tokens)].mean(0).numpy(), len(tokens), where


def _group_vectors(bc, layouts, rows, layers, groups, rule: VisualSinkRule, seed: int, acc) -> None:
    """Per image and layer, the vector of every group (NaN when the image has none), appended to
    ``acc[(layer, group)]`` as (vector, token count, mean (row, col))."""
    for b, (row, lay) in enumerate(zip(rows, layouts)):
        n, p0 = lay.n_tokens, lay.n_prefix
        patches = np.arange(p0, n)
        rc = np.array([lay.row_col(t) for t in patches], dtype=float) if lay.grid else np.zeros((0, 2))
        # one random patch per image, the same at every layer (Darcet et al.)
        rng_img = np.random.default_rng([seed, row, 1])
        rand_tok = int(rng_img.choice(patches)) if len(patches) else -1
        for li, layer in enumerate(bc.layers):
            if layer not in layers:
                continue
            h = bc.hidden[layer][b, :n].float()  # [tokens, D]
            norms = bc.norms[b, li, :n].numpy()
            sink_mask = patch_mask(rule, norms[None, p0:])[0]  # the rule on this image's patches

            def mean_of(tokens, h=h, rc=rc, p0=p0, grid=lay.grid is not None):
                return _mean_of(h, tokens, rc, p0, grid)

            for g in groups:
                if g == "cls":
                    v = (h[0].numpy(), 1, _NAN2) if lay.n_cls else (mean_of([])[0], 0, _NAN2)
                elif g == "registers":
                    v = mean_of(list(range(lay.n_cls, p0)))
                    v = (v[0], v[1], _NAN2)
                else:
                    rng_seed = [seed, row, 2, layer]
                    v = mean_of(_patch_tokens(g, patches, sink_mask, rc, p0, norms, rand_tok, rng_seed))
                acc.setdefault((layer, g), []).append(v)


def _patch_tokens(g, patches, sink_mask, rc, p0, norms, rand_tok, rng_seed) -> list[int] | np.ndarray:
    """The patch tokens pooled for group ``g`` (``mean``, ``random``, ``sink``, ``nonsink``,
    ``nonsink_random`` or ``matched``) of one image at one layer.

    >>> patches, rc = np.arange(1, 5), np.array([[0, 0], [0, 1], [1, 0], [1, 1]])
    >>> sink = np.array([False, False, False, True])
    >>> norms = np.array([0.0, 5.0, 9.0, 60.0, 90.0])
    >>> _patch_tokens("matched", patches, sink, rc, 1, norms, 2, [0])  # 1, 2, 3 all touch 4; 3's norm is closest
    [3]
    """
    sinks, others = patches[sink_mask], patches[~sink_mask]
    if g == "mean":
        return patches
    if g == "random":
        return [rand_tok] if rand_tok >= 0 else []
    if g == "sink":
        return sinks
    if g == "nonsink":
        return others
    if g == "nonsink_random":
        rng = np.random.default_rng(rng_seed)
        return [int(rng.choice(others))] if len(others) else []
    picks = []  # matched: per sink, the nearest non-sink patch (ties: closest norm)
    for s in sinks:
        d = np.abs(rc[others - p0] - rc[s - p0]).max(1) if len(others) else np.array([])
        if len(d) == 0:
            continue
        near = others[d == d.min()]
        picks.append(int(near[np.argmin(np.abs(norms[near] - norms[s]))]))
    return picks
