"""How an intervention changes the attention the LLM gives each token group (``sinkscope flow --variant``).

For one prompt with its images, every variant runs one forward with a bounded-memory capture of
every LLM layer (:class:`~sinkscope.capture.Capture`, attention received averaged over heads and
over the query tokens: the text after the first visual token). Token variants
(:mod:`~sinkscope.interventions.tokens`) run on the sequence they build, so the groups follow the
tokens wherever they moved; ``var`` runs the plain sequence inside :func:`~sinkscope.interventions.var`.
``both`` (nothing moved) is always run first, as the reference.

Groups: ``vit-sink`` (visual tokens the sink rule marks), ``vit-nonsink`` (the other visual
tokens), ``first-token`` (the sequence's first token, where LLMs keep their own sink) and
``text`` (every other text token). One row per (variant, layer, group): ``n_tokens``,
``mean_attention`` (per token) and ``share`` (the group's total).

>>> from sinkscope import load_model
>>> import numpy as np
>>> ad = load_model("tiny-llava")
>>> t = attention_by_variant(ad, [np.zeros((32, 32, 3), np.uint8)], "What is this?", ["sink-only"], sink_rule="topk:2")
>>> t[(t.layer == 0)].pivot(index="group", columns="variant", values="n_tokens").loc[["vit-sink", "vit-nonsink"]].values.tolist()
[[2, 2], [14, 0]]
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch

from .._utils import SinkscopeError
from ..capture import Capture
from ..interventions import TOKEN_VARIANTS, VAR, TokenIntervention, apply_tokens, var
from ..interventions.rules import resolve_rule

FLOW_VARIANTS = TOKEN_VARIANTS + ("var",)
GROUPS = ("vit-sink", "vit-nonsink", "first-token", "text")


def _groups(n: int, fed: pd.DataFrame, mask: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
    """Per position of the (single-row) sequence its group, and the query mask (text after the
    first visual token)."""
    groups = np.array(["text"] * n, dtype=object)
    real = mask[0].bool().numpy()
    first_real = int(np.argmax(real))
    groups[first_real] = "first-token"
    shown = fed.dropna(subset=["llm_position"])
    for pos, sink in zip(shown.llm_position.astype(int), shown.is_vit_sink):
        groups[pos] = "vit-sink" if sink else "vit-nonsink"
    visual = np.isin(groups, ("vit-sink", "vit-nonsink"))
    first_visual = int(np.argmax(visual)) if visual.any() else n
    q = torch.zeros(1, n, dtype=torch.bool)
    for i in range(first_visual, n):
        q[0, i] = bool(real[i]) and not visual[i]
    return groups, q


def attention_by_variant(
    ad,
    images: list[Any],
    prompt: str,
    variants: list[str] | tuple[str, ...],
    sink_rule: Any = None,
    positions: str = "reindex",
    var_config: VAR | dict | None = None,
    chat: bool = False,
) -> pd.DataFrame:
    """The table of the module docstring (``variant, layer, group, n_tokens, mean_attention,
    share``), ``both`` first; ``sink_rule`` as in :func:`~sinkscope.interventions.rule_from`
    (default :func:`~sinkscope.interventions.default_rule`)."""
    return variant_tables(ad, images, prompt, variants, sink_rule, positions, var_config, chat)[0]


def variant_tables(
    ad,
    images: list[Any],
    prompt: str,
    variants: list[str] | tuple[str, ...],
    sink_rule: Any = None,
    positions: str = "reindex",
    var_config: VAR | dict | None = None,
    chat: bool = False,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """:func:`attention_by_variant`'s table and the ``tokens_fed`` table of every variant run: one
    row per ViT token of each image (``variant, image, vit_token, row, col, norm, is_vit_sink,
    llm_position, position_id``; ``llm_position`` empty for a token not fed), as
    :func:`~sinkscope.interventions.apply_tokens` built it (``var`` feeds every token in order).

    >>> from sinkscope import load_model
    >>> t, fed = variant_tables(load_model("tiny-llava"), [np.zeros((32, 32, 3), np.uint8)], "What is this?",
    ...                         ["sinks-front"], sink_rule="topk:2")
    >>> f = fed[fed.variant == "sinks-front"].sort_values("llm_position")
    >>> bool(f.is_vit_sink.head(2).all()), bool(f.is_vit_sink.iloc[2:].any())   # the 2 sinks first
    (True, False)
    """
    bad = [v for v in variants if v not in FLOW_VARIANTS]
    if bad:
        raise SinkscopeError(f"flow variant {bad[0]!r}: expected one of {', '.join(FLOW_VARIANTS)}")
    if getattr(ad, "family", None) != "llava":
        raise SinkscopeError(f"model {ad.name!r}: flow variants need a LLaVA-style model")
    rule = resolve_rule(ad, sink_rule)[0]
    inp = ad.build_inputs(images, prompt, chat=chat)
    call = {k: inp[k].to(ad.device) for k in ("input_ids", "attention_mask", "pixel_values")}
    call["pixel_values"] = call["pixel_values"].to(ad.dtype)
    rows, fed = [], []
    for v in ["both"] + [v for v in variants if v != "both"]:
        spec = TokenIntervention(v if v in TOKEN_VARIANTS else "both", positions=positions, rule=rule)
        built = apply_tokens(ad, call, spec)
        fed.append(built.fed.drop(columns=["rule", "variant", "batch_row"]).assign(variant=v))
        kw = built.kwargs
        groups, qmask = _groups(kw["inputs_embeds"].shape[1], built.fed, kw["attention_mask"].cpu())
        if not qmask.any():
            raise SinkscopeError("the prompt has no text after the first image: nothing attends to the image")
        with Capture(ad.llm, layers=None, attention="all", stop_early=False) as cap:
            if v == "var":
                cfg = VAR(**var_config) if isinstance(var_config, dict) else (var_config or VAR())
                with var(ad, cfg):
                    lc = cap.run_fn(lambda: ad.model(**call), attention_mask=call["attention_mask"], query_mask=qmask)
            else:
                lc = cap.run_fn(lambda kw=kw: ad.model(**kw), attention_mask=kw["attention_mask"], query_mask=qmask)
        for layer, received in sorted(lc.attn_received.items()):
            a = received[0].float().numpy()
            for g in GROUPS:
                sel = groups == g
                rows.append({"variant": v, "layer": layer, "group": g, "n_tokens": int(sel.sum()),
                             "mean_attention": float(a[sel].mean()) if sel.any() else float("nan"),
                             "share": float(a[sel].sum())})  # fmt: skip
    out = pd.DataFrame(rows)
    out.attrs["sink_rule"] = rule.describe()
    tokens = pd.concat(fed, ignore_index=True)
    return out, tokens[["variant", *[c for c in tokens.columns if c != "variant"]]]
