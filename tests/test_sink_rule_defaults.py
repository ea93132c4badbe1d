"""One meaning of "ViT sink" per run (issue 25, point 6): every entry point that marks ViT sinks
resolves the same rule for the same model - the automatic per-image norm gap on a user's checkpoint,
the rule a built-in model declares on ``mini-llava`` - records it with its reason, and an explicit
rule given by the user wins everywhere.

The user's checkpoint is a LLaVA saved with ``save_pretrained`` and a plain ``LlavaProcessor``
(CLIP tower with planted sinks: a marker-coloured 8 px cell has an L2 norm near 800 at the feature
layer, every other patch near 10), loaded back from its folder, so it carries no attribute of
sinkscope's builders. Image ``A`` has one marked cell, ``B`` three: the automatic gap finds A's one
sink and none in B (three of sixteen patches are more than its 10% cap), ``norm:100`` finds all four.
Before this change the default was ``norm >= 100`` in propagation, 5x the median in flow, relevancy,
redundancy, rollout and probe groups, top-2 on mini-llava else 5x the median in decode, and the
automatic gap in eval and DIYSink.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import transformers as T
from PIL import Image

from sinkscope import load_model, paint_markers
from sinkscope._utils import SinkscopeError
from sinkscope.cli import main
from sinkscope.data import ImageItem, load_dataset
from sinkscope.diysink.connector import make_dual
from sinkscope.evaluation.items import VQAItem
from sinkscope.evaluation.run import evaluate
from sinkscope.flow.decoding import decode_rate
from sinkscope.flow.propagation import propagation
from sinkscope.flow.redundancy import redundancy
from sinkscope.flow.relevancy import vlm_relevancy
from sinkscope.flow.rollout_tables import vit_flow_tables
from sinkscope.flow.run import run_flow
from sinkscope.interventions import default_rule, rule_from
from sinkscope.interventions.rules import DEFAULT_REASON
from sinkscope.models.tiny import tiny_tokenizer
from sinkscope.probing.features import extract_group_features
from sinkscope.scanning import scan

CELLS = {"A": [(1, 2)], "B": [(0, 0), (2, 3), (3, 1)]}
#: the automatic gap: A's one sink; none in B (3 of 16 patches pass the gap's 10% cap)
AUTO = {"A": {(1, 2)}, "B": set()}
#: the paper's rule, given: every marked cell
PAPER = {"A": {(1, 2)}, "B": set(CELLS["B"])}


def _image(name: str) -> np.ndarray:
    return paint_markers(np.full((32, 32, 3), 90 if name == "A" else 150, np.uint8), CELLS[name])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The images as files: ``imgs/A.png``, ``imgs/B.png`` and a labelled set ``ds/<label>/<name>.png``."""
    root = tmp_path_factory.mktemp("sinkrule")
    for name in CELLS:
        (root / "ds" / name.lower()).mkdir(parents=True)
        (root / "imgs").mkdir(exist_ok=True)
        for path in (root / "imgs" / f"{name}.png", root / "ds" / name.lower() / f"{name}.png"):
            Image.fromarray(_image(name)).save(path)
    return root


@pytest.fixture(scope="module")
def user_ckpt(tmp_path_factory) -> str:
    """tiny-llava with planted sinks, saved as a user's folder (weights + LlavaProcessor)."""
    d = tmp_path_factory.mktemp("ckpt") / "llava"
    load_model("tiny-llava+sinks").model.save_pretrained(d)
    T.LlavaProcessor(
        image_processor=T.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tiny_tokenizer(),
        patch_size=8,
        vision_feature_select_strategy="default",
        image_token="<image>",
        num_additional_image_tokens=1,
    ).save_pretrained(d)
    return str(d)


def _items() -> list[ImageItem]:
    return [ImageItem(n, n, loader=lambda n=n: _image(n)) for n in CELLS]


