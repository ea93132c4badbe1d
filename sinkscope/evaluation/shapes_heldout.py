"""``shapes-heldout``: the ``shapes`` questions asked of scenes drawn by a second, independently
written generator and renderer (a held-out style; test split only).

A model trained on :mod:`~sinkscope.evaluation.shapes` has seen only scenes laid out by
``shapes.scene`` and drawn by ``shapes.render`` (PIL's flat fills and grey 3-px outlines on a flat
224-px background, however its training varies them), and ``shapes``' test split is drawn the same
way: its test accuracy may partly measure how well it learned that generator and renderer.
This module draws the same kind of scene - the same :class:`~sinkscope.evaluation.shapes.Scene`
records, answered by the same :func:`~sinkscope.evaluation.shapes.answer` and
:func:`~sinkscope.evaluation.shapes.questions`, in the same vocabulary - with code that shares
nothing with ``shapes`` but those records, so a model that reads the scene (rather than the
renderer) should score about the same on both. ``sinkscope eval --tasks shapes,shapes-heldout``
reports the two apart: the held-out items' ``source`` is ``shapes-heldout`` and their tasks are
named ``heldout_<task>`` (``heldout_count``, ...), so ``results.csv`` has a row for each.

**What differs from** ``shapes``

=====================  ====================================  ======================================
                       ``shapes``                            ``shapes-heldout``
=====================  ====================================  ======================================
shape count            1-6, uniform                          1-6, weighted towards 3-4
quadrants              each used once before any holds two   two shapes may share a quadrant while
                                                             another is empty
size (radius, 224 px)  14-36 alone, 10-14 when two share     16-40 alone, 11-20 when two share
two in a quadrant      side by side, same height             anywhere that fits (rejection sampled)
colours                30% all one colour, 15% one shape of  a scene palette of 1-4 colours (one
                       the background's colour, else random  colour: 25% of scenes), 22% of
                                                             scenes give one shape the background's
kinds                  uniform (15% share one kind)          triangles more often (40%)
background colour      uniform                               weighted (white and black more often)
renderer               PIL ImageDraw, flat colours           numpy signed-distance masks, 4x4
                                                             supersampled anti-aliasing
fill shades            :data:`shapes.COLOURS`                :data:`COLOURS` (other RGB, same names)
outline                grey, 3 px                            same hue darker, 2 px (black: grey-blue)
squares / triangles    sharp, triangle upright               rounded corners; triangle tilted up
                                                             to 12 degrees
background             flat                                  gradient + soft texture + pixel noise
canvas                 224 x 224, lossless                   256 x 256, JPEG round trip (quality 75)
seeds                  0 / 10M / 20M (train/val/test)        30M + i (test only)
=====================  ====================================  ======================================

Every scene keeps the rules ``shapes`` keeps: one to six shapes, at most two per quadrant, each
inside its quadrant (a 6-px gap from the centre lines), none within ``shapes.MARGIN`` (18 px of the
224-px layout) of the border, none overlapping (the bounding squares of two shapes in one quadrant
are at least 4 px apart; shapes of two quadrants at least 12 px). The layout
lives in the 224-px frame of :class:`~sinkscope.evaluation.shapes.Shape`; :func:`render` scales it
to a square :data:`SIZE`-px canvas, so a LLaVA-style processor's resize and centre crop loses at
most the border: a 256 -> 224 crop removes 16 / 256 = 1/16 of each side, 14 px of the 224 frame,
and every shape is at least 18 px (18 / 224 > 1 / 16) from it.

>>> sc = scene(0)
>>> sc.seed, sc.split, 1 <= len(sc.shapes) <= 6, sc.background in COLOURS
(30000000, 'test', True, True)
>>> render(sc).size, render(sc) == render(sc)
((256, 256), True)
>>> scene(0, "train")
Traceback (most recent call last):
...
sinkscope._utils.SinkscopeError: shapes-heldout has only a test split, not 'train'
"""

from __future__ import annotations

import io
import math
import random
from typing import Any

import numpy as np
from PIL import Image

from .._utils import SinkscopeError
from . import shapes as _shapes

