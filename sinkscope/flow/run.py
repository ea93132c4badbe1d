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
- with ``--variant`` (VLM): ``attention_by_variant.csv`` (``variant, layer, group, n_tokens,
  mean_attention, share``), the attention the LLM gives each token group under each intervention
  against ``both`` (:mod:`sinkscope.flow.variants`), and ``tokens_fed.parquet`` (``id, variant,
  image, vit_token, row, col, norm, is_vit_sink, llm_position, position_id``: which ViT tokens
  each variant fed the LLM, in which order, as ``sinkscope eval`` writes it; ``id`` is the image's name)

Every analysis marks ViT sinks by one rule, ``sink_rule`` (a string of
:data:`~sinkscope.interventions.rules.RULE_GRAMMAR`; default the model's
:func:`~sinkscope.interventions.default_rule`), recorded with its reason as ``summary["vit_rule"]``.
A rule the analyses cannot apply (``cls`` or ``attention``: they mark sinks among the patches by
their norms; a rule naming another ViT layer than the one they read) is refused in one line before
any image is read.

Under ``accelerate launch`` (several processes; ``out`` needed) the analyses run data-parallel
(:mod:`sinkscope.distributed`): the ViT ones per batch of 8 images, ``knockout`` per set of pairs
sharing a first target, ``decode`` per isolated position; ``propagation``, ``attribution`` and
``relevancy`` analyse the one prompt that holds every image, so the main process runs them alone.
Each process writes its part into ``OUT/parts/rank{r}/``; the main process merges them into the
tables of one process (same rows, same order), recomputes the summaries from the merged tables,
records ``"distributed"`` in ``summary.json`` and writes the run; the others return their part.

>>> res = run_flow("tiny-llava+sinks", prompt="What is this?", out="runs/flow", progress=False)
>>> res.summary["analyses"] == list(ANALYSES), sorted(res.tables)[:4]
(True, ['attention_by_bin', 'attention_by_group', 'attribution', 'decode'])
>>> sorted(p.name for p in res.out.iterdir())[-3:]
['summary.json', 'visual_tokens.parquet', 'vit_attention_by_group.csv']
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from .. import distributed
from .._utils import SinkscopeError, package_versions
from ..data import ImageItem, image_items, sample_images
from ..interventions.rules import given_rule, resolve_rule, rule_from, rule_record
from ..models import load_model
from ..models.base import Adapter
from ..models.llava import LlavaAdapter
from .steps import (
    KNOCKOUT_PAIRS,
    VIT_BATCH,
    FlowState,
    NoSteps,
    attribution_step,
    decode_step,
    knockout_step,
    propagation_step,
    redundancy_step,
    relevancy_step,
    rollout_step,
    vit_shard_steps,
    vlm_pass,
)

log = logging.getLogger("sinkscope")

ANALYSES = ("rollout", "propagation", "knockout", "decode", "attribution", "redundancy", "relevancy")
#: analyses that need only a ViT (any ViT, or a VLM's vision tower)
VIT_ANALYSES = ("rollout", "redundancy")
#: how each analysis runs under several processes (``summary["distributed"]["analyses"]``)
SHARDING = {
    "rollout": f"images, by batches of {VIT_BATCH}",
    "redundancy": f"images, by batches of {VIT_BATCH}",
    "knockout": "sets of pairs sharing a first target",
    "decode": "isolated positions",
    "propagation": "main process (one prompt holds every image)",
    "attribution": "main process (one prompt holds every image)",
    "relevancy": "main process (one prompt holds every image)",
}
#: the tables written as parquet (the others as CSV)
PARQUET_TABLES = ("visual_tokens", "tokens_fed")
#: where the processes of a data-parallel flow run write their parts (removed once merged)
PARTS = "parts"


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
    vit_relative: float | None = None,
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
    variants: tuple[str, ...] | list[str] = (),
    sink_rule: Any = None,
    positions: str = "reindex",
) -> FlowResult:
    """Run the chosen analyses on one prompt with its images; return (and write) the tables.

    ``progress`` shows a bar with one step per analysis (and per knockout pair). ``chat`` wraps
    the prompt in the tokenizer's chat template (text first, as the model was trained).
    ``sink_dims_from``: where the LLM sink dims are discovered - ``"text"`` (a text-only pass of
    the prompt, as Kang et al. fix them from the LLM's own first-token sink), ``"first_text_token"``
    or ``"multimodal"`` (see :func:`~sinkscope.flow.propagation.propagation`).
    ``sink_rule``: the ViT sink rule of every analysis and variant (anything
    :func:`~sinkscope.interventions.rule_from` reads: ``"norm"``, ``"norm:100"``, ``"norm:x4"``,
    ``"topk:4"``, ...; default the model's :func:`~sinkscope.interventions.default_rule`);
    ``vit_threshold`` / ``vit_relative`` are its old spellings ``norm:T`` / ``norm:xR``.
    ``variants``: interventions (:mod:`sinkscope.flow.variants`) whose effect on the attention the
    LLM gives each token group is measured against ``both`` -> ``attention_by_variant`` and
    ``tokens_fed``, with ``positions`` (main process only under several processes).
    Under several processes (``accelerate launch``) see the module's docstring.
    """
    t0 = time.perf_counter()
    dist, device, progress = distributed.context_for("flow", out, device, progress)
    given = given_rule(sink_rule, threshold=vit_threshold, relative=vit_relative)
    ad, analyses, skipped = _model_and_analyses(model, analyses, device, dtype)
    vit_rule, why = resolve_rule(ad, given, cls=False)
    vit_layer, vit_layer_info = _vit_layer(ad)
    # one rule for every analysis, all reading the sinks at vit_layer: one that cannot is refused here
    vit_rule.check_for("flow", layer=vit_layer, n_layers=getattr(ad, "vision", ad).n_layers)
    items = _items(images)
    arrays = [it.load() for it in items]
    st = FlowState(
        ad,
        items,
        arrays,
        list(analyses),
        vit_rule,
        vit_layer,
        prompt=prompt,
        chat=chat,
        llm_tau=llm_tau,
        generate=generate,
        window=window,
        stride=stride,
        bin_width=bin_width,
        decode_nonsinks=decode_nonsinks,
        top_k=top_k,
        attribution_steps=attribution_steps,
        seed=seed,
        sink_dims_from=sink_dims_from,
        dist=dist,
    )
    st.summary = _run_summary(st, skipped, vit_layer_info, why)
    is_vlm = isinstance(ad, LlavaAdapter)
    n_steps = len(analyses) + (
        len(KNOCKOUT_PAIRS) - 1 if "knockout" in analyses else 0
    )  # knockout: one per pair
    st.bar = _steps(n_steps, progress and is_vlm or (progress and len(arrays) > 4))
    _run_steps(st, is_vlm)
    if variants:
        _variants_step(st, variants, positions)
    st.bar.close()
    if dist is not None:
        return _finish_distributed(st, t0, Path(out))
    return _finish(st, t0, out)


