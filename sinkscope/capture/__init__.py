"""Hook contexts and in-hook reducers: bounded-memory capture of the residual stream and attention.

The hooks reduce inside the forward pass - L2 norms in fp32, the largest |activations| and their
channels, the attention each key token receives - so memory is bounded by the batch, never by the
number of layers x tokens x tokens. Full tensors are kept only for layers you name.

Layer convention: layer ``i`` is ``hidden_states[i]`` of the Hugging Face model (``0`` = input of
the first block). Attention statistics are indexed by *block*: block ``i`` reads layer ``i``, so
``attention_received`` at layer ``i`` is what block ``i``'s attention gives each token (the last
layer has none). This is HF's ``attentions[i]``.

>>> import numpy as np
>>> from sinkscope import load_model
>>> ad = load_model("tiny-dinov2")
>>> batch = ad.prepare([np.zeros((32, 32, 3), np.uint8)])
>>> cap = capture(ad, batch, attention="all")
>>> cap.norms.shape, sorted(cap.attn_received)[:2]            # [batch, layers, tokens]
(torch.Size([1, 5, 17]), [0, 1])

Attention statistics come from :func:`sinkscope_attention`, registered with transformers'
attention interface: SDPA computes the block's output and the softmax is evaluated only for the
query rows whose attention is averaged, so the full ``tokens x tokens`` map of every head is never
kept. Hooks are always removed, also when the forward raises; model settings changed for the
capture (the attention implementation of the blocks that need statistics) are restored.

The modules:

- :mod:`~sinkscope.capture.attention` - the reducing attention function (registered on import)
- :mod:`~sinkscope.capture.selection` - layer and block selections (:func:`parse_layers`)
- :mod:`~sinkscope.capture.context` - the :class:`Capture` context and :func:`capture`
- :mod:`~sinkscope.capture.result` - :class:`BatchCapture` and :func:`uniform_share`
- :mod:`~sinkscope.capture.hooking` - plain hooks (:func:`hooks`) and :func:`count_hooks`
"""

from __future__ import annotations

from .attention import ATTN_IMPL, sinkscope_attention
from .context import Capture, StopForward, capture
from .hooking import count_hooks, hooks
from .result import BatchCapture, uniform_share
from .selection import parse_layers

__all__ = [
    "ATTN_IMPL",
    "BatchCapture",
    "Capture",
    "StopForward",
    "capture",
    "count_hooks",
    "hooks",
    "parse_layers",
    "sinkscope_attention",
    "uniform_share",
]