#: the task set's name (the ``source`` of its items)
NAME = "shapes-heldout"
#: the first generator seed of each split (only ``test``; disjoint from ``shapes.SPLIT_SEEDS``)
SPLIT_SEEDS = {"test": 30_000_000}
#: the rendered canvas (square)
SIZE = 256
#: the layout frame (that of ``shapes.Shape``) and its border margin
FRAME = _shapes.SIZE
MARGIN = _shapes.MARGIN
#: the gap every shape keeps from the quadrant's centre lines, and between two shapes' bounding squares
MIDLINE_GAP = 6.0
PAIR_GAP = 4.0
#: radius ranges (layout px): a shape alone in its quadrant, or one of two
SOLO_RADIUS = (16.0, 40.0)
PAIR_RADIUS = (11.0, 20.0)
#: outline width in canvas px, and anti-aliasing subsamples per pixel side
OUTLINE_PX = 2.0
SUPERSAMPLE = 4
JPEG_QUALITY = 75

#: name -> RGB fill: this renderer's own shades (each nearest its own name in ``shapes.COLOURS`` too)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (204, 44, 40),
    "green": (48, 148, 64),
    "blue": (44, 92, 198),
    "yellow": (236, 204, 52),
    "purple": (124, 58, 158),
    "orange": (234, 118, 36),
    "white": (238, 238, 230),
    "black": (32, 30, 36),
}
#: the outline of a black shape (a darker black would vanish on a black background)
BLACK_OUTLINE = (120, 124, 140)

_COUNT_WEIGHTS = (0.10, 0.16, 0.22, 0.22, 0.16, 0.14)
_KIND_WEIGHTS = {"circle": 0.3, "square": 0.3, "triangle": 0.4}
_BACKGROUND_WEIGHTS = {
    "red": 1,
    "green": 1,
    "blue": 1,
    "yellow": 1,
    "purple": 1,
    "orange": 1,
    "white": 1.6,
    "black": 1.6,
}


def _check_split(split: str) -> None:
    if split not in SPLIT_SEEDS:
        raise SinkscopeError(f"{NAME} has only a test split, not {split!r}")


def _quadrant_box(q: str) -> tuple[float, float, float, float]:
    """``(x0, y0, x1, y1)``: where a shape of ``q`` may reach (layout px)."""
    mid = FRAME / 2
    x0, x1 = (mid + MIDLINE_GAP, FRAME - MARGIN) if q.endswith("right") else (MARGIN, mid - MIDLINE_GAP)
    y0, y1 = (mid + MIDLINE_GAP, FRAME - MARGIN) if q.startswith("bottom") else (MARGIN, mid - MIDLINE_GAP)
    return x0, y0, x1, y1


def _apart(a: tuple[float, float, float], b: tuple[float, float, float]) -> bool:
    """Whether the bounding squares of ``a`` and ``b`` (``x, y, r``) are ``PAIR_GAP`` apart."""
    need = a[2] + b[2] + PAIR_GAP
    return abs(a[0] - b[0]) >= need or abs(a[1] - b[1]) >= need


def _layout(rng: random.Random, q: str, k: int) -> list[tuple[float, float, float]]:
    """``k`` (one or two) ``(x, y, radius)`` inside quadrant ``q``, not overlapping; rounded to
    0.01 px, the rules checked on the rounded values (a 0.01-px slack keeps rounding inside)."""
    x0, y0, x1, y1 = _quadrant_box(q)

    def at(r: float) -> tuple[float, float, float]:
        r = round(r, 2)
        return (
            round(rng.uniform(x0 + r + 0.01, x1 - r - 0.01), 2),
            round(rng.uniform(y0 + r + 0.01, y1 - r - 0.01), 2),
            r,
        )

    if k == 1:
        return [at(rng.uniform(*SOLO_RADIUS))]
    while True:  # two smaller shapes anywhere they fit; new radii when 40 draws do not fit
        ra, rb = rng.uniform(*PAIR_RADIUS), rng.uniform(*PAIR_RADIUS)
        for _ in range(40):
            a, b = at(ra), at(rb)
            if _apart(a, b):
                return [a, b]


