"""The DIYSink variants of ``sinkscope eval``, for a model with the dual connector
(:mod:`sinkscope.diysink`):

- ``baseline``: the original projector (the connector's frozen ``base`` copy), every token;
- ``dual``: both MLPs, sinks first, the saved weights;
- ``dual-sink-only`` / ``dual-nonsink-only``: only ``f_sink`` on the sinks / ``f_nonsink`` on the
  others (the other tokens dropped, as the token interventions drop them);
- ``cot``: per question, :class:`~sinkscope.diysink.CoTRouter` picks ``sink-only``,
  ``nonsink-only`` or ``both`` from the model's free answers (the paper's);
- ``cot-score``: the same two questions, the option words scored instead of parsed;
- ``rew``: per question, the model's ReW router (``MODEL/router``) sets ``[w_sink, w_nonsink]``;
  :func:`~sinkscope.evaluation.evaluate` embeds the run's questions in batches first
  (:meth:`DualVariant.prepare`), and each record's ``routing_s`` is its share of that plus ``R``.

Every record of a routed variant adds its routing (route or weights, the router's raw answers,
whether CoT fell back) and ``routing_s``; ``routing.parquet`` collects them.

>>> DualVariant("dual-sink-only", rule="topk:2").token_variant
'sink-only'
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._utils import SinkscopeError
from ..diysink import CoTRouter, QuestionEncoder, ReWRouter, dual_projector, routing

DUAL_VARIANTS = ("baseline", "dual", "dual-sink-only", "dual-nonsink-only", "cot", "cot-score", "rew")
#: the columns of ``routing.parquet``
ROUTING_COLUMNS = (
    "id", "variant", "task_type", "route", "w_sink", "w_nonsink", "image_kind", "question_kind", "fallback",
    "image_answer", "question_answer", "routing_s",
)  # fmt: skip


@dataclass
class DualVariant:
    """One DIYSink variant of a run: its name, the connector's rule (for the description) and,
    for ``cot`` / ``rew``, the router (``router``: a ReW router folder; loaded once)."""

    variant: str
    rule: str = ""
    router: str | None = None
    llm: str = "the original LLM"
    cot: CoTRouter = field(default_factory=CoTRouter)
    _rew: Any = None
    _encoder: Any = None
    _embedded: dict = field(default_factory=dict)
    _encode_s: float = 0.0

    def __post_init__(self):
        if self.variant not in DUAL_VARIANTS:
            raise SinkscopeError(f"variant {self.variant!r}: expected one of {', '.join(DUAL_VARIANTS)}")
        if self.variant == "cot-score":
            self.cot = CoTRouter(mode="score")

    @property
    def token_variant(self) -> str | None:
        return {"dual-sink-only": "sink-only", "dual-nonsink-only": "nonsink-only"}.get(self.variant)

    def describe(self) -> str:
        what = {
            "baseline": f"the original projector on every token, with {self.llm}",
            "dual": "dual connector, sinks first",
            "dual-sink-only": "f_sink on the sinks only",
            "dual-nonsink-only": "f_nonsink on the non-sinks only",
            "cot": "CoT routing (two questions to the model, answers parsed)",
            "cot-score": "CoT routing (two questions to the model, option words scored)",
            "rew": f"ReW routing ({self.router})",
        }[self.variant]
        return f"{what}; {self.rule}"

    def rew(self) -> tuple[ReWRouter, QuestionEncoder]:
        if self._rew is None:
            rew = ReWRouter.load(self.router)
            encoder = QuestionEncoder(rew.encoder)
            if encoder.dim != rew.dim:
                raise SinkscopeError(
                    f"router {self.router}: takes {rew.dim}-dimensional questions, but its encoder "
                    f"{encoder.name} gives {encoder.dim}"
                )
            self._rew, self._encoder = rew, encoder
        return self._rew, self._encoder

    def prepare(self, questions, batch_size: int = 64) -> None:
        """Embed ``questions`` (ReW) in batches, once each; a question's routing then costs its
        share of the batches plus ``R``."""
        _, encoder = self.rew()
        todo = sorted({q for q in questions if q not in self._embedded})
        if not todo:
            return
        t0 = time.perf_counter()
        for s in range(0, len(todo), batch_size):
            part = todo[s : s + batch_size]
            self._embedded.update(zip(part, encoder(part)))
        self._encode_s = (time.perf_counter() - t0) / len(todo)

    def embed(self, question: str) -> tuple[torch.Tensor, float]:
        """The question's embedding and its encoding seconds (batched share, or one call)."""
        if question in self._embedded:
            return self._embedded[question], self._encode_s
        t0 = time.perf_counter()
        return self.rew()[1]([question])[0], time.perf_counter() - t0


