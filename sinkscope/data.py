"""Images: the embedded real sample images, and image files from paths, folders and manifests.

Embedded images are real photographs and scans shipped inside scikit-image, scikit-learn and
matplotlib, so everything works offline.

>>> items = sample_images(3)
>>> [it.name for it in items]
['astronaut', 'chelsea', 'coffee']
>>> items[0].load().shape
(512, 512, 3)
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ._utils import SinkscopeError

log = logging.getLogger("sinkscope")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}
MANIFEST_SUFFIXES = {".csv", ".jsonl", ".tsv"}
_PATH_COLUMNS = ("path", "image", "file", "filename", "image_path")


@dataclass
class ImageItem:
    """A named image that loads on demand (so a bad file fails alone, when it is reached)."""

    name: str
    source: str  # file path, or "skimage:astronaut" etc.
    loader: Callable[[], np.ndarray] | None = None

    def load(self) -> np.ndarray:
        """HxWx3 uint8 RGB array. Raises :class:`SinkscopeError` naming the file and the reason."""
        try:
            arr = self.loader() if self.loader is not None else _read_file(self.source)
        except SinkscopeError:
            raise
        except Exception as e:  # PIL raises many kinds; one line for the user
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SinkscopeError(f"cannot read image {self.source}: {reason}") from None
        return to_rgb_uint8(arr)


def _read_file(path: str) -> np.ndarray:
    from PIL import Image

    p = Path(path)
    if not p.is_file():
        raise SinkscopeError(f"cannot read image {path}: no such file")
    with Image.open(p) as im:
        im.load()
        frames = getattr(im, "n_frames", 1)
        if frames > 1:
            log.warning("image %s has %d frames; sinkscope uses the first", path, frames)
        if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
            # 16-bit / 32-bit grey: PIL's convert("RGB") clips at 255 (an almost white picture);
            # to_rgb_uint8 scales by the real range instead
            return np.asarray(im)
        return np.asarray(im.convert("RGB"))


def to_rgb_uint8(arr: np.ndarray) -> np.ndarray:
    """Any grey/RGB/RGBA, bool/float/integer array -> HxWx3 uint8, scaled by its real range.

    Floats in ``[0, 1]`` are scaled by 255; integers above 255 (16-bit pictures) by their type's
    range, as an 8-bit conversion would (``65535 -> 255``); values beyond that by their maximum.

    >>> to_rgb_uint8(np.full((2, 2), 65535, np.uint16))[0, 0].tolist()
    [255, 255, 255]
    >>> to_rgb_uint8(np.full((2, 2), 0.5))[0, 0].tolist()
    [128, 128, 128]
    """
    a = np.asarray(arr)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif a.dtype != np.uint8:
        kind = a.dtype.kind
        a = a.astype(np.float64)
        top = float(np.nanmax(a)) if a.size else 0.0
        if top <= 1.0:
            a = a * 255.0
        elif top > 255.0:
            a = a * (255.0 / (65535.0 if kind in "iu" and top <= 65535 else top))
        a = np.clip(np.rint(np.nan_to_num(a)), 0, 255).astype(np.uint8)
    if a.ndim == 2:
        a = np.stack([a] * 3, axis=-1)
    if a.ndim != 3 or a.shape[-1] not in (3, 4):
        raise SinkscopeError(f"image array has shape {a.shape}; expected HxW, HxWx3 or HxWx4")
    return np.ascontiguousarray(a[..., :3])


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load():
        from skimage import data

        return getattr(data, name)()

    return load


def _sklearn(index: int) -> Callable[[], np.ndarray]:
    def load():
        from sklearn.datasets import load_sample_images

        return load_sample_images().images[index]

    return load


def _matplotlib(fname: str) -> Callable[[], np.ndarray]:
    def load():
        import matplotlib.cbook as cbook
        from PIL import Image

        with cbook.get_sample_data(fname) as fh:
            return np.asarray(Image.open(fh).convert("RGB"))

    return load


#: The embedded images, colour photographs first.
EMBEDDED_IMAGES: dict[str, tuple[str, Callable[[], np.ndarray]]] = {
    "astronaut": ("skimage:astronaut", _skimage("astronaut")),
    "chelsea": ("skimage:chelsea", _skimage("chelsea")),
    "coffee": ("skimage:coffee", _skimage("coffee")),
    "rocket": ("skimage:rocket", _skimage("rocket")),
    "china": ("sklearn:china.jpg", _sklearn(0)),
    "flower": ("sklearn:flower.jpg", _sklearn(1)),
    "grace_hopper": ("matplotlib:grace_hopper.jpg", _matplotlib("grace_hopper.jpg")),
    "hubble_deep_field": ("skimage:hubble_deep_field", _skimage("hubble_deep_field")),
    "immunohistochemistry": ("skimage:immunohistochemistry", _skimage("immunohistochemistry")),
    "retina": ("skimage:retina", _skimage("retina")),
    "camera": ("skimage:camera", _skimage("camera")),
    "coins": ("skimage:coins", _skimage("coins")),
    "moon": ("skimage:moon", _skimage("moon")),
    "brick": ("skimage:brick", _skimage("brick")),
    "grass": ("skimage:grass", _skimage("grass")),
    "gravel": ("skimage:gravel", _skimage("gravel")),
}
#: The default scan set: the nine colour photographs.
DEFAULT_SAMPLES = 9


def sample_images(n: int | None = None) -> list[ImageItem]:
    """The first ``n`` embedded images (default: the nine colour photographs; at most 16)."""
    n = DEFAULT_SAMPLES if n is None else n
    if not 1 <= n <= len(EMBEDDED_IMAGES):
        raise SinkscopeError(f"there are {len(EMBEDDED_IMAGES)} embedded images; asked for {n}")
    return [ImageItem(k, src, fn) for k, (src, fn) in list(EMBEDDED_IMAGES.items())[:n]]


def image_items(paths: Iterable[str | Path]) -> list[ImageItem]:
    """Expand files, folders (recursively, sorted) and CSV/TSV/JSONL manifests into image items.

    Names are the path relative to the folder or manifest (unique within a scan). An empty
    folder, a missing path or a manifest without a path column is an error naming it.
    """
    items: list[ImageItem] = []
    for raw in paths:
        p = Path(raw).expanduser()
        if str(raw).startswith("embedded:") or str(raw) == "embedded":
            n = str(raw).partition(":")[2]
            if n and not (n.isdigit() and int(n) > 0):
                raise SinkscopeError(f"--images {raw}: expected 'embedded' or 'embedded:N' with N a positive count")
            items.extend(sample_images(int(n) if n else None))
        elif p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise SinkscopeError(f"folder {p} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
            items.extend(ImageItem(str(f.relative_to(p)), str(f)) for f in files)
        elif p.is_file() and p.suffix.lower() in MANIFEST_SUFFIXES:
            items.extend(read_manifest(p))
        elif p.is_file():
            items.append(ImageItem(p.name, str(p)))
        else:
            raise SinkscopeError(f"image path {raw} does not exist")
    seen: set[str] = set()
    unique = []
    for it in items:  # the same file named twice is scanned once
        if it.source in seen:
            log.warning("image %s is listed more than once; scanning it once", it.source)
            continue
        seen.add(it.source)
        unique.append(it)
    names = [it.name for it in unique]
    if len(set(names)) != len(names):  # same relative name from two sources: use full paths
        unique = [ImageItem(it.source, it.source, it.loader) for it in unique]
    return unique


def read_manifest(path: str | Path) -> list[ImageItem]:
    """Image items from a CSV/TSV (header row) or JSONL manifest with a path column.

    Relative paths are resolved against the manifest's folder. Other columns (labels) are kept
    for later use by :func:`read_manifest_table`.
    """
    rows = read_manifest_table(path)
    p = Path(path)
    col = next((c for c in _PATH_COLUMNS if rows and c in rows[0]), None)
    if col is None:
        raise SinkscopeError(f"manifest {p} has no path column (one of {', '.join(_PATH_COLUMNS)})")
    out = []
    for i, r in enumerate(rows, 1):
        if r.get(col) in (None, ""):
            raise SinkscopeError(f"manifest {p} row {i}: no {col!r} (every row needs an image path)")
        f = Path(str(r[col])).expanduser()
        f = f if f.is_absolute() else p.parent / f
        out.append(ImageItem(str(r.get("name") or r[col]), str(f)))
    return out


def read_manifest_table(path: str | Path) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        raise SinkscopeError(f"manifest {p} does not exist")
    if p.suffix.lower() == ".jsonl":
        rows = []
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise SinkscopeError(f"manifest {p} line {i}: invalid JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise SinkscopeError(
                        f"manifest {p} line {i}: expected a JSON object such as "
                        f'{{"path": "img.png"}}, got {type(row).__name__} {line.strip()[:40]}'
                    )
                rows.append(row)
    else:
        with p.open(newline="") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t" if p.suffix.lower() == ".tsv" else ","))
    if not rows:
        raise SinkscopeError(f"manifest {p} is empty")
    return rows


# -- labelled datasets (probes) -----------------------------------------------------------------


@dataclass
class LabeledImages:
    """Images with one or more label columns (e.g. object class and lighting).

    ``labels`` has one row per item, in item order. ``min_side``: the smallest source side a
    model may receive (built-in sets of tiny images are upsampled by the model's processor).

    >>> ds = load_dataset("lfw-faces")
    >>> len(ds), ds.label_columns, ds.labels["label"].value_counts().to_dict()
    (200, ['label'], {'face': 100, 'non-face': 100})
    """

    name: str
    items: list[ImageItem]
    labels: pd.DataFrame
    min_side: int = 1

    def __len__(self) -> int:
        return len(self.items)

    @property
    def label_columns(self) -> list[str]:
        return [c for c in self.labels.columns]

    def fingerprint(self) -> str:
        """Stable hash of the dataset's sources and labels (feature caches key on it)."""
        h = hashlib.sha1(self.name.encode())
        for it, st in zip(self.items, self.fingerprint_files()):
            h.update(it.source.encode() + b"\0" + str(st).encode())
        h.update(self.labels.to_csv(index=False).encode())
        return h.hexdigest()[:16]

    def subsample(self, n: int | None, seed: int = 0) -> LabeledImages:
        """A random subset of ``n`` items (seeded), stratified by the first label column (each class
        keeps its share, at least one item), in original order."""
        if n is None or n >= len(self):
            return self
        rng = np.random.default_rng(seed)
        lab = (
            self.labels.iloc[:, 0].astype(str).to_numpy()
            if self.labels.shape[1]
            else np.zeros(len(self), str)
        )
        classes, counts = np.unique(lab, return_counts=True)
        quota = np.maximum(1, np.floor(counts / counts.sum() * n).astype(int))
        while quota.sum() > n:  # more classes than room: trim the largest quotas
            quota[np.argmax(quota)] -= 1
        rest = n - quota.sum()
        order = np.argsort(-(counts / counts.sum() * n - np.floor(counts / counts.sum() * n)), kind="stable")
        for k in order[:rest]:
            quota[k] += 1
        idx = np.sort(
            np.concatenate(
                [
                    rng.choice(np.nonzero(lab == c)[0], size=min(q, cnt), replace=False)
                    for c, q, cnt in zip(classes, quota, counts)
                    if q > 0
                ]
            )
        )
        return LabeledImages(
            f"{self.name}[{n}@{seed}]",
            [self.items[i] for i in idx],
            self.labels.iloc[idx].reset_index(drop=True),
            self.min_side,
        )

    def fingerprint_files(self) -> list:
        out = []
        for it in self.items:
            try:
                st = os.stat(it.source)
                out.append((st.st_size, st.st_mtime_ns))
            except OSError:
                out.append(None)
        return out


BUILTIN_DATASETS = {
    "lfw-faces": "scikit-image lfw_subset: 200 grey 25x25 images, 100 faces / 100 non-faces",
    "digits": "scikit-learn digits: 1797 grey 8x8 images, 10 classes",
    "textile": "conformal-clip-data: 2000 textile photos 250x250, nominal / local / global defect",
    "samples": "the 16 embedded sample images, labelled by name (for smoke tests)",
}


def load_dataset(spec: str, split: str = "train") -> LabeledImages:
    """A labelled image set by name or path.

    - built-ins: ``lfw-faces``, ``digits``, ``textile``, ``samples`` (offline);
    - a folder with one subfolder per class (label column ``label``);
    - a CSV/TSV/JSONL manifest: a path column plus label columns (all other columns);
    - ``imagefolder:DIR`` (Hugging Face ``datasets`` imagefolder) or ``hf:NAME`` / ``hf:NAME:SPLIT``
      (any ``datasets`` image dataset; needs the hub or its local cache).

    >>> load_dataset("digits").labels["label"].nunique()
    10
    """
    if spec == "lfw-faces":
        return _array_dataset(spec, _skimage_lfw)
    if spec == "digits":
        return _array_dataset(spec, _sklearn_digits)
    if spec == "textile":
        return _textile()
    if spec == "samples":
        items = sample_images(len(EMBEDDED_IMAGES))
        return LabeledImages(spec, items, pd.DataFrame({"label": [it.name for it in items]}))
    if spec.startswith(("hf:", "imagefolder:")):
        return _hf_dataset(spec, split)
    p = Path(spec).expanduser()
    if p.is_dir():
        return _class_folders(p)
    if p.is_file() and p.suffix.lower() in MANIFEST_SUFFIXES:
        return _manifest_dataset(p)
    raise SinkscopeError(
        f"unknown dataset {spec!r}: use {', '.join(BUILTIN_DATASETS)}, a class-subfolder directory, "
        "a CSV/TSV/JSONL manifest, imagefolder:DIR or hf:NAME"
    )


def _array_dataset(name: str, fn) -> LabeledImages:
    images, labels = fn()
    items = [ImageItem(f"{name}/{i:05d}", f"{name}:{i}", loader=lambda a=a: a) for i, a in enumerate(images)]
    return LabeledImages(name, items, pd.DataFrame({"label": labels}), min_side=1)


def _skimage_lfw():
    from skimage import data

    x = data.lfw_subset()  # first 100 faces, then 100 non-faces (scikit-image docs)
    labels = ["face"] * 100 + ["non-face"] * (len(x) - 100)
    return [to_rgb_uint8(a) for a in x], labels


def _sklearn_digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return [to_rgb_uint8(a / 16.0) for a in d.images], [str(t) for t in d.target]


def _textile() -> LabeledImages:
    import importlib.util

    spec = importlib.util.find_spec("conformal_clip_data")
    if spec is None:
        raise SinkscopeError(
            "the textile set needs the 'conformal-clip-data' package: pip install --no-deps conformal-clip-data==0.1.4"
        )
    root = Path(spec.submodule_search_locations[0]) / "data" / "textile_images" / "simulated"
    ds = _class_folders(root, name="textile")
    return ds


def _class_folders(root: Path, name: str | None = None) -> LabeledImages:
    classes = sorted(d for d in root.iterdir() if d.is_dir())
    items, labels = [], []
    for c in classes:
        for f in sorted(f for f in c.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES):
            items.append(ImageItem(str(f.relative_to(root)), str(f)))
            labels.append(c.name)
    if not items:
        raise SinkscopeError(f"folder {root} has no class subfolders with images")
    return LabeledImages(name or root.name, items, pd.DataFrame({"label": labels}))


def _manifest_dataset(path: Path) -> LabeledImages:
    rows = read_manifest_table(path)
    items = read_manifest(path)
    col = next(c for c in _PATH_COLUMNS if c in rows[0])
    labels = pd.DataFrame([{k: v for k, v in r.items() if k not in (col, "name")} for r in rows])
    if labels.shape[1] == 0:
        raise SinkscopeError(f"manifest {path} has no label column besides {col!r}")
    return LabeledImages(path.stem, items, labels)


def _hf_dataset(spec: str, split: str) -> LabeledImages:
    try:
        import datasets
    except ImportError:
        raise SinkscopeError(
            "Hugging Face datasets need the 'datasets' package: pip install datasets"
        ) from None
    kind, _, rest = spec.partition(":")
    try:
        if kind == "imagefolder":
            ds = datasets.load_dataset("imagefolder", data_dir=rest, split=split)
        else:
            name, _, sp = rest.partition(":")
            ds = datasets.load_dataset(name, split=sp or split)
    except Exception as e:  # datasets raises many kinds
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SinkscopeError(f"cannot load dataset {spec!r}: {first}") from None
    img_col = next((c for c, f in ds.features.items() if isinstance(f, datasets.Image)), None)
    if img_col is None:
        raise SinkscopeError(f"dataset {spec!r} has no image column")
    label_cols = [c for c in ds.features if c != img_col]
    labels = pd.DataFrame({c: ds[c] for c in label_cols})
    for c in label_cols:
        feat = ds.features[c]
        if isinstance(feat, datasets.ClassLabel):
            labels[c] = [feat.int2str(int(v)) for v in labels[c]]
    items = [
        ImageItem(
            f"{kind}/{i:06d}", f"{spec}#{i}", loader=lambda i=i: np.asarray(ds[i][img_col].convert("RGB"))
        )
        for i in range(len(ds))
    ]
    return LabeledImages(spec, items, labels)
