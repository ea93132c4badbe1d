"""Issue 28, sections 3-5: every input below gets one line on stderr naming the option or the
input, the expected exit status, never a traceback; the inputs that can be refused without the
model are refused before it loads (the loader is made to fail), and nothing is written into --out.
Silent wrong answers (ties decided by list order, nested interventions, duplicate choices) are
either refused or said in the record and in summary.json."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from sinkscope._utils import SinkscopeError
from sinkscope.cli import main


class _Loaded(Exception):
    pass


@pytest.fixture()
def no_model(monkeypatch):
    """Any model load fails loudly: a case that passes refused its input before loading one."""

    def boom(*a, **k):
        raise _Loaded("a model was loaded")

    import sinkscope.evaluation.run as er
    import sinkscope.training.diysink as td
    import sinkscope.training.projector as tp

    for mod in (er, tp, td):
        monkeypatch.setattr(mod, "load_model", boom)


@pytest.fixture()
def files(tmp_path, monkeypatch):
    """Manifests, weight files and routers, good and bad, in ``tmp_path`` (the working folder)."""
    import torch
    from safetensors.torch import save_file

    from sinkscope.diysink.routers import ReWRouter

    monkeypatch.chdir(tmp_path)
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save("red.png")
    row = {"image": "red.png", "question": "Colour?", "answer": "red", "task_type": "global"}
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    (tmp_path / "header.csv").write_text("image,question,answer,task_type\n")
    (tmp_path / "notobj.jsonl").write_text(json.dumps(row) + "\n[1, 2]\n")
    (tmp_path / "number.jsonl").write_text("42\n")
    (tmp_path / "dup.jsonl").write_text(json.dumps({**row, "choices": ["red", "blue", "red"]}) + "\n")
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    save_file(
        {"linear_1.weight": torch.zeros(3, 3)}, str(tmp_path / "other.safetensors"), metadata={"rank": "4"}
    )
    (tmp_path / "notafolder.txt").write_text("keep")
    ReWRouter(dim=384).save(tmp_path / "router_ok")
    ReWRouter(dim=8).save(tmp_path / "router_dim")
    ReWRouter(dim=384).save(tmp_path / "router_corrupt")
    (tmp_path / "router_corrupt" / "router.safetensors").write_bytes(b"xx")
    ReWRouter(dim=384).save(tmp_path / "router_json")
    (tmp_path / "router_json" / "router.json").write_text("[1, 2]")
    return tmp_path


def _one_line(capsys, *words) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("sinkscope"), err
    for w in words:
        assert w in err, err
    return err


# (argv, exit status, words the one line must hold); every case refuses before a model loads
BEFORE_MODEL = [
    (["eval", "--tasks", "empty.jsonl"], 1, ["empty.jsonl", "no rows"]),
    (["eval", "--tasks", "blank.jsonl"], 1, ["blank.jsonl", "no rows"]),
    (["eval", "--tasks", "header.csv"], 1, ["header.csv", "no rows"]),
    (["eval", "--tasks", "notobj.jsonl"], 1, ["notobj.jsonl, line 2", "expected a JSON object"]),
    (["eval", "--tasks", "number.jsonl"], 1, ["number.jsonl, line 1", "expected a JSON object"]),
    (["eval", "--tasks", "dup.jsonl"], 1, ["dup.jsonl, row 1", "choice 'red' appears more than once"]),
    (["eval", "--tasks", "shapes,shapes"], 2, ["tasks", "'shapes' is given twice"]),
    (["eval", "--tasks", "shapes,dup.jsonl,shapes"], 2, ["'shapes' is given twice"]),
    (["eval", "--router", "router_ok"], 2, ["router: only --variant rew uses a router", "variants: default"]),
    (["eval", "--router", "router_ok", "--variant", "default,both"], 2, ["variants: default, both"]),
    (["train-projector", "--init", "corrupt.safetensors"], 1, ["--init corrupt.safetensors", "not a readable"]),
    (["train-projector", "--init-lora", "corrupt.safetensors"], 1, ["--init-lora corrupt.safetensors", "not a readable"]),
    (["train-projector", "--snapshot-every", "0"], 2, ["snapshot_every", "got 0"]),
    (["train-projector", "--snapshot-every", "-3"], 2, ["snapshot_every", "got -3"]),
    (["train-projector", "--steps", "2", "--stop-after", "5"], 2, ["stop_after", "past the end of the 2-step"]),
    (["diysink", "train", "--model", "tiny-llava", "--stage", "router", "--encoder", "./no-such-encoder"], 1,
     ["--encoder ./no-such-encoder", "no such folder"]),
    (["diysink", "train", "--model", "tiny-llava", "--stage", "router", "--encoder", "notafolder.txt"], 1,
     ["--encoder notafolder.txt", "not a model folder"]),
]  # fmt: skip


@pytest.mark.parametrize("argv,status,words", BEFORE_MODEL, ids=[" ".join(c[0]) for c in BEFORE_MODEL])
def test_refused_before_any_model_loads(files, no_model, capsys, argv, status, words):
    out = files / "out"
    assert main([*argv, "--model", "tiny-llava", "--out", str(out), "-q"] if argv[0] != "diysink"
                else [*argv, "--out", str(out), "-q"]) == status  # fmt: skip
    _one_line(capsys, *words)
    assert not out.exists()


# cases that need the model's sizes: refused after it loads, before any question is answered
AFTER_MODEL = [
    (["eval", "--variant", "var", "--var", "sink_dims=99999"], ["VAR sink_dims 99999", "64 dimensions"]),
    (["eval", "--variant", "var", "--var", "sink_dims=3+64"], ["VAR sink_dims 64"]),
    (["eval", "--variant", "both", "--sink-rule", "attention:2@4"], ["sink rule 'attention:2@4'", "blocks 0 .. 3"]),
    (["eval", "--variant", "sink-only,both", "--sink-rule", "topk:9999"],
     ["sink rule 'topk:9999'", "16 visual tokens", "every token would be a sink"]),
    (["eval", "--variant", "sink-only", "--sink-rule", "topk:16"], ["sink rule 'topk:16'", "use k < 16"]),
    (["train-projector", "--init", "other.safetensors"], ["--init other.safetensors", "not a projector of this model"]),
]  # fmt: skip


@pytest.mark.parametrize("argv,words", AFTER_MODEL, ids=[" ".join(c[0]) for c in AFTER_MODEL])
def test_refused_after_the_model_loads_before_any_answer(files, capsys, argv, words):
    out = files / "out"
    extra = ["--limit", "2"] if argv[0] == "eval" else ["--steps", "1", "--no-real", "--n-per-task", "2"]
    assert main([*argv, *extra, "--model", "tiny-llava", "--out", str(out), "-q"]) == 1
    _one_line(capsys, *words)
    assert not (out / "predictions.jsonl").exists() and not (out / "projector.safetensors").exists()


def test_topk_below_the_fed_tokens_still_runs(files, capsys):
    """The refusal is exact: topk:15 leaves one non-sink of the 16 fed tokens, and runs."""
    out = files / "out"
    assert main(["eval", "--variant", "nonsink-only", "--sink-rule", "topk:15", "--limit", "1",
                 "--model", "tiny-llava", "--out", str(out), "-q"]) == 0  # fmt: skip
    rec = json.loads((out / "predictions.jsonl").read_text().splitlines()[0])
    assert rec["n_sinks"] == 15 and rec["n_visual_fed"] == 1


def test_an_init_lora_of_other_shapes_is_one_line(files, capsys):
    import torch
    from safetensors.torch import load_file, save_file

    import sinkscope.models

    lora = os.path.join(os.path.dirname(sinkscope.models.__file__), "weights", "mini_llava_lora.safetensors")
    key = next(iter(load_file(lora)))
    save_file({key: torch.zeros(2, 2)}, "lora_shape.safetensors", metadata={"rank": "16"})
    argv = ["train-projector", "--init-lora", "lora_shape.safetensors", "--steps", "1", "--no-real",
            "--n-per-task", "2", "--model", "tiny-llava", "--out", "out", "-q"]  # fmt: skip
    assert main(argv) == 1
    _one_line(capsys, "--init-lora lora_shape.safetensors", "LoRA weights do not fit", "size mismatch")


@pytest.fixture(scope="module")
def dual(tmp_path_factory):
    out = tmp_path_factory.mktemp("dual") / "d"
    assert main(["diysink", "init", "--model", "tiny-llava", "--out", str(out), "-q"]) == 0
    return out


@pytest.mark.parametrize(
    "router,words",
    [
        ("router_dim", ["takes 8-dimensional questions", "gives 384"]),
        ("router_corrupt", ["router_corrupt/router.safetensors", "does not fit"]),
        ("router_json", ["router_json/router.json", "expected a JSON object, got list"]),
    ],
)
def test_a_corrupt_or_mismatched_router_is_one_line(files, dual, capsys, router, words):
    out = files / "out"
    argv = [
        "eval",
        "--model",
        str(dual),
        "--variant",
        "rew",
        "--router",
        router,
        "--limit",
        "1",
        "--out",
        str(out),
        "-q",
    ]
    assert main(argv) == 1
    _one_line(capsys, *words)
    assert not (out / "predictions.jsonl").exists()


def test_report_onto_a_file_or_into_a_read_only_folder(files, capsys, monkeypatch):
    (files / "run").mkdir()
    assert main(["report", "run", "--out", "notafolder.txt/report.html"]) == 2
    _one_line(capsys, "notafolder.txt is a file, not a folder")
    assert main(["report", "run", "--out", "notafolder.txt"]) == 2
    _one_line(capsys, "--out notafolder.txt exists and is not a sinkscope report")
    assert (files / "notafolder.txt").read_text() == "keep"
    ro = files / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(ro) else real(p, mode))
    assert main(["report", "run", "--out", str(ro / "r.html")]) == 2
    _one_line(capsys, f"{ro} is not writable")
    assert list(ro.iterdir()) == []


@pytest.mark.parametrize("out", ["notafolder.txt", "notafolder.txt/figs"])
def test_figures_onto_a_file(files, capsys, out):
    assert main(["figures", "--only", "dinov2-norms", "--no-png", "--out", out]) == 2
    _one_line(capsys, "--out", "notafolder.txt is a file, not a folder")
    assert (files / "notafolder.txt").read_text() == "keep"


def test_figures_into_a_read_only_folder(files, capsys, monkeypatch):
    ro = files / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(ro) else real(p, mode))
    assert main(["figures", "--only", "dinov2-norms", "--no-png", "--out", str(ro / "figs")]) == 2
    _one_line(capsys, f"{ro} is not writable")
    assert list(ro.iterdir()) == []


def test_figures_options_are_not_abbreviated(capsys):
    from sinkscope.figures.cli import build_parser

    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["--for"])  # was read as --force
    assert e.value.code == 2 and "unrecognized arguments: --for" in capsys.readouterr().err


def test_an_eval_run_without_predictions_reads_back_as_one_line(files):
    from sinkscope.evaluation.run import load_eval

    out = files / "ev"
    assert main(["eval", "--model", "tiny-llava", "--limit", "1", "--out", str(out), "-q"]) == 0
    (out / "predictions.jsonl").unlink()
    with pytest.raises(SinkscopeError, match=r"eval run .*ev: predictions\.jsonl is missing"):
        load_eval(out)


def test_nested_interventions_are_refused_and_the_outer_still_works():
    """The outer hook rewrites the image away, so an inner one would be ignored (23 tokens fed
    instead of 8): refused in one line, and the outer intervention is intact afterwards."""
    from sinkscope import load_model
    from sinkscope.interventions import TokenIntervention, intervene

    ad = load_model("tiny-llava")
    inp = ad.build_inputs([np.zeros((32, 32, 3), np.uint8)], "<image> What is in the picture?")
    call = {k: inp[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    with intervene(ad, TokenIntervention("nonsink-only", rule="topk:3")) as iv:
        with pytest.raises(SinkscopeError, match="do not nest") as e:
            with intervene(ad, TokenIntervention("sink-only", rule="topk:3")):
                pass
        assert len(str(e.value).splitlines()) == 1
        n = ad.model(**call).logits.shape[1]
    assert n == call["input_ids"].shape[1] - 3 and len(iv.fed) == 1
    assert not ad.model._forward_pre_hooks and "generate" not in vars(ad.model)
    assert "_sinkscope_intervention" not in vars(ad.model)
    with intervene(ad, TokenIntervention("sink-only", rule="topk:3")) as again:  # usable once more
        assert ad.model(**call).logits.shape[1] == call["input_ids"].shape[1] - 13
    assert len(again.fed) == 1


def test_ties_are_recorded_and_counted(files, monkeypatch):
    """Equal top scores: the first tied choice is taken, the record says ``tie`` and summary.json
    counts the tied questions per variant."""
    import sinkscope.evaluation.run as er

    calls = []

    def scores(adapter, prompt, choices):
        calls.append(choices)
        return (
            np.array([-1.0, -1.0] + [-5.0] * (len(choices) - 2))
            if len(calls) % 2
            else np.arange(len(choices), dtype=float)
        )

    monkeypatch.setattr(er, "score_choices", scores)
    out = files / "ties"
    assert main(["eval", "--model", "tiny-llava", "--limit", "4", "--out", str(out), "-q"]) == 0
    recs = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    tied = [r for r in recs if r.get("tie")]
    assert len(tied) == 2 and all(
        r["tie"] == r["choices"][:2] and r["prediction"] == r["choices"][0] for r in tied
    )
    assert all("tie" not in r and r["prediction"] == r["choices"][-1] for r in recs if r not in tied)
    assert json.loads((out / "summary.json").read_text())["ties"] == {"default": 2}


# -- section 5: a refused value exits 2 before any model loads; an interrupt says what is kept --


@pytest.mark.parametrize(
    "argv,words",
    [
        (["scan", "--model", "tiny-dinov2", "--layers", "99"], ["--layers: layer 99", "layers 0..4"]),
        (["scan", "--model", "tiny-dinov2", "--layers", "1:99"], ["--layers: layer range '1:99'"]),
        (["scan", "--model", "tiny-dinov2", "--layers", "-9"], ["--layers", "-9"]),
        (["scan", "--model", "tiny-dinov2+sinks", "--save-layers", "7"], ["--save-layers: layer 7"]),
        (["probe", "--model", "tiny-dinov2", "--layers", "5"], ["--layers: layer 5"]),
        (["scan", "--model", "tiny-llava", "--layers", "0,5"], ["--layers: layer 5"]),
        (["scan", "--model", "mini-llava", "--layers", "13"], ["--layers: layer 13", "layers 0..12"]),
        (["decode", "--model", "tiny-llava+sinks", "--sink-rule", "norm:100@99"],
         ["--sink-rule: layer 99 is out of range", "hidden states 0..4"]),
        (["eval", "--model", "mini-llava", "--tasks", "shapes", "--sink-rule", "topk:4@-14"], ["--sink-rule: layer -14"]),
        (["eval", "--model", "tiny-llava", "--sink-rule", "norm:100@99"], ["--sink-rule: layer 99", "hidden states 0..4"]),
        (["eval", "--model", "tiny-llava", "--sink-rule", "norm@-9"], ["--sink-rule: layer -9"]),
    ],
)
def test_layers_past_the_model_exit_2_before_it_loads(tmp_path, monkeypatch, capsys, no_model, argv, words):
    import sinkscope.api

    def boom(*a, **k):
        raise _Loaded("the run started")

    monkeypatch.setattr(sinkscope.api, "run", boom)
    out = tmp_path / "out"
    assert main([*argv, "--out", str(out)]) == 2
    _one_line(capsys, *words)
    assert not out.exists()


def test_layers_of_a_model_folder_are_read_from_its_config(tmp_path, dual, monkeypatch, capsys):
    """A model folder (here a diysink run holding tiny-llava) is sized from its config.json."""
    from sinkscope.models import known_layer_count

    assert known_layer_count(str(dual)) == 4 and known_layer_count(str(tmp_path / "nothing")) is None
    assert main(["scan", "--model", str(dual), "--layers", "5", "--out", str(tmp_path / "o")]) == 2
    _one_line(capsys, "--layers: layer 5 is out of range: the model has layers 0..4")


@pytest.mark.parametrize("name", ["mini-llava-untrained", "smollm2-135m"])
def test_known_layer_counts_match_the_loaded_models(name):
    """The sizes known without loading (``known_layer_count``) are the loaded adapters' own."""
    from sinkscope.models import known_layer_count, load_model

    assert known_layer_count(name) == load_model(name).n_layers


