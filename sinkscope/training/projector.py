"""``sinkscope train-projector``: train a LLaVA projector with the LM loss on answer tokens.

The tower and the LLM stay frozen (stage 2 may add LoRA adapters on the LLM through ``peft``);
the tower's features come from a :class:`~sinkscope.training.features.FeatureCache`, so a step is
projector -> LLM -> loss only. The loop is an ``accelerate`` loop: the same command runs on one
CPU, one GPU or under ``accelerate launch`` (data-parallel; each process takes every N-th batch).

Every ``save_every`` steps (and at the end) the main process writes ``OUT/checkpoint/``
(projector, optimizer, scheduler, step) atomically; ``resume=True`` continues from it, replaying
the same seeded order of batches, so a killed and resumed run ends with the same weights as an
uninterrupted one. ``train_log.jsonl`` gets one line per step (loss, learning rate, sequences
seen, seconds). The result: ``OUT/projector.safetensors`` and, with ``lora_rank``, ``OUT/lora.safetensors``
(the adapters' ``lora_A`` / ``lora_B`` weights in ``peft``'s key names, rank and alpha in the file's
metadata; :func:`~sinkscope.models.mini_llava.merge_lora` folds them into the LLM's weights).

>>> res = train_projector("tiny-llava", out="runs/tp", stage="vqa", steps=2, n_per_task=2, real=(), progress=False)
>>> len(res.log), res.log[-1]["step"]
(2, 2)
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import ownership
from .._utils import SinkscopeError, package_versions, progress_bar, resolve_precision
from ..models import load_model
from .examples import IGNORE, Example, align_examples, encode, vqa_examples
from .features import FeatureCache

STAGES = ("align", "vqa")


@dataclass
class TrainResult:
    """``out`` (the folder), ``log`` (one dict per step) and ``summary``."""

    out: Path
    log: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    config: Any = None


def _projector(model: nn.Module) -> nn.Module:
    return model.model.multi_modal_projector


def _step_loss(
    model, projector, batch: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], image_token_id: int
) -> torch.Tensor:
    """Mean LM loss over the answer tokens of a batch of ``(ids, labels, features)`` (right-padded)."""
    emb = model.get_input_embeddings()
    n = max(len(ids) for ids, _, _ in batch)
    dev = emb.weight.device
    embeds, labels, mask = [], [], []
    for ids, lab, feats in batch:
        ids, lab = ids.to(dev), lab.to(dev)
        is_img = ids == image_token_id
        e = emb(torch.where(is_img, torch.zeros_like(ids), ids))
        proj = projector(feats.to(dev, e.dtype))
        e = e.masked_scatter(is_img[:, None], proj.reshape(-1, e.shape[-1]).to(e.dtype))
        pad = n - len(ids)
        embeds.append(torch.cat([e, e.new_zeros(pad, e.shape[-1])]))
        labels.append(torch.cat([lab, lab.new_full((pad,), IGNORE)]))
        mask.append(torch.cat([torch.ones_like(ids), torch.zeros(pad, dtype=ids.dtype, device=dev)]))
    out = model.model.language_model(inputs_embeds=torch.stack(embeds), attention_mask=torch.stack(mask))
    target = torch.stack(labels)[:, 1:]
    keep = target != IGNORE  # the vocabulary head runs on answer positions only (a few per turn)
    logits = model.lm_head(out.last_hidden_state[:, :-1][keep]).float()
    return nn.functional.cross_entropy(logits, target[keep])


class _Step(nn.Module):
    """The whole model as one module whose forward is a step's loss, so ``accelerate`` (DDP) sees
    every trainable parameter - the projector's and, with LoRA, the adapters'."""

    def __init__(self, model: nn.Module, image_token_id: int):
        super().__init__()
        self.model = model
        self.image_token_id = image_token_id

    def forward(self, batch):
        return _step_loss(self.model, _projector(self.model), batch, self.image_token_id)


#: the LLM's linear layers LoRA adapts (attention and MLP of every decoder layer)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _add_lora(m: nn.Module, rank: int, alpha: float | None = None) -> dict[str, Any]:
    """Inject ``peft`` LoRA adapters of ``rank`` into the LLM of ``m`` (in place; ``lora_B`` starts at
    zero, so the model is unchanged until trained). Returns the adapter's settings."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:  # pragma: no cover - peft is a dependency
        raise SinkscopeError("LoRA needs peft: pip install peft") from None
    settings = {"rank": int(rank), "alpha": float(alpha if alpha is not None else 2 * rank), "targets": list(LORA_TARGETS)}
    cfg = LoraConfig(r=settings["rank"], lora_alpha=settings["alpha"], lora_dropout=0.0, target_modules=list(LORA_TARGETS))
    inject_adapter_in_model(cfg, m.model.language_model)
    return settings


