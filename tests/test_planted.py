"""Planted sinks are recovered exactly - tokens, grid positions, emergence layer, nothing else -
for every family, at a non-default image size, in a batch of several images."""

from __future__ import annotations

import numpy as np
import pytest

from sinkscope import Plant, load_model
from sinkscope.capture import capture
from sinkscope.scanning import batch_rows
from sinkscope.sinks import DimsRule, NormRule, SinkReport

from .conftest import CELLS, GRID, VISION_TINY, H, W


def _scan_table(ad, images, **kw):
    batch = ad.prepare(images, [f"img{i}" for i in range(len(images))])
    cap = capture(ad, batch, dims=True, **kw)
    return batch, batch_rows(ad, batch, cap, causal=ad.family == "causal-lm")


def _expected(layout, plant_layer, n_layers):
    exp = set()
    for i, cells in enumerate(CELLS):
        for r, c in cells:
            exp.add((f"img{i}", layout.patch_token(r, c), r, c))
    return exp


@pytest.mark.parametrize("name", VISION_TINY)
@pytest.mark.parametrize("plant_layer", [2, 3])
def test_planted_vision_sinks_recovered_exactly(name, plant_layer, marked_images):
    ad = load_model(name, plant=Plant(layer=plant_layer, dims=(7, 20), magnitude=600.0), image_size=(H, W))
    batch, table = _scan_table(ad, marked_images)
    lay = batch.layouts[0]
    assert lay.grid == GRID  # from the pixel tensor, not sqrt(N)
    n_prefix = {"tiny-siglip": 0, "tiny-dinov2-reg": 5}.get(name, 1)
    assert lay.n_prefix == n_prefix and lay.n_tokens == n_prefix + GRID[0] * GRID[1]
    expected = _expected(lay, plant_layer, ad.n_layers)
    for rule in (
        NormRule(threshold=100),
        NormRule(relative=5),
        NormRule(),
        DimsRule(tau=4, massive_ratio=100),
    ):
        rep = SinkReport.from_tokens(table, [rule])
        sinks = rep.sinks()
        got = {(r.image, int(r.token), int(r.row), int(r.col)) for r in sinks.itertuples()}
        assert got == expected, (rule, got ^ expected)
        assert set(sinks["emergence_layer"]) == {plant_layer}
        # sinks stay sinks in every later layer, and no other token is ever flagged
        assert set(sinks["n_layers"]) == {ad.n_layers + 1 - plant_layer}
        assert (sinks["kind"] == "patch").all()
    dims = SinkReport.from_tokens(table, [DimsRule(tau=4, massive_ratio=100)]).sink_dims
    assert sorted(dims) == [7, 20]


def test_planted_sinks_follow_the_input_size(marked_images):
    """The same model at two input sizes: the grid and the sink positions follow the pixels."""
    from sinkscope.models.tiny import paint_markers

    from .conftest import photo

    ad = load_model("tiny-dinov2+sinks", image_size=(64, 24))
    img = paint_markers(photo(1, (64, 24)), [(7, 2)])
    batch, table = _scan_table(ad, [img])
    assert batch.layouts[0].grid == (8, 3)
    sinks = SinkReport.from_tokens(table, [NormRule(threshold=100)]).sinks()
    assert sinks[["token", "row", "col"]].values.tolist() == [[1 + 7 * 3 + 2, 7, 2]]


def test_unmarked_images_have_no_sinks():
    from .conftest import photo

    ad = load_model("tiny-vit+sinks", image_size=(H, W))
    _, table = _scan_table(ad, [photo(i) for i in range(4)])
    for rule in (NormRule(threshold=100), NormRule(relative=5), NormRule()):
        assert SinkReport.from_tokens(table, [rule]).sinks().empty


def test_planted_text_sinks_recovered_exactly():
    from sinkscope.models.tiny import tiny_tokenizer

    is_id = tiny_tokenizer().convert_tokens_to_ids("is")
    # the tokenizer prepends <s> (id 1); every "is" becomes a sink too
    ad = load_model("tiny-llama", plant=Plant(layer=2, dims=(5,), token_ids=(1, is_id)))
    prompts = ["what is the color of the sky ?", "a dog and a cat", "the cat is on the tree"]
    batch, table = _scan_table(ad, prompts)
    ids = batch.tensors["input_ids"]
    expected = {
        (f"img{i}", t)
        for i in range(len(prompts))
        for t in range(batch.layouts[i].n_text)
        if int(ids[i, t]) in (1, is_id)
    }
    # 5 of 24 tokens are sinks here, so the automatic rule needs a larger upper-group share
    for rule in (NormRule(threshold=50), NormRule(auto_max_frac=0.25), DimsRule(tau=4, massive_ratio=100)):
        rep = SinkReport.from_tokens(table, [rule])
        s = rep.sinks()
        assert {(r.image, int(r.token)) for r in s.itertuples()} == expected, rule
        assert set(s["emergence_layer"]) == {2}
        assert (s["kind"] == "text").all() and s["row"].isna().all()
    assert SinkReport.from_tokens(table, [DimsRule(tau=4, massive_ratio=100)]).sink_dims == [5]


def test_padding_never_yields_tokens():
    ad = load_model("tiny-llama+sinks")
    batch, table = _scan_table(ad, ["a", "what is the color of the sky ?"])
    n0 = batch.layouts[0].n_text
    assert n0 == 2  # <s> a
    assert table[table.image == "img0"].token.max() == n0 - 1
    assert len(table) == (ad.n_layers + 1) * sum(lay.n_text for lay in batch.layouts)


def test_register_and_cls_positions_are_reported(marked_images):
    ad = load_model("tiny-dinov2-reg+sinks", image_size=(H, W))
    _, table = _scan_table(ad, marked_images[:1])
    first = table[table.layer == 0].sort_values("token")
    assert first.kind.tolist()[:6] == ["cls", "register", "register", "register", "register", "patch"]
    assert first.row.isna().sum() == 5 and int(first.iloc[5].row) == 0 and int(first.iloc[5].col) == 0
    assert np.isfinite(first.norm).all()
