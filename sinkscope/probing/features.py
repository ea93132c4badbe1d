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
import shutil
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
from ..distributed import DistContext
from ..interventions.rules import VisualSinkRule, resolve_rule, rule_record
from ..models.base import Adapter
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


def _rule_key(rule: Any) -> Any:
    """The rule's part of the cache key (a rule object or string as :func:`features_key` is given it)."""
    from ..interventions.rules import rule_from

    return rule_from(rule).to_dict() if rule is not None else None


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
        [model_id, data.fingerprint(), layers, sorted(groups), _rule_key(rule), seed, image_size, "v3"],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha1(spec.encode()).hexdigest()[:20]


def extract_group_features(
    adapter: Adapter,
    data: LabeledImages,
    layers: str | Sequence[int] | None = "all",
    groups: Sequence[str] = GROUPS,
    rule: Any = None,
    seed: int = 0,
    batch_size: int = 16,
    cache: bool | str | Path = True,
    progress: bool = True,
    dist: DistContext | None = None,
    parts: str | Path | None = None,
) -> GroupFeatures:
    """Run the model over a labelled set and keep one vector per (image, layer, group).

    ``rule`` decides sink membership among each image's patches at each layer (anything
    :func:`~sinkscope.interventions.rule_from` reads, without ``@LAYER``; default: the model's
    :func:`~sinkscope.interventions.default_rule`; ``meta["rule"]`` records it and why).
    ``cache``: ``True`` keeps features under the user cache keyed by model, data, layers, groups,
    rule and seed, so a second call does not run the model; a path chooses the folder.
    Unreadable images are reported in one line each and skipped (they get no labels row).

    ``dist`` (:func:`sinkscope.distributed.context`, under ``accelerate launch``): data-parallel
    extraction. Batch ``b`` goes to process ``b % N``; each process writes the features of its
    batches into ``parts/rank{r}/`` (``parts``: a folder every process sees; default the cache
    folder's ``parts/``), waits for the others, and the main process merges the parts in the item
    order - the same arrays in the same order as one process - caches them and removes the parts;
    it returns the merged features, another process those of its own batches. Features found in
    the cache are returned by every process without running the model.

    >>> from sinkscope.data import load_dataset
    >>> from sinkscope.models import load_model
    >>> data = load_dataset("digits").subsample(20, seed=0)
    >>> f = extract_group_features(load_model("tiny-dinov2+sinks"), data, [2], ["cls", "sink"], cache=False, progress=False)
    >>> f.x[(2, "cls")].shape, len(f.labels), f.meta["cached"]
    ((20, 64), 20, False)
    """
    rule, why = resolve_rule(adapter, rule, cls=False)
    rule.check_for("probe", every_layer=True)
    bad = [g for g in groups if g not in GROUPS]
    if bad:
        raise SinkscopeError(f"unknown token group(s) {bad}; choose from {', '.join(GROUPS)}")
    if batch_size < 1:
        raise SinkscopeError(f"batch size must be >= 1, got {batch_size}")
    layer_list = parse_layers(layers, adapter.n_layers)
    key = features_key(adapter, data, layer_list, groups, rule, seed, None)
    folder = None
    cached = None
    if cache:
        folder = Path(cache) if not isinstance(cache, bool) else cache_dir("features", key)
        cached = _cached(folder, key)
    meta = {
        "model": adapter.name,
        "dataset": data.name,
        "dataset_fingerprint": data.fingerprint(),
        "layers": layer_list,
        "groups": list(groups),
        "rule": rule_record(rule, why),
        "seed": seed,
        "key": key,
    }
    run = _Extraction(adapter, data, layer_list, groups, rule, seed, meta)
    if dist is not None:
        if parts is None and folder is None:
            raise SinkscopeError(
                "features under several processes need a folder every process sees for the parts "
                "(parts=..., or the feature cache)"
            )
        return _extract_sharded(
            run,
            dist,
            Path(parts) if parts is not None else folder / "parts",
            cached,
            folder,
            batch_size,
            progress,
        )
    if cached is not None:
        return cached
    t0 = time.perf_counter()
    acc, keep_rows, failed = run.extract(_batches(range(len(data)), batch_size), progress)
    if not keep_rows:
        raise SinkscopeError(f"no image of {data.name!r} could be read")
    feats = run.features(*_stack(acc), keep_rows, _strip(failed), t0)
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


