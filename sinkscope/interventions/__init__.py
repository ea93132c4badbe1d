"""Interventions on how visual tokens reach the LLM (issue 13): serialisable settings, applied by
context managers on unmodified Hugging Face models and always undone.

- :mod:`~sinkscope.interventions.rules`: :class:`VisualSinkRule`, which visual tokens are sinks;
- :mod:`~sinkscope.interventions.tokens`: :class:`TokenIntervention` and :func:`apply_tokens`,
  the visual tokens reordered or selected between the projector and the LLM;
- :mod:`~sinkscope.interventions.context`: :func:`intervene`, the context manager.
"""

from .context import intervene
from .rules import RULE_METHODS, VisualSinkRule, default_rule, rule_from
from .tokens import (
    FED_COLUMNS,
    POSITION_POLICIES,
    TOKEN_VARIANTS,
    Intervened,
    TokenIntervention,
    apply_tokens,
)

__all__ = [
    "FED_COLUMNS",
    "POSITION_POLICIES",
    "RULE_METHODS",
    "TOKEN_VARIANTS",
    "Intervened",
    "TokenIntervention",
    "VisualSinkRule",
    "apply_tokens",
    "default_rule",
    "intervene",
    "rule_from",
]
