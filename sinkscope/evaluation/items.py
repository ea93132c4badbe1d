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
- ``shapes-heldout``: the same questions about scenes drawn by an independently written generator
  and renderer (:mod:`sinkscope.evaluation.shapes_heldout`; a held-out style, ``test`` split only,
  any other split refused in one line). Its items' ``source`` is ``shapes-heldout`` and its tasks
  are named ``heldout_<task>``, so a run on ``shapes,shapes-heldout`` reports the two per task;
- ``textile``: the textile photos with their own labels (``nominal`` / ``local`` / ``global``
  defect): *Is there a defect in this fabric?* (mixed: a defect may be anywhere or everywhere) and,
  on defective images, *Is the defect local or global?* (global: judged over the whole image);
- ``lfw-faces``: *Is there a face in this picture?* (global);
- ``digits``: *Which digit is shown?* (global; answers ``0`` to ``9``).

Real-image sets are split 60 / 20 / 20 by a seeded, label-stratified permutation; the answers of
each task are balanced within every split (by the datasets' own class balance or by dropping the
excess of the larger class).

**Hugging Face** (``hf:NAME[:SPLIT]``, for GPU users with the hub; ``SPLIT`` defaults to
``test``): loaded with ``datasets.load_dataset(NAME, split=SPLIT)``. ``NAME`` may also be a local
folder: one in the hub's layout (``data/SPLIT-00000-of-00001.parquet``, loaded by the same call as
the hub's copy) or one written by ``save_to_disk``; a folder given alone in ``tasks`` is read the
same way. Columns are mapped by ``columns`` (defaults fit MME: ``question_id``, ``image``,
``question``, ``answer``, ``category``), task type from ``task_types`` (category -> type) or
``mixed``.

**MME** (``hf:lmms-lab/MME``, a copy of it, or a manifest whose file or folder name says ``mme``):
items in MME's 14 categories carry ``question_id``, the key that pairs the two questions of an
image (the hub's ``question_id``, the image's path; a manifest's ``question_id`` column or else its
``image``), are asked as lmms-eval asks them
(:func:`~sinkscope.evaluation.scoring.question_text`, style ``mme``), and are scored with MME's
``acc + acc+`` (:mod:`~sinkscope.evaluation.mme`). A hub set is MME when its name says ``mme`` or
it has a ``question_id`` column and only MME's categories. Every image must have exactly two
questions: a set where one has one or three is refused in one line, as it loads. ``limit`` keeps
whole images (the first ``ceil(limit / 2)``), the two questions of each one after the other.

>>> its = load_items("shapes", split="test", limit=16)
>>> len(its), its[0].task_type, its[0].answer in its[0].choices
(16, 'global', True)
>>> ho = load_items("shapes-heldout", split="test", limit=16)
>>> len(ho), ho[0].source, ho[0].task
(16, 'shapes-heldout', 'heldout_background_colour')
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

from .._utils import SinkscopeError, read_jsonl
from ..data import ImageItem, load_dataset
from . import shapes as _shapes
from . import shapes_heldout as _heldout
from .mme import CATEGORIES as MME_CATEGORIES
from .mme import MMEPairError, check_pairs
from .scoring import PROMPT_STYLES, question_text

TASK_TYPES = ("global", "local", "mixed")
BUILTIN_SETS = ("shapes", "shapes-heldout", "textile", "lfw-faces", "digits")
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
    #: MME's pairing key (the hub's ``question_id``: the two questions of an image share it);
    #: None outside MME
    question_id: str | None = None
    #: how the question is put to the model (:func:`~sinkscope.evaluation.scoring.question_text`)
    prompt_style: str = "sinkscope"

    def prompt_text(self) -> str:
        """The question as the model is asked it (suffix included)."""
        return question_text(self.question, self.prompt_style)

    def to_record(self) -> dict[str, Any]:
        """The item as a JSON-ready dict (``image`` is its source path or name; MME items add
        ``question_id``)."""
        rec = {
            "id": self.id,
            "image": self.image.source,
            "question": self.question,
            "answer": self.answer,
            "choices": list(self.choices) if self.choices else None,
            "task_type": self.task_type,
            "task": self.task,
            "source": self.source,
        }
        if self.question_id is not None:
            rec["question_id"] = self.question_id
        return rec


