"""The files of a word-distribution decoding run, and the check of the folder they go to.

A run writes ``decode_rate.csv`` (the rate table), ``decode_tokens.csv`` (one row per decoded
token) and ``summary.json`` (:func:`write_decode_outputs`); ``sinkscope.viz`` draws
``decode.html`` from them. :func:`check_decode_out` refuses a folder a decoding run may not write
into (:mod:`sinkscope.ownership`).

>>> Path("runs/mine").mkdir(parents=True); _ = Path("runs/mine/summary.json").write_text("{}")
>>> check_decode_out("runs/mine")
Traceback (most recent call last):
sinkscope.ownership.FolderRefused: --out runs/mine holds summary.json: a folder sinkscope decode did not write (no .sinkscope.json); ...
"""

from __future__ import annotations

import json
from pathlib import Path

from .. import ownership

#: Files a decoding run writes into its folder.
OUTPUT_FILES = ("decode_rate.csv", "decode_tokens.csv", "summary.json", "decode.html")


def check_decode_out(out: str | Path, overwrite: bool = False) -> Path:
    """Refuse, in one line, an ``out`` a decoding run may not write into
    (:func:`sinkscope.ownership.check`: new, empty or a decoding run's own folder; ``overwrite``
    writes beside a user's files, never over one); return the path. Creates nothing.

    >>> check_decode_out("runs/new-decode").name
    'new-decode'
    """
    out = Path(out)
    ownership.check(out, "decode", ownership.OUTPUTS["decode"], overwrite=overwrite)
    return out


def write_decode_outputs(out: str | Path, res, overwrite: bool = False) -> Path:
    """``decode_rate.csv`` (``res.rates``), ``decode_tokens.csv`` (``res.per_token``) and
    ``summary.json`` (``res.summary``) into ``out``, a :class:`~sinkscope.flow.decoding.DecodeResult`;
    sets ``res.out``. A folder holding such files from something else is refused unless
    ``overwrite`` (:func:`check_decode_out`). The page (``decode.html``) is drawn by ``sinkscope.viz``.

    >>> from sinkscope.flow.decoding import decode_rate
    >>> res = decode_rate("tiny-llava+sinks", "lfw-faces", max_images=2, progress=False)
    >>> write_decode_outputs("runs/decode", res).name, sorted(p.name for p in res.out.iterdir())
    ('decode', ['.sinkscope.json', 'decode_rate.csv', 'decode_tokens.csv', 'summary.json'])
    """
    out = Path(out)
    ownership.claim(out, "decode", OUTPUT_FILES + ownership.OUTPUTS["decode"], overwrite=overwrite)
    res.rates.to_csv(out / "decode_rate.csv", index=False)
    res.per_token.to_csv(out / "decode_tokens.csv", index=False)
    (out / "summary.json").write_text(json.dumps(res.summary, indent=1, default=str))
    res.out = out
    return out


__all__ = ["OUTPUT_FILES", "check_decode_out", "write_decode_outputs"]
