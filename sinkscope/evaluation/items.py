"""Visual question items, and where they come from: manifests, built-in sets, Hugging Face datasets.

One item format for every source (:class:`VQAItem`): an image, a question, the answer, optional
answer ``choices`` (multiple choice), a ``task_type`` (``global`` / ``local`` / ``mixed``, the
paper's taxonomy) and an optional finer ``task`` name.

**Manifest** (JSONL, one object per line, or CSV with a header)::

    {"image": "imgs/0001.png", "question": "What colour is the background?", "answer": "red",
     "choices": ["red", "green", "blue"], "task_type": "global", "task": "background_colour"}

``image`` is a path relative to the manifest; ``choices`` is a JSON list (in a CSV: a JSON list or
``a|b|c``); ``id`` is optional (default: the line number). Every row is checked before anything
runs: a missing image, an unknown task type, or an answer outside its choices fails in one line
naming the manifest and the row.

**Built-in sets** (offline; ``split`` is ``train``, ``validation`` or ``test``):

- ``shapes``: :mod:`sinkscope.evaluation.shapes` (Global, Local and Mixed questions);
- ``textile``: the textile photos with their own labels (``nominal`` / ``local`` / ``global``
  defect): *Is there a defect in this fabric?* (mixed: a defect may be anywhere or everywhere) and,
  on defective images, *Is the defect local or global?* (global: judged over the whole image);
- ``lfw-faces``: *Is there a face in this picture?* (global);
- ``digits``: *Which digit is shown?* (global; answers ``0`` to ``9``).

Real-image sets are split 60 / 20 / 20 by a seeded, label-stratified permutation; the answers of
each task are balanced within every split (by the datasets' own class balance or by dropping the
excess of the larger class).

**Hugging Face** (``hf:NAME[:SPLIT]``, for GPU users with the hub): columns mapped by ``columns``
(defaults fit MME: ``question_id``, ``image``, ``question``, ``answer``, ``category``), task type
from ``task_types`` (category -> type) or ``mixed``.

>>> its = load_items("shapes", split="test", limit=16)
>>> len(its), its[0].task_type, its[0].answer in its[0].choices
(16, 'global', True)
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._utils import SinkscopeError
from ..data import ImageItem, load_dataset
from . import shapes as _shapes

TASK_TYPES = ("global", "local", "mixed")
BUILTIN_SETS = ("shapes", "textile", "lfw-faces", "digits")
SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class VQAItem:
    """One question about one image.

    >>> it = VQAItem("q1", ImageItem("a", "a.png"), "Is it red?", "yes", "global", choices=("yes", "no"))
    >>> it.to_record()["choices"]
    ['yes', 'no']
    """

    id: str
    image: ImageItem
    question: str
    answer: str
    task_type: str
    task: str = ""
    choices: tuple[str, ...] | None = None
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict, compare=False)
    #: the smallest image side the model may enlarge (built-in sets of small pictures: 1)
    min_side: int | None = None

    def to_record(self) -> dict[str, Any]:
        """The item as a JSON-ready dict (``image`` is its source path or name)."""
        return {
            "id": self.id,
            "image": self.image.source,
            "question": self.question,
            "answer": self.answer,
            "choices": list(self.choices) if self.choices else None,
            "task_type": self.task_type,
            "task": self.task,
            "source": self.source,
        }


def _check(item: VQAItem, where: str) -> VQAItem:
    if item.task_type not in TASK_TYPES:
        raise SinkscopeError(f"{where}: task_type {item.task_type!r} is not one of {', '.join(TASK_TYPES)}")
    if not item.question.strip():
        raise SinkscopeError(f"{where}: empty question")
    if item.choices is not None and item.answer not in item.choices:
        raise SinkscopeError(f"{where}: answer {item.answer!r} is not among its choices {list(item.choices)}")
    return item


# -- manifests --------------------------------------------------------------------------------------


def _parse_choices(v: Any, where: str) -> tuple[str, ...] | None:
    if v is None or v == "":
        return None
    if isinstance(v, (list, tuple)):
        return tuple(str(c) for c in v)
    s = str(v).strip()
    if s.startswith("["):
        try:
            return tuple(str(c) for c in json.loads(s))
        except json.JSONDecodeError as e:
            raise SinkscopeError(f"{where}: choices {s!r} is not a JSON list ({e.msg})") from None
    return tuple(c.strip() for c in s.split("|"))


def read_manifest_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSONL or CSV manifest (one line naming the file and line when one is broken)."""
    if not path.is_file():
        raise SinkscopeError(f"manifest {path} does not exist")
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise SinkscopeError(f"{path}, line {n}: not JSON ({e.msg})") from None
    return rows


