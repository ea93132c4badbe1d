"""Regenerate figures: run each needed analysis once (skipping fresh ones), then draw every figure
from the saved results into HTML and PNG, recording everything in ``OUT/manifest.json``.

Layout of ``OUT`` (default: ``figures/out`` next to the list)::

    runs/<run-id>/          one analysis's results (``sinkscope.run(config)``, config.json) + run.json
    <figure>.html, .png     one figure each; HTML loads the shared plotly.min.js
    plotly.min.js           plotly.js, written once (offline)
    manifest.json           per figure: run id, fingerprint, render key, files, status, timings

Freshness: a run is skipped when ``runs/<id>/run.json`` holds the fingerprint the list and the
installed code give now (:func:`sinkscope.figures.spec.run_fingerprint`); a figure is skipped when
the manifest holds the same render key (figure spec + run fingerprint + figure-code hash) and its
files exist and are newer than the run's ``run.json``. Runs write into ``runs/.tmp-<id>-<pid>``
and are renamed into place only when they succeed, so a failed or killed run leaves the previous
results (or nothing), never half of a run.

>>> from sinkscope.figures.spec import write_example_spec
>>> _ = write_example_spec("figs.toml")  # two figures of one tiny scan
>>> report = regenerate("figs.toml", tier="ci", png=False, progress=False, echo=None)
>>> [f.status for f in report.figures], [r.status for r in report.runs.values()]
(['rendered', 'rendered'], ['ran'])
>>> report = regenerate("figs.toml", tier="ci", png=False, progress=False, echo=None)
>>> [f.status for f in report.figures], [r.status for r in report.runs.values()]   # fresh: no work
(['fresh', 'fresh'], ['cached'])
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .. import api as _api
from .. import ownership
from .. import runs as _runs
from .._utils import SinkscopeError, package_versions
from .render import PngExporter, draw, ensure_plotly_js, write_html
from .spec import (
    RENDER_SOURCES,
    FigureList,
    FigureSpec,
    RunSpec,
    _hash,
    load_figure_list,
    run_fingerprint,
    source_digest,
)

log = logging.getLogger("sinkscope")
MANIFEST = "manifest.json"


@dataclass
class RunOutcome:
    """What happened to one analysis run: ``ran``, ``cached`` (fresh results reused) or ``failed``."""

    id: str
    status: str
    fingerprint: str
    seconds: float = 0.0
    reason: str = ""
    error: str | None = None


@dataclass
class FigureOutcome:
    """What happened to one figure: ``rendered``, ``fresh`` (files up to date) or ``failed``."""

    name: str
    status: str
    run_id: str
    files: list[str] = field(default_factory=list)
    run_s: float = 0.0
    render_s: float = 0.0
    png_s: float = 0.0
    error: str | None = None


@dataclass
class RegenReport:
    """The result of :func:`regenerate`: one outcome per selected figure and per run it needed."""

    out: Path
    figures: list[FigureOutcome]
    runs: dict[str, RunOutcome]
    seconds: float

    @property
    def failed(self) -> list[FigureOutcome]:
        """The figures that could not be made (their run failed, or drawing them did)."""
        return [f for f in self.figures if f.status == "failed"]

    @property
    def ok(self) -> bool:
        """True when every selected figure exists and is up to date."""
        return not self.failed


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _line(echo: Callable[[str], None] | None, tag: str, name: str, msg: str) -> None:
    if echo is not None:
        echo(f"{tag:<8} {name:<34} {msg}")


# -------------------------------------------------------------------------------------------- runs


def read_run_meta(run_dir: Path) -> dict[str, Any]:
    """``run.json`` of a finished run (empty when there is none or it is unreadable)."""
    try:
        return json.loads((run_dir / "run.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def run_is_fresh(run_dir: Path, fingerprint: str) -> bool:
    """Whether ``run_dir`` holds complete results with this fingerprint."""
    meta = read_run_meta(run_dir)
    return meta.get("fingerprint") == fingerprint and (run_dir / "summary.json").exists()


def execute_run(
    run: RunSpec,
    dest: Path,
    fingerprint: str,
    parts: dict,
    progress: bool = True,
    fresh_features: bool = False,
) -> float:
    """Run one analysis with ``sinkscope.run(run.config)`` into ``dest`` (atomically); return seconds.

    The config's ``out`` is a temporary sibling folder; on success its ``config.json`` is
    rewritten with ``out`` = ``dest`` (so ``sinkscope.run(sinkscope.load_run(dest).config)``
    reruns it there), ``run.json`` is written and the folder renamed to ``dest`` (replacing older
    results). On any error the temporary folder is removed and the error raised. The config's
    checks that need this machine (the device exists) run here, before any work.
    ``fresh_features``: a probe recomputes its cached features (``cache=False``).
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".tmp-{dest.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    changes: dict[str, Any] = {"out": str(tmp)}
    if run.after is not None:  # model = run:ID - that run's folder beside this one
        changes["model"] = str((dest.parent / run.after).resolve())
    if fresh_features and run.analysis == "probe":
        changes["cache"] = False
    t0 = time.perf_counter()
    started = _now()
    try:
        config = run.config.replace(**changes)  # checked again, on the machine that runs it
        _api.run(config, progress=progress)
        if not (tmp / "summary.json").exists():
            raise SinkscopeError(f"sinkscope {run.analysis} wrote no summary.json")
        shutil.rmtree(tmp / "parts", ignore_errors=True)  # a scan's tokens.parquet holds every row
        config.replace(out=str(dest.resolve())).save(tmp / _runs.CONFIG_FILE)
        seconds = time.perf_counter() - t0
        meta = {
            "run_id": run.id,
            "analysis": run.analysis,
            "model": run.model,
            "data": list(run.data),
            "params": run.params,
            "tier": run.tier,
            "recipe": run.recipe(),
            "fingerprint": fingerprint,
            "fingerprint_parts": parts,
            "started": started,
            "finished": _now(),
            "seconds": round(seconds, 3),
        }
        (tmp / "run.json").write_text(json.dumps(meta, indent=1, default=str))
        old = dest.parent / f".old-{dest.name}-{os.getpid()}"
        if dest.exists():
            os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
        return seconds
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _changed(old: dict, new: dict) -> str:
    if not old:
        return "no results yet"
    if old.get("fingerprint_parts") is None:
        return "results without a fingerprint"
    diff = [k for k in new if old["fingerprint_parts"].get(k) != new[k]]
    return "changed: " + ", ".join(diff) if diff else "results incomplete"


