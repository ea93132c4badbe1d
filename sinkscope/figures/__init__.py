"""Regenerate every figure of the project from a declarative list, with one command.

``figures/figures.toml`` names analysis runs (model, data, config params, tier) and figures
drawn from them (kind, options, title, caption). ``python -m sinkscope.figures`` (or
``make figures``) runs each needed analysis once into ``figures/out/runs/<run-id>/`` - skipping
runs whose inputs have not changed - and draws every figure from the saved results only into
``figures/out/<name>.html`` (interactive, offline) and ``figures/out/<name>.png`` (kaleido).
The ``ci`` tier runs offline on the embedded models in a few minutes; the ``paper`` tier holds
paper-scale configurations (CLIP ViT-L/14-336, LLaVA-1.5-7B from the hub, GPU) and runs only
when asked (``--tier paper`` or ``--only NAME``).

Example::

    python -m sinkscope.figures                      # the ci tier; a second call does no work
    python -m sinkscope.figures --list               # every figure, its tier and whether it is fresh
    python -m sinkscope.figures --only 'probe-*' --force --no-png
    python -m sinkscope.figures --tier paper         # needs the hub and a GPU

From Python::

    >>> from sinkscope.figures.spec import write_example_spec
    >>> _ = write_example_spec("figs.toml")  # two figures of one tiny scan
    >>> from sinkscope.figures import regenerate
    >>> rep = regenerate("figs.toml", tier="ci", png=False, progress=False, echo=None)   # a small list
    >>> rep.ok, [(f.name, f.status) for f in rep.figures], sorted(p.name for p in rep.out.glob("*.html"))
    (True, [('tiny-norms', 'rendered'), ('tiny-counts', 'rendered')], ['tiny-counts.html', 'tiny-norms.html'])
    >>> [f.status for f in regenerate("figs.toml", png=False, progress=False, echo=None).figures]  # nothing changed
    ['fresh', 'fresh']

A new figure kind is one :func:`register_kind` call (see :mod:`sinkscope.figures.kinds`).
"""

from .kinds import KINDS, FigureKind, RunData, register_kind
from .regen import FigureOutcome, RegenReport, RunOutcome, execute_run, load_manifest, regenerate
from .render import PngExporter, draw, write_html
from .spec import FigureList, FigureSpec, RunSpec, SpecError, load_figure_list, run_fingerprint

__all__ = [
    "KINDS",
    "FigureKind",
    "FigureList",
    "FigureOutcome",
    "FigureSpec",
    "PngExporter",
    "RegenReport",
    "RunData",
    "RunOutcome",
    "RunSpec",
    "SpecError",
    "draw",
    "execute_run",
    "load_figure_list",
    "load_manifest",
    "regenerate",
    "register_kind",
    "run_fingerprint",
    "write_html",
]
