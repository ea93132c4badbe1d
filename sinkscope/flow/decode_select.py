"""Which visual tokens word-distribution decoding decodes: the sinks and a sample of non-sinks.

- **Sinks** are chosen per image among the patch tokens fed to the LLM, from their L2 norms at the
  vision feature layer, by a :class:`~sinkscope.sinks.NormRule` (absolute or relative threshold,
  or the automatic rule with ``auto_scope="image"``) or by :class:`TopNormRule`, a named
  *surrogate* - the ``n`` highest-norm patches of each image - for towers without norm outliers.
  :func:`sink_rule_to_dict` records which rule was used.
- **Non-sinks**: ``nonsinks_per_image`` random non-sink patches per image, seeded per image (so
  the sample does not depend on the batch size), or all of them (:func:`choose_tokens`).

>>> norms = np.array([1.0, 9.0, 2.0, 3.0, 50.0])
>>> kinds = ["cls"] + ["patch"] * 4
>>> picked, median, no_sink = choose_tokens(norms, kinds, TopNormRule(1), None, 0, 0)
>>> [(int(j), g) for j, g in picked], median, no_sink
([(4, 'sink'), (1, 'nonsink'), (2, 'nonsink'), (3, 'nonsink')], 6.0, False)
>>> len(choose_tokens(norms, kinds, TopNormRule(1), 2, 0, 0)[0])  # the sink and 2 random non-sinks
3
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from .._utils import SinkscopeError
from ..sinks import NormRule, detect, rule_to_dict


@dataclass(frozen=True)
class TopNormRule:
    """Surrogate sink rule: the ``n`` highest-norm patch tokens of each image.

    Not an outlier criterion - every image gets exactly ``n`` "sinks" - so use it, and name it,
    where the tower has no norm outliers (DINOv2-S: max/median norm about 3x) and a threshold
    rule would find none.

    >>> TopNormRule(2).describe()
    'top-norm surrogate: the 2 highest-L2-norm patch tokens of each image (not an outlier criterion)'
    """

    n: int = 2
    method: str = field(default="top-norm", init=False)

    def __post_init__(self):
        if self.n < 1:
            raise SinkscopeError(f"top-norm rule: n must be >= 1, got {self.n}")

    @property
    def mode(self) -> str:
        return "top"

    def describe(self) -> str:
        return (
            f"top-norm surrogate: the {self.n} highest-L2-norm patch tokens of each image "
            "(not an outlier criterion)"
        )


def sink_rule_to_dict(rule: NormRule | TopNormRule) -> dict[str, Any]:
    """JSON form of a decoding sink rule (:func:`~sinkscope.sinks.rule_to_dict` for a NormRule),
    with ``surrogate`` saying whether it is a stand-in for an outlier criterion.

    >>> sink_rule_to_dict(TopNormRule(3))["surrogate"]
    True
    """
    if isinstance(rule, TopNormRule):
        return {
            "method": rule.method,
            "mode": rule.mode,
            "description": rule.describe(),
            "threshold": {"kind": "top", "value": rule.n},
            "params": {"n": rule.n},
            "surrogate": True,
        }
    return {**rule_to_dict(rule), "surrogate": False}


def check_rule(rule) -> None:
    """Refuse, in one line, a rule decoding cannot apply per image.

    >>> check_rule(NormRule(relative=5.0)); check_rule(TopNormRule(2))
    >>> check_rule(NormRule())
    Traceback (most recent call last):
    sinkscope._utils.SinkscopeError: the automatic norm rule must find the gap in each image here: NormRule(auto_scope='image')
    """
    if isinstance(rule, TopNormRule):
        return
    if not isinstance(rule, NormRule):
        raise SinkscopeError(f"decoding needs a NormRule or a TopNormRule, got {type(rule).__name__}")
    if rule.mode == "auto" and rule.auto_scope != "image":
        raise SinkscopeError(
            "the automatic norm rule must find the gap in each image here: NormRule(auto_scope='image')"
        )


def pick_sinks(norms: np.ndarray, kinds: list[str], rule) -> np.ndarray:
    """Boolean mask of sinks among one image's fed ViT tokens (patch tokens only).

    >>> pick_sinks(np.array([80.0, 1.0, 90.0, 2.0]), ["cls", "patch", "patch", "patch"],
    ...            NormRule(threshold=50)).tolist()
    [False, False, True, False]
    """
    is_patch = np.array([k == "patch" for k in kinds])
    out = np.zeros(len(norms), bool)
    if isinstance(rule, TopNormRule):
        idx = np.nonzero(is_patch)[0]
        top = idx[np.argsort(-norms[idx], kind="stable")[: rule.n]]
        out[top] = True
        return out
    tab = pd.DataFrame({"image": 0, "layer": 0, "token": np.arange(len(norms)), "kind": kinds, "norm": norms})
    out[:] = detect(tab, rule).is_sink.to_numpy().astype(bool)
    return out & is_patch


def choose_tokens(
    norms: np.ndarray, kinds: list[str], rule, nonsinks_per_image: int | None, seed: int, image: int
) -> tuple[list[tuple[int, str]], float, bool]:
    """The tokens of one image to decode, as ``(index among the fed tokens, group)``: every sink
    (:func:`pick_sinks`), then ``nonsinks_per_image`` random non-sink patches (``None``: all),
    drawn from a generator seeded by ``(seed, image)``; also the image's median patch norm and
    whether it has no sink.
    """
    sink = pick_sinks(norms, kinds, rule)
    patch = np.array([k == "patch" for k in kinds])
    med = float(np.median(norms[patch])) if patch.any() else math.nan
    s_idx = np.nonzero(sink)[0]
    ns_idx = np.nonzero(patch & ~sink)[0]
    if nonsinks_per_image is not None and len(ns_idx) > nonsinks_per_image:
        rng = np.random.default_rng([seed, image])  # per image: independent of the batch size
        ns_idx = np.sort(rng.choice(ns_idx, size=nonsinks_per_image, replace=False))
    return [(j, "sink") for j in s_idx] + [(j, "nonsink") for j in ns_idx], med, len(s_idx) == 0


__all__ = ["TopNormRule", "check_rule", "choose_tokens", "pick_sinks", "sink_rule_to_dict"]
