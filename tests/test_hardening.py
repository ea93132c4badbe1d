"""Issue 11's inputs, one by one through the command line: one line naming the input and the
reason, exit status 2 for a bad option (1 for bad data or a model that cannot do the analysis),
no traceback, and nothing written into --out."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sinkscope.cli import main

ROWS = {
    "no_path": '{"label": "cat"}\n',
    "number": '{"path": "ok.png"}\n42\n',
    "list": '{"path": "ok.png"}\n["ok.png"]\n',
    "null_path": '{"path": "ok.png"}\n{"path": null}\n',
}

CASES = [
    # (argv after the command's --out, expected status, words the line must hold)
    (["scan", "--images", "@no_path"], 1, "no path column"),
    (["scan", "--images", "@number"], 1, "line 2: expected a JSON object"),
    (["scan", "--images", "@list"], 1, "line 2: expected a JSON object"),
    (["scan", "--images", "@null_path"], 1, "row 2: no 'path'"),
    (["scan", "--images", "embedded:abc"], 1, "embedded:abc"),
    (["probe", "--batch-size", "0"], 2, "batch_size"),
    (["scan", "--device", "cuda"], 2, "no CUDA device"),
    (["scan", "--device", "gpu0"], 2, "not a device name"),
    (["flow", "--model", "tiny-llama"], 1, "text-only language model"),
    (["flow", "--attribution-steps", "0"], 2, "attribution_steps"),
    (["scan", "--threshold", "-5"], 2, "threshold"),
    (["scan", "--attn-fraction", "-1"], 2, "attn_fraction"),
    (["scan", "--model", "tiny-dinov2", "--images", "embedded:1", "--layers", "1:99"], 2, "--layers: layer range '1:99'"),
    (["scan", "--model", "tiny-dinov2", "--images", "embedded:1", "--layers", "99"], 2, "--layers: layer 99"),
    (["scan", "--layers", ""], 2, "layers: empty"),
    (["scan", "--image-size", "0"], 2, "image_size"),
    (["scan", "--image-size", "100000"], 2, "image_size"),
    (["flow", "--bin-width", "0"], 2, "bin_width"),
    (["flow", "--window", "0"], 2, "window"),
    (["flow", "--window", "-3"], 2, "window"),
    (["flow", "--stride", "0"], 2, "stride"),
    (["probe", "--folds", "1"], 2, "folds"),
    (["probe", "--folds", "50"], 2, "folds"),
    (["decode", "--top-k", "0"], 2, "top_k"),
]


@pytest.fixture()
def inputs(tmp_path):
    Image.fromarray(np.full((40, 40, 3), 120, np.uint8)).save(tmp_path / "ok.png")
    for name, text in ROWS.items():
        (tmp_path / f"{name}.jsonl").write_text(text)
    return tmp_path


@pytest.mark.parametrize("argv,status,words", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_input_gets_one_line_and_writes_nothing(inputs, capsys, argv, status, words):
    argv = [str(inputs / f"{a[1:]}.jsonl") if a.startswith("@") else a for a in argv]
    out = inputs / "out"
    assert main([*argv, "--out", str(out)]) == status
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert words in err and err.startswith("sinkscope"), err
    assert not out.exists()  # nothing written, not even an empty folder


@pytest.mark.parametrize("command", ["scan", "probe", "flow", "decode"])
def test_out_an_existing_file_is_refused_before_any_work(inputs, capsys, command):
    f = inputs / "results.txt"
    f.write_text("keep")
    assert main([command, "--out", str(f)]) == 2
    assert "is a file" in capsys.readouterr().err and f.read_text() == "keep"


@pytest.mark.parametrize("command", ["scan", "probe", "flow", "decode"])
def test_a_read_only_out_folder_is_refused_before_any_work(inputs, capsys, monkeypatch, command):
    """Root may write anywhere, so the check is simulated: the folder reports no write access."""
    import os

    ro = inputs / "readonly"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(ro) else real(p, mode))
    assert main([command, "--out", str(ro / "run")]) == 2
    assert "not writable" in capsys.readouterr().err and not (ro / "run").exists()
