"""Scoring one item: multiple choice by log-likelihood (one prompt forward, candidates from its
cache), open generation with exact match, and the answer normalisation both use.

Multiple choice: the prompt (image + question, as the model's chat turn when it has a template)
runs once with ``use_cache=True``; the first token of every candidate is scored from the prompt's
last logits, and the rest of each candidate runs on the cached prompt (the cache is cropped back to
the prompt after each candidate), so a candidate costs a forward of its own few tokens only. A
candidate's score is its mean token log-probability (length-normalised), the prediction the
best-scoring candidate. Candidates are tokenized on their own (no leading space), as the answer
starts a new line of the assistant's turn; ``tests/test_eval.py`` checks the scores against one
full forward per candidate.

>>> normalize_answer(" The Red. ")
'red'
>>> normalize_answer("3") == normalize_answer("three")
True
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .._utils import SinkscopeError

#: appended to the questions of sinkscope's own sets (shapes, the real-image sets, manifests)
ANSWER_SUFFIX = " Answer with one word."
#: appended to an MME question, as lmms-eval's ``mme`` task does for most models (its
#: ``post_prompt``), after removing :data:`MME_REMOVED` from the question
MME_SUFFIX = "\nAnswer the question using a single word or phrase."
#: the phrase every MME question ends with; lmms-eval drops it when it adds its own suffix
MME_REMOVED = " Please answer yes or no."
#: how a question becomes the text of the prompt (:func:`question_text`)
PROMPT_STYLES = ("sinkscope", "mme")
_NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and articles, number words as digits, one space between words."""
    s = str(text).lower().strip()
    s = re.sub(r"[^\w\s-]", " ", s)
    s = _ARTICLES.sub(" ", s)
    words = [_NUMBERS.get(w, w) for w in s.split()]
    return " ".join(words)


def question_text(question: str, style: str = "sinkscope") -> str:
    """The text the model is asked for ``question``: with :data:`ANSWER_SUFFIX` (``sinkscope``),
    or as lmms-eval asks MME (``mme``: the question stripped, :data:`MME_REMOVED` dropped,
    :data:`MME_SUFFIX` appended).

    >>> question_text("Is the cat black? Please answer yes or no.", "mme")
    'Is the cat black?\\nAnswer the question using a single word or phrase.'
    >>> question_text(" Which shape is red? ")
    'Which shape is red? Answer with one word.'
    """
    if style == "mme":
        return question.strip().replace(MME_REMOVED, "") + MME_SUFFIX
    if style != "sinkscope":
        raise SinkscopeError(f"prompt style {style!r}: expected one of {', '.join(PROMPT_STYLES)}")
    return question.strip() + ANSWER_SUFFIX


