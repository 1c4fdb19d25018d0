"""Hybrid FAVOR+: exact softmax attention inside a local window and to the first tokens ("sinks"),
FAVOR+ random features for every other key, with one normaliser (issue 13; LoLCATs arXiv 2410.10254,
Based arXiv 2402.18668, StreamingLLM's sinks arXiv 2309.17453).

Torch only.  Query ``i`` attends exactly (weights ``exp(s·q_i·k_j)``) to the keys with ``i − W < j ≤ i``
(causal) or ``|i − j| < W`` (bidirectional) and to the first ``S`` real (unpadded) tokens; every other
key it may see contributes ``φ(q_i)ᵀφ(k_j)``, the FAVOR+ estimate of the same weight.  Both kinds of
weight add into one denominator, so the result is one attention distribution: with ``W ≥ L`` it is
exact softmax attention, and ``W = S = 0`` is pure FAVOR+ (:func:`favor_attention` does not come here).

Computation, in blocks of ``W`` tokens (bidirectionally, one block for a sequence of at most ``3W``: see
:func:`_block_layout`; ``n`` blocks of every head of a group of heads, see :data:`GROUP_ELEMENTS`): the FAVOR+ part of query block ``b`` reads one summary ``φ(K)ᵀ[V, 1]`` (``m × (Dv + 1)``) — of all keys bidirectionally,
of the keys before block ``b`` causally (a scan over blocks) — so it costs O(L·m·d) as pure FAVOR+ does.
Exactly weighted keys lie in the span of neighbouring blocks (``b − 1, b`` causal; ``b − 1, b, b + 1``
bidirectional; ``unfold`` views, nothing copied) plus the ``S`` sinks gathered once: one ``[W, span]``
logit product per block, O(L·W·d).  The pairs that summary holds but that lie inside the window
(bidirectional: the window's pairs of the span; causal: those of block ``b − 1``) have their
feature product ``φ(q)ᵀφ(k)`` (``[W, W]`` or ``[W, 3W]`` per block) taken back out of the FAVOR+ part.
Cost O(L·(W + S + m)·d) time, O(L·(W + m)) memory.  The exact part is kept relative to its largest
logit, the FAVOR+ part relative to its own stabiliser (``T − ‖s·q‖²/2 − log m``, see below); each query
adds both after rescaling them to the larger reference, so neither overflows and neither is lost.  Taking
the window's feature products back out of a summary rounds like the summary itself: ~1e-7 of the FAVOR+
mass of those keys.

The far part's features are FAVOR+'s by default, or a learned map (``feature_map="softmax"``, ``φ(x) =
softmax(ωx)``; ``"hedgehog"``, a softmax over each half of the features): all are ``log φ(x) = ωx − c(x) − ½ log m``
and differ only in the normaliser ``c`` (:func:`~hf_performer.favor.features.log_normaliser`; ``‖s·q‖²/2`` in the
stabiliser above is FAVOR+'s ``c``; the query side folds a normaliser of one value per feature into its logits,
:func:`~hf_performer.favor.features.per_query_normaliser`).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from hf_performer.favor.attention import (
    _TINY,
    BLOCK_ELEMENTS,
    FavorState,
    _chunk_states,
    _divide,
    _fold_token,
    _inputs,
    _Inputs,
    _raise_mmap_threshold,
    _token_sums,
    _ungroup,
    _with_ones,
    fold_keys,
    records_gradients,
)
from hf_performer.favor.features import (
    FEATURE_MAPS,
    NEG_LOG_WEIGHT,
    exp_,
    key_features,
    key_log_features,
    log_normaliser,
    per_query_normaliser,
    query_log_features,
)

FAR_PARTS = ("favor", "none")
"""What weights the keys beyond the window and the sinks: FAVOR+, or nothing ("none": window-only
attention, the ablation that shows what the FAVOR+ part adds)."""


def _flat_blocks(tensor: torch.Tensor, edge: int, scale: float | None = None) -> torch.Tensor:
    """``[B, Hk, L, X]`` → ``[B·Hk·L + 2·edge, X]``: the blocks of every head one after another, with ``edge``
    rows of zeros (the blocks a span reaches beyond the ends) before the first and after the last, for
    :func:`_spans`; times ``scale`` if given (on the new tensor: no scaled copy of the input beside it)."""
    flat = tensor.reshape(-1, tensor.shape[-1])
    if not edge:
        return flat if scale is None else flat * scale
    zeros = flat.new_zeros(edge, flat.shape[-1])
    flat = torch.cat([zeros, flat, zeros])
    return flat if scale is None else flat.mul_(scale)


def _blocks_per_slice(block: int, nb_features: int) -> int:
    """Blocks of ``block`` keys whose ``[·, m]`` features fill :data:`BLOCK_ELEMENTS` (at least one)."""
    return max(1, BLOCK_ELEMENTS // (block * nb_features))


def _slices(count: int, size: int) -> list[slice]:
    """``slice``s of ``size`` covering ``range(count)``."""
    return [slice(start, min(start + size, count)) for start in range(0, count, size)]


def _key_log_features(key_flat: torch.Tensor, projection: torch.Tensor, far: torch.Tensor, block: int,
                      recording: bool, feature_map: str) -> torch.Tensor:
    """:func:`key_log_features` of ``key_flat [N, D]`` (``far [N]``: the keys FAVOR+ weighs) → ``[N, m]``, computed a
    few blocks at a time into one tensor so that each slice's passes run in cache (unless ``recording`` gradients)."""
    m = projection.shape[0]
    if recording:
        out = key_log_features(key_flat, projection, feature_map=feature_map)
    else:
        out = key_flat.new_empty(key_flat.shape[0], m)
        for part in _slices(key_flat.shape[0], _blocks_per_slice(block, m) * block):
            key_log_features(key_flat[part], projection, out=out[part], feature_map=feature_map)
    # the few rows FAVOR+ does not weigh (sinks, padding, the zero blocks) by index: a broadcast mask over all
    # rows costs a pass as long as the product's
    return out.index_fill_(0, (~far).nonzero().squeeze(-1), NEG_LOG_WEIGHT)


def _spans(flat: torch.Tensor, block: int, blocks: int, rows: int) -> torch.Tensor:
    """Of :func:`_flat_blocks`: ``[R, X, blocks·block]``, the keys of the ``blocks`` blocks from ``b − reach`` on
    for every block ``b``, transposed, as a view (``unfold``; neighbouring spans overlap in memory, nothing is
    copied).  At a head's ends a span holds the next head's block or the zero rows; the masks drop those pairs."""
    return flat.unfold(0, blocks * block, block)[:rows]


def _block_layout(length: int, window: int, causal: bool, recording: bool = False) -> tuple[int, int]:
    """``(block, reach)``: blocks whose spans (blocks ``b − reach … b`` causal, ``b − reach … b + reach``
    bidirectional) hold every key of their queries' windows.  Causally blocks of ``W`` tokens reaching one block back.
    Bidirectionally without autograd (``recording`` False) blocks of ``W/2`` reaching two blocks to each side where
    ``W`` is even and at least :data:`HALF_BLOCKS_FROM`: a span of ``2.5W`` keys instead of ``3W``, so every per-pair
    product (the window's logits, the feature products taken back out of the FAVOR+ part) shrinks by a sixth; else
    blocks of ``W`` reaching one.  A sequence of at most ``3W`` tokens is one block whose span is itself (reach 0): no
    more pairs than three blocks of ``W`` would have, in a few large products instead of many small ones (a batch of
    short sentences: 64 × 12 heads × 22 tokens with ``W = 16`` went through 1,536 blocks)."""
    if causal:
        return window, 1
    if length <= 3 * window:
        return length, 0
    if not recording and window % 2 == 0 and window >= HALF_BLOCKS_FROM:
        return window // 2, 2
    return window, 1


HALF_BLOCKS_FROM = 32
"""The smallest window whose bidirectional blocks are halved without autograd (:func:`_block_layout`).  W = 64, 8
heads × 64, m = 256, interleaved in one process against blocks of 64 (medians of 5–7): the forward in 0.94–0.97×
the time at 2,048 / 4,096 / 16,384 tokens (1 and 2 threads); forward+backward in 1.07–1.12× at 1,024 / 2,048 (twice
the blocks, each a node of the graph), so autograd keeps blocks of ``W``."""


def _span_masks(keep: torch.Tensor, sink: torch.Tensor, n: int, block: int, reach: int, window: int,
                causal: bool) -> torch.Tensor:
    """Which pairs of query block ``b`` and the keys of its span (see :func:`_block_layout`) are *not* weighted
    exactly: ``[B, 1, n, 1, block, span]`` bool, query then key (the complement, because the query side fills
    where it is True).  Exact: real keys the query sees within the window, and sinks; keys outside the
    sequence are never real.  The FAVOR+ part needs no mask of its own: the pairs it takes back out are the
    exact ones that FAVOR+ weighs (not sinks, not padding: their features are 0)."""
    edge, span = reach * block, ((reach + 1) if causal else (2 * reach + 1)) * block
    distance = torch.arange(block, device=keep.device)[:, None] + edge - torch.arange(span, device=keep.device)  # i − j
    band = distance.abs() < window
    real, is_sink = (F.pad(t[:, 0], (edge, edge)).unfold(1, span, block)[:, :n, None, :] for t in (keep, sink))  # [B, n, 1, span]
    exact = band | is_sink  # [B, n, block, span]: the one tensor of that size, the rest in place
    exact &= real
    if causal:
        exact &= distance >= 0
    return exact.logical_not_()[:, None, :, None]


STEP_ELEMENTS = 1 << 18
"""Query-feature elements per step of the query side without autograd (see :func:`_steps`): 1 MiB of float32, 16
blocks of 64 tokens of one head with m = 256.  Against 4 MiB steps (8 heads × 64, W = 64, S = 4, 1 thread, one
process, medians of 5): 0.94× the time bidirectionally and 0.93× causally at 16,384 tokens, 0.86× / 0.89× at
4,096, 0.95× / 1.07× at 2,048; each step's features, weights and causal states are a quarter the size."""

ROW_ELEMENTS = 1 << 22
"""Most key-feature elements of one (batch, key head) row that the bidirectional hybrid runs whole without autograd
(16,384 tokens with m = 256); a longer row goes through :func:`_segments`.  16 MiB of float32, under glibc's largest
``mmap`` threshold (32 MiB, which :func:`~hf_performer.favor.attention._raise_mmap_threshold` makes the threshold), so
that a row's tensors reuse the heap the row before freed instead of being mapped (and page-faulted) afresh.  One
head at a time at 16,384 tokens (8 heads × 64, m = 256, W = 64, S = 4, 1 thread): forward 15–16 % faster than all
heads at once and an eighth of the memory."""

