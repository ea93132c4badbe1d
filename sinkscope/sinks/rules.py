"""The sink rules: :class:`NormRule`, :class:`AttentionRule`, :class:`DimsRule`, and their JSON form.

A rule is a frozen parameter set with a ``method`` (``norm``, ``attention``, ``dims``), a ``mode``
(``absolute``, ``relative``, ``auto``) and a ``describe()`` sentence for reports.
:func:`rule_to_dict` / :func:`rule_from_dict` turn rules into the JSON a scan summary stores and
back. The norm rule computes its own per-image thresholds (:meth:`NormRule.thresholds`, with the
automatic gap search :func:`auto_gap_threshold`); :func:`topk_for_exact_dims` says how many top
channels a scan must keep for the dims rule to stay exact.

>>> NormRule().mode, NormRule(threshold=100).describe()
('auto', 'norm: L2 norm >= 100 (absolute), patch/text tokens')
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from .._utils import SinkscopeError

DEFAULT_KINDS = ("patch", "text")


@dataclass(frozen=True)
class NormRule:
    """L2-norm rule. Exactly one of ``threshold`` (absolute) or ``relative`` may be set; neither
    means automatic.

    - ``threshold``: sink when ``norm >= threshold``.
    - ``relative``: sink when ``norm >= relative x`` the image's median norm (over ``kinds``)
      at that layer.
    - automatic: per layer, sorted log-norms are split at their widest gap; the upper group counts
      as sinks only if the gap is at least ``auto_gap`` (ratio between the two sides), the upper
      group holds at most ``auto_max_frac`` of the tokens and its lowest norm is at least
      ``auto_min_ratio`` x the median. The threshold is the geometric middle of the gap.
      ``auto_scope="layer"`` (default) pools each layer's tokens over all images;
      ``auto_scope="image"`` finds the gap in each image separately, so an image's sinks do not
      depend on the other images scanned with it.
    """

    threshold: float | None = None
    relative: float | None = None
    auto_gap: float = 2.0
    auto_max_frac: float = 0.1
    auto_min_ratio: float = 4.0
    kinds: tuple[str, ...] = DEFAULT_KINDS
    auto_scope: str = "layer"
    method: str = field(default="norm", init=False)

    def __post_init__(self):
        if self.threshold is not None and self.relative is not None:
            raise SinkscopeError("norm rule: give an absolute threshold or a relative one, not both")
        if self.relative is not None and not self.relative > 0:
            raise SinkscopeError(f"norm rule: relative threshold must be > 0, got {self.relative:g}")
        if self.threshold is not None and not self.threshold > 0:
            # an L2 norm is never negative: a threshold <= 0 would call every token a sink
            raise SinkscopeError(f"norm rule: absolute threshold must be > 0, got {self.threshold:g}")
        if self.auto_scope not in ("layer", "image"):
            raise SinkscopeError(f"norm rule: auto_scope must be 'layer' or 'image', got {self.auto_scope!r}")

    @property
    def mode(self) -> str:
        return (
            "absolute" if self.threshold is not None else "relative" if self.relative is not None else "auto"
        )

    def thresholds(self, norms: Sequence[np.ndarray]) -> list[float]:
        """Per image, the norm threshold at one layer (``inf``: no sink), from each image's
        eligible token norms (a list of 1-D arrays; images may differ in length). The one place
        the rule's three modes are computed: :func:`detect`, probes and flow all come here.

        >>> NormRule(relative=2.0).thresholds([np.array([1.0, 2.0, 3.0])])
        [4.0]
        """
        vals = [np.asarray(v, np.float64) for v in norms]
        if self.mode == "absolute":
            return [float(self.threshold)] * len(vals)
        if self.mode == "relative":
            return [self.relative * float(np.median(v)) if len(v) else math.inf for v in vals]
        if self.auto_scope == "image":
            found = [auto_gap_threshold(v, self, n_images=1) for v in vals]
            return [math.inf if t is None else t for t in found]
        pooled = np.concatenate(vals) if vals else np.zeros(0)
        t = auto_gap_threshold(pooled, self, n_images=len(vals))
        return [math.inf if t is None else t] * len(vals)

    def mask(self, norms: np.ndarray | Sequence[np.ndarray]) -> list[np.ndarray] | np.ndarray:
        """Sink mask of each image's tokens at one layer: ``[images, tokens]`` norms (or a list of
        1-D arrays of eligible tokens) -> booleans of the same shape. Pass only the tokens the rule
        may call sinks (e.g. the patches).

        >>> NormRule(relative=2.0).mask(np.array([[1.0, 1.0, 5.0], [2.0, 2.0, 3.0]])).tolist()
        [[False, False, True], [False, False, False]]
        """
        rows = list(norms)
        thr = self.thresholds(rows)
        out = [np.asarray(v, np.float64) >= t for v, t in zip(rows, thr)]
        return np.stack(out) if isinstance(norms, np.ndarray) and norms.ndim == 2 else out

    def describe(self) -> str:
        kinds = "/".join(self.kinds) + " tokens"
        if self.mode == "absolute":
            return f"norm: L2 norm >= {self.threshold:g} (absolute), {kinds}"
        if self.mode == "relative":
            return f"norm: L2 norm >= {self.relative:g} x image median (relative), {kinds}"
        where = (
            "each image's log-norms at each layer" if self.auto_scope == "image" else "each layer's log-norms"
        )
        return (
            f"norm: automatic - widest gap in {where}, gap >= {self.auto_gap:g}x, "
            f"upper group <= {self.auto_max_frac:.0%} of tokens and >= {self.auto_min_ratio:g}x median, {kinds}"
        )


@dataclass(frozen=True)
class AttentionRule:
    """Attention-received rule.

    Bidirectional encoders (ViTs): sink when a token receives ``>= factor x`` the uniform share
    ``1/N`` of attention (head- and query-averaged); ``fraction`` gives an absolute share instead.

    Causal sequences (``kind == "text"``): a key ``k`` is seen only by queries ``i >= k``, so the
    statistic is Gu et al.'s ``alpha_k = mean_{i >= k} A[i, k]`` (head-averaged), and a token is a
    sink when ``alpha_k >= causal_fraction`` (their epsilon, 0.3) and at least ``min_queries``
    queries see it (the last few tokens are seen by too few queries to call them sinks).
    Gu et al.'s own metric is per head - the share of (layer, head) pairs with ``alpha_k > 0.3`` -
    see :func:`head_alpha` and :func:`gu_sink_rate` (a causal scan's ``gu_sink_rate`` summary).
    """

    factor: float | None = 10.0
    fraction: float | None = None
    causal_fraction: float = 0.3
    min_queries: int = 4
    kinds: tuple[str, ...] = ("cls", "register", "patch", "text")
    method: str = field(default="attention", init=False)

    @property
    def mode(self) -> str:
        return "absolute" if self.fraction is not None else "relative"

    def describe(self) -> str:
        enc = (
            f"received attention >= {self.fraction:g} (absolute share)"
            if self.fraction is not None
            else f"received attention >= {self.factor:g} x uniform share"
        )
        return (
            f"attention: {enc}, head/query-averaged; causal text: mean attention from the queries "
            f"that see the token >= {self.causal_fraction:g} (Gu et al.), seen by >= {self.min_queries} queries"
        )


@dataclass(frozen=True)
class DimsRule:
    """Sink-dimension rule: discover ``D_sink`` from massive activations, then threshold the
    RMS-normalised value on those dims.

    ``massive_abs``/``massive_ratio``: an activation is massive when ``|a| > massive_abs`` and
    ``|a| >= massive_ratio x median|a|`` of its hidden state (Sun et al.). ``tau``: sink when
    ``max_{d in D_sink} |x[d]| / RMS(x) >= tau`` (Kang et al.). ``min_layer``: first layer
    checked (Kang et al. start at 2 for LLMs). ``dims``: give ``D_sink`` yourself instead.
    """

    tau: float = 20.0
    massive_abs: float = 100.0
    massive_ratio: float = 1000.0
    min_layer: int = 0
    dims: tuple[int, ...] | None = None
    kinds: tuple[str, ...] = DEFAULT_KINDS
    method: str = field(default="dims", init=False)

    @property
    def mode(self) -> str:
        return "absolute"

    def describe(self) -> str:
        src = (
            f"given dims {list(self.dims)}"
            if self.dims is not None
            else (f"dims with |a| > {self.massive_abs:g} and >= {self.massive_ratio:g}x median|a|")
        )
        return f"dims: max |x[d]| / RMS(x) >= {self.tau:g} over sink dims ({src}), layers >= {self.min_layer}"


Rule = NormRule | AttentionRule | DimsRule


def rule_to_dict(rule: Rule) -> dict[str, Any]:
    """JSON form of a rule: ``method``, ``mode``, ``description``, ``threshold`` =
    ``{"kind": absolute|relative|auto, "value": ...}`` and every parameter under ``params``.

    >>> rule_to_dict(NormRule(relative=5))["threshold"]
    {'kind': 'relative', 'value': 5}
    """
    params = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(rule).items()}
    if isinstance(rule, NormRule):
        value = rule.threshold if rule.mode == "absolute" else rule.relative
    elif isinstance(rule, AttentionRule):
        value = rule.fraction if rule.fraction is not None else rule.factor
    else:
        value = rule.tau
    return {
        "method": rule.method,
        "mode": rule.mode,
        "description": rule.describe(),
        "threshold": {"kind": rule.mode, "value": value},
        "params": params,
    }


def rule_from_dict(d: dict[str, Any]) -> Rule:
    """The rule a :func:`rule_to_dict` described (its ``method`` and ``params``).

    >>> rule_from_dict(rule_to_dict(NormRule(relative=5.0))) == NormRule(relative=5.0)
    True
    """
    classes = {"norm": NormRule, "attention": AttentionRule, "dims": DimsRule}
    method = d.get("method")
    if method not in classes:
        raise SinkscopeError(f"unknown rule method {method!r}; known: {', '.join(classes)}")
    cls = classes[method]
    names = {f.name for f in fields(cls) if f.init}
    params = {
        k: (tuple(v) if isinstance(v, list) else v) for k, v in (d.get("params") or {}).items() if k in names
    }
    return cls(**params)


def rules_from_dicts(dicts: list[dict[str, Any]]) -> list[Rule]:
    """:func:`rule_from_dict` for each entry (a scan summary's ``rules``)."""
    return [rule_from_dict(d) for d in dicts]


def auto_gap_threshold(values: np.ndarray, rule: NormRule, n_images: int = 1) -> float | None:
    """Valley of a clear gap in ``values`` (automatic norm rule), or ``None`` when unimodal.

    The upper group may hold ``rule.auto_max_frac`` of the values, and at least one per image
    (``n_images``), so short sequences with one sink each are not excluded.

    >>> auto_gap_threshold(np.array([10, 11, 12, 9, 10, 300.]), NormRule())
    60.0
    """
    v = np.sort(np.asarray(values, np.float64))
    v = v[np.isfinite(v) & (v > 0)]
    if len(v) < 3:
        return None
    logs = np.log(v)
    gaps = np.diff(logs)
    # only gaps that leave a small upper group are candidates
    n = len(v)
    upper = n - 1 - np.arange(n - 1)  # tokens above each gap
    ok = upper <= max(n_images, math.floor(rule.auto_max_frac * n))
    if not ok.any():
        return None
    gaps = np.where(ok, gaps, -np.inf)
    i = int(np.argmax(gaps))
    lo, hi = v[i], v[i + 1]
    if hi / lo < rule.auto_gap or hi < rule.auto_min_ratio * float(np.median(v)):
        return None
    return float(math.sqrt(lo * hi))


def topk_for_exact_dims(hidden_size: int, tau: float = 20.0) -> int:
    """How many top channels per token keep the dims rule exact.

    If a sink dim is not among a token's top ``k`` channels yet reaches ``tau x RMS``, then
    ``k + 1`` channels do, so ``sum x^2 >= (k + 1) tau^2 RMS^2 = (k + 1) tau^2 sum x^2 / D``, which is
    impossible when ``(k + 1) tau^2 > D``. So ``k = floor(D / tau^2)`` suffices (at least 4).

    >>> topk_for_exact_dims(4096)
    10
    """
    return max(4, int(hidden_size // (tau * tau)))
