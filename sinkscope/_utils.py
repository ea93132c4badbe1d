"""Small shared helpers: the user cache directory, package versions, errors."""

from __future__ import annotations

import ctypes
import functools
import os
from importlib import metadata
from pathlib import Path


class SinkscopeError(Exception):
    """A user-facing error: its message is one line that names the bad input and what is wrong."""


def cache_dir(*parts: str) -> Path:
    """The sinkscope cache directory (``$SINKSCOPE_CACHE`` or ``$XDG_CACHE_HOME/sinkscope`` or ``~/.cache/sinkscope``).

    Converted models live here, never inside the repository.

    >>> cache_dir("models").name
    'models'
    """
    root = os.environ.get("SINKSCOPE_CACHE")
    if root:
        base = Path(root)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = (Path(xdg) if xdg else Path.home() / ".cache") / "sinkscope"
    path = base.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def package_versions(
    names: tuple[str, ...] = ("sinkscope", "torch", "transformers", "numpy", "pandas"),
) -> dict:
    """Installed versions of the named distributions (``None`` when absent)."""
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def read_jsonl(path: Path) -> list[dict]:
    """The objects of a JSONL file, one per non-blank line; a line that is not JSON, or not an
    object, fails in one line naming the file and the line.

    >>> import tempfile
    >>> p = Path(tempfile.mkdtemp()) / "a.jsonl"
    >>> _ = p.write_text('{"a": 1}' + chr(10) + chr(10) + '[2]')
    >>> try:
    ...     read_jsonl(p)
    ... except SinkscopeError as e:
    ...     print(str(e).split("a.jsonl, ", 1)[1])
    line 3: expected a JSON object, got list
    """
    import json

    rows = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise SinkscopeError(f"{path}, line {n}: not JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise SinkscopeError(f"{path}, line {n}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def check_out_folder(out: str | Path, name: str = "out") -> None:
    """An output folder must not be a file, and it (or the nearest folder above it that exists)
    must be writable - checked before any work, so nothing is computed and then lost. ``name``
    is how the message calls the option.

    >>> check_out_folder("runs/new")
    """
    p = Path(out)
    if p.exists() and not p.is_dir():
        raise SinkscopeError(f"{name}: {out} is a file, not a folder; choose a folder")
    parent = next((q for q in [p, *p.parents] if q.exists()), Path("."))
    if not parent.is_dir():
        raise SinkscopeError(f"{name}: {parent} is a file, not a folder; choose another folder")
    if not os.access(parent, os.W_OK):
        raise SinkscopeError(f"{name}: {parent} is not writable; choose another folder")


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl): nothing to hand back
        return None


def release_memory() -> None:
    """Hand the heap pages freed since the last call back to the OS (glibc's ``malloc_trim``).

    Called between the batches of long loops: freed tensor buffers otherwise stay in the
    allocator's arenas (one per thread torch computes on), fragment, and the peak RSS creeps up
    batch after batch. A no-op where the C library is not glibc.

    >>> release_memory()
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def progress_bar(total: int, enabled: bool, desc: str, unit: str = "img"):
    """A ``tqdm`` bar over ``total`` items, or a silent stand-in when disabled or empty.

    >>> bar = progress_bar(3, enabled=False, desc="scan")
    >>> bar.update(1); bar.close()
    """
    if not enabled or total == 0:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit)


def cpu_flags() -> set[str]:
    """This machine's CPU feature flags (``/proc/cpuinfo``; empty where it cannot be read).

    >>> isinstance(cpu_flags(), set)
    True
    """
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def fast_bf16(device_type: str = "cpu") -> bool:
    """Whether bf16 autocast speeds up work on ``device_type`` here: a CUDA device that supports
    bf16, or a CPU with AMX (``amx_bf16``) or AVX-512 BF16 (``avx512_bf16``). On other CPUs bf16
    is emulated and many times slower than fp32, so the answer is ``False``.

    >>> fast_bf16("cpu") == bool({"amx_bf16", "avx512_bf16"} & cpu_flags())
    True
    """
    if device_type == "cuda":
        import torch

        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    return bool({"amx_bf16", "avx512_bf16"} & cpu_flags())


def resolve_precision(mixed_precision: str, device_type: str = "cpu") -> str:
    """``"auto"`` -> ``"bf16"`` where :func:`fast_bf16` says it pays here, else ``"no"``; any other
    value as given. Runs record the resolved value.

    >>> resolve_precision("no"), resolve_precision("auto") in ("bf16", "no")
    ('no', True)
    """
    if mixed_precision != "auto":
        return mixed_precision
    return "bf16" if fast_bf16(device_type) else "no"
