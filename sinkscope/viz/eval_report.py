"""The page of an evaluation (``eval.html``) and its ``sinkscope report`` section: accuracy by task
type per variant, with bootstrap intervals, chance and the majority baseline, then the per-task
table.

>>> import pandas as pd
>>> t = pd.DataFrame({"variant": ["default"] * 2, "task": ["*", "*"], "task_type": ["global", "all"],
...                   "n": [10, 10], "accuracy": [0.9, 0.9], "ci_low": [0.7, 0.7], "ci_high": [1.0, 1.0],
...                   "chance": [0.25, 0.25], "majority": [0.3, 0.3]})
>>> eval_findings(t, {"model": {"name": "m"}})[0]
'default: global 0.90 [0.70, 1.00] (n=10, chance 0.25).'
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go

from ..runs import read_summary, read_table
from .eval_examples import TYPE_ORDER, example_data, examples_html, sample_examples
from .page import RunSection, write_page

#: one colour per variant (Okabe-Ito, as the rest of sinkscope's figures)
VARIANT_COLORS = ("#0072B2", "#D55E00", "#009E73", "#E69F00", "#CC79A7", "#56B4E9", "#F0E442", "#000000", "#999999")


def eval_findings(results: pd.DataFrame, summary: dict) -> list[str]:
    """One sentence per variant: accuracy per task type with its interval and chance; a warning
    when the model's projector is untrained."""
    out = []
    types = results[results.task == "*"]
    for variant, g in types.groupby("variant", sort=False):
        g = g.set_index("task_type")
        parts = [
            f"{t} {g.at[t, 'accuracy']:.2f} [{g.at[t, 'ci_low']:.2f}, {g.at[t, 'ci_high']:.2f}] "
            f"(n={int(g.at[t, 'n'])}, chance {g.at[t, 'chance']:.2f})"
            for t in TYPE_ORDER
            if t in g.index and t != "all"
        ]
        out.append(f"{variant}: " + "; ".join(parts) + ".")
    if (summary.get("model") or {}).get("projector_trained") is False:
        out.append("This model's projector is untrained: its answers do not use the image.")
    iv = summary.get("interventions")
    if summary.get("var"):
        dims = summary["var"].get("sink_dims_used")
        out.append(summary["var"]["description"] + (f"; sink dims used: {list(dims)}." if dims else "."))
    if iv and "rule_description" in iv:
        fed = "; ".join(
            f"{v} {c['mean_visual_tokens']:.1f} visual tokens ({c['mean_sinks']:.1f} sinks)"
            for v, c in iv.get("tokens_fed", {}).items()
        )
        out.append(f"Interventions: {iv['rule_description']} ({iv['rule_reason']}); position ids {iv['positions']}. "
                   f"Fed per image: {fed}.")  # fmt: skip
    out += diysink_findings(summary.get("diysink") or {})
    for r in (iv or {}).get("paired", []):
        if r["task_type"] != "all" and r["p_mcnemar"] < 0.05:
            out.append(
                f"{r['variant']} vs {iv['paired_with']} on {r['task_type']}: {r['diff']:+.2f} "
                f"[{r['ci_low']:+.2f}, {r['ci_high']:+.2f}], McNemar p = {r['p_mcnemar']:.3g} (n={r['n']})."
            )
    return out


