"""The reducing attention function: attention received per key, without the full attention maps.

:func:`sinkscope_attention` is registered with transformers' attention interface as ``"sinkscope"``
(:data:`ATTN_IMPL`) when this module is imported. A block whose attention a
:class:`~sinkscope.capture.Capture` wants carries ``_sinkscope_sel`` (a function giving the
``[batch, query]`` weights of the queries that count): SDPA computes the block's output and the
softmax is evaluated only for the chosen query rows, reduced to ``sum over chosen queries`` per key
and left on the module as ``_sinkscope_out`` for the capture's hook to pick up. When most rows
count, fp32 on the CPU runs the attention block by block (:func:`_chunked_attention`: a few heads
at a time in one reused buffer, output and statistic from the same weights), elsewhere one eager
pass. Blocks without a selection run plain SDPA, so switching a whole decoder to this
implementation changes nothing else.

>>> ATTN_IMPL
'sinkscope'
"""

from __future__ import annotations

import torch
from torch import nn

from .._utils import SinkscopeError

#: Name under which sinkscope's attention function is registered with transformers.
ATTN_IMPL = "sinkscope"
# keyword arguments an eager attention function ignores (the mask already encodes them)
_IGNORED_KW = {
    "position_ids",
    "cache_position",
    "output_attentions",
    "use_cache",
    "past_key_values",
    "past_key_value",
    "is_causal",
    "sliding_window",
    "layer_idx",
    "position_embeddings",
}


def _eager_of(module: nn.Module):
    """The eager attention function of ``module``'s own modeling file (the reference path)."""
    import sys

    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise SinkscopeError(f"{type(module).__name__}: no eager attention function to fall back to")
    return fn


