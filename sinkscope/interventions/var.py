"""VAR (Kang et al., *See What You Are Told*, ICLR 2025): redistribute the LLM's attention from its
sink tokens to the image, inside sinkscope's attention function.

For every decoder layer from ``start_layer`` on except the last, and every query and head:

1. **sink tokens** (text and visual alike): a token of the prompt is a sink at layer ``l`` when
   ``max over d in sink_dims of |x[d]| / RMS(x) >= tau`` on the layer's *input* hidden state
   (RMS without the norm's learned weight). Sinks are found in the prefill only (the call that
   starts with an empty cache): tokens fed later - generated tokens, scored candidates - are never
   sinks, as in the reference code (its sink detector runs before the first output token only);
2. **image-centric heads**: only where the image holds a visual sink at that layer (a layer whose
   image has none forks no head, whatever its text sinks), a head's query row is selected when its
   attention on image tokens is ``>= alpha`` (0.2) and the visual sinks take at most ``rho`` (0.5)
   of it. Only queries after the image's last token are candidates: in the prefill the image
   tokens' own rows and the text before the image keep their attention (the reference's
   ``attn_redist`` takes ``query >= image_end``); decoding steps come after the image;
3. in the selected rows the attention on every sink token (text and visual) is multiplied by ``p``
   (0.6) and the freed mass goes to the non-sink image tokens, in proportion to their attention.
   Rows still sum to 1.

These scopes are those of the reference code (``seilk/VisAttnSink``, ``src/logic/logic.py``:
``HeadFork`` forks no head without a visual sink, ``VARProcessor.attn_redist`` skips the prefill
queries before ``image_end``, ``DimProspector`` runs while no token has been generated).
sinkscope's earlier version also redistributed in layers with only text sinks and in the image
tokens' own rows (which changes every later layer's image states); that was dropped rather than
kept as an option: the reference does neither, and no analysis here needs it. Two details differ
from the reference on purpose, both with no effect unless a value sits on the threshold: a sink is
``>= tau`` (the toolkit's LLM sink rule; the reference tests ``> tau`` on ``x * rsqrt(mean(x^2) +
1e-6)``), and the visual sinks' share is of the image attention itself (the reference divides by
``sum(image attention + 1e-6)``, one epsilon per image token).

``sink_dims=None`` discovers them from the model instead of hard-coding them per model (the
reference code hard-codes Llama-2's): a calibration text runs through the LLM and every channel
in which some token reaches ``tau`` at a layer VAR touches is kept (:attr:`VARLive.sink_dims`).
It works in prefill and in ``generate`` (sink and image flags of the cached keys are kept and
extended with each new token, never a sink). The attention runs eagerly in the layers VAR touches
(the other layers stay on SDPA); a :class:`~sinkscope.capture.Capture` in the same forward reduces
the redistributed attention. Batched rows each use their own image and sinks.

In the example the BOS token is the only sink, so VAR forks no head and changes nothing:

>>> import numpy as np, torch
>>> from sinkscope.models.tiny import Plant, load_tiny, plant_text_sinks
>>> ad = load_tiny("tiny-llava")
>>> plant_text_sinks(ad.llm, Plant(layer=1, token_ids=(1,)))        # BOS becomes a massive-activation sink
>>> proj = ad.model.model.multi_modal_projector.linear_2              # keep image features off the
>>> with torch.no_grad():                                            # plant's trigger channel (63)
...     _ = proj.weight[63].zero_(), proj.bias[63].zero_()
>>> inp = ad.build_inputs([np.zeros((32, 32, 3), np.uint8)], "<image> What is in the picture?")
>>> call = {k: inp[k] for k in ("input_ids", "attention_mask", "pixel_values")}
>>> with torch.no_grad(), var(ad, VAR(start_layer=1, tau=5)) as live:   # width 64: |x[d]|/RMS <= 8 here
...     logits = ad.model(**call).logits
>>> live.sink_dims, live.last_sinks[1][0, :2].tolist()               # BOS is the sink; then an image token
((7,), [True, False])
>>> with torch.no_grad():
...     torch.allclose(logits, ad.model(**call).logits, atol=1e-6)    # no visual sink: no head forked
True
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .._utils import SinkscopeError

#: calls with at most this many queries (decoding steps, scored candidates) take the eager route:
#: their attention is a few rows, and the eager route runs fewer operations than the fused one
SHORT_CALL = 8
#: use the CPU kernel's log-sum-exp (else the route other devices take; tests switch it off)
_CPU_LSE = True
CALIBRATION_TEXT = "A photo of a cat sitting on a wooden table next to a cup of coffee."


@dataclass(frozen=True)
class VAR:
    """VAR's settings (Kang et al.'s defaults); see the module docstring.

    >>> VAR().to_dict()["p"], VAR(p=0.8).describe()[:28]
    (0.6, 'VAR: sink attention x 0.8 in')
    """

    p: float = 0.6
    rho: float = 0.5
    alpha: float = 0.2
    tau: float = 20.0
    start_layer: int = 2
    sink_dims: tuple[int, ...] | None = None
    kind: str = field(default="var", init=False)

    def __post_init__(self):
        if not 0 <= self.p <= 1:
            raise SinkscopeError(f"VAR p: a factor in [0, 1] for the sink attention, got {self.p!r}")
        if not 0 <= self.rho <= 1 or not 0 <= self.alpha <= 1:
            raise SinkscopeError(f"VAR rho and alpha: shares in [0, 1], got {self.rho!r} and {self.alpha!r}")
        if not self.tau > 0:
            raise SinkscopeError(f"VAR tau: a ratio > 0, got {self.tau!r}")
        if not isinstance(self.start_layer, int) or self.start_layer < 0:
            raise SinkscopeError(f"VAR start_layer: a decoder layer >= 0, got {self.start_layer!r}")
        if self.sink_dims is not None:
            object.__setattr__(self, "sink_dims", tuple(int(d) for d in self.sink_dims))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        dims = "discovered" if self.sink_dims is None else ",".join(map(str, self.sink_dims))
        return (
            f"VAR: sink attention x {self.p:g} in image-centric heads (sink share <= {self.rho:g} of image "
            f"attention >= {self.alpha:g}) for the queries after the image, in layers {self.start_layer}..last-1 "
            f"whose image holds a visual sink; prompt sinks max|x[d]|/RMS >= {self.tau:g} on dims {dims}"
        )


def phi(hidden: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """``max over dims of |x[d]| / RMS(x)`` per token (``[..., D]`` -> ``[...]``), in fp32.

    >>> phi(torch.tensor([[3.0, 4.0, 0.0, 0.0]]), (1,))   # RMS = 2.5
    tensor([1.6000])
    """
    x = hidden.float()
    rms = x.pow(2).mean(-1).sqrt().clamp_min(1e-12)
    return x[..., list(dims)].abs().amax(-1) / rms


def candidate_rows(key_sink: torch.Tensor, key_image: torch.Tensor, n_queries: int) -> torch.Tensor:
    """The ``[B, 1, Q]`` query rows VAR may select, from the per-key sink and image flags ``[B, K]``
    of a causal call whose ``Q`` queries are its last ``Q`` keys: the row's image holds a visual
    sink, and the query comes after the image's last token.

    >>> sink = torch.tensor([[True, False, True, False, False, False]])
    >>> image = torch.tensor([[False, True, True, True, False, False]])   # image at keys 1-3
    >>> candidate_rows(sink, image, 3).tolist()                        # queries at keys 3, 4, 5
    [[[False, True, True]]]
    >>> candidate_rows(sink & ~image, image, 3).any().item()             # no visual sink: no row
    False
    """
    n_keys = key_image.shape[1]
    at = torch.arange(n_keys, device=key_image.device)
    image_end = torch.where(key_image, at + 1, 0).amax(1, keepdim=True)  # [B, 1]; 0 without an image
    visual = (key_sink & key_image).any(1, keepdim=True)
    queries = at[n_keys - n_queries :][None, :]
    return ((queries >= image_end) & visual)[:, None, :]


def redistribute(probs: torch.Tensor, key_sink: torch.Tensor, key_image: torch.Tensor, cfg: VAR,
                 rows: torch.Tensor | None = None):  # fmt: skip
    """VAR on attention probabilities ``[B, H, Q, K]`` (the ``Q`` queries are the last ``Q`` keys)
    given per-key sink and image flags ``[B, K]``: the new probabilities and the ``[B, H, Q]`` mask
    of the rows it changed. ``rows``: :func:`candidate_rows` (computed when not given).

    >>> probs = torch.tensor([[[[0.5, 0.1, 0.3, 0.05, 0.05]]]])  # key 0: text sink, 1: image sink,
    >>> sink = torch.tensor([[True, True, False, False, False]])  # 2-3: image, 4: the text query
    >>> new, sel = redistribute(probs, sink, torch.tensor([[False, True, True, True, False]]), VAR())
    >>> [round(v, 4) for v in new[0, 0, 0].tolist()], bool(sel)
    ([0.3, 0.06, 0.5057, 0.0843, 0.05], True)
    >>> new, sel = redistribute(probs[..., :4] / 0.95, sink[:, :4], torch.tensor([[False, True, True, True]]), VAR())
    >>> bool(sel)                                                   # an image token's own row: unchanged
    False
    """
    if rows is None:
        rows = candidate_rows(key_sink, key_image, probs.shape[2])
    p32 = probs.float()
    snk = key_sink[:, None, :, None].to(p32.dtype)  # [B, 1, K, 1]: reductions over keys are matmuls
    img = key_image[:, None, :, None].to(p32.dtype)
    ns = img * (1 - snk)
    stats = p32 @ torch.cat([img, img * snk, ns, snk], -1)  # [B, H, Q, 4]: one product for the four sums
    a_img, a_sink_img, base, sink_mass = stats.unbind(-1)
    sel = (a_img >= cfg.alpha) & (a_sink_img <= cfg.rho * a_img) & (base > 0) & rows
    drop = torch.where(sel, 1 - cfg.p, 0.0)  # the share of every sink key's attention taken away
    gain = torch.where(sel, (1 - cfg.p) * sink_mass / base.clamp_min(1e-30), 0.0)  # given per unit of attention
    scale = 1 - drop[..., None] * snk[..., 0][:, :, None, :] + gain[..., None] * ns[..., 0][:, :, None, :]
    return (p32 * scale).to(probs.dtype), sel


class VARLive:
    """The live VAR context: ``config``, ``sink_dims`` (given or discovered), and per layer the
    sink flags of the last call's keys (``last_sinks``: layer -> ``[B, K]``) and the image flags
    (``key_image``). ``record=True`` keeps every touched layer's probabilities before and after
    (``records``: list of dicts) for tests and figures."""

    def __init__(self, adapter, config: VAR, record: bool = False):
        self.adapter, self.config, self.record = adapter, config, record
        self.sink_dims: tuple[int, ...] = config.sink_dims or ()
        self.last_sinks: dict[int, torch.Tensor] = {}
        self.key_image: torch.Tensor | None = None
        self.records: list[dict[str, Any]] = []
        self._past = 0  # keys already in the cache when the current call started

    def attention(self, layer: int):
        """The attention callable for decoder layer ``layer`` (put on its attention module)."""

        def run(module, query, key, value, attention_mask, scaling):
            from transformers.integrations.sdpa_attention import repeat_kv

            groups = query.shape[1] // key.shape[1]
            n_keys = key.shape[2]
            mask = None if attention_mask is None else attention_mask[..., :n_keys]
            sinks, image = self.last_sinks[layer], self.key_image
            if sinks.shape[1] != n_keys or image is None or image.shape[1] != n_keys:
                raise SinkscopeError(
                    f"VAR layer {layer}: flags for {sinks.shape[1]} keys, attention over {n_keys} "
                    "(a call VAR did not see from its start: run prefill and generate inside the context)"
                )
            sinks, image = sinks.to(value.device), image.to(value.device)
            rows = candidate_rows(sinks, image, query.shape[2])
            wanted = self.record or getattr(module, "_sinkscope_sel", None) is not None or getattr(module, "_sinkscope_keep", False)
            if not wanted and query.shape[2] > SHORT_CALL:  # nobody reads the probabilities
                k, v = repeat_kv(key, groups), repeat_kv(value, groups)
                if not bool(rows.any()):  # no visual sink or no query after the image: plain attention
                    out = nn.functional.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=scaling)
                    return out.transpose(1, 2).contiguous(), None
                return _fused(query, k, v, mask, scaling, sinks, image, self.config, rows), None
            # eager, with the query heads grouped over their key/value head (no copy of the cache)
            B, H, Q, D = query.shape
            qg = query.view(B, H // groups, groups, Q, D)
            scores = torch.matmul(qg, key[:, :, None].transpose(-1, -2)).reshape(B, H, Q, n_keys) * scaling
            if mask is not None:
                scores = scores + mask
            probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32)
            new, sel = redistribute(probs, sinks, image, self.config, rows)
            if self.record:
                self.records.append({"layer": layer, "before": probs.detach().cpu(), "after": new.detach().cpu(),
                                     "selected": sel.detach().cpu()})  # fmt: skip
            pg = new.to(query.dtype).view(B, H // groups, groups, Q, n_keys)
            out = torch.matmul(pg, value[:, :, None]).reshape(B, H, Q, -1).transpose(1, 2).contiguous()
            return out, new

        return run


def _fused(query, k, v, mask, scaling, sinks, image, cfg: VAR, rows: torch.Tensor) -> torch.Tensor:
    """VAR's output without materialising the attention over the image.

    The redistributed output is linear in the probabilities: ``out' = out - drop * O_S + gain *
    O_N`` with ``O_S`` / ``O_N`` the parts of ``out`` that come from sink keys / non-sink image
    keys. Only the few keys that are *not* non-sink image tokens - the sinks ``S`` and the other
    text ``T``, a few dozen - need their probabilities: on the CPU the fused kernel returns the
    row's log-sum-exp with ``out``, so ``p_k = exp(s_k - lse)`` from those keys' own scores; on
    other devices a second fused call with three key flags as the values gives the group masses,
    and ``p_k = mass_group * softmax_group(s)_k``. The row statistics (image mass, its sink share,
    sink mass) follow, ``O_S`` and ``O_T`` are products over the few keys, and ``O_N = out - O_S -
    O_T``. Only the :func:`candidate_rows` ``rows`` can be selected. Equal to the eager route
    (tested); ``[B, Q, H, D]`` as the eager function returns it."""
    B, H, K, D = v.shape
    if mask is not None and mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=query.dtype, device=mask.device).masked_fill(~mask, torch.finfo(query.dtype).min)
    few = (~image | sinks).any(0)  # the key columns some row needs probabilities for
    s = torch.matmul(query.float(), k[:, :, few].float().transpose(2, 3)) * scaling
    if mask is not None:
        s = s + mask[..., few].float()
    col_s = sinks[:, few][:, None, None, :]
    col_t = (~image & ~sinks)[:, few][:, None, None, :]
    col_si = (image & sinks)[:, few][:, None, None, :]
    lse = None
    if query.device.type == "cpu" and _CPU_LSE:
        try:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                query, k, v, 0.0, False, attn_mask=mask, scale=scaling
            )
        except (RuntimeError, AttributeError, TypeError):  # pragma: no cover - another torch build
            lse = None
    if lse is not None:
        p = torch.exp(s - lse.float()[..., None])
        p_s, p_t = p * col_s, p * col_t
        sink_mass, a_sink_img = p_s.sum(-1), (p * col_si).sum(-1)
        a_img = 1 - p_t.sum(-1) - (sink_mass - a_sink_img)
    else:
        sdpa = nn.functional.scaled_dot_product_attention
        out = sdpa(query, k, v, attn_mask=mask, scale=scaling)
        flags = v.new_zeros(B, H, K, D)  # as wide as the values, so the call stays on the fused kernel
        flags[..., 0] = image[:, None, :].to(v.dtype)
        flags[..., 1] = (image & sinks)[:, None, :].to(v.dtype)
        flags[..., 2] = sinks[:, None, :].to(v.dtype)
        stats = sdpa(query, k, flags, attn_mask=mask, scale=scaling)
        a_img, a_sink_img, sink_mass = (stats[..., i].float() for i in range(3))
        other = (1 - a_img - (sink_mass - a_sink_img)).clamp_min(0)

        def group(cols: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
            return torch.softmax(s.masked_fill(~cols, float("-inf")), -1).nan_to_num(0.0) * mass[..., None]

        p_s, p_t = group(col_s, sink_mass), group(col_t, other)
    vf = v[:, :, few].float()
    o_s, o_t = torch.matmul(p_s, vf), torch.matmul(p_t, vf)
    base = (a_img - a_sink_img).clamp_min(0)
    sel = (a_img >= cfg.alpha) & (a_sink_img <= cfg.rho * a_img) & (base > 0) & rows
    o_n = out.float() - o_s - o_t
    drop = torch.where(sel, 1 - cfg.p, 0.0)[..., None]
    gain = torch.where(sel, (1 - cfg.p) * sink_mass / base.clamp_min(1e-30), 0.0)[..., None]
    new = out.float() - drop * o_s + gain * o_n
    return new.to(query.dtype).transpose(1, 2).contiguous()


def _discover_dims(adapter, cfg: VAR, layers: list[int]) -> tuple[int, ...]:
    tok = adapter.tokenizer
    ids = tok(CALIBRATION_TEXT, return_tensors="pt").input_ids.to(adapter.device)
    lm = adapter.model.model.language_model
    with torch.no_grad():
        hs = lm(input_ids=ids, output_hidden_states=True).hidden_states
    found: set[int] = set()
    for layer in layers:
        x = hs[layer].float()[0]
        ratio = x.abs() / x.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-12)
        found |= set(torch.nonzero((ratio >= cfg.tau).any(0)).flatten().tolist())
    return tuple(sorted(found))


def _extend(old: torch.Tensor | None, new: torch.Tensor, past: int) -> torch.Tensor:
    """Flags of the keys a call attends to: the cached ones (``past``; a cache cropped back, as
    candidate scoring does, drops the rest) followed by the call's own."""
    if not past or old is None:
        return new
    return torch.cat([old[:, :past], new], 1)


