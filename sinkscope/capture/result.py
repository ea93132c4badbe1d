"""What a capture returns: :class:`BatchCapture`, and the uniform attention share to compare it with.

A :class:`BatchCapture` holds one forward's reduced statistics (norms, top channels, attention
received per key) and the full tensors of only the layers and blocks asked for.
:func:`uniform_share` is the attention each key would receive if every query spread its attention
evenly, the baseline the attention rule measures against.

>>> uniform_share(4, causal=False).tolist()
[0.25, 0.25, 0.25, 0.25]
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class BatchCapture:
    """What one forward produced, reduced. Shapes name ``B`` items, ``Lc`` captured layers, ``N`` tokens.

    - ``layers``: the captured layers, in order (``Lc`` of them)
    - ``norms``: ``[B, Lc, N]`` fp32 L2 norms of the residual stream
    - ``max_abs`` / ``top_dims`` / ``top_vals``: ``[B, Lc, N]`` largest |activation|;
      ``[B, Lc, N, k]`` the channels holding the k largest |activations| and their |values|
    - ``rms``: ``[B, Lc, N]`` RMS of each token vector (no learned weight), for ``max|x|/RMS``
    - ``median_abs``: ``[B, Lc]`` median |activation| over the item's valid tokens and channels
    - ``attn_received``: block -> ``[B, N]`` head- and query-averaged attention each key receives
    - ``attn_received_heads``: block -> ``[B, H, N]`` the same per head
    - ``hidden``: layer -> ``[B, N, D]`` full residual stream (only layers asked for with ``keep``)
    - ``mlp_abs``: block -> ``[B, N, F]`` |MLP neuron activations| (only blocks asked for)
    - ``attn_maps``: block -> ``[B, H, Q, K]`` full attention maps (only blocks asked for with
      ``keep_attention``)
    """

    layers: list[int]
    norms: torch.Tensor
    max_abs: torch.Tensor | None = None
    top_dims: torch.Tensor | None = None
    top_vals: torch.Tensor | None = None
    rms: torch.Tensor | None = None
    median_abs: torch.Tensor | None = None
    attn_received: dict[int, torch.Tensor] = field(default_factory=dict)
    attn_received_heads: dict[int, torch.Tensor] = field(default_factory=dict)
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    mlp_abs: dict[int, torch.Tensor] = field(default_factory=dict)
    attn_maps: dict[int, torch.Tensor] = field(default_factory=dict)

    def layer_index(self, layer: int) -> int:
        return self.layers.index(layer)


def uniform_share(n_tokens: int, causal: bool) -> np.ndarray:
    """Expected query-averaged attention per key under uniform attention.

    Bidirectional: ``1/N`` for every key. Causal: query ``i`` spreads ``1/(i+1)`` over keys
    ``0..i``, so key ``k`` expects ``mean_i [i >= k] / (i + 1)``.

    >>> uniform_share(3, causal=False).round(3).tolist()
    [0.333, 0.333, 0.333]
    >>> uniform_share(2, causal=True).tolist()
    [0.75, 0.25]
    """
    if not causal:
        return np.full(n_tokens, 1.0 / n_tokens)
    inv = 1.0 / np.arange(1, n_tokens + 1)
    return np.cumsum(inv[::-1])[::-1] / n_tokens
