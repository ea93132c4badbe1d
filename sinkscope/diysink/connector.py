"""The DIYSink dual-MLP connector: one projector for the ViT's sink tokens, one for the others.

:class:`DualProjector` replaces a LLaVA model's ``multi_modal_projector``. It holds ``f_sink`` and
``f_nonsink``, each of the model's own projector class and initialised from its weights, plus
``base`` (a frozen copy of the original projector, so the baseline stays one switch away). Per
image it splits the projector's input (the tower's tokens at the fed layer) with a
:class:`~sinkscope.interventions.VisualSinkRule` and feeds the LLM

    ``[w_sink * f_sink(V_sink) ; w_nonsink * f_nonsink(V_nonsink)]``

sinks first, each group in ViT order. The number of visual tokens per image does not change, so a
batch with a different number of sinks per image, ``generate`` and several images per prompt run
through LLaVA's own forward unchanged. ``weights`` (a buffer, saved with the model) are
``[w_sink, w_nonsink]``; a router overrides them per image with :func:`routing`.

The rule runs on the projector's input, so it can only read what the projector sees: ``norm``
(absolute, relative or automatic), ``topk`` (by norm) and ``cls`` (``full`` select strategy), at
the fed layer. ``attention`` and rules at another layer need the tower's other outputs and raise.

:class:`DIYSinkConfig` (``model_type="diysink_llava"``) and
:class:`DIYSinkForConditionalGeneration` make the dual model an ordinary transformers model:
``save_pretrained`` writes it, ``sinkscope.load_model(DIR)`` loads it, and plain transformers
loads it after one call to :func:`register`::

    import sinkscope.diysink, transformers
    sinkscope.diysink.register()
    model = transformers.AutoModelForImageTextToText.from_pretrained(DIR)

>>> import numpy as np
>>> from sinkscope import load_model
>>> ad = load_model("tiny-llava")
>>> inp = ad.build_inputs([np.zeros((32, 32, 3), np.uint8)], "<image> What is in the picture?")
>>> before = ad.model(**inp).logits
>>> dual = make_dual(ad, rule="topk:2")      # in place: both MLPs copies of the projector, weights 1
>>> type(ad.model.model.multi_modal_projector).__name__, ad.model.config.model_type
('DualProjector', 'diysink_llava')
>>> with routing(ad, mode="base"):           # the original projector, as before
...     bool(torch.allclose(ad.model(**inp).logits, before, atol=1e-5))
True
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._utils import SinkscopeError
from ..interventions.rules import VisualSinkRule, default_rule, rule_from

MODEL_TYPE = "diysink_llava"
#: how a route feeds the visual tokens: ``dual`` (both groups, sinks first), ``sink-only`` /
#: ``nonsink-only`` (one group: a different number of tokens, for training and ``apply_tokens``),
#: ``base`` (the original projector on every token, in ViT order)
ROUTE_MODES = ("dual", "sink-only", "nonsink-only", "base")
#: how a router's two raw outputs become ``[w_sink, w_nonsink]``
NORMALISATIONS = ("x2-softmax", "softmax", "sigmoid")


@dataclass
class Route:
    """The live setting of a :class:`DualProjector` (see :func:`routing`)."""

    mode: str = "dual"
    weights: torch.Tensor | None = None  # [images, 2] or [2]; None: the saved weights
    vit_order: bool = False  # keep ViT order instead of sinks first (for apply_tokens)


class DualProjector(nn.Module):
    """``f_sink`` / ``f_nonsink`` / ``base`` copies of ``projector`` and the sink ``rule`` (see the
    module docstring). ``has_cls``: the first input token is CLS (``full`` select strategy).

    >>> proj = nn.Sequential(nn.Linear(4, 3))
    >>> dual = DualProjector(proj, rule="topk:1")
    >>> x = torch.tensor([[[1.0, 0, 0, 0], [9.0, 0, 0, 0], [2.0, 0, 0, 0]]])
    >>> dual.sink_mask(x).tolist()
    [[False, True, False]]
    >>> bool(torch.equal(dual(x), proj(x)[:, [1, 0, 2]]))     # sinks first, same MLP: a reordering
    True
    """

    def __init__(self, projector: nn.Module, rule: Any = None, has_cls: bool = False, weights=(1.0, 1.0)):
        super().__init__()
        self.rule = check_rule(rule_from(rule), has_cls)
        self.has_cls = bool(has_cls)
        self.f_sink = copy.deepcopy(projector)
        self.f_nonsink = copy.deepcopy(projector)
        self.base = copy.deepcopy(projector)
        for p in self.base.parameters():
            p.requires_grad_(False)
        w = torch.as_tensor(weights, dtype=torch.float32)
        if w.shape != (2,):
            raise SinkscopeError(f"weights: two numbers [w_sink, w_nonsink], got {list(w.shape)}")
        self.register_buffer("weights", w)
        self.route = Route()

    def sink_mask(self, x: torch.Tensor) -> torch.Tensor:
        """``[images, tokens]`` booleans: which input tokens are sinks under the rule."""
        x3 = x if x.dim() == 3 else x[None]
        norms = x3.detach().float().norm(dim=-1)
        return self.rule.mask(norms, has_cls=self.has_cls).to(x.device)

    def _weights(self, n_images: int, device, dtype) -> torch.Tensor:
        w = self.route.weights if self.route.weights is not None else self.weights
        w = w.to(device=device, dtype=dtype)
        w = w.expand(n_images, 2) if w.dim() == 1 else w
        if w.shape != (n_images, 2):
            raise SinkscopeError(f"routing weights for {w.shape[0]} images, but the projector got {n_images}")
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode = self.route.mode
        if mode == "base":
            return self.base(x)
        x3 = x if x.dim() == 3 else x[None]
        B, N, _ = x3.shape
        sink = self.sink_mask(x3)
        rows = torch.arange(B, device=x3.device)[:, None].expand(B, N)
        w = self._weights(B, x3.device, x3.dtype)
        parts = []
        if mode in ("dual", "sink-only"):
            parts.append((sink, self.f_sink, 0))
        if mode in ("dual", "nonsink-only"):
            parts.append((~sink, self.f_nonsink, 1))
        if mode not in ROUTE_MODES:
            raise SinkscopeError(f"route mode {mode!r}: expected one of {', '.join(ROUTE_MODES)}")
        out = None
        for sel, f, j in parts:
            # each MLP runs on every token and its group is picked after: the same matmul shapes as the
            # original projector, so a dual connector of two copies equals it bit for bit (one token alone
            # - a CLS sink - would round differently, and 30 LLM layers amplify a 5e-7 difference to 7e-4)
            y = f(x3)[sel] * w[rows[sel], j][:, None]
            if out is None:
                out = y.new_zeros(B, N, y.shape[-1])
            out = out.index_put((rows[sel], torch.nonzero(sel)[:, 1]), y)
        if mode == "dual":
            if not self.route.vit_order:  # sinks first, each group in ViT order
                order = torch.argsort((~sink).to(torch.int8), dim=1, stable=True)
                out = out.gather(1, order[..., None].expand_as(out))
        else:
            keep = sink if mode == "sink-only" else ~sink
            counts = keep.sum(1)
            if B > 1 and bool((counts != counts[0]).any()):
                raise SinkscopeError(f"{mode}: the images have {counts.tolist()} tokens; run them one at a time")
            out = out[keep].reshape(B, int(counts[0]) if B else 0, out.shape[-1])
        return out if x.dim() == 3 else out[0]


def check_rule(rule: VisualSinkRule, has_cls: bool) -> VisualSinkRule:
    """``rule`` if the connector can apply it to its own input, else a one-line error."""
    if rule.method == "attention":
        raise SinkscopeError(
            "the dual connector sees only the projector's input: the attention rule needs the tower's "
            "attention (use norm, topk or cls)"
        )
    if rule.layer is not None:
        raise SinkscopeError(
            f"the dual connector reads norms at the fed layer only; the rule asks for layer {rule.layer}"
        )
    if rule.method == "cls" and not has_cls:
        raise SinkscopeError("sink rule cls: the model's select strategy drops CLS (use 'full')")
    return rule


def _config_class():
    import transformers as T

    class DIYSinkConfig(T.LlavaConfig):
        """A ``LlavaConfig`` whose model has the dual connector; ``diysink`` holds its settings
        (``rule``, ``has_cls``, ``router_norm``, ``history``)."""

        model_type = MODEL_TYPE

    return DIYSinkConfig


def _model_class(config_cls):
    import transformers as T

    class DIYSinkForConditionalGeneration(T.LlavaForConditionalGeneration):
        """``LlavaForConditionalGeneration`` with a :class:`DualProjector` as its projector."""

        config_class = config_cls

        def __init__(self, config):
            super().__init__(config)
            d = dict(getattr(config, "diysink", None) or {})
            self.model.multi_modal_projector = DualProjector(
                self.model.multi_modal_projector, rule=d.get("rule"), has_cls=bool(d.get("has_cls"))
            )

    return DIYSinkForConditionalGeneration


DIYSinkConfig = _config_class()
DIYSinkForConditionalGeneration = _model_class(DIYSinkConfig)
_registered = False


def register() -> None:
    """Teach transformers' auto classes the ``diysink_llava`` model type (``AutoConfig``,
    ``AutoModelForImageTextToText``, ``AutoModel``); idempotent. ``sinkscope.load_model`` calls it.

    >>> register()
    >>> import transformers as T
    >>> T.AutoConfig.for_model("diysink_llava").__class__.__name__
    'DIYSinkConfig'
    """
    global _registered
    if _registered:
        return
    import transformers as T

    T.AutoConfig.register(MODEL_TYPE, DIYSinkConfig, exist_ok=True)
    T.AutoModelForImageTextToText.register(DIYSinkConfig, DIYSinkForConditionalGeneration, exist_ok=True)
    # LLaVA's key renamings (a plain LlavaForConditionalGeneration.save_pretrained writes the legacy
    # layout: ``language_model.lm_head.weight``, ``language_model.model.*``, ...) go with the model
    # type, so the dual model needs them under its own type; without them an untied LM head (Vicuna
    # in LLaVA-1.5) does not land and is initialised at random
    from transformers.conversion_mapping import (
        get_checkpoint_conversion_mapping,
        register_checkpoint_conversion_mapping,
    )

    if get_checkpoint_conversion_mapping(MODEL_TYPE) is None:
        register_checkpoint_conversion_mapping(MODEL_TYPE, get_checkpoint_conversion_mapping("llava"))
    _registered = True


def dual_projector(model: Any) -> DualProjector:
    """The :class:`DualProjector` of ``model`` (itself, an adapter or a transformers model), else an error."""
    if isinstance(model, DualProjector):
        return model
    m = getattr(model, "model", model)
    inner = getattr(m, "model", m)
    proj = getattr(inner, "multi_modal_projector", None)
    if not isinstance(proj, DualProjector):
        name = getattr(model, "name", type(m).__name__)
        raise SinkscopeError(f"model {name!r} has no dual connector (build one with sinkscope diysink init)")
    return proj


def is_dual(model: Any) -> bool:
    """Whether ``model`` (adapter or transformers model) carries a :class:`DualProjector`."""
    try:
        dual_projector(model)
    except SinkscopeError:
        return False
    return True


def make_dual(adapter, rule: Any = None, weights=(1.0, 1.0)) -> DualProjector:
    """Give the LLaVA model of ``adapter`` a dual connector, in place: ``f_sink`` and ``f_nonsink``
    start as copies of its projector (so with weights 1 the model equals the original under
    ``sinks-front``), the config becomes a :class:`DIYSinkConfig`. ``rule``: a sink rule (default:
    the interventions' :func:`~sinkscope.interventions.default_rule`). Returns the connector."""
    if getattr(adapter, "family", None) != "llava":
        raise SinkscopeError(f"model {getattr(adapter, 'name', adapter)!r}: the dual connector needs a LLaVA-style model")
    if is_dual(adapter):
        raise SinkscopeError(f"model {adapter.name!r} already has a dual connector")
    why = "given"
    if rule is None:
        rule, why = default_rule(adapter)
    has_cls = adapter.select_strategy == "full"
    m = adapter.model
    old = m.model.multi_modal_projector
    dual = DualProjector(old, rule=rule, has_cls=has_cls, weights=weights)
    from ..interventions.tokens import check_rule

    check_rule(adapter, dual.rule)  # a layer past the ViT, or every fed token a sink: one line, nothing changed
    p = next(old.parameters())
    dual.to(device=p.device, dtype=p.dtype)
    dual.weights.data = dual.weights.data.float()
    settings = {"rule": dual.rule.to_dict(), "rule_description": dual.rule.describe(), "rule_reason": why,
                "has_cls": has_cls, "router_norm": "x2-softmax", "history": [{"step": "init", "from": adapter.name}]}  # fmt: skip
    cfg = m.config.to_dict()
    cfg.pop("model_type", None)
    cfg.pop("diysink", None)
    new_cfg = DIYSinkConfig(**cfg, diysink=settings)
    for attr in ("_attn_implementation_internal",):
        if hasattr(m.config, attr):
            setattr(new_cfg, attr, getattr(m.config, attr))
    m.model.multi_modal_projector = dual
    m.__class__ = DIYSinkForConditionalGeneration
    m.config = new_cfg
    m.model.config = new_cfg
    adapter.projector = dual
    return dual


@contextlib.contextmanager
def routing(model: Any, mode: str = "dual", weights: torch.Tensor | None = None, vit_order: bool = False):
    """Run the dual connector of ``model`` under another route for the block (always undone):
    ``mode`` (:data:`ROUTE_MODES`), ``weights`` (``[2]`` or ``[images, 2]``, e.g. a router's
    output; gradients flow through them) and ``vit_order`` (keep ViT order; the token
    interventions select and reorder on top of it). ``sink-only`` / ``nonsink-only`` return fewer
    tokens than the prompt has image placeholders, so they serve the projector called directly (as
    training does); a whole model answers with one group through ``sinkscope eval --variant
    dual-sink-only`` (the token interventions drop the other group's placeholders).

    >>> from sinkscope import load_model
    >>> ad = load_model("tiny-llava"); _ = make_dual(ad, rule="topk:2")
    >>> with routing(ad, mode="sink-only"):
    ...     ad.projector(torch.randn(1, 16, 64)).shape
    torch.Size([1, 2, 64])
    """
    proj = dual_projector(model)
    if mode not in ROUTE_MODES:
        raise SinkscopeError(f"route mode {mode!r}: expected one of {', '.join(ROUTE_MODES)}")
    prev = proj.route
    proj.route = Route(mode, weights, vit_order)
    try:
        yield proj
    finally:
        proj.route = prev


def normalise_weights(raw: torch.Tensor, how: str = "x2-softmax") -> torch.Tensor:
    """A router's raw ``[..., 2]`` outputs as ``[w_sink, w_nonsink]``: ``softmax`` (sum 1),
    ``x2-softmax`` (sum 2, so equal weights are the untouched dual model's 1 and 1) or ``sigmoid``
    (each in 0..1).

    >>> normalise_weights(torch.zeros(2)).tolist()
    [1.0, 1.0]
    """
    if how == "softmax":
        return raw.softmax(-1)
    if how == "x2-softmax":
        return 2 * raw.softmax(-1)
    if how == "sigmoid":
        return raw.sigmoid()
    raise SinkscopeError(f"router normalisation {how!r}: expected one of {', '.join(NORMALISATIONS)}")


def save_dual(adapter, out) -> None:
    """``save_pretrained`` of the dual model and its processor (or tokenizer and image processor)
    into ``out``, so ``sinkscope.load_model(out)`` loads it back."""
    from pathlib import Path

    import transformers as T

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    T.utils.logging.disable_progress_bar()
    try:
        adapter.model.save_pretrained(str(out))
    finally:
        T.utils.logging.enable_progress_bar()
    proc = adapter.processor
    if proc is not None and hasattr(proc, "save_pretrained"):
        proc.save_pretrained(str(out))
    else:  # sinkscope's tiny models hold the parts: save them as a LlavaProcessor
        vis = adapter.vision
        image_proc = vis.processor
        if not isinstance(image_proc, T.ImageProcessingMixin):  # mean/std only: a fixed-size CLIP processor
            h, w = vis.image_size
            image_proc = T.CLIPImageProcessor(
                size={"height": h, "width": w}, crop_size={"height": h, "width": w}, do_center_crop=False,
                image_mean=image_proc.image_mean, image_std=image_proc.image_std,
            )  # fmt: skip
        cfg = adapter.model.config
        llp = T.LlavaProcessor(
            image_processor=image_proc, tokenizer=adapter.tokenizer,
            patch_size=getattr(cfg.vision_config, "patch_size", None),
            num_additional_image_tokens=1 if cfg.vision_feature_select_strategy == "default" else 0,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy, image_token="<image>",
        )  # fmt: skip
        llp.save_pretrained(str(out))


register()

__all__ = [
    "DIYSinkConfig",
    "DIYSinkForConditionalGeneration",
    "DualProjector",
    "MODEL_TYPE",
    "NORMALISATIONS",
    "ROUTE_MODES",
    "Route",
    "check_rule",
    "dual_projector",
    "is_dual",
    "make_dual",
    "normalise_weights",
    "register",
    "routing",
    "save_dual",
]
