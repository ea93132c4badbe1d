"""The analysis steps of a flow run (:func:`~sinkscope.flow.run.run_flow`).

Each step runs one analysis on a :class:`FlowState` (the model, the images, the run's settings)
and fills its ``tables``, ``summary`` and ``timings``, moving the progress bar by its share. The
science lives in the analysis modules (:mod:`~sinkscope.flow.rollout_tables`,
:mod:`~sinkscope.flow.redundancy`, :mod:`~sinkscope.flow.propagation`,
:mod:`~sinkscope.flow.knockout`, :mod:`~sinkscope.flow.attribution`,
:mod:`~sinkscope.flow.relevancy`); a step only calls it and shapes what it returns.

>>> from sinkscope.data import sample_images
>>> from sinkscope.models import load_model
>>> from sinkscope.interventions import rule_from
>>> ad, items = load_model("tiny-dinov2+sinks"), sample_images(1)
>>> st = FlowState(ad, items, [it.load() for it in items], ["redundancy"], rule_from("norm:x5"),
...                vit_layer=ad.n_layers)
>>> redundancy_step(st)
>>> list(st.tables), list(st.timings)
(['redundancy'], ['redundancy_s'])

Under several processes (``st.dist``, :mod:`sinkscope.distributed`) :func:`vit_shard_steps`
runs the ViT analyses on this process' batches of :data:`VIT_BATCH` images, :func:`knockout_step`
on its sets of pairs sharing a first target and :func:`decode_step` on its isolated positions;
each puts what it computed in ``st.part`` (and ``st.part_info``) and, on the main process,
registers in ``st.merges`` how to merge every process' parts into the tables and summary of one
process (run by :func:`~sinkscope.flow.run.run_flow` once every process is done).
:func:`propagation_step` keeps its tables on the main process only, and the main process alone
runs :func:`attribution_step` and :func:`relevancy_step`: they analyse the one prompt that holds
every image, which has no per-image shard.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd

from ..data import ImageItem
from ..interventions.rules import VisualSinkRule
from ..models.base import Adapter
from ..sinks import DimsRule
from .rollout_tables import vit_flow_tables

#: The knockout's ``(source, target)`` token groups: each source's attention to its target is blocked.
KNOCKOUT_PAIRS = (
    ("image", "question"),
    ("image", "last"),
    ("vit_sinks", "last"),
    ("nonsinks", "last"),
    ("question", "last"),
)
#: The ViT analyses run in batches of this many images; under several processes batch ``b`` goes
#: to process ``b % N``, so each process runs batches a single process runs too.
VIT_BATCH = 8
#: The per-image tables of the ViT analyses.
VIT_TABLES = ("rollout", "relevance", "vit_attention_by_group", "redundancy")
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
    steps fill. ``vit_rule``: the run's ViT sink rule (resolved: every analysis uses it);
    ``vit_layer``: the ViT layer the ViT analyses stop at."""

    ad: Adapter
    items: list[ImageItem]
    arrays: list[Any]
    analyses: list[str]
    vit_rule: VisualSinkRule
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
    #: under several processes: this process' context (:class:`~sinkscope.distributed.DistContext`),
    #: what it computed of the sharded analyses (``part``: name -> table; ``part_info``: JSON-able)
    #: and, on the main process, how to merge every process' parts (each called with the list of
    #: ``(part, part_info)`` of processes ``0..N-1``)
    dist: Any = None
    part: dict[str, pd.DataFrame] = field(default_factory=dict)
    part_info: dict[str, Any] = field(default_factory=dict)
    merges: list[Callable[[list[tuple[dict, dict]]], None]] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [it.name for it in self.items]

    @property
    def is_main(self) -> bool:
        """Alone, or the main process of several."""
        return self.dist is None or self.dist.is_main

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
    """``rollout``, ``relevance`` and ``vit_attention_by_group`` (:func:`vit_flow_tables`), in
    batches of :data:`VIT_BATCH` images (each keeps the attention maps of every block)."""
    st.bar.set_postfix_str("rollout")
    with st.timed("rollout_s"):
        vis = getattr(st.ad, "vision", st.ad)
        tabs = [
            vit_flow_tables(
                vis, st.arrays[s : s + VIT_BATCH], st.names[s : s + VIT_BATCH], st.vit_rule, st.vit_layer
            )
            for s in range(0, len(st.arrays), VIT_BATCH)
        ]
        st.tables.update({k: pd.concat([t[k] for t in tabs], ignore_index=True) for k in tabs[0]})
    st.bar.update(1)


