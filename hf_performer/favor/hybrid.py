"""Hybrid FAVOR+: exact softmax attention inside a local window and to the first tokens ("sinks"),
FAVOR+ random features for every other key, with one normaliser (issue 13; LoLCATs arXiv 2410.10254,
Based arXiv 2402.18668, StreamingLLM's sinks arXiv 2309.17453).

Torch only.  Query ``i`` attends exactly (weights ``exp(s·q_i·k_j)``) to the keys with ``i − W < j ≤ i``
(causal) or ``|i − j| < W`` (bidirectional) and to the first ``S`` real (unpadded) tokens; every other
key it may see contributes ``φ(q_i)ᵀφ(k_j)``, the FAVOR+ estimate of the same weight.  Both kinds of
weight add into one denominator, so the result is one attention distribution: with ``W ≥ L`` it is
exact softmax attention, and ``W = S = 0`` is pure FAVOR+ (:func:`favor_attention` does not come here).

Computation, in blocks of ``W`` tokens (``n = L / W`` blocks, all at once): query block ``b`` meets its
neighbouring key blocks (``b − 1, b`` causal; ``b − 1, b, b + 1`` bidirectional) pair by pair, each
pair weighted exactly or by features as its distance says; the keys of every other block reach it
through FAVOR+ summaries (a prefix scan causally, prefix + suffix sums bidirectionally); sinks beyond
the neighbouring blocks are gathered once (``S`` keys).  Cost O(L·(W + S + m)·d) time, O(L·(W + m))
memory.  The exact part is kept relative to its largest logit, the FAVOR+ part relative to its own
stabiliser (``T − ‖s·q‖²/2 − log m``, see below); each query adds both after rescaling them to the
larger reference, so neither overflows and neither is lost.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from hf_performer.favor.attention import _DecayedScan, _divide, _inputs, _Inputs, _ungroup, _with_ones
from hf_performer.favor.features import NEG_LOG_WEIGHT, key_log_features


def _flat_blocks(tensor: torch.Tensor, window: int) -> torch.Tensor:
    """``[B, Hk, n·W, X]`` → ``[B·Hk·n + 2, W, X]``: the blocks of every head one after another, with a
    zero block before the first and after the last, so that the block ``b ± 1`` of every block is a view
    (:func:`_neighbour`) rather than a copy.  At a head's ends that view holds the next head's block
    (or the zero block): the masks, which know each head's ends, drop those pairs."""
    return F.pad(tensor.reshape(-1, window, tensor.shape[-1]), (0, 0, 0, 0, 1, 1))


