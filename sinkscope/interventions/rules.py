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

Every command and function that marks ViT sinks takes one of these rules (a string of
:data:`RULE_GRAMMAR`, read by :func:`rule_from`) and, when given none, the model's
:func:`default_rule`: the automatic per-image gap, or the rule a built-in model declares.
:func:`resolve_rule` does that choice, :func:`rule_record` writes it (with the reason) into a
summary, and :meth:`VisualSinkRule.check_for` refuses, in one line, a rule an analysis cannot apply.

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

    @property
    def mode(self) -> str:
        """``absolute``, ``relative`` or ``auto`` (norm), ``top`` (topk, attention) or ``cls``."""
        if self.method == "norm":
            return "absolute" if self.threshold is not None else "relative" if self.relative is not None else "auto"
        return "cls" if self.method == "cls" else "top"

    def spec(self) -> str:
        """The short string :func:`rule_from` reads back (``norm:100``, ``topk:4@11``, ...).

        >>> VisualSinkRule("norm", relative=4.0).spec(), VisualSinkRule("cls").spec()
        ('norm:x4', 'cls')
        """
        if self.method == "norm":
            arg = f":{self.threshold:g}" if self.threshold is not None else f":x{self.relative:g}" if self.relative is not None else ""
        else:
            arg = f":{self.k}" if self.method in ("topk", "attention") else ""
        return f"{self.method}{arg}" + ("" if self.layer is None else f"@{self.layer}")

    def check_for(
        self,
        analysis: str,
        *,
        cls: bool = False,
        attention: bool = False,
        layer: int | None = None,
        n_layers: int = 0,
        every_layer: bool = False,
    ) -> VisualSinkRule:
        """This rule when ``analysis`` can apply it, else one line saying why not (before any model
        runs). ``cls``: the analysis' tokens include a CLS token it may mark; ``attention``: it
        measures the attention each ViT token receives; ``layer``: the ViT hidden state (of
        ``n_layers``) it reads the sinks at, so a rule naming another is refused (``None``: not
        checked here); ``every_layer``: it applies the rule at every layer it reads, so the rule
        may not name one.

        >>> VisualSinkRule("cls").check_for("flow redundancy")
        Traceback (most recent call last):
        ...
        sinkscope._utils.SinkscopeError: flow redundancy: the sink rule 'cls' names the CLS token, but flow redundancy marks sinks among the patches; use norm, norm:T, norm:xR or topk:K
        """
        use = "use norm, norm:T, norm:xR or topk:K"
        if self.method == "cls" and not cls:
            raise SinkscopeError(f"{analysis}: the sink rule 'cls' names the CLS token, but {analysis} marks sinks among the patches; {use}")
        if self.method == "attention" and not attention:
            raise SinkscopeError(
                f"{analysis}: the sink rule '{self.spec()}' needs the attention each ViT token receives, "
                f"which {analysis} does not measure; {use}"
            )
        if self.layer is not None and every_layer:
            raise SinkscopeError(
                f"{analysis}: applies the sink rule at every ViT layer it reads, so '{self.spec()}' cannot name "
                f"one; drop @{self.layer}"
            )
        if self.layer is not None and layer is not None and self.layer % (n_layers + 1) != layer % (n_layers + 1):
            raise SinkscopeError(
                f"{analysis}: reads the ViT sinks at layer {layer}, but the rule '{self.spec()}' names layer "
                f"{self.layer}; drop @{self.layer}"
            )
        return self

    def mask(self, norms: torch.Tensor, received: torch.Tensor | None = None, has_cls: bool = False) -> torch.Tensor:
        """``[images, fed tokens]`` booleans from the fed tokens' norms (and, for ``attention``, the
        attention they ``received``; ``has_cls``: the first fed token is CLS). Only ``cls`` marks
        the CLS token; every other rule marks sinks among the patches (so ``topk:4`` is the same 4
        patches whether or not a model also feeds CLS).

        >>> rule_from("topk:1").mask(torch.tensor([[9.0, 1.0, 3.0]]), has_cls=True).tolist()
        [[False, False, True]]
        """
        n_img, n = norms.shape
        out = torch.zeros(n_img, n, dtype=torch.bool)
        if self.method == "cls":
            if not has_cls:
                raise SinkscopeError("sink rule cls: the model's select strategy drops CLS (use 'full')")
            out[:, 0] = True
            return out
        if has_cls:  # the patches alone; CLS is never one of them
            out[:, 1:] = self.mask(norms[:, 1:], None if received is None else received[:, 1:])
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