# ---------------------------------------------------------------------------------------- manifest


def load_manifest(out: Path) -> dict[str, Any]:
    """``OUT/manifest.json`` (an empty skeleton when absent or unreadable)."""
    try:
        m = json.loads((out / MANIFEST).read_text())
        if isinstance(m, dict):
            m.setdefault("figures", {})
            m.setdefault("runs", {})
            return m
    except (OSError, json.JSONDecodeError):
        pass
    return {"figures": {}, "runs": {}}


def _write_manifest(out: Path, manifest: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{MANIFEST}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, default=str))
    os.replace(tmp, out / MANIFEST)


# ------------------------------------------------------------------------------------- figures


def render_key(fig: FigureSpec, fingerprint: str, code: str, self_contained: bool) -> str:
    """Hash of what decides a figure's files: its spec, its run's fingerprint, the figure code."""
    return _hash({"figure": fig.as_dict(), "run": fingerprint, "code": code, "embed_js": self_contained})[:16]


def _figure_is_fresh(out: Path, old: dict | None, key: str, files: list[str], run_dir: Path) -> bool:
    if not old or old.get("render_key") != key or old.get("status") == "failed":
        return False
    paths = [out / f for f in files]
    if not all(p.exists() for p in paths):
        return False
    run_mtime = (run_dir / "run.json").stat().st_mtime if (run_dir / "run.json").exists() else float("inf")
    return min(p.stat().st_mtime for p in paths) >= run_mtime


def _provenance(fig: FigureSpec, run: RunSpec, meta: dict) -> str:
    return (
        f"run {run.id}: sinkscope {run.analysis} on {run.describe().split(' on ', 1)[1]} ({run.recipe()}), "
        f"finished {meta.get('finished', '?')}; fingerprint {meta.get('fingerprint', '?')}. "
        f"Regenerate with: python -m sinkscope.figures --only {fig.name}"
    )


