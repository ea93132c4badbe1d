"""A run folder is sinkscope's only when sinkscope made it, and a resume continues the same run
(issue 28, sections 1 and 2; :mod:`sinkscope.ownership`).

Every command that writes is walked from :data:`sinkscope.config.CONFIGS` (a new command fails
here until it has its arguments below): on a user's folder it exits 2 with one line naming the
folder and a file in the way, no model loads, and the folder is byte-for-byte as it was.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import pkgutil
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from sinkscope import ownership
from sinkscope.cli import main
from sinkscope.config import CONFIGS

#: analysis -> the command line that runs it (tiny models and limits), without --out
WRITERS: dict[str, list[str]] = {
    "scan": ["scan", "--model", "tiny-dinov2+sinks", "--images", "embedded:1", "-q"],
    "probe": ["probe", "--model", "tiny-dinov2+sinks", "--dataset", "lfw-faces", "--max-images", "10", "--folds", "2",
              "--layers", "1", "-q"],
    "flow": ["flow", "--model", "tiny-llava", "--images", "embedded:1", "--analysis", "rollout", "-q"],
    "decode": ["decode", "--model", "tiny-llava+sinks", "--max-images", "2", "--nonsinks", "1", "-q"],
    "eval": ["eval", "--model", "tiny-llava", "--tasks", "shapes", "--limit", "2", "-q"],
    "train-projector": ["train-projector", "--model", "tiny-llava", "--steps", "2", "--n-per-task", "2", "--no-real",
                        "--save-every", "1", "-q"],
    "diysink-init": ["diysink", "init", "--model", "tiny-llava"],
    "diysink-train": ["diysink", "train", "--model", "DUAL", "--stage", "1", "--steps", "2", "--n-per-task", "2",
                      "--no-real", "-q"],
}  # fmt: skip

#: a user's files, each with a name some command writes (or once took as a sign of its own run)
USER_FILES = {
    "config.json": '{"my": "settings"}',
    "summary.json": '{"my": "summary"}',
    "scan_config.json": "not json {",
    "probe.csv": "a,b\n1,2\n",
    "results.csv": "a\n1\n",
    "predictions.jsonl": '{"mine": 1}\n',
    "eval.html": "<p>my page</p>",
    "decode.html": "<p>my page</p>",
    "train_log.jsonl": '{"step": 1}\n',
    "index.json": '{"keys": {}}',
    "features-00000.safetensors": "not a tensor",
    "checkpoint/state.pt": "my checkpoint",
    "seen/holiday.txt": "keep me",
    "parts/notes.md": "mine",
    "model/readme.txt": "mine",
}


def _snapshot(d: Path) -> dict[str, str]:
    """Every path under ``d`` -> its bytes' hash (``dir`` for a folder)."""
    return {
        str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(d.rglob("*"))
    }


def _user_folder(d: Path, files: dict[str, str] = USER_FILES) -> Path:
    for name, text in files.items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_text(text)
    return d


@pytest.fixture
def no_model(monkeypatch):
    """Every ``load_model`` sinkscope can reach fails the test: a refusal comes before any model."""

    def refuse(*a, **k):
        raise AssertionError("a model was loaded")

    import sinkscope

    for info in pkgutil.walk_packages(sinkscope.__path__, "sinkscope."):  # imported before the patch:
        if not info.name.startswith("sinkscope.cli.__main__") and info.name != "sinkscope.figures.__main__":
            importlib.import_module(info.name)  # a module imported later would keep the stand-in
    for name, mod in list(sys.modules.items()):
        if name.startswith("sinkscope") and hasattr(mod, "load_model"):
            monkeypatch.setattr(mod, "load_model", refuse)


def _args(kind: str, out: Path, tmp_path: Path) -> list[str]:
    args = [str(tmp_path / "dual") if a == "DUAL" else a for a in WRITERS[kind]]
    return [*args, "--out", str(out)]


def _err_lines(capsys) -> list[str]:
    return [x for x in capsys.readouterr().err.splitlines() if x.strip()]


def test_every_registered_command_that_writes_is_walked():
    assert set(WRITERS) == set(CONFIGS), "give a new command its tiny command line in WRITERS"
    assert set(CONFIGS) <= set(ownership.OUTPUTS), "give a new command its outputs in sinkscope.ownership.OUTPUTS"


def _cases():
    for kind in sorted(CONFIGS):
        yield kind, False
        if "resume" in {f.name for f in fields(CONFIGS[kind])}:
            yield kind, True