def parse_yes_no(text: str) -> str:
    """``yes``, ``no`` or ``other``, read as lmms-eval's MME tool does: lower-cased, "." removed;
    exactly yes/no, or a single ``y``/``n``, or yes/no within the first four characters.

    >>> [parse_yes_no(t) for t in ("Yes.", "no, it is not", "N", "Maybe")]
    ['yes', 'no', 'no', 'other']
    """
    s = str(text).lower().strip().replace(".", "")
    if s in ("yes", "no"):
        return s
    if len(s) == 1:
        return {"y": "yes", "n": "no"}.get(s, "other")
    head = s[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


def is_correct(prediction: str, answer: str, choices: tuple[str, ...] | None = None) -> bool:
    """Exact match after :func:`normalize_answer`; yes/no answers are read with :func:`parse_yes_no`."""
    if normalize_answer(answer) in ("yes", "no"):
        return parse_yes_no(prediction) == normalize_answer(answer)
    return normalize_answer(prediction) == normalize_answer(answer)


@dataclass
class Prompt:
    """A prepared prompt: model inputs for one image and question (``None`` image: text only).
    After a visual-token intervention (:func:`intervened`) the inputs are ``inputs_embeds`` with
    explicit ``position_ids``, and ``fed`` holds the ``tokens_fed`` table."""

    inputs: dict[str, torch.Tensor]
    n_tokens: int
    fed: Any = None

    def next_positions(self, n: int) -> dict[str, torch.Tensor]:
        """``position_ids`` for ``n`` tokens after the prompt (empty when the model numbers them
        itself, i.e. without explicit ids)."""
        pos = self.inputs.get("position_ids")
        if pos is None:
            return {}
        return {"position_ids": pos[:, -1:] + 1 + torch.arange(n, device=pos.device)[None]}


def intervened(adapter, prompt: Prompt, spec) -> Prompt:
    """``prompt`` under a visual-token intervention ``spec``
    (:class:`~sinkscope.interventions.TokenIntervention`): the LLM's inputs built once, scored and
    generated from as any prompt."""
    from ..interventions import apply_tokens

    done = apply_tokens(adapter, prompt.inputs, spec)
    return Prompt(done.kwargs, int(done.kwargs["inputs_embeds"].shape[1]), done.fed)


def build_prompt(
    adapter,
    image: Any | None,
    question: str,
    chat: bool | str = "auto",
    suffix: str = ANSWER_SUFFIX,
    min_side: int | None = None,
) -> Prompt:
    """Model inputs for ``question`` about ``image`` (an array; ``None`` for the image-removed
    baseline: the same turn without image tokens). ``chat="auto"`` uses the tokenizer's chat
    template when it has one."""
    tok = adapter.tokenizer
    use_chat = bool(getattr(tok, "chat_template", None)) if chat == "auto" else bool(chat)
    text = question.strip() + suffix
    if image is not None:
        inp = adapter.build_inputs([image], "<image>\n" + text, chat=use_chat, min_side=min_side)
        keep = {k: inp[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    else:
        if use_chat:
            text = tok.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
        ids = tok(text, add_special_tokens=not use_chat).input_ids
        t = torch.tensor([ids])
        keep = {"input_ids": t, "attention_mask": torch.ones_like(t)}
    dev = adapter.device
    keep = {k: v.to(dev) for k, v in keep.items()}
    if "pixel_values" in keep:
        keep["pixel_values"] = keep["pixel_values"].to(adapter.dtype)
    return Prompt(keep, int(keep["input_ids"].shape[1]))


def candidate_ids(adapter, choices: tuple[str, ...]) -> list[list[int]]:
    """The token ids of each candidate answer (tokenized alone, no special tokens)."""
    out = []
    for c in choices:
        ids = adapter.tokenizer(str(c), add_special_tokens=False).input_ids
        if not ids:
            raise SinkscopeError(f"candidate answer {c!r} tokenizes to nothing")
        out.append(list(ids))
    return out


def _cache_arg() -> str:
    """transformers 5.2x names a forward's cache ``cache``; earlier releases ``past_key_values``."""
    import inspect

    from transformers import LlamaForCausalLM

    return "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


CACHE_ARG = _cache_arg()


def _cache_of(out: Any):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _crop_to(cache: Any, n_tokens: int) -> None:
    """Drop everything after the first ``n_tokens`` from ``cache`` (transformers 5.2x's
    ``crop(-k)`` removes ``k`` tokens; earlier releases' ``crop(n)`` keeps ``n``)."""
    extra = cache.get_seq_length() - n_tokens
    if extra <= 0:
        return
    try:
        cache.crop(-extra)
    except ValueError:
        cache.crop(n_tokens)


@torch.no_grad()
def score_choices(adapter, prompt: Prompt, choices: tuple[str, ...]) -> np.ndarray:
    """Length-normalised log-likelihood of each candidate after ``prompt``: one prompt forward,
    each candidate's later tokens on the cached prompt."""
    model = adapter.model
    out = model(**prompt.inputs, use_cache=True)
    first = torch.log_softmax(out.logits[0, -1].float(), -1)
    cache = _cache_of(out)
    mask = prompt.inputs["attention_mask"]
    scores = []
    for ids in candidate_ids(adapter, choices):
        total = float(first[ids[0]])
        if len(ids) > 1:
            rest = torch.tensor([ids[:-1]], device=mask.device)
            m = torch.cat([mask, torch.ones_like(rest)], 1)
            pos = prompt.next_positions(rest.shape[1])
            step = model(input_ids=rest, attention_mask=m, use_cache=True, **{CACHE_ARG: cache}, **pos)
            lp = torch.log_softmax(step.logits[0].float(), -1)
            total += float(sum(lp[j, ids[j + 1]] for j in range(len(ids) - 1)))
            _crop_to(cache, prompt.n_tokens)
        scores.append(total / len(ids))
    return np.asarray(scores)


@torch.no_grad()
def score_choices_direct(adapter, prompt: Prompt, choices: tuple[str, ...]) -> np.ndarray:
    """The reference for :func:`score_choices`: one full forward of prompt + candidate per candidate."""
    model = adapter.model
    scores = []
    for ids in candidate_ids(adapter, choices):
        inp = dict(prompt.inputs)
        extra = torch.tensor([ids], device=inp["attention_mask"].device)
        if "inputs_embeds" in inp:  # an intervened prompt: append the candidate's embeddings
            emb = model.get_input_embeddings()(extra).to(inp["inputs_embeds"].dtype)
            inp["inputs_embeds"] = torch.cat([inp["inputs_embeds"], emb], 1)
            inp["position_ids"] = torch.cat([inp["position_ids"], prompt.next_positions(len(ids))["position_ids"]], 1)
        else:
            inp["input_ids"] = torch.cat([inp["input_ids"], extra], 1)
        inp["attention_mask"] = torch.ones(1, prompt.n_tokens + len(ids), dtype=torch.long, device=extra.device)
        lp = torch.log_softmax(model(**inp).logits[0].float(), -1)
        p = prompt.n_tokens
        scores.append(float(sum(lp[p - 1 + j, t] for j, t in enumerate(ids))) / len(ids))
    return np.asarray(scores)


@torch.no_grad()
def generate_answer(adapter, prompt: Prompt, max_new_tokens: int = 16) -> str:
    """Greedy generation (at most ``max_new_tokens``), decoded without special tokens."""
    model = adapter.model
    out = model.generate(**prompt.inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0] if "inputs_embeds" in prompt.inputs else out[0, prompt.n_tokens :]  # embeds: new tokens only
    return adapter.tokenizer.decode(new, skip_special_tokens=True).strip()


__all__ = [
    "ANSWER_SUFFIX",
    "MME_REMOVED",
    "MME_SUFFIX",
    "PROMPT_STYLES",
    "Prompt",
    "build_prompt",
    "candidate_ids",
    "generate_answer",
    "intervened",
    "is_correct",
    "normalize_answer",
    "parse_yes_no",
    "question_text",
    "score_choices",
    "score_choices_direct",
]
