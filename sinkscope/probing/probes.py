"""Probe every (layer, group, label) of pooled features with one set of splits per label.

:func:`run_probes` builds the tasks (the splits of each label, the feature matrix of each
(layer, group), images without a value masked), fits them in parallel with
:func:`~sinkscope.probing.classifier._fit_one` and returns one table row per task.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd
from sklearn.model_selection import GroupKFold

from .._utils import SinkscopeError
from .classifier import DEFAULT_ALPHAS, DEFAULT_CS, _fit_one, outer_splits
from .features import GroupFeatures
from .groups import SINGLE_TOKEN_GROUPS

#: the groups whose mean position means something: single tokens, and the sinks and their matches
POSITION_GROUPS = SINGLE_TOKEN_GROUPS + ("sink", "matched")


class ProbeTask(NamedTuple):
    """One probe to fit: a (layer, group, label), its task, features, targets and outer splits."""

    layer: int
    group: str
    label: str
    task: str
    X: np.ndarray
    y: np.ndarray
    splits: list[tuple[np.ndarray, np.ndarray]]


def run_probes(
    feats: GroupFeatures,
    labels: Sequence[str] | None = None,
    groups: Sequence[str] | None = None,
    layers: Sequence[int] | None = None,
    folds: int = 5,
    seed: int = 0,
    Cs: Sequence[float] = DEFAULT_CS,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    n_jobs: int | None = None,
) -> pd.DataFrame:
    """Probe every (layer, group, label) with one set of image-grouped stratified splits.

    ``labels``: label columns (classification) and/or ``row``/``col`` (regression of the position
    of single-token groups, Darcet's protocol). Returns one row per (layer, group, label):
    ``layer, group, label, task, accuracy, accuracy_std, balanced_accuracy, chance,
    shuffle_accuracy, n_images, n_tokens, n_missing, C`` (for regression ``accuracy`` is R2);
    ``chance`` is the majority-class share, ``chance_balanced`` ``1/K`` (for balanced accuracy).
    Images without a value for a label are left out of its probe and counted in ``n_missing``.
    Deterministic for a given ``seed``. ``n_jobs``: parallel workers over (layer, group)
    (default: all cores).

    >>> rng = np.random.default_rng(0)
    >>> y = np.array(["a", "b"] * 20)
    >>> x = rng.normal(size=(40, 4)).astype(np.float32)
    >>> x[:, 0] += np.where(y == "a", 5, -5)
    >>> feats = GroupFeatures({(1, "cls"): x}, {(1, "cls"): np.ones(40, np.int32)},
    ...                       {(1, "cls"): np.zeros((40, 2), np.float32)}, pd.DataFrame({"label": y}),
    ...                       [f"i{i}" for i in range(40)])
    >>> run_probes(feats, folds=3, n_jobs=1)[["group", "accuracy", "chance", "n_images"]]
      group  accuracy  chance  n_images
    0   cls       1.0     0.5        40
    """
    from joblib import Parallel, delayed

    labels = list(labels) if labels else list(feats.labels.columns)
    groups = [g for g in (groups or feats.groups) if any(k[1] == g for k in feats.x)]
    layers = list(layers) if layers is not None else feats.layers
    n = len(feats.names)
    if folds < 2:
        raise SinkscopeError(f"--folds must be at least 2, got {folds}")
    if folds > n:
        raise SinkscopeError(f"--folds {folds} is more than the {n} images")
    tasks = [t for label in labels for t in _label_tasks(feats, label, groups, layers, folds, seed)]
    img = np.arange(n)
    results = Parallel(n_jobs=n_jobs or os.cpu_count() or 1)(
        delayed(_fit_one)(t.X, t.y, img, t.splits, t.task, seed, tuple(Cs), tuple(alphas)) for t in tasks
    )
    return pd.DataFrame([_result_row(feats, t, r) for t, r in zip(tasks, results)])


def _label_splits(feats: GroupFeatures, label: str, folds: int, seed: int):
    """``(task, y, missing, splits)`` of one label: ``row``/``col`` are regression targets (read per
    group later, so ``y`` and ``missing`` are ``None``) split by image; a label column is a
    classification whose images without a value are left out of the stratified splits."""
    img = np.arange(len(feats.names))
    if label in ("row", "col"):
        try:
            gkf = GroupKFold(n_splits=folds, shuffle=True, random_state=seed)
        except TypeError:  # scikit-learn < 1.6: no shuffling
            gkf = GroupKFold(n_splits=folds)
        return "regression", None, None, [(tr, te) for tr, te in gkf.split(img, img, img)]
    if label not in feats.labels:
        raise SinkscopeError(f"unknown label {label!r}; the data has {list(feats.labels.columns)}")
    col = feats.labels[label]
    missing = (col.isna() | col.astype(str).str.strip().isin(["", "nan", "None", "NaN"])).to_numpy()
    y = col.astype(str).to_numpy()
    sub = np.nonzero(~missing)[0]  # images with this label; the others count as missing
    splits = [(sub[tr], sub[te]) for tr, te in outer_splits(y[sub], sub, folds, seed, label)]
    return "classification", y, missing, splits


def _label_tasks(
    feats: GroupFeatures, label: str, groups: list[str], layers: list[int], folds: int, seed: int
) -> list[ProbeTask]:
    """The tasks of one label over every (group, layer) the features have; features of images
    without a target are NaN (left out of the fit). Refuses a label no group can be probed for."""
    task, y_base, missing, splits = _label_splits(feats, label, folds, seed)
    tasks = []
    for g in groups:
        if task == "regression" and g not in POSITION_GROUPS:
            continue
        for layer in layers:
            if (layer, g) not in feats.x:
                continue
            X = feats.x[(layer, g)]
            if task == "classification":
                y = y_base
                if missing.any():
                    X = np.where(missing[:, None], np.nan, X)
            else:
                y = feats.pos[(layer, g)][:, 0 if label == "row" else 1]
                X = np.where(np.isnan(y)[:, None], np.nan, X)
            tasks.append(ProbeTask(layer, g, label, task, X, y, splits))
    if not tasks:
        allowed = ", ".join(POSITION_GROUPS) if task == "regression" else "any"
        raise SinkscopeError(
            f"label {label!r}: none of the groups {groups} can be probed for it (position labels need one of: "
            f"{allowed})"
        )
    return tasks


def _result_row(feats: GroupFeatures, t: ProbeTask, result) -> dict:
    """The table row of one fitted task (``result``: what :func:`_fit_one` returned)."""
    accs, bals, shuf, chosen, n_ok = result
    if t.task == "classification":
        ok = np.isfinite(t.X).all(1)
        freq = pd.Series(t.y[ok]).value_counts(normalize=True)
        chance = float(freq.max()) if len(freq) else np.nan
        chance_bal = 1.0 / len(freq) if len(freq) else np.nan
    else:
        chance = chance_bal = 0.0
    return {
        "layer": t.layer,
        "group": t.group,
        "label": t.label,
        "task": t.task,
        "accuracy": float(np.mean(accs)) if accs else np.nan,
        "accuracy_std": float(np.std(accs)) if accs else np.nan,
        "balanced_accuracy": float(np.mean(bals)) if bals else np.nan,
        "chance": chance,
        "chance_balanced": chance_bal,
        "shuffle_accuracy": float(np.mean(shuf)) if shuf else np.nan,
        "n_images": n_ok,
        "n_tokens": int(feats.n_tokens[(t.layer, t.group)].sum()),
        "n_missing": int(len(feats.names) - n_ok),
        "folds_used": len(accs),
        "C": float(np.median(chosen)) if chosen else np.nan,
    }
