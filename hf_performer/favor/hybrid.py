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
from typing import NamedTuple

import torch
import torch.nn.functional as F

from hf_performer.favor.attention import (
    FavorState,
    _DecayedScan,
    _divide,
    _inputs,
    _Inputs,
    _ungroup,
    _with_ones,
    fold_keys,
)
from hf_performer.favor.features import NEG_LOG_WEIGHT, key_features, key_log_features


def _blocks(tensor: torch.Tensor, n: int, window: int, dim: int) -> torch.Tensor:
    """``[..., n·W, ...]`` along ``dim`` → ``[..., n, W, ...]``."""
    return tensor.unflatten(dim, (n, window))


def _shifted(blocks: torch.Tensor, offset: int, dim: int) -> torch.Tensor:
    """``blocks`` (blocks along ``dim``) with block ``b + offset`` at index ``b``, zeros beyond the ends."""
    if offset == 0:
        return blocks
    n = blocks.shape[dim]
    zeros = blocks.new_zeros(*blocks.shape[:dim], abs(offset), *blocks.shape[dim + 1 :])
    if offset < 0:
        return torch.cat([zeros, blocks.narrow(dim, 0, n + offset)], dim)
    return torch.cat([blocks.narrow(dim, offset, n - offset), zeros], dim)


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
    sink = keep & (keep.cumsum(-1) <= sinks)  # [B, 1, L']: the first S real tokens
    far_keep = keep & ~sink

    # FAVOR+ key features relative to a per-feature reference every query of the block may use:
    # causal, the keys of blocks ≤ b − 1 (block b's own keys are all inside the window); bidirectional, all keys
    log_feat = _blocks(key_log_features(key, projection, far_keep, input_scale=scale), n, w, 2)  # [B, Hk, n, W, m]
    block_max = log_feat.detach().amax(-2)  # [B, Hk, n, m]
    if causal:
        after = torch.cummax(block_max, 2).values  # reference of the keys of blocks ≤ c
        k_feat = (log_feat - after[:, :, :, None]).exp_()
        reference = torch.cat([torch.full_like(after[:, :, :1], NEG_LOG_WEIGHT), after[:, :, :-1]], 2)  # blocks ≤ b − 1
    else:
        reference = block_max.amax(2, keepdim=True).expand_as(block_max)
        k_feat = (log_feat - reference[:, :, :, None]).exp_()
    k_feat = k_feat * _blocks(far_keep, n, w, 2)[..., None]
    values = _blocks(_with_ones(value), n, w, 2)  # [B, Hk, n, W, Dv + 1]
    summaries = k_feat.transpose(-1, -2) @ values  # [B, Hk, n, m, Dv + 1]
    if causal:  # keys of blocks ≤ b − 2, relative to the reference of blocks ≤ b − 1
        decay = torch.exp(reference - after)[..., None]
        states = _DecayedScan.apply(torch.zeros_like(summaries[:, :, 0]), summaries, decay)  # Σ blocks < c
        lag = torch.cat([torch.full_like(reference[:, :, :1], NEG_LOG_WEIGHT), reference[:, :, :-1]], 2)
        far = torch.cat([states[:, :, :1], states[:, :, : n - 1]], 2) * torch.exp(lag - reference)[..., None]
    else:  # every block but b − 1, b, b + 1; rounding of the difference stays ~1e-7 of the row's FAVOR+ mass
        near = summaries + _shifted(summaries, -1, 2) + _shifted(summaries, 1, 2)
        far = summaries.sum(2, keepdim=True) - near

    # query side: features relative to the same reference, then their own maximum T
    q_blocks = _blocks(query, n, w, 3)  # [B, Hk, G, n, W, D]
    q_logits = q_blocks @ (projection * scale).transpose(0, 1) + reference[:, :, None, :, None, :]
    top = q_logits.detach().amax(-1, keepdim=True)
    q_feat = q_logits.sub_(top).exp_()
    # φ(q)ᵀφ(k) = q_feat·k_feat · exp(favor_ref): ‖s·q‖²/2 and m no longer cancel against the exact part
    favor_ref = top - (scale**2 / 2) * q_blocks.pow(2).sum(-1, keepdim=True) - math.log(m)
    q_scaled = q_blocks * scale
    favor_num = q_feat @ far[:, :, None]
    exact_logits, exact_values = [], []

    # neighbouring blocks, pair by pair: block b + o for query block b; block b itself lies inside the window
    inside = torch.arange(w, device=key.device)[:, None] - torch.arange(w, device=key.device)  # x − y, [W, W]
    keep_blocks, sink_blocks = _blocks(keep, n, w, 2), _blocks(sink, n, w, 2)  # [B, 1, n, W]
    for offset in (-1, 0) if causal else (-1, 0, 1):
        distance = inside - offset * w  # i − j
        seen = (distance >= 0) if causal else torch.ones_like(distance, dtype=torch.bool)
        real = _shifted(keep_blocks, offset, 2)[:, :, :, None, :] & seen  # [B, 1, n, W, W]
        exact = real & ((distance.abs() < w) | _shifted(sink_blocks, offset, 2)[:, :, :, None, :])
        shifted_values = _shifted(values, offset, 2)[:, :, None]
        logits = q_scaled @ _shifted(key.unflatten(2, (n, w)) * scale, offset, 2).transpose(-1, -2)[:, :, None]
        exact_logits.append(logits.masked_fill_(~exact[:, :, None], float("-inf")))
        exact_values.append(shifted_values)
        if offset:  # pairs of the window's neighbours that lie beyond it
            pair_feat = q_feat @ _shifted(k_feat, offset, 2).transpose(-1, -2)[:, :, None]
            favor_num = favor_num + pair_feat.mul_((real & ~exact)[:, :, None]) @ shifted_values

    if sinks:  # sinks beyond the neighbouring blocks, gathered once: [B, 1, S] positions
        sinks = min(sinks, n * w)
        order = torch.sort((~sink).to(torch.int8), dim=-1, stable=True).indices[..., :sinks]  # sink positions first
        sink_key = key.gather(2, order[..., None].expand(b, key_heads, sinks, key.shape[-1])) * scale
        block_start = (torch.arange(n, device=key.device) * w)[:, None]  # [n, 1]
        outside = order[:, :, None, :] < block_start - w  # [B, 1, n, S]
        if not causal:
            outside = outside | (order[:, :, None, :] >= block_start + 2 * w)
        sink_visible = (sink.gather(-1, order)[:, :, None, :] & outside)[:, :, None, :, None, :]
        logits = q_scaled @ sink_key[:, :, None, None].transpose(-1, -2)
        exact_logits.append(logits.masked_fill_(~sink_visible, float("-inf")))
        exact_values.append(_with_ones(value).gather(2, order[..., None].expand(b, key_heads, sinks, dv + 1))[:, :, None, None])

    exact_ref = torch.stack([z.detach().amax(-1, keepdim=True) for z in exact_logits]).amax(0)
    reference_all = torch.maximum(exact_ref.clamp_min(NEG_LOG_WEIGHT), favor_ref.detach())
    numerator = favor_num * torch.exp(favor_ref - reference_all)
    for logits, part_values in zip(exact_logits, exact_values):
        numerator = numerator + logits.sub_(reference_all).exp_() @ part_values
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