def patch_mask(rule: VisualSinkRule, norms: Any) -> np.ndarray:
    """``[images, patches]`` booleans from the patch tokens' norms at one layer (numpy or torch,
    ``[images, patches]``) by a ``norm`` or ``topk`` rule, each image alone: the mask the analyses
    that mark sinks among the patches use (check the rule with :meth:`VisualSinkRule.check_for`).

    >>> patch_mask(rule_from("topk:1"), np.array([[1.0, 3.0, 2.0], [5.0, 1.0, 1.0]])).tolist()
    [[False, True, False], [True, False, False]]
    """
    return rule.mask(torch.as_tensor(np.asarray(norms, dtype=np.float32))).numpy()


def rule_from(value: Any) -> VisualSinkRule:
    """A :class:`VisualSinkRule` from itself, its dict, a short string - ``norm``, ``norm:100``
    (absolute), ``norm:x4`` (relative), ``topk:4``, ``attention:4``, ``cls``; ``@L`` adds the layer
    (:meth:`VisualSinkRule.spec` writes it back) - or a :class:`~sinkscope.sinks.rules.NormRule`
    with a threshold, a relative threshold or the default automatic parameters per image.

    >>> rule_from("topk:4@11")
    VisualSinkRule(method='topk', threshold=None, relative=None, k=4, layer=11)
    >>> rule_from("norm:x3").relative
    3.0
    >>> rule_from(NormRule(threshold=100)).spec()
    'norm:100'
    """
    if value is None:
        return VisualSinkRule()
    if isinstance(value, VisualSinkRule):
        return value
    if isinstance(value, NormRule):
        return _from_norm_rule(value)
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
        raise SinkscopeError(f"sink rule {value!r}: expected {RULE_GRAMMAR}") from None
    return VisualSinkRule(**kw)


#: the short rule strings :func:`rule_from` reads (every command's ``--sink-rule``)
RULE_GRAMMAR = "norm, norm:100, norm:x4, topk:4, attention:4 or cls, optionally with @LAYER"


def _from_norm_rule(rule: NormRule) -> VisualSinkRule:
    """The per-image rule a :class:`NormRule` stands for; its automatic mode converts only with the
    default gap parameters (the per-image gap of :class:`VisualSinkRule` uses those)."""
    if rule.mode == "auto" and rule.auto_scope != "image":
        raise SinkscopeError(
            "a NormRule whose automatic gap pools the images of a layer (auto_scope='layer') is not a "
            "per-image norm rule: use NormRule(auto_scope='image') or the rule 'norm'"
        )
    if rule.mode == "auto":
        d = NormRule()
        if (rule.auto_gap, rule.auto_max_frac, rule.auto_min_ratio) != (d.auto_gap, d.auto_max_frac, d.auto_min_ratio):
            raise SinkscopeError(
                "a NormRule with its own automatic-gap parameters has no per-image ViT sink rule; "
                "give a threshold (norm:T), a relative one (norm:xR) or the default gap (norm)"
            )
    return VisualSinkRule("norm", threshold=rule.threshold, relative=rule.relative)


def _declared(adapter) -> tuple[str, str] | None:
    """The ``(rule, reason)`` a built-in model declares: the ``declared_sink_rule`` its builder set
    on the adapter (or on a LLaVA's tower), else the entry of
    :data:`~sinkscope.models.real.DECLARED_SINK_RULES` for its embedded name."""
    from ..models.real import DECLARED_SINK_RULES

    for obj in (adapter, getattr(adapter, "vision", None)):
        found = getattr(obj, "declared_sink_rule", None) if obj is not None else None
        if found:
            return found
    return DECLARED_SINK_RULES.get(str(getattr(adapter, "name", "")))


