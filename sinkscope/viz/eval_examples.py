"""The Examples section of ``eval.html`` (issue 26): for a seeded sample of items per task type, the
image with its patch grid and its ViT sinks marked (the CLS token as a badge), for each variant the
tokens it fed (from ``tokens_fed``), the question, the answer and each variant's prediction with its
candidate scores; filterable in the page by task type, variant and right / wrong (plain JS).
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import json
import logging
import random
from itertools import zip_longest
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)
#: task types in the order the page shows them
TYPE_ORDER = ("global", "local", "mixed", "all")

# -- the section ----------------------------------------------------------------------------

#: at most this many examples per task type, and this many in all
EXAMPLES_PER_TYPE = 4
MAX_EXAMPLES = 24
#: thumbnails are downscaled to this many pixels on the long side
THUMB_SIDE = 160
#: candidate scores shown per variant (the best first)
MAX_SCORES = 8

_EXAMPLES_CSS = """
.ex-controls{margin:.5em 0 1em;display:flex;gap:1.2em;flex-wrap:wrap;align-items:center;font-size:14px}
.ex-list{display:flex;flex-direction:column;gap:10px}
.ex{display:flex;gap:14px;border:1px solid #ddd;border-radius:4px;padding:8px;align-items:flex-start}
.ex-img{flex:0 0 auto;text-align:center;font-size:12px} .ex-pic{position:relative;display:inline-block;line-height:0}
.ex-pic svg{position:absolute;left:0;top:0} .ex-body{flex:1 1 auto;font-size:13px}
.ex-q{font-weight:bold;margin-bottom:.2em} .ex-meta{color:#666;font-size:12px}
.ex-vars{display:flex;gap:10px;flex-wrap:wrap;margin-top:.4em}
.ex-var{border:1px solid #e3e3e3;border-radius:3px;padding:4px 6px;min-width:170px;max-width:300px}
.ex-var.right{border-left:4px solid #009E73} .ex-var.wrong{border-left:4px solid #D55E00}
.ex-var.dim{opacity:.35} .ex-var .mark{font-weight:bold} .ex-var.right .mark{color:#009E73}
.ex-var.wrong .mark{color:#D55E00} .ex-fed{color:#444;font-size:12px;margin:2px 0}
.ex-pair{display:flex;gap:8px;align-items:flex-start} .ex-scores{border:none;font-size:11px} .ex-scores td{border:none;padding:0 4px 0 0}
.ex-scores tr.pred td{font-weight:bold} .ex-scores tr.gold td:first-child{text-decoration:underline}
.badge{display:inline-block;background:#D55E00;color:#fff;border-radius:3px;padding:0 5px;font-size:11px;margin:2px}
.badge.plain{background:#888} .ex-legend{font-size:12px;color:#555}
.sw{display:inline-block;width:10px;height:10px;border:1px solid #bbb;vertical-align:middle;margin:0 2px 0 8px}
"""

_EXAMPLES_JS = """
(function(){
  var root = document.getElementById('%(id)s');
  if (!root) return;
  var sel = function(n){ return root.querySelector('select[name="' + n + '"]'); };
  function apply(){
    var tt = sel('task_type').value, v = sel('variant').value, r = sel('result').value;
    var shown = 0, all = root.querySelectorAll('.ex');
    all.forEach(function(ex){
      var any = false;
      ex.querySelectorAll('.ex-var').forEach(function(p){
        var inVar = v === '' || p.dataset.variant === v;
        var match = r === '' || p.dataset.correct === (r === 'right' ? '1' : '0');
        p.style.display = inVar ? '' : 'none';
        p.classList.toggle('dim', inVar && !match);
        if (inVar && match) any = true;
      });
      var show = (tt === '' || ex.dataset.taskType === tt) && any;
      ex.style.display = show ? '' : 'none';
      if (show) shown += 1;
    });
    root.querySelector('.ex-count').textContent = 'showing ' + shown + ' of ' + all.length + ' examples';
  }
  root.querySelectorAll('select').forEach(function(s){ s.addEventListener('change', apply); });
  apply();
})();
"""


def _thumbnail(image: np.ndarray, side: int = THUMB_SIDE) -> tuple[str, int, int]:
    """``(data URI, width, height)`` of a small JPEG of ``image`` (long side ``side`` pixels)."""
    from PIL import Image

    pil = Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB")
    w, h = pil.size
    scale = side / max(w, h)
    pil = pil.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    pil.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), pil.size[0], pil.size[1]


def sample_examples(pred: pd.DataFrame, per_type: int = EXAMPLES_PER_TYPE, seed: int = 0, cap: int = MAX_EXAMPLES) -> list[str]:
    """The item ids shown as examples: up to ``per_type`` per task type (at most ``cap`` in all),
    a seeded draw that alternates items some variant got wrong with items every variant got right
    (so both kinds are seen). The same predictions and seed give the same ids.

    >>> p = pd.DataFrame({"id": list("abcdef"), "task_type": ["global"] * 3 + ["local"] * 3,
    ...                   "correct": [True, False, True, True, True, False]})
    >>> sample_examples(p, per_type=2) == sample_examples(p, per_type=2)
    True
    >>> [p.set_index("id").task_type[i] for i in sample_examples(p, per_type=2)]
    ['global', 'global', 'local', 'local']
    """
    out: list[str] = []
    types = [t for t in TYPE_ORDER if t in set(pred.task_type)] + sorted(set(pred.task_type) - set(TYPE_ORDER))
    for tt in types:
        g = pred[pred.task_type == tt]
        ok = g.groupby("id", sort=True)["correct"].all()
        rng = random.Random(f"{seed}:{tt}")
        wrong, right = [i for i in ok.index if not ok[i]], [i for i in ok.index if ok[i]]
        rng.shuffle(wrong)
        rng.shuffle(right)
        mixed = [i for pair in zip_longest(wrong, right) for i in pair if i is not None]
        out += mixed[:per_type]
    return out[:cap]


def _cell_runs(cells: list[tuple[int, int]]) -> str:
    """An SVG path (one unit per patch) covering ``cells``, consecutive cells of a row merged."""
    parts, by_row = [], {}
    for r, c in sorted(set(cells)):
        by_row.setdefault(r, []).append(c)
    for r, cs in by_row.items():
        start = prev = cs[0]
        for c in cs[1:] + [None]:
            if c is not None and c == prev + 1:
                prev = c
                continue
            n = prev - start + 1
            parts.append(f"M{start} {r}h{n}v1h-{n}z")
            if c is not None:
                start = prev = c
    return "".join(parts)


def _sink_rects(cells: list[list[int]]) -> str:
    """One outlined square per ViT sink patch (``data-cell='row,col'``), dark and light lines so it
    shows on any picture."""
    return "".join(
        f"<g class='sink' data-cell='{r},{c}'><rect x='{c}' y='{r}' width='1' height='1' fill='#fff' fill-opacity='.3' "
        "stroke='#000' stroke-width='3.5' vector-effect='non-scaling-stroke'/>"
        f"<rect x='{c}' y='{r}' width='1' height='1' fill='none' stroke='#FFD21F' stroke-width='1.6' "
        "vector-effect='non-scaling-stroke'/></g>"
        for r, c in cells
    )


def _grid_svg(
    rows: int, cols: int, width: float, height: float, layers: list[tuple[str, str]], cls: str = "", extra: str = ""
) -> str:
    """An SVG of a ``rows`` x ``cols`` patch grid: ``layers`` are ``(path, style)`` drawn in order,
    then the grid lines, then ``extra`` (SVG in grid units)."""
    lines = "".join(f"M{c} 0V{rows}" for c in range(1, cols)) + "".join(f"M0 {r}H{cols}" for r in range(1, rows))
    body = "".join(f"<path d='{d}' {style}/>" for d, style in layers if d)
    return (
        f"<svg class='{cls}' width='{width:.0f}' height='{height:.0f}' viewBox='0 0 {cols} {rows}' preserveAspectRatio='none'>"
        f"{body}<path d='{lines}' fill='none' stroke='#888' stroke-opacity='.55' vector-effect='non-scaling-stroke' stroke-width='.7'/>"
        f"<rect width='{cols}' height='{rows}' fill='none' stroke='#888' vector-effect='non-scaling-stroke' stroke-width='1'/>{extra}</svg>"
    )


def _order_words(fed: pd.DataFrame) -> str:
    """How a variant ordered its fed tokens: ``sinks first`` / ``sinks last`` / ``ViT order`` / ``reordered``."""
    f = fed.sort_values("llm_position")
    sinks = f[f.is_vit_sink]
    other = f[~f.is_vit_sink]
    if len(sinks) and len(other):
        if sinks.llm_position.max() < other.llm_position.min() and not f.vit_token.is_monotonic_increasing:
            return "sinks first"
        if sinks.llm_position.min() > other.llm_position.max() and not f.vit_token.is_monotonic_increasing:
            return "sinks last"
    return "ViT order" if f.vit_token.is_monotonic_increasing else "reordered"


def example_data(pred: pd.DataFrame, tokens_fed: pd.DataFrame | None, ids: list[str]) -> list[dict[str, Any]]:
    """What the page shows of each example in ``ids`` (JSON-ready): the item, the patch grid of its
    first image (``grid``: rows, cols), the ViT sinks (``sink_cells``: their ``[row, col]``;
    ``extra_tokens``: tokens without a grid place such as CLS, with ``sink``) and per variant the
    prediction, ``correct``, ``scores`` and, for a variant with a ``tokens_fed`` record, ``cells``:
    one character per patch, row-major (``F`` fed, ``S`` fed sink, ``.`` dropped, ``s`` dropped
    sink, space: no token), ``n_fed`` / ``n_tokens`` / ``n_sinks_fed`` and ``order``."""
    fed_by = {k: g for k, g in tokens_fed.groupby(["id", "variant"], sort=False)} if tokens_fed is not None and len(tokens_fed) else {}
    out = []
    for item_id in ids:
        rows = pred[pred.id == item_id]
        first = rows.iloc[0]
        ex: dict[str, Any] = {
            "id": item_id, "task_type": first.task_type, "task": _text(first.get("task")),
            "question": _text(first.question), "answer": _text(first.answer), "image": _text(first.get("image")),
            "grid": None, "sink_cells": [], "extra_tokens": [], "variants": [],
        }  # fmt: skip
        sinks: set[tuple[int, int]] = set()
        extras: dict[int, bool] = {}
        for _, r in rows.iterrows():
            scores = r.get("scores")
            tie = r.get("tie")
            v = {
                "variant": r.variant, "prediction": _text(r.prediction), "correct": bool(r.correct),
                "scores": {str(k): float(s) for k, s in scores.items()} if isinstance(scores, dict) else None,
                "tie": list(tie) if isinstance(tie, list) else None, "mode": _text(r.get("mode")),
            }  # fmt: skip
            f = fed_by.get((item_id, r.variant))
            if f is not None:
                img0 = f[f.image == f.image.min()]
                placed = img0[img0.row.notna() & img0.col.notna()]
                if len(placed):
                    grid = (int(placed.row.max()) + 1, int(placed.col.max()) + 1)
                    ex["grid"] = ex["grid"] or list(grid)
                    cells = [" "] * (grid[0] * grid[1])
                    for rr, cc, fd, sk in zip(placed.row.astype(int), placed.col.astype(int), placed.llm_position.notna(), placed.is_vit_sink.astype(bool)):
                        cells[rr * grid[1] + cc] = ("S" if sk else "F") if fd else ("s" if sk else ".")
                        if sk:
                            sinks.add((rr, cc))
                    v["cells"] = "".join(cells)
                for tok, sk, fd in zip(img0.vit_token[img0.row.isna()], img0.is_vit_sink[img0.row.isna()], img0.llm_position[img0.row.isna()].notna()):
                    extras[int(tok)] = extras.get(int(tok), False) or bool(sk)
                    v.setdefault("extra_fed", {})[str(int(tok))] = bool(fd)
                fed = f[f.llm_position.notna()]
                v.update(n_fed=int(len(fed)), n_tokens=int(len(f)), n_sinks=int(f.is_vit_sink.sum()),
                         n_sinks_fed=int(fed.is_vit_sink.sum()), order=_order_words(fed) if len(fed) else None,
                         positions_kept=bool(len(fed) and (fed.position_id != fed.llm_position).any()))  # fmt: skip
            ex["variants"].append(v)
        ex["sink_cells"] = [list(c) for c in sorted(sinks)]
        ex["extra_tokens"] = [{"vit_token": t, "name": "CLS" if t == 0 else f"token {t}", "sink": s} for t, s in sorted(extras.items())]
        out.append(ex)
    return out


def _text(x: Any) -> str:
    return "" if x is None or (isinstance(x, float) and np.isnan(x)) else str(x)


def _variant_html(ex: dict, v: dict) -> str:
    esc = html.escape
    ok = v["correct"]
    head = (f"<div><b>{esc(v['variant'])}</b>: <span class='pred'>{esc(v['prediction'])}</span> "
            f"<span class='mark'>{'&#10003; right' if ok else '&#10007; wrong'}</span></div>")  # fmt: skip
    parts, pair = [head], []
    if "n_fed" in v:
        words = f"fed {v['n_fed']} of {v['n_tokens']} tokens"
        if v["n_sinks"]:
            words += f"; {v['n_sinks_fed']} of {v['n_sinks']} sink(s) fed"
        if v.get("order") and v["n_sinks_fed"] and v["n_fed"] > v["n_sinks_fed"]:
            words += f"; {v['order']}"
        if v.get("positions_kept"):
            words += "; position ids kept"
        for t, fd in (v.get("extra_fed") or {}).items():
            words += f"; {'CLS' if t == '0' else 'token ' + t} {'fed' if fd else 'dropped'}"
        parts.append(f"<div class='ex-fed'>{esc(words)}</div>")
        if v.get("cells") and ex["grid"]:
            rows, cols = ex["grid"]
            cells = v["cells"]
            at = lambda ch: [(i // cols, i % cols) for i, c in enumerate(cells) if c in ch]  # noqa: E731
            side = 84
            w, h = (side, side * rows / cols) if cols >= rows else (side * cols / rows, side)
            pair.append(_grid_svg(rows, cols, w, h, [
                (_cell_runs(at("F")), "fill='#8FBFE0'"),
                (_cell_runs(at("S")), "fill='#D55E00'"),
                (_cell_runs(at("s")), "fill='#F6D3BF'"),
            ], cls="ex-grid"))  # fmt: skip
    elif v["variant"] == "no-image":
        parts.append("<div class='ex-fed'>no image</div>")
    if v["scores"]:
        ranked = sorted(v["scores"].items(), key=lambda kv: -kv[1])
        rows_html = "".join(
            f"<tr class='{'pred' if c == v['prediction'] else ''} {'gold' if c == ex['answer'] else ''}'>"
            f"<td>{esc(c)}</td><td>{s:.3f}</td></tr>"
            for c, s in ranked[:MAX_SCORES]
        )
        more = f"<tr><td colspan='2'>+{len(ranked) - MAX_SCORES} more</td></tr>" if len(ranked) > MAX_SCORES else ""
        pair.append(f"<table class='ex-scores' title='log-likelihood of each candidate'>{rows_html}{more}</table>")
    elif v.get("mode") == "generate":
        pair.append("<div class='ex-fed'>generated (no candidate scores)</div>")
    if pair:
        parts.append("<div class='ex-pair'>" + "".join(pair) + "</div>")
    cls = "right" if ok else "wrong"
    return (f"<div class='ex-var {cls}' data-variant='{esc(v['variant'])}' data-correct='{int(ok)}'>"
            + "".join(parts) + "</div>")  # fmt: skip


def _example_html(ex: dict, picture: tuple[str, int, int] | None) -> str:
    esc = html.escape
    pic = ""
    if picture is not None:
        uri, w, h = picture
        overlay = ""
        if ex["grid"]:
            rows, cols = ex["grid"]
            overlay = _grid_svg(rows, cols, w, h, [], cls="ex-overlay", extra=_sink_rects(ex["sink_cells"]))
        pic = f"<div class='ex-pic'><img src='{uri}' width='{w}' height='{h}' alt='{esc(ex['image'])}'>{overlay}</div>"
    elif ex["grid"]:
        rows, cols = ex["grid"]
        w, h = THUMB_SIDE * min(1, cols / rows), THUMB_SIDE * min(1, rows / cols)
        svg = _grid_svg(rows, cols, w, h, [], cls="ex-overlay", extra=_sink_rects(ex["sink_cells"]))
        pic = (f"<div class='ex-pic' style='width:{w:.0f}px;height:{h:.0f}px'>{svg}</div>"
               "<div class='ex-meta'>(picture not available)</div>")  # fmt: skip
    else:
        pic = "<div class='ex-meta'>(picture not available)</div>"
    n_sinks = len(ex["sink_cells"])
    badges = "".join(
        f"<span class='badge{'' if t['sink'] else ' plain'}'>{esc(t['name'])}{' sink' if t['sink'] else ''}</span>"
        for t in ex["extra_tokens"]
    )
    grid_words = f"{ex['grid'][0]}x{ex['grid'][1]} patches, {n_sinks} ViT sink patch(es)" if ex["grid"] else "patch grid not recorded"
    img_col = f"<div class='ex-img'>{pic}<div class='ex-meta'>{esc(grid_words)}</div><div>{badges}</div></div>"
    body = (
        f"<div class='ex-body'><div class='ex-q'>{esc(ex['question'])}</div>"
        f"<div>answer: <b>{esc(ex['answer'])}</b></div>"
        f"<div class='ex-meta'>{esc(ex['task_type'])} &middot; {esc(ex['task'])} &middot; {esc(ex['id'])}</div>"
        f"<div class='ex-vars'>" + "".join(_variant_html(ex, v) for v in ex["variants"]) + "</div></div>"
    )
    return f"<div class='ex' data-id='{esc(ex['id'])}' data-task-type='{esc(ex['task_type'])}'>{img_col}{body}</div>"


def _pictures(examples: list[dict], summary: dict, items: list | None) -> dict[str, tuple[str, int, int]]:
    """Thumbnails of the examples' images, by item id: from ``items`` (or the run's items loaded
    again from the summary's tasks, split and limit; matched by id and image source) or, for an
    image that is a file, from the file. Only the sampled images are loaded; one that fails is left out."""
    from ..data import ImageItem

    want = {ex["id"]: ex["image"] for ex in examples}
    by_id: dict[str, Any] = {}
    if items is None and isinstance(summary.get("tasks"), str):
        with contextlib.suppress(Exception):  # a run whose items cannot be loaded again: no pictures
            from ..evaluation.items import load_items

            items = load_items(summary["tasks"], split=summary.get("split", "test"), limit=summary.get("limit"))
    for it in items or []:
        if it.id in want and it.image.source == want[it.id]:
            by_id[it.id] = it.image
    out: dict[str, tuple[str, int, int]] = {}
    done: dict[str, tuple[str, int, int]] = {}  # items that share an image share its thumbnail
    for item_id, source in want.items():
        img = by_id.get(item_id)
        if img is None and source and Path(source).is_file():
            img = ImageItem(Path(source).name, source)
        if img is None:
            continue
        if source not in done:
            try:
                done[source] = _thumbnail(img.load())
            except Exception as e:  # noqa: BLE001 - a picture that does not load is left out, not the page
                log.warning("eval page: picture of %s not shown (%s)", item_id, e)
                continue
        out[item_id] = done[source]
    return out


def examples_html(
    pred: pd.DataFrame | None,
    tokens_fed: pd.DataFrame | None,
    summary: dict,
    items: list | None = None,
    per_type: int = EXAMPLES_PER_TYPE,
    seed: int = 0,
    dom_id: str = "eval-examples",
) -> str:
    """The Examples part of the eval page: a seeded sample of items per task type, each with its
    picture, patch grid and ViT sinks, and per variant the tokens it fed, its prediction, its
    candidate scores and right / wrong; filters by task type, variant and right / wrong (plain JS,
    nothing from the network). The examples' data is also in the page as JSON
    (``<script type="application/json" id="{dom_id}-data">``). Empty without predictions."""
    if pred is None or not len(pred):
        return ""
    ids = sample_examples(pred, per_type=per_type, seed=seed)
    examples = example_data(pred, tokens_fed, ids)
    pictures = _pictures(examples, summary, items)
    esc = html.escape
    types = list(dict.fromkeys(ex["task_type"] for ex in examples))
    variants = list(dict.fromkeys(pred.variant))

    def select(name: str, label: str, options: list[tuple[str, str]]) -> str:
        opts = "".join(f"<option value='{esc(v)}'>{esc(t)}</option>" for v, t in options)
        return f"<label>{label} <select name='{name}'>{opts}</select></label>"

    controls = (
        "<div class='ex-controls'>"
        + select("task_type", "task type", [("", "all")] + [(t, t) for t in types])
        + select("variant", "variant", [("", "all")] + [(v, v) for v in variants])
        + select("result", "answer", [("", "right and wrong"), ("right", "right only"), ("wrong", "wrong only")])
        + "<span class='ex-count'></span></div>"
    )
    legend = (
        "<p class='ex-legend'>Up to " + str(per_type) + " items per task type (a seeded draw, items some variant got wrong "
        "alternating with items all got right). On the picture: the ViT's patch grid, ViT sinks outlined"
        "<span class='sw' style='border:2px solid #FFD21F;outline:1.5px solid #000'></span>(the grid covers the whole picture; the model's own "
        "preprocessing may crop or resize it). Per variant: <span class='sw' style='background:#8FBFE0'></span>fed"
        "<span class='sw' style='background:#D55E00'></span>sink fed<span class='sw' style='background:#F6D3BF'></span>sink dropped"
        "<span class='sw' style='background:#fff'></span>dropped; candidates by log-likelihood, the prediction in bold, "
        "the right answer underlined. A filtered variant hides the others; right / wrong keeps the examples where a "
        "shown variant matches and dims the rest.</p>"
    )  # fmt: skip
    data = json.dumps(examples).replace("</", "<\\/")
    return (
        f"<style>{_EXAMPLES_CSS}</style><div id='{dom_id}' class='examples'><h3>Examples</h3>{legend}{controls}"
        "<div class='ex-list'>" + "".join(_example_html(ex, pictures.get(ex["id"])) for ex in examples) + "</div>"
        f"<script type='application/json' id='{dom_id}-data'>{data}</script></div>"
        f"<script>{_EXAMPLES_JS % {'id': dom_id}}</script>"
    )


__all__ = ["example_data", "examples_html", "sample_examples"]
