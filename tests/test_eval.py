"""The evaluation harness (issue 12): the shapes generator, items, scoring, MME's score, `evaluate`."""

from __future__ import annotations

import json
import random

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from sinkscope import SinkscopeError, load_model
from sinkscope.evaluation import shapes as S
from sinkscope.evaluation.items import load_items, load_manifest, real_items
from sinkscope.evaluation.mme import mme_score, read_results_folder
from sinkscope.evaluation.run import evaluate, results_table
from sinkscope.evaluation.scoring import (
    build_prompt,
    is_correct,
    normalize_answer,
    parse_yes_no,
    score_choices,
    score_choices_direct,
)
from sinkscope.evaluation.stats import bootstrap_ci


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llava")


# -- the generator -----------------------------------------------------------------------------------


def test_same_seed_same_items_and_splits_are_disjoint():
    a, b = S.items("test", n_per_task=6), S.items("test", n_per_task=6)
    assert a == b
    train = {json.dumps(S.scene(i, "train").to_dict()["shapes"]) for i in range(3000)}
    for split in ("validation", "test"):
        other = {json.dumps(S.scene(i, split).to_dict()["shapes"]) for i in range(1000)}
        assert not train & other
    seeds = {r["scene"]["seed"] for r in S.items("test", 6)} | {
        r["scene"]["seed"] for r in S.items("validation", 6)
    }
    assert len(seeds) == len({r["scene"]["seed"] for r in S.items("test", 6)}) + len(
        {r["scene"]["seed"] for r in S.items("validation", 6)}
    )


def test_every_answer_is_in_the_vocabulary_and_balanced():
    its = S.items("train", n_per_task=24)
    assert all(r["answer"] in S.VOCABULARY and r["answer"] in r["choices"] for r in its)
    counts = pd.DataFrame(its).groupby(["task", "answer"]).size()
    for task, (_, _, choices) in S.TASKS.items():
        c = counts[task]
        assert set(c.index) == set(choices) and c.max() - c.min() <= 1, task


def _pixel(im: np.ndarray, x: float, y: float) -> tuple[int, ...]:
    return tuple(int(v) for v in im[int(round(y)), int(round(x))])


def test_rendered_answers_follow_from_the_pixels():
    """Known answer from the picture itself: the background at the corners, each shape's fill at
    its centre, and shape-free quadrants hold only the background colour."""
    for i in range(40):
        sc = S.scene(i, "test")
        im = np.asarray(S.render(sc))
        bg = S.COLOURS[sc.background]
        assert _pixel(im, 2, 2) == bg and _pixel(im, 221, 221) == bg
        for q in S.QUADRANTS:
            x0 = 112 if q.endswith("right") else 0
            y0 = 112 if q.startswith("bottom") else 0
            block = im[y0 + 2 : y0 + 110, x0 + 2 : x0 + 110].reshape(-1, 3)
            empty = (block == bg).all(1).all()
            assert empty == (S.answer(sc, "quadrant_presence", q) == "no"), (i, q)
        for s in sc.shapes:
            assert _pixel(im, s.x, s.y) == S.COLOURS[s.colour]  # the centre (a triangle's centroid)
        for q in sc.single_quadrants():
            (s,) = sc.in_quadrant(q)
            assert S.answer(sc, "quadrant_colour", q) == s.colour
            assert (S.answer(sc, "matches_background", q) == "yes") == (s.colour == sc.background)


# -- items -------------------------------------------------------------------------------------------


def test_a_hand_written_manifest_loads_and_bad_rows_fail_in_one_line(tmp_path):
    Image.new("RGB", (16, 16), "blue").save(tmp_path / "b.png")
    rows = [
        {
            "image": "b.png",
            "question": "What colour?",
            "answer": "blue",
            "choices": ["red", "blue"],
            "task_type": "global",
        },
        {
            "image": "b.png",
            "question": "Anything here?",
            "answer": "no",
            "task_type": "Local",
            "task": "presence",
        },
    ]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    its = load_manifest(tmp_path / "m.jsonl")
    assert [(i.id, i.task_type, i.choices) for i in its] == [
        ("m-1", "global", ("red", "blue")),
        ("m-2", "local", None),
    ]
    assert its[0].image.load().shape == (16, 16, 3)
    (tmp_path / "c.csv").write_text(
        "image,question,answer,choices,task_type\nb.png,Colour?,blue,red|blue,mixed\n"
    )
    assert load_manifest(tmp_path / "c.csv")[0].choices == ("red", "blue")
    for bad, msg in (
        ({**rows[0], "image": "gone.png"}, r"row 1: image gone.png not found"),
        ({**rows[0], "answer": "green"}, r"answer 'green' is not among its choices"),
        ({**rows[0], "task_type": "holistic"}, r"task_type 'holistic' is not one of"),
        ({k: v for k, v in rows[0].items() if k != "question"}, r"missing question"),
    ):
        (tmp_path / "bad.jsonl").write_text(json.dumps(bad) + "\n")
        with pytest.raises(SinkscopeError, match=msg):
            load_manifest(tmp_path / "bad.jsonl")
    with pytest.raises(SinkscopeError, match="unknown task 'nope'"):
        load_items("nope")