def redundancy_step(st: FlowState) -> None:
    """``redundancy`` (:func:`~sinkscope.flow.redundancy.redundancy`) and its summary."""
    from .redundancy import redundancy

    st.bar.set_postfix_str("redundancy")
    with st.timed("redundancy_s"):
        red = redundancy(
            st.ad,
            st.arrays,
            names=st.names,
            detection_layer=st.vit_layer,
            rule=st.vit_rule,
            batch_size=VIT_BATCH,
        )
        st.tables["redundancy"] = red.table
        st.summary["redundancy"] = red.summary
    st.bar.update(1)


def vit_shard_steps(st: FlowState) -> None:
    """Under several processes: the chosen ViT analyses (``rollout``, ``redundancy``) on this
    process' batches of :data:`VIT_BATCH` images, into ``st.part``; the main process merges every
    process' rows back in the image order (whole batches, so the rows and their order are one
    process') and recomputes the redundancy summary from the merged table."""
    chosen = [a for a in ("rollout", "redundancy") if a in st.analyses]
    idx = st.dist.shard_batches(len(st.items), VIT_BATCH)
    if chosen:
        st.part_info.setdefault("share", {})["images"] = len(idx)
    if chosen and idx:
        sub = replace(
            st,
            items=[st.items[i] for i in idx],
            arrays=[st.arrays[i] for i in idx],
            tables={},
            summary={},
            timings={},
            dist=None,
            part={},
            part_info={},
            merges=[],
        )
        if "rollout" in chosen:
            rollout_step(sub)
        if "redundancy" in chosen:
            redundancy_step(sub)
            st.part_info["redundancy"] = sub.summary["redundancy"]
        st.part.update(sub.tables)
        st.timings.update(sub.timings)
    elif chosen:
        st.bar.update(len(chosen))
    if chosen and st.is_main:
        st.merges.append(lambda parts: _merge_vit(st, parts))


