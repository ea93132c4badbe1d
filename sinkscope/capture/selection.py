"""Layer and block selections: ``"all"``, ``"0,3,5"``, ``"4:9"``, ``"-1"`` or a list, checked.

Layers run ``0..n_layers`` (``0`` = the embeddings, the input of the first block); blocks run
``0..n_layers - 1``. A selection outside the model is an error, never silently cut to its depth.

>>> parse_layers("all", 3)
[0, 1, 2, 3]
"""

from __future__ import annotations

from collections.abc import Sequence

from .._utils import SinkscopeError


def _resolve(sel, n: int, what: str) -> list[int]:
    """Turn ``None``/``"all"``/int/list (negatives allowed) into sorted indices in ``[0, n)``."""
    if sel is None or sel == "all":
        return list(range(n))
    if isinstance(sel, int):
        sel = [sel]
    out = set()
    for i in sel:
        j = int(i) + n if int(i) < 0 else int(i)
        if not 0 <= j < n:
            raise SinkscopeError(f"{what} {i} is out of range: the model has {what}s 0..{n - 1}")
        out.add(j)
    return sorted(out)


def parse_layers(spec: str | Sequence[int] | None, n_layers: int) -> list[int]:
    """Parse a layer selection such as ``"all"``, ``"0,3,5"``, ``"4:9"``, ``"-1"`` or ``[1, 2]``.

    Layers run ``0..n_layers`` (``0`` = embeddings).

    >>> parse_layers("1:4,-1", 12)
    [1, 2, 3, 12]
    """
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "all"):
        return list(range(n_layers + 1))
    if isinstance(spec, str) and not spec.strip():
        raise SinkscopeError("empty layer selection: use 'all', '0,3,5', '4:9' or '-3:'")
    if not isinstance(spec, str):
        return _resolve(list(spec), n_layers + 1, "layer")
    out: list[int] = []
    n = n_layers + 1
    for part in spec.split(","):
        part = part.strip()
        try:
            if ":" in part:
                a, b = part.split(":", 1)
                lo = int(a) if a.strip() else 0
                hi = int(b) if b.strip() else n
                lo, hi = (lo + n if lo < 0 else lo), (hi + n if hi < 0 else hi)
                if not (0 <= lo < n and 0 <= hi <= n):
                    # like a single layer out of range: an error, not silently cut to the model's depth
                    raise SinkscopeError(
                        f"layer range {part!r} reaches outside the model's layers 0..{n_layers} "
                        f"(a range end is exclusive: '{max(lo, 0)}:' runs to the last layer)"
                    )
                out.extend(range(lo, hi))
            else:
                out.append(int(part))
        except ValueError:
            raise SinkscopeError(
                f"bad layer selection {spec!r}: use e.g. 'all', '0,3,5', '4:9' or '-3:'"
            ) from None
    if not out:
        raise SinkscopeError(
            f"layer selection {spec!r} selects no layer (the model has layers 0..{n_layers})"
        )
    return _resolve(out, n_layers + 1, "layer")
