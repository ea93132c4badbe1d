"""`sinkscope flow`: run the information-pathway analyses and write tidy tables + `flow.html`.

Analyses (``--analysis``):

- ``rollout`` (any ViT, or a VLM's tower): attention rollout from CLS, from every ViT sink and from one non-sink patch (control),
  over the patch grid -> ``rollout.csv`` (``image, start, start_kind, token, row, col, value``);
  relevance maps of CLS, the sinks and a non-sink at the last block -> ``relevance.csv``
  (``image, layer, token, kind, head, row, col, value``); attention received per token group in
  every block -> ``vit_attention_by_group.csv`` (``image, layer, group, n_tokens,
  mean_attention, uniform``)
- ``propagation`` (VLM): ``visual_tokens.parquet`` (one row per visual token fed to the LLM),
  ``attention_by_bin.csv`` (Fig. 3A), ``attention_by_group.csv``
- ``knockout`` (VLM): ``knockout.csv`` (``source, target, window_start, window_end, p_answer,
  p_base, delta, relative_change``)
- ``decode`` (VLM): ``decode.csv`` (isolated visual tokens through the LM head:
  ``image, image_name, vit_token, is_vit_sink, position, rank, token_id, token, prob``)
- ``attribution`` (VLM): ``attribution.csv`` (captum, per visual token)

>>> run_flow("tiny-llava+sinks", prompt="What is this?", out="runs/flow")   # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .._utils import SinkscopeError, package_versions
from ..data import ImageItem, image_items, sample_images
from ..models import load_model
from ..models.base import Adapter
from ..models.llava import LlavaAdapter
from ..sinks import DimsRule, NormRule, rule_to_dict

log = logging.getLogger("sinkscope")

ANALYSES = ("rollout", "propagation", "knockout", "decode", "attribution")


def _items(images) -> list[ImageItem]:
    if images is None:
        return sample_images(1)
    if all(isinstance(x, ImageItem) for x in images):
        return list(images)
    return image_items(images)


def run_flow(
    model: str | Adapter,
    images=None,
    prompt: str = "What is the main object in the image?",
    analyses: tuple[str, ...] | list[str] = ANALYSES,
    out: str | Path | None = None,
    vit_threshold: float | None = None,
    vit_relative: float | None = 5.0,
    llm_tau: float = 20.0,
    generate: int = 0,
    window: int = 9,
    stride: int = 1,
    bin_width: float = 5.0,
    decode_nonsinks: int = 4,
    top_k: int = 5,
    attribution_steps: int = 16,
    device: str | None = None,
    dtype: str | None = None,
    seed: int = 0,
    progress: bool = True,
    chat: bool = False,
) -> dict[str, Any]:
    """Run the chosen analyses on one prompt with its images; return (and write) the tables.

    ``progress`` shows a bar with one step per analysis (and per knockout pair). ``chat`` wraps
    the prompt in the tokenizer's chat template (text first, as the model was trained).
    """
    t0 = time.perf_counter()
    bad = [a for a in analyses if a not in ANALYSES]
    if bad:
        raise SinkscopeError(f"unknown analysis {bad[0]!r}; choose from {', '.join(ANALYSES)} or all")
    ad = model if isinstance(model, Adapter) else load_model(model, device=device, dtype=dtype)
    is_vlm = isinstance(ad, LlavaAdapter)
    vlm_only = [a for a in analyses if a != "rollout"]
    if vlm_only and not is_vlm:
        if len(analyses) == len(ANALYSES):
            analyses = ["rollout"]
        else:
            raise SinkscopeError(
                f"analyses {vlm_only} need a LLaVA-style model; {ad.name!r} is {ad.family!r}"
            )
    items = _items(images)
    arrays = [it.load() for it in items]
    vit_rule = (
        NormRule(threshold=vit_threshold) if vit_threshold is not None else NormRule(relative=vit_relative)
    )
    tables: dict[str, pd.DataFrame] = {}
    summary: dict[str, Any] = {
        "model": ad.describe(),
        "images": [it.name for it in items],
        "prompt": prompt if is_vlm else None,
        "chat_template": bool(chat) if is_vlm else None,
        "analyses": list(analyses),
        "vit_rule": rule_to_dict(vit_rule),
    }
    if is_vlm and ad.planted is None and getattr(ad, "projector_trained", True) is False:
        summary["warning"] = "the projector is untrained: the model's answers carry no meaning"
    timings: dict[str, float] = {}
    n_steps = len(analyses) + (4 if "knockout" in analyses else 0)  # knockout: 5 source -> target pairs
    bar = _steps(n_steps, progress and is_vlm or (progress and len(arrays) > 4))
    if "rollout" in analyses:
        bar.set_postfix_str("rollout")
        t = time.perf_counter()
        tables.update(_rollout_table(getattr(ad, "vision", ad), arrays, [it.name for it in items], vit_rule))
        timings["rollout_s"] = time.perf_counter() - t
        bar.update(1)
    prop = None
    if is_vlm and {"propagation", "knockout", "decode", "attribution"} & set(analyses):
        from .propagation import propagation

        t = time.perf_counter()
        bar.set_postfix_str("propagation")
        prop = propagation(
            ad,
            arrays,
            prompt,
            vit_rule=vit_rule,
            llm_rule=DimsRule(tau=llm_tau, min_layer=2),
            generate=generate,
            bin_width=bin_width,
            chat=chat,
        )
        timings["propagation_s"] = time.perf_counter() - t
        vt = prop.visual_tokens.copy()
        vt.insert(0, "image_name", [items[i].name for i in vt.image])
        if "propagation" in analyses:
            tables["visual_tokens"] = vt
            tables["attention_by_bin"] = prop.by_bin
            tables["attention_by_group"] = prop.by_group
            summary["propagation"] = prop.summary
            bar.update(1)
    if is_vlm and ({"knockout", "decode", "attribution"} & set(analyses)):
        inp = ad.build_inputs(arrays, prompt, chat=chat)
        kw = {k: inp[k].to(ad.device) for k in ("input_ids", "attention_mask")}
        kw["pixel_values"] = inp["pixel_values"].to(ad.device, ad.dtype)
        run = lambda: ad.model(**kw)  # noqa: E731
        ids = inp["input_ids"][0]
        seq = len(ids)
        img_pos = vt.llm_position.tolist()
        sinks = vt[vt.is_vit_sink].llm_position.tolist()
        nonsinks = vt[~vt.is_vit_sink].llm_position.tolist()
        question = [p for p in range(max(img_pos) + 1, seq)]
        last = [seq - 1]
        if "knockout" in analyses:
            from .knockout import knockout

            t = time.perf_counter()
            groups = {"image": img_pos, "vit_sinks": sinks, "nonsinks": nonsinks, "question": question}
            pairs = [
                ("image", "question"),
                ("image", "last"),
                ("vit_sinks", "last"),
                ("nonsinks", "last"),
                ("question", "last"),
            ]
            frames = []
            skipped = []
            for src, tgt in pairs:
                target = last if tgt == "last" else groups[tgt]
                if not groups[src] or (src == "nonsinks" and not sinks):
                    # nothing to block (no ViT sink), or the same tokens as "image": not rerun
                    skipped.append(f"{src} -> {tgt}")
                    bar.update(1)
                    continue
                bar.set_postfix_str(f"knockout {src} -> {tgt}")
                k = knockout(run, ad.llm, groups[src], target, window=window, stride=stride)
                bar.update(1)
                k.insert(0, "target", tgt)
                k.insert(0, "source", src)
                k["n_source"] = len(groups[src])
                frames.append(k)
            tables["knockout"] = pd.concat(frames, ignore_index=True)
            if skipped:
                summary["knockout_skipped"] = {
                    "pairs": skipped,
                    "reason": "no ViT sink among the visual tokens: the sink group is empty and the "
                    "non-sink group equals the image group",
                }
            timings["knockout_s"] = time.perf_counter() - t
        if "decode" in analyses:
            bar.set_postfix_str("decode")
            from .knockout import decode_isolated

            t = time.perf_counter()
            rng = np.random.default_rng(seed)
            pick_ns = (
                list(rng.choice(nonsinks, size=min(decode_nonsinks, len(nonsinks)), replace=False))
                if nonsinks
                else []
            )
            chosen = sorted(set(sinks) | {int(p) for p in pick_ns})
            d = decode_isolated(run, ad.llm, chosen, seq, ad.tokenizer, top_k=top_k)
            meta = vt.set_index("llm_position")[["image", "image_name", "vit_token", "is_vit_sink"]]
            d = d.join(meta, on="position")
            tables["decode"] = d[
                [
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
            ]
            timings["decode_s"] = time.perf_counter() - t
            bar.update(1)
        if "attribution" in analyses:
            bar.set_postfix_str("attribution")
            from .attribution import attribute_visual_tokens

            t = time.perf_counter()
            a = attribute_visual_tokens(ad, inp, n_steps=attribution_steps)
            a = pd.concat(
                [
                    vt[["image", "vit_token", "row", "col", "is_vit_sink", "llm_position"]].reset_index(
                        drop=True
                    ),
                    a.reset_index(drop=True),
                ],
                axis=1,
            )
            tables["attribution"] = a
            summary["attribution_by_group"] = (
                a.groupby("is_vit_sink")
                .abs_attribution.mean()
                .rename(lambda s: "vit_sink" if s else "nonsink")
                .to_dict()
            )
            timings["attribution_s"] = time.perf_counter() - t
            bar.update(1)
    bar.close()
    summary["timings"] = {k: round(v, 3) for k, v in {**timings, "total_s": time.perf_counter() - t0}.items()}
    summary["versions"] = package_versions(("sinkscope", "torch", "transformers", "captum"))
    if out is not None:
        write_flow_outputs(Path(out), tables, summary)
    return {"tables": tables, "summary": summary}


class _NoSteps:
    def update(self, n: int) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass


def _steps(total: int, enabled: bool):
    """A progress bar over the analysis steps (a no-op when disabled)."""
    if not enabled:
        return _NoSteps()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="flow", unit="step")


def _rollout_table(vis, arrays, names, vit_rule: NormRule) -> dict[str, pd.DataFrame]:
    """Inside the ViT: rollout from CLS and from every sink (at the last layer) on the patch grid,
    relevance maps (attention column per head at the last block) of CLS, the sinks and one
    non-sink patch, and the attention received by token group in every block."""
    from ..capture import Capture
    from .rollout import attention_by_group, relevance_map, rollout

    batch = vis.prepare(arrays, names)
    lay = batch.layouts[0]
    L = vis.n_layers
    with Capture(vis, layers="all", keep_attention="all", stop_early=False) as cap:
        bc = cap.run(batch)
    attn = bc.attn_maps  # block -> [batch, heads, q, k]
    roll, rel, grp = [], [], []
    for i, name in enumerate(names):
        R = np.asarray(rollout([attn[b][i] for b in range(L)]))
        sinks_at = {}
        for b in range(L + 1):
            pn = bc.norms[i, b, lay.n_prefix : lay.n_tokens].numpy()
            thr = (
                vit_rule.threshold
                if vit_rule.mode == "absolute"
                else vit_rule.relative * float(np.median(pn))
            )
            sinks_at[b] = [lay.n_prefix + int(j) for j in np.nonzero(pn >= thr)[0]]
        last_sinks = sinks_at[L]
        patches = list(range(lay.n_prefix, lay.n_tokens))
        non = [t for t in patches if t not in last_sinks]
        starts = ([(0, "cls")] if lay.n_cls else []) + [(t, "sink") for t in last_sinks]
        # one non-sink patch (the middle one of the non-sinks) as the control start token
        starts += [(non[len(non) // 2], "nonsink")] if non else []
        for start, kind in starts:
            for t in patches:
                r, c = lay.row_col(t)
                roll.append(
                    {
                        "image": name,
                        "start": start,
                        "start_kind": kind,
                        "token": t,
                        "row": r,
                        "col": c,
                        "value": float(R[start, t]),
                    }
                )
        probe_tokens = starts
        maps_attn = attn[L - 1][i]
        for tok, kind in probe_tokens:
            m = np.asarray(relevance_map(maps_attn, lay, tok, direction="column"))  # [heads, rows, cols]
            for h in range(m.shape[0]):
                for r in range(m.shape[1]):
                    for c in range(m.shape[2]):
                        rel.append(
                            {
                                "image": name,
                                "layer": L - 1,
                                "token": tok,
                                "kind": kind,
                                "head": h,
                                "row": r,
                                "col": c,
                                "value": float(m[h, r, c]),
                            }
                        )
        for b in range(L):
            sinks = sinks_at[b]
            groups = {
                "cls": list(range(lay.n_cls)),
                "registers": list(range(lay.n_cls, lay.n_prefix)),
                "sinks": sinks,
                "non-sinks": [t for t in patches if t not in sinks],
            }
            for g, v in attention_by_group(attn[b][i], groups).items():
                grp.append(
                    {
                        "image": name,
                        "layer": b,
                        "group": g,
                        "n_tokens": len(groups[g]),
                        "mean_attention": v,
                        "uniform": 1.0 / lay.n_tokens,
                    }
                )
    return {
        "rollout": pd.DataFrame(roll),
        "relevance": pd.DataFrame(rel),
        "vit_attention_by_group": pd.DataFrame(grp),
    }


def write_flow_outputs(out: Path, tables: dict[str, pd.DataFrame], summary: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, df in tables.items():
        if name == "visual_tokens":
            df.to_parquet(out / "visual_tokens.parquet", index=False)
        else:
            df.to_csv(out / f"{name}.csv", index=False)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    from ..viz.flow_report import write_flow_report

    write_flow_report(out / "flow.html", tables, summary)