def _lora_state(m: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA weights of ``m``'s LLM (``lora_A`` / ``lora_B``; empty without LoRA)."""
    state = m.model.language_model.state_dict()
    return {k.replace(".default.", "."): v.detach().cpu().contiguous() for k, v in state.items() if ".lora_" in k}


def _lr_lambda(total: int, warmup: float):
    """Cosine decay with linear warm-up over the first ``warmup`` share of steps (TinyLLaVA's)."""
    w = max(1, int(round(warmup * total)))

    def f(step: int) -> float:
        if step < w:
            return (step + 1) / w
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - w) / max(1, total - w))))

    return f


def _examples(
    stage: str, n_per_task: int, turns: int, real: tuple[str, ...], seed: int, real_limit: int | None = None,
    styles: bool = False,
) -> list[Example]:
    if stage == "align":
        return align_examples(n_per_task * 8, styles=styles)
    return vqa_examples(n_per_task=n_per_task, turns=turns, real=real, seed=seed, real_limit=real_limit, styles=styles)


def _save_weights(folder: Path, m: nn.Module, lora: dict | None, name: str = "") -> None:
    """``projector{name}.safetensors`` and, with LoRA, ``lora{name}.safetensors`` in ``folder``."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    proj = _projector(m).state_dict()
    save_file({k: v.detach().cpu().contiguous() for k, v in proj.items()}, str(folder / f"projector{name}.safetensors"))
    if lora:
        meta = {"rank": str(lora["rank"]), "alpha": str(lora["alpha"]), "targets": ",".join(lora["targets"])}
        save_file(_lora_state(m), str(folder / f"lora{name}.safetensors"), metadata=meta)


def _save_checkpoint(ck: Path, m, lora, opt, sched, step: int, seen: int) -> None:
    write_checkpoint(ck, lambda tmp: _save_weights(tmp, m, lora), opt, sched, step, seen)


def write_checkpoint(ck: Path, write_weights, opt, sched, step: int, seen: int) -> None:
    """The checkpoint folder ``ck``: ``write_weights(folder)`` plus ``state.pt`` (optimizer,
    scheduler, step, sequences seen), written beside it and swapped in whole, so a kill at any
    moment leaves either the previous checkpoint or the new one."""
    tmp = ck.with_name(ck.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_weights(tmp)
    torch.save(
        {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step, "seen": seen},
        tmp / "state.pt",
    )
    old = ck.with_name(ck.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if ck.exists():
        os.replace(ck, old)
    os.replace(tmp, ck)
    shutil.rmtree(old, ignore_errors=True)


def accelerator(device: str | None):
    """The ``accelerate.Accelerator`` of a training run. On a machine without a GPU it is built with
    ``cpu=True`` even when no device was named: ``Accelerator(cpu=False)`` there ignores the
    launcher's ``WORLD_SIZE`` and every process of ``accelerate launch`` would train alone."""
    from accelerate import Accelerator

    return Accelerator(cpu=device == "cpu" or (device is None and not torch.cuda.is_available()))


def cached_features(acc, adapter, folder: str | Path, images, progress: bool) -> FeatureCache:
    """The feature cache of ``images``, filled by the main process while the others wait at a
    barrier (two processes must not write the same shards), then opened by every process."""
    if acc.is_main_process:
        FeatureCache(adapter, folder).ensure(images, progress=progress, min_side=1)
    acc.wait_for_everyone()
    return FeatureCache(adapter, folder)


