"""Adapter for LLaVA-style vision-language models (``LlavaForConditionalGeneration``).

It pairs a :class:`~sinkscope.models.vision.VisionAdapter` over the vision tower with a
:class:`~sinkscope.models.text.CausalLMAdapter` over the language model, and knows how ViT tokens
reach the LLM: the vision feature layer (LLaVA-1.5: ``-2``), the select strategy (``default``
drops CLS, ``full`` keeps it), the projector, and the positions of image tokens in the LLM input.

>>> from sinkscope.models import load_model
>>> ad = load_model("tiny-llava")
>>> ad.vision.n_layers, ad.llm.n_layers, ad.feature_layer, ad.select_strategy
(4, 4, 3, 'default')
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._utils import SinkscopeError
from .base import Adapter, ModelInputs
from .text import CausalLMAdapter
from .vision import VisionAdapter


class LlavaAdapter(Adapter):
    """LLaVA: vision tower + projector + LLM. ``scan`` analyses its vision tower."""

    family = "llava"

    def __init__(self, model: nn.Module, name: str, processor: Any = None, image_size=None):
        super().__init__(model, name, processor)
        inner = getattr(model, "model", model)
        image_proc = getattr(processor, "image_processor", processor)
        tokenizer = getattr(processor, "tokenizer", None)
        self.vision = VisionAdapter(inner.vision_tower, f"{name}:vision", image_proc, image_size=image_size)
        self.llm = CausalLMAdapter(inner.language_model, f"{name}:llm", tokenizer)
        self.projector: nn.Module = inner.multi_modal_projector
        self.tokenizer = tokenizer

    # the ViT is what a scan looks at -----------------------------------------------------
    def blocks(self) -> list[nn.Module]:
        return self.vision.blocks()

    def attention(self, block: int) -> nn.Module:
        return self.vision.attention(block)

    def mlp_out(self, block: int) -> nn.Module:
        return self.vision.mlp_out(block)

    @property
    def hidden_size(self) -> int:
        return self.vision.hidden_size

    @property
    def n_heads(self) -> int:
        return self.vision.n_heads

    @property
    def config(self):
        return self.model.config

    def prepare(self, items, names=None, min_side: int | None = None) -> ModelInputs:
        return self.vision.prepare(items, names, min_side=min_side)

    def forward(self, inputs: ModelInputs, **extra) -> Any:
        return self.vision.forward(inputs, **extra)

    def check_image(self, height: int, width: int, name: str, min_side: int | None = None) -> None:
        self.vision.check_image(height, width, name, min_side)

    # how ViT tokens reach the LLM --------------------------------------------------------
    @property
    def feature_layer(self) -> int:
        """The ViT layer (0 = embeddings, positive index) whose tokens feed the projector."""
        fl = self.model.config.vision_feature_layer
        if isinstance(fl, (list, tuple)):
            raise SinkscopeError(
                f"model {self.name!r}: multi-layer vision features {fl} are not supported yet"
            )
        return fl % (self.vision.n_layers + 1)

    @property
    def select_strategy(self) -> str:
        return self.model.config.vision_feature_select_strategy

    @property
    def image_token_id(self) -> int:
        cfg = self.model.config
        return int(getattr(cfg, "image_token_id", None) or cfg.image_token_index)

    def fed_vit_tokens(self, n_vit_tokens: int) -> list[int]:
        """ViT sequence indices that reach the LLM, in order (``default`` drops CLS)."""
        if self.select_strategy == "default":
            return list(range(1, n_vit_tokens))
        if self.select_strategy == "full":
            return list(range(n_vit_tokens))
        raise SinkscopeError(f"unknown vision_feature_select_strategy {self.select_strategy!r}")

    def image_token_positions(self, input_ids: torch.Tensor) -> list[torch.Tensor]:
        """Per batch item, the LLM sequence positions holding image features (in order)."""
        ids = input_ids if input_ids.dim() == 2 else input_ids[None]
        return [torch.nonzero(row == self.image_token_id).flatten() for row in ids]

    def vit_to_llm_positions(self, input_ids: torch.Tensor, n_vit_tokens: int, item: int = 0) -> list[dict]:
        """Map every ViT token fed to the LLM to its LLM input position, for all images of an item.

        Returns rows ``{"image_index", "vit_token", "llm_position"}``; raises when the number of
        image tokens in ``input_ids`` is not a multiple of the tokens per image.
        """
        fed = self.fed_vit_tokens(n_vit_tokens)
        pos = self.image_token_positions(input_ids)[item].tolist()
        if len(pos) % len(fed):
            raise SinkscopeError(
                f"input has {len(pos)} image tokens, not a multiple of {len(fed)} features per image "
                f"(strategy {self.select_strategy!r})"
            )
        return [
            {"image_index": k // len(fed), "vit_token": fed[k % len(fed)], "llm_position": p}
            for k, p in enumerate(pos)
        ]

    def build_inputs(
        self,
        images: list[Any],
        prompt: str,
        image_marker: str = "<image>",
        chat: bool = False,
        min_side: int | None = None,
    ) -> dict[str, Any]:
        """LLaVA inputs for one prompt with any number of images, without a hub processor.

        ``prompt`` holds one ``image_marker`` per image (missing markers are put in front); each
        marker becomes as many image tokens as the select strategy feeds (LLaVA-1.5: 576). Returns
        ``input_ids``, ``attention_mask``, ``pixel_values`` ``[images, 3, H, W]`` and the ViT layout.
        ``chat=True`` wraps the prompt in the tokenizer's chat template as one user turn (plus the
        assistant's opening), so text - not an image token - starts the sequence, as in training;
        without it, a tokenizer that adds no BOS (SmolLM2) starts the sequence with image tokens.

        >>> import numpy as np
        >>> from sinkscope.models import load_model
        >>> ad, img = load_model("tiny-llava"), np.zeros((32, 32, 3), np.uint8)
        >>> inp = ad.build_inputs([img], "<image> What is in the picture?")
        >>> inp["input_ids"].shape, inp["pixel_values"].shape, inp["layout"].grid
        (torch.Size([1, 23]), torch.Size([1, 3, 32, 32]), (4, 4))
        >>> [p["llm_position"] for p in ad.vit_to_llm_positions(inp["input_ids"], inp["layout"].n_tokens)][:3]
        [1, 2, 3]
        >>> ad.build_inputs([img], "What is in the picture?", chat=True)  # tiny-llava's tokenizer has none
        Traceback (most recent call last):
        ...
        sinkscope._utils.SinkscopeError: model 'tiny-llava': its tokenizer has no chat template; write the template into the prompt
        """
        if self.tokenizer is None:
            raise SinkscopeError(f"model {self.name!r} has no tokenizer to build a prompt with")
        n_marks = prompt.count(image_marker)
        if n_marks < len(images):
            prompt = (image_marker + " ") * (len(images) - n_marks) + prompt
        elif n_marks > len(images):
            raise SinkscopeError(f"prompt has {n_marks} {image_marker} markers for {len(images)} images")
        vis = self.vision.prepare(images, min_side=min_side)  # min_side: a set of small pictures
        lay = vis.layouts[0]
        n_feat = len(self.fed_vit_tokens(lay.n_tokens))
        tok = self.tokenizer
        if chat:
            if not getattr(tok, "chat_template", None):
                raise SinkscopeError(
                    f"model {self.name!r}: its tokenizer has no chat template; write the template into the prompt"
                )
            prompt = tok.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        ids: list[int] = []
        probe_ids = tok("a").input_ids
        starts_with_bos = bool(tok.bos_token) and prompt.startswith(str(tok.bos_token))
        if (
            tok.bos_token_id is not None
            and probe_ids
            and probe_ids[0] == tok.bos_token_id
            and not starts_with_bos
        ):
            ids.append(tok.bos_token_id)
        segments = prompt.split(image_marker)
        for k, seg in enumerate(segments):
            if seg.strip():
                ids.extend(tok(seg, add_special_tokens=False).input_ids)
            if k < len(segments) - 1:
                ids.extend([self.image_token_id] * n_feat)
        input_ids = torch.tensor([ids])
        return {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "pixel_values": vis.tensors["pixel_values"],
            "layout": lay,
            "pixels": vis.pixels,
        }

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update(
            vision=self.vision.describe(),
            llm=self.llm.describe(),
            feature_layer=self.feature_layer,
            select_strategy=self.select_strategy,
            image_token_id=self.image_token_id,
        )
        return d
