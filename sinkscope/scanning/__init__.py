"""The main job: scan a model on images (or prompts) and locate its sinks.

A scan runs the model batch by batch under a :class:`~sinkscope.capture.Capture`, turns each
batch into tidy rows (one per image, layer, token) and appends them to ``OUT/parts/`` with a
progress log, so an interrupted scan resumes without recomputing or duplicating images. At the
end the rules are applied to the whole table and ``tokens.parquet`` and ``summary.json`` are
written (the page, ``report.html``, is drawn by :mod:`sinkscope.viz`).

The modules: :mod:`~sinkscope.scanning.job` (:func:`scan`, the batch loop),
:mod:`~sinkscope.scanning.request` (argument checks, items, config),
:mod:`~sinkscope.scanning.rules` (:func:`build_rules`), :mod:`~sinkscope.scanning.rows` (a
captured batch as rows), :mod:`~sinkscope.scanning.rundir` (the resumable run folder),
:mod:`~sinkscope.scanning.summary` (``summary.json``) and :mod:`~sinkscope.scanning.result`
(:class:`ScanResult`, writing the tables).

>>> from sinkscope.data import sample_images
>>> res = scan("tiny-dinov2+sinks", images=sample_images(2), out=None, progress=False)
>>> res.summary["n_ok"], list(res.pixels)
(2, ['astronaut', 'chelsea'])
>>> res.report.sinks().columns[:4].tolist()
['image', 'token', 'kind', 'row']
"""

from __future__ import annotations

from .job import MAX_SAVED_IMAGES, scan
from .request import ScanJob
from .result import ScanResult, write_outputs
from .rows import batch_rows
from .rules import METHODS, build_rules
from .rundir import _RunDir as _RunDir  # the run folder, patched by tests
from .rundir import seen_pictures
from .summary import layout_summary

__all__ = [
    "MAX_SAVED_IMAGES",
    "METHODS",
    "ScanJob",
    "ScanResult",
    "batch_rows",
    "build_rules",
    "layout_summary",
    "scan",
    "seen_pictures",
    "write_outputs",
]
