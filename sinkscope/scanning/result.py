"""What a scan returns (:class:`ScanResult`) and how its tables are written to its folder.

``tokens.parquet`` and ``summary.json`` are each written to a temporary file and then moved into
place, so a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..sinks import SinkReport


@dataclass
class ScanResult:
    """What :func:`~sinkscope.scanning.scan` returns: the sink report, the summary dict and the
    files written."""

    report: SinkReport
    summary: dict[str, Any]
    out: Path | None = None
    pixels: dict[str, np.ndarray] = field(default_factory=dict)
    #: the :class:`~sinkscope.config.ScanConfig` of a run made by (or loaded through) ``sinkscope.run``
    config: Any = None

    @property
    def tokens(self) -> pd.DataFrame:
        return self.report.tokens

    def sinks(self) -> pd.DataFrame:
        return self.report.sinks()


def write_outputs(result: ScanResult) -> None:
    """Write ``tokens.parquet`` and ``summary.json`` into ``result.out`` (each replaced atomically)."""
    out = result.out
    assert out is not None
    tmp = out / "tokens.parquet.tmp"
    result.tokens.to_parquet(tmp, index=False)
    os.replace(tmp, out / "tokens.parquet")
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(result.summary, indent=1, default=_json_default))
    os.replace(tmp, out / "summary.json")


def _json_default(o):
    """JSON for the numpy scalars, torch dtypes and paths a summary may hold.

    >>> json.dumps({"n": np.int64(3), "dtype": torch.float32}, default=_json_default)
    '{"n": 3, "dtype": "torch.float32"}'
    """
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (torch.dtype, Path)):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
