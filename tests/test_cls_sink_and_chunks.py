"""Issue 26's machinery on tiny models (fast): the CLS token as a model's declared sink (with a patch
rule for the analyses that mark sinks among patches), decoding the CLS token a ``full``-strategy
model feeds, training scenes drawn in varied render styles that a LLaVA processor's crop keeps
whole, ``--mixed-precision auto``, and the bookkeeping of training in chunks (ship or keep as the
candidate, the card's learning curve)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from sinkscope import load_model
from sinkscope._utils import resolve_precision
from sinkscope.evaluation import shapes as S
from sinkscope.interventions import default_rule
from sinkscope.models.real import MINI_LLAVA_SINK_RULE
from sinkscope.training import card as C
from sinkscope.training.examples import scene_image, vqa_examples


def _full(name: str = "tiny-llava+sinks"):
    """A tiny LLaVA that feeds CLS + patches and declares mini-llava's rule (as mini-llava does)."""
    ad = load_model(name)
    ad.model.config.vision_feature_select_strategy = "full"
    ad.declared_sink_rule = MINI_LLAVA_SINK_RULE
    return ad


# -- the CLS sink as the declared default ------------------------------------------------------


def test_a_declared_cls_rule_gives_way_to_the_patch_rule_where_an_analysis_marks_patches():
    ad = _full()
    rule, why = default_rule(ad)
    assert rule.spec() == "cls" and "CLS token" in why
    rule, why = default_rule(ad, cls=False)
    assert rule.spec() == "topk:4" and "for analyses that mark sinks among the patches" in why
    from sinkscope.flow.propagation import propagation

    prop = propagation(ad, [np.zeros((32, 32, 3), np.uint8)], "what is this ?")
    assert prop.summary["vit_rule"]["spec"] == "topk:4" and "among the patches" in prop.summary["vit_rule"]["reason"]
    assert int(prop.visual_tokens.is_vit_sink.sum()) == 4


def test_eval_feeds_cls_alone_as_sink_only_on_a_full_strategy_model():
    from sinkscope.data import ImageItem
    from sinkscope.evaluation.items import VQAItem
    from sinkscope.evaluation.run import evaluate

    ad = _full()
    img = ImageItem("a", "a", lambda: np.full((32, 32, 3), 120, np.uint8))
    items = [VQAItem("q", img, "what is this ?", "yes", "global", task="t", choices=("yes", "no"))]
    ev = evaluate(ad, items, variants=("both", "sink-only", "nonsink-only"), progress=False)
    from sinkscope.interventions import rule_from

    assert rule_from(ev.summary["interventions"]["rule"]).spec() == "cls"
    fed = ev.tokens_fed
    n_tokens = fed[fed.variant == "both"].vit_token.nunique()
    sink = fed[(fed.variant == "sink-only") & fed.llm_position.notna()]
    assert sink.vit_token.tolist() == [0]  # CLS alone
    non = fed[(fed.variant == "nonsink-only") & fed.llm_position.notna()]
    assert sorted(non.vit_token) == list(range(1, n_tokens))  # every patch, no CLS


def test_decode_marks_the_cls_token_a_full_strategy_model_feeds(tmp_path):
    from PIL import Image

    from sinkscope.flow.decoding import decode_rate

    for lab in ("a", "b"):
        (tmp_path / lab).mkdir()
        Image.fromarray(np.full((32, 32, 3), 60 if lab == "a" else 200, np.uint8)).save(tmp_path / lab / "x.png")
    from sinkscope.data import load_dataset

    ds = load_dataset(str(tmp_path))
    dec = decode_rate(_full(), ds, words={"a": ["a"], "b": ["b"]}, nonsinks_per_image=1, progress=False)
    assert dec.summary["sink_rule"]["spec"] == "cls"
    sinks = dec.per_token[dec.per_token.group == "sink"]
    assert len(sinks) == 2 and set(sinks.vit_token) == {0}  # one per image: its CLS
    assert (dec.per_token[dec.per_token.group == "nonsink"].vit_token > 0).all()
    # a model that drops CLS refuses the rule in one line
    with pytest.raises(Exception, match="names the CLS token"):
        decode_rate(load_model("tiny-llava+sinks"), ds, words={"a": ["a"]}, rule="cls", progress=False)


