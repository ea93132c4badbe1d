"""Pooled group features: run the model once over a labelled set, keep one vector per (image,
layer, token group), and cache them on disk so a second run does not run the model.

:class:`GroupFeatures` holds the vectors (and saves/loads them: ``features.safetensors``,
``labels.csv``, ``meta.json``); :func:`features_key` is the cache key; :func:`extract_group_features`
runs the batches (the vectors themselves come from :mod:`~sinkscope.probing.groups`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .._utils import SinkscopeError, cache_dir, progress_bar
from ..capture import Capture, parse_layers
from ..data import LabeledImages
from ..models.base import Adapter
from ..sinks import NormRule, rule_to_dict
from .groups import GROUPS, _group_vectors

log = logging.getLogger("sinkscope")


@dataclass
class GroupFeatures:
    """One vector per (layer, group, image). ``x[(layer, group)]``: ``[n_images, D]`` float32 (NaN
    rows where the image has no such token, e.g. no sink); ``n_tokens[(layer, group)]``: tokens
    averaged per image; ``pos[(layer, group)]``: ``[n_images, 2]`` mean (row, col) of those tokens.

    >>> f = GroupFeatures({(1, "cls"): np.ones((2, 3), np.float32)}, {(1, "cls"): np.ones(2, np.int32)},
    ...                   {(1, "cls"): np.zeros((2, 2), np.float32)}, pd.DataFrame({"label": ["a", "b"]}), ["i0", "i1"])
    >>> f.save("runs/features")
    >>> g = GroupFeatures.load("runs/features")
    >>> g.layers, g.groups, g.names, g.x[(1, "cls")].shape
    ([1], ['cls'], ['i0', 'i1'], (2, 3))
    """

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

    >>> from sinkscope.data import load_dataset
    >>> from sinkscope.models import load_model
    >>> data = load_dataset("digits").subsample(20, seed=0)
    >>> f = extract_group_features(load_model("tiny-dinov2+sinks"), data, [2], ["cls", "sink"], cache=False, progress=False)
    >>> f.x[(2, "cls")].shape, len(f.labels), f.meta["cached"]
    ((20, 64), 20, False)
    """
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
        feats = _cached(folder, key)
        if feats is not None:
            return feats
    t0 = time.perf_counter()
    acc, keep_rows, failed = _extract(adapter, data, layer_list, groups, rule, seed, batch_size, progress)
    x, n_tok, pos = _stack(acc)
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


def _cached(folder: Path, key: str) -> GroupFeatures | None:
    """The features cached in ``folder`` when they were made with the settings of ``key``."""
    if (folder / "meta.json").exists() and (folder / "features.safetensors").exists():
        feats = GroupFeatures.load(folder)
        if feats.meta.get("key") == key:
            log.info("reusing cached features %s", folder)
            feats.meta["cached"] = True
            feats.meta["path"] = str(folder)
            return feats
        log.info("features in %s were made with other settings; recomputing", folder)
    return None


def _extract(adapter, data, layer_list, groups, rule, seed, batch_size, progress):
    """The batch loop: ``(acc, keep_rows, failed)`` - the group vectors per (layer, group), the
    rows of the images read, and a record per unreadable image (each reported in one line)."""
    vis = getattr(adapter, "vision", adapter)
    n_all = len(data)
    acc: dict[tuple[int, str], list] = {}
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
    return acc, keep_rows, failed


def _stack(acc: dict[tuple[int, str], list]) -> tuple[dict, dict, dict]:
    """``(x, n_tokens, pos)`` arrays from the per-image (vector, count, position) triples."""
    x, n_tok, pos = {}, {}, {}
    for (layer, g), rows in acc.items():
        vecs, counts, where = zip(*rows)
        x[(layer, g)] = np.stack(vecs).astype(np.float32)
        n_tok[(layer, g)] = np.asarray(counts, np.int32)
        pos[(layer, g)] = np.stack(where).astype(np.float32)
    return x, n_tok, pos