def _cells(df: pd.DataFrame, name: str, sink: str) -> dict[str, set]:
    """image name (``A`` of ``a/A.png``) -> the (row, col) of its rows marked ``sink``."""
    out: dict[str, set] = {n: set() for n in CELLS}
    for n, r, c in df.loc[df[sink].astype(bool), [name, "row", "col"]].itertuples(index=False):
        out[Path(str(n)).stem].add("cls" if pd.isna(r) else (int(r), int(c)))  # CLS has no cell
    return out


def _token_cells(names, tokens, width: int) -> dict[str, set]:
    """image name -> the (row, col) of its ViT tokens (CLS first, then the grid, ``width`` wide)."""
    out: dict[str, set] = {n: set() for n in CELLS}
    for n, t in zip(names, tokens):
        out[Path(str(n)).stem].add("cls" if int(t) == 0 else divmod(int(t) - 1, width))
    return out


def _entry_points(model: str, rule, root, tmp_path, heavy: bool = True) -> dict[str, tuple[str, str | None, dict]]:
    """Every entry point that marks ViT sinks, run on ``model`` with ``rule`` (``None``: none
    given): entry -> (the rule's string, the reason recorded, image name -> sink cells)."""
    got: dict[str, tuple[str, str | None, dict]] = {}
    ad = load_model(model)
    fl, imgs, names = ad.feature_layer, [it.load() for it in _items()], list(CELLS)
    width = ad.vision.prepare(imgs[:1]).layouts[0].grid[1]

    # the Python functions, each called alone
    prop = propagation(ad, imgs, "<image> and <image> what is this ?", vit_rule=rule)
    vt = prop.visual_tokens.assign(name=[names[i] for i in prop.visual_tokens.image])
    got["propagation()"] = (prop.summary["vit_rule"]["spec"], prop.summary["vit_rule"]["reason"], _cells(vt, "name", "is_vit_sink"))
    red = redundancy(ad, imgs, names=names, rule=rule)
    det = red.table[red.table.layer == red.summary["detection_layer"]]
    got["redundancy()"] = (red.summary["rule"]["spec"], red.summary["rule"]["reason"], _cells(det, "image", "is_sink"))
    roll = vit_flow_tables(ad.vision, imgs, names, rule, fl)["rollout"]
    starts = roll[roll.start_kind == "sink"][["image", "start"]].drop_duplicates()
    got["vit_flow_tables()"] = (None, None, _token_cells(starts.image, starts.start, width))
    rel = vlm_relevancy(ad, imgs, "<image> and <image> what is this ?", vit_rule=rule, names=names)
    got["vlm_relevancy()"] = (rel.summary["vit_rule"]["spec"], rel.summary["vit_rule"]["reason"],
                              _cells(rel.table, "image_name", "is_vit_sink"))  # fmt: skip
    ds = load_dataset(str(root / "ds"))
    dec = decode_rate(ad, ds, words={"a": ["a"], "b": ["b"]}, rule=rule, nonsinks_per_image=0, progress=False)
    sinks = dec.per_token[dec.per_token.group == "sink"].assign(sink=True)
    got["decode_rate()"] = (dec.summary["sink_rule"]["spec"], dec.summary["sink_rule"]["reason"], _cells(sinks, "image_name", "sink"))

    # probe groups: the sink group pools each image's sinks at the feature layer
    f = extract_group_features(ad, ds, [fl], ["sink"], rule=rule, cache=False, progress=False)
    n, pos = f.n_tokens[(fl, "sink")], f.pos[(fl, "sink")]
    probe_cells = {Path(nm).stem: ({tuple(int(v) for v in p)} if k == 1 else k) for nm, k, p in zip(f.names, n, pos)}
    got["probe groups"] = (f.meta["rule"]["spec"], f.meta["rule"]["reason"], {k: (v if v else set()) for k, v in probe_cells.items()})

    # eval's interventions: the tokens fed under sinks-front
    items = [VQAItem(n, it, "what is this ?", "yes", "global", task="t", choices=("yes", "no")) for n, it in zip(names, _items())]
    ev = evaluate(ad, items, variants=("sinks-front",), sink_rule=rule, progress=False)
    iv = ev.summary["interventions"]
    got["eval interventions"] = (rule_from(iv["rule"]).spec(), iv["rule_reason"], _cells(ev.tokens_fed, "id", "is_vit_sink"))

    # DIYSink's dual connector (on a fresh copy: make_dual changes the model in place)
    fresh = load_model(model)
    dual = make_dual(fresh, rule=rule)
    got["diysink make_dual"] = (dual.rule.spec(), fresh.model.config.diysink["rule_reason"], None)

    # the commands, from the command line
    flag = [] if rule is None else ["--sink-rule", str(rule)]
    analyses = ["--analysis", "all"] if heavy else ["--analysis", "rollout", "--analysis", "propagation", "--analysis", "decode"]
    out = tmp_path / "flow"
    assert main(["flow", "--model", model, "--images", str(root / "imgs"), "--prompt", "<image> and <image> what is this ?",
                 *analyses, *flag, "--variant", "sinks-front", "--out", str(out), "-q"]) == 0  # fmt: skip
    s = json.loads((out / "summary.json").read_text())
    vt = pd.read_parquet(out / "visual_tokens.parquet")
    got["sinkscope flow"] = (s["vit_rule"]["spec"], s["vit_rule"]["reason"], _cells(vt, "image_name", "is_vit_sink"))
    fed = pd.read_parquet(out / "tokens_fed.parquet")
    got["sinkscope flow tokens_fed"] = (None, None, _cells(fed[fed.variant == "sinks-front"], "id", "is_vit_sink"))
    for table, col in (("decode", "is_vit_sink"), ("relevancy", "is_vit_sink")):
        if (out / f"{table}.csv").exists():
            t = pd.read_csv(out / f"{table}.csv")
            # decode.csv holds the sinks and a sample of non-sinks: its sinks are the rule's
            t = t[t[col].astype(bool)]
            got[f"sinkscope flow {table}.csv"] = (None, None, _token_cells(t.image_name, t.vit_token, width))
    out = tmp_path / "decode"
    assert main(["decode", "--model", model, "--dataset", str(root / "ds"), "--word", "a=a", "--word", "b=b",
                 "--nonsinks", "0", "--max-images", "0", *flag, "--out", str(out), "-q"]) == 0  # fmt: skip
    s = json.loads((out / "summary.json").read_text())
    t = pd.read_csv(out / "decode_tokens.csv")
    got["sinkscope decode"] = (s["sink_rule"]["spec"], s["sink_rule"]["reason"], _cells(t.assign(sink=t.group == "sink"), "image_name", "sink"))
    return got


