"""Attention knockout (Zhang et al., CVPR 2025) and word-distribution decoding of isolated tokens.

Both block attention edges - from a set of *source* key positions to a set of *target* query
positions, in chosen LLM layers - by replacing the additive attention mask those layers receive
(eager attention for the duration). Knockout windows are centred on every LLM layer and clipped
at the first and last layer (one point per layer, as Zhang et al. do); the fast route reruns only
what a window can change (layers from the window's start, positions from the first target on).
The model is not modified: hooks are removed and the attention implementation restored
afterwards, also on error.

>>> from sinkscope.models import load_model
>>> ad = load_model("tiny-llava")                                   # 4 LLM layers
>>> inp = ad.build_inputs([np.zeros((32, 32, 3), np.uint8)], "<image> What is in the picture?")
>>> inputs = {k: inp[k] for k in ("input_ids", "attention_mask", "pixel_values")}
>>> image_positions = ad.image_token_positions(inputs["input_ids"])[0].tolist()
>>> seq = inputs["input_ids"].shape[1]
>>> run = lambda: ad.model(**inputs)
>>> ko = knockout(run, ad.llm, source=image_positions, target=[seq - 1], window=3,
...               head=ad.model.get_output_embeddings())           # image -> last position blocked
>>> ko[["layer", "window_start", "window_end"]].values.tolist()     # one window per layer, clipped
[[0, 0, 1], [1, 0, 2], [2, 1, 3], [3, 2, 3]]
>>> ref = knockout(run, ad.llm, source=image_positions, target=[seq - 1], window=3, method="reference")
>>> bool(np.allclose(ko.p_answer, ref.p_answer, atol=1e-6))         # the fast route = one forward per window
True
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from contextlib import contextmanager

import numpy as np
import pandas as pd
import torch
from torch import nn

from .._utils import SinkscopeError
from ..models.text import CausalLMAdapter

log = logging.getLogger("sinkscope")


@contextmanager
def blocked_edges(lm: CausalLMAdapter, blocks: Sequence[int], source: Sequence[int], target: Sequence[int]):
    """Within the ``with`` block, queries in ``target`` cannot attend to keys in ``source`` in the
    given decoder ``blocks`` (pre-softmax mask). Eager attention is on for the duration."""
    src = torch.as_tensor(list(source), dtype=torch.long)
    tgt = torch.as_tensor(list(target), dtype=torch.long)

    def hook(module, args, kwargs):
        if len(src) == 0 or len(tgt) == 0:
            return None
        am = kwargs.get("attention_mask")
        h = args[0] if args else kwargs["hidden_states"]
        B, Q = h.shape[0], h.shape[1]
        neg = torch.finfo(h.dtype).min
        if am is None:
            am = torch.full((B, 1, Q, Q), neg, dtype=h.dtype, device=h.device).triu(1)
        am = am.clone()
        K = am.shape[-1]
        t = tgt[(tgt < Q)].to(am.device)
        s = src[(src < K)].to(am.device)
        am[:, :, t[:, None], s[None, :]] = neg
        kwargs["attention_mask"] = am
        return args, kwargs

    model = lm.model
    old = lm.config._attn_implementation
    handles = []
    try:
        if old != "eager":
            model.set_attn_implementation("eager")
        for b in blocks:
            handles.append(lm.blocks()[b].register_forward_pre_hook(hook, with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()
        if old != "eager":
            model.set_attn_implementation(old)


KNOCKOUT_COLUMNS = (
    "layer",
    "window_start",
    "window_end",
    "answer_id",
    "p_answer",
    "p_base",
    "delta",
    "relative_change",
)
"""The columns of a knockout table: ``layer`` is the window's centre, ``window_start`` and
``window_end`` (inclusive) the blocked layers after clipping at the edges."""


def knockout_windows(n_layers: int, window: int = 9, stride: int = 1) -> list[tuple[int, int, int]]:
    """Windows of ``window`` LLM layers centred on layers ``0, stride, 2 * stride, ...``, clipped
    at the first and last layer (Zhang et al.): one ``(layer, window_start, window_end)`` per
    centre, ``window_end`` inclusive: layers ``layer - window // 2`` to ``layer + ceil(window / 2) - 1``,
    as the reference (Zhang et al.: ``range(max(0, l - w // 2), min(L, l + ceil(w / 2)))``), so an
    even window has its extra layer before the centre.

    >>> knockout_windows(4, window=3)
    [(0, 0, 1), (1, 0, 2), (2, 1, 3), (3, 2, 3)]
    >>> knockout_windows(5, window=4)[2]           # layers 0..3: two before the centre, one after
    (2, 0, 3)
    """
    if n_layers < 1:
        raise SinkscopeError("the model has no decoder layer to knock out")
    window = max(1, int(window))
    before = window // 2
    after = window - 1 - before
    return [
        (c, max(0, c - before), min(n_layers - 1, c + after)) for c in range(0, n_layers, max(1, int(stride)))
    ]


def _last_probs(run) -> torch.Tensor:
    with torch.no_grad():
        logits = run().logits[0, -1].float()
    return logits.softmax(-1)


def _rows(windows, ans: int, p0: float, ps) -> pd.DataFrame:
    rows = []
    for (c, s, e), p in zip(windows, ps):
        rows.append(
            {
                "layer": c,
                "window_start": s,
                "window_end": e,
                "answer_id": ans,
                "p_answer": p,
                "p_base": p0,
                "delta": p - p0,
                "relative_change": (p - p0) / p0 if p0 > 0 else np.nan,
            }
        )
    return pd.DataFrame(rows, columns=list(KNOCKOUT_COLUMNS))


def knockout(
    run_model,
    lm: CausalLMAdapter,
    source: Sequence[int],
    target: Sequence[int],
    window: int = 9,
    answer_id: int | None = None,
    stride: int = 1,
    head: nn.Module | None = None,
    method: str = "auto",
) -> pd.DataFrame:
    """Change in the answer's probability when ``source -> target`` edges are blocked in a
    window of ``window`` LLM layers centred on each layer (clipped at the edges, see
    :func:`knockout_windows`).

    ``run_model``: a zero-argument callable that runs the full model on the fixed input and
    returns an output with ``.logits`` (e.g. ``lambda: ad.model(**inputs)``). ``answer_id``: the
    token whose probability is tracked (default: the model's own top prediction without
    knockout). ``stride``: step between window centres. ``head``: the LM head, needed by the
    fast route (default: the adapter's model's output embeddings, else the module whose output is
    the run's logits). ``method``: ``"fast"`` (reuse the unblocked run's states below each window,
    see :func:`knockout_pairs`), ``"reference"`` (one full forward per window with
    :func:`blocked_edges`) or ``"auto"`` (fast, falling back to the reference route where the fast
    one cannot reproduce the model's output). Returns one row per window: ``layer`` (centre),
    ``window_start``, ``window_end`` (inclusive, after clipping), ``answer_id, p_answer, p_base,
    delta, relative_change``.
    """
    out = knockout_pairs(
        run_model,
        lm,
        [(source, target)],
        window,
        answer_id=answer_id,
        stride=stride,
        head=head,
        method=method,
    )
    return out[0]


def knockout_pairs(
    run_model,
    lm: CausalLMAdapter,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    window: int = 9,
    answer_id: int | None = None,
    stride: int = 1,
    head: nn.Module | None = None,
    method: str = "auto",
    max_rows: int = 1024,
) -> list[pd.DataFrame]:
    """:func:`knockout` for several ``(source, target)`` pairs at once; one table per pair.

    The fast route runs the unblocked model once (eager attention) and records, per decoder
    layer, its input hidden state, its call arguments (mask, position embeddings, ...) and the
    keys and values its attention computed. Blocking ``source -> target`` in layers ``s..e``
    changes nothing below layer ``s`` and nothing at positions before the first target (a causal
    model's earlier positions never see the targets), so each window reruns only layers ``s..L-1``
    on the positions from the first target on, against the recorded keys and values of the earlier
    positions, then the final norm and the LM head on the last position. Windows and pairs that
    share a first target run together, packed into one sequence (each window's copy of the
    rerun positions masked from the others', up to ``max_rows`` positions a forward). An
    unblocked item checks that this reproduces the model's own output; where it does not (an
    architecture whose layers cannot be called this way), the reference route runs instead, with
    a warning. The route used is in each table's ``attrs["route"]``.
    """
    if method not in ("auto", "fast", "reference"):
        raise SinkscopeError(f"unknown knockout method {method!r}; choose auto, fast or reference")
    pairs = [(sorted({int(i) for i in s}), sorted({int(i) for i in t})) for s, t in pairs]
    windows = knockout_windows(lm.n_layers, window, stride)
    if head is None:
        get = getattr(lm.model, "get_output_embeddings", None)
        head = get() if callable(get) else None
    if method != "reference":
        try:
            tables = _fast(run_model, lm, pairs, windows, answer_id, head, max_rows)
            for t in tables:
                t.attrs["route"] = "fast"
            return tables
        except _NotReproduced as err:
            if method == "fast":
                raise SinkscopeError(f"fast knockout unavailable for this model: {err}") from err
            log.warning(
                "knockout: the fast route does not apply (%s); one full forward per window instead", err
            )
    base = _last_probs(run_model)
    ans = int(base.argmax()) if answer_id is None else int(answer_id)
    p0 = float(base[ans])
    tables = []
    for source, target in pairs:
        ps = []
        for _, s, e in windows:
            with blocked_edges(lm, range(s, e + 1), source, target):
                ps.append(float(_last_probs(run_model)[ans]))
        t = _rows(windows, ans, p0, ps)
        t.attrs["route"] = "reference"
        tables.append(t)
    return tables


class _NotReproduced(Exception):
    """The fast route cannot run on (or does not reproduce) this model."""


class _KVRecord:
    """Stands in for the cache in the unblocked run: keeps the layer's keys and values."""

    def __init__(self):
        self.kv = None

    def update(self, key_states, value_states, *args, **kwargs):
        self.kv = (key_states, value_states)
        return key_states, value_states


class _PrefixKV:
    """Stands in for the cache in a rerun: the recorded keys and values of the positions before
    the rerun ones, in front of the rerun positions' own."""

    def __init__(self, k, v):
        self.k, self.v = k, v

    def update(self, key_states, value_states, *args, **kwargs):
        return torch.cat([self.k, key_states], dim=-2), torch.cat([self.v, value_states], dim=-2)


_CACHE_NAMES = ("cache", "past_key_values", "past_key_value")


@contextmanager
def _eager(lm: CausalLMAdapter):
    model = lm.model
    old = lm.config._attn_implementation
    try:
        if old != "eager":
            model.set_attn_implementation("eager")
        yield
    finally:
        if old != "eager":
            model.set_attn_implementation(old)


def _record(run_model, lm: CausalLMAdapter, find_head: bool = False):
    """The unblocked run (eager): its output, per decoder layer the input hidden state, the
    call's keyword arguments and the attention's keys and values, and (``find_head``) the module
    whose output is the run's logits (the LM head; ``None`` if none is)."""
    layers = lm.blocks()
    recs: list[dict] = [{} for _ in layers]
    vocab = int(getattr(lm.config, "vocab_size", 0) or 0)
    heads: list[tuple[nn.Module, torch.Tensor]] = []

    def on_any_module(module, args, output):
        if torch.is_tensor(output) and output.dim() == 3 and output.shape[-1] == vocab:
            heads.append((module, output))

    def make(i):
        def pre(module, args, kwargs):
            if len(args) > 1:  # more than the hidden state by position (GPT-2): not rerun this way
                return None
            h = args[0] if args else kwargs.get("hidden_states")
            name = next((n for n in _CACHE_NAMES if n in kwargs), None)
            if name is None:
                params = inspect.signature(module.forward).parameters
                name = next((n for n in _CACHE_NAMES if n in params), None)
            if h is None or name is None:
                return None
            kv = _KVRecord()
            recs[i].update(h=h, positional=bool(args), kwargs=dict(kwargs), cache_name=name, kv=kv)
            kwargs = dict(kwargs)
            kwargs[name] = kv
            return args, kwargs

        return pre

    handles = []
    try:
        with _eager(lm), torch.no_grad():
            for i, b in enumerate(layers):
                handles.append(b.register_forward_pre_hook(make(i), with_kwargs=True))
            if find_head and vocab:
                # a global hook, for this one run only: the LM head sits outside ``lm``'s modules
                handles.append(torch.nn.modules.module.register_module_forward_hook(on_any_module))
            out = run_model()
    finally:
        for h in handles:
            h.remove()
    head = next((m for m, o in reversed(heads) if o is out.logits), None)
    for i, r in enumerate(recs):
        if not r or r["kv"].kv is None:
            raise _NotReproduced(
                f"decoder layer {i} was not called with the hidden state and keyword arguments only, or "
                "did not pass its keys and values through a cache"
            )
        if r["h"].shape[0] != 1:
            raise _NotReproduced("knockout runs on one input at a time (batch of 1)")
    return out, recs, head


def _pack_kwargs(kw: dict, p0: int, seq: int, n: int) -> dict:
    """The recorded call arguments of a layer for ``n`` packed copies of positions ``p0:``
    (position ids, cache positions, rotary embeddings). Any other tensor the length of the
    sequence is not understood."""
    out = {}
    for k, v in kw.items():
        if k == "attention_mask" or k in _CACHE_NAMES or k == "hidden_states":
            continue
        if k == "position_embeddings" and isinstance(v, (tuple, list)):
            out[k] = tuple(torch.cat([x[..., p0:, :]] * n, dim=-2) for x in v)
        elif k in ("position_ids", "cache_position") and torch.is_tensor(v):
            out[k] = torch.cat([v[..., p0:]] * n, dim=-1)
        elif torch.is_tensor(v) and v.dim() > 0 and seq in v.shape[-2:]:
            raise _NotReproduced(f"unknown per-position layer argument {k!r}")
        else:
            out[k] = v
    return out


def _fast(run_model, lm, pairs, windows, answer_id, head, max_rows) -> list[pd.DataFrame]:
    norm = lm.final_norm()
    layers = lm.blocks()
    out, recs, found = _record(run_model, lm, find_head=head is None)
    head = head if head is not None else found
    if head is None:
        raise _NotReproduced("no LM head given, and no module of the model returned its logits")
    base_logits = out.logits[0, -1].float()
    base = base_logits.softmax(-1)
    ans = int(base.argmax()) if answer_id is None else int(answer_id)
    p_base = float(base[ans])
    h0 = recs[0]["h"]
    seq, dtype, device = h0.shape[1], h0.dtype, h0.device
    neg = torch.finfo(dtype).min
    masks = []
    for r in recs:
        am = r["kwargs"].get("attention_mask")
        if am is None:
            am = torch.full((1, 1, seq, seq), neg, dtype=dtype, device=device).triu(1)
        if am.dtype == torch.bool:  # True = attend
            am = torch.zeros(am.shape, dtype=dtype, device=device).masked_fill(~am, neg)
        if am.dim() != 4 or am.shape[-2] != seq or am.shape[-1] != seq:
            raise _NotReproduced(f"unexpected attention mask of shape {tuple(am.shape)}")
        masks.append(am[:1])
    # items: (pair index or -1 for the unblocked check, window index); grouped by the first target
    groups: dict[int, list[tuple[int, int]]] = {}
    for j, (_, target) in enumerate(pairs):
        tgt = [t for t in target if 0 <= t < seq]
        if not tgt:
            continue  # nothing to block: every window leaves the output as it is
        groups.setdefault(min(tgt), []).extend((j, w) for w in range(len(windows)))
    if not groups:
        groups[seq - 1] = []
    ps = np.full((len(pairs), len(windows)), np.nan)
    for j, (_, target) in enumerate(pairs):
        if not [t for t in target if 0 <= t < seq]:
            ps[j] = p_base
    check_err = 0.0
    with _eager(lm), torch.no_grad():
        for p0, items in groups.items():
            qs = seq - p0
            blocks = {}
            for j in {j for j, _ in items}:
                b = torch.zeros(qs, seq, dtype=torch.bool, device=device)
                src = [s for s in pairs[j][0] if 0 <= s < seq]
                tgt = [t - p0 for t in pairs[j][1] if p0 <= t < seq]
                if src and tgt:
                    b[
                        torch.tensor(tgt, device=device)[:, None], torch.tensor(src, device=device)[None, :]
                    ] = True
                blocks[j] = b
            blocks[-1] = torch.zeros(qs, seq, dtype=torch.bool, device=device)
            spans = [(j, windows[w][1], windows[w][2]) for j, w in items] + [(-1, 0, -1)]
            order = sorted(range(len(spans)), key=lambda i: spans[i][1])
            per = max(1, max_rows // qs)
            for c in range(0, len(order), per):
                chunk = [spans[i] for i in order[c : c + per]]
                logits = _rerun(layers, recs, masks, blocks, chunk, p0, seq, neg, norm, head)
                probs = logits.softmax(-1)
                for (j, _, _), i, pr in zip(chunk, order[c : c + per], probs):
                    if j < 0:
                        check_err = max(check_err, float((pr - base).abs().max()))
                    else:
                        ps[j, items[i][1]] = float(pr[ans])
    tol = 1e-4
    if not check_err <= tol:
        raise _NotReproduced(
            f"rerunning the layers changes the unblocked output by {check_err:.1e} (> {tol:g})"
        )
    tables = []
    for j in range(len(pairs)):
        t = _rows(windows, ans, p_base, ps[j].tolist())
        t.attrs["check_max_abs_prob_err"] = check_err
        tables.append(t)
    return tables


def _rerun(layers, recs, masks, blocks, chunk, p0, seq, neg, norm, head) -> torch.Tensor:
    """Run the chunk's items - ``(pair, start, end)``: edges blocked in layers ``start..end`` -
    from layer ``start`` (the recorded input there) to the last layer, on positions ``p0:``;
    return the last position's logits, one row per item.

    The items are packed into one sequence (batch of one): each item's copy of positions
    ``p0:`` after the others, every copy attending to the recorded keys and values of positions
    ``< p0`` (shared, not copied) and causally to its own copy only (the mask hides the other
    items' copies), with its own rotary positions."""
    qs = seq - p0
    starts = [s for _, s, _ in chunk]  # sorted
    blk = torch.stack([blocks[j] for j, _, _ in chunk])  # [n, qs, seq]
    h = None
    for layer in range(starts[0], len(layers)):
        r = recs[layer]
        n = sum(s <= layer for s in starts)  # active items: the chunk is sorted by start
        n_old = 0 if h is None else h.shape[1] // qs
        fresh = r["h"][:, p0:].repeat(1, n - n_old, 1)
        h = fresh if h is None else torch.cat([h, fresh], 1)  # [1, n * qs, hidden]
        on = torch.tensor([s <= layer <= e for _, s, e in chunk[:n]], device=blk.device)
        rows = masks[layer][0, 0, p0:].expand(n, qs, seq).masked_fill(blk[:n] & on[:, None, None], neg)
        m = torch.full((n, qs, n, qs), neg, dtype=rows.dtype, device=rows.device)
        idx = torch.arange(n, device=rows.device)
        m[idx, :, idx, :] = rows[:, :, p0:]  # each item's own copy, causally
        m = torch.cat([rows[:, :, :p0].reshape(n * qs, p0), m.reshape(n * qs, n * qs)], 1)[None, None]
        kw = _pack_kwargs(r["kwargs"], p0, seq, n)
        k, v = r["kv"].kv
        kw[r["cache_name"]] = _PrefixKV(k[:, :, :p0], v[:, :, :p0])
        kw["attention_mask"] = m
        try:
            o = layers[layer](h, **kw) if r["positional"] else layers[layer](hidden_states=h, **kw)
        except (TypeError, AttributeError, RuntimeError) as err:
            raise _NotReproduced(f"decoder layer {layer} cannot be rerun on its own ({err})") from err
        h = o[0] if isinstance(o, (tuple, list)) else o
    last = h[0].reshape(len(chunk), qs, -1)[:, -1]  # every item's last position
    return head(norm(last)).float()


def decode_isolated(
    run_model,
    lm: CausalLMAdapter,
    positions: Sequence[int],
    seq_len: int,
    tokenizer=None,
    top_k: int = 5,
) -> pd.DataFrame:
    """Word-distribution decoding (logit lens of an isolated token): for each position, block its
    attention to every other token in every LLM layer, and decode its final hidden state through
    the LM head. Returns ``position, rank, token_id, token, prob``.

    ``run_model`` must return an output with ``.logits`` for every position.
    """
    rows = []
    for p in positions:
        if not 0 <= p < seq_len:
            raise SinkscopeError(f"position {p} is outside the sequence of {seq_len} tokens")
        others = [i for i in range(seq_len) if i != p]
        with blocked_edges(lm, range(lm.n_layers), others, [p]), torch.no_grad():
            probs = run_model().logits[0, p].float().softmax(-1)
        top = probs.topk(top_k)
        for r, (tid, pr) in enumerate(zip(top.indices.tolist(), top.values.tolist())):
            word = tokenizer.convert_ids_to_tokens(tid) if tokenizer is not None else None
            word = word if word is not None else f"<id {tid}>"  # ids the tokenizer has no word for
            rows.append({"position": int(p), "rank": r + 1, "token_id": tid, "token": word, "prob": pr})
    return pd.DataFrame(rows)
