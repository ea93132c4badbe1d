"""Every model family the way users bring it: built with ``from_config``, saved with
``save_pretrained`` together with its processor, and passed to the command line as ``--model DIR``.

sinkscope's own builders (``tiny-*``, ``mini-llava``) set attributes that a user's checkpoint does
not have; a defect hid for a round because every flow test used them (``LlavaAdapter`` without
``planted`` crashed ``sinkscope flow``). These tests never touch the builders' adapters.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import transformers as T
from PIL import Image

from sinkscope.cli import main
from sinkscope.models.tiny import _VISION_CLASSES, _llama_config, _vision_config, tiny_tokenizer

VISION_PROCESSORS = {
    "clip": lambda: T.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
    "siglip": lambda: T.SiglipImageProcessor(size={"height": 32, "width": 32}),
    "dinov2": lambda: T.BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
    "dinov2-reg": lambda: T.BitImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ),
    "vit": lambda: T.ViTImageProcessor(size={"height": 32, "width": 32}),
}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray((rng.random((40, 48, 3)) * 255).astype(np.uint8)).save(d / f"im{i}.png")
    return str(d)


def _save(model, processor, path) -> str:
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory) -> str:
    """A LlavaForConditionalGeneration (CLIP tower, Llama LM) with its LlavaProcessor, like
    ``llava-hf/llava-1.5-7b-hf`` in miniature: feature layer -2, CLS dropped."""
    torch.manual_seed(0)
    cfg = T.LlavaConfig(
        vision_config=_vision_config("clip"),
        text_config=_llama_config(),
        image_token_id=4,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=16,
    )
    model = T.LlavaForConditionalGeneration(cfg).eval()
    proc = T.LlavaProcessor(
        image_processor=VISION_PROCESSORS["clip"](),
        tokenizer=tiny_tokenizer(),
        patch_size=8,
        vision_feature_select_strategy="default",
        image_token="<image>",
        num_additional_image_tokens=1,
    )
    return _save(model, proc, tmp_path_factory.mktemp("ckpt") / "llava")


@pytest.mark.parametrize("family", list(VISION_PROCESSORS))
def test_scan_and_rollout_on_a_saved_vision_checkpoint(tmp_path, images, family):
    torch.manual_seed(0)
    model = _VISION_CLASSES[family](_vision_config(family)).eval()
    ckpt = _save(model, VISION_PROCESSORS[family](), tmp_path / family)
    assert main(["scan", "--model", ckpt, "--images", images, "--out", str(tmp_path / "scan"), "-q"]) == 0
    tokens = pd.read_parquet(tmp_path / "scan" / "tokens.parquet")
    n_prefix = (0 if family == "siglip" else 1) + (4 if family == "dinov2-reg" else 0)
    assert tokens.token.nunique() == n_prefix + 16  # 4 x 4 patches at 32 px
    out = tmp_path / "flow"
    assert main(["flow", "--model", ckpt, "--images", images, "--analysis", "rollout", "--out", str(out), "-q"]) == 0
    roll = pd.read_csv(out / "rollout.csv")
    assert set(roll.image) == {"im0.png", "im1.png"} and roll.value.ge(0).all()


def test_scan_on_a_saved_causal_lm_checkpoint(tmp_path):
    torch.manual_seed(0)
    ckpt = _save(T.LlamaForCausalLM(_llama_config()).eval(), tiny_tokenizer(), tmp_path / "lm")
    out = tmp_path / "scan"
    texts = ["--text", "what is the color of the sky", "--text", "the cat is on the tree"]
    assert main(["scan", "--model", ckpt, *texts, "--method", "all", "--out", str(out), "-q"]) == 0
    tokens = pd.read_parquet(out / "tokens.parquet")
    assert tokens.layer.max() == 4 and len(tokens) > 0


def test_every_flow_analysis_on_a_saved_llava_checkpoint(tmp_path, images, llava_dir):
    """The crash of issue 9: ``sinkscope flow --model DIR`` on a LLaVA saved with save_pretrained."""
    out = tmp_path / "flow"
    argv = ["flow", "--model", llava_dir, "--images", f"{images}/im0.png", "--prompt", "what is this ?"]
    assert main([*argv, "--attribution-steps", "8", "--out", str(out), "-q"]) == 0
    for name in ("rollout.csv", "visual_tokens.parquet", "knockout.csv", "decode.csv", "attribution.csv"):
        assert (out / name).exists(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"]["feature_layer"] == 3 and "warning" not in summary
    # offline defaults (prefill queries, 5x median) are named as departures from the paper's Fig. 3A
    assert summary["paper_settings"]["matches"] is False and len(summary["paper_settings"]["differences"]) == 2
    assert summary["propagation"]["llm_rule"]["sink_dims_source"] == "text"  # Kang et al.: text-only
    vt = pd.read_parquet(out / "visual_tokens.parquet")
    assert len(vt) == 16 and vt.vit_token.min() == 1  # CLS dropped by the "default" strategy


def test_scan_of_a_saved_llava_checkpoint_reads_its_tower(tmp_path, images, llava_dir):
    out = tmp_path / "scan"
    assert main(["scan", "--model", llava_dir, "--images", images, "--out", str(out), "-q"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"]["feature_layer"] == 3
    assert pd.read_parquet(out / "tokens.parquet").layer.max() == 4


def test_flow_vit_analyses_stop_at_the_feature_layer(tmp_path, images, llava_dir):
    """LLaVA-1.5 feeds ``hidden_states[-2]`` to the projector: rollout, relevance and the ViT sinks
    of a VLM stop there (block 3 of 4 never reaches the LLM), and the summary says so."""
    from sinkscope.flow.rollout import rollout

    out = tmp_path / "flow"
    img = f"{images}/im0.png"
    assert main(["flow", "--model", llava_dir, "--images", img, "--analysis", "rollout", "--out", str(out), "-q"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["vit_layer"]["layer"] == 3 and "vision_feature_layer=-2" in summary["vit_layer"]["source"]
    rel = pd.read_csv(out / "relevance.csv")
    assert set(rel.layer) == {2}  # the block whose output is the feature layer
    assert pd.read_csv(out / "vit_attention_by_group.csv").layer.max() == 2
    # the CLS rollout equals a direct product over the tower's first 3 blocks (HF eager attentions)
    model = T.LlavaForConditionalGeneration.from_pretrained(llava_dir, attn_implementation="eager").eval()
    proc = T.CLIPImageProcessor.from_pretrained(llava_dir)
    pv = proc(images=[np.asarray(Image.open(img).convert("RGB"))], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        att = model.model.vision_tower(pixel_values=pv, output_attentions=True).attentions
    want = np.asarray(rollout([a[0] for a in att[:3]]))[0, 1:]
    got = pd.read_csv(out / "rollout.csv").query("start_kind == 'cls'").sort_values("token").value.to_numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    four_blocks = np.asarray(rollout([a[0] for a in att]))[0, 1:]
    assert np.abs(got - four_blocks).max() > 1e-3  # the last block would change the answer
