"""Detection rules on hand-made tables with known answers, the sink report, register neurons."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sinkscope import Plant, SinkscopeError, load_model
from sinkscope.neurons import register_neurons
from sinkscope.sinks import (
    AttentionRule,
    DimsRule,
    NormRule,
    SinkReport,
    auto_gap_threshold,
    detect,
    discover_sink_dims,
    topk_for_exact_dims,
)

from .conftest import CELLS, H, W


def _table(norms_by_image: dict[str, list[float]], layer=1, kind="patch"):
    rows = []
    for img, norms in norms_by_image.items():
        for t, n in enumerate(norms):
            rows.append(
                {
                    "image": img,
                    "layer": layer,
                    "token": t,
                    "kind": kind,
                    "row": pd.NA,
                    "col": pd.NA,
                    "norm": n,
                }
            )
    return pd.DataFrame(rows)


def test_absolute_and_relative_norm_rules():
    t = _table({"a": [10, 12, 11, 90, 10], "b": [100, 120, 110, 900, 100]})
    abs_ = detect(t, NormRule(threshold=100))
    assert abs_.is_sink.tolist() == [False, False, False, False, False, True, True, True, True, True]
    rel = detect(t, NormRule(relative=5))
    # relative to each image's own median: token 3 in both images
    assert t[rel.is_sink][["image", "token"]].values.tolist() == [["a", 3], ["b", 3]]
    assert rel.per_layer_threshold[1] == pytest.approx(5 * np.median([11, 110]))


def test_auto_rule_finds_a_separate_mode_and_nothing_in_a_unimodal_layer():
    rng = np.random.default_rng(0)
    body = rng.lognormal(mean=np.log(40), sigma=0.25, size=500)
    # unimodal, heavy-ish tail: no sinks, threshold None
    assert auto_gap_threshold(body, NormRule()) is None
    t = _table({"x": list(body)})
    det = detect(t, NormRule())
    assert not det.is_sink.any() and det.per_layer_threshold[1] is None
    # plant 6 outliers at ~10x: exactly those, threshold in the valley
    vals = np.concatenate([body, [400, 420, 390, 450, 410, 405]])
    thr = auto_gap_threshold(vals, NormRule())
    assert body.max() < thr < 390
    det = detect(_table({"x": list(vals)}), NormRule())
    assert det.is_sink.sum() == 6 and det.is_sink.iloc[-6:].all()


def test_auto_rule_rejects_a_large_upper_group_and_a_small_gap():
    # half the tokens high: not a sink mode (a second population)
    assert auto_gap_threshold(np.r_[np.full(50, 10.0), np.full(50, 100.0)], NormRule()) is None
    # a clear but small ratio (1.5x) gap: not enough
    assert auto_gap_threshold(np.r_[np.linspace(10, 11, 100), [16.5]], NormRule()) is None


def test_norm_rule_ignores_cls_by_default_and_rule_errors():
    t = _table({"a": [500, 10, 11, 12]})
    t.loc[0, "kind"] = "cls"
    assert not detect(t, NormRule(threshold=100)).is_sink.any()
    assert detect(t, NormRule(threshold=100, kinds=("cls", "patch"))).is_sink.tolist() == [
        True,
        False,
        False,
        False,
    ]
    with pytest.raises(SinkscopeError, match="not both"):
        NormRule(threshold=1, relative=2)


def test_attention_rule_uses_the_uniform_share():
    t = _table({"a": [1.0] * 4})
    t["attention_received"] = [0.7, 0.1, 0.1, 0.1]
    t["uniform_share"] = 0.25
    assert detect(t, AttentionRule(factor=2)).is_sink.tolist() == [True, False, False, False]
    assert detect(t, AttentionRule(factor=None, fraction=0.05)).is_sink.all()
    with pytest.raises(SinkscopeError, match="attention_received"):
        detect(_table({"a": [1.0]}), AttentionRule())


def _dims_table():
    """Two 'images', 5 tokens, D=2000; token 0 of each has a massive activation on dim 42."""
    rows = []
    for img in ("a", "b"):
        for t in range(5):
            massive = t == 0
            top_dims = [42, 3, 9, 11] if massive else [3, 9, 11, 17]
            top_vals = [3000.0, 2.0, 1.9, 1.8] if massive else [2.0, 1.9, 1.8, 1.7]
            rms = 3000.0 / np.sqrt(2000) * 1.01 if massive else 1.0
            rows.append(
                {
                    "image": img,
                    "layer": 3,
                    "token": t,
                    "kind": "text",
                    "norm": 0.0,
                    **{f"top_dim_{j}": d for j, d in enumerate(top_dims)},
                    **{f"top_val_{j}": v for j, v in enumerate(top_vals)},
                    "rms": rms,
                    "median_abs": 0.8,
                }
            )
    return pd.DataFrame(rows)


def test_dims_rule_discovers_dims_and_thresholds_the_rms_ratio():
    t = _dims_table()
    assert discover_sink_dims(t, DimsRule()) == [42]
    det = detect(t, DimsRule(tau=20))
    assert det.sink_dims == [42]
    assert t[det.is_sink].token.tolist() == [0, 0]
    assert det.statistic.iloc[0] == pytest.approx(3000 / (3000 / np.sqrt(2000) * 1.01))
    # below 1000x the median: not massive, no dims, no sinks
    t2 = t.assign(median_abs=10.0)
    assert discover_sink_dims(t2, DimsRule()) == [] and not detect(t2, DimsRule()).is_sink.any()
    # dims given explicitly
    assert detect(t2, DimsRule(dims=(42,))).is_sink.sum() == 2


def test_topk_keeps_the_dims_rule_exact():
    # with k = topk_for_exact_dims(D, tau), (k+1) channels >= tau*RMS would exceed the total energy
    for D in (64, 384, 576, 1024, 4096, 8192):
        k = topk_for_exact_dims(D, 20)
        assert (k + 1) * 400 > D


def test_sink_report_emergence_and_frame():
    rows = []
    for layer in range(4):
        for t in range(6):
            n = 500.0 if (t == 2 and layer >= 2) or (t == 4 and layer >= 3) else 10.0 + t
            rows.append(
                {
                    "image": "im",
                    "layer": layer,
                    "token": t,
                    "kind": "patch",
                    "row": t // 3,
                    "col": t % 3,
                    "norm": n,
                }
            )
    rep = SinkReport.from_tokens(pd.DataFrame(rows), [NormRule(threshold=100)])
    s = rep.sinks()
    assert s[["token", "row", "col", "emergence_layer", "n_layers"]].values.tolist() == [
        [2, 0, 2, 2, 2],
        [4, 1, 1, 3, 1],
    ]
    assert rep.emergence_layer() == 2
    counts = rep.per_layer_counts()
    assert [counts[i]["n_sinks"] for i in range(4)] == [0, 0, 1, 2]
    summ = rep.summary()
    assert summ["rule"]["description"].startswith("norm: L2 norm >= 100") and summ["n_sink_tokens"] == 2


def test_register_neurons_rank_the_planted_neuron_first(marked_images):
    plant = Plant(layer=2, dims=(7,), magnitude=600.0)
    ad = load_model("tiny-clip", plant=plant, image_size=(H, W))
    rn = register_neurons(ad, marked_images, detection_layer=-1, rule=NormRule(threshold=100), progress=False)
    top = rn.top(3)
    assert (int(top.block[0]), int(top.neuron[0])) == (plant.layer - 1, 0)
    by_write = register_neurons(
        ad, marked_images, rule=NormRule(threshold=100), progress=False, score="contribution"
    )
    assert (int(by_write.table.block[0]), int(by_write.table.neuron[0])) == (plant.layer - 1, 0)
    assert rn.n_sink_positions == sum(len(c) for c in CELLS)
    assert top.ratio[0] > 100  # silent elsewhere
    with pytest.raises(SinkscopeError, match="no sink positions"):
        register_neurons(ad, marked_images[-1:], rule=NormRule(threshold=100), progress=False)


def test_automatic_rule_per_image_does_not_depend_on_the_other_images():
    """Image a: 19 patches near 10 and one sink at 800. Image b: 20 bright patches near 500, no
    sink. Pooled per layer, the 10 -> 500 gap leaves half the tokens above it (over the 10% cap)
    and 500 -> 800 is under the 2x gap, so the pooled rule finds nothing; per image it finds a's
    sink, exactly as when a is scanned alone."""
    rng = np.random.default_rng(0)
    a = list(10 + rng.normal(0, 0.5, 19)) + [800.0]
    b = list(500 + rng.normal(0, 5, 20))
    both = _table({"a": a, "b": b})
    alone = _table({"a": a})
    pooled = detect(both, NormRule())
    per = detect(both, NormRule(auto_scope="image"))
    assert not pooled.is_sink.any()
    assert per.is_sink.tolist() == [False] * 19 + [True] + [False] * 20
    assert detect(alone, NormRule()).is_sink.tolist() == per.is_sink.tolist()[:20]
    assert "each image's log-norms" in NormRule(auto_scope="image").describe()
    with pytest.raises(SinkscopeError, match="auto_scope"):
        NormRule(auto_scope="batch")


def test_cli_auto_per_image_is_recorded(tmp_path, marked_images):
    from PIL import Image

    from sinkscope.cli import main

    d = tmp_path / "imgs"
    d.mkdir()
    for i, img in enumerate(marked_images[:2]):
        Image.fromarray(img).save(d / f"{i}.png")
    out = tmp_path / "o"
    assert (
        main(
            [
                "scan",
                "--model",
                "tiny-dinov2+sinks",
                "--images",
                str(d),
                "--auto-per-image",
                "--no-report",
                "--out",
                str(out),
                "-q",
            ]
        )
        == 0
    )
    import json

    s = json.loads((out / "summary.json").read_text())
    assert s["rule"]["params"]["auto_scope"] == "image" and s["n_sink_tokens"] > 0


# -- Gu et al.'s per-head sink rate ------------------------------------------------------------


def _causal_head_table(alphas_by_layer: list[list[float]], n: int = 10) -> pd.DataFrame:
    """A causal prompt of ``n`` tokens whose head ``h`` at layer ``l`` gives the first token
    ``alpha_0 = alphas_by_layer[l][h]``: query 0 sees only key 0, every later query gives key 0
    ``p = (n * alpha - 1) / (n - 1)`` and spreads the rest uniformly over keys 1..i."""
    rows = []
    for layer, alphas in enumerate(alphas_by_layer):
        recv = []
        for a in alphas:
            p = (n * a - 1) / (n - 1)
            A = np.zeros((n, n))
            A[0, 0] = 1.0
            for i in range(1, n):
                A[i, 0] = p
                A[i, 1 : i + 1] = (1 - p) / i
            assert np.allclose(A.sum(1), 1) and np.allclose(np.triu(A, 1), 0)
            recv.append(A.mean(0))  # attention received, averaged over all n queries
        recv = np.array(recv)  # [heads, n]
        for k in range(n):
            rows.append(
                {
                    "image": "p",
                    "layer": layer,
                    "token": k,
                    "kind": "text",
                    "norm": 1.0,
                    "attention_received": recv[:, k].mean(),
                    "uniform_share": 0.1,
                    **{f"attention_received_h{h}": recv[h, k] for h in range(len(alphas))},
                }
            )
    return pd.DataFrame(rows)


def test_gu_sink_rate_counts_heads_not_the_head_average():
    from sinkscope.sinks import gu_sink_rate, head_alpha

    # layer 0: one strong head, head mean 0.367 > 0.3; layer 1: two heads at 0.4, head mean 0.283
    alphas = [[0.9, 0.1, 0.1], [0.4, 0.4, 0.05]]
    t = _causal_head_table(alphas)
    a = head_alpha(t)
    assert a[a.token == 0].alpha.to_numpy() == pytest.approx(np.ravel(alphas), abs=1e-12)
    rate = gu_sink_rate(t, eps=0.3, token=0)
    assert rate["value"] == pytest.approx(3 / 6) and rate["n_heads"] == 3 and rate["n_layers"] == 2
    assert rate["per_layer"] == pytest.approx({"0": 1 / 3, "1": 2 / 3})
    assert rate["eps"] == 0.3 and rate["token"] == 0 and "per head" in rate["description"]
    # the head-averaged attention rule says the opposite per layer: sink at layer 0, not at layer 1
    det = detect(t, AttentionRule())
    first = t.token == 0
    assert det.is_sink[first].tolist() == [True, False]
    assert gu_sink_rate(t, eps=0.05, token=0)["value"] == pytest.approx(5 / 6)  # strictly above eps
    assert gu_sink_rate(t.drop(columns=[c for c in t if c.startswith("attention_received_h")])) is None


def test_gu_sink_rate_of_a_scan_equals_hf_eager_attentions():
    import torch

    from sinkscope import scan
    from sinkscope.sinks import gu_sink_rate, head_alpha

    ad = load_model("tiny-llama")
    texts = ["the cat sat on the mat and looked at the dog", "hello world again"]
    res = scan(ad, texts=texts, method="attention", progress=False)
    inp = ad.prepare(texts)
    ad.model.set_attn_implementation("eager")
    with torch.no_grad():
        att = ad.model(
            input_ids=inp.tensors["input_ids"], attention_mask=inp.attention_mask, output_attentions=True
        ).attentions  # per layer [batch, head, query, key]
    direct = []  # alpha_0 per (prompt, layer, head) = mean over the prompt's queries of A[i, 0]
    for b, lay in enumerate(inp.layouts):
        n = lay.n_tokens
        direct.append(np.stack([a[b, :, :n, 0].mean(-1).numpy() for a in att]))  # [layers, heads]
    direct = np.stack(direct)
    got = head_alpha(res.tokens)
    got = got[got.token == 0].sort_values(["image", "layer", "head"]).alpha.to_numpy()
    np.testing.assert_allclose(got, direct.ravel(), atol=1e-6)
    # and alpha_2 (seen by queries 2..n-1 only) of the first prompt, layer 1
    a2 = head_alpha(res.tokens).query("image == 'prompt0' and layer == 1 and token == 2").alpha.to_numpy()
    n0 = inp.layouts[0].n_tokens
    np.testing.assert_allclose(a2, att[1][0, :, 2:n0, 2].mean(-1).numpy(), atol=1e-6)
    s = res.summary["gu_sink_rate"]
    assert s["n_layers"] == 4 and s["n_heads"] == 4 and s["n_prompts"] == 2 and s["eps"] == 0.3
    assert s["value"] == pytest.approx((direct > 0.3).mean(axis=(1, 2)).mean())
    eps = float(np.median(direct))  # a threshold that splits the heads: a non-trivial rate
    r = gu_sink_rate(res.tokens, eps=eps)["value"]
    assert 0 < r < 1 and r == pytest.approx((direct > eps).mean(axis=(1, 2)).mean())


@pytest.mark.slow
def test_smollm2_gu_sink_rate_is_about_088():
    from sinkscope import scan

    texts = [
        "The capital of France is Paris, and the capital of Germany is Berlin.",
        "Attention sinks are tokens that receive a large share of attention in transformers.",
        "Once upon a time there was a little girl who lived in a village near the forest.",
        "def add(a, b):\n    return a + b",
    ]
    s = scan("smollm2-135m", texts=texts, method="attention", progress=False).summary["gu_sink_rate"]
    # measured: 0.876 (0.863-0.889 per prompt) of the 30 x 9 (layer, head) pairs; layers 0, 1 and 11 ~0.05
    assert s["n_layers"] == 30 and s["n_heads"] == 9
    assert 0.85 < s["value"] < 0.90
    assert s["per_layer"]["0"] < 0.2 and s["per_layer"]["20"] == 1.0


def test_one_norm_mask_serves_scan_probe_and_flow():
    """NormRule.mask is the rule's own computation: detect() on a token table gives the same sinks
    for every mode, including the automatic one, per image."""
    import numpy as np
    import pandas as pd

    from sinkscope.sinks import NormRule, detect

    rng = np.random.default_rng(0)
    norms = rng.uniform(10, 12, size=(3, 20))
    norms[0, 4] = 300.0
    norms[2, [1, 7]] = 90.0
    tab = pd.DataFrame({"image": np.repeat(["a", "b", "c"], 20), "layer": 1, "token": np.tile(np.arange(20), 3),
                        "kind": "patch", "norm": norms.ravel()})
    for rule in (NormRule(threshold=50.0), NormRule(relative=3.0), NormRule(), NormRule(auto_scope="image")):
        want = detect(tab, rule).is_sink.to_numpy().reshape(3, 20)
        np.testing.assert_array_equal(rule.mask(norms), want, err_msg=rule.describe())
    assert NormRule(auto_scope="image").mask(norms)[2].sum() == 2  # found in its own image
    assert NormRule(relative=3.0).mask(norms).sum() == 3
