"""``intervene(adapter, spec)``: an intervention on an unmodified Hugging Face model, always undone.

Inside the context a LLaVA model's forward that receives ``pixel_values`` with ``input_ids`` is
rewritten by a forward pre-hook: :func:`~sinkscope.interventions.tokens.apply_tokens` builds the
LLM's ``inputs_embeds``, ``attention_mask`` and ``position_ids`` (and ``labels``) under ``spec``,
and the model runs on those. ``model.generate`` is wrapped the same way (the prompt is rewritten
once, then generation goes on from its last position id); it returns the original ``input_ids``
followed by the new tokens, as an ordinary call does. Every rewrite's ``tokens_fed`` table is kept
in :attr:`Intervention.fed`. Leaving the context (normally or by an exception) removes the hook
and the wrapper, so the model is exactly as before; a :class:`~sinkscope.capture.Capture` opened
inside or around the context measures the intervened model.

Calls that continue from a cache (``input_ids`` of new tokens, no ``pixel_values``) are not
rewritten: pass the ``position_ids`` that follow the prompt's (``Intervention.last_position``),
since with ``positions="keep"`` they are not the cache length.

>>> import numpy as np, torch
>>> from sinkscope import load_model
>>> from sinkscope.interventions import TokenIntervention
>>> ad = load_model("tiny-llava")
>>> inp = ad.build_inputs([np.zeros((32, 32, 3), np.uint8)], "<image> What is in the picture?")
>>> call = {k: inp[k] for k in ("input_ids", "attention_mask", "pixel_values")}
>>> with intervene(ad, TokenIntervention("nonsink-only", rule="topk:3")) as iv:
...     logits = ad.model(**call).logits
>>> logits.shape[1], int(iv.fed[0]["llm_position"].isna().sum())   # 3 of 16 image tokens dropped
(20, 3)
>>> ad.model._forward_pre_hooks or "generate" in vars(ad.model)    # nothing left behind
False

Interventions do not nest (the outer one rewrites the image away before the inner one sees it):

>>> with intervene(ad, TokenIntervention("sink-only", rule="topk:3")):
...     with intervene(ad, TokenIntervention("nonsink-only", rule="topk:3")):
...         pass
Traceback (most recent call last):
...
sinkscope._utils.SinkscopeError: intervene: 'nonsink-only, ...' inside 'sink-only, ...' on the same model; visual-token interventions do not nest - apply one at a time
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Any

import pandas as pd
import torch

from .._utils import SinkscopeError
from .tokens import TokenIntervention, apply_tokens


class Intervention:
    """The live context: ``spec``, the ``fed`` tables of every rewritten call, and
    ``last_position`` (per batch row, the prompt's last position id) for cached continuations."""

    def __init__(self, adapter, spec: TokenIntervention):
        self.adapter, self.spec = adapter, spec
        self.fed: list[pd.DataFrame] = []
        self.last_position: torch.Tensor | None = None

    def rewrite(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """``kwargs`` of a LLaVA call with its visual tokens rewritten under the spec."""
        keys = ("input_ids", "attention_mask", "pixel_values", "labels", "position_ids")
        done = apply_tokens(self.adapter, {k: kwargs.get(k) for k in keys}, self.spec)
        self.fed.append(done.fed)
        self.last_position = done.kwargs["position_ids"][:, -1]
        out = {k: v for k, v in kwargs.items() if k not in keys and k != "inputs_embeds"}
        out.update(done.kwargs)
        return out


def _as_kwargs(fn, args: tuple, kwargs: dict) -> dict:
    names = [n for n in inspect.signature(fn).parameters if n != "self"]
    return {**dict(zip(names, args)), **kwargs}


@contextmanager
def intervene(adapter, spec: TokenIntervention):
    """Apply ``spec`` to ``adapter.model`` inside the ``with`` block (see the module docstring)."""
    if getattr(adapter, "family", None) != "llava":
        raise SinkscopeError(f"model {adapter.name!r}: visual-token interventions need a LLaVA-style model")
    model = adapter.model
    outer = getattr(model, "_sinkscope_intervention", None)
    if outer is not None:  # the outer hook would rewrite first and the inner one would never see an image
        raise SinkscopeError(
            f"intervene: '{spec.describe()}' inside '{outer.spec.describe()}' on the same model; "
            "visual-token interventions do not nest - apply one at a time"
        )
    live = Intervention(adapter, spec)
    forward = type(model).forward

    def pre(mod, args, kwargs):
        kw = _as_kwargs(forward, args, kwargs)
        if kw.get("pixel_values") is None or kw.get("input_ids") is None:
            return None
        return (), live.rewrite(kw)

    original_generate = model.generate

    def generate(*args, **kwargs):
        kw = _as_kwargs(type(model).generate, args, kwargs)
        if kw.get("pixel_values") is None or kw.get("input_ids") is None:
            return original_generate(**kw)
        ids = kw["input_ids"]
        new = original_generate(**live.rewrite(kw))
        seqs = new.sequences if hasattr(new, "sequences") else new
        joined = torch.cat([ids, seqs.to(ids.device)], 1)
        if hasattr(new, "sequences"):
            new.sequences = joined
            return new
        return joined

    handle = model.register_forward_pre_hook(pre, with_kwargs=True)
    model.generate = generate
    model._sinkscope_intervention = live
    try:
        yield live
    finally:
        handle.remove()
        vars(model).pop("generate", None)
        vars(model).pop("_sinkscope_intervention", None)
