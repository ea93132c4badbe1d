"""The one HTML page writer of sinkscope: every report (``report.html`` of a scan, ``probe.html``,
``flow.html``, ``decode.html`` and ``sinkscope report``) is a list of :class:`RunSection` written by
:func:`write_page`.

A page is self-contained: plotly.js is embedded once (with the first figure), nothing is fetched
from the network, and it carries :data:`GENERATOR_META`, so sinkscope replaces a page it wrote but
never a file it did not write unless asked (:func:`check_report_target`).

>>> sec = RunSection("scan", Path("runs/scan"), "Scan - dinov2-small", findings=["No sink token."])
>>> write_page([sec], "report.html")
PosixPath('report.html')
>>> GENERATOR_META in Path("report.html").read_text()       # so a later write may replace it
True
>>> _ = Path("notes.html").write_text("<p>mine</p>")
>>> write_page([sec], "notes.html")                         # never a page sinkscope did not write
Traceback (most recent call last):
...
sinkscope._utils.SinkscopeError: --out notes.html exists and is not a sinkscope report; choose another name or pass --overwrite
"""

from __future__ import annotations

import html
import os
from dataclasses import dataclass, field
from pathlib import Path

import plotly.graph_objects as go
import plotly.io as pio

from .._utils import SinkscopeError
from . import style

#: written into every page sinkscope writes; a file without it is never overwritten unasked
GENERATOR_META = "<meta name='generator' content='sinkscope'>"

#: Headings of per-image figures, laid out side by side in a grid.
PER_IMAGE = "Norms over"

_PLOTLY_CONFIG = {"displaylogo": False, "responsive": True}

_CSS = """
body{font-family:%(font)s;max-width:1400px;margin:auto;padding:1em 1.5em;color:#222}
h1{margin-bottom:.2em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
h3{margin-top:1.5em} .run{color:#666;font-size:.9em} .findings{background:#f6f8fa;border-left:4px solid #0072B2;
padding:.6em 1em} .findings li{margin:.25em 0} .warn{color:#a00;font-weight:bold} nav a{margin-right:1em}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(540px,1fr));gap:8px}
table{border-collapse:collapse;font-size:12px} td,th{border:1px solid #ccc;padding:2px 6px}
table.kv td,table.kv th{border:none;text-align:left;padding:2px 14px 2px 0;font-size:14px;vertical-align:top}
.note{color:#555;font-size:13px} .failed{color:#b3261e} code{background:#f1f3f5;padding:0 3px;border-radius:3px}
"""


@dataclass
class RunSection:
    """One run's part of a page: kind, title, findings (sentences) and ``(heading, figure)`` pairs.

    ``intro_html`` goes between the findings and the figures (e.g. a scan's summary table),
    ``notes`` maps a heading to a sentence under it, ``ids`` a heading to the figure's div id
    (made unique on the page), ``tables_html`` follows the figures.
    """

    kind: str
    path: Path
    title: str
    findings: list[str] = field(default_factory=list)
    figures: list[tuple[str, go.Figure]] = field(default_factory=list)
    tables_html: str = ""
    warning: str = ""
    intro_html: str = ""
    notes: dict[str, str] = field(default_factory=dict)
    ids: dict[str, str] = field(default_factory=dict)