def regenerate(
    list_path: str | Path | None = None,
    out: str | Path | None = None,
    tier: str = "ci",
    only: list[str] | None = None,
    force: bool = False,
    png: bool = True,
    self_contained: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] | None = print,
    figure_list: FigureList | None = None,
) -> RegenReport:
    """Regenerate the figures of ``tier`` (or those named in ``only``) of the list at ``list_path``.

    ``out``: output folder (default ``<list folder>/out``). ``force``: rerun every needed analysis
    and redraw every selected figure. ``png``: also export PNGs (kaleido + Chromium).
    ``self_contained``: embed plotly.js in every HTML file instead of sharing ``plotly.min.js``.
    ``progress``: show the analyses' own progress bars. ``echo``: receives one line per step
    (``None``: silent). A failing run fails only its figures and a failing figure only itself;
    see :attr:`RegenReport.failed`. One regeneration at a time may write to ``out`` (a second one
    fails at once with a clear error instead of removing the first one's work in progress).

    >>> from sinkscope.figures.spec import write_example_spec
    >>> _ = write_example_spec("figs.toml")  # two figures of one tiny scan
    >>> rep = regenerate("figs.toml", out="figs-out", only=["tiny-norms"], png=False, progress=False, echo=None)
    >>> rep.ok, rep.figures[0].files
    (True, ['tiny-norms.html'])
    """
    import fcntl

    spec = figure_list or load_figure_list(list_path)
    out_dir = Path(out) if out is not None else spec.path.parent / "out"
    # a new or empty folder or a figure folder's own (sinkscope.ownership); the lock is only opened
    ownership.check(out_dir, "figures", ownership.OUTPUTS["figures"], ignore=(".lock",))
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".lock", "a") as lock:  # "a": opening leaves the file (and its mtime) as it is
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise SinkscopeError(
                f"another figure regeneration is writing to {out_dir}; wait for it to finish"
            ) from None
        ownership.claim(out_dir, "figures", ownership.OUTPUTS["figures"], ignore=(".lock",))
        try:
            return _regenerate(spec, out_dir, tier, only, force, png, self_contained, progress, echo)
        finally:
            ownership.record(out_dir)  # the marker lists the files this folder's regenerations wrote


@dataclass
class _Pass:
    """What one regeneration shares between its runs and figures."""

    out: Path
    manifest: dict[str, Any]
    code: str  # content hash of the figure code (RENDER_SOURCES)
    force: bool
    png: bool
    self_contained: bool
    echo: Callable[[str], None] | None
    exporter: PngExporter | None = None


def _prepare_manifest(spec: FigureList, out: Path) -> dict[str, Any]:
    """The manifest of ``out``, pruned to the list's figures and runs, with this pass's header."""
    manifest = load_manifest(out)
    names = {f.name for f in spec.figures}
    manifest["figures"] = {k: v for k, v in manifest["figures"].items() if k in names}
    manifest["runs"] = {k: v for k, v in manifest["runs"].items() if k in spec.runs}
    manifest.update(
        format=1,
        list=str(spec.path),
        sinkscope=package_versions(("sinkscope",))["sinkscope"],
        legend={
            "run status": "ran | cached (fresh results reused) | failed",
            "figure status": "rendered | fresh (files up to date) | failed",
            "fingerprint": "of the figure's run: config, model, data files, analysis sources, versions",
            "render_key": "figure spec + run fingerprint + figure code",
        },
    )
    return manifest


def _run_record(run: RunSpec, ro: RunOutcome, meta: dict) -> dict[str, Any]:
    return {
        "analysis": run.analysis,
        "model": run.model,
        "data": list(run.data),
        "params": run.params,
        "tier": run.tier,
        "dir": str(Path("runs") / run.id),
        "fingerprint": ro.fingerprint,
        "status": ro.status,
        "reason": ro.reason,
        "seconds": round(ro.seconds, 3),
        "finished": meta.get("finished"),
        "error": ro.error,
        "updated": _now(),
    }


