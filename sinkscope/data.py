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
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

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
        return np.asarray(im.convert("RGB"))


def to_rgb_uint8(arr: np.ndarray) -> np.ndarray:
    """Any grey/RGB/RGBA, bool/float/uint8 array -> HxWx3 uint8."""
    a = np.asarray(arr)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif a.dtype != np.uint8:
        a = a.astype(np.float64)
        if a.max() <= 1.0:
            a = a * 255.0
        a = np.clip(a, 0, 255).astype(np.uint8)
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
    for r in rows:
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
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise SinkscopeError(f"manifest {p} line {i}: invalid JSON ({e.msg})") from None
    else:
        with p.open(newline="") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t" if p.suffix.lower() == ".tsv" else ","))
    if not rows:
        raise SinkscopeError(f"manifest {p} is empty")
    return rows
