"""The trained ``mini-llava`` that ships with the package (issue 12): its weights load, it reproduces
the accuracy its model card records, and the README's model card says what the card file says."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from sinkscope import load_model
from sinkscope.models.mini_llava import SHIPPED_LORA, SHIPPED_PROJECTOR
from sinkscope.training.card import CARD, fixed_subset

README = Path(__file__).resolve().parents[1] / "README.md"


def card() -> dict:
    return json.loads(CARD.read_text())


def test_the_trained_weights_and_their_card_ship_with_the_package():
    c = card()
    assert SHIPPED_PROJECTOR.is_file() and c["weights"][0] == SHIPPED_PROJECTOR.name
    assert SHIPPED_LORA.is_file() == (SHIPPED_LORA.name in c["weights"])
    size = sum((SHIPPED_PROJECTOR.parent / w).stat().st_size for w in c["weights"])
    assert size < 30e6  # a projector and low-rank adapters (SmolLM2 itself is 540 MB): never a copy of the LLM
    assert c["regenerate"] == "make mini-llava"
    assert "\nmini-llava: " in (Path(__file__).resolve().parents[1] / "Makefile").read_text()  # the target
    for variant in ("trained", "image_removed", "untrained"):
        assert {"global", "local", "mixed", "all"} <= set(c["test"][variant])
    steps = [p["step"] for p in c["learning_curve_validation"]]
    assert steps == sorted(steps) and steps[-1] == (c["stage2_vqa"]["stopped_at"] or c["stage2_vqa"]["steps"])


def test_the_card_tells_every_chunk_of_training_since_issue_26():
    c = card()
    chunks = c.get("learning_curve_chunks", [])
    if not chunks:  # no chunk trained yet: nothing to tell
        return
    assert c["regenerate_chunk"].startswith("make mini-llava-chunk")
    assert "\nmini-llava-chunk: " in (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    assert [x["chunk"] for x in chunks] == list(range(len(chunks))) and chunks[0]["shipped"]
    totals = [x["conversations_total"] for x in chunks]
    assert totals == sorted(totals)
    for x in chunks:
        assert {"global", "local", "mixed", "all", "n"} <= set(x["validation"])
    # the shipped weights are the last shipped chunk's; a later chunk that did not ship is the candidate
    from sinkscope.training.card import CANDIDATE_PROJECTOR

    last = max(x["chunk"] for x in chunks if x["shipped"])
    assert c["fixed_subset"]["weights_of_chunk"] == last and c["fixed_subset"]["select_strategy"] == "full"
    assert CANDIDATE_PROJECTOR.exists() == (chunks[-1]["chunk"] != last)


def _readme_card_rows() -> dict[str, list[float]]:
    """The README model card's table: row label -> [global, local, mixed] accuracies."""
    text = README.read_text()
    start = text.index("<!-- model-card -->")
    rows = {}
    for line in text[start:].splitlines()[1:]:
        if not line.startswith("|"):
            if rows:
                break
            continue
        cells = [x.strip() for x in line.strip("|").split("|")]
        nums = [re.search(r"\d\.\d\d", x) for x in cells[1:4]]
        if all(nums):
            rows[cells[0]] = [float(n.group()) for n in nums]
    return rows


def test_the_readme_model_card_matches_the_card_file():
    c, rows = card(), _readme_card_rows()
    for label, key in (("trained mini-llava", "trained"), ("same, image removed", "image_removed"),
                       ("mini-llava-untrained", "untrained")):  # fmt: skip
        want = [round(c["test"][key][t]["accuracy"], 2) for t in ("global", "local", "mixed")]
        assert rows[label] == pytest.approx(want, abs=0.005), label


def test_load_model_gives_the_trained_model_and_untrained_keeps_the_random_projector():
    from safetensors.torch import load_file

    trained, untrained = load_model("mini-llava"), load_model("mini-llava-untrained")
    assert trained.projector_trained and not untrained.projector_trained
    state = load_file(str(SHIPPED_PROJECTOR))
    torch.testing.assert_close(trained.projector.linear_1.weight, state["linear_1.weight"])
    lm_t, lm_u = trained.model.model.language_model, untrained.model.model.language_model
    q_t, q_u = lm_t.layers[0].self_attn.q_proj.weight, lm_u.layers[0].self_attn.q_proj.weight
    # the LoRA adapters are merged into the LLM (a plain transformers model, no adapter modules)
    assert (not torch.equal(q_t, q_u)) == SHIPPED_LORA.is_file()
    assert not any("lora" in k for k in trained.model.state_dict())
    torch.testing.assert_close(  # the tower is DINOv2's, untouched
        trained.model.model.vision_tower.embeddings.patch_embeddings.projection.weight,
        untrained.model.model.vision_tower.embeddings.patch_embeddings.projection.weight,
    )


@pytest.mark.slow
def test_the_shipped_model_reproduces_its_card_on_the_fixed_subset():
    from sinkscope.evaluation import evaluate

    res = evaluate("mini-llava", fixed_subset(), progress=False)
    acc = float(res.predictions.correct.mean())
    want = card()["fixed_subset"]
    assert len(res.predictions) == want["n"] == 80
    assert abs(acc - want["accuracy"]) <= 0.02, (acc, want)