def train_projector(
    model: Any = "mini-llava",
    out: str | Path = "runs/projector",
    stage: str = "vqa",
    steps: int = 100,
    batch_size: int = 4,
    lr: float = 1e-3,
    warmup: float = 0.03,
    n_per_task: int = 200,
    turns: int = 4,
    real: tuple[str, ...] = ("textile", "lfw-faces", "digits"),
    real_limit: int | None = None,
    seed: int = 0,
    save_every: int = 50,
    snapshot_every: int | None = None,
    resume: bool = False,
    init: str | Path | None = None,
    cache_dir: str | Path | None = None,
    device: str | None = None,
    lora_rank: int | None = None,
    lora_lr: float = 2e-4,
    mixed_precision: str = "no",
    stop_after: int | None = None,
    init_lora: str | Path | None = None,
    progress: bool = True,
    styles: bool = False,
) -> TrainResult:
    """Train the projector of ``model`` for ``steps`` steps of ``batch_size`` conversations of
    ``stage`` (``align``: captions; ``vqa``: questions, see :mod:`~sinkscope.training.examples`).
    ``init``: a projector file to start from (e.g. stage 1's result); ``real_limit``: at most this
    many training questions per real-image set; ``snapshot_every``: also keep the projector every
    N steps in ``OUT/snapshots/`` (for learning curves); ``lora_rank``: also train LoRA adapters of
    this rank on every attention and MLP projection of the LLM (learning rate ``lora_lr``; stage 2,
    as in LLaVA / TinyLLaVA; the LLM's own weights stay frozen). Only the conversations the run will
    reach have their tower features computed. ``mixed_precision``: ``"bf16"`` runs the forward under
    ``torch.autocast`` with fp32 master weights (1.7x faster on a CPU with AMX, the usual choice on
    a GPU; many times slower on a CPU without AMX or AVX-512 BF16), ``"no"`` keeps fp32, ``"auto"``
    takes bf16 only where it pays on this machine (:func:`~sinkscope._utils.fast_bf16`; the run
    records what it chose). A ``model`` given as an adapter is trained in place (with LoRA its
    LLM keeps the ``peft`` adapter modules; a name loads a fresh model). ``stop_after``: stop once
    step ``stop_after`` of the ``steps``-step schedule is done (checkpointed; the outputs are that
    step's weights, and ``resume=True`` with a later ``stop_after`` goes on) - for time-boxed runs.
    ``init_lora``: a ``lora.safetensors`` to start the adapters from (with ``init``, a finished run
    goes on under a new schedule; the rank comes from the file when ``lora_rank`` is not given).
    ``styles``: draw each training scene in its own seeded render style
    (:func:`~sinkscope.training.examples.scene_image`), not the evaluation's plain renderer."""
    if stage not in STAGES:
        raise SinkscopeError(f"stage {stage!r}: expected one of {', '.join(STAGES)}")
    if snapshot_every is not None and (not isinstance(snapshot_every, int) or snapshot_every < 1):
        raise SinkscopeError(f"snapshot_every: a number of steps >= 1 (or not given: no snapshots), got {snapshot_every!r}")
    if stop_after is not None and isinstance(steps, int) and stop_after > steps:
        raise SinkscopeError(f"stop_after: step {stop_after} is past the end of the {steps}-step schedule (--steps)")
    check_weight_files(init=init, init_lora=init_lora)  # corrupt files refused before any folder or model
    on_gpu = str(device or "").startswith("cuda") or (device is None and torch.cuda.is_available())
    mixed_precision = resolve_precision(mixed_precision, "cuda" if on_gpu else "cpu")  # auto: what pays here
    out = Path(out)
    ck = out / "checkpoint"
    # what the weights depend on: a resume must give the same. save_every and snapshot_every (when
    # the state is written), stop_after (where this call stops on the same schedule), cache_dir,
    # device, progress and out only change how the run goes
    settings = {
        "model": getattr(model, "name", None) or str(model), "stage": stage, "steps": steps, "batch_size": batch_size,
        "lr": lr, "warmup": warmup, "n_per_task": n_per_task, "turns": turns, "real": list(real),
        "real_limit": real_limit, "seed": seed, "lora_rank": lora_rank, "lora_lr": lora_lr,
        "mixed_precision": mixed_precision, "init": None if init is None else str(init),
        "init_lora": None if init_lora is None else str(init_lora), **({"styles": True} if styles else {}),
    }  # fmt: skip
    check_training_folders("train-projector", out, settings, resume, cache_dir)
    acc = accelerator(device)
    if acc.is_main_process:
        ownership.claim(out, "train-projector", ownership.OUTPUTS["train-projector"], settings, resume=resume)
    acc.wait_for_everyone()  # every process checked the folder before any writes to it
    torch.manual_seed(seed)
    if mixed_precision not in ("no", "bf16", "fp16"):
        raise SinkscopeError(f"mixed_precision: no, bf16 or fp16, got {mixed_precision!r}")
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    ad = model if hasattr(model, "model") else load_model(model, device=str(acc.device))
    if getattr(ad, "family", None) != "llava":
        raise SinkscopeError(f"model {ad.name!r} ({ad.family}) is not a LLaVA-style model: train-projector trains the projector between a tower and an LLM")
    out.mkdir(parents=True, exist_ok=True)
    m = ad.model
    projector = _trainable_projector(m, init)
    if init_lora is not None:
        lora_rank = _lora_rank(init_lora, lora_rank)
    lora = _add_lora(m, lora_rank) if lora_rank else None
    if init_lora is not None:
        _load_lora(m, init_lora)
    exs = _examples(stage, n_per_task, turns, tuple(real), seed, real_limit, styles)
    order = torch.randperm(len(exs), generator=torch.Generator().manual_seed(seed)).tolist()
    per_step = batch_size * acc.num_processes
    end = steps if stop_after is None else max(1, min(steps, stop_after))
    used = {order[k % len(order)] for k in range(end * per_step)}  # cache only what is trained on
    # the training sets are built-in (224-px scenes; real sets of small pictures the processor enlarges)
    cache = cached_features(acc, ad, cache_dir or out / "features", [exs[i].image for i in sorted(used)], progress)
    n_img = cache.get(exs[order[0]].image.name).shape[0]
    groups = [{"params": list(projector.parameters()), "lr": lr}]
    if lora:
        groups.append({"params": [p for n, p in m.named_parameters() if ".lora_" in n], "lr": lora_lr})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(steps, warmup))
    step_fn, opt = acc.prepare(_Step(m, ad.image_token_id), opt)
    start, seen = _restore(ck, m, opt, sched) if resume else (0, 0)
    log = _read_log(out / "train_log.jsonl", start)
    bar = progress_bar(max(0, end - start), progress and acc.is_main_process, f"train {stage}", unit="step")
    t0 = time.perf_counter()
    m.train(False)
    for step in range(start, end):
        idx = [order[(step * per_step + k) % len(order)] for k in range(per_step)]
        mine = idx[acc.process_index :: acc.num_processes]
        batch = [(*encode(ad, exs[i], n_img), cache.get(exs[i].image.name)) for i in mine]
        with torch.autocast(acc.device.type, dtype=amp, enabled=amp is not None):
            loss = step_fn(batch)
        acc.backward(loss)
        opt.step()
        sched.step()
        opt.zero_grad()
        seen += len(idx)
        rec = {"step": step + 1, "loss": round(float(loss.detach()), 5), "lr": sched.get_last_lr()[0], "seen": seen}
        log.append({**rec, "s": round(time.perf_counter() - t0, 2)})
        if acc.is_main_process:
            _record(out, log[-1], m, lora, opt, sched, end, save_every, snapshot_every)
        bar.update(1)
    bar.close()
    acc.wait_for_everyone()
    summary = _finish(
        out, ck, ad, stage, steps, batch_size, lr, n_per_task, turns, real, seed, log, len(exs), acc,
        {"lora": lora, "mixed_precision": mixed_precision, "stopped_at": None if end == steps else end,
         "styles": styles, "init": None if init is None else str(init),
         "init_lora": None if init_lora is None else str(init_lora)},
    )
    return TrainResult(out, log, summary)


