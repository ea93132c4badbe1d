"""Word-distribution decoding over a labelled image set (paper analysis 3).

One visual token is *isolated* inside the LLM (its attention to every other token blocked in
every layer) and its final hidden state is decoded through the LM head. The paper reports, over
300 cat / 300 person images, that sink tokens decode to the main-object word far more often than
non-sink tokens. :func:`decode_rate` measures exactly that share for sink and non-sink visual
tokens: a token *hits* when its top-``k`` decoded words contain a word of its image's label.

- **Sinks** are chosen per image at the vision feature layer (the ViT layer LLaVA feeds to the
  projector) by a :class:`~sinkscope.sinks.NormRule` (absolute or relative threshold, or the
  automatic rule with ``auto_scope="image"``) or by :class:`TopNormRule`, a named *surrogate* -
  the ``n`` highest-norm patches of each image - for towers without norm outliers (DINOv2-S, the
  vision tower of ``mini-llava``: max/median norm about 3x). Which rule was used is always in the
  result. **Non-sinks**: ``nonsinks_per_image`` random non-sink patches per image (seeded per
  image), or all of them.
- **Isolation.** A token that attends only to itself in every layer computes a function of its own
  input embedding alone (the softmax over one key is 1; RoPE's rotation cancels on ``q.k`` of
  the same position), so ``method="batched"`` (default) runs every chosen token as its own
  one-token sequence (its LLM input embedding, captured from the LLaVA forward, and its position
  id), many per forward. ``method="mask"`` runs the literal masked forward of
  :func:`sinkscope.flow.knockout.decode_isolated` once per token instead; the tests check that the
  two give the same top-k words.
- **Word matching** (:func:`normalize_token`): lower case, spaces and the tokenizer's word-start
  markers (``Ġ``, ``▁``, ``Ċ``, ``##``) stripped, then an exact match against the label's word list
  (:data:`DEFAULT_WORDS`: synonyms per label, documented there). Images whose label has no word
  (lfw's ``non-face``) are a **control**: the share of their tokens that decode to *any* label's
  word (the object word when the object is absent).
- **Rates** per group (sink / non-sink), per label and for the control, with a binomial
  confidence interval (:func:`binomial_ci`: Wilson or Clopper-Pearson) and the sink - non-sink
  difference with Newcombe's interval. Tokens of one image are not independent: the intervals
  treat tokens as independent draws, and the result says so.

>>> res = decode_rate(load_model("mini-llava"), "lfw-faces", rule=TopNormRule(2), max_images=40)  # doctest: +SKIP
>>> res.rates[res.rates.scope == "all"][["group", "n_tokens", "n_hits", "rate", "ci_low", "ci_high"]]  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .._utils import SinkscopeError, package_versions
from ..capture import Capture, StopForward
from ..data import LabeledImages, load_dataset
from ..models.base import Adapter
from ..models.llava import LlavaAdapter
from ..sinks import NormRule, detect, rule_to_dict

#: Words that count as the main object of an image, per dataset and label (matched after
#: :func:`normalize_token`). ``lfw-faces``: a face image counts when a token decodes to a word
#: for a face or a person (the paper's "person" class); ``non-face`` images have no object word
#: and serve as the control. ``digits``: the numeral and the English word of the digit.
DEFAULT_WORDS: dict[str, dict[str, tuple[str, ...]]] = {
    "lfw-faces": {
        "face": (
            "face",
            "faces",
            "facial",
            "person",
            "persons",
            "people",
            "human",
            "man",
            "woman",
            "portrait",
        ),
    },
    "digits": {
        str(d): (str(d), w)
        for d, w in enumerate(
            ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
        )
    },
}

#: Word-start / continuation markers of common tokenizers (byte-level BPE, SentencePiece, WordPiece).
WORD_MARKERS = ("Ġ", "▁", "Ċ", "ĉ", "##")

CI_METHODS = ("wilson", "clopper-pearson")
METHODS = ("batched", "mask")
GROUPS = ("sink", "nonsink")

DEFAULT_PROMPT = "What is the main object in the image?"

log = logging.getLogger("sinkscope")


# -- sink rules ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TopNormRule:
    """Surrogate sink rule: the ``n`` highest-norm patch tokens of each image.

    Not an outlier criterion - every image gets exactly ``n`` "sinks" - so use it, and name it,
    where the tower has no norm outliers (DINOv2-S: max/median norm about 3x) and a threshold
    rule would find none.

    >>> TopNormRule(2).describe()
    'top-norm surrogate: the 2 highest-L2-norm patch tokens of each image (not an outlier criterion)'
    """

    n: int = 2
    method: str = field(default="top-norm", init=False)

    def __post_init__(self):
        if self.n < 1:
            raise SinkscopeError(f"top-norm rule: n must be >= 1, got {self.n}")

    @property
    def mode(self) -> str:
        return "top"

    def describe(self) -> str:
        return (
            f"top-norm surrogate: the {self.n} highest-L2-norm patch tokens of each image "
            "(not an outlier criterion)"
        )


def sink_rule_to_dict(rule: NormRule | TopNormRule) -> dict[str, Any]:
    """JSON form of a decoding sink rule (:func:`~sinkscope.sinks.rule_to_dict` for a NormRule),
    with ``surrogate`` saying whether it is a stand-in for an outlier criterion.

    >>> sink_rule_to_dict(TopNormRule(3))["surrogate"]
    True
    """
    if isinstance(rule, TopNormRule):
        return {
            "method": rule.method,
            "mode": rule.mode,
            "description": rule.describe(),
            "threshold": {"kind": "top", "value": rule.n},
            "params": {"n": rule.n},
            "surrogate": True,
        }
    return {**rule_to_dict(rule), "surrogate": False}


def _check_rule(rule) -> None:
    if isinstance(rule, TopNormRule):
        return
    if not isinstance(rule, NormRule):
        raise SinkscopeError(f"decoding needs a NormRule or a TopNormRule, got {type(rule).__name__}")
    if rule.mode == "auto" and rule.auto_scope != "image":
        raise SinkscopeError(
            "the automatic norm rule must find the gap in each image here: NormRule(auto_scope='image')"
        )


def _pick_sinks(norms: np.ndarray, kinds: list[str], rule) -> np.ndarray:
    """Boolean mask of sinks among one image's fed ViT tokens (patch tokens only)."""
    is_patch = np.array([k == "patch" for k in kinds])
    out = np.zeros(len(norms), bool)
    if isinstance(rule, TopNormRule):
        idx = np.nonzero(is_patch)[0]
        top = idx[np.argsort(-norms[idx], kind="stable")[: rule.n]]
        out[top] = True
        return out
    tab = pd.DataFrame({"image": 0, "layer": 0, "token": np.arange(len(norms)), "kind": kinds, "norm": norms})
    out[:] = detect(tab, rule).is_sink.to_numpy().astype(bool)
    return out & is_patch