GROUP_ELEMENTS = 1 << 20
"""Key-feature elements per group of (batch, key head) rows that :func:`hybrid_favor` computes together without
autograd on the CPU (a longer row is a group alone; other devices: :data:`ROW_ELEMENTS`, as the groups were measured
against the CPU's caches): 4 MiB of float32, two rows of 2,048 tokens with m = 256.  Against groups of
:data:`ROW_ELEMENTS` (forward, 2 threads, interleaved in one process, medians of 12): a batch of 64 sentences × 12
heads × 22 tokens (W = 16, S = 4) in 0.73× the time, 32 × 12 heads × 128 tokens in 0.97×, one sequence of 8 heads
× 64 at 2,048 / 4,096 tokens (W = 64, S = 4) in 1.02× / 1.00× (causal, 1,024 tokens: 0.99×); the bidirectional forward
peaks at 15 / 12–15 MiB beyond the inputs at 2,048 / 4,096 tokens against 33 / 39–43 (SDPA: 5.4 / 9.4)."""

AUTOGRAD_ROW_ELEMENTS = 1 << 19
""":data:`GROUP_ELEMENTS` and :data:`ROW_ELEMENTS` under autograd (:class:`_GroupedHybrid`), whose backward holds one group's graph: one row of
2,048 tokens with m = 256.  Bidirectional forward+backward peak beyond the inputs (8 heads × 64, W = 64, S = 4, fresh
processes, 1 thread) 40 / 108 MiB at 2,048 / 4,096 tokens against 275 / 350 with :data:`ROW_ELEMENTS` (SDPA: 22 /
42), in 1.07–1.18× the time at 2,048 (the groups run again in backward; interleaved, 2 threads) and the same time for
a batch of 32 × 12 heads × 128 tokens (MiniLM's shapes, W = 16).  A longer row goes through segments of tokens
(:func:`_segments`) instead, whose backward holds one segment's graph: 107 / 132 / 178 / 469 MiB at 4,096 / 8,192 /
16,384 / 65,536 tokens against 137 / 248 / about 530 / about 1,430 in groups of one row (SDPA: 42 / 82 / 162 / 644),
in 1.27–1.38× the time at 4,096 and 8,192 tokens and 1.12–1.16× at 16,384 (interleaved, 1 and 2 threads): the
segments' context blocks and the second pass over the keys for the summary's gradient.  Causal rows too: one of 2,048
tokens runs whole in 0.87–0.97× the time of the 256-token segments of all rows before (1–4 sequences; 63 against 82
MiB), where one-row segments of 1,024 tokens took 1.00–1.17× (48 MiB)."""


SEGMENT_ELEMENTS = 1 << 21
"""Key-feature elements per segment of a long sequence without autograd (:func:`_segments`; bidirectionally only where
one row is more than :data:`ROW_ELEMENTS`: 161 MiB at 65,536 tokens against 271 in groups, SDPA's 130), all (batch, key
head) rows together: 8 MiB of float32, 1,024 tokens of 8 rows with m = 256.  Forward peak beyond the inputs (8 heads ×
64, W = 64, S = 4, fresh processes) 27 / 61 / 156 MiB at 2,048 / 16,384 / 65,536 tokens against 33 / 68 / 263 in one
pass (SDPA: 6 / 34 / 132), in 1.03–1.07× one pass's time (interleaved, 1 thread, 2,048 and 16,384 tokens: a
segment's fixed operations and its first block's keys); half these segments gave 17 / 47 / 143 MiB in 1.17–1.22×."""

ROW_SEGMENT_ELEMENTS = 1 << 19
"""Key-feature elements per segment of one (batch, key head) row: a causal sequence without autograd whose rows hold at
least this many (2,048 tokens with m = 256) runs one row at a time, each in segments of this size (one pass if it
fits in one).  2 MiB of float32.  Forward peak beyond the inputs (8 heads × 64, W = 64, S = 4, fresh processes,
``benchmarks/op_memory.py``) 11.9 / 11.5 / 38.6 / 146.5 MiB at 2,048 / 4,096 / 16,384 / 65,536 tokens against 27.2 /
33.3 / 61.0 / 153 with all rows in :data:`SEGMENT_ELEMENTS`' segments (SDPA: 5.4 / 8.5 / 32.2 / 130.2), in
1.00–1.03× their time (interleaved, 2 threads, 2,048 to 16,384 tokens): a row's segment is as many tokens as all
rows' was, so its fixed operations and first block's keys weigh as little, and it holds an eighth of the features."""

AUTOGRAD_SEGMENT_ELEMENTS = 1 << 18
"""Key-feature elements per segment of one part of the (batch, key head) rows under autograd (:class:`_RowSegments`,
whose backward holds one part's segment graph; a part is one row on the CPU, :func:`_rows_per_part`): 1,024 tokens of
one row with m = 256, 1 MiB of float32.  Rows longer than a group (:data:`AUTOGRAD_ROW_ELEMENTS`) come here.
Forward+backward peak beyond the inputs (8 heads × 64, W = 64, S = 4, fresh processes, 2 threads,
``benchmarks/op_memory.py``) 53 / 133 / 453 MiB causally at 4,096 / 16,384 / 65,536 tokens and 60 / 121 / 413
bidirectionally, against 98 / 199 / 648 and 102 / 176 / 468 with segments of 256 tokens of all 8 rows (SDPA: 42 / 162 /
644), in 1.01–1.12× their time for one sequence and 0.83–1.22× for four (interleaved in one process, 2 threads,
4,096 and 16,384 tokens; SmolLM2's 3 key heads × 3 query heads: 1.01–1.14×); parts of 4 rows took 1.16–1.17× the
time of one-row parts for those four sequences.  One row's 512-token segments took 1.25–1.73× the time of 1,024-token ones at 2,048 tokens (the pieces'
fixed operations and context blocks).  SmolLM2's 512-token recovery steps run in one plain autograd pass (all rows
one group)."""


