"""The ``summary.json`` of a scan: the model and its token layout, the report's counts, every
item's record, the config, the timings and the package versions.

Assembly only: the counts come from :meth:`~sinkscope.sinks.SinkReport.summary` and the item
records from the scan's progress log.
"""

from __future__ import annotations

from typing import Any

from .._utils import package_versions
from ..models import Adapter
from ..sinks import AttentionRule, SinkReport, gu_sink_rate, rule_to_dict
from .request import ScanJob

#: the keys of an item's record that the summary lists
ITEM_KEYS = ("image", "status", "reason", "source", "grid", "n_tokens")


def scan_summary(
    job: ScanJob,
    rep: SinkReport,
    names: list[str],
    status: dict[str, dict],
    timings: dict[str, Any],
    store: Any = None,
) -> dict[str, Any]:
    """The summary of a finished scan of ``names`` (``status``: each item's last record)."""
    ad = job.ad
    ok_names = [n for n in names if status.get(n, {}).get("status") == "ok"]
    first_ok = next((status[n] for n in ok_names), {})
    summary = {
        "model": ad.describe(),
        "layout": layout_summary(ad, first_ok),
        **rep.summary(),
        "images": [{k: status.get(n, {}).get(k) for k in ITEM_KEYS} for n in names],
        "n_ok": len(ok_names),
        "n_failed": sum(1 for n in names if status.get(n, {}).get("status") == "failed"),
        "config": {
            **job.config,
            "batch_size": job.batch_size,
            "device": str(ad.device),
            "rules": [rule_to_dict(r) for r in job.rules],
        },
        "timings": timings,
        "versions": package_versions(),
    }
    attn_rule = next((r for r in job.rules if isinstance(r, AttentionRule)), None)
    if job.is_text and attn_rule is not None:
        # Gu et al.'s metric, per head (the attention rule thresholds the head-averaged alpha)
        summary["gu_sink_rate"] = gu_sink_rate(rep.tokens, eps=attn_rule.causal_fraction, token=0)
    if store is not None:
        summary["activations"] = {"path": "activations", **store.info()}
    if getattr(ad, "planted", None):
        summary["model"]["planted"] = ad.planted.to_dict()
    if job.dist is not None:
        summary["distributed"] = job.dist.summary(len(job.items))
    return summary


def layout_summary(ad: Adapter, first_ok: dict) -> dict[str, Any]:
    """How the model lays out its tokens (``first_ok``: the record of the first item scanned).

    >>> from sinkscope.models import load_model
    >>> layout_summary(load_model("tiny-dinov2+sinks"), {"grid": [4, 4], "n_tokens": 17})["order"]
    '[CLS] + registers + patches (row-major)'
    """
    vis = getattr(ad, "vision", ad)
    if ad.family == "causal-lm":
        return {"n_cls": 0, "n_registers": 0, "patch_size": None, "grid": None, "kinds": ["text"]}
    d = {
        "n_cls": vis.spec.n_cls,
        "n_registers": vis.n_registers,
        "patch_size": vis.patch_size,
        "grid": first_ok.get("grid"),
        "n_tokens": first_ok.get("n_tokens"),
        "order": "[CLS] + registers + patches (row-major)" if vis.spec.n_cls else "patches (row-major)",
    }
    if ad.family == "llava":
        d.update(
            feature_layer=ad.feature_layer,
            select_strategy=ad.select_strategy,
            image_token_id=ad.image_token_id,
        )
    return d
