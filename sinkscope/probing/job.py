"""The whole probe job: load the model and data, extract (or reuse) the group features, probe
them, and with an output folder write ``probe.csv`` and ``summary.json`` (the page,
``probe.html``, is drawn by :mod:`sinkscope.viz`).

Under ``accelerate launch`` (several processes, :mod:`sinkscope.distributed`) each process
extracts the features of its batches, the main process merges them (the features of one process),
fits the probes alone and writes the run, whose ``summary.json`` records ``"distributed"``; the
other processes wait and return that run, read back from the output folder.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from .. import distributed
from .._utils import SinkscopeError, package_versions
from ..data import LabeledImages
from ..models.base import Adapter
from .classifier import DEFAULT_CS
from .features import GroupFeatures, extract_group_features
from .groups import DEFAULT_GROUPS
from .probes import run_probes

#: how the probes are fitted, recorded in every summary
PROTOCOL = (
    "one pooled vector per (image, layer, group) - e.g. sink = mean of the image's sink "
    "patches - so each image is one sample; stratified k-fold grouped by image; StandardScaler fitted on "
    f"the outer training fold; L2 logistic regression, C in {list(DEFAULT_CS)} chosen by stratified inner "
    "validation (up to 3 folds, fewer if a class is rarer); label-shuffle control with the chosen C; "
    "chance = majority-class share (chance_balanced = 1/K); regression (row/col): ridge, alpha by inner "
    "grouped validation, R2"
)


#: where the processes of a data-parallel probe write their features (removed once merged)
FEATURE_PARTS = "feature-parts"


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
    rule: Any = None,
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

    Under several processes (``accelerate launch``; ``out`` needed) the features are extracted
    data-parallel (batch ``b`` of ``batch_size`` images by process ``b % N``, merged by the main
    process: :func:`~sinkscope.probing.features.extract_group_features`), the main process probes
    alone and writes the run with ``summary["distributed"]``; the others wait, then return the
    written run read back (``features=None``, ``summary["distributed"]["rank"]`` their rank).

    >>> res = probe("tiny-dinov2+sinks", "digits", groups=["cls", "mean"], layers=[0, 2], folds=3,
    ...             max_images=30, cache=False, progress=False, n_jobs=1)
    >>> res.table[["layer", "group", "n_images"]].values.tolist()
    [[0, 'cls', 30], [2, 'cls', 30], [0, 'mean', 30], [2, 'mean', 30]]
    >>> res.summary["dataset"]["labels"], res.summary["folds"]
    (['label'], 3)
    """
    from ..data import load_dataset
    from ..models import load_model

    t0 = time.perf_counter()
    dist, device, progress = distributed.context_for("probe", out, device, progress)
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
    parts = Path(out) / FEATURE_PARTS if dist is not None else None
    feats = extract_group_features(
        ad, data, layers, groups, rule, seed, batch_size, cache, progress, dist=dist, parts=parts
    )
    if dist is not None and not dist.is_main:
        dist.barrier()  # the main process fits the probes and writes the run
        return _read_back(Path(out), dist.rank)
    t1 = time.perf_counter()
    table = run_probes(feats, labels, groups, None, folds, seed, n_jobs=n_jobs)
    t2 = time.perf_counter()
    timings = {"features_s": round(t1 - t0, 3), "probes_s": round(t2 - t1, 3)}
    summary = probe_summary(ad, data, feats, labels, groups, folds, seed, timings)
    if dist is not None:
        summary["distributed"] = {
            **dist.summary(len(data), batch_size),
            "probes": "fitted by the main process alone, on the merged features",
        }
    res = ProbeResult(table, summary, feats, Path(out) if out is not None else None)
    if out is not None:
        write_probe_outputs(res)
    if dist is not None:
        dist.barrier()  # the others return once the run is written
    return res


def _read_back(out: Path, rank: int) -> ProbeResult:
    """The run the main process wrote, as process ``rank`` of a data-parallel probe returns it."""
    summary = json.loads((out / "summary.json").read_text())
    summary["distributed"]["rank"] = rank
    return ProbeResult(pd.read_csv(out / "probe.csv"), summary, None, out)


def probe_summary(
    ad: Adapter,
    data: LabeledImages,
    feats: GroupFeatures,
    labels: Sequence[str] | None,
    groups: Sequence[str],
    folds: int,
    seed: int,
    timings: dict[str, float],
) -> dict[str, Any]:
    """The ``summary.json`` of a probe: model, data, rule, protocol, feature cache, images without
    a sink per layer, timings and package versions."""
    return {
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
        "protocol": PROTOCOL,
        "features": {k: feats.meta.get(k) for k in ("path", "cached", "extract_s", "failed")},
        "images_without_sink": {
            str(layer): int((feats.n_tokens[(layer, "sink")] == 0).sum())
            for layer in feats.layers
            if (layer, "sink") in feats.n_tokens
        },
        "timings": timings,
        "versions": package_versions(("sinkscope", "torch", "transformers", "scikit-learn", "numpy")),
    }


def write_probe_outputs(res: ProbeResult) -> None:
    """Write ``probe.csv`` and ``summary.json`` into ``res.out``."""
    out = res.out
    assert out is not None
    out.mkdir(parents=True, exist_ok=True)
    res.table.to_csv(out / "probe.csv", index=False, float_format="%.6f")
    (out / "summary.json").write_text(json.dumps(res.summary, indent=1, default=str))