class HybridState(NamedTuple):
    """What causal hybrid FAVOR+ keeps between decoding steps, per key head; its size does not depend on
    the number of tokens seen (``W`` the window, ``S`` the sinks, ``m`` the features).

    - ``far``: the :class:`FavorState` of the real tokens that have left the window and are not sinks;
    - ``sink_key [B, Hk, S, D]``, ``sink_value [B, Hk, S, Dv]``: the first ``S`` real tokens, in order
      (slot ``n`` holds a token once ``real_seen > n``);
    - ``window_key [B, Hk, W − 1, D]``, ``window_value [B, Hk, W − 1, Dv]``: the last ``W − 1`` positions,
      oldest first (the next token completes the window);
    - ``window_keep [B, W − 1]``: which of them are real tokens that are not sinks (padding, sinks kept
      above and positions before the first token are never attended through the window);
    - ``real_seen [B]``: how many real (unpadded) tokens came so far, which tells the next sinks.

    Every tensor is batch-first, so beam search reorders and selects rows of all of them alike.
    """

    far: FavorState
    sink_key: torch.Tensor
    sink_value: torch.Tensor
    window_key: torch.Tensor
    window_value: torch.Tensor
    window_keep: torch.Tensor
    real_seen: torch.Tensor

    @classmethod
    def empty(cls, key: torch.Tensor, value: torch.Tensor, nb_features: int, *, window: int, sinks: int) -> HybridState:
        """No token seen yet, for keys and values shaped like ``key [B, Hk, ·, D]``, ``value [B, Hk, ·, Dv]``."""
        (b, key_heads, _, d), dv = key.shape, value.shape[-1]
        zeros = dict(device=key.device, dtype=torch.float32)
        return cls(
            FavorState.empty(b, key_heads, nb_features, dv, key.device),
            torch.zeros(b, key_heads, sinks, d, **zeros),
            torch.zeros(b, key_heads, sinks, dv, **zeros),
            torch.zeros(b, key_heads, window - 1, d, **zeros),
            torch.zeros(b, key_heads, window - 1, dv, **zeros),
            torch.zeros(b, window - 1, dtype=torch.bool, device=key.device),
            torch.zeros(b, dtype=torch.long, device=key.device),
        )

    def map(self, function) -> HybridState:
        """The same state with ``function`` applied to every tensor (all batch-first): beam search's reorders."""
        return HybridState(FavorState(*map(function, self.far)), *map(function, self[1:]))

    @property
    def nbytes(self) -> int:
        return sum(tensor.nbytes for tensor in (*self.far, *self[1:]))


