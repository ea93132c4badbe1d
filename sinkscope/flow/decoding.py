"""Word-distribution decoding over a labelled image set (paper analysis 3): the run.

One visual token is *isolated* inside the LLM (its attention to every other token blocked in
every layer) and its final hidden state is decoded through the LM head. The paper reports, over
300 cat / 300 person images, that sink tokens decode to the main-object word far more often than
non-sink tokens. :func:`decode_rate` measures exactly that share for sink and non-sink visual
tokens: a token *hits* when its top-``k`` decoded words contain a word of its image's label.

This module runs the analysis, batch by batch; each step lives in its own module:

- :mod:`~sinkscope.flow.decode_select` - which tokens: **sinks** per image at the vision feature
  layer (the ViT layer LLaVA feeds to the projector) by the ViT sink rule every command uses
  (:class:`~sinkscope.interventions.VisualSinkRule`; default the model's
  :func:`~sinkscope.interventions.default_rule`: the automatic norm gap, or on ``mini-llava`` the
  ``topk:4`` *surrogate* it declares, since its DINOv2-S tower has no norm outliers); which rule
  was used, and why, is always in the result. **Non-sinks**: ``nonsinks_per_image``
  random non-sink patches per image (seeded per image), or all of them.
- :mod:`~sinkscope.flow.decode_forward` - **isolation.** A token that attends only to itself in
  every layer computes a function of its own input embedding alone (the softmax over one key is
  1; RoPE's rotation cancels on ``q.k`` of the same position), so ``method="batched"`` (default)
  runs every chosen token as its own one-token sequence (its LLM input embedding, captured from
  the LLaVA forward, and its position id), many per forward. ``method="mask"`` runs the literal
  masked forward of :func:`sinkscope.flow.knockout.decode_isolated` once per token instead; the
  tests check that the two give the same top-k words.
- :mod:`~sinkscope.flow.decode_words` - **word matching** (:func:`normalize_token`): lower case,
  spaces and the tokenizer's word-start markers (``Ġ``, ``▁``, ``Ċ``, ``##``) stripped, then an
  exact match against the label's word list (:data:`DEFAULT_WORDS`: synonyms per label,
  documented there). Images whose label has no word (lfw's ``non-face``) are a **control**: the
  share of their tokens that decode to *any* label's word (the object word when the object is
  absent).
- :mod:`~sinkscope.flow.decode_stats` - **rates** per group (sink / non-sink), per label and for
  the control, with a binomial confidence interval (:func:`binomial_ci`: Wilson or
  Clopper-Pearson) and the sink - non-sink difference with Newcombe's interval. Tokens of one
  image are not independent: the intervals treat tokens as independent draws, and the result
  says so (:mod:`~sinkscope.flow.decode_summary`).
- :mod:`~sinkscope.flow.decode_outputs` - the files of a run (:meth:`DecodeResult.save`).

>>> res = decode_rate("tiny-llava+sinks", "lfw-faces", rule="topk:2", max_images=4, progress=False)
>>> print(res.rates[res.rates.scope == "all"][["group", "n_images", "n_tokens"]].to_string(index=False))
  group  n_images  n_tokens
   sink         2         4
nonsink         2        16

The paper's setting on a real (small) LLaVA (skipped in the doctests: runs the real mini-llava
on 40 images):

>>> res = decode_rate("mini-llava", "lfw-faces", max_images=40)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd

from .._utils import SinkscopeError, package_versions, progress_bar
from ..data import LabeledImages, load_dataset
from ..interventions.rules import resolve_rule
from ..models.base import Adapter
from ..models.llava import LlavaAdapter
from .decode_forward import decode_tokens, prepare_batch, read_images, token_strings
from .decode_outputs import OUTPUT_FILES, check_decode_out, write_decode_outputs
from .decode_select import TopNormRule, as_rule, check_rule, choose_tokens, sink_rule_to_dict
from .decode_stats import CI_METHODS, GROUPS, binomial_ci, difference_ci, rate_table
from .decode_summary import add_skipped, decode_summary
from .decode_words import DEFAULT_WORDS, WORD_MARKERS, default_words, match_words, normalize_token, word_sets

METHODS = ("batched", "mask")

DEFAULT_PROMPT = "What is the main object in the image?"


@dataclass
class DecodeResult:
    """``per_token``: one row per decoded visual token (image, label, group, ViT norm, top-k
    tokens, hit); ``rates``: one row per (group, scope) with ``n_tokens, n_hits, rate, ci_low,
    ci_high``; ``summary``: rules, words, settings, headline rates, caveats.

    >>> res = decode_rate("tiny-llava+sinks", "lfw-faces", max_images=2, progress=False)
    >>> list(res.per_token.columns[:5]), res.summary["rates"]["nonsink"]["n_tokens"]
    (['image', 'image_name', 'label', 'group', 'vit_token'], 8)
    """

    per_token: pd.DataFrame
    rates: pd.DataFrame
    summary: dict[str, Any] = field(default_factory=dict)
    out: Path | None = None
    #: the ``DecodeConfig`` of a run made by (or loaded through) ``sinkscope.run``
    config: Any = None

    def save(self, out: str | Path, overwrite: bool = False) -> Path:
        """Write ``decode_rate.csv``, ``decode_tokens.csv`` and ``summary.json``; see
        :func:`write_decode_outputs` (``sinkscope.viz.write_page`` draws ``decode.html``).

        >>> t = pd.DataFrame({"group": ["sink", "nonsink"], "label": "cat", "scope": "target",
        ...                   "image": 0, "hit": [True, False], "hit_any": False})
        >>> DecodeResult(t, rate_table(t), {"analysis": "word-distribution decoding"}).save("runs/d").name
        'd'
        """
        return write_decode_outputs(out, self, overwrite=overwrite)


def decode_rate(
    model: str | Adapter,
    data: str | LabeledImages = "lfw-faces",
    words: Mapping[str, Sequence[str]] | None = None,
    rule: Any = None,
    label: str | None = None,
    top_k: int = 5,
    nonsinks_per_image: int | None = 8,
    max_images: int | None = None,
    seed: int = 0,
    method: str = "batched",
    prompt: str = DEFAULT_PROMPT,
    chat: bool = False,
    ci: str = "wilson",
    confidence: float = 0.95,
    batch_size: int = 8,
    decode_chunk: int = 256,
    device: str | None = None,
    dtype: str | None = None,
    progress: bool = True,
) -> DecodeResult:
    """Share of sink vs non-sink visual tokens whose isolated decoding names the image's object.

    ``model``: a LLaVA-style model (name or adapter). ``data``: a dataset name or path (see
    :func:`~sinkscope.data.load_dataset`) or a :class:`~sinkscope.data.LabeledImages`; ``label``
    its label column (default: the first). ``words``: label -> accepted words (default:
    :data:`DEFAULT_WORDS` of the dataset); images whose label has no words are the control.
    ``rule``: the ViT sink rule at the vision feature layer (anything
    :func:`~sinkscope.interventions.rule_from` reads, e.g. ``"norm:100"`` or ``"topk:2"``; default
    the model's :func:`~sinkscope.interventions.default_rule`). ``top_k``: decoded words checked per
    token. ``nonsinks_per_image``: random non-sink patches decoded per image (``None``: all).
    ``max_images``: a stratified, seeded subset. ``method``: ``"batched"`` (one-token sequences,
    exact for isolated tokens) or ``"mask"`` (:func:`~sinkscope.flow.knockout.decode_isolated`
    on the full prompt, one forward per token). ``prompt``/``chat``: the sequence the visual
    tokens sit in (an isolated token does not see it; recorded). ``ci``: ``"wilson"`` or
    ``"clopper-pearson"``.

    >>> res = decode_rate("tiny-llava+sinks", "lfw-faces", max_images=4, progress=False)
    >>> sorted(res.rates.group.unique()), res.summary["top_k"]
    (['nonsink', 'sink'], 5)
    """
    t0 = time.perf_counter()
    _check_settings(method, ci, top_k, nonsinks_per_image)
    if rule is not None:
        check_rule(rule)  # a rule decoding cannot apply fails before the model loads
    ds, col, labels, wsets = _resolve_data(data, words, label, max_images, seed)
    ad = _load_llava(model, device, dtype)
    feeds_cls = ad.select_strategy == "full"  # the CLS token reaches the LLM: decode may name it
    rule, why = resolve_rule(ad, as_rule(rule) if rule is not None else None, cls=feeds_cls)
    check_rule(rule, cls=feeds_cls).check_for("decode", cls=feeds_cls, layer=ad.feature_layer, n_layers=ad.vision.n_layers)
    plan = _Plan(
        ad, ds, labels, wsets, rule, top_k, nonsinks_per_image, seed, method, prompt, chat, decode_chunk
    )
    tally = _decode_all(plan, batch_size, progress)
    per_token = pd.DataFrame(tally.rows)
    if len(per_token):
        per_token["hit_rank"] = pd.array(per_token["hit_rank"], dtype="Int64")
    rates = rate_table(per_token, ci=ci, confidence=confidence)
    settings = {
        "top_k": top_k,
        "nonsinks_per_image": nonsinks_per_image,
        "seed": seed,
        "method": method,
        "prompt": prompt,
        "chat_template": chat,
        "ci_method": ci,
        "confidence": confidence,
    }
    summary = decode_summary(ad, ds, col, labels, wsets, rule, settings, rates, tally.n_without_sink, why)
    add_skipped(summary, tally.failed, tally.upscaled, int(ad.vision.patch_size))
    summary["timings"] = {"total_s": round(time.perf_counter() - t0, 3)}
    summary["versions"] = package_versions(("sinkscope", "torch", "transformers"))
    return DecodeResult(per_token, rates, summary)


# -- the steps of decode_rate ----------------------------------------------------------------------


def _check_settings(method: str, ci: str, top_k: int, nonsinks_per_image: int | None) -> None:
    if method not in METHODS:
        raise SinkscopeError(f"unknown decoding method {method!r}; choose from {', '.join(METHODS)}")
    if ci not in CI_METHODS:
        raise SinkscopeError(f"unknown CI method {ci!r}; choose from {', '.join(CI_METHODS)}")
    if top_k < 1:
        raise SinkscopeError(f"top_k must be >= 1, got {top_k}")
    if nonsinks_per_image is not None and nonsinks_per_image < 0:
        raise SinkscopeError(f"nonsinks_per_image must be >= 0 or None, got {nonsinks_per_image}")


def _resolve_data(data, words, label, max_images, seed):
    """``(dataset, label column, labels, normalised words)``: the (subsampled) data set, checked
    to have the label column and at least one image whose label has words."""
    ds = load_dataset(data) if isinstance(data, str) else data
    wsets = word_sets(default_words(ds.name) if words is None else words)
    if not wsets:
        raise SinkscopeError("the word list is empty")
    col = label or (ds.label_columns[0] if ds.label_columns else None)
    if col is None or col not in ds.labels.columns:
        raise SinkscopeError(f"dataset {ds.name!r} has no label column {label!r} (has {ds.label_columns})")
    if max_images is not None:
        ds = ds.subsample(max_images, seed=seed)
    labels = ds.labels[col].astype(str).tolist()
    if not any(lab in wsets for lab in labels):
        raise SinkscopeError(
            f"no image of {ds.name!r} has a label with words ({sorted(set(labels))[:10]} vs {sorted(wsets)})"
        )
    return ds, col, labels, wsets


def _load_llava(model, device, dtype) -> LlavaAdapter:
    from ..models import load_model

    ad = model if isinstance(model, Adapter) else load_model(model, device=device, dtype=dtype)
    if not isinstance(ad, LlavaAdapter):
        raise SinkscopeError(f"decoding needs a LLaVA-style model; {ad.name!r} is {ad.family!r}")
    return ad


@dataclass(frozen=True)
class _Plan:
    """What every batch of one :func:`decode_rate` call shares."""

    ad: LlavaAdapter
    ds: LabeledImages
    labels: list[str]
    wsets: dict[str, frozenset[str]]
    rule: Any
    top_k: int
    nonsinks_per_image: int | None
    seed: int
    method: str
    prompt: str
    chat: bool
    decode_chunk: int

    @cached_property
    def any_word(self) -> frozenset[str]:
        """Every word of every label (what a control image's token may hit)."""
        return frozenset().union(*self.wsets.values())


@dataclass
class _Tally:
    """What the batches of one :func:`decode_rate` call add up: the per-token rows, the images
    without sink, those that could not be read, the last whole-pixel enlargement (1: none)."""

    rows: list[dict] = field(default_factory=list)
    n_without_sink: int = 0
    failed: list[dict] = field(default_factory=list)
    upscaled: int = 1


def _decode_all(plan: _Plan, batch_size: int, progress: bool) -> _Tally:
    """Every image of ``plan.ds``, ``batch_size`` per LLaVA forward; an unreadable image is
    skipped (all unreadable: an error)."""
    tally = _Tally()
    ds = plan.ds
    bar = progress_bar(len(ds), enabled=progress, desc=f"decode {plan.ad.name}")
    for start in range(0, len(ds), batch_size):
        batch = range(start, min(start + batch_size, len(ds)))
        arrays, idx, failed, upscaled = read_images(ds, batch, plan.ad)
        tally.failed += failed
        if upscaled > 1:
            tally.upscaled = upscaled
        if idx:
            rows, n_without_sink = _decode_batch(plan, arrays, idx)
            tally.rows += rows
            tally.n_without_sink += n_without_sink
        bar.update(len(batch))
    bar.close()
    if len(tally.failed) == len(ds):
        raise SinkscopeError(f"no image of {ds.name!r} could be read")
    return tally


def _decode_batch(plan: _Plan, arrays: list, idx: list[int]) -> tuple[list[dict], int]:
    """The per-token rows of one batch (images ``idx`` of the set) and its images without sink."""
    ad = plan.ad
    ids, embeds, norms, lay, kw = prepare_batch(ad, arrays, plan.prompt, plan.chat)
    fed = ad.fed_vit_tokens(lay.n_tokens)
    mapping = ad.vit_to_llm_positions(ids[0], n_vit_tokens=lay.n_tokens)
    pos_of = {m["vit_token"]: m["llm_position"] for m in mapping}
    kinds = [lay.kind(t) for t in fed]
    chosen: list[dict] = []
    n_without_sink = 0
    for b, i in enumerate(idx):
        nv = norms[b, fed]
        picked, med, no_sink = choose_tokens(nv, kinds, plan.rule, plan.nonsinks_per_image, plan.seed, i)
        n_without_sink += int(no_sink)
        for j, grp in picked:
            chosen.append(_token_record(plan, b, i, grp, fed[j], float(nv[j]), med, lay, pos_of))
    if not chosen:
        return [], n_without_sink
    top_ids, top_p = decode_tokens(ad, chosen, (ids, embeds, kw), plan.method, plan.top_k, plan.decode_chunk)
    return [_token_row(plan, c, tid, pr) for c, tid, pr in zip(chosen, top_ids, top_p)], n_without_sink


def _token_record(plan: _Plan, b: int, i: int, grp: str, t, norm: float, med: float, lay, pos_of) -> dict:
    """Where a chosen token is: batch item ``b``, image ``i``, group, ViT token ``t`` (its grid
    cell, norm and norm / the image's median patch norm) and its position in the LLM sequence."""
    r, c = lay.row_col(t)
    return {
        "batch_item": b,
        "image": i,
        "image_name": plan.ds.items[i].name,
        "label": plan.labels[i],
        "group": grp,
        "vit_token": int(t),
        "row": r,
        "col": c,
        "vit_norm": norm,
        "norm_ratio": norm / med if med and med == med else math.nan,
        "llm_position": int(pos_of[t]),
    }


def _token_row(plan: _Plan, c: dict, tid, pr) -> dict:
    """The per-token row of a chosen token ``c`` decoded to top-k ids ``tid`` with probs ``pr``:
    its top-k tokens and words, whether one is a word of its label (``hit``; control images have
    none) or of any label (``hit_any``)."""
    toks = token_strings(plan.ad.tokenizer, tid)
    own = plan.wsets.get(c["label"])
    rank, word = match_words(toks, own) if own else (None, None)
    any_rank, any_w = match_words(toks, plan.any_word)
    c.pop("batch_item")
    return {
        **c,
        "scope": "target" if own else "control",
        "top_ids": json.dumps([int(x) for x in tid]),
        "top_tokens": json.dumps(toks, ensure_ascii=False),
        "top_words": json.dumps([normalize_token(x) for x in toks], ensure_ascii=False),
        "top_probs": json.dumps([round(float(x), 6) for x in pr]),
        "hit": bool(rank is not None),
        "hit_rank": rank,
        "hit_word": word,
        "hit_any": bool(any_rank is not None),
        "hit_any_word": any_w,
    }


__all__ = [
    "CI_METHODS",
    "DEFAULT_PROMPT",
    "DEFAULT_WORDS",
    "DecodeResult",
    "GROUPS",
    "METHODS",
    "OUTPUT_FILES",
    "TopNormRule",
    "WORD_MARKERS",
    "binomial_ci",
    "check_decode_out",
    "decode_rate",
    "difference_ci",
    "match_words",
    "normalize_token",
    "rate_table",
    "sink_rule_to_dict",
    "write_decode_outputs",
]
