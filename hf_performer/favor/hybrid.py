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


def _blocks(tensor: torch.Tensor, n: int, window: int, dim: int) -> torch.Tensor:
    """``[..., n·W, ...]`` along ``dim`` → ``[..., n, W, ...]``."""
    return tensor.unflatten(dim, (n, window))


def _neighbours(blocks: torch.Tensor, offsets: tuple[int, ...], dim: int) -> torch.Tensor:
    """For each block ``b`` (along ``dim``, tokens along ``dim + 1``), the tokens of blocks ``b + o``
    for ``o`` in ``offsets``, side by side: ``[..., n, W, ...] → [..., n, len(offsets)·W, ...]``
    (zeros beyond the ends)."""
    pad = [0, 0] * (blocks.dim() - dim - 1) + [1, 1]
    padded = F.pad(blocks, pad)
    n = blocks.shape[dim]
    return torch.cat([padded.narrow(dim, 1 + o, n) for o in offsets], dim + 1)


def hybrid_favor(x: _Inputs, *, causal: bool, window: int, sinks: int) -> torch.Tensor:
    """Hybrid attention of the validated inputs ``x`` (``query [B, Hk, G, L, D]``, keys and values
    ``[B, Hk, L, ·]``, the same ``L``) → ``[B, Hk, G, L, Dv]`` in float32.  ``window ≥ 1``."""
    query, key, value, projection, keep, scale, _ = x
    b, key_heads, group, length, _ = query.shape
    dv, m, w = value.shape[-1], projection.shape[0], window
    n = math.ceil(length / w)
    pad = n * w - length
    if keep is None:
        keep = torch.ones(b, 1, length, dtype=torch.bool, device=key.device)
    if pad:
        query, key, value = F.pad(query, (0, 0, 0, pad)), F.pad(key, (0, 0, 0, pad)), F.pad(value, (0, 0, 0, pad))
        keep = F.pad(keep, (0, pad), value=False)
    position = torch.arange(n * w, device=key.device)
    sink = keep & (keep.cumsum(-1) <= sinks)  # [B, 1, L']: the first S real tokens
    far_keep = keep & ~sink

    # FAVOR+ key features relative to a per-feature reference every query of the block may use:
    # causal, the keys of blocks ≤ b − 1 (block b's own keys are all inside the window); bidirectional, all keys
    log_feat = _blocks(key_log_features(key, projection, far_keep, input_scale=scale), n, w, 2)  # [B, Hk, n, W, m]
    block_max = log_feat.detach().amax(-2)  # [B, Hk, n, m]
    if causal:
        after = torch.cummax(block_max, 2).values  # reference of the keys of blocks ≤ c
        k_feat = torch.exp(log_feat - after[:, :, :, None])
        reference = torch.cat([torch.full_like(after[:, :, :1], NEG_LOG_WEIGHT), after[:, :, :-1]], 2)  # blocks ≤ b − 1
    else:
        reference = block_max.amax(2, keepdim=True).expand_as(block_max)
        k_feat = torch.exp(log_feat - reference[:, :, :, None])
    k_feat = k_feat * _blocks(far_keep, n, w, 2)[..., None]
    values = _blocks(_with_ones(value), n, w, 2)  # [B, Hk, n, W, Dv + 1]
    summaries = k_feat.transpose(-1, -2) @ values  # [B, Hk, n, m, Dv + 1]
    zero = torch.zeros_like(summaries[:, :, :1])
    if causal:  # keys of blocks ≤ b − 2, relative to the reference of blocks ≤ b − 1
        decay = torch.exp(reference - after)[..., None]
        prefix = _DecayedScan.apply(zero[:, :, 0], summaries, decay)[:, :, 1:]  # blocks ≤ c, relative to after_c
        lag = torch.cat([torch.full_like(reference[:, :, :1], NEG_LOG_WEIGHT), reference[:, :, :-1]], 2)
        far = torch.cat([zero, zero, prefix], 2)[:, :, :n] * torch.exp(lag - reference)[..., None]
    else:  # blocks ≤ b − 2 and ≥ b + 2
        before = torch.cat([zero, zero, summaries.cumsum(2)], 2)[:, :, :n]
        after_sums = summaries.flip(2).cumsum(2).flip(2)
        far = before + torch.cat([after_sums[:, :, 2:], zero, zero], 2)[:, :, :n]

    # query side: features relative to the same reference, then their own maximum T
    q_blocks = _blocks(query, n, w, 3)  # [B, Hk, G, n, W, D]
    q_logits = q_blocks @ (projection * scale).transpose(0, 1) + reference[:, :, None, :, None, :]
    top = q_logits.detach().amax(-1, keepdim=True)
    q_feat = q_logits.sub_(top).exp_()
    # φ(q)ᵀφ(k) = q_feat·k_feat · exp(favor_ref): ‖s·q‖²/2 and m no longer cancel against the exact part
    favor_ref = top - (scale**2 / 2) * q_blocks.pow(2).sum(-1, keepdim=True) - math.log(m)

    # neighbouring blocks, pair by pair
    offsets = (-1, 0) if causal else (-1, 0, 1)
    near_feat = _neighbours(k_feat, offsets, 2)  # [B, Hk, n, O·W, m]
    near_key = _neighbours(_blocks(key, n, w, 2), offsets, 2) * scale
    near_values = _neighbours(values, offsets, 2)
    near_pos = _neighbours(_blocks(position, n, w, 0), offsets, 0)  # [n, O·W]
    near_keep = _neighbours(_blocks(keep, n, w, 2), offsets, 2)  # [B, 1, n, O·W]
    near_sink = _neighbours(_blocks(sink, n, w, 2), offsets, 2)
    q_pos = _blocks(position, n, w, 0)  # [n, W]
    distance = q_pos[:, :, None] - near_pos[:, None, :]  # i − j, [n, W, O·W]
    real = near_keep[:, :, :, None, :]  # [B, 1, n, 1, O·W]
    visible = real & ((distance >= 0) if causal else torch.ones_like(distance, dtype=torch.bool))
    exact = visible & ((distance.abs() < w) | near_sink[:, :, :, None, :])
    by_features = visible & ~exact
    q_scaled = q_blocks * scale
    logits = (q_scaled @ near_key.transpose(-1, -2)[:, :, None]).masked_fill(~exact[:, :, None], float("-inf"))
    pair_feat = (q_feat @ near_feat.transpose(-1, -2)[:, :, None]) * by_features[:, :, None]

    # sinks beyond the neighbouring blocks, gathered once: [B, 1, S] positions
    parts = [logits]
    if sinks:
        sinks = min(sinks, n * w)
        order = torch.sort((~sink).to(torch.int8), dim=-1, stable=True).indices[..., :sinks]  # sink positions first
        is_sink = sink.gather(-1, order)
        sink_key = key.gather(2, order[..., None].expand(b, key_heads, sinks, key.shape[-1])) * scale
        sink_values = _with_ones(value).gather(2, order[..., None].expand(b, key_heads, sinks, dv + 1))
        block_start = (torch.arange(n, device=key.device) * w)[:, None]  # [n, 1]
        outside = order[:, :, None, :] < block_start - w  # [B, 1, n, S]
        if not causal:
            outside = outside | (order[:, :, None, :] >= block_start + 2 * w)
        sink_visible = (is_sink[:, :, None, :] & outside)[:, :, :, None, :]  # [B, 1, n, 1, S]
        sink_logits = (q_scaled @ sink_key[:, :, None, None].transpose(-1, -2)).masked_fill(
            ~sink_visible[:, :, None], float("-inf")
        )
        parts.append(sink_logits)
    exact_ref = torch.cat(parts, -1).detach().amax(-1, keepdim=True).clamp_min(NEG_LOG_WEIGHT)
    reference_all = torch.maximum(exact_ref, favor_ref.detach())

    favor_scale = torch.exp(favor_ref - reference_all)
    numerator = (q_feat @ far[:, :, None] + pair_feat @ near_values[:, :, None]) * favor_scale
    numerator = numerator + torch.exp(logits - reference_all) @ near_values[:, :, None]
    if sinks:
        numerator = numerator + torch.exp(sink_logits - reference_all) @ sink_values[:, :, None, None]
    out = _divide(numerator[..., :dv], numerator[..., dv])  # [B, Hk, G, n, W, Dv]
    return out.flatten(3, 4)[..., :length, :]


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
