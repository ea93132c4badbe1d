"""Tiny seeded random models, optionally with **planted sinks**, so tests and demos know the answer.

Vision models (``tiny-clip``, ``tiny-siglip``, ``tiny-dinov2``, ``tiny-dinov2-reg``, ``tiny-vit``,
and the vision tower of ``tiny-llava``): 4 blocks, width 64, 4 heads, 8 px patches, 32 px default
input. A planted sink is a real weight edit, not a hook:

- the patch embedding gets a *marker detector* on one channel ``t`` (the last): it reads
  ``mean(R) - mean(G) - mean(B)`` of the normalised patch, and the (position-constant, hence
  interpolation-proof) position embedding subtracts a threshold, so only patches painted pure
  red (``MARKER_RGB``) are positive on ``t``; no block writes channel ``t``;
- in the block *before* ``plant.layer``, one MLP neuron reads channel ``t`` (after the block's
  norm) and writes ``plant.magnitude`` into ``plant.dims``.

So every patch painted with the marker colour becomes a high-norm token from layer
``plant.layer`` on, at any input size and in any batch, and nothing else does. Paint markers with
:func:`paint_markers`.

Language models (``tiny-llama``): token ids in ``plant.token_ids`` carry the marker channel in
their embedding row; the trigger neuron of the block before ``plant.layer`` writes the massive
value, like the first-token massive activation of real LLMs.

>>> from sinkscope.capture import Capture
>>> ad = load_tiny("tiny-dinov2", plant=Plant(layer=2), image_size=(48, 40))
>>> img = paint_markers(np.zeros((48, 40, 3), np.uint8), [(1, 2)], patch=8)   # a 6 x 5 patch grid
>>> batch = ad.prepare([img])
>>> with Capture(ad) as c:
...     cap = c.run(batch)
>>> sink = batch.layouts[0].patch_token(1, 2)
>>> [int(cap.norms[0, layer].argmax()) == sink for layer in cap.layers]     # the top norm from layer 2 on
[False, False, True, True, True]
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import transformers as T
from torch import nn

from .._utils import SinkscopeError
from .base import Adapter, ModelInputs, TokenLayout
from .llava import LlavaAdapter
from .text import CausalLMAdapter
from .vision import VisionAdapter

MARKER_RGB = (255, 0, 0)
WIDTH, LAYERS, HEADS, FFN, PATCH, SIZE = 64, 4, 4, 128, 8, 32
VOCAB = 128


@dataclass(frozen=True)
class Plant:
    """Where and how strongly to plant sinks.

    ``layer``: first layer (``hidden_states`` index, >= 1) where marked tokens are sinks.
    ``dims``: residual channels that carry the massive value. ``magnitude``: its size (L2).
    ``token_ids``: for language models, the token ids that become sinks.
    """

    layer: int = 2
    dims: tuple[int, ...] = (7,)
    magnitude: float = 800.0
    token_ids: tuple[int, ...] = (1,)

    def to_dict(self) -> dict:
        return asdict(self)


TINY_NAMES = (
    "tiny-clip",
    "tiny-siglip",
    "tiny-dinov2",
    "tiny-dinov2-reg",
    "tiny-vit",
    "tiny-llama",
    "tiny-llava",
)


def paint_markers(image: np.ndarray, cells: list[tuple[int, int]], patch: int = PATCH) -> np.ndarray:
    """Paint whole patches ``(row, col)`` of an HxWx3 uint8 image with the marker colour.

    The image must already be at the size the model sees (no resize afterwards).

    >>> paint_markers(np.zeros((16, 16, 3), np.uint8), [(1, 0)], patch=8)[8, 0].tolist()
    [255, 0, 0]
    """
    out = np.array(image, dtype=np.uint8, copy=True)
    for r, c in cells:
        out[r * patch : (r + 1) * patch, c * patch : (c + 1) * patch] = MARKER_RGB
    return out


def _vision_config(family: str):
    common = dict(
        hidden_size=WIDTH,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        image_size=SIZE,
        patch_size=PATCH,
    )
    if family == "clip":
        return T.CLIPVisionConfig(intermediate_size=FFN, **common)
    if family == "siglip":
        return T.SiglipVisionConfig(intermediate_size=FFN, **common)
    if family == "dinov2":
        return T.Dinov2Config(mlp_ratio=FFN // WIDTH, **common)
    if family == "dinov2-reg":
        return T.Dinov2WithRegistersConfig(mlp_ratio=FFN // WIDTH, num_register_tokens=4, **common)
    if family == "vit":
        return T.ViTConfig(intermediate_size=FFN, **common)
    raise SinkscopeError(f"unknown tiny vision family {family!r}")


_VISION_CLASSES = {
    "clip": T.CLIPVisionModel,
    "siglip": T.SiglipVisionModel,
    "dinov2": T.Dinov2Model,
    "dinov2-reg": T.Dinov2WithRegistersModel,
    "vit": T.ViTModel,
}
_MEAN_STD = {
    "clip": ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]),
    "siglip": ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
}
_IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def _image_processor(family: str):
    mean, std = _MEAN_STD.get(family, _IMAGENET)
    return _MeanStd(mean, std)


class _MeanStd:
    """Normalisation constants for tiny models (their adapters always resize to a fixed size)."""

    def __init__(self, mean, std):
        self.image_mean, self.image_std = list(mean), list(std)


def _out_proj(attn: nn.Module) -> nn.Linear:
    return attn.o_proj if hasattr(attn, "o_proj") else attn.out_proj


@torch.no_grad()
def _silence_channel(adapter: Adapter, t: int) -> None:
    """No block writes residual channel ``t`` (attention output and MLP output rows zeroed)."""
    for b in range(adapter.n_layers):
        for lin in (_out_proj(adapter.attention(b)), adapter.mlp_out(b)):
            lin.weight[t].zero_()
            if lin.bias is not None:
                lin.bias[t] = 0.0


@torch.no_grad()
def plant_vision_sinks(adapter: VisionAdapter, plant: Plant) -> None:
    """Edit a ViT's weights so marker-coloured patches become sinks from ``plant.layer`` on."""
    _check_plant(adapter, plant)
    m, t = adapter.model, adapter.hidden_size - 1
    emb = m.embeddings
    conv = next(mod for mod in emb.modules() if isinstance(mod, nn.Conv2d))
    mean, std = (
        np.asarray(v, np.float32) for v in (adapter.processor.image_mean, adapter.processor.image_std)
    )
    sign = np.array([1.0, -1.0, -1.0], np.float32)
    top = float((sign * ((np.asarray(MARKER_RGB, np.float32) / 255 - mean) / std)).sum())
    thr = 0.9 * top  # pure red scores `top`; dark red or orange patches stay well below
    # marker amplitude: 8x the per-channel RMS of ordinary embedding outputs, so a marked token's
    # norm grows by ~1.4x only, while its normalised channel t stands far out
    r = _embedding_rms(adapter, emb)
    a = 8.0 * r / (top - thr)
    p = conv.kernel_size[0]
    conv.weight[t] = 0.0
    for c in range(3):
        conv.weight[t, c] = a * float(sign[c]) / (p * p)
    if conv.bias is not None:
        conv.bias[t] = 0.0
    # the threshold lives in the position embedding (a constant over positions survives interpolation)
    if hasattr(emb, "position_embedding"):
        emb.position_embedding.weight[:, t] = -a * thr
    else:
        emb.position_embeddings[..., t] = -a * thr
    for attr in ("class_embedding", "cls_token", "register_tokens"):
        if hasattr(emb, attr):
            getattr(emb, attr)[..., t] = 0.0
    _silence_channel(adapter, t)
    _plant_neuron(adapter, plant, t, _vision_calibration(adapter))