# -- words ---------------------------------------------------------------------------------------


def normalize_token(token: str | None) -> str:
    """A decoded token as a word: word-start markers removed, spaces stripped, lower case.

    >>> [normalize_token(t) for t in ["ĠCat", "▁person", " Face ", "##s", "7"]]
    ['cat', 'person', 'face', 's', '7']
    """
    s = "" if token is None else str(token)
    for m in WORD_MARKERS:
        s = s.replace(m, "")
    return "".join(s.split()).lower()


def _word_sets(words: Mapping[str, Sequence[str]]) -> dict[str, frozenset[str]]:
    out = {}
    for label, ws in words.items():
        if isinstance(ws, str):
            ws = [ws]
        norm = frozenset(w for w in (normalize_token(x) for x in ws) if w)
        if norm:
            out[str(label)] = norm
    return out


def match_words(
    tokens: Sequence[str], words: Sequence[str] | frozenset[str]
) -> tuple[int | None, str | None]:
    """Rank (1-based) and normalized form of the first token among ``tokens`` that is one of
    ``words`` (both normalized with :func:`normalize_token`); ``(None, None)`` when none is.

    >>> match_words(["Ġthe", "ĠPerson", "Ġman"], ["person", "people"])
    (2, 'person')
    """
    ws = {normalize_token(w) for w in words}
    for r, t in enumerate(tokens, 1):
        n = normalize_token(t)
        if n and n in ws:
            return r, n
    return None, None


