"""Linear probes on sink and non-sink tokens, layer by layer.

The paper's central evidence is that sink tokens carry global information (CLIP: object class
0.865 from sinks vs 0.512 from non-sinks) and Darcet et al. found outlier tokens good for image
classification and bad for position prediction. This package makes that experiment rigorous:

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

The modules: :mod:`~sinkscope.probing.groups` (the token groups and their pooled vectors),
:mod:`~sinkscope.probing.features` (the extraction and its cache),
:mod:`~sinkscope.probing.classifier` (:class:`LinearProbe`, the splits, one cross-validated fit),
:mod:`~sinkscope.probing.probes` (:func:`run_probes`) and :mod:`~sinkscope.probing.job`
(:func:`probe`, the summary and the files).

>>> from sinkscope.data import load_dataset
>>> from sinkscope.models import load_model
>>> data = load_dataset("digits").subsample(30, seed=0)
>>> feats = extract_group_features(load_model("tiny-dinov2+sinks"), data, [0, 2], ["cls", "mean"],
...                                cache=False, progress=False)
>>> table = run_probes(feats, folds=3, seed=0, n_jobs=1)
>>> table.groupby("group").size().to_dict(), bool(table.accuracy.between(0, 1).all())
({'cls': 2, 'mean': 2}, True)
"""

from __future__ import annotations

from .classifier import DEFAULT_ALPHAS, DEFAULT_CS, LinearProbe, outer_splits
from .features import GroupFeatures, extract_group_features, features_key
from .groups import DEFAULT_GROUPS, GROUPS, SINGLE_TOKEN_GROUPS
from .job import PROTOCOL, ProbeResult, probe, probe_summary, write_probe_outputs
from .probes import POSITION_GROUPS, ProbeTask, run_probes

__all__ = [
    "DEFAULT_ALPHAS",
    "DEFAULT_CS",
    "DEFAULT_GROUPS",
    "GROUPS",
    "POSITION_GROUPS",
    "PROTOCOL",
    "SINGLE_TOKEN_GROUPS",
    "GroupFeatures",
    "LinearProbe",
    "ProbeResult",
    "ProbeTask",
    "extract_group_features",
    "features_key",
    "outer_splits",
    "probe",
    "probe_summary",
    "run_probes",
    "write_probe_outputs",
]
