"""Word-distribution decoding over a labelled set (paper analysis 3): known answers on tiny-llava
with planted sinks, agreement with knockout.decode_isolated, the binomial intervals by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from sinkscope.cli import main
from sinkscope.data import ImageItem, LabeledImages
from sinkscope.flow.decoding import (
    TopNormRule,
    binomial_ci,
    decode_rate,
    difference_ci,
    match_words,
    normalize_token,
    rate_table,
)
from sinkscope.flow.knockout import decode_isolated
from sinkscope.models import load_model
from sinkscope.models.tiny import paint_markers
from sinkscope.sinks import NormRule
from sinkscope.viz import write_result_page

from .conftest import photo

# tiny-llava sees 32 x 32 px: a 4 x 4 patch grid. Per image, the planted cells (row, col).
PLANTED = [[(1, 2)], [(0, 0), (3, 3)], [(2, 1)], [], []]
LABELS = ["cat", "cat", "cat", "none", "none"]  # unmarked images have no object word: the control
RULE = NormRule(threshold=100)


def _planted_set() -> LabeledImages:
    arrays = [paint_markers(photo(i, size=(32, 32)), cells) for i, cells in enumerate(PLANTED)]
    items = [ImageItem(f"img{i}", f"planted:{i}", loader=lambda a=a: a) for i, a in enumerate(arrays)]
    return LabeledImages("planted", items, pd.DataFrame({"label": LABELS}))


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llava+sinks")


@pytest.fixture(scope="module")
def edited():
    """tiny-llava+sinks edited so that a planted sink provably decodes to "cat" and nothing else does.

    - projector: ``linear_1`` reads only ViT channel 7 (the planted massive dim: ~796 on a sink,
      < 1 elsewhere) minus 100, so GELU gives ~696 on sinks and exactly 0 elsewhere; ``linear_2``
      writes that onto LLM channel ``C`` plus a fixed bias ``b`` (``|b| = 10``, ``b[C] = 0``). Every
      non-sink's LLM input is exactly ``b``; a sink's is ``b + 696 e_C``.
    - LM head: the row of "cat" is ``10 e_C - 10 b/|b|``. The LLM's four random layers add updates
      far smaller than both (checked below), so after the final RMS norm a sink's state is ~8 e_C
      (logit of cat ~ +80, every other logit < 1) and a non-sink's ~8 b/|b| (logit ~ -80).
    """
    ad = load_model("tiny-llava+sinks")
    C = 5
    g = torch.Generator().manual_seed(1)
    b = torch.randn(ad.llm.hidden_size, generator=g)
    b[C] = 0.0
    b = 10 * b / b.norm()
    cat = ad.tokenizer.convert_tokens_to_ids("cat")
    with torch.no_grad():
        p = ad.projector
        p.linear_1.weight.zero_()
        p.linear_1.bias.zero_()
        p.linear_1.weight[0, 7] = 1.0
        p.linear_1.bias[0] = -100.0
        p.linear_2.weight.zero_()
        p.linear_2.weight[C, 0] = 1.0
        p.linear_2.bias.copy_(b)
        row = torch.zeros(ad.llm.hidden_size)
        row[C] = 10.0
        ad.model.lm_head.weight[cat] = row - 10 * b / b.norm()
    return ad, cat


def test_wilson_and_clopper_pearson_by_hand():
    # Wilson 8 / 10 at 95%, written out: z = 1.959964, centre = (p + z^2/2n) / (1 + z^2/n)
    z, n, k = 1.959963984540054, 10, 8
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    lo, hi = binomial_ci(8, 10)
    assert lo == pytest.approx(centre - half, abs=1e-12) and hi == pytest.approx(centre + half, abs=1e-12)
    assert (round(lo, 4), round(hi, 4)) == (0.4902, 0.9433)
    # Clopper-Pearson: the k = 0 and k = n bounds have closed forms
    assert binomial_ci(0, 10, method="clopper-pearson") == pytest.approx((0.0, 1 - 0.025 ** (1 / 10)))
    assert binomial_ci(10, 10, method="clopper-pearson") == pytest.approx((0.025 ** (1 / 10), 1.0))
    lo, hi = binomial_ci(3, 10, method="clopper-pearson")
    assert (round(lo, 4), round(hi, 4)) == (0.0667, 0.6525)  # tabulated exact interval
    assert binomial_ci(3, 10, 0.99, "clopper-pearson")[1] > hi  # wider at 99%
    assert all(math.isnan(x) for x in binomial_ci(0, 0))
    assert binomial_ci(0, 5)[0] == 0.0 and binomial_ci(5, 5)[1] == 1.0  # exact, not 1e-19 off
    # Newcombe's difference interval from the two Wilson intervals
    d, dlo, dhi = difference_ci(8, 10, 2, 10)
    l1, u1 = binomial_ci(8, 10)
    l2, u2 = binomial_ci(2, 10)
    assert d == pytest.approx(0.6)
    assert dlo == pytest.approx(0.6 - math.hypot(0.8 - l1, u2 - 0.2))
    assert dhi == pytest.approx(0.6 + math.hypot(u1 - 0.8, 0.2 - l2))


def test_word_matching_ignores_case_spaces_and_markers():
    assert normalize_token("ĠPerson") == "person" and normalize_token("▁Face") == "face"
    assert normalize_token(" Seven\n") == "seven" and normalize_token(None) == ""
    assert match_words(["Ġthe", "ĠCat", "cat"], ["CAT"]) == (2, "cat")
    assert match_words(["surface", "faces"], ["face"]) == (None, None)  # exact words, not substrings
    t = pd.DataFrame(
        {
            "group": ["sink"] * 4 + ["nonsink"] * 4,
            "label": ["a", "a", "b", "z"] * 2,
            "scope": ["target", "target", "target", "control"] * 2,
            "image": [0, 1, 2, 3] * 2,
            "hit": [True, False, True, False, False, False, False, False],
            "hit_any": [True, False, True, True, False, False, False, False],
        }
    )
    r = rate_table(t).set_index(["group", "scope"])
    assert r.loc[("sink", "all"), ["n_tokens", "n_hits"]].tolist() == [3, 2]
    assert r.loc[("sink", "label=a"), "rate"] == 0.5 and r.loc[("sink", "label=b"), "rate"] == 1.0
    assert r.loc[("sink", "control"), ["n_tokens", "n_hits"]].tolist() == [1, 1]
    assert r.loc[("nonsink", "all"), "n_hits"] == 0


def test_planted_sinks_decode_to_the_chosen_word(edited):
    ad, cat = edited
    res = decode_rate(ad, _planted_set(), words={"cat": ["Cat", "kitten"]}, rule=RULE, progress=False)
    pt = res.per_token
    sinks = pt[pt.group == "sink"]
    # the sinks are exactly the painted cells, and every one decodes to "cat" first
    got = sorted((int(r.image), int(r.row), int(r.col)) for r in sinks.itertuples())
    assert got == sorted((i, r, c) for i, cells in enumerate(PLANTED) for r, c in cells)
    assert (sinks.hit & (sinks.hit_rank == 1) & (sinks.hit_word == "cat")).all()
    assert all(json.loads(s)[0] == cat for s in sinks.top_ids)
    assert not pt[pt.group == "nonsink"].hit_any.any()
    rates = res.rates.set_index(["group", "scope"])
    assert rates.loc[("sink", "all"), ["n_tokens", "n_hits", "rate"]].tolist() == [4, 4, 1.0]
    assert rates.loc[("nonsink", "all"), ["n_tokens", "n_hits", "rate"]].tolist() == [24, 0, 0.0]
    assert rates.loc[("sink", "all"), ["ci_low", "ci_high"]].tolist() == pytest.approx(binomial_ci(4, 4))
    assert rates.loc[("nonsink", "all"), "ci_high"] == pytest.approx(binomial_ci(0, 24)[1])
    assert rates.loc[("sink", "control"), "n_tokens"] == 0  # unmarked images: no sink
    assert rates.loc[("nonsink", "control"), ["n_tokens", "n_hits"]].tolist() == [16, 0]
    s = res.summary
    assert s["rates"]["sink"]["rate"] == 1.0 and s["rates"]["nonsink"]["rate"] == 0.0
    assert s["rates"]["difference"]["sink_minus_nonsink"] == 1.0
    assert s["n_images_without_sink"] == 2 and s["control_labels"] == ["none"]
    assert (
        s["sink_rule"]["threshold"] == {"kind": "absolute", "value": 100} and not s["sink_rule"]["surrogate"]
    )
    # the literal masked forward (knockout.decode_isolated) gives the same answer
    mask = decode_rate(
        ad,
        _planted_set(),
        words={"cat": ["cat"]},
        rule=RULE,
        method="mask",
        nonsinks_per_image=2,
        progress=False,
    )
    m = mask.rates.set_index(["group", "scope"])
    assert m.loc[("sink", "all"), "rate"] == 1.0 and m.loc[("nonsink", "all"), "n_hits"] == 0


def test_batched_equals_masked_and_rate_is_a_direct_count(tiny):
    """On the unedited model: the one-token batched decoding gives decode_isolated's top-k, and
    the rates equal a hit count done by hand on decode_isolated's own output."""
    data = _planted_set()
    ref = decode_rate(tiny, data, words={"cat": ["cat"]}, rule=RULE, nonsinks_per_image=3, progress=False)
    pt = ref.per_token
    # decode_isolated on each image's full prompt, per chosen position
    direct = {}
    for i, it in enumerate(data.items):
        inp = tiny.build_inputs([it.load()], "What is the main object in the image?")
        kw = {k: inp[k] for k in ("input_ids", "pixel_values", "attention_mask")}
        rows = pt[pt.image == i]
        d = decode_isolated(
            lambda kw=kw: tiny.model(**kw),
            tiny.llm,
            rows.llm_position.tolist(),
            kw["input_ids"].shape[1],
            tiny.tokenizer,
            top_k=5,
        )
        for p, dd in d.groupby("position"):
            direct[(i, p)] = dd.sort_values("rank")
    for r in pt.itertuples():
        dd = direct[(r.image, r.llm_position)]
        assert json.loads(r.top_ids) == dd.token_id.tolist()
        assert json.loads(r.top_tokens) == dd.token.tolist()
        np.testing.assert_allclose(json.loads(r.top_probs), dd.prob.to_numpy(), rtol=1e-4, atol=1e-6)
    # a word that some decoded lists contain and others do not, then count by hand
    counts = pd.Series([t.lower() for dd in direct.values() for t in dd.token]).value_counts()
    n_lists = len(direct)
    word = next(w for w, c in counts.items() if 0 < c < n_lists and not w.startswith("<id"))
    res = decode_rate(
        tiny, data, words={"cat": [word.upper()]}, rule=RULE, nonsinks_per_image=3, progress=False
    )
    rates = res.rates.set_index(["group", "scope"])
    for g in ("sink", "nonsink"):
        keys = [(r.image, r.llm_position) for r in pt[(pt.group == g) & (pt.label == "cat")].itertuples()]
        hits = sum(word in [t.lower() for t in direct[k].token] for k in keys)
        assert rates.loc[(g, "all"), ["n_tokens", "n_hits"]].tolist() == [len(keys), hits]
        ctrl = [(r.image, r.llm_position) for r in pt[(pt.group == g) & (pt.label == "none")].itertuples()]
        ctrl_hits = sum(word in [t.lower() for t in direct[k].token] for k in ctrl)
        if ctrl:
            assert rates.loc[(g, "control"), ["n_tokens", "n_hits"]].tolist() == [len(ctrl), ctrl_hits]