def _neighbour(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """Of :func:`_flat_blocks`' ``[R + 2, W, X]``: ``[R, W, X]``, block ``b + offset`` at index ``b``."""
    return blocks[1 + offset : blocks.shape[0] - 1 + offset]


def _neighbour_masks(keep, sink, n: int, window: int, offset: int, causal: bool):
    """Which pairs of query block ``b`` and key block ``b + offset`` are weighted exactly, and which carry a
    feature product (``φ(q)ᵀφ(k)``) of their own: ``[B, 1, n, 1, W, W]`` bool each (query, then key).

    Exact: real keys the query sees within the window, and sinks.  Feature products: causal, the pairs of
    block ``b − 1`` beyond the window (older keys come through the state); bidirectional, the pairs within
    the window, whose feature products are subtracted from the FAVOR+ summary of all keys (beyond the
    window every pair is FAVOR+, inside it none is).  Keys outside the sequence are never real."""
    w = window
    distance = torch.arange(w, device=keep.device)[:, None] - torch.arange(w, device=keep.device) - offset * w  # i − j
    seen = (distance >= 0) if causal else torch.ones_like(distance, dtype=torch.bool)
    band = distance.abs() < w
    shifted = [F.pad(t.view(t.shape[0], n, w), (0, 0, 1, 1))[:, 1 + offset : 1 + offset + n, None, :] for t in (keep, sink)]
    real = shifted[0] & seen  # [B, n, W, W]
    exact = real & (band | shifted[1])
    paired = real & (~band if causal else band)
    return exact[:, None, :, None], paired[:, None, :, None]


def hybrid_favor(x: _Inputs, *, causal: bool, window: int, sinks: int) -> torch.Tensor:
    """Hybrid attention of the validated inputs ``x`` (``query [B, Hk, G, L, D]``, keys and values
    ``[B, Hk, L, ·]``, the same ``L``) → ``[B, Hk, G, L, Dv]`` in float32.  ``window ≥ 1``.

    Blocks of all heads lie one after another (``R = B·Hk·n`` of them); the ``G`` query heads of a key
    head share its key blocks (``[R, G·W, ·]`` queries)."""
    query, key, value, projection, keep, scale, _ = x
    b, key_heads, group, length, d = query.shape
    dv, m, w = value.shape[-1], projection.shape[0], window
    n = math.ceil(length / w)
    pad = n * w - length
    if keep is None:
        keep = torch.ones(b, 1, length, dtype=torch.bool, device=key.device)
    if pad:
        query, key, value = F.pad(query, (0, 0, 0, pad)), F.pad(key, (0, 0, 0, pad)), F.pad(value, (0, 0, 0, pad))
        keep = F.pad(keep, (0, pad), value=False)
    sink = keep & (keep.cumsum(-1) <= sinks)  # [B, 1, L']: the first S real tokens
    far_keep = keep & ~sink
    rows, heads = b * key_heads * n, b * key_heads

    # FAVOR+ key features relative to a per-feature reference every query of the block may use:
    # causal, the keys of blocks ≤ b − 1 (block b's own keys are all inside the window); bidirectional, all keys
    key_blocks = _flat_blocks(key * scale, w)  # [R + 2, W, D]
    keep_blocks = _flat_blocks(far_keep.expand(b, key_heads, -1)[..., None], w)[..., 0]  # [R + 2, W]
    log_feat = key_log_features(key_blocks, projection, keep_blocks)  # [R + 2, W, m]
    block_max = log_feat[1:-1].detach().amax(-2).view(heads, n, m)
    if causal:
        after = torch.cummax(block_max, 1).values  # reference of the keys of blocks ≤ c
        key_ref = after
        reference = torch.cat([torch.full_like(after[:, :1], NEG_LOG_WEIGHT), after[:, :-1]], 1)  # blocks ≤ b − 1
    else:
        reference = block_max.amax(1, keepdim=True).expand_as(block_max)
        key_ref = reference
    key_ref = F.pad(key_ref.reshape(rows, 1, m), (0, 0, 0, 0, 1, 1))
    k_feat = (log_feat - key_ref).exp_() * keep_blocks[..., None]  # [R + 2, W, m]
    values = _flat_blocks(_with_ones(value), w)  # [R + 2, W, Dv + 1]

    # query side: features relative to the same reference, then their own maximum T
    q_rows = query.view(b, key_heads, group, n, w, d).transpose(2, 3).reshape(rows, group * w, d) * scale
    q_logits = (q_rows @ projection.transpose(0, 1)).add_(reference.reshape(rows, 1, m))
    top = q_logits.detach().amax(-1, keepdim=True)
    q_feat = q_logits.sub_(top).exp_()  # [R, G·W, m]
    # φ(q)ᵀφ(k) = q_feat·k_feat · exp(favor_ref): ‖s·q‖²/2 and m no longer cancel against the exact part
    favor_ref = top - q_rows.pow(2).sum(-1, keepdim=True) / 2 - math.log(m)

    if causal:  # keys of blocks ≤ b − 2, relative to the reference of blocks ≤ b − 1
        summaries = (k_feat[1:-1].transpose(-1, -2) @ values[1:-1]).view(heads, n, m, dv + 1)
        decay = torch.exp(reference - after)[..., None]
        states = _DecayedScan.apply(torch.zeros_like(summaries[None, :, 0]), summaries[None], decay[None])[0]
        lag = torch.cat([torch.full_like(reference[:, :1], NEG_LOG_WEIGHT), reference[:, :-1]], 1)
        far = torch.cat([states[:, :1], states[:, : n - 1]], 1) * torch.exp(lag - reference)[..., None]
        favor_num = q_feat @ far.view(rows, m, dv + 1)
    else:  # all keys; the pairs inside the window are subtracted below, pair by pair
        total = k_feat[1:-1].view(heads, n * w, m).transpose(-1, -2) @ values[1:-1].view(heads, n * w, dv + 1)
        favor_num = (q_feat.view(heads, n * group * w, m) @ total).view(rows, group * w, dv + 1)

    # neighbouring blocks, pair by pair: block b + o for query block b (block b itself lies inside the window)
    parts = []
    for offset in (-1, 0) if causal else (-1, 0, 1):
        exact, paired = _neighbour_masks(keep, sink, n, w, offset, causal)
        logits = q_rows @ _neighbour(key_blocks, offset).transpose(-1, -2)  # [R, G·W, W]
        logits.view(b, key_heads, n, group, w, w).masked_fill_(~exact, float("-inf"))
        pairs = None
        if offset or not causal:
            pairs = q_feat @ _neighbour(k_feat, offset).transpose(-1, -2)
            pairs.view(b, key_heads, n, group, w, w).mul_(paired)
        parts.append((logits, pairs, _neighbour(values, offset)))

    if sinks:  # sinks beyond the neighbouring blocks, gathered once: [B, 1, S] positions
        sinks = min(sinks, n * w)
        order = torch.sort((~sink).to(torch.int8), dim=-1, stable=True).indices[..., :sinks]  # sink positions first
        sink_key = key.gather(2, order[..., None].expand(b, key_heads, sinks, d)) * scale  # [B, Hk, S, D]
        block_start = (torch.arange(n, device=key.device) * w)[:, None]  # [n, 1]
        outside = order[:, :, None, :] < block_start - w  # [B, 1, n, S]
        if not causal:
            outside = outside | (order[:, :, None, :] >= block_start + 2 * w)
        sink_visible = (sink.gather(-1, order)[:, :, None, :] & outside)[:, :, :, None, None, :]  # [B, 1, n, 1, 1, S]
        logits = q_rows.view(heads, n * group * w, d) @ sink_key.view(heads, sinks, d).transpose(-1, -2)
        logits.view(b, key_heads, n, group, w, sinks).masked_fill_(~sink_visible, float("-inf"))
        sink_values = _with_ones(value).gather(2, order[..., None].expand(b, key_heads, sinks, dv + 1))
        parts.append((logits.view(rows, group * w, sinks), None, sink_values.view(heads, sinks, dv + 1)))

    exact_ref = torch.stack([logits.detach().amax(-1, keepdim=True) for logits, _, _ in parts]).amax(0)
    reference_all = torch.maximum(exact_ref.clamp_min(NEG_LOG_WEIGHT), favor_ref.detach())
    favor_scale = torch.exp(favor_ref - reference_all)  # [R, G·W, 1]
    numerator = favor_num * favor_scale
    for logits, pairs, part_values in parts:
        weights = logits.sub_(reference_all).exp_()
        if pairs is not None:  # causal: FAVOR+ pairs beyond the window; bidirectional: minus those inside it
            weights = torch.addcmul(weights, pairs, favor_scale, value=1 if causal else -1)
        if part_values.shape[0] == rows:
            numerator = numerator + weights @ part_values
        else:  # sinks: one set of keys for all blocks of a head
            numerator = numerator + (weights.view(heads, n * group * w, -1) @ part_values).view(rows, group * w, dv + 1)
    out = _divide(numerator[..., :dv], numerator[..., dv])  # [R, G·W, Dv]
    return out.view(b, key_heads, n, group, w, dv).transpose(2, 3).reshape(b, key_heads, group, n * w, dv)[..., :length, :]


def hybrid_favor_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    projection: torch.Tensor,
    *,
    local_window: int,
    sink_tokens: int = 0,
    scaling: float | None = None,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Hybrid FAVOR+ self-attention: ``query [B, H, L, D]``, ``key [B, Hk, L, D]``, ``value [B, Hk, L, Dv]``
    → ``[B, H, L, Dv]`` (see the module docstring); ``key_padding_mask [B, L]``, ``True`` for real tokens.

    ``local_window ≥ 1`` (``W``; the current token counts, so ``W = 1`` is the token itself) and
    ``sink_tokens ≥ 0``.  Reference: :func:`~hf_performer.favor.naive.hybrid_attention`.
    """
    if isinstance(local_window, bool) or not isinstance(local_window, int) or local_window < 1:
        raise ValueError(f"local_window must be an integer ≥ 1 for hybrid attention, got {local_window!r}")
    if isinstance(sink_tokens, bool) or not isinstance(sink_tokens, int) or sink_tokens < 0:
        raise ValueError(f"sink_tokens must be an integer ≥ 0, got {sink_tokens!r}")
    if query.shape[-2] != key.shape[-2]:
        raise ValueError(
            f"hybrid attention (local_window={local_window}) needs as many queries as keys (self-attention), got "
            f"{query.shape[-2]} queries and {key.shape[-2]} keys"
        )
    x = _inputs(query, key, value, projection, scaling, key_padding_mask)
    return _ungroup(hybrid_favor(x, causal=causal, window=local_window, sinks=sink_tokens), x.dtype)
