"""``mini-llava``: an offline LLaVA built from real weights - DINOv2-S + an MLP projector + SmolLM2-135M.

A ``transformers.LlavaForConditionalGeneration`` whose

* vision tower is the real DINOv2 ViT-S/14 (:func:`~sinkscope.models.real.dinov2_small_dir`,
  a ``Dinov2Model``: 12 layers, width 384, CLS + 16x16 patches at 224 px),
* language model is the real SmolLM2-135M-Instruct (:func:`~sinkscope.models.real.smollm2_dir`,
  ``LlamaForCausalLM``: 30 layers, width 576, tied input/output embeddings),
* multi-modal projector is LLaVA-1.5's MLP (``linear_1`` 384->576, GELU, ``linear_2`` 576->576)
  **initialised at random from a fixed seed and never trained**.

:func:`build_mini_llava` alone gives the **untrained** projector (``load_model("mini-llava-untrained")``):
its answers about images mean nothing, but every ViT-to-LLM flow analysis runs end to end on real
ViT and real LLM weights without a model hub. ``load_model("mini-llava")`` loads the projector and
LoRA adapters sinkscope trained on CPU (:data:`SHIPPED_PROJECTOR`, :data:`SHIPPED_LORA`; ``make
mini-llava`` regenerates them; the README's model card gives their accuracy). ``model.config.projector_trained`` and
``adapter.projector_trained`` say so (``False``); pass ``projector=`` a saved state dict to load a
trained projector instead (then both say ``True``).

LLaVA-1.5's feature layer ``vision_feature_layer=-2`` (the tower's ``hidden_states[-2]``) with
LLaVA's ``full`` select strategy (``vision_feature_select_strategy="full"``: CLS kept, issue 26):
DINOv2-S's one sink - its CLS token, the most-attended token of almost every block, which carries
the image's global content - reaches the LLM as the first image token, followed by the 256 patches
of the 224 px input (the DINOv2 processor: resize the short side to 256, centre-crop 224), so 257
image tokens per image. (Until issue 26 mini-llava used LLaVA-1.5's ``default`` strategy and fed the
256 patches only.) The SmolLM2
tokenizer gets a new special token ``<image>`` (id 49152); the embedding matrix (tied with
``lm_head``) grows by one row, set to the mean of the existing rows.

Skipped in the doctests: the example builds the real mini-llava (DINOv2-S + SmolLM2-135M,
about 40 s on first use), too slow for CI.

>>> ad = build_mini_llava()  # skipped in the doctests: builds the real mini-llava   # doctest: +SKIP
>>> inp = mini_llava_inputs(ad, [image], "What is in the picture?")     # doctest: +SKIP
>>> ad.model.generate(**inp, max_new_tokens=8)  # skipped in the doctests   # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._utils import SinkscopeError
from .llava import LlavaAdapter

__all__ = [
    "IMAGE_TOKEN",
    "MINI_LLAVA_NAME",
    "SHIPPED_LORA",
    "SHIPPED_PROJECTOR",
    "build_mini_llava",
    "merge_lora",
    "mini_llava_inputs",
]

MINI_LLAVA_NAME = "mini-llava"
#: the projector sinkscope trained for ``mini-llava`` (``make mini-llava`` regenerates it; see the
#: README's model card); ``load_model("mini-llava")`` uses it when present, and
#: ``"mini-llava-untrained"`` keeps the seeded random projector
SHIPPED_PROJECTOR = Path(__file__).resolve().parent / "weights" / "mini_llava_projector.safetensors"
#: the LoRA adapters trained with it (merged into the LLM's weights at load, when present)
SHIPPED_LORA = SHIPPED_PROJECTOR.with_name("mini_llava_lora.safetensors")
IMAGE_TOKEN = "<image>"
#: LLaVA-1.5's vision settings.
FEATURE_LAYER = -2
#: LLaVA's ``full`` strategy: CLS (DINOv2-S's sink) + the patches reach the LLM (issue 26)
SELECT_STRATEGY = "full"
IMAGE_SIZE = 224
IMAGE_SEQ_LENGTH = (IMAGE_SIZE // 14) ** 2 + 1  # CLS + 256 patches

_PROJECTOR_PREFIXES = ("model.multi_modal_projector.", "multi_modal_projector.")


def _no_init():
    """Skip transformers' random init of weights that are overwritten right after (saves ~1.5 s)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - other transformers 5 releases
        return contextlib.nullcontext()
    return no_init_weights()


