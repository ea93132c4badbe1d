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
- ``knockout`` (VLM): ``knockout.csv`` (``source, target, layer, window_start, window_end,
  p_answer, p_base, delta, relative_change``; one window centred on every LLM layer, clipped at
  the edges)
- ``decode`` (VLM): ``decode.csv`` (isolated visual tokens through the LM head:
  ``image, image_name, vit_token, is_vit_sink, position, rank, token_id, token, prob``)
- ``attribution`` (VLM): ``attribution.csv`` (captum, per visual token)
- ``redundancy`` (any ViT, or a VLM's tower): Darcet et al.'s neighbour cosine similarity (4
  grid neighbours) at layer 0 and at the ViT layer the ViT analyses stop at (a VLM's feature layer,
  else the last), sinks vs non-sinks -> ``redundancy.csv``
  (``image, layer, layer_role, token, row, col, norm, neighbour_cos, is_sink``)
- ``relevancy`` (VLM): Chefer-style relevancy of the answer token (grad x attention, clamped,
  accumulated through the LLM then the ViT up to the feature layer) beside rollout ->
  ``relevancy.csv`` (``image, image_name, vit_token, kind, row, col, llm_position, vit_norm,
  is_vit_sink, relevancy_llm, rollout_llm, relevancy, rollout``)

>>> run_flow("tiny-llava+sinks", prompt="What is this?", out="runs/flow")   # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from dataclasses import dataclass, field
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

ANALYSES = ("rollout", "propagation", "knockout", "decode", "attribution", "redundancy", "relevancy")
#: analyses that need only a ViT (any ViT, or a VLM's vision tower)
VIT_ANALYSES = ("rollout", "redundancy")


def _items(images) -> list[ImageItem]:
    if images is None:
        return sample_images(1)
    if all(isinstance(x, ImageItem) for x in images):
        return list(images)
    return image_items(images)



@dataclass
class FlowResult:
    """What a flow run produced: ``tables`` (name -> table), ``summary``, ``config``, ``out``.

    ``res["tables"]`` and ``res["summary"]`` still work, as with the plain dict of earlier versions.

    >>> res = FlowResult({"rollout": pd.DataFrame({"layer": [1]})}, {"model": "m"})
    >>> res["summary"]["model"], list(res.tables)
    ('m', ['rollout'])
    """

    tables: dict[str, pd.DataFrame]
    summary: dict[str, Any]
    config: Any = None
    out: Path | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        if key in ("tables", "summary"):
            return getattr(self, key)
        raise KeyError(key)


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
    attribution_steps: int = 64,
    device: str | None = None,
    dtype: str | None = None,
    seed: int = 0,
    progress: bool = True,
    chat: bool = False,
    sink_dims_from: str = "text",
) -> FlowResult:
    """Run the chosen analyses on one prompt with its images; return (and write) the tables.

    ``progress`` shows a bar with one step per analysis (and per knockout pair). ``chat`` wraps
    the prompt in the tokenizer's chat template (text first, as the model was trained).
    ``sink_dims_from``: where the LLM sink dims are discovered - ``"text"`` (a text-only pass of
    the prompt, as Kang et al. fix them from the LLM's own first-token sink), ``"first_text_token"``
    or ``"multimodal"`` (see :func:`~sinkscope.flow.propagation.propagation`).
    """
    t0 = time.perf_counter()
    bad = [a for a in analyses if a not in ANALYSES]
    if bad:
        raise SinkscopeError(f"unknown analysis {bad[0]!r}; choose from {', '.join(ANALYSES)} or all")
    ad = model if isinstance(model, Adapter) else load_model(model, device=device, dtype=dtype)
    is_vlm = isinstance(ad, LlavaAdapter)
    if ad.family == "causal-lm":
        raise SinkscopeError(
            f"flow needs a vision transformer or a LLaVA-style model; {ad.name!r} is a text-only "
            "language model (use sinkscope scan --text for its sinks)"
        )
    vlm_only = [a for a in analyses if a not in VIT_ANALYSES]
    skipped: list[str] = []
    if vlm_only and not is_vlm:
        if len(analyses) == len(ANALYSES):
            skipped, analyses = vlm_only, [a for a in analyses if a in VIT_ANALYSES]
            log.warning(
                "%s is a vision transformer: running %s; skipped (they need a LLaVA-style model): %s",
                ad.name,
                ", ".join(analyses),
                ", ".join(skipped),
            )
        else:
            raise SinkscopeError(
                f"analyses {vlm_only} need a LLaVA-style model; {ad.name!r} is {ad.family!r}"
            )
    items = _items(images)
    arrays = [it.load() for it in items]
    vit_rule = (
        NormRule(threshold=vit_threshold) if vit_threshold is not None else NormRule(relative=vit_relative)
    )
    vit_layer, vit_layer_info = _vit_layer(ad)
    tables: dict[str, pd.DataFrame] = {}
    summary: dict[str, Any] = {
        "model": ad.describe(),
        "images": [it.name for it in items],
        "prompt": prompt if is_vlm else None,
        "chat_template": bool(chat) if is_vlm else None,
        "analyses": list(analyses),
        "analyses_skipped": {a: "needs a LLaVA-style model" for a in skipped},
        "vit_rule": rule_to_dict(vit_rule),
        "vit_layer": vit_layer_info,
    }
    if is_vlm:
        summary["paper_settings"] = paper_settings(vit_rule, generate, bin_width)
    if is_vlm and ad.planted is None and getattr(ad, "projector_trained", True) is False:
        summary["warning"] = "the projector is untrained: the model's answers carry no meaning"
    timings: dict[str, float] = {}
    n_steps = len(analyses) + (4 if "knockout" in analyses else 0)  # knockout: 5 source -> target pairs
    bar = _steps(n_steps, progress and is_vlm or (progress and len(arrays) > 4))
    if "rollout" in analyses:
        bar.set_postfix_str("rollout")
        t = time.perf_counter()
        tables.update(
            _rollout_table(getattr(ad, "vision", ad), arrays, [it.name for it in items], vit_rule, vit_layer)
        )
        timings["rollout_s"] = time.perf_counter() - t
        bar.update(1)
    if "redundancy" in analyses:
        from .redundancy import redundancy

        bar.set_postfix_str("redundancy")
        t = time.perf_counter()
        names = [it.name for it in items]
        red = redundancy(ad, arrays, names=names, detection_layer=vit_layer, rule=vit_rule)
        tables["redundancy"] = red.table
        summary["redundancy"] = red.summary
        timings["redundancy_s"] = time.perf_counter() - t
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
            sink_dims_from=sink_dims_from,
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
        # the text after the last image, without the last position (its own group): disjoint groups
        question = [p for p in range(max(img_pos) + 1, seq - 1)]
        last = [seq - 1]
        if "knockout" in analyses:
            from .knockout import KNOCKOUT_COLUMNS, knockout_pairs

            t = time.perf_counter()
            groups = {
                "image": img_pos,
                "vit_sinks": sinks,
                "nonsinks": nonsinks,
                "question": question,
                "last": last,
            }
            pairs = [
                ("image", "question"),
                ("image", "last"),
                ("vit_sinks", "last"),
                ("nonsinks", "last"),
                ("question", "last"),
            ]
            run_pairs, skipped = [], []
            for src, tgt in pairs:
                if not groups[src] or not groups[tgt] or (src == "nonsinks" and not sinks):
                    # nothing to block (no ViT sink, no question text), or the same tokens as
                    # "image": not rerun
                    skipped.append(f"{src} -> {tgt}")
                else:
                    run_pairs.append((src, tgt))
            bar.set_postfix_str(f"knockout ({len(run_pairs)} pairs)")
            ko = knockout_pairs(
                run,
                ad.llm,
                [(groups[s], groups[g]) for s, g in run_pairs],
                window=window,
                stride=stride,
                head=ad.model.get_output_embeddings(),
            )
            bar.update(len(pairs))
            frames = []
            for (src, tgt), k in zip(run_pairs, ko):
                k.insert(0, "target", tgt)
                k.insert(0, "source", src)
                k["n_source"] = len(groups[src])
                k["n_target"] = len(groups[tgt])
                frames.append(k)
            tables["knockout"] = (
                pd.concat(frames, ignore_index=True)
                if frames
                else pd.DataFrame(columns=["source", "target", *KNOCKOUT_COLUMNS, "n_source", "n_target"])
            )
            summary["knockout"] = {
                "window": window,
                "stride": stride,
                "windows": f"{window} LLM layers centred on every {'' if stride == 1 else f'{stride}th '}"
                "layer (column layer), clipped at the first and last layer (window_start..window_end, "
                "inclusive), as Zhang et al.",
                "groups": {k: len(v) for k, v in groups.items()},
                "question": "the text after the last image, without the last position (disjoint groups)",
                "route": ko[0].attrs.get("route") if ko else None,
            }
            if skipped:
                summary["knockout_skipped"] = {
                    "pairs": skipped,
                    "reason": "an empty group (no ViT sink among the visual tokens, or no question text "
                    "before the last position), or a non-sink group equal to the image group",
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
            conv = {c: a[c].iloc[0] for c in ("n_steps", "logit_diff", "delta_tolerance", "converged") if c in a}
            summary["attribution"] = {
                k: (bool(v) if k == "converged" else float(v) if k != "n_steps" else int(v)) for k, v in conv.items()
            }
            timings["attribution_s"] = time.perf_counter() - t
            bar.update(1)
    if is_vlm and "relevancy" in analyses:
        from .relevancy import vlm_relevancy

        bar.set_postfix_str("relevancy")
        t = time.perf_counter()
        rel = vlm_relevancy(ad, arrays, prompt, chat=chat, vit_rule=vit_rule, names=[it.name for it in items])
        tables["relevancy"] = rel.table
        summary["relevancy"] = rel.summary
        timings["relevancy_s"] = time.perf_counter() - t
        bar.update(1)
    bar.close()
    summary["timings"] = {k: round(v, 3) for k, v in {**timings, "total_s": time.perf_counter() - t0}.items()}
    summary["versions"] = package_versions(("sinkscope", "torch", "transformers", "captum"))
    if out is not None:
        write_flow_outputs(Path(out), tables, summary)
    return FlowResult(tables, summary, out=Path(out) if out is not None else None, timings=summary["timings"])


#: The paper's Fig. 3A settings (LLaVA-1.5-7B, CLIP-L/14-336): what each flow run is compared with.
PAPER_FIG3A = {
    "queries": "every generated output token (--generate N, N >= 1)",
    "vit_rule": "absolute L2 norm >= 100 at the feature layer (--vit-threshold 100)",
    "bin_width": 5.0,
}


def paper_settings(vit_rule: NormRule, generate: int, bin_width: float) -> dict[str, Any]:
    """How a flow run's settings compare with the paper's Fig. 3A settings (:data:`PAPER_FIG3A`):
    ``{"matches": bool, "differences": [...], "paper": PAPER_FIG3A}``; every summary carries it.

    >>> paper_settings(NormRule(threshold=100.0), generate=8, bin_width=5.0)["matches"]
    True
    >>> paper_settings(NormRule(relative=5.0), generate=0, bin_width=5.0)["differences"][0]
    'queries: the prompt text after the first image (prefill), not generated tokens'
    """
    diff = []
    if generate < 1:
        diff.append("queries: the prompt text after the first image (prefill), not generated tokens")
    if vit_rule.mode != "absolute" or vit_rule.threshold != 100.0:
        diff.append(f"ViT sink rule: {vit_rule.describe()}, not an absolute norm threshold of 100")
    if bin_width != PAPER_FIG3A["bin_width"]:
        diff.append(f"ViT-norm bins of width {bin_width:g}, not 5")
    return {"matches": not diff, "differences": diff, "paper": dict(PAPER_FIG3A)}


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


def _vit_layer(ad: Adapter) -> tuple[int, dict[str, Any]]:
    """The ViT layer the ViT analyses stop at, and how it was chosen: a VLM's feature layer (the
    hidden state its projector reads; LLaVA-1.5: ``vision_feature_layer=-2``), else the last."""
    if isinstance(ad, LlavaAdapter):
        fl = ad.feature_layer
        cfg = ad.model.config.vision_feature_layer
        return fl, {
            "layer": fl,
            "n_layers": ad.vision.n_layers,
            "source": f"the model's feature layer (vision_feature_layer={cfg}): the ViT output the projector reads",
        }
    n = ad.n_layers
    return n, {"layer": n, "n_layers": n, "source": "the ViT's last layer"}


def _rollout_table(vis, arrays, names, vit_rule: NormRule, upto: int | None = None) -> dict[str, pd.DataFrame]:
    """Inside the ViT, up to layer ``upto`` (hidden-state index; default the last layer; a VLM
    passes its feature layer): rollout through blocks ``0..upto-1`` from CLS and from every sink
    at layer ``upto`` on the patch grid, relevance maps (attention column per head at block
    ``upto-1``) of CLS, the sinks and one non-sink patch, and the attention received by token
    group in every block up to it."""
    from ..capture import Capture
    from .rollout import attention_by_group, relevance_map, rollout

    batch = vis.prepare(arrays, names)
    lay = batch.layouts[0]
    L = vis.n_layers if upto is None else int(upto)
    if not 1 <= L <= vis.n_layers:
        raise SinkscopeError(f"ViT layer {L} is outside 1..{vis.n_layers}: rollout needs at least one block")
    with Capture(vis, layers=list(range(L + 1)), keep_attention=list(range(L)), stop_early=True) as cap:
        bc = cap.run(batch)
    attn = bc.attn_maps  # block -> [batch, heads, q, k]
    roll, rel, grp = [], [], []
    for i, name in enumerate(names):
        R = np.asarray(rollout([attn[b][i] for b in range(L)]))
        sinks_at = {}
        for b in range(L + 1):
            pn = bc.norms[i, b, lay.n_prefix : lay.n_tokens].numpy()
            sinks_at[b] = [lay.n_prefix + int(j) for j in np.nonzero(vit_rule.mask([pn])[0])[0]]
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
