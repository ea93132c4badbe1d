"""A seeded fuzzer over the command line's numeric options and the manifest formats: every input
ends in a valid config (and a valid run) or in one clean error line - never a traceback."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from sinkscope import SinkscopeError
from sinkscope.cli import build_parser, flow_config, main, probe_config, scan_config
from sinkscope.data import image_items

VALUES = ["-1e9", "-5", "-1", "0", "0.5", "1", "2", "3", "7", "64", "1e9", "nan", "inf", "-inf", "abc", ""]
NUMERIC = {
    "scan": ["--threshold", "--relative", "--attn-factor", "--attn-fraction", "--tau", "--massive-abs",
             "--massive-ratio", "--dims-min-layer", "--batch-size", "--image-size", "--layers"],
    "probe": ["--threshold", "--relative", "--folds", "--max-images", "--batch-size", "--jobs", "--layers"],
    "flow": ["--vit-threshold", "--vit-relative", "--llm-tau", "--generate", "--window", "--stride",
             "--bin-width", "--attribution-steps"],
}
BUILD = {"scan": scan_config, "probe": probe_config, "flow": flow_config}


def _valid(cfg) -> bool:
    """Every float of an accepted config is finite, and it survives a JSON round trip."""
    from sinkscope.config import RunConfig

    finite = all(math.isfinite(v) for v in cfg.to_dict().values() if isinstance(v, float))
    return finite and RunConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize("command", ["scan", "probe", "flow"])
def test_numeric_options_give_a_valid_config_or_one_clean_error(command, capsys):
    rng = np.random.default_rng({"scan": 0, "probe": 1, "flow": 2}[command])
    parser = build_parser()
    outcomes = {"config": 0, "refused": 0, "usage": 0}
    for _ in range(300):
        opts = rng.choice(NUMERIC[command], size=rng.integers(1, 4), replace=False)
        argv = [command]
        for o in opts:
            argv += [str(o), str(rng.choice(VALUES))]
        try:
            a = parser.parse_args(argv)
        except SystemExit as e:  # argparse: a value of the wrong type
            assert e.code == 2, argv
            outcomes["usage"] += 1
            continue
        try:
            cfg = BUILD[command](a)
        except SinkscopeError as e:
            assert "\n" not in str(e) and str(e), argv
            outcomes["refused"] += 1
            continue
        assert _valid(cfg), (argv, cfg)
        outcomes["config"] += 1
    capsys.readouterr()
    assert all(outcomes.values()), outcomes  # the fuzzer reached every outcome


def test_accepted_fuzzed_scans_run_to_valid_output(tmp_path, capsys):
    """A few accepted numeric settings run end to end on a tiny model: valid tables, or one line."""
    rng = np.random.default_rng(3)
    ran = 0
    for i in range(40):
        argv = ["scan", "--model", "tiny-dinov2+sinks", "--images", "embedded:1", "-q", "--no-report",
                "--method", str(rng.choice(["norm", "attention", "dims", "all"])),
                "--out", str(tmp_path / f"r{i}")]
        for o in rng.choice(["--relative", "--attn-factor", "--tau", "--batch-size", "--image-size"], 2, replace=False):
            argv += [str(o), str(rng.choice(["0.5", "1", "2", "3", "7", "64"]))]
        try:
            code = main(argv)
        except SystemExit as e:  # argparse refuses a value of the wrong type: usage + one error line
            code = e.code
            err = capsys.readouterr().err
            assert code == 2 and err.strip().splitlines()[-1].startswith("sinkscope scan: error:"), err
            continue
        err = capsys.readouterr().err
        assert code in (0, 1, 2) and "Traceback" not in err, (argv, err)
        if code == 0:
            ran += 1
            assert (tmp_path / f"r{i}" / "tokens.parquet").exists()
        else:
            assert len(err.strip().splitlines()) == 1, err
        if ran >= 6:
            break
    assert ran >= 6


LINES = [
    '{"path": "ok.png", "label": "a"}', '{"path": null}', '{"label": "x"}', "42", '["ok.png"]', "{bad json",
    '{"path": "missing.png"}', '{"path": "broken.png"}', '{"path": ""}', '"ok.png"', "null", "",
]


def test_manifests_give_items_or_one_clean_error(tmp_path):
    Image.fromarray(np.full((40, 40, 3), 120, np.uint8)).save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    rng = np.random.default_rng(4)
    outcomes = {"items": 0, "refused": 0, "unreadable": 0}
    for i in range(200):
        lines = list(rng.choice(LINES, size=rng.integers(1, 5)))
        if rng.random() < 0.5:  # the same rows as CSV
            rows = [json.loads(x) for x in lines if x.startswith("{") and not x.startswith("{bad")]
            p = tmp_path / f"m{i}.csv"
            p.write_text("path,label\n" + "".join(f"{r.get('path') or ''},{r.get('label', '')}\n" for r in rows))
        else:
            p = tmp_path / f"m{i}.jsonl"
            p.write_text("\n".join(lines) + "\n")
        try:
            items = image_items([p])
        except SinkscopeError as e:
            assert str(e) and "\n" not in str(e)
            outcomes["refused"] += 1
            continue
        outcomes["items"] += 1
        for it in items:
            try:
                assert it.load().dtype == np.uint8
            except SinkscopeError as e:
                assert it.source in str(e)
                outcomes["unreadable"] += 1
    assert all(outcomes.values()), outcomes