# -- training scenes in varied render styles ---------------------------------------------------


def test_the_plain_style_is_the_evaluation_renderer():
    sc = S.scene(5, "test")
    assert np.array_equal(np.asarray(S.render(sc)), np.asarray(S.render(sc, style=S.PLAIN)))
    styled = S.render(sc, style=S.RenderStyle(scale=1.5, aspect=1.25, jpeg=50, noise=8.0, texture="stripes"))
    assert styled.size == (420, 336)


def _crop_box(w: int, h: int) -> tuple[float, float, float, float]:
    """The part of a ``w`` x ``h`` image a 256 short-side resize + 224 centre crop keeps."""
    s = 256 / min(w, h)
    cw, ch = 224 / s, 224 / s
    return (w - cw) / 2, (h - ch) / 2, (w + cw) / 2, (h + ch) / 2


def test_every_style_keeps_every_shape_inside_the_processors_crop():
    """The answers are the scene's, so a style must not push a shape out of what the model sees."""
    for seed in range(400):
        st, sc = S.random_style(seed), S.scene(seed, "train")
        im = S.render(sc, style=st)
        w, h = im.size
        x0, y0, x1, y1 = _crop_box(w, h)
        side = round(S.SIZE * st.scale)
        ox, oy = (w - side) / 2, (h - side) / 2
        for shp in sc.shapes:
            r = shp.radius * st.radius * st.scale
            cx, cy = ox + shp.x * st.scale, oy + shp.y * st.scale
            assert x0 <= cx - r and cx + r <= x1 and y0 <= cy - r and cy + r <= y1, (seed, st, shp)


def test_a_styled_scene_keeps_its_colours_where_the_shapes_are():
    rng = random.Random(0)
    for seed in rng.sample(range(10_000), 40):
        st, sc = S.random_style(seed), S.scene(seed, "train")
        a = np.asarray(S.render(sc, style=st)).astype(int)
        side = round(S.SIZE * st.scale)
        ox, oy = (a.shape[1] - side) / 2, (a.shape[0] - side) / 2
        for shp in sc.shapes:
            px = a[int(oy + shp.y * st.scale), int(ox + shp.x * st.scale)]
            nearest = min(S.COLOURS, key=lambda c: sum((px - np.array(S.COLOURS[c])) ** 2))
            assert nearest == shp.colour, (seed, shp, px.tolist())


def test_training_examples_draw_styled_scenes_under_their_own_names():
    plain = vqa_examples(n_per_task=4, turns=8, real=())
    styled = vqa_examples(n_per_task=4, turns=8, real=(), styles=True)
    assert [e.turns for e in plain] == [e.turns for e in styled]  # the same questions
    names = [e.image.name for e in styled]
    assert sum(n.endswith("~styled") for n in names) > 0.6 * len(names)
    assert all(not e.image.name.endswith("~styled") for e in plain)
    assert scene_image(S.scene(1, "train"), styles=True).load().shape[2] == 3


def test_train_projector_records_styles_and_resolved_precision(tmp_path):
    from sinkscope.training import projector as P

    res = P.train_projector(load_model("tiny-llava"), out=tmp_path / "t", steps=2, batch_size=2, n_per_task=2, real=(),
                            styles=True, mixed_precision="auto", progress=False)  # fmt: skip
    assert res.summary["styles"] is True and res.summary["mixed_precision"] in ("no", "bf16")
    assert resolve_precision("auto") == res.summary["mixed_precision"]


# -- training in chunks: ship when validation went up, else keep the candidate ------------------


