"""`sinkscope report RUN_DIR...`: one self-contained HTML page combining the figures of several runs.

Each run folder is recognised by what it holds - a scan (``tokens.parquet``), a probe
(``probe.csv``) or a flow run (``visual_tokens.parquet`` / ``rollout.csv``) - and contributes its
figures (drawn from the saved tables only, never the model) and a few sentences of findings
computed from the same tables. plotly.js is embedded once, so the file works offline.

>>> write_report(["runs/scan", "runs/probe", "runs/flow"], "report.html")     # doctest: +SKIP
PosixPath('report.html')
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio

from .._utils import SinkscopeError
from . import style

_CSS = """
body{font-family:%(font)s;max-width:1200px;margin:auto;padding:1em 1.5em;color:#222}
h1{margin-bottom:.2em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
h3{margin-top:1.5em} .run{color:#666;font-size:.9em} .findings{background:#f6f8fa;border-left:4px solid #0072B2;
padding:.6em 1em} .findings li{margin:.25em 0} .warn{color:#a00;font-weight:bold} nav a{margin-right:1em}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(540px,1fr));gap:8px}
table{border-collapse:collapse;font-size:12px} td,th{border:1px solid #ccc;padding:2px 6px}
"""


@dataclass
class RunSection:
    """One run's part of the report: kind, title, findings (sentences) and ``(heading, figure)`` pairs."""

    kind: str
    path: Path
    title: str
    findings: list[str] = field(default_factory=list)
    figures: list[tuple[str, go.Figure]] = field(default_factory=list)
    tables_html: str = ""
    warning: str = ""


def run_kind(run_dir: str | Path) -> str:
    """``"scan"``, ``"probe"`` or ``"flow"`` from the files in ``run_dir``; a clear error otherwise."""
    d = Path(run_dir)
    if not d.is_dir():
        raise SinkscopeError(f"{d}: no such run folder")
    if (d / "tokens.parquet").exists():
        return "scan"
    if (d / "probe.csv").exists():
        return "probe"
    flow_files = ("visual_tokens.parquet", "rollout.csv", "knockout.csv", "decode.csv", "attribution.csv")
    if any((d / f).exists() for f in flow_files):
        return "flow"
    if (d / "summary.json").exists():
        try:
            if "analyses" in json.loads((d / "summary.json").read_text()):
                return "flow"
        except (json.JSONDecodeError, TypeError):
            pass
    raise SinkscopeError(
        f"{d}: not a sinkscope run (expected tokens.parquet, probe.csv, or visual_tokens.parquet/rollout.csv)"
    )


def load_scan_run(run_dir: str | Path) -> tuple[pd.DataFrame, dict, dict[str, np.ndarray]]:
    """``tokens``, ``summary`` and the pictures the model saw (from ``seen/``) of a scan run."""
    d = Path(run_dir)
    tokens = pd.read_parquet(d / "tokens.parquet")
    summary = json.loads((d / "summary.json").read_text()) if (d / "summary.json").exists() else {}
    from PIL import Image

    from ..scan import seen_pictures

    pixels = {name: np.asarray(Image.open(f).convert("RGB")) for name, f in seen_pictures(d).items()}
    return tokens, summary, pixels


def _name(summary: dict) -> str:
    m = summary.get("model", {})
    return str(m.get("name", "?")) if isinstance(m, dict) else str(m)


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


# -- scan ------------------------------------------------------------------------------------
def scan_findings(tokens: pd.DataFrame, summary: dict) -> list[str]:
    """Plain sentences about a scan: rule, how many sinks where, emergence, norm ratio, attention."""
    out = []
    rule = (summary.get("rule") or {}).get("description", "?")
    n_img = tokens["image"].nunique()
    out.append(f"{_name(summary)} on {n_img} item(s); sink rule: {rule}.")
    sinks = tokens[tokens["is_sink"].astype(bool)] if "is_sink" in tokens else tokens.iloc[0:0]
    if not len(sinks):
        ratio = _max_ratio(tokens)
        out.append(
            "No sink token was found at any layer"
            + (f" (largest token/median norm ratio: {ratio:.1f}x)." if ratio else ".")
        )
    else:
        per = sinks.groupby("layer").size()
        emerg = summary.get("emergence_layer")
        emerg = int(per.index.min()) if emerg is None else emerg
        last = int(tokens["layer"].max())
        model = summary.get("model") or {}
        # an LLM's last hidden state is the final norm's output (HF convention)
        normed = (
            ", after the final norm" if isinstance(model, dict) and model.get("family") == "causal-lm" else ""
        )
        at_last = sinks[sinks.layer == last]
        with_sink = at_last["image"].nunique()
        out.append(
            f"Sinks appear from layer {emerg} on; at the last layer ({last}{normed}) {len(at_last)} sink token(s) in "
            f"{with_sink} of {n_img} item(s) (at most {int(per.max())} per layer over all items)."
        )
        pos = at_last.dropna(subset=["row", "col"])
        if len(pos):
            common = pos.groupby(["row", "col"]).size().sort_values(ascending=False).head(3)
            out.append(
                "Most frequent sink positions at the last layer: "
                + ", ".join(f"(row {int(r)}, col {int(c)}) x{n}" for (r, c), n in common.items())
                + "."
            )
        ratio = _sink_ratio(tokens)
        if ratio:
            out.append(
                f"Sink norms are {ratio:.1f}x the median norm of the other tokens at the same layer (median over sinks)."
            )
        if summary.get("sink_dims"):
            out.append(f"Sink dimensions: {', '.join(map(str, summary['sink_dims'][:8]))}.")
    if "attention_received" in tokens and tokens["attention_received"].notna().any() and len(sinks):
        a = tokens.dropna(subset=["attention_received"])
        s = a[a.is_sink.astype(bool)]["attention_received"].mean()
        o = a[~a.is_sink.astype(bool)]["attention_received"].mean()
        if np.isfinite(s) and o > 0:
            out.append(
                f"Sinks receive {_pct(s)} of attention per token on average, {s / o:.1f}x the other tokens ({_pct(o)})."
            )
    return out


def _max_ratio(tokens: pd.DataFrame) -> float | None:
    p = tokens[tokens["kind"].isin(["patch", "text"])]
    if not len(p):
        return None
    med = p.groupby(["image", "layer"])["norm"].transform("median")
    return float((p["norm"] / med).max())


def _sink_ratio(tokens: pd.DataFrame) -> float | None:
    p = tokens[tokens["kind"].isin(["patch", "text"])].copy()
    if not len(p) or "is_sink" not in p:
        return None
    p["is_sink"] = p["is_sink"].astype(bool)
    med = p[~p.is_sink].groupby(["image", "layer"])["norm"].median().rename("med")
    s = p[p.is_sink].join(med, on=["image", "layer"])
    return float((s["norm"] / s["med"]).median()) if len(s) else None


def scan_section(run_dir: str | Path, max_images: int = 6) -> RunSection:
    """Figures of a scan run: norm distributions with thresholds, sink counts, patch heat maps with
    sink markers (layer slider), attention vs norm, and the UMAP when activations were saved."""
    from .scan_report import (
        _clean,
        _has_attention,
        attention_norm_figure,
        norm_distribution_figure,
        patch_heatmap_figure,
        sink_count_figure,
        text_norm_figure,
    )

    d = Path(run_dir)
    tokens, summary, pixels = load_scan_run(d)
    df = _clean(tokens)
    sec = RunSection("scan", d, f"Scan - {_name(summary)}", findings=scan_findings(df, summary))
    if not len(df):
        sec.warning = "the token table is empty"
        return sec
    sec.figures.append(
        ("L2 norm per layer, with the detection threshold", norm_distribution_figure(df, summary))
    )
    sec.figures.append(("Sink tokens per layer (emergence)", sink_count_figure(df, summary)))
    for name in list(pd.unique(df["image"]))[:max_images]:
        sub = df[df["image"] == name]
        grid = bool(((sub["kind"] == "patch") & sub["row"].notna()).any())
        fig = (
            patch_heatmap_figure(sub, summary, name, pixels.get(name))
            if grid
            else text_norm_figure(sub, summary, name)
        )
        sec.figures.append((f"Norms over {'the patch grid' if grid else 'the sequence'} - {name}", fig))
    if _has_attention(df):
        try:
            sec.figures.append(("Attention received vs L2 norm", attention_norm_figure(df, summary)))
        except ValueError:
            pass
    if (d / "activations" / "manifest.json").exists():
        from .embedding import scan_umap_figure

        try:
            sec.figures.append(("UMAP of token embeddings", scan_umap_figure(d)))
        except (ValueError, SinkscopeError) as err:
            sec.findings.append(f"No UMAP: {err}")
    return sec


# -- probe -----------------------------------------------------------------------------------
def probe_findings(table: pd.DataFrame, summary: dict) -> list[str]:
    """Best layer and score per (label, group), against chance and the shuffle control."""
    ds = summary.get("dataset", {}) or {}
    out = [
        f"{_name(summary)} on {ds.get('name', '?')} ({ds.get('n_images', '?')} images), "
        f"{summary.get('folds', '?')}-fold held-out scores."
    ]
    for label, t in table.groupby("label", sort=False):
        parts = []
        for g, d in t.groupby("group", sort=False):
            if not d["accuracy"].notna().any():
                parts.append(f"{g} no score (no image had such tokens)")
                continue
            best = d.loc[d["accuracy"].idxmax()]
            extra = []
            if "chance" in d and pd.notna(best.get("chance")):
                extra.append(f"chance {best['chance']:.2f}")  # per group: groups may use fewer images
            if "shuffle_accuracy" in d and pd.notna(best.get("shuffle_accuracy")):
                extra.append(f"shuffled labels {best['shuffle_accuracy']:.2f}")
            parts.append(
                f"{g} {best['accuracy']:.2f} at layer {int(best['layer'])}"
                + (f" ({', '.join(extra)})" if extra else "")
            )
        kind = "R2" if "task" in t and (t["task"] == "regression").any() else "accuracy"
        out.append(f"'{label}': best {kind} per group - " + "; ".join(parts) + ".")
    return out + _probe_notes(table)


def _probe_notes(table: pd.DataFrame) -> list[str]:
    from .probe_report import nonsink_note

    note = nonsink_note(table)
    return [note] if note else []


def probe_section(run_dir: str | Path) -> RunSection:
    """Accuracy vs layer per group (error bands, chance line), one figure per label."""
    from .probe_report import probe_figure

    d = Path(run_dir)
    table = pd.read_csv(d / "probe.csv")
    summary = json.loads((d / "summary.json").read_text()) if (d / "summary.json").exists() else {}
    sec = RunSection("probe", d, f"Linear probes - {_name(summary)}", findings=probe_findings(table, summary))
    for label in table["label"].unique():
        sec.figures.append((f"Probe accuracy vs layer - '{label}'", probe_figure(table, label, summary)))
    return sec


# -- flow ------------------------------------------------------------------------------------
def flow_findings(tables: dict[str, pd.DataFrame], summary: dict) -> list[str]:
    """What the flow tables say: ViT sinks among visual tokens, their LLM attention vs non-sinks,
    the knockout window with the largest effect."""
    prompt = f"; prompt: {summary['prompt']!r}" if summary.get("prompt") else ""
    out = [f"{_name(summary)}{prompt}; ViT sinks: {(summary.get('vit_rule') or {}).get('description', '?')}."]
    layer = summary.get("vit_layer")
    if isinstance(layer, dict) and "layer" in layer:
        out.append(
            f"The ViT analyses (sinks, rollout, relevance) stop at ViT layer {layer['layer']} of "
            f"{layer.get('n_layers', '?')}: {layer.get('source', '')}."
        )
    queries = (summary.get("propagation") or {}).get("queries", "the text tokens")
    vt = tables.get("visual_tokens")
    if vt is not None and len(vt):
        n_s = int(vt.is_vit_sink.sum())
        out.append(f"{len(vt)} visual tokens reach the LLM; {n_s} of them are ViT sinks.")
        if n_s and (~vt.is_vit_sink).any():
            s = vt[vt.is_vit_sink].attention_received.mean()
            o = vt[~vt.is_vit_sink].attention_received.mean()
            out.append(
                f"Averaged over LLM layers, a ViT sink receives {_pct(s)} of the attention of {queries}, "
                f"{s / o:.2f}x a non-sink visual token ({_pct(o)})."
            )
        em = int(((~vt.is_vit_sink) & (vt.llm_sink_layers > 0)).sum())
        out.append(f"{em} visual token(s) become sinks only inside the LLM (LLM-emerged).")
        lr = (summary.get("propagation") or {}).get("llm_rule") or {}
        if isinstance(lr, dict) and "sink_dims" in lr:
            src = lr.get("sink_dims_source_description") or lr.get("sink_dims_source", "?")
            dims = ", ".join(str(d) for d in lr["sink_dims"]) or "none"
            out.append(f"LLM sink dims: {dims} (from {src}).")
        note = (summary.get("propagation") or {}).get("llm_rule_note")
        if note:
            out.append("Caution: " + note + ".")
    g = tables.get("vit_attention_by_group")
    if g is not None and len(g) and g.mean_attention.notna().any():
        last = g[g.layer == g.layer.max()].groupby("group")["mean_attention"].mean().dropna()
        out.append(
            f"ViT block {int(g.layer.max())} (the last one analysed), attention per token by group: "
            + ", ".join(f"{k} {_pct(v)}" for k, v in last.items())
            + f" (uniform {_pct(float(g.uniform.mean()))})."
        )
    ko = tables.get("knockout")
    ko = ko.dropna(subset=["relative_change"]) if ko is not None and "relative_change" in ko else None
    if ko is not None and len(ko):
        worst = ko.loc[ko.relative_change.abs().idxmax()]
        where = (
            f"in the window centred on LLM layer {int(worst.layer)} (layers {int(worst.window_start)}-"
            f"{int(worst.window_end)})"
            if "layer" in ko.columns
            else f"from LLM layer {int(worst.window_start)}"
        )
        out.append(
            f"Largest knockout effect: blocking {worst.source} -> {worst.target} {where} changes the answer "
            f"probability by {100 * worst.relative_change:+.1f}%."
        )
    red = summary.get("redundancy")
    if isinstance(red, dict) and isinstance(red.get("mean_cos"), dict):
        mc = red["mean_cos"]

        def _cos(v):
            return "n/a (no sink)" if v is None else f"{v:.2f}"

        out.append(
            f"Redundancy (Darcet et al.): mean cosine to grid neighbours at the input layer - sinks "
            f"{_cos(mc.get('input_sink'))}, non-sinks {_cos(mc.get('input_nonsink'))}; at ViT layer "
            f"{red.get('detection_layer')} - sinks {_cos(mc.get('detection_sink'))}, non-sinks "
            f"{_cos(mc.get('detection_nonsink'))} ({red.get('n_sinks', 0)} sinks)."
        )
    rv = summary.get("relevancy")
    if isinstance(rv, dict) and isinstance(rv.get("relevancy"), dict):
        share = rv["relevancy"].get("sink_share")
        out.append(
            f"Relevancy (Chefer et al.) of the answer {rv.get('answer_token')!r} on the image patches: "
            + (f"{100 * share:.1f}% on the {rv.get('n_vit_sinks', 0)} ViT sink(s)." if share is not None else "n/a.")
        )
    ps = summary.get("paper_settings")
    if isinstance(ps, dict):
        out.append(
            "Settings: the paper's Fig. 3A settings (generated tokens, ViT norm >= 100, bins of 5)."
            if ps.get("matches")
            else "Settings differ from the paper's Fig. 3A: " + "; ".join(ps.get("differences", [])) + "."
        )
    if summary.get("warning"):
        out.append(str(summary["warning"]))
    return out


def flow_section(run_dir: str | Path) -> RunSection:
    """Rollout/relevance maps, ViT group attention, Fig. 3A, LLM group heat map, knockout curves."""
    from .flow_report import flow_figures, flow_tables_html, load_flow

    d = Path(run_dir)
    tables, summary = load_flow(d)
    sec = RunSection(
        "flow", d, f"Information pathways - {_name(summary)}", findings=flow_findings(tables, summary)
    )
    sec.figures = flow_figures(tables, summary)
    sec.tables_html = flow_tables_html(tables)
    sec.warning = str(summary.get("warning") or "")
    return sec


#: Headings of per-image figures, laid out side by side in a grid.
_PER_IMAGE = "Norms over"

_SECTIONS = {"scan": scan_section, "probe": probe_section, "flow": flow_section}


def build_sections(run_dirs: list[str | Path]) -> list[RunSection]:
    """One :class:`RunSection` per run folder (kind detected from its files)."""
    if not run_dirs:
        raise SinkscopeError("no run folder given")
    return [_SECTIONS[run_kind(d)](d) for d in run_dirs]


#: written into every page sinkscope writes; a file without it is never overwritten unasked
GENERATOR_META = "<meta name='generator' content='sinkscope'>"


def check_report_target(out: str | Path, overwrite: bool = False) -> Path:
    """Refuse, in one line, a report path that is a folder, or an existing file sinkscope did not
    write (no generator tag) unless ``overwrite``; return the path.

    >>> check_report_target("new-report.html").name
    'new-report.html'
    """
    out = Path(out)
    if out.is_dir():
        raise SinkscopeError(f"--out {out} is a folder; give the report's file name, e.g. {out / 'report.html'}")
    if out.exists() and not overwrite:
        with out.open("rb") as fh:
            head = fh.read(4096).decode("utf-8", "replace")
        if GENERATOR_META not in head:
            raise SinkscopeError(
                f"--out {out} exists and is not a sinkscope report; choose another name or pass --overwrite"
            )
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

    >>> write_report(["runs/scan"], "scan-report.html")                 # doctest: +SKIP
    """
    out = check_report_target(out, overwrite)
    sections = sections if sections is not None else build_sections(run_dirs)
    out.parent.mkdir(parents=True, exist_ok=True)
    first = True
    body, nav = [], []
    n_fig = 0
    for i, sec in enumerate(sections):
        nav.append(f"<a href='#run-{i}'>{html.escape(sec.title)}</a>")
        body.append(f"<section id='run-{i}'><h2>{html.escape(sec.title)}</h2>")
        body.append(f"<div class='run'>{sec.kind} run: {html.escape(str(sec.path))}</div>")
        if sec.warning:
            body.append(f"<p class='warn'>{html.escape(sec.warning)}</p>")
        body.append(
            "<div class='findings'><b>Findings</b><ul>"
            + "".join(f"<li>{html.escape(f)}</li>" for f in sec.findings)
            + "</ul></div>"
        )
        in_grid = False
        for heading, fig in sec.figures:
            per_image = heading.startswith(_PER_IMAGE)
            if per_image and not in_grid:
                body.append("<div class='grid'>")
            elif not per_image and in_grid:
                body.append("</div>")
            in_grid = per_image
            body.append(f"<div><h3>{html.escape(heading)}</h3>")
            body.append(
                pio.to_html(
                    fig,
                    full_html=False,
                    include_plotlyjs=first,
                    include_mathjax=False,
                    div_id=f"fig-{n_fig}",
                    default_width="100%",
                    config={"displaylogo": False, "responsive": True},
                )
                + "</div>"
            )
            first = False
            n_fig += 1
        if in_grid:
            body.append("</div>")
        body.append(sec.tables_html + "</section>")
    title = title or "sinkscope report - " + ", ".join(s.title for s in sections)
    page = (
        f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>{GENERATOR_META}"
        f"<title>{html.escape(title)}</title><style>{_CSS % {'font': style.FONT_FAMILY}}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><nav>{''.join(nav)}</nav>"
        f"<p class='run'>{n_fig} figures from {len(sections)} run(s); every figure is interactive "
        "(hover, zoom, legend toggles) and the page works offline.</p>" + "\n".join(body) + "</body></html>\n"
    )
    tmp = out.with_name(out.name + ".tmp")
    try:
        tmp.write_text(page, encoding="utf-8")
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)  # nothing left behind when the write or the rename fails
    return out


def report_figure_count(run_dirs: list[str | Path]) -> int:
    """How many figures :func:`write_report` draws for ``run_dirs`` (for tests and progress)."""
    return sum(len(s.figures) for s in build_sections(run_dirs))


__all__ = [
    "RunSection",
    "build_sections",
    "flow_findings",
    "load_scan_run",
    "probe_findings",
    "report_figure_count",
    "run_kind",
    "scan_findings",
    "write_report",
]