def _check_plant(adapter: Adapter, plant: Plant) -> None:
    if not 1 <= plant.layer <= adapter.n_layers:
        raise SinkscopeError(f"plant layer {plant.layer} must be in 1..{adapter.n_layers}")
    if adapter.hidden_size - 1 in plant.dims or not all(0 <= d < adapter.hidden_size - 1 for d in plant.dims):
        raise SinkscopeError(f"plant dims {plant.dims} must lie in 0..{adapter.hidden_size - 2}")


def _embedding_rms(adapter: VisionAdapter, emb: nn.Module) -> float:
    out = {}

    def hook(mod, args, o):
        out["x"] = o[0] if isinstance(o, tuple) else o

    h = emb.register_forward_hook(hook)
    try:
        adapter.forward(adapter.prepare([np.full((SIZE, SIZE, 3), 128, np.uint8)]))
    finally:
        h.remove()
    return float(out["x"].float().pow(2).mean().sqrt())


def _vision_calibration(adapter: VisionAdapter):
    """Calibration batch for the trigger: a real photo, grey, black and white, with marked patches."""
    from PIL import Image
    from skimage import data

    h, w = adapter.image_size or (SIZE, SIZE)
    photo = np.asarray(Image.fromarray(data.astronaut()).resize((w, h)))
    imgs = [
        photo,
        np.full((h, w, 3), 128, np.uint8),
        np.zeros((h, w, 3), np.uint8),
        np.full((h, w, 3), 255, np.uint8),
    ]
    cells = [(0, 0), (h // PATCH - 1, w // PATCH - 1)]
    batch = adapter.prepare([paint_markers(im, cells) for im in imgs] + imgs)
    lay = batch.layouts[0]
    marked = torch.zeros(len(batch), lay.n_tokens, dtype=torch.bool)
    for i in range(len(imgs)):
        for r, c in cells:
            marked[i, lay.patch_token(r, c)] = True
    return batch, marked


@torch.no_grad()
def _plant_neuron(adapter: Adapter, plant: Plant, t: int, calibration) -> None:
    """Neuron 0 of the MLP in block ``plant.layer - 1`` reads channel ``t`` and writes the sink.

    The neuron is calibrated on a batch with known marked tokens: it fires (pre-activation >= 20)
    on every marked token and stays at <= -4.5 (GELU ~ 0) on every other token; its output
    weights are scaled so a marked token gains ``plant.magnitude`` along ``plant.dims``.
    """
    batch, marked = calibration
    blk = adapter.blocks()[plant.layer - 1]
    out = adapter.mlp_out(plant.layer - 1)
    if hasattr(blk.mlp, "fc1"):  # GELU MLP: gelu(w * norm(x)_t + b)
        fc1 = blk.mlp.fc1
        fc1.weight[0] = 0.0
        fc1.weight[0, t] = 1.0
        fc1.bias[0] = 0.0
        pre = _neuron_input(adapter, fc1, batch, output=True)
        lo, hi = pre[marked].min().item(), pre[~marked].max().item()
        if lo - hi < 1e-3:
            raise SinkscopeError(f"cannot plant sinks in {adapter.name}: marked tokens are not separable")
        # a register-neuron-like unit: a large activation (>= 20) on marked tokens, ~0 elsewhere
        w = 25.0 / (lo - hi)
        fc1.weight[0, t] = w
        fc1.bias[0] = -w * hi - 4.5
    else:  # gated MLP (Llama): silu(gate) * up, both reading channel t (exactly 0 elsewhere)
        blk.mlp.gate_proj.weight[0] = 0.0
        blk.mlp.gate_proj.weight[0, t] = 1.0
        blk.mlp.up_proj.weight[0] = 0.0
        blk.mlp.up_proj.weight[0, t] = 1.0
    out.weight[:, 0] = 0.0
    out.weight[plant.dims[0], 0] = 1.0
    act = _neuron_input(adapter, out, batch, output=False)[marked].mean().item()
    out.weight[:, 0] = 0.0
    for d in plant.dims:
        out.weight[d, 0] = plant.magnitude / np.sqrt(len(plant.dims)) / act


def _neuron_input(adapter: Adapter, module: nn.Module, batch, output: bool) -> torch.Tensor:
    """Neuron 0's value at ``module`` (its output, or its input) for every token of ``batch``."""
    got = {}

    def after(mod, args, o):  # hooks must return None, or they replace the tensor
        got["v"] = o[..., 0].detach().clone()

    def before(mod, args):
        got["v"] = args[0][..., 0].detach().clone()

    h = module.register_forward_hook(after) if output else module.register_forward_pre_hook(before)
    try:
        adapter.forward(batch)
    finally:
        h.remove()
    return got["v"].float()


@torch.no_grad()
def plant_text_sinks(adapter: CausalLMAdapter, plant: Plant) -> None:
    """Edit a Llama-style LM so ``plant.token_ids`` become massive-activation sinks."""
    _check_plant(adapter, plant)
    t = adapter.hidden_size - 1
    emb = adapter.decoder.embed_tokens.weight
    r = float(emb.float().pow(2).mean().sqrt())
    emb[:, t] = 0.0
    for tid in plant.token_ids:
        emb[tid, t] = 8.0 * r
    _silence_channel(adapter, t)
    ids = torch.arange(5, 5 + 24).reshape(2, 12)
    ids[:, 0] = plant.token_ids[0]
    ids[1, 5] = plant.token_ids[-1]
    batch = ModelInputs(tensors={"input_ids": ids}, layouts=[TokenLayout(n_text=12)] * 2, names=["a", "b"])
    marked = torch.isin(ids, torch.tensor(plant.token_ids))
    _plant_neuron(adapter, plant, t, (batch, marked))


def _llama_config(vocab: int = VOCAB) -> T.LlamaConfig:
    return T.LlamaConfig(
        hidden_size=WIDTH,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        intermediate_size=FFN,
        vocab_size=vocab,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )


def tiny_tokenizer():
    """A small offline word-level tokenizer (ids: 0 pad, 1 bos, 2 eos, 3 unk, 4 <image>)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = (
        "a an the is are what where who how many color of in on at this that image picture photo cat dog "
        "person man woman car tree sky sea red green blue white black big small left right top bottom "
        "describe answer question yes no one two three four five and or with there it its to do does "
        "you see show me please , . ? !"
    ).split()
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "<image>": 4}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = T.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return fast


def load_tiny(name: str, plant: Plant | None = None, seed: int = 0, image_size=None) -> Adapter:
    """Build a tiny seeded random model by name, optionally with planted sinks.

    >>> ad = load_tiny("tiny-clip", plant=Plant(layer=3))
    >>> ad.family, ad.n_layers, ad.planted.layer
    ('clip', 4, 3)
    """
    if name not in TINY_NAMES:
        raise SinkscopeError(f"unknown tiny model {name!r}; choose from {', '.join(TINY_NAMES)}")
    torch.manual_seed(seed)
    if name == "tiny-llama":
        model = T.LlamaForCausalLM(_llama_config()).eval()
        ad: Adapter = CausalLMAdapter(model, name, tiny_tokenizer())
        if plant:
            plant_text_sinks(ad, plant)
    elif name == "tiny-llava":
        cfg = T.LlavaConfig(
            vision_config=_vision_config("clip"),
            text_config=_llama_config(),
            image_token_id=4,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
            projector_hidden_act="gelu",
            image_seq_length=(SIZE // PATCH) ** 2,
        )
        model = T.LlavaForConditionalGeneration(cfg).eval()
        proc = _LlavaParts(_image_processor("clip"), tiny_tokenizer())
        ad = LlavaAdapter(model, name, proc, image_size=image_size or (SIZE, SIZE))
        if plant:
            plant_vision_sinks(ad.vision, plant)
    else:
        family = name[len("tiny-") :]
        model = _VISION_CLASSES[family](_vision_config(family)).eval()
        ad = VisionAdapter(model, name, _image_processor(family), image_size=image_size or (SIZE, SIZE))
        if plant:
            plant_vision_sinks(ad, plant)
    ad.planted = plant
    return ad


class _LlavaParts:
    """Holds the image processor and tokenizer of ``tiny-llava`` (like a LlavaProcessor)."""

    def __init__(self, image_processor, tokenizer):
        self.image_processor, self.tokenizer = image_processor, tokenizer
