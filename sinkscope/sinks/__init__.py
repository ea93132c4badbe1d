"""Sink detection: every rule is a parameter set, reported with its result.

Rules work on the tidy token table a scan produces (one row per image, layer, token, with
``norm``, optional ``attention_received`` and the top-|activation| channels), so they can be
re-run with other thresholds without the model, and tested on hand-made tables.

- :class:`NormRule` - ``||x||_2`` with an absolute threshold (paper: 100 for CLIP-L in LLaVA;
  Darcet: 150 for DINOv2-g), a threshold relative to the image's median patch norm, or an
  automatic rule that looks for a clear gap in each layer's norm distribution and reports *no*
  sinks when there is no separate upper mode.
- :class:`AttentionRule` - tokens receiving far more than the uniform share of attention (head-
  and query-averaged), per layer. Per head: :func:`head_alpha` and Gu et al.'s sink rate
  :func:`gu_sink_rate` (share of (layer, head) pairs with ``alpha_k > 0.3``).
- :class:`DimsRule` - discovers sink dimensions from massive activations (Sun et al.: ``|a| > 100``
  and ``>= 1000 x`` the median ``|a|`` of the hidden state) and flags tokens with
  ``max_{d in D_sink} |x[d]| / RMS(x) >= tau`` (Kang et al., tau = 20). Nothing is per model.

>>> import pandas as pd
>>> t = pd.DataFrame({"image": "a", "layer": 1, "token": range(5), "kind": "patch",
...                   "norm": [10., 11., 9., 10., 400.]})
>>> res = detect(t, NormRule(threshold=100))
>>> res.is_sink.tolist(), res.describe()
([False, False, False, False, True], 'norm: L2 norm >= 100 (absolute), patch/text tokens')

The modules:

- :mod:`~sinkscope.sinks.rules` - the rules, their JSON form and the norm rule's thresholds
- :mod:`~sinkscope.sinks.detection` - :func:`detect` and :class:`Detection`, sink-dim discovery
- :mod:`~sinkscope.sinks.heads` - per-head attention of causal scans (Gu et al.)
- :mod:`~sinkscope.sinks.report` - :class:`SinkReport`, the table with every rule's verdict
"""

from __future__ import annotations

from .detection import Detection, detect, discover_sink_dims, top_channels
from .heads import HEAD_COLUMN_PREFIX, gu_sink_rate, head_alpha, head_columns
from .report import SinkReport
from .rules import (
    DEFAULT_KINDS,
    AttentionRule,
    DimsRule,
    NormRule,
    Rule,
    auto_gap_threshold,
    rule_from_dict,
    rule_to_dict,
    rules_from_dicts,
    topk_for_exact_dims,
)

__all__ = [
    "DEFAULT_KINDS",
    "HEAD_COLUMN_PREFIX",
    "AttentionRule",
    "Detection",
    "DimsRule",
    "NormRule",
    "Rule",
    "SinkReport",
    "auto_gap_threshold",
    "detect",
    "discover_sink_dims",
    "gu_sink_rate",
    "head_alpha",
    "head_columns",
    "rule_from_dict",
    "rule_to_dict",
    "rules_from_dicts",
    "top_channels",
    "topk_for_exact_dims",
]
