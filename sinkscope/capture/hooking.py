"""Plain forward hooks: register some for a ``with`` block, and count those left on a model.

:func:`hooks` is for a quick look inside a forward without a :class:`~sinkscope.capture.Capture`;
:func:`count_hooks` is what the tests use to check that every capture removed its hooks.

>>> from torch import nn
>>> lin = nn.Linear(2, 2)
>>> with hooks([(lin, lambda m, a, o: None)]):
...     count_hooks(lin)
1
>>> count_hooks(lin)
0
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager

from torch import nn


def count_hooks(module: nn.Module) -> int:
    """Number of forward (pre-)hooks registered anywhere under ``module`` (for leak checks)."""
    n = 0
    for m in module.modules():
        n += len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
    return n


@contextmanager
def hooks(pairs: Iterable[tuple[nn.Module, object]], pre: bool = False):
    """Register plain forward (or pre-) hooks for the duration of a ``with`` block.

    >>> import numpy as np
    >>> from sinkscope import load_model
    >>> ad = load_model("tiny-dinov2")
    >>> batch = ad.prepare([np.zeros((32, 32, 3), np.uint8)])
    >>> with hooks([(ad.blocks()[0], lambda m, a, o: print(o.shape))]):   # a block's output
    ...     _ = ad.forward(batch)
    torch.Size([1, 17, 64])
    """
    handles = []
    try:
        for mod, fn in pairs:
            handles.append(mod.register_forward_pre_hook(fn) if pre else mod.register_forward_hook(fn))
        yield handles
    finally:
        for h in handles:
            h.remove()