@pytest.mark.parametrize(("kind", "resume"), list(_cases()))
def test_a_users_folder_is_refused_in_one_line_before_any_model_and_left_as_it_was(kind, resume, tmp_path, no_model, capsys):
    user = _user_folder(tmp_path / "mine")
    before = _snapshot(user)
    rc = main([*_args(kind, user, tmp_path), *(["--resume"] if resume else [])])
    lines = _err_lines(capsys)
    assert rc == 2, lines
    assert len(lines) == 1, lines
    assert str(user) in lines[0] and any(name.split("/")[0] in lines[0] for name in USER_FILES), lines[0]
    assert _snapshot(user) == before


@pytest.mark.parametrize("kind", sorted(k for k, c in CONFIGS.items() if "cache_dir" in {f.name for f in fields(c)}))
def test_a_users_folder_as_cache_dir_is_refused_before_any_model(kind, tmp_path, no_model, capsys):
    cache = _user_folder(tmp_path / "cache", {"index.json": '{"keys": {}}', "features-00000.safetensors": "mine"})
    before = _snapshot(cache)
    rc = main([*_args(kind, tmp_path / "new-out", tmp_path), "--cache-dir", str(cache)])
    lines = _err_lines(capsys)
    assert rc == 2 and len(lines) == 1 and "--cache-dir" in lines[0] and str(cache) in lines[0], lines
    assert _snapshot(cache) == before and not (tmp_path / "new-out").exists()


def test_a_run_of_another_command_is_refused_and_kept(tmp_path, no_model, capsys):
    run = tmp_path / "evalrun"
    ownership.claim(run, "eval", ownership.OUTPUTS["eval"], {"model": "tiny-llava"})
    (run / "predictions.jsonl").write_text('{"id": "q1"}\n')
    before = _snapshot(run)
    assert main([*_args("train-projector", run, tmp_path), "--resume"]) == 2
    line = _err_lines(capsys)[-1]
    assert "holds a run of sinkscope eval" in line and str(run) in line
    assert _snapshot(run) == before


@pytest.mark.parametrize("kind", sorted(k for k, c in CONFIGS.items() if "overwrite" in {f.name for f in fields(c)}))
def test_overwrite_replaces_only_the_commands_own_files(kind, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(kind, out, tmp_path)) == 0
    marker = json.loads((out / ownership.MARKER).read_text())
    assert marker["kind"] == kind and "summary.json" in marker["files"] and marker["user_files"] == []
    (out / "my-notes.txt").write_text("mine")
    (out / "summary.json").write_text('"stale"')  # mark the run's own file (timings may repeat to the ms)
    assert main([*_args(kind, out, tmp_path), "--overwrite"]) == 0
    assert (out / "my-notes.txt").read_text() == "mine"  # a user's file beside the run's survives
    assert isinstance(json.loads((out / "summary.json").read_text()), dict)  # the run's own file was rewritten
    assert "my-notes.txt" in json.loads((out / ownership.MARKER).read_text())["user_files"]
    # a user's file under a name the command writes is never replaced, even with --overwrite
    user = _user_folder(tmp_path / "user", {"summary.json": '{"my": "summary"}'})
    assert main([*_args(kind, user, tmp_path), "--overwrite"]) == 2
    assert "summary.json is not sinkscope's" in _err_lines(capsys)[-1]
    assert (user / "summary.json").read_text() == '{"my": "summary"}' and len(list(user.iterdir())) == 1


def test_eval_writes_its_page_over_its_own_earlier_page(tmp_path):
    out = tmp_path / "ev"
    assert main(_args("eval", out, tmp_path)) == 0 and (out / "eval.html").exists()
    assert main([*_args("eval", out, tmp_path), "--overwrite"]) == 0  # was: all the work, then eval.html refused


