"""One typed, JSON-serialisable config per analysis, validated before any work starts.

A config holds every setting of a run (model, data, rule, options, output folder) and nothing
else: ``sinkscope.run(config)`` runs it, every run folder keeps it as ``config.json``, and
``sinkscope.load_run(DIR).config`` gives it back, so ``run(load_run(DIR).config)`` reproduces a run.
The command line, figure regeneration and Python all build the same configs, so every entry
point gets the same checks: a bad value fails in one line that names the option.

>>> cfg = ScanConfig(model="tiny-dinov2+sinks", method="all", threshold=50.0)
>>> RunConfig.from_json(cfg.to_json()) == cfg
True
>>> ScanConfig(threshold=-5)
Traceback (most recent call last):
...
sinkscope._utils.SinkscopeError: threshold: must be a finite number > 0 (an L2 norm is never negative), got -5
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

from ._utils import SinkscopeError, check_out_folder

#: Version of ``config.json`` (and of the typed summaries); bumped when a field changes meaning.
SCHEMA_VERSION = 1
#: analysis name -> its config class
CONFIGS: dict[str, type[RunConfig]] = {}
DTYPES = ("float32", "float16", "bfloat16")
#: the largest input side accepted (CLIP-L/14-336 uses 336; 4096 px is already 85k patches at 14 px)
MAX_IMAGE_SIDE = 4096


def _register(cls):
    CONFIGS[cls.analysis] = cls
    return cls


@dataclass(frozen=True)
class RunConfig:
    """Base of every analysis config: JSON round trip, ``replace`` and the shared checks."""

    analysis: ClassVar[str] = ""

    # -- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """``{"analysis": ..., "schema_version": ..., <every field>}`` with JSON types only."""
        d: dict[str, Any] = {"analysis": self.analysis, "schema_version": SCHEMA_VERSION}
        for f in fields(self):
            v = getattr(self, f.name)
            d[f.name] = list(v) if isinstance(v, tuple) else v
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> RunConfig:
        """The config a :meth:`to_dict` wrote (unknown analyses and fields fail in one line)."""
        if not isinstance(d, dict):
            raise SinkscopeError(f"config: expected a JSON object, got {'null' if d is None else type(d).__name__}")
        d = dict(d)
        name = d.pop("analysis", None)
        version = d.pop("schema_version", SCHEMA_VERSION)
        if name not in CONFIGS:
            raise SinkscopeError(f"config: unknown analysis {name!r}; known: {', '.join(CONFIGS)}")
        if version > SCHEMA_VERSION:
            raise SinkscopeError(
                f"config: schema version {version} is newer than this sinkscope's ({SCHEMA_VERSION}); upgrade"
            )
        cls = CONFIGS[name]
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise SinkscopeError(f"config for {name}: unknown field(s) {', '.join(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    @staticmethod
    def from_json(text: str) -> RunConfig:
        try:
            return RunConfig.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise SinkscopeError(f"config: invalid JSON ({e.msg})") from None

    @staticmethod
    def load(path: str | Path) -> RunConfig:
        """Read a ``config.json``."""
        p = Path(path)
        if not p.is_file():
            raise SinkscopeError(f"no config at {p}")
        return RunConfig.from_json(p.read_text())

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.write_text(self.to_json() + "\n")
        return p

    def check_runnable(self) -> None:
        """What only this machine can answer, checked as a run starts: the device exists."""
        check_device(getattr(self, "device", None), available=True)

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with some fields changed (and checked again)."""
        return dataclasses.replace(self, **changes)

    # -- checks shared by the analyses --------------------------------------------------------
    def _check_common(self) -> None:
        check_device(getattr(self, "device", None))
        dtype = getattr(self, "dtype", None)
        if dtype is not None and dtype not in DTYPES:
            raise SinkscopeError(f"dtype: choose from {', '.join(DTYPES)}, got {dtype!r}")
        check_image_size(getattr(self, "image_size", None))
        bs = getattr(self, "batch_size", 1)
        if not isinstance(bs, int) or bs < 1:
            raise SinkscopeError(f"batch_size: must be an integer >= 1, got {bs!r}")
        out = getattr(self, "out", None)
        if out is not None:
            check_out_folder(out)
        if not str(getattr(self, "layers", "all")).strip():
            raise SinkscopeError("layers: empty selection; use 'all', '0,3,5', '4:9' or '-3:'")

    def _check_norm_rule(self, threshold: float | None, relative: float | None, prefix: str = "") -> None:
        """One absolute or one relative norm threshold (or neither: the default), each finite and > 0."""
        if threshold is not None and relative is not None:
            raise SinkscopeError(f"{prefix}threshold and {prefix}relative: give one norm rule, not both")
        _positive(f"{prefix}threshold", threshold, " (an L2 norm is never negative)")
        _positive(f"{prefix}relative", relative)


