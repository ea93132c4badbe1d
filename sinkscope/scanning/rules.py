"""The rules a scan applies, built from the method name and the rule options of the CLI and API.

>>> [r.method for r in build_rules("all")]
['norm', 'attention', 'dims']
"""

from __future__ import annotations

from .._utils import SinkscopeError
from ..sinks import AttentionRule, DimsRule, NormRule, Rule

METHODS = ("norm", "attention", "dims", "all")


def build_rules(
    method: str = "norm",
    threshold: float | None = None,
    relative: float | None = None,
    attn_factor: float = 10.0,
    attn_fraction: float | None = None,
    tau: float = 20.0,
    massive_abs: float = 100.0,
    massive_ratio: float = 1000.0,
    dims_min_layer: int = 0,
    auto_scope: str = "layer",
) -> list[Rule]:
    """The rules a scan applies, main rule first (``all``: norm, attention, dims).

    >>> [r.describe() for r in build_rules("norm", threshold=100)]
    ['norm: L2 norm >= 100 (absolute), patch/text tokens']
    """
    if method not in METHODS:
        raise SinkscopeError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    norm = NormRule(threshold=threshold, relative=relative, auto_scope=auto_scope)
    attn = AttentionRule(factor=None if attn_fraction is not None else attn_factor, fraction=attn_fraction)
    dims = DimsRule(tau=tau, massive_abs=massive_abs, massive_ratio=massive_ratio, min_layer=dims_min_layer)
    return {"norm": [norm], "attention": [attn], "dims": [dims], "all": [norm, attn, dims]}[method]


def scan_rules(rules: list[Rule] | None, method: str, rule_kwargs: dict) -> list[Rule]:
    """``rules`` as given, else those :func:`build_rules` makes of ``method`` and the options;
    both at once is refused (the options would be ignored).

    >>> scan_rules(None, "norm", {"relative": 5})[0].describe()
    'norm: L2 norm >= 5 x image median (relative), patch/text tokens'
    """
    if rules and rule_kwargs:
        raise SinkscopeError(
            f"give either rules= or rule options ({', '.join(sorted(rule_kwargs))}), not both: "
            "the options would be ignored"
        )
    return rules or build_rules(method, **rule_kwargs)
