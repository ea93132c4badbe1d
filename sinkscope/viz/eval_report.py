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

from pathlib import Path

import pandas as pd
import plotly.graph_objects as go

from ..runs import read_summary, read_table
from .page import RunSection, write_page

TYPE_ORDER = ("global", "local", "mixed", "all")
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
    for r in (iv or {}).get("paired", []):
        if r["task_type"] != "all" and r["p_mcnemar"] < 0.05:
            out.append(
                f"{r['variant']} vs {iv['paired_with']} on {r['task_type']}: {r['diff']:+.2f} "
                f"[{r['ci_low']:+.2f}, {r['ci_high']:+.2f}], McNemar p = {r['p_mcnemar']:.3g} (n={r['n']})."
            )
    return out


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


def _section(results: pd.DataFrame, summary: dict, path: Path) -> RunSection:
    name = (summary.get("model") or {}).get("name", "?")
    per_task = results[results.task != "*"].round(3)
    figures = [("Accuracy by task type", accuracy_figure(results))]
    tables = ""
    paired = pd.DataFrame((summary.get("interventions") or {}).get("paired") or [])
    if len(paired):
        ref = summary["interventions"]["paired_with"]
        figures.append((f"Each intervention minus {ref}, same items (paired bootstrap 95%)", paired_figure(paired, ref)))
        tables = f"<h3>Paired with {ref}</h3>" + paired.round(4).to_html(index=False)
    return RunSection(
        "eval",
        path,
        f"Evaluation - {name} on {summary.get('tasks', '?')} ({summary.get('split', '?')})",
        findings=eval_findings(results, summary),
        figures=figures,
        tables_html=tables + "<h3>Per task</h3>" + per_task.to_html(index=False),
    )


def eval_section(run_dir: str | Path) -> RunSection:
    """The section of a saved evaluation (``sinkscope report``)."""
    d = Path(run_dir)
    return _section(read_table(d / "results.csv"), read_summary(d), d)


def write_eval_report(
    path: str | Path, results: pd.DataFrame, summary: dict, overwrite: bool = False
) -> Path:
    """``eval.html``: findings, the accuracy figure and the per-task table, one self-contained page."""
    sec = _section(results, summary, Path(path).parent)
    name = (summary.get("model") or {}).get("name", "?")
    return write_page([sec], path, title=f"sinkscope eval - {name}", overwrite=overwrite)


__all__ = ["accuracy_figure", "eval_findings", "eval_section", "paired_figure", "write_eval_report"]