# -- confidence intervals --------------------------------------------------------------------------


def binomial_ci(k: int, n: int, confidence: float = 0.95, method: str = "wilson") -> tuple[float, float]:
    """Two-sided confidence interval of a binomial proportion ``k / n``.

    ``method``: ``"wilson"`` (score interval) or ``"clopper-pearson"`` (exact, from the beta
    distribution). ``n == 0`` gives ``(nan, nan)``.

    >>> [round(x, 4) for x in binomial_ci(8, 10)]
    [0.4902, 0.9433]
    >>> [round(x, 4) for x in binomial_ci(0, 10, method="clopper-pearson")]
    [0.0, 0.3085]
    """
    if method not in CI_METHODS:
        raise SinkscopeError(f"unknown CI method {method!r}; choose from {', '.join(CI_METHODS)}")
    if not 0 < confidence < 1:
        raise SinkscopeError(f"confidence must be in (0, 1), got {confidence}")
    if not 0 <= k <= n:
        raise SinkscopeError(f"binomial CI needs 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return (math.nan, math.nan)
    alpha = 1.0 - confidence
    if method == "wilson":
        from scipy.stats import norm

        z = float(norm.ppf(1 - alpha / 2))
        p = k / n
        denom = 1 + z * z / n
        centre = (p + z * z / (2 * n)) / denom
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
        # exact 0 / 1 at k = 0 / k = n (where the bound is 0 or 1 up to rounding)
        return (0.0 if k == 0 else max(0.0, centre - half), 1.0 if k == n else min(1.0, centre + half))
    from scipy.stats import beta

    lo = 0.0 if k == 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    return (lo, hi)


def difference_ci(k1: int, n1: int, k2: int, n2: int, confidence: float = 0.95) -> tuple[float, float, float]:
    """``p1 - p2`` and Newcombe's hybrid score interval for it (from the two Wilson intervals).

    >>> [round(x, 4) for x in difference_ci(8, 10, 2, 10)]
    [0.6, 0.1618, 0.8027]
    """
    if n1 == 0 or n2 == 0:
        return (math.nan, math.nan, math.nan)
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = binomial_ci(k1, n1, confidence, "wilson")
    l2, u2 = binomial_ci(k2, n2, confidence, "wilson")
    d = p1 - p2
    return (d, d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2))


