"""The files of a word-distribution decoding run, and the check of the folder they go to.

A run writes ``decode_rate.csv`` (the rate table), ``decode_tokens.csv`` (one row per decoded
token) and ``summary.json`` (:func:`write_decode_outputs`); ``sinkscope.viz`` draws
``decode.html`` from them. :func:`check_decode_out` refuses a folder holding such files that a
decoding run did not write.

>>> Path("runs/mine").mkdir(parents=True); _ = Path("runs/mine/summary.json").write_text("{}")
>>> check_decode_out("runs/mine")
Traceback (most recent call last):
sinkscope._utils.SinkscopeError: --out runs/mine holds summary.json that sinkscope decode did not write; choose another folder or pass --overwrite
"""

from __future__ import annotations

import json
from pathlib import Path

from .._utils import SinkscopeError

#: Files a decoding run writes into its folder.
OUTPUT_FILES = ("decode_rate.csv", "decode_tokens.csv", "summary.json", "decode.html")
_ANALYSIS = "word-distribution decoding"


def check_decode_out(out: str | Path, overwrite: bool = False) -> Path:
    """Refuse, in one line, an ``out`` that is a file, or a folder holding a ``summary.json`` /
    ``decode_*.csv`` that a decoding run did not write (unless ``overwrite``); return the path.
    Only the files in :data:`OUTPUT_FILES` are ever written; nothing is removed.

    >>> check_decode_out("runs/new-decode").name
    'new-decode'
    """
    out = Path(out)
    if out.is_file():
        raise SinkscopeError(f"--out {out} is a file; give a folder")
    if overwrite or not out.is_dir():
        return out
    summ = out / "summary.json"
    ours = False
    if summ.exists():
        try:
            ours = str(json.loads(summ.read_text()).get("analysis", "")).startswith(_ANALYSIS)
        except (ValueError, AttributeError, OSError):
            ours = False
    clash = [f for f in OUTPUT_FILES[:3] if (out / f).exists()]
    if clash and not ours:
        raise SinkscopeError(
            f"--out {out} holds {', '.join(clash)} that sinkscope decode did not write; choose another "
            "folder or pass --overwrite"
        )
    return out


def write_decode_outputs(out: str | Path, res, overwrite: bool = False) -> Path:
    """``decode_rate.csv`` (``res.rates``), ``decode_tokens.csv`` (``res.per_token``) and
    ``summary.json`` (``res.summary``) into ``out``, a :class:`~sinkscope.flow.decoding.DecodeResult`;
    sets ``res.out``. A folder holding such files from something else is refused unless
    ``overwrite`` (:func:`check_decode_out`). The page (``decode.html``) is drawn by ``sinkscope.viz``.

    >>> from sinkscope.flow.decoding import decode_rate
    >>> res = decode_rate("tiny-llava+sinks", "lfw-faces", max_images=2, progress=False)
    >>> write_decode_outputs("runs/decode", res).name, sorted(p.name for p in res.out.iterdir())
    ('decode', ['decode_rate.csv', 'decode_tokens.csv', 'summary.json'])
    """
    out = check_decode_out(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    res.rates.to_csv(out / "decode_rate.csv", index=False)
    res.per_token.to_csv(out / "decode_tokens.csv", index=False)
    (out / "summary.json").write_text(json.dumps(res.summary, indent=1, default=str))
    res.out = out
    return out


__all__ = ["OUTPUT_FILES", "check_decode_out", "write_decode_outputs"]
