"""`sinkscope report RUN_DIR...`: one self-contained HTML page combining the figures of several runs.

Each run folder is recognised by :func:`sinkscope.runs.run_kind` - a scan (``tokens.parquet``), a
probe (``probe.csv``) or a flow run - and contributes the section its analysis' module builds
(:mod:`~sinkscope.viz.scan_report`, :mod:`~sinkscope.viz.probe_report`,
:mod:`~sinkscope.viz.flow_report`): figures drawn from the saved tables only, never the model, and
findings computed from the same tables. This module only assembles them; the page is written by
:func:`sinkscope.viz.page.write_page` (plotly.js embedded once, works offline).

>>> from sinkscope.flow.run import run_flow
>>> from sinkscope.probing import probe
>>> from sinkscope.scanning import scan
>>> _ = scan("tiny-dinov2+sinks", out="runs/scan", progress=False)
>>> _ = probe("tiny-dinov2+sinks", "digits", groups=["cls"], max_images=20, folds=2, out="runs/probe",
...           cache=False, progress=False, n_jobs=1)
>>> _ = run_flow("tiny-llava+sinks", analyses=("rollout",), out="runs/flow", progress=False)
>>> write_report(["runs/scan", "runs/probe", "runs/flow"], "report.html")
PosixPath('report.html')
>>> [s.kind for s in build_sections(["runs/scan", "runs/probe", "runs/flow"])]
['scan', 'probe', 'flow']
"""

from __future__ import annotations

from pathlib import Path

from .. import runs as _runs
from .._utils import SinkscopeError
from .decoding import decode_section
from .eval_report import eval_section
from .flow_report import flow_findings, flow_section
from .page import GENERATOR_META, RunSection, check_report_target, write_page
from .probe_report import probe_findings, probe_section
from .scan_report import load_scan_run, scan_findings, scan_section

_SECTIONS = {
    "scan": scan_section,
    "probe": probe_section,
    "flow": flow_section,
    "decode": decode_section,
    "eval": eval_section,
}


def run_kind(run_dir: str | Path) -> str:
    """``"scan"``, ``"probe"``, ``"flow"`` or ``"decode"`` (:func:`sinkscope.runs.run_kind`); one line when the
    folder is missing or is not a run."""
    d = Path(run_dir)
    if not d.is_dir():
        raise SinkscopeError(f"{d}: no such run folder")
    try:
        return _runs.run_kind(d)
    except ValueError as e:  # a corrupt config.json (json.JSONDecodeError)
        raise SinkscopeError(f"{d / _runs.CONFIG_FILE}: corrupt run config ({e})") from None


def build_sections(run_dirs: list[str | Path]) -> list[RunSection]:
    """One :class:`RunSection` per run folder (kind from :func:`run_kind`)."""
    if not run_dirs:
        raise SinkscopeError("no run folder given")
    out = []
    for d in run_dirs:
        kind = run_kind(d)
        if kind not in _SECTIONS:
            raise SinkscopeError(f"{d}: a {kind!r} run has no report section in this version of sinkscope")
        out.append(_SECTIONS[kind](d))
    return out


def write_report(
    run_dirs: list[str | Path],
    out: str | Path,
    title: str | None = None,
    sections: list[RunSection] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write one self-contained HTML report (plotly.js inline once, no network) for ``run_dirs``
    (or for ``sections`` already built with :func:`build_sections`). Written atomically; an
    existing file is replaced only when sinkscope wrote it or ``overwrite`` (see
    :func:`check_report_target`).

    >>> from sinkscope.scanning import scan
    >>> _ = scan("tiny-dinov2+sinks", out="runs/one", progress=False)
    >>> write_report(["runs/one"], "scan-report.html")
    PosixPath('scan-report.html')
    """
    check_report_target(out, overwrite)  # before reading any run
    sections = sections if sections is not None else build_sections(run_dirs)
    return write_page(sections, out, title=title, overwrite=overwrite)


#: the page each analysis' run folder gets, by the result's kind
PAGE_NAMES = {
    "scan": "report.html",
    "probe": "probe.html",
    "flow": "flow.html",
    "decode": "decode.html",
    "eval": "eval.html",
}


def result_kind(res) -> str:
    """``scan``, ``probe``, ``flow``, ``decode`` or ``eval`` for an analysis result (by its type)."""
    from ..evaluation.run import EvalResult
    from ..flow.decoding import DecodeResult
    from ..flow.run import FlowResult
    from ..probing import ProbeResult
    from ..scanning import ScanResult

    for cls, kind in ((ScanResult, "scan"), (ProbeResult, "probe"), (FlowResult, "flow"), (DecodeResult, "decode"), (EvalResult, "eval")):
        if isinstance(res, cls):
            return kind
    raise SinkscopeError(f"no page for a {type(res).__name__}: not a sinkscope analysis result")


def has_page(res) -> bool:
    """Whether ``res`` is a result with a page (a training run, for one, has none)."""
    try:
        result_kind(res)
    except SinkscopeError:
        return False
    return True


def write_result_page(res, overwrite: bool = False) -> Path:
    """Draw the page of an analysis result saved in ``res.out``: ``report.html`` (scan),
    ``probe.html``, ``flow.html`` or ``decode.html``, from the result's tables and summary.

    >>> from sinkscope.scanning import scan
    >>> res = scan("tiny-dinov2+sinks", out="runs/t", progress=False)     # the analysis: tables only
    >>> (res.out / "report.html").exists()
    False
    >>> write_result_page(res).name
    'report.html'
    """
    kind = result_kind(res)
    if res.out is None:
        raise SinkscopeError(f"this {kind} result has no output folder (out=None): nothing to draw the page into")
    path = Path(res.out) / PAGE_NAMES[kind]
    if kind == "scan":
        from .scan_report import write_scan_report

        return write_scan_report(path, res.tokens, res.summary, res.pixels)
    if kind == "probe":
        from .probe_report import write_probe_report

        return write_probe_report(path, res.table, res.summary)
    if kind == "flow":
        from .flow_report import write_flow_report

        return write_flow_report(path, res.tables, res.summary)
    if kind == "eval":
        from .eval_report import write_eval_report

        return write_eval_report(path, res.results, res.summary, overwrite=overwrite)
    from .decoding import write_decode_report

    return write_decode_report(path, res.rates, res.per_token, res.summary, overwrite=overwrite)


def report_figure_count(run_dirs: list[str | Path]) -> int:
    """How many figures :func:`write_report` draws for ``run_dirs`` (for tests and progress)."""
    return sum(len(s.figures) for s in build_sections(run_dirs))


__all__ = [
    "GENERATOR_META",
    "RunSection",
    "build_sections",
    "check_report_target",
    "flow_findings",
    "load_scan_run",
    "probe_findings",
    "report_figure_count",
    "run_kind",
    "scan_findings",
    "write_page",
    "write_report",
    "write_result_page",
    "has_page",
]
