"""The :class:`Capture` context: reducing hooks on a model, installed and always removed.

Hooks on the blocks reduce the residual stream inside the forward pass - fp32 L2 norms, and with
``dims`` the largest |activations|, their channels, the RMS and the median - and keep full tensors
only for the layers named in ``keep``. Blocks whose attention is wanted get a query selection and
run :func:`~sinkscope.capture.attention.sinkscope_attention`, whose reduction the block's hook
collects. With ``stop_early`` the forward ends once the last needed layer is recorded.

>>> import numpy as np
>>> from sinkscope import load_model
>>> ad = load_model("tiny-dinov2")
>>> cap = capture(ad, ad.prepare([np.zeros((32, 32, 3), np.uint8)]), layers=[0, 1])
>>> cap.layers, cap.norms.shape
([0, 1], torch.Size([1, 2, 17]))
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from .._utils import SinkscopeError
from ..models.base import Adapter, ModelInputs
from .attention import ATTN_IMPL, _set_attn_impl
from .result import BatchCapture
from .selection import _resolve, parse_layers


class StopForward(Exception):
    """Raised inside a hook to end the forward once every requested layer is captured."""


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

    >>> import numpy as np
    >>> from sinkscope import load_model
    >>> ad = load_model("tiny-dinov2")
    >>> batch = ad.prepare([np.zeros((32, 32, 3), np.uint8)])
    >>> with Capture(ad, layers=[0, 2], attention=[1]) as cap:
    ...     result = cap.run(batch)
    >>> result.layers, result.norms.shape, sorted(result.attn_received)
    ([0, 2], torch.Size([1, 2, 17]), [1])
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
        # sqrt(x.x), not x.norm(): the norm kernel's per-thread temporaries, freed between the
        # small results kept here, fragment glibc's heap (+170 MB peak on a ViT-L/14-336 batch)
        stats = {"norm": torch.linalg.vecdot(x, x).sqrt()}
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

        >>> from sinkscope import load_model
        >>> lm = load_model("tiny-llama")
        >>> inputs = lm.prepare(["hello world"]).tensors
        >>> with Capture(lm, layers=None, attention="all") as c:
        ...     cap = c.run_fn(lambda: lm.model.generate(**inputs, max_new_tokens=4, do_sample=False))
        >>> sorted(cap.attn_received), cap.attn_received[0].shape   # keys: the prompt + 3 new tokens
        ([0, 1, 2, 3], torch.Size([1, 6]))
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


def capture(adapter: Adapter, inputs: ModelInputs, **kwargs) -> BatchCapture:
    """One-shot :class:`Capture` over a single prepared batch (hooks removed afterwards).

    >>> import numpy as np
    >>> from sinkscope import load_model
    >>> ad = load_model("tiny-dinov2")
    >>> images = [np.zeros((32, 32, 3), np.uint8)] * 2
    >>> cap = capture(ad, ad.prepare(images), layers="all", attention="all")
    >>> cap.norms.shape, len(cap.attn_received)
    (torch.Size([2, 5, 17]), 4)
    """
    with Capture(adapter, **kwargs) as cap:
        return cap.run(inputs)
