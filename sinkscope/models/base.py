"""What every model adapter states: blocks, attention, MLPs and the token layout.

An adapter wraps an *unmodified* Hugging Face model. Everything else in sinkscope asks the
adapter where things are instead of guessing from module names or from ``sqrt(num_tokens)``.

Layer convention (everywhere in sinkscope): layer ``i`` is ``hidden_states[i]`` of the Hugging
Face model, ``0`` is the embedding output (the input of the first block).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

TOKEN_KINDS = ("cls", "register", "patch", "text")


@dataclass(frozen=True)
class TokenLayout:
    """The layout of one model input sequence.

    Vision sequences are ``[CLS]*n_cls + [REG]*n_registers + patches`` with patches in row-major
    order over ``grid = (rows, cols)``, read from the actual input (pixel height / patch size),
    never from ``sqrt(N)``. Text sequences have ``n_text`` tokens and no grid.

    >>> lay = TokenLayout(n_cls=1, n_registers=4, grid=(2, 3))
    >>> lay.n_tokens, lay.kind(0), lay.kind(1), lay.row_col(5 + 4)
    (11, 'cls', 'register', (1, 1))
    """

    n_cls: int = 0
    n_registers: int = 0
    grid: tuple[int, int] | None = None
    n_text: int = 0
    patch_size: int | None = None

    @property
    def n_prefix(self) -> int:
        """Tokens before the first patch (CLS and registers)."""
        return self.n_cls + self.n_registers

    @property
    def n_patches(self) -> int:
        return 0 if self.grid is None else self.grid[0] * self.grid[1]

    @property
    def n_tokens(self) -> int:
        return self.n_text if self.grid is None else self.n_prefix + self.n_patches

    def kind(self, token: int) -> str:
        if self.grid is None:
            return "text"
        if token < self.n_cls:
            return "cls"
        if token < self.n_prefix:
            return "register"
        return "patch"

    def kinds(self) -> list[str]:
        return [self.kind(t) for t in range(self.n_tokens)]

    def row_col(self, token: int) -> tuple[int | None, int | None]:
        """Patch-grid (row, col) of a token, ``(None, None)`` for CLS, registers and text."""
        if self.grid is None or token < self.n_prefix:
            return None, None
        p = token - self.n_prefix
        return p // self.grid[1], p % self.grid[1]

    def patch_token(self, row: int, col: int) -> int:
        """Sequence index of the patch at (row, col)."""
        assert self.grid is not None, "text layouts have no grid"
        return self.n_prefix + row * self.grid[1] + col

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["grid"] = list(self.grid) if self.grid else None
        d["n_tokens"] = self.n_tokens
        return d


@dataclass
class ModelInputs:
    """A prepared batch: the tensors to feed, the layout per item and the item names."""

    tensors: dict[str, torch.Tensor]
    layouts: list[TokenLayout]
    names: list[str]
    pixels: list[Any] = field(default_factory=list)  # HxWx3 uint8 arrays the model saw (vision)
    attention_mask: torch.Tensor | None = None  # [batch, seq] for padded text, else None

    def __len__(self) -> int:
        return len(self.names)


class Adapter:
    """Base class: a family adapter over one Hugging Face transformer stack.

    Subclasses set ``family`` and implement :meth:`blocks`, :meth:`attention`, :meth:`mlp_out`,
    :meth:`prepare` and :meth:`forward`.
    """

    family: str = "base"
    #: the local folder the model was loaded from (``None``: embedded, built or from the hub)
    source: str | None = None
    #: whether ``hidden_states[-1]`` of the HF model is the final norm's output (LLMs) rather
    #: than the last block's output (CLIP, SigLIP, DINOv2, ViT)
    last_layer_normed: bool = False
    #: the sinks planted by sinkscope's tiny builders (:class:`~sinkscope.models.tiny.Plant`);
    #: ``None`` for every model a user loads or builds
    planted: Any = None

    def __init__(self, model: nn.Module, name: str, processor: Any = None):
        self.model = model
        self.name = name
        self.processor = processor

    # -- structure -------------------------------------------------------------------------
    def blocks(self) -> list[nn.Module]:
        """The transformer blocks; block ``i`` outputs layer ``i + 1``."""
        raise NotImplementedError

    def attention(self, block: int) -> nn.Module:
        """Self-attention module of a block (returns ``(output, weights)`` in transformers 5)."""
        raise NotImplementedError

    def mlp_out(self, block: int) -> nn.Module:
        """The MLP's output projection; its *input* holds the MLP neuron activations."""
        raise NotImplementedError

    def final_norm(self) -> nn.Module | None:
        """The norm whose output is ``hidden_states[-1]`` when :attr:`last_layer_normed`."""
        return None

    @property
    def n_layers(self) -> int:
        """Number of blocks; valid layers are ``0 .. n_layers``."""
        return len(self.blocks())

    @property
    def hidden_size(self) -> int:
        raise NotImplementedError

    @property
    def n_heads(self) -> int:
        raise NotImplementedError

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # -- data ------------------------------------------------------------------------------
    def prepare(self, items: list[Any], names: list[str] | None = None) -> ModelInputs:
        raise NotImplementedError

    def forward(self, inputs: ModelInputs) -> Any:
        """Run the model on a prepared batch (no grad handling here; callers decide)."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "family": self.family,
            "class": type(self.model).__name__,
            "n_layers": self.n_layers,
            "hidden_size": self.hidden_size,
            "n_heads": self.n_heads,
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, layers={self.n_layers}, width={self.hidden_size})"

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Adapter:
        self.model.to(device=device, dtype=dtype)
        return self
