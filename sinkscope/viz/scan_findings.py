"""What a scan says in words: the findings (plain sentences) and the summary table of a scan's
section, computed from its token table and summary only. Shared by a scan's ``report.html`` and
``sinkscope report``, so both summarise a run the same way.

>>> from PIL import Image
>>> from sinkscope.models import paint_markers
>>> from sinkscope.scanning import scan
>>> Image.fromarray(paint_markers(np.full((32, 32, 3), 90, np.uint8), [(1, 2)])).save("cat.png")  # a planted sink
>>> res = scan("tiny-dinov2+sinks", images=["cat.png"], progress=False)
>>> scan_findings(res.tokens, res.summary)[:2]
["tiny-dinov2+sinks on 1 item(s); sink rule: norm: automatic - widest gap in each layer's log-norms, gap >= 2x, upper group <= 10% of tokens and >= 4x median, patch/text tokens.",
 'Sinks appear from layer 2 on; at the last layer (4) 1 sink token(s) in 1 of 1 item(s) (at most 1 per layer over all items).']
"""

from __future__ import annotations

import html
from collections.abc import Mapping

import numpy as np
import pandas as pd

from sinkscope.viz import style
from sinkscope.viz.page import model_name as _name
from sinkscope.viz.page import pct as _pct
from sinkscope.viz.scan_common import _fmt, _layer_dict

#: Rules a scan may run besides its main one, in the words of the findings.
_RULE_WORDS = {"norm": "the norm rule", "attention": "the attention rule", "dims": "the dims rule"}


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
    return out + rule_findings(tokens, summary)


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


def _per_image_table(df: pd.DataFrame, images: list, sinks: pd.DataFrame) -> str:
    """A folded table: per image, its grid, distinct sink tokens and first sink layer."""
    esc = html.escape
    ok = [e for e in images if e.get("status", "ok") == "ok"] or [
        {"image": n, "grid": None} for n in pd.unique(df["image"])
    ]
    if not ok:
        return ""
    first = sinks.groupby("image")["layer"].min()
    count = sinks.drop_duplicates(["image", "token"]).groupby("image").size()
    out = [
        "<details><summary class='note'>Per-image sinks</summary><table class='list'>"
        "<tr><th>image</th><th>grid (rows × cols)</th><th>distinct sink tokens</th><th>first sink layer</th></tr>"
    ]
    for e in ok[:500]:
        name = str(e.get("image"))
        grid = e.get("grid")
        grid_text = f"{grid[0]} × {grid[1]}" if grid else "–"
        out.append(
            f"<tr><td><code>{esc(name)}</code></td><td>{grid_text}</td><td>{int(count.get(name, 0))}</td>"
            f"<td>{int(first[name]) if name in first.index else '–'}</td></tr>"
        )
    return "".join(out) + "</table></details>"