def diysink_findings(d: dict) -> list[str]:
    """The DIYSink lines of a run's findings (``summary["diysink"]``): the connector's rule and
    training history, CoT's routes and fallbacks, ReW's mean weights per task type, latency.

    >>> diysink_findings({"rule_description": "top-4 by norm", "weights": [1.0, 1.0], "history": [],
    ...                   "cot": {"routes": {"both": 3}, "fallbacks": 1, "n": 3, "routing_s_median": 0.2}})[1]
    'CoT routing: both 3 of 3; 1 unparseable answer(s) fell back to both; 0.200 s per question.'
    """
    if not d:
        return []
    steps = ", ".join(h.get("step", "?") for h in d.get("history", [])) or "untrained"
    out = [f"DIYSink connector: {d.get('rule_description')}; weights {d.get('weights')}; training: {steps}."]
    for name, label in (("cot", "CoT routing"), ("cot-score", "CoT routing (scored)")):
        if name in d:
            c = d[name]
            routes = ", ".join(f"{k} {n}" for k, n in c["routes"].items())
            out.append(f"{label}: {routes} of {c['n']}; {c['fallbacks']} unparseable answer(s) fell back to both; "
                       f"{c['routing_s_median']:.3f} s per question.")  # fmt: skip
    if "rew" in d:
        r = d["rew"]
        w = "; ".join(f"{t} [{a:.2f}, {b:.2f}]" for t, (a, b) in r["mean_weights"].items())
        out.append(f"ReW mean weights [w_sink, w_nonsink] by task type: {w}; {1000 * r['routing_s_median']:.1f} ms per question.")
    if d.get("seconds_per_question"):
        lat = ", ".join(f"{v} {s:.3f} s" for v, s in d["seconds_per_question"].items())
        out.append(f"Seconds per question (median, routing included): {lat}.")
    return out


def routing_figure(summary: dict) -> go.Figure | None:
    """Seconds per question per variant (median, routing included) and, when the run has the ReW
    router, its mean ``w_sink`` / ``w_nonsink`` per task type; ``None`` for a run without DIYSink."""
    from plotly.subplots import make_subplots

    d = summary.get("diysink") or {}
    if not d.get("seconds_per_question"):
        return None
    rew = (d.get("rew") or {}).get("mean_weights") or {}
    fig = make_subplots(1, 2 if rew else 1, subplot_titles=["seconds per question", "ReW mean weights"][: 1 + bool(rew)])
    lat = d["seconds_per_question"]
    fig.add_bar(x=list(lat), y=list(lat.values()), name="s / question", marker_color=VARIANT_COLORS[0], row=1, col=1)
    if rew:
        types = [t for t in TYPE_ORDER if t in rew]
        for i, name in enumerate(("w_sink", "w_nonsink")):
            fig.add_bar(x=types, y=[rew[t][i] for t in types], name=name, marker_color=VARIANT_COLORS[1 + i], row=1, col=2)
    fig.update_layout(barmode="group", height=360)
    return fig


def _variant_bars(table: pd.DataFrame, value: str, first_color: int = 0, extra: str = "") -> tuple[go.Figure, list[str]]:
    """One bar group per variant of ``table`` (rows per variant and task type), ``value`` with its
    ``ci_low`` / ``ci_high`` as error bars; ``extra`` adds a column to the hover (as ``customdata``).
    Returns the figure and the task types in their order."""
    fig = go.Figure()
    order = [t for t in TYPE_ORDER if t in set(table.task_type)]
    fmt = "+.3f" if value == "diff" else ".3f"
    for i, (variant, g) in enumerate(table.groupby("variant", sort=False)):
        g = g.set_index("task_type").reindex(order)
        more = {"customdata": g[extra]} if extra else {}
        fig.add_bar(
            x=order,
            y=g[value],
            name=variant,
            marker_color=VARIANT_COLORS[(first_color + i) % len(VARIANT_COLORS)],
            error_y={"type": "data", "array": g.ci_high - g[value], "arrayminus": g[value] - g.ci_low},
            hovertemplate="%{x}: %{y:" + fmt + "}" + (" (McNemar p %{customdata:.3g})" if extra else "")
            + "<extra>" + variant + "</extra>",
            **more,
        )
    return fig, order


def paired_figure(paired: pd.DataFrame, reference: str = "both") -> go.Figure:
    """Each variant's accuracy minus ``reference``'s on the same items, per task type, with the
    paired bootstrap interval; zero is no change."""
    fig, _ = _variant_bars(paired, "diff", first_color=1, extra="p_mcnemar")  # colour 0 is the reference's
    fig.add_hline(y=0, line_color="#444")
    fig.update_layout(
        barmode="group", yaxis_title=f"accuracy minus {reference}", xaxis_title="task type", height=380
    )
    return fig