def _check(got, spec: str, reason, cells) -> None:
    """Every entry point resolved ``spec`` (with ``reason``: a string, or a predicate) and marked ``cells``."""
    for entry, (s, why, c) in got.items():
        if s is not None:
            assert s == spec, entry
        if why is not None:
            assert (reason(why) if callable(reason) else why == reason), (entry, why)
        if c is None:
            continue
        for name, want in cells.items():
            if isinstance(c[name], (int, np.integer)):  # the probe pools several sinks: their count
                assert c[name] == len(want), (entry, name)
            else:
                assert c[name] == want, (entry, name, c[name])


def test_every_entry_point_resolves_the_automatic_gap_on_a_users_checkpoint(user_ckpt, data, tmp_path):
    ad = load_model(user_ckpt)
    assert default_rule(ad) == (default_rule(ad)[0], DEFAULT_REASON) and default_rule(ad)[0].spec() == "norm"
    got = _entry_points(user_ckpt, None, data, tmp_path)
    assert len(got) == 13
    _check(got, "norm", DEFAULT_REASON, AUTO)
    # scan's per-image automatic rule marks the same patches at the fed layer
    res = scan(user_ckpt, images=_items(), layers=str(ad.feature_layer), auto_scope="image", progress=False)
    tok = res.tokens[(res.tokens.layer == ad.feature_layer) & (res.tokens.kind == "patch")]
    assert _cells(tok, "image", "is_sink") == AUTO


