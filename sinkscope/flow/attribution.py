"""Attribution of an LVLM's answer to each visual token, with captum.

``IntegratedGradients`` on the visual token embeddings the LLM receives (the projector's output,
fed through ``inputs_embeds``): the attribution of token ``j`` is the sum over hidden dims of its
integrated gradient from a zero embedding to the real one, for the logit of the answer token at
the last position; the attributions add up to ``logit(real) - logit(all visual embeddings zero)``
only when the path integral is resolved: captum's ``convergence_delta`` (sum of attributions minus
that logit difference) measures the gap. The step count is therefore adaptive: starting at
``n_steps``, it doubles until ``|delta| <= rel_tol x |logit difference|`` (or ``max_steps`` is
reached, which is warned about and recorded with the result). Aggregated per group (ViT sinks vs
non-sinks). captum's memory controls are exposed: ``n_steps``/``max_steps`` and
``internal_batch_size``.

>>> from sinkscope.data import sample_images
>>> from sinkscope.models import load_model
>>> ad = load_model("tiny-llava+sinks")
>>> inputs = ad.build_inputs([sample_images(1)[0].load()], "What is this?")
>>> attr = attribute_visual_tokens(ad, inputs, answer_id=None)
>>> attr.attrs["convergence"]["converged"]
True
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import torch

from .._utils import SinkscopeError
from ..models.llava import LlavaAdapter

log = logging.getLogger("sinkscope")

#: Integrated-gradients defaults: first step count, cap, and the completeness tolerance relative
#: to the logit difference. At 16 steps tiny-llava's gap was half its logit difference (0.13 vs 0.25).
IG_STEPS = 64
IG_MAX_STEPS = 256
IG_REL_TOL = 0.05
IG_ABS_TOL = 1e-4
#: where the path is probed for a jump next to the baseline (below the first Gauss-Legendre node
#: of 256 steps, about 2e-5)
IG_JUMP_ALPHA = 1e-6


def attribute_visual_tokens(
    ad: LlavaAdapter,
    inputs: dict,
    answer_id: int | None = None,
    n_steps: int = IG_STEPS,
    internal_batch_size: int | None = 4,
    method: str = "integrated_gradients",
    max_steps: int | None = IG_MAX_STEPS,
    rel_tol: float = IG_REL_TOL,
) -> pd.DataFrame:
    """One row per visual token fed to the LLM: ``feature`` (index over all images' features),
    ``attribution`` (sum over dims), ``abs_attribution``; plus ``answer_id`` and the
    completeness gap ``convergence_delta`` (``|`` IG's sum of attributions minus the logit
    difference to the baseline ``|``).

    ``method``: ``"integrated_gradients"`` (captum ``IntegratedGradients``) or
    ``"ablation"`` (captum ``FeatureAblation``: each token's embedding set to zero in turn).

    Integrated gradients start at ``n_steps`` and double them until ``convergence_delta <=
    max(rel_tol x |logit difference|, 1e-4)``, up to ``max_steps`` (``None``: no doubling).
    When the tolerance is not reached a warning is logged, and the columns ``n_steps``,
    ``logit_diff``, ``delta_tolerance``, ``converged`` (and ``attrs["convergence"]``, with every
    (steps, delta) tried) record it. ``baseline_jump`` is the logit change between the zero
    baseline and ``1e-6 x`` the embeddings: when it alone exceeds the tolerance, no step count can
    close the gap (seen when a visual token starts the sequence: zeroing it removes the LLM's
    attention sink), so the steps are not raised and the warning says so.
    """
    try:
        from captum.attr import FeatureAblation, IntegratedGradients
    except ImportError:
        raise SinkscopeError("attribution needs captum: pip install captum") from None
    dev = ad.device
    ids, pv, am = (
        inputs["input_ids"].to(dev),
        inputs["pixel_values"].to(dev, ad.dtype),
        inputs["attention_mask"].to(dev),
    )
    ans = _answer(ad, ids, pv, am, answer_id)
    fwd_embeds, flat = _answer_logit_of_visual_embeddings(ad, ids, pv, am, ans)
    conv: dict = {}
    if method == "integrated_gradients":
        per_tok, gap, conv, record = _integrated_gradients(
            IntegratedGradients, fwd_embeds, flat, n_steps, max_steps, rel_tol, internal_batch_size
        )
    elif method == "ablation":
        per_tok, gap = _ablation(FeatureAblation, fwd_embeds, flat, internal_batch_size), float("nan")
    else:
        raise SinkscopeError(f"unknown attribution method {method!r}; use integrated_gradients or ablation")
    df = pd.DataFrame(
        {
            "feature": np.arange(len(per_tok)),
            "attribution": per_tok,
            "abs_attribution": np.abs(per_tok),
            "answer_id": ans,
            "method": method,
            "convergence_delta": gap,
            **conv,
        }
    )
    if conv:
        df.attrs["convergence"] = record
    return df


def _answer(ad: LlavaAdapter, ids, pv, am, answer_id: int | None) -> int:
    """``answer_id``, or by default the model's greedy next token at the last position."""
    if answer_id is not None:
        return int(answer_id)
    with torch.no_grad():
        return int(ad.model(input_ids=ids, pixel_values=pv, attention_mask=am).logits[0, -1].argmax())


def _answer_logit_of_visual_embeddings(ad: LlavaAdapter, ids, pv, am, ans: int):
    """``(forward, embeddings)``: the visual embeddings the LLM receives (the projector's output,
    ``[1, n_images * n_features, hidden]``), and a function from a batch of them ``[B, ...]`` to the
    answer logit at the last position (fed through ``inputs_embeds``, the text embeddings kept)."""
    model = ad.model
    with torch.no_grad():
        feats = ad.projector(_tower_features(ad, pv))  # [images, features, hidden]: what the LLM receives
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

    return fwd_embeds, feats.reshape(1, n_img * n_feat, -1)


def _integrated_gradients(
    integrated_gradients,
    fwd_embeds,
    flat,
    n_steps: int,
    max_steps: int | None,
    rel_tol: float,
    internal_batch_size,
):
    """Integrated gradients (captum's class ``integrated_gradients``) from zero embeddings to
    ``flat``, the steps doubled from ``n_steps`` until the completeness gap is within tolerance (see
    :func:`attribute_visual_tokens`). ``-> (attribution per token, completeness gap, the
    convergence columns, the convergence record with every (steps, gap) tried)``."""
    if n_steps < 1 or (max_steps is not None and max_steps < 1):
        raise SinkscopeError(f"integrated gradients need at least 1 step, got {n_steps} (max {max_steps})")
    if rel_tol <= 0:
        raise SinkscopeError(f"rel_tol must be > 0, got {rel_tol:g}")
    with torch.no_grad():
        f = fwd_embeds(torch.cat([flat, IG_JUMP_ALPHA * flat, torch.zeros_like(flat)]))
    logit_diff, jump = float(f[0] - f[2]), float(f[1] - f[2])
    tol = max(rel_tol * abs(logit_diff), IG_ABS_TOL)
    # a jump between the baseline and a point closer to it than any quadrature node: more
    # steps cannot close the gap, so do not double them
    jumps = abs(jump) > tol
    cap = n_steps if max_steps is None or jumps else max(max_steps, n_steps)
    ig = integrated_gradients(fwd_embeds)
    steps, history = n_steps, []
    while True:
        attr, delta = ig.attribute(
            flat,
            baselines=torch.zeros_like(flat),
            n_steps=steps,
            internal_batch_size=internal_batch_size,
            return_convergence_delta=True,
        )
        gap = float(delta.abs().max())
        history.append({"n_steps": steps, "convergence_delta": gap})
        if gap <= tol or steps >= cap:
            break
        steps = min(2 * steps, cap)
    per_tok = attr[0].detach().float().sum(-1).cpu().numpy()
    conv = {
        "n_steps": steps,
        "logit_diff": logit_diff,
        "delta_tolerance": tol,
        "converged": gap <= tol,
        "baseline_jump": jump,
    }
    if not conv["converged"]:
        _warn_not_converged(jumps, jump, logit_diff, gap, tol, rel_tol, steps)
    return per_tok, gap, conv, {**conv, "rel_tol": rel_tol, "max_steps": cap, "tried": history}


def _ablation(feature_ablation, fwd_embeds, flat, internal_batch_size) -> np.ndarray:
    """captum's ``FeatureAblation``: each visual token's embedding set to zero in turn."""
    mask = torch.arange(flat.shape[1], device=flat.device)[None, :, None].expand_as(flat)
    fa = feature_ablation(fwd_embeds)
    attr = fa.attribute(
        flat, baselines=0.0, feature_mask=mask, perturbations_per_eval=internal_batch_size or 1
    )
    return attr[0, :, 0].detach().float().cpu().numpy()


def _warn_not_converged(jumps: bool, jump, logit_diff, gap, tol, rel_tol, steps) -> None:
    """Log why integrated gradients did not reach the tolerance: a jump at the baseline, or the cap."""
    if jumps:
        log.warning(
            "integrated gradients cannot converge: the answer logit changes by %.3g between the zero "
            "baseline and %g x the visual embeddings (of a logit difference of %.3g), closer to the "
            "baseline than any quadrature step, so the attributions miss that part at any step count "
            "(completeness gap %.3g at %d steps; the steps were not raised). A zero first token removes "
            "the LLM's attention sink: start the prompt with text (flow: --chat)",
            jump,
            IG_JUMP_ALPHA,
            logit_diff,
            gap,
            steps,
        )
    else:
        log.warning(
            "integrated gradients did not converge: completeness gap %.3g > tolerance %.3g "
            "(%g x |logit difference| %.3g) at %d steps (the cap); the attributions do not add up to the "
            "logit difference: raise max_steps (flow: --attribution-steps)",
            gap,
            tol,
            rel_tol,
            abs(logit_diff),
            steps,
        )


def _tower_features(ad: LlavaAdapter, pv: torch.Tensor) -> torch.Tensor:
    out = ad.vision.model(pixel_values=pv, output_hidden_states=True)
    h = out.hidden_states[ad.feature_layer]
    return h[:, 1:] if ad.select_strategy == "default" else h
