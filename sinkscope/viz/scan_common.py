"""Shared pieces of the scan figures: cleaning the token table, thresholds, captions, log ticks,
embedded pictures, the layer slider. Conventions of every scan figure are in :mod:`sinkscope.viz.scan_figures`.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Mapping

import numpy as np
import pandas as pd

_KIND_ORDER = ("patch", "cls", "register", "text")
_MAX_SINK_POINTS = 5000  # sink points drawn in the distribution figure
_MAX_ATTENTION_POINTS = 2000  # points per layer in the attention figure (sinks and non-patch always kept)
_MAX_PICTURE_SIDE = 512  # embedded pictures are downscaled to this many pixels on the long side
_MAX_TEXT_TOKENS = 4096  # token positions drawn in the text heat map

# --------------------------------------------------------------------------------------------- helpers


def _sig(x: float, digits: int = 4) -> float | None:
    """Round to ``digits`` significant digits (``None`` for missing / non-finite)."""
    if x is None:
        return None
    x = float(x)
    if not math.isfinite(x):
        return None
    if x == 0:
        return 0.0
    return round(x, digits - 1 - int(math.floor(math.log10(abs(x)))))


def _fmt(x: float | None) -> str:
    """Short human format of a number (4 significant digits)."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{float(x):.4g}"


def _layer_dict(d: Mapping | None) -> dict[int, object]:
    """``{"3": v}`` -> ``{3: v}`` (JSON keys are strings)."""
    out: dict[int, object] = {}
    for key, value in (d or {}).items():
        try:
            out[int(key)] = value
        except (TypeError, ValueError):
            continue
    return out


def _thresholds(summary: Mapping) -> dict[int, float]:
    """Per-layer thresholds on the norm axis; layers without one (None / NaN / <= 0) are left out."""
    rule = summary.get("rule") or {}
    out = {}
    for layer, value in _layer_dict(rule.get("per_layer_threshold")).items():
        if value is None:
            continue
        try:
            v = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(v) and v > 0:
            out[layer] = v
    return dict(sorted(out.items()))


def _sink_mask(df: pd.DataFrame) -> np.ndarray:
    if "is_sink" not in df.columns:
        return np.zeros(len(df), dtype=bool)
    return df["is_sink"].fillna(False).astype(bool).to_numpy()


def _clean(tokens: pd.DataFrame) -> pd.DataFrame:
    """Rows with a finite, positive norm (log axes need > 0), image as str, layer/token as int."""
    df = tokens
    norm = pd.to_numeric(df["norm"], errors="coerce")
    df = df.loc[
        np.isfinite(norm.to_numpy(dtype=float, na_value=np.nan))
        & (norm.to_numpy(dtype=float, na_value=0) > 0)
    ]
    df = df.assign(
        image=df["image"].astype(str),
        layer=df["layer"].astype(int),
        token=df["token"].astype(int),
        kind=df["kind"].astype(str),
        norm=df["norm"].astype(float),
        is_sink=_sink_mask(df),
    )
    return df


def _kinds(df: pd.DataFrame) -> list[str]:
    present = list(pd.unique(df["kind"]))
    return [k for k in _KIND_ORDER if k in present] + sorted(k for k in present if k not in _KIND_ORDER)


def _model_title(summary: Mapping) -> str:
    model = summary.get("model") or {}
    name = model.get("name") or "unknown model"
    family = model.get("family")
    return f"{name} ({family})" if family else str(name)


def _rule_caption(summary: Mapping, layer: int | None = None) -> str:
    """``rule: <description>`` plus the threshold (at ``layer`` when given) for figure subtitles."""
    rule = summary.get("rule") or {}
    desc = str(rule.get("description", "")) if isinstance(rule, Mapping) else str(rule)
    if not desc:
        return ""
    if layer is not None:
        thr = _thresholds(summary).get(int(layer))
        if thr is not None:
            desc += f"; threshold at this layer {thr:.4g}"
    return "rule: " + html.escape(desc)


def _with_rule(title: str, summary: Mapping) -> str:
    cap = _rule_caption(summary)
    return title + (f"<br><sup>{cap}</sup>" if cap else "")


