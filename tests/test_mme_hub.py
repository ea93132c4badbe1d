"""MME from the hub's layout (issue 25, point 2): the two questions of an image paired by
``question_id`` as lmms-eval pairs them, a set without two questions per image refused before any
model work, and MME's prompt as lmms-eval writes it.

Every set here is the hub-format mock of :mod:`tests.fixtures_user` (parquet files under ``data/``,
loaded by the same ``datasets.load_dataset`` call as ``hf:lmms-lab/MME``). The reference numbers
come from :func:`lmms_eval_scores`, a small re-implementation of lmms-eval's ``mme_process_results``
and ``mme_aggregate_results`` written for this test (answer parsing included).
"""

from __future__ import annotations

import json
from collections import defaultdict

import pytest

from sinkscope.evaluation import run as run_mod
from sinkscope.evaluation.items import hf_items, limit_items, load_items, load_manifest
from sinkscope.evaluation.mme import MMEPairError, mme_score
from sinkscope.evaluation.run import evaluate

from .fixtures_user import mme_mock, mme_rows

MME_SUFFIX = "\nAnswer the question using a single word or phrase."

# Hand-chosen answers, by item id (question_id#row). Each image's first question has answer Yes,
# its second No. color: image 000 both right, 001 and 002 one of two, 003 none -> acc 4/8 = 50,
# acc+ 1/4 = 25, score 75; commonsense_reasoning: both right -> 200. Paired by row instead (one
# "image" per question), color would be 50 + 50 = 100.
PLAN = {
    "color/000.png#0": "Yes",
    "color/000.png#1": "No.",
    "color/001.png#2": "yes",
    "color/001.png#3": "Yes",
    "color/002.png#4": "No",
    "color/002.png#5": "no, it is not",
    "color/003.png#6": "no",
    "color/003.png#7": "Yes",
    "commonsense_reasoning/000.png#8": "Y",
    "commonsense_reasoning/000.png#9": "N",
}


@pytest.fixture(autouse=True)
def _own_datasets_cache(tmp_path_factory, monkeypatch):
    """``datasets`` writes the parquet it reads into its cache: keep it out of the home folder (and
    its progress bars off stderr, where the refusal's one line is read)."""
    import datasets
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf-cache")))
    datasets.disable_progress_bars()
    yield
    datasets.enable_progress_bars()


@pytest.fixture(scope="module")
def mock(tmp_path_factory):
    return mme_mock(tmp_path_factory.mktemp("user") / "MME")


def _parse(pred: str) -> str:
    s = pred.lower().strip().replace(".", "")
    if s in ("yes", "no"):
        return s
    if len(s) == 1:
        return {"y": "yes", "n": "no"}.get(s, "other")
    return "yes" if "yes" in s[:4] else "no" if "no" in s[:4] else "other"


def lmms_eval_scores(rows) -> dict[str, float]:
    """Per category, lmms-eval's MME score: each question 1 or 0, grouped by (category,
    question_id); per question_id 100 x mean + 100 if both right; the category's mean over its
    question_ids."""
    by: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        right = _parse(r["prediction"]) == r["answer"].lower().strip().replace(".", "")
        by[r["category"]][r["question_id"]].append(1.0 if right else 0.0)
    out = {}
    for cat, per_id in by.items():
        assert all(len(s) == 2 for s in per_id.values())
        out[cat] = sum(100.0 * sum(s) / 2 + 100.0 * (sum(s) == 2) for s in per_id.values()) / len(per_id)
    return out


def test_hub_rows_are_paired_by_question_id(mock):
    """Fails on the old loader: every hub row its own image, acc+ = acc, color scored 100."""
    items = load_items(f"hf:{mock}")
    rows = [{**it.to_record(), "category": it.task, "prediction": PLAN[it.id]} for it in items]
    s = mme_score(rows)
    color = s["categories"]["color"]
    assert (color["acc"], color["acc_plus"], color["score"]) == (50.0, 25.0, 75.0)
    assert (color["n_questions"], color["n_images"]) == (8, 4)
    assert (s["perception"], s["cognition"], s["total"]) == (75.0, 200.0, 275.0)
    ref = lmms_eval_scores(rows)
    assert ref == {"color": 75.0, "commonsense_reasoning": 200.0}
    assert {k: c["score"] for k, c in s["categories"].items()} == ref


def test_items_carry_question_id_and_lmms_eval_prompt(mock):
    items = load_items(str(mock))  # a folder alone reads as hf:FOLDER
    assert [it.question_id for it in items] == [r["question_id"] for r in mme_rows()]
    assert [it.answer for it in items] == ["Yes", "No"] * 5
    assert items[0].to_record()["question_id"] == "color/000.png"
    assert items[0].question == "Is the picture red? Please answer yes or no."
    assert items[0].prompt_text() == "Is the picture red?" + MME_SUFFIX
    # sinkscope's own sets keep their prompt (the shipped mini-llava numbers were made with it)
    shapes = load_items("shapes", limit=1)[0]
    assert shapes.prompt_text() == shapes.question.strip() + " Answer with one word."
    assert "question_id" not in shapes.to_record()
    assert items[0].image.load().shape == (48, 40, 3)


def test_save_to_disk_copy_gives_the_same_items(tmp_path, mock):
    disk = mme_mock(tmp_path / "copy", layout="disk")  # no "mme" in the name: found by its columns
    a, b = hf_items(f"hf:{mock}"), hf_items(str(disk))
    assert [(i.question_id, i.question, i.answer, i.task) for i in a] == [
        (i.question_id, i.question, i.answer, i.task) for i in b
    ]
    assert all(i.prompt_style == "mme" for i in b) and len(b) == 10


