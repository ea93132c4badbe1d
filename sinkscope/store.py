"""On-disk activation store: full residual-stream tensors for chosen layers, as safetensors
shards plus a JSON manifest, written batch by batch and resumable.

Layout of a store folder::

    manifest.json            model, layers, dtype, hidden size, and per item: shard, token count, grid
    shard-00000.safetensors  tensors named "<slot>/<layer>", each [n_tokens, hidden]

A shard is written before the manifest that names it (both atomically), so a crash leaves at
worst an unnamed shard that the next write replaces. Writing an item that is already stored
replaces its entry: items are never duplicated.

>>> import numpy as np
>>> from sinkscope.capture import Capture
>>> from sinkscope.models import load_model
>>> ad = load_model("tiny-dinov2")                                  # 4 blocks, width 64, 8 px patches
>>> batch = ad.prepare([np.zeros((32, 32, 3), np.uint8), np.full((48, 40, 3), 200, np.uint8)],
...                    names=["black", "grey"])
>>> with Capture(ad, keep=[2, 4]) as c:                             # full hidden states of layers 2 and 4
...     cap = c.run(batch)
>>> st = ActivationStore("runs/x/activations", layers=[2, 4], model="tiny-dinov2")
>>> st.add(batch.names, batch.layouts, cap.hidden)
'shard-00000.safetensors'
>>> st.load("grey", 4).shape                                         # resized to 32 px: CLS + 4 x 4 patches
torch.Size([17, 64])
>>> ActivationStore.open("runs/x/activations").info()["n_items"]
2
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ._utils import SinkscopeError
from .models.base import TokenLayout

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ActivationStore:
    """Append-only, resumable store of per-item hidden states for a fixed set of layers."""

    def __init__(
        self,
        root: str | Path,
        layers: Sequence[int] | None = None,
        model: str | None = None,
        dtype: str = "float32",
        resume: bool = True,
    ):
        self.root = Path(root)
        self.manifest_path = self.root / "manifest.json"
        if dtype not in _DTYPES:
            raise SinkscopeError(f"unknown store dtype {dtype!r}; use {', '.join(_DTYPES)}")
        if self.manifest_path.exists() and resume:
            self.manifest = json.loads(self.manifest_path.read_text())
            if layers is not None and list(layers) != self.manifest["layers"]:
                raise SinkscopeError(
                    f"store {self.root} holds layers {self.manifest['layers']}, not {list(layers)}"
                )
            if model is not None and self.manifest.get("model") != model:
                raise SinkscopeError(
                    f"store {self.root} holds model {self.manifest.get('model')!r}, not {model!r}"
                )
        else:
            if layers is None:
                raise SinkscopeError(f"no activation store at {self.root}")
            self.root.mkdir(parents=True, exist_ok=True)
            for old in self.root.glob("shard-*.safetensors"):
                old.unlink()
            self.manifest = {
                "model": model,
                "layers": list(layers),
                "dtype": dtype,
                "shards": [],
                "items": {},
            }
            self._write_manifest()
        self._cache: dict[str, dict[str, torch.Tensor]] = {}

    @classmethod
    def open(cls, root: str | Path) -> ActivationStore:
        """Open an existing store read-only-style (``add`` still works and appends)."""
        return cls(root, layers=None, resume=True)

    # -- writing ------------------------------------------------------------------------------
    @property
    def layers(self) -> list[int]:
        return list(self.manifest["layers"])

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.manifest["dtype"]]

    def add(
        self, names: Sequence[str], layouts: Sequence[TokenLayout], hidden: dict[int, torch.Tensor]
    ) -> str:
        """Store one batch: ``hidden[layer]`` is ``[batch, tokens, hidden]`` (padding beyond each
        item's ``n_tokens`` is dropped). Returns the shard file name."""
        missing = [layer for layer in self.layers if layer not in hidden]
        if missing:
            raise SinkscopeError(f"store needs layers {missing}, which were not captured")
        shard = f"shard-{len(self.manifest['shards']):05d}.safetensors"
        tensors = {}
        for slot, lay in enumerate(layouts):
            for layer in self.layers:
                tensors[f"{slot}/{layer}"] = hidden[layer][slot, : lay.n_tokens].to(self.dtype).contiguous()
        tmp = self.root / (shard + ".tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, self.root / shard)
        self.manifest["shards"].append(shard)
        for slot, (name, lay) in enumerate(zip(names, layouts)):
            self.manifest["items"][name] = {
                "shard": shard,
                "slot": slot,
                "n_tokens": lay.n_tokens,
                "layout": lay.to_dict(),
            }
        self._write_manifest()
        return shard

    def _write_manifest(self) -> None:
        tmp = self.manifest_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.manifest, indent=1))
        os.replace(tmp, self.manifest_path)

    # -- reading ------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Stored item names, in the order they were first added."""
        return list(self.manifest["items"])

    def __contains__(self, name: str) -> bool:
        return name in self.manifest["items"]

    def __len__(self) -> int:
        return len(self.manifest["items"])

    def layout(self, name: str) -> TokenLayout:
        d = dict(self.manifest["items"][name]["layout"])
        d.pop("n_tokens", None)
        d["grid"] = tuple(d["grid"]) if d.get("grid") else None
        return TokenLayout(**d)

    def _shard(self, shard: str) -> dict[str, torch.Tensor]:
        if shard not in self._cache:
            if len(self._cache) > 4:
                self._cache.pop(next(iter(self._cache)))
            self._cache[shard] = load_file(str(self.root / shard))
        return self._cache[shard]

    def load(self, name: str, layer: int) -> torch.Tensor:
        """``[n_tokens, hidden]`` hidden state of one item at one layer."""
        if name not in self.manifest["items"]:
            raise SinkscopeError(f"item {name!r} is not in the store {self.root}")
        if layer not in self.layers:
            raise SinkscopeError(f"layer {layer} is not in the store {self.root} (layers {self.layers})")
        it = self.manifest["items"][name]
        return self._shard(it["shard"])[f"{it['slot']}/{layer}"]

    def iter_layer(self, layer: int) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, [n_tokens, hidden])`` for every stored item, shard by shard (bounded memory)."""
        by_shard: dict[str, list[str]] = {}
        for name, it in self.manifest["items"].items():
            by_shard.setdefault(it["shard"], []).append(name)
        for _shard, names in by_shard.items():
            for name in names:
                yield name, self.load(name, layer)

    def info(self) -> dict[str, Any]:
        return {k: v for k, v in self.manifest.items() if k != "items"} | {"n_items": len(self)}
