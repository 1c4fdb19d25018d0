"""FAVOR+ attention: ``softmax(QKᵀ)V ≈ D⁻¹ φ(Q)(φ(K)ᵀV)`` in O(L·m·d) time (paper eq. 4–5).

Torch only.  Layout: ``query [B, H, Lq, D]``, ``key [B, Hk, Lk, D]``, ``value [B, Hk, Lk, Dv]``
with ``H`` a multiple of ``Hk`` (grouped-query attention: the ``G = H / Hk`` query heads of a key
head share it; key features are computed once per key head).  All arithmetic runs in float32
whatever the input dtype; outputs come back in the query's dtype.

Entry points, in the manner of flash-linear-attention's ``naive`` / ``chunk`` / ``fused_recurrent``
(each checked against the O(L²) references of :mod:`hf_performer.favor.naive`):

- :func:`bidirectional_favor`: every query sees every key (paper eq. 5);
- :func:`causal_favor`: prefix sums computed chunk by chunk (paper §2.5);
- :func:`recurrent_favor_step`: one decoding step from a :class:`FavorState`;
- :func:`favor_attention`: the one call that picks among them (what the integration layer uses).

Stabilisers.  Key features are kept relative to a per-feature reference ``R_j`` (the largest
``ω_j k − ‖k‖²/2`` among the keys a query may see) and ``R`` is folded into the query side before
its own per-query maximum (:func:`~hf_performer.favor.features.query_features`), so no row of
the estimate underflows even at very large query/key norms.  Causal attention takes ``R`` at chunk
granularity from keys every query of the chunk sees (see :func:`causal_favor`), so a future token
never changes a past output, bit for bit.
"""

from __future__ import annotations

import functools
import math
import platform
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from hf_performer.favor.features import (
    LOG2_E,
    NEG_LOG_WEIGHT,
    check_feature_count,
    key_features,
    log_normaliser,
    query_features,
)

KernelFn = Callable[[torch.Tensor], torch.Tensor]


class FavorState(NamedTuple):
    """Causal FAVOR+ state after the keys seen so far (the paper's prefix sums, rescaled), per key head.

    ``[S, z] = Σ_s φ(k_s) [v_s, 1]ᵀ = exp(log_scale) ⊙_rows summary``: the numerator's ``S = Σ φ(k) vᵀ`` and the
    denominator's ``z = Σ φ(k)`` side by side, so that one product with a query's features reads out both (and one
    update folds a key into both).

    - ``summary``: ``[B, Hk, m, Dv + 1]`` (views :attr:`kv` ``[B, Hk, m, Dv]`` and :attr:`k_sum` ``[B, Hk, m]``)
    - ``log_scale``: ``[B, Hk, m]``, the per-feature reference (the largest key log-feature seen,
      ``NEG_LOG_WEIGHT`` when none)

    Its size does not depend on the number of tokens: this is what constant-memory decoding keeps.
    """

    summary: torch.Tensor
    log_scale: torch.Tensor

    @property
    def kv(self) -> torch.Tensor:
        """``Σ φ̃(k) vᵀ`` ``[B, Hk, m, Dv]`` (a view of :attr:`summary`)."""
        return self.summary[..., :-1]

    @property
    def k_sum(self) -> torch.Tensor:
        """``Σ φ̃(k)`` ``[B, Hk, m]`` (a view of :attr:`summary`)."""
        return self.summary[..., -1]

    @classmethod
    def empty(cls, batch: int, key_heads: int, nb_features: int, value_dim: int, device=None) -> FavorState:
        return cls(
            torch.zeros(batch, key_heads, nb_features, value_dim + 1, device=device),
            torch.full((batch, key_heads, nb_features), NEG_LOG_WEIGHT, device=device),
        )


def fold_keys(state: FavorState, k_feat: torch.Tensor, reference: torch.Tensor, value: torch.Tensor) -> FavorState:
    """Add keys ``k_feat [B, Hk, L, m]`` (relative to ``reference [B, Hk, m]``, as
    :func:`key_features` returns them) and values ``[B, Hk, L, Dv]`` to ``state``."""
    log_scale = torch.maximum(state.log_scale, reference)
    old, new = torch.exp(state.log_scale - log_scale), torch.exp(reference - log_scale)
    weighted = k_feat * new.unsqueeze(-2)
    return FavorState(state.summary * old[..., None] + weighted.transpose(-1, -2) @ _with_ones(value), log_scale)