def _batches(indices: Sequence[int], batch_size: int) -> list[list[int]]:
    """``indices`` (consecutive runs of item indices) cut into batches of ``batch_size``."""
    idx = list(indices)
    return [idx[s : s + batch_size] for s in range(0, len(idx), batch_size)]


@dataclass
class _Extraction:
    """One extraction's model, data and settings: runs batches (:meth:`extract`) and wraps the
    stacked vectors up as :class:`GroupFeatures` (:meth:`features`)."""

    adapter: Adapter
    data: LabeledImages
    layer_list: list[int]
    groups: Sequence[str]
    rule: VisualSinkRule
    seed: int
    meta: dict[str, Any]

    def extract(self, batches: list[list[int]], progress: bool):
        """The batch loop over ``batches`` (item indices): ``(acc, keep_rows, failed)`` - the group
        vectors per (layer, group), the rows of the images read, and a record (``index, image,
        reason``) per unreadable image (each reported in one line)."""
        adapter, data = self.adapter, self.data
        vis = getattr(adapter, "vision", adapter)
        acc: dict[tuple[int, str], list] = {}
        keep_rows: list[int] = []
        failed: list[dict] = []
        bar = progress_bar(sum(map(len, batches)), enabled=progress, desc=f"features {adapter.name}")
        with Capture(adapter, layers=self.layer_list, keep=self.layer_list) as cap:
            for idx in batches:
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
                        failed.append({"index": i, "image": it.name, "reason": str(e)})
                if ok:
                    inputs = adapter.prepare(arrays, [data.items[i].name for i in ok], min_side=data.min_side)
                    bc = cap.run(inputs)
                    _group_vectors(
                        bc, inputs.layouts, ok, self.layer_list, self.groups, self.rule, self.seed, acc
                    )
                    keep_rows.extend(ok)
                bar.update(len(idx))
        bar.close()
        return acc, keep_rows, failed

    def features(self, x, n_tok, pos, keep_rows: list[int], failed: list[dict], t0: float) -> GroupFeatures:
        data = self.data
        return GroupFeatures(
            x,
            n_tok,
            pos,
            data.labels.iloc[keep_rows].reset_index(drop=True).astype(str),
            [data.items[i].name for i in keep_rows],
            {**self.meta, "failed": failed, "extract_s": round(time.perf_counter() - t0, 3), "cached": False},
        )


def _stack(acc: dict[tuple[int, str], list]) -> tuple[dict, dict, dict]:
    """``(x, n_tokens, pos)`` arrays from the per-image (vector, count, position) triples."""
    x, n_tok, pos = {}, {}, {}
    for (layer, g), rows in acc.items():
        vecs, counts, where = zip(*rows)
        x[(layer, g)] = np.stack(vecs).astype(np.float32)
        n_tok[(layer, g)] = np.asarray(counts, np.int32)
        pos[(layer, g)] = np.stack(where).astype(np.float32)
    return x, n_tok, pos


# -- several processes (accelerate launch): each extracts its batches, the main process merges ---


