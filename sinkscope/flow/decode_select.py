"""Which visual tokens word-distribution decoding decodes: the sinks and a sample of non-sinks.

- **Sinks** are chosen per image among the patch tokens fed to the LLM, from their L2 norms at the
  vision feature layer, by the run's ViT sink rule (:class:`~sinkscope.interventions.VisualSinkRule`:
  ``norm``, ``norm:T``, ``norm:xR`` or the ``topk:K`` surrogate; :class:`TopNormRule` and a
  per-image :class:`~sinkscope.sinks.NormRule` are read as those) - the same rule, on the same
  tokens, as every other command (:func:`~sinkscope.interventions.default_rule` when none is given).
  :func:`sink_rule_to_dict` records which rule was used and why.
- **Non-sinks**: ``nonsinks_per_image`` random non-sink patches per image, seeded per image (so
  the sample does not depend on the batch size), or all of them (:func:`choose_tokens`).

>>> norms = np.array([1.0, 9.0, 2.0, 3.0, 50.0])
>>> kinds = ["cls"] + ["patch"] * 4
>>> picked, median, no_sink = choose_tokens(norms, kinds, TopNormRule(1), None, 0, 0)
>>> [(int(j), g) for j, g in picked], median, no_sink
([(4, 'sink'), (1, 'nonsink'), (2, 'nonsink'), (3, 'nonsink')], 6.0, False)
>>> len(choose_tokens(norms, kinds, "topk:1", 2, 0, 0)[0])  # the sink and 2 random non-sinks
3
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._utils import SinkscopeError
from ..interventions.rules import VisualSinkRule, patch_mask, rule_from, rule_record


@dataclass(frozen=True)
class TopNormRule:
    """Surrogate sink rule: the ``n`` highest-norm patch tokens of each image - the rule
    ``topk:n`` (:class:`~sinkscope.interventions.VisualSinkRule`), kept under its old name.

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


def as_rule(rule: Any) -> VisualSinkRule:
    """The :class:`~sinkscope.interventions.VisualSinkRule` of a decoding rule: a
    :class:`TopNormRule` is ``topk:n``; anything else as :func:`~sinkscope.interventions.rule_from`
    reads it.

    >>> as_rule(TopNormRule(3)).spec(), as_rule("norm:100").spec()
    ('topk:3', 'norm:100')
    """
    if isinstance(rule, TopNormRule):
        return VisualSinkRule("topk", k=rule.n)
    return rule_from(rule)


def sink_rule_to_dict(rule: Any, reason: str = "given") -> dict[str, Any]:
    """JSON form of a decoding sink rule (:func:`~sinkscope.interventions.rules.rule_record`, with
    ``surrogate`` saying whether it is a stand-in for an outlier criterion and ``reason`` why it
    was used).

    >>> sink_rule_to_dict(TopNormRule(3))["surrogate"]
    True
    """
    return rule_record(as_rule(rule), reason)


def check_rule(rule: Any, cls: bool = True) -> VisualSinkRule:
    """The rule as a :class:`~sinkscope.interventions.VisualSinkRule`, or one line saying why
    decoding cannot apply it per image. ``cls``: the model feeds its CLS token to the LLM (the
    ``full`` select strategy), so ``cls`` may name it (decoded as the one sink of each image).

    >>> check_rule("norm:x5").spec(), check_rule(TopNormRule(2)).spec(), check_rule("cls").spec()
    ('norm:x5', 'topk:2', 'cls')
    >>> check_rule("cls", cls=False)
    Traceback (most recent call last):
    ...
    sinkscope._utils.SinkscopeError: decode: the sink rule 'cls' names the CLS token, but decode marks sinks among the patches; use norm, norm:T, norm:xR or topk:K
    """
    return as_rule(rule).check_for("decode", cls=cls)


def pick_sinks(norms: np.ndarray, kinds: list[str], rule: Any) -> np.ndarray:
    """Boolean mask of sinks among one image's fed ViT tokens (patch tokens only; the CLS token
    alone under the rule ``cls``).

    >>> pick_sinks(np.array([80.0, 1.0, 90.0, 2.0]), ["cls", "patch", "patch", "patch"], "norm:50").tolist()
    [False, False, True, False]
    >>> pick_sinks(np.array([80.0, 1.0, 90.0, 2.0]), ["cls", "patch", "patch", "patch"], "cls").tolist()
    [True, False, False, False]
    """
    if as_rule(rule).method == "cls":
        return np.array([k == "cls" for k in kinds])
    is_patch = np.array([k == "patch" for k in kinds])
    out = np.zeros(len(norms), bool)
    out[is_patch] = patch_mask(as_rule(rule), np.asarray(norms, np.float64)[is_patch][None])[0]
    return out


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
