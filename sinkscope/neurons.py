"""Register neurons (Jiang et al., *Vision Transformers Don't Need Trained Registers*).

Over a set of images, take the positions that are sinks at a detection layer (by a norm rule),
then rank the MLP neurons of the blocks before it by their mean |activation| at those positions:
averaged over each image's sink positions, then over the images that have any (an image without a
sink is skipped, not counted as 0), as the reference's ``find_register_neurons``
(``nickjiang2378/test-time-registers``, ``shared/algorithms.py``). The neurons that write the sinks
rank first.

>>> from sinkscope import Plant, load_model
>>> from sinkscope.models.tiny import paint_markers
>>> ad = load_model("tiny-clip", plant=Plant(layer=2, dims=(7,), magnitude=600.0), image_size=(48, 40))
>>> images = [paint_markers(np.full((48, 40, 3), 90, np.uint8), [(1, 2), (4, 0)])]
>>> rn = register_neurons(ad, images, detection_layer=-1, rule=NormRule(threshold=100), progress=False)
>>> rn.top(1)[["block", "neuron", "rank"]].values.tolist(), rn.n_sink_positions
([[1, 0, 1]], 2)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from ._utils import SinkscopeError, progress_bar
from .capture import Capture, capture, parse_layers
from .data import ImageItem
from .models.base import Adapter
from .scanning.rows import batch_rows
from .sinks import NormRule, Rule, detect, rule_to_dict


@dataclass
class RegisterNeurons:
    """Ranked MLP neurons. ``table`` columns: ``block, neuron, mean_abs_sink, mean_abs_other,
    ratio, contribution, rank`` (rank 1 = strongest at sink positions). ``mean_abs_sink`` (and
    ``mean_abs_other``) is the mean over images of each image's mean |activation| at its sink
    (other) positions, over the ``n_sink_images`` images that have a sink (the images with another
    position)."""

    table: pd.DataFrame
    detection_layer: int
    rule: dict[str, Any]
    n_sink_positions: int
    n_other_positions: int
    n_sink_images: int = 0

    def top(self, k: int = 10) -> pd.DataFrame:
        """The ``k`` best-ranked neurons (Jiang et al.: 10 for ViT-B/16, 50 for DINOv2-L)."""
        return self.table.head(k).reset_index(drop=True)


def register_neurons(
    adapter: Adapter,
    images: list[Any],
    detection_layer: int = -1,
    rule: Rule | None = None,
    blocks: list[int] | None = None,
    batch_size: int = 8,
    progress: bool = True,
    score: str = "activation",
) -> RegisterNeurons:
    """Rank MLP neurons by mean |activation| at sink positions of ``detection_layer``, per image
    and then over the images with a sink (images without one are skipped).

    ``images``: arrays, PIL images or :class:`~sinkscope.data.ImageItem`. ``rule``: the norm rule
    that defines sink positions at the detection layer (Jiang et al. use absolute thresholds:
    30 at the last layer of ViT-B/16, 150 at layer -2 of ViT-L/14 and DINOv2-L).
    ``blocks``: the MLPs searched (default: every block before the detection layer).
    ``score``: ``"activation"`` ranks by mean |activation| at sink positions (Jiang et al.);
    ``"contribution"`` by that times the L2 norm of the neuron's output weights (what it writes).
    """
    rule = rule or NormRule(relative=5.0)
    layer, blocks = _check_request(adapter, rule, detection_layer, blocks, score)
    sums_s = {b: 0.0 for b in blocks}
    sums_o = {b: 0.0 for b in blocks}
    n_s = n_o = img_s = img_o = 0
    bar = progress_bar(len(images), enabled=progress, desc="register neurons")
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        arrays = [it.load() if isinstance(it, ImageItem) else it for it in chunk]
        inputs = adapter.prepare(arrays, [f"i{start + k}" for k in range(len(chunk))])
        mask, other = _sink_positions(adapter, inputs, layer, rule)
        n_s += int(mask.sum())
        n_o += int(other.sum())
        img_s += int(mask.any(1).sum())
        img_o += int(other.any(1).sum())
        # pass 2: reduce every neuron's |activation| inside the hooks, in fp32, with the known masks
        _accumulate(adapter, inputs, blocks, mask, other, sums_s, sums_o)
        bar.update(len(chunk))
    bar.close()
    if n_s == 0:
        raise SinkscopeError(
            f"no sink positions at layer {layer} under rule '{rule.describe()}': nothing to rank neurons by"
        )
    table = _rank(adapter, blocks, sums_s, sums_o, img_s, img_o, score)
    return RegisterNeurons(table, layer, rule_to_dict(rule), n_s, n_o, img_s)


def _check_request(
    adapter: Adapter, rule: Rule, detection_layer: int, blocks: list[int] | None, score: str
) -> tuple[int, list[int]]:
    """``(detection layer, blocks searched)``; refuses a batch-dependent rule, an unknown score,
    layer 0 (no MLP before it) and blocks at or after the detection layer."""
    if isinstance(rule, NormRule) and rule.mode == "auto":
        raise SinkscopeError(
            "register neurons need a batch-independent rule: give NormRule(threshold=...) or NormRule(relative=...)"
        )
    if score not in ("activation", "contribution"):
        raise SinkscopeError(f"unknown score {score!r}; use 'activation' or 'contribution'")
    layer = parse_layers([detection_layer], adapter.n_layers)[0]
    if layer == 0:
        raise SinkscopeError("detection layer 0 has no MLP before it; choose a layer >= 1")
    blocks = sorted(blocks) if blocks is not None else list(range(layer))
    if any(b >= layer for b in blocks):
        raise SinkscopeError(f"blocks {blocks} must come before the detection layer {layer}")
    return layer, blocks


def _sink_positions(adapter: Adapter, inputs, layer: int, rule: Rule) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass 1 (the forward stops at ``layer``): ``[batch, tokens]`` masks of the sink positions at
    the detection layer and of the other real tokens (padding in neither)."""
    bc = capture(adapter, inputs, layers=[layer])
    rows = batch_rows(adapter, inputs, bc, causal=adapter.family == "causal-lm")
    sink = detect(rows, rule).is_sink.to_numpy()
    n_tok = bc.norms.shape[2]
    mask = torch.zeros(len(inputs.names), n_tok, dtype=torch.bool)
    valid = torch.zeros_like(mask)
    for k, lay in enumerate(inputs.layouts):
        sel = rows["image"].to_numpy() == inputs.names[k]
        mask[k, : lay.n_tokens] = torch.from_numpy(sink[sel])
        valid[k, : lay.n_tokens] = True
    return mask, valid & ~mask