def _seeded_linear_(linear: nn.Linear, generator: torch.Generator) -> None:
    """``nn.Linear``'s default init (uniform +-1/sqrt(fan_in) for weight and bias), from ``generator``."""
    bound = 1.0 / linear.in_features**0.5
    with torch.no_grad():
        linear.weight.copy_(torch.empty_like(linear.weight).uniform_(-bound, bound, generator=generator))
        if linear.bias is not None:
            linear.bias.copy_(torch.empty_like(linear.bias).uniform_(-bound, bound, generator=generator))


def _load_projector(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A projector state dict (``linear_1.*``, ``linear_2.*``) from a ``.safetensors`` or torch file."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise SinkscopeError(f"projector file {p} does not exist")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(p))
    else:
        state = torch.load(p, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise SinkscopeError(f"projector file {p} does not hold a state dict")
    out = {}
    for key, value in state.items():
        for prefix in _PROJECTOR_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                break
        out[key] = value
    return out


def merge_lora(language_model: nn.Module, path: str | os.PathLike) -> int:
    """Fold the LoRA adapters saved in ``path`` (``sinkscope train-projector --lora-rank``: ``peft``
    key names ``layers.N.self_attn.q_proj.lora_A.weight``, rank and alpha in the file's metadata)
    into ``language_model``'s linear weights, in place: ``W += alpha / rank * B @ A``. The model
    stays a plain transformers model (no adapter modules for hooks to step around). Returns the
    number of weights changed.

    >>> import torch; from torch import nn
    >>> lm = nn.ModuleDict({"q_proj": nn.Linear(4, 4)}); w0 = lm.q_proj.weight.detach().clone()
    >>> from safetensors.torch import save_file
    >>> A, B = torch.ones(1, 4), torch.ones(4, 1)
    >>> save_file({"q_proj.lora_A.weight": A, "q_proj.lora_B.weight": B}, "lora.safetensors", metadata={"rank": "1", "alpha": "2"})
    >>> merge_lora(lm, "lora.safetensors"), bool(torch.allclose(lm.q_proj.weight, w0 + 2.0))
    (1, True)
    """
    from safetensors import safe_open

    p = Path(path).expanduser()
    if not p.is_file():
        raise SinkscopeError(f"LoRA file {p} does not exist")
    with safe_open(str(p), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if "rank" not in meta or "alpha" not in meta:
        raise SinkscopeError(f"LoRA file {p}: its metadata must give rank and alpha")
    scale = float(meta["alpha"]) / float(meta["rank"])
    modules = dict(language_model.named_modules())
    n = 0
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        target = key[: -len(".lora_A.weight")]
        b = tensors.get(f"{target}.lora_B.weight")
        lin = modules.get(target.removeprefix("model.").removeprefix("language_model."))
        if b is None or not isinstance(lin, nn.Linear):
            raise SinkscopeError(f"LoRA file {p}: {target} has no lora_B or names no linear layer of the model")
        with torch.no_grad():
            lin.weight += scale * (b.to(lin.weight) @ a.to(lin.weight))
        n += 1
    if n == 0:
        raise SinkscopeError(f"LoRA file {p} holds no lora_A weights")
    return n


def build_mini_llava(
    seed: int = 0, projector: str | Path | None = None, name: str = MINI_LLAVA_NAME, lora: str | Path | None = None
) -> LlavaAdapter:
    """The offline ``mini-llava``: real DINOv2-S + **untrained** MLP projector + real SmolLM2-135M.

    The projector (``linear_1`` 384->576, GELU, ``linear_2`` 576->576) is initialised like
    ``nn.Linear`` from a ``torch.Generator`` seeded with ``seed`` (the global RNG is untouched),
    and is NOT trained: the model's answers about images are meaningless. It is there so flow
    analyses run end to end on real ViT and LLM weights. ``projector`` loads a saved projector
    state dict instead (``.safetensors`` or a ``torch.save`` file; keys ``linear_1.weight``, ...,
    optionally prefixed ``multi_modal_projector.``); then ``projector_trained`` is ``True``.
    ``lora``: LoRA adapters trained with that projector, merged into the LLM (:func:`merge_lora`);
    the LLM's weights then differ from SmolLM2's by the adapters' low-rank updates.

    The vision tower holds dinov2-small's weights and the language model SmolLM2-135M's, exactly;
    the only LLM change is one new embedding row (tied with ``lm_head``) for the ``<image>``
    token, set to the mean embedding. The first call converts both models into the user cache
    (about 40 s); later builds take about a second. Nothing is written to the repository.

    Returns a :class:`~sinkscope.models.llava.LlavaAdapter` named ``"mini-llava"`` whose
    ``processor`` is a ``transformers.LlavaProcessor`` (``.image_processor``: dinov2's
    ``BitImageProcessor``; ``.tokenizer``: SmolLM2's tokenizer with ``<image>``). The adapter also
    carries ``projector_trained``, ``projector_seed`` and ``projector_source``.
    """
    from .real import MINI_LLAVA_SINK_RULE, dinov2_small_dir, smollm2_dir

    vision_dir, llm_dir = dinov2_small_dir(), smollm2_dir()
    # building modules draws from the global RNG (Dinov2's cls/mask tokens use torch.randn even
    # when their values are overwritten): keep the caller's RNG stream as it was
    with torch.random.fork_rng(devices=[]):
        ad = _build(vision_dir, llm_dir, seed, projector)
    if lora is not None:
        merge_lora(ad.model.model.language_model, lora)
    ad.lora_source = None if lora is None else str(Path(lora).expanduser())
    ad.model.config.lora_merged = lora is not None
    ad.name = name
    # the ViT sink rule every command uses by default (interventions.default_rule): the CLS token it
    # feeds (issue 26), and the top-4-norm surrogate where an analysis marks sinks among the patches
    ad.declared_sink_rule = ad.vision.declared_sink_rule = MINI_LLAVA_SINK_RULE
    return ad


def _build(vision_dir: Path, llm_dir: Path, seed: int, projector: str | Path | None) -> LlavaAdapter:
    import transformers as T

    vision, llm, image_processor, tokenizer = _load_parts(vision_dir, llm_dir)
    image_token_id = _add_image_token(tokenizer, llm)
    config, text_config = _llava_config(vision, llm, image_token_id)
    with _no_init():
        model = T.LlavaForConditionalGeneration(config)
    model.eval()
    _load_weights(model, vision, llm, seed, projector)
    del vision, llm

    trained = projector is not None
    config.projector_trained = trained
    config.projector_seed = None if trained else int(seed)
    model.generation_config = T.GenerationConfig.from_model_config(text_config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.suppress_tokens = [image_token_id]  # never generate a placeholder

    processor = T.LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=SELECT_STRATEGY,
        num_additional_image_tokens=1,  # DINOv2's CLS
        image_token=IMAGE_TOKEN,
    )
    adapter = LlavaAdapter(model, MINI_LLAVA_NAME, processor)
    adapter.projector_trained = trained
    adapter.projector_seed = config.projector_seed
    adapter.projector_source = None if projector is None else str(Path(projector).expanduser())
    adapter.planted = None
    return adapter


def _load_parts(vision_dir: Path, llm_dir: Path) -> tuple[Any, Any, Any, Any]:
    """The real DINOv2 and SmolLM2 models (in eval mode), the image processor and the tokenizer,
    loaded without transformers' load reports and progress bars."""
    import transformers as T

    verbosity, bar = T.logging.get_verbosity(), T.logging.is_progress_bar_enabled()
    T.logging.set_verbosity_error()  # no load reports
    T.logging.disable_progress_bar()  # no "Loading weights" bars
    try:
        vision = T.Dinov2Model.from_pretrained(str(vision_dir)).eval()
        llm = T.LlamaForCausalLM.from_pretrained(str(llm_dir)).eval()
        image_processor = T.AutoImageProcessor.from_pretrained(str(vision_dir))
        tokenizer = T.AutoTokenizer.from_pretrained(str(llm_dir))
    finally:
        T.logging.set_verbosity(verbosity)
        if bar:
            T.logging.enable_progress_bar()
    return vision, llm, image_processor, tokenizer


def _add_image_token(tokenizer: Any, llm: nn.Module) -> int:
    """Add the ``<image>`` placeholder to ``tokenizer``: one new special token after SmolLM2's
    49152 (checked against the LLM's embedding rows). Returns its id."""
    n_vocab = len(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    n_rows = llm.model.embed_tokens.weight.shape[0]
    if image_token_id != n_vocab or n_rows != n_vocab or len(tokenizer) != n_vocab + 1:
        raise SinkscopeError(
            f"SmolLM2 tokenizer/vocabulary mismatch: {n_vocab} tokens, {n_rows} embedding rows, "
            f"<image> got id {image_token_id}"
        )
    return image_token_id


def _llava_config(vision: nn.Module, llm: nn.Module, image_token_id: int) -> tuple[Any, Any]:
    """The ``LlavaConfig`` - both towers' configs and LLaVA-1.5's vision settings - and the text
    config it was given (its vocabulary grown by ``<image>``, the last id)."""
    import transformers as T

    text_config = T.LlamaConfig.from_dict(llm.config.to_dict())
    text_config.vocab_size = image_token_id + 1
    config = T.LlavaConfig(
        vision_config=T.Dinov2Config.from_dict(vision.config.to_dict()),
        text_config=text_config,
        image_token_id=image_token_id,
        image_seq_length=IMAGE_SEQ_LENGTH,
        vision_feature_layer=FEATURE_LAYER,
        vision_feature_select_strategy=SELECT_STRATEGY,
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
    )
    return config, text_config


def _load_weights(
    model: nn.Module, vision: nn.Module, llm: nn.Module, seed: int, projector: str | Path | None
) -> None:
    """Load all of ``model``'s weights: the real towers, the embedding grown by one mean row (tied
    with ``lm_head``) and a seeded (or loaded) projector; every key must match."""
    old_emb = llm.model.embed_tokens.weight.detach()
    state: dict[str, torch.Tensor] = {}
    state.update({f"model.vision_tower.{k}": v for k, v in vision.state_dict().items()})
    lm_state = llm.model.state_dict()
    lm_state["embed_tokens.weight"] = torch.cat([old_emb, old_emb.mean(0, keepdim=True)])
    state.update({f"model.language_model.{k}": v for k, v in lm_state.items()})
    if projector is None:
        gen = torch.Generator().manual_seed(int(seed))
        proj = model.model.multi_modal_projector
        _seeded_linear_(proj.linear_1, gen)
        _seeded_linear_(proj.linear_2, gen)
        proj_state = proj.state_dict()
    else:
        proj_state = _load_projector(projector)
    state.update({f"model.multi_modal_projector.{k}": v for k, v in proj_state.items()})
    state["lm_head.weight"] = lm_state["embed_tokens.weight"]
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatch (a projector of another size)
        raise SinkscopeError(f"mini-llava weights did not load: {str(e).strip().splitlines()[0]}") from None
    if missing or unexpected:
        raise SinkscopeError(f"mini-llava weights did not load: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    if model.lm_head.weight.data_ptr() != model.model.language_model.embed_tokens.weight.data_ptr():
        raise SinkscopeError("mini-llava: lm_head is not tied to the input embeddings")


def mini_llava_inputs(
    adapter: LlavaAdapter, images: list[Any], prompt: str, chat: bool = True
) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask`` and ``pixel_values`` for one prompt with any number of images.

    ``images``: HxWx3 uint8 arrays or PIL images, prepared by ``adapter.vision.prepare`` (the
    DINOv2 processor: 224x224, so 257 image tokens each: CLS and 256 patches). ``prompt`` holds one ``<image>`` per
    image, in order; a prompt without any gets ``"<image>\\n"`` per image in front. ``chat`` wraps
    the prompt as a user turn of SmolLM2's chat template (with its default system prompt and the
    assistant header); ``chat=False`` tokenizes the prompt as it is (SmolLM2 adds no BOS). Every
    ``<image>`` becomes as many image tokens as the projector gives features per image, so
    ``input_ids`` holds ``image_token_id`` exactly once per image feature. The tensors are on the
    model's device and ``model(**inputs)`` / ``model.generate(**inputs)`` take them as they are.
    """
    tok = adapter.tokenizer
    if tok is None:
        raise SinkscopeError(f"model {adapter.name!r} has no tokenizer")
    if not images:
        raise SinkscopeError("mini_llava_inputs needs at least one image")
    n_marks = prompt.count(IMAGE_TOKEN)
    if n_marks == 0:
        prompt = f"{IMAGE_TOKEN}\n" * len(images) + prompt
    elif n_marks != len(images):
        raise SinkscopeError(f"prompt has {n_marks} {IMAGE_TOKEN} markers for {len(images)} images")
    if chat:
        text = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    else:
        text = prompt
    ids = tok(text, add_special_tokens=False).input_ids
    image_id = adapter.image_token_id
    if ids.count(image_id) != len(images):
        raise SinkscopeError(
            f"the tokenizer turned {len(images)} {IMAGE_TOKEN} markers into {ids.count(image_id)} "
            f"image tokens (id {image_id})"
        )
    vis = adapter.vision.prepare(images)
    n_feat = len(adapter.fed_vit_tokens(vis.layouts[0].n_tokens))
    expanded: list[int] = []
    for t in ids:
        expanded.extend([t] * n_feat if t == image_id else [t])
    dev = adapter.device
    input_ids = torch.tensor([expanded], dtype=torch.long, device=dev)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": vis.tensors["pixel_values"].to(dev, adapter.vision.dtype),
    }
