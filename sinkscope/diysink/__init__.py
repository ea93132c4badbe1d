"""DIYSink (issue 14): a dual-MLP connector for sink and non-sink visual tokens, and its routers.

- :mod:`~sinkscope.diysink.connector`: :class:`DualProjector`, the dual model class
  (``model_type="diysink_llava"``, :func:`register` for plain transformers), :func:`make_dual`
  and :func:`routing`;
- :mod:`~sinkscope.diysink.routers`: :class:`CoTRouter` (hard routing by two questions to the
  model itself) and :class:`ReWRouter` (soft weights from a question embedding).

Training (stage 1, stage 2, the ReW router) is :func:`sinkscope.training.diysink.train_diysink`
(``sinkscope diysink train``); the comparison is ``sinkscope eval --variant baseline,dual,...``.
"""

from .connector import (
    MODEL_TYPE,
    NORMALISATIONS,
    ROUTE_MODES,
    DIYSinkConfig,
    DIYSinkForConditionalGeneration,
    DualProjector,
    dual_projector,
    is_dual,
    make_dual,
    normalise_weights,
    register,
    routing,
    save_dual,
)
from .routers import (
    COT_MODES,
    ROUTES,
    CoTDecision,
    CoTRouter,
    QuestionEncoder,
    ReWRouter,
    cot_route,
    parse_choice,
)

__all__ = [
    "COT_MODES",
    "CoTDecision",
    "CoTRouter",
    "DIYSinkConfig",
    "DIYSinkForConditionalGeneration",
    "DualProjector",
    "MODEL_TYPE",
    "NORMALISATIONS",
    "QuestionEncoder",
    "ROUTES",
    "ROUTE_MODES",
    "ReWRouter",
    "cot_route",
    "dual_projector",
    "is_dual",
    "make_dual",
    "normalise_weights",
    "parse_choice",
    "register",
    "routing",
    "save_dual",
]