def sinkscope_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention that also reduces the attention each key receives, without materialising it all.

    Registered with transformers' attention interface as ``"sinkscope"`` (with the eager, additive
    float mask). A block whose attention :class:`Capture` wants carries ``_sinkscope_sel``: the
    output then comes from SDPA and the softmax is computed only for the chosen query rows, reduced
    to ``sum over chosen queries`` per key and stored on the module (``_sinkscope_out``); when most
    rows are wanted, one blockwise pass (fp32 on the CPU) or one eager pass gives both. Blocks
    without a selection run plain SDPA. A block
    carrying ``_sinkscope_var`` (an intervention that changes the attention, e.g. VAR) runs that
    callable instead, and a selection reduces the changed attention.
    Extras an eager function does not ignore (soft-capping, learned sinks, head masks) fall back
    to the module's own eager function, reduced the same way.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    sel = getattr(module, "_sinkscope_sel", None)
    change = getattr(module, "_sinkscope_var", None)  # an intervention's attention (interventions.var)
    if change is not None:
        B, H, Q, D = query.shape
        out, w = change(module, query, key, value, attention_mask, scaling if scaling is not None else D**-0.5)
        if sel is not None:
            qm = sel(B, Q)
            module._sinkscope_out = ((w.float() * qm[:, None, :, None]).sum(2), qm.sum(1), Q)
        return out, (w if getattr(module, "_sinkscope_keep", False) else None)
    extras = {k for k, v in kwargs.items() if v is not None and k not in _IGNORED_KW}
    if sel is None and not extras:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    B, H, Q, D = query.shape
    keep = getattr(module, "_sinkscope_keep", False)
    qm = sel(B, Q) if sel is not None else None  # [batch, query] weights (1 = this query counts)
    if not (extras or qm is None or keep or module.training) and _chunkable(query):
        out, received = _chunked_attention(query, key, value, attention_mask, scaling, qm)
        module._sinkscope_out = (received, qm.sum(1), Q)
        return out, None
    if extras or qm is None or keep or (qm > 0).any(0).float().mean() > 0.5:
        out, w = _eager_of(module)(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
        if qm is not None:
            if module.training and dropout > 0 and not extras:
                # the eager weights are after dropout: reduce the softmax itself, as the row path does
                module._sinkscope_out = (*_row_stats(query, key, attention_mask, scaling, qm), Q)
            else:
                module._sinkscope_out = ((w.float() * qm[:, None, :, None]).sum(2), qm.sum(1), Q)
        return out, (w if keep else None)
    out, _ = sdpa_attention_forward(
        module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
    )
    module._sinkscope_out = (*_row_stats(query, key, attention_mask, scaling, qm), Q)
    return out, None


#: the largest ``[heads, queries, keys]`` block of attention weights one step of
#: :func:`_chunked_attention` holds (elements: 1M fp32 = 4 MB, a few cache-sized pages)
CHUNK_ELEMENTS = 1 << 20
_work: dict[tuple, torch.Tensor] = {}  # the reused block buffer, per (device, dtype)


def _chunkable(query: torch.Tensor) -> bool:
    """The blockwise route runs fp32 on the CPU, where eager's full weight tensors cost page
    faults and memory traffic; elsewhere (GPU, half precision) the eager pass stays."""
    return query.device.type == "cpu" and query.dtype == torch.float32


def _chunked_attention(query, key, value, attention_mask, scaling, qm: torch.Tensor):
    """Attention output ``[B, Q, H, D]`` and ``sum over queries of qm * softmax(q k^T)`` per key
    ``[B, H, K]``, computed a few heads (and query rows) at a time in one reused buffer.

    The same arithmetic as an eager pass - scores, mask, softmax, weights times values - but no
    ``[B, H, Q, K]`` tensor is ever allocated: each block is reduced and multiplied by the values
    while it is in cache, so the cost stays near a fused SDPA forward (see
    ``benchmarks/bench_paper_scale.py``).

    >>> q, k, v = torch.randn(3, 2, 4, 5, 8).unbind(0)
    >>> out, rec = _chunked_attention(q, k, v, None, 8**-0.5, torch.ones(2, 5))
    >>> w = torch.softmax(q @ k.transpose(2, 3) * 8**-0.5, -1)
    >>> torch.allclose(out, (w @ v).transpose(1, 2), atol=1e-6), torch.allclose(rec, w.sum(2), atol=1e-6)
    (True, True)
    """
    B, H, Q, D = query.shape
    K = key.shape[2]
    if key.shape[1] != H:  # grouped-query attention: each key/value head serves H / H_kv query heads
        key, value = (t.repeat_interleave(H // key.shape[1], dim=1) for t in (key, value))
    scale = scaling if scaling is not None else D**-0.5
    kt = key.transpose(2, 3)
    out = torch.empty(B, H, Q, D, dtype=query.dtype, device=query.device)
    received = torch.empty(B, H, K, dtype=torch.float32, device=query.device)
    rows = max(1, min(Q, CHUNK_ELEMENTS // K))  # query rows per block
    hc = max(1, min(H, CHUNK_ELEMENTS // (rows * K)))  # heads per block
    buf = _work.get((query.device, query.dtype))
    if buf is None or buf.numel() < hc * rows * K:
        buf = _work[(query.device, query.dtype)] = torch.empty(hc * rows * K, dtype=query.dtype, device=query.device)
    w_all = qm.to(query.dtype)
    for b in range(B):
        mask = attention_mask[b] if attention_mask is not None else None
        for h0 in range(0, H, hc):
            h1 = min(H, h0 + hc)
            k_b, v_b = kt[b, h0:h1], value[b, h0:h1]
            acc = None
            for r0 in range(0, Q, rows):
                r1 = min(Q, r0 + rows)
                blk = buf[: (h1 - h0) * (r1 - r0) * K].view(h1 - h0, r1 - r0, K)
                q_blk = query[b, h0:h1, r0:r1]
                if mask is None:  # scores, scaled in the product (beta=0: blk's old values are ignored)
                    torch.baddbmm(blk, q_blk, k_b, beta=0, alpha=scale, out=blk)
                else:  # mask + scaled scores in one call
                    m = mask[:, r0:r1] if mask.shape[0] == 1 else mask[h0:h1, r0:r1]
                    torch.baddbmm(m.expand(h1 - h0, -1, -1), q_blk, k_b, alpha=scale, out=blk)
                torch.ops.aten._softmax.out(blk, -1, False, out=blk)
                part = torch.matmul(w_all[b, r0:r1], blk)  # [heads, keys]
                acc = part if acc is None else acc.add_(part)
                torch.bmm(blk, v_b, out=out[b, h0:h1, r0:r1])  # written in place
            received[b, h0:h1] = acc
    return out.transpose(1, 2).contiguous(), received


def _row_stats(query, key, attention_mask, scaling, qm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum over the chosen queries of softmax(q k^T), query count)`` ``([B, H, K], [B])``,
    computed in fp32 for the rows any item chose only (dropout never applies)."""
    H, D = query.shape[1], query.shape[-1]
    rows = torch.nonzero((qm > 0).any(0)).flatten()
    k = key.float()
    if k.shape[1] != H:  # grouped-query attention
        k = k.repeat_interleave(H // k.shape[1], dim=1)
    s = torch.matmul(query[:, :, rows].float(), k.transpose(2, 3)) * (
        scaling if scaling is not None else D**-0.5
    )
    if attention_mask is not None:
        s = s + attention_mask[:, :, rows].float()
    p = torch.softmax(s, dim=-1)  # [batch, head, rows, key]
    w = qm[:, rows].to(p.dtype)
    return (p * w[:, None, :, None]).sum(2), w.sum(1)


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ATTN_IMPL, sinkscope_attention)
    AttentionMaskInterface.register(ATTN_IMPL, eager_mask)


_register_attention()


def _set_attn_impl(model: nn.Module, impl: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(impl)
    else:  # a bare sub-module: set it on its config
        model.config._attn_implementation = impl
