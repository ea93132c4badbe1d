"""Test-time registers (Jiang et al., *Vision Transformers Don't Need Trained Registers*): one added
token takes over the register neurons' activations, so the patches stop being sinks.

Inside :func:`tt_register` a ViT (alone, or the tower of a LLaVA model), as the reference code
(``nickjiang2378/test-time-registers``) does it:

- gets one **all-zero token appended after the patches at the output of its embeddings**, i.e.
  after the position embeddings (the token has none) and before anything else. Where the zero
  token then enters block 0 depends on the family:

  - CLIP: the embeddings feed ``pre_layrnorm``, so the token enters block 0 as
    ``LayerNorm(0) = pre_layrnorm.bias`` (the reference concatenates it before ``ln_pre``), not
    as 0;
  - SigLIP, DINOv2 (with or without trained registers), ViT: no norm between the embeddings and
    block 0, so the token enters block 0 as 0 (the reference's DINOv2 concatenates zeros after
    ``prepare_tokens``: CLS, position embeddings and trained registers already in place);

- at the **register neurons** ``(block, neuron)`` (from :func:`~sinkscope.neurons.register_neurons`,
  hooked on the MLP activation, i.e. the input of the MLP's output projection) of one block, the
  added token gets **one value on every register neuron of that block**: the reference's
  ``sign_max``, the activation largest in magnitude (sign kept; on a tie of ``+a`` and ``-a`` the
  negative one) over all the image's tokens - CLS, trained registers and the added token
  included - and all the block's register neurons (:func:`sign_max`). The patches' activations
  there are set to zero (``patches="zero"``, the reference's default) or to each neuron's mean
  over the patches (``patches="mean"``). CLS and trained registers keep theirs;
- inside LLaVA the added token is **dropped from the tower's outputs** before the projector reads
  them, so the LLM sees as many image tokens as before.

A tower used alone returns the added token as its last token (in every ``hidden_states`` entry,
the first included). :func:`register_effect` measures what the intervention did to the sink norms
(before and after, per layer).

Before issue 25 the token was appended after CLIP's pre-layernorm (0 at block 0, not the bias) and
each register neuron got its own extreme over the patches only (on the planted ``tiny-clip``,
neurons ``(1, 0), (1, 1)``: ``[20.55, 0.53]`` where the reference puts ``[20.55, 20.55]``);
neither is kept as an option: no paper or reference code does either, and the old zero token
was an artefact of where the hook sat.

>>> import numpy as np
>>> from sinkscope.models.tiny import Plant, load_tiny, paint_markers
>>> ad = load_tiny("tiny-clip", plant=Plant(layer=2))          # neuron 0 of block 1 writes the planted sink
>>> img = paint_markers(np.full((32, 32, 3), 90, np.uint8), [(1, 2)])
>>> eff = register_effect(ad, [img], TestTimeRegister(neurons=((1, 0),)))
>>> eff.loc[eff.layer == 4, ["max_patch_ratio_before", "max_patch_ratio_after"]].round(0).values.tolist()
[[74.0, 1.0]]
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd
import torch

from .._utils import SinkscopeError


@dataclass(frozen=True)
class TestTimeRegister:
    """The register neurons ``(block, neuron)`` and what the patches keep (``zero`` / ``mean``).

    >>> TestTimeRegister(neurons=[(3, 17), (3, 5)]).neurons
    ((3, 5), (3, 17))
    """

    __test__ = False  # not a pytest test class
    neurons: tuple[tuple[int, int], ...] = ()
    patches: str = "zero"
    kind: str = field(default="tt-register", init=False)

    def __post_init__(self):
        pairs = tuple(sorted((int(b), int(n)) for b, n in self.neurons))
        if not pairs:
            raise SinkscopeError("test-time register: give at least one (block, neuron) register neuron")
        object.__setattr__(self, "neurons", pairs)
        if self.patches not in ("zero", "mean"):
            raise SinkscopeError(f"test-time register patches: zero or mean, got {self.patches!r}")

    @classmethod
    def from_table(cls, neurons: Any, k: int = 10, patches: str = "zero") -> TestTimeRegister:
        """The top ``k`` of a :class:`~sinkscope.neurons.RegisterNeurons` (or its table)."""
        table = getattr(neurons, "table", neurons)
        top = table.sort_values("rank").head(k)
        return cls(tuple(zip(top.block.astype(int), top.neuron.astype(int))), patches)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["neurons"] = [list(p) for p in self.neurons]
        return d

    def describe(self) -> str:
        blocks = sorted({b for b, _ in self.neurons})
        return (
            f"test-time register: {len(self.neurons)} register neurons in blocks {blocks} moved onto one added "
            f"token (patches set to {self.patches})"
        )


def _vision(adapter):
    return adapter.vision if getattr(adapter, "family", None) == "llava" else adapter


def sign_max(x: torch.Tensor) -> torch.Tensor:
    """Per image of ``[B, T, F]``: the one value largest in magnitude over all ``T`` tokens and ``F``
    neurons, sign kept; on a tie of ``+a`` and ``-a``, ``-a`` (the reference's ``sign_max``).

    >>> sign_max(torch.tensor([[[1.0, -3.0], [2.0, 0.5]], [[4.0, 0.0], [-4.0, 1.0]]])).tolist()
    [-3.0, -4.0]
    """
    flat = x.flatten(1)
    hi, lo = flat.amax(1), flat.amin(1)
    return torch.where(hi.abs() > lo.abs(), hi, lo)


def _embeddings(vis) -> torch.nn.Module:
    emb = getattr(vis.model, "embeddings", None)
    if not isinstance(emb, torch.nn.Module):
        name = type(vis.model).__name__
        raise SinkscopeError(f"test-time register: {name} has no embeddings module to append the token to")
    return emb


@contextmanager
def tt_register(adapter, config: TestTimeRegister):
    """Add a test-time register to ``adapter``'s ViT inside the ``with`` block (module docstring)."""
    vis = _vision(adapter)
    n_blocks = len(vis.blocks())
    bad = [b for b, _ in config.neurons if not 0 <= b < n_blocks]
    if bad:
        raise SinkscopeError(f"test-time register: block {bad[0]} is not a block of the {n_blocks}-block tower")
    emb = _embeddings(vis)
    state: dict[str, Any] = {}

    def append(mod, args, out):
        # the embeddings' output: CLS, trained registers, patches (position embeddings added); the
        # zero token goes last and passes whatever comes before block 0 (CLIP's pre-layernorm)
        state["n"] = out.shape[1]  # tokens before the register
        return torch.cat([out, out.new_zeros(out.shape[0], 1, out.shape[2])], 1)

    def neuron_hook(block):
        ids = [n for b, n in config.neurons if b == block]

        def pre(mod, args):
            act = args[0].clone()
            n = state["n"]
            lo = vis.layout_for(*state["hw"]).n_prefix  # CLS and trained registers stay as they are
            value = sign_max(act[:, : n + 1, ids])  # before any change: every token, every register neuron
            patches = act[:, lo:n, ids]
            act[:, n, ids] = value[:, None].to(act.dtype)
            act[:, lo:n, ids] = 0 if config.patches == "zero" else patches.mean(1, keepdim=True)
            return (act, *args[1:])

        return pre

    def size_hook(mod, args, kwargs):
        pv = kwargs.get("pixel_values", args[0] if args else None)
        state["hw"] = tuple(pv.shape[-2:])

    def drop(mod, args, kwargs, out):
        n = state["n"]
        hs = getattr(out, "hidden_states", None)
        if hs is not None:  # transformers may capture only the layers a caller selects (None elsewhere)
            out.hidden_states = tuple(None if h is None else h[:, :n] for h in hs)
        if getattr(out, "last_hidden_state", None) is not None:
            out.last_hidden_state = out.last_hidden_state[:, :n]
        return out

    handles = []
    try:
        handles.append(vis.model.register_forward_pre_hook(size_hook, with_kwargs=True))
        handles.append(emb.register_forward_hook(append))
        for b in sorted({b for b, _ in config.neurons}):
            handles.append(vis.mlp_out(b).register_forward_pre_hook(neuron_hook(b)))
        if vis is not adapter:  # inside LLaVA: the projector never sees the added token
            handles.append(vis.model.register_forward_hook(drop, with_kwargs=True))
        yield state
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def register_effect(adapter, images: list[Any], config: TestTimeRegister) -> pd.DataFrame:
    """Per layer: the largest patch norm over the image's median patch norm, before and after the
    test-time register, and the added token's norm (means over ``images``).

    Columns ``layer, max_patch_ratio_before, max_patch_ratio_after, max_patch_norm_before,
    max_patch_norm_after, median_patch_norm_after, register_norm``.
    """
    vis = _vision(adapter)
    inputs = vis.prepare(images)
    lay = inputs.layouts[0]
    kw = vis.forward_kwargs(inputs)
    before = vis.model(**kw, output_hidden_states=True).hidden_states
    with tt_register(vis, config):
        after = vis.model(**kw, output_hidden_states=True).hidden_states
    rows = []
    for layer, (hb, ha) in enumerate(zip(before, after)):
        nb = hb.float().norm(dim=-1)[:, lay.n_prefix : lay.n_tokens]
        na = ha.float().norm(dim=-1)
        pa = na[:, lay.n_prefix : lay.n_tokens]
        rows.append({
            "layer": layer,
            "max_patch_ratio_before": float((nb.amax(1) / nb.median(1).values).mean()),
            "max_patch_ratio_after": float((pa.amax(1) / pa.median(1).values).mean()),
            "max_patch_norm_before": float(nb.amax(1).mean()),
            "max_patch_norm_after": float(pa.amax(1).mean()),
            "median_patch_norm_after": float(pa.median(1).values.mean()),
            "register_norm": float(na[:, -1].mean()) if ha.shape[1] > lay.n_tokens else float("nan"),
        })  # fmt: skip
    return pd.DataFrame(rows)
