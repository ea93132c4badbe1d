"""Figures and page of word-distribution decoding (``sinkscope decode``), from the saved tables.

- :func:`decode_rate_figure` - the share of sink vs non-sink visual tokens whose isolated decoding
  names the image's object, per scope (all images, each label, the control), with the binomial
  confidence interval as error bars;
- :func:`write_decode_report` - ``decode.html``: findings, the figure, the rate table and the
  decoded words of the sink tokens, one self-contained page in the style of ``sinkscope report``.

>>> from sinkscope.flow.decoding import decode_rate
>>> decode_rate("tiny-llava+sinks", "lfw-faces", max_images=4, progress=False).save("runs/decode")
PosixPath('runs/decode')
>>> rates, summary = read_table("runs/decode/decode_rate.csv"), read_summary("runs/decode")
>>> fig = decode_rate_figure(rates, summary)
>>> [t.name for t in fig.data]
['sink tokens', 'non-sink tokens']
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from ..runs import read_summary, read_table
from . import style
from .page import RunSection, write_page

#: Group -> (display name, colour): sinks in the sink colour, non-sinks in the patch colour.
GROUP_STYLE = {
    "sink": ("sink tokens", style.SINK_COLOR),
    "nonsink": ("non-sink tokens", style.KIND_COLORS["patch"]),
}


def _scope_label(scope: str) -> str:
    if scope == "all":
        return "all labelled images"
    if scope == "control":
        return "control (no object word)"
    return scope.replace("label=", "label ")


def _model_name(summary: dict | None) -> str:
    m = (summary or {}).get("model", {})
    return str(m.get("name", "?")) if isinstance(m, dict) else str(m)


def _pct(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{100 * x:.1f}%"


def decode_rate_figure(rates: pd.DataFrame, summary: dict | None = None) -> go.Figure:
    """Decoding rate per group and scope with asymmetric CI error bars (a grouped bar chart).

    ``rates``: the ``rates`` table of :func:`sinkscope.flow.decoding.decode_rate` (or
    ``decode_rate.csv``). Scopes without tokens in a group are drawn as empty (no bar); a single
    labelled class is drawn once (as "all"); every bar's hover names ``hits / tokens`` and the
    interval.

    >>> rates = pd.DataFrame({"group": ["sink", "nonsink"], "scope": "all", "n_tokens": [10, 40],
    ...                       "n_hits": [8, 4], "rate": [0.8, 0.1], "ci_low": [0.49, 0.04],
    ...                       "ci_high": [0.94, 0.23], "n_images": 10})
    >>> [t.name for t in decode_rate_figure(rates).data]
    ['sink tokens', 'non-sink tokens']
    """
    s = summary or {}
    fig = go.Figure()
    scopes = list(dict.fromkeys(rates["scope"]))
    per_label = [sc for sc in scopes if str(sc).startswith("label=")]
    if len(per_label) == 1 and "all" in scopes:  # one labelled class: its bar would repeat "all"
        scopes = [sc for sc in scopes if sc not in per_label]
    xs = [_scope_label(sc) for sc in scopes]
    for g, (name, color) in GROUP_STYLE.items():
        d = rates[rates["group"] == g].set_index("scope").reindex(scopes)
        rate = d["rate"].to_numpy(float)
        lo = d["ci_low"].to_numpy(float)
        hi = d["ci_high"].to_numpy(float)
        fig.add_trace(
            go.Bar(
                x=xs,
                y=rate * 100,
                name=name,
                marker_color=color,
                error_y={
                    "type": "data",
                    "symmetric": False,
                    "array": np.clip(np.nan_to_num((hi - rate) * 100), 0, None),
                    "arrayminus": np.clip(np.nan_to_num((rate - lo) * 100), 0, None),
                    "color": style.THRESHOLD_COLOR,
                    "thickness": 1.5,
                },
                customdata=np.stack(
                    [
                        d["n_hits"].fillna(0).to_numpy(),
                        d["n_tokens"].fillna(0).to_numpy(),
                        lo * 100,
                        hi * 100,
                        d["n_images"].fillna(0).to_numpy() if "n_images" in d else np.zeros(len(d)),
                    ],
                    axis=-1,
                ),
                hovertemplate="%{x}<br>"
                + name
                + ": %{y:.1f}% (%{customdata[0]:.0f} / %{customdata[1]:.0f} tokens, "
                "%{customdata[4]:.0f} images)<br>CI %{customdata[2]:.1f}% - %{customdata[3]:.1f}%<extra></extra>",
                meta={"role": "decode-rate", "group": g},
            )
        )
    rule = (s.get("sink_rule") or {}).get("description", "")
    ci = s.get("ci_method", "")
    conf = s.get("confidence")
    sub = f"sinks: {rule}" if rule else ""
    if s.get("top_k"):
        sub += f"; hit = image's object word among the top-{s['top_k']} decoded tokens"
    if ci:
        sub += f"; error bars: {int(round(100 * conf)) if conf else ''}% {ci} interval"
    title = f"Isolated visual tokens decoded to the object word - {_model_name(s)}"
    if s.get("dataset"):
        title += f" on {s['dataset']}"
    style.apply_style(
        fig,
        title=title + (f"<br><sup>{html.escape(sub, quote=False)}</sup>" if sub else ""),
        x_title="images",
        y_title="tokens decoding to the object word (%)",
    )
    fig.update_layout(barmode="group", margin={"t": 90})
    fig.update_yaxes(rangemode="tozero")
    return fig


def decode_findings(rates: pd.DataFrame, summary: dict) -> list[str]:
    """A few sentences on a decoding run: the two headline rates with their intervals, the
    difference, the control, the rule and the caveats.

    >>> from sinkscope.flow.decoding import decode_rate
    >>> res = decode_rate("tiny-llava+sinks", "lfw-faces", max_images=4, progress=False)
    >>> decode_findings(res.rates, res.summary)[:2]       # lfw faces carry no planted marker: no sink
    ['Sink tokens: none decoded (no such token in the labelled images).',
     'Non-sink tokens: 0.0% decode to the object word (0 / 16 tokens from 2 images; 95% wilson CI 0.0% - 19.4%).']
    """
    out = []
    r = summary.get("rates") or {}
    conf = summary.get("confidence", 0.95)
    ci = summary.get("ci_method", "wilson")
    for g, name in (("sink", "Sink tokens"), ("nonsink", "Non-sink tokens")):
        h = r.get(g) or {}
        if not h.get("n_tokens"):
            out.append(f"{name}: none decoded (no such token in the labelled images).")
            continue
        lo, hi = h["ci"]
        out.append(
            f"{name}: {_pct(h['rate'])} decode to the object word ({h['n_hits']} / {h['n_tokens']} tokens from "
            f"{h['n_images']} images; {round(100 * conf)}% {ci} CI {_pct(lo)} - {_pct(hi)})."
        )
    d = r.get("difference")
    if d:
        out.append(
            f"Difference sink - non-sink: {100 * d['sink_minus_nonsink']:+.1f} points "
            f"(CI {100 * d['ci'][0]:+.1f} to {100 * d['ci'][1]:+.1f}, {d['ci_method']})."
        )
    c = r.get("control")
    if c:
        parts = [
            f"{nm} {_pct(c[g].get('rate'))} ({c[g].get('n_hits', 0)} / {c[g].get('n_tokens', 0)})"
            for g, nm in (("sink", "sinks"), ("nonsink", "non-sinks"))
            if c.get(g)
        ]
        out.append(
            f"Control images ({', '.join(summary.get('control_labels', []))}: no object word) decoding to any "
            "object word: " + ", ".join(parts) + "."
        )
    rule = (summary.get("sink_rule") or {}).get("description")
    if rule:
        out.append(f"Sink rule at vision feature layer {summary.get('feature_layer')}: {rule}.")
    out.append(
        f"Decoding: top-{summary.get('top_k')} tokens of each isolated visual token ({summary.get('isolation', '')}); "
        f"{summary.get('nonsinks_per_image')} random non-sinks per image (seed {summary.get('seed')})."
    )
    words = summary.get("words") or {}
    if words:
        out.append("Object words: " + "; ".join(f"{k}: {', '.join(v)}" for k, v in words.items()) + ".")
    out += [f"Caveat: {c}." for c in summary.get("caveats", [])]
    return out


def _sink_words_html(per_token: pd.DataFrame, max_rows: int = 60) -> str:
    if per_token is None or not len(per_token):
        return ""
    d = per_token.sort_values(["group", "image"], ascending=[False, True]).head(max_rows).copy()

    def words(s):
        try:
            return " | ".join(json.loads(s))
        except (TypeError, ValueError):
            return str(s)

    d["top_tokens"] = d["top_tokens"].map(words)
    cols = [
        "image_name",
        "label",
        "group",
        "vit_token",
        "vit_norm",
        "norm_ratio",
        "top_tokens",
        "hit",
        "hit_word",
    ]
    return f"<h2>Decoded tokens (first {len(d)} of {len(per_token)}, sinks first)</h2>" + d[
        [c for c in cols if c in d]
    ].to_html(index=False, float_format=lambda x: f"{x:.3g}")


def build_decode_section(
    rates: pd.DataFrame, per_token: pd.DataFrame, summary: dict, path: str | Path
) -> RunSection:
    """Findings, :func:`decode_rate_figure`, the rate table and the decoded words of a decoding run."""
    return RunSection(
        "decode",
        Path(path),
        f"Word-distribution decoding - {_model_name(summary)}",
        findings=decode_findings(rates, summary),
        figures=[("Decoding rate: sink vs non-sink visual tokens", decode_rate_figure(rates, summary))],
        tables_html="<h2>Rates</h2>"
        + rates.to_html(index=False, float_format=lambda x: f"{x:.4g}")
        + _sink_words_html(per_token),
        warning=str(summary.get("warning") or ""),
    )


def decode_section(run_dir: str | Path) -> RunSection:
    """The section of a saved decoding run (``sinkscope report``), read through :mod:`sinkscope.runs`."""
    d = Path(run_dir)
    tokens = d / "decode_tokens.csv"
    per_token = read_table(tokens) if tokens.exists() else pd.DataFrame()
    return build_decode_section(read_table(d / "decode_rate.csv"), per_token, read_summary(d), d)


def write_decode_report(
    path: str | Path, rates: pd.DataFrame, per_token: pd.DataFrame, summary: dict, overwrite: bool = False
) -> Path:
    """``decode.html``: findings, :func:`decode_rate_figure`, the rate table and the decoded words,
    one self-contained page (plotly.js inline). An existing page sinkscope did not write is
    refused unless ``overwrite``.

    >>> from sinkscope.flow.decoding import decode_rate
    >>> res = decode_rate("tiny-llava+sinks", "lfw-faces", max_images=4, progress=False)
    >>> write_decode_report("runs/decode/decode.html", res.rates, res.per_token, res.summary)
    PosixPath('runs/decode/decode.html')
    """
    sec = build_decode_section(rates, per_token, summary, Path(path).parent)
    return write_page([sec], path, title=f"sinkscope decode - {_model_name(summary)}", overwrite=overwrite)


__all__ = [
    "build_decode_section",
    "decode_findings",
    "decode_rate_figure",
    "decode_section",
    "write_decode_report",
]
