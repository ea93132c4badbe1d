"""``mini-llava``: real DINOv2-S + untrained seeded MLP projector + real SmolLM2-135M, offline.

Uses the real converted models from the user cache (first run converts them, about 40 s; a build
then takes 1-3 s). Everything is checked against the separately loaded real models.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sinkscope._utils import SinkscopeError
from sinkscope.data import sample_images
from sinkscope.models.llava import LlavaAdapter
from sinkscope.models.mini_llava import IMAGE_TOKEN, build_mini_llava, mini_llava_inputs
from sinkscope.models.real import dinov2_small_dir, smollm2_dir

pytestmark = pytest.mark.slow

N_VOCAB = 49152  # SmolLM2's vocabulary; <image> is the next id
N_IMG = 257  # CLS + 16 x 16 patches at 224 px (the full select strategy, issue 26)


@pytest.fixture(scope="module")
def ad() -> LlavaAdapter:
    return build_mini_llava()


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    return [it.load() for it in sample_images(2)]


@pytest.fixture(scope="module")
def real_vision():
    from transformers import Dinov2Model

    return Dinov2Model.from_pretrained(dinov2_small_dir()).eval()


@pytest.fixture(scope="module")
def real_llm():
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(smollm2_dir()).eval()


# --------------------------------------------------------------------------- structure


def test_config_and_processor(ad):
    cfg = ad.model.config
    assert ad.name == "mini-llava" and isinstance(ad, LlavaAdapter)
    assert cfg.vision_config.model_type == "dinov2" and cfg.text_config.model_type == "llama"
    assert type(ad.model.model.vision_tower).__name__ == "Dinov2Model"
    assert (cfg.vision_feature_layer, cfg.vision_feature_select_strategy) == (-2, "full")
    assert ad.feature_layer == 11 and ad.vision.n_layers == 12 and ad.llm.n_layers == 30
    assert cfg.image_seq_length == N_IMG
    # untrained projector, said in the config and on the adapter
    assert cfg.projector_trained is False and ad.projector_trained is False
    assert cfg.projector_seed == 0 and ad.projector_source is None
    proj = ad.projector
    assert (proj.linear_1.in_features, proj.linear_1.out_features) == (384, 576)
    assert (proj.linear_2.in_features, proj.linear_2.out_features) == (576, 576)
    # <image>: one new special token, one new embedding row (the mean), tied with lm_head
    tok = ad.processor.tokenizer
    assert tok is ad.tokenizer and len(tok) == N_VOCAB + 1
    assert ad.image_token_id == cfg.image_token_id == N_VOCAB == tok.convert_tokens_to_ids(IMAGE_TOKEN)
    assert tok("x <image> y", add_special_tokens=False).input_ids.count(N_VOCAB) == 1
    emb = ad.model.model.language_model.embed_tokens.weight
    assert emb.shape == (N_VOCAB + 1, 576) and cfg.text_config.vocab_size == N_VOCAB + 1
    assert ad.model.lm_head.weight.data_ptr() == emb.data_ptr()
    torch.testing.assert_close(emb[N_VOCAB], emb[:N_VOCAB].mean(0))
    ip = ad.processor.image_processor
    assert ip.crop_size == {"height": 224, "width": 224} and ad.vision.processor is ip
    assert ad.model.generation_config.suppress_tokens == [N_VOCAB]


def test_weights_are_the_real_models(ad, real_vision, real_llm):
    tower = ad.model.model.vision_tower.state_dict()
    ref = real_vision.state_dict()
    assert tower.keys() == ref.keys()
    for k, v in ref.items():
        assert torch.equal(tower[k], v), k
    q = "encoder.layer.5.attention.q_proj.weight"  # transformers 5 naming
    assert q in ref and torch.equal(tower[q], ref[q])

    lm = ad.model.model.language_model.state_dict()
    lm_ref = real_llm.model.state_dict()
    assert lm.keys() == lm_ref.keys()
    for k, v in lm_ref.items():
        if k == "embed_tokens.weight":
            assert torch.equal(lm[k][:N_VOCAB], v)
        else:
            assert torch.equal(lm[k], v), k
    assert torch.equal(ad.model.lm_head.weight[:N_VOCAB], real_llm.lm_head.weight)


@torch.no_grad()
def test_text_only_logits_equal_smollm2(ad, real_llm):
    ids = ad.tokenizer("The capital of France is Paris. The capital of Germany is", return_tensors="pt")
    ours = ad.model(**ids).logits
    ref = real_llm(**ids).logits
    assert ours.shape[-1] == N_VOCAB + 1
    torch.testing.assert_close(ours[..., :N_VOCAB], ref, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- inputs


def test_inputs_hold_257_image_tokens_cls_first_mapped_in_order(ad, images):
    inp = mini_llava_inputs(ad, images[:1], "What is in the picture?")
    assert set(inp) == {"input_ids", "attention_mask", "pixel_values"}
    ids = inp["input_ids"]
    assert tuple(inp["pixel_values"].shape) == (1, 3, 224, 224)
    assert ids.shape == inp["attention_mask"].shape and bool(inp["attention_mask"].all())
    pos = ad.image_token_positions(ids)[0]
    assert len(pos) == N_IMG
    assert torch.equal(pos, torch.arange(int(pos[0]), int(pos[0]) + N_IMG))  # one contiguous run
    assert int(ids[0, 0]) == ad.tokenizer.convert_tokens_to_ids("<|im_start|>")  # chat template
    rows = ad.vit_to_llm_positions(ids, n_vit_tokens=N_IMG)
    assert [r["vit_token"] for r in rows] == list(range(N_IMG))  # CLS (ViT token 0) first
    assert [r["llm_position"] for r in rows] == pos.tolist()
    assert {r["image_index"] for r in rows} == {0}


def test_two_images_give_514_image_tokens(ad, images):
    inp = mini_llava_inputs(ad, images, "Compare <image> with <image>.", chat=False)
    ids = inp["input_ids"]
    assert tuple(inp["pixel_values"].shape) == (2, 3, 224, 224)
    assert int((ids == ad.image_token_id).sum()) == 2 * N_IMG
    rows = ad.vit_to_llm_positions(ids, n_vit_tokens=N_IMG)
    assert [r["image_index"] for r in rows] == [0] * N_IMG + [1] * N_IMG
    assert [r["vit_token"] for r in rows] == list(range(N_IMG)) * 2
    first, second = rows[N_IMG - 1]["llm_position"], rows[N_IMG]["llm_position"]
    assert second - first > 1  # the text " with " lies between the two images
    with torch.no_grad():
        out = ad.model(**inp)
    assert out.logits.shape[:2] == ids.shape and torch.isfinite(out.logits).all()
    with pytest.raises(SinkscopeError, match="2 <image> markers for 1 images"):
        mini_llava_inputs(ad, images[:1], "<image> and <image>")


def test_inputs_match_llava_processor_and_build_inputs(ad, images):
    prompt = "<image>\nWhat is in the picture?"
    ours = mini_llava_inputs(ad, images[:1], prompt, chat=False)
    hf = ad.processor(images=images[:1], text=prompt, return_tensors="pt")
    assert torch.equal(ours["input_ids"], hf["input_ids"])
    torch.testing.assert_close(ours["pixel_values"], hf["pixel_values"])
    generic = ad.build_inputs(images[:1], prompt)
    assert torch.equal(ours["input_ids"], generic["input_ids"])


# --------------------------------------------------------------------------- running


@torch.no_grad()
def test_forward_on_one_image_is_fast(ad, images):
    inp = mini_llava_inputs(ad, images[:1], "What is in the picture?")
    ad.model(**inp)  # warm-up
    start = time.perf_counter()
    out = ad.model(**inp)
    elapsed = time.perf_counter() - start
    assert out.logits.shape == (1, inp["input_ids"].shape[1], N_VOCAB + 1)
    assert torch.isfinite(out.logits).all()
    assert elapsed < 10.0  # measured ~0.55 s for 293 tokens on a CPU (sdpa)


@torch.no_grad()
def test_forward_with_all_attentions(ad, images):
    inp = mini_llava_inputs(ad, images[:1], "What is in the picture?")
    seq = inp["input_ids"].shape[1]
    ad.model.set_attn_implementation("eager")
    try:
        out = ad.model(**inp, output_attentions=True, output_hidden_states=True)
    finally:
        ad.model.set_attn_implementation("sdpa")
    assert len(out.attentions) == 30 and out.attentions[0].shape == (1, 9, seq, seq)
    assert len(out.hidden_states) == 31
    # SmolLM2's real sink: the first token takes most of the attention in the middle layers
    assert out.attentions[15][0, :, -1, 0].mean() > 0.3


@torch.no_grad()
def test_generate_three_tokens(ad, images):
    inp = mini_llava_inputs(ad, images[:1], "What is in the picture?")
    n = inp["input_ids"].shape[1]
    out = ad.model.generate(**inp, max_new_tokens=3, do_sample=False)
    new = out[0, n:]
    assert 1 <= len(new) <= 3
    assert torch.equal(out[0, :n], inp["input_ids"][0])
    assert ad.image_token_id not in new.tolist()
    assert isinstance(ad.tokenizer.decode(new), str)


@torch.no_grad()
def test_llm_input_embeddings_are_the_projected_tower_features(ad, images, real_vision):
    inp = mini_llava_inputs(ad, images, "<image> then <image>: what changed?")
    got = {}

    def grab(module, args, kwargs):
        got["embeds"] = kwargs["inputs_embeds"].detach().clone()

    handle = ad.model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        ad.model(**inp)
    finally:
        handle.remove()
    embeds = got["embeds"][0]

    # independently: the real DINOv2, layer -2, CLS kept (full strategy), then linear_1 -> GELU -> linear_2
    hs = real_vision(pixel_values=inp["pixel_values"], output_hidden_states=True).hidden_states
    assert len(hs) == 13
    feats = hs[-2]
    assert feats.shape == (2, N_IMG, 384)
    p = ad.projector
    proj = F.linear(
        F.gelu(F.linear(feats, p.linear_1.weight, p.linear_1.bias)), p.linear_2.weight, p.linear_2.bias
    )
    ids = inp["input_ids"][0]
    is_img = ids == ad.image_token_id
    torch.testing.assert_close(embeds[is_img], proj.reshape(-1, 576), atol=1e-5, rtol=1e-4)
    # text positions keep the real SmolLM2 embeddings
    table = ad.model.model.language_model.embed_tokens.weight
    torch.testing.assert_close(embeds[~is_img], table[ids[~is_img]])
    # and the projector output is on the text embeddings' scale (not a broken input)
    ratio = proj.norm(dim=-1).median() / table[:N_VOCAB].norm(dim=-1).median()
    assert 0.1 < float(ratio) < 10.0


# --------------------------------------------------------------------------- projector


def test_projector_seed_and_loading(ad, tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(7)
    expected = torch.rand(4)
    torch.manual_seed(7)
    again = build_mini_llava(seed=0)
    assert torch.equal(torch.rand(4), expected)  # the caller's global RNG stream is untouched
    other = build_mini_llava(seed=1)
    w = ad.projector.linear_1.weight
    assert torch.equal(again.projector.linear_1.weight, w)
    assert not torch.equal(other.projector.linear_1.weight, w)
    assert other.model.config.projector_seed == 1

    trained = {f"multi_modal_projector.{k}": v * 0.5 for k, v in other.projector.state_dict().items()}
    st = tmp_path / "projector.safetensors"
    save_file({k: v.contiguous() for k, v in trained.items()}, str(st))
    pt = tmp_path / "projector.pt"
    torch.save({k.split(".", 1)[1]: v for k, v in trained.items()}, pt)
    for path in (st, pt):
        loaded = build_mini_llava(projector=path)
        assert loaded.projector_trained is True and loaded.model.config.projector_trained is True
        assert loaded.projector_source == str(path) and loaded.model.config.projector_seed is None
        for k, v in loaded.projector.state_dict().items():
            assert torch.equal(v, trained[f"multi_modal_projector.{k}"]), k

    with pytest.raises(SinkscopeError, match="does not exist"):
        build_mini_llava(projector=tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    torch.save({"linear_1.weight": torch.zeros(3, 3)}, bad)
    with pytest.raises(SinkscopeError, match="did not load"):
        build_mini_llava(projector=bad)


@pytest.mark.parametrize(
    "prompt", ["<image>\nWhat is in the picture?", "Compare <image> and <image> please."]
)
def test_build_inputs_with_chat_template_equals_mini_llava_inputs(ad, images, prompt):
    """The generic chat path of LlavaAdapter.build_inputs gives the same ids as mini-llava's own
    tokenisation of SmolLM2's chat template (one image or two, markers anywhere)."""
    n = prompt.count("<image>")
    ref = mini_llava_inputs(ad, images[:n], prompt)["input_ids"]
    got = ad.build_inputs(images[:n], prompt, chat=True)["input_ids"]
    assert torch.equal(got, ref)
    plain = ad.build_inputs(images[:n], prompt)["input_ids"]
    assert int(plain[0, 0]) != int(got[0, 0]) == ad.tokenizer.convert_tokens_to_ids("<|im_start|>")


def test_chat_needs_a_template():
    from sinkscope import SinkscopeError, load_model

    tiny = load_model("tiny-llava")
    with pytest.raises(SinkscopeError, match="no chat template"):
        tiny.build_inputs([np.zeros((32, 32, 3), np.uint8)], "what ?", chat=True)


def test_propagation_warns_when_the_llm_rule_calls_most_visual_tokens_sinks(ad, images):
    """Without the chat template SmolLM2's sequence starts with image tokens and, through the
    untrained projector, nearly every visual token carries a massive activation: the summary says
    the LLM-emerged group has stopped being a set of outliers. With the template it is a minority."""
    from sinkscope.flow.propagation import propagation

    bare = propagation(ad, images[:1], "What is the main object in the image?")
    chat = propagation(ad, images[:1], "What is the main object in the image?", chat=True)
    assert (
        bare.summary["n_llm_sink_tokens"] > 0.25 * N_IMG
        and "pass the LLM sink rule" in bare.summary["llm_rule_note"]
    )
    assert chat.summary["n_llm_sink_tokens"] < 0.25 * N_IMG and "llm_rule_note" not in chat.summary
    assert chat.summary["chat_template"] is True
