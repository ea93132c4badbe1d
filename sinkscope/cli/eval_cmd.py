"""``sinkscope eval``: its arguments, its config and its command.

>>> from sinkscope.cli.parser import build_parser
>>> a = build_parser().parse_args(["eval", "--model", "tiny-llava", "--tasks", "shapes,digits", "--limit", "4"])
>>> eval_config(a).tasks, eval_config(a).limit
(('shapes', 'digits'), 4)
"""

from __future__ import annotations

import argparse

EVAL_EXAMPLES = """
examples:
  sinkscope eval --model mini-llava --tasks shapes --out runs/eval          # Global / Local / Mixed
  sinkscope eval --model mini-llava --tasks shapes,textile,lfw-faces,digits --variant default \\
      --variant no-image --limit 100 --out runs/eval-all                   # with the blind baseline
  sinkscope eval --model M --tasks my_questions.jsonl --out runs/mine       # a manifest of your own
  sinkscope eval --model llava-hf/llava-1.5-7b-hf --tasks hf:lmms-lab/MME:test --mode generate \\
      --device cuda --dtype float16 --out runs/mme                         # MME's score, on a GPU
  sinkscope eval --model mini-llava --tasks shapes --variant both,sinks-front,sink-only,nonsink-only,random-k \
      --out runs/eval-sinks                                                # visual-token interventions
  sinkscope eval ... --resume                                               # continue a killed run
"""


def add_eval(sub) -> None:
    """``sinkscope eval``: model, tasks, split, limit, variants, mode, run options."""
    e = sub.add_parser(
        "eval",
        help="accuracy per task type (Global / Local / Mixed): predictions.jsonl, results.csv, eval.html",
        description="Ask a LLaVA-style model the questions of built-in sets, manifests or hub datasets; score "
        "multiple choice by log-likelihood (one prompt forward, candidates from its cache) or open answers by "
        "exact match; report accuracy per task type and task with bootstrap intervals and chance.",
        epilog=EVAL_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    e.add_argument("--model", default="mini-llava", help="a LLaVA-style model (default: %(default)s)")
    e.add_argument(
        "--tasks",
        default="shapes",
        help="comma-separated: shapes, shapes-heldout (test only: another renderer), textile, lfw-faces, digits, a manifest (.jsonl/.csv), hf:NAME[:SPLIT] or a "
        "dataset folder (the hub's parquet layout or save_to_disk); an MME set must have two questions per image "
        "(default: %(default)s)",
    )
    e.add_argument(
        "--split", default="test", choices=("train", "validation", "test"), help="(default: %(default)s)"
    )
    e.add_argument("--limit", type=int, default=None, help="items per task (default: all)")
    e.add_argument(
        "--variant",
        action="append",
        help="repeatable or comma-separated: default (the model as loaded), no-image (the image removed), and "
        "the visual-token interventions both, sinks-front, sinks-end, sink-only, nonsink-only, random-k, "
        "lowest-norm-k (compared with both on the same items), var, tt-register, and for a DIYSink model "
        "baseline, dual, dual-sink-only, dual-nonsink-only, cot, cot-score, rew (compared with baseline) (default: default)",
    )
    e.add_argument(
        "--sink-rule",
        default=None,
        help="which visual tokens are ViT sinks, for the interventions: norm (automatic gap), norm:100, norm:x4, "
        "topk:4, attention:4, cls; @LAYER picks the ViT layer (default: the model's, named in summary.json)",
    )
    e.add_argument(
        "--var", default=None, metavar="KEY=VALUE,...",
        help="VAR settings for --variant var: p, rho, alpha, tau, start_layer, sink_dims (e.g. p=0.6,tau=20 or "
        "sink_dims=1415+2533) (default: Kang et al.'s, sink dims discovered)",
    )  # fmt: skip
    e.add_argument(
        "--tt-neurons", default=None, metavar="BLOCK:NEURON,...",
        help="register neurons for --variant tt-register (default: the top 10 found on 32 training scenes)",
    )  # fmt: skip
    e.add_argument(
        "--tt-patches", default="zero", choices=("zero", "mean"),
        help="what the patches keep at the register neurons (default: %(default)s)",
    )  # fmt: skip
    e.add_argument("--router", default=None, help="ReW router folder for --variant rew (default: MODEL/model/router)")
    e.add_argument(
        "--positions", default="reindex", choices=("reindex", "keep"),
        help="position ids of the intervened sequence: renumbered, or each token's original (default: %(default)s)",
    )  # fmt: skip
    e.add_argument(
        "--mode", default="auto", choices=("auto", "choice", "generate"), help="(default: %(default)s)"
    )
    e.add_argument(
        "--chat", default="auto", choices=("auto", "yes", "no"), help="chat template (default: %(default)s)"
    )
    e.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: %(default)s)")
    e.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cuda if available)")
    e.add_argument("--dtype", default=None, help="float32, float16, bfloat16 (default: the model's)")
    e.add_argument("--out", default="sinkscope-eval", help="output folder (default: %(default)s)")
    e.add_argument(
        "--resume", action="store_true", help="continue the run in --out (no question is asked twice)"
    )
    e.add_argument("--overwrite", action="store_true", help="start --out afresh")
    e.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def eval_config(a: argparse.Namespace):
    """``sinkscope eval`` options -> :class:`~sinkscope.config.EvalConfig`."""
    from ..config import EvalConfig

    return EvalConfig(
        model=a.model,
        tasks=tuple(t.strip() for t in a.tasks.split(",") if t.strip()),
        split=a.split,
        limit=a.limit,
        variants=tuple(v.strip() for arg in (a.variant or ["default"]) for v in arg.split(",") if v.strip()),
        sink_rule=a.sink_rule,
        positions=a.positions,
        var=_var_settings(a.var),
        tt_register=_tt_settings(a.tt_neurons, a.tt_patches),
        router=a.router,
        mode=a.mode,
        chat=a.chat,
        seed=a.seed,
        device=a.device,
        dtype=a.dtype,
        out=a.out,
        resume=a.resume,
        overwrite=a.overwrite,
    )


