"""Hook contexts and in-hook reducers: bounded-memory capture of the residual stream and attention.

The hooks reduce inside the forward pass - L2 norms in fp32, the largest |activations| and their
channels, the attention each key token receives - so memory is bounded by the batch, never by the
number of layers x tokens x tokens. Full tensors are kept only for layers you name.

Layer convention: layer ``i`` is ``hidden_states[i]`` of the Hugging Face model (``0`` = input of
the first block). Attention statistics are indexed by *block*: block ``i`` reads layer ``i``, so
``attention_received`` at layer ``i`` is what block ``i``'s attention gives each token (the last
layer has none). This is HF's ``attentions[i]``.

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
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ._utils import SinkscopeError
from .models.base import Adapter, ModelInputs

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
    rows are wanted, one eager pass gives both. Blocks without a selection run plain SDPA.
    Extras an eager function does not ignore (soft-capping, learned sinks, head masks) fall back
    to the module's own eager function, reduced the same way.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    sel = getattr(module, "_sinkscope_sel", None)
    extras = {k for k, v in kwargs.items() if v is not None and k not in _IGNORED_KW}
    if sel is None and not extras:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    B, H, Q, D = query.shape
    keep = getattr(module, "_sinkscope_keep", False)
    qm = sel(B, Q) if sel is not None else None  # [batch, query] weights (1 = this query counts)
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


class StopForward(Exception):
    """Raised inside a hook to end the forward once every requested layer is captured."""


def _resolve(sel, n: int, what: str) -> list[int]:
    """Turn ``None``/``"all"``/int/list (negatives allowed) into sorted indices in ``[0, n)``."""
    if sel is None or sel == "all":
        return list(range(n))
    if isinstance(sel, int):
        sel = [sel]
    out = set()
    for i in sel:
        j = int(i) + n if int(i) < 0 else int(i)
        if not 0 <= j < n:
            raise SinkscopeError(f"{what} {i} is out of range: the model has {what}s 0..{n - 1}")
        out.add(j)
    return sorted(out)


def parse_layers(spec: str | Sequence[int] | None, n_layers: int) -> list[int]:
    """Parse a layer selection such as ``"all"``, ``"0,3,5"``, ``"4:9"``, ``"-1"`` or ``[1, 2]``.

    Layers run ``0..n_layers`` (``0`` = embeddings).

    >>> parse_layers("1:4,-1", 12)
    [1, 2, 3, 12]
    """
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "all"):
        return list(range(n_layers + 1))
    if isinstance(spec, str) and not spec.strip():
        raise SinkscopeError("empty layer selection: use 'all', '0,3,5', '4:9' or '-3:'")
    if not isinstance(spec, str):
        return _resolve(list(spec), n_layers + 1, "layer")
    out: list[int] = []
    n = n_layers + 1
    for part in spec.split(","):
        part = part.strip()
        try:
            if ":" in part:
                a, b = part.split(":", 1)
                lo = int(a) if a.strip() else 0
                hi = int(b) if b.strip() else n
                lo, hi = (lo + n if lo < 0 else lo), (hi + n if hi < 0 else hi)
                if not (0 <= lo < n and 0 <= hi <= n):
                    # like a single layer out of range: an error, not silently cut to the model's depth
                    raise SinkscopeError(
                        f"layer range {part!r} reaches outside the model's layers 0..{n_layers} "
                        f"(a range end is exclusive: '{max(lo, 0)}:' runs to the last layer)"
                    )
                out.extend(range(lo, hi))
            else:
                out.append(int(part))
        except ValueError:
            raise SinkscopeError(
                f"bad layer selection {spec!r}: use e.g. 'all', '0,3,5', '4:9' or '-3:'"
            ) from None
    if not out:
        raise SinkscopeError(
            f"layer selection {spec!r} selects no layer (the model has layers 0..{n_layers})"
        )
    return _resolve(out, n_layers + 1, "layer")


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


class Capture:
    """Context manager that installs reducing hooks on an adapter's model and removes them on exit.

    Parameters
    ----------
    adapter: the model adapter.
    layers: residual-stream layers to reduce (norms etc.), ``"all"`` by default.
    attention: blocks whose attention-received statistic is computed (``None``/``()`` = none,
        ``"all"`` = every block), reduced inside the attention function.
    keep: layers whose full hidden states are kept (moved to CPU).
    keep_attention: blocks whose full attention maps ``[batch, head, query, key]`` are kept
        (moved to CPU; for rollout and relevance maps). Implies ``attention`` on those blocks.
    dims: also compute the top-|activation| channels, RMS and median (for the dims rule).
    mlp: blocks whose |MLP neuron activations| are kept (register-neuron search).
    mlp_reducer: ``fn(block, act)`` called inside the hook of each ``mlp`` block with its neuron
        activations ``[batch, tokens, neurons]`` (detached, on the model's device) *instead of*
        keeping them: an analysis reduces over a dataset here without installing hooks of its own.
    stop_early: end the forward after the last layer needed.

    >>> with Capture(ad, layers=[0, 2], attention=[1]) as cap:      # doctest: +SKIP
    ...     result = cap.run(batch)
    """

    def __init__(
        self,
        adapter: Adapter,
        layers: str | Sequence[int] | None = "all",
        attention: str | Sequence[int] | None = None,
        keep: Sequence[int] | None = None,
        dims: bool = False,
        mlp: Sequence[int] | None = None,
        topk: int = 4,
        stop_early: bool = True,
        keep_dtype: torch.dtype = torch.float32,
        keep_attention: str | Sequence[int] | None = None,
        mlp_reducer: Callable[[int, torch.Tensor], None] | None = None,
    ):
        self.adapter = adapter
        self.mlp_reducer = mlp_reducer
        L = adapter.n_layers
        self.layers = parse_layers(layers if layers != "all" else None, L) if layers is not None else []
        self.keep = parse_layers(list(keep), L) if keep else []
        self.attn_blocks = _resolve(attention, L, "block") if attention not in (None, (), []) else []
        self.keep_attn = _resolve(keep_attention, L, "block") if keep_attention not in (None, (), []) else []
        self.attn_blocks = sorted(set(self.attn_blocks) | set(self.keep_attn))
        self.mlp_blocks = _resolve(mlp, L, "block") if mlp not in (None, (), []) else []
        self.dims = dims
        self.topk = topk
        self.stop_early = stop_early
        self.keep_dtype = keep_dtype
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._restore: list[tuple[nn.Module, object]] = []
        self._sel_modules: list[tuple[nn.Module, object, object]] = []
        self._model_attn_impl: str | None = None
        self._mask: torch.Tensor | None = None
        self._qmask: torch.Tensor | None = None
        self._buf: dict = {}
        # the last layer whose hidden state (or block) we still need
        needed = set(self.layers) | set(self.keep) | {b + 1 for b in self.attn_blocks + self.mlp_blocks}
        self._last_needed = max(needed) if needed else 0

    # -- install / remove -------------------------------------------------------------------
    def __enter__(self) -> Capture:
        try:
            self._install()
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._remove()

    def _install(self) -> None:
        ad = self.adapter
        blocks = ad.blocks()
        L = len(blocks)
        wanted = set(self.layers) | set(self.keep)
        if 0 in wanted:
            self._handles.append(blocks[0].register_forward_pre_hook(self._layer0_hook, with_kwargs=True))
        for b in range(L):
            layer = b + 1
            use_norm = layer == L and ad.last_layer_normed and ad.final_norm() is not None
            if layer in wanted and not use_norm:
                self._handles.append(blocks[b].register_forward_hook(self._make_layer_hook(layer)))
            elif self.stop_early and layer == self._last_needed and layer != L:
                self._handles.append(blocks[b].register_forward_hook(self._make_stop_hook()))
        if L in wanted and ad.last_layer_normed and ad.final_norm() is not None:
            self._handles.append(ad.final_norm().register_forward_hook(self._make_layer_hook(L)))
        for b in self.attn_blocks:
            mod = ad.attention(b)
            self._handles.append(mod.register_forward_hook(self._make_attn_hook(b)))
            # a nested capture on the same block gets the block while it runs, then gives it back
            self._sel_modules.append(
                (mod, mod.__dict__.get("_sinkscope_sel"), mod.__dict__.get("_sinkscope_keep"))
            )
            mod._sinkscope_sel = lambda B, Q, _dev=ad.device: self._query_weights(B, Q, _dev)
            mod._sinkscope_keep = b in self.keep_attn
        for b in self.mlp_blocks:
            self._handles.append(ad.mlp_out(b).register_forward_pre_hook(self._make_mlp_hook(b)))
        if self.attn_blocks:
            self._enable_reducing_attention()

    def _enable_reducing_attention(self) -> None:
        """Switch attention to :func:`sinkscope_attention` (SDPA + in-kernel reduction) where needed.

        Vision encoders have no attention mask, so each block's attention module gets its own
        config copy. Decoder LMs build their mask for the model-wide implementation, so there the
        whole model is switched for the capture (blocks without a selection run plain SDPA) and
        switched back after.
        """
        ad = self.adapter
        if ad.last_layer_normed:  # decoder LM
            impl = ad.config._attn_implementation
            if impl != ATTN_IMPL:
                self._model_attn_impl = impl
                _set_attn_impl(ad.model, ATTN_IMPL)
            return
        for b in self.attn_blocks:
            mod = ad.attention(b)
            cfg = getattr(mod, "config", None)
            if cfg is None or cfg._attn_implementation == ATTN_IMPL:
                continue
            new = copy.copy(cfg)
            new._attn_implementation = ATTN_IMPL
            self._restore.append((mod, cfg))
            mod.config = new

    def _remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for mod, sel, keep in reversed(self._sel_modules):
            mod.__dict__.pop("_sinkscope_out", None)
            for name, prev in (("_sinkscope_sel", sel), ("_sinkscope_keep", keep)):
                if prev is None:
                    mod.__dict__.pop(name, None)
                else:
                    setattr(mod, name, prev)
        self._sel_modules.clear()
        for mod, cfg in self._restore:
            mod.config = cfg
        self._restore.clear()
        if self._model_attn_impl is not None:
            _set_attn_impl(self.adapter.model, self._model_attn_impl)
            self._model_attn_impl = None

    # -- hooks ------------------------------------------------------------------------------
    def _layer0_hook(self, module, args, kwargs):
        h = args[0] if args else kwargs.get("hidden_states")
        self._record_layer(0, h)
        if self.stop_early and self._last_needed == 0:
            raise StopForward

    def _make_layer_hook(self, layer: int):
        def hook(module, args, output):
            h = output[0] if isinstance(output, (tuple, list)) else output
            self._record_layer(layer, h)
            if self.stop_early and layer == self._last_needed and layer < self.adapter.n_layers:
                raise StopForward

        return hook

    def _make_stop_hook(self):
        def hook(module, args, output):
            raise StopForward

        return hook

    def _query_weights(self, B: int, Q: int, device) -> torch.Tensor:
        """``[batch, query]`` float weights of the queries whose attention counts in this call."""
        qm = self._qmask if self._qmask is not None and self._qmask.shape[1] == Q else None
        if qm is None and self._mask is not None and self._mask.shape[1] == Q:
            qm = self._mask
        if qm is None:  # every query counts (e.g. one new token per generation step)
            return torch.ones(B, Q, device=device)
        if qm.shape[0] != B:  # generate() expands the batch (beams, several sequences per prompt)
            if B % qm.shape[0]:
                raise SinkscopeError(f"batch of {B} in the forward, but masks for {qm.shape[0]} items")
            qm = qm.repeat_interleave(B // qm.shape[0], dim=0)
        return qm.to(device, torch.float32)

    def _make_attn_hook(self, block: int):
        def hook(module, args, output):
            if block in self.keep_attn:
                self._buf.setdefault("attn_maps", {})[block] = output[1].detach().to("cpu", torch.float32)
            reduced = module.__dict__.pop("_sinkscope_out", None)
            if reduced is not None:  # reduced inside sinkscope_attention
                recv, count, n_q = reduced
            else:
                w = output[1] if isinstance(output, (tuple, list)) and len(output) > 1 else None
                if w is None:
                    raise SinkscopeError(
                        f"block {block}: the attention module returned no weights (is it an eager-capable module?)"
                    )
                w = w.detach().float()  # [batch, head, query, key]
                qm = self._query_weights(w.shape[0], w.shape[2], w.device)
                recv, count, n_q = (w * qm[:, None, :, None]).sum(2), qm.sum(1), w.shape[2]
            # Which positions the keys are: a forward without cache sees keys 0..K-1 (K == queries);
            # a generate() step sees the cache plus its queries, and a sliding-window cache only the
            # last K of the positions seen so far - so the keys start at (positions seen - K).
            seen = self._buf.setdefault("attn_seen", {})
            K = recv.shape[-1]
            seen[block] = n_q if K == n_q else seen.get(block, 0) + n_q
            offset = max(0, seen[block] - K)
            # accumulate (sum over chosen queries, query count): a generate() call adds one entry per step
            self._buf.setdefault("attn_parts", {}).setdefault(block, []).append(
                (recv.detach().float().cpu(), count.float().cpu(), offset)
            )

        return hook

    def _make_mlp_hook(self, block: int):
        def hook(module, args):
            if self.mlp_reducer is not None:
                self.mlp_reducer(block, args[0].detach())
                return
            self._buf.setdefault("mlp", {})[block] = args[0].detach().abs().to("cpu", torch.float32)

        return hook

    def _record_layer(self, layer: int, h: torch.Tensor) -> None:
        if layer in self._buf.get("seen", set()):
            return
        self._buf.setdefault("seen", set()).add(layer)
        h = h.detach()
        if layer in self.keep:
            self._buf.setdefault("hidden", {})[layer] = h.to("cpu", self.keep_dtype, copy=True)
        if layer not in self.layers:
            return
        x = h.float()
        stats = {"norm": x.norm(dim=-1)}
        if self.dims:
            a = x.abs()
            vals, idx = a.topk(min(self.topk, a.shape[-1]), dim=-1)
            stats.update(top_vals=vals, top_dims=idx, rms=x.pow(2).mean(-1).sqrt())
            stats["median"] = _lower_median(a, self._mask)
        self._buf.setdefault("layers", {})[layer] = {k: v.cpu() for k, v in stats.items()}

    # -- run --------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, inputs: ModelInputs) -> BatchCapture:
        """Run one prepared batch through the model and return its reduced capture."""
        mask = inputs.attention_mask.to(self.adapter.device) if inputs.attention_mask is not None else None
        return self.run_fn(lambda: self.adapter.forward(inputs), attention_mask=mask)

    @torch.no_grad()
    def run_fn(
        self,
        fn,
        attention_mask: torch.Tensor | None = None,
        query_mask: torch.Tensor | None = None,
    ) -> BatchCapture:
        """Run any callable that drives the model (a LLaVA forward over a hooked vision tower,
        ``model.generate``, ...) and return the reduced capture of everything the hooks saw.

        ``attention_mask`` ``[batch, seq]`` marks valid tokens (padding); ``query_mask``
        ``[batch, seq]`` picks the queries whose attention is averaged (e.g. text tokens only).
        Calls whose query length differs from the masks (generation steps) count every query,
        and attention received is averaged over all queries of all calls.

        >>> with Capture(ad.llm, layers=None, attention="all") as c:          # doctest: +SKIP
        ...     cap = c.run_fn(lambda: ad.model.generate(**inputs, max_new_tokens=4))
        """
        if not self._handles and (self.layers or self.keep or self.attn_blocks or self.mlp_blocks):
            raise SinkscopeError("Capture.run() must be called inside `with Capture(...) as cap:`")
        self._buf = {}
        self._mask = attention_mask
        self._qmask = query_mask.to(self.adapter.device) if query_mask is not None else None
        try:
            fn()
        except StopForward:
            pass
        finally:
            self._mask = None
            self._qmask = None
        return self._assemble()

    def reset(self) -> None:
        """Forget what the hooks recorded (before a forward driven from outside, see :meth:`collect`)."""
        self._buf = {}

    def collect(self) -> BatchCapture:
        """The reduced capture of whatever ran since :meth:`reset` (e.g. a vision tower's hooks
        during a full LLaVA forward driven by another capture's :meth:`run_fn`)."""
        return self._assemble()

    def _assemble(self) -> BatchCapture:
        per = self._buf.get("layers", {})
        missing = [layer for layer in self.layers if layer not in per]
        if missing:
            raise SinkscopeError(f"layers {missing} were not reached by the forward pass")

        def stack(key):
            return torch.stack([per[layer][key] for layer in self.layers], dim=1) if self.layers else None

        heads = {}
        for b, parts in self._buf.get("attn_parts", {}).items():
            k_max = max(off + p.shape[-1] for p, _, off in parts)
            total = sum(torch.nn.functional.pad(p, (off, k_max - off - p.shape[-1])) for p, _, off in parts)
            count = sum(p[1] for p in parts)  # [batch]
            heads[b] = total / count.clamp_min(1)[:, None, None]
        cap = BatchCapture(
            layers=list(self.layers),
            norms=stack("norm") if self.layers else torch.empty(0),
            hidden=self._buf.get("hidden", {}),
            mlp_abs=self._buf.get("mlp", {}),
            attn_received_heads=heads,
            attn_received={b: v.mean(1) for b, v in heads.items()},
            attn_maps=self._buf.get("attn_maps", {}),
        )
        if self.dims and self.layers:
            cap.top_vals, cap.top_dims, cap.rms = stack("top_vals"), stack("top_dims"), stack("rms")
            cap.max_abs = cap.top_vals[..., 0]
            cap.median_abs = stack("median")
        return cap


def _lower_median(a: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Per-sample median of ``a`` ``[batch, tokens, dims]`` over the valid tokens (torch's lower
    median). On CPU through ``numpy.partition``, about 10x faster than ``torch.median``."""
    out = []
    for i in range(a.shape[0]):
        x = a[i] if mask is None or bool(mask[i].all()) else a[i][mask[i].bool()]
        if x.device.type == "cpu":
            flat = x.reshape(-1).numpy()
            k = (flat.size - 1) // 2
            out.append(torch.tensor(np.partition(flat, k)[k]))
        else:
            out.append(x.flatten().median())
    return torch.stack(out)


def _set_attn_impl(model: nn.Module, impl: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(impl)
    else:  # a bare sub-module: set it on its config
        model.config._attn_implementation = impl


def capture(adapter: Adapter, inputs: ModelInputs, **kwargs) -> BatchCapture:
    """One-shot :class:`Capture` over a single prepared batch (hooks removed afterwards).

    >>> cap = capture(ad, ad.prepare(images), layers="all", attention="all")   # doctest: +SKIP
    """
    with Capture(adapter, **kwargs) as cap:
        return cap.run(inputs)


def count_hooks(module: nn.Module) -> int:
    """Number of forward (pre-)hooks registered anywhere under ``module`` (for leak checks)."""
    n = 0
    for m in module.modules():
        n += len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
    return n


@contextmanager
def hooks(pairs: Iterable[tuple[nn.Module, object]], pre: bool = False):
    """Register plain forward (or pre-) hooks for the duration of a ``with`` block.

    >>> with hooks([(ad.blocks()[0], lambda m, a, o: print(o[0].shape))]):   # doctest: +SKIP
    ...     ad.forward(batch)
    """
    handles = []
    try:
        for mod, fn in pairs:
            handles.append(mod.register_forward_pre_hook(fn) if pre else mod.register_forward_hook(fn))
        yield handles
    finally:
        for h in handles:
            h.remove()


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