def scene(index: int, split: str = "test") -> _shapes.Scene:
    """Held-out scene ``index`` (seed ``SPLIT_SEEDS[split] + index``); the same arguments always
    give the same scene. Only ``split="test"`` exists.

    >>> scene(5) == scene(5), scene(5) == scene(6)
    (True, False)
    """
    _check_split(split)
    seed = SPLIT_SEEDS[split] + index
    rng = random.Random(f"{NAME}:{seed}")
    names = list(COLOURS)
    background = rng.choices(names, weights=[_BACKGROUND_WEIGHTS[c] for c in names])[0]
    n = rng.choices(range(1, 7), weights=_COUNT_WEIGHTS)[0]
    # per quadrant: how many shapes (at most two); a quadrant may hold two while another is empty
    per = dict.fromkeys(_shapes.QUADRANTS, 0)
    for _ in range(n):
        q = rng.choice([q for q in _shapes.QUADRANTS if per[q] < 2])
        per[q] += 1
    palette = rng.sample(names, rng.choices((1, 2, 3, 4), weights=(0.25, 0.3, 0.25, 0.2))[0])
    kinds, kw = list(_KIND_WEIGHTS), list(_KIND_WEIGHTS.values())
    placed = []
    for q in rng.sample(_shapes.QUADRANTS, 4):
        for x, y, r in _layout(rng, q, per[q]) if per[q] else []:
            placed.append((q, x, y, r, rng.choice(palette), rng.choices(kinds, weights=kw)[0]))
    if rng.random() < 0.22:  # one shape of the background's colour (matches_background: yes)
        j = rng.randrange(len(placed))
        placed[j] = (*placed[j][:4], background, placed[j][5])
    order = {q: i for i, q in enumerate(_shapes.QUADRANTS)}
    placed.sort(key=lambda p: (order[p[0]], p[2], p[1]))
    shapes = tuple(_shapes.Shape(kind, colour, q, x, y, r) for q, x, y, r, colour, kind in placed)
    return _shapes.Scene(background, shapes, seed, split)


# -- rendering --------------------------------------------------------------------------------------


def _sdf(kind: str, px: np.ndarray, py: np.ndarray, r: float, tilt: float) -> np.ndarray:
    """Signed distance (negative inside) from points ``px, py`` (relative to the centre, canvas px)
    to a ``kind`` of radius ``r``: a circle, a square of half-side ``r`` with rounded corners, or an
    equilateral triangle inscribed in the circle of radius ``r``, tilted by ``tilt`` radians."""
    if kind == "circle":
        return np.hypot(px, py) - r
    if kind == "square":
        k = 0.18 * r
        qx, qy = np.abs(px) - (r - k), np.abs(py) - (r - k)
        outside = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0))
        return outside + np.minimum(np.maximum(qx, qy), 0) - k
    # triangle: the largest signed distance to its three edges (apothem r / 2)
    d = None
    for j in range(3):
        a = tilt + math.pi / 2 + j * 2 * math.pi / 3  # outward normals; the first points down (apex up)
        e = px * math.cos(a) + py * math.sin(a) - r / 2
        d = e if d is None else np.maximum(d, e)
    return d


def _background(rng: np.random.Generator, base: tuple[int, int, int], n: int) -> np.ndarray:
    """An ``n`` x ``n`` x 3 float canvas of ``base`` with a gentle gradient and a soft texture."""
    yy, xx = np.mgrid[0:n, 0:n] / n - 0.5
    a = rng.uniform(0, 2 * math.pi)
    grad = (xx * math.cos(a) + yy * math.sin(a)) * rng.uniform(0.10, 0.16)  # +-5..8 % brightness
    tex = sum(
        np.sin(2 * math.pi * (f * (xx * math.cos(t) + yy * math.sin(t))) + p)
        for f, t, p in zip(rng.uniform(2, 6, 3), rng.uniform(0, math.pi, 3), rng.uniform(0, 2 * math.pi, 3))
    )
    col = np.asarray(base, float)
    return col * (1 + grad[..., None]) + 12 * grad[..., None] + 2.0 * tex[..., None]


def _outline(fill: tuple[int, int, int]) -> np.ndarray:
    return np.asarray(BLACK_OUTLINE if fill == COLOURS["black"] else tuple(0.5 * c for c in fill), float)


