"""Linear probes: known answers on hand-made features, planted-sink group membership, a real
model, determinism, caching and bad inputs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from sinkscope import Plant, SinkscopeError, load_model, probe  # the API's probe: tables + probe.html
from sinkscope.capture import capture
from sinkscope.data import ImageItem, LabeledImages, load_dataset
from sinkscope.probing import (
    GroupFeatures,
    LinearProbe,
    extract_group_features,
    outer_splits,
    run_probes,
)
from sinkscope.sinks import NormRule

from .conftest import CELLS, H, W


def _handmade(n=80, d=16, seed=0):
    rng = np.random.default_rng(seed)
    y = np.array(["a", "b"] * (n // 2))
    sep = rng.normal(size=(n, d)).astype(np.float32)
    sep[:, 0] += np.where(y == "a", 4.0, -4.0)  # one linearly separable direction
    noise = rng.normal(size=(n, d)).astype(np.float32)
    rows = rng.integers(0, 10, size=n).astype(np.float32)
    pos_feat = rng.normal(size=(n, d)).astype(np.float32)
    pos_feat[:, 3] = rows  # position linearly readable from the 'random' token
    x = {(1, "cls"): sep, (1, "mean"): noise, (1, "random"): pos_feat}
    ones = np.ones(n, np.int32)
    pos = {k: np.stack([rows, rows], 1) for k in x}
    return GroupFeatures(
        x, {k: ones for k in x}, pos, pd.DataFrame({"label": y}), [f"i{i}" for i in range(n)]
    )


def test_probe_scores_separable_noise_and_shuffled_groups_correctly():
    t = run_probes(_handmade(), labels=["label", "row"], folds=5, seed=0, n_jobs=1)
    cls = t[(t.group == "cls") & (t.label == "label")].iloc[0]
    noise = t[(t.group == "mean") & (t.label == "label")].iloc[0]
    assert cls.accuracy >= 0.97 and cls.balanced_accuracy >= 0.97
    assert abs(noise.accuracy - 0.5) < 0.15 and noise.chance == 0.5
    assert abs(cls.shuffle_accuracy - 0.5) < 0.2  # the same pipeline on shuffled labels is at chance
    assert cls.n_images == 80 and cls.n_tokens == 80 and cls.folds_used == 5
    reg = t[(t.group == "random") & (t.label == "row")].iloc[0]
    assert reg.task == "regression" and reg.accuracy > 0.95 and reg.shuffle_accuracy < 0.2


def test_outer_splits_never_leak_an_image_and_stay_stratified():
    ids = np.repeat(np.arange(25), 2)  # two samples per image: grouping matters
    y = np.where(ids < 15, "a", "b")
    splits = outer_splits(y, ids, folds=5, seed=3)
    assert len(splits) == 5
    seen_test = []
    for tr, te in splits:
        assert not set(ids[tr]) & set(ids[te])
        assert set(y[te]) == {"a", "b"}
        seen_test.extend(ids[te])
    assert sorted(set(seen_test)) == list(range(25))  # every image tested exactly once
    assert len(seen_test) == 50
    with pytest.raises(SinkscopeError, match="fewer than 5 folds"):
        outer_splits(np.array(["a"] * 10 + ["b"] * 3), np.arange(13), 5, 0)


def test_linear_probe_is_a_sklearn_estimator():
    from sklearn.base import clone
    from sklearn.model_selection import cross_val_score

    f = _handmade()
    X, y = f.x[(1, "cls")], f.labels.label.to_numpy()
    est = LinearProbe(Cs=(0.01, 1.0))
    assert clone(est).get_params()["Cs"] == (0.01, 1.0)
    assert cross_val_score(est, X, y, cv=4).mean() > 0.95
    assert LinearProbe().fit(X, y).C_ in LinearProbe().Cs


def test_group_membership_follows_the_planted_tokens(marked_images):
    ad = load_model("tiny-dinov2", plant=Plant(layer=2, dims=(7,)), image_size=(H, W))
    items = [ImageItem(f"im{i}", f"im{i}", loader=lambda im=im: im) for i, im in enumerate(marked_images)]
    data = LabeledImages("marked", items, pd.DataFrame({"label": ["x", "y", "x", "y"]}))
    groups = ["cls", "mean", "sink", "nonsink", "matched", "random"]
    f = extract_group_features(
        ad, data, "all", groups, NormRule(threshold=100), seed=0, cache=False, progress=False
    )
    lay = ad.vision.layout_for(H, W) if hasattr(ad, "vision") else ad.layout_for(H, W)
    cap = capture(ad, ad.prepare(marked_images), keep=list(range(5)))
    for layer in range(5):
        counts = f.n_tokens[(layer, "sink")].tolist()
        assert counts == ([len(c) for c in CELLS] if layer >= 2 else [0, 0, 0, 0])
        for i, cells in enumerate(CELLS):
            toks = [lay.patch_token(r, c) for r, c in cells]
            h = cap.hidden[layer][i]
            if layer >= 2 and toks:
                np.testing.assert_allclose(
                    f.x[(layer, "sink")][i], h[toks].mean(0).numpy(), rtol=1e-5, atol=1e-5
                )
                np.testing.assert_allclose(f.pos[(layer, "sink")][i], np.mean(cells, 0))
                others = [t for t in range(lay.n_prefix, lay.n_tokens) if t not in toks]
                np.testing.assert_allclose(
                    f.x[(layer, "nonsink")][i], h[others].mean(0).numpy(), rtol=1e-4, atol=1e-5
                )
                assert f.n_tokens[(layer, "matched")][i] == len(toks)
            else:
                assert np.isnan(f.x[(layer, "sink")][i]).all()
            np.testing.assert_allclose(f.x[(layer, "cls")][i], h[0].numpy(), rtol=1e-5, atol=1e-6)
    # the matched control of the sink at (1, 2) in image 0 is a grid neighbour
    assert np.abs(f.pos[(2, "matched")][0] - np.array([1, 2])).max() == 1


@pytest.fixture(scope="module")
def lfw_features(tmp_path_factory):
    cache = tmp_path_factory.mktemp("feat")
    ad = load_model("dinov2-small")
    return extract_group_features(
        ad, load_dataset("lfw-faces"), "0,1,5,8,12", ["cls", "mean"], cache=cache, progress=False
    ), cache


@pytest.mark.slow
def test_dinov2_small_cls_probe_on_lfw_faces(lfw_features):
    feats, _ = lfw_features
    t = run_probes(feats, folds=5, seed=0)
    cls = t[t.group == "cls"].set_index("layer").accuracy
    assert (cls.loc[[5, 8, 12]] >= 0.95).all()  # measured: 1.00 / 0.995
    assert cls.loc[0] <= 0.6  # CLS at the embedding layer is one learned vector: chance


@pytest.mark.slow
def test_same_seed_same_csv_and_the_model_is_not_run_twice(tmp_path, lfw_features, monkeypatch):
    import sys

    from sinkscope import capture as _c  # noqa: F401

    feats, cache = lfw_features
    capmod = sys.modules["sinkscope.capture"]
    monkeypatch.setattr(
        capmod.Capture, "run", lambda *a, **k: (_ for _ in ()).throw(AssertionError("model ran"))
    )
    a = probe(
        "dinov2-small",
        "lfw-faces",
        groups=["cls", "mean"],
        layers="0,1,5,8,12",
        out=tmp_path / "a",
        cache=cache,
        progress=False,
    )
    probe(
        "dinov2-small",
        "lfw-faces",
        groups=["cls", "mean"],
        layers="0,1,5,8,12",
        out=tmp_path / "b",
        cache=cache,
        progress=False,
    )
    assert a.summary["features"]["cached"] is True
    assert (tmp_path / "a" / "probe.csv").read_bytes() == (tmp_path / "b" / "probe.csv").read_bytes()
    cols = pd.read_csv(tmp_path / "a" / "probe.csv").columns
    for c in (
        "layer",
        "group",
        "label",
        "accuracy",
        "accuracy_std",
        "balanced_accuracy",
        "chance",
        "n_images",
        "n_tokens",
    ):
        assert c in cols
    html = (tmp_path / "a" / "probe.html").read_text()
    assert "plotly" in html and "chance" in html


def test_unreadable_images_are_reported_and_skipped(tmp_path, caplog):
    for cls, color in (("red", (200, 0, 0)), ("blue", (0, 0, 200))):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.new("RGB", (W, H), color).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "red" / "bad.png").write_bytes(b"not an image")
    data = load_dataset(str(tmp_path))
    assert len(data) == 7 and set(data.labels.label) == {"red", "blue"}
    ad = load_model("tiny-vit", image_size=(H, W))
    f = extract_group_features(ad, data, [1], ["mean"], cache=False, progress=False)
    assert len(f.names) == 6 and f.meta["failed"][0]["image"] == "red/bad.png"
    assert any("bad.png" in r.getMessage() for r in caplog.records if r.levelname == "ERROR")


def test_probe_rejects_bad_requests():
    ad = load_model("tiny-vit")
    with pytest.raises(SinkscopeError, match="per-image norm rule"):
        extract_group_features(ad, load_dataset("samples"), [1], ["mean"], rule=NormRule(), cache=False)
    with pytest.raises(SinkscopeError, match="unknown token group"):
        extract_group_features(ad, load_dataset("samples"), [1], ["everything"], cache=False)
    with pytest.raises(SinkscopeError, match="unknown dataset"):
        load_dataset("no-such-dataset")
    with pytest.raises(SinkscopeError, match="language model"):
        probe("tiny-llama", "samples", progress=False)


def test_cli_probe_writes_three_files(tmp_path):
    from sinkscope.cli import main

    d = tmp_path / "data"
    for cls, color in (("a", (200, 30, 0)), ("b", (0, 30, 200))):
        (d / cls).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (W, H), tuple(min(255, v + 7 * i) for v in color)).save(d / cls / f"{i}.png")
    rc = main(
        [
            "probe",
            "--model",
            "tiny-dinov2+sinks",
            "--dataset",
            str(d),
            "--folds",
            "3",
            "--layers",
            "0,2",
            "--groups",
            "cls,mean",
            "--image-size",
            "48x40",
            "--out",
            str(tmp_path / "o"),
            "-q",
            "--no-cache",
        ]
    )
    assert rc == 0
    for f in ("probe.csv", "summary.json", "probe.html"):
        assert (tmp_path / "o" / f).stat().st_size > 100
    t = pd.read_csv(tmp_path / "o" / "probe.csv")
    assert len(t) == 4 and t.n_images.eq(12).all()


def test_linear_probe_passes_sklearn_estimator_checks():
    import warnings

    from sklearn.utils.estimator_checks import check_estimator

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = check_estimator(LinearProbe(), on_fail=None)
    failed = [r["check_name"] for r in results if r["status"] == "failed"]
    assert len(results) > 40 and failed == []


def test_hugging_face_imagefolder_dataset(tmp_path):
    for cls, color in (("cat", (200, 0, 0)), ("dog", (0, 0, 200))):
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.new("RGB", (30, 30), color).save(tmp_path / cls / f"{i}.png")
    ds = load_dataset(f"imagefolder:{tmp_path}")
    assert len(ds) == 4 and sorted(ds.labels.label) == ["cat", "cat", "dog", "dog"]
    assert ds.items[0].load().shape == (30, 30, 3)


def test_bad_labels_fail_clearly_and_missing_labels_are_counted():
    f = _handmade(n=40)
    with pytest.raises(SinkscopeError, match="single class"):
        g = _handmade(n=40)
        g.labels["label"] = "x"
        run_probes(g, labels=["label"], folds=3, n_jobs=1)
    with pytest.raises(SinkscopeError, match="position labels need one of"):
        run_probes(f, labels=["row"], groups=["cls", "mean"], folds=3, n_jobs=1)
    with pytest.raises(SinkscopeError, match="at least 2"):
        run_probes(f, folds=1, n_jobs=1)
    h = _handmade(n=40)
    h.labels.loc[:4, "label"] = ""  # five images without a label
    t = run_probes(h, labels=["label"], groups=["cls"], folds=3, n_jobs=1)
    assert t.n_images.item() == 35 and t.n_missing.item() == 5 and t.chance_balanced.item() == 0.5


def test_cache_key_follows_the_model_input_size_and_plant():
    from sinkscope.probing import features_key

    data = load_dataset("samples")
    rule = NormRule(relative=5)
    keys = {
        features_key(load_model("tiny-llava", image_size=(32, 32)), data, [1], ["mean"], rule, 0, None),
        features_key(load_model("tiny-llava", image_size=(64, 64)), data, [1], ["mean"], rule, 0, None),
        features_key(load_model("tiny-dinov2"), data, [1], ["mean"], rule, 0, None),
        features_key(load_model("tiny-dinov2+sinks"), data, [1], ["mean"], rule, 0, None),
    }
    assert len(keys) == 4


def test_subsample_is_stratified():
    d = load_dataset("digits").subsample(30, seed=0)
    assert d.labels.label.value_counts().tolist() == [3] * 10


def test_default_groups_include_one_random_nonsink_token_and_the_report_says_why(tmp_path):
    import inspect

    from sinkscope.cli import build_parser, main
    from sinkscope.models.tiny import paint_markers

    assert "nonsink_random" in inspect.signature(probe).parameters["groups"].default
    assert "nonsink_random" in build_parser().parse_args(["probe"]).groups.split(",")
    d = tmp_path / "data"
    for k, (cls, color) in enumerate((("a", (200, 200, 40)), ("b", (40, 200, 200)))):
        (d / cls).mkdir(parents=True)
        for i in range(6):
            img = np.full((H, W, 3), [min(255, v + 5 * i) for v in color], np.uint8)
            Image.fromarray(paint_markers(img, [(i % 6, (i + k) % 5)])).save(d / cls / f"{i}.png")
    argv = ["probe", "--model", "tiny-dinov2+sinks", "--dataset", str(d), "--folds", "3"]
    argv += ["--layers", "2,3", "--image-size", "48x40", "--out", str(tmp_path / "o")]
    argv += ["-q", "--no-cache", "--jobs", "1"]
    assert main(argv) == 0  # default --groups
    t = pd.read_csv(tmp_path / "o" / "probe.csv")
    assert set(t.group) == {"cls", "mean", "random", "sink", "nonsink", "nonsink_random"}
    nr = t[t.group == "nonsink_random"]
    assert len(nr) == 2 and (nr.n_tokens == nr.n_images).all() and nr.n_images.eq(12).all()  # one token each
    non = t[t.group == "nonsink"]
    assert (non.n_tokens == 12 * 29).all()  # 6 x 5 patches, one planted sink each: 29 pooled patches
    html = (tmp_path / "o" / "probe.html").read_text()
    assert "&#x27;nonsink&#x27; is the mean of about 29 patches per image - a global average pool" in html or (
        "'nonsink' is the mean of about 29 patches per image - a global average pool" in html
    )
    assert "1.0 sink token(s) per image" in html
    assert "compare &#x27;sink&#x27; with &#x27;nonsink_random&#x27;" in html or (
        "compare 'sink' with 'nonsink_random'" in html
    )
    assert "0.512" in html


def test_nonsink_note_without_the_single_token_group_asks_for_it():
    from sinkscope.viz.probe_report import nonsink_note

    t = pd.DataFrame(
        {
            "layer": [1, 1],
            "group": ["sink", "nonsink"],
            "label": "y",
            "task": "classification",
            "accuracy": [0.9, 0.8],
            "n_images": [10, 10],
            "n_tokens": [20, 1000],
        }
    )
    note = nonsink_note(t)
    assert note.startswith("Token groups differ in size: 'nonsink' is the mean of about 100 patches per image")
    assert "'sink' the mean of 2.0 sink token(s)" in note and note.endswith("add nonsink_random to --groups.")
    assert nonsink_note(t[t.group == "sink"]) is None
