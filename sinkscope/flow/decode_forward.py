"""The model side of word-distribution decoding: images in, top-k decoded tokens out.

- :func:`read_images` - one batch of a labelled set, checked against the vision tower; a bad
  image is logged and listed, the others go on; images smaller than one patch are enlarged by
  whole-pixel repetition.
- :func:`prepare_batch` - the LLaVA forward up to where the LLM starts: its input embeddings,
  the ViT norms at the feature layer and the token layout.
- :func:`decode_tokens` - the top-k tokens of chosen visual tokens, each *isolated* (attending only
  to itself in every LLM layer): ``"batched"`` runs each as a one-token sequence of its LLM input
  embedding at its position id (:func:`decode_batched`; exact, since the softmax over one key is 1
  and RoPE cancels on ``q.k`` of one position), ``"mask"`` the literal masked forward of
  :func:`sinkscope.flow.knockout.decode_isolated` per image.

>>> from sinkscope.models import load_model
>>> ad = load_model("tiny-llava")
>>> ids, embeds, norms, lay, kw = prepare_batch(ad, [np.zeros((32, 32, 3), np.uint8)], "Hi?", False)
>>> top_ids, top_p = decode_batched(ad, embeds[0, :2], torch.tensor([0, 1]), top_k=3, chunk=8)
>>> top_ids.shape, len(token_strings(ad.tokenizer, top_ids[0]))
((2, 3), 3)
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from .._utils import SinkscopeError
from ..capture import Capture, StopForward
from ..data import LabeledImages
from ..models.llava import LlavaAdapter

log = logging.getLogger("sinkscope")


def read_images(ds: LabeledImages, batch: range, ad: LlavaAdapter) -> tuple[list, list, list[dict], int]:
    """The readable images of ``batch`` (indices into ``ds``): ``(arrays, indices, failed,
    upscale)``; ``failed`` holds ``{"image", "reason"}`` per bad image, ``upscale`` the last
    whole-pixel enlargement factor applied (1: none).
    """
    patch_px = int(ad.vision.patch_size)
    arrays, idx, failed, upscaled = [], [], [], 1
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
    return arrays, idx, failed, upscaled


class _Stop(StopForward):
    pass


def prepare_batch(ad: LlavaAdapter, arrays: list[np.ndarray], prompt: str, chat: bool):
    """One sequence per image (same prompt), stacked: the LLM input embeddings (captured where the
    LLM starts, before any decoder layer runs), the ViT norms at the feature layer, the layout.

    Returns ``(input_ids, embeds, norms, layout, forward_kwargs)``.
    """
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
def decode_batched(ad: LlavaAdapter, embeds: torch.Tensor, positions: torch.Tensor, top_k: int, chunk: int):
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


def decode_masked(ad: LlavaAdapter, chosen: list[dict], ids: torch.Tensor, kw: dict, top_k: int):
    """Top-k (ids, probs) of each chosen token (``batch_item``, ``llm_position``) from the masked
    full-prompt forward of :func:`~sinkscope.flow.knockout.decode_isolated`, one per image."""
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
            ad.tokenizer,
            top_k=top_k,
        )
        for k in sel:
            dd = d[d.position == chosen[k]["llm_position"]].sort_values("rank")
            top_ids[k] = dd.token_id.to_numpy()
            top_p[k] = dd.prob.to_numpy()
    return top_ids, top_p


def decode_tokens(
    ad: LlavaAdapter,
    chosen: list[dict],
    batch: tuple[torch.Tensor, torch.Tensor, dict],
    method: str,
    top_k: int,
    chunk: int,
):
    """Top-k (ids, probs) of the chosen tokens of one batch (``batch_item``, ``llm_position``
    each), isolated by ``method`` (``"batched"`` or ``"mask"``); ``batch`` is ``(input_ids,
    embeds, forward_kwargs)`` of :func:`prepare_batch`."""
    ids, embeds, kw = batch
    if method == "batched":
        e = torch.stack([embeds[c["batch_item"], c["llm_position"]] for c in chosen])
        p = torch.tensor([c["llm_position"] for c in chosen])
        return decode_batched(ad, e, p, top_k, chunk)
    return decode_masked(ad, chosen, ids, kw, top_k)


def token_strings(tokenizer, ids) -> list[str]:
    """Token strings of token ids (``<id N>`` where the tokenizer has none)."""
    out = []
    for tid in ids:
        w = tokenizer.convert_ids_to_tokens(int(tid)) if tokenizer is not None else None
        out.append(w if w is not None else f"<id {int(tid)}>")  # same fallback as decode_isolated
    return out


__all__ = [
    "decode_batched",
    "decode_masked",
    "decode_tokens",
    "prepare_batch",
    "read_images",
    "token_strings",
]
