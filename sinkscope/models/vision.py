"""Adapters for vision transformers: CLIP, SigLIP, DINOv2, DINOv2 with registers, ViT.

In transformers 5 these share one shape - ``encoder.layers`` / ``encoder.layer`` / ``layers`` of
blocks, each with an attention module (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` /
``out_proj``) and an ``mlp`` with ``fc1``, ``activation_fn``, ``fc2`` - so one adapter class with
a small per-family table covers them. The token layout (CLS, registers, patch grid) comes from
the config and the actual pixel tensor.

>>> import transformers as T
>>> m = T.Dinov2Model(T.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
...                                  image_size=28, patch_size=14))
>>> ad = VisionAdapter(m, "toy")
>>> ad.family, ad.n_layers, ad.layout_for(28, 42).grid
('dinov2', 2, (2, 3))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .._utils import SinkscopeError
from .base import Adapter, ModelInputs, TokenLayout

_CLIP_STATS = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
_IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_HALF_STATS = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


@dataclass(frozen=True)
class VisionFamily:
    name: str
    model_types: tuple[str, ...]  # config.model_type values of the vision config
    n_cls: int
    takes_interpolate_flag: bool  # forward accepts interpolate_pos_encoding=
    #: (mean, std) of the family's standard image processor, used when a checkpoint has none
    default_stats: tuple = _HALF_STATS


VISION_FAMILIES = {
    f.name: f
    for f in (
        VisionFamily("clip", ("clip_vision_model", "clip"), 1, True, _CLIP_STATS),
        VisionFamily("siglip", ("siglip_vision_model", "siglip"), 0, True, _HALF_STATS),
        VisionFamily("dinov2", ("dinov2",), 1, False, _IMAGENET_STATS),
        VisionFamily("dinov2-reg", ("dinov2_with_registers",), 1, False, _IMAGENET_STATS),
        VisionFamily("vit", ("vit",), 1, True, _HALF_STATS),
    )
}
_TYPE_TO_FAMILY = {t: f for f in VISION_FAMILIES.values() for t in f.model_types}

#: The vision tower of composite models (CLIPModel, SiglipModel).
_COMPOSITE_VISION_ATTRS = ("vision_model",)


def vision_family_of(config) -> VisionFamily | None:
    """The :class:`VisionFamily` for a (vision) config, or ``None`` when not a supported ViT."""
    return _TYPE_TO_FAMILY.get(getattr(config, "model_type", None))


def _find_blocks(model: nn.Module) -> nn.ModuleList:
    for path in ("encoder.layers", "encoder.layer", "layers"):
        obj: Any = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    raise SinkscopeError(f"cannot find the transformer blocks of {type(model).__name__}")


class VisionAdapter(Adapter):
    """Adapter for a ViT-family vision model (or the vision half of CLIPModel/SiglipModel).

    ``image_size`` fixes the input size ``(height, width)`` in pixels (resize without crop);
    ``None`` uses the model's own image processor (resize + crop as the model was trained).
    """

    def __init__(self, model: nn.Module, name: str, processor: Any = None, image_size=None):
        for attr in _COMPOSITE_VISION_ATTRS:
            if vision_family_of(model.config) is None and hasattr(model, attr):
                model = getattr(model, attr)
        fam = vision_family_of(model.config)
        if fam is None:
            raise SinkscopeError(
                f"model {name!r}: {type(model).__name__} (model_type={model.config.model_type!r}) "
                f"is not a supported vision transformer ({', '.join(VISION_FAMILIES)})"
            )
        super().__init__(model, name, processor)
        self.spec = fam
        self.family = fam.name
        self._blocks = _find_blocks(model)
        if isinstance(image_size, int):
            image_size = (image_size, image_size)
        self.image_size = tuple(image_size) if image_size else None

    # structure -------------------------------------------------------------------------
    def blocks(self) -> list[nn.Module]:
        return list(self._blocks)

    def attention(self, block: int) -> nn.Module:
        b = self._blocks[block]
        return b.self_attn if hasattr(b, "self_attn") else b.attention

    def mlp_out(self, block: int) -> nn.Module:
        return self._blocks[block].mlp.fc2

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def n_heads(self) -> int:
        return int(self.config.num_attention_heads)

    @property
    def patch_size(self) -> int:
        return int(self.config.patch_size)

    @property
    def n_registers(self) -> int:
        return int(getattr(self.config, "num_register_tokens", 0) or 0) if self.family == "dinov2-reg" else 0

    def layout_for(self, height: int, width: int) -> TokenLayout:
        """Token layout for an input of ``height x width`` pixels."""
        p = self.patch_size
        return TokenLayout(
            n_cls=self.spec.n_cls, n_registers=self.n_registers, grid=(height // p, width // p), patch_size=p
        )

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update(patch_size=self.patch_size, n_cls=self.spec.n_cls, n_registers=self.n_registers)
        d["image_size"] = list(self.image_size) if self.image_size else None
        return d

    # data --------------------------------------------------------------------------------
    def _mean_std(self) -> tuple[np.ndarray, np.ndarray]:
        proc = self.processor
        mean = getattr(proc, "image_mean", None) if proc is not None else None
        std = getattr(proc, "image_std", None) if proc is not None else None
        if mean is None or std is None:
            mean, std = self.spec.default_stats
        return np.asarray(mean, np.float32), np.asarray(std, np.float32)

    def prepare(
        self, items: list[Any], names: list[str] | None = None, min_side: int | None = None
    ) -> ModelInputs:
        """Turn images (PIL images or HxWx3 uint8 arrays) into ``pixel_values`` and layouts.

        Each source image must be at least one patch wide and high, or ``min_side`` px when given
        (a data set of small pictures, such as the 8 x 8 ``digits``, that the resize enlarges).

        >>> from sinkscope.models import load_model
        >>> ad = load_model("tiny-siglip", image_size=(40, 48))
        >>> inp = ad.prepare([np.zeros((40, 50, 3), np.uint8)], names=["black"])
        >>> inp.tensors["pixel_values"].shape, inp.layouts[0].grid, inp.names
        (torch.Size([1, 3, 40, 48]), (5, 6), ['black'])
        >>> ad.prepare([np.zeros((4, 50, 3), np.uint8)], names=["strip"])
        Traceback (most recent call last):
        ...
        sinkscope._utils.SinkscopeError: image 'strip' is 50x4 px, smaller than one 8 px patch
        """
        from PIL import Image

        names = names or [f"image{i}" for i in range(len(items))]
        pil = [it if isinstance(it, Image.Image) else Image.fromarray(np.asarray(it)) for it in items]
        pil = [im.convert("RGB") for im in pil]
        p = self.patch_size
        for nm, im in zip(names, pil):
            self.check_image(im.size[1], im.size[0], nm, min_side=min_side)
        mean, std = self._mean_std()
        if self.image_size is None and self.processor is not None:
            pv = self.processor(images=pil, return_tensors="pt")["pixel_values"]
        else:
            h, w = self.image_size or self._default_size()
            if h < p or w < p:
                raise SinkscopeError(f"image size {h}x{w} is smaller than one {p} px patch")
            arrs = [np.asarray(im.resize((w, h), Image.BICUBIC), np.float32) / 255.0 for im in pil]
            pv = torch.from_numpy(np.stack([(a - mean) / std for a in arrs]).transpose(0, 3, 1, 2).copy())
        # what the model saw, back as uint8 (for reports)
        seen = pv.permute(0, 2, 3, 1).numpy() * std + mean
        pixels = [np.clip(s * 255.0 + 0.5, 0, 255).astype(np.uint8) for s in seen]
        H, W = pv.shape[-2:]
        lay = self.layout_for(H, W)
        return ModelInputs(
            tensors={"pixel_values": pv}, layouts=[lay] * len(pil), names=list(names), pixels=pixels
        )

    def check_image(self, height: int, width: int, name: str, min_side: int | None = None) -> None:
        """Raise a one-line error when an image is smaller than one patch (or ``min_side`` px)."""
        p = self.patch_size if min_side is None else min_side
        if min(height, width) < p:
            raise SinkscopeError(
                f"image {name!r} is {width}x{height} px, smaller than one {p} px patch"
                if min_side is None
                else f"image {name!r} is {width}x{height} px, smaller than {p} px"
            )

    def _default_size(self) -> tuple[int, int]:
        s = self.config.image_size
        return (s, s) if isinstance(s, int) else tuple(s)

    def forward_kwargs(self, inputs: ModelInputs) -> dict[str, Any]:
        pv = inputs.tensors["pixel_values"].to(self.device, self.dtype)
        kw: dict[str, Any] = {"pixel_values": pv}
        if self.spec.takes_interpolate_flag and tuple(pv.shape[-2:]) != self._default_size():
            kw["interpolate_pos_encoding"] = True
        return kw

    def forward(self, inputs: ModelInputs, **extra) -> Any:
        return self.model(**self.forward_kwargs(inputs), **extra)
