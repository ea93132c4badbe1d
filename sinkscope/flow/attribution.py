"""Attribution of an LVLM's answer to each visual token, with captum.

``IntegratedGradients`` on the visual token embeddings the LLM receives (the projector's output,
fed through ``inputs_embeds``): the attribution of token ``j`` is the sum over hidden dims of its
integrated gradient from a zero embedding to the real one, for the logit of the answer token at
the last position; the attributions add up to ``logit(real) - logit(all visual embeddings zero)``. Aggregated per group (ViT sinks vs non-sinks). captum's memory controls are
exposed: ``n_steps`` and ``internal_batch_size``.

>>> attr = attribute_visual_tokens(ad, inputs, answer_id=None, n_steps=16)        # doctest: +SKIP
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from .._utils import SinkscopeError
from ..models.llava import LlavaAdapter


def attribute_visual_tokens(
    ad: LlavaAdapter,
    inputs: dict,
    answer_id: int | None = None,
    n_steps: int = 16,
    internal_batch_size: int | None = 4,
    method: str = "integrated_gradients",
) -> pd.DataFrame:
    """One row per visual token fed to the LLM: ``feature`` (index over all images' features),
    ``attribution`` (sum over dims), ``abs_attribution``; plus ``answer_id`` and the
    completeness gap (IG's sum of attributions vs the logit difference to the baseline).

    ``method``: ``"integrated_gradients"`` (captum ``IntegratedGradients``) or
    ``"ablation"`` (captum ``FeatureAblation``: each token's embedding set to zero in turn).
    """
    try:
        from captum.attr import FeatureAblation, IntegratedGradients
    except ImportError:
        raise SinkscopeError("attribution needs captum: pip install captum") from None
    model = ad.model
    proj = ad.projector
    ids, pv, am = inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"]
    dev = ad.device
    ids, pv, am = ids.to(dev), pv.to(dev, ad.dtype), am.to(dev)
    with torch.no_grad():
        ans = (
            int(model(input_ids=ids, pixel_values=pv, attention_mask=am).logits[0, -1].argmax())
            if answer_id is None
            else int(answer_id)
        )

    with torch.no_grad():
        feats = proj(_tower_features(ad, pv))  # [images, features, hidden]: what the LLM receives
    n_img, n_feat = feats.shape[:2]
    emb_layer = model.model.get_input_embeddings()
    img_mask = ids[0] == ad.image_token_id
    if int(img_mask.sum()) != n_img * n_feat:
        raise SinkscopeError(
            f"the prompt holds {int(img_mask.sum())} image tokens for {n_img * n_feat} features"
        )

    def fwd_embeds(flat):  # [B, n_img * n_feat, hidden] visual embeddings -> answer logit
        B = flat.shape[0]
        e = emb_layer(ids).expand(B, -1, -1).clone()
        e[:, img_mask] = flat.to(e.dtype)
        return model(inputs_embeds=e, attention_mask=am.expand(B, -1)).logits[:, -1, ans]

    flat = feats.reshape(1, n_img * n_feat, -1)
    if method == "integrated_gradients":
        ig = IntegratedGradients(fwd_embeds)
        attr, delta = ig.attribute(
            flat,
            baselines=torch.zeros_like(flat),
            n_steps=n_steps,
            internal_batch_size=internal_batch_size,
            return_convergence_delta=True,
        )
        per_tok = attr[0].detach().float().sum(-1).cpu().numpy()
        gap = float(delta.abs().max())
    elif method == "ablation":
        mask = torch.arange(n_img * n_feat, device=dev)[None, :, None].expand_as(flat)
        fa = FeatureAblation(fwd_embeds)
        attr = fa.attribute(
            flat, baselines=0.0, feature_mask=mask, perturbations_per_eval=internal_batch_size or 1
        )
        per_tok = attr[0, :, 0].detach().float().cpu().numpy()
        gap = float("nan")
    else:
        raise SinkscopeError(f"unknown attribution method {method!r}; use integrated_gradients or ablation")
    return pd.DataFrame(
        {
            "feature": np.arange(len(per_tok)),
            "attribution": per_tok,
            "abs_attribution": np.abs(per_tok),
            "answer_id": ans,
            "method": method,
            "convergence_delta": gap,
        }
    )


def _tower_features(ad: LlavaAdapter, pv: torch.Tensor) -> torch.Tensor:
    out = ad.vision.model(pixel_values=pv, output_hidden_states=True)
    h = out.hidden_states[ad.feature_layer]
    return h[:, 1:] if ad.select_strategy == "default" else h