def load_manifest(path: str | Path) -> list[VQAItem]:
    """The items of a JSONL / CSV manifest (format in the module docstring), every row checked.

    >>> import json, pathlib
    >>> from PIL import Image
    >>> Image.new("RGB", (8, 8), "red").save("red.png")
    >>> _ = pathlib.Path("m.jsonl").write_text(json.dumps({"image": "red.png", "question": "Colour?",
    ...     "answer": "red", "choices": ["red", "blue"], "task_type": "global"}) + "\\n")
    >>> [(i.id, i.answer, i.choices) for i in load_manifest("m.jsonl")]
    [('m-1', 'red', ('red', 'blue'))]
    """
    p = Path(path)
    out = []
    for n, row in enumerate(read_manifest_rows(p), 1):
        where = f"{p}, row {n}"
        missing = [k for k in ("image", "question", "answer", "task_type") if not row.get(k)]
        if missing:
            raise SinkscopeError(f"{where}: missing {', '.join(missing)}")
        img = (p.parent / str(row["image"])).resolve()
        if not img.is_file():
            raise SinkscopeError(f"{where}: image {row['image']} not found (looked for {img})")
        item = VQAItem(
            id=str(row.get("id") or f"{p.stem}-{n}"),
            image=ImageItem(str(row["image"]), str(img)),
            question=str(row["question"]),
            answer=str(row["answer"]).strip(),
            task_type=str(row["task_type"]).strip().lower(),
            task=str(row.get("task") or ""),
            choices=_parse_choices(row.get("choices"), where),
            source=str(p),
        )
        out.append(_check(item, where))
    ids = [i.id for i in out]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise SinkscopeError(f"{p}: id {dup!r} appears more than once")
    return out


# -- built-in sets ----------------------------------------------------------------------------------


