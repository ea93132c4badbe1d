"""Small shared helpers: the user cache directory, package versions, errors."""

from __future__ import annotations

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
