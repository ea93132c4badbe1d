"""``sinkscope diysink init`` / ``sinkscope diysink train``: the dual-connector model and its stages.

>>> from sinkscope.cli.parser import build_parser
>>> a = build_parser().parse_args(["diysink", "train", "--model", "runs/d", "--stage", "router", "--out", "runs/r"])
>>> c = diysink_config(a)
>>> c.stage, c.batch_size, c.lr, c.epochs
('router', 20, 0.01, 10)
"""

from __future__ import annotations

import argparse
import os

DIYSINK_EXAMPLES = """
examples:
  sinkscope diysink init --model mini-llava --out runs/dual                  # both MLPs copies, weights 1
  sinkscope diysink train --model runs/dual --stage 1 --steps 150 --out runs/dual-s1
  sinkscope diysink train --model runs/dual-s1 --stage 2 --steps 150 --out runs/dual-s2
  sinkscope diysink train --model runs/dual-s2 --stage router --out runs/dual-rew   # 120 questions, 10 epochs
  sinkscope eval --model runs/dual-rew --variant baseline,dual,dual-sink-only,dual-nonsink-only,cot,rew --out runs/cmp
  accelerate launch --num_processes 8 .venv/bin/sinkscope diysink train ...          # data-parallel on GPUs
"""


def add_diysink(sub) -> None:
    """``sinkscope diysink`` with its ``init`` and ``train`` subcommands."""
    d = sub.add_parser(
        "diysink",
        help="DIYSink: build the dual-MLP connector model and train its stages",
        description="DIYSink (the paper's trained method): a dual-MLP connector for sink and non-sink visual "
        "tokens, trained in two stages, with a ReW question router.",
        epilog=DIYSINK_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    dsub = d.add_subparsers(dest="diysink_command", metavar="STEP", required=True)
    i = dsub.add_parser("init", help="the dual model from a LLaVA's own projector (no training)", epilog=DIYSINK_EXAMPLES,
                        formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    i.add_argument("--model", default="mini-llava", help="a LLaVA-style model (default: %(default)s)")
    i.add_argument("--sink-rule", default=None, help="norm, norm:100, norm:x4, topk:4 or cls (default: the model's default rule)")
    i.add_argument("--out", default="runs/diysink", help="output folder (the model in OUT/model; default: %(default)s)")
    i.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    t = dsub.add_parser("train", help="train stage 1, stage 2 or the ReW router", epilog=DIYSINK_EXAMPLES,
                        formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    t.add_argument("--model", required=True, help="a dual model folder (diysink init or an earlier stage)")
    t.add_argument("--stage", required=True, choices=("1", "2", "router"))
    t.add_argument("--steps", type=int, default=None, help="optimizer steps, stages 1 and 2 (default: 100)")
    t.add_argument("--batch-size", type=int, default=None, help="conversations per step and process (default: 4; router: 20)")
    t.add_argument("--lr", type=float, default=None, help="peak learning rate, cosine (default: 1e-3; router: 1e-2)")
    t.add_argument("--warmup", type=float, default=0.03, help="warm-up share of the steps (default: %(default)s)")
    t.add_argument("--n-per-task", type=int, default=200, help="shapes questions per task, stages 1 and 2 (default: %(default)s)")
    t.add_argument("--turns", type=int, default=4, help="questions per conversation (default: %(default)s)")
    t.add_argument("--real", action="append", choices=("textile", "lfw-faces", "digits"), help="real-image sets (repeatable; default: all three)")
    t.add_argument("--no-real", action="store_true", help="shapes only")
    t.add_argument("--real-limit", type=int, default=None, help="training questions per real-image set (default: all)")
    t.add_argument("--mlps", default="sink,nonsink", help="stage 1: which MLPs train (default: %(default)s)")
    t.add_argument("--llm", default="lora", choices=("lora", "full", "frozen"),
                   help="stage 2: how the LLM trains with the connector - LoRA adapters merged when saved, every weight, "
                   "or not at all (default: %(default)s)")  # fmt: skip
    t.add_argument("--lora-rank", type=int, default=None, help="stage 2, --llm lora: the adapters' rank (default: 16)")
    t.add_argument("--llm-lr", "--lora-lr", dest="llm_lr", type=float, default=None,
                   help="stage 2: the LLM's learning rate (default: 2e-4 with LoRA, 2e-5 with --llm full)")  # fmt: skip
    t.add_argument("--samples", type=int, default=120, help="router: questions, balanced over task types (default: %(default)s)")
    t.add_argument("--epochs", type=int, default=10, help="router: epochs (default: %(default)s)")
    t.add_argument("--router-hidden", type=int, default=128, help="router: hidden units (default: %(default)s)")
    t.add_argument("--router-norm", default=None, choices=("x2-softmax", "softmax", "sigmoid"), help="router: weight normalisation (default: x2-softmax)")
    t.add_argument("--encoder", default=None, help="router: question encoder folder or hub id (default: offline all-MiniLM-L6-v2)")
    t.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    t.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps (default: %(default)s)")
    t.add_argument("--mixed-precision", default="no", choices=("no", "bf16", "fp16"), help="(default: %(default)s)")
    t.add_argument("--cache-dir", default=None, help="feature cache folder (default: OUT/features)")
    t.add_argument("--device", default=None, help="cpu, cuda (default: accelerate's choice)")
    t.add_argument("--out", required=True, help="output folder (the trained model in OUT/model)")
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    t.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def diysink_config(a: argparse.Namespace):
    """``sinkscope diysink ...`` options -> :class:`~sinkscope.config.DIYSinkInitConfig` or
    :class:`~sinkscope.config.DIYSinkTrainConfig` (the router stage defaults to the paper's batch 20, lr 1e-2)."""
    from ..config import DIYSinkInitConfig, DIYSinkTrainConfig

    if a.diysink_command == "init":
        return DIYSinkInitConfig(model=a.model, sink_rule=a.sink_rule, out=a.out)
    router = a.stage == "router"
    real = () if a.no_real else tuple(a.real or ("textile", "lfw-faces", "digits"))
    return DIYSinkTrainConfig(
        model=a.model, stage=a.stage, steps=a.steps, batch_size=a.batch_size or (20 if router else 4),
        lr=a.lr or (1e-2 if router else 1e-3), warmup=a.warmup, n_per_task=a.n_per_task, turns=a.turns, real=real,
        real_limit=a.real_limit, mlps=tuple(x.strip() for x in a.mlps.split(",") if x.strip()), llm=a.llm,
        lora_rank=a.lora_rank, llm_lr=a.llm_lr, samples=a.samples, epochs=a.epochs, router_hidden=a.router_hidden, router_norm=a.router_norm,
        encoder=a.encoder, seed=a.seed, save_every=a.save_every, mixed_precision=a.mixed_precision,
        cache_dir=a.cache_dir, device=a.device, out=a.out, resume=a.resume,
    )  # fmt: skip


def cmd_diysink(a: argparse.Namespace) -> int:
    """Run ``sinkscope diysink init|train`` and say what it wrote."""
    from ..api import run
    from .commands import _config

    res = run(_config(lambda: diysink_config(a)), progress=not a.quiet)
    s = res.summary
    if int(os.environ.get("RANK", "0")) != 0:  # under accelerate launch the main process reports
        return 0
    if a.diysink_command == "init":
        print(f"dual model of {s['model']}: {s['rule_description']} ({s['rule_reason']}); weights {s['weights']}")
    else:
        print(f"stage {s['stage']}: {s['steps']} steps, trained {', '.join(s['trained'])}: loss {s['first_loss']:.3f} -> {s['final_loss']:.3f} in {s['seconds']:.0f} s")
    print(f"wrote {a.out}/model (sinkscope eval --model {a.out} ...)")
    return 0


__all__ = ["DIYSINK_EXAMPLES", "add_diysink", "cmd_diysink", "diysink_config"]