def check_training_folders(kind: str, out: Path, settings: dict, resume: bool, cache_dir: str | Path | None) -> None:
    """Before any model loads: ``out`` is new, empty or this command's own run folder
    (:mod:`sinkscope.ownership`; with ``resume``, of the same ``settings``, and with a readable
    ``train_log.jsonl``; without, holding no earlier run) and ``cache_dir`` a feature cache's."""
    marker = ownership.check(out, kind, ownership.OUTPUTS[kind], settings, resume=resume)
    if marker is not None and ownership.own_files(out) and not resume:
        raise ownership.FolderRefused(
            f"--out {out} holds an earlier {kind} run; pass --resume to continue it or choose a new folder"
        )
    if resume:
        _read_log(out / "train_log.jsonl", None)
    if cache_dir is not None:
        ownership.check(cache_dir, "feature-cache", ownership.OUTPUTS["feature-cache"], option="--cache-dir")


def _trainable_projector(m: nn.Module, init: str | Path | None) -> nn.Module:
    """Freeze the model, load ``init`` into its projector (when given) and make that trainable."""
    for p in m.parameters():
        p.requires_grad_(False)
    projector = _projector(m)
    if init is not None:
        try:
            projector.load_state_dict(read_weights(init, "--init"))
        except RuntimeError as e:  # missing keys, other shapes
            raise SinkscopeError(f"--init {init}: not a projector of this model ({_first_problem(e)})") from None
    for p in projector.parameters():
        p.requires_grad_(True)
    return projector