def test_top_norm_surrogate_and_seeded_nonsinks(tiny):
    data = _planted_set()
    res = decode_rate(
        tiny, data, words={"cat": ["cat"]}, rule=TopNormRule(1), nonsinks_per_image=2, progress=False
    )
    pt = res.per_token
    sinks = pt[pt.group == "sink"]
    assert len(sinks) == len(PLANTED)  # one "sink" per image, marked or not
    for i, cells in enumerate(PLANTED):
        if cells:  # the highest-norm patch is a planted one
            assert tuple(sinks[sinks.image == i][["row", "col"]].iloc[0]) in cells
    assert res.summary["sink_rule"]["surrogate"] and any("surrogate" in c for c in res.summary["caveats"])
    again = decode_rate(
        tiny,
        data,
        words={"cat": ["cat"]},
        rule=TopNormRule(1),
        nonsinks_per_image=2,
        batch_size=2,
        progress=False,
    )
    pd.testing.assert_frame_equal(pt, again.per_token)  # the non-sink sample does not depend on batching


def test_cli_decode_writes_tables_summary_and_page(tmp_path):
    out = tmp_path / "dec"
    rc = main(
        [
            "decode",
            "--model",
            "tiny-llava+sinks",
            "--dataset",
            "lfw-faces",
            "--max-images",
            "6",
            "--nonsinks",
            "3",
            "--ci",
            "clopper-pearson",
            "--out",
            str(out),
            "-q",
        ]
    )
    assert rc == 0
    rates = pd.read_csv(out / "decode_rate.csv")
    tokens = pd.read_csv(out / "decode_tokens.csv")
    summary = json.loads((out / "summary.json").read_text())
    assert set(rates.group) == {"sink", "nonsink"} and "control" in set(rates.scope)
    assert (rates.ci_method == "clopper-pearson").all()
    assert len(tokens) == 6 * 3 and set(tokens.label) == {"face", "non-face"}  # no clear norm gap: no sink
    # the default of every command (issue 25.6; was 5x the median here, the automatic gap elsewhere)
    assert summary["sink_rule"]["threshold"] == {"kind": "auto", "value": None}
    assert summary["sink_rule"]["spec"] == "norm" and summary["sink_rule"]["reason"].startswith("no rule given")
    assert summary["words"]["face"][:2] == ["face", "faces"] and summary["dataset"].startswith("lfw-faces")
    html = (out / "decode.html").read_text()
    assert "Decoding rate: sink vs non-sink visual tokens" in html and "Findings" in html
    assert main(["decode", "--model", "tiny-llava+sinks", "--word", "nonsense", "--out", str(out)]) == 2  # a usage error