def shapes_items(
    split: str = "test", limit: int | None = None, n_per_task: int | None = None
) -> list[VQAItem]:
    """``shapes`` items of ``split``: balanced per task (``n_per_task`` each; default enough for
    ``limit`` items in all, else 50), interleaved across tasks so a ``limit`` keeps every task."""
    k = len(_shapes.TASKS)
    n = n_per_task or (max(1, -(-limit // k)) if limit else 50)
    rows = _shapes.items(split, n_per_task=n)
    by_task: dict[str, list[dict]] = {}
    for r in rows:
        by_task.setdefault(r["task"], []).append(r)
    order = [r for group in zip(*by_task.values()) for r in group]  # round robin over tasks
    order += [r for rs in by_task.values() for r in rs[len(order) // k :]]
    out = []
    for r in order[:limit] if limit else order:
        sc = _shapes.Scene.from_dict(r["scene"])
        out.append(
            VQAItem(
                id=r["id"],
                image=ImageItem(f"shapes-{split}-{sc.seed}", f"shapes:{split}:{sc.seed}", _scene_loader(sc)),
                question=r["question"],
                answer=r["answer"],
                task_type=r["task_type"],
                task=r["task"],
                choices=tuple(r["choices"]),
                source="shapes",
                meta={"scene": r["scene"]},
            )
        )
    return out


def _scene_loader(sc) -> Callable[[], np.ndarray]:
    return lambda: np.asarray(_shapes.render(sc))


def _split_indices(labels: Sequence[str], split: str, seed: int = 0) -> list[int]:
    """A seeded, label-stratified 60 / 20 / 20 split of ``range(len(labels))``."""
    rng = random.Random(seed)
    out = []
    for lab in sorted(set(labels)):
        idx = [i for i, v in enumerate(labels) if v == lab]
        rng.shuffle(idx)
        a, b = int(0.6 * len(idx)), int(0.8 * len(idx))
        out += {"train": idx[:a], "validation": idx[a:b], "test": idx[b:]}[split]
    return sorted(out)


def _balanced(rows: list[tuple[int, str]], seed: int) -> list[tuple[int, str]]:
    """Drop the excess of the larger answers so every answer appears equally often."""
    by: dict[str, list[tuple[int, str]]] = {}
    for r in rows:
        by.setdefault(r[1], []).append(r)
    n = min(len(v) for v in by.values())
    rng = random.Random(seed)
    keep = [r for v in by.values() for r in (rng.sample(v, n) if len(v) > n else v)]
    return sorted(keep)


#: built-in real-image tasks: set -> [(task, type, question, label -> answer or None, choices)]
REAL_TASKS: dict[str, list[tuple[str, str, str, Callable[[str], str | None], tuple[str, ...]]]] = {
    "textile": [
        ("textile_defect", "mixed", "Is there a defect in this fabric?",
         lambda lab: "no" if lab == "nominal" else "yes", ("yes", "no")),
        ("textile_extent", "global", "Is the defect local or global?",
         lambda lab: None if lab == "nominal" else lab, ("local", "global")),
    ],
    "lfw-faces": [
        ("face", "global", "Is there a face in this picture?",
         lambda lab: "yes" if lab == "face" else "no", ("yes", "no")),
    ],
    "digits": [
        ("digit", "global", "Which digit is shown?", lambda lab: str(lab), tuple(str(d) for d in range(10))),
    ],
}  # fmt: skip


def real_items(name: str, split: str = "test", limit: int | None = None, seed: int = 0) -> list[VQAItem]:
    """Questions about a built-in real-image set (``textile``, ``lfw-faces``, ``digits``), its own
    labels as answers, balanced per task within ``split``.

    >>> its = real_items("lfw-faces", "test")
    >>> len(its), sorted({i.answer for i in its})
    (40, ['no', 'yes'])
    """
    if name not in REAL_TASKS:
        raise SinkscopeError(f"unknown built-in set {name!r}; expected one of {', '.join(BUILTIN_SETS)}")
    ds = load_dataset(name)
    labels = [str(v) for v in ds.labels["label"]]
    idx = _split_indices(labels, split, seed)
    per_task = []
    for task, ttype, question, to_answer, choices in REAL_TASKS[name]:
        rows = [(i, a) for i in idx if (a := to_answer(labels[i])) is not None]
        rows = _balanced(rows, seed)
        per_task.append(
            [
                VQAItem(
                    id=f"{name}-{split}-{i:05d}-{task}",
                    image=ds.items[i],
                    question=question,
                    answer=a,
                    task_type=ttype,
                    task=task,
                    choices=choices,
                    source=name,
                    min_side=ds.min_side,
                )
                for i, a in rows
            ]
        )
    out = [it for group in per_task for it in group]
    if limit:  # keep every task: take from each in turn
        rng = random.Random(seed)
        for g in per_task:
            rng.shuffle(g)
        out = [it for grp in zip(*per_task) for it in grp] if len(per_task) > 1 else per_task[0]
        out = sorted(out[:limit], key=lambda it: it.id)
    return out


# -- Hugging Face -----------------------------------------------------------------------------------

MME_COLUMNS = {
    "id": "question_id",
    "image": "image",
    "question": "question",
    "answer": "answer",
    "task": "category",
}


def hf_items(
    spec: str,
    columns: dict[str, str] | None = None,
    task_types: dict[str, str] | None = None,
    limit: int | None = None,
) -> list[VQAItem]:
    """Items from a Hugging Face dataset, ``hf:NAME[:SPLIT]`` (needs the hub; for GPU users).

    (skipped in the doctests: downloads MME from the hub)

    >>> its = hf_items("hf:lmms-lab/MME:test", limit=4)        # doctest: +SKIP
    """
    try:
        import datasets
    except ImportError:
        raise SinkscopeError(f"{spec}: Hugging Face datasets need the 'datasets' package") from None
    _, name, *rest = spec.split(":")
    split = rest[0] if rest else "test"
    cols = {**MME_COLUMNS, **(columns or {})}
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # the hub raises many kinds; one line for the user
        raise SinkscopeError(
            f"{spec}: cannot load the dataset ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        ) from None
    missing = [c for k, c in cols.items() if k != "id" and c not in ds.column_names]
    if missing:
        raise SinkscopeError(
            f"{spec}: no column {missing[0]!r} (columns: {', '.join(ds.column_names)}); map it with columns="
        )
    out = []
    for n, row in enumerate(ds):
        if limit and n >= limit:
            break
        task = str(row.get(cols["task"], ""))
        pil = row[cols["image"]]
        out.append(
            VQAItem(
                id=str(row.get(cols["id"], n)) + f"#{n}",
                image=ImageItem(f"{name}-{n}", f"{spec}#{n}", lambda pil=pil: np.asarray(pil.convert("RGB"))),
                question=str(row[cols["question"]]),
                answer=str(row[cols["answer"]]).strip(),
                task_type=(task_types or {}).get(task, "mixed"),
                task=task,
                choices=None,  # MME and most hub sets are scored by generation
                source=spec,
            )
        )
    return out


def load_items(tasks: str | Sequence[str], split: str = "test", limit: int | None = None) -> list[VQAItem]:
    """Items of every comma-separated task in ``tasks``: built-in sets, manifests (a path ending in
    ``.jsonl``/``.json``/``.csv``) or ``hf:NAME[:SPLIT]``; ``limit`` items per task.

    >>> [len(load_items(t, limit=8)) for t in ("shapes", "digits")]
    [8, 8]
    """
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    if not names:
        raise SinkscopeError(
            "no task given; expected built-in sets (shapes, textile, lfw-faces, digits), a manifest or hf:NAME"
        )
    if split not in SPLITS:
        raise SinkscopeError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    out: list[VQAItem] = []
    for t in names:
        if t == "shapes":
            out += shapes_items(split, limit)
        elif t in REAL_TASKS:
            out += real_items(t, split, limit)
        elif t.startswith("hf:"):
            out += hf_items(t, limit=limit)
        elif Path(t).suffix.lower() in (".jsonl", ".json", ".csv"):
            out += load_manifest(t)[:limit] if limit else load_manifest(t)
        else:
            raise SinkscopeError(
                f"unknown task {t!r}: expected {', '.join(BUILTIN_SETS)}, a manifest (.jsonl / .csv) or hf:NAME[:SPLIT]"
            )
    ids = [i.id for i in out]
    if len(set(ids)) != len(ids):
        raise SinkscopeError("the same item id comes from two tasks; give each manifest unique ids")
    return out


__all__ = [
    "BUILTIN_SETS",
    "REAL_TASKS",
    "SPLITS",
    "TASK_TYPES",
    "VQAItem",
    "hf_items",
    "load_items",
    "load_manifest",
    "real_items",
    "read_manifest_rows",
    "shapes_items",
]