def _sinks_of(keep: torch.Tensor, sinks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``S`` real tokens of ``keep [B, 1, L]``: ``(mask [B, 1, L], positions [B, 1, S])``, the positions
    in order (the first of them real only where the sequence has fewer than ``S`` real tokens)."""
    sink = keep & (keep.cumsum(-1) <= sinks)
    if not sinks:
        return sink, torch.zeros(*keep.shape[:-1], 0, dtype=torch.long, device=keep.device)
    return sink, torch.sort((~sink).to(torch.int8), dim=-1, stable=True).indices[..., :sinks]


_TOKEN_AXES = (3, 2, 2, 2)
"""The token axis of ``query [B, Hk, G, L, D]``, ``key``, ``value`` ``[B, Hk, L, ·]`` and ``keep [B, 1, L]``."""


def _segment_length(rows: int, nb_features: int, window: int, recording: bool = False,
                    elements: int | None = None) -> int:
    """Tokens per segment of :func:`_segments` (under autograd if ``recording``; of ``elements`` key-feature elements
    if given): whole windows, at least four."""
    elements = elements or (AUTOGRAD_SEGMENT_ELEMENTS if recording else SEGMENT_ELEMENTS)
    return max(4 * window, elements // (rows * nb_features) // window * window)


def _sinks_within(keep: torch.Tensor | None, sinks: int, tokens: int) -> bool:
    """Whether every sequence has its ``S`` sinks among its first ``tokens`` (``keep [B, 1, L]`` or None)."""
    if keep is None:
        return sinks <= tokens
    return bool((keep[..., :tokens].sum(-1) >= sinks).all())


class _Carry(NamedTuple):
    """What hybrid attention of a segment (:func:`_segments`) takes from the rest of the sequence."""

    summary: torch.Tensor | None  # [B·Hk, m, Dv + 1]: FAVOR+ summary of the far keys its queries read: causally those
    # before the segment's first block, bidirectionally all (None without a FAVOR+ part)
    reference: torch.Tensor | None  # [B·Hk, m]: its per-feature reference
    sink_key: torch.Tensor  # [B, Hk, S, D], not scaled
    sink_value: torch.Tensor  # [B, Hk, S, Dv]
    far_count: torch.Tensor | None = None  # [B]: how many far keys the summary holds (asked for by far_key_limit)


class _Plan(NamedTuple):
    """How :func:`_segments` cuts a sequence: what every segment's call takes besides the tensors."""

    keep: torch.Tensor  # [B, 1, L]: real tokens, the sinks masked out (a segment gets them from the carry)
    first_keep: torch.Tensor | None  # causal: [B, 1, segment], the first segment's real tokens (it finds its own
    # sinks); bidirectional: None (every segment reads the sinks from the carry)
    order: torch.Tensor  # [B, 1, S, 1]: the sinks' positions
    segment: int
    window: int
    sinks: int
    far_part: str
    causal: bool
    tail: tuple  # _Inputs' input scale, dtype and feature map
    far_key_limit: int = 0

    def count(self) -> int:
        return math.ceil(self.keep.shape[-1] / self.segment)

    def tokens(self, index: int) -> tuple[int, int]:
        """``(start, size)`` of segment ``index``'s tokens."""
        start = index * self.segment
        return start, min(self.segment, self.keep.shape[-1] - start)

    def pieces(self, tensors, index: int) -> tuple[tuple, tuple | None, tuple | None]:
        """Segment ``index`` of ``tensors`` (``query [B, Hk, G, L, D]``, ``key``, ``value``, ``keep``), the last block
        (``W`` tokens) of the segment before it (None for the first) and, bidirectionally, the first block of the
        segment after it (None for the last, and causally), as views."""
        (start, size), length = self.tokens(index), self.keep.shape[-1]
        stop = start + size
        piece = tuple(t.narrow(axis, start, size) for t, axis in zip(tensors, _TOKEN_AXES))
        before = None if not index else tuple(t.narrow(axis, start - self.window, self.window)
                                              for t, axis in zip(tensors, _TOKEN_AXES))
        after = None if self.causal or stop == length else tuple(
            t.narrow(axis, stop, min(self.window, length - stop)) for t, axis in zip(tensors, _TOKEN_AXES))
        return piece, before, after

    def run(self, index, projection, far_log_weight, piece, before, after, summary, reference, sink_key, sink_value):
        """:func:`_hybrid_rows` of one segment between the blocks ``before`` and ``after`` (None where there is
        none), from the ``summary`` and ``reference`` of a :class:`_Carry` (causal: what the segment before returned;
        bidirectional: :func:`_far_summary`'s) and the sinks → ``(out [B, Hk, G, T, Dv], summary, reference)``, the
        last two for the next causal segment."""
        parts = [p for p in (before, piece, after) if p is not None]
        query, key, value, keep = (torch.cat(ts, axis) if len(ts) > 1 else ts[0]
                                   for ts, axis in zip(zip(*parts), _TOKEN_AXES))
        far_count = None
        if self.far_key_limit:  # the far keys the summary holds: causally those before the context block, else all
            start = self.tokens(index)[0]
            counted = self.keep[..., : max(0, start - self.window)] if self.causal else self.keep
            far_count = counted.sum(-1)[:, 0].float()
        carry, sinks = _Carry(summary, reference, sink_key, sink_value, far_count), 0
        if self.causal and before is None:  # the first segment finds its own sinks
            carry, sinks, keep = None, self.sinks, self.first_keep
        out, (summary, reference) = _hybrid_rows(_Inputs(query, key, value, projection, keep, *self.tail),
                                                 far_log_weight, causal=self.causal, window=self.window, sinks=sinks,
                                                 far_part=self.far_part, carry=carry, far_key_limit=self.far_key_limit,
                                                 context=(before is not None, after is not None))
        return out, summary, reference


def _plan(x: _Inputs, segment: int, *, causal: bool, window: int, sinks: int, far_part: str,
          far_key_limit: int) -> _Plan:
    """The :class:`_Plan` that cuts the rows of ``x`` into segments of ``segment`` tokens."""
    b, length = x.query.shape[0], x.query.shape[3]
    keep = torch.ones(b, 1, length, dtype=torch.bool, device=x.key.device) if x.keep is None else x.keep
    sink, order = _sinks_of(keep, sinks)
    first_keep = None if x.keep is None or not causal else keep[..., :segment]
    return _Plan(keep & ~sink, first_keep, order[..., None], segment, window, sinks, far_part, causal, tuple(x[5:]),
                 far_key_limit)


def _as_rows(x: _Inputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The (batch, key head) rows of ``x`` as sequences of one key head each: ``query [R, 1, G, L, D]``, ``key``,
    ``value`` ``[R, 1, L, ·]``, ``keep [R, 1, L]`` or None (``R = B·Hk``)."""
    b, key_heads, group, length, d = x.query.shape
    rows = b * key_heads
    keep = None if x.keep is None else x.keep.expand(b, key_heads, length).reshape(rows, 1, length)
    return (x.query.reshape(rows, 1, group, length, d), x.key.reshape(rows, 1, length, d),
            x.value.reshape(rows, 1, length, -1), keep)


def _rows_per_part(device: torch.device, rows: int) -> int:
    """(Batch, key head) rows per part of :class:`_RowSegments`: one on the CPU, where smaller graphs pay
    (:data:`AUTOGRAD_SEGMENT_ELEMENTS`); all ``rows`` elsewhere, where every part is another series of kernel launches
    (not measured on accelerators)."""
    return 1 if device.type == "cpu" else rows


def _segments(x: _Inputs, far_log_weight: torch.Tensor | None, segment: int, *, causal: bool, window: int,
              sinks: int, far_part: str, recording: bool, far_key_limit: int = 0) -> torch.Tensor:
    """:func:`hybrid_favor` of a long sequence, ``segment`` tokens (whole windows) at a time → ``[B, Hk, G, L, Dv]``,
    so that memory holds one segment's key features, spans and masks rather than the sequence's.

    Each segment runs :func:`_hybrid_rows` on its tokens between the last block (``W`` tokens) of the segment before
    and, bidirectionally, the first block of the one after, which hold the keys its end blocks' windows reach (their
    queries are not read out), with a :class:`_Carry`: the sinks, gathered once and masked out of every segment, and
    the FAVOR+ summary its queries read with its reference.  Causally that is the summary of the keys before the
    segment's first block, which segment ``i − 1`` returns, and every sequence must have its sinks in the first
    segment (:func:`_sinks_within`), which finds them itself; bidirectionally it is the summary of every far key
    (:func:`_far_summary`), and every sequence must have ``S`` real tokens.  Block by block this is the arithmetic of
    one pass over the sequence.  Without autograd the segments hold all (batch, key head) rows; under autograd they
    run one part of the rows at a time (:func:`_rows_per_part`: one row on the CPU) as :class:`_RowSegments`, which
    recomputes each segment in backward, so that backward holds one part's segment graph."""
    settings = dict(causal=causal, window=window, sinks=sinks, far_part=far_part, far_key_limit=far_key_limit)
    if not recording:
        plan = _plan(x, segment, **settings)
        tensors = (x.query, x.key, x.value, x.projection, far_log_weight)
        if causal:
            return _run_segments(*tensors, plan)
        summary, reference = _far_summary(plan, x.key, x.value, x.projection)
        return _run_segments(*tensors, plan, summary=summary, reference=reference)
    query, key, value, keep = _as_rows(x)
    rows = query.shape[0]
    parts = _slices(rows, _rows_per_part(x.query.device, rows))
    plans = [_plan(_Inputs(*_part_of((query, key, value, x.projection, keep), part), *x[5:]), segment, **settings)
             for part in parts]
    out = _RowSegments.apply(query, key, value, x.projection, far_log_weight, list(zip(parts, plans)))
    return out.view(*x.query.shape[:-1], -1)


def _gather_sinks(plan: _Plan, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The sinks' keys and values, ``[B, Hk, S, D]`` and ``[B, Hk, S, Dv]``."""
    b, key_heads = key.shape[:2]
    return tuple(t.gather(2, plan.order.expand(b, key_heads, -1, t.shape[-1])) for t in (key, value))


def _far_sum(plan: _Plan, index: int, key: torch.Tensor, value: torch.Tensor, projection: torch.Tensor,
             reference: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """FAVOR+ summary ``φ̃(K)ᵀ[V, 1]`` of the far keys (not sinks, not padding) of segment ``index``, whose keys and
    values are ``key``, ``value`` ``[B, Hk, T, ·]`` → ``(summary [B·Hk, m, Dv + 1], reference [B·Hk, m])``,
    relative to ``reference`` (None: to the segment's own largest log feature)."""
    start, tokens = plan.tokens(index)
    b, key_heads, _, d = key.shape
    m = projection.shape[0]
    far = plan.keep.narrow(2, start, tokens).expand(b, key_heads, tokens).reshape(-1)
    scale, _, feature_map = plan.tail
    log_feat = _key_log_features((key * scale).reshape(-1, d), projection, far, plan.window,
                                 records_gradients(key, projection), feature_map).view(b * key_heads, tokens, m)
    if reference is None:
        reference = log_feat.detach().amax(1).clamp_min(NEG_LOG_WEIGHT / 2)  # masked keys' exp is then 0
    if log_feat.requires_grad:
        k_feat = exp_(log_feat - reference[:, None])
    else:
        k_feat = exp_(log_feat.sub_(reference[:, None]))
    return k_feat.transpose(-1, -2) @ _with_ones(value).reshape(b * key_heads, tokens, -1), reference


def _far_summary(plan: _Plan, key: torch.Tensor, value: torch.Tensor,
                 projection: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Bidirectional: the FAVOR+ summary of every far key of the sequence and its per-feature reference (the keys'
    largest log feature) → ``([B·Hk, m, Dv + 1], [B·Hk, m])``, a segment at a time without autograd, each segment's
    sum rescaled to the larger reference as it is added (as :func:`fold_keys` does); ``(None, None)`` without a
    FAVOR+ part."""
    if plan.far_part != "favor":
        return None, None
    summary = reference = None
    with torch.no_grad():
        for index in range(plan.count()):
            start, tokens = plan.tokens(index)
            part, part_reference = _far_sum(plan, index, key.narrow(2, start, tokens), value.narrow(2, start, tokens),
                                            projection, None)
            if summary is None:
                summary, reference = part, part_reference
                continue
            larger = torch.maximum(reference, part_reference)
            summary = summary * torch.exp(reference - larger)[..., None] + part * torch.exp(part_reference - larger)[..., None]
            reference = larger
    return summary, reference


def _run_segments(query, key, value, projection, far_log_weight, plan: _Plan, entries: list | None = None, *,
                  summary: torch.Tensor | None = None, reference: torch.Tensor | None = None,
                  out: torch.Tensor | None = None):
    """The segments of :func:`_segments` one after another, without autograd → ``out [B, Hk, G, L, Dv]`` (written
    into ``out`` if given).  Bidirectionally every segment reads ``summary`` and ``reference``
    (:func:`_far_summary`'s).  Causally each continues from the one before; ``entries``: a list that receives the
    (summary, reference) each segment starts from (``None`` for the first segment and without a FAVOR+ part); only
    backward needs them (1 MiB per 2,048 tokens at 8 rows, m = 256)."""
    sink_key, sink_value = _gather_sinks(plan, key, value)
    if out is None:
        out = query.new_empty(*query.shape[:-1], value.shape[-1])
    tensors = (query, key, value, plan.keep)
    for index in range(plan.count()):
        if entries is not None:
            entries.append((summary, reference))
        piece, before, after = plan.pieces(tensors, index)
        part, next_summary, next_reference = plan.run(index, projection, far_log_weight, piece, before, after, summary,
                                                      reference, sink_key, sink_value)
        if plan.causal:
            summary, reference = next_summary, next_reference
        out[..., index * plan.segment : index * plan.segment + part.shape[-2], :] = part
    return out


class _SegmentLeaves(NamedTuple):
    """What every segment's recomputation of one part of the rows (:class:`_RowSegments`) in backward shares: leaves
    of their own graph, and the gradients that part's segments add into."""

    projection: torch.Tensor  # [m, D]
    far_log_weight: torch.Tensor | None  # [P, G]
    sink_key: torch.Tensor  # [P, 1, S, D]
    sink_value: torch.Tensor  # [P, 1, S, Dv]
    grads: list  # the gradients of query, key, value (the part's views), ω and far_log_weight (the part's view);
    # None where not wanted


def _segment_leaves(plan: _Plan, inputs, wants, grads: list, projection: torch.Tensor) -> _SegmentLeaves:
    """:class:`_SegmentLeaves` of one part's saved ``inputs`` (query, key, value, projection, far_log_weight) and its
    views of the gradients ``grads``; ``projection``: the leaf of ω that every part shares."""
    key, value, weight = inputs[1], inputs[2], inputs[4]
    keys_wanted = wants[1] or wants[2]
    sink_key, sink_value = (t.detach().requires_grad_(keys_wanted) for t in _gather_sinks(plan, key, value))
    return _SegmentLeaves(projection, None if weight is None else weight.detach().requires_grad_(wants[4]), sink_key,
                          sink_value, grads)


def _segment_backward(plan: _Plan, index: int, inputs, wants, shared: _SegmentLeaves, grad_out: torch.Tensor,
                      summary: torch.Tensor | None, reference: torch.Tensor | None,
                      grad_exit: torch.Tensor | None = None) -> torch.Tensor | None:
    """Segment ``index`` run again under autograd on detached views of its tokens and differentiated at once
    (:func:`_differentiate`); its gradients are added into ``shared.grads`` (its context blocks' keys and values and
    the sinks' at their positions).  ``summary``: the carried summary it reads, a leaf; ``grad_exit``: causally, the
    gradient of the summary it hands on.  Returns the gradient of ``summary`` (None if it has none)."""
    query, key, value = inputs[:3]
    piece, before, after = plan.pieces((query, key, value, plan.keep), index)
    piece = (*_detached(piece[:3], wants[:3]), piece[3])
    before, after = (None if c is None else (*_detached(c[:3], (False, *wants[1:3])), c[3]) for c in (before, after))
    with torch.enable_grad():
        part, summary_out, _ = plan.run(index, shared.projection, shared.far_log_weight, piece, before, after, summary,
                                        reference, shared.sink_key, shared.sink_value)
    start = index * plan.segment
    outputs, grad_outputs = [part], [grad_out[..., start : start + part.shape[-2], :]]
    if grad_exit is not None:
        outputs.append(summary_out)
        grad_outputs.append(grad_exit)
    contexts = [(c[1], c[2]) if c is not None else (None, None) for c in (before, after)]
    got = _differentiate(outputs, grad_outputs, [*piece[:3], shared.projection, shared.far_log_weight, summary,
                                                 shared.sink_key, shared.sink_value, *contexts[0], *contexts[1]])
    grads = shared.grads
    for target, grad, axis in zip(grads, got[:3], _TOKEN_AXES):  # the segment's own tokens
        if target is not None and grad is not None:
            target.narrow(axis, start, grad.shape[axis]).add_(grad)
    for target, grad in zip(grads[3:5], got[3:5]):
        if target is not None and grad is not None:
            target.add_(grad)
    ends = (start - plan.window, start + piece[1].shape[2])  # where the blocks before and after start
    for target, sink_grad, *context_grads in zip(grads[1:3], got[6:8], got[8:10], got[10:12]):  # keys, values
        if target is None:
            continue
        if sink_grad is not None:  # the sinks, at their positions
            target.scatter_add_(2, plan.order.expand(*sink_grad.shape), sink_grad)
        for at, grad in zip(ends, context_grads):
            if grad is not None:
                target.narrow(2, at, grad.shape[2]).add_(grad)
    return got[5]


def _causal_part_backward(plan: _Plan, inputs, wants, shared: _SegmentLeaves, grad_out: torch.Tensor,
                         entries: list) -> None:
    """One part's causal segments in reverse, each run again and differentiated (:func:`_segment_backward`), the
    gradient of its entry summary (``entries``: the (summary, reference) each segment started from) carried to the
    segment before."""
    grad_summary = None
    for index in range(plan.count() - 1, -1, -1):
        summary, reference = entries[index]
        if summary is not None:
            summary = summary.detach().requires_grad_(any(wants[1:4]))
        grad_summary = _segment_backward(plan, index, inputs, wants, shared, grad_out, summary, reference, grad_summary)


def _bidirectional_part_backward(plan: _Plan, inputs, wants, shared: _SegmentLeaves, grad_out: torch.Tensor,
                                entries: list) -> None:
    """One part's bidirectional segments, in two passes: every segment run again with its rows' summary of all far
    keys (``entries``: its one (summary, reference)) as a leaf, adding up the summary's gradient; then each segment's
    share of the summary recomputed (:func:`_far_sum`, the reference held fixed, as the forward's maximum is) to take
    that gradient into its keys, values and ω."""
    summary, reference = entries[0]
    if summary is not None:
        summary = summary.detach().requires_grad_(any(wants[1:4]))
    grad_summary = None
    for index in range(plan.count()):
        got = _segment_backward(plan, index, inputs, wants, shared, grad_out, summary, reference)
        if got is not None:
            grad_summary = got if grad_summary is None else grad_summary.add_(got)
    if grad_summary is None:
        return
    key, value = inputs[1:3]
    for index in range(plan.count()):
        start, tokens = plan.tokens(index)
        k, v = _detached((key.narrow(2, start, tokens), value.narrow(2, start, tokens)), wants[1:3])
        with torch.enable_grad():
            part = _far_sum(plan, index, k, v, shared.projection, reference)[0]
        got = _differentiate([part], [grad_summary], [k, v, shared.projection])
        for target, grad in zip(shared.grads[1:3], got[:2]):
            if target is not None and grad is not None:
                target.narrow(2, start, grad.shape[2]).add_(grad)
        if shared.grads[3] is not None and got[2] is not None:
            shared.grads[3].add_(got[2])
        del part, got


def _part_of(tensors, rows: slice) -> list:
    """``tensors`` in the order of :class:`_RowSegments`' inputs or of :class:`_Inputs` (query, key, value, ω, then
    ``far_log_weight`` or ``keep``, or their gradients) for the (batch, key head) ``rows`` of one part: views of those
    rows, ω (position 3, every row's) whole, None as None."""
    return [None if t is None else (t if position == 3 else t[rows]) for position, t in enumerate(tensors)]


class _RowSegments(torch.autograd.Function):
    """:func:`_segments` under autograd, one part of the (batch, key head) rows at a time (:func:`_rows_per_part`):
    ``query [R, 1, G, L, D]``, ``key``, ``value`` ``[R, 1, L, ·]``, ``projection [m, D]``, ``far_log_weight [R, G]``
    or None, ``(rows, plan)`` of each part (a slice of the rows and their :class:`_Plan`) → ``out [R, 1, G, L, Dv]``.

    Forward: each part's segments without autograd (:func:`_run_segments`), keeping for backward only the inputs and
    what each part's segments read from the rest of its rows: causally the (summary, reference) each segment starts
    from (``[P, m, Dv + 1]``), bidirectionally the rows' summary of all far keys (:func:`_far_summary`).  Backward:
    part by part, each segment run again under autograd and differentiated at once (:func:`_causal_part_backward`,
    :func:`_bidirectional_part_backward`), its gradients written into one gradient tensor per input.  So backward
    holds one part's segment graph, no pieces of the gradients and no list of outputs, and ``torch.autograd.grad``
    works through it.  Not twice differentiable."""

    @staticmethod
    def forward(ctx, query, key, value, projection, far_log_weight, parts):
        inputs = (query, key, value, projection, far_log_weight)
        out = query.new_empty(*query.shape[:-1], value.shape[-1])
        ctx.entries = []
        for rows, plan in parts:
            part = _part_of(inputs, rows)
            if plan.causal:
                entries = []
                _run_segments(*part, plan, entries, out=out[rows])
            else:
                entries = [_far_summary(plan, part[1], part[2], projection)]
                _run_segments(*part, plan, summary=entries[0][0], reference=entries[0][1], out=out[rows])
            ctx.entries.append(entries)
        ctx.save_for_backward(*inputs)
        ctx.parts = parts
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        inputs, wants = ctx.saved_tensors, ctx.needs_input_grad[:5]
        grads = [torch.zeros_like(t) if wanted else None for t, wanted in zip(inputs, wants)]
        projection = inputs[3].detach().requires_grad_(wants[3])
        for (rows, plan), entries in zip(ctx.parts, ctx.entries):
            part_inputs = _part_of(inputs, rows)
            shared = _segment_leaves(plan, part_inputs, wants, _part_of(grads, rows), projection)
            backward = _causal_part_backward if plan.causal else _bidirectional_part_backward
            backward(plan, part_inputs, wants, shared, grad_out[rows], entries)
        return (*grads, None)


def hybrid_favor(x: _Inputs, *, causal: bool, window: int, sinks: int, far_part: str = "favor",
                 far_log_weight: torch.Tensor | None = None, far_key_limit: int = 0) -> torch.Tensor:
    """Hybrid attention of the validated inputs ``x`` (``query [B, Hk, G, L, D]``, keys and values
    ``[B, Hk, L, ·]``, the same ``L``) → ``[B, Hk, G, L, Dv]`` in float32.  ``window ≥ 1``;
    ``far_part="none"`` drops the FAVOR+ part (window + sinks only: no features are computed);
    ``far_log_weight [Hk, G]`` (of :func:`_far_log_weight`) multiplies each query head's FAVOR+ weights by its
    ``exp``; ``far_key_limit = N > 0``: a query with ``n > N`` far keys has its FAVOR+ weights times ``N / n``
    (:func:`_far_key_offset`).

    Sequences longer than a segment (:data:`SEGMENT_ELEMENTS` of all rows, :data:`AUTOGRAD_SEGMENT_ELEMENTS` of a
    part of the rows under autograd, one row on the CPU) go through :func:`_segments` (a segment of tokens at a time;
    under autograd one part at a time): causal ones without autograd always, the others where one (batch, key head) row is more than a group.
    Causal ones without autograd whose rows hold at least :data:`ROW_SEGMENT_ELEMENTS` key features go one row at a
    time instead, each in segments of that size.  Others go in groups of rows of :data:`GROUP_ELEMENTS` key features
    (:data:`AUTOGRAD_ROW_ELEMENTS` under autograd), each written into one output (under autograd as
    :class:`_GroupedHybrid`, which runs each again in backward, so that backward holds one group's tensors rather than
    every group's)."""
    b, key_heads, group, length, d = x.query.shape
    _raise_mmap_threshold()
    recording = records_gradients(x.query, x.key, x.value, x.projection, far_log_weight)
    elements = AUTOGRAD_ROW_ELEMENTS if recording else ROW_ELEMENTS  # the longest row run whole (causally: under autograd)
    m = x.projection.shape[0]
    grouped = GROUP_ELEMENTS if not recording and x.query.device.type == "cpu" else elements
    rows, per_group = b * key_heads, max(1, grouped // (length * m))
    weight = None if far_log_weight is None or far_part != "favor" else far_log_weight.expand(b, key_heads, group).reshape(rows, group)
    row_wise = causal and not recording and length * m >= ROW_SEGMENT_ELEMENTS  # one row at a time
    if row_wise:
        per_group, segment = 1, _segment_length(1, m, window, elements=ROW_SEGMENT_ELEMENTS)
    else:  # under autograd the segments run a part of the rows at a time
        segment = _segment_length(_rows_per_part(x.query.device, rows) if recording else rows, m, window, recording)
    if causal:  # under autograd, where one row alone is more than a group
        long = (not recording or length * m > elements) and _sinks_within(x.keep, sinks, segment)
    else:  # where one row alone is more than a group; every sequence needs S real tokens (the sinks every query sees)
        long = length * m > elements and _sinks_within(x.keep, sinks, length)
    segmented = length > segment and long
    if segmented and not row_wise:
        return _segments(x, weight, segment, causal=causal, window=window, sinks=sinks, far_part=far_part,
                         recording=recording, far_key_limit=far_key_limit)

    def attend(inputs: _Inputs, w: torch.Tensor | None) -> torch.Tensor:
        if segmented:  # one row, in segments
            return _segments(inputs, w, segment, causal=True, window=window, sinks=sinks, far_part=far_part,
                             recording=False, far_key_limit=far_key_limit)
        return _hybrid_rows(inputs, w, causal=causal, window=window, sinks=sinks, far_part=far_part,
                            far_key_limit=far_key_limit)[0]

    if per_group >= rows:
        return attend(x, weight)
    query, key, value, keep = _as_rows(x)
    groups = _Groups(keep, _slices(rows, per_group), attend, tuple(x[5:]))
    tensors = (query, key, value, x.projection, weight)
    out = _GroupedHybrid.apply(*tensors, groups) if recording else groups.run(*tensors)
    return out.view(b, key_heads, group, length, -1)


class _Groups(NamedTuple):
    """How :func:`hybrid_favor` cuts its ``R = B·Hk`` rows into groups."""

    keep: torch.Tensor | None  # [R, 1, L] bool
    parts: list[slice]  # the groups' rows
    attend: Callable  # (_Inputs, far_log_weight or None) → one group's output
    tail: tuple  # _Inputs' input scale, dtype and feature map

    def group(self, part: slice, query, key, value, projection, far_log_weight) -> torch.Tensor:
        """One group's output, from its rows of ``query``, ``key``, ``value`` and ``far_log_weight`` (or None)."""
        keep = None if self.keep is None else self.keep[part]
        return self.attend(_Inputs(query, key, value, projection, keep, *self.tail), far_log_weight)

    def run(self, query, key, value, projection, far_log_weight) -> torch.Tensor:
        """Every group, written into one output ``[R, 1, G, L, Dv]``."""
        out = query.new_empty(*query.shape[:-1], value.shape[-1])
        for part in self.parts:
            out[part] = self.group(part, query[part], key[part], value[part], projection,
                                   None if far_log_weight is None else far_log_weight[part])
        return out


class _GroupedHybrid(torch.autograd.Function):
    """:meth:`_Groups.run` under autograd: ``query [R, 1, G, L, D]``, ``key``, ``value`` ``[R, 1, L, ·]``, ``projection
    [m, D]``, ``far_log_weight [R, G]`` or None, the :class:`_Groups` → ``out [R, 1, G, L, Dv]``.  Forward without
    autograd, keeping only the inputs; backward group by group, each run again under autograd on detached rows and
    differentiated at once (:func:`_differentiate`), its gradients written into one gradient tensor per input, so
    that backward holds one group's graph and no per-group pieces of the gradients or outputs (non-reentrant
    checkpoints of each group and a concatenation of their outputs held both).  Not twice differentiable."""

    @staticmethod
    def forward(ctx, query, key, value, projection, far_log_weight, groups):
        ctx.save_for_backward(query, key, value, projection, far_log_weight)
        ctx.groups = groups
        return groups.run(query, key, value, projection, far_log_weight)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        groups, inputs = ctx.groups, ctx.saved_tensors
        wants = ctx.needs_input_grad[:5]
        grads = [torch.zeros_like(t) if wanted else None for t, wanted in zip(inputs, wants)]
        query, key, value, projection, weight = inputs
        leaf_projection = projection.detach().requires_grad_(wants[3])
        for part in groups.parts:
            rows = _detached((query[part], key[part], value[part]), wants)
            leaf_weight = None if weight is None else weight[part].detach().requires_grad_(wants[4])
            with torch.enable_grad():
                out = groups.group(part, *rows, leaf_projection, leaf_weight)
            got = _differentiate([out], [grad_out[part]], [*rows, leaf_projection, leaf_weight])
            for position, (target, grad) in enumerate(zip(grads, got)):
                if target is not None and grad is not None:
                    (target if position == 3 else target[part]).add_(grad)  # ω is every group's
            del out, got  # not alive while the next group runs
        return (*grads, None)


def _detached(tensors, wanted) -> list[torch.Tensor]:
    """``tensors`` (views of the inputs) as leaves of a graph of their own, each requiring gradients where ``wanted``."""
    return [t.detach().requires_grad_(w) for t, w in zip(tensors, wanted)]


def _differentiate(outputs: list[torch.Tensor], grad_outputs: list[torch.Tensor],
                   leaves: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """The gradients of ``outputs`` (given theirs) with respect to each of ``leaves`` that requires one, in order;
    None for the others and for leaves the outputs do not depend on."""
    wanted = [leaf for leaf in leaves if leaf is not None and leaf.requires_grad]
    found = dict(zip(map(id, wanted), torch.autograd.grad(outputs, wanted, grad_outputs, allow_unused=True)))
    return [None if leaf is None else found.get(id(leaf)) for leaf in leaves]


def _hybrid_rows(x: _Inputs, far_log_weight: torch.Tensor | None, *, causal: bool, window: int, sinks: int,
                 far_part: str, carry: _Carry | None = None,
                 context: tuple[bool, bool] = (False, False), far_key_limit: int = 0) -> tuple[torch.Tensor, tuple[torch.Tensor | None, ...]]:
    """:func:`hybrid_favor` of all rows at once (``far_log_weight [B·Hk, G]`` or None).  Blocks
    (:func:`_block_layout`) of all heads lie one after another (``R = B·Hk·n`` of them); the ``G`` query heads
    of a key head share its key blocks (``[R, G·block, ·]`` queries).

    A segment of a longer sequence (:func:`_segments`) comes with a ``carry``: its sinks, and the FAVOR+ summary
    its queries read — causally of the far keys before block 0, bidirectionally of every far key of the sequence
    (these keys' features then only take the window's pairs back out).  ``context``: whether the first and the last
    block are the neighbouring segments' (their keys count, their queries are not read out).  Returns ``(out [B,
    Hk, G, L − W·(context blocks), Dv], (summary, reference))``: causally with a FAVOR+ part, the summary ``[B·Hk,
    m, Dv + 1]`` of the far keys before the last block and its reference ``[B·Hk, m]`` (a :class:`_Carry`'s), else
    ``(None, None)``."""
    query, key, value, projection, keep, scale, _, feature_map = x
    b, key_heads, group, length, d = query.shape
    dv, m = value.shape[-1], projection.shape[0]
    recording = records_gradients(query, key, value, projection, far_log_weight)
    block, reach = (window, 1) if carry is not None else _block_layout(length, window, causal, recording)
    n = math.ceil(length / block)
    pad = n * block - length
    if keep is None:
        keep = torch.ones(b, 1, length, dtype=torch.bool, device=key.device)
    if pad:
        query, key, value = F.pad(query, (0, 0, 0, pad)), F.pad(key, (0, 0, 0, pad)), F.pad(value, (0, 0, 0, pad))
        keep = F.pad(keep, (0, pad), value=False)
    sink, order = _sinks_of(keep, sinks)  # [B, 1, L']: the first S real tokens, and their positions
    rows, heads, span = b * key_heads * n, b * key_heads, (reach + 1) if causal else (2 * reach + 1)
    edge = reach * block  # zero rows before the first block and after the last
    inner = slice(edge, edge + rows * block)

    key_flat = _flat_blocks(key, edge, scale)  # [R·block + 2·edge, D]
    # [R·block + 2·edge, Dv + 1]: [V, 1] with rows of ones at the edges (in place of _flat_blocks' zeros: one
    # pass, and the masks give those keys weight 0 anyway)
    values = F.pad(value.reshape(-1, dv), (0, 1, edge, edge), value=1.0)
    k_feat = summary = reference = scan = None
    initial = None if carry is None else carry.summary  # [B·Hk, m, Dv + 1]: the state before block 0
    if far_part == "favor":
        # FAVOR+ key features relative to a per-feature reference every query of the block may use:
        # causal, the keys of blocks ≤ b − 1 (block b's own keys are all inside the window); bidirectional, all keys
        far_flat = _flat_blocks((keep & ~sink).expand(b, key_heads, -1)[..., None], edge)[:, 0]
        log_feat = _key_log_features(key_flat, projection, far_flat, block, recording, feature_map)  # [R·block + 2·edge, m]
        if causal:  # the carry's keys come before block 0
            block_max = log_feat[inner].detach().view(heads, n, block, m).amax(-2)  # [B·Hk, n, m]
            prior = torch.full_like(block_max[:, :1], NEG_LOG_WEIGHT) if carry is None else carry.reference[:, None]
            after = torch.cummax(torch.maximum(block_max, prior), 1).values  # reference of the keys of blocks ≤ c
            key_ref = after
            reference = torch.cat([prior, after[:, :-1]], 1)  # blocks ≤ b − 1
        elif carry is not None:  # a segment: the sequence's reference
            reference = key_ref = carry.reference[:, None].expand(heads, n, m)
        else:
            reference = key_ref = log_feat[inner].detach().view(heads, 1, n * block, m).amax(-2).expand(heads, n, m)
        # a block sees no far key only where its reference is NEG_LOG_WEIGHT: halved, the masked keys' exp is 0
        key_ref = F.pad(key_ref.clamp_min(NEG_LOG_WEIGHT / 2).reshape(rows, 1, m), (0, 0, 0, 0, reach, reach))
        k_feat = log_feat.view(rows + 2 * reach, block, m)
        if recording:  # (in place on a view, each change would copy the whole tensor in backward)
            k_feat = exp_(k_feat - key_ref)
        else:  # in place, a few blocks at a time (cache-resident)
            for part in _slices(rows + 2 * reach, _blocks_per_slice(block, m)):
                exp_(k_feat[part].sub_(key_ref[part]))
        k_feat = k_feat.view(-1, m)

        inner_k, inner_v = k_feat[inner].view(heads, n * block, m), values[inner].view(heads, n * block, dv + 1)
        if causal:  # the keys of blocks ≤ b − 1 (a scan over blocks), relative to their reference; the pairs of
            # block b − 1 inside the window are taken back out by the query side, pair by pair
            scan = _BlockScan(inner_k.view(heads, n, block, m), inner_v.view(heads, n, block, dv + 1),
                              torch.exp(reference - after)[..., None])  # decay from blocks ≤ c − 1 to blocks ≤ c
            if recording:
                summary = scan.states(slice(0, heads), slice(0, n), initial)[0]  # [B·Hk, n, m, Dv + 1]
        elif carry is not None:  # all keys of the sequence, [B·Hk, 1, m, Dv + 1]
            summary = carry.summary[:, None]
        else:  # all keys, [B·Hk, 1, m, Dv + 1]; the pairs inside the window are taken back out pair by pair
            summary = (inner_k.transpose(-1, -2) @ inner_v)[:, None]

    # [B·Hk, n, G·block, ·]: the shape of the weights, so masks apply in place to them and not to a view of them
    # (an in-place change of a view costs a copy of the whole tensor in backward)
    hidden = _span_masks(keep, sink, n, block, reach, window, causal).expand(b, key_heads, n, group, block, span * block)
    keys = _Keys(
        _spans(key_flat, block, span, rows).view(heads, n, d, -1),
        None if k_feat is None else _spans(k_feat, block, 1 if causal else span, rows).view(heads, n, m, -1),
        _spans(values, block, span, rows).transpose(-1, -2).view(heads, n, span * block, dv + 1),
        hidden.reshape(heads, n, group * block, -1), summary,
        None if reference is None else reference.reshape(heads, n, 1, m), None, None, None,
        _query_far_weights(far_log_weight, keep & ~sink, carry, far_part, far_key_limit, window, causal, n, heads,
                           group),
        feature_map,
    )
    if sinks:  # sinks beyond the span, gathered once: [B, 1, S] positions
        sinks = min(sinks, n * block)
        sink_key = key.gather(2, order[..., None].expand(b, key_heads, sinks, d)) * scale  # [B, Hk, S, D]
        block_start = (torch.arange(n, device=key.device) * block)[:, None]  # [n, 1]
        outside = order[:, :, None, :] < block_start - edge  # [B, 1, n, S]
        if not causal:
            outside = outside | (order[:, :, None, :] >= block_start + block + edge)
        sink_visible = (sink.gather(-1, order)[:, :, None, :] & outside).expand(b, key_heads, n, sinks).reshape(heads, n, 1, 1, sinks)
        sink_values = _with_ones(value.gather(2, order[..., None].expand(b, key_heads, sinks, dv)))
        keys = keys._replace(sink_key=sink_key.view(heads, sinks, d), sink_visible=sink_visible,
                             sink_values=sink_values.view(heads, sinks, dv + 1))

    if carry is not None and carry.sink_key.shape[2]:  # sinks before these tokens: seen by every query
        sink_count = carry.sink_key.shape[2]
        keys = keys._replace(sink_key=(carry.sink_key * scale).reshape(heads, sink_count, d),
                             sink_visible=torch.ones(heads, n, 1, 1, sink_count, dtype=torch.bool, device=key.device),
                             sink_values=_with_ones(carry.sink_value).reshape(heads, sink_count, dv + 1))

    # query side, a few blocks at a time so that their [G·block, m] features and [G·block, span] weights stay in
    # cache; in one step when recording gradients: autograd keeps every step's tensors anyway, and each slice of
    # the shared key-side views would write a zero gradient of the whole view in backward (quadratic in L)
    # a segment's context blocks (the neighbouring segments' tokens): their keys count, their queries are not read out
    first, stop = int(context[0]), n - int(context[1])
    count = stop - first  # blocks read out
    q_rows = query.view(b, key_heads, group, n, block, d)[:, :, :, first:stop]
    q_rows = q_rows.transpose(2, 3).reshape(heads, count, group * block, d) * scale
    last = None  # causal FAVOR+: the state before the last block
    if recording:
        out = _read_out(q_rows, projection, keys, slice(0, heads), slice(first, stop), causal)
        if scan is not None:
            last = summary[:, -1]
    else:  # each step writes its blocks into one output (no list of them and their concatenation); causal FAVOR+
        # states are scanned step by step, from the state after the head's previous step
        out = q_rows.new_empty(heads, count, group * block, dv)
        states = carried = None  # causal: the states the step's blocks read, the state after the head's previous step
        if scan is not None:
            last = q_rows.new_empty(heads, m, dv + 1)
        for head_rows, blocks in _steps(heads, stop, max(1, STEP_ELEMENTS // (group * block * m)), first):
            if scan is not None:
                if blocks.start == first:  # the head's first step: from the carry, through block 0 when it is skipped
                    carried = None if initial is None else initial[head_rows]
                    if first:
                        carried = scan.states(head_rows, slice(0, first), carried)[1]
                states, carried = scan.states(head_rows, blocks, carried)
                if blocks.stop >= n:
                    last[head_rows] = states[:, -1]
            written = slice(blocks.start - first, blocks.stop - first)
            out[head_rows, written] = _read_out(q_rows[head_rows, written], projection, keys, head_rows, blocks, causal,
                                                states)
    out = out.view(b, key_heads, count, group, block, dv).transpose(2, 3).reshape(b, key_heads, group, count * block, dv)
    return out[..., : min(count * block, length - first * block), :], (last, None if last is None else reference[:, -1])


def _far_key_offset(eligible: torch.Tensor, far_count: torch.Tensor | None, window: int, causal: bool,
                    limit: int) -> torch.Tensor:
    """``min(0, log N − log n_i)`` ``[B, 1, L]``: the log factor ``min(1, N / n_i)`` on the FAVOR+ weights of query ``i``
    with ``n_i`` far keys (``N = limit``).  ``eligible [B, 1, L]``: the keys FAVOR+ may weigh (real, not sinks);
    ``far_count [B]`` (a segment's :class:`_Carry`): far keys before these tokens (causal) or of the whole sequence
    (bidirectional).  Causally query ``i``'s far keys are the eligible ``j ≤ i − W``; bidirectionally all eligible keys
    but those with ``|i − j| < W``.  Why: learned features are bounded and sum to 1, so the far part's share of the
    attention mass grows with its number of keys; a model trained on blocks whose queries saw at most ``N`` far keys
    keeps that share at longer contexts (``examples/results/smollm2_hybrid.md``)."""
    length = eligible.shape[-1]
    sums = F.pad(eligible.float().cumsum(-1), (1, 0))  # [B, 1, L + 1]: eligible keys before each position
    position = torch.arange(length, device=eligible.device)
    if causal:
        count = sums[..., (position - window + 1).clamp_min(0)]
        if far_count is not None:
            count = count + far_count[:, None, None]
    else:
        total = sums[..., -1:] if far_count is None else far_count[:, None, None]
        count = total - (sums[..., (position + window).clamp_max(length)] - sums[..., (position - window + 1).clamp_min(0)])
    return _limit_log_factor(count, limit)


def _limit_log_factor(count: torch.Tensor, limit: int) -> torch.Tensor:
    """``min(0, log N − log n)`` of far-key counts ``n`` (float, any shape; ``N = limit``): the log of each query's
    ``far_key_limit`` factor ``min(1, N / n)``."""
    return (math.log(limit) - count.clamp_min(1).log()).clamp_max_(0)


def _query_far_weights(far_log_weight: torch.Tensor | None, eligible: torch.Tensor, carry: _Carry | None, far_part: str,
                       limit: int, window: int, causal: bool, n: int, heads: int, group: int) -> torch.Tensor | None:
    """What :func:`_read_out` adds to the log of each query's FAVOR+ weights, ``[B·Hk, n, G·block, 1]`` (None: nothing):
    the per-head ``far_log_weight [B·Hk, G]`` and, with ``limit``, each query's :func:`_far_key_offset`."""
    b, block = eligible.shape[0], eligible.shape[-1] // n
    weights = None if far_log_weight is None else far_log_weight.repeat_interleave(block, 1)[:, None, :, None]
    if limit and far_part == "favor":
        offset = _far_key_offset(eligible, None if carry is None else carry.far_count, window, causal, limit)
        offset = offset.view(b, 1, 1, n, 1, block).expand(b, heads // b, 1, n, group, block).reshape(heads, n, -1, 1)
        weights = offset if weights is None else weights + offset
    return None if weights is None else weights.expand(-1, n, -1, -1)


class _BlockScan(NamedTuple):
    """Causal FAVOR+ states of the query blocks, scanned on demand: block ``b`` reads the summary of the keys of
    blocks ``≤ b − 1``.  Without autograd the query side scans them step by step (:func:`_steps` goes through a
    head's blocks in order), so that no ``[B·Hk, n, m, Dv + 1]`` tensor of every block's state (and every block's
    sum) is held: with ``W = 64`` those are twice the size of the key features."""

    k_feat: torch.Tensor  # [B·Hk, n, W, m], relative to the reference of their block
    values: torch.Tensor  # [B·Hk, n, W, Dv + 1]
    decay: torch.Tensor  # [B·Hk, n, m, 1]: a state's rescaling from blocks ≤ c − 1 to blocks ≤ c

    def states(self, heads: slice, blocks: slice, initial: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(states before each of ``blocks`` [h, c, m, Dv + 1], state after the last)`` of key heads ``heads``,
        from ``initial`` (``[h, m, Dv + 1]``, the state before the first of ``blocks``; None: before block 0)."""
        sums = _token_sums(self.k_feat[heads, blocks], self.values[heads, blocks])  # [h, c, m, Dv + 1]
        initial = torch.zeros_like(sums[:, 0]) if initial is None else initial
        before, after = _chunk_states(initial[None], sums[None], self.decay[None, heads, blocks])
        return before[0], after[0]


def _steps(heads: int, n: int, chunk: int, first: int = 0):
    """``(heads, blocks)`` slices covering the query blocks ``first … n − 1`` of ``heads`` heads ``chunk`` blocks at
    a time (whole heads when a head has no more than ``chunk``), each head's in order (``blocks.stop`` at most ``n``)."""
    count = n - first
    if chunk >= count:
        for h in range(0, heads, chunk // count):
            yield slice(h, min(h + chunk // count, heads)), slice(first, n)
    else:
        for h in range(heads):
            for start in range(first, n, chunk):
                yield slice(h, h + 1), slice(start, min(start + chunk, n))


class _Keys(NamedTuple):
    """What the query side reads, per key head (``H = B·Hk``) and query block (``n``): views, nothing copied."""

    key_spans: torch.Tensor  # [H, n, D, span]: the scaled keys of the block's span, transposed
    feature_spans: torch.Tensor | None  # [H, n, m, W or span]: their features, as far as the FAVOR+ summary
    # holds them (None, as summary and reference, without a FAVOR+ part)
    value_spans: torch.Tensor  # [H, n, span, Dv + 1]
    hidden: torch.Tensor  # [H, n, G·W, span] bool: see _span_masks
    summary: torch.Tensor | None  # [H, n or 1, m, Dv + 1]: the FAVOR+ summary the block reads (causal without
    # autograd: None, the query side scans the states step by step)
    reference: torch.Tensor | None  # [H, n, 1, m]: the keys' per-feature reference
    sink_key: torch.Tensor | None  # [H, S, D], scaled
    sink_visible: torch.Tensor | None  # [H, n, 1, 1, S] bool: sinks beyond the span
    sink_values: torch.Tensor | None  # [H, S, Dv + 1]
    far_log_weight: torch.Tensor | None  # [H, n, G·W, 1]: added to the log of each query's FAVOR+ weights
    feature_map: str  # the features' normaliser (features.log_normaliser)


def _read_out(q_rows: torch.Tensor, projection: torch.Tensor, keys: _Keys, heads: slice, blocks: slice, causal: bool,
              summary: torch.Tensor | None = None) -> torch.Tensor:
    """Hybrid attention of the scaled queries ``q_rows [h, c, G·W, D]`` of key heads ``heads`` and query
    blocks ``blocks`` → ``[h, c, G·W, Dv]``; causal ``summary [h, c, m, Dv + 1]``: the blocks' FAVOR+ states where
    ``keys`` holds none (scanned step by step, :class:`_BlockScan`)."""
    h, c, group_w, d = q_rows.shape
    m = projection.shape[0]
    dv = keys.value_spans.shape[-1] - 1
    far = keys.feature_spans is not None

    if far:  # features relative to the keys' reference, then their own maximum T
        # (matmul, not mm + view: in-place changes of a view would each copy the whole tensor in backward)
        q_logits, normaliser = query_log_features(q_rows, projection, keys.reference[heads, blocks], keys.feature_map)
        top = q_logits.detach().amax(-1, keepdim=True)
        q_feat = exp_(q_logits.sub_(top))  # [h, c, G·W, m]
        # φ(q)ᵀφ(k) = q_feat·k_feat · exp(favor_ref): c(s·q) (‖s·q‖²/2 for FAVOR+) and m no longer cancel against
        # the exact part
        favor_ref = top - normaliser - math.log(m)
        if keys.far_log_weight is not None:
            favor_ref = favor_ref + keys.far_log_weight[heads, blocks]
        if summary is None:
            summary = keys.summary[heads, blocks] if causal else keys.summary[heads]
        favor_num = q_feat @ summary if causal else (q_feat.reshape(h, c * group_w, m) @ summary[:, 0]).view(h, c, group_w, dv + 1)
        # the feature products of the span's pairs inside the window, to take back out of the FAVOR+ part
        pairs = torch.bmm(q_feat.view(h * c, group_w, m), keys.feature_spans[heads, blocks].flatten(0, 1))

    # the span of neighbouring blocks, pair by pair: exact weights
    logits = torch.matmul(q_rows, keys.key_spans[heads, blocks])
    hidden = keys.hidden[heads, blocks]
    logits = logits.masked_fill_(hidden, float("-inf"))  # [h, c, G·W, span]
    exact_ref = logits.detach().amax(-1, keepdim=True)
    if keys.sink_key is not None:
        sinks = keys.sink_key.shape[1]
        sink_logits = torch.matmul(q_rows, keys.sink_key[heads, None].transpose(-1, -2))  # [h, c, G·W, S]
        sink_logits.masked_fill_(~keys.sink_visible[heads, blocks][:, :, 0], float("-inf"))
        exact_ref = torch.maximum(exact_ref, sink_logits.detach().amax(-1, keepdim=True))

    reference_all = exact_ref.clamp_min(NEG_LOG_WEIGHT)
    if far:
        reference_all = torch.maximum(reference_all, favor_ref.detach())
    weights = _exp(logits.sub_(reference_all), exact_ref - reference_all).view(h * c, group_w, -1)
    hidden = hidden.reshape(h * c, group_w, -1)
    span_values = keys.value_spans[heads, blocks].reshape(h * c, -1, dv + 1)
    if far:
        favor_scale = torch.exp(favor_ref - reference_all)  # [h, c, G·W, 1]
        # the pairs whose keys the FAVOR+ summary holds: exact weight minus their FAVOR+ share inside the window;
        # the others are hidden, and keys FAVOR+ does not weigh (sinks, padding) have zero features
        held = pairs.shape[-1]
        near = torch.addcmul(weights[..., :held], pairs, favor_scale.view(h * c, group_w, 1), value=-1)
        numerator = torch.baddbmm((favor_num * favor_scale).view(h * c, group_w, dv + 1),
                                  near.masked_fill_(hidden[..., :held], 0.0), span_values[:, :held])
        if held < weights.shape[-1]:  # causal: block b, not in the FAVOR+ summary
            numerator = torch.baddbmm(numerator, _visible(weights[..., held:], hidden[..., held:]), span_values[:, held:])
    else:
        numerator = torch.bmm(_visible(weights, hidden), span_values)
    if keys.sink_key is not None:  # one set of keys for all the blocks of a head
        sink_weights = sink_logits.sub_(reference_all).exp_().view(h, c * group_w, sinks)
        numerator = torch.baddbmm(numerator.view(h, c * group_w, dv + 1), sink_weights, keys.sink_values[heads])
    numerator = numerator.view(h, c, group_w, dv + 1)
    return _divide(numerator[..., :dv], numerator[..., dv])


EXP_RANGE = 80.0
"""Exact weights under ``e^-80`` of their row's largest are raised to it (see :func:`_exp`)."""


def _exp(logits: torch.Tensor, largest: torch.Tensor) -> torch.Tensor:
    """``exp(logits)`` of ``[..., span]`` logits that are −inf where hidden, ``largest [..., 1]`` the row's largest
    exact logit (relative like ``logits``); the hidden pairs' weights are only finite: :func:`_visible` zeroes them.

    Why: ``exp`` of −inf, and any ``exp`` that underflows, takes a slow path on this CPU (4–8× a finite one;
    a third of a span is hidden), so the logits are first clamped at ``largest − EXP_RANGE``, which changes a
    real weight by less than ``e^-80`` of its row's largest: far below float32's resolution of the row's sum
    (and its gradient there, ~0, becomes 0)."""
    return exp_(logits.clamp_(min=largest - EXP_RANGE))


def _visible(weights: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """``weights`` (of :func:`_exp`) with 0 where ``hidden``; a new tensor (``exp_`` keeps its result for backward)."""
    return torch.where(hidden, 0.0, weights)


def _check_hybrid_settings(local_window: int, sink_tokens: int, far_part: str, feature_map: str,
                           far_key_limit: int = 0) -> None:
    """The window includes the current token (``W ≥ 1``); sinks are a count (``S ≥ 0``); the keys beyond
    them are weighted by FAVOR+ or dropped (``far_part`` ``"favor"`` or ``"none"``), with features of one of
    :data:`~hf_performer.favor.features.FEATURE_MAPS`; ``far_key_limit`` is a count (0: no limit)."""
    if isinstance(local_window, bool) or not isinstance(local_window, int) or local_window < 1:
        raise ValueError(f"local_window must be an integer ≥ 1 for hybrid attention, got {local_window!r}")
    if isinstance(sink_tokens, bool) or not isinstance(sink_tokens, int) or sink_tokens < 0:
        raise ValueError(f"sink_tokens must be an integer ≥ 0, got {sink_tokens!r}")
    if far_part not in FAR_PARTS:
        raise ValueError(f"far_part must be one of {FAR_PARTS}, got {far_part!r}")
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {feature_map!r}")
    if isinstance(far_key_limit, bool) or not isinstance(far_key_limit, int) or far_key_limit < 0:
        raise ValueError(f"far_key_limit must be an integer ≥ 0 (0: no limit), got {far_key_limit!r}")


def _far_log_weight(far_log_weight: torch.Tensor | None, x: _Inputs) -> torch.Tensor | None:
    """``far_log_weight`` (``[H]``, one per query head, or None) as ``[Hk, G]`` float32, checked."""
    if far_log_weight is None:
        return None
    _, key_heads, group = x.query.shape[:3]
    if far_log_weight.shape != (key_heads * group,):
        raise ValueError(
            f"far_log_weight must hold one value per query head, shape ({key_heads * group},), got "
            f"{tuple(far_log_weight.shape)}"
        )
    return far_log_weight.float().view(key_heads, group)


def hybrid_favor_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    projection: torch.Tensor,
    *,
    local_window: int,
    sink_tokens: int = 0,
    far_part: str = "favor",
    far_log_weight: torch.Tensor | None = None,
    scaling: float | None = None,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    feature_map: str = "favor+",
    far_key_limit: int = 0,
) -> torch.Tensor:
    """Hybrid FAVOR+ self-attention: ``query [B, H, L, D]``, ``key [B, Hk, L, D]``, ``value [B, Hk, L, Dv]``
    → ``[B, H, L, Dv]`` (see the module docstring); ``key_padding_mask [B, L]``, ``True`` for real tokens.

    ``local_window ≥ 1`` (``W``; the current token counts, so ``W = 1`` is the token itself) and
    ``sink_tokens ≥ 0``; ``far_part="none"`` drops the keys beyond them instead of weighting them by
    FAVOR+ (window-only attention, the ablation).  ``far_log_weight [H]`` (one per query head, differentiable;
    LoLCATs' learnable per-head factor): head ``h``'s FAVOR+ weights are multiplied by ``exp(far_log_weight[h])``
    before the one normaliser, so training can turn each head's far part up or down; None (or zeros) is ×1.
    ``feature_map``: ``"favor+"`` (the paper's random features), ``"softmax"`` or ``"hedgehog"`` (learned feature
    maps, :func:`~hf_performer.favor.features.log_normaliser`).  ``far_key_limit = N > 0``: a query with ``n > N`` far keys
    has its FAVOR+ weights times ``N / n`` (e.g. ``N`` the most far keys a query met in training, so that the far
    part keeps its share of the attention mass at longer contexts).
    Reference: :func:`~hf_performer.favor.naive.hybrid_attention`.
    """
    _check_hybrid_settings(local_window, sink_tokens, far_part, feature_map, far_key_limit)
    if query.shape[-2] != key.shape[-2]:
        raise ValueError(
            f"hybrid attention (local_window={local_window}) needs as many queries as keys (self-attention), got "
            f"{query.shape[-2]} queries and {key.shape[-2]} keys"
        )
    x = _inputs(query, key, value, projection, scaling, key_padding_mask, feature_map)
    out = hybrid_favor(x, causal=causal, window=local_window, sinks=sink_tokens, far_part=far_part,
                       far_log_weight=_far_log_weight(far_log_weight, x), far_key_limit=far_key_limit)
    return _ungroup(out, x.dtype)


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


def _advance(state: HybridState, key: torch.Tensor, value: torch.Tensor, keep: torch.Tensor, x: _Inputs,
             far: bool) -> HybridState:
    """``state`` after the tokens ``key [B, Hk, L, D]``, ``value [B, Hk, L, Dv]`` (``keep [B, L]``: real ones).

    The first ``S`` real tokens go to the sinks; the last ``W − 1`` positions become the window; the
    tokens pushed out of the window (real, not sinks) fold into the FAVOR+ state (``far``; otherwise
    they are dropped), as one block, which equals folding them one by one up to float rounding.  ``x``: the
    :class:`_Inputs` whose ω, scale and feature map they take."""
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
    far_state = state.far
    if leaving and far:
        far_state = fold_keys(
            far_state,
            *key_features(keys[:, :, :leaving], x.projection, keep=far_keep[:, None, :leaving],
                          input_scale=x.input_scale, feature_map=x.feature_map),
            values[:, :, :leaving],
        )
    return HybridState(
        far_state, sink_key, sink_value, keys[:, :, leaving:], values[:, :, leaving:], far_keep[:, leaving:],
        state.real_seen + keep.sum(-1),
    )


def _far_count(state: HybridState) -> torch.Tensor:
    """``[B]`` float: the real tokens ``state``'s far part holds (seen, neither sinks nor in the kept window)."""
    seen = state.real_seen
    return (seen - seen.clamp(max=state.sink_key.shape[2]) - state.window_keep.sum(-1)).float()


def _hybrid_step(x: _Inputs, state: HybridState, keep: torch.Tensor, far: bool,
                 far_log_weight: torch.Tensor | None, far_key_limit: int = 0) -> torch.Tensor:
    """Hybrid attention of ``L ≤ W`` new tokens (queries ``[B, Hk, G, L, D]`` = keys) after ``state``
    → ``[B, Hk, G, L, Dv]`` float32.

    Exact weights for the sinks seen before, the window (the ``W − 1`` kept positions and the new
    tokens up to the query) and FAVOR+ for the far state; with ``L > 1`` the kept positions that are
    beyond a later query's window meet it through their features (pair by pair: at most ``L − 1``).
    One normaliser, each part relative to its own reference as in :func:`hybrid_favor` (``far_log_weight
    [Hk, G]`` or None: see there).  Without ``far`` only the exact part counts."""
    query, key, value, projection, _, scale, _, feature_map = x
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

    exact_ref = logits.detach().amax(-1, keepdim=True).clamp_min(NEG_LOG_WEIGHT)
    if not far:
        numerator = (logits - exact_ref).exp() @ values[:, :, None]
    else:
        # FAVOR+ part: the far state and, for L > 1, kept positions a later query has left behind
        reference = state.far.log_scale  # [B, Hk, m]
        if length > 1:
            pair_keep = state.window_keep[:, None, : length - 1]
            beyond = pair_keep & (distance[:, : length - 1] >= kept + 1)  # [B, L, L − 1]
            pair_log = key_log_features(state.window_key[:, :, : length - 1], projection, pair_keep, input_scale=scale,
                                        feature_map=feature_map)
            reference = torch.maximum(reference, pair_log.detach().amax(-2))
        q_logits, normaliser = query_log_features(q_scaled, projection, reference[:, :, None, None], feature_map)
        top = q_logits.detach().amax(-1, keepdim=True)
        q_feat = (q_logits - top).exp()
        # φ(q)ᵀφ(k) = q_feat·k_feat · exp(favor_ref) with the features relative to `reference` and m^-½ each
        favor_ref = top - normaliser - math.log(m)
        if far_log_weight is not None:
            favor_ref = favor_ref + far_log_weight[:, :, None, None]
        if far_key_limit:  # the state's far keys and the kept positions each query has left behind: [B, L]
            count = _far_count(state)[:, None] + (beyond.sum(-1) if length > 1 else 0)
            favor_ref = favor_ref + _limit_log_factor(count, far_key_limit)[:, None, None, :, None]
        summary = state.far.summary * torch.exp(state.far.log_scale - reference + 0.5 * math.log(m))[..., None]
        favor_num = q_feat @ summary[:, :, None]
        if length > 1:
            pair_feat = (pair_log - reference[:, :, None]).exp()
            weights = (q_feat @ pair_feat.transpose(-1, -2)[:, :, None]) * beyond[:, None, None]
            favor_num = favor_num + weights @ _with_ones(state.window_value[:, :, : length - 1])[:, :, None]
        reference_all = torch.maximum(exact_ref, favor_ref.detach())
        numerator = favor_num * torch.exp(favor_ref - reference_all) + (logits - reference_all).exp() @ values[:, :, None]
    return _divide(numerator[..., :-1], numerator[..., -1])


def _continue(x: _Inputs, state: HybridState, keep: torch.Tensor, window: int, far_part: str,
              far_log_weight: torch.Tensor | None, far_key_limit: int = 0) -> torch.Tensor:
    """Hybrid attention of ``L`` new tokens (queries ``[B, Hk, G, L, D]`` = keys, ``keep [B, L]``; ``far_log_weight
    [Hk, G]`` or None) after ``state``, without autograd, once the sinks are complete → ``[B, Hk, G, L, Dv]``: the block machinery of
    :func:`_hybrid_rows`, its block 0 the state's ``W − 1`` kept positions after one padding position (their queries
    are not read out), continuing from a :class:`_Carry` of the far state and the sinks."""
    b, key_heads, group, _, d = x.query.shape
    rows, m, dv = b * key_heads, x.projection.shape[0], x.value.shape[-1]
    query = torch.cat([x.query.new_zeros(b, key_heads, group, window, d), x.query], 3)
    key, value = (torch.cat([kept.new_zeros(b, key_heads, 1, kept.shape[-1]), kept, new], 2)
                  for kept, new in ((state.window_key, x.key), (state.window_value, x.value)))
    block_keep = torch.cat([keep.new_zeros(b, 1), state.window_keep, keep], 1)[:, None]
    far = state.far
    # the far state's rows carry m^-½ (FavorState), _hybrid_rows' summaries do not
    summary = None if far_part != "favor" else far.summary.reshape(rows, m, dv + 1) * math.sqrt(m)
    carry = _Carry(summary, far.log_scale.reshape(rows, m), state.sink_key, state.sink_value, _far_count(state))
    weight = None if far_log_weight is None or summary is None else far_log_weight.expand(b, key_heads, group).reshape(rows, group)
    inputs = _Inputs(query, key, value, x.projection, block_keep, *x[5:])
    return _hybrid_rows(inputs, weight, causal=True, window=window, sinks=0, far_part=far_part, carry=carry,
                        context=(True, False), far_key_limit=far_key_limit)[0]


def _sinks_complete(state: HybridState) -> bool:
    """Whether every row has seen its ``S`` sinks: then a new token is never a sink (see :func:`_one_token_step`)."""
    sinks = state.sink_key.shape[2]
    return not sinks or bool((state.real_seen >= sinks).all())


def _one_token_step(x: _Inputs, state: HybridState, keep: torch.Tensor, far: bool,
                    far_log_weight: torch.Tensor | None, far_key_limit: int = 0) -> tuple[torch.Tensor, HybridState]:
    """Generation's step, without autograd, once the sinks are complete (:func:`_sinks_complete`): the query of
    one new token ``[B, Hk, G, 1, D]`` (``keep [B, 1]``) after ``state`` → ``([B, Hk, G, 1, Dv], state after)``.

    :func:`_hybrid_step` + :func:`_advance` for ``L = 1`` in about a quarter of their tensor operations (a step is
    per-operation overhead at these sizes: ``benchmarks/decode_latency.py``).  With one query every kept position
    is inside its window and no pair meets it through features; the sinks are all seen and the new token is not
    one of them.  The query reads the far state before the oldest kept position (if real) folds into it
    (:func:`~hf_performer.favor.attention._fold_token`; its features come out of the query's product with ``s·ω``).
    Exact part and FAVOR+ part relative to the larger of their references, as in :func:`hybrid_favor`."""
    query, key, value, projection, _, scale, _, feature_map = x
    b, key_heads, group, _, d = query.shape
    rows, m, dv, sinks = b * key_heads, projection.shape[0], value.shape[-1], state.sink_key.shape[2]
    window_key, window_value = torch.cat([state.window_key, key], 2), torch.cat([state.window_value, value], 2)
    window_keep = torch.cat([state.window_keep, keep], 1)  # [B, W]: the query's window, oldest first
    q = query.reshape(rows, group, d)
    keys = torch.cat([state.sink_key, window_key], 2).reshape(rows, -1, d)
    values = _with_ones(torch.cat([state.sink_value, window_value], 2)).reshape(rows, -1, dv + 1)
    hidden = ~F.pad(window_keep, (sinks, 0), value=True)[:, None].expand(b, key_heads, -1).reshape(rows, 1, -1)
    logits = torch.bmm(q, keys.mT).mul_(scale * scale).masked_fill_(hidden, float("-inf"))  # [B·Hk, G, S + W]
    reference = logits.amax(-1, keepdim=True).clamp_min_(NEG_LOG_WEIGHT)
    far_state = state.far
    if far:
        # the queries and the leaving key, scaled once, and their logits ωx: [B·Hk·G + B·Hk, m]
        scaled = torch.cat([q.reshape(rows * group, d), window_key[:, :, 0].reshape(rows, d)]).mul_(scale)
        products = torch.mm(scaled, projection.t())
        q_logits = products[: rows * group].view(rows, group, m)
        q_logits, normaliser = per_query_normaliser(q_logits, log_normaliser(q, q_logits, feature_map, scale=scale))
        q_log = q_logits.add_(state.far.log_scale.reshape(rows, 1, m))
        top = q_log.amax(-1, keepdim=True)
        q_feat = q_log.sub_(top).exp_()
        # φ(q)ᵀφ(k) = q_feat·kv_j · exp(top − c(s·q) − ½ log m): the state's rows carry exp(log_scale) and m^-½
        favor_ref = top.sub_(normaliser).sub_(0.5 * math.log(m))
        if far_log_weight is not None:
            favor_ref = favor_ref.add_(far_log_weight.expand(b, key_heads, group).reshape(rows, group, 1))
        if far_key_limit:  # the query reads the far state before the leaving key folds in
            favor_ref = favor_ref.add_(_limit_log_factor(_far_count(state), far_key_limit).repeat_interleave(key_heads)[:, None, None])
        reference = torch.maximum(reference, favor_ref)
        summary = state.far.summary.reshape(rows, m, dv + 1)
        numerator = torch.baddbmm(torch.bmm(logits.sub_(reference).exp_(), values),
                                  q_feat.mul_(favor_ref.sub_(reference).exp_()), summary)
        leaving_keep = window_keep[:, :1].expand(b, key_heads).reshape(rows, 1)
        folded = _fold_token(state.far, products[rows * group :], scaled[rows * group :],
                             window_value[:, :, 0].reshape(rows, dv), leaving_keep, feature_map)
        far_state = FavorState(*(t.view(b, key_heads, *t.shape[1:]) for t in folded))
    else:
        numerator = torch.bmm(logits.sub_(reference).exp_(), values)
    out = numerator[..., :dv].div_(numerator[..., dv:].clamp_min(_TINY))
    after = HybridState(far_state, state.sink_key, state.sink_value, window_key[:, :, 1:], window_value[:, :, 1:],
                        window_keep[:, 1:], state.real_seen + keep[:, 0])
    return out.view(b, key_heads, group, 1, dv), after


def recurrent_hybrid_favor(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    projection: torch.Tensor,
    initial_state: HybridState | None = None,
    *,
    local_window: int,
    sink_tokens: int = 0,
    far_part: str = "favor",
    far_log_weight: torch.Tensor | None = None,
    scaling: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    feature_map: str = "favor+",
    far_key_limit: int = 0,
) -> tuple[torch.Tensor, HybridState]:
    """Causal hybrid FAVOR+ that continues from ``initial_state`` (decoding): ``query [B, H, L, D]`` are
    the positions of the new ``key [B, Hk, L, D]``, ``value [B, Hk, L, Dv]`` (``key_padding_mask [B, L]``,
    ``True`` for real tokens) → ``(output [B, H, L, Dv], state after them)``.

    Without a state (a prefill) the outputs are :func:`hybrid_favor_attention`'s; after one, the tokens
    go through in pieces of ``W``, each O(L·(W + S + m)·d): one decoding step costs the same whatever
    the context.  Any split of a sequence into calls gives the same outputs and state (up to float
    rounding).  With ``far_part="none"`` the far state stays empty and unread; ``far_log_weight``,
    ``feature_map`` and ``far_key_limit``: see :func:`hybrid_favor_attention`.  Reference:
    :func:`~hf_performer.favor.naive.hybrid_attention` (causal)."""
    _check_hybrid_settings(local_window, sink_tokens, far_part, feature_map, far_key_limit)
    far = far_part == "favor"
    if query.shape[-2] != key.shape[-2]:
        raise ValueError(
            f"recurrent hybrid attention takes the queries of the new keys, got {query.shape[-2]} queries and "
            f"{key.shape[-2]} keys"
        )
    x = _inputs(query, key, value, projection, scaling, key_padding_mask, feature_map)
    keep = torch.ones_like(x.key[:, 0, :, 0], dtype=torch.bool) if x.keep is None else x.keep[:, 0]
    weight = _far_log_weight(far_log_weight, x)
    if initial_state is None:
        out = hybrid_favor(x, causal=True, window=local_window, sinks=sink_tokens, far_part=far_part, far_log_weight=weight,
                           far_key_limit=far_key_limit)
        out = _ungroup(out, x.dtype)
        empty = HybridState.empty(x.key, x.value, projection.shape[0], window=local_window, sinks=sink_tokens)
        return out, _advance(empty, x.key, x.value, keep, x, far)
    fast = not records_gradients(*x[:4], weight, *initial_state.far, *initial_state[1:5]) and _sinks_complete(initial_state)
    if key.shape[-2] == 1 and fast:
        out, state = _one_token_step(x, initial_state, keep, far, weight, far_key_limit)
        return _ungroup(out, x.dtype), state
    if fast:  # several tokens (a prompt after a cached conversation): in blocks, a segment at a time
        segment = _segment_length(x.key.shape[0] * x.key.shape[1], projection.shape[0], local_window)
        state, out = initial_state, x.query.new_empty(*x.query.shape[:-1], x.value.shape[-1])
        for start in range(0, key.shape[-2], segment):
            piece = slice(start, start + segment)
            part = _Inputs(x.query[..., piece, :], x.key[:, :, piece], x.value[:, :, piece], *x[3:])
            out[..., piece, :] = _continue(part, state, keep[:, piece], local_window, far_part, weight, far_key_limit)
            state = _advance(state, part.key, part.value, keep[:, piece], x, far)
        return _ungroup(out, x.dtype), state
    state, outputs = initial_state, []
    for start in range(0, key.shape[-2], local_window):
        piece = slice(start, start + local_window)
        part = _Inputs(x.query[..., piece, :], x.key[:, :, piece], x.value[:, :, piece], *x[3:])
        outputs.append(_hybrid_step(part, state, keep[:, piece], far, weight, far_key_limit))
        state = _advance(state, part.key, part.value, keep[:, piece], x, far)
    return _ungroup(torch.cat(outputs, -2), x.dtype), state