def check_dims(adapter, config: VAR) -> None:
    """Refuse ``config.sink_dims`` past the width of ``adapter``'s LLM (one line naming the dimension)."""
    width = adapter.llm.hidden_size
    bad = [d for d in config.sink_dims or () if not -width <= d < width]
    if bad:
        raise SinkscopeError(f"VAR sink_dims {bad[0]}: the LLM's hidden states have {width} dimensions (0 .. {width - 1})")


@contextmanager
def var(adapter, config: VAR | None = None, record: bool = False):
    """Apply VAR to a LLaVA-style ``adapter`` inside the ``with`` block (see the module docstring);
    everything is undone on exit, normal or not."""
    from ..capture.attention import ATTN_IMPL, _set_attn_impl

    cfg = config or VAR()
    if getattr(adapter, "family", None) != "llava":
        raise SinkscopeError(f"model {adapter.name!r}: VAR needs a LLaVA-style model (image tokens in the LLM input)")
    blocks = adapter.llm.blocks()
    n = len(blocks)
    layers = [layer for layer in range(cfg.start_layer, n - 1)]
    if not layers:
        raise SinkscopeError(f"VAR start_layer {cfg.start_layer}: the LLM has {n} layers and VAR skips the last")
    check_dims(adapter, cfg)
    live = VARLive(adapter, cfg, record)
    if not live.sink_dims:
        live.sink_dims = _discover_dims(adapter, cfg, layers)
    model = adapter.model
    lm = model.model.language_model
    old_impl = lm.config._attn_implementation
    handles = []
    image_id = adapter.image_token_id

    def top(mod, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise SinkscopeError("VAR needs input_ids (the image tokens say which keys are visual)")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        live._past = 0 if cache is None else int(cache.get_seq_length())
        live.key_image = _extend(live.key_image, ids == image_id, live._past)

    def layer_hook(layer):
        def pre(mod, args, kwargs):
            h = kwargs.get("hidden_states", args[0] if args else None)
            if live.sink_dims and not live._past:  # the prefill: the prompt's sinks
                flags = phi(h, live.sink_dims) >= cfg.tau
            else:  # no sink dims, or tokens fed after the prefill (generated, scored): never sinks
                flags = torch.zeros(h.shape[:2], dtype=torch.bool)
            live.last_sinks[layer] = _extend(live.last_sinks.get(layer), flags.to(h.device), live._past)

        return pre

    try:
        handles.append(model.register_forward_pre_hook(top, with_kwargs=True))
        for layer in layers:
            handles.append(blocks[layer].register_forward_pre_hook(layer_hook(layer), with_kwargs=True))
            adapter.llm.attention(layer)._sinkscope_var = live.attention(layer)
        _set_attn_impl(lm, ATTN_IMPL)
        adapter._sinkscope_var_live = live
        yield live
    finally:
        vars(adapter).pop("_sinkscope_var_live", None)
        for h in handles:
            h.remove()
        for layer in layers:
            vars(adapter.llm.attention(layer)).pop("_sinkscope_var", None)
        _set_attn_impl(lm, old_impl)
