"""Projector training (issue 12): examples and labels, the feature cache, the loss going down,
kill and resume, the config / CLI round trip."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from sinkscope import load_model
from sinkscope._utils import SinkscopeError
from sinkscope.training import projector as P
from sinkscope.training.examples import IGNORE, Example, encode, vqa_examples
from sinkscope.training.features import FeatureCache, tower_features


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llava")


def test_labels_cover_the_answers_only(tiny):
    ex = vqa_examples(n_per_task=2, turns=3, real=())[0]
    ids, labels = encode(tiny, ex, n_image_tokens=7)
    assert (ids == tiny.image_token_id).sum() == 7 and len(ids) == len(labels)
    trained = [int(t) for t, lab in zip(ids, labels) if lab != IGNORE]
    want = [t for _, a in ex.turns for t in tiny.tokenizer(a, add_special_tokens=False).input_ids]
    # each answer's tokens in order, each followed by the first token of what ends its turn (this
    # tokenizer has no chat template: the turn ends with a newline, which it may drop)
    end = tiny.tokenizer("\n", add_special_tokens=False).input_ids[:1]
    expect = [t for _, a in ex.turns for t in tiny.tokenizer(a, add_special_tokens=False).input_ids + end]
    assert trained == expect and len(want) <= len(trained)


def test_cached_features_equal_the_tower(tiny, tmp_path):
    ex = vqa_examples(n_per_task=1, turns=1, real=())[:3]
    cache = FeatureCache(tiny, tmp_path / "c", shard_size=2)
    assert cache.ensure([e.image for e in ex], progress=False) == 3
    assert cache.ensure([e.image for e in ex], progress=False) == 0  # nothing twice
    again = FeatureCache(tiny, tmp_path / "c")  # read back from disk
    direct = tower_features(tiny, [e.image.load() for e in ex])
    for e, d in zip(ex, direct):
        torch.testing.assert_close(again.get(e.image.name), d)


def _loss(ad, exs, proj_state=None):
    if proj_state is not None:
        ad.model.model.multi_modal_projector.load_state_dict(proj_state)
    feats = tower_features(ad, [e.image.load() for e in exs])
    batch = [(*encode(ad, e, f.shape[0]), f) for e, f in zip(exs, feats)]
    with torch.no_grad():
        return float(P._step_loss(ad.model, ad.model.model.multi_modal_projector, batch, ad.image_token_id))


def test_a_few_steps_lower_the_loss(tmp_path):
    ad = load_model("tiny-llava")
    exs = P._examples("vqa", 4, 4, (), 0)[:8]
    before = _loss(ad, exs)
    res = P.train_projector(
        ad, out=tmp_path / "t", steps=12, batch_size=4, n_per_task=4, real=(), lr=1e-2, progress=False
    )
    after = _loss(ad, exs, load_file(str(tmp_path / "t" / "projector.safetensors")))
    assert after < before - 0.05, (before, after)
    assert res.summary["steps"] == 12 and len(res.log) == 12


@pytest.mark.parametrize("lora_rank", [None, 2])
def test_a_killed_run_resumes_to_the_same_weights(tmp_path, monkeypatch, lora_rank):
    kw = dict(steps=6, batch_size=2, n_per_task=2, real=(), lr=1e-2, save_every=2, progress=False)
    kw.update(lora_rank=lora_rank, lora_lr=1e-2)
    P.train_projector(load_model("tiny-llava"), out=tmp_path / "full", **kw)
    real = P._step_loss
    calls = []

    def dying(*a, **k):
        if len(calls) == 3:  # killed during step 4: steps 1-2 are checkpointed, step 3 is lost
            raise KeyboardInterrupt
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(P, "_step_loss", dying)
    with pytest.raises(KeyboardInterrupt):
        P.train_projector(load_model("tiny-llava"), out=tmp_path / "cut", **kw)
    monkeypatch.setattr(P, "_step_loss", real)
    with pytest.raises(Exception, match="resume"):
        P.train_projector(load_model("tiny-llava"), out=tmp_path / "cut", **kw)
    P.train_projector(load_model("tiny-llava"), out=tmp_path / "cut", resume=True, **kw)
    files = ["projector.safetensors"] + (["lora.safetensors"] if lora_rank else [])
    for name in files:
        a, b = load_file(str(tmp_path / "full" / name)), load_file(str(tmp_path / "cut" / name))
        assert a.keys() == b.keys() and len(a) > 0
        for k in a:
            torch.testing.assert_close(a[k], b[k])
    if lora_rank:  # the adapters did train (lora_B starts at zero)
        assert any(float(v.abs().max()) > 0 for k, v in a.items() if "lora_B" in k)
    steps = [json.loads(x)["step"] for x in (tmp_path / "cut" / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # the lost step 3 logged once


def test_stop_after_then_resume_equals_one_run(tmp_path):
    """A time-boxed run (``stop_after``) writes that step's weights; resumed to the end, it equals an
    uninterrupted run (the schedule is the ``steps``-step one throughout)."""
    kw = dict(steps=4, batch_size=2, n_per_task=2, real=(), lr=1e-2, save_every=10, progress=False)
    P.train_projector(load_model("tiny-llava"), out=tmp_path / "full", **kw)
    part = P.train_projector(load_model("tiny-llava"), out=tmp_path / "cut", stop_after=2, **kw)
    assert part.summary["stopped_at"] == 2 and [r["step"] for r in part.log] == [1, 2]
    P.train_projector(load_model("tiny-llava"), out=tmp_path / "cut", resume=True, **kw)
    a = load_file(str(tmp_path / "full" / "projector.safetensors"))
    b = load_file(str(tmp_path / "cut" / "projector.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def test_lora_with_bf16_autocast_lowers_the_loss_and_merges_into_the_llm(tmp_path):
    """Stage 2 with LoRA adapters under bf16 autocast: the loss goes down, and the saved adapters
    merged into a fresh model's linear weights (merge_lora) give the trained model's outputs."""
    from sinkscope.models.mini_llava import merge_lora

    ad = load_model("tiny-llava")
    exs = P._examples("vqa", 4, 4, (), 0)[:8]
    before = _loss(ad, exs)
    res = P.train_projector(
        ad, out=tmp_path / "t", steps=12, batch_size=4, n_per_task=4, real=(), lr=1e-2,
        lora_rank=4, lora_lr=1e-2, mixed_precision="bf16", progress=False,
    )  # fmt: skip
    assert res.summary["lora"]["rank"] == 4 and res.summary["mixed_precision"] == "bf16"
    trained = _loss(ad, exs)  # ad now holds the trained projector and the live peft adapters
    assert trained < before - 0.05, (before, trained)
    fresh = load_model("tiny-llava")
    n = merge_lora(fresh.model.model.language_model, tmp_path / "t" / "lora.safetensors")
    assert n == 7 * fresh.llm.n_layers  # every attention and MLP projection of every layer
    merged = _loss(fresh, exs, load_file(str(tmp_path / "t" / "projector.safetensors")))
    assert abs(merged - trained) < 1e-4, (merged, trained)
    assert not any("lora" in k for k in fresh.model.state_dict())  # a plain transformers model again


def test_init_lora_goes_on_from_a_finished_run(tmp_path):
    """``init`` + ``init_lora`` start a new run at a finished run's weights: the first step's loss
    equals the finished model's loss on the same batch (and differs from a fresh start's);
    a rank that does not match the file fails in one line."""
    kw = dict(batch_size=4, n_per_task=4, real=(), lr=1e-2, lora_lr=1e-2, progress=False, save_every=10)
    P.train_projector(load_model("tiny-llava"), out=tmp_path / "a", steps=6, lora_rank=4, **kw)
    a = tmp_path / "a"
    go_on = P.train_projector(
        load_model("tiny-llava"), out=tmp_path / "b", steps=1, init=a / "projector.safetensors",
        init_lora=a / "lora.safetensors", seed=1, **kw,
    )  # fmt: skip
    assert go_on.summary["lora"]["rank"] == 4  # taken from the file
    fresh = P.train_projector(load_model("tiny-llava"), out=tmp_path / "c", steps=1, lora_rank=4, seed=1, **kw)
    from sinkscope.models.mini_llava import merge_lora

    done = load_model("tiny-llava")
    merge_lora(done.model.model.language_model, a / "lora.safetensors")
    order = torch.randperm(len(P._examples("vqa", 4, 4, (), 1)), generator=torch.Generator().manual_seed(1))
    exs = [P._examples("vqa", 4, 4, (), 1)[i] for i in order[:4].tolist()]
    want = _loss(done, exs, load_file(str(a / "projector.safetensors")))
    assert abs(go_on.log[0]["loss"] - want) < 1e-3, (go_on.log[0]["loss"], want)
    assert abs(fresh.log[0]["loss"] - want) > 1e-2
    from sinkscope.config import TrainProjectorConfig

    for name in ("init", "init_lora"):  # a missing start file fails in the config, before any folder
        with pytest.raises(SinkscopeError, match=f"{name}: no file"):
            TrainProjectorConfig(model="tiny-llava", out=str(tmp_path / "e"), **{name: str(tmp_path / "missing")})
    assert not (tmp_path / "e").exists()
    with pytest.raises(SinkscopeError, match="rank 4 in the file, 8 asked"):
        P.train_projector(
            load_model("tiny-llava"), out=tmp_path / "d", steps=1, init_lora=a / "lora.safetensors", lora_rank=8, **kw
        )


def test_config_cli_round_trip(tmp_path):
    from sinkscope import load_run  # noqa: F401  (training runs are read back by their files)
    from sinkscope.cli import main
    from sinkscope.config import RunConfig, TrainProjectorConfig

    out = tmp_path / "cli"
    argv = [
        "train-projector",
        "--model",
        "tiny-llava",
        "--steps",
        "2",
        "--n-per-task",
        "2",
        "--no-real",
        "-q",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    cfg = RunConfig.load(out / "config.json")
    assert cfg == TrainProjectorConfig(model="tiny-llava", steps=2, n_per_task=2, real=(), out=str(out))
    assert main([*argv[:-2], "--out", str(out)]) == 2  # its earlier run: refused without --resume (a usage error, issue 28)
    with pytest.raises(Exception, match="stage: one of"):
        TrainProjectorConfig(stage="finetune")
    assert isinstance(Example("k", None, ()), Example)
