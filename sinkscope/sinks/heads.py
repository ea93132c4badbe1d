"""Per-head attention of causal scans: Gu et al.'s ``alpha_k`` and sink rate.

A causal-LM scan with the attention rule writes one attention-received column per head
(``attention_received_h0``, ...). :func:`head_alpha` turns them into Gu et al.'s
``alpha_k = mean_{i >= k} A[i, k]`` per (prompt, layer, head, token) and :func:`gu_sink_rate` into
their sink metric: the share of (layer, head) pairs whose ``alpha`` for the first token exceeds
``eps``.

>>> HEAD_COLUMN_PREFIX
'attention_received_h'
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from .._utils import SinkscopeError

#: Per-head attention received, one column per head (``attention_received_h0``, ...): a causal-LM
#: scan with the attention rule writes them (query-averaged over all the prompt's queries).
HEAD_COLUMN_PREFIX = "attention_received_h"


def head_columns(tokens: pd.DataFrame) -> list[str]:
    """The per-head attention-received columns of a token table, in head order."""
    cols = [c for c in tokens.columns if str(c).startswith(HEAD_COLUMN_PREFIX)]
    return sorted(cols, key=lambda c: int(str(c)[len(HEAD_COLUMN_PREFIX) :]))


def head_alpha(tokens: pd.DataFrame) -> pd.DataFrame:
    """Gu et al.'s ``alpha_k = mean_{i >= k} A[i, k]`` per (prompt, layer, head, token k).

    From the per-head ``attention_received_h*`` columns of a causal scan (received = sum over the
    ``n`` queries / ``n``; query ``i`` sees key ``k`` only when ``i >= k``, so ``alpha_k = received
    x n / (n - k)``). Columns: ``image, layer, head, token, alpha, seen_by``; rows without a value
    (the last layer, which has no attention block) are left out.

    >>> t = pd.DataFrame({"image": "p", "layer": 0, "token": [0, 1], "kind": "text",
    ...                   "attention_received_h0": [0.75, 0.25], "attention_received_h1": [0.5, 0.5]})
    >>> head_alpha(t).alpha.tolist()
    [0.75, 0.5, 0.5, 1.0]
    """
    cols = head_columns(tokens)
    if not cols:
        raise SinkscopeError(
            "per-head attention needs attention_received_h* columns: scan a causal LM with --method attention or all"
        )
    t = tokens[tokens["kind"] == "text"]
    n = t.groupby(["image", "layer"])["token"].transform("max") + 1
    seen_by = (n - t["token"]).astype(float)
    frames = []
    for c in cols:
        frames.append(
            pd.DataFrame(
                {
                    "image": t["image"].to_numpy(),
                    "layer": t["layer"].to_numpy(),
                    "head": int(str(c)[len(HEAD_COLUMN_PREFIX) :]),
                    "token": t["token"].to_numpy(),
                    "alpha": (t[c].astype(float) * n / seen_by).to_numpy(),
                    "seen_by": seen_by.to_numpy().astype(int),
                }
            )
        )
    out = pd.concat(frames, ignore_index=True).dropna(subset=["alpha"])
    return out.sort_values(["image", "layer", "head", "token"], kind="stable").reset_index(drop=True)


def gu_sink_rate(tokens: pd.DataFrame, eps: float = 0.3, token: int = 0) -> dict[str, Any] | None:
    """Gu et al.'s sink metric: the share of (layer, head) pairs whose ``alpha_k > eps`` for the
    key token ``k`` (default: the first token), per prompt, then averaged over prompts.

    Unlike the attention rule (which thresholds the head-averaged alpha), every head counts
    separately. Returns ``value`` (mean over prompts), ``eps``, ``token``, ``per_prompt``,
    ``per_layer`` (share of heads above ``eps``, averaged over prompts), ``n_layers``,
    ``n_heads``, ``n_prompts`` and a ``description``; ``None`` when the table has no per-head
    attention or no prompt reaches token ``k``.

    >>> t = pd.DataFrame({"image": "p", "layer": [0, 0, 1, 1], "token": [0, 1, 0, 1], "kind": "text",
    ...                   "attention_received_h0": [0.9, 0.1, 0.2, 0.8],
    ...                   "attention_received_h1": [0.5, 0.5, 0.6, 0.4]})
    >>> gu_sink_rate(t)["value"]        # alpha_0: 0.9, 0.5 (layer 0), 0.2, 0.6 (layer 1)
    0.75
    """
    if not head_columns(tokens):
        return None
    a = head_alpha(tokens)
    a = a[a["token"] == token]
    if a.empty:
        return None
    a = a.assign(above=a["alpha"] > eps)
    per_prompt = a.groupby("image", sort=False)["above"].mean()
    per_layer = a.groupby(["layer", "image"])["above"].mean().groupby("layer").mean()
    n_heads = int(a["head"].nunique())
    return {
        "value": float(per_prompt.mean()),
        "eps": float(eps),
        "token": int(token),
        "per_prompt": {str(k): float(v) for k, v in per_prompt.items()},
        "per_layer": {str(int(k)): float(v) for k, v in per_layer.items()},
        "n_layers": int(a["layer"].nunique()),
        "n_heads": n_heads,
        "n_prompts": int(len(per_prompt)),
        "description": (
            f"Gu et al. sink rate: share of (layer, head) pairs with alpha_{token} = mean over queries "
            f"i >= {token} of A[i, {token}] > {eps:g}, per head (not head-averaged), mean over prompts"
        ),
    }
