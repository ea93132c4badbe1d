"""Which of an image's visual tokens are its ViT sinks: :class:`VisualSinkRule`.

The interventions need one decision per fed ViT token (sink or not), made per image so an image's
sinks never depend on the other images of its batch. The rule reads the tower's hidden state at
``layer`` (``None``: the layer LLaVA feeds to the projector) at the tokens the select strategy feeds:

- ``norm`` with ``threshold``: L2 norm >= threshold (the paper: 100 for CLIP ViT-L/14-336);
- ``norm`` with ``relative``: norm >= relative x the image's median fed-token norm;
- ``norm`` with neither: the automatic gap rule of :class:`~sinkscope.sinks.rules.NormRule`, per
  image, with its defaults (a gap of 2x, the upper group at most 10% of the tokens and 4x the median);
- ``topk``: the ``k`` highest-norm tokens of each image (a surrogate where no token stands out);
- ``attention``: the ``k`` tokens receiving the most attention at ViT block ``layer`` (mean over
  heads and query tokens), the attention-sink reading;
- ``cls``: the CLS token alone (needs the ``full`` select strategy, which feeds it).

>>> VisualSinkRule("norm", threshold=100).describe()
'ViT sinks: L2 norm >= 100 at the fed layer'
>>> VisualSinkRule("topk", k=4, layer=11).describe()
'ViT sinks: the 4 highest-norm tokens of each image at ViT layer 11 (a surrogate, not an outlier criterion)'
>>> VisualSinkRule("norm").mask(torch.tensor([[1.0, 1.1, 0.9, 9.0, 1.0, 1.2, 1.0, 0.8]])).tolist()
[[False, False, False, True, False, False, False, False]]
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from .._utils import SinkscopeError
from ..sinks.rules import NormRule

RULE_METHODS = ("norm", "topk", "attention", "cls")


@dataclass(frozen=True)
class VisualSinkRule:
    """A per-image sink rule for the visual tokens (see the module docstring)."""

    method: str = "norm"
    threshold: float | None = None
    relative: float | None = None
    k: int | None = None
    layer: int | None = None

    def __post_init__(self):
        if self.method not in RULE_METHODS:
            raise SinkscopeError(f"sink rule method {self.method!r}: expected one of {', '.join(RULE_METHODS)}")
        if self.method in ("topk", "attention") and (not isinstance(self.k, int) or self.k < 1):
            raise SinkscopeError(f"sink rule {self.method}: needs k >= 1 tokens per image, got {self.k!r}")
        if self.method == "norm":
            NormRule(threshold=self.threshold, relative=self.relative)  # validates the numbers

    def describe(self) -> str:
        where = "at the fed layer" if self.layer is None else f"at ViT layer {self.layer}"
        if self.method == "cls":
            return "ViT sinks: the CLS token (full select strategy)"
        if self.method == "topk":
            return f"ViT sinks: the {self.k} highest-norm tokens of each image {where} (a surrogate, not an outlier criterion)"
        if self.method == "attention":
            blk = "the last ViT block" if self.layer is None else f"ViT block {self.layer}"
            return f"ViT sinks: the {self.k} tokens receiving the most attention in {blk} (mean over heads and queries)"
        if self.threshold is not None:
            return f"ViT sinks: L2 norm >= {self.threshold:g} {where}"
        if self.relative is not None:
            return f"ViT sinks: L2 norm >= {self.relative:g} x the image's median {where}"
        return f"ViT sinks: automatic norm gap per image {where}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def mask(self, norms: torch.Tensor, received: torch.Tensor | None = None, has_cls: bool = False) -> torch.Tensor:
        """``[images, fed tokens]`` booleans from the fed tokens' norms (and, for ``attention``, the
        attention they ``received``; ``has_cls``: the first fed token is CLS)."""
        n_img, n = norms.shape
        out = torch.zeros(n_img, n, dtype=torch.bool)
        if self.method == "cls":
            if not has_cls:
                raise SinkscopeError("sink rule cls: the model's select strategy drops CLS (use 'full')")
            out[:, 0] = True
            return out
        if self.method in ("topk", "attention"):
            score = norms if self.method == "topk" else received
            if score is None:
                raise SinkscopeError("sink rule attention: no attention was measured")
            top = torch.topk(score.float(), min(self.k, n), dim=1).indices
            out.scatter_(1, top.cpu(), True)
            return out
        rule = NormRule(threshold=self.threshold, relative=self.relative, auto_scope="image")
        masks = rule.mask([np.asarray(r, dtype=np.float64) for r in norms.float().cpu().numpy()])
        return torch.as_tensor(np.stack(masks), dtype=torch.bool)


def rule_from(value: VisualSinkRule | dict | str | None) -> VisualSinkRule:
    """A :class:`VisualSinkRule` from itself, its dict, or a short string: ``norm``, ``norm:100``
    (absolute), ``norm:x4`` (relative), ``topk:4``, ``attention:4``, ``cls``; ``@L`` adds the layer.

    >>> rule_from("topk:4@11")
    VisualSinkRule(method='topk', threshold=None, relative=None, k=4, layer=11)
    >>> rule_from("norm:x3").relative
    3.0
    """
    if value is None:
        return VisualSinkRule()
    if isinstance(value, VisualSinkRule):
        return value
    if isinstance(value, dict):
        return VisualSinkRule(**value)
    text, _, layer = str(value).partition("@")
    method, _, arg = text.partition(":")
    kw: dict[str, Any] = {"method": method.strip()}
    try:
        if layer:
            kw["layer"] = int(layer)
        if arg and method in ("topk", "attention"):
            kw["k"] = int(arg)
        elif arg and arg.startswith("x"):
            kw["relative"] = float(arg[1:])
        elif arg:
            kw["threshold"] = float(arg)
    except ValueError:
        raise SinkscopeError(f"sink rule {value!r}: expected e.g. norm, norm:100, norm:x4, topk:4, attention:4, cls, with @LAYER") from None
    return VisualSinkRule(**kw)


def default_rule(adapter) -> tuple[VisualSinkRule, str]:
    """The rule an intervention uses when none is given, and why.

    A DINOv2 tower without registers has no norm outliers at the sizes sinkscope runs (DINOv2-S:
    the largest fed-token norm is at most 3.7x the image median; Darcet et al. see the artifacts in
    large ViTs only), so a norm rule would find no sink and ``sink-only`` would feed nothing: the
    ``k`` highest-norm tokens (about 1.5% of the fed tokens, the paper's 1-3% share, at least 1)
    stand in. Every other tower gets the automatic per-image norm gap.

    >>> from sinkscope import load_model
    >>> default_rule(load_model("tiny-llava"))[0].method
    'norm'
    """
    vision = getattr(adapter, "vision", adapter)
    if getattr(vision, "family", "") == "dinov2" and not getattr(vision, "n_registers", 0):
        import numpy as np

        lay = vision.prepare([np.zeros((64, 64, 3), np.uint8)]).layouts[0]  # the size the model is fed
        n_fed = len(adapter.fed_vit_tokens(lay.n_tokens))
        k = max(1, round(0.015 * n_fed))
        why = (
            f"DINOv2 without registers has no norm outliers (largest fed-token norm <= 3.7x the image median), "
            f"so the {k} highest-norm tokens of each image ({k / n_fed:.1%} of {n_fed}, the paper's 1-3% share) stand in"
        )
        return VisualSinkRule("topk", k=k), why
    return VisualSinkRule("norm"), "the automatic norm gap of each image (no threshold given)"