def test_limit_keeps_images_whole(mock):
    assert [it.id for it in load_items(str(mock), limit=3)] == [
        "color/000.png#0", "color/000.png#1", "color/001.png#2", "color/001.png#3",
    ]  # fmt: skip
    assert len(load_items(f"hf:{mock}:test", limit=1)) == 2
    items = load_items(str(mock))
    assert [it.id for it in limit_items(items[::-1], 2)] == ["commonsense_reasoning/000.png#9", "commonsense_reasoning/000.png#8"]


@pytest.mark.parametrize("n", [1, 3])
def test_an_image_without_two_questions_is_refused_as_the_set_loads(tmp_path, n, monkeypatch):
    bad = mme_mock(tmp_path / "MME", questions={"color/002.png": n})
    monkeypatch.setattr(run_mod, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    for call in (lambda: load_items(str(bad), limit=2), lambda: evaluate("tiny-llava", str(bad), progress=False)):
        with pytest.raises(MMEPairError) as e:
            call()
        msg = str(e.value)
        assert "\n" not in msg and str(bad) in msg
        assert f"question_id 'color/002.png' (color) has {n} question" in msg


def test_mme_score_refuses_rows_that_are_not_pairs():
    rows = [{"category": "color", "question_id": "a.png", "answer": "Yes", "prediction": "yes"}]
    with pytest.raises(MMEPairError, match="'a.png' \\(color\\) has 1 question;"):
        mme_score(rows)


def test_a_manifest_named_like_mme_pairs_by_image(tmp_path):
    from PIL import Image

    (tmp_path / "mme").mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8), "red").save(tmp_path / "mme" / name)
    lines = [("a.png", "Yes"), ("a.png", "No"), ("b.png", "Yes"), ("b.png", "No"), ("b.png", "No")]
    man = tmp_path / "mme" / "questions.jsonl"
    man.write_text("".join(json.dumps({"image": i, "question": "Is it red? Please answer yes or no.", "answer": a,
                                       "task_type": "global", "task": "color"}) + "\n" for i, a in lines[:4]))  # fmt: skip
    items = load_manifest(man)
    assert [it.question_id for it in items] == ["a.png", "a.png", "b.png", "b.png"]
    assert items[0].prompt_text() == "Is it red?" + MME_SUFFIX
    man.write_text(man.read_text() + json.dumps({"image": "b.png", "question": "Q?", "answer": "No", "task_type": "global", "task": "color"}) + "\n")
    with pytest.raises(MMEPairError, match="'b.png' \\(color\\) has 3 questions"):
        load_manifest(man)


def test_cli_eval_on_the_hub_format_mock(mock, tmp_path, monkeypatch):
    """``sinkscope eval --tasks hf:FOLDER`` (the path of ``hf:lmms-lab/MME``): the model answers every question (its text replaced by the
    plan above after it generated), the prompts are lmms-eval's, and summary.json's MME score is
    lmms-eval's score of predictions.jsonl."""
    from sinkscope.cli import main

    asked: list[str] = []
    current: list[str] = []
    real_answer, real_prompt, real_generate = run_mod.answer_item, run_mod.build_prompt, run_mod.generate_answer

    def answer_item(ad, it, v, **kw):
        current[:] = [it.id]
        return real_answer(ad, it, v, **kw)

    def build_prompt(ad, image, question, **kw):
        asked.append(question + kw.get("suffix", "<default suffix>"))
        return real_prompt(ad, image, question, **kw)

    def generate_answer(ad, prompt, **kw):
        real_generate(ad, prompt, **kw)  # the model's own answer, then the plan's
        return PLAN[current[0]]

    monkeypatch.setattr(run_mod, "answer_item", answer_item)
    monkeypatch.setattr(run_mod, "build_prompt", build_prompt)
    monkeypatch.setattr(run_mod, "generate_answer", generate_answer)
    out = tmp_path / "ev"
    argv = ["eval", "--model", "tiny-llava", "--tasks", f"hf:{mock}", "--limit", "10", "-q", "--out", str(out)]
    assert main(argv) == 0
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 10 and {p["id"] for p in preds} == set(PLAN)
    assert asked[0] == "Is the picture red?" + MME_SUFFIX
    assert all(q.endswith(MME_SUFFIX) and "Please answer" not in q for q in asked)
    mme = json.loads((out / "summary.json").read_text())["mme"]["default"]
    ref = lmms_eval_scores([{**p, "category": p["task"]} for p in preds])
    assert {k: c["score"] for k, c in mme["categories"].items()} == ref == {"color": 75.0, "commonsense_reasoning": 200.0}
    assert (mme["perception"], mme["cognition"]) == (75.0, 200.0)


@pytest.mark.parametrize("n", [1, 3])
def test_cli_refuses_an_unpaired_set_before_any_model_loads(tmp_path, n, monkeypatch, capsys):
    from sinkscope.cli import main

    bad = mme_mock(tmp_path / "MME", questions={"commonsense_reasoning/000.png": n})
    monkeypatch.setattr(run_mod, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    out = tmp_path / "ev"
    assert main(["eval", "--model", "tiny-llava", "--tasks", str(bad), "-q", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(bad) in err
    assert f"question_id 'commonsense_reasoning/000.png' (commonsense_reasoning) has {n} question" in err
    assert not out.exists()
