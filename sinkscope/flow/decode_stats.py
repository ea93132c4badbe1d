"""Statistics of word-distribution decoding: hit rates with binomial confidence intervals.

- :func:`binomial_ci` - the interval of one proportion (Wilson score or exact Clopper-Pearson);
- :func:`difference_ci` - the sink - non-sink difference with Newcombe's hybrid score interval;
- :func:`rate_table` - hit rates per group (sink / non-sink) and scope (all, per label, control)
  from a per-token table;
- :func:`rate_summary` - the headline rates of a rate table and their difference, as JSON.

Tokens of one image are not independent draws: the intervals treat them as if they were (the
image count is in the rate table).

>>> t = pd.DataFrame({"group": ["sink"] * 4 + ["nonsink"] * 4, "label": "cat", "scope": "target",
...                   "image": [0, 1, 2, 3] * 2, "hit": [True] * 3 + [False] * 5, "hit_any": False})
>>> rate_summary(rate_table(t))["difference"]["sink_minus_nonsink"]
0.75
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from .._utils import SinkscopeError

CI_METHODS = ("wilson", "clopper-pearson")
GROUPS = ("sink", "nonsink")


def binomial_ci(k: int, n: int, confidence: float = 0.95, method: str = "wilson") -> tuple[float, float]:
    """Two-sided confidence interval of a binomial proportion ``k / n``.

    ``method``: ``"wilson"`` (score interval) or ``"clopper-pearson"`` (exact, from the beta
    distribution). ``n == 0`` gives ``(nan, nan)``.

    >>> [round(x, 4) for x in binomial_ci(8, 10)]
    [0.4902, 0.9433]
    >>> [round(x, 4) for x in binomial_ci(0, 10, method="clopper-pearson")]
    [0.0, 0.3085]
    """
    if method not in CI_METHODS:
        raise SinkscopeError(f"unknown CI method {method!r}; choose from {', '.join(CI_METHODS)}")
    if not 0 < confidence < 1:
        raise SinkscopeError(f"confidence must be in (0, 1), got {confidence}")
    if not 0 <= k <= n:
        raise SinkscopeError(f"binomial CI needs 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return (math.nan, math.nan)
    alpha = 1.0 - confidence
    if method == "wilson":
        from scipy.stats import norm

        z = float(norm.ppf(1 - alpha / 2))
        p = k / n
        denom = 1 + z * z / n
        centre = (p + z * z / (2 * n)) / denom
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
        # exact 0 / 1 at k = 0 / k = n (where the bound is 0 or 1 up to rounding)
        return (0.0 if k == 0 else max(0.0, centre - half), 1.0 if k == n else min(1.0, centre + half))
    from scipy.stats import beta

    lo = 0.0 if k == 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    return (lo, hi)


def difference_ci(k1: int, n1: int, k2: int, n2: int, confidence: float = 0.95) -> tuple[float, float, float]:
    """``p1 - p2`` and Newcombe's hybrid score interval for it (from the two Wilson intervals).

    >>> [round(x, 4) for x in difference_ci(8, 10, 2, 10)]
    [0.6, 0.1618, 0.8027]
    """
    if n1 == 0 or n2 == 0:
        return (math.nan, math.nan, math.nan)
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = binomial_ci(k1, n1, confidence, "wilson")
    l2, u2 = binomial_ci(k2, n2, confidence, "wilson")
    d = p1 - p2
    return (d, d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2))


def rate_table(per_token: pd.DataFrame, ci: str = "wilson", confidence: float = 0.95) -> pd.DataFrame:
    """Hit rates from a per-token table (columns ``group, label, scope, image, hit, hit_any``).

    One row per group (``sink``, ``nonsink``) and scope: ``all`` (images whose label has words;
    hit = own label's word), ``label=<x>`` per such label, and ``control`` (images whose label has
    no words; hit = any label's word). Columns ``group, scope, label, n_images, n_tokens, n_hits,
    rate, ci_low, ci_high, ci_method, confidence``.

    >>> t = pd.DataFrame({"group": ["sink"] * 10, "label": "cat", "scope": "target",
    ...                   "image": range(10), "hit": [True] * 8 + [False] * 2, "hit_any": False})
    >>> r = rate_table(t)
    >>> r.loc[(r.group == "sink") & (r.scope == "all"), ["n_tokens", "n_hits", "rate"]].values.tolist()
    [[10.0, 8.0, 0.8]]
    """
    cols = ["group", "label", "scope", "image", "hit", "hit_any"]
    t = per_token if len(per_token) else pd.DataFrame(columns=cols)
    out = []
    for g in GROUPS:
        d = t[t.group == g]
        tgt = d[d.scope == "target"]
        out.append(_rate_row(g, "all", "", tgt, "hit", ci, confidence))
        for lab in sorted(t[t.scope == "target"].label.unique(), key=_label_key):
            out.append(_rate_row(g, f"label={lab}", lab, tgt[tgt.label == lab], "hit", ci, confidence))
        if (t.scope == "control").any():
            out.append(_rate_row(g, "control", "", d[d.scope == "control"], "hit_any", ci, confidence))
    return pd.DataFrame(out)


def _rate_row(group: str, scope: str, lab, d: pd.DataFrame, col: str, ci: str, confidence: float) -> dict:
    """One row of :func:`rate_table`: the hits in column ``col`` of the tokens ``d``."""
    n, k = len(d), int(d[col].sum()) if len(d) else 0
    lo, hi = binomial_ci(k, n, confidence, ci)
    return {
        "group": group,
        "scope": scope,
        "label": lab,
        "n_images": int(d["image"].nunique()) if n else 0,
        "n_tokens": n,
        "n_hits": k,
        "rate": k / n if n else math.nan,
        "ci_low": lo,
        "ci_high": hi,
        "ci_method": ci,
        "confidence": confidence,
    }


def _label_key(x):
    """Sort key of labels: digits numerically first, then the others alphabetically."""
    return (0, int(x), "") if str(x).isdigit() else (1, 0, str(x))


def headline(rates: pd.DataFrame, group: str, scope: str) -> dict[str, Any]:
    """The row (``group``, ``scope``) of a :func:`rate_table` as JSON (``{}`` when absent;
    ``rate`` and ``ci`` are ``None`` without tokens).

    >>> t = pd.DataFrame({"group": ["sink"] * 2, "label": "cat", "scope": "target",
    ...                   "image": [0, 1], "hit": [True, False], "hit_any": False})
    >>> headline(rate_table(t), "sink", "all")["rate"], headline(rate_table(t), "nonsink", "all")["ci"]
    (0.5, None)
    """
    r = rates[(rates.group == group) & (rates.scope == scope)]
    if not len(r):
        return {}
    r = r.iloc[0]
    return {
        "n_images": int(r.n_images),
        "n_tokens": int(r.n_tokens),
        "n_hits": int(r.n_hits),
        "rate": None if r.n_tokens == 0 else float(r.rate),
        "ci": None if r.n_tokens == 0 else [float(r.ci_low), float(r.ci_high)],
    }


def rate_summary(rates: pd.DataFrame, confidence: float = 0.95) -> dict[str, Any]:
    """``sink`` and ``nonsink`` headline rates (scope ``all``), their ``difference`` with
    Newcombe's interval (``None`` when a group has no token), and ``control`` (both groups) when
    the table has that scope.
    """
    s = headline(rates, "sink", "all")
    ns = headline(rates, "nonsink", "all")
    diff = None
    if s.get("n_tokens") and ns.get("n_tokens"):
        d, lo, hi = difference_ci(s["n_hits"], s["n_tokens"], ns["n_hits"], ns["n_tokens"], confidence)
        diff = {"sink_minus_nonsink": d, "ci": [lo, hi], "ci_method": "newcombe (wilson-based)"}
    out: dict[str, Any] = {"sink": s, "nonsink": ns, "difference": diff}
    ctrl_s, ctrl_ns = headline(rates, "sink", "control"), headline(rates, "nonsink", "control")
    if ctrl_s or ctrl_ns:
        out["control"] = {"sink": ctrl_s, "nonsink": ctrl_ns}
    return out


__all__ = ["CI_METHODS", "GROUPS", "binomial_ci", "difference_ci", "headline", "rate_summary", "rate_table"]