def test_real_image_sets_use_their_own_labels_balanced_per_split():
    for name, tasks in (
        ("lfw-faces", {"face"}),
        ("digits", {"digit"}),
        ("textile", {"textile_defect", "textile_extent"}),
    ):
        test, train = real_items(name, "test"), real_items(name, "train")
        assert {i.task for i in test} == tasks
        assert not {i.image.source for i in test} & {i.image.source for i in train}
        for task in tasks:
            c = pd.Series([i.answer for i in test if i.task == task]).value_counts()
            assert c.max() == c.min(), (name, task, c.to_dict())
    ext = [i for i in real_items("textile", "validation") if i.task == "textile_extent"]
    assert {i.answer for i in ext} == {"local", "global"} and all(i.task_type == "global" for i in ext)


# -- scoring ------------------------------------------------------------------------------------------


def test_cached_candidates_equal_one_forward_per_candidate(tiny):
    it = load_items("shapes", limit=1)[0]
    prompt = build_prompt(tiny, it.image.load(), it.question)
    for choices in (it.choices, ("bright red colour", "dark blue", "x", "a very long answer indeed")):
        a, b = score_choices(tiny, prompt, choices), score_choices_direct(tiny, prompt, choices)
        np.testing.assert_allclose(a, b, atol=1e-5)
        assert np.argmax(a) == np.argmax(b)
    np.testing.assert_array_equal(score_choices(tiny, prompt, choices), a)  # the cache was cropped back


def test_answer_normalisation_and_yes_no_parsing():
    assert normalize_answer("The  Circle!") == "circle" and normalize_answer("Six") == "6"
    assert [parse_yes_no(t) for t in ("yes", "No.", "y", "Yes, it is", "nope", "I think so")] == [
        "yes", "no", "yes", "yes", "no", "other",
    ]  # fmt: skip
    assert is_correct("Yes.", "yes") and not is_correct("maybe", "no") and is_correct("3", "three")


def test_mme_score_on_a_fixture_in_mme_format(tmp_path):
    """Hand computation: color - image a both right, image b one of two: acc 75, acc+ 50 -> 125;
    OCR - one image, both wrong: 0; commonsense_reasoning - one image, both right: 200."""
    d = tmp_path / "mme"
    d.mkdir()
    (d / "color.txt").write_text(
        "a.jpg\tIs it red?\tYes\tYes\na.jpg\tIs it blue?\tNo\tno.\nb.jpg\tIs it red?\tYes\tyes\nb.jpg\tIs it green?\tNo\tYes\n"
    )
    (d / "OCR.txt").write_text("c.jpg\tDoes it say A?\tYes\tNo\nc.jpg\tDoes it say B?\tNo\tmaybe\n")
    (d / "commonsense_reasoning.txt").write_text("e.jpg\tQ1\tYes\ty\ne.jpg\tQ2\tNo\tNo, it is not\n")
    s = mme_score(read_results_folder(d))
    assert s["categories"]["color"]["acc"] == 75.0 and s["categories"]["color"]["acc_plus"] == 50.0
    assert (
        s["categories"]["OCR"]["score"] == 0.0 and s["categories"]["commonsense_reasoning"]["score"] == 200.0
    )
    assert (s["perception"], s["cognition"], s["total"]) == (125.0, 200.0, 325.0)