def check_report_target(out: str | Path, overwrite: bool = False) -> Path:
    """Refuse, in one line, a report path that is a folder, or an existing file sinkscope did not
    write (no generator tag) unless ``overwrite``; return the path.

    >>> check_report_target("new-report.html").name
    'new-report.html'
    """
    out = Path(out)
    if out.is_dir():
        raise SinkscopeError(
            f"--out {out} is a folder; give the report's file name, e.g. {out / 'report.html'}"
        )
    above = next((q for q in out.parents if q.exists()), Path("."))
    if not above.is_dir():
        raise SinkscopeError(f"--out {out}: {above} is a file, not a folder; choose another path")
    if not os.access(above, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise SinkscopeError(f"--out {out}: {out if out.exists() and os.access(above, os.W_OK) else above} is not writable; choose another path")
    if out.exists() and not overwrite:
        with out.open("rb") as fh:
            head = fh.read(4096).decode("utf-8", "replace")
        if GENERATOR_META not in head:
            raise SinkscopeError(
                f"--out {out} exists and is not a sinkscope report; choose another name or pass --overwrite"
            )
    return out


class _Ids:
    """Div ids of a page: the section's own id where given (unique), else ``fig-<n>``."""

    def __init__(self) -> None:
        self.used: set[str] = set()
        self.n = 0

    def next(self, wanted: str | None) -> str:
        cand = wanted if wanted and wanted not in self.used else None
        while cand is None or cand in self.used:
            cand = f"fig-{self.n}"
            self.n += 1
        self.used.add(cand)
        return cand


def _section_html(i: int, sec: RunSection, ids: _Ids, first: list[bool]) -> str:
    esc = html.escape
    body = [f"<section id='run-{i}'><h2>{esc(sec.title)}</h2>"]
    body.append(f"<div class='run'>{esc(sec.kind)} run: {esc(str(sec.path))}</div>")
    if sec.warning:
        body.append(f"<p class='warn'>{esc(sec.warning)}</p>")
    body.append(
        "<div class='findings'><b>Findings</b><ul>"
        + "".join(f"<li>{esc(f)}</li>" for f in sec.findings)
        + "</ul></div>"
    )
    body.append(sec.intro_html)
    in_grid = False
    for heading, fig in sec.figures:
        per_image = heading.startswith(PER_IMAGE)
        if per_image and not in_grid:
            body.append("<div class='grid'>")
        elif not per_image and in_grid:
            body.append("</div>")
        in_grid = per_image
        note = sec.notes.get(heading)
        body.append(f"<div><h3>{esc(heading)}</h3>" + (f"<p class='note'>{esc(note)}</p>" if note else ""))
        body.append(
            pio.to_html(
                fig,
                full_html=False,
                include_plotlyjs=first[0],
                include_mathjax=False,
                div_id=ids.next(sec.ids.get(heading)),
                default_width="100%",
                config=_PLOTLY_CONFIG,
            )
            + "</div>"
        )
        first[0] = False
    if in_grid:
        body.append("</div>")
    body.append(sec.tables_html + "</section>")
    return "\n".join(body)


def write_page(
    sections: list[RunSection], out: str | Path, title: str | None = None, overwrite: bool = False
) -> Path:
    """Write ``sections`` as one self-contained HTML page (plotly.js inline once, no network),
    atomically; an existing file is replaced only when sinkscope wrote it or ``overwrite``."""
    out = check_report_target(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    ids, first = _Ids(), [True]
    body = [_section_html(i, sec, ids, first) for i, sec in enumerate(sections)]
    nav = "".join(f"<a href='#run-{i}'>{html.escape(s.title)}</a>" for i, s in enumerate(sections))
    n_fig = sum(len(s.figures) for s in sections)
    title = title or "sinkscope report - " + ", ".join(s.title for s in sections)
    page = (
        f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>{GENERATOR_META}"
        f"<title>{html.escape(title)}</title><style>{_CSS % {'font': style.FONT_FAMILY}}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>"
        + (f"<nav>{nav}</nav>" if len(sections) > 1 else "")
        + f"<p class='run'>{n_fig} figures from {len(sections)} run(s); every figure is interactive "
        "(hover, zoom, legend toggles) and the page works offline.</p>" + "\n".join(body) + "</body></html>\n"
    )
    tmp = out.with_name(out.name + ".tmp")
    try:
        tmp.write_text(page, encoding="utf-8")
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)  # nothing left behind when the write or the rename fails
    return out


def model_name(summary: dict | None) -> str:
    """The model's name in a run summary (``?`` when missing)."""
    m = (summary or {}).get("model", {})
    return str(m.get("name", "?")) if isinstance(m, dict) else str(m)


def pct(x: float) -> str:
    """``0.0123`` -> ``'1.23%'``."""
    return f"{100 * x:.2f}%"


__all__ = [
    "GENERATOR_META",
    "PER_IMAGE",
    "RunSection",
    "check_report_target",
    "model_name",
    "pct",
    "write_page",
]