def render(sc: _shapes.Scene, size: int = SIZE) -> Image.Image:
    """The scene as an RGB image, ``size`` x ``size``, in this module's style (table above):
    anti-aliased signed-distance shapes, outlines of a darker shade, a textured background with
    light noise, then a JPEG round trip. Deterministic: the texture, noise and tilts come from the
    scene's seed.

    >>> im = render(scene(1))
    >>> im.mode, im.size
    ('RGB', (256, 256))
    """
    rng = np.random.default_rng([sc.seed, 7919])
    scale = size / FRAME
    canvas = _background(rng, COLOURS[sc.background], size)
    w = OUTLINE_PX
    ss = SUPERSAMPLE
    offs = (np.arange(ss) + 0.5) / ss - 0.5  # subsample offsets within a pixel
    for s in sc.shapes:
        tilt = math.radians(rng.uniform(-12, 12)) if s.kind == "triangle" else 0.0
        cx, cy, r = s.x * scale, s.y * scale, s.radius * scale
        x0, x1 = max(int(cx - r) - 2, 0), min(int(cx + r) + 3, size)
        y0, y1 = max(int(cy - r) - 2, 0), min(int(cy + r) + 3, size)
        # subsample centres of the box's pixels: (rows, cols, ss, ss)
        py = (np.arange(y0, y1)[:, None, None, None] + 0.5 + offs[None, None, :, None]) - cy
        px = (np.arange(x0, x1)[None, :, None, None] + 0.5 + offs[None, None, None, :]) - cx
        py, px = np.broadcast_arrays(py, px)
        d = _sdf(s.kind, px, py, r, tilt)
        inside = (d <= 0).mean(axis=(2, 3))
        body = (d <= -w).mean(axis=(2, 3))
        fill = np.asarray(COLOURS[s.colour], float)
        patch = canvas[y0:y1, x0:x1]
        colour = body[..., None] * fill + (inside - body)[..., None] * _outline(COLOURS[s.colour])
        canvas[y0:y1, x0:x1] = patch * (1 - inside[..., None]) + colour
    canvas += rng.normal(0, 3.0, canvas.shape)
    im = Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8), "RGB")
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=JPEG_QUALITY)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def nearest_colour(rgb: Any) -> str:
    """The name of this module's shade nearest ``rgb`` (Euclidean in RGB).

    >>> nearest_colour((210, 50, 40)), nearest_colour((240, 240, 240))
    ('red', 'white')
    """
    v = np.asarray(rgb, float)
    return min(COLOURS, key=lambda c: float(np.sum((np.asarray(COLOURS[c], float) - v) ** 2)))


# -- items --------------------------------------------------------------------------------------


def task_name(task: str) -> str:
    """The name a ``shapes`` task has in this set's eval results (apart from ``shapes``' own).

    >>> task_name("count")
    'heldout_count'
    """
    return f"heldout_{task}"


def items(n_per_task: int = 50, start: int = 0, split: str = "test") -> list[dict[str, Any]]:
    """Balanced question items of the held-out scenes ``start, start + 1, ...``: for every task
    of ``shapes.TASKS``, ``n_per_task`` questions whose answers are spread evenly over its choices
    (the remainder going to the first choices), asked by ``shapes.questions``. Each item: ``id``
    (``shapes-heldout-test-{i:07d}-{task}``), ``task`` (``shapes``' name), ``task_type``,
    ``question``, ``answer``, ``choices``, ``scene`` (a dict). Deterministic.

    >>> its = items(n_per_task=4)
    >>> len(its), its[0]["id"][:20], sorted({i["answer"] for i in its if i["task"] == "same_colour"})
    (32, 'shapes-heldout-test-', ['no', 'yes'])
    """
    _check_split(split)
    quota: dict[tuple[str, str], int] = {}
    for task, (_, _, choices) in _shapes.TASKS.items():
        base, extra = divmod(n_per_task, len(choices))
        for j, c in enumerate(choices):
            quota[(task, c)] = base + (j < extra)
    need = sum(quota.values())
    out: list[dict[str, Any]] = []
    i = start
    while need and i < start + 200 * max(n_per_task, 10):
        sc = scene(i, split)
        for q in _shapes.questions(sc):
            key = (q["task"], q["answer"])
            if quota.get(key, 0) > 0:
                quota[key] -= 1
                need -= 1
                out.append({"id": f"{NAME}-{split}-{i:07d}-{q['task']}", **q, "scene": sc.to_dict()})
        i += 1
    tasks = list(_shapes.TASKS)
    return sorted(out, key=lambda r: (tasks.index(r["task"]), r["id"]))


__all__ = [
    "COLOURS",
    "NAME",
    "SIZE",
    "SPLIT_SEEDS",
    "items",
    "nearest_colour",
    "render",
    "scene",
    "task_name",
]
