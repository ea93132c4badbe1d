"""Linear probes on sink and non-sink tokens, layer by layer.

The paper's central evidence is that sink tokens carry global information (CLIP: object class
0.865 from sinks vs 0.512 from non-sinks) and Darcet et al. found outlier tokens good for image
classification and bad for position prediction. This module makes that experiment rigorous:

1. :func:`extract_group_features` runs the model once, batch by batch, and keeps one vector per
   (image, layer, token group) - ``cls``, ``registers``, ``mean`` (of patches), ``random`` (one
   random patch, Darcet's protocol), ``sink`` (mean of the image's sink patches), ``nonsink``
   (mean of the other patches), ``nonsink_random`` (one random non-sink patch) and ``matched``
   (for each sink, the nearest non-sink patch on the grid, ties by the closest norm: a
   position- and norm-matched control). Group membership comes from a norm rule of
   :mod:`sinkscope.sinks`, recorded with the features; images without a sink at a layer are
   counted, not dropped silently. Features are cached on disk: a second run does not run the model.
2. :func:`run_probes` fits every (layer, group, label) with the same image-grouped, stratified
   k-fold splits: standardisation fitted on the training fold only, L2 logistic regression with
   its strength chosen by inner (grouped) validation, a label-shuffle control and the chance
   level. Regression targets (``row``/``col`` of a single-token group, Darcet's position probe) use
   ridge with an inner-validated penalty and report R2.

>>> feats = extract_group_features(load_model("dinov2-small"), load_dataset("lfw-faces"))  # doctest: +SKIP
>>> table = run_probes(feats, folds=5, seed=0)                                            # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV, Ridge
from sklearn.metrics import balanced_accuracy_score, r2_score
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold, StratifiedKFold
from sklearn.preprocessing import StandardScaler
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from ._utils import SinkscopeError, cache_dir, package_versions
from .capture import Capture, parse_layers
from .data import LabeledImages
from .models.base import Adapter
from .sinks import NormRule, rule_to_dict

log = logging.getLogger("sinkscope")

GROUPS = ("cls", "registers", "mean", "random", "sink", "nonsink", "nonsink_random", "matched")
SINGLE_TOKEN_GROUPS = ("random", "nonsink_random")
#: Groups probed by default. ``nonsink`` pools nearly every patch (a global average pool) while
#: ``sink`` pools the image's few sinks, so ``nonsink_random`` (one random non-sink patch) is the
#: single-token control the paper's non-sink accuracy (0.512 for CLIP) is closer to.
DEFAULT_GROUPS = ("cls", "mean", "random", "sink", "nonsink", "nonsink_random")
DEFAULT_CS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
DEFAULT_ALPHAS = (1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)


# -- features -----------------------------------------------------------------------------------


@dataclass
class GroupFeatures:
    """One vector per (layer, group, image). ``x[(layer, group)]``: ``[n_images, D]`` float32 (NaN
    rows where the image has no such token, e.g. no sink); ``n_tokens[(layer, group)]``: tokens
    averaged per image; ``pos[(layer, group)]``: ``[n_images, 2]`` mean (row, col) of those tokens."""

    x: dict[tuple[int, str], np.ndarray]
    n_tokens: dict[tuple[int, str], np.ndarray]
    pos: dict[tuple[int, str], np.ndarray]
    labels: pd.DataFrame
    names: list[str]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def layers(self) -> list[int]:
        return sorted({layer for layer, _ in self.x})

    @property
    def groups(self) -> list[str]:
        return [g for g in GROUPS if any(k[1] == g for k in self.x)]

    def save(self, path: str | Path) -> None:
        from safetensors.numpy import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        arrays = {}
        for (layer, g), v in self.x.items():
            arrays[f"x/{layer}/{g}"] = v
            arrays[f"n/{layer}/{g}"] = self.n_tokens[(layer, g)]
            arrays[f"pos/{layer}/{g}"] = self.pos[(layer, g)]
        tmp = path / "features.safetensors.tmp"
        save_file(arrays, str(tmp))
        os.replace(tmp, path / "features.safetensors")
        self.labels.to_csv(path / "labels.csv", index=False)
        (path / "meta.json").write_text(json.dumps({**self.meta, "names": self.names}, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> GroupFeatures:
        from safetensors.numpy import load_file

        path = Path(path)
        arrays = load_file(str(path / "features.safetensors"))
        meta = json.loads((path / "meta.json").read_text())
        x, n, pos = {}, {}, {}
        for key, v in arrays.items():
            kind, layer, g = key.split("/")
            {"x": x, "n": n, "pos": pos}[kind][(int(layer), g)] = v
        labels = pd.read_csv(path / "labels.csv", dtype=str, keep_default_na=False)
        names = meta.pop("names")
        return cls(x, n, pos, labels, names, meta)


def _check_rule(rule: NormRule) -> None:
    if not isinstance(rule, NormRule) or (rule.mode == "auto" and rule.auto_scope != "image"):
        raise SinkscopeError(
            "probe groups need a per-image norm rule: NormRule(threshold=...), NormRule(relative=...) "
            "or NormRule(auto_scope='image')"
        )


def features_key(adapter: Adapter, data: LabeledImages, layers, groups, rule, seed, image_size) -> str:
    """Cache key: the model (name, structure, planted sinks, dtype, input size), the data (sources,
    file sizes and times, labels), layers, groups, rule and seed."""
    vis = getattr(adapter, "vision", adapter)
    planted = getattr(adapter, "planted", None)
    model_id = [
        adapter.name,
        adapter.describe(),
        planted.to_dict() if planted else None,
        str(adapter.dtype),
        getattr(vis, "image_size", None),
    ]
    spec = json.dumps(
        [model_id, data.fingerprint(), layers, sorted(groups), rule_to_dict(rule), seed, image_size, "v2"],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha1(spec.encode()).hexdigest()[:20]


def extract_group_features(
    adapter: Adapter,
    data: LabeledImages,
    layers: str | Sequence[int] | None = "all",
    groups: Sequence[str] = GROUPS,
    rule: NormRule | None = None,
    seed: int = 0,
    batch_size: int = 16,
    cache: bool | str | Path = True,
    progress: bool = True,
) -> GroupFeatures:
    """Run the model over a labelled set and keep one vector per (image, layer, group).

    ``rule`` decides sink membership per image and layer (default: ``NormRule(relative=5)``).
    ``cache``: ``True`` keeps features under the user cache keyed by model, data, layers, groups,
    rule and seed, so a second call does not run the model; a path chooses the folder.
    Unreadable images are reported in one line each and skipped (they get no labels row).
    """
    from ._utils import progress_bar

    rule = rule or NormRule(relative=5.0)
    _check_rule(rule)
    bad = [g for g in groups if g not in GROUPS]
    if bad:
        raise SinkscopeError(f"unknown token group(s) {bad}; choose from {', '.join(GROUPS)}")
    layer_list = parse_layers(layers, adapter.n_layers)
    key = features_key(adapter, data, layer_list, groups, rule, seed, None)
    folder = None
    if cache:
        folder = Path(cache) if not isinstance(cache, bool) else cache_dir("features", key)
        if (folder / "meta.json").exists() and (folder / "features.safetensors").exists():
            feats = GroupFeatures.load(folder)
            if feats.meta.get("key") == key:
                log.info("reusing cached features %s", folder)
                feats.meta["cached"] = True
                feats.meta["path"] = str(folder)
                return feats
            log.info("features in %s were made with other settings; recomputing", folder)
    t0 = time.perf_counter()
    vis = getattr(adapter, "vision", adapter)
    n_all = len(data)
    acc: dict[tuple[int, str], list[np.ndarray]] = {}
    keep_rows: list[int] = []
    failed: list[dict] = []
    bar = progress_bar(n_all, enabled=progress, desc=f"features {adapter.name}")
    with Capture(adapter, layers=layer_list, keep=layer_list) as cap:
        for start in range(0, n_all, batch_size):
            idx = list(range(start, min(start + batch_size, n_all)))
            arrays, ok = [], []
            for i in idx:
                it = data.items[i]
                try:
                    a = it.load()
                    vis.check_image(a.shape[0], a.shape[1], it.name, min_side=data.min_side)
                    arrays.append(a)
                    ok.append(i)
                except SinkscopeError as e:
                    log.error("%s", e)
                    failed.append({"image": it.name, "reason": str(e)})
            if ok:
                inputs = adapter.prepare(arrays, [data.items[i].name for i in ok], min_side=data.min_side)
                bc = cap.run(inputs)
                _group_vectors(bc, inputs.layouts, ok, layer_list, groups, rule, seed, acc)
                keep_rows.extend(ok)
            bar.update(len(idx))
    bar.close()
    if not keep_rows:
        raise SinkscopeError(f"no image of {data.name!r} could be read")
    x, n_tok, pos = {}, {}, {}
    for (layer, g), rows in acc.items():
        vecs, counts, where = zip(*rows)
        x[(layer, g)] = np.stack(vecs).astype(np.float32)
        n_tok[(layer, g)] = np.asarray(counts, np.int32)
        pos[(layer, g)] = np.stack(where).astype(np.float32)
    feats = GroupFeatures(
        x,
        n_tok,
        pos,
        data.labels.iloc[keep_rows].reset_index(drop=True).astype(str),
        [data.items[i].name for i in keep_rows],
        {
            "model": adapter.name,
            "dataset": data.name,
            "dataset_fingerprint": data.fingerprint(),
            "layers": layer_list,
            "groups": list(groups),
            "rule": rule_to_dict(rule),
            "seed": seed,
            "key": key,
            "failed": failed,
            "extract_s": round(time.perf_counter() - t0, 3),
            "cached": False,
        },
    )
    if folder is not None:
        feats.save(folder)
        feats.meta["path"] = str(folder)
    return feats


_NAN2 = np.array([np.nan, np.nan], np.float32)


def _mean_of(h: torch.Tensor, tokens, rc: np.ndarray, p0: int, grid: bool):
    """(mean vector, token count, mean (row, col)) of ``tokens``; NaNs when there are none."""
    if len(tokens) == 0:
        return np.full(h.shape[1], np.nan, np.float32), 0, _NAN2
    where = rc[np.asarray(tokens) - p0].mean(0) if grid else _NAN2
    return h[torch.as_tensor(tokens)].mean(0).numpy(), len(tokens), where


def _group_vectors(bc, layouts, rows, layers, groups, rule: NormRule, seed: int, acc) -> None:
    """Per image and layer, the vector of every group (NaN when the image has none)."""
    for b, (row, lay) in enumerate(zip(rows, layouts)):
        n, p0 = lay.n_tokens, lay.n_prefix
        patches = np.arange(p0, n)
        rc = np.array([lay.row_col(t) for t in patches], dtype=float) if lay.grid else np.zeros((0, 2))
        # one random patch per image, the same at every layer (Darcet et al.)
        rng_img = np.random.default_rng([seed, row, 1])
        rand_tok = int(rng_img.choice(patches)) if len(patches) else -1
        for li, layer in enumerate(bc.layers):
            if layer not in layers:
                continue
            h = bc.hidden[layer][b, :n].float()  # [tokens, D]
            norms = bc.norms[b, li, :n].numpy()
            sink_mask = rule.mask([norms[p0:]])[0]  # the rule's own per-image mask (patches only)
            sinks, others = patches[sink_mask], patches[~sink_mask]

            def mean_of(tokens, h=h, rc=rc, p0=p0, grid=lay.grid is not None):
                return _mean_of(h, tokens, rc, p0, grid)

            nan, nanpos = mean_of([])[0], _NAN2

            for g in groups:
                if g == "cls":
                    v = (h[0].numpy(), 1, nanpos) if lay.n_cls else (nan, 0, nanpos)
                elif g == "registers":
                    v = mean_of(list(range(lay.n_cls, p0)))
                    v = (v[0], v[1], nanpos)
                elif g == "mean":
                    v = mean_of(patches)
                elif g == "random":
                    v = mean_of([rand_tok] if rand_tok >= 0 else [])
                elif g == "sink":
                    v = mean_of(sinks)
                elif g == "nonsink":
                    v = mean_of(others)
                elif g == "nonsink_random":
                    rng = np.random.default_rng([seed, row, 2, layer])
                    v = mean_of([int(rng.choice(others))] if len(others) else [])
                else:  # matched: per sink, the nearest non-sink patch (ties: closest norm)
                    picks = []
                    for s in sinks:
                        d = np.abs(rc[others - p0] - rc[s - p0]).max(1) if len(others) else np.array([])
                        if len(d) == 0:
                            continue
                        near = others[d == d.min()]
                        picks.append(int(near[np.argmin(np.abs(norms[near] - norms[s]))]))
                    v = mean_of(picks)
                acc.setdefault((layer, g), []).append(v)


# -- the probe ----------------------------------------------------------------------------------


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
    """Stratified k-fold splits grouped by image; raises if a test image also appears in training."""
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
    """Cross-validated score of one feature matrix: (per-fold scores, balanced acc, shuffle, chosen C)."""
    ok = np.isfinite(X).all(1) & (np.isfinite(y) if task == "regression" else np.ones(len(y), bool))
    accs, bals, shuf, chosen = [], [], [], []
    rng = np.random.default_rng(seed)
    for tr, te in splits:
        tr, te = tr[ok[tr]], te[ok[te]]
        if len(tr) < 4 or len(te) == 0 or (task == "classification" and len(np.unique(y[tr])) < 2):
            continue
        if task == "classification":
            m = LinearProbe(Cs=Cs).fit(X[tr], y[tr], groups=img[tr])
            pred = m.predict(X[te])
            accs.append(float((pred == y[te]).mean()))
            bals.append(float(balanced_accuracy_score(y[te], pred)))
            chosen.append(m.C_)
            ys = rng.permutation(y[tr])  # label-shuffle control: same pipeline, labels broken
            if len(np.unique(ys)) > 1:
                ctl = LinearProbe(Cs=(m.C_,)).fit(X[tr], ys)
                shuf.append(float((ctl.predict(X[te]) == y[te]).mean()))
        else:
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
            accs.append(float(r2_score(y[te], Ridge(alpha=best).fit(Ztr, y[tr]).predict(Zte))))
            chosen.append(best)
            ys = rng.permutation(y[tr])
            shuf.append(float(r2_score(y[te], Ridge(alpha=best).fit(Ztr, ys).predict(Zte))))
    return accs, bals, shuf, chosen, int(ok.sum())


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
    """
    from joblib import Parallel, delayed

    labels = list(labels) if labels else list(feats.labels.columns)
    groups = [g for g in (groups or feats.groups) if any(k[1] == g for k in feats.x)]
    layers = list(layers) if layers is not None else feats.layers
    n = len(feats.names)
    img = np.arange(n)
    tasks = []
    if folds < 2:
        raise SinkscopeError(f"--folds must be at least 2, got {folds}")
    if folds > n:
        raise SinkscopeError(f"--folds {folds} is more than the {n} images")
    for label in labels:
        missing = None
        if label in ("row", "col"):
            task = "regression"
            y_base = None
            try:
                gkf = GroupKFold(n_splits=folds, shuffle=True, random_state=seed)
            except TypeError:  # scikit-learn < 1.6: no shuffling
                gkf = GroupKFold(n_splits=folds)
            splits = [(tr, te) for tr, te in gkf.split(img, img, img)]
        else:
            if label not in feats.labels:
                raise SinkscopeError(f"unknown label {label!r}; the data has {list(feats.labels.columns)}")
            task = "classification"
            col = feats.labels[label]
            missing = (col.isna() | col.astype(str).str.strip().isin(["", "nan", "None", "NaN"])).to_numpy()
            y_base = col.astype(str).to_numpy()
            sub = np.nonzero(~missing)[0]  # images with this label; the others count as missing
            splits = [(sub[tr], sub[te]) for tr, te in outer_splits(y_base[sub], sub, folds, seed, label)]
        for g in groups:
            if task == "regression" and g not in SINGLE_TOKEN_GROUPS + ("sink", "matched"):
                continue
            for layer in layers:
                if (layer, g) not in feats.x:
                    continue
                X = feats.x[(layer, g)]
                y = (
                    y_base
                    if task == "classification"
                    else feats.pos[(layer, g)][:, 0 if label == "row" else 1]
                )
                if task == "regression":
                    X = np.where(np.isnan(y)[:, None], np.nan, X)
                elif missing.any():
                    X = np.where(missing[:, None], np.nan, X)
                tasks.append((layer, g, label, task, X, y, splits))
        if not any(t[2] == label for t in tasks):
            allowed = ", ".join(SINGLE_TOKEN_GROUPS + ("sink", "matched")) if task == "regression" else "any"
            raise SinkscopeError(
                f"label {label!r}: none of the groups {groups} can be probed for it (position labels need one of: "
                f"{allowed})"
            )
    results = Parallel(n_jobs=n_jobs or os.cpu_count() or 1)(
        delayed(_fit_one)(X, y, img, splits, task, seed, tuple(Cs), tuple(alphas))
        for (_, _, _, task, X, y, splits) in tasks
    )
    rows = []
    for (layer, g, label, task, X, y, _), (accs, bals, shuf, chosen, n_ok) in zip(tasks, results):
        if task == "classification":
            ok = np.isfinite(X).all(1)
            freq = pd.Series(y[ok]).value_counts(normalize=True)
            chance = float(freq.max()) if len(freq) else np.nan
            chance_bal = 1.0 / len(freq) if len(freq) else np.nan
        else:
            chance = chance_bal = 0.0
        rows.append(
            {
                "layer": layer,
                "group": g,
                "label": label,
                "task": task,
                "accuracy": float(np.mean(accs)) if accs else np.nan,
                "accuracy_std": float(np.std(accs)) if accs else np.nan,
                "balanced_accuracy": float(np.mean(bals)) if bals else np.nan,
                "chance": chance,
                "chance_balanced": chance_bal,
                "shuffle_accuracy": float(np.mean(shuf)) if shuf else np.nan,
                "n_images": n_ok,
                "n_tokens": int(feats.n_tokens[(layer, g)].sum()),
                "n_missing": int(n - n_ok),
                "folds_used": len(accs),
                "C": float(np.median(chosen)) if chosen else np.nan,
            }
        )
    return pd.DataFrame(rows)


