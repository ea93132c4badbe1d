"""From ViT tokens into the LLM (paper Fig. 3A): which visual tokens the LLM attends to.

For a LLaVA-style model and one prompt with any number of images, one forward (or a
``generate`` call) is run with two bounded-memory captures at once - the vision tower at its
feature layer (ViT norms) and every LLM layer (received attention, massive activations) - and
each visual token fed to the LLM becomes one row of a tidy table:

``image, vit_token, kind, row, col, vit_norm, is_vit_sink, llm_position, llm_sink_layers,
llm_sink_dims, attention_received`` (+ one ``attn_L<i>`` column per LLM layer). ``llm_sink_dims``
lists the channels a token peaks on in the LLM layers where the RMS rule calls it a sink.

Then tokens are binned by ViT norm (width 5 by default) and the mean attention each bin receives
is reported per LLM layer, and the mean attention per token is reported for non-sinks,
ViT-propagated sinks (sinks in the ViT) and LLM-emerged sinks (sinks in the LLM only).

>>> res = propagation(load_model("tiny-llava+sinks"), [img], "What is this?")   # doctest: +SKIP
>>> res.by_bin.head()                                                          # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from .._utils import SinkscopeError
from ..capture import Capture
from ..models.base import ModelInputs, TokenLayout
from ..models.llava import LlavaAdapter
from ..sinks import DimsRule, NormRule, detect, rule_to_dict


@dataclass
class Propagation:
    """``visual_tokens``: one row per visual token fed to the LLM; ``by_bin``: one row per (LLM
    layer, ViT-norm bin); ``by_group``: mean attention per token for non-sinks, ViT-propagated
    sinks and LLM-emerged sinks; ``summary``: rules, thresholds, prompt, queries."""

    visual_tokens: pd.DataFrame
    by_bin: pd.DataFrame
    by_group: pd.DataFrame
    summary: dict[str, Any] = field(default_factory=dict)


def _text_query_mask(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """Text tokens after the first image token (the question and anything after it)."""
    is_img = input_ids == image_token_id
    first = int(torch.nonzero(is_img[0]).min()) if is_img.any() else 0
    q = ~is_img
    q[:, :first] = False
    return q


@torch.no_grad()
def propagation(
    ad: LlavaAdapter,
    images: list[Any],
    prompt: str,
    vit_rule: NormRule | None = None,
    llm_rule: DimsRule | None = None,
    generate: int = 0,
    bin_width: float = 5.0,
    chat: bool = False,
) -> Propagation:
    """Attention the LLM pays to each visual token, against its ViT norm.

    ``vit_rule``: the ViT sink rule at the feature layer (default ``NormRule(threshold=100)``, the
    paper's rule for CLIP-L in LLaVA-1.5). ``llm_rule``: the LLM sink rule on visual tokens
    (default Kang et al.: ``DimsRule(tau=20, min_layer=2)``; sink dims discovered on this input).
    ``generate``: 0 averages the attention of the prompt's text tokens after the first image
    (prefill); ``n > 0`` generates ``n`` tokens greedily and averages the attention of each newly
    generated token instead (the paper's setting). ``chat``: wrap the prompt in the tokenizer's
    chat template (see :meth:`LlavaAdapter.build_inputs`).
    """
    if not isinstance(ad, LlavaAdapter):
        raise SinkscopeError(f"model {ad.name!r} is not a LLaVA-style model (family {ad.family!r})")
    vit_rule = vit_rule or NormRule(threshold=100.0)
    llm_rule = llm_rule or DimsRule(tau=20.0, min_layer=2)
    if vit_rule.mode == "auto":
        raise SinkscopeError("the ViT sink rule needs an absolute or relative threshold here")
    inp = ad.build_inputs(images, prompt, chat=chat)
    ids, pv, am = inp["input_ids"], inp["pixel_values"], inp["attention_mask"]
    lay: TokenLayout = inp["layout"]
    dev = ad.device
    model_kw = {"input_ids": ids.to(dev), "pixel_values": pv.to(dev, ad.dtype), "attention_mask": am.to(dev)}
    fl = ad.feature_layer
    L = ad.llm.n_layers
    seq = ids.shape[1]
    if generate > 0:
        qmask = torch.zeros_like(ids, dtype=torch.bool)  # prefill queries excluded; each new token counts
        run = lambda: ad.model.generate(**model_kw, max_new_tokens=generate, do_sample=False)  # noqa: E731
    else:
        qmask = _text_query_mask(ids, ad.image_token_id)
        if not qmask.any():
            raise SinkscopeError("the prompt has no text after the first image: nothing attends to the image")
        run = lambda: ad.model(**model_kw)  # noqa: E731
    with (
        Capture(ad.vision, layers=[fl], stop_early=False) as vcap,
        Capture(ad.llm, layers="all", attention="all", dims=True, stop_early=False) as lcap,
    ):
        vcap.reset()
        lc = lcap.run_fn(run, attention_mask=am.to(dev), query_mask=qmask)
        vc = vcap.collect()
    n_vit = lay.n_tokens
    vit_norms = vc.norms[:, 0, :n_vit].numpy()  # [images, vit tokens]
    mapping = pd.DataFrame(ad.vit_to_llm_positions(ids, n_vit_tokens=n_vit))
    # ViT sinks at the feature layer, per image
    vit_rows = []
    for i in range(vit_norms.shape[0]):
        for t in range(n_vit):
            vit_rows.append(
                {"image": i, "layer": fl, "token": t, "kind": lay.kind(t), "norm": float(vit_norms[i, t])}
            )
    vit_tab = pd.DataFrame(vit_rows)
    vit_tab["is_vit_sink"] = detect(vit_tab, vit_rule).is_sink.to_numpy()
    # LLM sinks (massive activations) on the prompt sequence
    from ..scan import batch_rows

    llm_inputs = ModelInputs({"input_ids": ids}, [TokenLayout(n_text=seq)], ["prompt"])
    lc.norms = lc.norms[:, :, :seq]
    ltab = batch_rows(ad.llm, llm_inputs, lc, causal=True)
    ldet = detect(ltab, llm_rule)
    ltab["is_llm_sink"] = ldet.is_sink.to_numpy()
    sink_layers = ltab.groupby("token")["is_llm_sink"].sum()
    # the hidden dims a visual token lights up where it is an LLM sink (its largest channel there)
    flagged = (
        ltab.loc[ltab.is_llm_sink, ["token", "top_dim_0"]]
        .drop_duplicates()
        .sort_values(["token", "top_dim_0"])
    )
    lit: dict[int, list[int]] = {}
    for tok, dim in zip(flagged["token"].to_numpy(), flagged["top_dim_0"].to_numpy()):
        lit.setdefault(int(tok), []).append(int(dim))
    # attention received per LLM block, head-averaged, from the chosen queries
    att = np.stack([lc.attn_received[b][0, :seq].numpy() for b in range(L)])  # [blocks, seq]
    # one row per visual token, vectorised (no per-token DataFrame lookups)
    img_i = mapping["image_index"].to_numpy()
    vit_t = mapping["vit_token"].to_numpy()
    pos = mapping["llm_position"].to_numpy()
    flat = img_i * n_vit + vit_t  # row of vit_tab (image-major, token-minor)
    rc = [lay.row_col(int(t)) for t in vit_t]
    cols: dict[str, Any] = {
        "image": img_i.astype(int),
        "vit_token": vit_t.astype(int),
        "kind": vit_tab["kind"].to_numpy()[flat],
        "row": [r for r, _ in rc],
        "col": [c for _, c in rc],
        "vit_norm": vit_tab["norm"].to_numpy()[flat].astype(float),
        "is_vit_sink": vit_tab["is_vit_sink"].to_numpy()[flat].astype(bool),
        "llm_position": pos.astype(int),
        "llm_sink_layers": sink_layers.reindex(pos, fill_value=0).to_numpy().astype(int),
        "llm_sink_dims": [",".join(str(d) for d in lit.get(int(p), [])) for p in pos],
        "attention_received": att[:, pos].mean(0),
    }
    for b in range(L):
        cols[f"attn_L{b}"] = att[b, pos]
    rows = cols
    vt = pd.DataFrame(rows)
    vt["row"] = pd.array(vt["row"], dtype="Int32")
    vt["col"] = pd.array(vt["col"], dtype="Int32")
    by_bin = norm_bins(vt, bin_width, L)
    by_group = attention_by_token_group(vt)
    summary = {
        "model": ad.describe(),
        "prompt": prompt,
        "chat_template": chat,
        "n_images": len(images),
        "queries": f"{generate} generated tokens"
        if generate
        else "text tokens after the first image (prefill)",
        "feature_layer": fl,
        "select_strategy": ad.select_strategy,
        "vit_rule": rule_to_dict(vit_rule),
        "llm_rule": {**rule_to_dict(llm_rule), "sink_dims": ldet.sink_dims},
        "bin_width": bin_width,
        "n_visual_tokens": len(vt),
        "n_vit_sinks": int(vt.is_vit_sink.sum()),
        "n_llm_sink_tokens": int((vt.llm_sink_layers > 0).sum()),
    }
    frac = float((vt.llm_sink_layers > 0).mean()) if len(vt) else 0.0
    if frac > 0.25:
        # a sink rule that calls a quarter of the image "sinks" has stopped separating anything
        width = ad.llm.hidden_size
        summary["llm_rule_note"] = (
            f"{frac:.0%} of the visual tokens pass the LLM sink rule (tau={llm_rule.tau:g}; the largest "
            f"possible max|x|/RMS at width {width} is sqrt({width}) = {width**0.5:.0f}): the 'LLM-emerged sink' "
            "group is not a small set of outliers here - check the projector, or raise tau"
        )
    return Propagation(vt, by_bin, by_group, summary)


def norm_bins(vt: pd.DataFrame, bin_width: float, n_llm_layers: int) -> pd.DataFrame:
    """Mean attention per token in each ViT-norm bin, per LLM layer (long table:
    ``layer, bin_lo, bin_hi, n_tokens, mean_attention``)."""
    lo = np.floor(vt["vit_norm"].to_numpy() / bin_width) * bin_width
    out = []
    for b in range(n_llm_layers):
        col = vt[f"attn_L{b}"].to_numpy()
        for edge in np.unique(lo):
            sel = lo == edge
            out.append(
                {
                    "layer": b,
                    "bin_lo": float(edge),
                    "bin_hi": float(edge + bin_width),
                    "n_tokens": int(sel.sum()),
                    "mean_attention": float(col[sel].mean()),
                }
            )
    return pd.DataFrame(out)


def attention_by_token_group(vt: pd.DataFrame) -> pd.DataFrame:
    """Mean attention per token (averaged over LLM layers) for the paper's three groups."""
    groups = {
        "non-sink": (~vt.is_vit_sink) & (vt.llm_sink_layers == 0),
        "vit-propagated sink": vt.is_vit_sink,
        "llm-emerged sink": (~vt.is_vit_sink) & (vt.llm_sink_layers > 0),
    }
    return pd.DataFrame(
        [
            {
                "group": g,
                "n_tokens": int(m.sum()),
                "mean_attention": float(vt.loc[m, "attention_received"].mean()) if m.any() else np.nan,
            }
            for g, m in groups.items()
        ]
    )
