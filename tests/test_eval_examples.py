"""The Examples section of ``eval.html`` (issue 26, section 3): a seeded sample of items per task
type with the picture, the patch grid, the ViT sinks, the tokens each variant fed, the predictions
with their candidate scores and right / wrong; filterable in the page."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from sinkscope.viz.eval_report import example_data, examples_html, sample_examples

VARIANTS = ("both", "sink-only", "nonsink-only")


def _eval(out: Path, *extra: str) -> Path:
    from sinkscope.cli import main

    assert main(["eval", "--model", "tiny-llava+sinks", "--tasks", "shapes", *extra, "--out", str(out), "-q"]) == 0
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """The issue's run: 16 shapes items, three token variants, the model's default sink rule."""
    return _eval(tmp_path_factory.mktemp("ev") / "tmp", "--limit", "16", "--variant", ",".join(VARIANTS))


@pytest.fixture(scope="module")
def sink_run(tmp_path_factory) -> Path:
    """A run with a known number of sinks per image (top-2 by norm), their order moved."""
    return _eval(tmp_path_factory.mktemp("ev") / "t2", "--limit", "8", "--variant", "both,sinks-front", "--sink-rule", "topk:2")


def _page(d: Path) -> str:
    return (d / "eval.html").read_text(encoding="utf-8")


def _data(page: str) -> list[dict]:
    m = re.search(r"<script type='application/json' id='eval-examples-data'>(.*?)</script>", page, re.S)
    assert m, "no examples data in the page"
    return json.loads(m.group(1).replace("<\\/", "</"))


def _dom_sinks(page: str) -> dict[str, set[tuple[int, int]]]:
    """The sink cells drawn over each example's picture, from the page's HTML."""
    out = {}
    for chunk in page.split("<div class='ex' data-id='")[1:]:
        item_id = chunk.split("'", 1)[0]
        img_col = chunk.split("<div class='ex-body'>", 1)[0]
        out[item_id] = {tuple(int(x) for x in c.split(",")) for c in re.findall(r"data-cell='(\d+,\d+)'", img_col)}
    return out


def _check_against_run(d: Path) -> list[dict]:
    page = _page(d)
    assert "<h3>Examples</h3>" in page
    data = _data(page)
    pred = pd.read_json(d / "predictions.jsonl", lines=True, dtype=False)
    fed = pd.read_parquet(d / "tokens_fed.parquet")
    # every task type of the run has examples: up to 4 each, chosen again the same way
    n_items = pred.drop_duplicates("id").groupby("task_type").size()
    per_type = pd.Series([ex["task_type"] for ex in data]).value_counts()
    assert set(per_type.index) == set(n_items.index)
    for tt, n in n_items.items():
        assert per_type[tt] == min(4, n), tt
    assert [ex["id"] for ex in data] == sample_examples(pred)
    dom = _dom_sinks(page)
    for ex in data:
        mine = fed[fed.id == ex["id"]]
        placed = mine[mine.row.notna()]
        # the sinks drawn over the picture: the is_vit_sink rows of tokens_fed
        sinks = {(int(r), int(c)) for r, c in zip(placed[placed.is_vit_sink].row, placed[placed.is_vit_sink].col)}
        assert {tuple(c) for c in ex["sink_cells"]} == sinks == dom[ex["id"]], ex["id"]
        assert ex["grid"] == [int(placed.row.max()) + 1, int(placed.col.max()) + 1]
        assert ex["image"] and ex["question"] and ex["answer"]
        p = pred[pred.id == ex["id"]].set_index("variant")
        assert [v["variant"] for v in ex["variants"]] == list(p.index)
        for v in ex["variants"]:
            row = p.loc[v["variant"]]
            assert v["prediction"] == row.prediction and v["correct"] == bool(row.correct)
            assert v["scores"] == pytest.approx(row.scores) and v["prediction"] in v["scores"]
            assert ex["answer"] == row.answer
            f = mine[mine.variant == v["variant"]]
            assert v["n_fed"] == int(f.llm_position.notna().sum()) and v["n_tokens"] == len(f)
            assert v["n_sinks_fed"] == int(f[f.llm_position.notna()].is_vit_sink.sum())
            cols = ex["grid"][1]
            for r, c, s, pos in zip(f.row, f.col, f.is_vit_sink, f.llm_position):
                want = ("S" if s else "F") if pd.notna(pos) else ("s" if s else ".")
                assert v["cells"][int(r) * cols + int(c)] == want
            mark = "&#10003; right" if v["correct"] else "&#10007; wrong"
            panel = f"data-variant='{v['variant']}' data-correct='{int(v['correct'])}'"
            assert panel in page and mark in page
            assert f"fed {v['n_fed']} of {v['n_tokens']} tokens" in page
    return data


def test_examples_match_the_run(run):
    data = _check_against_run(run)
    assert sum(len(ex["variants"]) for ex in data) == 3 * len(data)
    assert all(ex["grid"] == [4, 4] for ex in data)
    for ex in data:  # sink-only feeds the sinks alone, nonsink-only all the others
        by = {v["variant"]: v for v in ex["variants"]}
        assert by["sink-only"]["n_fed"] + by["nonsink-only"]["n_fed"] == by["both"]["n_fed"] == 16
    page = _page(run)
    assert page.count("<img src='data:image/jpeg;base64,") == len({ex["id"] for ex in data})  # a picture each
    assert len(page[page.index("<h3>Examples</h3>") : page.index("<h3>Per task</h3>")]) < 400_000  # modest size


def test_known_sinks_are_marked(sink_run):
    data = _check_against_run(sink_run)
    assert all(len(ex["sink_cells"]) == 2 for ex in data)  # topk:2: two sinks on every picture
    orders = {v["order"] for ex in data for v in ex["variants"] if v["variant"] == "sinks-front"}
    assert "sinks first" in orders and orders <= {"sinks first", "ViT order"}
    assert all(v["n_sinks_fed"] == 2 for ex in data for v in ex["variants"])


def test_sample_is_seeded_and_deterministic(run):
    pred = pd.read_json(run / "predictions.jsonl", lines=True, dtype=False)
    a = sample_examples(pred, per_type=2, seed=0)
    assert a == sample_examples(pred.sample(frac=1, random_state=3), per_type=2, seed=0)  # row order does not matter
    assert len(a) == 2 * pred.task_type.nunique()
    assert len(sample_examples(pred, per_type=100, cap=5)) == 5


def test_cls_sink_badge_and_missing_picture():
    pred = pd.DataFrame([{"id": "q", "image": "nowhere.png", "question": "Q?", "answer": "a", "task_type": "global",
                          "task": "t", "variant": "both", "prediction": "b", "correct": False,
                          "scores": {"a": -2.0, "b": -1.0}, "mode": "choice"}])  # fmt: skip
    fed = pd.DataFrame({
        "id": "q", "variant": "both", "image": 0, "vit_token": [0, 1, 2, 3, 4],
        "row": pd.array([None, 0, 0, 1, 1], dtype="Int64"), "col": pd.array([None, 0, 1, 0, 1], dtype="Int64"),
        "norm": 1.0, "is_vit_sink": [True, False, True, False, False],
        "llm_position": pd.array([1, 2, None, 3, 4], dtype="Int64"), "position_id": pd.array([1, 2, None, 3, 4], dtype="Int64"),
    })  # fmt: skip
    ex = example_data(pred, fed, ["q"])[0]
    assert ex["extra_tokens"] == [{"vit_token": 0, "name": "CLS", "sink": True}]
    assert ex["sink_cells"] == [[0, 1]] and ex["variants"][0]["cells"] == "FsFF"
    assert ex["variants"][0]["n_fed"] == 4 and ex["variants"][0]["extra_fed"] == {"0": True}
    page = examples_html(pred, fed, {"tasks": ["not", "loadable"]})
    assert "CLS sink</span>" in page and "(picture not available)" in page and "data-cell='0,1'" in page
    assert "CLS fed" in page and "&#10007; wrong" in page
    assert examples_html(pred.iloc[:0], None, {}) == ""


# -- in a browser ------------------------------------------------------------------------------------

_VISIBLE_JS = """() => Array.from(document.querySelectorAll('#eval-examples .ex'))
    .filter(e => e.offsetParent !== null)
    .map(e => ({id: e.dataset.id, panels: Array.from(e.querySelectorAll('.ex-var'))
        .filter(p => p.offsetParent !== null).map(p => p.dataset.variant)}))"""


def test_filters_work_in_a_browser(run):
    from playwright.sync_api import sync_playwright

    from .browser import CHROMIUM_ARGS, render_report, require_browser

    exe = require_browser()
    chk = render_report(run / "eval.html")
    assert chk.ok, chk.problems()  # no JS errors, nothing from the network, every figure drawn
    data = _data(_page(run))
    wrong = lambda ex, v=None: any(not x["correct"] for x in ex["variants"] if v in (None, x["variant"]))  # noqa: E731
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=list(CHROMIUM_ARGS))
        try:
            page = browser.new_page()
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.route("**/*", lambda r: r.continue_() if r.request.url.startswith(("file:", "data:")) else r.abort())
            page.goto((run / "eval.html").resolve().as_uri(), wait_until="load")

            def pick(task_type="", variant="", result=""):
                for name, value in (("task_type", task_type), ("variant", variant), ("result", result)):
                    page.select_option(f"#eval-examples select[name={name}]", value)
                return page.evaluate(_VISIBLE_JS)

            everything = pick()
            assert [e["id"] for e in everything] == [ex["id"] for ex in data]
            assert all(e["panels"] == list(VARIANTS) for e in everything)
            assert page.inner_text("#eval-examples .ex-count") == f"showing {len(data)} of {len(data)} examples"
            for tt in {ex["task_type"] for ex in data}:
                assert [e["id"] for e in pick(task_type=tt)] == [ex["id"] for ex in data if ex["task_type"] == tt]
            shown = pick(variant="sink-only")
            assert len(shown) == len(data) and all(e["panels"] == ["sink-only"] for e in shown)
            assert [e["id"] for e in pick(result="wrong")] == [ex["id"] for ex in data if wrong(ex)]
            assert [e["id"] for e in pick(result="right")] == [ex["id"] for ex in data if not all(wrong(ex, v) for v in VARIANTS)]
            for v in VARIANTS:
                got = pick(variant=v, result="wrong")
                assert [e["id"] for e in got] == [ex["id"] for ex in data if wrong(ex, v)], v
            tt = data[0]["task_type"]
            got = pick(task_type=tt, variant="both", result="wrong")
            want = [ex["id"] for ex in data if ex["task_type"] == tt and wrong(ex, "both")]
            assert [e["id"] for e in got] == want
            assert page.inner_text("#eval-examples .ex-count") == f"showing {len(want)} of {len(data)} examples"
        finally:
            browser.close()
    assert not errors, errors
