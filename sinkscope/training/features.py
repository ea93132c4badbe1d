"""The vision tower's features, computed once and cached on disk, so training epochs skip the tower.

For a LLaVA model the cached tensor of an image is what the projector receives: the tower's
``hidden_states[vision_feature_layer]`` at the tokens the select strategy feeds (LLaVA-1.5's
``default`` drops CLS), ``[n_image_tokens, vision_width]``. Features are stored in safetensors
shards (``features-00000.safetensors``, one tensor per image key) with an ``index.json`` mapping
keys to shards; a cache is reused when its ``fingerprint`` (the model's tower config and the
feature settings) matches, and extended with keys it lacks.

>>> from sinkscope import load_model
>>> from sinkscope.data import ImageItem
>>> import numpy as np
>>> ad = load_model("tiny-llava")
>>> cache = FeatureCache(ad, "feature-cache")
>>> img = ImageItem("grey", "grey", loader=lambda: np.full((32, 32, 3), 128, np.uint8))
>>> cache.ensure([img], progress=False)
1
>>> cache.get("grey").shape[-1] == ad.model.config.vision_config.hidden_size, "grey" in cache
(True, True)
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from .. import ownership
from .._utils import progress_bar
from ..data import ImageItem


@torch.no_grad()
def tower_features(adapter, arrays: Sequence, min_side: int | None = None) -> torch.Tensor:
    """``[images, n_image_tokens, vision_width]``: the projector's input for each image array
    (``min_side``: the smallest side the processor may enlarge, as for built-in small pictures)."""
    vis = adapter.vision.prepare(list(arrays), min_side=min_side)
    pv = vis.tensors["pixel_values"].to(adapter.device, adapter.dtype)
    tower = adapter.model.model.vision_tower
    hs = tower(pixel_values=pv, output_hidden_states=True).hidden_states[adapter.feature_layer]
    keep = adapter.fed_vit_tokens(hs.shape[1])
    return hs[:, keep].float().cpu()


class FeatureCache:
    """A folder of cached tower features keyed by image name (see the module docstring)."""

    def __init__(self, adapter, folder: str | Path, shard_size: int = 512, option: str = "--cache-dir"):
        self.adapter, self.dir, self.shard_size = adapter, Path(folder), shard_size
        # a new or empty folder, or a feature cache's own (never a user's index.json or shards);
        # ``option``: how a refusal names the folder
        ownership.claim(self.dir, "feature-cache", ownership.OUTPUTS["feature-cache"], option=option)
        self.fingerprint = self._fingerprint()
        self.index_path = self.dir / "index.json"
        idx = json.loads(self.index_path.read_text()) if self.index_path.exists() else {}
        if idx.get("fingerprint") != self.fingerprint:
            for f in self.dir.glob("features-*.safetensors"):
                f.unlink()
            idx = {"fingerprint": self.fingerprint, "keys": {}}
        self.index: dict = idx
        self._loaded: dict[str, dict[str, torch.Tensor]] = {}

    def _fingerprint(self) -> str:
        ad = self.adapter
        cfg = ad.model.config.vision_config.to_json_string()
        extra = f"{ad.feature_layer}|{ad.select_strategy}|{getattr(ad.vision, 'image_size', None)}"
        return hashlib.sha1((cfg + extra).encode()).hexdigest()[:16]

    def __contains__(self, key: str) -> bool:
        return key in self.index["keys"]

    def ensure(
        self, images: Sequence[ImageItem], batch_size: int = 16, progress: bool = True, min_side: int | None = None
    ) -> int:
        """Compute and store the features of every image not cached yet; returns how many."""
        todo = [im for im in dict((im.name, im) for im in images).values() if im.name not in self]
        bar = progress_bar(len(todo), progress, "tower features")
        for s in range(0, len(todo), self.shard_size):
            chunk = todo[s : s + self.shard_size]
            tensors: dict[str, torch.Tensor] = {}
            for b in range(0, len(chunk), batch_size):
                part = chunk[b : b + batch_size]
                feats = tower_features(self.adapter, [im.load() for im in part], min_side=min_side)
                tensors.update({im.name: f.clone() for im, f in zip(part, feats)})
                bar.update(len(part))
            self._write_shard(tensors)
        bar.close()
        return len(todo)

    def _write_shard(self, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        n = len({v for v in self.index["keys"].values()})
        name = f"features-{n:05d}.safetensors"
        tmp = self.dir / (name + ".tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, self.dir / name)
        self.index["keys"].update({k: name for k in tensors})
        tmp = self.index_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.index))
        os.replace(tmp, self.index_path)

    def get(self, key: str) -> torch.Tensor:
        """The cached features of image ``key`` (shards are read once and kept)."""
        from safetensors.torch import load_file

        shard = self.index["keys"][key]
        if shard not in self._loaded:
            self._loaded[shard] = load_file(str(self.dir / shard))
        return self._loaded[shard][key]


__all__ = ["FeatureCache", "tower_features"]
