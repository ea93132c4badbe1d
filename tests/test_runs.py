"""The run API: one config per analysis -> ``sinkscope.run`` -> a typed result; every run folder
keeps ``config.json``; ``load_run`` reads any run back and ``run(load_run(DIR).config)`` reruns it."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from sinkscope import FlowResult, SinkscopeError, load_run, run
from sinkscope.config import FlowConfig, ProbeConfig, RunConfig, ScanConfig


def _sorted(df: pd.DataFrame, keys) -> pd.DataFrame:
    return df.sort_values(keys).reset_index(drop=True)


@pytest.mark.parametrize(
    "cfg",
    [
        ScanConfig(model="tiny-clip", images=("a.png", "embedded:2"), method="all", threshold=3.5, image_size=(48, 40)),
        ProbeConfig(groups=("cls", "sink"), labels=("label",), folds=3, relative=4.0),
        FlowConfig(analyses=("rollout", "knockout"), generate=2, vit_threshold=100.0, chat=True),
    ],
)
def test_every_config_round_trips_through_json(cfg):
    back = RunConfig.from_json(cfg.to_json())
    assert back == cfg and type(back) is type(cfg)
    assert json.loads(cfg.to_json())["schema_version"] == 1


def test_unknown_fields_and_analyses_fail_in_one_line():
    with pytest.raises(SinkscopeError, match="unknown field"):
        RunConfig.from_dict({"analysis": "scan", "treshold": 3})
    with pytest.raises(SinkscopeError, match="unknown analysis"):
        RunConfig.from_dict({"analysis": "scna"})


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: ScanConfig(threshold=-5), "threshold: must be a finite number > 0"),
        (lambda: ScanConfig(attn_fraction=-1), "attn_fraction"),
        (lambda: ScanConfig(image_size=0), "image_size"),
        (lambda: ScanConfig(image_size=100000), "image_size"),
        (lambda: ScanConfig(batch_size=0), "batch_size"),
        (lambda: ScanConfig(device="gpu0"), "not a device name"),
        (lambda: ScanConfig(layers=""), "layers: empty"),
        (lambda: ProbeConfig(folds=1), "folds"),
        (lambda: ProbeConfig(folds=50), "folds"),
        (lambda: ProbeConfig(groups=("sinks",)), "groups"),
        (lambda: FlowConfig(window=0), "window"),
        (lambda: FlowConfig(stride=-3), "stride"),
        (lambda: FlowConfig(bin_width=0), "bin_width"),
        (lambda: FlowConfig(attribution_steps=0), "attribution_steps"),
        (lambda: FlowConfig(analyses=("rollout", "flux")), "flux"),
    ],
)
def test_bad_settings_are_refused_before_any_work(make, message):
    with pytest.raises(SinkscopeError, match=message):
        make()


def test_scan_config_run_save_load_rerun_gives_equal_tables(tmp_path, marked_images):
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    for i, a in enumerate(marked_images[:2]):
        Image.fromarray(a).save(tmp_path / "imgs" / f"m{i}.png")
    cfg = ScanConfig(model="tiny-dinov2+sinks", images=(str(tmp_path / "imgs"),), method="all", tau=2.0,
                     out=str(tmp_path / "a"), report=False)
    res = run(cfg, progress=False)
    assert res.config == cfg and (tmp_path / "a" / "config.json").exists()
    back = load_run(tmp_path / "a")
    assert back.config == cfg and back.summary["n_ok"] == 2
    keys = ["image", "layer", "token"]
    pd.testing.assert_frame_equal(_sorted(back.tokens, keys), _sorted(res.tokens, keys)[back.tokens.columns],
                                  check_dtype=False)
    again = run(back.config.replace(out=str(tmp_path / "b")), progress=False)
    pd.testing.assert_frame_equal(_sorted(again.tokens, keys), _sorted(res.tokens, keys))
    def cells(r):
        return set(map(tuple, r.report.sinks().astype(str).to_numpy().tolist()))

    assert cells(back) == cells(res) and len(cells(res)) > 0  # the planted sinks, found again


def test_probe_config_run_save_load_rerun_gives_equal_tables(tmp_path):
    cfg = ProbeConfig(model="tiny-dinov2+sinks", dataset="lfw-faces", groups=("cls", "mean"), layers="2,4",
                      folds=2, max_images=20, cache=False, n_jobs=1, out=str(tmp_path / "p"))
    res = run(cfg, progress=False)
    back = load_run(tmp_path / "p")
    assert back.config == cfg and back.features is None
    pd.testing.assert_frame_equal(back.table, res.table, check_dtype=False)
    again = run(back.config.replace(out=str(tmp_path / "q")), progress=False)
    pd.testing.assert_frame_equal(again.table, res.table)


def test_flow_config_run_save_load_rerun_gives_equal_tables(tmp_path):
    cfg = FlowConfig(model="tiny-llava+sinks", prompt="what is this ?", analyses=("rollout", "propagation"),
                     out=str(tmp_path / "f"))
    res = run(cfg, progress=False)
    assert isinstance(res, FlowResult) and res["summary"] is res.summary
    back = load_run(tmp_path / "f")
    assert back.config == cfg and set(back.tables) == set(res.tables)
    pd.testing.assert_frame_equal(back.tables["rollout"], res.tables["rollout"], check_dtype=False)
    again = run(back.config.replace(out=None), progress=False)
    pd.testing.assert_frame_equal(again.tables["visual_tokens"], res.tables["visual_tokens"])


def test_load_run_names_what_is_wrong(tmp_path):
    with pytest.raises(SinkscopeError, match="does not exist"):
        load_run(tmp_path / "nope")
    (tmp_path / "x").mkdir()
    with pytest.raises(SinkscopeError, match="not a sinkscope run"):
        load_run(tmp_path / "x")
    d = tmp_path / "corrupt"
    d.mkdir()
    (d / "probe.csv").write_text("layer,group\n1,cls\n")
    (d / "summary.json").write_text("{not json")
    with pytest.raises(SinkscopeError, match="corrupt summary"):
        load_run(d)


def test_a_cli_run_and_an_api_run_of_the_same_config_give_equal_outputs(tmp_path):
    from sinkscope.cli import main

    argv = ["scan", "--model", "tiny-dinov2+sinks", "--images", "embedded:2", "--method", "all", "--tau", "2",
            "--relative", "4", "--no-report", "-q"]
    assert main([*argv, "--out", str(tmp_path / "cli")]) == 0
    cfg = load_run(tmp_path / "cli").config
    assert isinstance(cfg, ScanConfig) and cfg.relative == 4.0 and cfg.images == ("embedded:2",)
    api = run(cfg.replace(out=str(tmp_path / "api")), progress=False)
    keys = ["image", "layer", "token"]
    cli_tokens = load_run(tmp_path / "cli").tokens
    pd.testing.assert_frame_equal(_sorted(cli_tokens, keys), _sorted(api.tokens, keys)[cli_tokens.columns],
                                  check_dtype=False)


def test_decode_runs_through_the_same_api(tmp_path):
    from sinkscope.config import DecodeConfig

    cfg = DecodeConfig(model="tiny-llava+sinks", max_images=2, nonsinks=2, words=(("face", ("face", "man")),),
                       out=str(tmp_path / "d"))
    assert RunConfig.from_json(cfg.to_json()) == cfg
    res = run(cfg, progress=False)
    back = load_run(tmp_path / "d")
    assert back.config == cfg and back.summary["words"]["face"] == ["face", "man"]
    cols = ["group", "scope", "n_tokens", "n_hits", "rate", "ci_low", "ci_high"]
    pd.testing.assert_frame_equal(back.rates[cols], res.rates[cols], check_dtype=False)


def test_usage_errors_exit_2_in_one_line_before_any_work(tmp_path, capsys):
    from sinkscope.cli import main

    for argv in (["flow", "--window", "0"], ["probe", "--folds", "1"], ["scan", "--image-size", "0"],
                 ["scan", "--device", "gpu0"], ["flow", "--bin-width", "0"]):
        assert main([*argv, "--out", str(tmp_path / "x")]) == 2, argv
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "x").exists()
