"""From ViT tokens into the LLM (paper Fig. 3A): which visual tokens the LLM attends to.

For a LLaVA-style model and one prompt with any number of images, one forward (or a
``generate`` call) is run with two bounded-memory captures at once - the vision tower at its
feature layer (ViT norms) and every LLM layer (received attention, massive activations) - and
each visual token fed to the LLM becomes one row of a tidy table:

``image, vit_token, kind, row, col, vit_norm, is_vit_sink, llm_position, llm_sink_layers,
llm_sink_dims, attention_received`` (+ one ``attn_L<i>`` column per LLM layer). ``llm_sink_layers``
counts the decoder layers ``i >= min_layer`` whose *input* (``hidden_states[i]``, ``i < L``; the
final norm's output is not a layer input) the LLM rule calls a sink; ``llm_sink_dims`` lists the
channels a token peaks on in those layers.

LLM sink dims (Kang et al.) are fixed from the LLM's own massive activations on text: by default
they are discovered on a text-only pass (the prompt without its image tokens through the LLM), so
visual tokens cannot bring their own "sink dims"; ``sink_dims_from="first_text_token"`` uses the
first text token of the multimodal sequence and ``"multimodal"`` the whole multimodal sequence
(the old behaviour). Enough top channels per token are kept for the rule to be exact
(:func:`~sinkscope.sinks.topk_for_exact_dims`).

Then tokens are binned by ViT norm (width 5 by default) and the mean attention each bin receives
is reported per LLM layer, and the mean attention per token is reported for non-sinks,
ViT-propagated sinks (sinks in the ViT) and LLM-emerged sinks (sinks in the LLM only).

>>> from sinkscope.data import sample_images
>>> from sinkscope.models import load_model
>>> img = sample_images(1)[0].load()
>>> res = propagation(load_model("tiny-llava+sinks"), [img], "What is this?", vit_rule="norm:x5")
>>> list(res.by_bin.columns), list(res.by_group.group)
(['layer', 'bin_lo', 'bin_hi', 'n_tokens', 'mean_attention'], ['non-sink', 'vit-propagated sink', 'llm-emerged sink'])
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd
import torch

from .._utils import SinkscopeError
from ..capture import Capture
from ..interventions.rules import VisualSinkRule, patch_mask, resolve_rule, rule_record
from ..models.base import ModelInputs, TokenLayout
from ..models.llava import LlavaAdapter
from ..sinks import DimsRule, detect, discover_sink_dims, rule_to_dict, topk_for_exact_dims

#: Where the LLM sink dims come from (``propagation(sink_dims_from=...)``).
SINK_DIMS_SOURCES = ("text", "first_text_token", "multimodal")
#: Most top channels per token kept by the LLM capture (a tiny ``tau`` would ask for all of them).
MAX_TOPK = 64


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


def exact_topk(hidden_size: int, tau: float) -> int:
    """Top channels per token that make the dims rule exact at ``tau``
    (:func:`~sinkscope.sinks.topk_for_exact_dims`; every channel when ``tau <= 0``)."""
    return min(topk_for_exact_dims(hidden_size, tau), hidden_size) if tau > 0 else hidden_size


def llm_topk(hidden_size: int, tau: float) -> int:
    """Top channels per token the LLM capture keeps: :func:`exact_topk`, at most :data:`MAX_TOPK`."""
    return min(exact_topk(hidden_size, tau), MAX_TOPK)


def text_only_ids(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """``[1, n_text]``: the prompt's token ids with every image token removed (BOS and chat
    template kept), the input of the text-only pass that fixes the LLM sink dims."""
    return input_ids[:, input_ids[0] != image_token_id]


def text_only_sink_dims(ad: LlavaAdapter, input_ids: torch.Tensor, rule: DimsRule, topk: int) -> list[int]:
    """LLM sink dims discovered on the text-only pass (``input_ids`` ``[1, seq]`` without its image
    tokens through the LLM alone), over the decoder-layer inputs ``hidden_states[i]``,
    ``rule.min_layer <= i < L``; most frequent first (:func:`~sinkscope.sinks.discover_sink_dims`)."""
    from ..scanning import batch_rows

    ids = text_only_ids(input_ids, ad.image_token_id)
    n = ids.shape[1]
    if n == 0:
        raise SinkscopeError(
            "the prompt has no text tokens: no text-only pass to find the LLM sink dims on; "
            "use sink_dims_from='multimodal' or give the dims (DimsRule(dims=...))"
        )
    inputs = ModelInputs(
        {"input_ids": ids}, [TokenLayout(n_text=n)], ["text-only prompt"], torch.ones_like(ids)
    )
    with Capture(ad.llm, layers=list(range(ad.llm.n_layers)), dims=True, topk=topk) as cap:
        c = cap.run(inputs)
    return discover_sink_dims(batch_rows(ad.llm, inputs, c, causal=True), rule)


@torch.no_grad()
def propagation(
    ad: LlavaAdapter,
    images: list[Any],
    prompt: str,
    vit_rule: Any = None,
    llm_rule: DimsRule | None = None,
    generate: int = 0,
    bin_width: float = 5.0,
    chat: bool = False,
    sink_dims_from: str = "text",
) -> Propagation:
    """Attention the LLM pays to each visual token, against its ViT norm.

    ``vit_rule``: the ViT sink rule, applied to each image's patches at the feature layer (anything
    :func:`~sinkscope.interventions.rule_from` reads, e.g. ``"norm:100"``, the paper's rule for
    CLIP-L in LLaVA-1.5; default: the model's :func:`~sinkscope.interventions.default_rule`; the
    summary records it with its reason). The ViT-norm bins do not depend on it. ``llm_rule``: the LLM sink rule on visual tokens
    (default Kang et al.: ``DimsRule(tau=20, min_layer=2)``), checked on the input of every
    decoder layer ``min_layer <= i < L``. Unless the rule gives its dims, they are discovered from
    massive activations on ``sink_dims_from``: ``"text"`` (default) a text-only pass, the prompt
    without its image tokens through the LLM; ``"first_text_token"`` the first text token of the
    multimodal sequence; ``"multimodal"`` every token of the multimodal sequence, visual tokens
    included. The summary's ``llm_rule`` reports ``sink_dims``, ``sink_dims_source``, the top
    channels kept per token (``topk_channels``) and the layers checked.
    ``generate``: 0 averages the attention of the prompt's text tokens after the first image
    (prefill); ``n > 0`` generates up to ``n`` tokens greedily and averages the attention of every
    output token (the paper's setting): the query that produces output token 1 is the prefill's
    last row, output token ``t > 1`` is produced by decoding step ``t - 1``. ``chat``: wrap the
    prompt in the tokenizer's chat template (see :meth:`LlavaAdapter.build_inputs`).
    """
    (vit_rule, vit_why), llm_rule = _check_rules(ad, vit_rule, llm_rule, sink_dims_from)
    inp = ad.build_inputs(images, prompt, chat=chat)
    ids, lay = inp["input_ids"], inp["layout"]
    topk = llm_topk(ad.llm.hidden_size, llm_rule.tau)
    vc, lc, qmask, n_out = _capture_pass(ad, inp, generate, topk)
    vit_tab = _vit_sink_table(vc.norms[:, 0, : lay.n_tokens].numpy(), lay, ad.feature_layer, vit_rule)
    llm = _llm_sinks(ad, ids, lc, llm_rule, sink_dims_from, topk)
    vt = _visual_token_table(ad, ids, lay, vit_tab, llm, lc)
    L = ad.llm.n_layers
    by_bin = norm_bins(vt, bin_width, L)
    by_group = attention_by_token_group(vt)
    summary = {
        "model": ad.describe(),
        "prompt": prompt,
        "chat_template": chat,
        "n_images": len(images),
        "queries": _queries(generate, n_out),
        "n_query_tokens": n_out if generate else int(qmask.sum()),
        "feature_layer": ad.feature_layer,
        "select_strategy": ad.select_strategy,
        "vit_rule": rule_record(vit_rule, vit_why),
        "llm_rule": _llm_rule_summary(ad, llm_rule, llm, topk),
        "bin_width": bin_width,
        "n_visual_tokens": len(vt),
        "n_vit_sinks": int(vt.is_vit_sink.sum()),
        "n_llm_sink_tokens": int((vt.llm_sink_layers > 0).sum()),
    }
    note = _llm_rule_note(vt, llm_rule.tau, ad.llm.hidden_size)
    if note:
        summary["llm_rule_note"] = note
    return Propagation(vt, by_bin, by_group, summary)


@dataclass
class _LlmSinks:
    """The LLM sink rule on the prompt sequence: ``table`` (one row per token and layer, with
    ``is_llm_sink``), the sink dims found (``dims``) and those detection used (``sink_dims``), and
    where they came from (``source``, ``source_desc``)."""

    table: pd.DataFrame
    dims: list[int]
    sink_dims: list[int]
    source: str
    source_desc: str


def _check_rules(
    ad: LlavaAdapter, vit_rule: Any, llm_rule: DimsRule | None, sink_dims_from: str
) -> tuple[tuple[VisualSinkRule, str], DimsRule]:
    """The ViT rule (with why it was chosen) and the LLM rule, defaults filled in; a clear error
    for a bad model, rule or setting."""
    if not isinstance(ad, LlavaAdapter):
        raise SinkscopeError(f"model {ad.name!r} is not a LLaVA-style model (family {ad.family!r})")
    if sink_dims_from not in SINK_DIMS_SOURCES:
        raise SinkscopeError(
            f"sink_dims_from must be one of {', '.join(SINK_DIMS_SOURCES)}, got {sink_dims_from!r}"
        )
    rule, why = resolve_rule(ad, vit_rule, cls=False)
    rule.check_for("flow propagation", layer=ad.feature_layer, n_layers=ad.vision.n_layers)
    return (rule, why), llm_rule or DimsRule(tau=20.0, min_layer=2)


def _capture_pass(ad: LlavaAdapter, inp: ModelInputs, generate: int, topk: int):
    """One forward (or ``generate`` call) with two bounded-memory captures at once: the vision
    tower at its feature layer and every decoder-layer input of the LLM (received attention from
    the query tokens, top ``topk`` channels). ``-> (vision capture, LLM capture, query mask,
    number of generated tokens)``."""
    ids, am = inp["input_ids"], inp["attention_mask"]
    dev = ad.device
    model_kw = {
        "input_ids": ids.to(dev),
        "pixel_values": inp["pixel_values"].to(dev, ad.dtype),
        "attention_mask": am.to(dev),
    }
    generated: dict[str, torch.Tensor] = {}
    if generate > 0:
        # output token 1 comes from the prefill's last row; later steps have one query each and
        # all count (Capture counts every query of a call whose length differs from the mask)
        qmask = torch.zeros_like(ids, dtype=torch.bool)
        qmask[:, -1] = True

        def run():
            generated["ids"] = ad.model.generate(**model_kw, max_new_tokens=generate, do_sample=False)

    else:
        qmask = _text_query_mask(ids, ad.image_token_id)
        if not qmask.any():
            raise SinkscopeError("the prompt has no text after the first image: nothing attends to the image")

        def run():
            ad.model(**model_kw)

    with (
        Capture(ad.vision, layers=[ad.feature_layer], stop_early=False) as vcap,
        # decoder-layer inputs only (hidden_states[0..L-1]): the final norm's output feeds no layer
        Capture(
            ad.llm,
            layers=list(range(ad.llm.n_layers)),
            attention="all",
            dims=True,
            topk=topk,
            stop_early=False,
        ) as lcap,
    ):
        vcap.reset()
        lc = lcap.run_fn(run, attention_mask=am.to(dev), query_mask=qmask)
        vc = vcap.collect()
    n_out = int(generated["ids"].shape[1] - ids.shape[1]) if generate > 0 else 0
    return vc, lc, qmask, n_out


def _vit_sink_table(vit_norms: np.ndarray, lay: TokenLayout, fl: int, vit_rule: VisualSinkRule) -> pd.DataFrame:
    """One row per (image, ViT token) at the feature layer ``fl`` (``vit_norms``: ``[images,
    tokens]``), with ``is_vit_sink`` by ``vit_rule`` over each image's patches."""
    vit_rows = []
    for i in range(vit_norms.shape[0]):
        for t in range(lay.n_tokens):
            vit_rows.append(
                {"image": i, "layer": fl, "token": t, "kind": lay.kind(t), "norm": float(vit_norms[i, t])}
            )
    vit_tab = pd.DataFrame(vit_rows)
    sink = np.zeros(vit_norms.shape, bool)
    sink[:, lay.n_prefix : lay.n_tokens] = patch_mask(vit_rule, vit_norms[:, lay.n_prefix : lay.n_tokens])
    vit_tab["is_vit_sink"] = sink.reshape(-1)  # rows: image-major, token-minor
    return vit_tab


def _llm_sinks(
    ad: LlavaAdapter, ids: torch.Tensor, lc, llm_rule: DimsRule, sink_dims_from: str, topk: int
) -> _LlmSinks:
    """LLM sinks (massive activations) on the prompt sequence, by ``llm_rule`` with its sink dims
    from :func:`_sink_dims`."""
    from ..scanning import batch_rows

    seq = ids.shape[1]
    llm_inputs = ModelInputs({"input_ids": ids}, [TokenLayout(n_text=seq)], ["prompt"])
    lc.norms = lc.norms[:, :, :seq]
    ltab = batch_rows(ad.llm, llm_inputs, lc, causal=True)
    dims, source, source_desc = _sink_dims(ad, ids, ltab, llm_rule, sink_dims_from, topk)
    ldet = detect(ltab, replace(llm_rule, dims=tuple(dims)))
    ltab["is_llm_sink"] = ldet.is_sink.to_numpy()
    return _LlmSinks(ltab, dims, [int(d) for d in ldet.sink_dims], source, source_desc)


def _sink_dims(
    ad: LlavaAdapter,
    ids: torch.Tensor,
    ltab: pd.DataFrame,
    llm_rule: DimsRule,
    sink_dims_from: str,
    topk: int,
) -> tuple[list[int], str, str]:
    """The LLM sink dims, their source (``"given"`` or a :data:`SINK_DIMS_SOURCES` entry) and a
    description of it."""
    if llm_rule.dims is not None:
        return [int(d) for d in llm_rule.dims], "given", "given with the rule"
    if sink_dims_from == "text":
        dims = text_only_sink_dims(ad, ids, llm_rule, topk)
        n_text = int((ids[0] != ad.image_token_id).sum())
        return (
            dims,
            "text",
            f"text-only pass: the prompt without its image tokens ({n_text} tokens) through the LLM",
        )
    if sink_dims_from == "first_text_token":
        is_text = ids[0] != ad.image_token_id
        if not is_text.any():
            raise SinkscopeError("the prompt has no text token to find the LLM sink dims on")
        first = int(torch.nonzero(is_text).min())
        dims = discover_sink_dims(ltab[ltab.token == first], llm_rule)
        return dims, "first_text_token", f"first text token of the multimodal sequence (position {first})"
    return discover_sink_dims(ltab, llm_rule), "multimodal", "multimodal sequence (visual tokens included)"


def _lit_dims(ltab: pd.DataFrame) -> dict[int, list[int]]:
    """Token -> the hidden dims it lights up where it is an LLM sink (its largest channel there)."""
    flagged = (
        ltab.loc[ltab.is_llm_sink, ["token", "top_dim_0"]]
        .drop_duplicates()
        .sort_values(["token", "top_dim_0"])
    )
    lit: dict[int, list[int]] = {}
    for tok, dim in zip(flagged["token"].to_numpy(), flagged["top_dim_0"].to_numpy()):
        lit.setdefault(int(tok), []).append(int(dim))
    return lit


def _visual_token_table(
    ad: LlavaAdapter, ids: torch.Tensor, lay: TokenLayout, vit_tab: pd.DataFrame, llm: _LlmSinks, lc
) -> pd.DataFrame:
    """One row per visual token fed to the LLM (vectorised: no per-token DataFrame lookups)."""
    n_vit, L, seq = lay.n_tokens, ad.llm.n_layers, ids.shape[1]
    mapping = pd.DataFrame(ad.vit_to_llm_positions(ids, n_vit_tokens=n_vit))
    sink_layers = llm.table.groupby("token")["is_llm_sink"].sum()
    lit = _lit_dims(llm.table)
    # attention received per LLM block, head-averaged, from the chosen queries
    att = np.stack([lc.attn_received[b][0, :seq].numpy() for b in range(L)])  # [blocks, seq]
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
    vt = pd.DataFrame(cols)
    vt["row"] = pd.array(vt["row"], dtype="Int32")
    vt["col"] = pd.array(vt["col"], dtype="Int32")
    return vt


def _queries(generate: int, n_out: int) -> str:
    """What the attention is averaged over, in words."""
    if not generate:
        return "text tokens after the first image (prefill)"
    return f"{n_out} generated tokens" + (f" (stopped early; {generate} asked)" if n_out < generate else "")


def _llm_rule_summary(ad: LlavaAdapter, llm_rule: DimsRule, llm: _LlmSinks, topk: int) -> dict[str, Any]:
    """The LLM rule as run: its sink dims and their source, the channels kept, the layers checked."""
    out = {
        **rule_to_dict(llm_rule),
        "sink_dims": llm.sink_dims,
        "sink_dims_source": llm.source,
        "sink_dims_source_description": llm.source_desc,
        "topk_channels": topk,
        "topk_exact": topk >= exact_topk(ad.llm.hidden_size, llm_rule.tau),
        "layers": list(range(llm_rule.min_layer, ad.llm.n_layers)),
        "layers_description": "decoder-layer inputs hidden_states[i], min_layer <= i < L "
        "(the final norm's output is no layer input)",
    }
    if not llm.dims:
        out["sink_dims_note"] = (
            f"no massive activation on the {llm.source_desc}: no LLM sink dims, so no visual token is "
            "called an LLM sink (give dims with the rule, or use sink_dims_from='multimodal')"
        )
    return out


def _llm_rule_note(vt: pd.DataFrame, tau: float, width: int) -> str | None:
    """A warning when over a quarter of the visual tokens pass the LLM sink rule: a rule that calls
    a quarter of the image "sinks" has stopped separating anything."""
    frac = float((vt.llm_sink_layers > 0).mean()) if len(vt) else 0.0
    if frac <= 0.25:
        return None
    return (
        f"{frac:.0%} of the visual tokens pass the LLM sink rule (tau={tau:g}; the largest "
        f"possible max|x|/RMS at width {width} is sqrt({width}) = {width**0.5:.0f}): the 'LLM-emerged sink' "
        "group is not a small set of outliers here - check the projector, or raise tau"
    )


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
