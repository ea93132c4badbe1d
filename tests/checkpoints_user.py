"""Checkpoints the way users have them, written with plain ``transformers`` / ``tokenizers`` calls
and ``save_pretrained`` only (no sinkscope builder, no sinkscope helper in the model's making).

sinkscope's own builders hide what a user's folder holds: ``tiny-llava`` is built in memory, and
SmolLM2 ties its input and output embeddings, so a lost LM head went unseen for a round (issue 25).
Each builder here writes one layout users bring:

- :func:`llava` - ``LlavaForConditionalGeneration`` (CLIP tower, Llama LM) with its
  ``LlavaProcessor``, like ``llava-hf/llava-1.5-7b-hf`` in miniature: feature layer -2, CLS dropped,
  and **untied** input / output embeddings as in Vicuna (``tied=True``: tied, as in SmolLM2 or
  Qwen2-0.5B). ``save_pretrained`` writes the legacy key layout (``language_model.lm_head.weight``,
  ``language_model.model.*``, ``vision_tower.*``, ``multi_modal_projector.*``);
- :func:`clip_tower` - ``CLIPVisionModel`` whose ``pre_layrnorm`` has a **non-zero bias** (a
  random init leaves it 0, a trained CLIP does not);
- :func:`dinov2_registers` - ``Dinov2WithRegistersModel`` (4 register tokens);
- :func:`siglip_tower` - ``SiglipVisionModel`` (no CLS token).

Every model is 4 layers of width 64 at 32 x 32 px with 8 px patches (16 patches), seeded.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers as T

WIDTH, LAYERS, HEADS, FFN, SIZE, PATCH = 64, 4, 4, 128, 32, 8
#: the words of sinkscope's ``shapes`` questions and answers plus a few of MME's and the
#: real-image sets', so candidate answers are distinct tokens (an unknown word would tie them all)
WORDS = (
    "a all are as background black blue bottom-left bottom-right circle colour five four green in is kind largest "
    "many no of one orange purple quadrant red same shape shapes six square the there three top-left top-right "
    "triangle two white yellow yes what how picture image answer question using single word or phrase with "
    "face digit zero seven eight nine defect nominal local global grey fabric , . ? ! :"
).split()


def tokenizer() -> T.PreTrainedTokenizerFast:
    """A word-level tokenizer (ids: 0 pad, 1 bos, 2 eos, 3 unk, 4 ``<image>``), case-folded."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "<image>": 4}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = T.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return fast


def _vision(cls):
    common = dict(hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS, image_size=SIZE, patch_size=PATCH)
    if cls is T.Dinov2WithRegistersConfig:
        return cls(mlp_ratio=FFN // WIDTH, num_register_tokens=4, **common)
    return cls(intermediate_size=FFN, **common)


def _save(model, processor, path: str | Path) -> Path:
    path = Path(path)
    model.save_pretrained(str(path))
    processor.save_pretrained(str(path))
    return path


def llava(path: str | Path, tied: bool = False, seed: int = 0) -> Path:
    """A LLaVA-1.5-shaped checkpoint in ``path`` (see the module docstring)."""
    torch.manual_seed(seed)
    tok = tokenizer()
    text = T.LlamaConfig(
        hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=2,
        intermediate_size=FFN, vocab_size=len(tok), max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
        pad_token_id=0, tie_word_embeddings=tied,
    )  # fmt: skip
    cfg = T.LlavaConfig(
        vision_config=_vision(T.CLIPVisionConfig), text_config=text, image_token_id=4, vision_feature_layer=-2,
        vision_feature_select_strategy="default", image_seq_length=(SIZE // PATCH) ** 2, tie_word_embeddings=tied,
    )  # fmt: skip
    model = T.LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # a trained tower's pre-norm has a bias; a random init leaves it 0
        model.model.vision_tower.pre_layrnorm.bias.normal_(0, 0.5)
    image_proc = T.CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})
    proc = T.LlavaProcessor(
        image_processor=image_proc, tokenizer=tok, patch_size=PATCH, vision_feature_select_strategy="default",
        image_token="<image>", num_additional_image_tokens=1,
    )  # fmt: skip
    return _save(model, proc, path)


def clip_tower(path: str | Path, seed: int = 0) -> Path:
    """A ``CLIPVisionModel`` whose ``pre_layrnorm.bias`` is non-zero (N(0, 0.5), seeded)."""
    torch.manual_seed(seed)
    model = T.CLIPVisionModel(_vision(T.CLIPVisionConfig)).eval()
    with torch.no_grad():
        model.pre_layrnorm.bias.normal_(0, 0.5)
    proc = T.CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})
    return _save(model, proc, path)


def dinov2_registers(path: str | Path, seed: int = 0) -> Path:
    """A ``Dinov2WithRegistersModel`` with 4 register tokens."""
    torch.manual_seed(seed)
    model = T.Dinov2WithRegistersModel(_vision(T.Dinov2WithRegistersConfig)).eval()
    proc = T.BitImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})
    return _save(model, proc, path)


def siglip_tower(path: str | Path, seed: int = 0) -> Path:
    """A ``SiglipVisionModel`` (no CLS: every token is a patch)."""
    torch.manual_seed(seed)
    model = T.SiglipVisionModel(_vision(T.SiglipVisionConfig)).eval()
    proc = T.SiglipImageProcessor(size={"height": SIZE, "width": SIZE})
    return _save(model, proc, path)


VISION_TOWERS = {"clip-prenorm-bias": clip_tower, "dinov2-registers": dinov2_registers, "siglip": siglip_tower}
