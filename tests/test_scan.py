"""The scan pipeline and CLI: outputs, bad inputs, resume."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from sinkscope import SinkscopeError, load_model, scan
from sinkscope.cli import main

from .conftest import CELLS, H, W


@pytest.fixture()
def image_dir(tmp_path, marked_images):
    d = tmp_path / "imgs"
    d.mkdir()
    for i, im in enumerate(marked_images):
        Image.fromarray(im).save(d / f"im{i}.png")
    return d


def _kill_on_second_batch(monkeypatch):
    """Make the scan die (as if killed) in the middle of its second batch; returns the real run."""
    from sinkscope import capture as capmod

    real_run = capmod.Capture.run
    calls = {"n": 0}

    def dying_run(self, inputs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_run(self, inputs)

    monkeypatch.setattr(capmod.Capture, "run", dying_run)
    return real_run


def _scan_tiny(out, images, **kw):
    return scan("tiny-dinov2+sinks", images=images, out=out, image_size=(H, W), progress=False, **kw)


def test_scan_writes_the_three_files_with_the_documented_columns(tmp_path, image_dir):
    res = _scan_tiny(tmp_path / "out", [str(image_dir)], method="all", threshold=100)
    out = tmp_path / "out"
    for f in ("tokens.parquet", "summary.json", "report.html"):
        assert (out / f).stat().st_size > 0
    t = pd.read_parquet(out / "tokens.parquet")
    for col in ("image", "layer", "token", "kind", "row", "col", "norm", "is_sink", "attention_received"):
        assert col in t.columns
    assert pd.api.types.is_string_dtype(t.image) and t.layer.dtype.kind == "i" and t.token.dtype.kind == "i"
    assert t.duplicated(["image", "layer", "token"]).sum() == 0
    assert len(t) == 4 * 5 * 31  # images x layers x tokens (CLS + 6x5)
    s = json.loads((out / "summary.json").read_text())
    assert s["model"]["family"] == "dinov2" and s["layout"]["grid"] == [6, 5] and s["layout"]["n_cls"] == 1
    assert s["rule"]["method"] == "norm" and s["rule"]["threshold"] == {"kind": "absolute", "value": 100}
    assert [r["method"] for r in s["rules"]] == ["norm", "attention", "dims"]
    assert s["emergence_layer"] == 2
    assert s["per_layer"]["2"]["n_sinks"] == sum(len(c) for c in CELLS)
    assert {"torch", "transformers"} <= set(s["versions"]) and s["timings"]["forward_s"] > 0
    sinks = res.sinks()
    got = {(r.image, int(r.row), int(r.col)) for r in sinks.itertuples()}
    assert got == {(f"im{i}.png", r, c) for i, cells in enumerate(CELLS) for r, c in cells}


def test_corrupt_and_small_images_fail_alone(tmp_path, image_dir, caplog):
    (image_dir / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    Image.new("RGB", (5, 5)).save(image_dir / "tiny.png")
    res = _scan_tiny(tmp_path / "out", [str(image_dir)])
    st = {r["image"]: r for r in res.summary["images"]}
    assert st["broken.png"]["status"] == "failed" and "broken.png" in st["broken.png"]["reason"]
    assert st["tiny.png"]["status"] == "failed" and "smaller than one 8 px patch" in st["tiny.png"]["reason"]
    assert sum(r["status"] == "ok" for r in st.values()) == 4
    assert res.summary["n_failed"] == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 2 and all("\n" not in e for e in errors)
    assert any("cannot read image" in e and "broken.png" in e for e in errors)


def test_bad_inputs_give_one_line_errors(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SinkscopeError, match=r"folder .*empty holds no image files"):
        _scan_tiny(None, [str(empty)])
    with pytest.raises(SinkscopeError, match="does not exist"):
        _scan_tiny(None, [str(tmp_path / "nope.png")])
    assert main(["scan", "--model", "no-such-model-xyz", "--out", str(tmp_path / "o"), "-q"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("sinkscope: error: cannot load model 'no-such-model-xyz'") and "\n" not in err
    assert main(["scan", "--model", str(tmp_path / "missing_dir"), "-q"]) == 1
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SinkscopeError, match="language model"):
        scan("tiny-llama", images=[str(tmp_path)], progress=False)


def test_resume_neither_recomputes_nor_duplicates(tmp_path, image_dir, monkeypatch):
    from sinkscope import capture as capmod

    out = tmp_path / "out"
    real_run = _kill_on_second_batch(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        _scan_tiny(out, [str(image_dir)], batch_size=2)
    monkeypatch.setattr(capmod.Capture, "run", real_run)
    done = [r["image"] for x in (out / "progress.jsonl").read_text().splitlines() for r in json.loads(x)]
    assert done == ["im0.png", "im1.png"]

    seen = []
    monkeypatch.setattr(
        capmod.Capture, "run", lambda self, inp: seen.extend(inp.names) or real_run(self, inp)
    )
    res = _scan_tiny(out, [str(image_dir)], batch_size=2, resume=True)
    assert seen == ["im2.png", "im3.png"]  # only the unfinished images ran
    assert res.summary["timings"]["items_this_run"] == 2
    t = pd.read_parquet(out / "tokens.parquet")
    assert t.duplicated(["image", "layer", "token"]).sum() == 0
    fresh = _scan_tiny(tmp_path / "fresh", [str(image_dir)], batch_size=2).tokens
    pd.testing.assert_frame_equal(t.reset_index(drop=True), fresh.reset_index(drop=True))
    # a resume with other settings is refused instead of mixing results
    with pytest.raises(SinkscopeError, match="other settings"):
        _scan_tiny(out, [str(image_dir)], resume=True, layers="0:2")


def test_manifests_csv_and_jsonl(tmp_path, image_dir):
    (tmp_path / "m.csv").write_text("path,label\n" + "".join(f"imgs/im{i}.png,{i}\n" for i in range(2)))
    (tmp_path / "m.jsonl").write_text(
        "".join(json.dumps({"image": f"imgs/im{i}.png"}) + "\n" for i in (2, 3))
    )
    res = _scan_tiny(None, [str(tmp_path / "m.csv"), str(tmp_path / "m.jsonl")], threshold=100)
    assert res.summary["n_ok"] == 4 and len(res.sinks()) == 6


def test_text_scan_of_a_language_model(tmp_path):
    res = scan(
        "tiny-llama+sinks",
        texts=["the cat is on the tree", "a dog"],
        method="all",
        threshold=50,
        out=tmp_path / "o",
        progress=False,
    )
    t = res.tokens
    assert set(t.kind) == {"text"} and t.row.isna().all() and "text_token" in t
    assert res.sinks().token.tolist() == [0, 0]  # <s> in both prompts
    assert (tmp_path / "o" / "report.html").exists()


def test_cli_main_command_help_lists_examples():
    r = subprocess.run(
        [sys.executable, "-m", "sinkscope.cli", "scan", "--help"], capture_output=True, text=True
    )
    assert r.returncode == 0 and "examples:" in r.stdout and "--resume" in r.stdout


@pytest.mark.slow
def test_readme_main_command_runs_end_to_end(tmp_path):
    """`sinkscope scan` with no model arguments: dinov2-small on the embedded images."""
    exe = Path(sys.executable).parent / "sinkscope"
    r = subprocess.run(
        [str(exe), "scan", "--out", str(tmp_path / "run"), "-q"], capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr
    for f in ("tokens.parquet", "summary.json", "report.html"):
        assert (tmp_path / "run" / f).stat().st_size > 1000
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["model"]["name"] == "dinov2-small" and s["n_ok"] == 9 and s["n_failed"] == 0
    assert "sink tokens (main rule): 0" in r.stdout


def test_saved_activations_equal_hf_hidden_states_and_survive_resume(tmp_path, image_dir, monkeypatch):
    import torch

    from sinkscope import capture as capmod
    from sinkscope.store import ActivationStore

    out = tmp_path / "out"
    real_run = _kill_on_second_batch(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        _scan_tiny(out, [str(image_dir)], batch_size=3, save_layers="2,4")
    monkeypatch.setattr(capmod.Capture, "run", real_run)
    assert len(ActivationStore.open(out / "activations")) == 3
    res = _scan_tiny(out, [str(image_dir)], batch_size=3, save_layers="2,4", resume=True)
    st = ActivationStore.open(out / "activations")
    assert st.names() == [f"im{i}.png" for i in range(4)] and st.layers == [2, 4]
    assert res.summary["activations"]["n_items"] == 4
    # equal to HF's own hidden states for that image
    ad = load_model("tiny-dinov2+sinks", image_size=(H, W))
    pv = ad.prepare([np.asarray(Image.open(image_dir / "im3.png"))]).tensors["pixel_values"]
    ref = ad.model(pixel_values=pv, output_hidden_states=True).hidden_states
    torch.testing.assert_close(st.load("im3.png", 4), ref[4][0], atol=1e-5, rtol=1e-5)
    assert st.layout("im3.png").grid == (6, 5)
    with pytest.raises(SinkscopeError, match="needs an output folder"):
        _scan_tiny(None, [str(image_dir)], save_layers="1")


def test_kill_between_part_and_log_and_a_torn_log_line_do_not_duplicate(tmp_path, image_dir, monkeypatch):
    from sinkscope.scanning import _RunDir

    out = tmp_path / "out"
    real_log = _RunDir.log
    calls = {"n": 0}

    def dying_log(self, records):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # the second batch's part is on disk, its log line is not
        return real_log(self, records)

    monkeypatch.setattr(_RunDir, "log", dying_log)
    with pytest.raises(KeyboardInterrupt):
        _scan_tiny(out, [str(image_dir)], batch_size=2)
    monkeypatch.setattr(_RunDir, "log", real_log)
    assert len(list((out / "parts").glob("part-*.parquet"))) == 2
    with (out / "progress.jsonl").open("a") as fh:
        fh.write('[{"image": "im2.png", "status": "ok", "part": "part-0')  # torn by a kill
    res = _scan_tiny(out, [str(image_dir)], batch_size=2, resume=True)
    assert res.summary["timings"]["items_this_run"] == 2
    t = pd.read_parquet(out / "tokens.parquet")
    assert t.duplicated(["image", "layer", "token"]).sum() == 0 and t.image.nunique() == 4


def test_resume_refuses_changed_inputs_and_retries_failures(tmp_path, image_dir):
    out = tmp_path / "t"
    scan("tiny-llama+sinks", texts=["a cat is on the mat"], out=out, progress=False, report=False)
    with pytest.raises(SinkscopeError, match="another source"):
        scan("tiny-llama+sinks", texts=["dog"], out=out, resume=True, progress=False)
    # a different top-k (set by tau for the dims rule) would mix column layouts: refused
    with pytest.raises(SinkscopeError, match="other settings"):
        scan(
            "tiny-llama+sinks",
            texts=["a cat is on the mat"],
            out=out,
            resume=True,
            progress=False,
            method="dims",
            tau=2,
        )
    # a failed image is tried again on resume, once fixed
    (image_dir / "late.png").write_bytes(b"garbage")
    out2 = tmp_path / "i"
    first = _scan_tiny(out2, [str(image_dir)])
    assert first.summary["n_failed"] == 1
    Image.new("RGB", (W, H), (10, 20, 30)).save(image_dir / "late.png")
    second = _scan_tiny(out2, [str(image_dir)], resume=True)
    assert second.summary["n_failed"] == 0 and second.summary["timings"]["items_this_run"] == 1


def test_same_file_twice_is_scanned_once(image_dir):
    f = str(image_dir / "im0.png")
    res = _scan_tiny(None, [f, f, str(image_dir / "im1.png")])
    assert res.summary["n_ok"] == 2 and res.tokens.duplicated(["image", "layer", "token"]).sum() == 0


def test_attention_follows_the_layer_selection(image_dir):
    res = _scan_tiny(None, [str(image_dir)], method="attention", layers="1,2")
    t = res.tokens
    assert sorted(t.layer.unique()) == [1, 2] and t.attention_received.notna().all()
    with pytest.raises(SinkscopeError, match="needs a layer below 4"):
        _scan_tiny(None, [str(image_dir)], method="attention", layers="4")


def test_report_keeps_up_to_24_images_with_an_output_folder(tmp_path, marked_images):
    from sinkscope.data import ImageItem

    items = [ImageItem(f"x{i}", f"x{i}", loader=lambda im=marked_images[i % 4]: im) for i in range(30)]
    res = scan(
        "tiny-vit",
        images=items,
        out=tmp_path / "r",
        image_size=(H, W),
        progress=False,
        report=False,
        batch_size=8,
    )
    assert len(res.pixels) == 24 and len(list((tmp_path / "r" / "seen").glob("*.png"))) == 24