def _variants_step(st: FlowState, variants, positions: str) -> None:
    """``attention_by_variant`` and ``tokens_fed`` (main process only: one prompt holds every image)."""
    from .variants import variant_tables

    if not isinstance(st.ad, LlavaAdapter):
        raise SinkscopeError(f"flow variants need a LLaVA-style model; {st.ad.name!r} is {st.ad.family!r}")
    if not st.is_main:
        return
    t = time.perf_counter()
    table, fed = variant_tables(st.ad, st.arrays, st.prompt, list(variants), st.vit_rule, positions, chat=st.chat)
    st.tables["attention_by_variant"] = table
    st.tables["tokens_fed"] = fed.assign(id=[st.names[i] for i in fed.image])[list(TOKENS_FED_COLUMNS)]
    st.summary["variants"] = {"variants": ["both", *[v for v in variants if v != "both"]],
                              "sink_rule": table.attrs["sink_rule"], "positions": positions}  # fmt: skip
    st.timings["variants_s"] = time.perf_counter() - t


#: the columns of a flow's ``tokens_fed.parquet``, those of ``sinkscope eval``'s (``id``: the image's name)
TOKENS_FED_COLUMNS = ("id", "variant", "image", "vit_token", "row", "col", "norm", "is_vit_sink", "llm_position", "position_id")


def _finish(st: FlowState, t0: float, out: str | Path | None) -> FlowResult:
    """Close the summary (timings since ``t0``, package versions), write the outputs under ``out``
    (if given) and wrap them up as a :class:`FlowResult`."""
    summary = st.summary
    summary["timings"] = {
        k: round(v, 3) for k, v in {**st.timings, "total_s": time.perf_counter() - t0}.items()
    }
    summary["versions"] = package_versions(("sinkscope", "torch", "transformers", "captum"))
    if out is not None:
        write_flow_outputs(Path(out), st.tables, summary)
    return FlowResult(
        st.tables, summary, out=Path(out) if out is not None else None, timings=summary["timings"]
    )