def records_gradients(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd records an operation on ``tensors`` (``None`` entries are skipped): then the tensors a
    pass creates are kept for backward anyway, and writing blocks into a shared buffer saves nothing (and
    in-place writes into one tensor would make its backward copy it)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _raise_mmap_threshold() -> None:
    """Once per process, under glibc (not while ``torch.compile`` traces: a process-wide side effect it cannot
    follow), through :func:`_free_threshold_chunk`: allocate and free 32 MiB − 4 KiB (never touched, so nothing is
    paged in), which raises glibc's dynamic mmap threshold to its ceiling (32 MiB on 64-bit systems).  Called by
    :func:`causal_favor` and :func:`~hf_performer.favor.hybrid.hybrid_favor`.

    Why: glibc maps every allocation at or above its threshold afresh and raises the threshold only when it frees a
    mapped chunk larger than it.  Until then the tensors that every block (or group, or segment) allocates again
    are mapped, faulted in and unmapped block after block.
    - Hybrid: if the first large chunk freed is the size every group allocates, e.g. one row's 16 MiB of key features
      at 16,384 tokens, the threshold stays there.  At 16,384 tokens (8 heads × 64, m = 256, fresh processes): the
      bidirectional forward faulted 88,000 pages per call in about half the processes (1.25× the time), 8,193 with
      this (the output's own, as SDPA's) in every one; forward+backward 338,000–386,000 bidirectionally and
      92,000–121,000 causally, 12,000 and 20,000–34,000 with this (``benchmarks/RESULTS.md``).
    - Causal FAVOR+: its 1 MiB block tensors (128 tokens of 8 heads, m = 256) faulted 1,450–2,100 pages per forward at
      1,024–2,048 tokens in fresh processes, none with this: 0.87–0.90× the time at 1,024 tokens, 0.95–0.96× at 2,048,
      and a forward peak 2–4 MiB lower at 2,048–32,768 tokens.  Bidirectional FAVOR+ faulted no more without it.
    The cost: glibc may keep up to twice the ceiling of freed heap, as it does after any such free."""
    if not torch.compiler.is_compiling():
        _free_threshold_chunk()


@functools.cache
def _free_threshold_chunk() -> None:
    """The once-per-process part of :func:`_raise_mmap_threshold`."""
    if platform.libc_ver()[0] == "glibc":
        torch.empty(((32 << 20) - 4096) // 4)


def _divide(numerator: torch.Tensor, denominator: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``D⁻¹ · numerator``; a query that sees no key (all padding) gets 0 instead of 0/0, and its
    gradient stays 0: dividing by 1 there (rather than by the smallest float) keeps ``1/D`` from
    overflowing into the backward pass, where ``inf · 0`` would make NaN gradients.  ``out``: where to write it,
    a view of a larger output: straight into it, except under autograd (which takes no ``out=``) or
    ``torch.compile`` (dynamo takes no ``out=`` that is a view), where the result is copied there."""
    if out is not None and (numerator.requires_grad or torch.compiler.is_compiling()):
        return out.copy_(_divide(numerator, denominator))
    if not records_gradients(numerator, denominator):
        return torch.div(numerator, denominator.clamp_min(torch.finfo(denominator.dtype).tiny)[..., None], out=out)
    seen = denominator >= torch.finfo(denominator.dtype).tiny
    return numerator / torch.where(seen, denominator, torch.ones_like(denominator))[..., None]


def _with_ones(value: torch.Tensor) -> torch.Tensor:
    """``[..., L, Dv] → [..., L, Dv + 1]``: a column of ones, so one product with the features also
    yields the denominator ``Σ φ(k)`` (or ``φ(q)·Σ φ(k)``) next to the numerator."""
    return torch.cat([value, value.new_ones(*value.shape[:-1], 1)], -1)


def _token_sums(features: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``featuresᵀ values``, ``[..., m, Dv']`` from ``features [..., T, m]`` and ``values [..., T, Dv']``: sums over the
    ``T`` tokens (a summary, chunk sums, their gradient), as a transposed view of ``valuesᵀ features``.  On the CPU the
    product with the transposed ``[m, T]`` operand on the left ran at half to 0.7× the matmul rate (``RESULTS.md``)."""
    return (values.transpose(-1, -2) @ features).transpose(-1, -2)


def _read_out(q_feat: torch.Tensor, summary: torch.Tensor) -> torch.Tensor:
    """``D⁻¹ φ(Q)(φ(K)ᵀ[V, 1])``: ``q_feat [B, Hk, R, m]`` and ``summary [B, Hk, m, Dv + 1]`` → ``[B, Hk, R, Dv]``."""
    combined = q_feat @ summary
    return _divide(combined[..., :-1], combined[..., -1])


def _split(tensor: torch.Tensor, block: int, dim: int = 2) -> list[torch.Tensor]:
    """Views of ``block`` tokens along ``dim``.  ``split`` rather than slicing in a loop: its backward
    concatenates the block gradients once, where each slice's backward would write a zero tensor of
    the full input (``L / block`` full-size passes, quadratic in ``L``)."""
    return list(tensor.split(block, dim))


def block_length(rows: int, nb_features: int, multiple: int = 1, elements: int | None = None) -> int:
    """Tokens per block: enough that one block's features (``rows × tokens × m`` floats, ``rows = B·H``)
    come near ``elements`` (default :data:`BLOCK_ELEMENTS`), at least :data:`MIN_BLOCK_TOKENS`, rounded down to a ``multiple``
    (the causal chunk).

    Why blocks: computed for all ``L`` at once, ``ωq``, its maximum, its ``exp`` and the products with
    the features each stream an ``[L, m]`` tensor through memory; a block that stays in cache makes
    those passes cache-speed (``benchmarks/block_size.py``), and the forward keeps only one block of
    features alive.  Why a floor: every block also makes an ``[m, Dv + 1]`` summary (or chunk states)
    per row, which its tokens must outnumber; with many rows (a batch of short sentences) blocks of a
    few tokens were 2–4× slower than one pass."""
    tokens = max(MIN_BLOCK_TOKENS, (elements or BLOCK_ELEMENTS) // (rows * nb_features))
    return max(multiple, tokens // multiple * multiple)


BLOCK_ELEMENTS = 1 << 20
"""Feature elements per block: 4 MiB of float32, well inside this machine's 32 MiB L3 (512 tokens at 8 heads,
m = 256; the fastest measured, ``benchmarks/block_size.py``, next to 256 and 1024)."""

LEAN_BLOCK_ELEMENTS = 1 << 18
"""Feature elements per block where nothing of a block outlives it: 1 MiB of float32 (128 tokens at 8 heads,
m = 256).  Bidirectional attention (which recomputes features in backward): the forward's blocks go into the
output's own memory while it is unwritten, up to :data:`BLOCK_ELEMENTS` (:func:`_key_summary`,
:func:`_read_out_queries`), and the last few of each row into one buffer of this size, which keeps its peak memory
within a MiB of SDPA's (issue 14).  Causal attention without autograd, from :data:`SHORT_CAUSAL_ELEMENTS` on: with
the states before each chunk scanned into one block of memory, 128-token blocks took 0.87–0.92× the time of 512 at
16,384 and 2,048 tokens, and the forward's peak 33 MiB at 16,384 tokens (SDPA's 32–33; 60 MiB with 512).  Under autograd causal
attention takes :func:`recompute_block_length` (softmax) or :data:`BLOCK_ELEMENTS` (other kernels)."""

MIN_BLOCK_TOKENS = 128
"""Fewest tokens per block (see :func:`block_length`)."""

SHORT_CAUSAL_ELEMENTS = 1 << 22
"""Feature elements (``rows × L × m``) below which causal attention without autograd takes blocks of
:data:`SHORT_CAUSAL_BLOCK_ELEMENTS` instead of :data:`LEAN_BLOCK_ELEMENTS`: sequences shorter than 2,048 tokens at 8
heads with m = 256, below the lengths of issue 14's memory goal and where its causal crossover (≤ 1,536 tokens) is."""

SHORT_CAUSAL_BLOCK_ELEMENTS = 1 << 19
"""Feature elements per block of a short causal sequence (:data:`SHORT_CAUSAL_ELEMENTS`): 256 tokens at 8 heads,
m = 256, half as many blocks, each with its fixed operations (about 120 of them, 0.3 ms a block).  At 1,024 /
1,536 / 1,792 tokens (8 heads × 64, 2 threads, no autograd, interleaved in one process, medians of 11, three
processes) 256-token blocks took 0.86–0.92× / 0.88–0.92× / 0.90× the time of 128.  Longer sequences keep 128-token
blocks: 256 raised the forward's peak above SDPA's, by 1–6 MiB at 2,048–16,384 tokens (``benchmarks/RESULTS.md``)."""


def causal_block_elements(rows: int, length: int, nb_features: int) -> int:
    """Feature elements per block of causal attention without autograd for ``rows`` (batch × heads) rows of
    ``length`` queries: :data:`SHORT_CAUSAL_BLOCK_ELEMENTS` below :data:`SHORT_CAUSAL_ELEMENTS`, else
    :data:`LEAN_BLOCK_ELEMENTS` (for :func:`block_length`)."""
    short = rows * length * nb_features < SHORT_CAUSAL_ELEMENTS
    return SHORT_CAUSAL_BLOCK_ELEMENTS if short else LEAN_BLOCK_ELEMENTS


SHORT_ELEMENTS = 1 << 21
"""Feature elements (``rows × L × m``) up to which bidirectional attention runs as one block: 8 MiB of float32,
1,024 tokens at 8 heads with m = 256.  Each block rescales the summary of the blocks before it and reads out its
queries in separate small operations: at 640 tokens (8 heads × 64, 2 threads, no autograd) one block took 0.81× the
time of :data:`LEAN_BLOCK_ELEMENTS`' 128-token blocks (5.25 against 6.45 ms, SDPA 5.37), at 1,024 tokens 0.84×.  Issue
14's memory goal starts at 2,048 tokens, where blocks stay lean."""


def recompute_block_length(length: int, value_dim: int, group: int, chunk: int, most: int) -> int:
    """Tokens per block of causal attention under autograd (:class:`_CausalFavor`), whole chunks, at most ``most``
    (:func:`block_length`'s cache budget).

    Its forward keeps one ``[m, Dv + 1]`` summary per key head and block for backward, ``L / t`` of them, and its
    backward holds about :data:`BACKWARD_BLOCK_TENSORS` ``[t, m]`` tensors per query head of one block: memory
    ``(L / t)·(Dv + 1) + c·G·t`` (per key head, in units of ``m`` floats) is lowest at ``t = √(L·(Dv + 1) / (c·G))``.
    At 8 heads × 64, m = 256, chunks of 64: 128 tokens at 2,048, 192 at 4,096, 384 at 16,384; forward + backward
    peak 24, 45 and 156 MiB there against 38, 59 and 165 MiB with 256-token blocks and 67, 88, 192 with 512, and at
    16,384 tokens the time of 256 (0.99× the time before this op) and less than 128 or 512 (1.06×, 1.05×)."""
    tokens = math.isqrt(length * (value_dim + 1) // (BACKWARD_BLOCK_TENSORS * group))
    return max(chunk, min(max(tokens, MIN_BLOCK_TOKENS), most) // chunk * chunk)


BACKWARD_BLOCK_TENSORS = 6
"""``[block, m]`` tensors per query head that :class:`_CausalFavor`'s backward holds at once, about (features of
queries and keys, two gradients and a product being added, the chunk states; measured with ``mallinfo``)."""


class _Inputs(NamedTuple):
    """Validated float32 inputs shared by the entry points; ``query`` grouped per key head."""

    query: torch.Tensor  # [B, Hk, G, Lq, D]
    key: torch.Tensor  # [B, Hk, Lk, D]
    value: torch.Tensor  # [B, Hk, Lk, Dv]
    projection: torch.Tensor  # [m, D]
    keep: torch.Tensor | None  # [B, 1, Lk] bool
    input_scale: float
    dtype: torch.dtype
    feature_map: str = "favor+"  # hybrid attention's normaliser of the features (see features.log_normaliser)


def _inputs(query, key, value, projection, scaling, key_padding_mask, feature_map: str = "favor+") -> _Inputs:
    b, heads, q_len, d = query.shape
    key_heads = key.shape[1]
    if heads % key_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of key/value heads ({key_heads})")
    check_feature_count(feature_map, projection.shape[0])
    keep = None if key_padding_mask is None else key_padding_mask.to(torch.bool)[:, None, :]
    return _Inputs(
        query.float().reshape(b, key_heads, heads // key_heads, q_len, d),
        key.float(),
        value.float(),
        projection.float(),
        keep,
        math.sqrt(scaling if scaling is not None else d**-0.5),
        query.dtype,
        feature_map,
    )


def _ungroup(out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[B, Hk, G, L, Dv] → [B, H, L, Dv]`` in the caller's dtype."""
    b, key_heads, group, length, dv = out.shape
    return out.reshape(b, key_heads * group, length, dv).to(dtype)


def bidirectional_favor(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    projection: torch.Tensor,
    *,
    scaling: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    kernel_fn: KernelFn | None = None,
    kernel_epsilon: float = 1e-3,
    block_size: int | None = None,
) -> torch.Tensor:
    """Bidirectional FAVOR+ (paper eq. 5): ``[B, H, Lq, D], [B, Hk, Lk, D], [B, Hk, Lk, Dv]`` →
    ``[B, H, Lq, Dv]``; ``key_padding_mask [B, Lk]`` marks real keys (``True``).

    Block by block: each block of keys contributes its summary ``φ̃(K_b)ᵀ[V_b, 1]``
    (``[B, Hk, m, Dv + 1]``) relative to its own per-feature reference ``R_b``; the summaries add up
    exactly after rescaling each feature row to ``max_b R_b``.  Queries are then read out block by
    block into one output tensor.  Cost O((Lq + Lk)·m·Dv); no ``Lq × Lk`` matrix and only one block of
    features alive at a time, in the backward pass too: the softmax kernel runs as
    :class:`_BidirectionalFavor`, which keeps the inputs, the summary and the output for backward and
    recomputes features block by block (``[L, m]`` per head is never stored).  Reference:
    :func:`~hf_performer.favor.naive.quadratic_linear_attention`.
    """
    x = _inputs(query, key, value, projection, scaling, key_padding_mask)
    b, key_heads, group, q_len, d = x.query.shape
    query_rows, m, longest = b * group * key_heads, projection.shape[0], max(q_len, x.key.shape[2])
    lean = LEAN_BLOCK_ELEMENTS if kernel_fn is None else None
    short = query_rows * longest * m <= SHORT_ELEMENTS
    block = block_size or (longest if short else block_length(query_rows, m, elements=lean))
    rows = x.query.reshape(b, key_heads, group * q_len, d)  # the G query heads of a key head, one after another
    if kernel_fn is None:
        out = _BidirectionalFavor.apply(rows, x.key, x.value, x.projection, x.keep, x.input_scale, block)
        return _ungroup(out.view(b, key_heads, group, q_len, -1), x.dtype)
    features = dict(kernel_fn=kernel_fn, kernel_epsilon=kernel_epsilon, input_scale=x.input_scale)
    summary = sum(
        key_features(k_block, x.projection, keep=keep_block, **features)[0].transpose(-1, -2) @ _with_ones(v_block)
        for k_block, v_block, keep_block in _key_blocks(x.key, x.value, x.keep, block)
    )
    outputs = [_read_out(query_features(q_block, x.projection, **features), summary) for q_block in _split(rows, block * group)]
    out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, -2)
    return _ungroup(out.view(b, key_heads, group, q_len, -1), x.dtype)


def _buffer(flat: torch.Tensor, *shape: int) -> torch.Tensor:
    """The first ``prod(shape)`` elements of the 1-d ``flat`` as a contiguous ``shape`` tensor (a block's
    share of a buffer sized for the largest block)."""
    return flat[: math.prod(shape)].view(shape)


def _key_blocks(key: torch.Tensor, value: torch.Tensor, keep: torch.Tensor | None, block: int):
    """``(key, value, keep)`` views of ``block`` keys at a time (``keep`` ``None`` without padding)."""
    k_blocks = _split(key, block)
    keep_blocks = [None] * len(k_blocks) if keep is None else _split(keep, block, -1)
    return zip(k_blocks, _split(value, block), keep_blocks)


class _BidirectionalFavor(torch.autograd.Function):
    """Softmax-kernel bidirectional FAVOR+ that stores no features: ``rows [B, Hk, R, D]`` (the ``G``
    query heads of a key head one after another), ``key [B, Hk, Lk, D]``, ``value [B, Hk, Lk, Dv]``,
    ``projection [m, D]``, ``keep [B, 1, Lk]`` or ``None``, the input scale ``s`` and the block length →
    ``[B, Hk, R, Dv]``.

    Forward: the summary ``S = φ̃(K)ᵀ[V, 1]`` relative to the per-feature reference ``top`` (a pass over
    key blocks), then ``out = D⁻¹ φ̃(Q) S`` written block by block into one output.  Backward (the
    stabilisers ``top`` and each query's maximum are constants, as in autograd of the same formula,
    where they are detached): per query block, with ``c = φ̃(q)ᵀS = [n, z]`` and ``out = n / z``,
    ``dc = [g, −g·out] / z``, ``dS += φ̃(q) dcᵀ``, ``dφ̃(q) = S dc`` and ``d(ωq)`` = ``dφ̃(q) ⊙ φ̃(q)``;
    then per key block, ``dφ̃(k) = dS [v, 1]``, ``dv = dS[:, :Dv]ᵀ φ̃(k)`` and, since
    ``log φ̃(k) = s·ωk − s²‖k‖²/2 + const``, ``dk = s·(dφ̃(k) ⊙ φ̃(k)) ω − s²·k·Σ_j (dφ̃(k) ⊙ φ̃(k))_j``.
    Memory beyond inputs, output and gradients: the summary, its gradient and one block's features (in the
    forward, mostly in the output's own memory while it is unwritten: :func:`_key_summary`,
    :func:`_read_out_queries`).
    """

    @staticmethod
    def forward(ctx, rows, key, value, projection, keep, scale, block):
        out = rows.new_empty(*rows.shape[:-1], value.shape[-1])
        summary, top, buffer = _key_summary(key, value, projection, keep, scale, block, scratch=out.view(-1))
        _read_out_queries(rows, projection, scale, summary, top, out, block, spare=buffer)
        ctx.save_for_backward(rows, key, value, projection, keep, summary, top, out)
        ctx.scale, ctx.block = scale, block
        return out

    @staticmethod
    def backward(ctx, grad_out):
        rows, key, value, projection, keep, summary, top, out = ctx.saved_tensors
        scale, block = ctx.scale, ctx.block
        wants_rows, wants_key, wants_value, wants_projection = ctx.needs_input_grad[:4]
        grad_rows = torch.empty_like(rows) if wants_rows else None
        grad_projection = torch.zeros_like(projection) if wants_projection else None
        grad_summary = torch.zeros_like(summary)
        for q_block, g_block, out_block, grad_block in zip(
            _split(rows, block), _split(grad_out, block), _split(out, block),
            _split(grad_rows, block) if wants_rows else [None] * math.ceil(rows.shape[2] / block),
        ):
            q_feat = query_features(q_block, projection, input_scale=scale, key_reference=top)
            d_combined = _combined_gradient(g_block, out_block, q_feat @ summary[..., -1:])
            grad_summary.add_(_token_sums(q_feat, d_combined))
            if wants_rows or wants_projection:
                d_logits = (d_combined @ summary.transpose(-1, -2)).mul_(q_feat)  # d(s·ωq) per feature
                _logit_gradients(d_logits, q_block, projection, scale, grad_block, grad_projection)
        grad_key = torch.empty_like(key) if wants_key else None
        grad_value = torch.empty_like(value) if wants_value else None
        for index, (k_block, v_block, keep_block) in enumerate(_key_blocks(key, value, keep, block)):
            part = slice(index * block, index * block + k_block.shape[2])
            k_feat, _ = key_features(k_block, projection, keep=keep_block, input_scale=scale, reference=top)
            if wants_value:
                grad_value[:, :, part] = k_feat @ grad_summary[..., :-1]
            if wants_key or wants_projection:
                d_logits = (_with_ones(v_block) @ grad_summary.transpose(-1, -2)).mul_(k_feat)
                _logit_gradients(d_logits, k_block, projection, scale, grad_key[:, :, part] if wants_key else None,
                                 grad_projection, keys=True)
        return grad_rows, grad_key, grad_value, grad_projection, None, None, None


def _key_summary(key, value, projection, keep, scale: float, block: int, scratch: torch.Tensor):
    """The first pass of :class:`_BidirectionalFavor`: the summary ``S = φ̃(K)ᵀ[V, 1]`` ``[B, Hk, m, Dv + 1]`` of
    ``key [B, Hk, Lk, D]``, ``value [B, Hk, Lk, Dv]`` (``keep [B, 1, Lk]`` or ``None``), the per-feature reference
    ``[B, Hk, m]`` it is kept relative to, over blocks of keys, and the buffer of its own it took (else ``None``).

    ``scratch``: 1-d memory nothing reads yet, the output's until its queries are read out.  Each block's features
    and its product ``Vᵀφ̃(K)`` go there, in blocks as large as it holds up to :func:`block_length`'s cache budget (at
    16,384 tokens, 8 heads × 64, m = 256: 512 tokens, 0.8× the time of this pass in the forward's 128-token
    ``block``, and no memory of its own); where it holds fewer than ``block`` tokens, into a buffer of ``block``
    tokens (always for a sequence of one block): the read-out then takes it over, while it is in cache.

    ``S`` is kept as ``Sᵀ = [Vᵀφ̃(K); Σ φ̃(K)]`` (``[B, Hk, Dv + 1, m]``, handed out transposed): the product with
    ``Vᵀ`` on the left ran at the matmul rate where ``φ̃(K)ᵀ`` on the left ran at half of it, and the keys' sum is a
    reduction of features just written, where a ``[V, 1]`` copy of the values was one more buffer to write."""
    b, key_heads, _, dv = value.shape
    rows, m = b * key_heads, projection.shape[0]
    products = rows * dv * m
    tokens = min(max(block, block_length(rows, m)), (scratch.numel() - products) // (rows * m))
    buffer = None
    if tokens < block:
        tokens = block  # the read-out's too: features and [n, z] of ``block`` tokens
        scratch = buffer = key.new_empty(rows * block * (m + dv + 1) + products)
    features = scratch[: rows * tokens * m]
    product = _buffer(scratch[rows * tokens * m :], b, key_heads, dv, m)
    summary, top = None, None
    for k_block, v_block, keep_block in _key_blocks(key, value, keep, tokens):
        # relative to the larger of their own and the summary's reference, per feature: only the summary is rescaled
        k_feat, reference = key_features(k_block, projection, keep=keep_block, input_scale=scale,
                                         out=_buffer(features, b, key_heads, k_block.shape[2], m), at_least=top)
        torch.matmul(v_block.transpose(-1, -2), k_feat, out=product)
        if top is None:
            summary = torch.cat([product, k_feat.sum(-2, keepdim=True)], -2)
        else:
            summary.mul_(torch.exp(top - reference)[..., None, :])
            summary[:, :, :dv].add_(product)
            summary[:, :, dv].add_(k_feat.sum(-2))
        top = reference
    return summary.transpose(-1, -2), top, buffer


def _read_out_queries(rows, projection, scale: float, summary, top, out, block: int,
                      spare: torch.Tensor | None = None) -> None:
    """The second pass of :class:`_BidirectionalFavor`: ``out = D⁻¹ φ̃(Q) S`` for ``rows [B, Hk, R, D]``, written
    block by block into ``out [B, Hk, R, Dv]``, from the ``summary [B, Hk, m, Dv + 1]`` of the keys kept relative to
    ``top [B, Hk, m]``.

    Each block's features and products go into the end of every row of ``out`` while it is unwritten: the same
    memory block after block (so it stays in cache), in blocks as large as it holds up to :func:`block_length`'s
    cache budget, shrinking as the unwritten part does (at 16,384 tokens, 8 heads × 64, m = 256: 512 tokens, 0.9×
    the time of this pass in 128-token blocks).  The rest, fewer than about ``6·block`` tokens of each row, in
    ``block`` tokens in a buffer of their own: the peak memory of 128-token blocks in one buffer, as before.  Off the
    CPU and under ``torch.compile`` every block goes in that buffer.  ``spare``: a 1-d buffer of at least
    ``B·Hk·block·(m + Dv + 1)`` floats to be that buffer, the key pass's own (:func:`_key_summary`): written just
    before, it is in cache, where a new one is not (at 512–1,024 tokens, 8 heads × 64, m = 256, one block: 0.94–1.03×
    the forward's time interleaved, faster in most fresh processes)."""
    b, key_heads, length, dv = out.shape
    m = projection.shape[0]
    per_token = m + dv + 1  # floats of a token's features and product
    most = max(block, block_length(b * key_heads, m))
    by_row, start = out.view(b * key_heads, length * dv), 0
    # scratch whose rows are apart in memory: eager on the CPU, where it was measured (dynamo takes no such out=)
    apart = out.device.type == "cpu" and not torch.compiler.is_compiling()
    while start < length:
        # the block's outputs and, at each row's end, its scratch must both fit in what is still unwritten
        tokens = min(most, length - start, (length - start) * dv // (dv + per_token))
        if tokens >= block and apart:
            ends = by_row[:, length * dv - tokens * per_token :]  # [B·Hk, tokens·(m + Dv + 1)], rows apart
            feat_out = ends[:, : tokens * m].view(b, key_heads, tokens, m)
            product_out = ends[:, tokens * m :].view(b, key_heads, tokens, dv + 1)
        else:
            tokens = min(block, length - start)
            spare = rows.new_empty(b * key_heads * block * per_token) if spare is None else spare
            feat_out = _buffer(spare, b, key_heads, tokens, m)
            product_out = _buffer(spare[feat_out.numel() :], b, key_heads, tokens, dv + 1)
        q_feat = query_features(rows[:, :, start : start + tokens], projection, input_scale=scale, key_reference=top,
                                out=feat_out)
        combined = torch.matmul(q_feat, summary, out=product_out)
        _divide(combined[..., :-1], combined[..., -1], out=out[:, :, start : start + tokens])
        start += tokens


def _combined_gradient(grad_out: torch.Tensor, out: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """Gradient of ``c = [n, z]`` where ``out = n / z`` (:func:`_divide`): ``[g, −g·out] / z``, ``[..., Dv + 1]``
    from ``grad_out, out [..., Dv]`` and ``denominator [..., 1]``.  A query that saw no key gets 0, not ``g / 0``."""
    inverse = torch.where(denominator >= torch.finfo(denominator.dtype).tiny, denominator.reciprocal(), 0.0)
    return torch.cat([grad_out, -(grad_out * out).sum(-1, keepdim=True)], -1).mul_(inverse)


def _logit_gradients(d_logits, inputs, projection, scale: float, grad_inputs, grad_projection, *, keys: bool = False):
    """Backward of the log-features ``s·ωx`` of queries or ``s·ωx − s²‖x‖²/2`` of keys (``keys``): from
    ``d_logits [..., L, m]`` and ``inputs x [..., L, D]``, writes ``dx = s·d_logits ω (− s²·x·Σ_j d_logits_j)``
    into ``grad_inputs [..., L, D]`` and adds ``dω = s·Σ d_logitsᵀ x`` to ``grad_projection [m, D]`` (either
    ``None`` when not wanted)."""
    if grad_inputs is not None:
        grad = d_logits @ (projection * scale)
        if keys:
            grad = grad.sub_(inputs * d_logits.sum(-1, keepdim=True), alpha=scale**2)
        grad_inputs.copy_(grad)
    if grad_projection is not None:
        grad_projection.add_((d_logits.transpose(-1, -2) @ inputs).sum(tuple(range(d_logits.dim() - 2))), alpha=scale)


def _scan_before_(states: torch.Tensor, initial: torch.Tensor, decay: torch.Tensor) -> torch.Tensor:
    """In place: ``states [B, H, n, *S]`` holds the increments and comes back holding ``E_0 … E_{n−1}`` (``E_0 =
    initial``, ``E_{j+1} = decay_j ⊙ E_j + increments_j``); returns ``E_n``."""
    state = initial
    for j in range(states.shape[2]):
        after = torch.addcmul(states[:, :, j], state, decay[:, :, j])
        states[:, :, j].copy_(state)
        state = after
    return state


def _scan(initial: torch.Tensor, increments: torch.Tensor, decay: torch.Tensor) -> torch.Tensor:
    """``E_0 … E_n`` of :func:`_scan_before_`, written into one buffer (shapes as :class:`_DecayedScan`)."""
    n = increments.shape[2]
    states = increments.new_empty(*increments.shape[:2], n + 1, *increments.shape[3:])
    states[:, :, :n] = increments
    states[:, :, n] = _scan_before_(states[:, :, :n], initial, decay)
    return states


def _reverse_scan(total: torch.Tensor, decay: torch.Tensor) -> torch.Tensor:
    """Backward of :func:`_scan`, in place: ``total [B, H, n + 1, *S]`` holds each ``E_j``'s own gradient and
    comes back with its total one, its own plus ``decay_j ⊙`` the total of ``E_{j+1}`` (so ``total[:, :, 0]`` is
    the gradient of ``initial`` and ``total[:, :, 1:]`` those of the increments)."""
    for j in range(decay.shape[2] - 1, -1, -1):
        total[:, :, j].addcmul_(total[:, :, j + 1], decay[:, :, j])
    return total


class _DecayedScan(torch.autograd.Function):
    """``E_0 = initial``, ``E_{j+1} = decay_j ⊙ E_j + increments_j``; returns ``E_0 … E_n``.

    Shapes: ``initial [B, H, *S]``, ``increments [B, H, n, *S]``, ``decay [B, H, n, *S']`` broadcastable
    to ``S`` (per feature row here; no gradient: it is made of detached stabilisers) →
    ``[B, H, n + 1, *S]``.  A hand-written backward (the same scan run in reverse) lets both
    directions write into one preallocated buffer: an autograd loop would allocate a new state per
    chunk, which dominated the causal pass.
    """

    @staticmethod
    def forward(ctx, initial, increments, decay):
        ctx.save_for_backward(decay)
        return _scan(initial, increments, decay)

    @staticmethod
    def backward(ctx, grad_states):
        (decay,) = ctx.saved_tensors
        total = _reverse_scan(grad_states.clone(), decay)
        return total[:, :, 0], total[:, :, 1:], None


QUERY_FLOOR = 60.0
"""Causal query features are kept ≥ ``exp(−60)`` times their largest.  At very large query/key norms
every product of a query's and a key's features (each normalised by its own maximum) can underflow,
leaving an all-zero row with NaN gradients; the floor keeps the key that sets the running maximum
at ≥ ``exp(−60)·m^-½`` of it.  Where rows are healthy, terms that small do not reach float32's
resolution of the row's sum, so results do not change."""


class _ChunkTerms(NamedTuple):
    """One block of causal attention cut into ``n`` chunks of ``C`` tokens (the last padded), per key head:
    what :func:`_causal_chunks` reads out and scans, and what :class:`_CausalFavor` differentiates."""

    q_feat: torch.Tensor  # [B, Hk, G, n, C, m]
    k_feat: torch.Tensor  # [B, Hk, n, C, m], 0 for padding
    values: torch.Tensor  # [B, Hk, n, C, Dv + 1]: [V, 1]
    key_weight: torch.Tensor | None  # [B, Hk, n, C, 1]: exp(c_s − M) at the end of the key's chunk (softmax)
    decay: torch.Tensor  # [B, Hk, 1, n, C, C] (softmax) or [C, C]: the causal mask, with the keys' weights
    scan_decay: torch.Tensor  # [B, Hk, n, 1, 1]: a state's rescaling from one chunk's end to the next
    carry: torch.Tensor | None  # [B, Hk, 1, n, C, 1]: the weight of the state before a chunk at each query
    reference: torch.Tensor | None  # [B, Hk]: the running maximum M after the block (softmax)
    q_floored: torch.Tensor | None  # [B, Hk, G, n, C, m] bool: query features on the floor (when asked)


def _chunk_terms(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    projection: torch.Tensor,
    keep: torch.Tensor | None,
    reference: torch.Tensor | None,
    *,
    chunk: int,
    input_scale: float,
    kernel_fn: KernelFn | None,
    kernel_epsilon: float,
    floor_mask: bool = False,
    log2_projection: torch.Tensor | None = None,
) -> _ChunkTerms:
    """The :class:`_ChunkTerms` of ``query [B, Hk, G, L, D]``, ``key [B, Hk, L, D]``, ``value [B, Hk, L, Dv]``
    after keys whose running maximum is ``reference [B, Hk]`` (softmax kernel; see :func:`_causal_chunks`).
    ``floor_mask``: also say which query features sit on :data:`QUERY_FLOOR` (the backward pass needs it).
    ``log2_projection``: :func:`_log2_projection` of ``projection``, made once for all blocks (softmax kernel)."""
    b, key_heads, _, length, _ = query.shape
    dv = value.shape[-1]
    n = math.ceil(length / chunk)
    pad = n * chunk - length
    if pad:
        query, key, value = F.pad(query, (0, 0, 0, pad)), F.pad(key, (0, 0, 0, pad)), F.pad(value, (0, 0, 0, pad))
        keep = torch.ones(b, 1, length, dtype=torch.bool, device=key.device) if keep is None else keep
        keep = F.pad(keep, (0, pad), value=False)
    values = _with_ones(value).view(b, key_heads, n, chunk, dv + 1)
    if kernel_fn is None:
        log2_projection = _log2_projection(projection, input_scale) if log2_projection is None else log2_projection
        return _softmax_terms(query, key, values, log2_projection, keep, reference, input_scale, floor_mask)
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=key.device).tril()
    features = dict(kernel_fn=kernel_fn, kernel_epsilon=kernel_epsilon, input_scale=input_scale)
    k_feat = key_features(key, projection, keep=keep, **features)[0].view(b, key_heads, n, chunk, -1)
    q_feat = query_features(query, projection, **features).unflatten(-2, (n, chunk))
    scan_decay = k_feat.new_ones(b, key_heads, n, 1, 1)
    return _ChunkTerms(q_feat, k_feat, values, None, causal.to(k_feat.dtype), scan_decay, None, None, None)


def _log2_projection(projection: torch.Tensor, input_scale: float) -> torch.Tensor:
    """``(s·log₂e·ω)ᵀ`` ``[D, m]``: the product that gives the causal softmax terms' logits in base 2
    (:func:`_softmax_terms`), made once per call rather than once per block."""
    return (projection * (input_scale * LOG2_E)).transpose(0, 1)


def _softmax_terms(query, key, values, log2_projection, keep, reference, input_scale: float,
                   floor_mask: bool) -> _ChunkTerms:
    """:func:`_chunk_terms` for the softmax kernel, inputs padded to whole chunks (``values [B, Hk, n, C, Dv + 1]``),
    logits from ``log2_projection`` (:func:`_log2_projection`).  Every stabiliser is detached: a constant, in
    autograd and in :class:`_CausalFavor`.

    The logits, the stabilisers and the exponents are in base 2 (``log₂ φ``): every exponential of the block is an
    ``exp2`` of them straight, with no pass that multiplies by ``log₂e`` first (``exp_`` on the CPU) or a slower
    ``exp``, and the features, weights and carries are those of the natural logarithm.  ``reference`` in and out
    stays natural (``FavorState``'s, the entries :class:`_CausalFavor` keeps)."""
    b, key_heads, n, chunk, _ = values.shape
    m = log2_projection.shape[1]
    half_log_m = 0.5 * math.log2(m)  # φ's m^-½ rides in the exponents, half on each side
    # log₂ φ(k_s) = ωk_s − c(k_s): relative to c_s = its largest, the norm c(k_s) cancels, so it goes into the weight
    # c_s alone (no pass over [L, m] for it); the largest ωk_s is the stabiliser (detached), the norm is not
    k_logits = (key @ log2_projection).view(b, key_heads, n, chunk, m)
    top = k_logits.detach().amax(-1)
    k_feat = k_logits.sub_((top + half_log_m)[..., None]).exp2_()
    log_weight = top - log_normaliser(key, None, scale=input_scale).mul_(LOG2_E).view_as(top)  # c_s [B, Hk, n, C]
    if keep is not None:
        padding = ~keep.view(b, 1, n, chunk)
        log_weight = log_weight.masked_fill_(padding, NEG_LOG_WEIGHT)
        k_feat = k_feat.masked_fill(padding[..., None], 0.0)  # not in place: autograd reads exp2's output
    reference = reference * LOG2_E
    running = torch.maximum(torch.cummax(log_weight.flatten(2), -1).values.view_as(log_weight), reference[..., None, None])
    chunk_end = running[..., -1]  # [B, Hk, n]
    state_ref = torch.cat([reference[..., None], chunk_end[..., :-1]], -1)
    # 2^(c_s − M_t) for s ≤ t, ≤ 1 since M_t ≥ c_s; −inf, so 0, for the future keys s > t.  A chunk's last query
    # has M_t = the chunk's end: its row is each key's weight in the chunk sum, as the state's is its scan decay.
    decay = (log_weight[..., None, :] - running[..., :, None]).add_(_future_mask(chunk, key.device)).exp2_()
    carry = torch.exp2(state_ref[..., None] - running)  # ≤ 1
    # the queries' features without φ's m^-½: every query term is a product with them, in numerator and denominator
    q_logits = (query @ log2_projection).unflatten(-2, (n, chunk))
    q_logits = q_logits.sub_(q_logits.detach().amax(-1, keepdim=True))
    floor = QUERY_FLOOR * LOG2_E
    q_floored = q_logits < -floor if floor_mask else None  # clamp's gradient: 0 below the floor
    q_feat = q_logits.clamp_(min=-floor).exp2_()
    return _ChunkTerms(q_feat, k_feat, values, decay[..., -1, :, None], decay[:, :, None], carry[..., -1, None, None],
                       carry[:, :, None, :, :, None], chunk_end[..., -1] / LOG2_E, q_floored)


@functools.cache
def _future_mask(chunk: int, device: torch.device) -> torch.Tensor:
    """``[C, C]``: −inf above the diagonal (the keys after a query in its chunk), 0 elsewhere; made once."""
    return torch.full((chunk, chunk), -math.inf, device=device).triu_(1)


def _chunk_sums(terms: _ChunkTerms) -> torch.Tensor:
    """What each chunk adds to the state, ``φ̃(K)ᵀ([V, 1] ⊙ key_weight)``: ``[B, Hk, n, m, Dv + 1]`` (made when the
    states are scanned, and freed then), a transposed view (:func:`_token_sums`)."""
    values = terms.values if terms.key_weight is None else terms.values * terms.key_weight
    return _token_sums(terms.k_feat, values)


def _scores(terms: _ChunkTerms) -> torch.Tensor:
    """``φ̃(Q)φ̃(K)ᵀ ⊙ decay`` inside each chunk: ``[B, Hk, G, n, C, C]`` (the ``G`` query heads share the keys)."""
    return (terms.q_feat @ terms.k_feat.transpose(-1, -2)[:, :, None]).mul_(terms.decay)


def _combined(terms: _ChunkTerms, scores: torch.Tensor, before: torch.Tensor, columns: slice = slice(None)) -> torch.Tensor:
    """``[n, z]`` of every query, ``[B, Hk, G, n, C, ·]``: its own chunk's keys (``scores``) plus the state before
    its chunk (``before [B, Hk, n, m, Dv + 1]``, the scan's states but the last), carried to the query.  ``columns``
    of ``[V, 1]``: all, or ``slice(-1, None)`` for the denominators ``z`` alone."""
    inter = terms.q_feat @ before[:, :, None, ..., columns]
    inter = inter if terms.carry is None else inter.mul_(terms.carry)
    return inter.add_(scores @ terms.values[:, :, None, ..., columns])


def _causal_chunks(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    projection: torch.Tensor,
    keep: torch.Tensor | None,
    summary: torch.Tensor,
    reference: torch.Tensor | None,
    *,
    chunk: int,
    input_scale: float,
    kernel_fn: KernelFn | None,
    kernel_epsilon: float,
    out: torch.Tensor | None = None,
    log2_projection: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Causal FAVOR+ of ``query [B, Hk, G, L, D]`` on ``key [B, Hk, L, D]``, ``value [B, Hk, L, Dv]``
    (query ``t`` sees keys ``≤ t`` and those summed in ``summary [B, Hk, m, Dv + 1]``, relative to
    ``reference [B, Hk]`` for the softmax kernel; see :func:`_entry`) → ``(out [B, Hk, G, L, Dv],
    summary after the keys, its reference)``.  ``out``: a ``[B, Hk, G, L, Dv]`` view to write the output into
    (whole chunks are divided straight into it: :func:`_divide`); ``log2_projection``: see :func:`_chunk_terms`.

    Chunks of ``C`` tokens: inside a chunk the masked product ``(φ̃(Q)φ̃(K)ᵀ ⊙ decay)[V, 1]`` is exact;
    across chunks a state ``[m, Dv + 1]`` is carried (a scan), so memory is O(L·(m + C) + (L/C)·m·Dv).

    Softmax-kernel stabilisers, all detached and all causal (no future token changes a past output,
    bit for bit): each key is kept relative to its own largest log-feature ``c_s = max_j b_sj``
    (``b_s = ωk_s − ‖k_s‖²/2``) and weighted by ``exp(c_s − M_t)``, ``M_t`` the running maximum of
    ``c`` over the keys up to ``t`` (the ``decay`` inside a chunk, the ``carry`` of the state); each
    query relative to its own largest feature, floored at :data:`QUERY_FLOOR`.

    Why not per-feature references here, as bidirectional attention has: keys of the query's own
    chunk would need a per-query, per-feature reference (an ``[C, C, m]`` computation), and a
    per-feature state across chunks alone (tried) cost ~20 % of the causal pass for rows that only
    differ where the FAVOR+ estimate itself is meaningless (per-dimension std ≳ 15); up to std 10 this
    reproduces the estimate exactly, beyond it the floor keeps every row a convex combination of the
    values with finite gradients (``tests/test_favor_large_norms.py``).
    """
    b, key_heads, group, length, _ = query.shape
    dv = value.shape[-1]
    terms = _chunk_terms(query, key, value, projection, keep, reference, chunk=chunk, input_scale=input_scale,
                         kernel_fn=kernel_fn, kernel_epsilon=kernel_epsilon, log2_projection=log2_projection)
    before, after = _chunk_states(summary, _chunk_sums(terms), terms.scan_decay)
    combined = _combined(terms, _scores(terms), before)
    numerator, denominator = combined[..., :dv], combined[..., dv]
    if out is not None and combined.shape[-3] * chunk == length:  # whole chunks: divided straight into out
        return _divide(numerator, denominator, out=out.unflatten(-2, (-1, chunk))).flatten(-3, -2), after, terms.reference
    result = _divide(numerator, denominator).view(b, key_heads, group, -1, dv)[..., :length, :]
    return result if out is None else out.copy_(result), after, terms.reference


def _chunk_states(summary: torch.Tensor, sums: torch.Tensor, decay: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The scan of the chunk sums ``[B, Hk, n, m, Dv + 1]`` from ``summary`` as ``(states before each chunk
    [B, Hk, n, m, Dv + 1], state after the last)``.  Without autograd the states before are written over the sums
    (which the caller no longer needs), one chunk after another: one block of memory for both, and a slice of it is
    not copied by the batched products that read it, as a slice of all ``n + 1`` states would be."""
    if records_gradients(summary, sums):
        states = _DecayedScan.apply(summary, sums, decay)
        return states[:, :, :-1], states[:, :, -1]
    return sums, _scan_before_(sums, summary, decay)


def _causal_blocks(query, key, value, projection, keep, summary, reference, *, chunk: int, block: int, features,
                   out: torch.Tensor | None = None, entries: tuple[torch.Tensor, torch.Tensor] | None = None):
    """:func:`_causal_chunks` over blocks of ``block`` tokens (whole chunks), the summary carried from one to the
    next → ``(out [B, Hk, G, L, Dv], summary after all keys, its reference)``.  ``out``: a tensor to write the
    blocks' outputs into (else they are concatenated); ``entries``: ``[n_blocks, B, Hk, m, Dv + 1]`` and
    ``[n_blocks, B, Hk]`` tensors that receive the summary and reference each block starts from."""
    outputs = []
    if features["kernel_fn"] is None:
        features = dict(features, log2_projection=_log2_projection(projection, features["input_scale"]))
    for index, (q_block, (k_block, v_block, keep_block)) in enumerate(
        zip(_split(query, block, 3), _key_blocks(key, value, keep, block))
    ):
        if entries is not None:
            entries[0][index], entries[1][index] = summary, reference
        part, summary, reference = _causal_chunks(
            q_block, k_block, v_block, projection, keep_block, summary, reference, chunk=chunk,
            out=None if out is None else out[..., index * block : index * block + q_block.shape[-2], :], **features)
        if out is None:
            outputs.append(part)
    if out is None:
        out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, -2)
    return out, summary, reference


class _CausalFavor(torch.autograd.Function):
    """Softmax-kernel causal FAVOR+ (:func:`_causal_blocks`) that stores no features and no chunk states:
    ``query [B, Hk, G, L, D]``, ``key [B, Hk, L, D]``, ``value [B, Hk, L, Dv]``, ``projection [m, D]``, ``keep
    [B, 1, L]`` or ``None``, the ``summary [B, Hk, m, Dv + 1]`` of earlier keys and its ``reference [B, Hk]``, the
    input scale ``s``, chunk and block lengths → ``(out [B, Hk, G, L, Dv], summary after, its reference)``.

    Forward: block by block, keeping for backward only the inputs, the output and the summary and reference each
    block starts from (``[m, Dv + 1]`` per key head and block).  Backward: blocks in reverse, each one's
    :class:`_ChunkTerms` and chunk states recomputed from its entry (:func:`_causal_block_backward`), the gradient of
    its entry summary carried to the block before.  The stabilisers are constants, as in autograd of
    :func:`_causal_chunks`, where they are detached.  Memory beyond inputs, output and gradients: the entries and
    one block's terms.
    """

    @staticmethod
    def forward(ctx, query, key, value, projection, keep, summary, reference, scale, chunk, block):
        n_blocks = math.ceil(query.shape[3] / block)
        entries = (summary.new_empty(n_blocks, *summary.shape), reference.new_empty(n_blocks, *reference.shape))
        out = query.new_empty(*query.shape[:-1], value.shape[-1])
        features = dict(input_scale=scale, kernel_fn=None, kernel_epsilon=0.0)
        out, summary, reference = _causal_blocks(query, key, value, projection, keep, summary, reference, chunk=chunk,
                                                 block=block, features=features, out=out, entries=entries)
        ctx.save_for_backward(query, key, value, projection, keep, *entries, out)
        ctx.scale, ctx.chunk, ctx.block = scale, chunk, block
        ctx.mark_non_differentiable(reference)
        return out, summary, reference

    @staticmethod
    def backward(ctx, grad_out, grad_summary, _):
        query, key, value, projection, keep, entry_summaries, entry_references, out = ctx.saved_tensors
        wants = ctx.needs_input_grad
        grads = [torch.empty_like(t) if wanted else None for t, wanted in zip((query, key, value), wants)]
        grad_projection = torch.zeros_like(projection) if wants[3] else None
        log2_projection = _log2_projection(projection, ctx.scale)
        for index in range(entry_summaries.shape[0] - 1, -1, -1):
            tokens = slice(index * ctx.block, (index + 1) * ctx.block)
            q_block, k_block, v_block, out_block, g_block = (t[..., tokens, :] for t in (query, key, value, out, grad_out))
            grad_query, grad_key, grad_value = (None if t is None else t[..., tokens, :] for t in grads)
            grad_summary = _causal_block_backward(
                q_block, k_block, v_block, projection, None if keep is None else keep[..., tokens],
                entry_summaries[index], entry_references[index], out_block, g_block, grad_summary, scale=ctx.scale,
                chunk=ctx.chunk, log2_projection=log2_projection, grad_query=grad_query, grad_key=grad_key,
                grad_value=grad_value, grad_projection=grad_projection,
            )
        return (*grads, grad_projection, None, grad_summary if wants[5] else None, None, None, None, None)


def _causal_block_backward(query, key, value, projection, keep, summary, reference, out, grad_out, grad_exit, *,
                           scale: float, chunk: int, log2_projection, grad_query, grad_key, grad_value,
                           grad_projection) -> torch.Tensor:
    """One block of :class:`_CausalFavor` backward: its terms and chunk states recomputed from the entry
    ``summary [B, Hk, m, Dv + 1]`` and ``reference [B, Hk]``; from ``grad_out [B, Hk, G, L, Dv]`` and the gradient
    ``grad_exit`` of the summary after the block, writes the gradients of ``query``, ``key``, ``value`` into
    ``grad_*`` (views of this block's tokens) and adds that of ``projection``; returns the entry summary's.

    With ``c = [n, z] = scores [V, 1] + carry ⊙ φ̃(q)E`` per query (``scores = φ̃(q)φ̃(K)ᵀ ⊙ decay`` in its chunk,
    ``E`` the state before it): ``dc = [g, −g·out] / z``, ``d scores = dc [V, 1]ᵀ ⊙ decay``,
    ``dE = Σ φ̃(q)ᵀ(carry ⊙ dc)`` run back through the scan ``E_{j+1} = scan_decay_j E_j + chunk sum_j``, then the
    features' and values' gradients from both routes.  Helpers each free what only they need (the states, one
    ``[L, m]`` gradient at a time) before the next starts.
    """
    length, dv = query.shape[3], value.shape[-1]
    terms = _chunk_terms(query, key, value, projection, keep, reference, chunk=chunk, input_scale=scale,
                         kernel_fn=None, kernel_epsilon=0.0, floor_mask=True, log2_projection=log2_projection)
    scores = _scores(terms)
    d_combined, d_scores = _read_out_gradients(terms, scores, summary, out, grad_out, query, projection, scale,
                                               grad_query, grad_projection)
    d_entry, d_sums = _state_gradients(terms, d_combined, grad_exit)
    if grad_value is not None:
        d_values = _sum_query_heads(scores.transpose(-1, -2) @ d_combined)
        d_values = d_values.add_((terms.k_feat @ d_sums).mul_(terms.key_weight))
        grad_value.copy_(d_values.flatten(2, 3)[:, :, :length, :dv])
    if grad_key is not None or grad_projection is not None:
        d_logits = _key_feature_gradient(terms, d_scores, d_sums).mul_(terms.k_feat).flatten(2, 3)[:, :, :length]
        _logit_gradients(d_logits, key, projection, scale, grad_key, grad_projection, keys=True)
    return d_entry


def _read_out_gradients(terms: _ChunkTerms, scores, summary, out, grad_out, query, projection, scale: float,
                        grad_query, grad_projection) -> tuple[torch.Tensor, torch.Tensor]:
    """The part of :func:`_causal_block_backward` that needs the chunk states (scanned again from ``summary``):
    returns ``dc`` ``[B, Hk, G, n, C, Dv + 1]`` and ``d scores`` ``[B, Hk, G, n, C, C]``, and writes the query's
    gradient (adds ``ω``'s).  ``dφ̃(q) = d scores φ̃(K) + (carry ⊙ dc) Eᵀ``, times ``φ̃(q)``, 0 where a feature sits
    on the floor."""
    n, chunk = terms.k_feat.shape[2:4]
    length, pad = query.shape[3], n * chunk - query.shape[3]
    before, _ = _chunk_states(summary, _chunk_sums(terms), terms.scan_decay)
    g, o = ((F.pad(t, (0, 0, 0, pad)) if pad else t).unflatten(-2, (n, chunk)) for t in (grad_out, out))
    d_combined = _combined_gradient(g, o, _combined(terms, scores, before, slice(-1, None)))
    d_scores = (d_combined @ terms.values[:, :, None].transpose(-1, -2)).mul_(terms.decay)
    if grad_query is not None or grad_projection is not None:
        d_feat = (d_combined * terms.carry) @ before[:, :, None].transpose(-1, -2)
        d_feat = d_feat.add_(d_scores @ terms.k_feat[:, :, None]).mul_(terms.q_feat).masked_fill_(terms.q_floored, 0)
        _logit_gradients(d_feat.flatten(3, 4)[..., :length, :], query, projection, scale, grad_query, grad_projection)
    return d_combined, d_scores


def _state_gradients(terms: _ChunkTerms, d_combined, grad_exit) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of the block's entry summary ``[B, Hk, m, Dv + 1]`` and of its chunk sums ``[B, Hk, n, m, Dv + 1]``:
    each state's own (read out by its chunk's queries, ``Σ φ̃(q)ᵀ(carry ⊙ dc)``) plus the next one's, carried
    back through the scan from ``grad_exit``, that of the summary after the block."""
    read = _sum_query_heads(terms.q_feat.transpose(-1, -2) @ (d_combined * terms.carry))  # states before each chunk
    d_sums = _reverse_scan(torch.cat([read[:, :, 1:], grad_exit[:, :, None]], 2), terms.scan_decay[:, :, 1:])
    return torch.addcmul(read[:, :, 0], d_sums[:, :, 0], terms.scan_decay[:, :, 0]), d_sums


def _sum_query_heads(tensor: torch.Tensor) -> torch.Tensor:
    """``[B, Hk, G, ...] → [B, Hk, ...]``, summed over the ``G`` query heads of a key head (a view when ``G = 1``)."""
    return tensor[:, :, 0] if tensor.shape[2] == 1 else tensor.sum(2)


def _key_feature_gradient(terms: _ChunkTerms, d_scores, d_sums) -> torch.Tensor:
    """``dφ̃(k)`` ``[B, Hk, n, C, m]``: from the scores of its chunk's queries (all ``G`` heads) and from its
    chunk's sum, ``([V, 1] ⊙ key_weight) d sumᵀ``."""
    d_feat = _sum_query_heads(d_scores.transpose(-1, -2) @ terms.q_feat)
    return d_feat.add_((terms.values * terms.key_weight) @ d_sums.transpose(-1, -2))


def _entry(state: FavorState, softmax: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``state`` as the chunks carry it: one summary ``[kv, k_sum]`` (``[B, Hk, m, Dv + 1]``) and, for the softmax
    kernel, one reference per key head (``[B, Hk]``), its per-feature references folded into their largest."""
    if not softmax:
        return state.summary, None
    reference = state.log_scale.amax(-1)
    return state.summary * torch.exp(state.log_scale - reference[..., None])[..., None], reference


def causal_favor(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    projection: torch.Tensor,
    *,
    scaling: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    kernel_fn: KernelFn | None = None,
    kernel_epsilon: float = 1e-3,
    chunk_size: int = 64,
    block_size: int | None = None,
    initial_state: FavorState | None = None,
) -> tuple[torch.Tensor, FavorState]:
    """Causal FAVOR+ (paper §2.5, prefix sums), chunk by chunk (see :func:`_causal_chunks`).

    Shapes as :func:`bidirectional_favor`; queries are the last ``Lq ≤ Lk`` positions of the keys
    (query ``i`` sees keys ``≤ Lk − Lq + i`` and those of ``initial_state``, a key/value cache).
    Returns ``(output [B, H, Lq, Dv], FavorState after all keys)``.  Blocks of ``block_size`` tokens
    (whole chunks) are processed one after another with the state carried, so only one block of
    features is alive at a time; under autograd the softmax kernel runs as :class:`_CausalFavor`,
    which recomputes them block by block in backward too.  Reference: the causal form of
    :func:`~hf_performer.favor.naive.quadratic_linear_attention`.
    """
    x = _inputs(query, key, value, projection, scaling, key_padding_mask)
    _raise_mmap_threshold()
    b, key_heads, group, q_len, _ = x.query.shape
    k_len, m, dv = x.key.shape[-2], projection.shape[0], x.value.shape[-1]
    if q_len > k_len:
        raise ValueError(f"causal attention needs at least as many keys ({k_len}) as queries ({q_len})")
    state = initial_state or FavorState.empty(b, key_heads, m, dv, x.key.device)
    features = dict(kernel_fn=kernel_fn, kernel_epsilon=kernel_epsilon, input_scale=x.input_scale)
    recording = records_gradients(x.query, x.key, x.value, x.projection, *state)
    own_backward = kernel_fn is None and recording  # _CausalFavor
    chunk = max(1, chunk_size)
    rows = b * key_heads * group
    block = block_length(rows, m, chunk, None if recording else causal_block_elements(rows, q_len, m))
    if own_backward:
        block = recompute_block_length(q_len, dv, group, chunk, block)
    block = max(chunk, (block_size or block) // chunk * chunk)
    prefix = k_len - q_len
    if prefix:  # keys before the first query (a key/value cache) fold into the state
        keep = None if x.keep is None else x.keep[..., :prefix]
        state = _fold(state, x.key[:, :, :prefix], x.value[:, :, :prefix], keep, x.projection, block, features)
    summary, reference = _entry(state, kernel_fn is None)
    inputs = (x.query, x.key[:, :, prefix:], x.value[:, :, prefix:], x.projection,
              None if x.keep is None else x.keep[..., prefix:], summary, reference)
    if own_backward:
        out, summary, reference = _CausalFavor.apply(*inputs, x.input_scale, chunk, block)
    else:
        # several blocks without autograd are written into one output (a list of blocks and their concatenation
        # would hold it twice); under autograd the blocks' outputs are kept anyway and concatenated once
        out = x.query.new_empty(*x.query.shape[:-1], dv) if q_len > block and not recording else None
        out, summary, reference = _causal_blocks(*inputs, chunk=chunk, block=block, features=features, out=out)
    log_scale = state.log_scale if reference is None else reference[..., None].expand(-1, -1, m).contiguous()
    # the chunk sums are transposed views (_chunk_sums), so is the scan's last state: a state handed out is laid out
    # one way, so that decoding from it (or from a copy of it) rounds the same
    return _ungroup(out, x.dtype), FavorState(summary.contiguous(), log_scale)


def _fold(state: FavorState, key, value, keep, projection, block: int, features) -> FavorState:
    """``state`` after the keys ``[B, Hk, L, D]`` (``keep [B, 1, L]`` or ``None``), block by block."""
    for k_block, v_block, keep_block in _key_blocks(key, value, keep, block):
        state = fold_keys(state, *key_features(k_block, projection, keep=keep_block, **features), v_block)
    return state


def recurrent_favor_step(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    projection: torch.Tensor,
    state: FavorState | None = None,
    *,
    scaling: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    kernel_fn: KernelFn | None = None,
    kernel_epsilon: float = 1e-3,
) -> tuple[torch.Tensor, FavorState]:
    """One recurrent (decoding) step: fold the new keys ``[B, Hk, Lk, D]`` into ``state``, then read out
    the queries ``[B, H, Lq, D]``, every one of which sees every key (for ``Lq = 1``, the last
    position: causal decoding).  O((Lq + Lk)·m·Dv), whatever the context length.
    Returns ``(output [B, H, Lq, Dv], new state)``."""
    x = _inputs(query, key, value, projection, scaling, key_padding_mask)
    b, key_heads, group, q_len, d = x.query.shape
    m = projection.shape[0]
    state = state or FavorState.empty(b, key_heads, m, x.value.shape[-1], x.key.device)
    if kernel_fn is None and q_len == 1 and x.key.shape[-2] == 1 and not records_gradients(*x[:4], *state):
        out, state = _one_token_step(x, state)
        return _ungroup(out, x.dtype), state
    features = dict(kernel_fn=kernel_fn, kernel_epsilon=kernel_epsilon, input_scale=x.input_scale)
    state = _fold(state, x.key, x.value, x.keep, x.projection, x.key.shape[-2] or 1, features)
    rows = x.query.reshape(b, key_heads, group * q_len, d)
    key_reference = state.log_scale if kernel_fn is None else None
    q_feat = query_features(rows, x.projection, key_reference=key_reference, **features)
    out = _read_out(q_feat, state.summary)
    return _ungroup(out.view(b, key_heads, group, q_len, -1), x.dtype), state


_TINY = torch.finfo(torch.float32).tiny


def _fold_token(state: FavorState, key_logits: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                keep: torch.Tensor | None, feature_map: str = "favor+") -> FavorState:
    """``state`` (``[B, Hk, ...]``) after one more key per row, without autograd: ``key_logits`` ``ωk``
    ``[B·Hk, m]`` (overwritten) of the scaled ``key`` ``[B·Hk, D]`` (``s·k``), ``value [B·Hk, Dv]``, ``keep
    [B·Hk, 1]`` bool or None → the state with ``B·Hk`` rows (``summary [B·Hk, m, Dv + 1]``, ``log_scale [B·Hk, m]``).

    The arithmetic of :func:`fold_keys` with one key in a handful of operations: ``log φ(k) + ½ log m = ωk − c(k)``
    (``c(k) = ½‖k‖²`` for FAVOR+; :func:`~hf_performer.favor.features.log_normaliser`), ``m^-½`` in ``addcmul``'s
    ``value``, and the numerator and
    the denominator of the state take the key in one update.  A padding key on an empty state (reference
    ``NEG_LOG_WEIGHT``) gets weight ``exp(NEG_LOG_WEIGHT / 2)`` = 0."""
    rows, m = key_logits.shape
    log_feat = key_logits.sub_(log_normaliser(key, key_logits, feature_map))
    if keep is not None:
        log_feat.masked_fill_(~keep, NEG_LOG_WEIGHT)
    previous = state.log_scale.reshape(rows, m)
    log_scale = torch.maximum(previous, log_feat)
    old = previous.sub(log_scale).exp_()
    new = log_feat.sub_(log_scale.clamp_min(NEG_LOG_WEIGHT / 2)).exp_()
    summary = state.summary.reshape(rows, m, -1) * old.unsqueeze(-1)
    return FavorState(summary.addcmul_(new.unsqueeze(-1), F.pad(value, (0, 1), value=1.0).unsqueeze(1), value=m**-0.5),
                      log_scale)


def _one_token_step(x: _Inputs, state: FavorState) -> tuple[torch.Tensor, FavorState]:
    """The decoding step of generation, softmax kernel, without autograd: one new key/value ``[B, Hk, 1, ·]``
    folded into ``state`` and one query per head read out → ``([B, Hk, G, 1, Dv], new state)``.

    The arithmetic of :func:`fold_keys` + :func:`_read_out` with one key, in about 20 tensor operations (the
    general path takes twice as many): at a few hundred tokens of context a step is per-operation overhead,
    not arithmetic (``benchmarks/decode_latency.py``).  The key and the queries are scaled by ``s`` together and
    go through one product with ``ω``, the key folds in with :func:`_fold_token`, one product with the summary
    reads out numerator and denominator, and the query side drops ``m^-½`` altogether (it cancels between
    them): a query that has seen no real key reads 0 (every real key leaves ``k_sum ≥ m^-½`` in the feature it
    maximises)."""
    b, key_heads, group, _, d = x.query.shape
    m, dv = x.projection.shape[0], x.value.shape[-1]
    rows = b * key_heads
    # the key and the queries, scaled once: [B·Hk + B·Hk·G, D], and their logits ωx
    scaled = torch.cat([x.key.reshape(rows, d), x.query.reshape(rows * group, d)]).mul_(x.input_scale)
    logits = torch.mm(scaled, x.projection.t())
    keep = None if x.keep is None else x.keep.expand(b, key_heads, 1).reshape(rows, 1)
    summary, log_scale = _fold_token(state, logits[:rows], scaled[:rows], x.value.reshape(rows, dv), keep)
    q_log = logits[rows:].view(rows, group, m).add_(log_scale.unsqueeze(1))
    q_feat = q_log.sub_(q_log.amax(-1, keepdim=True)).exp_()
    combined = torch.bmm(q_feat, summary)
    out = combined[..., :dv].div_(combined[..., dv:].clamp_min(_TINY))
    return out.view(b, key_heads, group, 1, dv), FavorState(summary.view(b, key_heads, m, dv + 1),
                                                            log_scale.view(b, key_heads, m))


def favor_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    projection: torch.Tensor,
    *,
    scaling: float | None = None,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    kernel_fn: KernelFn | None = None,
    kernel_epsilon: float = 1e-3,
    chunk_size: int = 64,
    initial_state: FavorState | None = None,
    block_size: int | None = None,
    local_window: int = 0,
    sink_tokens: int = 0,
    far_part: str = "favor",
    far_log_weight: torch.Tensor | None = None,
    feature_map: str = "favor+",
    far_key_limit: int = 0,
) -> tuple[torch.Tensor, FavorState | None]:
    """FAVOR+ estimate of ``softmax(scaling · QKᵀ) V``: picks :func:`bidirectional_favor`,
    :func:`causal_favor` or, for one causal query, :func:`recurrent_favor_step`; with a local window
    or sinks, :func:`~hf_performer.favor.hybrid.hybrid_favor_attention`.  A batch of short sequences goes to the
    first two in pieces of sequences (:data:`BATCH_PIECE_ELEMENTS`), whose features then stay in cache.

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
        initial_state: causal only: a :class:`FavorState` (per key head) of earlier keys to continue from.
        block_size: tokens whose features are computed and used together (default
            :func:`block_length`: sized to stay in cache); causal blocks are rounded to whole chunks.
            Results do not depend on it beyond float rounding.
        local_window, sink_tokens: hybrid FAVOR+ (``W``, ``S``): exact softmax weights for the keys
            within ``W`` tokens and the first ``S`` real tokens, FAVOR+ for the others, one normaliser.
            ``0, 0`` (the default) is pure FAVOR+.  Self-attention (causal queries may be the last
            ``Lq ≤ Lk`` positions: a key/value cache), without ``initial_state`` (decoding from a state
            is :func:`~hf_performer.favor.hybrid.recurrent_hybrid_favor`), with the softmax kernel;
            ``sink_tokens`` needs ``local_window ≥ 1``.
        far_part: with a window, what weights the other keys: ``"favor"`` (FAVOR+) or ``"none"``
            (dropped: window-only attention).
        far_log_weight: with a window, ``[H]``: each query head's FAVOR+ weights times ``exp`` of its entry
            (a learnable per-head weight on the far part; None: ×1).
        feature_map: with a window, ``"favor+"`` (the paper's features), ``"softmax"`` or ``"hedgehog"`` (learned
            feature maps; see :func:`~hf_performer.favor.features.log_normaliser`).
        far_key_limit: with a window, ``N > 0``: a query with ``n > N`` far keys has its FAVOR+ weights times
            ``N / n`` (0: no limit; see :func:`~hf_performer.favor.hybrid.hybrid_favor_attention`).

    Returns:
        ``(output [B, H, Lq, Dv], state)``: ``state`` is the causal state after all keys (for
        recurrent decoding), ``None`` when bidirectional.
    """
    if causal and query.shape[-2] > key.shape[-2]:
        raise ValueError(
            f"causal attention needs at least as many keys ({key.shape[-2]}) as queries ({query.shape[-2]})"
        )
    if initial_state is not None and not causal:
        raise ValueError("initial_state continues a causal sequence; bidirectional attention has none")
    if local_window or sink_tokens:
        return _hybrid(query, key, value, projection, local_window, sink_tokens, far_part, far_log_weight, scaling,
                       causal, key_padding_mask, kernel_fn, initial_state, feature_map, far_key_limit)
    if far_part != "favor":
        raise ValueError(f"far_part={far_part!r} drops the keys beyond a local window: it needs local_window ≥ 1")
    if far_log_weight is not None:
        raise ValueError("far_log_weight weighs the FAVOR+ part against a local window: it needs local_window ≥ 1")
    if feature_map != "favor+":
        raise ValueError(f"feature_map={feature_map!r} is a learned feature map of hybrid attention: it needs local_window ≥ 1")
    if far_key_limit:
        raise ValueError(f"far_key_limit={far_key_limit!r} limits the far part of hybrid attention: it needs local_window ≥ 1")
    features = dict(scaling=scaling, kernel_fn=kernel_fn, kernel_epsilon=kernel_epsilon)
    if causal and query.shape[-2] == 1:  # one decoding step sees every key
        return recurrent_favor_step(query, key, value, projection, initial_state, key_padding_mask=key_padding_mask,
                                    **features)

    def attend(piece: slice) -> tuple[torch.Tensor, FavorState | None]:
        mask = None if key_padding_mask is None else key_padding_mask[piece]
        if not causal:
            return bidirectional_favor(query[piece], key[piece], value[piece], projection, key_padding_mask=mask,
                                       block_size=block_size, **features), None
        entry = None if initial_state is None else FavorState(*(t[piece] for t in initial_state))
        return causal_favor(query[piece], key[piece], value[piece], projection, key_padding_mask=mask,
                            chunk_size=chunk_size, block_size=block_size, initial_state=entry, **features)

    pieces = _batch_pieces(query.shape[0], query.shape[1], key.shape[-2], projection.shape[0], query.device)
    if len(pieces) == 1:
        return attend(pieces[0])
    outputs, states = zip(*(attend(piece) for piece in pieces))  # short sequences: small outputs, joined once
    return torch.cat(outputs), (FavorState(*(torch.cat(ts) for ts in zip(*states))) if causal else None)


BATCH_PIECE_ELEMENTS = 1 << 20
"""Feature elements (``H × L × m`` per sequence) per piece of a batch of short sequences (at most
:data:`MIN_BLOCK_TOKENS` keys) that pure FAVOR+ runs separately: 4 MiB of float32, two sequences of 12 heads × 128
tokens with m = 256, fifteen of 22 tokens.  Such a batch is one token block of every (batch, head) row at once, whose
``[rows, L, m]`` features spill out of the caches (17 MiB at 64 × 12 heads × 22 tokens).  On the CPU, in pieces (2 threads,
interleaved in one process, medians against one call): forward 0.71× / 0.65× (bidirectional / causal) at 64 × 12
heads × 22 tokens and 0.81× / 0.64× at 32 × 12 × 128; forward+backward 0.70× / 0.62× and 0.99× / 0.74×.  Longer
sequences run in token blocks already: pieces of one 2,048-token sequence took 1.08–1.11× the time of the whole batch
of 8 (more blocks, each with its fixed operations), of 256–512 tokens 0.93–1.08×; they are not cut.
(``benchmarks/RESULTS.md``)"""


def _batch_pieces(batch: int, heads: int, keys: int, nb_features: int, device: torch.device) -> list[slice]:
    """Slices of the batch holding about :data:`BATCH_PIECE_ELEMENTS` feature elements each (``heads × keys ×
    nb_features`` per sequence), at least one sequence; one slice for sequences of more than
    :data:`MIN_BLOCK_TOKENS` keys, and off the CPU (the pieces were measured against the CPU's caches; on a GPU
    each would add its kernel launches)."""
    per_piece = max(1, BATCH_PIECE_ELEMENTS // (heads * max(1, keys) * nb_features))
    if device.type != "cpu" or keys > MIN_BLOCK_TOKENS or per_piece >= batch:
        return [slice(0, batch)]
    return [slice(start, min(start + per_piece, batch)) for start in range(0, batch, per_piece)]


def _hybrid(query, key, value, projection, window, sinks, far_part, far_log_weight, scaling, causal, key_padding_mask,
            kernel_fn, initial_state, feature_map, far_key_limit):
    """:func:`favor_attention` with a local window or sinks: the cases hybrid attention does not cover yet raise."""
    from hf_performer.favor.hybrid import hybrid_favor_attention  # hybrid builds on this module

    if initial_state is not None:
        raise NotImplementedError(
            f"hybrid FAVOR+ (local_window={window}, sink_tokens={sinks}) cannot continue from a FAVOR+ state: it "
            "needs the window's and the sinks' keys. Decode with hf_performer.favor.hybrid.recurrent_hybrid_favor and "
            "its HybridState, or pass all keys (a key/value cache)."
        )
    if kernel_fn is not None:
        raise ValueError("local_window and sink_tokens need the softmax kernel (kernel='softmax')")
    if not window:
        raise ValueError(f"sink_tokens={sinks} needs local_window ≥ 1 (the current token at least)")
    q_len, k_len = query.shape[-2], key.shape[-2]
    if causal and q_len < k_len:
        # queries are the last positions (a key/value cache): the earlier ones run with zero queries,
        # which change nothing (queries never interact), and are dropped: O(Lk) per step, as exact decoding
        query = F.pad(query, (0, 0, k_len - q_len, 0))
    out = hybrid_favor_attention(
        query, key, value, projection, local_window=window, sink_tokens=sinks, far_part=far_part,
        far_log_weight=far_log_weight, scaling=scaling, causal=causal, key_padding_mask=key_padding_mask,
        feature_map=feature_map, far_key_limit=far_key_limit,
    )[..., k_len - q_len if causal else 0 :, :]
    # the state of a hybrid pass would be FAVOR+ over all keys, which no hybrid continuation could use
    return out, None