def _rank(adapter: Adapter, blocks, sums_s, sums_o, n_s: int, n_o: int, score: str) -> pd.DataFrame:
    """The neurons of ``blocks`` ranked by mean |activation| at sink positions (``score``
    ``"activation"``) or by that times their output weights' L2 norm (``"contribution"``).
    ``sums_*``: per-image means summed over images; ``n_*``: how many images were summed."""
    frames = []
    for b in blocks:
        ms = (sums_s[b] / n_s).cpu().numpy()
        mo = (sums_o[b] / max(n_o, 1)).cpu().numpy()
        w_out = adapter.mlp_out(b).weight.detach().float().norm(dim=0).cpu().numpy()
        frames.append(
            pd.DataFrame(
                {
                    "block": b,
                    "neuron": np.arange(len(ms)),
                    "mean_abs_sink": ms,
                    "mean_abs_other": mo,
                    "ratio": ms / np.maximum(mo, 1e-12),
                    "contribution": ms * w_out,
                }
            )
        )
    key = "mean_abs_sink" if score == "activation" else "contribution"
    table = pd.concat(frames, ignore_index=True).sort_values(key, ascending=False, kind="stable")
    table["rank"] = np.arange(1, len(table) + 1)
    return table.reset_index(drop=True)


@torch.no_grad()
def _accumulate(adapter, inputs, blocks, mask, other, sums_s, sums_o) -> None:
    """One forward whose MLP activations are reduced by a :class:`Capture` reducer: per image and
    neuron the mean |activation| at its sink and at its other positions (fp32), summed over the
    batch's images (an image with no such position adds 0: the caller does not count it), the
    forward stopping after the last block searched."""
    dev = adapter.device
    m_s, m_o = mask.to(dev, torch.float32), other.to(dev, torch.float32)
    w_s = m_s / m_s.sum(1, keepdim=True).clamp(min=1)  # per image: 1 / its number of sink positions
    w_o = m_o / m_o.sum(1, keepdim=True).clamp(min=1)

    def reduce(b: int, act: torch.Tensor) -> None:
        act = act.float().abs()  # [batch, tokens, neurons]
        sums_s[b] = sums_s[b] + torch.einsum("bt,btf->f", w_s, act)
        sums_o[b] = sums_o[b] + torch.einsum("bt,btf->f", w_o, act)

    with Capture(adapter, layers=None, mlp=blocks, mlp_reducer=reduce, stop_early=True) as cap:
        cap.run(inputs)
