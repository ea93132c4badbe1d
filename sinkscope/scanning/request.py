"""A scan's request, checked and settled before any batch runs.

:func:`check_request` refuses a bad batch size or output folder before the model loads and joins
a data-parallel run; :func:`scan_items` turns images or prompts into the items to scan;
:func:`settle` fixes the layers, the kept activations and the config a resumed run must match
(one :class:`ScanJob`); :func:`capture_settings` checks the rules against the model and gives the
:class:`~sinkscope.capture.Capture` options.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import distributed
from .._utils import SinkscopeError
from ..capture import parse_layers
from ..data import ImageItem, image_items, sample_images
from ..models import Adapter
from ..sinks import DimsRule, Rule, topk_for_exact_dims
from .rundir import _RunDir

log = logging.getLogger("sinkscope")


@dataclass
class ScanJob:
    """What a scan does, settled: the model, its rules and items, the layers captured (``layers``)
    and kept whole (``keep``), the dims rule's ``tau``, the ``config`` recorded in
    ``scan_config.json`` and the data-parallel context (``None`` in a single process)."""

    ad: Adapter
    rules: list[Rule]
    items: list[ImageItem]
    layers: list[int]
    keep: list[int]
    tau: float
    config: dict[str, Any]
    batch_size: int
    dist: Any = None

    @property
    def is_text(self) -> bool:
        return self.ad.family == "causal-lm"

    @property
    def methods(self) -> set[str]:
        return {r.method for r in self.rules}

    @property
    def names(self) -> list[str]:
        return [it.name for it in self.items]


def check_request(
    batch_size: int,
    out: str | Path | None,
    overwrite: bool,
    save_layers: Any,
    device: str | None,
    progress: bool,
) -> tuple[Any, str | None, bool]:
    """Refuse a bad batch size or ``out`` before any work (never a user's folder, never a file);
    ``(dist, device, progress)`` for this process (:func:`sinkscope.distributed.context`).

    >>> check_request(8, None, False, None, None, True)
    (None, None, True)
    """
    if batch_size < 1:
        raise SinkscopeError(f"batch size must be >= 1, got {batch_size}")
    if out is not None:
        _RunDir.check_owned(Path(out), overwrite)
    dist = distributed.context()  # None unless launched as several processes (accelerate, torchrun)
    if dist is not None:
        distributed.check_supported(out, save_layers)
        device = dist.device if device in (None, "cuda") else device  # cuda:<local rank>
        progress = progress and dist.is_main
    return dist, device, progress


def scan_items(
    ad: Adapter, images: list[ImageItem] | list[str] | None, texts: list[str] | None
) -> list[ImageItem]:
    """The items to scan: one per prompt for a language model, else the images (items, or paths
    of files, folders and manifests; default: the embedded images).

    >>> from sinkscope.models import load_model
    >>> [it.name for it in scan_items(load_model("tiny-llama"), None, ["hi", "a cat"])]
    ['prompt0', 'prompt1']
    """
    if ad.family == "causal-lm":
        if images:
            raise SinkscopeError(f"model {ad.name!r} is a language model: give --text prompts, not images")
        if not texts:
            raise SinkscopeError(f"model {ad.name!r} is a language model: give at least one --text prompt")
        return [ImageItem(f"prompt{i}", t, loader=None) for i, t in enumerate(texts)]
    if texts:
        log.warning("--text is ignored for vision model %s", ad.name)
    if images is None:
        items = sample_images()
    elif images and all(isinstance(x, ImageItem) for x in images):
        items = list(images)
    else:
        items = image_items(images)
    if not items:
        raise SinkscopeError("no images to scan")
    return items


def settle(
    ad: Adapter,
    rules: list[Rule],
    items: list[ImageItem],
    layers: str | list[int] | None,
    save_layers: str | list[int] | None,
    out: str | Path | None,
    image_size: int | tuple[int, int] | None,
    batch_size: int,
    dist: Any = None,
) -> ScanJob:
    """The layers to capture and to keep whole (those need ``out``) and the run's config."""
    layer_list = parse_layers(layers, ad.n_layers)
    tau = next((r.tau for r in rules if isinstance(r, DimsRule)), 20.0)
    keep = parse_layers(save_layers, ad.n_layers) if save_layers is not None else []
    if keep and out is None:
        raise SinkscopeError(
            "saving activations (save_layers / --save-layers) needs an output folder (--out)"
        )
    methods = {r.method for r in rules}
    config = {
        "model": ad.name,
        "methods": sorted(methods),
        "layers": layer_list,
        "save_layers": keep,
        "image_size": list(image_size) if isinstance(image_size, (tuple, list)) else image_size,
        "dtype": str(ad.dtype),
        "topk": topk_for_exact_dims(ad.hidden_size, tau) if "dims" in methods else None,
    }
    return ScanJob(ad, rules, items, layer_list, keep, tau, config, batch_size, dist)


def capture_settings(job: ScanJob) -> dict[str, Any]:
    """The :class:`~sinkscope.capture.Capture` options of ``job``; refuses an attention rule with no
    attention block to read and warns when the hidden size leaves the dims rule no chance."""
    ad, methods, tau = job.ad, job.methods, job.tau
    attn_blocks = [layer for layer in job.layers if layer < ad.n_layers]
    if "attention" in methods and not attn_blocks:
        raise SinkscopeError(
            f"the attention rule needs a layer below {ad.n_layers}: the last layer has no attention block reading it"
        )
    if "dims" in methods and ad.hidden_size < tau * tau:
        log.warning(
            "hidden size %d: max|x[d]|/RMS(x) cannot exceed sqrt(%d) = %.1f < tau = %g, so the dims rule "
            "cannot fire; lower --tau",
            ad.hidden_size,
            ad.hidden_size,
            ad.hidden_size**0.5,
            tau,
        )
    return dict(
        layers=job.layers,
        attention=attn_blocks if "attention" in methods else None,
        dims="dims" in methods,
        topk=topk_for_exact_dims(ad.hidden_size, tau),
        keep=job.keep,
    )