def _var_settings(text: str | None) -> dict | None:
    """``p=0.6,tau=20,sink_dims=1415+2533`` -> the dict of :class:`~sinkscope.interventions.VAR`.

    >>> _var_settings("p=0.5,sink_dims=3+9")
    {'p': 0.5, 'sink_dims': [3, 9]}
    """
    from .._utils import SinkscopeError

    if not text:
        return None
    out: dict = {}
    for part in text.split(","):
        key, eq, value = part.partition("=")
        key = key.strip()
        try:
            if not eq:
                raise ValueError
            if key == "sink_dims":
                out[key] = [int(d) for d in value.split("+")]
            elif key == "start_layer":
                out[key] = int(value)
            elif key in ("p", "rho", "alpha", "tau"):
                out[key] = float(value)
            else:
                raise SinkscopeError(f"--var {key!r}: expected p, rho, alpha, tau, start_layer or sink_dims")
        except ValueError:
            raise SinkscopeError(f"--var {part!r}: expected KEY=VALUE (e.g. p=0.6, sink_dims=1415+2533)") from None
    return out


def _tt_settings(neurons: str | None, patches: str) -> dict | None:
    """``1:0,3:17`` -> the dict of :class:`~sinkscope.interventions.TestTimeRegister`.

    >>> _tt_settings("1:0,3:17", "zero")
    {'neurons': [[1, 0], [3, 17]], 'patches': 'zero'}
    """
    from .._utils import SinkscopeError

    if not neurons:
        return None if patches == "zero" else {"patches": patches}
    try:
        pairs = [[int(x) for x in part.split(":")] for part in neurons.split(",")]
        if any(len(p) != 2 for p in pairs):
            raise ValueError
    except ValueError:
        raise SinkscopeError(f"--tt-neurons {neurons!r}: expected BLOCK:NEURON pairs, e.g. 1:0,3:17") from None
    return {"neurons": pairs, "patches": patches}


def _sets_checked(cfg):
    """``cfg``, once its MME sets pair two questions per image (else a usage error, exit 2)."""
    from ..evaluation.items import check_task_sets

    check_task_sets(cfg.tasks)
    return cfg


def cmd_eval(a: argparse.Namespace) -> int:
    """Run ``sinkscope eval`` and print accuracy per task type and variant."""
    from ..api import run
    from .commands import _config

    res = run(_config(lambda: _sets_checked(eval_config(a))), progress=not a.quiet)
    t = res.results[res.results.task == "*"]
    cols = ["variant", "task_type", "n", "accuracy", "ci_low", "ci_high", "chance"]
    print(t[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if res.paired is not None and len(res.paired):
        iv = res.summary["interventions"]
        if "rule_description" in iv:
            print(f"\n{iv['rule_description']} ({iv['rule_reason']}); position ids: {iv['positions']}")
        if "var" in res.summary:
            print(f"{res.summary['var']['description']}; sink dims used: {res.summary['var']['sink_dims_used']}")
        if "diysink" in res.summary:
            ds = res.summary["diysink"]
            print(f"DIYSink: {ds['rule_description']}; seconds per question: {ds.get('seconds_per_question')}")
            for name in ("cot", "cot-score"):
                if name in ds:
                    c = ds[name]
                    print(f"{name} routes {c['routes']}, {c['fallbacks']} of {c['n']} unparseable (fell back to both)")
            if "rew" in ds:
                print(f"ReW mean [w_sink, w_nonsink] per task type: {ds['rew']['mean_weights']}")
        pcols = ["variant", "task_type", "n", "accuracy", "diff", "ci_low", "ci_high", "p_mcnemar"]
        print(res.paired[pcols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"wrote predictions.jsonl, results.csv, summary.json and eval.html to {a.out}")
    return 0


__all__ = ["EVAL_EXAMPLES", "add_eval", "cmd_eval", "eval_config"]
