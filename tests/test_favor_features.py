"""Random features: orthogonality, norms, seeding; positive features estimate exp(xᵀy) without bias."""

import math

import pytest
import torch

from hf_performer.favor import orthogonal_random_matrix
from hf_performer.favor.naive import positive_softmax_features


def test_orthogonal_blocks_have_orthogonal_rows():
    omega = orthogonal_random_matrix(40, 16, generator=torch.Generator().manual_seed(1))
    assert omega.shape == (40, 16)
    for block in (omega[:16], omega[16:32], omega[32:]):
        gram = block @ block.T
        off_diagonal = gram - torch.diag(torch.diagonal(gram))
        assert off_diagonal.abs().max() < 1e-4 * gram.diagonal().max()


def test_chi_scaling_gives_gaussian_row_norms():
    omega = orthogonal_random_matrix(4096, 16, generator=torch.Generator().manual_seed(2))
    sq_norms = omega.pow(2).sum(1)
    assert sq_norms.mean().item() == pytest.approx(16, rel=0.05)  # E‖g‖² = d for g ~ N(0, I_d)
    assert sq_norms.var().item() == pytest.approx(32, rel=0.15)  # Var‖g‖² = 2d


def test_sqrt_d_scaling_fixes_row_norms():
    omega = orthogonal_random_matrix(48, 16, generator=torch.Generator().manual_seed(3), scaling="sqrt_d")
    torch.testing.assert_close(omega.norm(dim=1), torch.full((48,), 4.0))


def test_iid_features_are_not_orthogonal():
    omega = orthogonal_random_matrix(16, 16, generator=torch.Generator().manual_seed(4), orthogonal=False)
    gram = omega @ omega.T
    assert (gram - torch.diag(gram.diagonal())).abs().max() > 1.0


def test_same_seed_same_draw_and_different_seed_different_draw():
    def draw(seed):
        return orthogonal_random_matrix(32, 8, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(draw(5), draw(5))
    assert not torch.equal(draw(5), draw(6))


def test_unknown_scaling_is_refused():
    with pytest.raises(ValueError, match="scaling must be one of"):
        orthogonal_random_matrix(8, 8, scaling="uniform")


@pytest.mark.parametrize("orthogonal", [True, False])
def test_positive_features_estimate_softmax_kernel_without_bias(orthogonal):
    """Mean of φ(q)ᵀφ(k) over many draws → exp(qᵀk), within 4 standard errors of the sample mean."""
    d, m, draws = 8, 16, 4000
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(6, d, dtype=torch.float64, generator=generator) * 0.4
    y = torch.randn(5, d, dtype=torch.float64, generator=generator) * 0.4
    estimates = torch.stack(
        [
            positive_softmax_features(x, w) @ positive_softmax_features(y, w).T
            for w in (
                orthogonal_random_matrix(m, d, generator=generator, orthogonal=orthogonal).double()
                for _ in range(draws)
            )
        ]
    )
    exact = torch.exp(x @ y.T)
    standard_error = estimates.std(0) / math.sqrt(draws)
    assert ((estimates.mean(0) - exact).abs() <= 4 * standard_error).all()


def test_exp_in_place_matches_exp_to_float_rounding():
    """``features.exp_`` (``exp2(x·log₂e)`` on the CPU): in place, and within float rounding of ``exp`` over the range
    stabilised features take (``x ≤ 0``, down to where ``exp`` underflows), gradients included."""
    from hf_performer.favor.features import exp_

    x = torch.linspace(-87.0, 0.0, 100_001)
    out = exp_(x.clone())
    exact = x.double().exp()
    # rounding x·log₂e to float32 adds |x|·2⁻²⁴ of relative error; exp2 itself is within an ulp
    assert ((out.double() - exact).abs() / exact).max() <= 87 * 2**-24 + 2**-23
    buffer = x.clone()
    assert exp_(buffer).data_ptr() == buffer.data_ptr()
    leaf = torch.linspace(-5.0, 0.0, 11, dtype=torch.float64, requires_grad=True)
    exp_(leaf * 1.0).sum().backward()
    torch.testing.assert_close(leaf.grad, leaf.detach().exp())


def test_key_features_at_least_a_given_reference_describe_the_same_features():
    """``key_features(..., at_least=R₀)``: the reference is ``max(R_own, R₀)`` per feature, and ``exp(R)·φ̃`` are the
    same features as with the keys' own reference (what lets bidirectional FAVOR+ add a block's sum to a summary
    kept relative to ``R₀`` without rescaling the block's)."""
    from hf_performer.favor.features import key_features

    generator = torch.Generator().manual_seed(3)
    keys = torch.randn(2, 5, 8, generator=generator, dtype=torch.float64)
    projection = orthogonal_random_matrix(16, 8, generator=generator).double()
    own_features, own_reference = key_features(keys, projection)
    floor = own_reference + torch.randn(2, 16, generator=generator, dtype=torch.float64)  # above for some features
    features, reference = key_features(keys, projection, at_least=floor)
    torch.testing.assert_close(reference, torch.maximum(own_reference, floor))
    torch.testing.assert_close(features * reference.exp()[:, None], own_features * own_reference.exp()[:, None])
