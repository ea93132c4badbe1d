"""The ``sinkscope`` command line: :func:`main` is the console script ``sinkscope``.

Examples::

    sinkscope scan                                   # dinov2-small on the embedded images
    sinkscope scan --model tiny-dinov2+sinks --method all --out runs/tiny
    sinkscope probe --dataset lfw-faces --out runs/probe    # linear probes per layer and token group
    sinkscope flow --out runs/flow                   # information pathways on mini-llava
    sinkscope report runs/x runs/probe runs/flow --out report.html   # one offline HTML page
    sinkscope models                                 # embedded model names

(the full list ends ``sinkscope --help``: :data:`~sinkscope.cli.examples.MAIN_EXAMPLES`).

The package, read in this order:

- :mod:`sinkscope.cli.parser` - :func:`build_parser`, one small ``_add_<command>`` per subcommand;
- :mod:`sinkscope.cli.commands` - the ``*_config(args)`` builders (options -> a run config of
  :mod:`sinkscope.config`) and the ``_cmd_*`` functions that run a subcommand and print a summary;
- :mod:`sinkscope.cli.examples` - the examples each ``--help`` ends with;
- this module - :func:`main` (dispatch, logging, exit statuses), re-exporting the names above.

``sinkscope figures`` is handed whole to ``python -m sinkscope.figures`` (its own parser). The
modules of this package import each other; no module outside it imports it.
"""

from __future__ import annotations

import logging
import sys

from .._utils import SinkscopeError
from ..ownership import FolderRefused
from .commands import (
    COMMANDS,
    UsageError,
    decode_config,
    flow_config,
    probe_config,
    scan_config,
)
from .commands import _cmd_decode as _cmd_decode
from .commands import _cmd_flow as _cmd_flow
from .commands import _cmd_models as _cmd_models
from .commands import _cmd_probe as _cmd_probe
from .commands import _cmd_report as _cmd_report
from .commands import _cmd_scan as _cmd_scan
from .commands import _config as _config
from .commands import _tuple as _tuple
from .diysink_cmd import cmd_diysink
from .eval_cmd import cmd_eval
from .examples import (
    DECODE_EXAMPLES,
    FLOW_EXAMPLES,
    MAIN_EXAMPLES,
    PROBE_EXAMPLES,
    REPORT_EXAMPLES,
    SCAN_EXAMPLES,
)
from .parser import _image_size as _image_size
from .parser import build_parser
from .train_cmd import cmd_train


def main(argv: list[str] | None = None) -> int:
    """Run ``sinkscope`` with ``argv`` (default: ``sys.argv[1:]``) and return the exit status.

    0 on success; 2 for a usage error (a bad option value, reported in one line before any work)
    or no subcommand; 1 for any other :class:`~sinkscope._utils.SinkscopeError`; 130 when
    interrupted. Options argparse itself refuses exit with status 2 (``SystemExit``), as before.

    >>> main(["scan", "--batch-size", "0"])  # "sinkscope scan: error: batch_size: ..." on stderr
    2
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["figures"]:  # its own parser: every option of python -m sinkscope.figures
        from ..figures.cli import main as figures_main

        return figures_main(argv[1:])
    parser = build_parser()  # no option abbreviations (parser._no_abbreviations)
    a = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if a.verbose else logging.INFO, format="%(levelname)s: %(message)s"
    )
    for noisy in ("transformers", "urllib3", "huggingface_hub", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if a.command is None:
        parser.print_help()
        return 2
    try:
        _check_layers(a)
        return {**COMMANDS, "eval": cmd_eval, "train-projector": cmd_train, "diysink": cmd_diysink}[a.command](a)
    except (UsageError, FolderRefused) as e:  # refused before any work: a folder in the way is a usage error
        print(f"sinkscope {a.command}: error: {e}", file=sys.stderr)
        return 2
    except SinkscopeError as e:
        print(f"sinkscope: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"sinkscope {a.command}: interrupted; {interrupted_keeps(a)}", file=sys.stderr)
        return 130


def _check_layers(a) -> None:
    """``--layers`` / ``--save-layers`` against the model's layer count read from its config, so a
    layer past the model is a usage error before any weight loads (exit 2; a model whose size only
    loading tells is checked as its run starts, as before).

    >>> from argparse import Namespace
    >>> _check_layers(Namespace(model="tiny-dinov2", layers="1,99"))
    Traceback (most recent call last):
    ...
    sinkscope.cli.commands.UsageError: --layers: layer 99 is out of range: the model has layers 0..4
    """
    specs = {opt: getattr(a, dest, None) for opt, dest in (("--layers", "layers"), ("--save-layers", "save_layers"))}
    specs = {k: v for k, v in specs.items() if v is not None and str(v).strip() and str(v).strip() != "all"}
    rule = getattr(a, "sink_rule", None)
    rule_layer = None
    if rule and "@" in str(rule):
        from ..interventions.rules import rule_from

        try:
            rule_layer = rule_from(rule).layer
        except SinkscopeError:
            rule_layer = None  # a malformed rule is refused by its command, with the grammar
    if not (specs or rule_layer is not None) or not getattr(a, "model", None):
        return
    from ..capture import parse_layers
    from ..models import known_layer_count

    n = known_layer_count(a.model)
    if n is None:
        return
    for opt, spec in specs.items():
        try:
            parse_layers(spec, n)
        except SinkscopeError as e:
            raise UsageError(f"{opt}: {e}") from None
    if rule_layer is not None and not -(n + 1) <= rule_layer <= n:
        raise UsageError(f"--sink-rule: layer {rule_layer} is out of range: the model's ViT has hidden states 0..{n}")


def interrupted_keeps(a) -> str:
    """What an interrupted command leaves to go on from (the line ``main`` prints on Ctrl-C).

    >>> from argparse import Namespace
    >>> interrupted_keeps(Namespace(command="eval"))
    'the answered questions are kept in predictions.jsonl - rerun with --resume'
    """
    steps = "the training steps up to the last checkpoint (every --save-every steps) are kept - rerun with --resume"
    if a.command == "diysink" and getattr(a, "diysink_command", None) == "init":
        return "nothing is kept - rerun the command"
    return {
        "scan": "the finished images are kept - rerun with --resume",
        "eval": "the answered questions are kept in predictions.jsonl - rerun with --resume",
        "train-projector": steps,
        "diysink": steps,
    }.get(a.command, "nothing is kept - rerun the command")




__all__ = [
    "COMMANDS",
    "DECODE_EXAMPLES",
    "FLOW_EXAMPLES",
    "MAIN_EXAMPLES",
    "PROBE_EXAMPLES",
    "REPORT_EXAMPLES",
    "SCAN_EXAMPLES",
    "UsageError",
    "build_parser",
    "decode_config",
    "flow_config",
    "main",
    "probe_config",
    "scan_config",
]