def _extract_sharded(
    run: _Extraction,
    dist: DistContext,
    parts: Path,
    cached: GroupFeatures | None,
    folder: Path | None,
    batch_size: int,
    progress: bool,
) -> GroupFeatures:
    """Extract this process' batches into ``parts/rank{r}``, wait for every process, and (the main
    process) merge the parts. Every process passes exactly one barrier, cached or not."""
    t0 = time.perf_counter()
    own = parts / f"rank{dist.rank}"
    if own.exists():
        shutil.rmtree(own)  # an earlier run's part
    mine = None
    if cached is None:
        rows = dist.shard_batches(len(run.data), batch_size)
        acc, keep_rows, failed = run.extract(_batches(rows, batch_size), progress)
        mine = (*_stack(acc), keep_rows, failed)
        _write_part(own, mine, list(acc), run.meta["key"])
    dist.barrier()  # every process has written its part (or found the features cached)
    if cached is not None:
        return cached
    assert mine is not None
    if not dist.is_main:
        x, n_tok, pos, keep_rows, failed = mine
        return run.features(x, n_tok, pos, keep_rows, _strip(failed), t0)
    x, n_tok, pos, keep_rows, failed = _merge_parts(
        [_read_part(parts / f"rank{r}", r, run.meta["key"]) for r in range(dist.num_processes)]
    )
    shutil.rmtree(parts, ignore_errors=True)
    if not keep_rows:
        raise SinkscopeError(f"no image of {run.data.name!r} could be read")
    feats = run.features(x, n_tok, pos, keep_rows, _strip(failed), t0)
    if folder is not None:
        feats.save(folder)
        feats.meta["path"] = str(folder)
    return feats


def _strip(failed: list[dict]) -> list[dict]:
    return [{"image": f["image"], "reason": f["reason"]} for f in failed]


def _write_part(path: Path, part, keys: list[tuple[int, str]], key: str) -> None:
    """One process' features: ``features.safetensors`` (its vectors, counts and positions, and
    ``rows``, the item index of each) and ``part.json`` (the (layer, group) order, the unreadable
    images and the features key)."""
    from safetensors.numpy import save_file

    x, n_tok, pos, keep_rows, failed = part
    path.mkdir(parents=True, exist_ok=True)
    arrays = {"rows": np.asarray(keep_rows, np.int64)}
    for layer, g in keys:
        arrays[f"x/{layer}/{g}"] = x[(layer, g)]
        arrays[f"n/{layer}/{g}"] = n_tok[(layer, g)]
        arrays[f"pos/{layer}/{g}"] = pos[(layer, g)]
    save_file(arrays, str(path / "features.safetensors"))
    info = {"key": key, "keys": [[layer, g] for layer, g in keys], "failed": failed}
    (path / "part.json").write_text(json.dumps(info))


def _read_part(path: Path, rank: int, key: str):
    from safetensors.numpy import load_file

    if not (path / "part.json").exists():
        raise SinkscopeError(
            f"process {rank} wrote no features into {path} (did it find them cached when this one did not? "
            "every process must see the same feature cache)"
        )
    info = json.loads((path / "part.json").read_text())
    if info["key"] != key:
        raise SinkscopeError(f"the features of process {rank} in {path} were made with other settings")
    arrays = load_file(str(path / "features.safetensors"))
    keys = [(int(layer), g) for layer, g in info["keys"]]
    pick = {k: {(layer, g): arrays[f"{k}/{layer}/{g}"] for layer, g in keys} for k in ("x", "n", "pos")}
    return pick["x"], pick["n"], pick["pos"], arrays["rows"].tolist(), info["failed"], keys


def _merge_parts(parts):
    """Every process' features in the item order: ``(x, n_tokens, pos, keep_rows, failed)``."""
    rows = [r for p in parts for r in p[3]]
    order = np.argsort(np.asarray(rows, np.int64), kind="stable")
    keys = next((p[5] for p in parts if p[3]), [])
    x, n_tok, pos = {}, {}, {}
    for out, j in ((x, 0), (n_tok, 1), (pos, 2)):
        for k in keys:
            out[k] = np.concatenate([p[j][k] for p in parts if p[3]])[order]
    failed = sorted((f for p in parts for f in p[4]), key=lambda f: f["index"])
    return x, n_tok, pos, [rows[i] for i in order], failed
