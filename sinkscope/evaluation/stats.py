"""Bootstrap confidence intervals for accuracies.

>>> lo, hi = bootstrap_ci([True] * 7 + [False] * 3, seed=0)
>>> lo <= 0.7 <= hi
True
"""

from __future__ import annotations

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


__all__ = ["bootstrap_ci"]
