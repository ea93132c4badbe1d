"""Information pathways: attention rollout / flow and relevance maps (pure functions, in
:mod:`sinkscope.flow.rollout`), plus ViT-to-LLM propagation, knockout and attribution (their own
submodules, imported on demand).

>>> from sinkscope.flow import rollout
>>> rollout([[[1.0, 0.0], [0.5, 0.5]]]).tolist()
[[1.0, 0.0], [0.25, 0.75]]
"""

from .rollout import (
    attention_by_group,
    attention_flow,
    fuse_heads,
    relevance_map,
    residual_matrices,
    rollout,
    rollout_from,
    to_grid,
)

__all__ = [
    "attention_by_group",
    "attention_flow",
    "fuse_heads",
    "relevance_map",
    "residual_matrices",
    "rollout",
    "rollout_from",
    "to_grid",
]