@pytest.mark.parametrize(
    "argv,words",
    [
        (["eval"], "sinkscope eval: interrupted; the answered questions are kept in predictions.jsonl"),
        (
            ["train-projector"],
            "sinkscope train-projector: interrupted; the training steps up to the last checkpoint",
        ),
        (
            ["diysink", "train", "--model", "m", "--stage", "1", "--out", "o"],
            "the training steps up to the last checkpoint",
        ),
        (["diysink", "init"], "sinkscope diysink: interrupted; nothing is kept"),
        (["scan"], "sinkscope scan: interrupted; the finished images are kept - rerun with --resume"),
        (["flow"], "sinkscope flow: interrupted; nothing is kept"),
    ],
)
def test_an_interrupt_says_what_is_kept(monkeypatch, capsys, argv, words):
    import sinkscope.api

    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(sinkscope.api, "run", stop)
    assert main(argv) == 130
    err = _one_line(capsys, words)
    assert ("images" in err) == (argv[0] == "scan")


@pytest.mark.parametrize(
    "argv,abbrev",
    [
        (["flow", "--var", "p=0.5"], "--var"),  # was read as --variant
        (["eval", "--limi", "2"], "--limi"),
        (["scan", "--thresh", "5"], "--thresh"),
        (["train-projector", "--step", "3"], "--step"),
        (["diysink", "train", "--model", "m", "--stage", "1", "--out", "o", "--samp", "3"], "--samp"),
    ],
)
def test_options_are_never_abbreviated(capsys, argv, abbrev):
    from sinkscope.cli import build_parser

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and f"unrecognized arguments: {abbrev}" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the parser itself, as the *_config doctests use it
        build_parser().parse_args(argv)


