"""FAVOR+ attention: ``softmax(QKᵀ)V ≈ D⁻¹ φ(Q)(φ(K)ᵀV)`` in O(L·m·d) time (paper eq. 4–5).

Torch only.  Layout: ``query [B, H, Lq, D]``, ``key [B, Hk, Lk, D]``, ``value [B, Hk, Lk, Dv]``
with ``H`` a multiple of ``Hk`` (grouped-query attention shares a key head across ``H / Hk``
query heads).  All arithmetic runs in float32 whatever the input dtype; the output comes back in
the query's dtype.

Keys carry a log-weight ``c_s`` (see :func:`key_features`): ``φ(k_s) = exp(c_s) φ̃(k_s)``.  Sums over
keys are kept relative to a reference ``M ≥ c_s`` so nothing overflows; in causal mode ``M`` is the
running maximum over *past* keys, so outputs at position ``t`` depend on tokens ``≤ t`` only, bit
for bit.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from hf_performer.favor.features import NEG_LOG_WEIGHT, key_features, query_features


class FavorState(NamedTuple):
    """Causal FAVOR+ state after the keys seen so far (the paper's prefix sums, rescaled).

    ``S = Σ_s φ(k_s) v_sᵀ = exp(log_scale) · kv`` and ``z = Σ_s φ(k_s) = exp(log_scale) · k_sum``.

    - ``kv``: ``[B, H, m, Dv]``
    - ``k_sum``: ``[B, H, m]``
    - ``log_scale``: ``[B, H]``, the largest key log-weight seen (``NEG_LOG_WEIGHT`` when none)

    Its size does not depend on the number of tokens: this is what constant-memory decoding keeps.
    """

    kv: torch.Tensor
    k_sum: torch.Tensor
    log_scale: torch.Tensor

    @classmethod
    def empty(cls, batch: int, heads: int, nb_features: int, value_dim: int, device=None) -> FavorState:
        return cls(
            torch.zeros(batch, heads, nb_features, value_dim, device=device),
            torch.zeros(batch, heads, nb_features, device=device),
            torch.full((batch, heads), NEG_LOG_WEIGHT, device=device),
        )


def _rescaled(state: FavorState, log_scale: torch.Tensor) -> FavorState:
    """The same sums expressed relative to a new reference ``log_scale ≥ state.log_scale``."""
    factor = torch.exp(state.log_scale - log_scale)
    return FavorState(state.kv * factor[..., None, None], state.k_sum * factor[..., None], log_scale)


def fold_keys(state: FavorState, k_feat: torch.Tensor, log_weight: torch.Tensor, value: torch.Tensor) -> FavorState:
    """Add keys ``k_feat [B, H, L, m]`` (log-weights ``[B, H, L]``) and values ``[B, H, L, Dv]``."""
    log_scale = torch.maximum(state.log_scale, log_weight.amax(-1))
    state = _rescaled(state, log_scale)
    weighted = k_feat * torch.exp(log_weight - log_scale[..., None])[..., None]
    return FavorState(state.kv + weighted.transpose(-1, -2) @ value, state.k_sum + weighted.sum(-2), log_scale)


def _divide(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """``D⁻¹ · numerator``; a query that sees no key (all padding) gets 0 instead of 0/0."""
    return numerator / denominator.clamp_min(torch.finfo(denominator.dtype).tiny)[..., None]


def _with_ones(value: torch.Tensor) -> torch.Tensor:
    """``[..., L, Dv] → [..., L, Dv + 1]``: a column of ones, so one product with the features also
    yields the denominator ``Σ φ(k)`` (or ``φ(q)·Σ φ(k)``) next to the numerator."""
    return torch.cat([value, value.new_ones(*value.shape[:-1], 1)], -1)


def _read_out(q_feat: torch.Tensor, summary: torch.Tensor) -> torch.Tensor:
    """``D⁻¹ φ(Q)(φ(K)ᵀV)`` from ``q_feat [B, H, Lq, m]`` and ``summary = φ(K)ᵀ[V, 1]`` of shape
    ``[B, Hk, m, Dv + 1]`` → ``[B, H, Lq, Dv]``.  The ``H / Hk`` query heads of a key head share
    its summary (grouped-query attention without repeating keys)."""
    b, heads, q_len, m = q_feat.shape
    key_heads, dv = summary.shape[1], summary.shape[-1] - 1
    combined = q_feat.reshape(b, key_heads, heads // key_heads * q_len, m) @ summary  # [B, Hk, G·Lq, Dv + 1]
    return _divide(combined[..., :dv], combined[..., dv]).view(b, heads, q_len, dv)


def _split(tensor: torch.Tensor, block: int, dim: int = 2) -> list[torch.Tensor]:
    """Views of ``block`` tokens along ``dim``.  ``split`` rather than slicing in a loop: its backward
    concatenates the block gradients once, where each slice's backward would write a zero tensor of
    the full input (``L / block`` full-size passes, quadratic in ``L``)."""
    return list(tensor.split(block, dim))


def block_length(rows: int, nb_features: int, multiple: int = 1) -> int:
    """Tokens per block: enough that one block's features (``rows × tokens × m`` floats, ``rows = B·H``)
    come near :data:`BLOCK_ELEMENTS`, at least :data:`MIN_BLOCK_TOKENS`, rounded down to a ``multiple``
    (the causal chunk).

    Why blocks: computed for all ``L`` at once, ``ωq``, its maximum, its ``exp`` and the products with
    the features each stream an ``[L, m]`` tensor through memory; a block that stays in cache makes
    those passes cache-speed (``benchmarks/block_size.py``), and the forward keeps only one block of
    features alive.  Why a floor: every block also makes an ``[m, Dv + 1]`` summary (or chunk states)
    per row, which its tokens must outnumber; with many rows (a batch of short sentences) blocks of a
    few tokens were 2–4× slower than one pass."""
    tokens = max(MIN_BLOCK_TOKENS, BLOCK_ELEMENTS // (rows * nb_features))
    return max(multiple, tokens // multiple * multiple)


BLOCK_ELEMENTS = 1 << 20
"""Feature elements per block: 4 MiB of float32, well inside this machine's 32 MiB L3 (512 tokens at 8 heads,
m = 256; the fastest measured, ``benchmarks/block_size.py``, next to 256 and 1024)."""

MIN_BLOCK_TOKENS = 128
"""Fewest tokens per block (see :func:`block_length`)."""


def bidirectional_favor(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    projection: torch.Tensor,
    *,
    input_scale: float = 1.0,
    keep: torch.Tensor | None = None,
    kernel_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    kernel_epsilon: float = 1e-3,
    block: int | None = None,
) -> torch.Tensor:
    """Bidirectional FAVOR+ (paper eq. 5) block by block: ``[B, H, Lq, D], [B, Hk, Lk, D], [B, Hk, Lk, Dv]``
    → ``[B, H, Lq, Dv]``; ``keep [B, 1, Lk]`` marks real keys.

    Each block of keys contributes its summary ``φ̃(K_b)ᵀ[V_b, 1]`` (``[B, Hk, m, Dv + 1]``) relative
    to its own shared maximum ``c_b``; the summaries add up exactly after rescaling to ``max_b c_b``.
    Queries are then read out block by block.  Cost O((Lq + Lk)·m·Dv); no ``Lq × Lk`` matrix, and
    without gradients only one block of features is alive at a time.
    """
    block = block or block_length(query.shape[0] * query.shape[1], projection.shape[0])
    summaries, references = [], []
    k_blocks = _split(key, block)
    keep_blocks = [None] * len(k_blocks) if keep is None else _split(keep, block, -1)
    for k_block, v_block, keep_block in zip(k_blocks, _split(value, block), keep_blocks):
        k_feat, reference = key_features(
            k_block,
            projection,
            kernel_fn,
            kernel_epsilon,
            keep_block,
            per_key_scale=False,
            input_scale=input_scale,
        )
        summaries.append(k_feat.transpose(-1, -2) @ _with_ones(v_block))
        references.append(reference[..., None])  # [B, Hk, 1, 1]
    summary = summaries[0]
    if len(summaries) > 1:
        top = torch.stack(references).amax(0)
        summary = sum(part * torch.exp(ref - top) for part, ref in zip(summaries, references))
    outputs = [
        _read_out(query_features(q_block, projection, kernel_fn, kernel_epsilon, input_scale=input_scale), summary)
        for q_block in _split(query, block)
    ]
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, -2)


class _DecayedScan(torch.autograd.Function):
    """``E_0 = initial``, ``E_{j+1} = decay_j · E_j + increments_j``; returns ``E_0 … E_n``.

    Shapes: ``initial [B, H, *S]``, ``increments [B, H, n, *S]``, ``decay [B, H, n]`` (no gradient:
    it is made of detached stabilisers) → ``[B, H, n + 1, *S]``.  A hand-written backward (the same
    scan run in reverse) lets both directions write into one preallocated buffer: an autograd loop
    would allocate a new state per chunk, which dominated the causal pass.
    """

    @staticmethod
    def forward(ctx, initial, increments, decay):
        b, h, n = decay.shape
        states = increments.new_empty(b, h, n + 1, *increments.shape[3:])
        states[:, :, 0] = initial
        per_state = decay.view(b, h, n, *(1,) * (increments.dim() - 3))
        for j in range(n):
            torch.mul(states[:, :, j], per_state[:, :, j], out=states[:, :, j + 1])
            states[:, :, j + 1] += increments[:, :, j]
        ctx.save_for_backward(per_state)
        return states

    @staticmethod
    def backward(ctx, grad_states):
        (per_state,) = ctx.saved_tensors
        # total gradient of E_j = its own + decay_j · total gradient of E_{j+1}
        total = grad_states.clone()
        for j in range(per_state.shape[2] - 1, -1, -1):
            total[:, :, j].addcmul_(total[:, :, j + 1], per_state[:, :, j])
        return total[:, :, 0], total[:, :, 1:], None


def causal_linear_attention(
    q_feat: torch.Tensor,
    k_feat: torch.Tensor,
    log_weight: torch.Tensor,
    value: torch.Tensor,
    chunk_size: int = 64,
    initial_state: FavorState | None = None,
) -> tuple[torch.Tensor, FavorState]:
    """Causal FAVOR+ (paper §2.5, prefix sums), computed chunk by chunk.

    Shapes: ``q_feat, k_feat [B, H, L, m]``, ``log_weight [B, H, L]``, ``value [B, H, L, Dv]``;
    returns ``([B, H, L, Dv], final FavorState)``.  Query ``t`` attends to the keys of
    ``initial_state`` and to keys ``≤ t``.

    Inside a chunk of ``C`` tokens the masked product ``(φ̃(Q)φ̃(K)ᵀ ⊙ decay) V`` is computed exactly
    (``decay[t, s] = exp(c_s − M_t)`` for ``s ≤ t``, 0 above the diagonal); across chunks a state
    ``(S, z)`` is carried.  Memory is O(L·(m + C) + (L/C)·m·Dv): no ``[L, m, Dv]`` tensor is built.
    ``M_t`` is the running maximum of the key log-weights up to ``t``, so no future token changes a
    past output.  Values get a column of ones so that every product yields the denominator ``z`` too.
    """
    b, h, length, m = q_feat.shape
    dv = value.shape[-1]
    if initial_state is None:
        initial_state = FavorState.empty(b, h, m, dv, q_feat.device)
    chunk = max(1, min(chunk_size, length))
    n_chunks = math.ceil(length / chunk)
    pad = n_chunks * chunk - length
    value = _with_ones(value)  # [B, H, L, Dv + 1]
    if pad:
        q_feat = F.pad(q_feat, (0, 0, 0, pad))
        k_feat = F.pad(k_feat, (0, 0, 0, pad))
        value = F.pad(value, (0, 0, 0, pad))
        log_weight = F.pad(log_weight, (0, pad), value=NEG_LOG_WEIGHT)

    # [B, H, n, C]: reference of each query, then the reference of the state entering each chunk
    running_max = torch.maximum(torch.cummax(log_weight, -1).values, initial_state.log_scale[..., None])
    running_max = running_max.view(b, h, n_chunks, chunk)
    log_weight = log_weight.view(b, h, n_chunks, chunk)
    chunk_end = running_max[..., -1]
    state_ref = torch.cat([initial_state.log_scale[..., None], chunk_end[..., :-1]], -1)

    q_feat = q_feat.view(b, h, n_chunks, chunk, m)
    k_feat = k_feat.view(b, h, n_chunks, chunk, m)
    value = value.view(b, h, n_chunks, chunk, dv + 1)

    # within a chunk: exact masked product; clamping keeps exp finite above the diagonal
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q_feat.device).tril()
    decay = (log_weight[..., None, :] - running_max[..., :, None]).clamp_(max=0).exp_().masked_fill_(~causal, 0)
    scores = (q_feat @ k_feat.transpose(-1, -2)).mul_(decay)  # [B, H, n, C, C]

    # each chunk's own sums relative to its end reference, then a scan over chunks
    chunk_sums = k_feat.transpose(-1, -2) @ (value * torch.exp(log_weight - chunk_end[..., None])[..., None])
    initial = torch.cat([initial_state.kv, initial_state.k_sum[..., None]], -1)
    states = _DecayedScan.apply(initial, chunk_sums, torch.exp(state_ref - chunk_end))  # [B, H, n+1, m, Dv+1]

    carry = torch.exp(state_ref[..., None] - running_max)[..., None]  # [B, H, n, C, 1], ≤ 1
    combined = scores @ value + carry * (q_feat @ states[:, :, :-1])  # [B, H, n, C, Dv + 1]
    out = _divide(combined[..., :dv], combined[..., dv]).view(b, h, n_chunks * chunk, dv)[:, :, :length]
    final = states[:, :, -1]
    return out, FavorState(final[..., :dv], final[..., dv], chunk_end[..., -1])


def favor_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    projection: torch.Tensor,
    *,
    scaling: float | None = None,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    kernel_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    kernel_epsilon: float = 1e-3,
    chunk_size: int = 64,
    initial_state: FavorState | None = None,
    block_size: int | None = None,
) -> tuple[torch.Tensor, FavorState | None]:
    """FAVOR+ estimate of ``softmax(scaling · QKᵀ) V``.

    Args:
        query: ``[B, H, Lq, D]``; key ``[B, Hk, Lk, D]``; value ``[B, Hk, Lk, Dv]``; ``H % Hk == 0``.
        projection: ``ω`` of shape ``[m, D]`` (see :func:`orthogonal_random_matrix`).
        scaling: softmax temperature (default ``D^-½``); ``√scaling`` multiplies both ``q`` and ``k``
            (the paper's ``d^-¼`` renormalisation) so the kernel sees ``scaling · qᵀk``.
        causal: query ``i`` sees keys ``≤ Lk − Lq + i`` (queries are the last ``Lq`` positions, as
            with a key/value cache).  Bidirectional otherwise.
        key_padding_mask: ``[B, Lk]`` bool, ``True`` for real tokens; padded keys get ``φ(k) = 0``.
        kernel_fn: ``None`` for the positive softmax features, else generalised attention's ``f``.
        chunk_size: tokens per chunk of the causal computation (memory vs. matmul efficiency).
        initial_state: causal only: a :class:`FavorState` of earlier keys to continue from.
        block_size: tokens whose features are computed and used together (default
            :func:`block_length`: sized to stay in cache); causal blocks are rounded to whole chunks.
            Results do not depend on it beyond float rounding.

    Returns:
        ``(output [B, H, Lq, Dv], state)``: ``state`` is the causal state after all keys (for
        recurrent decoding), ``None`` when bidirectional.
    """
    heads, key_heads = query.shape[1], key.shape[1]
    if heads % key_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of key/value heads ({key_heads})")
    q_len, k_len = query.shape[-2], key.shape[-2]
    if causal and q_len > k_len:
        raise ValueError(f"causal attention needs at least as many keys ({k_len}) as queries ({q_len})")
    if initial_state is not None and not causal:
        raise ValueError("initial_state continues a causal sequence; bidirectional attention has none")

    scale = math.sqrt(scaling if scaling is not None else query.shape[-1] ** -0.5)
    dtype, projection = query.dtype, projection.float()
    query, key, value = query.float(), key.float(), value.float()
    keep = None if key_padding_mask is None else key_padding_mask.to(torch.bool)[:, None, :]
    features = dict(kernel_fn=kernel_fn, kernel_epsilon=kernel_epsilon, input_scale=scale)
    if not causal:
        out = bidirectional_favor(query, key, value, projection, keep=keep, block=block_size, **features)
        return out.to(dtype), None

    b, m, group = query.shape[0], projection.shape[0], heads // key_heads
    chunk = max(1, chunk_size)
    block = max(chunk, (block_size or block_length(b * heads, m, chunk)) // chunk * chunk)

    def keys(start: int, stop: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per block of keys ``start:stop``: φ̃, log-weights and values, repeated to the query heads (GQA)."""
        k_blocks, v_blocks = _split(key[:, :, start:stop], block), _split(value[:, :, start:stop], block)
        keep_blocks = [None] * len(k_blocks) if keep is None else _split(keep[..., start:stop], block, -1)
        blocks = []
        for k_block, v_block, keep_block in zip(k_blocks, v_blocks, keep_blocks):
            k_feat, log_weight = key_features(k_block, projection, keep=keep_block, per_key_scale=True, **features)
            parts = (k_feat, log_weight, v_block)
            blocks.append(parts if group == 1 else tuple(t.repeat_interleave(group, dim=1) for t in parts))
        return blocks

    state = initial_state or FavorState.empty(b, heads, m, value.shape[-1], query.device)
    # keys before the first query (a key/value cache) fold into the state; a single query (one
    # decoding step) sees every key, so all of them fold in and a read-out follows
    prefix = k_len if q_len == 1 else k_len - q_len
    for key_block in keys(0, prefix) if prefix else []:
        state = fold_keys(state, *key_block)
    if q_len == 1:
        q_feat = query_features(query, projection, **features)
        out = _divide(q_feat @ state.kv, (q_feat @ state.k_sum.unsqueeze(-1)).squeeze(-1))
        return out.to(dtype), state
    outputs = []
    for q_block, key_block in zip(_split(query, block), keys(prefix, k_len)):
        out, state = causal_linear_attention(query_features(q_block, projection, **features), *key_block, chunk, state)
        outputs.append(out)
    out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, -2)
    return out.to(dtype), state
