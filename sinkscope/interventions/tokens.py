"""Reorder or select the visual tokens of a LLaVA-style model between the projector and the LLM.

:class:`TokenIntervention` is the serialisable setting (``variant``, ``positions``, ``rule``,
``seed``); :func:`apply_tokens` turns ordinary LLaVA inputs (``input_ids`` with image tokens,
``attention_mask``, ``pixel_values``, optional ``labels`` / ``position_ids``) into the LLM's
``inputs_embeds``, ``attention_mask``, ``position_ids`` (and ``labels``) under the intervention,
plus one ``tokens_fed`` row per ViT token of each image. The image features come from the model's
own ``get_image_features`` (tower, feature layer, select strategy, projector), so with
``variant="both"`` and ``positions="reindex"`` the result is the model's ordinary forward.

Variants (per image; ``k`` = the image's number of sinks under ``rule``):

- ``both``: every fed token in ViT order (the model as trained);
- ``sinks-front`` / ``sinks-end``: the sinks moved before / after the other tokens (the paper's
  reorderings; each group keeps its ViT order);
- ``sink-only`` / ``nonsink-only``: only the sinks / only the others (an image with no sink feeds
  no visual token under ``sink-only``);
- ``random-k``: ``k`` tokens at seeded random places (the same places for every image with the
  same ``k``, so a batch equals its items run one by one); ``lowest-norm-k``: the ``k`` lowest-norm
  tokens. Both are controls for ``sink-only`` with the same number of tokens.

Position policy for the LLM (it matters for RoPE models, whose attention depends on id differences):

- ``reindex``: ids run 0, 1, 2, ... over the new sequence (SparseVLM, VisionZip renumber so);
- ``keep``: every token keeps the id it had in the unmodified sequence: a moved sink carries its
  original id to its new place, dropped tokens leave gaps (FastV's cache variant). Text after the
  image keeps its ids too, so the distance between question and image tokens is unchanged.

Sequences change length when tokens are dropped; rows of a batch are re-padded on the side the
input was padded on (left when some row starts with padding), and ``labels`` of image positions
are ``-100``.

>>> from sinkscope import load_model
>>> import numpy as np
>>> ad = load_model("tiny-llava")
>>> inp = ad.build_inputs([np.zeros((32, 32, 3), np.uint8)], "<image> What is in the picture?")
>>> out = apply_tokens(ad, inp, TokenIntervention("sink-only", rule="topk:2"))
>>> out.kwargs["inputs_embeds"].shape[1], inp["input_ids"].shape[1] - 16 + 2   # 16 image tokens -> 2
(9, 9)
>>> out.fed[["vit_token", "is_vit_sink", "llm_position"]].dropna().shape[0]
2
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd
import torch

from .._utils import SinkscopeError
from .rules import VisualSinkRule, rule_from

TOKEN_VARIANTS = ("both", "sinks-front", "sinks-end", "sink-only", "nonsink-only", "random-k", "lowest-norm-k")
POSITION_POLICIES = ("reindex", "keep")
#: the columns of ``tokens_fed.parquet`` (one row per ViT token of each image)
FED_COLUMNS = (
    "image", "batch_row", "vit_token", "row", "col", "norm", "is_vit_sink", "llm_position", "position_id",
)  # fmt: skip


@dataclass(frozen=True)
class TokenIntervention:
    """Visual-token order / selection (see the module docstring); JSON with :meth:`to_dict`.

    >>> TokenIntervention("sinks-front", positions="keep", rule="norm:100").to_dict()["rule"]["threshold"]
    100.0
    """

    variant: str = "both"
    positions: str = "reindex"
    rule: VisualSinkRule | dict | str | None = None
    seed: int = 0
    kind: str = field(default="tokens", init=False)

    def __post_init__(self):
        if self.variant not in TOKEN_VARIANTS:
            raise SinkscopeError(f"variant {self.variant!r}: expected one of {', '.join(TOKEN_VARIANTS)}")
        if self.positions not in POSITION_POLICIES:
            raise SinkscopeError(f"positions {self.positions!r}: expected reindex or keep")
        object.__setattr__(self, "rule", rule_from(self.rule))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rule"] = self.rule.to_dict()
        return d

    def describe(self) -> str:
        return f"{self.variant}, position ids {self.positions}; {self.rule.describe()}"

    def order(self, norms: torch.Tensor, sink: torch.Tensor) -> list[int]:
        """The fed-token indices this variant feeds, in order, for one image (``norms`` and
        ``sink``: ``[fed tokens]``).

        >>> TokenIntervention("sinks-end").order(torch.tensor([1.0, 9.0, 2.0]), torch.tensor([False, True, False]))
        [0, 2, 1]
        """
        idx = list(range(len(norms)))
        sinks = [i for i in idx if sink[i]]
        rest = [i for i in idx if not sink[i]]
        v, k = self.variant, len(sinks)
        if v == "both":
            return idx
        if v == "sinks-front":
            return sinks + rest
        if v == "sinks-end":
            return rest + sinks
        if v == "sink-only":
            return sinks
        if v == "nonsink-only":
            return rest
        if v == "random-k":
            perm = torch.randperm(len(idx), generator=torch.Generator().manual_seed(self.seed)).tolist()
            return sorted(perm[:k])
        low = torch.argsort(norms.float(), stable=True).tolist()[:k]  # lowest-norm-k
        return sorted(low)


@dataclass
class Intervened:
    """What :func:`apply_tokens` built: ``kwargs`` for the LLaVA model's forward / ``generate``
    (``inputs_embeds``, ``attention_mask``, ``position_ids``, ``labels`` when given) and ``fed``
    (the ``tokens_fed`` table, :data:`FED_COLUMNS`)."""

    kwargs: dict[str, Any]
    fed: pd.DataFrame


def check_rule(adapter, rule: VisualSinkRule, n_fed: int | None = None) -> None:
    """Refuse, in one line naming the rule, a sink rule ``adapter``'s ViT cannot apply: a layer
    past its hidden states (``@L``: ``0 .. n_layers``; an attention rule's block ``0 .. n_layers - 1``),
    or ``topk`` / ``attention`` with ``k`` at least the ``n_fed`` visual tokens of an image (default:
    those of an image at the processor's size) - every token a "sink", so sink-only would equal
    both and nonsink-only feed nothing.

    >>> from sinkscope import load_model
    >>> check_rule(load_model("tiny-llava"), rule_from("topk:9999"))
    Traceback (most recent call last):
    ...
    sinkscope._utils.SinkscopeError: sink rule 'topk:9999': an image feeds 16 visual tokens to the LLM, so every token would be a sink; use k < 16
    """
    n = adapter.vision.n_layers
    if rule.layer is not None:
        top = n - 1 if rule.method == "attention" else n
        if not -(top + 1) <= rule.layer <= top:
            what = f"blocks 0 .. {top}" if rule.method == "attention" else f"hidden states 0 .. {top}"
            raise SinkscopeError(f"sink rule '{rule.spec()}': the ViT of {adapter.name} has {what}")
    if rule.method in ("topk", "attention") and rule.k is not None:
        if n_fed is None:
            lay = adapter.vision.layout_for(*adapter.vision._default_size())
            n_fed = len(adapter.fed_vit_tokens(lay.n_tokens))
        if rule.k >= n_fed:
            raise SinkscopeError(
                f"sink rule '{rule.spec()}': an image feeds {n_fed} visual tokens to the LLM, so every token "
                f"would be a sink; use k < {n_fed}"
            )


def _image_features(adapter, pixel_values: torch.Tensor, rule: VisualSinkRule):
    """The projector outputs per image ``[images, fed, llm width]``, the fed tokens' norms at the
    rule's layer ``[images, fed]`` and (attention rule) the attention they receive."""
    model = adapter.model
    inner = getattr(model, "model", model)
    fl = model.config.vision_feature_layer
    out = inner.get_image_features(
        pixel_values=pixel_values, vision_feature_layer=fl,
        vision_feature_select_strategy=adapter.select_strategy, output_hidden_states=True,
    )  # fmt: skip
    feats = out.pooler_output
    feats = torch.stack(list(feats)) if not torch.is_tensor(feats) else feats
    hs = out.hidden_states
    n_vit = hs[0].shape[1]
    fed = adapter.fed_vit_tokens(n_vit)
    check_rule(adapter, rule, n_fed=len(fed))
    layer = adapter.feature_layer if rule.layer is None else rule.layer
    norms = hs[layer][:, fed].float().norm(dim=-1)
    received = None
    if rule.method == "attention":
        received = _attention_received(adapter, pixel_values, rule)[:, fed]
    return feats, norms, received, fed, n_vit


def _attention_received(adapter, pixel_values: torch.Tensor, rule: VisualSinkRule) -> torch.Tensor:
    from ..capture import Capture
    from ..models.base import ModelInputs

    block = adapter.feature_layer - 1 if rule.layer is None else rule.layer
    H, W = pixel_values.shape[-2:]
    lay = adapter.vision.layout_for(H, W)
    n = pixel_values.shape[0]
    inputs = ModelInputs({"pixel_values": pixel_values}, [lay] * n, [f"image-{i}" for i in range(n)])
    with Capture(adapter.vision, layers=None, attention=[block]) as c:
        cap = c.run(inputs)
    return cap.attn_received[block].float()


def _padding_side(mask: torch.Tensor) -> str:
    return "left" if bool((mask[:, 0] == 0).any()) and bool((mask[:, -1] == 1).all()) else "right"


@torch.no_grad()
def apply_tokens(adapter, inputs: dict[str, Any], spec: TokenIntervention) -> Intervened:
    """Build the LLM inputs of ``inputs`` (a LLaVA batch) under ``spec``; see the module docstring."""
    model = adapter.model
    ids = inputs.get("input_ids")
    pv = inputs.get("pixel_values")
    if ids is None or pv is None:
        raise SinkscopeError("a visual-token intervention needs input_ids with image tokens and pixel_values")
    mask = inputs.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    labels = inputs.get("labels")
    orig_pos = inputs.get("position_ids")
    if orig_pos is None:
        orig_pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    feats, norms, received, fed_idx, n_vit = _image_features(adapter, pv.to(adapter.dtype), spec.rule)
    sinks = spec.rule.mask(norms, received, has_cls=fed_idx[0] == 0)
    emb = model.get_input_embeddings()
    text = emb(ids)
    feats = feats.to(text.dtype)
    n_fed = len(fed_idx)
    lay = adapter.vision.layout_for(*pv.shape[-2:])
    rows, fed_rows, img = [], [], 0
    for b in range(ids.shape[0]):
        where = (ids[b] == adapter.image_token_id).nonzero().flatten().tolist()
        if len(where) % n_fed:
            raise SinkscopeError(f"batch row {b}: {len(where)} image tokens, not a multiple of {n_fed} per image")
        starts = {where[j]: j // n_fed for j in range(0, len(where), n_fed)}
        parts: list[tuple[torch.Tensor, int, int, int, int | None]] = []  # vector, pos id, label, mask, fed row
        t = 0
        while t < ids.shape[1]:
            if t in starts:
                i = img + starts[t]
                if i >= feats.shape[0]:
                    raise SinkscopeError(f"the batch has more image blocks than the {feats.shape[0]} images in pixel_values")
                order = spec.order(norms[i], sinks[i])
                for j in range(n_fed):
                    vt = fed_idx[j]
                    r, c = lay.row_col(vt) if vt >= lay.n_prefix else (None, None)
                    fed_rows.append({"image": i, "batch_row": b, "vit_token": vt, "row": r, "col": c,
                                     "norm": float(norms[i, j]), "is_vit_sink": bool(sinks[i, j]), "llm_position": None})  # fmt: skip
                for j in order:
                    parts.append((feats[i, j], int(orig_pos[b, t + j]), -100, 1, len(fed_rows) - n_fed + j))
                t += n_fed
                continue
            lab = int(labels[b, t]) if labels is not None else -100
            parts.append((text[b, t], int(orig_pos[b, t]), lab, int(mask[b, t]), None))
            t += 1
        img += len(starts)
        rows.append(parts)
    if img != feats.shape[0]:
        raise SinkscopeError(f"{feats.shape[0]} images in pixel_values but {img} image blocks in input_ids")
    side = _padding_side(mask)
    width = max(len(p) for p in rows)
    B, D = len(rows), text.shape[-1]
    pad_id = getattr(getattr(adapter, "tokenizer", None), "pad_token_id", None)
    pad_vec = emb.weight[pad_id] if pad_id is not None else torch.zeros(D, dtype=text.dtype, device=text.device)
    embeds = pad_vec.expand(B, width, D).clone()
    new_mask = torch.zeros(B, width, dtype=mask.dtype, device=mask.device)
    kept = torch.ones(B, width, dtype=torch.long, device=mask.device)
    new_labels = torch.full((B, width), -100, dtype=torch.long, device=mask.device)
    for b, parts in enumerate(rows):
        off = width - len(parts) if side == "left" else 0
        for s, (vec, pos, lab, m, fr) in enumerate(parts):
            embeds[b, off + s] = vec
            new_mask[b, off + s] = m
            kept[b, off + s] = pos
            new_labels[b, off + s] = lab
            if fr is not None:
                fed_rows[fr]["llm_position"] = off + s
    if spec.positions == "reindex":
        pos_ids = (new_mask.long().cumsum(-1) - 1).clamp(min=0)
    else:
        pos_ids = kept.masked_fill(new_mask == 0, 0)
    for r in fed_rows:
        p = r["llm_position"]
        r["position_id"] = None if p is None else int(pos_ids[r["batch_row"], p])
    kwargs = {"inputs_embeds": embeds, "attention_mask": new_mask, "position_ids": pos_ids}
    if labels is not None:
        kwargs["labels"] = new_labels
    frame = pd.DataFrame(fed_rows, columns=list(FED_COLUMNS))
    for col in ("row", "col", "llm_position", "position_id"):
        frame[col] = frame[col].astype("Int64")
    frame["rule"] = spec.rule.describe()
    frame["variant"] = spec.variant
    return Intervened(kwargs, frame)