def test_cli_decode_refuses_a_folder_it_did_not_write(tmp_path, capsys):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "summary.json").write_text('{"my": "notes"}')
    args = [
        "decode",
        "--model",
        "tiny-llava+sinks",
        "--max-images",
        "2",
        "--nonsinks",
        "1",
        "-q",
        "--out",
        str(user),
    ]
    assert main(args) == 2  # refused before any work (issue 28: a usage error)
    assert (
        "did not write" in capsys.readouterr().err
        and (user / "summary.json").read_text() == '{"my": "notes"}'
    )
    # --overwrite replaces only sinkscope's own files: a user's summary.json is never one (issue 28)
    assert main([*args, "--overwrite"]) == 2
    assert "summary.json is not sinkscope's" in capsys.readouterr().err
    assert (user / "summary.json").read_text() == '{"my": "notes"}'
    (user / "summary.json").rename(user / "notes.json")
    assert main([*args, "--overwrite"]) == 0 and (user / "decode.html").exists()  # beside the user's file
    assert (user / "notes.json").read_text() == '{"my": "notes"}'
    assert main(args) == 0  # now its own folder: rerun allowed


def test_rate_figure_error_bars_are_the_intervals():
    from sinkscope.viz.decoding import decode_rate_figure

    t = pd.DataFrame(
        {
            "group": ["sink"] * 10 + ["nonsink"] * 20,
            "label": "cat",
            "scope": "target",
            "image": list(range(10)) * 3,
            "hit": [True] * 8 + [False] * 2 + [True] * 2 + [False] * 18,
            "hit_any": False,
        }
    )
    rates = rate_table(t)
    fig = decode_rate_figure(
        rates, {"model": {"name": "m"}, "top_k": 5, "ci_method": "wilson", "confidence": 0.95}
    )
    sink = next(tr for tr in fig.data if tr.meta["group"] == "sink")
    lo, hi = binomial_ci(8, 10)
    assert sink.y[0] == pytest.approx(80.0)
    assert sink.error_y.array[0] == pytest.approx(100 * (hi - 0.8))
    assert sink.error_y.arrayminus[0] == pytest.approx(100 * (0.8 - lo))
    assert "wilson" in fig.layout.title.text and fig.layout.barmode == "group"


