"""Floating-point operation counts of the FAVOR+ forward, and the matmul peak they are compared with.

Counts are per ``(batch, head)`` of :func:`hf_performer.favor.favor_attention` as it is written, with
``d`` the head dimension, ``m`` the features, ``L`` the length; a multiply-add is 2 FLOPs and an
``exp``, a compare or a division counts 1.  They count what is executed, e.g. the full ``C × C`` block
of causal chunks, upper triangle included.
"""

from __future__ import annotations

import time

import torch


def favor_forward_flops(length: int, head_dim: int, nb_features: int, causal: bool, chunk: int) -> dict[str, float]:
    """``{"matmul": …, "exp": …, "other": …, "total": …}`` FLOPs of one head's FAVOR+ forward.

    Both modes: features of Q and K, each ``[L, d] @ [d, m]``, then over ``[L, m]`` a maximum, a
    subtraction and an ``exp`` (plus the keys' ``−‖k‖²/2``).
    Bidirectional: ``φ(K)ᵀV`` and ``φ(Q)(φ(K)ᵀV)`` (``2·L·m·d`` each) plus the denominator.
    Causal, ``C = chunk`` tokens per chunk (the ``chunk_size`` the op ran with; ignored when
    bidirectional), values with a column of ones (``d + 1``): the chunk's
    ``φ(Q)φ(K)ᵀ`` (``2·L·C·m``) times its decay (an ``exp`` of ``L·C``), times ``V`` (``2·L·C·(d+1)``);
    the chunk sums ``φ(K)ᵀV`` and the readout ``φ(Q)·state`` (``2·L·m·(d+1)`` each); the scan over chunks.
    """
    L, d, m = length, head_dim, nb_features
    matmul = 2 * (2 * L * d * m)
    exp = 2 * L * m
    other = 2 * L * d + 5 * L * m  # key norms; maxima, subtractions
    if not causal:
        matmul += 2 * L * m * d + 2 * L * m * d + 2 * L * m
        other += L * m + L * d  # key sum, division
    else:
        dv = d + 1
        n = -(-L // chunk)
        matmul += 2 * L * chunk * m + 2 * L * chunk * dv + 2 * L * m * dv + 2 * L * m * dv
        exp += L * chunk + L + n
        other += 3 * L * chunk + 2 * n * m * dv + L * dv + 3 * L * dv + L  # decay, scan, scaling, combine, divide
    return dict(matmul=float(matmul), exp=float(exp), other=float(other), total=float(matmul + exp + other))


def sdpa_forward_flops(length: int, head_dim: int, causal: bool) -> float:
    """Useful FLOPs of exact attention for one head: ``QKᵀ`` and ``PV`` (halved when causal)."""
    full = 4.0 * length * length * head_dim
    return full / 2 if causal else full


def matmul_peak_gflops(size: int = 2048, repeats: int = 10) -> float:
    """Best fp32 GFLOP/s of a ``size³`` matrix product, the roofline the FAVOR+ rate is compared with.

    Best of 10: the first products of a fresh process run slower.  In five fresh processes on 2 cores the best of 3
    came out at 167–186 GFLOP/s and the best of the 10 after them at 182–193, so 3 could understate the peak (and
    overstate a rate against it) by up to 10 %."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9
