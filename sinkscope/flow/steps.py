"""The analysis steps of a flow run (:func:`~sinkscope.flow.run.run_flow`).

Each step runs one analysis on a :class:`FlowState` (the model, the images, the run's settings)
and fills its ``tables``, ``summary`` and ``timings``, moving the progress bar by its share. The
science lives in the analysis modules (:mod:`~sinkscope.flow.rollout_tables`,
:mod:`~sinkscope.flow.redundancy`, :mod:`~sinkscope.flow.propagation`,
:mod:`~sinkscope.flow.knockout`, :mod:`~sinkscope.flow.attribution`,
:mod:`~sinkscope.flow.relevancy`); a step only calls it and shapes what it returns.

>>> from sinkscope.data import sample_images
>>> from sinkscope.models import load_model
>>> from sinkscope.sinks import NormRule
>>> ad, items = load_model("tiny-dinov2+sinks"), sample_images(1)
>>> st = FlowState(ad, items, [it.load() for it in items], ["redundancy"], NormRule(relative=5.0),
...                vit_layer=ad.n_layers)
>>> redundancy_step(st)
>>> list(st.tables), list(st.timings)
(['redundancy'], ['redundancy_s'])
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ..data import ImageItem
from ..models.base import Adapter
from ..sinks import DimsRule, NormRule
from .rollout_tables import vit_flow_tables

#: The knockout's ``(source, target)`` token groups: each source's attention to its target is blocked.
KNOCKOUT_PAIRS = (
    ("image", "question"),
    ("image", "last"),
    ("vit_sinks", "last"),
    ("nonsinks", "last"),
    ("question", "last"),
)
#: The columns of ``decode.csv``.
DECODE_COLUMNS = [
    "image",
    "image_name",
    "vit_token",
    "is_vit_sink",
    "position",
    "rank",
    "token_id",
    "token",
    "prob",
]


class NoSteps:
    """A progress bar that shows nothing."""

    def update(self, n: int) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class FlowState:
    """One flow run: its model, images and settings (the arguments of
    :func:`~sinkscope.flow.run.run_flow`), and the ``tables``, ``summary`` and ``timings`` its
    steps fill. ``vit_layer``: the ViT layer the ViT analyses stop at."""

    ad: Adapter
    items: list[ImageItem]
    arrays: list[Any]
    analyses: list[str]
    vit_rule: NormRule
    vit_layer: int
    prompt: str = "What is the main object in the image?"
    chat: bool = False
    llm_tau: float = 20.0
    generate: int = 0
    window: int = 9
    stride: int = 1
    bin_width: float = 5.0
    decode_nonsinks: int = 4
    top_k: int = 5
    attribution_steps: int = 64
    seed: int = 0
    sink_dims_from: str = "text"
    bar: Any = field(default_factory=NoSteps)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [it.name for it in self.items]

    @contextmanager
    def timed(self, key: str) -> Iterator[None]:
        """Record the seconds the block takes under ``timings[key]`` (not when it raises)."""
        t = time.perf_counter()
        yield
        self.timings[key] = time.perf_counter() - t


@dataclass
class VlmPass:
    """The prompt's model inputs, a closure running the model on them, the sequence length and
    the token groups (LLM positions): ``image``, ``vit_sinks``, ``nonsinks``, ``question`` (the
    text after the last image, without the last position) and ``last``."""

    inputs: Any
    run: Callable[[], Any]
    seq: int
    groups: dict[str, list[int]]


# ------------------------------------------------------------------------------- ViT analyses


def rollout_step(st: FlowState) -> None:
    """``rollout``, ``relevance`` and ``vit_attention_by_group`` (:func:`vit_flow_tables`)."""
    st.bar.set_postfix_str("rollout")
    with st.timed("rollout_s"):
        vis = getattr(st.ad, "vision", st.ad)
        st.tables.update(vit_flow_tables(vis, st.arrays, st.names, st.vit_rule, st.vit_layer))
    st.bar.update(1)


def redundancy_step(st: FlowState) -> None:
    """``redundancy`` (:func:`~sinkscope.flow.redundancy.redundancy`) and its summary."""
    from .redundancy import redundancy

    st.bar.set_postfix_str("redundancy")
    with st.timed("redundancy_s"):
        red = redundancy(st.ad, st.arrays, names=st.names, detection_layer=st.vit_layer, rule=st.vit_rule)
        st.tables["redundancy"] = red.table
        st.summary["redundancy"] = red.summary
    st.bar.update(1)


# ------------------------------------------------------------------------------- VLM analyses


def propagation_step(st: FlowState) -> pd.DataFrame:
    """Run :func:`~sinkscope.flow.propagation.propagation` and return its visual tokens (with
    ``image_name``), which the later VLM steps need; its tables and summary are kept only when
    ``propagation`` is among the analyses."""
    from .propagation import propagation

    with st.timed("propagation_s"):
        st.bar.set_postfix_str("propagation")
        prop = propagation(
            st.ad,
            st.arrays,
            st.prompt,
            vit_rule=st.vit_rule,
            llm_rule=DimsRule(tau=st.llm_tau, min_layer=2),
            generate=st.generate,
            bin_width=st.bin_width,
            chat=st.chat,
            sink_dims_from=st.sink_dims_from,
        )
    vt = prop.visual_tokens.copy()
    vt.insert(0, "image_name", [st.items[i].name for i in vt.image])
    if "propagation" in st.analyses:
        st.tables["visual_tokens"] = vt
        st.tables["attention_by_bin"] = prop.by_bin
        st.tables["attention_by_group"] = prop.by_group
        st.summary["propagation"] = prop.summary
        st.bar.update(1)
    return vt


def vlm_pass(st: FlowState, vt: pd.DataFrame) -> VlmPass:
    """The model inputs of the prompt, and its token groups from the visual tokens ``vt``."""
    ad = st.ad
    inp = ad.build_inputs(st.arrays, st.prompt, chat=st.chat)
    kw = {k: inp[k].to(ad.device) for k in ("input_ids", "attention_mask")}
    kw["pixel_values"] = inp["pixel_values"].to(ad.device, ad.dtype)
    seq = len(inp["input_ids"][0])
    img_pos = vt.llm_position.tolist()
    groups = {
        "image": img_pos,
        "vit_sinks": vt[vt.is_vit_sink].llm_position.tolist(),
        "nonsinks": vt[~vt.is_vit_sink].llm_position.tolist(),
        # the text after the last image, without the last position (its own group): disjoint groups
        "question": list(range(max(img_pos) + 1, seq - 1)),
        "last": [seq - 1],
    }
    return VlmPass(inp, lambda: ad.model(**kw), seq, groups)


def knockout_step(st: FlowState, vp: VlmPass) -> None:
    """``knockout``: every runnable pair of :data:`KNOCKOUT_PAIRS`, one window per LLM layer."""
    from .knockout import knockout_pairs

    with st.timed("knockout_s"):
        groups = vp.groups
        run_pairs, skipped = _runnable_pairs(groups)
        st.bar.set_postfix_str(f"knockout ({len(run_pairs)} pairs)")
        ko = knockout_pairs(
            vp.run,
            st.ad.llm,
            [(groups[s], groups[g]) for s, g in run_pairs],
            window=st.window,
            stride=st.stride,
            head=st.ad.model.get_output_embeddings(),
        )
        st.bar.update(len(KNOCKOUT_PAIRS))
        st.tables["knockout"] = _knockout_table(run_pairs, ko, groups)
        st.summary["knockout"] = _knockout_summary(st.window, st.stride, groups, ko)
        if skipped:
            st.summary["knockout_skipped"] = {
                "pairs": skipped,
                "reason": "an empty group (no ViT sink among the visual tokens, or no question text "
                "before the last position), or a non-sink group equal to the image group",
            }


def _runnable_pairs(groups: dict[str, list[int]]) -> tuple[list[tuple[str, str]], list[str]]:
    """The pairs of :data:`KNOCKOUT_PAIRS` to run, and the skipped ones as ``"source -> target"``."""
    run_pairs, skipped = [], []
    for src, tgt in KNOCKOUT_PAIRS:
        if not groups[src] or not groups[tgt] or (src == "nonsinks" and not groups["vit_sinks"]):
            # nothing to block (no ViT sink, no question text), or the same tokens as "image": not rerun
            skipped.append(f"{src} -> {tgt}")
        else:
            run_pairs.append((src, tgt))
    return run_pairs, skipped


def _knockout_table(run_pairs, ko: list[pd.DataFrame], groups: dict[str, list[int]]) -> pd.DataFrame:
    from .knockout import KNOCKOUT_COLUMNS

    frames = []
    for (src, tgt), k in zip(run_pairs, ko):
        k.insert(0, "target", tgt)
        k.insert(0, "source", src)
        k["n_source"] = len(groups[src])
        k["n_target"] = len(groups[tgt])
        frames.append(k)
    if not frames:
        return pd.DataFrame(columns=["source", "target", *KNOCKOUT_COLUMNS, "n_source", "n_target"])
    return pd.concat(frames, ignore_index=True)


def _knockout_summary(window: int, stride: int, groups: dict[str, list[int]], ko) -> dict[str, Any]:
    return {
        "window": window,
        "stride": stride,
        "windows": f"{window} LLM layers centred on every {'' if stride == 1 else f'{stride}th '}"
        "layer (column layer), clipped at the first and last layer (window_start..window_end, "
        "inclusive), as Zhang et al.",
        "groups": {k: len(v) for k, v in groups.items()},
        "question": "the text after the last image, without the last position (disjoint groups)",
        "route": ko[0].attrs.get("route") if ko else None,
    }


def decode_step(st: FlowState, vp: VlmPass, vt: pd.DataFrame) -> None:
    """``decode``: the ViT sinks and ``decode_nonsinks`` random non-sinks (``seed``), each isolated,
    through the LM head (:func:`~sinkscope.flow.knockout.decode_isolated`)."""
    st.bar.set_postfix_str("decode")
    from .knockout import decode_isolated

    with st.timed("decode_s"):
        sinks, nonsinks = vp.groups["vit_sinks"], vp.groups["nonsinks"]
        rng = np.random.default_rng(st.seed)
        pick_ns = (
            list(rng.choice(nonsinks, size=min(st.decode_nonsinks, len(nonsinks)), replace=False))
            if nonsinks
            else []
        )
        chosen = sorted(set(sinks) | {int(p) for p in pick_ns})
        d = decode_isolated(vp.run, st.ad.llm, chosen, vp.seq, st.ad.tokenizer, top_k=st.top_k)
        meta = vt.set_index("llm_position")[["image", "image_name", "vit_token", "is_vit_sink"]]
        st.tables["decode"] = d.join(meta, on="position")[DECODE_COLUMNS]
    st.bar.update(1)


def attribution_step(st: FlowState, vp: VlmPass, vt: pd.DataFrame) -> None:
    """``attribution`` (captum, per visual token), its mean per group and its convergence."""
    st.bar.set_postfix_str("attribution")
    from .attribution import attribute_visual_tokens

    with st.timed("attribution_s"):
        a = attribute_visual_tokens(st.ad, vp.inputs, n_steps=st.attribution_steps)
        meta = vt[["image", "vit_token", "row", "col", "is_vit_sink", "llm_position"]]
        a = pd.concat([meta.reset_index(drop=True), a.reset_index(drop=True)], axis=1)
        st.tables["attribution"] = a
        st.summary["attribution_by_group"] = (
            a.groupby("is_vit_sink")
            .abs_attribution.mean()
            .rename(lambda s: "vit_sink" if s else "nonsink")
            .to_dict()
        )
        conv = {c: a[c].iloc[0] for c in ("n_steps", "logit_diff", "delta_tolerance", "converged") if c in a}
        st.summary["attribution"] = {
            k: (bool(v) if k == "converged" else float(v) if k != "n_steps" else int(v))
            for k, v in conv.items()
        }
    st.bar.update(1)


def relevancy_step(st: FlowState) -> None:
    """``relevancy`` (:func:`~sinkscope.flow.relevancy.vlm_relevancy`) and its summary."""
    from .relevancy import vlm_relevancy

    st.bar.set_postfix_str("relevancy")
    with st.timed("relevancy_s"):
        rel = vlm_relevancy(st.ad, st.arrays, st.prompt, chat=st.chat, vit_rule=st.vit_rule, names=st.names)
        st.tables["relevancy"] = rel.table
        st.summary["relevancy"] = rel.summary
    st.bar.update(1)


__all__ = [
    "DECODE_COLUMNS",
    "KNOCKOUT_PAIRS",
    "FlowState",
    "NoSteps",
    "VlmPass",
    "attribution_step",
    "decode_step",
    "knockout_step",
    "propagation_step",
    "redundancy_step",
    "relevancy_step",
    "rollout_step",
    "vlm_pass",
]
