"""Darcet et al.'s redundancy analysis: hand-made cosines, layouts, planted sinks on uniform background."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sinkscope._utils import SinkscopeError
from sinkscope.flow.redundancy import (
    neighbour_similarity,
    redundancy,
    redundancy_summary,
    redundancy_table,
)
from sinkscope.models import load_model
from sinkscope.models.base import TokenLayout
from sinkscope.models.tiny import paint_markers

from .conftest import GRID, H, W, photo

# 2 x 3 grid after CLS + 2 registers; each patch a 2-D vector at angle THETA (degrees), with
# different lengths (cosine ignores length). The prefix tokens are huge and must be dropped.
THETA = np.array([[0, 60, 180], [0, 120, 90]])
LENGTH = np.array([[1.0, 5.0, 0.1], [2.0, 1.0, 3.0]])
LAYOUT = TokenLayout(n_cls=1, n_registers=2, grid=(2, 3))
# By hand, mean of cos(angle difference) over the 4-neighbours inside the grid:
#   (0,0): (0,1) cos60 = .5, (1,0) cos0 = 1                      -> 0.75
#   (0,1): (0,0) .5, (0,2) cos120 = -.5, (1,1) cos60 = .5         -> 1/6
#   (0,2): (0,1) -.5, (1,2) cos90 = 0                             -> -0.25
#   (1,0): (0,0) 1, (1,1) cos120 = -.5                            -> 0.25
#   (1,1): (0,1) .5, (1,0) -.5, (1,2) cos30                       -> cos30 / 3
#   (1,2): (0,2) 0, (1,1) cos30                                   -> cos30 / 2
C30 = np.cos(np.pi / 6)
EXPECTED4 = np.array([[0.75, 1 / 6, -0.25], [0.25, C30 / 3, C30 / 2]])


def _hand_hidden() -> np.ndarray:
    t = np.deg2rad(THETA).reshape(-1)
    patches = np.stack([np.cos(t), np.sin(t)], -1) * LENGTH.reshape(-1, 1)
    prefix = np.array([[1e3, -7.0], [-50.0, 3.0], [0.0, 900.0]])
    return np.concatenate([prefix, patches])  # [3 + 6, 2]


def test_neighbour_similarity_matches_hand_cosines():
    h = _hand_hidden()
    np.testing.assert_allclose(neighbour_similarity(h, LAYOUT), EXPECTED4, atol=1e-12)
    # patches only, torch, and a batch give the same
    np.testing.assert_allclose(neighbour_similarity(h[3:], LAYOUT), EXPECTED4, atol=1e-12)
    hb = torch.tensor(np.stack([h, h[::1] * 2.0]))
    out = neighbour_similarity(hb, LAYOUT)
    assert out.shape == (2, 2, 3)
    np.testing.assert_allclose(out[1], EXPECTED4, atol=1e-12)
    # 8-neighbourhood adds the diagonals: (0,0) also sees (1,1) at cos120 = -.5 -> (.5 + 1 - .5) / 3
    assert neighbour_similarity(h, LAYOUT, neighbourhood=8)[0, 0] == pytest.approx(1 / 3)
    with pytest.raises(SinkscopeError, match="tokens"):
        neighbour_similarity(h[1:], LAYOUT)  # neither all tokens nor only the patches
    with pytest.raises(SinkscopeError, match="4 or 8"):
        neighbour_similarity(h, LAYOUT, neighbourhood=6)


def test_redundancy_table_rows_and_summary():
    h = _hand_hidden()
    sink = np.zeros(6, bool)
    sink[0] = True  # patch (0, 0)
    t = redundancy_table({0: h[None], 5: h[None]}, LAYOUT, sink[None], ["img"], detection_layer=5)
    assert len(t) == 12 and set(t.layer_role) == {"input", "detection"}
    first = t[t.layer == 0]
    assert first.token.tolist() == list(range(3, 9))  # after CLS + 2 registers
    assert first[["row", "col"]].values.tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
    np.testing.assert_allclose(first.neighbour_cos, EXPECTED4.reshape(-1), atol=1e-12)
    np.testing.assert_allclose(first.norm, LENGTH.reshape(-1), atol=1e-12)
    s = redundancy_summary(t).set_index(["layer", "group"])
    assert s.loc[(0, "sink"), "mean_cos"] == pytest.approx(0.75)
    assert s.loc[(0, "non-sink"), "n"] == 5
    assert s.loc[(0, "non-sink"), "mean_cos"] == pytest.approx(EXPECTED4.reshape(-1)[1:].mean())
    # is_sink given over all tokens: the prefix is dropped
    t2 = redundancy_table({0: h}, LAYOUT, np.r_[np.ones(3, bool), sink][None])
    assert t2.is_sink.tolist() == sink.tolist()


@pytest.fixture(scope="module")
def dino():
    return load_model("tiny-dinov2-reg+sinks", image_size=(H, W))


BLOCK = [(r, c) for r in (1, 2, 3) for c in (1, 2, 3)]


def test_planted_sink_on_uniform_background_is_redundant_at_the_input(dino):
    """A planted sink inside a uniform (marker-coloured) region has input-layer neighbours equal to
    itself up to position embeddings; an isolated planted sink in a photograph does not."""
    uniform = paint_markers(np.full((H, W, 3), 128, np.uint8), BLOCK)
    textured = paint_markers(photo(0), [(2, 2)])
    # 5x the median, named: the 3 x 3 block is 9 of 30 patches, more than the automatic gap's 10%
    res = redundancy(dino, [uniform, textured], names=["uniform", "textured"], rule="norm:x5")
    t = res.table
    assert res.summary["detection_layer"] == dino.n_layers == 4
    assert res.summary["detection_layer_source"] == "last ViT layer"
    assert res.summary["neighbourhood"].startswith("4-neighbourhood")
    # layout: 6 x 5 grid after CLS + 4 registers, token = 5 + row * 5 + col
    assert (t.token == 5 + t.row * GRID[1] + t.col).all() and len(t) == 2 * 2 * GRID[0] * GRID[1]
    # the sinks found at the detection layer are exactly the painted cells
    det = t[t.layer == 4]
    for name, cells in (("uniform", BLOCK), ("textured", [(2, 2)])):
        got = det[(det.image == name) & det.is_sink][["row", "col"]].values.tolist()
        assert sorted(map(tuple, got)) == sorted(cells)
    inp = t[t.layer == 0].set_index(["image", "row", "col"]).neighbour_cos
    centre, isolated = inp[("uniform", 2, 2)], inp[("textured", 2, 2)]
    assert centre > 0.95 and isolated < 0.5 and centre - isolated > 0.5
    # a non-sink patch on the uniform grey background vs the same cell in the photograph
    assert inp[("uniform", 5, 4)] > 0.99 and inp[("textured", 5, 4)] < inp[("uniform", 5, 4)] - 0.05
    g = res.by_group.set_index(["layer_role", "group"])
    assert g.loc[("input", "sink"), "n"] == len(BLOCK) + 1
    assert set(res.summary["mean_cos"]) == {
        "input_sink",
        "input_nonsink",
        "detection_sink",
        "detection_nonsink",
    }


def test_redundancy_on_a_llava_tower_uses_the_feature_layer():
    ad = load_model("tiny-llava+sinks")
    img = paint_markers(np.full((32, 32, 3), 90, np.uint8), [(1, 2)])
    res = redundancy(ad, [img])
    assert res.summary["detection_layer"] == ad.feature_layer == 3
    assert res.summary["detection_layer_source"] == "LLaVA vision_feature_layer"
    t = res.table
    assert sorted(t.layer.unique()) == [0, 3]
    assert t[(t.layer == 3) & t.is_sink][["row", "col"]].values.tolist() == [[1, 2]]
    assert (t.token == 1 + t.row * 4 + t.col).all()  # CLS, then a 4 x 4 grid
    with pytest.raises(SinkscopeError, match="vision transformer"):
        redundancy(load_model("tiny-llama"), [img])


def test_redundancy_figure_from_the_table(dino):
    from sinkscope.viz.redundancy import redundancy_figure

    img = paint_markers(photo(1), [(0, 0), (3, 3)])
    res = redundancy(dino, [img], names=["cat"])
    fig = redundancy_figure(res.table, {"redundancy": res.summary, "model": {"name": dino.name}})
    roles = [tr.meta.get("role") for tr in fig.data if isinstance(tr.meta, dict)]
    assert roles.count("box") == 4 and "map" in roles and "sink_marker" in roles
    assert "4-neighbourhood" in fig.layout.title.text and "layer 4" in fig.layout.title.text


@pytest.mark.slow
def test_redundancy_on_real_dinov2_small():
    from sinkscope.data import sample_images

    ad = load_model("dinov2-small")
    items = sample_images(4)
    res = redundancy(ad, [it.load() for it in items], names=[it.name for it in items])
    g = res.by_group
    assert np.isfinite(g.mean_cos).all() and res.summary["detection_layer"] == ad.n_layers
    print(res.summary["n_sinks"], res.summary["mean_cos"])


def test_flow_runs_redundancy_on_a_vit(tmp_path):
    import json

    import pandas as pd
    from PIL import Image

    from sinkscope.flow.run import run_flow

    p = tmp_path / "m.png"
    Image.fromarray(paint_markers(np.full((32, 32, 3), 128, np.uint8), [(1, 1)])).save(p)
    out = tmp_path / "flow"
    res = run_flow("tiny-dinov2+sinks", images=[p], out=out, progress=False)  # all: the ViT analyses
    assert res["summary"]["analyses"] == ["rollout", "redundancy"]
    t = pd.read_csv(out / "redundancy.csv")
    assert set(t.columns) >= {
        "image",
        "layer",
        "layer_role",
        "token",
        "row",
        "col",
        "neighbour_cos",
        "is_sink",
    }
    assert t[t.is_sink & (t.layer == 4)][["row", "col"]].values.tolist() == [[1, 1]]
    s = json.loads((out / "summary.json").read_text())
    assert s["redundancy"]["detection_layer"] == 4 and "redundancy_s" in s["timings"]
    from sinkscope.viz import write_result_page

    assert "Sinks on redundant patches" in write_result_page(res).read_text()
