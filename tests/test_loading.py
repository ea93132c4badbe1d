"""Loading by local directory (the hub path: same classes, saved with save_pretrained), and LLaVA's
token layout: feature layer, select strategy and the LLM positions of ViT tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers as T

from sinkscope import SinkscopeError, load_model
from sinkscope.capture import capture
from sinkscope.models import CausalLMAdapter, LlavaAdapter, VisionAdapter
from sinkscope.models.tiny import _llama_config, _vision_config, tiny_tokenizer

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def _save(model, processor, path):
    model.save_pretrained(path)
    if processor is not None:
        processor.save_pretrained(path)
    return str(path)


def test_full_clip_checkpoint_loads_its_vision_half(tmp_path):
    """Like openai/clip-vit-large-patch14-336: a full CLIPModel checkpoint + CLIPImageProcessor."""
    torch.manual_seed(0)
    cfg = T.CLIPConfig(
        vision_config=dict(SMALL, image_size=56, patch_size=14),
        text_config=dict(SMALL, vocab_size=99),
    )
    full = T.CLIPModel(cfg).eval()
    proc = T.CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    ad = load_model(_save(full, proc, tmp_path / "clip"))
    assert isinstance(ad, VisionAdapter) and ad.family == "clip" and ad.n_layers == 2
    img = (np.random.default_rng(0).random((70, 90, 3)) * 255).astype(np.uint8)
    batch = ad.prepare([img])
    assert batch.layouts[0].grid == (4, 4) and batch.layouts[0].n_cls == 1  # processor: resize + crop to 56
    cap = capture(ad, batch, keep=[2])
    ref = full.vision_model(
        pixel_values=batch.tensors["pixel_values"], output_hidden_states=True
    ).hidden_states[2]
    torch.testing.assert_close(cap.hidden[2], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "family,proc",
    [
        ("siglip", lambda: T.SiglipImageProcessor(size={"height": 32, "width": 32})),
        (
            "dinov2",
            lambda: T.BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        ),
        (
            "dinov2-reg",
            lambda: T.BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        ),
        ("vit", lambda: T.ViTImageProcessor(size={"height": 32, "width": 32})),
    ],
)
def test_vision_families_load_from_a_directory(tmp_path, family, proc):
    from sinkscope.models.tiny import _VISION_CLASSES

    m = _VISION_CLASSES[family](_vision_config(family)).eval()
    ad = load_model(_save(m, proc(), tmp_path / family))
    assert ad.family == family
    lay = ad.prepare([np.zeros((40, 40, 3), np.uint8)]).layouts[0]
    assert lay.grid == (4, 4) and lay.n_registers == (4 if family == "dinov2-reg" else 0)
    assert lay.n_cls == (0 if family == "siglip" else 1)


def test_causal_lm_loads_from_a_directory(tmp_path):
    lm = T.LlamaForCausalLM(_llama_config()).eval()
    ad = load_model(_save(lm, tiny_tokenizer(), tmp_path / "lm"))
    assert isinstance(ad, CausalLMAdapter) and ad.n_layers == 4
    batch = ad.prepare(["the cat"])
    assert batch.layouts[0].n_text == 3


def _tiny_llava(strategy="default"):
    torch.manual_seed(0)
    cfg = T.LlavaConfig(
        vision_config=_vision_config("clip"),
        text_config=_llama_config(),
        image_token_id=4,
        vision_feature_layer=-2,
        vision_feature_select_strategy=strategy,
        image_seq_length=16 + (strategy == "full"),
    )
    return T.LlavaForConditionalGeneration(cfg).eval()


def test_llava_loads_from_a_directory_with_its_processor(tmp_path):
    model = _tiny_llava()
    ip = T.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    tok = tiny_tokenizer()
    proc = T.LlavaProcessor(
        image_processor=ip,
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        image_token="<image>",
        num_additional_image_tokens=1,
    )
    ad = load_model(_save(model, proc, tmp_path / "llava"))
    assert isinstance(ad, LlavaAdapter)
    assert ad.feature_layer == 3 and ad.select_strategy == "default" and ad.vision.family == "clip"
    assert ad.llm.n_layers == 4 and ad.image_token_id == 4
    enc = proc(images=[np.zeros((32, 32, 3), np.uint8)], text="<image> what is this ?", return_tensors="pt")
    assert int((enc["input_ids"] == 4).sum()) == 16  # 4x4 patches, CLS dropped


@pytest.mark.parametrize("strategy", ["default", "full"])
def test_llava_maps_a_planted_vit_sink_to_its_llm_positions(strategy):
    from sinkscope.models.tiny import Plant, _image_processor, _LlavaParts, paint_markers, plant_vision_sinks

    model = _tiny_llava(strategy)
    ad = LlavaAdapter(
        model, "t", _LlavaParts(_image_processor("clip"), tiny_tokenizer()), image_size=(32, 32)
    )
    plant_vision_sinks(ad.vision, Plant(layer=2))
    imgs = [
        paint_markers(np.zeros((32, 32, 3), np.uint8), [(1, 2)]),
        paint_markers(np.zeros((32, 32, 3), np.uint8), [(3, 0)]),
    ]
    n_feat = 16 + (strategy == "full")
    # two images in one prompt: <s> describe <image>*n and <image>*n ?
    ids = [1, 5] + [4] * n_feat + [55] + [4] * n_feat + [9]
    input_ids = torch.tensor([ids])
    rows = ad.vit_to_llm_positions(input_ids, n_vit_tokens=17)
    assert len(rows) == 2 * n_feat
    # the sink tokens in the ViT (norm rule at the feature layer)
    cap = capture(ad, ad.prepare(imgs), layers=[ad.feature_layer])
    vit_sinks = [int(torch.nonzero(cap.norms[i, 0] > 100).flatten()[0]) for i in range(2)]
    lay = ad.vision.layout_for(32, 32)
    assert vit_sinks == [lay.patch_token(1, 2), lay.patch_token(3, 0)]
    llm_pos = [r["llm_position"] for r in rows if r["vit_token"] == vit_sinks[r["image_index"]]]
    offset = 0 if strategy == "full" else -1  # default drops CLS: ViT token t is feature t-1
    first = 2 + vit_sinks[0] + offset
    second = 2 + n_feat + 1 + vit_sinks[1] + offset
    assert llm_pos == [first, second]
    # the LLM really receives the projected sink features there
    with torch.no_grad():
        feats = model.model.get_image_features(
            pixel_values=ad.prepare(imgs).tensors["pixel_values"]
        ).pooler_output
        feats = (
            torch.cat(list(feats), 0)
            if isinstance(feats, (list, tuple))
            else feats.reshape(-1, feats.shape[-1])
        )
        emb = model.model.get_input_embeddings()(input_ids)
        merged = emb.masked_scatter((input_ids == 4)[..., None], feats.to(emb.dtype))
    # the feature at the mapped position is the projection of the sink's ViT vector
    vit = model.model.vision_tower(
        pixel_values=ad.prepare(imgs).tensors["pixel_values"], output_hidden_states=True
    )
    h = vit.hidden_states[ad.feature_layer]
    expected = model.model.multi_modal_projector(h[0, vit_sinks[0]][None])[0]
    torch.testing.assert_close(merged[0, first], expected, atol=1e-5, rtol=1e-5)


def test_llava_mismatched_image_tokens_fail_clearly():
    ad = load_model("tiny-llava")
    with pytest.raises(SinkscopeError, match="not a multiple of 16"):
        ad.vit_to_llm_positions(torch.tensor([[1, 4, 4, 4]]), n_vit_tokens=17)


def test_unknown_names_and_paths_fail_at_once():
    with pytest.raises(SinkscopeError, match="cannot load model 'definitely-not-a-model'"):
        load_model("definitely-not-a-model")
    with pytest.raises(SinkscopeError, match="does not exist"):
        load_model("./no/such/dir")
    with pytest.raises(SinkscopeError, match="only '\\+sinks'"):
        load_model("tiny-clip+registers")


def test_missing_processor_uses_the_family_normalisation(tmp_path):
    m = T.Dinov2Model(_vision_config("dinov2")).eval()
    ad = load_model(_save(m, None, tmp_path / "noproc"))
    mean, std = ad._mean_std()
    assert np.allclose(mean, [0.485, 0.456, 0.406]) and np.allclose(std, [0.229, 0.224, 0.225])
    assert ad.prepare([np.zeros((50, 50, 3), np.uint8)]).layouts[0].grid == (4, 4)  # config image size 32


def test_a_directory_without_weights_fails_in_one_line(tmp_path):
    _vision_config("clip").save_pretrained(tmp_path / "cfg")
    with pytest.raises(SinkscopeError, match=r"cannot load the weights of .*cfg") as e:
        load_model(str(tmp_path / "cfg"))
    assert "\n" not in str(e.value)