def _positive(name: str, v: float | None, why: str = "") -> None:
    if v is not None and not (v > 0 and math.isfinite(v)):
        raise SinkscopeError(f"{name}: must be a finite number > 0{why}, got {v:g}")


def _check_sink_rule(sink_rule: Any, **old: Any):
    """At most one of ``sink_rule`` and its old spellings ``old`` (name -> value) is given; returns
    the rule a given ``sink_rule`` reads as (:func:`~sinkscope.interventions.rule_from`; ``norm``
    when none is: the checks of its method then pass)."""
    from .interventions import rule_from

    named = [k for k, v in (("sink_rule", sink_rule), *old.items()) if v is not None]
    if len(named) > 1:
        raise SinkscopeError(f"{', '.join(named)}: give one ViT sink rule (sink_rule, e.g. norm:100, norm:x5 or topk:4)")
    return rule_from(sink_rule)


def check_device(device: str | None, available: bool = False) -> None:
    """``None``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``, ...; with ``available`` the device must
    also exist on this machine (checked when a run starts, not when a saved config is read, so a
    GPU run's ``config.json`` still loads on a laptop).

    >>> check_device("cuda:1")   # a valid name; whether it exists is checked at run time
    """
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise SinkscopeError(f"device: {device!r} is not a device name (use cpu, cuda, cuda:1, mps)") from None
    if not available:
        return
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SinkscopeError(f"device: {device!r} asked, but this machine has no CUDA device")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise SinkscopeError(f"device: {device!r} asked, but there are {torch.cuda.device_count()} CUDA devices")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise SinkscopeError(f"device: {device!r} asked, but MPS is not available here")


def check_image_size(size: int | tuple[int, int] | None) -> None:
    if size is None:
        return
    sides = (size, size) if isinstance(size, int) else tuple(size)
    if len(sides) != 2 or not all(isinstance(s, int) and 1 <= s <= MAX_IMAGE_SIDE for s in sides):
        raise SinkscopeError(f"image_size: give 1..{MAX_IMAGE_SIDE} px (one side or HxW), got {size!r}")