def _advance(state: HybridState, key: torch.Tensor, value: torch.Tensor, keep: torch.Tensor, projection, scale) -> HybridState:
    """``state`` after the tokens ``key [B, Hk, L, D]``, ``value [B, Hk, L, Dv]`` (``keep [B, L]``: real ones).

    The first ``S`` real tokens go to the sinks; the last ``W − 1`` positions become the window; the
    tokens pushed out of the window (real, not sinks) fold into the FAVOR+ state, as one block, which
    equals folding them one by one up to float rounding."""
    sinks, kept = state.sink_key.shape[2], state.window_key.shape[2]
    rank = state.real_seen[:, None] + keep.cumsum(-1)  # 1-based rank of each real token
    is_sink = keep & (rank <= sinks)
    slot = torch.where(is_sink, rank - 1, sinks)[:, None, :, None]  # slot S collects everything else, then goes
    sink_key, sink_value = (
        torch.cat([old, old.new_zeros(*old.shape[:2], 1, old.shape[-1])], 2)
        .scatter(2, slot.expand(*new.shape[:3], old.shape[-1]), new)[:, :, :sinks]
        for old, new in ((state.sink_key, key), (state.sink_value, value))
    )
    keys, values = torch.cat([state.window_key, key], 2), torch.cat([state.window_value, value], 2)
    far_keep = torch.cat([state.window_keep, keep & ~is_sink], 1)
    leaving = keys.shape[2] - kept
    far = state.far
    if leaving:
        far = fold_keys(
            far,
            *key_features(keys[:, :, :leaving], projection, keep=far_keep[:, None, :leaving], input_scale=scale),
            values[:, :, :leaving],
        )
    return HybridState(
        far, sink_key, sink_value, keys[:, :, leaving:], values[:, :, leaving:], far_keep[:, leaving:],
        state.real_seen + keep.sum(-1),
    )


