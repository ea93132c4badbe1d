"""Options that used to give a silent wrong answer now fail in one line before any work."""

from __future__ import annotations

import pytest

from sinkscope import SinkscopeError
from sinkscope.capture import parse_layers
from sinkscope.cli import main
from sinkscope.sinks import NormRule


@pytest.mark.parametrize("spec", ["1:99", "-99:", "", "  "])
def test_layer_selections_outside_the_model_or_empty_are_errors(spec):
    with pytest.raises(SinkscopeError, match="layer"):
        parse_layers(spec, 12)


def test_valid_layer_ranges_still_parse():
    assert parse_layers("4:13", 12) == list(range(4, 13)) and parse_layers("-2:", 12) == [11, 12]


@pytest.mark.parametrize("kw", [{"threshold": -5.0}, {"threshold": 0.0}, {"relative": -1.0}, {"relative": 0.0}])
def test_norm_thresholds_that_would_call_every_token_a_sink_are_refused(kw):
    with pytest.raises(SinkscopeError, match="must be > 0"):
        NormRule(**kw)


@pytest.mark.parametrize("argv", [["--threshold", "-5"], ["--layers", "1:99"], ["--layers", ""]])
def test_the_cli_names_the_bad_option_and_writes_nothing(tmp_path, capsys, argv):
    out = tmp_path / "run"
    code = main(["scan", "--model", "tiny-dinov2", "--images", "embedded:1", "--out", str(out), "-q", *argv])
    err = capsys.readouterr().err
    assert code != 0 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (out / "tokens.parquet").exists()


def test_small_pictures_of_a_data_set_are_enlarged_not_refused():
    """The 8 x 8 ``digits`` on a 14-px-patch model: the data set's own minimum side applies."""
    import numpy as np
    import transformers as T

    from sinkscope.models import VisionAdapter

    cfg = T.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                      image_size=28, patch_size=14)
    ad = VisionAdapter(T.ViTModel(cfg, add_pooling_layer=False).eval(), "vit14", None)
    digit = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(SinkscopeError, match="smaller than one 14 px patch"):
        ad.prepare([digit])
    assert ad.prepare([digit], min_side=1).layouts[0].grid == (2, 2)


@pytest.mark.slow
def test_probe_on_digits_runs_with_the_default_model(tmp_path):
    """The README's `sinkscope probe --dataset digits` example on dinov2-small (14 px patches)."""
    import pandas as pd

    argv = ["probe", "--dataset", "digits", "--max-images", "40", "--layers", "12", "--folds", "2",
            "--groups", "cls", "--out", str(tmp_path), "-q"]
    assert main(argv) == 0
    row = pd.read_csv(tmp_path / "probe.csv").query("group == 'cls'").iloc[0]
    assert row.n_images == 40  # none refused as smaller than a patch
    assert row.accuracy > row.chance  # 10 digit classes, and the CLS token separates them


def test_rule_options_beside_explicit_rules_are_refused_not_ignored():
    from sinkscope import scan

    with pytest.raises(SinkscopeError, match="not both"):
        scan("tiny-dinov2", images=["embedded:1"], rules=[NormRule(threshold=5.0)], threshold=7.0, progress=False)


def test_a_text_encoder_checkpoint_is_refused_for_what_it_is(tmp_path):
    import transformers as T

    from sinkscope import load_model

    T.BertModel(T.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                             vocab_size=200)).save_pretrained(tmp_path / "bert")
    with pytest.raises(SinkscopeError, match="bidirectional text encoder: not a causal LM"):
        load_model(str(tmp_path / "bert"))


def test_flow_says_which_analyses_apply_to_a_vit_and_refuses_a_text_model(tmp_path, capsys):
    assert main(["flow", "--model", "tiny-dinov2", "--out", str(tmp_path / "v"), "-q"]) == 0
    out = capsys.readouterr().out
    assert "skipped: knockout (needs a LLaVA-style model)" in out
    import json

    s = json.loads((tmp_path / "v" / "summary.json").read_text())
    assert s["analyses"] == ["rollout", "redundancy"] and "propagation" in s["analyses_skipped"]
    assert main(["flow", "--model", "tiny-llama", "--out", str(tmp_path / "t"), "-q"]) == 1
    assert "text-only language model" in capsys.readouterr().err
