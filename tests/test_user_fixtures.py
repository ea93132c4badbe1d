"""Every command on checkpoints saved by plain ``transformers`` (``tests/checkpoints_user.py``), from
the command line, with the known answers of issue 25:

- every weight of the file lands where plain transformers puts it (an untied LM head included);
- a DIYSink model built from an untied LLaVA keeps that head: in ``base`` routing it gives the
  original model's logits, and ``eval --variant dual`` on the identity init answers as
  ``--variant sinks-front`` on the original;
- commands that need a LLaVA refuse a bare vision tower in one line (exit 2).
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import transformers as T
from PIL import Image
from safetensors import safe_open

from sinkscope import load_model
from sinkscope.cli import main
from sinkscope.diysink import routing

from . import checkpoints_user as U

#: plain transformers' renaming of LLaVA's legacy keys (``save_pretrained`` writes the legacy layout)
LEGACY = (
    ("language_model.lm_head.", "lm_head."),
    ("language_model.model.", "model.language_model."),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
)


def _file(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _renamed(key: str) -> str:
    for old, new in LEGACY:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("user")
    out = {"llava-untied": U.llava(d / "llava-untied"), "llava-tied": U.llava(d / "llava-tied", tied=True)}
    out.update({name: make(d / name) for name, make in U.VISION_TOWERS.items()})
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray((rng.random((40, 48, 3)) * 255).astype(np.uint8)).save(d / f"im{i}.png")
    return str(d)


def test_the_fixtures_are_what_users_have(ckpts):
    """Untied: the file holds its own LM head under the legacy key; tied: no head in the file."""
    untied, tied = _file(ckpts["llava-untied"]), _file(ckpts["llava-tied"])
    assert "language_model.lm_head.weight" in untied and "lm_head.weight" not in untied
    assert not torch.equal(untied["language_model.lm_head.weight"], untied["language_model.model.embed_tokens.weight"])
    assert not any("lm_head" in k for k in tied)
    bias = _file(ckpts["clip-prenorm-bias"])["pre_layrnorm.bias"]
    assert bias.abs().min() > 0  # a trained tower's pre-norm bias is not 0


PLAIN = {"llava-untied": T.LlavaForConditionalGeneration, "llava-tied": T.LlavaForConditionalGeneration,
         "clip-prenorm-bias": T.CLIPVisionModel, "dinov2-registers": T.Dinov2WithRegistersModel, "siglip": T.SiglipVisionModel}  # fmt: skip


@pytest.mark.parametrize("kind", list(PLAIN))
def test_every_weight_of_the_file_lands(ckpts, kind):
    """sinkscope's model holds exactly plain transformers' weights, and plain transformers left none
    of its own at random; for LLaVA each legacy key of the file is checked by hand too."""
    sd = load_model(str(ckpts[kind])).model.state_dict()
    plain, info = PLAIN[kind].from_pretrained(str(ckpts[kind]), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    want = plain.state_dict()
    assert set(sd) == set(want)
    assert all(torch.equal(sd[k], want[k]) for k in want)
    if kind.startswith("llava"):
        file = {_renamed(k): v for k, v in _file(ckpts[kind]).items()}
        assert all(torch.equal(sd[k], v) for k, v in file.items())
        if kind == "llava-untied":
            assert set(sd) == set(file)  # nothing of the model left out of the file (initialised at random)
        else:  # the head is the input embedding, as transformers ties it
            assert set(sd) - set(file) == {"lm_head.weight"}
            assert torch.equal(sd["lm_head.weight"], file["model.language_model.embed_tokens.weight"])


def test_a_checkpoint_missing_its_head_is_refused_in_one_line(ckpts, tmp_path):
    import shutil

    from safetensors.torch import save_file

    from sinkscope._utils import SinkscopeError

    bad = tmp_path / "no-head"
    shutil.copytree(ckpts["llava-untied"], bad)
    sd = _file(bad)
    sd.pop("language_model.lm_head.weight")
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(SinkscopeError, match=r"1 weight\(s\) not in the file \(would be random\): lm_head.weight"):
        load_model(str(bad))


def _inputs(ad, image):
    inp = ad.build_inputs([image], "<image> what is the colour of the background ?")
    return {k: inp[k] for k in ("input_ids", "attention_mask", "pixel_values")}


@pytest.mark.parametrize("kind", ["llava-untied", "llava-tied"])
def test_diysink_init_keeps_the_lm_head_of_a_user_llava(ckpts, images, tmp_path, kind):
    """Issue 25.1: on main the untied head was newly initialised (base-routing logits 0.62 away)."""
    d = tmp_path / "dual"
    assert main(["diysink", "init", "--model", str(ckpts[kind]), "--sink-rule", "topk:3", "--out", str(d), "-q"]) == 0
    ad = load_model(str(d))
    sd = ad.model.state_dict()
    for k, v in _file(ckpts[kind]).items():
        k = _renamed(k)
        if ".multi_modal_projector." in f".{k}":  # the projector's weights are now f_sink, f_nonsink and base
            for part in ("f_sink", "f_nonsink", "base"):
                assert torch.equal(sd[k.replace("multi_modal_projector.", f"multi_modal_projector.{part}.")], v), k
        else:
            assert torch.equal(sd[k], v), k
    plain = T.LlavaForConditionalGeneration.from_pretrained(str(ckpts[kind])).eval()
    img = np.asarray(Image.open(f"{images}/im0.png").convert("RGB"))
    inp = _inputs(ad, img)
    with torch.no_grad(), routing(ad, mode="base"):
        got = ad.model(**inp).logits
    with torch.no_grad():
        want = plain(**inp).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_eval_dual_on_the_identity_init_answers_as_sinks_front_on_the_original(ckpts, tmp_path):
    src, d = str(ckpts["llava-untied"]), str(tmp_path / "dual")
    assert main(["diysink", "init", "--model", src, "--sink-rule", "topk:3", "--out", d, "-q"]) == 0
    common = ["--tasks", "shapes", "--limit", "12", "--sink-rule", "topk:3", "-q"]
    assert main(["eval", "--model", src, "--variant", "sinks-front", "--out", str(tmp_path / "a"), *common]) == 0
    assert main(["eval", "--model", d, "--variant", "dual", "--out", str(tmp_path / "b"), *common]) == 0

    def preds(run):
        rows = [json.loads(x) for x in (tmp_path / run / "predictions.jsonl").read_text().splitlines()]
        return {r["id"]: (r["prediction"], r["scores"]) for r in rows}

    a, b = preds("a"), preds("b")
    assert len(a) == 12 and a.keys() == b.keys()
    for k, (pa, sa) in a.items():
        assert b[k][0] == pa and b[k][1].keys() == sa.keys(), k
        np.testing.assert_allclose([b[k][1][c] for c in sa], list(sa.values()), atol=1e-4)
    assert len({p for p, _ in a.values()}) > 1  # the answers depend on the item (not one tie broken alike)


def _run(argv) -> int:
    return main([*argv, "-q"])


@pytest.mark.parametrize("kind", ["llava-untied", "llava-tied"])
def test_every_command_on_a_user_llava(ckpts, images, tmp_path, kind):
    m = str(ckpts[kind])
    out = lambda name: str(tmp_path / name)  # noqa: E731
    assert _run(["scan", "--model", m, "--images", images, "--method", "all", "--out", out("scan")]) == 0
    assert pd.read_parquet(tmp_path / "scan" / "tokens.parquet").layer.max() == 4
    assert _run(["probe", "--model", m, "--dataset", "lfw-faces", "--max-images", "12", "--folds", "2", "--out", out("probe")]) == 0
    flow = ["flow", "--model", m, "--images", f"{images}/im0.png", "--prompt", "what is this ?", "--attribution-steps", "4"]
    assert _run([*flow, "--variant", "sinks-front", "--out", out("flow")]) == 0
    for name in ("rollout.csv", "visual_tokens.parquet", "knockout.csv", "decode.csv", "attribution.csv", "attention_by_variant.csv"):
        assert (tmp_path / "flow" / name).exists(), name
    assert _run(["decode", "--model", m, "--dataset", "lfw-faces", "--max-images", "2", "--out", out("decode")]) == 0
    variants = "default,no-image,both,sinks-front,sinks-end,sink-only,nonsink-only,random-k,lowest-norm-k,var,tt-register"
    # a random tower has no sink to find register neurons by: name two (the refusal is tested below)
    ev = ["eval", "--model", m, "--tasks", "shapes", "--limit", "2", "--sink-rule", "topk:2", "--tt-neurons", "1:0,2:5", "--variant", variants]
    assert _run([*ev, "--out", out("eval")]) == 0
    res = pd.read_csv(tmp_path / "eval" / "results.csv")
    assert set(variants.split(",")) <= set(res.variant)
    train = ["--steps", "2", "--n-per-task", "2", "--no-real", "--batch-size", "2"]
    assert _run(["train-projector", "--model", m, "--stage", "vqa", *train, "--out", out("proj")]) == 0
    d = out("dual")
    assert _run(["diysink", "init", "--model", m, "--sink-rule", "topk:2", "--out", d]) == 0
    assert _run(["diysink", "train", "--model", d, "--stage", "1", *train, "--out", out("s1")]) == 0
    assert _run(["diysink", "train", "--model", out("s1"), "--stage", "2", *train, "--lora-rank", "2", "--out", out("s2")]) == 0
    router = ["--samples", "6", "--epochs", "1", "--batch-size", "3"]
    assert _run(["diysink", "train", "--model", out("s2"), "--stage", "router", *router, "--out", out("r")]) == 0
    dual = "baseline,dual,dual-sink-only,dual-nonsink-only,cot,cot-score,rew"
    assert _run(["eval", "--model", out("r"), "--tasks", "shapes", "--limit", "2", "--variant", dual, "--out", out("eval2")]) == 0
    assert set(dual.split(",")) <= set(pd.read_csv(tmp_path / "eval2" / "results.csv").variant)
    # the trained model still holds every weight it saved (the head of an untied LLM included)
    s2 = load_model(out("s2")).model.state_dict()
    saved = {_renamed(k): v for k, v in _file(tmp_path / "s2" / "model").items()}
    assert all(torch.equal(s2[k], v) for k, v in saved.items())


@pytest.mark.parametrize("kind", list(U.VISION_TOWERS))
def test_every_command_on_a_user_vision_tower(ckpts, images, tmp_path, kind, capsys):
    m = str(ckpts[kind])
    out = lambda name: str(tmp_path / name)  # noqa: E731
    assert _run(["scan", "--model", m, "--images", images, "--method", "all", "--out", out("scan")]) == 0
    tokens = pd.read_parquet(tmp_path / "scan" / "tokens.parquet")
    assert tokens.token.nunique() == {"clip-prenorm-bias": 17, "dinov2-registers": 21, "siglip": 16}[kind]
    assert _run(["probe", "--model", m, "--dataset", "lfw-faces", "--max-images", "12", "--folds", "2", "--out", out("probe")]) == 0
    assert _run(["flow", "--model", m, "--images", images, "--out", out("flow")]) == 0
    assert (tmp_path / "flow" / "rollout.csv").exists()
    capsys.readouterr()
    # the commands that need a LLaVA say so in one line naming the model, and write nothing
    for argv in (
        ["eval", "--model", m, "--tasks", "shapes", "--limit", "2", "--out", out("e")],
        ["diysink", "init", "--model", m, "--out", out("d")],
        ["train-projector", "--model", m, "--steps", "1", "--out", out("t")],
        ["decode", "--model", m, "--max-images", "2", "--out", out("c")],
    ):
        assert _run(argv) in (1, 2), argv[0]
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and m in err and "Traceback" not in err, (argv[0], err)
        assert not any(p.is_file() for p in (tmp_path / argv[-1].rsplit("/", 1)[-1]).rglob("*")), argv[0]
