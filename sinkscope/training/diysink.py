"""``sinkscope diysink init`` / ``train``: build the dual-connector model and train it in the
paper's stages (:mod:`sinkscope.diysink`).

- :func:`init_diysink`: a LLaVA model with the dual connector, both MLPs copies of its projector,
  weights 1, the sink rule saved with it, written with ``save_pretrained`` (no training);
- :func:`train_diysink` with ``stage="1"``: each MLP alone, the LLM seeing only that MLP's tokens
  (``f_sink`` on the sinks, ``f_nonsink`` on the others; ``mlps`` picks which; the two losses are
  summed), LM loss on answer tokens;
- ``stage="2"``: both MLPs on the concatenation (sinks first) **and the LLM**, as the paper's "usual
  LVLM fine-tuning": ``llm="lora"`` (the default) trains LoRA adapters of ``lora_rank`` (16) on the
  LLM and merges them into its weights when saved, ``llm="full"`` trains every LLM weight (the
  TinyLLaVA recipe, lr 2e-5; memory for a GPU), ``llm="frozen"`` the connector only;
- ``stage="router"``: the ReW router ``R`` only (the model frozen; gradients reach ``R`` through
  the LLM): ``samples`` questions balanced over Global / Local / Mixed from the ``shapes``
  training split, ``epochs`` epochs (the paper: 120 samples, 10 epochs, lr 1e-2, batch 20).

The loop is an ``accelerate`` loop, as :func:`~sinkscope.training.train_projector`'s: one CPU, one
GPU or ``accelerate launch`` (data-parallel); the tower's features come from a
:class:`~sinkscope.training.features.FeatureCache`; ``OUT/checkpoint/`` every ``save_every`` steps,
``resume=True`` replays the same seeded batches, so a killed run resumes to the weights of an
uninterrupted one. ``OUT`` then holds the trained dual model in ``OUT/model`` (a
``save_pretrained`` folder; ``load_model(OUT)`` finds it), with ``OUT/model/router/`` after the
router stage, ``train_log.jsonl``, ``summary.json`` and the run's ``config.json``.

>>> _ = init_diysink("tiny-llava", "runs/dual", rule="topk:2", progress=False)
>>> res = train_diysink("runs/dual", "runs/dual-s1", stage="1", steps=2, n_per_task=2, real=(), progress=False)
>>> res.summary["trained"]
['f_sink', 'f_nonsink']
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import ownership
from .._utils import SinkscopeError, package_versions, progress_bar
from ..diysink import ReWRouter, dual_projector, make_dual, routing, save_dual
from ..diysink.routers import QuestionEncoder, check_encoder
from ..models import load_model
from .examples import IGNORE, Example, encode, vqa_examples
from .projector import (
    TrainResult,
    _add_lora,
    _lora_state,
    _lr_lambda,
    _read_log,
    accelerator,
    cached_features,
    check_training_folders,
    write_checkpoint,
)

log_ = logging.getLogger("sinkscope")
STAGES = ("1", "2", "router")
#: the dual model's folder inside a run folder (``load_model(RUN)`` finds it there)
MODEL_DIR = "model"
MLPS = ("sink", "nonsink")
#: how stage 2 trains the LLM: LoRA adapters (merged when saved), every weight, or not at all
LLM_MODES = ("lora", "full", "frozen")


@dataclass
class DIYSinkResult(TrainResult):
    """``out`` (the run folder; the model is in ``out / MODEL_DIR``), ``log`` (one dict per step),
    ``summary``."""


def init_diysink(model: Any = "mini-llava", out: str | Path = "runs/diysink", rule: Any = None, progress: bool = True) -> DIYSinkResult:
    """Build the dual model of ``model`` (name, folder or LLaVA adapter) without training and save
    it to ``out/model`` (see :func:`~sinkscope.diysink.make_dual`; ``rule``: the sink rule, default the
    model's :func:`~sinkscope.interventions.default_rule`)."""
    out = Path(out)
    settings = {"model": getattr(model, "name", None) or str(model), "sink_rule": None if rule is None else str(rule)}
    outputs = ownership.OUTPUTS["diysink-init"]
    if ownership.check(out, "diysink-init", outputs) is not None and ownership.own_files(out):
        raise ownership.FolderRefused(f"--out {out} holds an earlier dual model; choose a new folder for this one")
    ownership.claim(out, "diysink-init", outputs, settings)
    ad = model if hasattr(model, "model") else load_model(model)
    dual = make_dual(ad, rule=rule)
    save_dual(ad, out / MODEL_DIR)
    d = ad.model.config.diysink
    summary = {"analysis": "diysink-init", "model": ad.name, "rule": d["rule"], "rule_description": d["rule_description"],
               "rule_reason": d["rule_reason"], "weights": dual.weights.tolist(),
               "versions": package_versions(("sinkscope", "torch", "transformers"))}  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return DIYSinkResult(out, [], summary)


# -- the loss -------------------------------------------------------------------------------------


def dual_loss(
    model: nn.Module, batch: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], image_token_id: int,
    mode: str = "dual", weights: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """Mean LM loss over the answer tokens of ``(ids, labels, tower features)`` examples, the dual
    connector of ``model`` under ``mode`` (``dual``, ``sink-only``, ``nonsink-only``; one image
    block per example, replaced by however many visual tokens the mode feeds) and per-example
    ``weights`` (``[examples, 2]``, e.g. the router's; ``None``: the saved ones)."""
    emb = model.get_input_embeddings()
    dev = emb.weight.device
    seqs = []
    for i, (ids, lab, feats) in enumerate(batch):
        ids, lab = ids.to(dev), lab.to(dev)
        where = (ids == image_token_id).nonzero().flatten()
        s, n = int(where[0]), len(where)
        w = None if weights is None else weights[i : i + 1]
        with routing(model, mode=mode, weights=w) as dual:
            vis = dual(feats[None].to(dev, emb.weight.dtype))[0]
        e = torch.cat([emb(ids[:s]), vis.to(emb.weight.dtype), emb(ids[s + n :])])
        lb = torch.cat([lab[:s], lab.new_full((vis.shape[0],), IGNORE), lab[s + n :]])
        seqs.append((e, lb))
    width = max(len(lb) for _, lb in seqs)
    D = seqs[0][0].shape[-1]
    embeds = torch.stack([torch.cat([e, e.new_zeros(width - len(e), D)]) for e, _ in seqs])
    labels = torch.stack([torch.cat([lb, lb.new_full((width - len(lb),), IGNORE)]) for _, lb in seqs])
    mask = torch.stack([torch.arange(width, device=dev) < len(lb) for _, lb in seqs]).long()
    out = model.model.language_model(inputs_embeds=embeds, attention_mask=mask)
    target = labels[:, 1:]
    keep = target != IGNORE
    logits = model.lm_head(out.last_hidden_state[:, :-1][keep]).float()
    return nn.functional.cross_entropy(logits, target[keep])


class _Step(nn.Module):
    """The model (and the router) as one module whose forward is a step's loss, so ``accelerate``
    (DDP) sees every trainable parameter."""

    def __init__(self, model: nn.Module, image_token_id: int, stage: str, mlps: tuple[str, ...], router: ReWRouter | None):
        super().__init__()
        self.model, self.router = model, router
        self.image_token_id, self.stage, self.mlps = image_token_id, stage, mlps

    def forward(self, batch, emb: torch.Tensor | None = None):
        if self.stage == "1":
            return sum(dual_loss(self.model, batch, self.image_token_id, f"{k}-only") for k in self.mlps)
        weights = self.router(emb) if self.router is not None else None
        return dual_loss(self.model, batch, self.image_token_id, "dual", weights)


# -- training ---------------------------------------------------------------------------------------


def router_examples(samples: int = 120, seed: int = 0) -> list[Example]:
    """``samples`` one-question conversations from the ``shapes`` training split, balanced over
    Global / Local / Mixed (a seeded draw).

    >>> [e.turns[0][0] for e in router_examples(3)][:1]  # doctest: +ELLIPSIS
    ['...']
    """
    import random

    from ..evaluation.items import shapes_items

    per = math.ceil(samples / 3)
    pool = shapes_items("train", n_per_task=max(4, per))
    rng = random.Random(seed)
    out: list[Example] = []
    for tt in ("global", "local", "mixed"):
        its = [it for it in pool if it.task_type == tt]
        rng.shuffle(its)
        out += [Example(it.id, it.image, ((it.question, it.answer),)) for it in its[:per]]
    rng.shuffle(out)
    return out[:samples]


def train_diysink(
    model: Any,
    out: str | Path,
    stage: str = "2",
    steps: int | None = None,
    batch_size: int = 4,
    lr: float = 1e-3,
    warmup: float = 0.03,
    n_per_task: int = 200,
    turns: int = 4,
    real: tuple[str, ...] = ("textile", "lfw-faces", "digits"),
    real_limit: int | None = None,
    mlps: tuple[str, ...] = MLPS,
    llm: str = "lora",
    lora_rank: int | None = None,
    llm_lr: float | None = None,
    samples: int = 120,
    epochs: int = 10,
    router_hidden: int = 128,
    router_norm: str | None = None,
    encoder: str | None = None,
    seed: int = 0,
    save_every: int = 50,
    resume: bool = False,
    cache_dir: str | Path | None = None,
    device: str | None = None,
    mixed_precision: str = "no",
    progress: bool = True,
) -> DIYSinkResult:
    """Train ``stage`` (``"1"``, ``"2"`` or ``"router"``; see the module docstring) of the dual
    model ``model`` (a folder written by :func:`init_diysink` or an earlier stage, or an adapter
    with a dual connector) and save the result to ``out``. ``steps``: optimizer steps (stages 1, 2;
    default 100); the router stage runs ``epochs`` over ``samples`` questions in batches of
    ``batch_size`` instead (the paper: 20). ``router_norm``: the router's normalisation
    (default: the model's ``router_norm``, ``x2-softmax``); ``encoder``: the question encoder
    (default: offline all-MiniLM-L6-v2). Stage 2 only: ``llm`` (:data:`LLM_MODES`: ``lora``,
    ``full``, ``frozen``), ``lora_rank`` (default 16) and ``llm_lr``, the LLM's learning rate
    (default 2e-4 for LoRA, 2e-5 for ``full``)."""
    if stage not in STAGES:
        raise SinkscopeError(f"stage {stage!r}: expected one of {', '.join(STAGES)}")
    if llm not in LLM_MODES:
        raise SinkscopeError(f"llm {llm!r}: expected one of {', '.join(LLM_MODES)}")
    llm = llm if stage == "2" else "frozen"  # stage 1 and the router train their own parts only
    if llm_lr is None:
        llm_lr = 2e-5 if llm == "full" else 2e-4
    bad = [k for k in mlps if k not in MLPS]
    if bad or not mlps:
        raise SinkscopeError(f"mlps: choose from sink, nonsink, got {list(mlps)}")
    out = Path(out)
    ck = out / "checkpoint"
    if mixed_precision not in ("no", "bf16", "fp16"):
        raise SinkscopeError(f"mixed_precision: no, bf16 or fp16, got {mixed_precision!r}")
    if stage == "router":
        check_encoder(encoder)  # a missing encoder folder, before any folder or model
    # what the trained weights depend on: a resume must give the same (stage included: a stage-2
    # resume of a stage-1 run is refused). save_every (when the state is written), cache_dir,
    # device, progress and out only change how the run goes
    settings = {
        "model": getattr(model, "name", None) or str(model), "stage": stage, "steps": steps, "batch_size": batch_size,
        "lr": lr, "warmup": warmup, "n_per_task": n_per_task, "turns": turns, "real": list(real),
        "real_limit": real_limit, "mlps": list(mlps), "llm": llm, "lora_rank": lora_rank, "llm_lr": llm_lr,
        "samples": samples, "epochs": epochs, "router_hidden": router_hidden, "router_norm": router_norm,
        "encoder": encoder, "seed": seed, "mixed_precision": mixed_precision,
    }  # fmt: skip
    check_training_folders("diysink-train", out, settings, resume, cache_dir)
    acc = accelerator(device)
    if acc.is_main_process:
        ownership.claim(out, "diysink-train", ownership.OUTPUTS["diysink-train"], settings, resume=resume)
    acc.wait_for_everyone()  # every process checked the folder before any writes to it
    torch.manual_seed(seed)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    ad = model if hasattr(model, "model") else load_model(str(model), device=str(acc.device))
    m = ad.model
    dual = dual_projector(ad)
    settings = dict(m.config.diysink)
    for p in m.parameters():
        p.requires_grad_(False)
    router = enc_cache = None
    lora = None
    if stage == "1":
        trained = [f"f_{k}" for k in mlps]
    elif stage == "2":
        trained = ["f_sink", "f_nonsink"] + ({"lora": ["llm (LoRA)"], "full": ["llm"]}.get(llm, []))
        lora = _add_lora(m, lora_rank or 16) if llm == "lora" else None
    else:
        trained = ["router"]
        encoder_obj = QuestionEncoder(encoder)
        router = ReWRouter(encoder_obj.dim, router_hidden, router_norm or settings.get("router_norm", "x2-softmax"), encoder)
        router.to(acc.device)
    for name in trained:
        if name.startswith("f_"):
            for p in getattr(dual, name).parameters():
                p.requires_grad_(True)
    llm_params = set()
    if llm != "frozen":  # LoRA: the injected adapters (trainable as made); full: every LLM weight
        for n, p in [*m.model.language_model.named_parameters(), *m.lm_head.named_parameters()]:
            if llm == "full" or ".lora_" in n:
                p.requires_grad_(True)
                llm_params.add(id(p))
    if stage == "router":
        exs = router_examples(samples, seed)
        enc_cache = dict(zip([e.key for e in exs], encoder_obj([e.turns[0][0] for e in exs])))
        per_epoch = math.ceil(len(exs) / (batch_size * acc.num_processes))
        steps = epochs * per_epoch
        order = []
        for ep in range(epochs):
            order += torch.randperm(len(exs), generator=torch.Generator().manual_seed(seed + ep)).tolist()
    else:
        steps = 100 if steps is None else steps
        exs = vqa_examples(n_per_task=n_per_task, turns=turns, real=tuple(real), seed=seed, real_limit=real_limit)
        order = torch.randperm(len(exs), generator=torch.Generator().manual_seed(seed)).tolist()
    per_step = batch_size * acc.num_processes
    used = {order[k % len(order)] for k in range(steps * per_step)}
    cache = cached_features(acc, ad, cache_dir or out / "features", [exs[i].image for i in sorted(used)], progress)
    n_img = cache.get(exs[order[0]].image.name).shape[0]
    names = sorted({exs[i].image.name for i in used})
    counts = torch.cat([dual.sink_mask(cache.get(n)[None]).sum(1) for n in names]).float()
    sinks_seen = {"mean": round(float(counts.mean()), 3), "min": int(counts.min()), "max": int(counts.max()), "images": len(names)}
    if int(counts.max()) == 0:
        log_.warning("diysink: the rule (%s) finds no sink in any training image; f_sink gets no data", dual.rule.describe())
    step_mod = _Step(m, ad.image_token_id, stage, tuple(mlps), router)
    trainable = [p for p in step_mod.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if id(p) not in llm_params], "lr": lr}]
    if llm_params:
        groups.append({"params": [p for p in trainable if id(p) in llm_params], "lr": llm_lr})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(steps, warmup))
    step_fn, opt = acc.prepare(step_mod, opt)
    start, seen = _restore(ck, step_mod, opt, sched) if resume else (0, 0)
    log = _read_log(out / "train_log.jsonl", start)
    bar = progress_bar(max(0, steps - start), progress and acc.is_main_process, f"diysink stage {stage}", unit="step")
    t0 = time.perf_counter()
    m.train(False)
    for step in range(start, steps):
        idx = [order[(step * per_step + k) % len(order)] for k in range(per_step)]
        mine = idx[acc.process_index :: acc.num_processes]
        batch = [(*encode(ad, exs[i], n_img), cache.get(exs[i].image.name)) for i in mine]
        emb = torch.stack([enc_cache[exs[i].key] for i in mine]).to(acc.device) if enc_cache else None
        with torch.autocast(acc.device.type, dtype=amp, enabled=amp is not None):
            loss = step_fn(batch, emb)
        acc.backward(loss)
        opt.step()
        sched.step()
        opt.zero_grad()
        seen += len(idx)
        rec = {"step": step + 1, "loss": round(float(loss.detach()), 5), "lr": sched.get_last_lr()[0], "seen": seen}
        log.append({**rec, "s": round(time.perf_counter() - t0, 2)})
        if acc.is_main_process:
            with (out / "train_log.jsonl").open("a") as f:
                f.write(json.dumps(log[-1]) + "\n")
            if (step + 1) % save_every == 0 or step + 1 == steps:
                _save_checkpoint(ck, step_mod, opt, sched, step + 1, seen)
        bar.update(1)
    bar.close()
    acc.wait_for_everyone()
    summary = {
        "analysis": "diysink-train", "model": ad.name, "stage": stage, "trained": trained, "steps": steps,
        "batch_size": batch_size, "num_processes": acc.num_processes, "lr": lr, "seed": seed,
        "examples": len(exs), "sequences_seen": log[-1]["seen"] if log else 0,
        "first_loss": log[0]["loss"] if log else None, "final_loss": log[-1]["loss"] if log else None,
        "seconds": log[-1]["s"] if log else 0, "mixed_precision": mixed_precision,
        "llm": llm, "llm_lr": llm_lr if llm != "frozen" else None,
        "lora": {k: v for k, v in lora.items()} if lora else None,
        "router": router.settings() if router is not None else None,
        "rule": settings.get("rule"), "rule_description": settings.get("rule_description"), "sinks_per_image": sinks_seen,
        "versions": package_versions(("sinkscope", "torch", "transformers", "accelerate")),
    }  # fmt: skip
    if acc.is_main_process:
        _save_model(ad, out, stage, summary, lora, router)
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return DIYSinkResult(out, log, summary)


