"""The error of hybrid attention's FAVOR+ part on the keys it stands in for: a training signal that makes the far
part work (issue 13).

In hybrid attention the exact window and sinks hold most of a pretrained head's mass, so the error of the attention
*output*, which attention transfer minimises, weighs the FAVOR+ part by its small share of the one normaliser:
training can leave the far part a poor estimate at almost no cost, and the window gets all the credit (arXiv
2510.05901 finds this of published hybrids).  :func:`far_share_error` measures the FAVOR+ part on its own, per query
that has far keys (visible, outside the window, not sinks):

- ``output``: the softmax attention restricted to the far keys against FAVOR+'s estimate of the same distribution
  (``Σ φ(q)ᵀφ(k_j) v_j / Σ φ(q)ᵀφ(k_j)`` over them), mean squared difference over the value dimension;
- ``log_mass``: the log of FAVOR+'s estimate of their total weight (times the head's far weight) against the exact
  ``log Σ exp(s²·qᵀk_j)``, squared: that total sets the far part's share of the normaliser; ``log_mass_bias``, the
  same difference not squared (negative: FAVOR+ gives the far keys less weight than softmax does).

Torch only; O(L²) time and memory per head: a loss for training blocks of a few hundred tokens, not an attention
path.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from hf_performer.favor.naive import _visible, positive_softmax_log_features


class FarShareError(NamedTuple):
    """Means over the queries that have far keys (0 where none has); scalars."""

    output: torch.Tensor
    log_mass: torch.Tensor
    log_mass_bias: torch.Tensor


def far_keys(length: int, window: int, sinks: int, causal: bool, key_padding_mask: torch.Tensor | None,
             device) -> torch.Tensor:
    """``[B or 1, 1, L, L]`` bool: the keys hybrid attention weighs by FAVOR+ for each query — visible, outside
    the window (causal ``i − W < j ≤ i``, bidirectional ``|i − j| < W``), not among the first ``sinks`` real tokens."""
    visible = _visible(length, length, causal, key_padding_mask, device)
    real = torch.ones(1, length, dtype=torch.bool, device=device)
    if key_padding_mask is not None:
        real = key_padding_mask.to(torch.bool)
    is_sink = (real & (real.cumsum(-1) <= sinks))[:, None, None, :]
    distance = torch.arange(length, device=device)[:, None] - torch.arange(length, device=device)
    near = ((distance >= 0) & (distance < window)) if causal else (distance.abs() < window)
    return visible & ~near & ~is_sink


def far_share_error(query, key, value, projection, *, window: int, sinks: int, scaling: float | None = None,
                    causal: bool = True, key_padding_mask: torch.Tensor | None = None,
                    far_log_weight: torch.Tensor | None = None, feature_map: str = "favor+") -> FarShareError:
    """:class:`FarShareError` of hybrid attention's FAVOR+ part: ``query [B, H, L, D]``, ``key [B, Hk, L, D]``,
    ``value [B, Hk, L, Dv]`` (``H`` a multiple of ``Hk``), ``projection [m, D]`` (ω, differentiable),
    ``key_padding_mask [B, L]`` (``True`` for real tokens), ``far_log_weight [H]`` or None, ``feature_map`` (see
    :func:`~hf_performer.favor.features.log_normaliser`); differentiable in all.
    Queries that are padding count as long as they see far keys, as in the attention itself."""
    group = query.shape[1] // key.shape[1]
    key, value = (t.repeat_interleave(group, 1).float() for t in (key, value))
    s = (scaling if scaling is not None else query.shape[-1] ** -0.5) ** 0.5
    q, k = query.float() * s, key * s
    far = far_keys(q.shape[-2], window, sinks, causal, key_padding_mask, q.device)
    has_far = far.any(-1)  # [B or 1, 1, L]
    # a query without far keys reads the first key instead (no 0/0 in either path), and then counts 0
    first = torch.zeros_like(far)
    first[..., 0] = True
    far = torch.where(has_far[..., None], far, first)

    logits = (q @ k.transpose(-1, -2)).masked_fill(~far, float("-inf"))
    exact_log_mass = logits.logsumexp(-1)  # [B, H, L]
    exact_out = torch.softmax(logits, -1) @ value

    q_log, k_log = (positive_softmax_log_features(x, projection.float(), feature_map) for x in (q, k))
    k_ref = k_log.detach().amax(-2, keepdim=True)  # [B, H, 1, m]: per feature, over keys
    q_rel = q_log + k_ref
    q_top = q_rel.detach().amax(-1, keepdim=True)  # [B, H, L, 1]
    weights = ((q_rel - q_top).exp() @ (k_log - k_ref).exp().transpose(-1, -2)) * far  # φ(q)ᵀφ(k_j) / e^{q_top}
    mass = weights.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    favor_out = (weights @ value) / mass
    favor_log_mass = mass.log().squeeze(-1) + q_top.squeeze(-1)
    if far_log_weight is not None:
        favor_log_mass = favor_log_mass + far_log_weight.float()[:, None]

    counted = has_far.expand_as(exact_log_mass)
    count = counted.sum().clamp_min(1)
    output = torch.where(counted, (favor_out - exact_out).pow(2).mean(-1), 0.0).sum() / count
    difference = torch.where(counted, favor_log_mass - exact_log_mass, 0.0)
    return FarShareError(output, difference.pow(2).sum() / count, difference.sum() / count)