@_register
@dataclass(frozen=True)
class ScanConfig(RunConfig):
    """``sinkscope scan``: norms, attention received and sink dims per (image, layer, token).

    ``images``: files, folders, manifests or ``embedded[:N]`` (default: the embedded photos);
    ``texts``: prompts for a causal LM. ``method``: ``norm``, ``attention``, ``dims`` or ``all``.
    The norm rule is absolute (``threshold``), relative (``relative`` x median) or automatic.
    """

    analysis: ClassVar[str] = "scan"
    model: str = "dinov2-small"
    images: tuple[str, ...] | None = None
    texts: tuple[str, ...] | None = None
    method: str = "norm"
    threshold: float | None = None
    relative: float | None = None
    auto_per_image: bool = False
    attn_factor: float = 10.0
    attn_fraction: float | None = None
    tau: float = 20.0
    massive_abs: float = 100.0
    massive_ratio: float = 1000.0
    dims_min_layer: int = 0
    layers: str = "all"
    batch_size: int = 8
    device: str | None = None
    dtype: str | None = None
    image_size: int | tuple[int, int] | None = None
    save_layers: str | None = None
    save_dtype: str = "float32"
    out: str | None = None
    resume: bool = False
    overwrite: bool = False
    report: bool = True

    def __post_init__(self):
        for name in ("images", "texts"):  # a string is one spec ("embedded:2"), never its letters
            if isinstance(getattr(self, name), str):
                object.__setattr__(self, name, (getattr(self, name),))
        methods = ("norm", "attention", "dims", "all")
        if self.method not in methods:
            raise SinkscopeError(f"method: choose from {', '.join(methods)}, got {self.method!r}")
        self._check_norm_rule(self.threshold, self.relative)
        _positive("attn_factor", self.attn_factor)
        if self.attn_fraction is not None and not 0 < self.attn_fraction <= 1:
            raise SinkscopeError(f"attn_fraction: must be in (0, 1], got {self.attn_fraction:g}")
        _positive("tau", self.tau)
        _positive("massive_abs", self.massive_abs)
        _positive("massive_ratio", self.massive_ratio)
        if self.dims_min_layer < 0:
            raise SinkscopeError(f"dims_min_layer: must be >= 0, got {self.dims_min_layer}")
        if self.save_dtype not in DTYPES:
            raise SinkscopeError(f"save_dtype: choose from {', '.join(DTYPES)}, got {self.save_dtype!r}")
        if self.save_layers is not None and self.out is None:
            raise SinkscopeError("save_layers: storing activations needs an output folder (out)")
        self._check_common()


@_register
@dataclass(frozen=True)
class ProbeConfig(RunConfig):
    """``sinkscope probe``: linear probes per layer and token group on a labelled image set.
    ``sink_rule``: the ViT sink rule of the ``sink`` groups, at every probed layer (a string of
    :data:`~sinkscope.interventions.rules.RULE_GRAMMAR` without ``@LAYER``; ``None``: the model's
    :func:`~sinkscope.interventions.default_rule`); ``threshold`` / ``relative`` are its old
    spellings ``norm:T`` / ``norm:xR``."""

    analysis: ClassVar[str] = "probe"
    model: str = "dinov2-small"
    dataset: str = "lfw-faces"
    labels: tuple[str, ...] | None = None
    groups: tuple[str, ...] = ("cls", "mean", "random", "sink", "nonsink", "nonsink_random")
    layers: str = "all"
    folds: int = 5
    seed: int = 0
    threshold: float | None = None
    relative: float | None = None
    sink_rule: str | dict | None = None
    max_images: int | None = None
    batch_size: int = 16
    image_size: int | tuple[int, int] | None = None
    device: str | None = None
    dtype: str | None = None
    cache: bool = True
    n_jobs: int | None = None
    out: str | None = None

    def __post_init__(self):
        from .probing import GROUPS

        bad = [g for g in self.groups if g not in GROUPS]
        if bad or not self.groups:
            raise SinkscopeError(f"groups: choose from {', '.join(GROUPS)}, got {', '.join(bad) or 'none'}")
        self._check_norm_rule(self.threshold, self.relative)
        _check_sink_rule(self.sink_rule, threshold=self.threshold, relative=self.relative).check_for("probe", every_layer=True)
        if not isinstance(self.folds, int) or not 2 <= self.folds <= 20:
            raise SinkscopeError(f"folds: must be an integer in 2..20, got {self.folds!r}")
        if self.max_images is not None and self.max_images < self.folds:
            raise SinkscopeError(f"max_images: {self.max_images} images cannot fill {self.folds} folds")
        if self.n_jobs is not None and self.n_jobs == 0:
            raise SinkscopeError("n_jobs: must be >= 1 (or -1 for every core)")
        self._check_common()