def test_an_unreadable_image_is_skipped_and_reported(tiny, tmp_path):
    good = _planted_set()
    bad = ImageItem("broken.png", str(tmp_path / "broken.png"))
    data = LabeledImages("with-bad", [*good.items, bad], pd.DataFrame({"label": [*LABELS, "cat"]}))
    res = decode_rate(tiny, data, words={"cat": ["cat"]}, rule=RULE, nonsinks_per_image=1, progress=False)
    assert [f["image"] for f in res.summary["failed"]] == ["broken.png"]
    assert set(res.per_token.image) == set(range(len(PLANTED)))


def test_errors_are_named(tiny):
    with pytest.raises(Exception, match="LLaVA-style"):
        decode_rate("tiny-clip", "lfw-faces", max_images=2, progress=False)
    with pytest.raises(Exception, match="no default word list"):
        decode_rate(tiny, _planted_set(), progress=False)
    with pytest.raises(Exception, match="auto_scope"):
        decode_rate(tiny, _planted_set(), words={"cat": ["cat"]}, rule=NormRule(), progress=False)


@pytest.mark.slow
def test_mini_llava_lfw_and_digits(tmp_path):
    ad = load_model("mini-llava-untrained")
    for ds, words in (("lfw-faces", "face"), ("digits", "7")):
        res = decode_rate(ad, ds, rule=TopNormRule(2), max_images=10, nonsinks_per_image=2, progress=False)
        s = res.summary
        assert "untrained" in s["warning"] and s["sink_rule"]["surrogate"]
        assert s["rates"]["sink"]["n_tokens"] == 2 * sum(
            n for lab, n in s["images_per_label"].items() if lab in s["words"]
        )
        assert words in s["words"]
        res.save(tmp_path / ds)
        assert write_result_page(res) == tmp_path / ds / "decode.html"
    # on the real SmolLM2 too, one-token batched decoding equals the masked full-prompt forward
    kw = dict(rule=TopNormRule(2), max_images=2, nonsinks_per_image=1, progress=False)
    a, b = decode_rate(ad, "lfw-faces", **kw), decode_rate(ad, "lfw-faces", method="mask", **kw)
    assert a.per_token.top_ids.tolist() == b.per_token.top_ids.tolist()
    pa = np.array([json.loads(x) for x in a.per_token.top_probs])
    np.testing.assert_allclose(pa, [json.loads(x) for x in b.per_token.top_probs], atol=1e-4)