def _restore(ck: Path, m, opt, sched) -> tuple[int, int]:
    """Load the checkpoint in ``ck`` (when there is one); ``(step, sequences seen)`` to go on from."""
    if not (ck / "state.pt").exists():
        return 0, 0
    from safetensors.torch import load_file

    _projector(m).load_state_dict(load_file(str(ck / "projector.safetensors")))
    if (ck / "lora.safetensors").exists():
        _load_lora(m, ck / "lora.safetensors", "checkpoint")
    st = torch.load(ck / "state.pt", weights_only=False)
    opt.load_state_dict(st["optimizer"])
    sched.load_state_dict(st["scheduler"])
    return int(st["step"]), int(st["seen"])


def read_weights(path: str | Path, option: str) -> dict[str, torch.Tensor]:
    """The tensors of the ``.safetensors`` file ``path`` given as ``option``; a missing or
    unreadable file is refused in one line naming the option and the file."""
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise SinkscopeError(f"{option}: no file {path}")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors' SafetensorError, an OSError
        raise SinkscopeError(f"{option} {path}: not a readable .safetensors file ({str(e).splitlines()[0]})") from None


def check_weight_files(**files: str | Path | None) -> None:
    """Before any model loads: each given ``option=path`` (``init``, ``init_lora``) is a readable
    ``.safetensors`` file (its header is read; the shapes are checked against the model later)."""
    from safetensors import safe_open

    for name, path in files.items():
        if path is None:
            continue
        option = "--" + name.replace("_", "-")
        if not Path(path).is_file():
            raise SinkscopeError(f"{option}: no file {path}")
        try:
            with safe_open(str(path), "pt") as f:
                f.keys()
        except Exception as e:
            raise SinkscopeError(f"{option} {path}: not a readable .safetensors file ({str(e).splitlines()[0]})") from None