def _hybrid_step(x: _Inputs, state: HybridState, keep: torch.Tensor) -> torch.Tensor:
    """Hybrid attention of ``L ≤ W`` new tokens (queries ``[B, Hk, G, L, D]`` = keys) after ``state``
    → ``[B, Hk, G, L, Dv]`` float32.

    Exact weights for the sinks seen before, the window (the ``W − 1`` kept positions and the new
    tokens up to the query) and FAVOR+ for the far state; with ``L > 1`` the kept positions that are
    beyond a later query's window meet it through their features (pair by pair: at most ``L − 1``).
    One normaliser, each part relative to its own reference as in :func:`hybrid_favor`."""
    query, key, value, projection, _, scale, _ = x
    length, m, kept = query.shape[-2], projection.shape[0], state.window_key.shape[2]
    q_scaled = query * scale
    # exact part: [sinks seen before, kept window, new tokens]; query i sits at position kept + i
    keys = torch.cat([state.sink_key, state.window_key, key], 2) * scale
    values = _with_ones(torch.cat([state.sink_value, state.window_value, value], 2))
    sinks = state.sink_key.shape[2]
    sink_seen = (torch.arange(sinks, device=key.device) < state.real_seen[:, None])[:, None, :].expand(-1, length, -1)
    position = torch.arange(kept + length, device=key.device)
    distance = (kept + torch.arange(length, device=key.device))[:, None] - position  # [L, W − 1 + L]
    window_real = torch.cat([state.window_keep, keep], 1)[:, None, :]  # new sinks count: they are in the window
    in_window = window_real & (distance >= 0) & (distance < kept + 1)  # [B, L, W − 1 + L]
    exact = torch.cat([sink_seen, in_window], -1)[:, None, None]  # [B, 1, 1, L, S + W − 1 + L]
    logits = (q_scaled @ keys.transpose(-1, -2)[:, :, None]).masked_fill_(~exact, float("-inf"))

    # FAVOR+ part: the far state and, for L > 1, kept positions a later query has left behind
    reference = state.far.log_scale  # [B, Hk, m]
    if length > 1:
        pair_keep = state.window_keep[:, None, : length - 1]
        beyond = pair_keep & (distance[:, : length - 1] >= kept + 1)  # [B, L, L − 1]
        pair_log = key_log_features(state.window_key[:, :, : length - 1], projection, pair_keep, input_scale=scale)
        reference = torch.maximum(reference, pair_log.detach().amax(-2))
    q_logits = q_scaled @ projection.transpose(0, 1) + reference[:, :, None, None]
    top = q_logits.detach().amax(-1, keepdim=True)
    q_feat = (q_logits - top).exp()
    # φ(q)ᵀφ(k) = q_feat·k_feat · exp(favor_ref) with the features relative to `reference` and m^-½ each
    favor_ref = top - q_scaled.pow(2).sum(-1, keepdim=True) / 2 - math.log(m)
    far = torch.cat([state.far.kv, state.far.k_sum[..., None]], -1) * torch.exp(
        state.far.log_scale - reference + 0.5 * math.log(m)
    )[..., None]
    favor_num = q_feat @ far[:, :, None]
    if length > 1:
        pair_feat = (pair_log - reference[:, :, None]).exp()
        weights = (q_feat @ pair_feat.transpose(-1, -2)[:, :, None]) * beyond[:, None, None]
        favor_num = favor_num + weights @ _with_ones(state.window_value[:, :, : length - 1])[:, :, None]

    exact_ref = logits.detach().amax(-1, keepdim=True).clamp_min(NEG_LOG_WEIGHT)
    reference_all = torch.maximum(exact_ref, favor_ref.detach())
    numerator = favor_num * torch.exp(favor_ref - reference_all) + (logits - reference_all).exp() @ values[:, :, None]
    return _divide(numerator[..., :-1], numerator[..., -1])


def recurrent_hybrid_favor(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    projection: torch.Tensor,
    initial_state: HybridState | None = None,
    *,
    local_window: int,
    sink_tokens: int = 0,
    scaling: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, HybridState]:
    """Causal hybrid FAVOR+ that continues from ``initial_state`` (decoding): ``query [B, H, L, D]`` are
    the positions of the new ``key [B, Hk, L, D]``, ``value [B, Hk, L, Dv]`` (``key_padding_mask [B, L]``,
    ``True`` for real tokens) → ``(output [B, H, L, Dv], state after them)``.

    Without a state (a prefill) the outputs are :func:`hybrid_favor_attention`'s; after one, the tokens
    go through in pieces of ``W``, each O(L·(W + S + m)·d): one decoding step costs the same whatever
    the context.  Any split of a sequence into calls gives the same outputs and state (up to float
    rounding).  Reference: :func:`~hf_performer.favor.naive.hybrid_attention` (causal)."""
    if isinstance(local_window, bool) or not isinstance(local_window, int) or local_window < 1:
        raise ValueError(f"local_window must be an integer ≥ 1 for hybrid attention, got {local_window!r}")
    if query.shape[-2] != key.shape[-2]:
        raise ValueError(
            f"recurrent hybrid attention takes the queries of the new keys, got {query.shape[-2]} queries and "
            f"{key.shape[-2]} keys"
        )
    x = _inputs(query, key, value, projection, scaling, key_padding_mask)
    keep = torch.ones_like(x.key[:, 0, :, 0], dtype=torch.bool) if x.keep is None else x.keep[:, 0]
    if initial_state is None:
        out = hybrid_favor_attention(
            query, key, value, projection, local_window=local_window, sink_tokens=sink_tokens, scaling=scaling,
            causal=True, key_padding_mask=key_padding_mask,
        )
        empty = HybridState.empty(x.key, x.value, projection.shape[0], window=local_window, sinks=sink_tokens)
        return out, _advance(empty, x.key, x.value, keep, x.projection, x.input_scale)
    state, outputs = initial_state, []
    for start in range(0, key.shape[-2], local_window):
        piece = slice(start, start + local_window)
        part = _Inputs(x.query[..., piece, :], x.key[:, :, piece], x.value[:, :, piece], *x[3:])
        outputs.append(_hybrid_step(part, state, keep[:, piece]))
        state = _advance(state, part.key, part.value, keep[:, piece], x.projection, x.input_scale)
    return _ungroup(torch.cat(outputs, -2), x.dtype), state
