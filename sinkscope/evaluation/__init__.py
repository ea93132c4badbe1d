"""Evaluation: VQA items by task type (Global / Local / Mixed), scoring, and ``sinkscope eval``.

- :mod:`~sinkscope.evaluation.items`: the item format, manifests, built-in and hub sets;
- :mod:`~sinkscope.evaluation.shapes`: the procedurally generated ``shapes`` scenes and questions;
- :mod:`~sinkscope.evaluation.scoring`: log-likelihood multiple choice, generation, normalisation;
- :mod:`~sinkscope.evaluation.mme`: MME's score;
- :mod:`~sinkscope.evaluation.run`: :func:`evaluate`, the analysis behind ``sinkscope eval``.
"""

from .items import VQAItem, load_items, load_manifest
from .mme import mme_score
from .run import EvalResult, evaluate

__all__ = ["EvalResult", "VQAItem", "evaluate", "load_items", "load_manifest", "mme_score"]