def _first_problem(e: Exception) -> str:
    """The first specific line of a ``load_state_dict`` error (a size mismatch or a missing key)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return next((ln for ln in lines[1:] if ln), lines[0] if lines else type(e).__name__)


def _lora_rank(path: str | Path, rank: int | None) -> int:
    """The rank of the LoRA file ``path`` (its metadata), checked against ``rank`` when given."""
    from safetensors import safe_open

    if not Path(path).is_file():
        raise SinkscopeError(f"--init-lora: no file {path}")
    try:
        with safe_open(str(path), "pt") as f:
            found = int((f.metadata() or {}).get("rank", 0))
    except Exception as e:  # a corrupt header, a rank that is not a number
        raise SinkscopeError(f"--init-lora {path}: not a readable LoRA file ({str(e).splitlines()[0]})") from None
    if not found or (rank is not None and rank != found):
        raise SinkscopeError(f"init_lora {path}: rank {found or 'unknown'} in the file, {rank} asked")
    return found


def _load_lora(m: nn.Module, path: str | Path, option: str = "--init-lora") -> None:
    """Load a ``lora.safetensors`` (keys as :func:`_lora_state` writes them) into ``m``'s adapters."""
    lora = {k.replace(".weight", ".default.weight"): v for k, v in read_weights(path, option).items()}
    try:
        missing = m.model.language_model.load_state_dict(lora, strict=False)
    except RuntimeError as e:  # a size mismatch
        raise SinkscopeError(f"{option} {path}: LoRA weights do not fit this run ({_first_problem(e)})") from None
    if missing.unexpected_keys:
        raise SinkscopeError(f"{option} {path}: LoRA weights do not fit this run ({missing.unexpected_keys[0]})")


def _record(out: Path, rec: dict, m, lora, opt, sched, end: int, save_every: int, snapshot_every: int | None) -> None:
    """The main process's bookkeeping after a step: the log line, the checkpoint, the snapshot."""
    step = rec["step"]
    with (out / "train_log.jsonl").open("a") as f:
        f.write(json.dumps(rec) + "\n")
    if step % save_every == 0 or step == end:
        _save_checkpoint(out / "checkpoint", m, lora, opt, sched, step, rec["seen"])
    if snapshot_every and step % snapshot_every == 0:  # for learning curves
        _save_weights(out / "snapshots", m, lora, f"-step-{step:06d}")


def _read_log(path: Path, upto: int | None) -> list[dict]:
    """The log lines of steps ``<= upto`` (a resumed run drops the lines of steps it will redo and
    rewrites the file; ``upto=None`` only reads it). A line that is not a step's JSON record is
    refused in one line naming the file (a torn last line from a kill is dropped)."""
    if not path.exists():
        return []
    text = path.read_text(errors="replace")
    lines = [x for x in text.splitlines() if x.strip()]
    rows = []
    for i, x in enumerate(lines, 1):
        try:
            r = json.loads(x)
        except json.JSONDecodeError:
            r = None
        if not (isinstance(r, dict) and isinstance(r.get("step"), int)):
            if i == len(lines) and r is None and not text.endswith("\n"):  # torn by a kill while written
                continue
            raise SinkscopeError(f"{path}: line {i} is not a training step's record; cannot resume this run")
        rows.append(r)
    if upto is None:
        return rows
    rows = [r for r in rows if r["step"] <= upto]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _finish(
    out, ck, ad, stage, steps, batch_size, lr, n_per_task, turns, real, seed, log, n_examples, acc, extra: dict
) -> dict:
    summary = {
        "analysis": "train-projector",
        "model": ad.name,
        "stage": stage,
        "steps": steps,
        "batch_size": batch_size,
        "num_processes": acc.num_processes,
        "lr": lr,
        "n_per_task": n_per_task,
        "turns": turns,
        "real": list(real),
        "seed": seed,
        **extra,
        "examples": n_examples,
        "sequences_seen": log[-1]["seen"] if log else 0,
        "final_loss": log[-1]["loss"] if log else None,
        "seconds": log[-1]["s"] if log else 0,
        "versions": package_versions(("sinkscope", "torch", "transformers", "accelerate")),
    }
    if acc.is_main_process:
        shutil.copy(ck / "projector.safetensors", out / "projector.safetensors")
        if extra.get("lora"):
            shutil.copy(ck / "lora.safetensors", out / "lora.safetensors")
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


__all__ = ["LORA_TARGETS", "STAGES", "TrainResult", "train_projector"]
