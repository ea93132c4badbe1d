"""Attention knockout (Zhang et al., CVPR 2025) and word-distribution decoding of isolated tokens.

Both block attention edges - from a set of *source* key positions to a set of *target* query
positions, in chosen LLM layers - by replacing the additive attention mask those layers receive
(a forward pre-hook on each decoder layer; eager attention for the duration). The model is not
modified: hooks are removed and the attention implementation restored afterwards, also on error.

>>> knockout(ad.llm, ids, source=image_positions, target=[ids.shape[1] - 1], window=9)   # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import numpy as np
import pandas as pd
import torch

from .._utils import SinkscopeError
from ..models.text import CausalLMAdapter


@contextmanager
def blocked_edges(lm: CausalLMAdapter, blocks: Sequence[int], source: Sequence[int], target: Sequence[int]):
    """Within the ``with`` block, queries in ``target`` cannot attend to keys in ``source`` in the
    given decoder ``blocks`` (pre-softmax mask). Eager attention is on for the duration."""
    src = torch.as_tensor(list(source), dtype=torch.long)
    tgt = torch.as_tensor(list(target), dtype=torch.long)

    def hook(module, args, kwargs):
        if len(src) == 0 or len(tgt) == 0:
            return None
        am = kwargs.get("attention_mask")
        h = args[0] if args else kwargs["hidden_states"]
        B, Q = h.shape[0], h.shape[1]
        neg = torch.finfo(h.dtype).min
        if am is None:
            am = torch.full((B, 1, Q, Q), neg, dtype=h.dtype, device=h.device).triu(1)
        am = am.clone()
        K = am.shape[-1]
        t = tgt[(tgt < Q)].to(am.device)
        s = src[(src < K)].to(am.device)
        am[:, :, t[:, None], s[None, :]] = neg
        kwargs["attention_mask"] = am
        return args, kwargs

    model = lm.model
    old = lm.config._attn_implementation
    handles = []
    try:
        if old != "eager":
            model.set_attn_implementation("eager")
        for b in blocks:
            handles.append(lm.blocks()[b].register_forward_pre_hook(hook, with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()
        if old != "eager":
            model.set_attn_implementation(old)


def _last_probs(run) -> torch.Tensor:
    with torch.no_grad():
        logits = run().logits[0, -1].float()
    return logits.softmax(-1)


def knockout(
    run_model,
    lm: CausalLMAdapter,
    source: Sequence[int],
    target: Sequence[int],
    window: int = 9,
    answer_id: int | None = None,
    stride: int = 1,
) -> pd.DataFrame:
    """Change in the answer's probability when ``source -> target`` edges are blocked in a
    sliding window of ``window`` LLM layers.

    ``run_model``: a zero-argument callable that runs the full model on the fixed input and
    returns an output with ``.logits`` (e.g. ``lambda: ad.model(**inputs)``). ``answer_id``: the
    token whose probability is tracked (default: the model's own top prediction without
    knockout). ``stride``: step between window starts. Returns one row per window start: ``window_start, window_end, p_answer, p_base,
    delta, relative_change``.
    """
    L = lm.n_layers
    window = max(1, min(window, L))
    base = _last_probs(run_model)
    ans = int(base.argmax()) if answer_id is None else int(answer_id)
    p0 = float(base[ans])
    rows = []
    for start in range(0, L - window + 1, max(1, stride)):
        with blocked_edges(lm, range(start, start + window), source, target):
            p = float(_last_probs(run_model)[ans])
        rows.append(
            {
                "window_start": start,
                "window_end": start + window - 1,
                "answer_id": ans,
                "p_answer": p,
                "p_base": p0,
                "delta": p - p0,
                "relative_change": (p - p0) / p0 if p0 > 0 else np.nan,
            }
        )
    return pd.DataFrame(rows)


def decode_isolated(
    run_model,
    lm: CausalLMAdapter,
    positions: Sequence[int],
    seq_len: int,
    tokenizer=None,
    top_k: int = 5,
) -> pd.DataFrame:
    """Word-distribution decoding (logit lens of an isolated token): for each position, block its
    attention to every other token in every LLM layer, and decode its final hidden state through
    the LM head. Returns ``position, rank, token_id, token, prob``.

    ``run_model`` must return an output with ``.logits`` for every position.
    """
    rows = []
    for p in positions:
        if not 0 <= p < seq_len:
            raise SinkscopeError(f"position {p} is outside the sequence of {seq_len} tokens")
        others = [i for i in range(seq_len) if i != p]
        with blocked_edges(lm, range(lm.n_layers), others, [p]), torch.no_grad():
            probs = run_model().logits[0, p].float().softmax(-1)
        top = probs.topk(top_k)
        for r, (tid, pr) in enumerate(zip(top.indices.tolist(), top.values.tolist())):
            word = tokenizer.convert_ids_to_tokens(tid) if tokenizer is not None else None
            word = word if word is not None else f"<id {tid}>"  # ids the tokenizer has no word for
            rows.append({"position": int(p), "rank": r + 1, "token_id": tid, "token": word, "prob": pr})
    return pd.DataFrame(rows)
