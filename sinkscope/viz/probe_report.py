"""A probe run's part of a report: accuracy vs layer per token group (error bands, chance line),
the findings (best layer per group against chance and the shuffle control), its section and
``probe.html``."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import plotly.graph_objects as go

from ..runs import read_summary, read_table
from . import style
from .page import RunSection, write_page
from .page import model_name as _name

GROUP_COLORS = {
    "cls": style.KIND_COLORS.get("cls", "#E69F00"),
    "registers": style.KIND_COLORS.get("register", "#009E73"),
    "mean": "#0072B2",
    "random": "#56B4E9",
    "sink": style.SINK_COLOR,
    "nonsink": "#999999",
    "nonsink_random": "#CC79A7",
    "matched": "#7F7F00",
}


def _rgba(hex_color: str, alpha: float) -> str:
    h = hex_color.lstrip("#")
    if len(h) != 6:
        return f"rgba(120,120,120,{alpha})"
    r, g, b = (int(h[i : i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


def probe_figure(table: pd.DataFrame, label: str, summary: dict | None = None) -> go.Figure:
    """Accuracy (R2 for regression) vs layer, one line per group with a +-1 std band over folds,
    the shuffle control dotted, and the chance level dashed.

    >>> from sinkscope.probing import probe
    >>> _ = probe("tiny-dinov2+sinks", "digits", groups=["cls", "mean"], max_images=30, folds=3,
    ...           out="runs/p", cache=False, progress=False, n_jobs=1)
    >>> fig = probe_figure(read_table("runs/p/probe.csv"), "label", read_summary("runs/p"))
    >>> [t.name for t in fig.data if t.name]
    ['cls', 'cls (shuffled labels)', 'mean', 'mean (shuffled labels)']
    """
    t = table[table.label == label].sort_values(["group", "layer"])
    fig = go.Figure()
    regression = (t.task == "regression").any()
    empty = [g for g, d in t.groupby("group", sort=False) if not d.accuracy.notna().any()]
    for g, d in t.groupby("group", sort=False):
        if g in empty:  # no image had such tokens (e.g. no sinks): said in the caption, not drawn
            continue
        c = GROUP_COLORS.get(g, "#333333")
        x = d.layer.tolist()
        # +-1 std over folds, clipped to the score's range (accuracy in [0, 1], R2 <= 1)
        hi = (d.accuracy + d.accuracy_std).clip(upper=1.0).tolist()
        lo = (d.accuracy - d.accuracy_std).clip(lower=None if regression else 0.0).tolist()
        fig.add_trace(
            go.Scatter(
                x=x + x[::-1],
                y=hi + lo[::-1],
                fill="toself",
                fillcolor=_rgba(c, 0.18),
                mode="lines",
                line={"width": 0},
                hoverinfo="skip",
                showlegend=False,
                meta={"role": "band", "group": g},
            )
        )
        fig.add_trace(
            go.Scatter(
                x=x,
                y=d.accuracy,
                mode="lines+markers",
                name=g,
                line={"color": c, "width": 2},
                customdata=d[["accuracy_std", "n_images", "n_tokens", "balanced_accuracy"]].to_numpy(),
                hovertemplate=f"{g}<br>layer %{{x}}<br>score %{{y:.3f}} +- %{{customdata[0]:.3f}}"
                "<br>images %{customdata[1]}, tokens %{customdata[2]}<br>balanced %{customdata[3]:.3f}<extra></extra>",
                meta={"role": "accuracy", "group": g},
            )
        )
        fig.add_trace(
            go.Scatter(
                x=x,
                y=d.shuffle_accuracy,
                mode="lines",
                name=f"{g} (shuffled labels)",
                line={"color": c, "dash": "dot", "width": 1},
                visible="legendonly",
                meta={"role": "shuffle", "group": g},
            )
        )
    if len(t) and not regression:
        # chance (majority share) of the images the groups used: the group with the most images
        # (groups such as "sink" may use fewer images, hence another majority share)
        chance = float(t.loc[t.n_images == t.n_images.max(), "chance"].max())
        fig.add_hline(
            y=chance,
            line={"dash": "dash", "color": style.THRESHOLD_COLOR},
            annotation_text=f"chance {chance:.2f}",
            annotation_position="bottom right",
        )
    model = (summary or {}).get("model", {}).get("name", "")
    rule = (summary or {}).get("rule", {}).get("description", "")
    style.apply_style(
        fig,
        title=f"Linear probe '{label}' - {model}<br><sup>sink groups by {rule}"
        + (f"<br>not drawn: {', '.join(empty)} (no image had such tokens)" if empty else "")
        + "</sup>",
        x_title=style.LABEL_LAYER,
        y_title="R2 (held-out folds)" if regression else "accuracy (held-out folds)",
    )
    layers = sorted(t.layer.unique())
    if 0 < len(layers) <= 25:
        fig.update_xaxes(tickvals=layers)
    return fig


def _per_image_tokens(table: pd.DataFrame, group: str) -> float | None:
    """Median over layers of the tokens a group averages per image (where it has any)."""
    d = table[(table.group == group) & (table.n_images > 0)].drop_duplicates("layer")
    return float((d.n_tokens / d.n_images).median()) if len(d) else None


def nonsink_note(table: pd.DataFrame) -> str | None:
    """The sentence that says what the ``nonsink`` group is and what to compare ``sink`` with.

    ``nonsink`` is the mean of nearly every patch (a global average pool, like ``mean``) while
    ``sink`` is the mean of the image's few sink tokens: the pooled vector averages out local
    content, which makes it an easier probe than one token. The paper's non-sink accuracy (0.512
    for CLIP, against 0.865 for sinks) is closer to single non-sink tokens - ``nonsink_random``.
    """
    groups = set(table.group) if len(table) else set()
    if not groups & {"nonsink", "nonsink_random"}:
        return None
    n_non, n_sink = _per_image_tokens(table, "nonsink"), _per_image_tokens(table, "sink")
    size = []
    if n_non is not None:
        size.append(f"'nonsink' is the mean of about {n_non:.0f} patches per image - a global average pool")
    if n_sink is not None:
        size.append(f"'sink' the mean of {n_sink:.1f} sink token(s) per image (images with a sink)")
    text = (
        ("Token groups differ in size: " + "; ".join(size) + ". " if size else "")
        + "A pooled vector averages out local content, so 'nonsink' is usually an easier probe of "
        "image-level labels than one token and is not the paper's non-sink baseline (0.512 for CLIP against 0.865 for sinks), which is "
        "closer to single non-sink tokens: compare 'sink' with 'nonsink_random' (one random non-sink "
        "patch per image, the same protocol as Darcet et al.'s 'random')"
    )
    if "nonsink_random" not in groups:
        return text + " - add nonsink_random to --groups."
    scores = []
    cls = table[table.task != "regression"] if "task" in table else table
    if len(cls):
        label = cls.label.iloc[0]
        for g in ("sink", "nonsink", "nonsink_random"):
            d = cls[(cls.label == label) & (cls.group == g)]
            if len(d) and d.accuracy.notna().any():
                scores.append(f"{g} {d.accuracy.max():.2f}")
    if scores:
        text += f". Best accuracy on '{label}': " + ", ".join(scores)
    return text + "."


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
    note = nonsink_note(table)
    return [note] if note else []


def _figures(table: pd.DataFrame, summary: dict) -> list:
    return [
        (f"Probe accuracy vs layer - '{label}'", probe_figure(table, label, summary))
        for label in table.label.unique()
    ]


def probe_section(run_dir: str | Path) -> RunSection:
    """The section of a saved probe run (``sinkscope report``): findings and one figure per label."""
    d = Path(run_dir)
    table = read_table(d / "probe.csv")
    summary = read_summary(d)
    return RunSection(
        "probe",
        d,
        f"Linear probes - {_name(summary)}",
        findings=probe_findings(table, summary),
        figures=_figures(table, summary),
    )


def write_probe_report(path: str | Path, table: pd.DataFrame, summary: dict) -> Path:
    """``probe.html``: findings (best layer per group against chance and the shuffle control), the
    protocol, and one figure per label, as one self-contained page in the style of
    ``sinkscope report``."""
    model = _name(summary)
    miss = summary.get("images_without_sink", {}) or {}
    findings = probe_findings(table, summary)  # includes the nonsink_note
    if summary.get("protocol"):
        findings.append(f"Protocol: {summary['protocol']}")
    if miss:
        findings.append(
            "Images without a sink, per layer: " + ", ".join(f"layer {k}: {v}" for k, v in miss.items()) + "."
        )
    sec = RunSection(
        "probe",
        Path(path).parent,
        f"Linear probes - {model}",
        findings=findings,
        figures=_figures(table, summary),
    )
    return write_page([sec], path, title=f"sinkscope probe - {model}")


__all__ = ["nonsink_note", "probe_figure", "probe_findings", "probe_section", "write_probe_report"]