def _log_ticks(lo: float, hi: float) -> tuple[list[float], list[str]]:
    """Colour-bar ticks for a ``log10`` colour axis from ``lo`` to ``hi`` (both log10 values)."""
    vals = []
    for e in range(math.floor(lo) - 1, math.ceil(hi) + 1):
        for m in (1, 2, 5):
            v = m * 10.0**e
            if 10**lo <= v * (1 + 1e-9) and v <= 10**hi * (1 + 1e-9):
                vals.append(v)
    if len(vals) > 8:
        vals = [v for v in vals if f"{v:g}".lstrip("0.").startswith("1")] or vals[:: len(vals) // 6]
    if len(vals) < 2:
        vals = [10**lo, 10**hi]
    return [math.log10(v) for v in vals], [f"{v:,.0f}" if v >= 1 else f"{v:.3g}" for v in vals]


def _log_axis(values) -> dict:
    """Explicit 1-2-5 ticks (data units, written out in full) for a log axis over ``values``, so a
    range under one decade still gets labelled ticks."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v) & (v > 0)]
    if v.size == 0:
        return {}
    lo, hi = math.log10(v.min()), math.log10(v.max())
    if hi - lo < 1e-6:
        lo, hi = lo - 0.1, hi + 0.1
    tv, _ = _log_ticks(lo, hi)
    vals = [10**t for t in tv]
    return {"tickvals": vals, "ticktext": [f"{x:,.0f}" if x >= 10 else f"{x:.3g}" for x in vals]}


def _log_range(norms: np.ndarray) -> tuple[float, float]:
    logs = np.log10(norms[np.isfinite(norms) & (norms > 0)])
    if logs.size == 0:
        return 0.0, 1.0
    lo, hi = float(logs.min()), float(logs.max())
    if hi - lo < 1e-6:
        lo, hi = lo - 0.1, hi + 0.1
    return lo, hi


def _picture_uri(image: np.ndarray) -> tuple[str, int, int]:
    """``(data URI, height, width)`` of an image array; the URI holds a (possibly downscaled) JPEG."""
    from PIL import Image

    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    height, width = arr.shape[:2]
    pil = Image.fromarray(arr).convert("RGB")
    if max(height, width) > _MAX_PICTURE_SIDE:
        pil.thumbnail((_MAX_PICTURE_SIDE, _MAX_PICTURE_SIDE))
    buf = io.BytesIO()
    pil.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), height, width


def _grid_of(summary: Mapping, image_name: str, patches: pd.DataFrame) -> tuple[int, int]:
    for entry in summary.get("images") or []:
        if str(entry.get("image")) == image_name and entry.get("grid"):
            rows, cols = entry["grid"]
            return int(rows), int(cols)
    if patches.empty:
        raise ValueError(f"image {image_name!r}: no patch tokens with a row/col and no grid in the summary")
    return int(patches["row"].max()) + 1, int(patches["col"].max()) + 1


def _default_layer(df: pd.DataFrame, layers: list[int]) -> int:
    """The layer shown first: the one with most sinks (latest on ties), else the last layer."""
    counts = df.loc[df["is_sink"]].groupby("layer").size()
    if counts.empty:
        return layers[-1]
    best = counts.max()
    return int(max(counts.index[counts == best]))


def _layer_slider(
    layers: list[int], active: int, visible: list[list[bool]], titles: list[str] | None = None
) -> dict:
    steps = []
    for i, layer in enumerate(layers):
        args: list = [{"visible": visible[i]}]
        if titles is not None:
            args.append({"title.text": titles[i]})
        steps.append({"method": "update", "label": str(layer), "args": args})
    return {
        "active": layers.index(active),
        "currentvalue": {"prefix": "layer (0 = embeddings): ", "font": {"size": 13}},
        "pad": {"t": 60, "b": 10},
        "steps": steps,
    }


def _has_attention(tokens: pd.DataFrame) -> bool:
    return "attention_received" in tokens.columns and bool(
        pd.to_numeric(tokens["attention_received"], errors="coerce").notna().any()
    )
