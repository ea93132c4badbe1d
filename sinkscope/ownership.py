"""Which folders sinkscope may write into: one rule for every command that writes (issue 28).

A command writes only into a folder that is new, empty, or holds its own marker ``.sinkscope.json``
for the same command: ``{"kind", "sinkscope", "config", "fingerprint", "outputs", "files",
"user_files"}`` - the command, the version that wrote it, the settings that decide the results
(and their hash), the names the command owns there (patterns), the files it wrote and the files
that were already there when it came (a user's, never touched). Anything else is refused with
:class:`FolderRefused`, in one line naming the folder and the file in the way, before any model
loads. ``overwrite`` lets a command write beside a user's files in a folder without a marker
(none of them may carry a name the command writes: sinkscope replaces only its own files).

A resume compares the stored settings with the new ones field by field
(:func:`resume_differences`): every field stored must match, and the message names each
difference. Fields that only change how a run goes (progress, device, out, ...) are never
stored; each command says which those are where it builds its settings.

>>> import tempfile; d = Path(tempfile.mkdtemp()) / "run"
>>> claim(d, "scan", ("tokens.parquet",), {"model": "a"})["kind"]
'scan'
>>> check(d, "eval", ("predictions.jsonl",))
Traceback (most recent call last):
sinkscope.ownership.FolderRefused: --out ... holds a run of sinkscope scan (.sinkscope.json), not of eval; choose another folder
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ._utils import SinkscopeError, check_out_folder, package_versions

#: the marker a command writes first into a folder it writes
MARKER = ".sinkscope.json"
#: the marker scans wrote before this one (``{"kind": "scan", ...}``): still read as a scan's
LEGACY_MARKERS = {".sinkscope-run": "scan"}


#: what each command owns in its folder (``fnmatch`` patterns): the names it may write, replace or
#: remove there. A command registered in :data:`sinkscope.config.CONFIGS` needs its entry here
#: (``tests/test_ownership.py`` walks them); ``feature-cache`` (``--cache-dir``) and ``figures``
#: (the figure folder) are folders that commands write beside their ``--out``.
_RUN = ("config.json", "summary.json", "*.tmp")
OUTPUTS: dict[str, tuple[str, ...]] = {
    "scan": (*_RUN, "parts", "seen", "activations", "progress.jsonl", "progress.rank*.jsonl", "tokens.parquet",
             "report.html", "scan_config.json", ".sinkscope-run"),
    "probe": (*_RUN, "probe.csv", "probe.html", "parts"),
    "flow": (*_RUN, "*.csv", "visual_tokens.parquet", "tokens_fed.parquet", "flow.html", "parts"),
    "decode": (*_RUN, "decode_rate.csv", "decode_tokens.csv", "decode.html"),
    "eval": (*_RUN, "predictions.jsonl", "results.csv", "paired.csv", "tokens_fed.parquet", "tokens_fed.jsonl",
             "routing.parquet", "eval.html"),
    "train-projector": (*_RUN, "checkpoint", "checkpoint.tmp", "checkpoint.old", "train_log.jsonl", "features",
                        "snapshots", "projector.safetensors", "lora.safetensors"),
    "diysink-init": (*_RUN, "model"),
    "diysink-train": (*_RUN, "model", "checkpoint", "checkpoint.tmp", "checkpoint.old", "train_log.jsonl",
                      "features", "lora.safetensors"),
    "feature-cache": ("index.json", "index.tmp", "features-*.safetensors", "features-*.safetensors.tmp"),
    "figures": ("manifest.json", ".manifest.json.*.tmp", "runs", "plotly.min.js", "*.html", "*.png"),
}  # fmt: skip


class FolderRefused(SinkscopeError):
    """A folder sinkscope may not write into (or a resume of another run): a usage error, exit 2."""


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def _matches(name: str, outputs: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pat) for pat in outputs)


def fingerprint(config: Mapping[str, Any] | None) -> str | None:
    """A short hash of the result-deciding settings (``None`` without settings).

    >>> fingerprint({"model": "a", "lr": 0.1}) == fingerprint({"lr": 0.1, "model": "a"})
    True
    """
    if config is None:
        return None
    return hashlib.sha1(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_marker(folder: str | Path) -> dict | None:
    """The marker of ``folder`` (a legacy scan marker reads as ``{"kind": "scan"}``), or ``None``;
    a marker that is not a JSON object with a ``kind`` is refused in one line."""
    d = Path(folder)
    p = d / MARKER
    if p.is_file():
        try:
            m = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, OSError):
            m = None
        if not isinstance(m, dict) or not isinstance(m.get("kind"), str):
            raise FolderRefused(f"{p}: not a sinkscope marker (corrupt); move the folder's files or choose another folder")
        return m
    for name, kind in LEGACY_MARKERS.items():
        if (d / name).is_file():
            return {"kind": kind, "legacy": name}
    return None


def check(
    folder: str | Path,
    kind: str,
    outputs: Iterable[str],
    config: Mapping[str, Any] | None = None,
    *,
    option: str = "--out",
    resume: bool = False,
    overwrite: bool = False,
    ignore: Iterable[str] = (),
) -> dict | None:
    """Refuse (:class:`FolderRefused`, one line) a ``folder`` that ``kind`` may not write into;
    return its marker (``None``: new, empty or a user's folder ``overwrite`` lets it write beside).
    With ``resume`` and a marker holding settings, every stored field must equal ``config``'s.
    Creates nothing. ``outputs``: the names (``fnmatch`` patterns) the command writes there;
    ``ignore``: names the command only opens, never writes (a lock file), left out of the rule.

    >>> check("runs/brand-new", "scan", ("tokens.parquet",)) is None
    True
    """
    d = Path(folder)
    outputs = tuple(outputs)
    check_out_folder(d, option)
    if not d.exists():
        return None
    entries = [n for n in _entries(d) if n not in set(ignore)]
    if not entries:
        return None
    marker = read_marker(d)
    if marker is None:
        clash = [n for n in entries if _matches(n, outputs)]
        if overwrite and not clash:
            return None  # a user's folder: sinkscope writes beside the files there, never over one
        if overwrite:
            raise FolderRefused(
                f"{option} {d}: {clash[0]} is not sinkscope's (no {MARKER} there); --overwrite replaces only "
                "sinkscope's own files: move it or choose another folder"
            )
        first = (clash or entries)[0]
        raise FolderRefused(
            f"{option} {d} holds {first}: a folder sinkscope {kind} did not write (no {MARKER}); choose a new or "
            "empty folder" + ("" if clash else " or pass --overwrite to write beside those files")
            + (" (--overwrite replaces only sinkscope's own files)" if clash else "")
        )
    if marker["kind"] != kind:
        raise FolderRefused(
            f"{option} {d} holds a run of sinkscope {marker['kind']} ({marker.get('legacy', MARKER)}), not of {kind}; "
            "choose another folder"
        )
    users = set(marker.get("user_files") or ())
    mine = set(marker.get("files") or ())
    clash = [n for n in entries if n in users and _matches(n, outputs) and n not in mine]
    if clash:
        raise FolderRefused(
            f"{option} {d}: {clash[0]} is not sinkscope's (it was there before the run); move it or choose another folder"
        )
    if resume and config is not None and marker.get("config") is not None:
        diff = resume_differences(marker["config"], config)
        if diff:
            raise FolderRefused(resume_refusal(d, diff, option))
    return marker


def resume_differences(stored: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """``"NAME differs (stored A, now B)"`` for each field of ``stored`` or ``now`` whose values
    differ (compared as JSON, so a tuple equals a list).

    >>> resume_differences({"model": "a", "lr": 0.1}, {"model": "b", "lr": 0.1})
    ["model differs (stored 'a', now 'b')"]
    """
    norm = lambda v: json.loads(json.dumps(v, default=str))  # noqa: E731 - tuples as lists, paths as text
    out = []
    for k in [*stored, *(k for k in now if k not in stored)]:
        a, b = norm(stored.get(k)), norm(now.get(k))
        if a != b:
            out.append(f"{k} differs (stored {a!r}, now {b!r})")
    return out


def resume_refusal(folder: str | Path, diff: list[str], option: str = "--out") -> str:
    """The one line refusing a resume of ``folder`` with the differences ``diff``."""
    return f"--resume: {folder} was run with other settings: {'; '.join(diff)}; drop --resume or choose another {option}"


def claim(
    folder: str | Path,
    kind: str,
    outputs: Iterable[str],
    config: Mapping[str, Any] | None = None,
    *,
    option: str = "--out",
    resume: bool = False,
    overwrite: bool = False,
    ignore: Iterable[str] = (),
) -> dict:
    """:func:`check` ``folder``, then make it and write its marker; return the marker.

    The files already there that are not the command's stay the user's (``user_files``)."""
    d = Path(folder)
    outputs = tuple(outputs)
    old = check(d, kind, outputs, config, option=option, resume=resume, overwrite=overwrite, ignore=ignore)
    entries = [n for n in _entries(d) if n != MARKER and n not in LEGACY_MARKERS and n not in set(ignore)]
    if old is None:
        users = entries
    else:
        users = [n for n in entries if n in set(old.get("user_files") or ()) or not _matches(n, outputs)]
    keep_config = old.get("config") if (resume and old and old.get("config") is not None) else config
    marker = {
        "kind": kind,
        "sinkscope": package_versions(("sinkscope",))["sinkscope"],
        "config": dict(keep_config) if keep_config is not None else None,
        "fingerprint": fingerprint(keep_config),
        "outputs": list(outputs),
        "files": sorted(n for n in entries if n not in users),
        "user_files": sorted(users),
    }
    d.mkdir(parents=True, exist_ok=True)
    _write(d, marker)
    return marker


def own_files(folder: str | Path) -> list[Path]:
    """The entries of ``folder`` that are its command's (match its outputs, not a user's file)."""
    d = Path(folder)
    m = read_marker(d)
    if m is None:
        return []
    users = set(m.get("user_files") or ())
    outs = m.get("outputs") or ()
    return [d / n for n in _entries(d) if n not in users and n != MARKER and _matches(n, outs)]


def record(folder: str | Path) -> None:
    """Update the marker's ``files`` with what the command has written so far (the end of a run)."""
    d = Path(folder)
    p = d / MARKER
    if not p.is_file():
        return
    m = read_marker(d)
    m["files"] = sorted(f.name for f in own_files(d))
    _write(d, m)


def release(folder: str | Path) -> None:
    """Undo a claim that wrote nothing: a folder holding only its marker is removed (a run that
    failed before its first file leaves no folder behind)."""
    d = Path(folder)
    if d.is_dir() and [p.name for p in d.iterdir()] == [MARKER]:
        (d / MARKER).unlink()
        d.rmdir()


def _write(d: Path, marker: dict) -> None:
    """Write the marker atomically; an unchanged marker is left as it is (its mtime too)."""
    text = json.dumps(marker, indent=1, default=str) + "\n"
    p = d / MARKER
    if p.is_file() and p.read_text(errors="replace") == text:
        return
    tmp = d / f"{MARKER}.{os.getpid()}.tmp"
    tmp.write_text(text)
    os.replace(tmp, p)


__all__ = ["MARKER", "FolderRefused", "check", "claim", "fingerprint", "own_files", "read_marker", "record", "release", "resume_differences", "resume_refusal"]
