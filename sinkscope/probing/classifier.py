"""The probe and its cross-validation: :class:`LinearProbe` (standardise + L2 logistic regression,
``C`` chosen by inner validation), the image-grouped stratified outer splits, and the
cross-validated score of one feature matrix with its label-shuffle control (:func:`_fit_one`;
ridge with an inner-validated penalty and R2 for position targets).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV, Ridge
from sklearn.metrics import balanced_accuracy_score, r2_score
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold, StratifiedKFold
from sklearn.preprocessing import StandardScaler
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from .._utils import SinkscopeError

DEFAULT_CS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
DEFAULT_ALPHAS = (1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)


class LinearProbe(ClassifierMixin, BaseEstimator):
    """Standardise + L2 logistic regression whose ``C`` is chosen by inner validation.

    Inner folds are grouped by ``groups`` (image ids) when given, so no image straddles an inner
    split either. A scikit-learn estimator: ``fit(X, y, groups=None)``, ``predict``, ``score``.

    >>> LinearProbe().fit(np.r_[np.zeros((10, 2)), np.ones((10, 2))], [0] * 10 + [1] * 10).score(
    ...     np.array([[0, 0], [1, 1.]]), [0, 1])
    1.0
    """

    def __init__(
        self, Cs: Sequence[float] = DEFAULT_CS, inner_folds: int = 3, max_iter: int = 2000, tol: float = 1e-4
    ):
        self.Cs = Cs
        self.inner_folds = inner_folds
        self.max_iter = max_iter
        self.tol = tol

    def fit(self, X, y, groups=None):
        X, y = validate_data(self, X, y, dtype=np.float64)
        check_classification_targets(y)
        self.scaler_ = StandardScaler().fit(X)
        Z = self.scaler_.transform(X)
        self.classes_ = np.unique(y)
        cv = self._inner_splits(Z, y, groups) if len(self.Cs) > 1 else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # sklearn 1.9 announces API changes
            if cv:
                m = LogisticRegressionCV(
                    Cs=sorted(self.Cs), cv=cv, max_iter=self.max_iter, tol=self.tol, scoring="accuracy"
                ).fit(Z, y)
                self.C_ = float(np.atleast_1d(m.C_)[0])
            else:
                self.C_ = float(sorted(self.Cs)[len(self.Cs) // 2])
                m = LogisticRegression(C=self.C_, max_iter=self.max_iter, tol=self.tol).fit(Z, y)
        self.model_ = m
        self.n_iter_ = np.atleast_1d(m.n_iter_).ravel()
        return self

    def _inner_splits(self, Z, y, groups):
        """Inner folds: stratified, grouped by image when an image gives several samples."""
        n_min = int(np.bincount(np.unique(y, return_inverse=True)[1]).min())
        k = min(self.inner_folds, n_min)
        if k < 2:
            return None
        if groups is None or len(np.unique(groups)) == len(groups):
            return list(StratifiedKFold(n_splits=k).split(Z, y))
        return list(StratifiedGroupKFold(n_splits=k).split(Z, y, groups))

    def predict(self, X):
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=np.float64)
        return self.model_.predict(self.scaler_.transform(X))


def outer_splits(
    y: np.ndarray, image_ids: np.ndarray, folds: int, seed: int, label: str = "label"
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified k-fold splits grouped by image; raises if a test image also appears in training.

    >>> [len(te) for _, te in outer_splits(np.array(["a", "b"] * 6), np.arange(12), 3, seed=0)]
    [4, 4, 4]
    """
    counts = pd.Series(y).value_counts()
    if len(counts) < 2:
        raise SinkscopeError(f"label {label!r} has a single class ({counts.index[0]!r}): nothing to probe")
    n_min = int(counts.min())
    if n_min < folds:
        raise SinkscopeError(
            f"label {label!r}: the rarest class ({counts.idxmin()!r}) has {n_min} images, fewer than {folds} folds: "
            "lower --folds"
        )
    splits = list(
        StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed).split(y, y, image_ids)
    )
    for tr, te in splits:
        if set(image_ids[tr]) & set(image_ids[te]):
            raise AssertionError("an image is in both the training and the test fold")
    return splits


def _fit_one(X, y, img, splits, task, seed, Cs, alphas):
    """Cross-validated score of one feature matrix: ``(per-fold scores, balanced accuracies,
    shuffle-control scores, chosen C or alpha, images with a value)``; rows with a NaN are left
    out, and so is a fold left with too little to fit."""
    ok = np.isfinite(X).all(1) & (np.isfinite(y) if task == "regression" else np.ones(len(y), bool))
    accs, bals, shuf, chosen = [], [], [], []
    rng = np.random.default_rng(seed)
    for tr, te in splits:
        tr, te = tr[ok[tr]], te[ok[te]]
        if len(tr) < 4 or len(te) == 0 or (task == "classification" and len(np.unique(y[tr])) < 2):
            continue
        if task == "classification":
            acc, bal, c, shuffled = _classifier_fold(X, y, img, tr, te, Cs, rng)
            bals.append(bal)
            if shuffled is not None:
                shuf.append(shuffled)
        else:
            acc, c, shuffled = _ridge_fold(X, y, img, tr, te, alphas, rng)
            shuf.append(shuffled)
        accs.append(acc)
        chosen.append(c)
    return accs, bals, shuf, chosen, int(ok.sum())


def _classifier_fold(X, y, img, tr, te, Cs, rng) -> tuple[float, float, float, float | None]:
    """One outer fold of a classification probe: ``(accuracy, balanced accuracy, chosen C,
    accuracy of the same pipeline on shuffled training labels or None when those are one class)``."""
    m = LinearProbe(Cs=Cs).fit(X[tr], y[tr], groups=img[tr])
    pred = m.predict(X[te])
    ys = rng.permutation(y[tr])  # label-shuffle control: same pipeline, labels broken
    shuffled = None
    if len(np.unique(ys)) > 1:
        ctl = LinearProbe(Cs=(m.C_,)).fit(X[tr], ys)
        shuffled = float((ctl.predict(X[te]) == y[te]).mean())
    return float((pred == y[te]).mean()), float(balanced_accuracy_score(y[te], pred)), m.C_, shuffled


def _ridge_fold(X, y, img, tr, te, alphas, rng) -> tuple[float, float, float]:
    """One outer fold of a position probe: ``(R2, alpha chosen by inner grouped validation, R2 on
    shuffled training targets)``; standardisation fitted on the training fold."""
    sc = StandardScaler().fit(X[tr])
    Ztr, Zte = sc.transform(X[tr]), sc.transform(X[te])
    inner = GroupKFold(n_splits=3)
    best, best_s = alphas[0], -np.inf
    for a in alphas:
        s = np.mean(
            [
                r2_score(y[tr][v], Ridge(alpha=a).fit(Ztr[t], y[tr][t]).predict(Ztr[v]))
                for t, v in inner.split(Ztr, y[tr], img[tr])
            ]
        )
        if s > best_s:
            best, best_s = a, s
    r2 = float(r2_score(y[te], Ridge(alpha=best).fit(Ztr, y[tr]).predict(Zte)))
    ys = rng.permutation(y[tr])
    return r2, best, float(r2_score(y[te], Ridge(alpha=best).fit(Ztr, ys).predict(Zte)))