def _regenerate(
    spec: FigureList,
    out: Path,
    tier: str,
    only: list[str] | None,
    force: bool,
    png: bool,
    self_contained: bool,
    progress: bool,
    echo: Callable[[str], None] | None,
) -> RegenReport:
    """The body of :func:`regenerate`, run while it holds the output folder's lock."""
    t_start = time.perf_counter()
    runs_dir = out / "runs"
    selected = spec.select(tier=tier, only=only)
    groups: dict[str, list[FigureSpec]] = {}
    for f in selected:
        groups.setdefault(f.run_id, []).append(f)
    runs_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*runs_dir.glob(".tmp-*"), *runs_dir.glob(".old-*")]:  # left by a killed regeneration
        shutil.rmtree(stale, ignore_errors=True)
    p = _Pass(
        out, _prepare_manifest(spec, out), source_digest(RENDER_SOURCES), force, png, self_contained, echo
    )
    if echo is not None:
        echo(
            f"figures: {len(selected)} figure(s) from {len(groups)} run(s) "
            f"({'only ' + ', '.join(only) if only else 'tier ' + tier}) -> {out}"
        )
    figures: list[FigureOutcome] = []
    runs: dict[str, RunOutcome] = {}
    if not self_contained and selected:
        ensure_plotly_js(out)
    try:
        with PngExporter() as p.exporter:
            for run_id, figs in groups.items():
                run = spec.runs[run_id]
                run_dir = runs_dir / run_id
                for r in run.chain():  # the runs whose output is this run's model, first
                    if r.id not in runs:
                        runs[r.id] = _ensure_chained(r, runs, runs_dir, force, progress, echo)
                        p.manifest["runs"][r.id] = _run_record(r, runs[r.id], read_run_meta(runs_dir / r.id))
                ro = runs[run_id]
                meta = read_run_meta(run_dir)
                figures += [_ensure_figure(fig, run, ro, run_dir, meta, p) for fig in figs]
                _write_manifest(out, p.manifest)
    finally:
        p.manifest["updated"] = _now()
        _write_manifest(out, p.manifest)
    rep = RegenReport(out, figures, runs, time.perf_counter() - t_start)
    if echo is not None:
        _echo_summary(rep, echo)
    return rep


def _echo_summary(rep: RegenReport, echo: Callable[[str], None]) -> None:
    cnt = {s: sum(f.status == s for f in rep.figures) for s in ("rendered", "fresh", "failed")}
    rc = {s: sum(r.status == s for r in rep.runs.values()) for s in ("ran", "cached", "failed")}
    echo(
        f"done in {rep.seconds:.1f} s: {len(rep.figures)} figure(s) - {cnt['rendered']} rendered, "
        f"{cnt['fresh']} up to date, {cnt['failed']} failed; {len(rep.runs)} run(s) - {rc['ran']} ran, "
        f"{rc['cached']} cached, {rc['failed']} failed; manifest {rep.out / MANIFEST}"
    )
    for f in rep.failed:
        echo(f"FAILED   {f.name}: {f.error}")


def _ensure_chained(run: RunSpec, done: dict[str, RunOutcome], runs_dir: Path, force: bool, progress: bool, echo) -> RunOutcome:
    """:func:`_ensure_run`, unless the run its model comes from failed (then this one fails too)."""
    up = done.get(run.after) if run.after is not None else None
    if up is not None and up.status == "failed":
        msg = f"its model, run {run.after!r}, failed"
        _line(echo, "FAILED", run.id, msg)
        return RunOutcome(run.id, "failed", run_fingerprint(run)[0], reason="upstream failed", error=msg)
    return _ensure_run(run, runs_dir / run.id, force, progress, echo)


def _ensure_run(run: RunSpec, run_dir: Path, force: bool, progress: bool, echo) -> RunOutcome:
    fp, parts = run_fingerprint(run)
    if not force and run_is_fresh(run_dir, fp):
        _line(echo, "cached", run.id, f"{run.describe()} (fingerprint {fp}, results reused)")
        return RunOutcome(run.id, "cached", fp, reason="fresh")
    old = read_run_meta(run_dir)
    reason = "forced" if force else _changed(old, parts)
    _line(echo, "run", run.id, f"{run.describe()} ({reason}) ...")
    fresh_features = force or any(
        (old.get("fingerprint_parts") or {}).get(k) not in (None, parts[k]) for k in ("sources", "versions")
    )
    try:
        seconds = execute_run(run, run_dir, fp, parts, progress=progress, fresh_features=fresh_features)
    except KeyboardInterrupt:
        raise
    except Exception as e:
        msg = str(e) if isinstance(e, SinkscopeError) else f"{type(e).__name__}: {e}"
        log.debug("run %s failed:\n%s", run.id, traceback.format_exc())
        _line(echo, "FAILED", run.id, msg)
        return RunOutcome(run.id, "failed", fp, reason=reason, error=msg)
    _line(echo, "ran", run.id, f"{seconds:.1f} s")
    return RunOutcome(run.id, "ran", fp, seconds, reason)