def _check(item: VQAItem, where: str) -> VQAItem:
    if item.task_type not in TASK_TYPES:
        raise SinkscopeError(f"{where}: task_type {item.task_type!r} is not one of {', '.join(TASK_TYPES)}")
    if not item.question.strip():
        raise SinkscopeError(f"{where}: empty question")
    if item.choices is not None and len(set(item.choices)) != len(item.choices):
        dup = next(c for c in item.choices if item.choices.count(c) > 1)
        raise SinkscopeError(f"{where}: choice {dup!r} appears more than once in {list(item.choices)}")
    if item.choices is not None and item.answer not in item.choices:
        raise SinkscopeError(f"{where}: answer {item.answer!r} is not among its choices {list(item.choices)}")
    if item.prompt_style not in PROMPT_STYLES:
        raise SinkscopeError(
            f"{where}: prompt style {item.prompt_style!r} is not one of {', '.join(PROMPT_STYLES)}"
        )
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
            rows = list(csv.DictReader(f))
    else:
        rows = read_jsonl(path)
    if not rows:
        raise SinkscopeError(f"manifest {path} has no rows (an empty file, or a header only)")
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
    mme = _says_mme(p.name) or _says_mme(p.parent.name)
    out = []
    for n, row in enumerate(read_manifest_rows(p), 1):
        where = f"{p}, row {n}"
        missing = [k for k in ("image", "question", "answer", "task_type") if not row.get(k)]
        if missing:
            raise SinkscopeError(f"{where}: missing {', '.join(missing)}")
        img = (p.parent / str(row["image"])).resolve()
        if not img.is_file():
            raise SinkscopeError(f"{where}: image {row['image']} not found (looked for {img})")
        task = str(row.get("task") or "")
        in_mme = mme and task in MME_CATEGORIES
        item = VQAItem(
            id=str(row.get("id") or f"{p.stem}-{n}"),
            image=ImageItem(str(row["image"]), str(img)),
            question=str(row["question"]),
            answer=str(row["answer"]).strip(),
            task_type=str(row["task_type"]).strip().lower(),
            task=task,
            choices=_parse_choices(row.get("choices"), where),
            source=str(p),
            question_id=str(row.get("question_id") or row["image"]) if in_mme else None,
            prompt_style="mme" if in_mme else "sinkscope",
        )
        out.append(_check(item, where))
    ids = [i.id for i in out]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise SinkscopeError(f"{p}: id {dup!r} appears more than once")
    return _mme_checked(out, str(p))


# -- MME's pairs --------------------------------------------------------------------------------------


def _says_mme(name: str) -> bool:
    return "mme" in name.lower()


def _groups(items: Sequence[VQAItem]) -> list[list[VQAItem]]:
    """``items`` in groups: the questions of one MME image together (in the order their images
    first appear), every other item alone."""
    groups: dict[Any, list[VQAItem]] = {}
    for n, it in enumerate(items):
        key = (it.source, it.task, it.question_id) if it.question_id is not None else n
        groups.setdefault(key, []).append(it)
    return list(groups.values())


def _mme_checked(items: list[VQAItem], where: str) -> list[VQAItem]:
    """``items`` with the two questions of each MME image next to each other; a set where an
    MME image does not have exactly two questions is refused (one line naming it)."""
    if not any(it.question_id is not None for it in items):
        return items
    check_pairs(((it.task, it.question_id) for it in items if it.question_id is not None), where)
    return [it for g in _groups(items) for it in g]


def limit_items(items: Sequence[VQAItem], limit: int | None, where: str = "the items") -> list[VQAItem]:
    """The first ``limit`` items, MME's images kept whole: the two questions of an image are
    taken together (the first ``ceil(limit / 2)`` images of an MME set). An MME image without
    exactly two questions among ``items`` is refused (``where`` names them).

    >>> its = [VQAItem(f"q{i}", ImageItem("a", "a.png"), "Is it red?", "yes", "mixed", task="color",
    ...        question_id=f"img{i // 2}") for i in range(6)]
    >>> [it.id for it in limit_items(its, 3)]
    ['q0', 'q1', 'q2', 'q3']
    """
    items = _mme_checked(list(items), where)
    if not limit:
        return items
    out: list[VQAItem] = []
    for g in _groups(items):
        if len(out) >= limit:
            break
        out += g
    return out


# -- built-in sets ----------------------------------------------------------------------------------


def shapes_items(
    split: str = "test", limit: int | None = None, n_per_task: int | None = None
) -> list[VQAItem]:
    """``shapes`` items of ``split``: balanced per task (``n_per_task`` each; default enough for
    ``limit`` items in all, else 50), interleaved across tasks so a ``limit`` keeps every task."""
    n = _per_task(limit, n_per_task)
    return _scene_items(_shapes.items(split, n_per_task=n), "shapes", split, limit, _shapes.render, str)


