"""Sink detection: every rule is a parameter set, reported with its result.

Rules work on the tidy token table a scan produces (one row per image, layer, token, with
``norm``, optional ``attention_received`` and the top-|activation| channels), so they can be
re-run with other thresholds without the model, and tested on hand-made tables.

- :class:`NormRule` - ``||x||_2`` with an absolute threshold (paper: 100 for CLIP-L in LLaVA;
  Darcet: 150 for DINOv2-g), a threshold relative to the image's median patch norm, or an
  automatic rule that looks for a clear gap in each layer's norm distribution and reports *no*
  sinks when there is no separate upper mode.
- :class:`AttentionRule` - tokens receiving far more than the uniform share of attention (head-
  and query-averaged), per layer. Per head: :func:`head_alpha` and Gu et al.'s sink rate
  :func:`gu_sink_rate` (share of (layer, head) pairs with ``alpha_k > 0.3``).
- :class:`DimsRule` - discovers sink dimensions from massive activations (Sun et al.: ``|a| > 100``
  and ``>= 1000 x`` the median ``|a|`` of the hidden state) and flags tokens with
  ``max_{d in D_sink} |x[d]| / RMS(x) >= tau`` (Kang et al., tau = 20). Nothing is per model.

>>> import pandas as pd
>>> t = pd.DataFrame({"image": "a", "layer": 1, "token": range(5), "kind": "patch",
...                   "norm": [10., 11., 9., 10., 400.]})
>>> res = detect(t, NormRule(threshold=100))
>>> res.is_sink.tolist(), res.describe()
([False, False, False, False, True], 'norm: L2 norm >= 100 (absolute), patch/text tokens')
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import pandas as pd

from ._utils import SinkscopeError

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
    params = {k: (tuple(v) if isinstance(v, list) else v) for k, v in (d.get("params") or {}).items() if k in names}
    return cls(**params)


def rules_from_dicts(dicts: list[dict[str, Any]]) -> list[Rule]:
    """:func:`rule_from_dict` for each entry (a scan summary's ``rules``)."""
    return [rule_from_dict(d) for d in dicts]


@dataclass
class Detection:
    """The result of one rule on a token table.

    ``is_sink``: boolean Series aligned with the table's index. ``per_layer_threshold``: layer ->
    threshold on the rule's statistic (``None`` where an automatic rule found no separate mode;
    for relative rules the median over images). ``statistic``: the per-token value compared
    with the threshold. ``sink_dims``: the discovered dims (dims rule).
    """

    rule: Rule
    is_sink: pd.Series
    statistic: pd.Series
    per_layer_threshold: dict[int, float | None]
    sink_dims: list[int] = field(default_factory=list)

    def describe(self) -> str:
        return self.rule.describe()

    def to_dict(self) -> dict[str, Any]:
        d = rule_to_dict(self.rule)
        d["per_layer_threshold"] = {
            str(k): (None if v is None or not math.isfinite(v) else float(v))
            for k, v in self.per_layer_threshold.items()
        }
        d["sink_dims"] = [int(x) for x in self.sink_dims]
        d["n_sinks"] = int(self.is_sink.sum())
        return d


def _eligible(tokens: pd.DataFrame, kinds: tuple[str, ...]) -> pd.Series:
    return tokens["kind"].isin(kinds)


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


def detect(tokens: pd.DataFrame, rule: Rule) -> Detection:
    """Apply a rule to a token table (columns ``image, layer, token, kind, norm`` and, per rule,
    ``attention_received``/``uniform_share`` or ``top_dim_j``/``top_val_j``/``rms``/``median_abs``).
    """
    if isinstance(rule, NormRule):
        return _detect_norm(tokens, rule)
    if isinstance(rule, AttentionRule):
        return _detect_attention(tokens, rule)
    if isinstance(rule, DimsRule):
        return _detect_dims(tokens, rule)
    raise SinkscopeError(f"unknown rule {rule!r}")


def _detect_norm(tokens: pd.DataFrame, rule: NormRule) -> Detection:
    elig = _eligible(tokens, rule.kinds)
    stat = tokens["norm"].astype(float)
    thr = pd.Series(np.inf, index=tokens.index)
    per_layer: dict[int, float | None] = {}
    for layer, idx in tokens.groupby("layer").groups.items():
        subs = list(tokens.loc[idx].groupby("image", sort=False).groups.values())
        per_image = rule.thresholds([stat.loc[sub][elig.loc[sub]].to_numpy() for sub in subs])
        for sub, ti in zip(subs, per_image):
            thr.loc[sub] = ti
        found = [t for t in per_image if math.isfinite(t)]
        if rule.mode == "absolute":
            t = rule.threshold
        else:  # reported: the median over the images whose threshold exists
            t = float(np.median(found)) if found else None
        per_layer[int(layer)] = t
    is_sink = elig & (stat >= thr)
    return Detection(rule, is_sink, stat, per_layer)


def _detect_attention(tokens: pd.DataFrame, rule: AttentionRule) -> Detection:
    if "attention_received" not in tokens:
        raise SinkscopeError("attention rule needs attention_received: scan with --method attention or all")
    rec = tokens["attention_received"].astype(float)
    elig = _eligible(tokens, rule.kinds) & rec.notna()
    causal = (tokens["kind"] == "text").to_numpy()
    if rule.fraction is not None:
        stat, t_enc = rec.copy(), rule.fraction
    else:
        stat, t_enc = rec / tokens["uniform_share"].astype(float), rule.factor
    thr = pd.Series(float(t_enc), index=tokens.index)
    if causal.any():
        # received is averaged over all n queries, of which n - k see key k: alpha_k = rec * n / (n - k)
        n = tokens.groupby(["image", "layer"])["token"].transform("max") + 1
        seen_by = (n - tokens["token"]).astype(float)
        alpha = rec * n / seen_by
        stat = stat.where(~causal, alpha)
        thr = thr.where(~causal, rule.causal_fraction)
        elig = elig & (~pd.Series(causal, index=tokens.index) | (seen_by >= rule.min_queries))
    is_sink = elig & (stat >= thr)
    per_layer = {
        int(layer): (float(thr.loc[idx][elig.loc[idx]].iloc[0]) if elig.loc[idx].any() else None)
        for layer, idx in tokens.groupby("layer").groups.items()
    }
    return Detection(rule, is_sink, stat, per_layer)


#: Per-head attention received, one column per head (``attention_received_h0``, ...): a causal-LM
#: scan with the attention rule writes them (query-averaged over all the prompt's queries).
HEAD_COLUMN_PREFIX = "attention_received_h"


def head_columns(tokens: pd.DataFrame) -> list[str]:
    """The per-head attention-received columns of a token table, in head order."""
    cols = [c for c in tokens.columns if str(c).startswith(HEAD_COLUMN_PREFIX)]
    return sorted(cols, key=lambda c: int(str(c)[len(HEAD_COLUMN_PREFIX) :]))


def head_alpha(tokens: pd.DataFrame) -> pd.DataFrame:
    """Gu et al.'s ``alpha_k = mean_{i >= k} A[i, k]`` per (prompt, layer, head, token k).

    From the per-head ``attention_received_h*`` columns of a causal scan (received = sum over the
    ``n`` queries / ``n``; query ``i`` sees key ``k`` only when ``i >= k``, so ``alpha_k = received
    x n / (n - k)``). Columns: ``image, layer, head, token, alpha, seen_by``; rows without a value
    (the last layer, which has no attention block) are left out.

    >>> t = pd.DataFrame({"image": "p", "layer": 0, "token": [0, 1], "kind": "text",
    ...                   "attention_received_h0": [0.75, 0.25], "attention_received_h1": [0.5, 0.5]})
    >>> head_alpha(t).alpha.tolist()
    [0.75, 0.5, 0.5, 1.0]
    """
    cols = head_columns(tokens)
    if not cols:
        raise SinkscopeError(
            "per-head attention needs attention_received_h* columns: scan a causal LM with --method attention or all"
        )
    t = tokens[tokens["kind"] == "text"]
    n = t.groupby(["image", "layer"])["token"].transform("max") + 1
    seen_by = (n - t["token"]).astype(float)
    frames = []
    for c in cols:
        frames.append(
            pd.DataFrame(
                {
                    "image": t["image"].to_numpy(),
                    "layer": t["layer"].to_numpy(),
                    "head": int(str(c)[len(HEAD_COLUMN_PREFIX) :]),
                    "token": t["token"].to_numpy(),
                    "alpha": (t[c].astype(float) * n / seen_by).to_numpy(),
                    "seen_by": seen_by.to_numpy().astype(int),
                }
            )
        )
    out = pd.concat(frames, ignore_index=True).dropna(subset=["alpha"])
    return out.sort_values(["image", "layer", "head", "token"], kind="stable").reset_index(drop=True)


def gu_sink_rate(tokens: pd.DataFrame, eps: float = 0.3, token: int = 0) -> dict[str, Any] | None:
    """Gu et al.'s sink metric: the share of (layer, head) pairs whose ``alpha_k > eps`` for the
    key token ``k`` (default: the first token), per prompt, then averaged over prompts.

    Unlike the attention rule (which thresholds the head-averaged alpha), every head counts
    separately. Returns ``value`` (mean over prompts), ``eps``, ``token``, ``per_prompt``,
    ``per_layer`` (share of heads above ``eps``, averaged over prompts), ``n_layers``,
    ``n_heads``, ``n_prompts`` and a ``description``; ``None`` when the table has no per-head
    attention or no prompt reaches token ``k``.

    >>> t = pd.DataFrame({"image": "p", "layer": [0, 0, 1, 1], "token": [0, 1, 0, 1], "kind": "text",
    ...                   "attention_received_h0": [0.9, 0.1, 0.2, 0.8],
    ...                   "attention_received_h1": [0.5, 0.5, 0.6, 0.4]})
    >>> gu_sink_rate(t)["value"]        # alpha_0: 0.9, 0.5 (layer 0), 0.2, 0.6 (layer 1)
    0.75
    """
    if not head_columns(tokens):
        return None
    a = head_alpha(tokens)
    a = a[a["token"] == token]
    if a.empty:
        return None
    a = a.assign(above=a["alpha"] > eps)
    per_prompt = a.groupby("image", sort=False)["above"].mean()
    per_layer = a.groupby(["layer", "image"])["above"].mean().groupby("layer").mean()
    n_heads = int(a["head"].nunique())
    return {
        "value": float(per_prompt.mean()),
        "eps": float(eps),
        "token": int(token),
        "per_prompt": {str(k): float(v) for k, v in per_prompt.items()},
        "per_layer": {str(int(k)): float(v) for k, v in per_layer.items()},
        "n_layers": int(a["layer"].nunique()),
        "n_heads": n_heads,
        "n_prompts": int(len(per_prompt)),
        "description": (
            f"Gu et al. sink rate: share of (layer, head) pairs with alpha_{token} = mean over queries "
            f"i >= {token} of A[i, {token}] > {eps:g}, per head (not head-averaged), mean over prompts"
        ),
    }


def top_channels(tokens: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """``[rows, k]`` channel indices and |values| of each token's k largest |activations|
    (columns ``top_dim_0 .. top_dim_{k-1}`` and ``top_val_0 ..``)."""
    k = sum(1 for c in tokens.columns if str(c).startswith("top_dim_"))
    if k == 0:
        raise SinkscopeError("dims rule needs the top-|activation| channels: scan with --method dims or all")
    dims = tokens[[f"top_dim_{j}" for j in range(k)]].to_numpy(np.int64)
    vals = tokens[[f"top_val_{j}" for j in range(k)]].to_numpy(np.float64)
    return dims, vals


def discover_sink_dims(tokens: pd.DataFrame, rule: DimsRule) -> list[int]:
    """Channels holding massive activations anywhere in the table, most frequent first.

    An activation is massive when ``|a| > rule.massive_abs`` and ``|a| >= rule.massive_ratio x``
    the median ``|a|`` of its (image, layer) hidden state.
    """
    sel = tokens[tokens["layer"] >= rule.min_layer]
    dims, vals = top_channels(sel)
    med = sel["median_abs"].to_numpy(float)[:, None] if len(sel) else np.zeros((0, 1))
    massive = (vals > rule.massive_abs) & (vals >= rule.massive_ratio * med)
    found, counts = np.unique(dims[massive], return_counts=True)
    order = np.argsort(-counts, kind="stable")
    return [int(found[i]) for i in order]


def _detect_dims(tokens: pd.DataFrame, rule: DimsRule) -> Detection:
    dims = list(rule.dims) if rule.dims is not None else discover_sink_dims(tokens, rule)
    td, tv = top_channels(tokens)
    on = np.isin(td, dims) if dims else np.zeros_like(td, bool)
    phi = np.where(on, tv, 0.0).max(axis=1) / np.maximum(tokens["rms"].to_numpy(float), 1e-12)
    stat = pd.Series(phi, index=tokens.index)
    elig = _eligible(tokens, rule.kinds) & (tokens["layer"] >= rule.min_layer)
    is_sink = elig & (stat >= rule.tau)
    per_layer = {
        int(layer): (float(rule.tau) if dims else None) for layer in sorted(tokens["layer"].unique())
    }
    return Detection(rule, is_sink, stat, per_layer, sink_dims=dims)


def topk_for_exact_dims(hidden_size: int, tau: float = 20.0) -> int:
    """How many top channels per token keep the dims rule exact.

    If a sink dim is not among a token's top ``k`` channels yet reaches ``tau x RMS``, then
    ``k + 1`` channels do, so ``sum x^2 >= (k + 1) tau^2 RMS^2 = (k + 1) tau^2 sum x^2 / D``, which is
    impossible when ``(k + 1) tau^2 > D``. So ``k = floor(D / tau^2)`` suffices (at least 4).

    >>> topk_for_exact_dims(4096)
    10
    """
    return max(4, int(hidden_size // (tau * tau)))


# -- sink reports ----------------------------------------------------------------------------


@dataclass
class SinkReport:
    """Per image and layer: the sink tokens, their emergence layer and the sink dims.

    ``tokens`` is the tidy table (one row per image, layer, token) with ``is_sink`` under the
    main rule and ``is_sink_<method>`` for every rule applied.

    >>> rep = SinkReport.from_tokens(table, [NormRule(threshold=100)])     # doctest: +SKIP
    >>> rep.sinks()                                                       # doctest: +SKIP
    """

    tokens: pd.DataFrame
    detections: list[Detection]

    @classmethod
    def from_tokens(cls, tokens: pd.DataFrame, rules: list[Rule]) -> SinkReport:
        tokens = tokens.reset_index(drop=True).copy()
        dets = [detect(tokens, r) for r in rules]
        for d in dets:
            tokens[f"is_sink_{d.rule.method}"] = d.is_sink.to_numpy()
            if d.rule.method == "dims":
                tokens["sink_dim_ratio"] = d.statistic.to_numpy()
        tokens["is_sink"] = dets[0].is_sink.to_numpy() if dets else False
        return cls(tokens, dets)

    @property
    def main(self) -> Detection:
        return self.detections[0]

    @property
    def sink_dims(self) -> list[int]:
        for d in self.detections:
            if d.rule.method == "dims":
                return d.sink_dims
        return []

    def to_frame(self) -> pd.DataFrame:
        """The tidy token table."""
        return self.tokens

    def sinks(self, method: str | None = None) -> pd.DataFrame:
        """One row per (image, token) that is a sink in some layer, with its emergence layer.

        Columns: ``image, token, kind, row, col, emergence_layer, n_layers, max_norm``.
        """
        col = "is_sink" if method is None else f"is_sink_{method}"
        s = self.tokens[self.tokens[col]]
        if s.empty:
            return pd.DataFrame(
                columns=["image", "token", "kind", "row", "col", "emergence_layer", "n_layers", "max_norm"]
            )
        g = s.groupby(["image", "token"], sort=True)
        out = g.agg(
            kind=("kind", "first"),
            row=("row", "first"),
            col=("col", "first"),
            emergence_layer=("layer", "min"),
            n_layers=("layer", "nunique"),
            max_norm=("norm", "max"),
        ).reset_index()
        return out

    def emergence_layer(self, method: str | None = None) -> int | None:
        """First layer where any token of any image is a sink (``None`` if none)."""
        s = self.sinks(method)
        return None if s.empty else int(s["emergence_layer"].min())

    def per_layer_counts(self, method: str | None = None) -> dict[int, dict[str, int]]:
        col = "is_sink" if method is None else f"is_sink_{method}"
        g = self.tokens.groupby("layer")
        return {int(layer): {"n_sinks": int(grp[col].sum()), "n_tokens": int(len(grp))} for layer, grp in g}

    def summary(self) -> dict[str, Any]:
        return {
            "rule": self.main.to_dict(),
            "rules": [d.to_dict() for d in self.detections],
            "per_layer": {str(k): v for k, v in self.per_layer_counts().items()},
            "emergence_layer": self.emergence_layer(),
            "sink_dims": self.sink_dims,
            "n_sink_tokens": int(len(self.sinks())),
        }
