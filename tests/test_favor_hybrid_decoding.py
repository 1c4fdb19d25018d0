"""Hybrid FAVOR+ decoding (:func:`recurrent_hybrid_favor`): token by token, or in any split, it equals one
causal pass and the naive reference, and its state does not grow."""

import pytest
import torch

from hf_performer.favor import favor_attention, orthogonal_random_matrix
from hf_performer.favor import hybrid
from hf_performer.favor.hybrid import recurrent_hybrid_favor
from hf_performer.favor.naive import hybrid_attention

B, D, M, L = 2, 16, 64, 29
SETTINGS = [(1, 0), (4, 2), (6, 0), (3, 40)]  # (W, S): S beyond L makes every real token a sink


def qkv(length=L, dtype=torch.float64):
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(B, 4, length, D, generator=generator, dtype=dtype)  # 4 query heads share 2 key heads
    k, v = (torch.randn(B, 2, length, D, generator=generator, dtype=dtype) for _ in range(2))
    return q, k, v


def projection():
    return orthogonal_random_matrix(M, D, generator=torch.Generator().manual_seed(0))


def left_padding(length=L):
    mask = torch.ones(B, length, dtype=torch.bool)
    mask[0, :5] = False
    return mask


def decode(q, k, v, splits, *, window, sinks, mask=None, far_part="favor", far_log_weight=None, far_key_limit=0):
    """Outputs of feeding the sequence in pieces ending at ``splits``, and the final state."""
    state, outputs, start = None, [], 0
    for end in [*splits, q.shape[-2]]:
        piece = slice(start, end)
        out, state = recurrent_hybrid_favor(
            q[:, :, piece], k[:, :, piece], v[:, :, piece], projection(), state, local_window=window, sink_tokens=sinks,
            far_part=far_part, key_padding_mask=None if mask is None else mask[:, piece], far_log_weight=far_log_weight,
            far_key_limit=far_key_limit,
        )
        outputs.append(out)
        start = end
    return torch.cat(outputs, -2), state


