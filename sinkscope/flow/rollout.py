"""Attention rollout, attention flow and relevance maps: pure functions on attention weights.

Conventions (everywhere in this module):

- Attention weights of one layer are ``[heads, query, key]`` for one image or
  ``[batch, heads, query, key]`` for a batch; a ``[query, key]`` map is taken as already fused.
  Row ``i`` of a map is what query token ``i`` draws on (softmax rows sum to 1).
- ``attentions[b]`` is the attention of *block* ``b``; block ``b`` maps layer ``b``
  (``hidden_states[b]``) to layer ``b + 1``. ``start_layer`` / ``end_layer`` select blocks like a
  Python slice (``attentions[start_layer:end_layer]``), so the rollout relates tokens of
  ``hidden_states[start_layer]`` (keys, columns) to tokens of ``hidden_states[end_layer]``
  (queries, rows).
- Residual augmentation (Abnar & Zuidema 2020): ``A' = rownorm(alpha * A_fused + (1 - alpha) * I)``
  where ``rownorm`` divides each *row* by its sum (the popular ViT implementation divides by the
  wrong axis; here every row of ``A'`` and of the rollout sums to 1).
- numpy in, numpy (float64) out; torch in, torch out (float32, or float64 for float64 input) on
  the input's device. Computation is in float64 numpy.

>>> A = np.array([[0.5, 0.5], [0.0, 1.0]])
>>> rollout([A, A]).round(3).tolist()
[[0.562, 0.438], [0.0, 1.0]]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .._utils import SinkscopeError
from ..models.base import TokenLayout

FUSIONS = ("mean", "max", "min")
#: attention-flow capacities are scaled to integers (exact max-flow arithmetic)
_FLOW_SCALE = 10**9


# -- helpers -------------------------------------------------------------------------------------
def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to(torch.float64).cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _like(arr: np.ndarray, ref: Any) -> Any:
    """``arr`` as the type of ``ref``: a torch tensor (float32/float64, ref's device) or numpy."""
    if isinstance(ref, torch.Tensor):
        dtype = ref.dtype if ref.dtype in (torch.float32, torch.float64) else torch.float32
        return torch.from_numpy(np.ascontiguousarray(arr)).to(device=ref.device, dtype=dtype)
    return arr


def _check_fusion(fusion: str) -> None:
    if fusion not in FUSIONS:
        raise SinkscopeError(f"fusion={fusion!r} is not one of {FUSIONS}")


def _token_index(token: int, n: int, what: str = "token") -> int:
    t = int(token)
    if not -n <= t < n:
        raise SinkscopeError(f"{what}={token} is out of range for {n} tokens")
    return t % n


# -- head fusion ---------------------------------------------------------------------------------
def fuse_heads(attn: Any, fusion: str = "mean") -> Any:
    """Fuse the heads of ``attn [..., heads, query, key]`` into ``[..., query, key]``.

    ``fusion`` is ``"mean"``, ``"max"`` or ``"min"`` over the head axis (axis ``-3``). Type and
    dtype are kept (numpy in, numpy out; torch in, torch out).

    >>> fuse_heads(np.array([[[0.2, 0.8]], [[0.6, 0.4]]]), "max").tolist()
    [[0.6, 0.8]]
    """
    _check_fusion(fusion)
    if attn.ndim < 3:
        raise SinkscopeError(f"fuse_heads needs [..., heads, query, key], got shape {tuple(attn.shape)}")
    if isinstance(attn, torch.Tensor):
        return {"mean": torch.mean, "max": torch.amax, "min": torch.amin}[fusion](attn, dim=-3)
    return {"mean": np.mean, "max": np.max, "min": np.min}[fusion](np.asarray(attn), axis=-3)


def _fused(attn: Any, fusion: str) -> np.ndarray:
    """One layer as a float64 ``[..., q, k]`` map: 2-D is already fused, else heads at axis -3."""
    a = _to_numpy(attn)
    if a.ndim == 2:
        return a
    if a.ndim in (3, 4):
        return fuse_heads(a, fusion)
    raise SinkscopeError(f"attention must be [q, k], [heads, q, k] or [batch, heads, q, k], got {a.shape}")


def _discard(m: np.ndarray, ratio: float) -> np.ndarray:
    """Zero the ``floor(ratio * (n - 1))`` lowest off-diagonal weights of every row (ties: lower key
    index first); the diagonal (self-attention) is never discarded."""
    n = m.shape[-1]
    k = int(np.floor(ratio * (n - 1) + 1e-9))
    if k <= 0:
        return m
    ranked = m.copy()
    idx = np.arange(n)
    ranked[..., idx, idx] = np.inf
    lowest = np.argsort(ranked, axis=-1, kind="stable")[..., :k]
    out = m.copy()
    np.put_along_axis(out, lowest, 0.0, axis=-1)
    return out


def residual_matrices(
    attentions: Sequence[Any],
    fusion: str = "mean",
    discard_ratio: float = 0.0,
    residual_alpha: float = 0.5,
    start_layer: int = 0,
    end_layer: int | None = None,
) -> list[np.ndarray]:
    """The per-block ``A' = rownorm(alpha * discard(A_fused) + (1 - alpha) * I)`` as float64 numpy.

    Returns one ``[n, n]`` (or ``[batch, n, n]``) array per selected block, in block order. A row
    whose sum is 0 (possible only with ``residual_alpha=1``) becomes the identity row.

    >>> residual_matrices([np.array([[0.0, 1.0], [0.0, 1.0]])])[0].tolist()
    [[0.5, 0.5], [0.0, 1.0]]
    """
    _check_fusion(fusion)
    if not 0.0 <= residual_alpha <= 1.0:
        raise SinkscopeError(f"residual_alpha={residual_alpha} must be in [0, 1]")
    if not 0.0 <= discard_ratio <= 1.0:
        raise SinkscopeError(f"discard_ratio={discard_ratio} must be in [0, 1]")
    if len(attentions) == 0:
        raise SinkscopeError("attentions is empty: pass one attention map per block")
    chosen = list(attentions)[start_layer:end_layer]
    if not chosen:
        raise SinkscopeError(
            f"start_layer={start_layer}, end_layer={end_layer} select no block of {len(attentions)}"
        )
    out: list[np.ndarray] = []
    shape = None
    for b, attn in enumerate(chosen):
        m = _fused(attn, fusion)
        if m.shape[-1] != m.shape[-2]:
            raise SinkscopeError(
                f"block {start_layer + b}: attention is not square ({m.shape[-2]} x {m.shape[-1]})"
            )
        if shape is not None and m.shape != shape:
            raise SinkscopeError(f"block {start_layer + b}: fused shape {m.shape} differs from {shape}")
        shape = m.shape
        if discard_ratio > 0:
            m = _discard(m, discard_ratio)
        eye = np.eye(m.shape[-1])
        a = residual_alpha * m + (1.0 - residual_alpha) * eye
        s = a.sum(axis=-1, keepdims=True)  # row sums
        empty = s <= 0
        a = np.where(empty, eye, a)
        out.append(a / np.where(empty, 1.0, s))
    return out


# -- rollout -------------------------------------------------------------------------------------
def rollout(
    attentions: Sequence[Any],
    fusion: str = "mean",
    discard_ratio: float = 0.0,
    residual_alpha: float = 0.5,
    start_layer: int = 0,
    end_layer: int | None = None,
) -> Any:
    """Attention rollout (Abnar & Zuidema 2020): ``A'_end @ ... @ A'_start`` -> ``[q, k]``.

    ``attentions``: one map per block, each ``[heads, q, k]``, ``[q, k]`` (already fused) or
    ``[batch, heads, q, k]`` (then the result is ``[batch, q, k]``). Per block
    ``A' = rownorm(alpha * A_fused + (1 - alpha) * I)`` with ``alpha = residual_alpha`` and every
    row normalised to sum 1. With ``discard_ratio > 0`` the lowest ``floor(discard_ratio * (n - 1))``
    off-diagonal weights of each row of the fused map are zeroed first (never the diagonal), then
    the identity is added and rows are renormalised. Later blocks multiply on the left, so row
    ``i`` of the result is how token ``i`` at the top draws on the input tokens; every row sums 1.

    >>> A = np.array([[0.0, 1.0], [0.0, 1.0]])
    >>> rollout([A, A]).tolist()
    [[0.25, 0.75], [0.0, 1.0]]
    """
    mats = residual_matrices(attentions, fusion, discard_ratio, residual_alpha, start_layer, end_layer)
    r = mats[0]
    for a in mats[1:]:
        r = a @ r
    return _like(r, attentions[0])


def rollout_from(attentions: Sequence[Any], token: int, **kwargs: Any) -> Any:
    """Row ``token`` of :func:`rollout`: how the start token at the top draws on every input token.

    ``-> [k]`` (or ``[batch, k]`` for batched attentions); ``kwargs`` go to :func:`rollout`.

    >>> A = np.array([[0.0, 1.0], [0.0, 1.0]])
    >>> rollout_from([A, A], token=0).tolist()
    [0.25, 0.75]
    """
    r = rollout(attentions, **kwargs)
    return r[..., _token_index(token, r.shape[-1]), :]


# -- attention flow ------------------------------------------------------------------------------
def _flows_networkx(n_nodes, edges, source, targets) -> list[int]:
    import networkx as nx
    from networkx.algorithms.flow import build_residual_network, preflow_push

    g = nx.DiGraph()
    g.add_nodes_from(range(n_nodes))
    g.add_weighted_edges_from(edges, weight="capacity")
    res = build_residual_network(g, "capacity")
    return [
        int(preflow_push(g, source, t, residual=res, value_only=True).graph["flow_value"]) for t in targets
    ]


def _flows_python(n_nodes, edges, source, targets) -> list[int]:
    """Edmonds-Karp (BFS augmenting paths) on integer capacities; no dependency."""
    adj: list[list[int]] = [[] for _ in range(n_nodes)]
    head, cap = [], []  # edge e: head[e], capacity cap[e]; e ^ 1 is its reverse
    for u, v, c in edges:
        adj[u].append(len(head))
        head.append(v)
        cap.append(c)
        adj[v].append(len(head))
        head.append(u)
        cap.append(0)
    values = []
    for t in targets:
        res = list(cap)
        total = 0
        while True:
            parent = [-1] * n_nodes
            parent[source] = -2
            queue = [source]
            for u in queue:
                if u == t:
                    break
                for e in adj[u]:
                    v = head[e]
                    if res[e] > 0 and parent[v] == -1:
                        parent[v] = e
                        queue.append(v)
            if parent[t] == -1:
                break
            push, v = None, t
            while v != source:
                e = parent[v]
                push = res[e] if push is None else min(push, res[e])
                v = head[e ^ 1]
            v = t
            while v != source:
                e = parent[v]
                res[e] -= push
                res[e ^ 1] += push
                v = head[e ^ 1]
            total += push
        values.append(total)
    return values


def attention_flow(
    attentions: Sequence[Any],
    token: int,
    fusion: str = "mean",
    residual_alpha: float = 0.5,
    max_nodes: int = 20000,
    *,
    start_layer: int = 0,
    end_layer: int | None = None,
    backend: str = "auto",
) -> Any:
    """Attention flow (Abnar & Zuidema 2020): max flow from ``token`` at the top to each input token.

    The layered graph has a node per (layer, token) for layers ``0 .. L`` (``L`` selected blocks)
    and an edge from token ``i`` of layer ``l + 1`` to token ``j`` of layer ``l`` with capacity
    ``A'_l[i, j]`` (residual-augmented, row-normalised, as in :func:`rollout`). Value ``j`` = max
    flow from (top, ``token``) to (bottom, ``j``); each value is in ``[0, 1]`` and values do not
    sum to 1. Capacities are rounded to multiples of 1e-9. ``-> [k]`` (``[batch, k]`` for batched
    attentions). Raises :class:`SinkscopeError` when ``(L + 1) * n`` nodes exceed ``max_nodes``.
    ``backend``: ``"networkx"`` (preflow-push), ``"python"`` (Edmonds-Karp) or ``"auto"``.

    >>> A = np.array([[0.0, 1.0], [1.0, 0.0]])
    >>> attention_flow([A, A, A], token=0).tolist()
    [1.0, 1.0]
    """
    if backend not in ("auto", "networkx", "python"):
        raise SinkscopeError(f"backend={backend!r} is not one of ('auto', 'networkx', 'python')")
    if backend == "auto":
        try:
            import networkx  # noqa: F401

            backend = "networkx"
        except ImportError:
            backend = "python"
    mats = residual_matrices(attentions, fusion, 0.0, residual_alpha, start_layer, end_layer)
    n, n_layers = mats[0].shape[-1], len(mats)
    n_nodes = (n_layers + 1) * n
    if n_nodes > max_nodes:
        raise SinkscopeError(
            f"attention_flow: {n_layers + 1} layers x {n} tokens = {n_nodes} graph nodes exceeds "
            f"max_nodes={max_nodes} (raise max_nodes, select fewer blocks, or use rollout)"
        )
    src = _token_index(token, n)
    batch_shape = mats[0].shape[:-2]
    flat = [m.reshape(-1, n, n) for m in mats]
    out = np.zeros((flat[0].shape[0], n))
    solve = _flows_networkx if backend == "networkx" else _flows_python
    for b in range(out.shape[0]):
        edges = []
        for layer, m in enumerate(flat):  # node id = layer * n + token; edges go down one layer
            caps = np.rint(m[b] * _FLOW_SCALE).astype(np.int64)
            for i, j in zip(*np.nonzero(caps > 0)):
                edges.append(((layer + 1) * n + int(i), layer * n + int(j), int(caps[i, j])))
        out[b] = np.asarray(solve(n_nodes, edges, n_layers * n + src, list(range(n)))) / _FLOW_SCALE
    return _like(out.reshape(*batch_shape, n), attentions[0])


# -- maps on the patch grid ----------------------------------------------------------------------
def to_grid(values: Any, layout: TokenLayout) -> Any:
    """Reshape per-token ``values [..., n_tokens]`` to the patch grid ``[..., rows, cols]``.

    CLS and register positions (``layout.n_prefix``) are dropped using the layout, never
    ``sqrt(N)``; values already restricted to patches (``[..., n_patches]``) are accepted too.

    >>> to_grid(np.arange(7), TokenLayout(n_cls=1, grid=(2, 3))).tolist()
    [[1, 2, 3], [4, 5, 6]]
    """
    if layout.grid is None:
        raise SinkscopeError("to_grid: the layout has no patch grid (text layout)")
    rows, cols = layout.grid
    n = values.shape[-1]
    if n == layout.n_tokens:
        patches = values[..., layout.n_prefix :]
    elif n == layout.n_patches:
        patches = values
    else:
        raise SinkscopeError(
            f"to_grid: last axis has {n} values, expected {layout.n_tokens} tokens or {layout.n_patches} patches"
        )
    return patches.reshape(*patches.shape[:-1], rows, cols)


def relevance_map(attn: Any, layout: TokenLayout, token: int, direction: str = "column") -> Any:
    """Per-head relevance map of ``token`` on the patch grid: ``attn [heads, q, k] -> [heads, rows, cols]``.

    ``direction="column"`` (the paper's relevance map) takes column ``token``: how much each patch
    (as a query) attends *to* ``token``. ``direction="row"`` takes row ``token``: how much ``token``
    attends to each patch. Any leading axes (``[batch, heads, q, k]``) are kept.

    >>> a = np.eye(5)[None]; a[0, 1:, 2] = 1.0
    >>> relevance_map(a, TokenLayout(n_cls=1, grid=(2, 2)), token=2)[0].tolist()
    [[1.0, 1.0], [1.0, 1.0]]
    """
    if direction not in ("column", "row"):
        raise SinkscopeError(f"direction={direction!r} is not 'column' or 'row'")
    q, k = attn.shape[-2], attn.shape[-1]
    if q != layout.n_tokens or k != layout.n_tokens:
        raise SinkscopeError(f"relevance_map: attention is {q} x {k}, layout has {layout.n_tokens} tokens")
    t = _token_index(token, k)
    vec = attn[..., :, t] if direction == "column" else attn[..., t, :]
    return to_grid(vec, layout)


# -- attention received by token groups ----------------------------------------------------------
def attention_by_group(
    attn: Any,
    groups: Mapping[str, Sequence[int]] | Sequence[Mapping[str, Sequence[int]]],
    queries: Sequence[int] | None = None,
) -> dict[str, float]:
    """Mean attention received per token of each group (e.g. sinks, non-sinks, cls, registers).

    ``attn``: ``[heads, q, k]`` or ``[batch, heads, q, k]``. Each key token receives
    ``r_k = mean over heads and queries of attn[h, q, k]`` (``queries``: optional query indices,
    default all); a group's value is the mean of ``r_k`` over its key tokens, pooled over the
    batch (every (image, token) pair counts once). ``groups`` is one mapping for all images or a
    list with one mapping per image. An empty group gives ``nan``.

    >>> a = np.array([[[0.75, 0.25], [0.5, 0.5]]])
    >>> attention_by_group(a, {"sink": [0], "other": [1]})
    {'sink': 0.625, 'other': 0.375}
    """
    a = _to_numpy(attn)
    if a.ndim == 3:
        a = a[None]
    if a.ndim != 4:
        raise SinkscopeError(f"attention_by_group needs [heads, q, k] or [batch, heads, q, k], got {a.shape}")
    if queries is not None:
        a = a[:, :, list(queries), :]
    received = a.mean(axis=(1, 2))  # [batch, k]
    n_img, n = received.shape
    if isinstance(groups, Mapping):
        per_image = [groups] * n_img
    else:
        per_image = list(groups)
        if len(per_image) != n_img:
            raise SinkscopeError(f"attention_by_group: {len(per_image)} group mappings for {n_img} images")
    names = list(dict.fromkeys(name for g in per_image for name in g))
    out: dict[str, float] = {}
    for name in names:
        vals = []
        for i, g in enumerate(per_image):
            idx = [int(t) for t in g.get(name, [])]
            bad = [t for t in idx if not 0 <= t < n]
            if bad:
                raise SinkscopeError(
                    f"attention_by_group: group {name!r} has tokens {bad} outside 0..{n - 1}"
                )
            vals.extend(received[i, idx].tolist())
        out[name] = float(np.mean(vals)) if vals else float("nan")
    return out


__all__ = [
    "FUSIONS",
    "attention_by_group",
    "attention_flow",
    "fuse_heads",
    "relevance_map",
    "residual_matrices",
    "rollout",
    "rollout_from",
    "to_grid",
]