def accuracy_figure(results: pd.DataFrame) -> go.Figure:
    """Accuracy by task type, one bar group per variant, 95% bootstrap intervals, chance as ticks."""
    types = results[results.task == "*"]
    fig, order = _variant_bars(types, "accuracy")
    chance = types.drop_duplicates("task_type").set_index("task_type").reindex(order)
    fig.add_scatter(
        x=order,
        y=chance.chance,
        mode="markers",
        name="chance",
        marker={"symbol": "line-ew-open", "size": 30, "color": "#444"},
    )
    fig.update_layout(
        barmode="group", yaxis={"range": [0, 1.05], "title": "accuracy"}, xaxis_title="task type", height=380
    )
    return fig


def _section(results: pd.DataFrame, summary: dict, path: Path, examples: str = "") -> RunSection:
    name = (summary.get("model") or {}).get("name", "?")
    per_task = results[results.task != "*"].round(3)
    figures = [("Accuracy by task type", accuracy_figure(results))]
    tables = ""
    paired = pd.DataFrame((summary.get("interventions") or {}).get("paired") or [])
    if len(paired):
        ref = summary["interventions"]["paired_with"]
        figures.append((f"Each intervention minus {ref}, same items (paired bootstrap 95%)", paired_figure(paired, ref)))
        tables = f"<h3>Paired with {ref}</h3>" + paired.round(4).to_html(index=False)
    routed = routing_figure(summary)
    if routed is not None:
        figures.append(("DIYSink: latency and router weights", routed))
    return RunSection(
        "eval",
        path,
        f"Evaluation - {name} on {summary.get('tasks', '?')} ({summary.get('split', '?')})",
        findings=eval_findings(results, summary),
        figures=figures,
        tables_html=examples + tables + "<h3>Per task</h3>" + per_task.to_html(index=False),
    )


def eval_section(run_dir: str | Path) -> RunSection:
    """The section of a saved evaluation (``sinkscope report``)."""
    d = Path(run_dir)
    return _section(read_table(d / "results.csv"), read_summary(d), d)


def _read_run_tables(d: Path) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
    """``predictions.jsonl`` and ``tokens_fed.parquet`` of run folder ``d`` (None when absent or unreadable)."""
    pred = fed = None
    with contextlib.suppress(ValueError, OSError):
        if (d / "predictions.jsonl").is_file():
            pred = pd.read_json(d / "predictions.jsonl", lines=True, dtype=False)
    with contextlib.suppress(ValueError, OSError, ImportError):
        if (d / "tokens_fed.parquet").is_file():
            fed = pd.read_parquet(d / "tokens_fed.parquet")
    return pred, fed


def write_eval_report(
    path: str | Path,
    results: pd.DataFrame,
    summary: dict,
    overwrite: bool = False,
    predictions: pd.DataFrame | None = None,
    tokens_fed: pd.DataFrame | None = None,
    items: list | None = None,
) -> Path:
    """``eval.html``: findings, the accuracy figure, the Examples (:func:`examples_html`) and the
    per-task table, one self-contained page. ``predictions`` and ``tokens_fed`` default to the
    run folder's (the page's folder) ``predictions.jsonl`` and ``tokens_fed.parquet``; ``items``
    (the run's :class:`~sinkscope.evaluation.items.VQAItem`) give the pictures, by default the
    summary's tasks loaded again."""
    d = Path(path).parent
    pred, fed = _read_run_tables(d) if predictions is None or tokens_fed is None else (None, None)
    pred = predictions if predictions is not None else pred
    fed = tokens_fed if tokens_fed is not None else fed
    if pred is not None and fed is not None and len(fed) and not set(fed.get("id", [])) & set(pred.id):
        fed = None  # a tokens_fed table of another run
    sec = _section(results, summary, d, examples_html(pred, fed, summary, items=items))
    name = (summary.get("model") or {}).get("name", "?")
    return write_page([sec], path, title=f"sinkscope eval - {name}", overwrite=overwrite)


__all__ = [
    "accuracy_figure", "diysink_findings", "eval_findings", "eval_section", "example_data", "examples_html",
    "paired_figure", "routing_figure", "sample_examples", "write_eval_report",
]  # fmt: skip
