"""``shapes``: seeded scenes of coloured shapes, with Global, Local and Mixed questions about them.

A scene is a background colour and one to six shapes. Each shape has a kind, a fill colour, a size
and a quadrant; a quadrant holds at most two shapes. Every shape has a grey outline, so a shape of
the background's colour is still visible. A scene is fully described by :class:`Scene` (a plain,
JSON-serialisable record), rendered by :func:`render`, and asked about by :data:`TASKS`.

**Vocabulary** (every answer is one of these words)::

    colours    red green blue yellow purple orange white black
    shapes     circle square triangle
    quadrants  top-left top-right bottom-left bottom-right
    counts     one two three four five six
    yes / no

**Tasks**, by type (the paper's Global / Local / Mixed):

======================  ======  ===============================================================
task                    type    question (``{q}`` is a quadrant)
======================  ======  ===============================================================
``background_colour``   global  What colour is the background?
``count``               global  How many shapes are there?
``same_colour``         global  Are all the shapes the same colour?
``quadrant_colour``     local   What colour is the shape in the {q} quadrant?
``quadrant_shape``      local   What kind of shape is in the {q} quadrant?
``quadrant_presence``   local   Is there a shape in the {q} quadrant?
``matches_background``  mixed   Is the shape in the {q} quadrant the same colour as the background?
``is_largest``          mixed   Is the shape in the {q} quadrant the largest shape?
======================  ======  ===============================================================

Questions about "the shape in the {q} quadrant" are asked only of quadrants that hold exactly one
shape. Splits are disjoint by seed: scene ``i`` of split ``s`` is drawn from the generator seeded
``SPLIT_SEEDS[s] + i``; :func:`items` also balances the answers of every task (each answer of a
task equally often, as far as the split's size allows), so a model that ignores the image scores
chance. Anyone can write new items in the same language: a manifest row with an image, one of the
questions above and an answer from the vocabulary (see :mod:`sinkscope.evaluation.items`).

>>> sc = scene(0, "test")
>>> sc.background in COLOURS, 1 <= len(sc.shapes) <= 6
(True, True)
>>> answer(sc, "count") == COUNT_WORDS[len(sc.shapes) - 1]
True
>>> render(sc).size
(224, 224)
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from typing import Any

from PIL import Image, ImageDraw

#: name -> RGB fill
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 220, 30),
    "purple": (140, 50, 170),
    "orange": (245, 135, 20),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
SHAPE_KINDS = ("circle", "square", "triangle")
QUADRANTS = ("top-left", "top-right", "bottom-left", "bottom-right")
COUNT_WORDS = ("one", "two", "three", "four", "five", "six")
YES_NO = ("yes", "no")
#: every word an answer may be
VOCABULARY = frozenset((*COLOURS, *SHAPE_KINDS, *QUADRANTS, *COUNT_WORDS, *YES_NO))
OUTLINE = (128, 128, 128)
SIZE = 224
#: no shape comes closer to the border (a 224-px centre crop of a 256-px resize loses 14 px)
MARGIN = 18
#: the first generator seed of each split; scene ``i`` uses ``SPLIT_SEEDS[split] + i``
SPLIT_SEEDS = {"train": 0, "validation": 10_000_000, "test": 20_000_000}

#: task -> (task type, question template, answer choices)
TASKS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "background_colour": ("global", "What colour is the background?", tuple(COLOURS)),
    "count": ("global", "How many shapes are there?", COUNT_WORDS),
    "same_colour": ("global", "Are all the shapes the same colour?", YES_NO),
    "quadrant_colour": ("local", "What colour is the shape in the {q} quadrant?", tuple(COLOURS)),
    "quadrant_shape": ("local", "What kind of shape is in the {q} quadrant?", SHAPE_KINDS),
    "quadrant_presence": ("local", "Is there a shape in the {q} quadrant?", YES_NO),
    "matches_background": (
        "mixed",
        "Is the shape in the {q} quadrant the same colour as the background?",
        YES_NO,
    ),
    "is_largest": ("mixed", "Is the shape in the {q} quadrant the largest shape?", YES_NO),
}


@dataclass(frozen=True)
class Shape:
    """One shape: ``kind``, ``colour``, ``quadrant``, centre ``x, y`` and ``radius`` in pixels."""

    kind: str
    colour: str
    quadrant: str
    x: float
    y: float
    radius: float


@dataclass(frozen=True)
class Scene:
    """A background colour and its shapes; ``seed`` and ``split`` say where it came from."""

    background: str
    shapes: tuple[Shape, ...]
    seed: int = 0
    split: str = ""

    def in_quadrant(self, q: str) -> list[Shape]:
        return [s for s in self.shapes if s.quadrant == q]

    def single_quadrants(self) -> list[str]:
        """Quadrants holding exactly one shape (the ones "the shape in the {q} quadrant" names)."""
        return [q for q in QUADRANTS if len(self.in_quadrant(q)) == 1]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scene:
        return cls(
            d["background"], tuple(Shape(**s) for s in d["shapes"]), d.get("seed", 0), d.get("split", "")
        )


def _place(rng: random.Random, quadrant: str, slot: int, of: int, radius: float) -> tuple[float, float]:
    """A centre inside ``quadrant``, at least ``MARGIN`` from the image's border (LLaVA-style
    processors crop the border): alone, anywhere in it; two, side by side without overlap."""
    half = SIZE / 2
    right, bottom = quadrant.endswith("right"), quadrant.startswith("bottom")
    lo_x, hi_x = (half + 4, SIZE - MARGIN) if right else (MARGIN, half - 4)
    lo_y, hi_y = (half + 4, SIZE - MARGIN) if bottom else (MARGIN, half - 4)
    y = rng.uniform(lo_y + radius, hi_y - radius)
    if of == 1:
        return rng.uniform(lo_x + radius, hi_x - radius), y
    w = (hi_x - lo_x) / 2
    return lo_x + slot * w + w / 2, y


def scene(index: int, split: str = "train") -> Scene:
    """Scene ``index`` of ``split`` (``train``, ``validation`` or ``test``): the same arguments
    always give the same scene.

    >>> scene(3, "train") == scene(3, "train"), scene(3, "train") == scene(3, "test")
    (True, False)
    """
    if split not in SPLIT_SEEDS:
        raise ValueError(f"split {split!r}: expected one of {', '.join(SPLIT_SEEDS)}")
    seed = SPLIT_SEEDS[split] + index
    rng = random.Random(seed)
    background = rng.choice(list(COLOURS))
    n = rng.randint(1, 6)
    # quadrants: each used once before any holds a second shape
    order = rng.sample(QUADRANTS, 4)
    slots = order[: min(n, 4)] + rng.sample(order, n - 4) if n > 4 else order[:n]
    style = rng.random()
    one_colour = rng.choice(list(COLOURS))
    one_kind = rng.choice(SHAPE_KINDS)
    shapes = []
    for q in QUADRANTS:
        k = slots.count(q)
        for slot in range(k):
            radius = rng.uniform(10, 14) if k == 2 else rng.uniform(14, 36)
            x, y = _place(rng, q, slot, k, radius)
            if style < 0.3:  # every shape the same colour (same_colour: yes)
                colour = one_colour
            elif style < 0.45:  # a shape of the background's colour (matches_background: yes)
                colour = background if rng.random() < 0.6 else rng.choice(list(COLOURS))
            else:
                colour = rng.choice(list(COLOURS))
            kind = one_kind if rng.random() < 0.15 else rng.choice(SHAPE_KINDS)
            shapes.append(Shape(kind, colour, q, round(x, 2), round(y, 2), round(radius, 2)))
    return Scene(background, tuple(shapes), seed, split)


@dataclass(frozen=True)
class RenderStyle:
    """How :func:`render` draws a scene when it varies what another renderer would (training only:
    the ``validation`` and ``test`` splits are drawn plain). The scene record, and so every answer,
    is the same under any style.

    ``scale``: pixels per 224-px layout unit (the canvas is ``224 * scale`` on its short side);
    ``aspect``: long side / short side, the extra width or height filled with background around the
    centred scene (at most 1.25, so a LLaVA-style resize + centre crop loses at most 11 of the
    layout's 18-px border margin); ``radius``: every shape's radius times this (the same factor for
    all, so "the largest shape" does not change); ``outline``: ``(r, g, b)`` or ``None`` for the
    shape's own colour darkened; ``outline_width`` in layout pixels (0: none); ``jitter``: each
    colour's channels moved by up to this much; ``noise``: Gaussian pixel noise (std);
    ``texture``: ``"flat"``, ``"gradient"`` or ``"stripes"`` background; ``jpeg``: a JPEG round
    trip at this quality (``None``: none); ``seed``: the noise's and the jitter's seed.
    """

    scale: float = 1.0
    aspect: float = 1.0
    wide: bool = True
    radius: float = 1.0
    outline: tuple[int, int, int] | None = OUTLINE
    outline_width: int = 3
    jitter: int = 0
    noise: float = 0.0
    texture: str = "flat"
    jpeg: int | None = None
    seed: int = 0


#: the plain style (what :func:`render` draws without one; every split but training uses it)
PLAIN = RenderStyle()


def random_style(seed: int) -> RenderStyle:
    """A seeded :class:`RenderStyle` for a training scene: one in five plain, the others varying
    size, aspect, shape size, outline, colour shade, noise, background texture and JPEG quality.

    >>> random_style(3) == random_style(3), random_style(3) == random_style(4)
    (True, False)
    """
    rng = random.Random(7_000_003 * seed + 11)
    if rng.random() < 0.2:
        return PLAIN
    outline = rng.choice([OUTLINE, None, (0, 0, 0), (255, 255, 255), (90, 90, 90)])
    return RenderStyle(
        scale=rng.choice([0.5, 0.75, 1.0, 1.0, 1.25, 1.5, 2.0]),
        aspect=rng.choice([1.0, 1.0, 1.1, 1.25]),
        wide=rng.random() < 0.5,
        radius=rng.uniform(0.85, 1.12),
        outline=outline,
        outline_width=rng.choice([0, 1, 2, 3, 4]) if outline is not OUTLINE else 3,
        jitter=rng.choice([0, 10, 20, 30]),
        noise=rng.choice([0.0, 0.0, 4.0, 8.0, 14.0]),
        texture=rng.choice(["flat", "flat", "gradient", "stripes"]),
        jpeg=rng.choice([None, None, 90, 70, 50, 35]),
        seed=seed,
    )


def _shade(rgb: tuple[int, int, int], jitter: int, rng: random.Random) -> tuple[int, int, int]:
    return tuple(min(255, max(0, c + rng.randint(-jitter, jitter))) for c in rgb) if jitter else rgb


def render(sc: Scene, size: int = SIZE, style: RenderStyle | None = None) -> Image.Image:
    """The scene as an RGB image (``size`` x ``size``; shapes scaled from the 224-px layout), or,
    with a ``style`` (:func:`random_style`), drawn as that style says (its own canvas size; ``size``
    is then ignored).

    >>> sc = scene(0, "train")
    >>> render(sc).size, render(sc, style=RenderStyle(scale=0.5, aspect=1.25)).size
    ((224, 224), (140, 112))
    """
    if style is None or style == PLAIN:
        im = _draw(sc, 1.0, (0, 0), COLOURS, OUTLINE, 3, 1.0, (SIZE, SIZE))
        return im if size == SIZE else im.resize((size, size), Image.BICUBIC)
    import numpy as np

    rng = random.Random(style.seed)
    colours = {k: _shade(v, style.jitter, rng) for k, v in COLOURS.items()}
    side = round(SIZE * style.scale)
    long = round(side * style.aspect)
    canvas = (long, side) if style.wide else (side, long)
    offset = ((canvas[0] - side) / 2, (canvas[1] - side) / 2)
    im = _draw(sc, style.scale, offset, colours, style.outline, style.outline_width, style.radius, canvas)
    a = np.asarray(im).astype(np.float32)
    bg = np.asarray(colours[sc.background], np.float32)
    mask = np.all(np.abs(a - bg) < 1, axis=-1, keepdims=True)  # background pixels only get the texture
    h, w = a.shape[:2]
    if style.texture == "gradient":
        ramp = np.linspace(-25, 25, w, dtype=np.float32)[None, :, None]
        a = np.where(mask, a + ramp, a)
    elif style.texture == "stripes":
        stripes = (((np.arange(h)[:, None] + np.arange(w)[None, :]) // max(2, round(6 * style.scale))) % 2) * 18.0 - 9.0
        a = np.where(mask, a + stripes[..., None].astype(np.float32), a)
    if style.noise:
        a = a + np.random.default_rng(style.seed).normal(0, style.noise, a.shape).astype(np.float32)
    im = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    if style.jpeg is not None:
        import io

        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=style.jpeg)
        im = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return im


def _draw(sc, scale, offset, colours, outline, width, radius, canvas) -> Image.Image:
    im = Image.new("RGB", canvas, colours[sc.background])
    d = ImageDraw.Draw(im)
    ox, oy = offset
    w = max(0, round(width * scale)) if width else 0
    for s in sc.shapes:
        fill, r = colours[s.colour], s.radius * radius * scale
        x, y = ox + s.x * scale, oy + s.y * scale
        line = outline if outline is not None else tuple(int(c * 0.55) for c in fill)
        kw = {"fill": fill, "outline": line, "width": w} if w else {"fill": fill}
        if s.kind == "circle":
            d.ellipse((x - r, y - r, x + r, y + r), **kw)
        elif s.kind == "square":
            d.rectangle((x - r, y - r, x + r, y + r), **kw)
        else:
            pts = [(x + r * math.cos(t), y - r * math.sin(t)) for t in (math.pi / 2, 7 * math.pi / 6, 11 * math.pi / 6)]
            d.polygon(pts, **kw)
    return im


def answer(sc: Scene, task: str, quadrant: str | None = None) -> str:
    """The answer to ``task`` (about ``quadrant`` for the local and mixed tasks), from the scene
    description alone.

    >>> sc = Scene("green", (Shape("circle", "red", "top-left", 50, 50, 20),))
    >>> answer(sc, "quadrant_colour", "top-left"), answer(sc, "quadrant_presence", "bottom-left")
    ('red', 'no')
    """
    if task == "background_colour":
        return sc.background
    if task == "count":
        return COUNT_WORDS[len(sc.shapes) - 1]
    if task == "same_colour":
        return "yes" if len({s.colour for s in sc.shapes}) == 1 else "no"
    if task == "quadrant_presence":
        return "yes" if sc.in_quadrant(quadrant) else "no"
    here = sc.in_quadrant(quadrant)
    if len(here) != 1:
        raise ValueError(f"{task}: the {quadrant} quadrant holds {len(here)} shapes, not one")
    s = here[0]
    if task == "quadrant_colour":
        return s.colour
    if task == "quadrant_shape":
        return s.kind
    if task == "matches_background":
        return "yes" if s.colour == sc.background else "no"
    if task == "is_largest":
        return "yes" if s.radius >= max(t.radius for t in sc.shapes) else "no"
    raise ValueError(f"unknown shapes task {task!r}; expected one of {', '.join(TASKS)}")


def questions(sc: Scene, rng: random.Random | None = None) -> list[dict[str, Any]]:
    """Every question this scene can answer, one per task (a random eligible quadrant for the
    local and mixed ones, and half of the time - when there is one - the quadrant whose answer is
    the rarer "yes" (``matches_background``, ``is_largest``) or an empty one
    (``quadrant_presence``); ``same_colour`` needs two shapes): dicts with ``task``,
    ``task_type``, ``question``, ``answer``, ``choices`` and ``quadrant``.

    >>> [q["task"] for q in questions(scene(0, "test"))][:3]
    ['background_colour', 'count', 'same_colour']
    """
    rng = rng or random.Random(sc.seed)
    out = []
    for task, (ttype, template, choices) in TASKS.items():
        q = None
        if task == "same_colour" and len(sc.shapes) < 2:
            continue
        if task == "quadrant_presence":
            empty = [x for x in QUADRANTS if not sc.in_quadrant(x)]
            q = rng.choice(empty if empty and rng.random() < 0.5 else QUADRANTS)
        elif "{q}" in template:
            single = sc.single_quadrants()
            if not single:
                continue
            q = rng.choice(single)
            # ask about the quadrant that says "yes" half of the time, when the scene has one
            yes = [x for x in single if answer(sc, task, x) == "yes"] if task in ("matches_background", "is_largest") else []
            if yes and rng.random() < 0.5:
                q = rng.choice(yes)
        out.append(
            {
                "task": task,
                "task_type": ttype,
                "question": template.format(q=q),
                "answer": answer(sc, task, q),
                "choices": list(choices),
                "quadrant": q,
            }
        )
    return out


def items(split: str = "test", n_per_task: int = 50, start: int = 0) -> list[dict[str, Any]]:
    """Balanced question items of ``split``: for every task, ``n_per_task`` questions whose
    answers are spread evenly over the task's choices (each answer ``n_per_task // k`` times,
    the remainder going to the first choices), drawn from scenes ``start, start + 1, ...`` in
    order. Each item: ``id``, ``task``, ``task_type``, ``question``, ``answer``, ``choices``,
    ``scene`` (its :class:`Scene` as a dict). Deterministic.

    >>> its = items("test", n_per_task=4)
    >>> len(its), sorted({i["answer"] for i in its if i["task"] == "same_colour"})
    (32, ['no', 'yes'])
    """
    quota: dict[tuple[str, str], int] = {}
    for task, (_, _, choices) in TASKS.items():
        for j, c in enumerate(choices):
            quota[(task, c)] = n_per_task // len(choices) + (1 if j < n_per_task % len(choices) else 0)
    out: list[dict[str, Any]] = []
    i = start
    need = sum(quota.values())
    while need and i < start + 200 * max(n_per_task, 10):
        sc = scene(i, split)
        for q in questions(sc):
            key = (q["task"], q["answer"])
            if quota.get(key, 0) > 0:
                quota[key] -= 1
                need -= 1
                out.append({"id": f"shapes-{split}-{i:07d}-{q['task']}", **q, "scene": sc.to_dict()})
        i += 1
    return sorted(out, key=lambda r: (list(TASKS).index(r["task"]), r["id"]))


def caption(sc: Scene) -> str:
    """A one-sentence description of the scene (stage-1 alignment text).

    >>> caption(Scene("green", (Shape("circle", "red", "top-left", 50, 50, 20),)))
    'One shape on a green background: a red circle in the top-left quadrant.'
    """
    n = len(sc.shapes)
    parts = [f"a {s.colour} {s.kind} in the {s.quadrant} quadrant" for s in sc.shapes]
    noun = "shape" if n == 1 else "shapes"
    return f"{COUNT_WORDS[n - 1].capitalize()} {noun} on a {sc.background} background: {', '.join(parts)}."


__all__ = [
    "COLOURS",
    "COUNT_WORDS",
    "QUADRANTS",
    "SHAPE_KINDS",
    "SPLIT_SEEDS",
    "TASKS",
    "VOCABULARY",
    "YES_NO",
    "PLAIN",
    "RenderStyle",
    "Scene",
    "Shape",
    "answer",
    "caption",
    "items",
    "questions",
    "random_style",
    "render",
    "scene",
]