def shapes_heldout_items(
    split: str = "test", limit: int | None = None, n_per_task: int | None = None
) -> list[VQAItem]:
    """``shapes-heldout`` items (:mod:`~sinkscope.evaluation.shapes_heldout`; only ``split="test"``
    exists, another split is refused in one line): like :func:`shapes_items`, with ``source``
    ``shapes-heldout`` and tasks named ``heldout_<task>`` (its accuracy reported apart from
    ``shapes``').

    >>> [(i.task, i.source) for i in shapes_heldout_items(limit=2)]
    [('heldout_background_colour', 'shapes-heldout'), ('heldout_count', 'shapes-heldout')]
    >>> shapes_heldout_items("train")
    Traceback (most recent call last):
    ...
    sinkscope._utils.SinkscopeError: task set shapes-heldout has only a test split; split 'train' was asked (use --split test, or shapes for train / validation)
    """
    if split not in _heldout.SPLIT_SEEDS:
        raise SinkscopeError(
            f"task set {_heldout.NAME} has only a test split; split {split!r} was asked "
            "(use --split test, or shapes for train / validation)"
        )
    rows = _heldout.items(n_per_task=_per_task(limit, n_per_task), split=split)
    return _scene_items(rows, _heldout.NAME, split, limit, _heldout.render, _heldout.task_name)