def _model_and_analyses(
    model, analyses, device, dtype
) -> tuple[Adapter, list[str] | tuple[str, ...], list[str]]:
    """The adapter, the analyses to run and those skipped (the VLM-only ones, when all analyses
    were asked of a ViT); a clear error for an unknown analysis, a text-only model, or a VLM-only
    analysis asked by name of a ViT."""
    bad = [a for a in analyses if a not in ANALYSES]
    if bad:
        raise SinkscopeError(f"unknown analysis {bad[0]!r}; choose from {', '.join(ANALYSES)} or all")
    ad = model if isinstance(model, Adapter) else load_model(model, device=device, dtype=dtype)
    if ad.family == "causal-lm":
        raise SinkscopeError(
            f"flow needs a vision transformer or a LLaVA-style model; {ad.name!r} is a text-only "
            "language model (use sinkscope scan --text for its sinks)"
        )
    vlm_only = [a for a in analyses if a not in VIT_ANALYSES]
    if not vlm_only or isinstance(ad, LlavaAdapter):
        return ad, analyses, []
    if len(analyses) != len(ANALYSES):
        raise SinkscopeError(f"analyses {vlm_only} need a LLaVA-style model; {ad.name!r} is {ad.family!r}")
    analyses = [a for a in analyses if a in VIT_ANALYSES]
    log.warning(
        "%s is a vision transformer: running %s; skipped (they need a LLaVA-style model): %s",
        ad.name,
        ", ".join(analyses),
        ", ".join(vlm_only),
    )
    return ad, analyses, vlm_only


def _run_summary(st: FlowState, skipped: list[str], vit_layer_info: dict[str, Any], why: str) -> dict[str, Any]:
    """The summary's head: model, images, prompt, analyses (run and skipped), ViT rule (with why
    it was chosen) and layer, and for a VLM the comparison with the paper's settings."""
    is_vlm = isinstance(st.ad, LlavaAdapter)
    summary: dict[str, Any] = {
        "model": st.ad.describe(),
        "images": st.names,
        "prompt": st.prompt if is_vlm else None,
        "chat_template": bool(st.chat) if is_vlm else None,
        "analyses": list(st.analyses),
        "analyses_skipped": {a: "needs a LLaVA-style model" for a in skipped},
        "vit_rule": rule_record(st.vit_rule, why),
        "vit_layer": vit_layer_info,
    }
    if is_vlm:
        summary["paper_settings"] = paper_settings(st.vit_rule, st.generate, st.bin_width)
    if is_vlm and st.ad.planted is None and getattr(st.ad, "projector_trained", True) is False:
        summary["warning"] = "the projector is untrained: the model's answers carry no meaning"
    return summary


def _run_steps(st: FlowState, is_vlm: bool) -> None:
    """Each chosen analysis in order; the VLM ones share one propagation pass and one set of inputs.
    Under several processes each process runs its share (:mod:`~sinkscope.flow.steps`): the main
    one all that runs on it alone, the others only the passes their knockout and decode shares need."""
    chosen = set(st.analyses)
    if st.dist is not None:
        vit_shard_steps(st)
    else:
        if "rollout" in chosen:
            rollout_step(st)
        if "redundancy" in chosen:
            redundancy_step(st)
    if not is_vlm:
        return
    # the steps every process runs share (knockout, decode) and those of the main process alone
    shared = {"knockout", "decode"} & chosen
    mine = chosen if st.is_main else shared
    if {"propagation", "knockout", "decode", "attribution"} & mine:
        vt = propagation_step(st)
    if {"knockout", "decode", "attribution"} & mine:
        vp = vlm_pass(st, vt)
        if "knockout" in chosen:
            knockout_step(st, vp)
        if "decode" in chosen:
            decode_step(st, vp, vt)
        if "attribution" in mine:
            attribution_step(st, vp, vt)
    if "relevancy" in mine:
        relevancy_step(st)