def _figure_failed(
    fig: FigureSpec, record: dict, error: str, run_s: float, p: _Pass, keep: dict | None = None
):
    """Record a figure that could not be made; its files go (they would show older results)."""
    _drop_outputs(p.out, fig.name)
    p.manifest["figures"][fig.name] = {
        **(keep or {}),
        **record,
        "status": "failed",
        "error": error,
        "files": [],
        "updated": _now(),
    }
    _line(p.echo, "FAILED", fig.name, error)
    return FigureOutcome(fig.name, "failed", record["run"], run_s=run_s, error=error)


def _ensure_figure(
    fig: FigureSpec, run: RunSpec, ro: RunOutcome, run_dir: Path, meta: dict, p: _Pass
) -> FigureOutcome:
    html_name, png_name = f"{fig.name}.html", f"{fig.name}.png"
    old = p.manifest["figures"].get(fig.name)
    key = render_key(fig, ro.fingerprint, p.code, p.self_contained)
    record = {
        "kind": fig.kind,
        "tier": fig.tier,
        "run": run.id,
        "fingerprint": ro.fingerprint,
        "render_key": key,
    }
    run_s = ro.seconds if ro.status == "ran" else 0.0
    if ro.status == "failed":
        return _figure_failed(fig, record, f"run {run.id} failed: {ro.error}", run_s, p, keep=old)
    wanted = [html_name, png_name] if p.png else [html_name]
    if not p.force and _figure_is_fresh(p.out, old, key, wanted, run_dir):
        files = list(old.get("files", wanted))  # type: ignore[union-attr]
        p.manifest["figures"][fig.name] = {**old, **record, "status": "fresh", "files": files, "error": None}
        _line(p.echo, "fresh", fig.name, "up to date")
        return FigureOutcome(fig.name, "fresh", run.id, files=files)
    t0 = time.perf_counter()
    try:
        figure = draw(fig, run_dir)
        write_html(figure, p.out / html_name, fig, _provenance(fig, run, meta), p.self_contained)
        t1 = time.perf_counter()
        files = [html_name]
        if p.png:
            assert p.exporter is not None
            p.exporter.write(figure, p.out / png_name, fig.width, fig.height, fig.scale, fig.caption)
            files.append(png_name)
        elif (p.out / png_name).exists():
            (p.out / png_name).unlink()  # drawn from older results or an older spec
        t2 = time.perf_counter()
    except KeyboardInterrupt:
        raise
    except Exception as e:
        log.debug("figure %s failed:\n%s", fig.name, traceback.format_exc())
        msg = str(e) if isinstance(e, SinkscopeError) else f"{type(e).__name__}: {e}"
        return _figure_failed(fig, record, msg, run_s, p)
    fo = FigureOutcome(fig.name, "rendered", run.id, files, run_s, t1 - t0, (t2 - t1) if p.png else 0.0)
    p.manifest["figures"][fig.name] = {
        **record,
        "status": "rendered",
        "files": files,
        "timings": {"run_s": round(run_s, 3), "render_s": round(fo.render_s, 3), "png_s": round(fo.png_s, 3)},
        "error": None,
        "updated": _now(),
    }
    png_note = f", png {fo.png_s:.1f} s" if p.png else ""
    _line(p.echo, "rendered", fig.name, f"{fig.kind}: html {fo.render_s:.1f} s{png_note}")
    return fo


def report_dict(rep: RegenReport) -> dict[str, Any]:
    """A JSON-able view of a :class:`RegenReport`."""
    return {
        "out": str(rep.out),
        "seconds": rep.seconds,
        "figures": [asdict(f) for f in rep.figures],
        "runs": {k: asdict(v) for k, v in rep.runs.items()},
    }


def _drop_outputs(out: Path, name: str) -> None:
    """Remove a figure's HTML and PNG (after a failure, they would show older results)."""
    for suffix in (".html", ".png"):
        f = out / f"{name}{suffix}"
        if f.exists():
            f.unlink()