@pytest.mark.parametrize("segment_windows", [4, None])
@pytest.mark.parametrize("splits", [list(range(3, L)), [2, 9, 10, 20], [9, 11, 28]])  # tokens, pieces before and after the sinks
@pytest.mark.parametrize("window, sinks, limit", [(4, 2, 3), (6, 1, 10), (1, 0, 1)])
def test_decoding_with_a_far_key_limit_equals_one_causal_pass_and_the_naive_hybrid(window, sinks, limit, splits,
                                                                                   segment_windows, monkeypatch):
    """far_key_limit: each query's far weights times min(1, N / its far keys), counted alike by the one-token step,
    the pieces (before and after the sinks, in segments or not) and one causal pass, with padding inside."""
    if segment_windows:
        monkeypatch.setattr(hybrid, "SEGMENT_ELEMENTS", segment_windows * window * B * 2 * M)
    q, k, v = qkv()
    mask = left_padding()
    mask[:, [12, 13, 20]] = False
    weight = torch.tensor([0.5, -1.0, 0.0, 1.5], dtype=torch.float64)
    settings = dict(local_window=window, sink_tokens=sinks, far_log_weight=weight, far_key_limit=limit)
    full, _ = favor_attention(q, k, v, projection(), causal=True, key_padding_mask=mask, **settings)
    expected = hybrid_attention(q, *(t.repeat_interleave(2, 1) for t in (k, v)), projection().double(), window=window,
                                sinks=sinks, causal=True, key_padding_mask=mask, far_log_weight=weight,
                                far_key_limit=limit)
    stepped, _ = decode(q, k, v, splits, window=window, sinks=sinks, mask=mask, far_log_weight=weight,
                        far_key_limit=limit)
    real = mask[:, None, :, None].expand_as(full)
    torch.testing.assert_close(full[real], expected[real], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(stepped[real], full[real], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("window, sinks", SETTINGS)
def test_token_by_token_decoding_equals_one_causal_pass_with_left_padding(window, sinks):
    q, k, v = qkv()
    mask = left_padding()
    full, _ = favor_attention(q, k, v, projection(), causal=True, key_padding_mask=mask, local_window=window, sink_tokens=sinks)
    stepped, _ = decode(q, k, v, [3, *range(4, L)], window=window, sinks=sinks, mask=mask)
    torch.testing.assert_close(stepped[1], full[1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(stepped[0, :, 5:], full[0, :, 5:], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("far_part", ["favor", "none"])
@pytest.mark.parametrize("window, sinks", [(1, 0), (4, 2), (6, 1)])
def test_one_token_steps_with_padding_after_the_sinks_equal_one_causal_pass(window, sinks, far_part):
    """Generation's one-token step (the fast path once the sinks are complete), with padded tokens inside the
    sequence and a per-head far weight: the same as one causal pass."""
    q, k, v = qkv()
    mask = left_padding()
    mask[:, [12, 13, 20]] = False
    weight = torch.tensor([0.5, -1.0, 0.0, 1.5], dtype=torch.float64)
    full, _ = favor_attention(q, k, v, projection(), causal=True, key_padding_mask=mask, local_window=window,
                              sink_tokens=sinks, far_part=far_part, far_log_weight=weight if far_part == "favor" else None)
    stepped, _ = decode(q, k, v, list(range(8, L)), window=window, sinks=sinks, mask=mask, far_part=far_part,
                        far_log_weight=weight if far_part == "favor" else None)
    real = mask[:, None, :, None].expand_as(full)
    torch.testing.assert_close(stepped[real], full[real], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("segment_windows", [4, None])  # a continuation in segments of 4 windows, or in one
@pytest.mark.parametrize("far_part", ["favor", "none"])
@pytest.mark.parametrize("window, sinks", [(1, 0), (4, 2), (6, 1)])
def test_pieces_after_the_sinks_with_padding_inside_equal_one_causal_pass(window, sinks, far_part, segment_windows,
                                                                          monkeypatch):
    """Several tokens after a state whose sinks are complete (a prompt after a cached conversation) go through the
    block machinery of one causal pass, continuing from the state: padded tokens inside the pieces, a far weight."""
    if segment_windows:
        monkeypatch.setattr(hybrid, "SEGMENT_ELEMENTS", segment_windows * window * B * 2 * M)
    q, k, v = qkv()
    mask = left_padding()
    mask[:, [12, 13, 20]] = False
    weight = torch.tensor([0.5, -1.0, 0.0, 1.5], dtype=torch.float64) if far_part == "favor" else None
    full, _ = favor_attention(q, k, v, projection(), causal=True, key_padding_mask=mask, local_window=window,
                              sink_tokens=sinks, far_part=far_part, far_log_weight=weight)
    pieces, _ = decode(q, k, v, [9, 11, 28], window=window, sinks=sinks, mask=mask, far_part=far_part,
                       far_log_weight=weight)
    real = mask[:, None, :, None].expand_as(full)
    torch.testing.assert_close(pieces[real], full[real], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("far_part", ["favor", "none"])
@pytest.mark.parametrize("window, sinks", SETTINGS)
def test_decoding_in_uneven_pieces_matches_the_naive_hybrid(window, sinks, far_part):
    q, k, v = qkv()
    out, _ = decode(q, k, v, [2, 9, 10, 20], window=window, sinks=sinks, far_part=far_part)
    expected = hybrid_attention(
        q, *(t.repeat_interleave(2, 1) for t in (k, v)), projection().double(), window=window, sinks=sinks,
        far=far_part == "favor", causal=True,
    )
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("window, sinks", [(4, 2), (1, 0)])
def test_decoding_with_a_per_head_far_weight_matches_the_naive_hybrid(window, sinks):
    q, k, v = qkv()
    weight = torch.tensor([0.7, -1.5, 0.0, 2.0], dtype=torch.float64)
    out, _ = decode(q, k, v, [2, 9, 10, 20], window=window, sinks=sinks, far_log_weight=weight)
    expected = hybrid_attention(
        q, *(t.repeat_interleave(2, 1) for t in (k, v)), projection().double(), window=window, sinks=sinks,
        causal=True, far_log_weight=weight,
    )
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("window, sinks", [(4, 2), (6, 0)])
def test_a_prefill_leaves_the_state_that_token_by_token_decoding_leaves(window, sinks):
    q, k, v = qkv()
    mask = left_padding()
    _, prefilled = decode(q, k, v, [], window=window, sinks=sinks, mask=mask)
    _, stepped = decode(q, k, v, list(range(1, L)), window=window, sinks=sinks, mask=mask)
    for got, want in zip((*prefilled.far, *prefilled[1:]), (*stepped.far, *stepped[1:])):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_the_state_has_the_same_size_after_any_number_of_tokens():
    q, k, v = qkv(200, dtype=torch.float32)
    _, after_10 = decode(q[:, :, :10], k[:, :, :10], v[:, :, :10], [], window=8, sinks=4)
    _, after_200 = decode(q, k, v, [150, 180], window=8, sinks=4)
    assert after_10.nbytes == after_200.nbytes


def test_queries_must_be_those_of_the_new_keys():
    q, k, v = qkv(6)
    with pytest.raises(ValueError, match="queries of the new keys"):
        recurrent_hybrid_favor(q[:, :, -1:], k, v, projection(), local_window=3)


def test_decoding_steps_backpropagate_into_a_learnable_far_weight():
    """A far weight that requires grad makes a step record gradients: the general path runs, not the
    in-place one-token step, and its gradient matches the naive reference's."""
    q, k, v = qkv()
    weight = torch.tensor([0.5, -1.0, 0.0, 1.5], dtype=torch.float64, requires_grad=True)
    reference_weight = weight.detach().clone().requires_grad_()
    out, _ = decode(q, k, v, list(range(8, L)), window=4, sinks=2, far_log_weight=weight)
    expected = hybrid_attention(
        q, *(t.repeat_interleave(2, 1) for t in (k, v)), projection().double(), window=4, sinks=2, causal=True,
        far_log_weight=reference_weight,
    )
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(weight.grad, reference_weight.grad, rtol=1e-4, atol=1e-6)
