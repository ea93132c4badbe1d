"""Chefer-style relevancy (gradient x attention) from an LVLM's answer back to the image patches.

Chefer, Gur & Wolf (ICCV 2021, "Generic Attention-model Explainability for Interpreting Bi-Modal
and Encoder-Decoder Transformers"), self-attention rules 5 and 6, as LVLM-Interpret applies them
to LLaVA:

- per block ``b``: ``Abar_b = mean_heads( max(0, dy/dA_b * A_b) )`` - the attention map times
  the gradient of the answer logit ``y`` with respect to it, clamped at 0, averaged over heads;
- relevancy starts from the identity and accumulates in block order:
  ``R <- R + Abar_b @ R`` (so ``R = (I + Abar_L) ... (I + Abar_1)``). Row ``i`` of ``R`` is what
  token ``i`` at the top draws on; every entry is >= 0 and the diagonal is >= 1.

Through an LVLM (:func:`vlm_relevancy`): ``R_llm`` over the LLM's full input sequence; its row at
the last position (the query that produces the answer token) gives each image token's relevance;
each image token is a ViT token of the feature layer (``LlavaAdapter.vit_to_llm_positions``, CLS
dropped by the ``default`` strategy), so that row becomes a vector ``r`` over the ViT tokens, and
the relevance of the ViT's *input* patches is ``r @ R_vit`` with ``R_vit`` accumulated over the
ViT blocks that produce the feature layer (``0 .. feature_layer - 1``; LLaVA-1.5 uses layer -2,
so the last block is never used). Attention rollout (Abnar & Zuidema, residual 0.5, rows
normalised) is chained the same way from the same attention maps, for the map beside it.

numpy in, numpy (float64) out; torch in, torch out (float32, or float64 for float64 input).

>>> A = np.array([[[0.5, 0.5], [0.0, 1.0]]])               # one block, one head
>>> G = np.array([[[1.0, -1.0], [0.0, 2.0]]])               # d(answer logit) / dA
>>> relevancy([A], [G]).tolist()                            # I + max(0, G * A)
[[1.5, 0.0], [0.0, 3.0]]
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from .._utils import SinkscopeError
from ..interventions.rules import VisualSinkRule, patch_mask, resolve_rule, rule_record
from ..models.llava import LlavaAdapter
from .rollout import _like, _to_numpy, rollout


def head_mean_positive(attn: Any, grad: Any) -> np.ndarray:
    """Chefer et al.'s rule 5: ``mean over heads of max(0, grad * attn)``.

    ``attn``, ``grad``: ``[heads, q, k]`` or ``[batch, heads, q, k]`` (heads at axis -3) ->
    ``[q, k]`` / ``[batch, q, k]`` float64 numpy.

    >>> head_mean_positive(np.array([[[0.5, 0.5]], [[1.0, 0.0]]]),
    ...                    np.array([[[2.0, -1.0]], [[-1.0, 4.0]]])).tolist()
    [[0.5, 0.0]]
    """
    a, g = _to_numpy(attn), _to_numpy(grad)
    if a.shape != g.shape:
        raise SinkscopeError(f"attention {a.shape} and gradient {g.shape} differ in shape")
    if a.ndim not in (3, 4):
        raise SinkscopeError(f"attention must be [heads, q, k] or [batch, heads, q, k], got {a.shape}")
    return np.clip(a * g, 0.0, None).mean(axis=-3)


def relevancy(
    attentions: Sequence[Any],
    gradients: Sequence[Any],
    start_layer: int = 0,
    end_layer: int | None = None,
) -> Any:
    """Chefer et al.'s rule 6: ``R = I``, then ``R <- R + Abar_b @ R`` for each selected block.

    ``attentions[b]`` / ``gradients[b]``: block ``b``'s attention ``[heads, q, k]`` (or
    ``[batch, heads, q, k]``) and the gradient of the explained logit with respect to it;
    ``start_layer`` / ``end_layer`` select blocks like a slice, as in
    :func:`~sinkscope.flow.rollout.rollout`. ``-> [q, k]`` (``[batch, q, k]``), every entry >= 0.
    No block selected gives the identity.

    >>> A = np.array([[[0.0, 1.0], [0.0, 1.0]]]); G = np.ones_like(A)
    >>> relevancy([A, A], [G, G]).tolist()         # (I + A)(I + A) with A = [[0, 1], [0, 1]]
    [[1.0, 3.0], [0.0, 4.0]]
    """
    if len(attentions) != len(gradients):
        raise SinkscopeError(f"{len(attentions)} attention maps but {len(gradients)} gradients")
    if not len(attentions):
        raise SinkscopeError("relevancy: no attention map given")
    ref = attentions[0]
    chosen = list(zip(attentions, gradients))[start_layer:end_layer]
    first = _to_numpy(ref)
    n = first.shape[-1]
    eye = np.broadcast_to(np.eye(n), (*first.shape[:-3], n, n)).copy()
    return _like(_accumulate([head_mean_positive(a, g) for a, g in chosen], eye, start_layer), ref)


def _accumulate(abars: Sequence[np.ndarray], eye: np.ndarray, first_block: int = 0) -> np.ndarray:
    """``R = I``, then ``R <- R + Abar_b @ R`` over the head-averaged maps, in block order."""
    r = eye
    for b, abar in enumerate(abars):
        if abar.shape != r.shape:
            raise SinkscopeError(f"block {first_block + b}: map {abar.shape} differs from {r.shape}")
        r = r + abar @ r
    return r


def _fuse_on_device(a: torch.Tensor, g: torch.Tensor | None) -> tuple[np.ndarray, np.ndarray]:
    """``(mean_heads max(0, g * a), mean_heads a)`` computed where the maps live (heads at -3),
    so only head-averaged maps come to the CPU."""
    af = a.detach().float()
    gf = torch.zeros_like(af) if g is None else g.detach().float()
    return _to_numpy((af * gf).clamp_min(0).mean(-3)), _to_numpy(af.mean(-3))


@dataclass
class RelevancyResult:
    """``table``: one row per ViT token of each image; ``summary``: what was explained and how."""

    table: pd.DataFrame
    summary: dict[str, Any] = field(default_factory=dict)


def _attn_impls(model) -> dict[str, Any]:
    cfg = model.config
    out: dict[str, Any] = {"": cfg._attn_implementation}
    for k in getattr(cfg, "sub_configs", {}) or {}:
        sub = getattr(cfg, k, None)
        if sub is not None:
            out[k] = sub._attn_implementation
    return out


def vlm_relevancy(
    ad: LlavaAdapter,
    images: Sequence[Any],
    prompt: str,
    answer_id: int | None = None,
    chat: bool = False,
    vit_rule: Any = None,
    names: Sequence[str] | None = None,
) -> RelevancyResult:
    """Relevancy of every ViT input patch for the LVLM's answer token, beside attention rollout.

    One forward (eager attention, maps kept in the autograd graph) and one gradient of the answer
    logit (``answer_id``, default the greedy next token at the last position) with respect to
    every attention map of the LLM and of the ViT blocks below the feature layer; no parameter
    gradient is accumulated. The attention implementation is switched to eager for the pass and
    restored after, also on error; the hooks that keep the maps are removed after the pass.

    Table columns: ``image, image_name, vit_token, kind, row, col, llm_position`` (-1 when the
    token does not reach the LLM), ``vit_norm`` and ``is_vit_sink`` (at the feature layer, by
    ``vit_rule`` over each image's patches: anything :func:`~sinkscope.interventions.rule_from`
    reads, default the model's :func:`~sinkscope.interventions.default_rule`), ``relevancy_llm`` / ``rollout_llm`` (the
    answer row of the LLM's relevancy / rollout at the token's image position: the feature-layer
    token), ``relevancy`` / ``rollout`` (chained through the ViT down to its input patches).

    >>> from sinkscope.data import sample_images
    >>> from sinkscope.models import load_model
    >>> img = sample_images(1)[0].load()
    >>> res = vlm_relevancy(load_model("tiny-llava+sinks"), [img], "What is this?")
    >>> bool((res.table.relevancy >= 0).all()), sorted(res.summary["relevancy"])
    (True, ['mean_per_nonsink', 'mean_per_sink', 'sink_share'])
    """
    if not isinstance(ad, LlavaAdapter):
        raise SinkscopeError(f"relevancy needs a LLaVA-style model; {ad.name!r} is {ad.family!r}")
    vit_rule, why = resolve_rule(ad, vit_rule, cls=False)
    vit_rule.check_for("flow relevancy", layer=ad.feature_layer, n_layers=ad.vision.n_layers)
    names = list(names) if names is not None else [f"image{i}" for i in range(len(images))]
    inp = ad.build_inputs(list(images), prompt, chat=chat)
    kw = {k: inp[k].to(ad.device) for k in ("input_ids", "attention_mask")}
    kw["pixel_values"] = inp["pixel_values"].to(ad.device, ad.dtype)
    llm_f, vit_f, ans, logit_value = _answer_gradients(ad, kw, answer_id)
    feat_norm = _feature_norms(ad, images)  # [images, N]
    seq = llm_f[0][0].shape[-1]
    r_llm = _accumulate([ab[0] for ab, _ in llm_f], np.eye(seq))[-1]  # the answer position's row
    ro_llm = rollout([m[0] for _, m in llm_f])[-1]
    is_sink = _feature_sinks(feat_norm, inp["layout"], ad.feature_layer, vit_rule)
    table = _relevancy_table(ad, inp, names, feat_norm, is_sink, (r_llm, ro_llm), vit_f)
    patches = table[table.kind == "patch"]
    fl = ad.feature_layer
    tokzr = ad.tokenizer
    summary = {
        "answer_id": ans,
        "answer_token": tokzr.decode([ans]) if tokzr is not None else None,
        "answer_logit": logit_value,
        "explained": "logit of the answer token at the last position (pre-softmax)",
        "method": "Chefer et al. 2021 rules 5-6: Abar = mean_heads(max(0, grad * A)), R = I, "
        "R <- R + Abar @ R; LLM answer row at image positions -> ViT feature-layer tokens -> @ R_vit",
        "feature_layer": fl,
        "vit_blocks": [0, fl - 1] if fl > 0 else [],
        "llm_layers": ad.llm.n_layers,
        "answer_position": int(inp["input_ids"].shape[1]) - 1,
        "vit_rule": rule_record(vit_rule, why),
        "n_vit_sinks": int(patches.is_vit_sink.sum()),
        "relevancy": _share(patches, "relevancy"),
        "rollout": _share(patches, "rollout"),
        "relevancy_llm": _share(patches, "relevancy_llm"),
    }
    return RelevancyResult(table, summary)


@contextmanager
def _kept_attention(ad: LlavaAdapter, n_vit_blocks: int) -> Iterator[dict[tuple[str, int], Any]]:
    """Eager attention for the pass, and temporary hooks keeping the attention maps (still in the
    autograd graph) of every LLM block and of the first ``n_vit_blocks`` ViT blocks, in a dict
    ``("llm" | "vit", block) -> map``. The hooks are removed and the attention implementation
    restored after, also on error."""
    model = ad.model
    maps: dict[tuple[str, int], Any] = {}

    def keep(key):
        def hook(module, args, output):
            maps[key] = output[1] if isinstance(output, (tuple, list)) and len(output) > 1 else None

        return hook

    prev = _attn_impls(model)
    handles = []
    try:
        model.set_attn_implementation("eager")
        # the eager modules return their weights, still in the autograd graph; temporary hooks
        # keep them (``output_attentions=True`` would make transformers install permanent hooks)
        for b in range(ad.llm.n_layers):
            handles.append(ad.llm.attention(b).register_forward_hook(keep(("llm", b))))
        for b in range(n_vit_blocks):
            handles.append(ad.vision.attention(b).register_forward_hook(keep(("vit", b))))
        yield maps
    finally:
        for h in handles:
            h.remove()
        maps.clear()
        model.set_attn_implementation({k: v for k, v in prev.items() if v is not None})


def _answer_gradients(ad: LlavaAdapter, kw: dict[str, Any], answer_id: int | None):
    """One forward with the attention maps kept, and the gradient of the answer logit (``answer_id``,
    default the greedy next token at the last position) with respect to each map, fused per block
    (:func:`_fuse_on_device`). ``-> (LLM blocks' (Abar, mean attention), ViT blocks' (same) below
    the feature layer, answer id, answer logit)``."""
    fl, n_llm = ad.feature_layer, ad.llm.n_layers
    with _kept_attention(ad, fl) as maps:
        with torch.enable_grad():
            out = ad.model(**kw, use_cache=False)
            llm_att = [maps.get(("llm", b)) for b in range(n_llm)]
            vit_att = [maps.get(("vit", b)) for b in range(fl)]
            if any(a is None or not a.requires_grad for a in llm_att + vit_att):
                raise SinkscopeError(
                    f"model {ad.name!r}: an attention module returned no weights in the autograd graph "
                    "(is its attention eager-capable?)"
                )
            logits = out.logits[0, -1]
            ans = int(logits.argmax()) if answer_id is None else int(answer_id)
            grads = torch.autograd.grad(logits[ans], llm_att + vit_att, allow_unused=True)
        logit_value = float(logits[ans].detach())
    fused = [_fuse_on_device(a, g) for a, g in zip(llm_att + vit_att, grads)]
    return fused[:n_llm], fused[n_llm:], ans, logit_value


def _feature_norms(ad: LlavaAdapter, images: Sequence[Any]) -> torch.Tensor:
    """The ViT's feature-layer norms ``[images, tokens]`` (for the sink rule), from the pixels the
    model saw."""
    from ..capture import Capture

    with Capture(ad.vision, layers=[ad.feature_layer]) as cap:
        vis_cap = cap.run(ad.vision.prepare(list(images)))
    return vis_cap.norms[:, 0]


def _feature_sinks(feat_norm: torch.Tensor, lay, fl: int, vit_rule: VisualSinkRule) -> np.ndarray:
    """``[images, tokens]`` bool: the sinks at the feature layer, by the ViT rule over each image's
    patch tokens."""
    sink = np.zeros((feat_norm.shape[0], lay.n_tokens), bool)
    sink[:, lay.n_prefix : lay.n_tokens] = patch_mask(vit_rule, feat_norm[:, lay.n_prefix : lay.n_tokens])
    return sink


def _vit_chain(vit_f, k: int, n_vit: int, fl: int) -> tuple[np.ndarray, np.ndarray]:
    """Image ``k``'s relevancy and rollout accumulated over the ViT blocks below the feature layer
    (the identity when there is none)."""
    if fl == 0:
        return np.eye(n_vit), np.eye(n_vit)
    return _accumulate([ab[k] for ab, _ in vit_f], np.eye(n_vit)), rollout([m[k] for _, m in vit_f])


def _relevancy_table(ad, inp, names, feat_norm, is_sink, llm_rows, vit_f) -> pd.DataFrame:
    """One row per ViT token of each image: the LLM answer rows ``llm_rows`` (relevancy, rollout)
    at the token's image position, and chained through the ViT down to its input patches."""
    lay, fl = inp["layout"], ad.feature_layer
    n_vit = lay.n_tokens
    rows = ad.vit_to_llm_positions(inp["input_ids"], n_vit)
    r_llm, ro_llm = llm_rows
    frames = []
    for k in range(int(inp["pixel_values"].shape[0])):
        pos = np.full(n_vit, -1)
        for row in rows:
            if row["image_index"] == k:
                pos[row["vit_token"]] = row["llm_position"]
        fed = pos >= 0
        r_tok = np.where(fed, r_llm[np.maximum(pos, 0)], 0.0)
        ro_tok = np.where(fed, ro_llm[np.maximum(pos, 0)], 0.0)
        R_vit, Ro_vit = _vit_chain(vit_f, k, n_vit, fl)
        rc = [lay.row_col(t) for t in range(n_vit)]
        frames.append(
            pd.DataFrame(
                {
                    "image": k,
                    "image_name": names[k] if k < len(names) else f"image{k}",
                    "vit_token": np.arange(n_vit),
                    "kind": lay.kinds(),
                    "row": [r for r, _ in rc],
                    "col": [c for _, c in rc],
                    "llm_position": pos,
                    "vit_norm": feat_norm[k].numpy(),
                    "is_vit_sink": is_sink[k],
                    "relevancy_llm": np.where(fed, r_tok, np.nan),
                    "rollout_llm": np.where(fed, ro_tok, np.nan),
                    "relevancy": r_tok @ R_vit,
                    "rollout": ro_tok @ Ro_vit,
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def _share(patches: pd.DataFrame, col: str) -> dict[str, Any]:
    """The sinks' share of ``col`` over the patches, and its mean per sink and per non-sink."""
    tot = float(patches[col].sum())
    s = patches[patches.is_vit_sink][col]
    ns = patches[~patches.is_vit_sink][col]
    return {
        "sink_share": float(s.sum()) / tot if tot > 0 else None,
        "mean_per_sink": float(s.mean()) if len(s) else None,
        "mean_per_nonsink": float(ns.mean()) if len(ns) else None,
    }


__all__ = ["RelevancyResult", "head_mean_positive", "relevancy", "vlm_relevancy"]
