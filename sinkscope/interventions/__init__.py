"""Interventions on how visual tokens reach the LLM (issue 13): serialisable settings, applied by
context managers on unmodified Hugging Face models and always undone.

- :mod:`~sinkscope.interventions.rules`: :class:`VisualSinkRule`, which visual tokens are sinks;
- :mod:`~sinkscope.interventions.tokens`: :class:`TokenIntervention` and :func:`apply_tokens`,
  the visual tokens reordered or selected between the projector and the LLM;
- :mod:`~sinkscope.interventions.context`: :func:`intervene`, the context manager;
- :mod:`~sinkscope.interventions.var`: :class:`VAR` and :func:`var`, the LLM's attention moved
  from its sink tokens to the image (Kang et al.);
- :mod:`~sinkscope.interventions.registers`: :class:`TestTimeRegister`, the ViT's register
  neurons moved onto an added token (Jiang et al.).
"""

from .context import intervene
from .registers import TestTimeRegister, register_effect, tt_register
from .rules import RULE_METHODS, VisualSinkRule, default_rule, rule_from
from .tokens import (
    FED_COLUMNS,
    POSITION_POLICIES,
    TOKEN_VARIANTS,
    Intervened,
    TokenIntervention,
    apply_tokens,
)
from .var import VAR, redistribute, var

__all__ = [
    "FED_COLUMNS",
    "POSITION_POLICIES",
    "RULE_METHODS",
    "TOKEN_VARIANTS",
    "Intervened",
    "TestTimeRegister",
    "TokenIntervention",
    "VAR",
    "VisualSinkRule",
    "apply_tokens",
    "default_rule",
    "intervene",
    "redistribute",
    "register_effect",
    "rule_from",
    "tt_register",
    "var",
]
