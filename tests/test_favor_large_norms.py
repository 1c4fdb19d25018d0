"""FAVOR+ at large query/key norms (per-dimension std 15–100, as in some heads of real checkpoints).

Before per-feature stabilisers, whole output rows underflowed to exactly zero without a warning, and
from std 15 the gradients of q and k were NaN.
"""

import pytest
import torch

from hf_performer.favor import favor_attention, orthogonal_random_matrix
from hf_performer.favor.naive import log_space_linear_attention, positive_softmax_log_features

B, H, D, M, L = 2, 3, 16, 64, 96
LARGE = [15.0, 30.0, 100.0]


def qkv(std, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, H, L, D, generator=generator) * std for _ in range(2))
    return q, k, torch.randn(B, H, L, D, generator=generator)


def projection():
    return orthogonal_random_matrix(M, D, generator=torch.Generator().manual_seed(0))


def exact_favor(q, k, v, omega, *, causal):
    """The FAVOR+ estimate itself, computed in log space (float64): what the op must reproduce."""
    s, omega = D**-0.25, omega.double()
    q_log, k_log = positive_softmax_log_features(q.double() * s, omega), positive_softmax_log_features(k.double() * s, omega)
    return log_space_linear_attention(q_log, k_log, v.double(), causal=causal)


@pytest.mark.parametrize("std", LARGE)
def test_bidirectional_equals_the_favor_estimate_at_any_norm(std):
    q, k, v = qkv(std)
    out, _ = favor_attention(q, k, v, projection(), block_size=32)
    torch.testing.assert_close(out.double(), exact_favor(q, k, v, projection(), causal=False), rtol=0, atol=1e-3)


@pytest.mark.parametrize("std", [5.0, 10.0])
def test_causal_equals_the_favor_estimate_up_to_std_10(std):
    q, k, v = qkv(std)
    out, _ = favor_attention(q, k, v, projection(), causal=True, chunk_size=16)
    torch.testing.assert_close(out.double(), exact_favor(q, k, v, projection(), causal=True), rtol=0, atol=1e-3)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("std", LARGE)
def test_every_row_is_a_convex_combination_of_the_values(causal, std):
    """With values all ones a convex combination is exactly 1: an underflowed row gives 0."""
    q, k, _ = qkv(std)
    ones = torch.ones(B, H, L, D)
    out, _ = favor_attention(q, k, ones, projection(), causal=causal, chunk_size=16)
    torch.testing.assert_close(out, ones, rtol=1e-4, atol=1e-4)
    _, _, v = qkv(std, seed=1)
    out, _ = favor_attention(q, k, v, projection(), causal=causal, chunk_size=16)
    low, high = (v.cummin(2).values, v.cummax(2).values) if causal else (v.amin(2, True), v.amax(2, True))
    assert ((out >= low - 1e-4) & (out <= high + 1e-4)).all()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("std", LARGE)
def test_gradients_stay_finite(causal, std):
    q, k, v = (t.requires_grad_() for t in qkv(std))
    out, _ = favor_attention(q, k, v, projection(), causal=causal, chunk_size=16)
    out.backward(torch.randn_like(out))
    for tensor in (q, k, v):
        assert torch.isfinite(tensor.grad).all()
    assert q.grad.abs().sum() > 0 and k.grad.abs().sum() > 0


@pytest.mark.parametrize("std", LARGE)
def test_large_norms_keep_causal_attention_bit_exact(std):
    q, k, v = qkv(std)
    omega = projection()
    out, _ = favor_attention(q, k, v, omega, causal=True, chunk_size=16)
    t = 40
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    q2[:, :, t + 1 :], k2[:, :, t + 1 :] = q2[:, :, t + 1 :] * 3, k2[:, :, t + 1 :] / 3
    v2[:, :, t + 1 :] = -v2[:, :, t + 1 :]
    out2, _ = favor_attention(q2, k2, v2, omega, causal=True, chunk_size=16)
    assert torch.equal(out[:, :, : t + 1], out2[:, :, : t + 1])
