"""Naive O(L²) references for testing the FAVOR+ ops (torch only, computed as written).

Not for use in models: they materialise the ``[Lq, Lk]`` matrix.
"""

from __future__ import annotations

import math

import torch


def _visible(q_len: int, k_len: int, causal: bool, key_padding_mask: torch.Tensor | None, device) -> torch.Tensor:
    """``[B or 1, 1, Lq, Lk]`` bool: which key each query may see (causal queries end-aligned)."""
    visible = torch.ones(q_len, k_len, dtype=torch.bool, device=device)
    if causal:
        visible = visible.tril(diagonal=k_len - q_len)
    visible = visible[None, None]
    if key_padding_mask is not None:
        visible = visible & key_padding_mask.to(torch.bool)[:, None, None, :]
    return visible


def softmax_attention(query, key, value, *, scaling=None, causal=False, key_padding_mask=None):
    """Exact ``softmax(scaling · QKᵀ + mask) V``; shapes as :func:`favor_attention` (``H == Hk``)."""
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = (query @ key.transpose(-1, -2)) * scaling
    visible = _visible(query.shape[-2], key.shape[-2], causal, key_padding_mask, query.device)
    return torch.softmax(scores.masked_fill(~visible, float("-inf")), -1) @ value


def positive_softmax_features(x: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """φ(x) = m^-½ exp(ωx − ‖x‖²/2) exactly as in the paper (no stabiliser): ``[..., L, d] → [..., L, m]``."""
    m = projection.shape[0]
    return torch.exp(x @ projection.transpose(0, 1) - x.pow(2).sum(-1, keepdim=True) / 2) / m**0.5


def quadratic_linear_attention(q_feat, k_feat, value, *, causal=False, key_padding_mask=None):
    """``D⁻¹ (φ(Q)φ(K)ᵀ ⊙ mask) V`` with the full ``[Lq, Lk]`` matrix (paper eq. 4 and its masked form)."""
    scores = q_feat @ k_feat.transpose(-1, -2)
    scores = scores * _visible(q_feat.shape[-2], k_feat.shape[-2], causal, key_padding_mask, q_feat.device)
    return (scores @ value) / scores.sum(-1, keepdim=True)


def positive_softmax_log_features(x: torch.Tensor, projection: torch.Tensor, feature_map: str = "favor+") -> torch.Tensor:
    """``log φ(x) = ωx − ‖x‖²/2 − ½ log m`` (paper eq. 7): ``[..., L, d] → [..., L, m]``, usable at any norm;
    ``feature_map="softmax"``: ``log φ(x) = log softmax(ωx)`` (the learned feature map); ``"hedgehog"``: each half of
    the features a log-softmax of its own."""
    logits, m = x @ projection.transpose(0, 1), projection.shape[0]
    if feature_map == "softmax":
        return torch.log_softmax(logits, -1)
    if feature_map == "hedgehog":
        return torch.log_softmax(logits.unflatten(-1, (2, m // 2)), -1).flatten(-2)
    return logits - x.pow(2).sum(-1, keepdim=True) / 2 - 0.5 * math.log(m)


def log_space_linear_attention(q_log, k_log, value, *, causal=False, key_padding_mask=None):
    """``D⁻¹ (φ(Q)φ(K)ᵀ ⊙ mask) V`` from log-features ``[..., L, m]``: each weight
    ``φ(q)ᵀφ(k) = Σ_j exp(log φ(q)_j + log φ(k)_j)`` is formed as a log-sum-exp, so it neither
    overflows nor underflows whatever the norms (``[Lq, Lk, m]`` memory: tests only)."""
    scores = torch.logsumexp(q_log[..., :, None, :] + k_log[..., None, :, :], -1)
    visible = _visible(q_log.shape[-2], k_log.shape[-2], causal, key_padding_mask, q_log.device)
    return torch.softmax(scores.masked_fill(~visible, float("-inf")), -1) @ value


def hybrid_attention(query, key, value, projection, *, window, sinks, far=True, scaling=None, causal=False,
                     key_padding_mask=None, far_log_weight=None, feature_map="favor+", far_key_limit=0):
    """Hybrid FAVOR+ as written: a masked O(L²) softmax whose weights are ``exp(s·qᵀk)`` for keys in the
    local window (causal ``i − W < j ≤ i``, bidirectional ``|i − j| < W``) or among the first ``sinks``
    real tokens, and ``φ(q)ᵀφ(k)`` (in log space) for every other visible key (``far=False``: 0, the
    window-only ablation), times ``exp(far_log_weight[h])`` in head ``h`` when given (``[H]``), with the
    features of ``feature_map`` (:func:`positive_softmax_log_features`); with ``far_key_limit = N > 0``, a query
    with ``n > N`` far keys (visible, weighted by ``φ``) has its far weights times ``N / n``.  Shapes as
    :func:`softmax_attention` (``H == Hk``); rows that see no key come back as NaN."""
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    q_len, k_len = query.shape[-2], key.shape[-2]
    visible = _visible(q_len, k_len, causal, key_padding_mask, query.device)
    real = torch.ones(1, k_len, dtype=torch.bool, device=query.device)
    if key_padding_mask is not None:
        real = key_padding_mask.to(torch.bool)
    is_sink = (real & (real.cumsum(-1) <= sinks))[:, None, None, :]
    distance = torch.arange(q_len, device=query.device)[:, None] - torch.arange(k_len, device=query.device)
    near = ((distance >= 0) & (distance < window)) if causal else (distance.abs() < window)
    exact = visible & (near | is_sink)
    s = scaling**0.5
    exact_logits = (query * s) @ (key * s).transpose(-1, -2)
    q_log = positive_softmax_log_features(query * s, projection, feature_map)
    k_log = positive_softmax_log_features(key * s, projection, feature_map)
    far_logits = torch.logsumexp(q_log[..., :, None, :] + k_log[..., None, :, :], -1)
    if far_log_weight is not None:
        far_logits = far_logits + far_log_weight[:, None, None]
    if far_key_limit:
        far_count = (visible & ~exact).sum(-1, keepdim=True).clamp_min(1)
        far_logits = far_logits + (math.log(far_key_limit) - far_count.log()).clamp_max(0)
    logits = torch.where(exact, exact_logits, far_logits if far else float("-inf")).masked_fill(~visible, float("-inf"))
    return torch.softmax(logits, -1) @ value