# -- the whole job ------------------------------------------------------------------------------


@dataclass
class ProbeResult:
    """What :func:`probe` returns: the probe table, the summary, the pooled features (``None``
    for a run read back by ``sinkscope.load_run``), the output folder and the run's config."""

    table: pd.DataFrame
    summary: dict[str, Any]
    features: GroupFeatures | None
    out: Path | None = None
    config: Any = None


def probe(
    model: str | Adapter,
    dataset: str | LabeledImages,
    labels: Sequence[str] | None = None,
    groups: Sequence[str] = DEFAULT_GROUPS,
    layers: str | Sequence[int] | None = "all",
    folds: int = 5,
    seed: int = 0,
    rule: NormRule | None = None,
    max_images: int | None = None,
    batch_size: int = 16,
    image_size=None,
    device: str | None = None,
    dtype: str | None = None,
    out: str | Path | None = None,
    cache: bool | str | Path = True,
    progress: bool = True,
    n_jobs: int | None = None,
) -> ProbeResult:
    """Capture group features (once; cached) and probe them; with ``out`` write ``probe.csv``,
    ``summary.json`` and ``probe.html``.

    >>> res = probe("dinov2-small", "lfw-faces", groups=["cls", "mean"], progress=False)   # doctest: +SKIP
    >>> res.table.query("group == 'cls'")[["layer", "accuracy"]]                           # doctest: +SKIP
    """
    from .data import load_dataset
    from .models import load_model

    t0 = time.perf_counter()
    ad = (
        model
        if isinstance(model, Adapter)
        else load_model(model, device=device, dtype=dtype, image_size=image_size)
    )
    if ad.family == "causal-lm":
        raise SinkscopeError(f"model {ad.name!r} is a language model; probes need a vision model or a VLM")
    data = dataset if isinstance(dataset, LabeledImages) else load_dataset(dataset)
    unknown = [x for x in (labels or []) if x not in data.labels.columns and x not in ("row", "col")]
    if unknown:
        raise SinkscopeError(
            f"unknown label {unknown[0]!r}; {data.name!r} has {list(data.labels.columns)} (or row/col)"
        )
    if max_images is not None and max_images < 2:
        raise SinkscopeError(f"--max-images must be at least 2, got {max_images}")
    data = data.subsample(max_images, seed)
    feats = extract_group_features(ad, data, layers, groups, rule, seed, batch_size, cache, progress)
    t1 = time.perf_counter()
    table = run_probes(feats, labels, groups, None, folds, seed, n_jobs=n_jobs)
    t2 = time.perf_counter()
    summary = {
        "model": ad.describe(),
        "dataset": {
            "name": data.name,
            "n_images": len(data),
            "fingerprint": data.fingerprint(),
            "labels": list(labels or feats.labels.columns),
        },
        "rule": feats.meta["rule"],
        "groups": list(groups),
        "layers": feats.layers,
        "folds": folds,
        "seed": seed,
        "protocol": "one pooled vector per (image, layer, group) - e.g. sink = mean of the image's sink "
        "patches - so each image is one sample; stratified k-fold grouped by image; StandardScaler fitted on "
        f"the outer training fold; L2 logistic regression, C in {list(DEFAULT_CS)} chosen by stratified inner "
        "validation (up to 3 folds, fewer if a class is rarer); label-shuffle control with the chosen C; "
        "chance = majority-class share (chance_balanced = 1/K); regression (row/col): ridge, alpha by inner "
        "grouped validation, R2",
        "features": {k: feats.meta.get(k) for k in ("path", "cached", "extract_s", "failed")},
        "images_without_sink": {
            str(layer): int((feats.n_tokens[(layer, "sink")] == 0).sum())
            for layer in feats.layers
            if (layer, "sink") in feats.n_tokens
        },
        "timings": {"features_s": round(t1 - t0, 3), "probes_s": round(t2 - t1, 3)},
        "versions": package_versions(("sinkscope", "torch", "transformers", "scikit-learn", "numpy")),
    }
    res = ProbeResult(table, summary, feats, Path(out) if out is not None else None)
    if out is not None:
        write_probe_outputs(res)
    return res


def write_probe_outputs(res: ProbeResult) -> None:
    out = res.out
    assert out is not None
    out.mkdir(parents=True, exist_ok=True)
    res.table.to_csv(out / "probe.csv", index=False, float_format="%.6f")
    (out / "summary.json").write_text(json.dumps(res.summary, indent=1, default=str))