# -- the analysis ----------------------------------------------------------------------------------


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

        >>> res.save("runs/decode")                                     # doctest: +SKIP
        """
        return write_decode_outputs(out, self, overwrite=overwrite)


class _Stop(StopForward):
    pass


def _prepare_batch(ad: LlavaAdapter, arrays: list[np.ndarray], prompt: str, chat: bool):
    """One sequence per image (same prompt), stacked: the LLM input embeddings (captured where the
    LLM starts, before any decoder layer runs), the ViT norms at the feature layer, the layout."""
    parts = [ad.build_inputs([a], prompt, chat=chat) for a in arrays]
    ids = torch.cat([p["input_ids"] for p in parts])
    if any(p["input_ids"].shape != parts[0]["input_ids"].shape for p in parts):
        raise SinkscopeError("images of one batch gave prompts of different lengths")
    pv = torch.cat([p["pixel_values"] for p in parts])
    lay = parts[0]["layout"]
    got: dict[str, torch.Tensor] = {}

    def hook(module, args, kwargs):
        e = kwargs.get("inputs_embeds")
        if e is None:
            raise SinkscopeError("the language model was not called with inputs_embeds")
        got["embeds"] = e.detach()
        raise _Stop

    dev = ad.device
    kw = {
        "input_ids": ids.to(dev),
        "attention_mask": torch.ones_like(ids).to(dev),
        "pixel_values": pv.to(dev, ad.dtype),
    }
    handle = ad.llm.decoder.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with Capture(ad.vision, layers=[ad.feature_layer], stop_early=False) as vcap:
            vcap.reset()
            try:
                with torch.no_grad():
                    ad.model(**kw)
            except _Stop:
                pass
            vc = vcap.collect()
    finally:
        handle.remove()
    if "embeds" not in got:
        raise SinkscopeError("the LLaVA forward never reached the language model")
    return ids, got["embeds"], vc.norms[:, 0, : lay.n_tokens].numpy(), lay, kw


@torch.no_grad()
def _decode_batched(ad: LlavaAdapter, embeds: torch.Tensor, positions: torch.Tensor, top_k: int, chunk: int):
    """Top-k (ids, probs) of each embedding run alone as a one-token sequence at its position."""
    ids_out, probs_out = [], []
    for s in range(0, len(embeds), chunk):
        e = embeds[s : s + chunk][:, None, :]
        pos = positions[s : s + chunk][:, None].to(e.device)
        out = ad.model(
            inputs_embeds=e,
            attention_mask=torch.ones(e.shape[:2], dtype=torch.long, device=e.device),
            position_ids=pos,
            use_cache=False,
        )
        top = out.logits[:, -1].float().softmax(-1).topk(top_k)
        ids_out.append(top.indices.cpu())
        probs_out.append(top.values.cpu())
    if not ids_out:
        return np.zeros((0, top_k), int), np.zeros((0, top_k))
    return torch.cat(ids_out).numpy(), torch.cat(probs_out).numpy()


def _token_strings(tokenizer, ids) -> list[str]:
    out = []
    for tid in ids:
        w = tokenizer.convert_ids_to_tokens(int(tid)) if tokenizer is not None else None
        out.append(w if w is not None else f"<id {int(tid)}>")  # same fallback as decode_isolated
    return out


def decode_rate(
    model: str | Adapter,
    data: str | LabeledImages = "lfw-faces",
    words: Mapping[str, Sequence[str]] | None = None,
    rule: NormRule | TopNormRule | None = None,
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
    ``rule``: sink rule at the vision feature layer (default ``NormRule(relative=5)``; use
    :class:`TopNormRule` on towers without norm outliers). ``top_k``: decoded words checked per
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
    from ..models import load_model
    from .._utils import progress_bar

    t0 = time.perf_counter()
    if method not in METHODS:
        raise SinkscopeError(f"unknown decoding method {method!r}; choose from {', '.join(METHODS)}")
    if ci not in CI_METHODS:
        raise SinkscopeError(f"unknown CI method {ci!r}; choose from {', '.join(CI_METHODS)}")
    if top_k < 1:
        raise SinkscopeError(f"top_k must be >= 1, got {top_k}")
    if nonsinks_per_image is not None and nonsinks_per_image < 0:
        raise SinkscopeError(f"nonsinks_per_image must be >= 0 or None, got {nonsinks_per_image}")
    rule = rule if rule is not None else NormRule(relative=5.0)
    _check_rule(rule)
    ds = load_dataset(data) if isinstance(data, str) else data
    base_name = ds.name.split("[", 1)[0]
    if words is None:
        if base_name not in DEFAULT_WORDS:
            raise SinkscopeError(
                f"no default word list for dataset {ds.name!r}: pass words={{label: [word, ...]}} "
                f"(defaults exist for {', '.join(DEFAULT_WORDS)})"
            )
        words = DEFAULT_WORDS[base_name]
    wsets = _word_sets(words)
    if not wsets:
        raise SinkscopeError("the word list is empty")
    any_word = frozenset().union(*wsets.values())
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
    ad = model if isinstance(model, Adapter) else load_model(model, device=device, dtype=dtype)
    if not isinstance(ad, LlavaAdapter):
        raise SinkscopeError(f"decoding needs a LLaVA-style model; {ad.name!r} is {ad.family!r}")
    tok = ad.tokenizer
    rows: list[dict] = []
    n_without_sink = 0
    failed: list[dict] = []
    patch_px = int(ad.vision.patch_size)
    upscaled = 1
    bar = progress_bar(len(ds), enabled=progress, desc=f"decode {ad.name}")
    for start in range(0, len(ds), batch_size):
        batch = range(start, min(start + batch_size, len(ds)))
        arrays, idx = [], []
        for i in batch:
            it = ds.items[i]
            try:
                a = it.load()
                ad.vision.check_image(a.shape[0], a.shape[1], it.name, min_side=ds.min_side)
            except SinkscopeError as e:  # one line per bad image; the others go on
                log.error("%s", e)
                failed.append({"image": it.name, "reason": str(e)})
                continue
            if min(a.shape[:2]) < patch_px:  # a set of tiny images (digits: 8 px): whole-pixel upscale
                f = -(-patch_px // min(a.shape[:2]))
                a = np.repeat(np.repeat(a, f, axis=0), f, axis=1)
                upscaled = f
            arrays.append(a)
            idx.append(i)
        if not idx:
            bar.update(len(batch))
            continue
        ids, embeds, norms, lay, kw = _prepare_batch(ad, arrays, prompt, chat)
        fed = ad.fed_vit_tokens(lay.n_tokens)
        mapping = ad.vit_to_llm_positions(ids[0], n_vit_tokens=lay.n_tokens)
        pos_of = {m["vit_token"]: m["llm_position"] for m in mapping}
        kinds = [lay.kind(t) for t in fed]
        chosen: list[dict] = []
        for b, i in enumerate(idx):
            nv = norms[b, fed]
            sink = _pick_sinks(nv, kinds, rule)
            patch = np.array([k == "patch" for k in kinds])
            med = float(np.median(nv[patch])) if patch.any() else math.nan
            s_idx = np.nonzero(sink)[0]
            ns_idx = np.nonzero(patch & ~sink)[0]
            n_without_sink += int(len(s_idx) == 0)
            if nonsinks_per_image is not None and len(ns_idx) > nonsinks_per_image:
                rng = np.random.default_rng([seed, i])  # per image: independent of the batch size
                ns_idx = np.sort(rng.choice(ns_idx, size=nonsinks_per_image, replace=False))
            for j, grp in [(j, "sink") for j in s_idx] + [(j, "nonsink") for j in ns_idx]:
                t = fed[j]
                r, c = lay.row_col(t)
                chosen.append(
                    {
                        "batch_item": b,
                        "image": i,
                        "image_name": ds.items[i].name,
                        "label": labels[i],
                        "group": grp,
                        "vit_token": int(t),
                        "row": r,
                        "col": c,
                        "vit_norm": float(nv[j]),
                        "norm_ratio": float(nv[j]) / med if med and med == med else math.nan,
                        "llm_position": int(pos_of[t]),
                    }
                )
        if chosen:
            if method == "batched":
                e = torch.stack([embeds[c["batch_item"], c["llm_position"]] for c in chosen])
                p = torch.tensor([c["llm_position"] for c in chosen])
                top_ids, top_p = _decode_batched(ad, e, p, top_k, decode_chunk)
            else:
                from .knockout import decode_isolated

                top_ids = np.zeros((len(chosen), top_k), int)
                top_p = np.zeros((len(chosen), top_k))
                seq = ids.shape[1]
                for b in sorted({c["batch_item"] for c in chosen}):
                    sel = [k for k, c in enumerate(chosen) if c["batch_item"] == b]
                    kw_b = {k: v[b : b + 1] for k, v in kw.items()}
                    d = decode_isolated(
                        lambda kw_b=kw_b: ad.model(**kw_b),
                        ad.llm,
                        [chosen[k]["llm_position"] for k in sel],
                        seq,
                        tok,
                        top_k=top_k,
                    )
                    for k in sel:
                        dd = d[d.position == chosen[k]["llm_position"]].sort_values("rank")
                        top_ids[k] = dd.token_id.to_numpy()
                        top_p[k] = dd.prob.to_numpy()
            for c, tid, pr in zip(chosen, top_ids, top_p):
                toks = _token_strings(tok, tid)
                own = wsets.get(c["label"])
                rank, word = match_words(toks, own) if own else (None, None)
                any_rank, any_w = match_words(toks, any_word)
                c.pop("batch_item")
                rows.append(
                    {
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
                )
        bar.update(len(batch))
    bar.close()
    if len(failed) == len(ds):
        raise SinkscopeError(f"no image of {ds.name!r} could be read")
    per_token = pd.DataFrame(rows)
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
    summary = _summary(ad, ds, col, labels, wsets, rule, settings, rates, n_without_sink)
    if failed:
        summary["failed"] = failed
        summary["caveats"].append(f"{len(failed)} image(s) could not be read and were skipped")
    if upscaled > 1:
        summary["upscaled"] = (
            f"images smaller than one {patch_px} px patch were enlarged {upscaled}x by pixel repetition "
            "before the model's processor"
        )
    summary["timings"] = {"total_s": round(time.perf_counter() - t0, 3)}
    summary["versions"] = package_versions(("sinkscope", "torch", "transformers"))
    return DecodeResult(per_token, rates, summary)


def rate_table(per_token: pd.DataFrame, ci: str = "wilson", confidence: float = 0.95) -> pd.DataFrame:
    """Hit rates from a per-token table (columns ``group, label, scope, image, hit, hit_any``).

    One row per group (``sink``, ``nonsink``) and scope: ``all`` (images whose label has words;
    hit = own label's word), ``label=<x>`` per such label, and ``control`` (images whose label has
    no words; hit = any label's word). Columns ``group, scope, label, n_images, n_tokens, n_hits,
    rate, ci_low, ci_high, ci_method, confidence``.

    >>> t = pd.DataFrame({"group": ["sink"] * 10, "label": "cat", "scope": "target",
    ...                   "image": range(10), "hit": [True] * 8 + [False] * 2, "hit_any": False})
    >>> r = rate_table(t)
    >>> r.loc[(r.group == "sink") & (r.scope == "all"), ["n_tokens", "n_hits", "rate"]].values.tolist()
    [[10.0, 8.0, 0.8]]
    """
    out = []

    def add(group, scope, lab, d, col):
        n, k = len(d), int(d[col].sum()) if len(d) else 0
        lo, hi = binomial_ci(k, n, confidence, ci)
        out.append(
            {
                "group": group,
                "scope": scope,
                "label": lab,
                "n_images": int(d["image"].nunique()) if n else 0,
                "n_tokens": n,
                "n_hits": k,
                "rate": k / n if n else math.nan,
                "ci_low": lo,
                "ci_high": hi,
                "ci_method": ci,
                "confidence": confidence,
            }
        )

    cols = ["group", "label", "scope", "image", "hit", "hit_any"]
    t = per_token if len(per_token) else pd.DataFrame(columns=cols)
    for g in GROUPS:
        d = t[t.group == g]
        tgt = d[d.scope == "target"]
        add(g, "all", "", tgt, "hit")
        for lab in sorted(t[t.scope == "target"].label.unique(), key=_label_key):
            add(g, f"label={lab}", lab, tgt[tgt.label == lab], "hit")
        if (t.scope == "control").any():
            add(g, "control", "", d[d.scope == "control"], "hit_any")
    return pd.DataFrame(out)


def _label_key(x):
    return (0, int(x), "") if str(x).isdigit() else (1, 0, str(x))


def _headline(rates: pd.DataFrame, group: str, scope: str) -> dict[str, Any]:
    r = rates[(rates.group == group) & (rates.scope == scope)]
    if not len(r):
        return {}
    r = r.iloc[0]
    return {
        "n_images": int(r.n_images),
        "n_tokens": int(r.n_tokens),
        "n_hits": int(r.n_hits),
        "rate": None if r.n_tokens == 0 else float(r.rate),
        "ci": None if r.n_tokens == 0 else [float(r.ci_low), float(r.ci_high)],
    }


def _summary(ad, ds, col, labels, wsets, rule, settings, rates, n_without_sink) -> dict[str, Any]:
    top_k, method, confidence = settings["top_k"], settings["method"], settings["confidence"]
    s = _headline(rates, "sink", "all")
    ns = _headline(rates, "nonsink", "all")
    diff = None
    if s.get("n_tokens") and ns.get("n_tokens"):
        d, lo, hi = difference_ci(s["n_hits"], s["n_tokens"], ns["n_hits"], ns["n_tokens"], confidence)
        diff = {"sink_minus_nonsink": d, "ci": [lo, hi], "ci_method": "newcombe (wilson-based)"}
    counts = pd.Series(labels).value_counts().to_dict()
    rd = sink_rule_to_dict(rule)
    summary: dict[str, Any] = {
        "analysis": "word-distribution decoding of isolated visual tokens (paper analysis 3)",
        "model": ad.describe(),
        "dataset": ds.name,
        "label_column": col,
        "n_images": len(labels),
        "images_per_label": {str(k): int(v) for k, v in counts.items()},
        "words": {k: sorted(v) for k, v in wsets.items()},
        "control_labels": sorted({lab for lab in labels if lab not in wsets}),
        "word_matching": "case- and space-insensitive exact match after removing word-start markers "
        f"{list(WORD_MARKERS)}; a token hits when any of its top-{top_k} decoded tokens is a word of its "
        "image's label (control images: a word of any label)",
        "sink_rule": rd,
        "feature_layer": ad.feature_layer,
        "select_strategy": ad.select_strategy,
        **{k: settings[k] for k in ("top_k", "nonsinks_per_image", "seed", "method")},
        "isolation": "each token attends only to itself in every LLM layer; "
        + (
            "run as a one-token sequence of its LLM input embedding at its position id (equivalent)"
            if method == "batched"
            else "masked forward of the full prompt (knockout.decode_isolated)"
        ),
        **{k: settings[k] for k in ("prompt", "chat_template", "ci_method", "confidence")},
        "n_images_without_sink": n_without_sink,
        "rates": {"sink": s, "nonsink": ns, "difference": diff},
        "caveats": [
            "tokens of one image are not independent draws; the binomial intervals treat them as such "
            "(the image count is in the rate table)",
        ],
    }
    ctrl_s, ctrl_ns = _headline(rates, "sink", "control"), _headline(rates, "nonsink", "control")
    if ctrl_s or ctrl_ns:
        summary["rates"]["control"] = {"sink": ctrl_s, "nonsink": ctrl_ns}
    if rd["surrogate"]:
        summary["caveats"].append(
            f"the 'sinks' are a surrogate, not norm outliers: every image gets its {rule.n} highest-norm "
            "patches, whether or not its tower has outliers"
        )
    if n_without_sink:
        summary["caveats"].append(
            f"{n_without_sink} of {len(labels)} images have no sink under the rule; they contribute "
            "non-sinks only"
        )
    if getattr(ad, "planted", None) is None and getattr(ad, "projector_trained", True) is False:
        summary["warning"] = (
            "the projector is untrained: visual tokens reach the LLM through a random MLP, so decoded "
            "words are not expected to name the object; the rates measure the pipeline, not the model"
        )
    return summary


# -- outputs -------------------------------------------------------------------------------------


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


def write_decode_outputs(out: str | Path, res: DecodeResult, overwrite: bool = False) -> Path:
    """``decode_rate.csv`` (rates), ``decode_tokens.csv`` (per token) and ``summary.json`` into
    ``out``. A folder holding such files from something else is refused unless ``overwrite``
    (:func:`check_decode_out`). The page (``decode.html``) is drawn by ``sinkscope.viz``.

    >>> write_decode_outputs("runs/decode", res)                      # doctest: +SKIP
    PosixPath('runs/decode')
    """
    out = check_decode_out(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    res.rates.to_csv(out / "decode_rate.csv", index=False)
    res.per_token.to_csv(out / "decode_tokens.csv", index=False)
    (out / "summary.json").write_text(json.dumps(res.summary, indent=1, default=str))
    res.out = out
    return out


__all__ = [
    "DEFAULT_WORDS",
    "DecodeResult",
    "TopNormRule",
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
