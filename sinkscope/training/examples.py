"""Training conversations for a LLaVA projector, and their token ids with answer-only labels.

An example is one image and a conversation about it: stage 1 (``align``) asks for the scene's
caption (:func:`~sinkscope.evaluation.shapes.caption`); stage 2 (``vqa``) asks several questions in
turn, the first turn carrying the image. Only the answers' tokens (and the end-of-turn token after
each, so generation learns to stop) are trained; everything else is labelled ``-100``.

The shapes questions come from :func:`sinkscope.evaluation.shapes.items` on the ``train`` split
(answers balanced per task), grouped by scene into conversations of at most ``turns`` questions;
the real-image sets add one question per image from their ``train`` split. With ``styles=True``
each training scene is drawn in its own seeded :func:`~sinkscope.evaluation.shapes.random_style`
(canvas size and aspect, shape size, outline, colour shade, noise, background texture, JPEG
quality: what another renderer would vary; issue 26), so the model does not learn one renderer;
the evaluation splits stay plain.

>>> exs = vqa_examples(n_per_task=4, turns=3, real=())
>>> len(exs) > 0 and all(1 <= len(e.turns) <= 3 for e in exs)
True
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from ..data import ImageItem
from ..evaluation import shapes as _shapes
from ..evaluation.items import real_items, shapes_items
from ..evaluation.scoring import ANSWER_SUFFIX

IGNORE = -100


@dataclass(frozen=True)
class Example:
    """One image and its conversation: ``turns`` of ``(question, answer)``."""

    key: str
    image: ImageItem
    turns: tuple[tuple[str, str], ...]


def align_examples(n_scenes: int, start: int = 0, styles: bool = False) -> list[Example]:
    """Stage 1: one caption request per ``shapes`` training scene."""
    out = []
    for i in range(start, start + n_scenes):
        sc = _shapes.scene(i, "train")
        img = scene_image(sc, styles)
        out.append(Example(img.name, img, (("Describe the image.", _shapes.caption(sc)),)))
    return out


def scene_image(sc, styles: bool = False) -> ImageItem:
    """The :class:`~sinkscope.data.ImageItem` of a training scene: drawn plain, or (``styles``) in
    its seeded render style, whose name then says so (feature caches key images by name).

    >>> from sinkscope.evaluation.shapes import scene
    >>> scene_image(scene(0, "train")).name, scene_image(scene(0, "train"), styles=True).name
    ('shapes-train-0', 'shapes-train-0~styled')
    """
    import numpy as np

    style = _shapes.random_style(sc.seed) if styles else None
    if style is None or style == _shapes.PLAIN:
        return ImageItem(f"shapes-train-{sc.seed}", f"shapes:train:{sc.seed}", lambda: np.asarray(_shapes.render(sc)))
    return ImageItem(
        f"shapes-train-{sc.seed}~styled", f"shapes:train:{sc.seed}:styled", lambda: np.asarray(_shapes.render(sc, style=style))
    )


def vqa_examples(
    n_per_task: int = 200,
    turns: int = 4,
    real: tuple[str, ...] = ("textile", "lfw-faces", "digits"),
    seed: int = 0,
    real_limit: int | None = None,
    styles: bool = False,
) -> list[Example]:
    """Stage 2: balanced ``shapes`` questions grouped by scene (at most ``turns`` per
    conversation, in a seeded order), plus one question per training image of each ``real`` set
    (at most ``real_limit`` per set, every task of the set kept); ``styles``: each scene drawn in
    its own render style (see above)."""
    rng = random.Random(seed)
    by_scene: dict[str, tuple[ImageItem, list[tuple[str, str]]]] = {}
    for it in shapes_items("train", n_per_task=n_per_task):
        img = scene_image(_shapes.Scene.from_dict(it.meta["scene"]), styles) if styles else it.image
        by_scene.setdefault(img.name, (img, []))[1].append((it.question, it.answer))
    out = []
    for key, (img, qas) in by_scene.items():
        rng.shuffle(qas)
        for k in range(0, len(qas), turns):
            out.append(Example(f"{key}#{k // turns}", img, tuple(qas[k : k + turns])))
    for name in real:
        for it in real_items(name, "train", limit=real_limit):
            out.append(Example(it.id, it.image, ((it.question, it.answer),)))
    rng.shuffle(out)
    return out


def encode(
    adapter, ex: Example, n_image_tokens: int, chat: bool | str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, labels)`` of one conversation: the chat template's turns, the image's
    placeholder tokens in the first user turn, each answer tokenized on its own (as the scoring
    tokenizes candidates) and followed by the end-of-turn text; labels on answers only."""
    tok = adapter.tokenizer
    if chat == "auto":  # as the evaluation's prompts: the chat template when the tokenizer has one
        chat = bool(getattr(tok, "chat_template", None))
    ids: list[int] = []
    labels: list[int] = []
    msgs: list[dict[str, str]] = []
    prev = ""
    for j, (q, a) in enumerate(ex.turns):
        content = ("<image>\n" if j == 0 else "") + q + ANSWER_SUFFIX
        msgs.append({"role": "user", "content": content})
        prefix = _render(tok, msgs, chat, generation=True)
        _extend_text(adapter, prefix[len(prev) :], n_image_tokens, ids, labels)
        answer = tok(a, add_special_tokens=False).input_ids
        ids += answer
        labels += answer
        msgs.append({"role": "assistant", "content": a})
        full = _render(tok, msgs, chat, generation=False)
        tail = full[len(prefix) + len(a) :] if full.startswith(prefix + a) else "\n"
        tail_ids = tok(tail, add_special_tokens=False).input_ids
        ids += tail_ids
        labels += tail_ids[:1] + [IGNORE] * (len(tail_ids) - 1)  # the end-of-turn token is trained
        prev = full
    return torch.tensor(ids), torch.tensor(labels)


def _render(tok, msgs, chat: bool, generation: bool) -> str:
    if chat:
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation)
    # no template: the question, then the answer right after it (as the evaluation's prompt)
    return "".join(m["content"] + ("\n" if m["role"] == "assistant" else "") for m in msgs)


def _extend_text(adapter, text: str, n_image_tokens: int, ids: list[int], labels: list[int]) -> None:
    tok = adapter.tokenizer
    parts = text.split("<image>")
    for k, seg in enumerate(parts):
        if seg:
            seg_ids = tok(seg, add_special_tokens=False).input_ids
            ids += seg_ids
            labels += [IGNORE] * len(seg_ids)
        if k < len(parts) - 1:
            ids += [adapter.image_token_id] * n_image_tokens
            labels += [IGNORE] * n_image_tokens


__all__ = ["IGNORE", "Example", "align_examples", "encode", "scene_image", "vqa_examples"]