def _finish_distributed(st: FlowState, t0: float, out: Path) -> FlowResult:
    """Write this process' part, wait for every process, and (the main process) merge the parts,
    record ``"distributed"`` and write the run like :func:`_finish`; the others wait until it is
    written and return their own part (``summary["distributed"]["rank"]`` their rank)."""
    dist = st.dist
    _write_part(out / PARTS / f"rank{dist.rank}", st)
    dist.barrier()  # every process has written its part
    record = {
        **dist.summary(len(st.items), VIT_BATCH),
        "analyses": {a: SHARDING[a] for a in st.analyses},
    }
    if not dist.is_main:
        st.tables.update(st.part)
        st.summary["distributed"] = record
        dist.barrier()  # the main process merges and writes the run
        return FlowResult(st.tables, st.summary, out=out, timings=dict(st.timings))
    parts = [_read_part(out / PARTS / f"rank{r}", r) for r in range(dist.num_processes)]
    for merge in st.merges:
        merge(parts)
    st.tables = {name: st.tables[name] for name in _table_order(st.tables)}
    st.summary["distributed"] = {
        **record,
        "share_per_process": [info.get("share", {}) for _, info in parts],
        "timings_per_process": [info["timings"] for _, info in parts],
    }
    res = _finish(st, t0, out)
    shutil.rmtree(out / PARTS, ignore_errors=True)
    dist.barrier()  # the others return once the run is written
    return res


#: the order of the tables of a single-process run
_TABLES = (
    "rollout",
    "relevance",
    "vit_attention_by_group",
    "redundancy",
    "visual_tokens",
    "attention_by_bin",
    "attention_by_group",
    "knockout",
    "decode",
    "attribution",
    "relevancy",
    "attention_by_variant",
    "tokens_fed",
)


def _table_order(tables: dict[str, pd.DataFrame]) -> list[str]:
    return [t for t in _TABLES if t in tables] + [t for t in tables if t not in _TABLES]


def _write_part(path: Path, st: FlowState) -> None:
    """One process' part: a parquet file per table of ``st.part`` and ``part.json`` (its
    ``part_info`` and timings); an earlier run's part there is replaced."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    for name, df in st.part.items():
        df.to_parquet(path / f"{name}.parquet", index=False)
    info = {**st.part_info, "timings": {k: round(v, 3) for k, v in st.timings.items()}}
    (path / "part.json").write_text(json.dumps(info, default=str))


def _read_part(path: Path, rank: int) -> tuple[dict[str, pd.DataFrame], dict[str, Any]]:
    if not (path / "part.json").exists():
        raise SinkscopeError(f"process {rank} wrote no part into {path}; every process must see --out")
    tables = {p.stem: pd.read_parquet(p) for p in sorted(path.glob("*.parquet"))}
    return tables, json.loads((path / "part.json").read_text())


#: The paper's Fig. 3A settings (LLaVA-1.5-7B, CLIP-L/14-336): what each flow run is compared with.
PAPER_FIG3A = {
    "queries": "every generated output token (--generate N, N >= 1)",
    "vit_rule": "absolute L2 norm >= 100 at the feature layer (--sink-rule norm:100)",
    "bin_width": 5.0,
}


def paper_settings(vit_rule: Any, generate: int, bin_width: float) -> dict[str, Any]:
    """How a flow run's settings compare with the paper's Fig. 3A settings (:data:`PAPER_FIG3A`):
    ``{"matches": bool, "differences": [...], "paper": PAPER_FIG3A}``; every summary carries it.
    ``vit_rule``: anything :func:`~sinkscope.interventions.rule_from` reads.

    >>> paper_settings("norm:100", generate=8, bin_width=5.0)["matches"]
    True
    >>> paper_settings("norm:x5", generate=0, bin_width=5.0)["differences"][0]
    'queries: the prompt text after the first image (prefill), not generated tokens'
    """
    vit_rule = rule_from(vit_rule)
    diff = []
    if generate < 1:
        diff.append("queries: the prompt text after the first image (prefill), not generated tokens")
    if vit_rule.mode != "absolute" or vit_rule.threshold != 100.0:
        diff.append(f"ViT sink rule: {vit_rule.describe()}, not an absolute norm threshold of 100")
    if bin_width != PAPER_FIG3A["bin_width"]:
        diff.append(f"ViT-norm bins of width {bin_width:g}, not 5")
    return {"matches": not diff, "differences": diff, "paper": dict(PAPER_FIG3A)}


def _steps(total: int, enabled: bool):
    """A progress bar over the analysis steps (a no-op when disabled)."""
    if not enabled:
        return NoSteps()
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


def write_flow_outputs(out: Path, tables: dict[str, pd.DataFrame], summary: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, df in tables.items():
        if name in PARQUET_TABLES:
            df.to_parquet(out / f"{name}.parquet", index=False)
        else:
            df.to_csv(out / f"{name}.csv", index=False)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
