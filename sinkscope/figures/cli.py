"""Command line of ``python -m sinkscope.figures`` (and ``make figures``)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .._utils import SinkscopeError, check_out_folder
from .regen import _figure_is_fresh, load_manifest, read_run_meta, regenerate, render_key
from .spec import RENDER_SOURCES, FigureList, load_figure_list, run_fingerprint, source_digest

EXAMPLES = """examples:
  python -m sinkscope.figures                          # the ci tier (offline, a few minutes); fresh work is skipped
  python -m sinkscope.figures --list                   # figures, tiers, runs and what is up to date
  python -m sinkscope.figures --only dinov2-norms --only 'probe-*'
  python -m sinkscope.figures --force --no-png         # rerun every ci analysis, HTML only
  python -m sinkscope.figures --tier paper             # CLIP ViT-L/14-336 and LLaVA-1.5-7B: hub + GPU
  python -m sinkscope.figures -f my-figures.toml --out /tmp/figs
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m sinkscope.figures``."""
    p = argparse.ArgumentParser(
        prog="python -m sinkscope.figures",
        description="Regenerate the project's figures from the declarative list figures/figures.toml: run each "
        "needed analysis once (skipping fresh results), then draw every figure from the saved results into "
        "OUT/<name>.html and OUT/<name>.png, recorded in OUT/manifest.json.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument("-f", "--file", default=None, help="the figure list (default: figures/figures.toml)")
    p.add_argument("--out", default=None, help="output folder (default: 'out' next to the list)")
    p.add_argument(
        "--tier",
        choices=["ci", "paper", "all"],
        default="ci",
        help="which figures: ci = offline, small (default); paper = hub models, GPU; all",
    )
    p.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help="only this figure (repeatable; shell patterns like 'probe-*'; any tier)",
    )
    p.add_argument("--force", action="store_true", help="rerun the analyses and redraw even if up to date")
    p.add_argument("--list", action="store_true", help="list the figures and their state; run nothing")
    p.add_argument("--no-png", action="store_true", help="HTML only (no kaleido/Chromium)")
    p.add_argument(
        "--self-contained",
        action="store_true",
        help="embed plotly.js in every HTML file (default: shared copy)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars from the analyses")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging (tracebacks of failures)")
    return p


def list_figures(spec: FigureList, out: Path, tier: str = "ci", only: list[str] | None = None) -> str:
    """A table of every figure (selected ones marked ``*``) with its tier, kind, run and state."""
    selected = {f.name for f in spec.select(tier=tier, only=only)}
    manifest = load_manifest(out)
    code = source_digest(RENDER_SOURCES)
    fps = {rid: run_fingerprint(run)[0] for rid, run in spec.runs.items()}
    lines = [
        f"figure list {spec.path} -> {out}   (* = selected by --tier {tier}"
        + (" / --only" if only else "")
        + ")"
    ]
    w = max(len(f.name) for f in spec.figures) + 2
    wr = max(len(r) for r in spec.runs) + 2
    wk = max(len(f.kind) for f in spec.figures) + 2
    lines.append(f"  {'FIGURE':<{w}}{'TIER':<7}{'KIND':<{wk}}{'RUN':<{wr}}STATE")
    for f in spec.figures:
        run_dir = out / "runs" / f.run_id
        run_fresh = read_run_meta(run_dir).get("fingerprint") == fps[f.run_id]
        old = manifest["figures"].get(f.name)
        key = render_key(f, fps[f.run_id], code, False)
        files = (old or {}).get("files") or [f"{f.name}.html"]
        if not run_fresh:
            state = "results missing or stale: the analysis will run"
        elif _figure_is_fresh(out, old, key, files, run_dir) or _figure_is_fresh(
            out, old, render_key(f, fps[f.run_id], code, True), files, run_dir
        ):
            state = "up to date (" + ", ".join(Path(x).suffix[1:] for x in files) + ")"
        else:
            state = "results fresh; figure will be drawn"
        if f.tier == "paper" and f.name not in selected:
            state += "  [paper tier: --tier paper or --only]"
        mark = "*" if f.name in selected else " "
        lines.append(f"{mark} {f.name:<{w}}{f.tier:<7}{f.kind:<{wk}}{f.run_id:<{wr}}{state}")
    lines.append("runs:")
    for rid, run in spec.runs.items():
        lines.append(f"  {rid:<{wr}}{run.tier:<7}{run.recipe()}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the command; 0 = all selected figures up to date, 1 = some failed, 2 = bad list or arguments."""
    a = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if a.verbose else logging.INFO, format="%(levelname)s: %(message)s"
    )
    for noisy in (
        "transformers",
        "urllib3",
        "huggingface_hub",
        "filelock",
        "kaleido",
        "choreographer",
        "logistro",
    ):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if a.quiet:
        try:  # transformers' "Loading weights" bar
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except ImportError:
            pass
    try:
        spec = load_figure_list(a.file)
        out = Path(a.out) if a.out else spec.path.parent / "out"
        if a.list:
            print(list_figures(spec, out, a.tier, a.only))
            return 0
        spec.select(tier=a.tier, only=a.only)  # unknown --only names fail before any work
        check_out_folder(out, "--out")  # a file, or a folder that cannot be written: before any work
        rep = regenerate(
            out=out,
            tier=a.tier,
            only=a.only,
            force=a.force,
            png=not a.no_png,
            self_contained=a.self_contained,
            progress=not a.quiet,
            echo=lambda s: print(s, flush=True),
            figure_list=spec,
        )
    except SinkscopeError as e:
        print(f"sinkscope.figures: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sinkscope.figures: interrupted; finished runs and figures are kept", file=sys.stderr)
        return 130
    return 0 if rep.ok else 1