def default_rule(adapter, cls: bool = True) -> tuple[VisualSinkRule, str]:
    """The ViT sink rule every command and function uses for ``adapter`` when none is given, and why.

    The automatic norm gap of each image (:class:`~sinkscope.sinks.rules.NormRule`'s gap search per
    image: an image whose norms show no clear gap has no sink, and the run says so), unless the
    model is a built-in one that declares its own rule: ``mini-llava`` and ``mini-llava-untrained``
    declare ``cls`` - DINOv2-S's one sink, its CLS token, which they feed to the LLM (issue 26;
    :data:`~sinkscope.models.real.MINI_LLAVA_SINK_RULE`) - and ``dinov2-small`` the ``topk:4``
    surrogate, since DINOv2-S has no norm outliers among its patches
    (:data:`~sinkscope.models.real.DINOV2_SMALL_SINK_RULE`). ``cls=False``: the analysis marks
    sinks among the patches only, so a declared ``cls`` gives way to the model's declared patch
    rule (mini-llava: ``topk:4``), and the reason says so. A user's checkpoint - a DINOv2-L with
    real outliers included - gets the automatic gap.

    >>> from sinkscope import load_model
    >>> default_rule(load_model("tiny-llava"))[0].spec()
    'norm'
    """
    declared = _declared(adapter)
    if declared is not None:
        spec, why, *patch = declared
        name = getattr(adapter, "name", "the model")
        if rule_from(spec).method == "cls" and not cls and patch:
            p_spec, p_why = patch[0]
            return rule_from(p_spec), (
                f"declared by the built-in model {name} for analyses that mark sinks among the patches "
                f"(its default rule, cls, names the CLS token, which this analysis does not mark): {p_why}"
            )
        return rule_from(spec), f"declared by the built-in model {name}: {why}"
    return VisualSinkRule("norm"), DEFAULT_REASON


#: why :func:`default_rule` gives the automatic gap
DEFAULT_REASON = "no rule given and the model declares none: the default (an image whose norms show no clear gap has no sink)"


def given_rule(
    sink_rule: Any = None, threshold: float | None = None, relative: float | None = None, k: int | None = None
) -> Any:
    """The ViT sink rule a command was given: ``sink_rule``, or one of its old spellings - an absolute
    ``threshold`` (``norm:T``), a ``relative`` one (``norm:xR``) or a top-``k`` count (``topk:K``);
    ``None`` when none was (then :func:`resolve_rule` takes the model's default).

    >>> given_rule(threshold=100.0), given_rule("topk:4"), given_rule(k=2), given_rule()
    ('norm:100', 'topk:4', 'topk:2', None)
    """
    named = [v for v in (sink_rule, threshold, relative, k) if v is not None]
    if len(named) > 1:
        raise SinkscopeError(
            "give one ViT sink rule: a sink rule (norm:T, norm:xR, topk:K, ...) or one of its old spellings "
            "(a threshold, a relative threshold, a top-k count)"
        )
    if threshold is not None:
        return VisualSinkRule("norm", threshold=float(threshold)).spec()
    if relative is not None:
        return VisualSinkRule("norm", relative=float(relative)).spec()
    if k is not None:
        return VisualSinkRule("topk", k=int(k)).spec()
    return sink_rule


def resolve_rule(adapter, given: Any = None, cls: bool = True) -> tuple[VisualSinkRule, str]:
    """The rule an entry point runs with: ``given`` (anything :func:`rule_from` reads), else the
    model's :func:`default_rule` (``cls=False``: for an analysis that marks sinks among the patches
    only); and why.

    >>> from sinkscope import load_model
    >>> resolve_rule(load_model("tiny-llava"), "norm:100")
    (VisualSinkRule(method='norm', threshold=100.0, relative=None, k=None, layer=None), 'given')
    """
    if given is None:
        return default_rule(adapter, cls=cls)
    return rule_from(given), "given"


def rule_record(rule: VisualSinkRule, reason: str) -> dict[str, Any]:
    """How a summary records the ViT sink rule a run used: its string (``spec``), ``method``,
    ``mode``, ``description``, ``reason`` (why this rule), ``threshold`` as ``{"kind", "value"}``,
    ``surrogate`` (a stand-in, not an outlier criterion) and every field under ``params``.

    >>> r = rule_record(rule_from("norm:100"), "given")
    >>> r["spec"], r["threshold"], r["surrogate"]
    ('norm:100', {'kind': 'absolute', 'value': 100.0}, False)
    """
    value = {"norm": rule.threshold if rule.threshold is not None else rule.relative}.get(rule.method, rule.k)
    return {
        "spec": rule.spec(),
        "method": rule.method,
        "mode": rule.mode,
        "description": rule.describe(),
        "reason": reason,
        "threshold": {"kind": rule.mode, "value": value},
        "surrogate": rule.method == "topk",
        "params": rule.to_dict(),
    }
