"""The public entry points that run an analysis and draw its page: ``sinkscope.run``, ``scan``, ``probe``.

The layers import one way (``tests/test_layers.py``)::

    models -> capture -> sinks -> analyses (scanning, probing, neurons, flow) -> runs -> viz -> api -> figures -> cli

An analysis computes and saves its tables; :mod:`sinkscope.runs` reads and writes run folders;
:mod:`sinkscope.viz` draws pages from results or saved folders. This module is the one place that
does all three, so the analyses never import the page writer:

- :func:`run` (``sinkscope.run``) runs any config and, when the config has ``out`` (and, for a
  scan, ``report``), draws the run's page: ``report.html``, ``probe.html``, ``flow.html`` or
  ``decode.html``;
- :func:`scan` and :func:`probe` (``sinkscope.scan``, ``sinkscope.probe``) are the analyses of
  :mod:`sinkscope.scanning` and :mod:`sinkscope.probing` plus that page when ``out`` is given
  (``report=False`` skips it). The analyses themselves write tables only.

>>> res = run(ScanConfig(model="tiny-dinov2+sinks", images=("embedded:1",), out="runs/api"), progress=False)
>>> sorted(p.name for p in res.out.iterdir() if p.suffix in (".html", ".json", ".parquet"))
['.sinkscope.json', 'config.json', 'report.html', 'scan_config.json', 'summary.json', 'tokens.parquet']
"""

from __future__ import annotations

import functools
import os
from typing import Any

from . import ownership
from . import probing as _probing
from . import runs as _runs
from . import scanning as _scanning
from .config import RunConfig, ScanConfig
from .viz.report import has_page, write_result_page


def _is_main(res: Any) -> bool:
    """Only the main process of a distributed run draws the page (the others hold one shard)."""
    return not ((getattr(res, "summary", None) or {}).get("distributed") or {}).get("rank", 0)


def run(config: RunConfig, progress: bool = True):
    """Run the analysis ``config`` describes (:func:`sinkscope.runs.execute`) and, with an output
    folder, draw its page; return the typed result, which holds ``config``.

    ``run(load_run(DIR).config)`` reruns a saved run (same tables for the same seed).

    >>> res = run(ScanConfig(model="tiny-dinov2+sinks", images=("embedded:1",)), progress=False)
    >>> res.config.method, int(res.tokens.layer.max())
    ('norm', 4)
    """
    new = config.out is not None and not os.path.lexists(config.out)
    try:  # execute checks every folder first (sinkscope.runs.check_folders), before any model loads
        res = _runs.execute(config, progress=progress)
    except BaseException:
        if new:
            ownership.release(config.out)  # a run that failed before writing leaves no folder it made
        raise
    if config.out is not None and getattr(config, "report", True) and _is_main(res) and has_page(res):
        # the folder passed sinkscope.ownership before any work: a page there is this command's own
        write_result_page(res, overwrite=True)
    if config.out is not None and _is_main(res):
        ownership.record(config.out)  # the marker lists what the run wrote
    return res


def _with_page(analysis):
    """``analysis`` plus its page in ``out`` (``report=False`` skips the page)."""

    @functools.wraps(analysis)
    def wrapper(*args, report: bool = True, **kwargs):
        if analysis is _probing.probe and kwargs.get("out") is not None:  # (a scan claims its folder itself)
            ownership.claim(kwargs["out"], "probe", ownership.OUTPUTS["probe"])
        res = analysis(*args, **kwargs)
        if report and res.out is not None and _is_main(res):
            write_result_page(res)
        return res

    wrapper.__doc__ = (analysis.__doc__ or "") + (
        "\n\n    As ``sinkscope." + analysis.__name__ + "``, the run's page is drawn into ``out`` too "
        "(``report=False`` skips it).\n"
    )
    return wrapper


scan = _with_page(_scanning.scan)
probe = _with_page(_probing.probe)

__all__ = ["ScanConfig", "probe", "run", "scan"]
