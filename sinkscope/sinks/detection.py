"""Applying a rule to a token table: :func:`detect` and its :class:`Detection`.

The token table has one row per image, layer and token, with ``kind`` and ``norm`` and, per rule,
``attention_received``/``uniform_share`` (attention rule) or the top-|activation| channels
``top_dim_j``/``top_val_j`` with ``rms`` and ``median_abs`` (dims rule). :func:`detect` returns
which rows are sinks, the statistic each was compared on and the threshold per layer;
:func:`discover_sink_dims` finds the channels holding massive activations.

>>> import pandas as pd
>>> t = pd.DataFrame({"image": "a", "layer": 1, "token": range(4), "kind": "patch",
...                   "norm": [10., 11., 9., 400.]})
>>> detect(t, NormRule(relative=5)).is_sink.tolist()
[False, False, False, True]
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from .._utils import SinkscopeError
from .rules import AttentionRule, DimsRule, NormRule, Rule, rule_to_dict


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