@_register
@dataclass(frozen=True)
class FlowConfig(RunConfig):
    """``sinkscope flow``: information pathways inside the ViT and from ViT tokens into the LLM.
    ``sink_rule``: the ViT sink rule of every analysis and ``variants`` (a string of
    :data:`~sinkscope.interventions.rules.RULE_GRAMMAR`; ``None``: the model's
    :func:`~sinkscope.interventions.default_rule`); ``vit_threshold`` / ``vit_relative`` are its
    old spellings ``norm:T`` / ``norm:xR`` (give one of the three)."""

    analysis: ClassVar[str] = "flow"
    model: str = "mini-llava"
    images: tuple[str, ...] | None = None
    prompt: str = "What is the main object in the image?"
    analyses: tuple[str, ...] | None = None  # None: every analysis that applies to the model
    vit_threshold: float | None = None
    vit_relative: float | None = None
    llm_tau: float = 20.0
    generate: int = 0
    window: int = 9
    stride: int = 1
    bin_width: float = 5.0
    decode_nonsinks: int = 4
    top_k: int = 5
    attribution_steps: int = 64
    device: str | None = None
    dtype: str | None = None
    seed: int = 0
    chat: bool = False
    sink_dims_from: str = "text"
    variants: tuple[str, ...] = ()
    sink_rule: str | dict | None = None
    positions: str = "reindex"
    out: str | None = None

    def __post_init__(self):
        from .flow.run import ANALYSES
        from .flow.variants import FLOW_VARIANTS

        if isinstance(self.images, str):  # one spec ("embedded:2"), never its letters
            object.__setattr__(self, "images", (self.images,))
        object.__setattr__(self, "variants", (self.variants,) if isinstance(self.variants, str) else tuple(self.variants))
        bad_v = [v for v in self.variants if v not in FLOW_VARIANTS]
        if bad_v:
            raise SinkscopeError(f"variants: unknown {bad_v[0]!r}; choose from {', '.join(FLOW_VARIANTS)}")
        # the analyses mark sinks among the patches by norm (cls / attention: refused); the layer is checked at run time
        _check_sink_rule(self.sink_rule, vit_threshold=self.vit_threshold, vit_relative=self.vit_relative).check_for("flow")
        if self.positions not in ("reindex", "keep"):
            raise SinkscopeError(f"positions: reindex or keep, got {self.positions!r}")

        bad = [a for a in self.analyses or () if a not in ANALYSES]
        if bad:
            raise SinkscopeError(f"analyses: unknown {bad[0]!r}; choose from {', '.join(ANALYSES)}")
        _positive("vit_threshold", self.vit_threshold, " (an L2 norm is never negative)")
        _positive("vit_relative", self.vit_relative)
        _positive("llm_tau", self.llm_tau)
        _positive("bin_width", self.bin_width)
        for name in ("window", "stride", "attribution_steps", "top_k"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise SinkscopeError(f"{name}: must be an integer >= 1, got {v!r}")
        if self.generate < 0 or self.decode_nonsinks < 0:
            raise SinkscopeError("generate and decode_nonsinks: must be >= 0")
        if self.sink_dims_from not in ("text", "first_text_token", "multimodal"):
            raise SinkscopeError(f"sink_dims_from: text, first_text_token or multimodal, got {self.sink_dims_from!r}")
        self._check_common()


@_register
@dataclass(frozen=True)
class DecodeConfig(RunConfig):
    """``sinkscope decode``: share of sink vs non-sink visual tokens whose isolated decoding names
    the image's object word (paper analysis 3). ``words``: ``((label, (word, ...)), ...)`` pairs
    replacing the built-in lists. ``sink_rule``: the ViT sink rule at the feature layer (a string
    of :data:`~sinkscope.interventions.rules.RULE_GRAMMAR`; ``None``: the model's
    :func:`~sinkscope.interventions.default_rule`, as every command); ``vit_threshold``,
    ``vit_relative`` and ``top_norm`` are its old spellings ``norm:T``, ``norm:xR`` and ``topk:N``
    (give one of the four). ``max_images``/``nonsinks``: 0 = all."""

    analysis: ClassVar[str] = "decode"
    model: str = "mini-llava"
    dataset: str = "lfw-faces"
    label: str | None = None
    words: tuple[tuple[str, tuple[str, ...]], ...] | None = None
    vit_threshold: float | None = None
    vit_relative: float | None = None
    top_norm: int | None = None
    sink_rule: str | dict | None = None
    top_k: int = 5
    nonsinks: int = 8
    max_images: int = 40
    seed: int = 0
    method: str = "batched"
    ci: str = "wilson"
    confidence: float = 0.95
    batch_size: int = 8
    device: str | None = None
    dtype: str | None = None
    out: str | None = None
    overwrite: bool = False

    def __post_init__(self):
        _check_sink_rule(self.sink_rule, vit_threshold=self.vit_threshold, vit_relative=self.vit_relative,
                         top_norm=self.top_norm).check_for("decode", cls=True)  # cls: against the model later  # fmt: skip
        _positive("vit_threshold", self.vit_threshold, " (an L2 norm is never negative)")
        _positive("vit_relative", self.vit_relative)
        if self.top_norm is not None and self.top_norm < 1:
            raise SinkscopeError(f"top_norm: must be >= 1, got {self.top_norm}")
        if self.top_k < 1 or self.nonsinks < 0 or self.max_images < 0:
            raise SinkscopeError("top_k must be >= 1; nonsinks and max_images >= 0 (0 = all)")
        if self.method not in ("batched", "mask") or self.ci not in ("wilson", "clopper-pearson"):
            raise SinkscopeError(f"method: batched or mask; ci: wilson or clopper-pearson (got {self.method}, {self.ci})")
        if not 0 < self.confidence < 1:
            raise SinkscopeError(f"confidence: must be in (0, 1), got {self.confidence:g}")
        if self.words is not None:  # JSON gives lists back: ((label, (w, ...)), ...)
            object.__setattr__(self, "words", tuple((str(k), tuple(v)) for k, v in self.words))
        self._check_common()


@_register
@dataclass(frozen=True)
class EvalConfig(RunConfig):
    """``sinkscope eval``: accuracy per task type (Global / Local / Mixed) and per task.
    ``tasks``: built-in sets (``shapes``, ``textile``, ``lfw-faces``, ``digits``), manifests
    (``.jsonl`` / ``.csv``) or ``hf:NAME[:SPLIT]``; ``limit``: items per task (``None``: all);
    ``variants``: ``default``, ``no-image`` and the visual-token interventions (``both``,
    ``sinks-front``, ...; :mod:`sinkscope.interventions.tokens`) under ``sink_rule`` (``None``: the
    model's default rule) and ``positions``; ``mode``: ``auto`` (choices by log-likelihood, else
    generation), ``choice`` or ``generate``. The DIYSink variants (``baseline``, ``dual``,
    ``dual-sink-only``, ``dual-nonsink-only``, ``cot``, ``cot-score``, ``rew``) need a dual model; ``router``: the
    ReW router folder (default: the model's ``router/``).

    >>> EvalConfig(model="tiny-llava", tasks=("shapes",), limit=8).variants
    ('default',)
    """

    analysis: ClassVar[str] = "eval"
    model: str = "mini-llava"
    tasks: tuple[str, ...] = ("shapes",)
    split: str = "test"
    limit: int | None = None
    variants: tuple[str, ...] = ("default",)
    mode: str = "auto"
    chat: str = "auto"
    seed: int = 0
    n_boot: int = 1000
    device: str | None = None
    dtype: str | None = None
    out: str | None = None
    resume: bool = False
    overwrite: bool = False
    sink_rule: str | dict | None = None
    positions: str = "reindex"
    var: dict | None = None
    tt_register: dict | None = None
    router: str | None = None

    def __post_init__(self):
        from .evaluation.items import SPLITS
        from .evaluation.run import MODES, VARIANTS
        from .interventions import POSITION_POLICIES, rule_from

        for name in ("tasks", "variants"):  # JSON gives lists back; a string is one task
            v = getattr(self, name)
            object.__setattr__(self, name, (v,) if isinstance(v, str) else tuple(v))
        if not self.tasks:
            raise SinkscopeError("tasks: give at least one (shapes, shapes-heldout, textile, lfw-faces, digits, a manifest or hf:NAME)")
        dup = next((t for n, t in enumerate(self.tasks) if t in self.tasks[:n]), None)
        if dup is not None:
            raise SinkscopeError(f"tasks: {dup!r} is given twice; name each task once")
        if self.split not in SPLITS:
            raise SinkscopeError(f"split: one of {', '.join(SPLITS)}, got {self.split!r}")
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
            raise SinkscopeError(f"limit: an integer >= 1 (items per task), got {self.limit!r}")
        bad = [v for v in self.variants if v not in VARIANTS]
        if bad or not self.variants:
            raise SinkscopeError(f"variants: choose from {', '.join(VARIANTS)}, got {list(self.variants)}")
        if self.mode not in MODES:
            raise SinkscopeError(f"mode: one of {', '.join(MODES)}, got {self.mode!r}")
        if self.chat not in ("auto", "yes", "no"):
            raise SinkscopeError(f"chat: auto, yes or no, got {self.chat!r}")
        if not isinstance(self.n_boot, int) or self.n_boot < 100:
            raise SinkscopeError(f"n_boot: an integer >= 100 (bootstrap resamples), got {self.n_boot!r}")
        if self.sink_rule is not None:
            rule_from(self.sink_rule)  # a bad rule fails here, in one line
        if self.positions not in POSITION_POLICIES:
            raise SinkscopeError(f"positions: reindex or keep, got {self.positions!r}")
        if self.var is not None:
            from .interventions import VAR

            try:
                VAR(**self.var)
            except TypeError as e:
                raise SinkscopeError(f"var: {e}; expected p, rho, alpha, tau, start_layer, sink_dims") from None
        if self.router is not None and "rew" not in self.variants:
            raise SinkscopeError(f"router: only --variant rew uses a router, and it is not asked (variants: {', '.join(self.variants)})")
        if self.router is not None and not (Path(self.router) / "router.json").is_file():
            raise SinkscopeError(f"router: no ReW router in {self.router} (router.json)")
        if self.tt_register is not None and self.tt_register.get("neurons"):
            from .interventions import TestTimeRegister

            TestTimeRegister(**self.tt_register)
        self._check_common()


@_register
@dataclass(frozen=True)
class TrainProjectorConfig(RunConfig):
    """``sinkscope train-projector``: a LLaVA projector trained with the LM loss on answer tokens
    (:func:`sinkscope.training.train_projector`). ``stage``: ``align`` (captions) or ``vqa``
    (questions); ``init``: a projector file to start from; ``real``: real-image training sets.

    >>> TrainProjectorConfig(model="tiny-llava", steps=2).stage
    'vqa'
    """

    analysis: ClassVar[str] = "train-projector"
    model: str = "mini-llava"
    stage: str = "vqa"
    steps: int = 100
    batch_size: int = 4
    lr: float = 1e-3
    warmup: float = 0.03
    n_per_task: int = 200
    turns: int = 4
    real: tuple[str, ...] = ("textile", "lfw-faces", "digits")
    real_limit: int | None = None
    seed: int = 0
    save_every: int = 50
    snapshot_every: int | None = None
    init: str | None = None
    cache_dir: str | None = None
    device: str | None = None
    out: str | None = "runs/projector"
    resume: bool = False
    lora_rank: int | None = None
    lora_lr: float = 2e-4
    mixed_precision: str = "no"
    stop_after: int | None = None
    init_lora: str | None = None
    styles: bool = False

    def __post_init__(self):
        from .training.projector import STAGES

        object.__setattr__(self, "real", (self.real,) if isinstance(self.real, str) else tuple(self.real))
        if self.stage not in STAGES:
            raise SinkscopeError(f"stage: one of {', '.join(STAGES)}, got {self.stage!r}")
        for name in ("steps", "batch_size", "n_per_task", "turns", "save_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise SinkscopeError(f"{name}: must be an integer >= 1, got {v!r}")
        _positive("lr", self.lr)
        _positive("lora_lr", self.lora_lr)
        if self.stop_after is not None and (not isinstance(self.stop_after, int) or self.stop_after < 1):
            raise SinkscopeError(f"stop_after: a step >= 1 of the schedule, got {self.stop_after!r}")
        if self.stop_after is not None and self.stop_after > self.steps:
            raise SinkscopeError(f"stop_after: step {self.stop_after} is past the end of the {self.steps}-step schedule (--steps)")
        if self.snapshot_every is not None and (not isinstance(self.snapshot_every, int) or self.snapshot_every < 1):
            raise SinkscopeError(f"snapshot_every: a number of steps >= 1 (or not given: no snapshots), got {self.snapshot_every!r}")
        if self.mixed_precision not in ("no", "bf16", "fp16", "auto"):
            raise SinkscopeError(f"mixed_precision: no, bf16, fp16 or auto, got {self.mixed_precision!r}")
        if self.lora_rank is not None and (not isinstance(self.lora_rank, int) or self.lora_rank < 1):
            raise SinkscopeError(f"lora_rank: an integer >= 1 (LoRA rank), got {self.lora_rank!r}")
        if self.real_limit is not None and (not isinstance(self.real_limit, int) or self.real_limit < 1):
            raise SinkscopeError(f"real_limit: an integer >= 1 (questions per real-image set), got {self.real_limit!r}")
        if not 0 <= self.warmup < 1:
            raise SinkscopeError(f"warmup: a share of the steps in [0, 1), got {self.warmup!r}")
        for name in ("init", "init_lora"):  # a missing start file fails here, before any folder is made
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise SinkscopeError(f"{name}: no file {path}")
        bad = [r for r in self.real if r not in ("textile", "lfw-faces", "digits")]
        if bad:
            raise SinkscopeError(f"real: choose from textile, lfw-faces, digits, got {bad[0]!r}")
        if self.out is None:
            raise SinkscopeError("out: training needs an output folder")
        self._check_common()


@_register
@dataclass(frozen=True)
class DIYSinkInitConfig(RunConfig):
    """``sinkscope diysink init``: a LLaVA model with the dual connector, untrained (both MLPs
    copies of its projector, weights 1; :func:`sinkscope.training.diysink.init_diysink`), saved in
    ``OUT/model``. ``sink_rule``: ``None`` for the model's default rule.

    >>> DIYSinkInitConfig(model="tiny-llava", sink_rule="topk:2", out="runs/d").sink_rule
    'topk:2'
    """

    analysis: ClassVar[str] = "diysink-init"
    model: str = "mini-llava"
    sink_rule: str | dict | None = None
    out: str | None = "runs/diysink"

    def __post_init__(self):
        from .diysink.connector import check_rule
        from .interventions import rule_from

        if self.sink_rule is not None:
            check_rule(rule_from(self.sink_rule), has_cls=True)  # cls is checked against the model later
        if self.out is None:
            raise SinkscopeError("out: the dual model needs an output folder")
        self._check_common()


@_register
@dataclass(frozen=True)
class DIYSinkTrainConfig(RunConfig):
    """``sinkscope diysink train``: one stage of DIYSink's training
    (:func:`sinkscope.training.diysink.train_diysink`): ``1`` (each MLP alone on its tokens), ``2``
    (both on the concatenation and the LLM: ``llm`` = ``lora`` (default, rank ``lora_rank``, 16),
    ``full`` or ``frozen`` for the connector alone) or ``router`` (the ReW router:
    ``samples`` questions, ``epochs`` epochs, batches of ``batch_size``).

    >>> DIYSinkTrainConfig(model="runs/d", stage="router", batch_size=20, lr=1e-2).epochs
    10
    """

    analysis: ClassVar[str] = "diysink-train"
    model: str = "runs/diysink"
    stage: str = "2"
    steps: int | None = None
    batch_size: int = 4
    lr: float = 1e-3
    warmup: float = 0.03
    n_per_task: int = 200
    turns: int = 4
    real: tuple[str, ...] = ("textile", "lfw-faces", "digits")
    real_limit: int | None = None
    mlps: tuple[str, ...] = ("sink", "nonsink")
    llm: str = "lora"
    lora_rank: int | None = None
    llm_lr: float | None = None
    samples: int = 120
    epochs: int = 10
    router_hidden: int = 128
    router_norm: str | None = None
    encoder: str | None = None
    seed: int = 0
    save_every: int = 50
    cache_dir: str | None = None
    device: str | None = None
    mixed_precision: str = "no"
    out: str | None = "runs/diysink-train"
    resume: bool = False

    def __post_init__(self):
        from .diysink import NORMALISATIONS
        from .training.diysink import LLM_MODES, MLPS, STAGES

        for name in ("real", "mlps"):
            v = getattr(self, name)
            object.__setattr__(self, name, (v,) if isinstance(v, str) else tuple(v))
        object.__setattr__(self, "stage", str(self.stage))
        if self.stage not in STAGES:
            raise SinkscopeError(f"stage: one of {', '.join(STAGES)}, got {self.stage!r}")
        for name in ("batch_size", "n_per_task", "turns", "save_every", "samples", "epochs", "router_hidden"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise SinkscopeError(f"{name}: must be an integer >= 1, got {v!r}")
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            raise SinkscopeError(f"steps: must be an integer >= 1, got {self.steps!r}")
        if self.steps is not None and self.stage == "router":
            raise SinkscopeError("steps: the router stage runs --epochs over --samples questions, not --steps")
        _positive("lr", self.lr)
        if self.llm_lr is not None:
            _positive("llm_lr", self.llm_lr)
        if self.llm not in LLM_MODES:
            raise SinkscopeError(f"llm: one of {', '.join(LLM_MODES)} (how stage 2 trains the LLM), got {self.llm!r}")
        if not 0 <= self.warmup < 1:
            raise SinkscopeError(f"warmup: a share of the steps in [0, 1), got {self.warmup!r}")
        bad = [k for k in self.mlps if k not in MLPS]
        if bad or not self.mlps:
            raise SinkscopeError(f"mlps: choose from {', '.join(MLPS)}, got {list(self.mlps)}")
        if self.lora_rank is not None and (not isinstance(self.lora_rank, int) or self.lora_rank < 1):
            raise SinkscopeError(f"lora_rank: an integer >= 1 (LoRA rank), got {self.lora_rank!r}")
        if self.lora_rank is not None and self.stage != "2":
            raise SinkscopeError(f"lora_rank: LoRA on the LLM belongs to stage 2, not stage {self.stage}")
        if self.lora_rank is not None and self.llm != "lora":
            raise SinkscopeError(f"lora_rank: LoRA adapters need llm='lora', not {self.llm!r}")
        if self.router_norm is not None and self.router_norm not in NORMALISATIONS:
            raise SinkscopeError(f"router_norm: one of {', '.join(NORMALISATIONS)}, got {self.router_norm!r}")
        if self.real_limit is not None and (not isinstance(self.real_limit, int) or self.real_limit < 1):
            raise SinkscopeError(f"real_limit: an integer >= 1 (questions per real-image set), got {self.real_limit!r}")
        bad = [r for r in self.real if r not in ("textile", "lfw-faces", "digits")]
        if bad:
            raise SinkscopeError(f"real: choose from textile, lfw-faces, digits, got {bad[0]!r}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise SinkscopeError(f"mixed_precision: no, bf16 or fp16, got {self.mixed_precision!r}")
        if self.out is None:
            raise SinkscopeError("out: training needs an output folder")
        self._check_common()


__all__ = ["CONFIGS", "SCHEMA_VERSION", "DIYSinkInitConfig", "DIYSinkTrainConfig", "DecodeConfig", "EvalConfig", "TrainProjectorConfig", "FlowConfig", "ProbeConfig", "RunConfig", "ScanConfig"]