def test_eval_resume_with_another_model_is_refused_naming_the_field(tmp_path, capsys):
    out = tmp_path / "ev"
    assert main(_args("eval", out, tmp_path)) == 0
    pred = (out / "predictions.jsonl").read_bytes()
    args = [a if a != "tiny-llava" else "tiny-llava+sinks" for a in _args("eval", out, tmp_path)]
    assert main([*args, "--resume"]) == 2
    line = _err_lines(capsys)[-1]
    assert "model differs (stored 'tiny-llava', now 'tiny-llava+sinks')" in line
    assert (out / "predictions.jsonl").read_bytes() == pred


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A train-projector run stopped after step 1 of 2 (checkpointed)."""
    out = tmp_path_factory.mktemp("tp") / "run"
    assert main([*_args("train-projector", out, out.parent), "--stop-after", "1"]) == 0
    return out


def test_train_projector_resume_with_other_results_settings_is_refused(stopped_run, capsys):
    before = _snapshot(stopped_run)
    args = _args("train-projector", stopped_run, stopped_run.parent)
    args[args.index("--steps") + 1] = "4"
    assert main([*args, "--lr", "0.5", "--resume"]) == 2
    line = _err_lines(capsys)[-1]
    assert "steps differs (stored 2, now 4)" in line and "lr differs (stored 0.001, now 0.5)" in line
    assert _snapshot(stopped_run) == before


def test_train_projector_resume_with_only_how_it_runs_changed_continues(stopped_run, tmp_path):
    args = _args("train-projector", stopped_run, stopped_run.parent)
    args[args.index("--save-every") + 1] = "2"  # checkpoint frequency: how it runs, not what it gives
    assert main([*args, "--resume"]) == 0
    log = [json.loads(x) for x in (stopped_run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]


def test_train_projector_resume_on_a_log_that_is_not_json_fails_in_one_line(tmp_path, no_model, capsys):
    out = tmp_path / "tp"
    ownership.claim(out, "train-projector", ownership.OUTPUTS["train-projector"], None)
    (out / "train_log.jsonl").write_text("garbage\nmore garbage\n")
    assert main([*_args("train-projector", out, tmp_path), "--resume"]) != 0
    lines = _err_lines(capsys)
    assert len(lines) == 1 and "train_log.jsonl: line 1 is not a training step's record" in lines[0]


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("dual")
    assert main(["diysink", "init", "--model", "tiny-llava", "--out", str(root / "dual")]) == 0
    assert main(_args("diysink-train", root / "s1", root)) == 0
    return root


@pytest.mark.parametrize(("stage", "extra"), [("2", ["--steps", "2"]), ("router", ["--samples", "8", "--epochs", "1"])])
def test_diysink_resume_of_another_stage_is_refused(stage1_run, stage, extra, capsys):
    out = stage1_run / "s1"
    before = _snapshot(out)
    args = ["diysink", "train", "--model", str(stage1_run / "dual"), "--stage", stage, *extra, "--n-per-task", "2",
            "--no-real", "-q", "--out", str(out), "--resume"]  # fmt: skip
    assert main(args) == 2
    line = _err_lines(capsys)[-1]
    assert f"stage differs (stored '1', now '{stage}')" in line
    assert _snapshot(out) == before


def test_resume_differences_name_every_field():
    assert ownership.resume_differences({"model": "a", "lr": 0.1, "real": ["x"]}, {"model": "a", "lr": 0.2, "real": ("x",)}) == [
        "lr differs (stored 0.1, now 0.2)"
    ]


def test_a_users_folder_as_the_figure_folder_is_refused_before_any_run(tmp_path, no_model, capsys):
    from sinkscope.figures.spec import write_example_spec

    spec = write_example_spec(tmp_path / "figs.toml")
    user = _user_folder(tmp_path / "figs-out", {"manifest.json": '{"my": "list"}', "tiny-norms.html": "<p>mine</p>"})
    before = _snapshot(user)
    assert main(["figures", "-f", str(spec), "--out", str(user), "--no-png", "-q"]) == 2
    line = _err_lines(capsys)[-1]
    assert str(user) in line and "manifest.json" in line
    assert _snapshot(user) == before  # not even a .lock file was made


def test_a_run_that_fails_before_writing_leaves_no_folder_but_keeps_a_users_empty_one(tmp_path, capsys):
    new = tmp_path / "new"
    assert main(["flow", "--model", "tiny-llama", "-q", "--out", str(new)]) == 1  # a text-only model: refused after loading
    assert not new.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["flow", "--model", "tiny-llama", "-q", "--out", str(empty)]) == 1
    assert empty.is_dir() and list(empty.iterdir()) == [empty / ownership.MARKER]


# -- every registered command, each class of bad input (issue 28's "one test per class that walks
# every command": a new command is covered once it has its line in WRITERS) --


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_out_onto_a_file_is_one_line_before_any_model(kind, tmp_path, no_model, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert main(_args(kind, tmp_path / "notes.txt", tmp_path)) == 2
    lines = _err_lines(capsys)
    assert len(lines) == 1 and "Traceback" not in lines[0] and "notes.txt" in lines[0], lines
    assert (tmp_path / "notes.txt").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_a_model_that_does_not_exist_is_one_line_and_writes_nothing(kind, tmp_path, capsys):
    args = _args(kind, tmp_path / "out", tmp_path)
    i = args.index("--model") + 1
    args[i] = str(tmp_path / "no-such-model")
    assert main(args) in (1, 2)
    lines = _err_lines(capsys)
    assert len(lines) == 1 and "Traceback" not in lines[0] and "no-such-model" in lines[0], lines
    assert not (tmp_path / "out").exists()
