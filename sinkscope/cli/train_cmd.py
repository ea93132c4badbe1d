"""``sinkscope train-projector``: its arguments, its config and its command.

>>> from sinkscope.cli.parser import build_parser
>>> a = build_parser().parse_args(["train-projector", "--model", "tiny-llava", "--steps", "3", "--real", "digits"])
>>> c = train_config(a)
>>> c.steps, c.real, c.stage
(3, ('digits',), 'vqa')
"""

from __future__ import annotations

import argparse

TRAIN_EXAMPLES = """
examples:
  sinkscope train-projector --model mini-llava-untrained --stage align --steps 300 --out runs/align
  sinkscope train-projector --model mini-llava-untrained --stage vqa --init runs/align/projector.safetensors \\
      --steps 800 --lora-rank 16 --mixed-precision bf16 --out runs/vqa   # then: sinkscope eval ...
  sinkscope train-projector ... --resume           # continue a killed run from its last checkpoint
  accelerate launch --num_processes 8 .venv/bin/sinkscope train-projector ...   # data-parallel on GPUs
"""


def add_train(sub) -> None:
    """``sinkscope train-projector``: model, stage, data, optimisation, checkpoints."""
    t = sub.add_parser(
        "train-projector",
        help="train a LLaVA projector on cached tower features (LM loss on answers)",
        description="Train the multi-modal projector of a LLaVA-style model with the LM loss on answer tokens, "
        "the tower and the LLM frozen, the tower's features cached on disk -> projector.safetensors, "
        "train_log.jsonl, summary.json, checkpoint/.",
        epilog=TRAIN_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.add_argument("--model", default="mini-llava", help="a LLaVA-style model (default: %(default)s)")
    t.add_argument("--stage", default="vqa", choices=("align", "vqa"), help="(default: %(default)s)")
    t.add_argument("--steps", type=int, default=100, help="optimizer steps (default: %(default)s)")
    t.add_argument(
        "--batch-size", type=int, default=4, help="conversations per step and process (default: %(default)s)"
    )
    t.add_argument(
        "--lr", type=float, default=1e-3, help="peak learning rate, cosine schedule (default: %(default)s)"
    )
    t.add_argument(
        "--warmup", type=float, default=0.03, help="warm-up share of the steps (default: %(default)s)"
    )
    t.add_argument(
        "--n-per-task", type=int, default=200, help="shapes questions per task (default: %(default)s)"
    )
    t.add_argument("--turns", type=int, default=4, help="questions per conversation (default: %(default)s)")
    t.add_argument(
        "--real",
        action="append",
        choices=("textile", "lfw-faces", "digits"),
        help="real-image sets (repeatable; default: all three)",
    )
    t.add_argument("--no-real", action="store_true", help="shapes only")
    t.add_argument(
        "--real-limit", type=int, default=None, help="training questions per real-image set (default: all)"
    )
    t.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    t.add_argument(
        "--save-every", type=int, default=50, help="checkpoint every N steps (default: %(default)s)"
    )
    t.add_argument("--snapshot-every", type=int, default=None, help="keep the projector every N steps in OUT/snapshots/")
    t.add_argument(
        "--lora-rank", type=int, default=None, help="also train LoRA adapters of this rank on the LLM (stage 2)"
    )
    t.add_argument("--lora-lr", type=float, default=2e-4, help="LoRA learning rate (default: %(default)s)")
    t.add_argument(
        "--mixed-precision", default="no", choices=("no", "bf16", "fp16", "auto"),
        help="autocast the forward (bf16: 1.7x faster on a CPU with AMX, many times slower on one without; "
        "auto: bf16 where this machine has AMX / AVX-512 BF16 or a bf16 GPU, else no; default: %(default)s)",
    )  # fmt: skip
    t.add_argument(
        "--stop-after", type=int, default=None,
        help="stop after this step of the --steps schedule (checkpointed; --resume goes on)",
    )  # fmt: skip
    t.add_argument(
        "--styles", action="store_true",
        help="draw each training scene in its own seeded render style (size, aspect, outline, shade, noise, "
        "texture, JPEG) instead of the evaluation's plain renderer",
    )  # fmt: skip
    t.add_argument("--init", default=None, help="a projector .safetensors to start from")
    t.add_argument(
        "--init-lora", default=None,
        help="a lora.safetensors to start the adapters from (with --init: go on from a finished run)",
    )  # fmt: skip
    t.add_argument("--cache-dir", default=None, help="feature cache folder (default: OUT/features)")
    t.add_argument("--device", default=None, help="cpu, cuda (default: accelerate's choice)")
    t.add_argument("--out", default="runs/projector", help="output folder (default: %(default)s)")
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    t.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def train_config(a: argparse.Namespace):
    """``sinkscope train-projector`` options -> :class:`~sinkscope.config.TrainProjectorConfig`."""
    from ..config import TrainProjectorConfig

    real = () if a.no_real else tuple(a.real or ("textile", "lfw-faces", "digits"))
    return TrainProjectorConfig(
        model=a.model, stage=a.stage, steps=a.steps, batch_size=a.batch_size, lr=a.lr, warmup=a.warmup,
        n_per_task=a.n_per_task, turns=a.turns, real=real, real_limit=a.real_limit, seed=a.seed, snapshot_every=a.snapshot_every, save_every=a.save_every,
        init=a.init, cache_dir=a.cache_dir, device=a.device, out=a.out, resume=a.resume,
        lora_rank=a.lora_rank, lora_lr=a.lora_lr, mixed_precision=a.mixed_precision,
        stop_after=a.stop_after, init_lora=a.init_lora, styles=a.styles,
    )  # fmt: skip


def cmd_train(a: argparse.Namespace) -> int:
    """Run ``sinkscope train-projector`` and print the loss at the start and the end."""
    from ..api import run
    from .commands import _config

    res = run(_config(lambda: train_config(a)), progress=not a.quiet)
    s = res.summary
    first = res.log[0]["loss"] if res.log else float("nan")
    done = f"{s['stopped_at']} of {s['steps']}" if s.get("stopped_at") else f"{s['steps']}"
    print(f"{done} steps, {s['sequences_seen']} conversations: loss {first:.3f} -> {s['final_loss']:.3f}")
    lora = " lora.safetensors," if s.get("lora") else ""
    print(f"wrote projector.safetensors,{lora} train_log.jsonl and summary.json to {a.out}")
    return 0


__all__ = ["TRAIN_EXAMPLES", "add_train", "cmd_train", "train_config"]