# -- config-level checks, runs read back --


def test_the_training_checks_hold_in_the_api_too(tmp_path, no_model):
    from sinkscope.training.projector import train_projector

    with pytest.raises(SinkscopeError, match="snapshot_every: .* got 0"):
        train_projector("tiny-llava", out=tmp_path / "o", snapshot_every=0)
    with pytest.raises(SinkscopeError, match="stop_after: step 5 is past the end of the 2-step"):
        train_projector("tiny-llava", out=tmp_path / "o", steps=2, stop_after=5)
    assert not (tmp_path / "o").exists()


def test_a_router_without_rew_is_refused_in_the_api_too(tmp_path, no_model):
    from sinkscope.evaluation.run import evaluate

    with pytest.raises(SinkscopeError, match="router r: only variant rew uses a router"):
        evaluate("tiny-llava", "shapes", variants=("default", "both"), router="r", out=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_a_string_of_images_is_one_spec_not_its_letters():
    from sinkscope.config import FlowConfig, ScanConfig

    assert ScanConfig(images="embedded:2", texts="a sentence").images == ("embedded:2",)
    assert ScanConfig(images="embedded:2", texts="a sentence").texts == ("a sentence",)
    assert FlowConfig(images="embedded:1").images == ("embedded:1",)


def test_a_scan_config_with_a_string_of_images_runs(tmp_path):
    from sinkscope import run
    from sinkscope.config import ScanConfig

    res = run(
        ScanConfig(model="tiny-dinov2", images="embedded:2", out=str(tmp_path / "s"), report=False),
        progress=False,
    )
    assert res.summary["n_ok"] == 2


@pytest.mark.parametrize(
    "text,words",
    [("", "invalid JSON"), ("{oops", "invalid JSON"), ("[1, 2]", "got list"), ("null", "got null")],
)
def test_load_run_on_a_bad_config_json_is_one_line(tmp_path, text, words):
    from sinkscope import load_run

    (tmp_path / "config.json").write_text(text)
    (tmp_path / "summary.json").write_text("{}")
    with pytest.raises(SinkscopeError, match="config.json: not a run config") as e:
        load_run(tmp_path)
    assert words in str(e.value) and len(str(e.value).splitlines()) == 1


def test_load_run_on_an_eval_run_without_predictions(files):
    from sinkscope import load_run

    out = files / "ev"
    assert main(["eval", "--model", "tiny-llava", "--limit", "1", "--out", str(out), "-q"]) == 0
    assert len(load_run(out).predictions) == 1
    (out / "predictions.jsonl").unlink()
    with pytest.raises(SinkscopeError, match=r"predictions\.jsonl: missing; is .* a finished eval run"):
        load_run(out)


def test_train_and_diysink_runs_read_back_typed(files, dual):
    from sinkscope import load_run
    from sinkscope.training.diysink import DIYSinkResult
    from sinkscope.training.projector import TrainResult

    out = files / "tp"
    argv = ["train-projector", "--model", "tiny-llava", "--steps", "2", "--no-real", "--n-per-task", "2"]
    assert main([*argv, "--out", str(out), "-q"]) == 0
    back = load_run(out)
    assert type(back) is TrainResult and [r["step"] for r in back.log] == [1, 2]
    assert back.config.analysis == "train-projector" and back.config.steps == 2
    assert back.summary["final_loss"] == back.log[-1]["loss"]
    init = load_run(dual)
    assert type(init) is DIYSinkResult and init.log == [] and init.config.analysis == "diysink-init"


@pytest.mark.parametrize(
    "rule,status,words",
    [
        ("topk:9999", 1, "every token would be a sink; use k < 16"),
        ("topk:16", 1, "use k < 16"),
        ("norm:100@99", 2, "layer 99"),
    ],
)
def test_diysink_init_refuses_a_rule_the_vit_cannot_apply(tmp_path, capsys, rule, status, words):
    out = tmp_path / "d"
    assert (
        main(["diysink", "init", "--model", "tiny-llava", "--sink-rule", rule, "--out", str(out), "-q"])
        == status
    )
    _one_line(capsys, words)
    assert not (out / "model").exists()
