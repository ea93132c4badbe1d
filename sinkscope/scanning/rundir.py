"""The folder of a resumable scan: what is written there, in which order, and how it is read back.

``parts/*.parquet`` hold the rows of each batch, ``progress.jsonl`` one line per batch (the item
records, so a kill leaves a batch in or out, whole), ``seen/*.png`` the first pictures the model
saw, ``scan_config.json`` the settings, and ``.sinkscope.json`` the marker that proves the
folder's outputs are a scan's own (:mod:`sinkscope.ownership`: a scan never removes a user's files).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from .. import distributed, ownership
from ..sinks import Rule, SinkReport
from .result import ScanResult


class _RunDir:
    """Resumable scan directory: ``parts/*.parquet`` + ``progress.jsonl`` + ``scan_config.json``.

    In a data-parallel scan (``dist``, :mod:`sinkscope.distributed`) process r writes
    ``parts/rank{r}-part-*.parquet``, ``progress.rank{r}.jsonl`` and ``seen/rank{r}-*.png``; only the
    main process prepares the folder, the others wait for it."""

    #: the marker scans wrote before :data:`sinkscope.ownership.MARKER` (still read as a scan's)
    MARKER = ".sinkscope-run"
    #: what a scan writes into its folder (and so may remove when it starts afresh)
    OUTPUTS = ("parts", "seen", "progress.jsonl", "tokens.parquet", "activations")

    def __init__(self, out: Path, config: dict, resume: bool, overwrite: bool = False, dist=None):
        self.out = out
        self.parts = out / "parts"
        self.seen = out / "seen"
        self.prefix = distributed.part_prefix(dist)
        self.progress = distributed.progress_file(out, dist)
        if dist is None or dist.is_main:
            self._prepare(config, resume, overwrite)
        if dist is not None:
            dist.barrier()  # the folder is ready (or the main process failed and the launcher ends all)

    def _prepare(self, config: dict, resume: bool, overwrite: bool) -> None:
        out = self.out
        cfg_path = out / "scan_config.json"
        old = ownership.check(out, "scan", ownership.OUTPUTS["scan"], config, resume=resume, overwrite=overwrite)
        if resume and old is not None and old.get("config") is None and cfg_path.exists():
            try:  # a scan from before the marker held its settings: scan_config.json
                stored = json.loads(cfg_path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise ownership.FolderRefused(f"--resume: {cfg_path} is not JSON; drop --resume or choose another --out") from None
            diff = ownership.resume_differences({k: stored.get(k) for k in config}, config) if isinstance(stored, dict) else ["settings unreadable"]
            if diff:
                raise ownership.FolderRefused(ownership.resume_refusal(out, diff))
        ownership.claim(out, "scan", ownership.OUTPUTS["scan"], config, resume=resume, overwrite=overwrite)
        if not (resume and old is not None):  # a fresh start removes this scan's own earlier outputs only
            for p in ownership.own_files(out):
                if p.name in self.OUTPUTS or p in distributed.stale_files(out):
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
        (out / self.MARKER).unlink(missing_ok=True)  # the marker of earlier versions: .sinkscope.json now
        self.parts.mkdir(parents=True, exist_ok=True)
        self.seen.mkdir(parents=True, exist_ok=True)
        cfg_path.write_text(json.dumps(config, indent=1))

    @classmethod
    def check_owned(cls, out: Path, overwrite: bool = False) -> None:
        """Refuse (one line, :class:`~sinkscope.ownership.FolderRefused`) an ``--out`` that is a
        file, or a folder a scan may not write into (:func:`sinkscope.ownership.check`: new, empty
        or a scan's own folder; ``overwrite`` writes beside a user's files, never over one). Creates
        nothing.

        >>> _ = Path("notes.txt").write_text("mine")
        >>> _RunDir.check_owned(Path("notes.txt"))
        Traceback (most recent call last):
        sinkscope._utils.SinkscopeError: --out: notes.txt is a file, not a folder; choose a folder
        >>> _RunDir.check_owned(Path("."))
        Traceback (most recent call last):
        sinkscope.ownership.FolderRefused: --out . holds ...: a folder sinkscope scan did not write ...
        """
        ownership.check(out, "scan", ownership.OUTPUTS["scan"], overwrite=overwrite)

    def done(self) -> dict[str, dict]:
        """Image name -> last record, over every progress log (those of all processes, newest file last)."""
        files = [p for p in distributed.progress_files(self.out) if p.exists()]
        files.sort(key=lambda p: p.stat().st_mtime)
        return {n: r for p in files for n, r in self.read_progress(p).items()}

    @staticmethod
    def read_progress(progress: Path) -> dict[str, dict]:
        """Image name -> its last logged record (a torn last line from a kill is ignored)."""
        out: dict[str, dict] = {}
        if progress.exists():
            for line in progress.read_text().splitlines():
                if line.strip():
                    try:
                        recs = json.loads(line)
                    except json.JSONDecodeError:  # a torn last line from a kill: ignore it
                        continue
                    for rec in recs if isinstance(recs, list) else [recs]:
                        out[rec["image"]] = rec
        return out

    def write_part(self, rows: pd.DataFrame) -> str:
        k = len(list(self.parts.glob(f"{self.prefix}part-*.parquet")))
        name = f"{self.prefix}part-{k:05d}.parquet"
        tmp = self.parts / (name + ".tmp")
        rows.to_parquet(tmp, index=False)
        os.replace(tmp, self.parts / name)
        return name

    def next_seen(self) -> str:
        """File name for the next kept picture in ``seen/``."""
        return f"{self.prefix}{len(list(self.seen.glob(self.prefix + '*.png'))):05d}.png"

    def read_result(self, rules: list[Rule]) -> ScanResult:
        """The finished run written in this folder (``tokens.parquet``, ``summary.json``)."""
        tokens = pd.read_parquet(self.out / "tokens.parquet")
        summary = json.loads((self.out / "summary.json").read_text())
        return ScanResult(SinkReport.from_tokens(tokens, rules), summary, self.out)

    def log(self, records: list[dict]) -> None:
        """Append one batch's records as a single line: a kill leaves the batch in or out, whole."""
        with self.progress.open("a") as fh:
            fh.write(json.dumps(records) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def load_rows(self, records: dict[str, dict]) -> pd.DataFrame:
        parts = sorted({r["part"] for r in records.values() if r.get("status") == "ok"})
        if not parts:
            return pd.DataFrame()
        frames = []
        for p in parts:  # from each part, only the images whose logged record names that part
            names = {n for n, r in records.items() if r.get("status") == "ok" and r.get("part") == p}
            df = pd.read_parquet(self.parts / p)
            frames.append(df[df["image"].isin(names)])
        return pd.concat(frames, ignore_index=True)


def seen_pictures(run_dir: str | Path) -> dict[str, Path]:
    """Image name -> the saved picture the model saw (``seen/*.png``) of a scan run folder, read
    from its ``progress.jsonl`` (later records win; a torn last line is ignored).

    >>> from sinkscope.data import sample_images
    >>> from sinkscope.scanning import scan
    >>> _ = scan("tiny-dinov2+sinks", images=sample_images(2), out="runs/seen", progress=False)
    >>> seen_pictures("runs/seen")["astronaut"]
    PosixPath('runs/seen/seen/00000.png')
    """
    d = Path(run_dir)
    out: dict[str, Path] = {}
    for name, rec in _RunDir.read_progress(d / "progress.jsonl").items():
        f = d / "seen" / str(rec.get("seen") or "")
        if rec.get("seen") and f.is_file():
            out[name] = f
    return out


def save_seen(path: Path, pixels: np.ndarray) -> None:
    """Save a picture the model saw (``HxWx3`` uint8) as a PNG."""
    from PIL import Image

    Image.fromarray(pixels).save(path)


def load_seen(path: Path) -> np.ndarray | None:
    """A saved picture as ``HxWx3`` uint8, or ``None`` when the file is gone."""
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB")) if path.exists() else None
