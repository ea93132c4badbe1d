"""The held-out ``shapes`` style (issue 26): a second, independently written scene generator and
renderer, registered as the ``shapes-heldout`` task set and reported apart from ``shapes``."""

from __future__ import annotations

import json
from collections import Counter
from itertools import combinations

import numpy as np
import pandas as pd
import pytest

from sinkscope import SinkscopeError
from sinkscope.evaluation import shapes as S
from sinkscope.evaluation import shapes_heldout as H
from sinkscope.evaluation.items import BUILTIN_SETS, load_items

N_SCENES = 300


@pytest.fixture(scope="module")
def scenes() -> list[S.Scene]:
    return [H.scene(i) for i in range(N_SCENES)]


def _box(q: str) -> tuple[float, float, float, float]:
    """Where a shape of quadrant ``q`` may reach in the 224-px layout (the quadrant, less the border margin)."""
    mid = S.SIZE / 2
    x0, x1 = (mid, S.SIZE - S.MARGIN) if q.endswith("right") else (S.MARGIN, mid)
    y0, y1 = (mid, S.SIZE - S.MARGIN) if q.startswith("bottom") else (S.MARGIN, mid)
    return x0, y0, x1, y1


# -- the generator ----------------------------------------------------------------------------------


def test_every_scene_keeps_the_layout_rules(scenes):
    for sc in scenes:
        assert sc.split == "test" and sc.seed >= H.SPLIT_SEEDS["test"]
        assert sc.background in S.COLOURS and 1 <= len(sc.shapes) <= 6
        assert max(Counter(s.quadrant for s in sc.shapes).values()) <= 2
        for s in sc.shapes:
            assert s.kind in S.SHAPE_KINDS and s.colour in S.COLOURS and s.quadrant in S.QUADRANTS
            x0, y0, x1, y1 = _box(s.quadrant)  # inside its quadrant, >= MARGIN from the border
            assert x0 <= s.x - s.radius and s.x + s.radius <= x1, (sc.seed, s)
            assert y0 <= s.y - s.radius and s.y + s.radius <= y1, (sc.seed, s)
            assert (
                min(s.x - s.radius, s.y - s.radius, S.SIZE - s.x - s.radius, S.SIZE - s.y - s.radius)
                >= S.MARGIN
            )
        for a, b in combinations(sc.shapes, 2):  # bounding squares (they hold every kind) apart
            need = a.radius + b.radius
            assert abs(a.x - b.x) >= need or abs(a.y - b.y) >= need, (sc.seed, a, b)


def test_scenes_are_seeded_and_their_distribution_is_not_shapes(scenes):
    assert H.scene(7) == H.scene(7) and H.scene(7) != H.scene(8)
    assert S.Scene.from_dict(H.scene(7).to_dict()) == H.scene(7)  # the same JSON-ready record
    # what shapes.scene never draws: a quadrant with two shapes while another is empty, a lone
    # shape bigger than 36 px, two shapes of a quadrant at different heights
    assert any(
        any(len(sc.in_quadrant(q)) == 2 for q in S.QUADRANTS)
        and any(not sc.in_quadrant(q) for q in S.QUADRANTS)
        for sc in scenes
    )
    assert max(s.radius for sc in scenes for s in sc.shapes) > 36
    pairs = [sc.in_quadrant(q) for sc in scenes for q in S.QUADRANTS if len(sc.in_quadrant(q)) == 2]
    assert any(abs(a.y - b.y) > 1 for a, b in pairs)
    # the same vocabulary: every colour, kind and count occurs
    assert {s.colour for sc in scenes for s in sc.shapes} == set(S.COLOURS)
    assert {s.kind for sc in scenes for s in sc.shapes} == set(S.SHAPE_KINDS)
    assert {len(sc.shapes) for sc in scenes} == set(range(1, 7))


def test_seeds_are_disjoint_from_every_shapes_split():
    last_shapes_seed = max(S.SPLIT_SEEDS.values()) + 10_000_000  # each shapes split spans 10M seeds
    assert set(H.SPLIT_SEEDS) == {"test"} and H.SPLIT_SEEDS["test"] >= last_shapes_seed
    its = H.items(n_per_task=24)
    seeds = {it["scene"]["seed"] for it in its}
    assert min(seeds) >= H.SPLIT_SEEDS["test"]
    for start in S.SPLIT_SEEDS.values():
        assert not seeds & set(range(start, start + 10_000_000))


@pytest.mark.parametrize("split", ["train", "validation"])
def test_only_the_test_split_exists(split):
    for call in (lambda: H.scene(0, split), lambda: H.items(4, split=split)):
        with pytest.raises(SinkscopeError) as e:
            call()
        msg = str(e.value)
        assert "\n" not in msg and "shapes-heldout" in msg and repr(split) in msg


# -- the renderer -----------------------------------------------------------------------------------


def _nearest_at(a: np.ndarray, x: float, y: float, k: int = 1) -> str:
    """The held-out shade nearest the mean of the (2k+1)^2 pixels around canvas point ``x, y``."""
    cx, cy = int(x), int(y)
    return H.nearest_colour(a[cy - k : cy + k + 1, cx - k : cx + k + 1].reshape(-1, 3).mean(0))


def test_its_shades_are_its_own_but_each_still_its_colour():
    for name, rgb in H.COLOURS.items():
        assert rgb != S.COLOURS[name]
        nearest = min(S.COLOURS, key=lambda c: sum((u - v) ** 2 for u, v in zip(S.COLOURS[c], rgb)))
        assert nearest == name
    assert H.COLOURS["red"][0] > 180 and max(H.COLOURS["red"][1:]) < 80  # red stays clearly red