def test_bootstrap_intervals_contain_the_estimate():
    rng = random.Random(0)
    for n in (5, 40, 300):
        x = [rng.random() < 0.6 for _ in range(n)]
        lo, hi = bootstrap_ci(x, seed=1)
        assert lo <= np.mean(x) <= hi and 0 <= lo <= hi <= 1
    assert bootstrap_ci([True] * 10) == (1.0, 1.0)


def test_results_table_chance_and_majority():
    pred = pd.DataFrame(
        {
            "variant": ["default"] * 4,
            "task": ["t"] * 4,
            "task_type": ["global"] * 4,
            "answer": ["a", "a", "a", "b"],
            "choices": [["a", "b"]] * 4,
            "correct": [True, True, False, True],
        }
    )
    r = results_table(pred, n_boot=200)
    row = r[(r.task == "t")].iloc[0]
    assert (row.n, row.accuracy, row.chance, row.majority) == (4, 0.75, 0.5, 0.75)
    assert set(r.task_type) == {"global", "all"}


# -- the run -----------------------------------------------------------------------------------------


def test_evaluate_writes_its_files_and_resumes_without_duplicates(tiny, tmp_path, eval_calls):
    out = tmp_path / "ev"
    eval_calls(die_after=5)
    with pytest.raises(KeyboardInterrupt):
        evaluate(tiny, "shapes", out=out, limit=8, variants=("default", "no-image"), progress=False)
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 5
    with pytest.raises(SinkscopeError, match="pass resume=True"):
        evaluate(tiny, "shapes", out=out, limit=8, progress=False)
    calls = eval_calls()
    res = evaluate(
        tiny, "shapes", out=out, limit=8, variants=("default", "no-image"), resume=True, progress=False
    )
    assert len(calls) == 11
    lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 16 and len({(r["id"], r["variant"]) for r in lines}) == 16
    need = {"id", "task", "task_type", "question", "answer", "prediction", "correct", "scores"}
    assert need <= set(lines[0]) and all(len(r["scores"]) == len(r["choices"]) for r in lines)
    csv = pd.read_csv(out / "results.csv")
    assert {"task", "task_type", "variant", "n", "accuracy", "ci_low", "ci_high", "chance"} <= set(
        csv.columns
    )
    assert set(csv.variant) == {"default", "no-image"}
    # a fresh, uninterrupted run gives the same predictions
    again = evaluate(tiny, "shapes", limit=8, variants=("default", "no-image"), progress=False)
    key = ["id", "variant"]
    a = res.predictions.sort_values(key).reset_index(drop=True)
    b = again.predictions.sort_values(key).reset_index(drop=True)
    pd.testing.assert_series_equal(a.prediction, b.prediction)


def test_run_api_round_trip_and_page(tmp_path):
    from sinkscope import EvalConfig, load_run, run

    cfg = EvalConfig(
        model="tiny-llava", tasks=("shapes", "digits"), limit=4, out=str(tmp_path / "e"), n_boot=200
    )
    res = run(cfg, progress=False)
    assert (tmp_path / "e" / "eval.html").read_text().count("Accuracy by task type") >= 1
    back = load_run(tmp_path / "e")
    assert back.config == cfg and len(back.predictions) == len(res.predictions) == 4 + 4  # limit: per task
    again = run(back.config.replace(out=str(tmp_path / "f")), progress=False)
    pd.testing.assert_frame_equal(again.results, res.results)
    with pytest.raises(SinkscopeError, match="variants: choose from"):
        EvalConfig(variants=("blurred",))


def test_cli_and_api_give_the_same_results(tmp_path):
    from sinkscope import EvalConfig, run
    from sinkscope.cli import main

    argv = [
        "eval",
        "--model",
        "tiny-llava",
        "--tasks",
        "shapes",
        "--limit",
        "8",
        "-q",
        "--out",
        str(tmp_path / "cli"),
    ]
    assert main(argv) == 0
    run(EvalConfig(model="tiny-llava", tasks=("shapes",), limit=8, out=str(tmp_path / "api")), progress=False)
    pd.testing.assert_frame_equal(
        pd.read_csv(tmp_path / "cli" / "results.csv"), pd.read_csv(tmp_path / "api" / "results.csv")
    )
    assert json.loads((tmp_path / "cli" / "config.json").read_text())["tasks"] == ["shapes"]
    assert (
        main(["eval", "--model", "tiny-llava", "--tasks", "nope.txt", "-q", "--out", str(tmp_path / "x")])
        == 1
    )
