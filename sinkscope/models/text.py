"""Adapter for Hugging Face causal language models (Llama, Qwen2, Mistral, GPT-2, ...).

Used on its own for LLM-side sinks (the first token's massive activation) and as the LLM half of
a LLaVA-style model.

>>> import transformers as T
>>> lm = T.LlamaForCausalLM(T.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
...                                       num_key_value_heads=1, intermediate_size=64, vocab_size=50))
>>> CausalLMAdapter(lm, "toy").n_layers
2
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .._utils import SinkscopeError
from .base import Adapter, ModelInputs, TokenLayout

_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
_MLP_OUT_NAMES = ("down_proj", "c_proj", "fc2", "dense_4h_to_h", "w2")
_NORM_NAMES = ("norm", "ln_f", "final_layernorm", "final_layer_norm")


def _decoder(model: nn.Module) -> nn.Module:
    """The bare decoder (``LlamaModel`` inside ``LlamaForCausalLM``; itself if already bare)."""
    for attr in ("model", "transformer", "gpt_neox"):
        sub = getattr(model, attr, None)
        if isinstance(sub, nn.Module) and not isinstance(sub, nn.ModuleList):
            return sub
    return model


def _find_layers(decoder: nn.Module, n: int) -> nn.ModuleList:
    for attr in ("layers", "h", "blocks", "layer"):
        obj = getattr(decoder, attr, None)
        if isinstance(obj, nn.ModuleList) and len(obj) == n:
            return obj
    for _, mod in decoder.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n:
            return mod
    raise SinkscopeError(f"cannot find the {n} decoder layers of {type(decoder).__name__}")


def _child(module: nn.Module, names: tuple[str, ...], what: str) -> nn.Module:
    for nm in names:
        sub = getattr(module, nm, None)
        if isinstance(sub, nn.Module):
            return sub
    raise SinkscopeError(f"cannot find the {what} of {type(module).__name__} (looked for {', '.join(names)})")


class CausalLMAdapter(Adapter):
    """Adapter for a causal LM (``*ForCausalLM``) or a bare decoder (``LlamaModel``)."""

    family = "causal-lm"
    last_layer_normed = True  # HF ties hidden_states[-1] to the final norm's output for LLMs

    def __init__(self, model: nn.Module, name: str, tokenizer: Any = None):
        super().__init__(model, name, tokenizer)
        self.tokenizer = tokenizer
        cfg = model.config
        cfg = getattr(cfg, "text_config", None) or cfg
        self._cfg = cfg
        self.decoder = _decoder(model)
        self._layers = _find_layers(self.decoder, int(cfg.num_hidden_layers))
        if self.final_norm() is None:
            raise SinkscopeError(
                f"model {name!r}: cannot find the final norm of {type(self.decoder).__name__} "
                f"(looked for {', '.join(_NORM_NAMES)} beside the layers)"
            )

    def blocks(self) -> list[nn.Module]:
        return list(self._layers)

    def attention(self, block: int) -> nn.Module:
        return _child(self._layers[block], _ATTN_NAMES, "attention")

    def mlp_out(self, block: int) -> nn.Module:
        mlp = _child(self._layers[block], ("mlp", "feed_forward", "ffn"), "MLP")
        return _child(mlp, _MLP_OUT_NAMES, "MLP output projection")

    def final_norm(self) -> nn.Module | None:
        """The final norm: a ``norm``/``ln_f``/``final_layer_norm`` beside the layer list
        (``LlamaModel.norm``, ``GPT2Model.ln_f``, ``OPTDecoder.final_layer_norm``)."""
        for _, mod in self.decoder.named_modules():
            if any(child is self._layers for child in mod.children()):
                for nm in _NORM_NAMES:
                    sub = getattr(mod, nm, None)
                    if isinstance(sub, nn.Module):
                        return sub
        return None

    @property
    def config(self):
        return self._cfg

    @property
    def hidden_size(self) -> int:
        return int(self._cfg.hidden_size)

    @property
    def n_heads(self) -> int:
        return int(self._cfg.num_attention_heads)

    def prepare(self, items: list[str], names: list[str] | None = None) -> ModelInputs:
        """Tokenize prompts (right-padded, so token ``i`` is position ``i``)."""
        if self.tokenizer is None:
            raise SinkscopeError(f"model {self.name!r} has no tokenizer: pass input_ids yourself")
        names = names or [f"text{i}" for i in range(len(items))]
        tok = self.tokenizer
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        tok.padding_side = "right"
        enc = tok(list(items), return_tensors="pt", padding=True)
        lengths = enc["attention_mask"].sum(1).tolist()
        layouts = [TokenLayout(n_text=int(n)) for n in lengths]
        return ModelInputs(
            tensors={"input_ids": enc["input_ids"]},
            layouts=layouts,
            names=list(names),
            attention_mask=enc["attention_mask"],
        )

    def token_strings(self, inputs: ModelInputs, item: int) -> list[str]:
        ids = inputs.tensors["input_ids"][item, : inputs.layouts[item].n_text].tolist()
        return (
            self.tokenizer.convert_ids_to_tokens(ids) if self.tokenizer is not None else [str(i) for i in ids]
        )

    def forward(self, inputs: ModelInputs, **extra) -> Any:
        kw = {"input_ids": inputs.tensors["input_ids"].to(self.device)}
        if inputs.attention_mask is not None:
            kw["attention_mask"] = inputs.attention_mask.to(self.device)
        if self.decoder is not self.model:
            # run the bare decoder: the LM head's logits are not needed for a scan
            return self.decoder(**kw, use_cache=False, **extra)
        return self.model(**kw, use_cache=False, **extra)

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["vocab_size"] = int(getattr(self._cfg, "vocab_size", 0) or 0)
        return d