@pytest.fixture
def chunk_env(tmp_path, monkeypatch):
    weights = tmp_path / "weights"
    weights.mkdir()
    shipped, lora = weights / "p.safetensors", weights / "l.safetensors"
    shipped.write_bytes(b"old"), lora.write_bytes(b"oldl")
    card = weights / "card.json"
    card.write_text(json.dumps({"stage2_vqa": {"sequences_seen": 2400}, "fixed_subset": {"accuracy": 0.5}}))
    monkeypatch.setattr(C, "SHIPPED_PROJECTOR", shipped)
    monkeypatch.setattr(C, "SHIPPED_LORA", lora)
    monkeypatch.setattr(C, "CANDIDATE_PROJECTOR", weights / "cp.safetensors")
    monkeypatch.setattr(C, "CANDIDATE_LORA", weights / "cl.safetensors")
    monkeypatch.setattr(C, "CARD", card)
    scores = {}

    def fake_scores(projector, lora, out, progress=True):
        return scores[open(projector, "rb").read()]

    class _Res:
        import pandas as pd

        predictions = pd.DataFrame({"correct": [True, False, True, True]})

    monkeypatch.setattr(C, "validation_scores", fake_scores)
    monkeypatch.setattr(C, "build_mini_llava", lambda **k: None)
    monkeypatch.setattr(C, "evaluate", lambda *a, **k: _Res())
    return tmp_path, scores


def _run(root, name: str, weights: bytes, seen: int):
    run = root / "runs" / name
    run.mkdir(parents=True)
    (run / "projector.safetensors").write_bytes(weights)
    (run / "lora.safetensors").write_bytes(weights + b"l")
    (run / "config.json").write_text(json.dumps({"lora_lr": 2e-4}))
    (run / "summary.json").write_text(json.dumps({"init": "x/p.safetensors", "steps": 10, "batch_size": 4, "lr": 1e-3,
                                                  "seed": 1, "final_loss": 0.4, "styles": True}))  # fmt: skip
    (run / "train_log.jsonl").write_text("".join(json.dumps({"step": i + 1, "seen": 4 * (i + 1), "s": 2.0 * (i + 1)}) + "\n"
                                                 for i in range(seen // 4)))  # fmt: skip
    return run


def test_a_chunk_ships_only_when_validation_went_up_and_the_curve_keeps_every_chunk(chunk_env):
    root, scores = chunk_env
    scores[b"old"] = {"global": 0.5, "local": 0.4, "mixed": 0.5, "all": 0.47, "n": 160}
    scores[b"c1"] = {"global": 0.6, "local": 0.3, "mixed": 0.5, "all": 0.49, "n": 160}  # local fell: no
    rec = C.add_chunk(_run(root, "c1", b"c1", 40), progress=False)
    assert rec["shipped"] is False and C.SHIPPED_PROJECTOR.read_bytes() == b"old"
    assert C.CANDIDATE_PROJECTOR.read_bytes() == b"c1" and C.start_weights()[2] == "candidate"
    scores[b"c2"] = {"global": 0.6, "local": 0.45, "mixed": 0.55, "all": 0.53, "n": 160}
    rec = C.add_chunk(_run(root, "c2", b"c2", 80), progress=False)
    assert rec["shipped"] is True and C.SHIPPED_PROJECTOR.read_bytes() == b"c2" and C.SHIPPED_LORA.read_bytes() == b"c2l"
    assert not C.CANDIDATE_PROJECTOR.exists() and C.start_weights()[2] == "shipped"
    card = json.loads(C.CARD.read_text())
    curve = card["learning_curve_chunks"]
    assert [c["chunk"] for c in curve] == [0, 1, 2] and [c["shipped"] for c in curve] == [True, False, True]
    assert [c["conversations_total"] for c in curve] == [2400, 2440, 2520]
    assert curve[2]["train_seconds"] == 40.0 and curve[0]["validation"]["all"] == 0.47
    assert card["fixed_subset"]["accuracy"] == 0.75 and card["fixed_subset"]["weights_of_chunk"] == 2
