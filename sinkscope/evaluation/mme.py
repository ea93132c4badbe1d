"""MME's score: two yes/no questions per image, ``acc`` and ``acc+`` per category, summed.

As MME's own tool (``eval_tool/calculation.py``) and lmms-eval's ``tasks/mme/utils.py`` compute it:
a prediction is read as yes / no / other (:func:`~sinkscope.evaluation.scoring.parse_yes_no`);
per category, ``acc`` is the percentage of questions answered right and ``acc+`` the percentage of
images whose two questions are both right; the category's score is ``acc + acc+`` (at most 200);
the perception total sums its 10 categories, the cognition total its 4.

The two questions of an image are paired by ``question_id`` where a row has one (the hub's
``lmms-lab/MME``: one row per question, the two questions of an image share its ``question_id``,
the image's path, as lmms-eval pairs them), else by ``image``. Every image must have exactly two
questions: anything else is refused in one line naming it (:func:`check_pairs`), as ``acc+`` would
otherwise mean something else (one question per image gives ``acc+ = acc``).

MME's results folder format is one ``CATEGORY.txt`` per category, each line
``image<TAB>question<TAB>ground truth<TAB>prediction``; :func:`read_results_folder` reads it.

>>> rows = [("color", "a.jpg", "Yes", "yes"), ("color", "a.jpg", "No", "yes"),
...         ("color", "b.jpg", "Yes", "Yes."), ("color", "b.jpg", "No", "no")]
>>> s = mme_score([dict(zip(("category", "image", "answer", "prediction"), r)) for r in rows])
>>> s["categories"]["color"], s["perception"]
({'acc': 75.0, 'acc_plus': 50.0, 'score': 125.0, 'n_questions': 4, 'n_images': 2}, 125.0)
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .._utils import SinkscopeError
from .scoring import parse_yes_no

PERCEPTION = (
    "existence",
    "count",
    "position",
    "color",
    "posters",
    "celebrity",
    "scene",
    "landmark",
    "artwork",
    "OCR",
)
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


#: MME's 14 categories
CATEGORIES = PERCEPTION + COGNITION


class MMEPairError(SinkscopeError):
    """An MME image without exactly two questions (:func:`check_pairs`)."""


def pair_key(row: dict[str, Any]) -> str:
    """The key that pairs a row with the other question of its image: ``question_id`` when the
    row has one (not None / NaN), else ``image``."""
    q = row.get("question_id")
    if q is None or (isinstance(q, float) and q != q):
        return str(row["image"])
    return str(q)


def check_pairs(keys: Iterable[tuple[str, str]], where: str) -> None:
    """Refuse (one line naming ``where`` and the image) unless every ``(category, pair key)``
    occurs exactly twice: MME's two questions per image.

    >>> check_pairs([("color", "a.png"), ("color", "a.png"), ("color", "b.png")], "my set")
    Traceback (most recent call last):
    ...
    sinkscope.evaluation.mme.MMEPairError: my set: MME question_id 'b.png' (color) has 1 question; MME asks exactly 2 per image (acc+ pairs them)
    """
    counts: dict[tuple[str, str], int] = {}
    for k in keys:
        counts[k] = counts.get(k, 0) + 1
    for (cat, key), n in counts.items():
        if n != 2:
            raise MMEPairError(
                f"{where}: MME question_id {key!r} ({cat}) has {n} question{'s' if n != 1 else ''}; "
                "MME asks exactly 2 per image (acc+ pairs them)"
            )


def mme_score(rows: Iterable[dict[str, Any]], where: str = "MME rows") -> dict[str, Any]:
    """MME's scores from rows with ``category``, ``question_id`` (or ``image``), ``answer``
    (``Yes``/``No``) and ``prediction`` (free text): per category ``acc``, ``acc_plus``, ``score``,
    and the ``perception`` / ``cognition`` totals (categories outside MME's lists go to ``other``).
    Rows that are not two per image are refused (:func:`check_pairs`; ``where`` names them)."""
    rows = list(rows)
    check_pairs(((str(r["category"]), pair_key(r)) for r in rows), where)
    by_cat: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        gt = parse_yes_no(r["answer"])
        if gt == "other":
            raise SinkscopeError(f"MME answer {r['answer']!r} (question_id {pair_key(r)}) is not yes or no")
        by_cat[str(r["category"])][pair_key(r)].append(parse_yes_no(r["prediction"]) == gt)
    cats = {}
    for cat, images in sorted(by_cat.items()):
        answers = [ok for per in images.values() for ok in per]
        acc = 100.0 * sum(answers) / len(answers)
        acc_plus = 100.0 * sum(all(per) for per in images.values()) / len(images)
        cats[cat] = {
            "acc": round(acc, 4),
            "acc_plus": round(acc_plus, 4),
            "score": round(acc + acc_plus, 4),
            "n_questions": len(answers),
            "n_images": len(images),
        }
    out: dict[str, Any] = {"categories": cats}
    for name, members in (("perception", PERCEPTION), ("cognition", COGNITION)):
        out[name] = round(sum(c["score"] for k, c in cats.items() if k in members), 4)
    other = [k for k in cats if k not in PERCEPTION + COGNITION]
    if other:
        out["other"] = round(sum(cats[k]["score"] for k in other), 4)
    out["total"] = round(sum(c["score"] for c in cats.values()), 4)
    return out


def read_results_folder(folder: str | Path) -> list[dict[str, Any]]:
    """The rows of an MME results folder (``CATEGORY.txt``: image, question, truth, prediction).

    >>> import pathlib
    >>> _ = pathlib.Path("mme").mkdir(exist_ok=True)
    >>> _ = pathlib.Path("mme/color.txt").write_text("a.jpg\\tIs it red?\\tYes\\tyes\\n")
    >>> read_results_folder("mme")[0]["prediction"]
    'yes'
    """
    d = Path(folder)
    files = sorted(d.glob("*.txt"))
    if not files:
        raise SinkscopeError(f"{d}: no CATEGORY.txt files (MME's results format)")
    rows = []
    for f in files:
        for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) < 4:
                raise SinkscopeError(
                    f"{f}, line {n}: expected image, question, truth, prediction separated by tabs"
                )
            rows.append(
                {
                    "category": f.stem,
                    "image": parts[0],
                    "question": parts[1],
                    "answer": parts[2],
                    "prediction": parts[3],
                }
            )
    return rows


__all__ = [
    "CATEGORIES",
    "COGNITION",
    "PERCEPTION",
    "MMEPairError",
    "check_pairs",
    "mme_score",
    "pair_key",
    "read_results_folder",
]
