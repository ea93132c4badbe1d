"""Bootstrap confidence intervals for accuracies.

>>> lo, hi = bootstrap_ci([True] * 7 + [False] * 3, seed=0)
>>> lo <= 0.7 <= hi
True
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def bootstrap_ci(
    correct: Sequence[bool] | np.ndarray, confidence: float = 0.95, n_boot: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``correct`` (items resampled with
    replacement ``n_boot`` times, seeded). ``(nan, nan)`` for no items."""
    x = np.asarray(correct, dtype=float)
    if x.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    a = (1 - confidence) / 2
    return float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def mcnemar_p(a: Sequence[bool] | np.ndarray, b: Sequence[bool] | np.ndarray) -> float:
    """Exact two-sided McNemar test of paired outcomes ``a`` and ``b`` on the same items: the
    binomial probability of a split of the discordant pairs at least this uneven (1.0 when there
    is none).

    >>> round(mcnemar_p([True] * 9 + [False], [False] * 9 + [True]), 4)   # 9 pairs against 1
    0.0215
    """
    x, y = np.asarray(a, bool), np.asarray(b, bool)
    n01, n10 = int((x & ~y).sum()), int((~x & y).sum())
    n = n01 + n10
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(n01, n10) + 1)) / 2.0**n
    return float(min(1.0, 2 * tail))


def paired_difference(
    a: Sequence[bool] | np.ndarray, b: Sequence[bool] | np.ndarray, confidence: float = 0.95, n_boot: int = 1000, seed: int = 0
) -> dict[str, float]:
    """Accuracy of ``a`` minus accuracy of ``b`` on the same items, with a paired percentile
    bootstrap interval (the same items resampled for both) and McNemar's exact p-value.

    >>> d = paired_difference([True, True, False, True], [True, False, False, False])
    >>> d["diff"], d["ci_low"] <= d["diff"] <= d["ci_high"]
    (0.5, True)
    """
    x, y = np.asarray(a, float), np.asarray(b, float)
    if x.shape != y.shape:
        raise ValueError(f"paired outcomes of different lengths: {x.shape} and {y.shape}")
    if x.size == 0:
        return {"diff": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "p_mcnemar": float("nan")}
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(n_boot, x.size))
    diffs = x[idx].mean(axis=1) - y[idx].mean(axis=1)
    q = (1 - confidence) / 2
    return {
        "diff": float(x.mean() - y.mean()),
        "ci_low": float(np.quantile(diffs, q)),
        "ci_high": float(np.quantile(diffs, 1 - q)),
        "p_mcnemar": mcnemar_p(x.astype(bool), y.astype(bool)),
    }


__all__ = ["bootstrap_ci", "mcnemar_p", "paired_difference"]