def test_an_explicit_rule_wins_everywhere(user_ckpt, data, tmp_path):
    got = _entry_points(user_ckpt, "norm:100", data, tmp_path)
    _check(got, "norm:100", "given", PAPER)
    # the old flags still say the same rule
    for cmd, extra in (("flow", ["--images", str(data / "imgs"), "--analysis", "rollout"]),
                       ("decode", ["--dataset", str(data / "ds"), "--word", "a=a", "--max-images", "0"])):  # fmt: skip
        out = tmp_path / f"old-{cmd}"
        assert main([cmd, "--model", user_ckpt, *extra, "--vit-threshold", "100", "--out", str(out), "-q"]) == 0
        s = json.loads((out / "summary.json").read_text())
        assert (s.get("vit_rule") or s.get("sink_rule"))["spec"] == "norm:100"


#: the entry points that can mark the CLS token mini-llava feeds (the others mark sinks among patches)
CLS_ENTRIES = {"eval interventions", "diysink make_dual", "decode_rate()", "sinkscope decode"}


@pytest.mark.slow
def test_mini_llava_uses_its_declared_rule_everywhere_unless_told_otherwise(data, tmp_path):
    """Issue 26: mini-llava feeds CLS and declares ``cls``; an analysis that marks sinks among the
    patches takes the declared patch rule (``topk:4``) instead, and says why."""
    ad = load_model("mini-llava")
    rule, why = default_rule(ad)
    assert rule.spec() == "cls" and why.startswith("declared by the built-in model mini-llava: DINOv2-S's sink is its CLS token")
    rule, why = default_rule(ad, cls=False)
    assert rule.spec() == "topk:4" and "for analyses that mark sinks among the patches" in why
    got = _entry_points("mini-llava", None, data, tmp_path, heavy=False)

    for entry, (s, w, c) in got.items():
        assert w is None or w.startswith("declared by the built-in model mini-llava"), entry
        if entry in CLS_ENTRIES:
            assert s == "cls", entry
            assert c is None or all(v == {"cls"} for v in c.values()), (entry, c)  # CLS alone, every image
        else:
            assert s in (None, "topk:4") and (w is None or "among the patches" in w), (entry, w)
            if c is not None:
                assert all(len(v) == 4 if isinstance(v, set) else v == 4 for v in c.values()), (entry, c)
    # the same four patches of each image in every patch analysis: propagation's are the reference
    ref = got["propagation()"][2]
    for entry in set(got) - CLS_ENTRIES - {"probe groups"}:
        assert got[entry][2] == ref, entry
    # an explicit rule wins over the declaration
    out = tmp_path / "given"
    assert main(["flow", "--model", "mini-llava", "--images", str(data / "imgs"), "--analysis", "rollout",
                 "--sink-rule", "norm", "--out", str(out), "-q"]) == 0  # fmt: skip
    assert json.loads((out / "summary.json").read_text())["vit_rule"]["reason"] == "given"


def test_a_rule_an_analysis_cannot_apply_is_refused_in_one_line(user_ckpt, data, tmp_path, capsys):
    ad = load_model(user_ckpt)
    with pytest.raises(SinkscopeError, match=r"^flow: the sink rule 'attention:2' needs the attention each ViT token receives"):
        run_flow(ad, _items(), analyses=("propagation",), sink_rule="attention:2", progress=False)
    with pytest.raises(SinkscopeError, match=r"reads the ViT sinks at layer 3, but the rule 'norm@1' names layer 1; drop @1$"):
        propagation(ad, [_image("A")], "what is this ?", vit_rule="norm@1")
    with pytest.raises(SinkscopeError, match="the sink rule 'cls' names the CLS token, but probe marks sinks among the patches"):
        extract_group_features(ad, load_dataset(str(data / "ds")), [3], ["sink"], rule="cls", cache=False)
    assert main(["flow", "--model", user_ckpt, "--images", str(data / "imgs"), "--sink-rule", "cls", "--out", str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the sink rule 'cls' names the CLS token" in err[0]
    with pytest.raises(SystemExit):  # argparse: one rule, in one spelling
        main(["decode", "--model", user_ckpt, "--sink-rule", "norm:1", "--top-norm", "2"])
    assert "not allowed with argument" in capsys.readouterr().err