def test_render_puts_each_shapes_colour_at_its_centre_and_the_background_in_the_corners(scenes):
    scale = H.SIZE / S.SIZE
    for sc in scenes[:24]:
        a = np.asarray(H.render(sc))
        assert a.shape == (H.SIZE, H.SIZE, 3) and a.dtype == np.uint8
        for s in sc.shapes:
            assert _nearest_at(a, s.x * scale, s.y * scale) == s.colour, (sc.seed, s)
        for cx, cy in ((6, 6), (H.SIZE - 7, 6), (6, H.SIZE - 7), (H.SIZE - 7, H.SIZE - 7)):
            assert _nearest_at(a, cx, cy, k=4) == sc.background, sc.seed


def test_render_is_deterministic_and_not_shapes_renderer():
    for i in range(6):
        sc = H.scene(i)
        a, b = np.asarray(H.render(sc)), np.asarray(H.render(sc))
        assert np.array_equal(a, b)
        plain = np.asarray(S.render(sc, size=H.SIZE)).astype(int)
        assert np.abs(a.astype(int) - plain).mean() > 3  # other shades, outlines, texture, noise
        # the background is textured and noisy (JPEG'd), not one flat colour
        corner = a[: H.SIZE // 4, : H.SIZE // 4].reshape(-1, 3)
        assert len({tuple(p) for p in corner}) > 50
    assert H.render(H.scene(0)).size == (256, 256) and H.render(H.scene(0), size=240).size == (240, 240)


def test_a_processor_crop_keeps_every_shape(scenes):
    # a 256 short-side resize + 224 centre crop removes 16 px (1/16) of each side of the canvas
    lost = H.SIZE / 16
    scale = H.SIZE / S.SIZE
    for sc in scenes:
        for s in sc.shapes:
            assert min(s.x - s.radius, s.y - s.radius) * scale > lost
            assert (S.SIZE - max(s.x + s.radius, s.y + s.radius)) * scale > lost


# -- items and the task set ------------------------------------------------------------------------


def test_items_are_balanced_and_answered_as_shapes_answers():
    its = H.items(n_per_task=24)
    assert its == H.items(n_per_task=24) and len(its) == 24 * len(S.TASKS)
    assert len({it["id"] for it in its}) == len(its)
    for task, (_, _, choices) in S.TASKS.items():
        got = Counter(it["answer"] for it in its if it["task"] == task)
        assert got == {c: 24 // len(choices) for c in choices}, task  # every answer reachable, evenly
    for it in its:
        sc = S.Scene.from_dict(it["scene"])
        assert it["id"] == f"shapes-heldout-test-{sc.seed - H.SPLIT_SEEDS['test']:07d}-{it['task']}"
        assert S.answer(sc, it["task"], it["quadrant"]) == it["answer"]
        assert it["task_type"] == S.TASKS[it["task"]][0]


def test_load_items_registers_the_set_apart_from_shapes():
    assert "shapes-heldout" in BUILTIN_SETS
    ho = load_items("shapes-heldout", split="test", limit=16)
    assert len(ho) == 16 and {i.source for i in ho} == {"shapes-heldout"}
    assert Counter(i.task for i in ho) == {H.task_name(t): 2 for t in S.TASKS}
    assert {i.task_type for i in ho} == {"global", "local", "mixed"}
    img = ho[0].image.load()
    assert img.shape == (H.SIZE, H.SIZE, 3)
    both = load_items("shapes,shapes-heldout", limit=8)
    by_source = Counter(i.source for i in both)
    assert by_source == {"shapes": 8, "shapes-heldout": 8}
    assert not {i.task for i in both if i.source == "shapes"} & {i.task for i in both if i.source != "shapes"}


@pytest.mark.parametrize("split", ["train", "validation"])
def test_load_items_refuses_another_split_in_one_line(split):
    with pytest.raises(SinkscopeError) as e:
        load_items("shapes-heldout", split=split)
    msg = str(e.value)
    assert "\n" not in msg and "shapes-heldout" in msg and repr(split) in msg


def test_cli_eval_reports_shapes_and_heldout_apart(tmp_path, capsys):
    from sinkscope.cli import main

    out = tmp_path / "both"
    argv = [
        "eval",
        "--model",
        "tiny-llava",
        "--tasks",
        "shapes,shapes-heldout",
        "--limit",
        "16",
        "-q",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    pred = pd.read_json(out / "predictions.jsonl", lines=True)
    assert Counter(pred["source"]) == {"shapes": 16, "shapes-heldout": 16}
    res = pd.read_csv(out / "results.csv")
    per_task = res[(res.variant == "default") & (res.task != "*")].set_index("task")
    for t in S.TASKS:  # one row for each set's version of every task, two items each
        assert per_task.loc[t, "n"] == 2 and per_task.loc[H.task_name(t), "n"] == 2
    assert json.loads((out / "summary.json").read_text())["tasks"] == "shapes,shapes-heldout"
    capsys.readouterr()
    bad = [
        "eval",
        "--model",
        "tiny-llava",
        "--tasks",
        "shapes-heldout",
        "--split",
        "train",
        "-q",
        "--out",
        str(tmp_path / "x"),
    ]
    assert main(bad) != 0
    err = capsys.readouterr().err.strip()
    assert "shapes-heldout" in err and "'train'" in err and len(err.splitlines()) == 1