def _merge_vit(st: FlowState, parts: list[tuple[dict, dict]]) -> None:
    batch_of = {n: i // VIT_BATCH for i, n in enumerate(st.names)}
    for name in VIT_TABLES:
        frames = [p[name] for p, _ in parts if name in p]
        if frames:  # rows of one batch come from one process, in its order: a stable sort by batch
            df = pd.concat(frames, ignore_index=True)
            df = df.sort_values("image", key=lambda s: s.map(batch_of), kind="stable")
            st.tables[name] = df.reset_index(drop=True)
    if "redundancy" in st.tables:
        given = next(info["redundancy"] for _, info in parts if "redundancy" in info)
        st.summary["redundancy"] = _redundancy_summary(st.tables["redundancy"], given, len(st.items))


def _redundancy_summary(table: pd.DataFrame, given: dict[str, Any], n_images: int) -> dict[str, Any]:
    """The summary :func:`~sinkscope.flow.redundancy.redundancy` writes, from the merged table
    (``given``: one process' summary, for the settings)."""
    from .redundancy import redundancy_summary

    by_group = redundancy_summary(table)
    det = given["detection_layer"]

    def mean(role: str, group: str) -> float | None:
        v = by_group[(by_group.layer_role == role) & (by_group.group == group)].mean_cos
        return float(v.iloc[0]) if len(v) and np.isfinite(v.iloc[0]) else None

    return {
        **given,
        "n_images": n_images,
        "n_patches": int((table.layer == det).sum()),
        "n_sinks": int(table[table.layer == det].is_sink.sum()),
        "mean_cos": {
            f"{role}_{g.replace('-', '')}": mean(role, g)
            for role in ("input", "detection")
            for g in ("sink", "non-sink")
        },
    }


# ------------------------------------------------------------------------------- VLM analyses


def propagation_step(st: FlowState) -> pd.DataFrame:
    """Run :func:`~sinkscope.flow.propagation.propagation` and return its visual tokens (with
    ``image_name``), which the later VLM steps need; its tables and summary are kept only when
    ``propagation`` is among the analyses (under several processes, on the main process only:
    the others run it for the token groups of their knockout and decode shares)."""
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
    if "propagation" in st.analyses and st.is_main:
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
    """``knockout``: every runnable pair of :data:`KNOCKOUT_PAIRS`, one window per LLM layer.

    Under several processes the unit is a set of pairs sharing a first target (the fast route
    reruns those packed together, :func:`~sinkscope.flow.knockout.knockout_pairs`): set ``u`` goes
    to process ``u % N``, so each pair's rows are the ones one process computes; every process runs
    the unblocked pass itself."""
    from .knockout import knockout_pairs

    with st.timed("knockout_s"):
        groups = vp.groups
        run_pairs, skipped = _runnable_pairs(groups)
        mine = list(range(len(run_pairs)))
        if st.dist is not None:
            units = _knockout_units(run_pairs, groups)
            mine = sorted(
                j for u, unit in enumerate(units) if u % st.dist.num_processes == st.dist.rank for j in unit
            )
        st.bar.set_postfix_str(f"knockout ({len(mine)} pairs)")
        ko = []
        if mine or st.dist is None:
            ko = knockout_pairs(
                vp.run,
                st.ad.llm,
                [(groups[run_pairs[j][0]], groups[run_pairs[j][1]]) for j in mine],
                window=st.window,
                stride=st.stride,
                head=st.ad.model.get_output_embeddings(),
            )
        st.bar.update(len(KNOCKOUT_PAIRS))
    if st.dist is None:
        _knockout_outputs(st, run_pairs, skipped, ko, groups)
        return
    st.part_info.setdefault("share", {})["knockout_pairs"] = len(mine)
    for j, k in zip(mine, ko):
        st.part[f"knockout.{j}"] = k
    st.part_info["knockout_route"] = {str(j): k.attrs.get("route") for j, k in zip(mine, ko)}
    if st.is_main:
        st.merges.append(
            lambda parts: _knockout_outputs(
                st, run_pairs, skipped, _gather_knockout(parts, len(run_pairs)), groups
            )
        )


def _knockout_units(run_pairs: list[tuple[str, str]], groups: dict[str, list[int]]) -> list[list[int]]:
    """The indices of ``run_pairs`` grouped by their first target position, in order.

    >>> _knockout_units([("image", "question"), ("image", "last"), ("question", "last")],
    ...                 {"image": [1], "question": [5, 6], "last": [7]})
    [[0], [1, 2]]
    """
    units: dict[int, list[int]] = {}
    for j, (_, tgt) in enumerate(run_pairs):
        units.setdefault(min(groups[tgt]), []).append(j)
    return list(units.values())


def _gather_knockout(parts: list[tuple[dict, dict]], n_pairs: int) -> list[pd.DataFrame]:
    """Every pair's knockout table from the process that ran it, with its route."""
    ko = []
    for j in range(n_pairs):
        part, info = next((p, i) for p, i in parts if f"knockout.{j}" in p)
        k = part[f"knockout.{j}"]
        k.attrs["route"] = info["knockout_route"][str(j)]
        ko.append(k)
    return ko


def _knockout_outputs(st: FlowState, run_pairs, skipped, ko: list[pd.DataFrame], groups) -> None:
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
    through the LM head (:func:`~sinkscope.flow.knockout.decode_isolated`). Under several
    processes each isolated position is one forward pass: position ``k`` (of the sorted chosen
    ones) goes to process ``k % N`` and the main process merges the rows in position order."""
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
        mine = chosen if st.dist is None else chosen[st.dist.rank :: st.dist.num_processes]
        if mine or st.dist is None:
            d = decode_isolated(vp.run, st.ad.llm, mine, vp.seq, st.ad.tokenizer, top_k=st.top_k)
    if st.dist is None:
        st.tables["decode"] = _decode_table(d, vt)
    else:
        st.part_info.setdefault("share", {})["decode_positions"] = len(mine)
        if mine:
            st.part["decode"] = d
        if st.is_main:
            st.merges.append(lambda parts: _merge_decode(st, parts, vt))
    st.bar.update(1)


def _decode_table(d: pd.DataFrame, vt: pd.DataFrame) -> pd.DataFrame:
    meta = vt.set_index("llm_position")[["image", "image_name", "vit_token", "is_vit_sink"]]
    return d.join(meta, on="position")[DECODE_COLUMNS]


def _merge_decode(st: FlowState, parts: list[tuple[dict, dict]], vt: pd.DataFrame) -> None:
    frames = [p["decode"] for p, _ in parts if "decode" in p]
    d = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if len(d):  # one process' rows per position, ranks in order: a stable sort by position
        d = d.sort_values("position", kind="stable").reset_index(drop=True)
    st.tables["decode"] = _decode_table(d, vt)


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
    "VIT_BATCH",
    "VIT_TABLES",
    "VlmPass",
    "attribution_step",
    "decode_step",
    "knockout_step",
    "propagation_step",
    "redundancy_step",
    "relevancy_step",
    "rollout_step",
    "vit_shard_steps",
    "vlm_pass",
]
