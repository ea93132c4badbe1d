"""Sink reports: the tidy token table with every rule's verdict, sinks per token and per layer.

:meth:`SinkReport.from_tokens` applies each rule (:func:`~sinkscope.sinks.detect`) and marks the
table with ``is_sink`` (the first, main rule) and ``is_sink_<method>`` for every rule;
:meth:`SinkReport.sinks` lists the sink tokens with their emergence layer and
:meth:`SinkReport.summary` is what a scan writes to its ``summary.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd

from .detection import Detection, detect
from .rules import Rule


@dataclass
class SinkReport:
    """Per image and layer: the sink tokens, their emergence layer and the sink dims.

    ``tokens`` is the tidy table (one row per image, layer, token) with ``is_sink`` under the
    main rule and ``is_sink_<method>`` for every rule applied.

    >>> from sinkscope.sinks import NormRule
    >>> table = pd.DataFrame({"image": "a", "layer": [1, 1, 1, 2, 2, 2], "token": [0, 1, 2] * 2,
    ...                       "kind": "patch", "row": 0, "col": [0, 1, 2] * 2,
    ...                       "norm": [10., 11., 9., 10., 400., 380.]})
    >>> rep = SinkReport.from_tokens(table, [NormRule(threshold=100)])
    >>> rep.sinks()[["token", "emergence_layer", "max_norm"]].to_dict("records")
    [{'token': 1, 'emergence_layer': 2, 'max_norm': 400.0}, {'token': 2, 'emergence_layer': 2, 'max_norm': 380.0}]
    >>> rep.emergence_layer(), rep.per_layer_counts()[2]
    (2, {'n_sinks': 2, 'n_tokens': 3})
    """

    tokens: pd.DataFrame
    detections: list[Detection]

    @classmethod
    def from_tokens(cls, tokens: pd.DataFrame, rules: list[Rule]) -> SinkReport:
        tokens = tokens.reset_index(drop=True).copy()
        dets = [detect(tokens, r) for r in rules]
        for d in dets:
            tokens[f"is_sink_{d.rule.method}"] = d.is_sink.to_numpy()
            if d.rule.method == "dims":
                tokens["sink_dim_ratio"] = d.statistic.to_numpy()
        tokens["is_sink"] = dets[0].is_sink.to_numpy() if dets else False
        return cls(tokens, dets)

    @property
    def main(self) -> Detection:
        return self.detections[0]

    @property
    def sink_dims(self) -> list[int]:
        for d in self.detections:
            if d.rule.method == "dims":
                return d.sink_dims
        return []

    def to_frame(self) -> pd.DataFrame:
        """The tidy token table."""
        return self.tokens

    def sinks(self, method: str | None = None) -> pd.DataFrame:
        """One row per (image, token) that is a sink in some layer, with its emergence layer.

        Columns: ``image, token, kind, row, col, emergence_layer, n_layers, max_norm``.
        """
        col = "is_sink" if method is None else f"is_sink_{method}"
        s = self.tokens[self.tokens[col]]
        if s.empty:
            return pd.DataFrame(
                columns=["image", "token", "kind", "row", "col", "emergence_layer", "n_layers", "max_norm"]
            )
        g = s.groupby(["image", "token"], sort=True)
        out = g.agg(
            kind=("kind", "first"),
            row=("row", "first"),
            col=("col", "first"),
            emergence_layer=("layer", "min"),
            n_layers=("layer", "nunique"),
            max_norm=("norm", "max"),
        ).reset_index()
        return out

    def emergence_layer(self, method: str | None = None) -> int | None:
        """First layer where any token of any image is a sink (``None`` if none)."""
        s = self.sinks(method)
        return None if s.empty else int(s["emergence_layer"].min())

    def per_layer_counts(self, method: str | None = None) -> dict[int, dict[str, int]]:
        col = "is_sink" if method is None else f"is_sink_{method}"
        g = self.tokens.groupby("layer")
        return {int(layer): {"n_sinks": int(grp[col].sum()), "n_tokens": int(len(grp))} for layer, grp in g}

    def summary(self) -> dict[str, Any]:
        return {
            "rule": self.main.to_dict(),
            "rules": [d.to_dict() for d in self.detections],
            "per_layer": {str(k): v for k, v in self.per_layer_counts().items()},
            "emergence_layer": self.emergence_layer(),
            "sink_dims": self.sink_dims,
            "n_sink_tokens": int(len(self.sinks())),
        }