def dual_variants(adapter, variants, router: str | Path | None = None) -> dict[str, DualVariant]:
    """One :class:`DualVariant` per DIYSink variant asked; ``router`` (default ``MODEL/router``)."""
    asked = [v for v in variants if v in DUAL_VARIANTS]
    if router is not None and "rew" not in asked:
        raise SinkscopeError(f"router {router}: only variant rew uses a router, and it is not asked")
    if not asked:
        return {}
    dual = dual_projector(adapter)  # a one-line error for a model without the connector
    if "rew" in asked and router is None:
        src = getattr(adapter, "source", None)
        router = Path(src) / "router" if src else None
        if router is None or not (router / "router.json").is_file():
            raise SinkscopeError(
                f"variant rew: model {adapter.name!r} has no ReW router (MODEL/router); "
                "train one with sinkscope diysink train --stage router, or pass router="
            )
    llm = llm_of(adapter)
    return {v: DualVariant(v, dual.rule.describe(), str(router) if router else None, llm) for v in asked}


def llm_of(adapter) -> str:
    """Which LLM a dual model holds, from the training history saved in its config: the original
    one, or the one its stage 2 fine-tuned (so ``baseline`` says it is not the untouched model).

    >>> class _C: diysink = {"history": [{"step": "init"}, {"step": "stage 2", "llm": "lora", "steps": 80}]}
    >>> class _M: config = _C()
    >>> class _A: model = _M()
    >>> llm_of(_A())
    'the LLM fine-tuned in stage 2 (lora, 80 steps; not the original)'
    """
    history = (getattr(adapter.model.config, "diysink", None) or {}).get("history", [])
    tuned = [h for h in history if h.get("llm") not in (None, "frozen")]
    if not tuned:
        return "the original LLM"
    what = ", ".join(f"{h['llm']}, {h.get('steps')} steps" for h in tuned)
    return f"the LLM fine-tuned in stage 2 ({what}; not the original)"


@dataclass
class DualPlan:
    """How one item runs under a DIYSink variant: the connector's route, the token selection (a
    variant of :mod:`~sinkscope.interventions.tokens`, or ``None``) and the routing record."""

    mode: str
    token_variant: str | None
    weights: torch.Tensor | None
    record: dict[str, Any]

    def context(self, adapter):
        return routing(adapter, mode=self.mode, weights=self.weights, vit_order=self.token_variant is not None)


def plan_item(adapter, spec: DualVariant, image, question: str, min_side: int | None = None) -> DualPlan:
    """Route one question under ``spec`` (CoT asks the dual model its two questions; ReW embeds
    the question) and say how to run it."""
    v = spec.variant
    if v == "baseline":
        return DualPlan("base", None, None, {})
    if v in ("dual", "dual-sink-only", "dual-nonsink-only"):
        return DualPlan("dual", spec.token_variant, None, {})
    t0 = time.perf_counter()
    if v in ("cot", "cot-score"):
        with routing(adapter, mode="dual"):
            d = spec.cot.route(adapter, image, question, min_side=min_side)
        rec = {"route": d.route, "image_kind": d.image_kind, "question_kind": d.question_kind, "fallback": d.fallback,
               "image_answer": d.image_answer, "question_answer": d.question_answer, "routing_s": round(d.seconds, 4)}  # fmt: skip
        return DualPlan("dual", None if d.route == "both" else d.route, None, rec)
    router, _ = spec.rew()
    emb, encode_s = spec.embed(question)
    t0 = time.perf_counter()
    with torch.no_grad():
        w = router(emb[None])[0]
    rec = {"route": "weights", "w_sink": round(float(w[0]), 5), "w_nonsink": round(float(w[1]), 5),
           "routing_s": round(encode_s + time.perf_counter() - t0, 5)}  # fmt: skip
    return DualPlan("dual", None, w.detach(), rec)


__all__ = ["DUAL_VARIANTS", "ROUTING_COLUMNS", "DualPlan", "DualVariant", "dual_variants", "plan_item"]