def _per_task(limit: int | None, n_per_task: int | None) -> int:
    """Items per task: ``n_per_task``, else enough for ``limit`` items in all, else 50."""
    return n_per_task or (max(1, -(-limit // len(_shapes.TASKS))) if limit else 50)


def _scene_items(
    rows: list[dict], name: str, split: str, limit: int | None, render: Callable, task: Callable[[str], str]
) -> list[VQAItem]:
    """Scene-set rows (``shapes.items``' format) as items of set ``name``, interleaved across
    tasks so a ``limit`` keeps every task; images drawn by ``render``, tasks named ``task(...)``."""
    k = len(_shapes.TASKS)
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
                image=ImageItem(
                    f"{name}-{split}-{sc.seed}", f"{name}:{split}:{sc.seed}", _scene_loader(sc, render)
                ),
                question=r["question"],
                answer=r["answer"],
                task_type=r["task_type"],
                task=task(r["task"]),
                choices=tuple(r["choices"]),
                source=name,
                meta={"scene": r["scene"], "shapes_task": r["task"]},
            )
        )
    return out


def _scene_loader(sc, render: Callable = _shapes.render) -> Callable[[], np.ndarray]:
    return lambda: np.asarray(render(sc))


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


def _hf_name(spec: str) -> tuple[str, str]:
    """``hf:NAME[:SPLIT]`` (or a folder) -> ``(NAME, SPLIT)``; ``SPLIT`` defaults to ``test``.

    >>> _hf_name("hf:lmms-lab/MME"), _hf_name("hf:lmms-lab/MME:validation")
    (('lmms-lab/MME', 'test'), ('lmms-lab/MME', 'validation'))
    """
    body = spec[3:] if spec.startswith("hf:") else spec
    name, colon, split = body.rpartition(":")
    if not colon or "/" in split or "\\" in split:
        return body, "test"
    return name, split


def _open_hf(spec: str):
    """The ``datasets.Dataset`` behind ``spec``: a hub id or a folder in the hub's layout through
    ``datasets.load_dataset``, a ``save_to_disk`` folder through ``datasets.load_from_disk``."""
    try:
        import datasets
    except ImportError:
        raise SinkscopeError(f"{spec}: Hugging Face datasets need the 'datasets' package") from None
    name, split = _hf_name(spec)
    folder = Path(name)
    try:
        if folder.is_dir() and any((folder / f).is_file() for f in ("state.json", "dataset_dict.json")):
            ds = datasets.load_from_disk(str(folder))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise SinkscopeError(f"{spec}: no split {split!r} (splits: {', '.join(ds)})")
                ds = ds[split]
            return ds
        return datasets.load_dataset(name, split=split)
    except SinkscopeError:
        raise
    except Exception as e:  # the hub raises many kinds; one line for the user
        raise SinkscopeError(
            f"{spec}: cannot load the dataset ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        ) from None


def _hf_image(ds, n: int, column: str) -> np.ndarray:
    img = ds[n][column]
    if isinstance(img, dict) and img.get("bytes"):
        import io

        from PIL import Image

        img = Image.open(io.BytesIO(img["bytes"]))
    return np.asarray(img.convert("RGB"))


def hf_items(
    spec: str,
    columns: dict[str, str] | None = None,
    task_types: dict[str, str] | None = None,
    limit: int | None = None,
) -> list[VQAItem]:
    """Items from a Hugging Face dataset, ``hf:NAME[:SPLIT]``: a hub id (needs the hub; for GPU
    users) or a local folder (the hub's parquet layout, or ``save_to_disk``). Images are decoded
    when an item is asked, not as the set loads. MME's sets are checked as they load (two
    questions per image) and ``limit`` keeps their images whole (module docstring).

    (skipped in the doctests: downloads MME from the hub)

    >>> its = hf_items("hf:lmms-lab/MME:test", limit=4)        # doctest: +SKIP
    """
    name, _ = _hf_name(spec)
    cols = {**MME_COLUMNS, **(columns or {})}
    ds = _open_hf(spec)
    missing = [c for k, c in cols.items() if k != "id" and c not in ds.column_names]
    if missing:
        raise SinkscopeError(
            f"{spec}: no column {missing[0]!r} (columns: {', '.join(ds.column_names)}); map it with columns="
        )
    text_cols = [c for k, c in cols.items() if k != "image" and c in ds.column_names]
    table = ds.select_columns(text_cols).to_dict()  # every row's text, no image decoded
    n_rows = len(ds)
    tasks = [str(t) for t in table[cols["task"]]]
    has_qid = cols["id"] in table
    cats = set(tasks)
    mme = _says_mme(Path(name).name if Path(name).is_dir() else name) or (
        has_qid and bool(cats) and cats <= set(MME_CATEGORIES)
    )
    if mme and not has_qid and cats & set(MME_CATEGORIES):
        raise SinkscopeError(
            f"{spec}: an MME set needs a {cols['id']!r} column to pair the two questions of each image "
            f"(columns: {', '.join(ds.column_names)}); map it with columns="
        )
    short = Path(name).name if Path(name).is_dir() else name
    out = []
    for n in range(n_rows):
        task = tasks[n]
        qid = str(table[cols["id"]][n]) if has_qid else str(n)
        in_mme = mme and task in MME_CATEGORIES
        out.append(
            VQAItem(
                id=f"{qid}#{n}",
                image=ImageItem(f"{short}-{n}", f"{spec}#{n}", lambda n=n: _hf_image(ds, n, cols["image"])),
                question=str(table[cols["question"]][n]),
                answer=str(table[cols["answer"]][n]).strip(),
                task_type=(task_types or {}).get(task, "mixed"),
                task=task,
                choices=None,  # MME and most hub sets are scored by generation
                source=spec,
                question_id=qid if in_mme else None,
                prompt_style="mme" if in_mme else "sinkscope",
            )
        )
    return limit_items(out, limit, spec)


def check_task_sets(tasks: str | Sequence[str]) -> None:
    """Load the hub sets, folders and manifests among ``tasks`` and refuse an MME set whose images
    do not have two questions each (:class:`~sinkscope.evaluation.mme.MMEPairError`, what
    :func:`load_items` refuses as a run starts; the command line calls this first, so the refusal
    is a usage error). Any other problem is left to the run, which reports it as before."""
    for t in _task_names(tasks):
        try:
            if t.startswith("hf:") or Path(t).is_dir():
                hf_items(t)
            elif Path(t).suffix.lower() in (".jsonl", ".json", ".csv") and Path(t).is_file():
                load_manifest(t)
        except MMEPairError:
            raise
        except SinkscopeError:
            continue


def _task_names(tasks: str | Sequence[str]) -> list[str]:
    """The task names of ``tasks``, each once (a task named twice is refused, naming it)."""
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    dup = next((t for n, t in enumerate(names) if t in names[:n]), None)
    if dup is not None:
        raise SinkscopeError(f"tasks: {dup!r} is given twice; name each task once")
    return names


def load_items(tasks: str | Sequence[str], split: str = "test", limit: int | None = None) -> list[VQAItem]:
    """Items of every comma-separated task in ``tasks``: built-in sets, manifests (a path ending in
    ``.jsonl``/``.json``/``.csv``), ``hf:NAME[:SPLIT]`` or a dataset folder (read as ``hf:FOLDER``);
    ``limit`` items per task (MME's images kept whole: :func:`limit_items`).

    >>> [len(load_items(t, limit=8)) for t in ("shapes", "digits")]
    [8, 8]
    """
    names = _task_names(tasks)
    if not names:
        raise SinkscopeError(
            f"no task given; expected built-in sets ({', '.join(BUILTIN_SETS)}), a manifest or hf:NAME"
        )
    if split not in SPLITS:
        raise SinkscopeError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    out: list[VQAItem] = []
    for t in names:
        if t == "shapes":
            out += shapes_items(split, limit)
        elif t == _heldout.NAME:
            out += shapes_heldout_items(split, limit)
        elif t in REAL_TASKS:
            out += real_items(t, split, limit)
        elif t.startswith("hf:") or Path(t).is_dir():
            out += hf_items(t, limit=limit)
        elif Path(t).suffix.lower() in (".jsonl", ".json", ".csv"):
            out += limit_items(load_manifest(t), limit, t)
        else:
            raise SinkscopeError(
                f"unknown task {t!r}: expected {', '.join(BUILTIN_SETS)}, a manifest (.jsonl / .csv), "
                "hf:NAME[:SPLIT] or a dataset folder"
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
    "check_task_sets",
    "hf_items",
    "limit_items",
    "load_items",
    "load_manifest",
    "real_items",
    "read_manifest_rows",
    "shapes_heldout_items",
    "shapes_items",
]