def _summary_block(df: pd.DataFrame, summary: Mapping, shown: list[str], n_more: int) -> str:
    esc = html.escape
    images = summary.get("images") or []
    failed = [e for e in images if e.get("status") == "failed"]
    n_ok = sum(1 for e in images if e.get("status", "ok") == "ok") if images else df["image"].nunique()
    layout = summary.get("layout") or {}
    rule = summary.get("rule") or {}
    threshold = rule.get("threshold") or {}
    layers = (
        sorted(int(x) for x in pd.unique(df["layer"]))
        if len(df)
        else sorted(_layer_dict(summary.get("per_layer")))
    )
    per_layer = _layer_dict(summary.get("per_layer"))
    flags = (
        sum(int((v or {}).get("n_sinks") or 0) for v in per_layer.values())
        if per_layer
        else int(df["is_sink"].sum())
    )
    sinks = df.loc[df["is_sink"]]
    distinct = len(sinks[["image", "token"]].drop_duplicates())
    peak = ""
    if per_layer:
        best = max(per_layer.items(), key=lambda kv: int((kv[1] or {}).get("n_sinks") or 0))
        peak = f" (peak: {int((best[1] or {}).get('n_sinks') or 0)} at layer {best[0]})"
    emergence = summary.get("emergence_layer")
    dims = list(summary.get("sink_dims") or [])
    dims_text = (
        ", ".join(str(d) for d in dims[:32]) + (f", … (+{len(dims) - 32})" if len(dims) > 32 else "")
        if dims
        else "none"
    )
    thr_text = f"{threshold.get('kind', 'n/a')}" + (
        f" = {_fmt(threshold.get('value'))}" if threshold.get("value") is not None else ""
    )
    rows = [
        (
            "model",
            f"{esc(str((summary.get('model') or {}).get('name', 'unknown')))} "
            f"<span class='note'>({esc(str((summary.get('model') or {}).get('family', 'n/a')))})</span>",
        ),
        (
            "rule",
            f"{esc(str(rule.get('description', 'n/a')))} <span class='note'>(method <code>{esc(str(rule.get('method', 'n/a')))}</code>, "
            f"threshold {esc(thr_text)})</span>",
        ),
        (
            "token layout",
            f"{layout.get('n_cls', 'n/a')} CLS, {layout.get('n_registers', 'n/a')} registers, "
            f"patch size {layout.get('patch_size') if layout.get('patch_size') is not None else 'n/a'}",
        ),
        (
            "images",
            f"{len(images) if images else n_ok} scanned: {n_ok} ok, "
            f"<span class='{'failed' if failed else ''}'>{len(failed)} failed</span>",
        ),
        ("layers", f"{len(layers)} (0 = embeddings … {layers[-1]})" if layers else "none"),
        (
            "sinks",
            f"{distinct} distinct sink tokens (image, token) at any layer; {flags} sink flags summed over layers{peak}",
        ),
        (
            "emergence layer",
            esc(str(emergence)) if emergence is not None else "none (no layer with sinks in most images)",
        ),
        ("sink dims", esc(dims_text)),
    ]
    out = ["<div id='summary'><h3>Summary</h3><table class='kv'>"]
    out += [f"<tr><th>{esc(k)}</th><td>{v}</td></tr>" for k, v in rows]
    out.append("</table>")
    if failed:
        out.append(
            "<h3 class='failed' style='font-size:15px;margin:12px 0 4px 0'>Failed images</h3><ul class='failed'>"
        )
        out += [
            f"<li><code>{esc(str(e.get('image')))}</code>: {esc(str(e.get('reason') or 'no reason given'))}</li>"
            for e in failed
        ]
        out.append("</ul>")
    if n_more:
        out.append(
            f"<p class='note'>Heat maps are drawn for the first {len(shown)} images; {n_more} more are in the table only.</p>"
        )
    out.append(_per_image_table(df, images, sinks))
    out.append("</div>")
    return "\n".join(out)


def _by_kind(hit: pd.DataFrame, tokens: pd.DataFrame) -> str:
    """``CLS in 9 of 9 item(s) at layers 0-11; patch: 16 distinct tokens in 5 item(s), layers 0-10.``"""
    n_img = tokens["image"].nunique()
    parts = []
    for kind, k in hit.groupby("kind", sort=False):
        lo, hi = int(k.layer.min()), int(k.layer.max())
        layers = f"layer {lo}" if lo == hi else f"layers {lo}-{hi}"
        n_tok = len(k.drop_duplicates(["image", "token"]))
        many = f": {n_tok} distinct tokens" if n_tok > k["image"].nunique() else ""
        parts.append(
            f"{style.kind_label(kind)}{many} in {k['image'].nunique()} of {n_img} item(s) at {layers}"
        )
    return "; ".join(parts) + "."


def rule_findings(tokens: pd.DataFrame, summary: Mapping) -> list[str]:
    """What the scan's other rules find (``--method all``), or that attention was not recorded.

    DINOv2-S has no high-norm token, so the norm rule finds nothing; its sink is the CLS token, which
    the attention rule finds - the report says so instead of showing an empty figure only.
    """
    rule = summary.get("rule") if isinstance(summary.get("rule"), Mapping) else {}
    main = str(rule.get("method", ""))
    out = []
    for m, words in _RULE_WORDS.items():
        col = f"is_sink_{m}"
        if m == main or col not in tokens:
            continue
        hit = tokens.loc[tokens[col].fillna(False).astype(bool)]
        if not len(hit):
            out.append(f"{words.capitalize()} (also run) flags no token.")
            continue
        out.append(
            f"{words.capitalize()} (also run; its tokens are not counted as sinks above) flags "
            + _by_kind(hit, tokens)
        )
        n_img = tokens["image"].nunique()
        cls_items = hit.loc[hit["kind"] == "cls", "image"].nunique()
        no_main = "is_sink" not in tokens or not tokens["is_sink"].astype(bool).any()
        if m == "attention" and no_main and cls_items > n_img / 2:
            out.append(
                f"So this model's sink is its CLS token, found by the attention it receives (in {cls_items} of "
                f"{n_img} item(s)); the {main or 'main'} rule looks for other tokens and finds none."
            )
    n_sinks = int(tokens["is_sink"].astype(bool).sum()) if "is_sink" in tokens else 0
    has_attn = "attention_received" in tokens and tokens["attention_received"].notna().any()
    if not n_sinks and not has_attn and main == "norm":
        out.append(
            "This scan recorded no attention (--method norm). Models without high-norm tokens, such as "
            "DINOv2-S, still have a sink - the CLS token, which receives most of the attention: rerun with "
            "--method all to see what the attention rule finds."
        )
    return out
