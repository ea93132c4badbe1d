"""The ``summary`` of a word-distribution decoding run: what was run, the headline rates, caveats.

:func:`decode_summary` gathers the model, the data (images per label, words, control labels), the
sink rule, the settings, the rates of :func:`~sinkscope.flow.decode_stats.rate_summary` and the
caveats a reader needs (dependent tokens, a surrogate rule, images without sink, an untrained
projector, skipped or enlarged images). It is JSON as it stands (``summary.json``).

>>> from sinkscope.flow.decode_select import TopNormRule
>>> caveats(TopNormRule(2), n_without_sink=0, n_images=4)[1][:27]
"the 'sinks' are a surrogate"
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from .decode_select import as_rule, sink_rule_to_dict
from .decode_stats import rate_summary
from .decode_words import WORD_MARKERS

ANALYSIS = "word-distribution decoding of isolated visual tokens (paper analysis 3)"


def decode_summary(ad, ds, col, labels, wsets, rule, settings, rates, n_without_sink, reason: str = "given") -> dict[str, Any]:
    """The summary of one run: ``ad`` the adapter, ``ds`` the (subsampled) data set, ``col`` its
    label column, ``labels`` one per image, ``wsets`` the normalised words per label, ``settings``
    the run's settings (``top_k, nonsinks_per_image, seed, method, prompt, chat_template,
    ci_method, confidence``), ``rates`` its :func:`~sinkscope.flow.decode_stats.rate_table`,
    ``reason`` why the sink ``rule`` was used."""
    top_k, method, confidence = settings["top_k"], settings["method"], settings["confidence"]
    counts = pd.Series(labels).value_counts().to_dict()
    summary: dict[str, Any] = {
        "analysis": ANALYSIS,
        "model": ad.describe(),
        "dataset": ds.name,
        "label_column": col,
        "n_images": len(labels),
        "images_per_label": {str(k): int(v) for k, v in counts.items()},
        "words": {k: sorted(v) for k, v in wsets.items()},
        "control_labels": sorted({lab for lab in labels if lab not in wsets}),
        "word_matching": "case- and space-insensitive exact match after removing word-start markers "
        f"{list(WORD_MARKERS)}; a token hits when any of its top-{top_k} decoded tokens is a word of its "
        "image's label (control images: a word of any label)",
        "sink_rule": sink_rule_to_dict(rule, reason),
        "feature_layer": ad.feature_layer,
        "select_strategy": ad.select_strategy,
        **{k: settings[k] for k in ("top_k", "nonsinks_per_image", "seed", "method")},
        "isolation": "each token attends only to itself in every LLM layer; "
        + (
            "run as a one-token sequence of its LLM input embedding at its position id (equivalent)"
            if method == "batched"
            else "masked forward of the full prompt (knockout.decode_isolated)"
        ),
        **{k: settings[k] for k in ("prompt", "chat_template", "ci_method", "confidence")},
        "n_images_without_sink": n_without_sink,
        "rates": rate_summary(rates, confidence),
        "caveats": caveats(rule, n_without_sink, len(labels)),
    }
    if getattr(ad, "planted", None) is None and getattr(ad, "projector_trained", True) is False:
        summary["warning"] = (
            "the projector is untrained: visual tokens reach the LLM through a random MLP, so decoded "
            "words are not expected to name the object; the rates measure the pipeline, not the model"
        )
    return summary


def caveats(rule, n_without_sink: int, n_images: int) -> list[str]:
    """The caveats of a run: dependent tokens always; a surrogate sink rule; images without sink."""
    out = [
        "tokens of one image are not independent draws; the binomial intervals treat them as such "
        "(the image count is in the rate table)",
    ]
    if sink_rule_to_dict(rule)["surrogate"]:
        out.append(
            f"the 'sinks' are a surrogate, not norm outliers: every image gets its {as_rule(rule).k} highest-norm "
            "patches, whether or not its tower has outliers"
        )
    if n_without_sink:
        out.append(
            f"{n_without_sink} of {n_images} images have no sink under the rule; they contribute "
            "non-sinks only"
        )
    return out


def add_skipped(summary: dict[str, Any], failed: list[dict], upscaled: int, patch_px: int) -> None:
    """Record in ``summary`` the images that could not be read and any whole-pixel enlargement."""
    if failed:
        summary["failed"] = failed
        summary["caveats"].append(f"{len(failed)} image(s) could not be read and were skipped")
    if upscaled > 1:
        summary["upscaled"] = (
            f"images smaller than one {patch_px} px patch were enlarged {upscaled}x by pixel repetition "
            "before the model's processor"
        )


__all__ = ["ANALYSIS", "add_skipped", "caveats", "decode_summary"]
