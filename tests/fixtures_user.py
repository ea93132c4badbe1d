"""Data sets the way users have them, written with plain ``datasets`` calls (no sinkscope helper).

:func:`mme_mock` writes a small copy of the hub's ``lmms-lab/MME`` in the hub's own layout: parquet
files under ``data/`` with MME's columns (``question_id``, ``image``, ``question``, ``answer``,
``category``), one row per question, the two questions of an image sharing its ``question_id``
(the image's path, e.g. ``color/000.png``), every question ending in "Please answer yes or no.".
``datasets.load_dataset(folder, split="test")`` reads it through the same parquet builder as
``datasets.load_dataset("lmms-lab/MME", split="test")``, so ``--tasks FOLDER`` (or
``hf:FOLDER``) takes the path a user's ``hf:lmms-lab/MME`` takes.

Contents (:func:`mme_rows`): ``color``, four solid-colour images (red, green, blue, white), each
asked "Is the picture <its colour>?" (Yes) and "Is the picture <another colour>?" (No); and
``commonsense_reasoning``, one grey image asked "Is the picture grey?" (Yes) and "Is the picture
black?" (No). ``questions={question_id: n}`` gives an image one or three questions instead (a set
MME's score must refuse).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

#: (category, image file, colour name, RGB); question_id is "category/file"
MME_IMAGES = (
    ("color", "000.png", "red", (220, 30, 30)),
    ("color", "001.png", "green", (30, 200, 40)),
    ("color", "002.png", "blue", (30, 40, 210)),
    ("color", "003.png", "white", (250, 250, 250)),
    ("commonsense_reasoning", "000.png", "grey", (128, 128, 128)),
)
#: the colours asked about with answer No, in turn, for the second and third questions
_OTHER = {"red": ("green", "blue"), "green": ("blue", "red"), "blue": ("red", "white"),
          "white": ("black", "red"), "grey": ("black", "white")}  # fmt: skip
SUFFIX = " Please answer yes or no."


def mme_rows(questions: dict[str, int] | None = None) -> list[dict[str, str]]:
    """The mock's rows without images, in file order: ``question_id``, ``question``, ``answer``,
    ``category`` (two per image unless ``questions`` says otherwise, at most three)."""
    rows = []
    for cat, file, colour, _ in MME_IMAGES:
        qid = f"{cat}/{file}"
        n = (questions or {}).get(qid, 2)
        if not 1 <= n <= 3:
            raise ValueError(f"{qid}: 1 to 3 questions, got {n}")
        asked = [(colour, "Yes")] + [(c, "No") for c in _OTHER[colour]]
        for c, answer in asked[:n]:
            rows.append({"question_id": qid, "question": f"Is the picture {c}?{SUFFIX}", "answer": answer,
                         "category": cat})  # fmt: skip
    return rows


def mme_mock(path: str | Path, questions: dict[str, int] | None = None, layout: str = "hub") -> Path:
    """Write the MME mock into the folder ``path`` and return it: ``layout="hub"`` the hub's
    parquet layout (``data/test-00000-of-00001.parquet``), ``"disk"`` ``Dataset.save_to_disk``.
    ``questions``: questions per image by ``question_id`` (default two each)."""
    import datasets

    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    rgb = {f"{cat}/{file}": col for cat, file, _, col in MME_IMAGES}
    rows = mme_rows(questions)
    features = datasets.Features(
        {
            "question_id": datasets.Value("string"),
            "image": datasets.Image(),
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "category": datasets.Value("string"),
        }
    )
    columns = {
        "question_id": [r["question_id"] for r in rows],
        "image": [_picture(rgb[r["question_id"]]) for r in rows],  # each row its own copy, as on the hub
        "question": [r["question"] for r in rows],
        "answer": [r["answer"] for r in rows],
        "category": [r["category"] for r in rows],
    }
    ds = datasets.Dataset.from_dict(columns, features=features)
    if layout == "hub":
        (d / "data").mkdir(exist_ok=True)
        ds.to_parquet(str(d / "data" / "test-00000-of-00001.parquet"))
    elif layout == "disk":
        ds.save_to_disk(str(d))
    else:
        raise ValueError(f"layout {layout!r}: hub or disk")
    return d


def _picture(rgb: tuple[int, int, int], size: tuple[int, int] = (40, 48)) -> Image.Image:
    """A solid-colour picture with a little seeded noise (a PNG that is not trivially small)."""
    rng = np.random.default_rng(sum(rgb))
    px = np.clip(np.array(rgb)[None, None] + rng.integers(-6, 7, (size[1], size[0], 3)), 0, 255)
    return Image.fromarray(px.astype(np.uint8))
