"""Rollout, attention flow, relevance maps and group attention: known answers computed by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sinkscope._utils import SinkscopeError
from sinkscope.flow import (
    attention_by_group,
    attention_flow,
    fuse_heads,
    relevance_map,
    rollout,
    rollout_from,
    to_grid,
)
from sinkscope.models.base import TokenLayout

# Two blocks, three tokens, row-stochastic fused maps.
A0 = np.array(
    [
        [0.2, 0.6, 0.2],
        [0.0, 1.0, 0.0],
        [0.4, 0.4, 0.2],
    ]
)
A1 = np.array(
    [
        [0.0, 1.0, 0.0],
        [0.5, 0.5, 0.0],
        [0.0, 0.2, 0.8],
    ]
)
# By hand, A' = 0.5 A + 0.5 I (rows already sum to 1):
A0_RES = np.array(
    [
        [0.6, 0.3, 0.1],
        [0.0, 1.0, 0.0],
        [0.2, 0.2, 0.6],
    ]
)
A1_RES = np.array(
    [
        [0.5, 0.5, 0.0],
        [0.25, 0.75, 0.0],
        [0.0, 0.1, 0.9],
    ]
)
# By hand, A1' @ A0' (later block on the left):
#   row 0 = 0.5 * [0.6, 0.3, 0.1] + 0.5 * [0, 1, 0]                      = [0.30, 0.65, 0.05]
#   row 1 = 0.25 * [0.6, 0.3, 0.1] + 0.75 * [0, 1, 0]                    = [0.15, 0.825, 0.025]
#   row 2 = 0.1 * [0, 1, 0] + 0.9 * [0.2, 0.2, 0.6]                      = [0.18, 0.28, 0.54]
ROLLOUT = np.array(
    [
        [0.30, 0.65, 0.05],
        [0.15, 0.825, 0.025],
        [0.18, 0.28, 0.54],
    ]
)
# The wrong order, A0' @ A1', row 0 = 0.6*[.5,.5,0] + 0.3*[.25,.75,0] + 0.1*[0,.1,.9] = [0.375, 0.535, 0.09]
WRONG_ORDER_ROW0 = np.array([0.375, 0.535, 0.09])


def test_rollout_two_layers_by_hand():
    r = rollout([A0, A1])
    assert isinstance(r, np.ndarray) and r.shape == (3, 3)
    np.testing.assert_allclose(r, ROLLOUT, atol=1e-12)
    np.testing.assert_allclose(r.sum(axis=1), 1.0, atol=1e-12)
    assert np.abs(r[0] - WRONG_ORDER_ROW0).max() > 0.05
    np.testing.assert_allclose(rollout_from([A0, A1], token=2), [0.18, 0.28, 0.54], atol=1e-12)
    np.testing.assert_allclose(rollout_from([A0, A1], token=-1), [0.18, 0.28, 0.54], atol=1e-12)


def test_rollout_fuses_heads_and_keeps_torch():
    # two heads whose mean is A0; A1 given as identical heads
    h1 = np.array([[0.4, 0.4, 0.2], [0.0, 1.0, 0.0], [0.4, 0.4, 0.2]])
    h2 = np.array([[0.0, 0.8, 0.2], [0.0, 1.0, 0.0], [0.4, 0.4, 0.2]])
    layers = [torch.tensor(np.stack([h1, h2]), dtype=torch.float32), torch.tensor(np.stack([A1, A1]))]
    r = rollout(layers)
    assert isinstance(r, torch.Tensor) and r.dtype == torch.float32 and r.shape == (3, 3)
    np.testing.assert_allclose(r.numpy(), ROLLOUT, atol=1e-6)
    # batched [batch, heads, q, k] -> [batch, q, k]
    batch = [np.stack([np.stack([h1, h2]), np.stack([np.eye(3)] * 2)]), np.stack([np.stack([A1, A1])] * 2)]
    rb = rollout(batch)
    assert rb.shape == (2, 3, 3)
    np.testing.assert_allclose(rb[0], ROLLOUT, atol=1e-12)
    np.testing.assert_allclose(rb[1], A1_RES, atol=1e-12)  # identity in block 0 leaves A1' alone
    assert rollout_from(batch, token=0).shape == (2, 3)


def test_start_and_end_layer_select_blocks_like_a_slice():
    np.testing.assert_allclose(rollout([A0, A1], start_layer=1), A1_RES, atol=1e-12)
    np.testing.assert_allclose(rollout([A0, A1], end_layer=1), A0_RES, atol=1e-12)
    with pytest.raises(SinkscopeError, match="select no block"):
        rollout([A0, A1], start_layer=2)


# One block, two heads, max fusion gives rows that do NOT sum to 1 and a non-symmetric A'.
H1 = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
H2 = np.array([[0.0, 1.0, 0.0], [0.5, 0.0, 0.5], [0.0, 0.5, 0.5]])
# max = [[1, 1, 0], [.5, .5, .5], [0, .5, 1]]; 0.5*max + 0.5*I = [[1, .5, 0], [.25, .75, .25], [0, .25, 1]]
# row sums 1.5, 1.25, 1.25 -> row-normalised:
MAX_ROWNORM = np.array([[2 / 3, 1 / 3, 0.0], [0.2, 0.6, 0.2], [0.0, 0.2, 0.8]])
# column sums 1.25, 1.5, 1.25 -> column-normalised (the wrong axis):
MAX_COLNORM = np.array([[0.8, 1 / 3, 0.0], [0.2, 0.5, 0.2], [0.0, 1 / 6, 0.8]])
# the popular implementation's `a / a.sum(dim=-1)` broadcast divides a[i, j] by row sum j:
MAX_BROADCAST = np.array(
    [[1 / 1.5, 0.5 / 1.25, 0.0], [0.25 / 1.5, 0.75 / 1.25, 0.25 / 1.25], [0.0, 0.25 / 1.25, 0.8]]
)
# min = [[0, 0, 0], [.5, 0, 0], [0, 0, .5]]; 0.5*min + 0.5*I = [[.5, 0, 0], [.25, .5, 0], [0, 0, .75]]
MIN_ROWNORM = np.array([[1.0, 0.0, 0.0], [1 / 3, 2 / 3, 0.0], [0.0, 0.0, 1.0]])


def test_rows_not_columns_are_normalised():
    heads = np.stack([H1, H2])
    r = rollout([heads], fusion="max")
    np.testing.assert_allclose(r, MAX_ROWNORM, atol=1e-12)
    np.testing.assert_allclose(r.sum(axis=1), 1.0, atol=1e-12)
    assert np.abs(r.sum(axis=0) - 1.0).max() > 0.1  # columns do not sum to 1
    assert np.abs(r - MAX_COLNORM).max() > 0.1
    assert np.abs(r - MAX_BROADCAST).max() > 0.05
    assert np.abs(MAX_BROADCAST.sum(axis=1) - 1.0).max() > 0.05  # its rows do not even sum to 1


def test_fusion_max_min_mean():
    heads = np.stack([H1, H2])
    np.testing.assert_allclose(fuse_heads(heads, "max"), [[1, 1, 0], [0.5, 0.5, 0.5], [0, 0.5, 1]])
    np.testing.assert_allclose(fuse_heads(heads, "min"), [[0, 0, 0], [0.5, 0, 0], [0, 0, 0.5]])
    np.testing.assert_allclose(fuse_heads(heads, "mean"), [[0.5, 0.5, 0], [0.5, 0.25, 0.25], [0, 0.25, 0.75]])
    t = fuse_heads(torch.tensor(np.stack([heads, heads])), "max")  # [batch, heads, q, k] -> [batch, q, k]
    assert isinstance(t, torch.Tensor) and t.shape == (2, 3, 3)
    np.testing.assert_allclose(rollout([heads], fusion="min"), MIN_ROWNORM, atol=1e-12)
    with pytest.raises(SinkscopeError, match="fusion"):
        fuse_heads(heads, "median")


def test_discard_ratio_zeroes_lowest_off_diagonal_per_row():
    a = np.array(
        [
            [0.5, 0.3, 0.2],  # off-diagonal lowest: 0.2 at (0, 2)
            [0.1, 0.1, 0.8],  # (1, 0) ties the diagonal; the diagonal is never discarded
            [0.6, 0.4, 0.0],  # the diagonal 0.0 is lowest but kept; off-diagonal lowest: (2, 1)
        ]
    )
    # ratio 0.5 -> floor(0.5 * 2) = 1 weight per row. Kept: [[.5,.3,0],[0,.1,.8],[.6,0,0]]
    # 0.5 * kept + 0.5 * I = [[.75,.15,0],[0,.55,.4],[.3,0,.5]], row sums .9, .95, .8
    expected = np.array(
        [[0.75 / 0.9, 0.15 / 0.9, 0.0], [0.0, 0.55 / 0.95, 0.4 / 0.95], [0.3 / 0.8, 0.0, 0.5 / 0.8]]
    )
    r = rollout([a], discard_ratio=0.5)
    np.testing.assert_allclose(r, expected, atol=1e-12)
    np.testing.assert_allclose(r.sum(axis=1), 1.0, atol=1e-12)
    # ratio 0 discards nothing; ratio 1 discards every off-diagonal weight -> identity
    np.testing.assert_allclose(rollout([a], discard_ratio=0.0), 0.5 * a + 0.5 * np.eye(3), atol=1e-12)
    np.testing.assert_allclose(rollout([a, a], discard_ratio=1.0), np.eye(3), atol=1e-12)


def test_residual_alpha_extremes_and_rows_sum_to_one():
    rng = np.random.default_rng(0)
    layers = [rng.dirichlet(np.ones(5), size=(3, 5)) for _ in range(4)]  # [heads, q, k]
    for alpha in (0.0, 0.3, 1.0):
        for fusion in ("mean", "max", "min"):
            r = rollout(layers, fusion=fusion, residual_alpha=alpha, discard_ratio=0.5)
            np.testing.assert_allclose(r.sum(axis=1), 1.0, atol=1e-12)
    np.testing.assert_allclose(rollout(layers, residual_alpha=0.0), np.eye(5), atol=1e-12)
    mean = [m.mean(axis=0) for m in layers]
    np.testing.assert_allclose(
        rollout(layers, residual_alpha=1.0), mean[3] @ mean[2] @ mean[1] @ mean[0], atol=1e-12
    )


def test_attention_flow_two_layers_by_hand():
    # With two blocks, paths top -> middle k -> bottom j are edge-disjoint, so
    # flow(i -> j) = sum_k min(A1'[i, k], A0'[k, j]).
    # token 0: A1' row 0 = [.5, .5, 0]
    #   j=0: min(.5,.6) + min(.5,0) + 0 = 0.5; j=1: min(.5,.3) + min(.5,1) = 0.8; j=2: min(.5,.1) = 0.1
    # token 2: A1' row 2 = [0, .1, .9]
    #   j=0: min(.9,.2) = 0.2; j=1: min(.1,1) + min(.9,.2) = 0.3; j=2: min(.9,.6) = 0.6
    for backend in ("networkx", "python"):
        np.testing.assert_allclose(attention_flow([A0, A1], 0, backend=backend), [0.5, 0.8, 0.1], atol=1e-8)
        np.testing.assert_allclose(attention_flow([A0, A1], 2, backend=backend), [0.2, 0.3, 0.6], atol=1e-8)
    # one block: the only path is the direct edge, so flow = A' row (= rollout row)
    np.testing.assert_allclose(attention_flow([A0], 0), A0_RES[0], atol=1e-8)


def test_attention_flow_differs_from_rollout_on_swap_graph():
    # three blocks of A = [[0, 1], [1, 0]]: A' = all 0.5. Rollout gives 0.5 everywhere; the max
    # flow from top token 0 to either bottom token is 1 (two disjoint paths of capacity 0.5).
    swap = np.array([[0.0, 1.0], [1.0, 0.0]])
    flow = attention_flow([torch.tensor(swap)] * 3, token=0)
    assert isinstance(flow, torch.Tensor)
    np.testing.assert_allclose(flow.numpy(), [1.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(rollout_from([swap] * 3, 0), [0.5, 0.5], atol=1e-12)


def test_attention_flow_backends_agree_and_batch():
    rng = np.random.default_rng(1)
    layers = [rng.dirichlet(np.ones(4), size=(2, 2, 4)) for _ in range(3)]  # [batch, heads, q, k]
    nx_flow = attention_flow(layers, token=1, backend="networkx")
    py_flow = attention_flow(layers, token=1, backend="python")
    assert nx_flow.shape == (2, 4)
    np.testing.assert_allclose(nx_flow, py_flow, atol=1e-8)
    assert (nx_flow >= 0).all() and (nx_flow <= 1 + 1e-9).all()
    # max flow is at least the rollout value (the rollout weight routes through the same edges)
    assert (nx_flow >= rollout_from(layers, 1) - 1e-8).all()


def test_attention_flow_size_limit():
    layers = [np.full((10, 10), 0.1)] * 5  # (5 + 1) layers x 10 tokens = 60 nodes
    with pytest.raises(SinkscopeError, match=r"60 graph nodes exceeds max_nodes=50"):
        attention_flow(layers, token=0, max_nodes=50)
    assert attention_flow(layers, token=0, max_nodes=60).shape == (10,)


LAYOUT = TokenLayout(n_cls=1, n_registers=2, grid=(2, 3))  # 1 + 2 + 6 = 9 tokens


def test_to_grid_drops_cls_and_registers():
    g = to_grid(np.arange(9), LAYOUT)
    assert g.tolist() == [[3, 4, 5], [6, 7, 8]]
    for r in range(2):
        for c in range(3):
            assert g[r, c] == LAYOUT.patch_token(r, c)
    gb = to_grid(torch.arange(18).reshape(2, 9), LAYOUT)
    assert isinstance(gb, torch.Tensor) and gb.shape == (2, 2, 3) and gb[1, 0, 0] == 12
    assert to_grid(np.arange(6), LAYOUT).tolist() == [[0, 1, 2], [3, 4, 5]]  # patches only
    with pytest.raises(SinkscopeError, match="8 values"):
        to_grid(np.arange(8), LAYOUT)
    with pytest.raises(SinkscopeError, match="no patch grid"):
        to_grid(np.arange(4), TokenLayout(n_text=4))


def test_relevance_map_column_vs_row():
    lay = TokenLayout(n_cls=1, grid=(2, 2))  # tokens: 0 = CLS, 1..4 = patches
    j = lay.patch_token(0, 1)  # token 2
    attn = np.zeros((2, 5, 5))
    attn[0, :, j] = [0.9, 0.1, 0.2, 0.3, 0.4]  # column: who attends to j (CLS's 0.9 is dropped)
    attn[0, j, :] = [0.5, 0.6, 0.2, 0.7, 0.8]  # row: what j attends to (attn[0, j, j] = 0.2 in both)
    attn[1, 3, j] = 1.0  # head 1: only patch (1, 0) attends to j
    col = relevance_map(attn, lay, j, "column")
    row = relevance_map(attn, lay, j, "row")
    assert col.shape == row.shape == (2, 2, 2)
    np.testing.assert_allclose(col[0], [[0.1, 0.2], [0.3, 0.4]])
    np.testing.assert_allclose(row[0], [[0.6, 0.2], [0.7, 0.8]])
    np.testing.assert_allclose(col[1], [[0.0, 0.0], [1.0, 0.0]])
    np.testing.assert_allclose(row[1], np.zeros((2, 2)))
    with pytest.raises(SinkscopeError, match="direction"):
        relevance_map(attn, lay, j, "diagonal")
    with pytest.raises(SinkscopeError, match="5 x 5, layout has 4 tokens"):
        relevance_map(attn, TokenLayout(grid=(2, 2)), j)


HEAD0 = [[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]]
HEAD1 = [[0.0, 0.0, 0.5, 0.5], [1.0, 0.0, 0.0, 0.0]]
# received per key = mean over 2 heads x 2 queries:
#   k0 = (.1 + .4 + 0 + 1) / 4 = .375; k1 = (.2 + .3) / 4 = .125; k2 = (.3 + .2 + .5) / 4 = .25; k3 = .25


def test_attention_by_group_by_hand():
    attn = np.array([HEAD0, HEAD1])  # [heads=2, q=2, k=4]
    out = attention_by_group(attn, {"sinks": [0], "nonsinks": [1, 2, 3], "cls": []})
    assert list(out) == ["sinks", "nonsinks", "cls"]
    assert out["sinks"] == pytest.approx(0.375)
    assert out["nonsinks"] == pytest.approx(0.625 / 3)
    assert np.isnan(out["cls"])
    # only query 0: k0 = (.1 + 0) / 2 = .05, k2 = (.3 + .5) / 2 = .4
    q0 = attention_by_group(torch.tensor(attn), {"sinks": [0], "other": [2]}, queries=[0])
    assert q0 == pytest.approx({"sinks": 0.05, "other": 0.4})


def test_attention_by_group_batch_pools_tokens():
    attn = np.stack([np.array([HEAD0, HEAD1]), np.full((2, 2, 4), 0.25)])  # [batch=2, heads, q, k]
    per_image = [{"sinks": [0], "nonsinks": [1, 2, 3]}, {"sinks": [3], "nonsinks": [0, 1, 2]}]
    out = attention_by_group(attn, per_image)
    assert out["sinks"] == pytest.approx((0.375 + 0.25) / 2)
    assert out["nonsinks"] == pytest.approx((0.125 + 0.25 + 0.25 + 3 * 0.25) / 6)
    shared = attention_by_group(attn, {"sinks": [0]})
    assert shared["sinks"] == pytest.approx((0.375 + 0.25) / 2)
    with pytest.raises(SinkscopeError, match="1 group mappings for 2 images"):
        attention_by_group(attn, per_image[:1])
    with pytest.raises(SinkscopeError, match="outside"):
        attention_by_group(attn, {"sinks": [4]})