def _trainable_state(step_mod: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in step_mod.named_parameters() if p.requires_grad}


def _save_checkpoint(ck: Path, step_mod, opt, sched, step: int, seen: int) -> None:
    from safetensors.torch import save_file

    write = lambda tmp: save_file(_trainable_state(step_mod), str(tmp / "trainable.safetensors"))  # noqa: E731
    write_checkpoint(ck, write, opt, sched, step, seen)


def _restore(ck: Path, step_mod, opt, sched) -> tuple[int, int]:
    if not (ck / "state.pt").exists():
        return 0, 0
    from safetensors.torch import load_file

    state = load_file(str(ck / "trainable.safetensors"))
    params = dict(step_mod.named_parameters())
    with torch.no_grad():
        for n, v in state.items():
            params[n].copy_(v)
    st = torch.load(ck / "state.pt", weights_only=False)
    opt.load_state_dict(st["optimizer"])
    sched.load_state_dict(st["scheduler"])
    return int(st["step"]), int(st["seen"])


def _unwrap_lora(m: nn.Module, out: Path, lora: dict) -> None:
    """Write the adapters to ``out/lora.safetensors``, take the ``peft`` wrappers out of the LLM
    and fold the adapters into its weights, so the saved model is a plain dual model."""
    from safetensors.torch import save_file

    from ..models.mini_llava import merge_lora

    path = out / "lora.safetensors"
    meta = {"rank": str(lora["rank"]), "alpha": str(lora["alpha"]), "targets": ",".join(lora["targets"])}
    save_file(_lora_state(m), str(path), metadata=meta)
    lm = m.model.language_model
    for name, mod in list(lm.named_modules()):
        if hasattr(mod, "base_layer") and hasattr(mod, "lora_A"):
            parent_name, _, child = name.rpartition(".")
            setattr(lm.get_submodule(parent_name) if parent_name else lm, child, mod.base_layer)
    merge_lora(lm, path)


def _save_model(ad, out: Path, stage: str, summary: dict, lora: dict | None, router: ReWRouter | None) -> None:
    m = ad.model
    settings = dict(m.config.diysink)
    settings["history"] = list(settings.get("history", [])) + [
        {"step": f"stage {stage}", "trained": summary["trained"], "llm": summary["llm"], "steps": summary["steps"],
         "final_loss": summary["final_loss"]}
    ]  # fmt: skip
    if router is not None:
        settings["router_norm"] = router.norm
    m.config.diysink = settings
    if lora:
        _unwrap_lora(m, out, lora)
    for p in m.parameters():
        p.requires_grad_(False)
    save_dual(ad, out / MODEL_DIR)
    if router is not None:
        router.cpu().save(out / MODEL_DIR / "router")


__all__ = ["DIYSinkResult", "LLM_MODES", "MLPS", "MODEL_DIR", "STAGES", "dual_loss", "init_diysink", "router_examples", "train_diysink"]
