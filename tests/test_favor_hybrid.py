"""Hybrid FAVOR+ (exact softmax in a local window and to sink tokens, FAVOR+ beyond, one normaliser)
against the naive O(L²) reference; its limits; its settings."""

import pytest
import torch
import transformers

import hf_performer
from hf_performer import PerformerConfig
from hf_performer.favor import favor_attention, hybrid, orthogonal_random_matrix
from hf_performer.favor.naive import hybrid_attention, softmax_attention
from hf_performer.recovery.attention_transfer import select_trainable
from tests.conftest import VOCAB, assert_cached_generation_recomputes, assert_same_input_gradients, tiny_llama_config

B, D, M, L = 2, 16, 64, 37
SETTINGS = [(1, 0), (5, 3), (7, 2), (16, 1), (3, 50)]  # (W, S): S beyond L makes every real token a sink


def qkv(length=L, heads=4, key_heads=2, dtype=torch.float64):
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(B, heads, length, D, generator=generator, dtype=dtype)
    k, v = (torch.randn(B, key_heads, length, D, generator=generator, dtype=dtype) for _ in range(2))
    return q, k, v


def projection():
    return orthogonal_random_matrix(M, D, generator=torch.Generator().manual_seed(0))


def padding_mask():
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, :6] = False  # left padding
    mask[1, 30:] = False  # right padding
    return mask


def naive(q, k, v, *, window, sinks, causal, mask, far_part="favor"):
    group = q.shape[1] // k.shape[1]
    expanded = [t.repeat_interleave(group, 1) for t in (k, v)]
    out = hybrid_attention(q, *expanded, projection().double(), window=window, sinks=sinks, far=far_part == "favor",
                           causal=causal, key_padding_mask=mask)
    return out.nan_to_num()  # a query that sees no key: 0, as the op gives


@pytest.mark.parametrize("far_part", ["favor", "none"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window, sinks", SETTINGS)
def test_matches_the_naive_hybrid_with_padding_and_grouped_heads(causal, window, sinks, far_part):
    q, k, v = qkv()
    mask = padding_mask()
    out, _ = favor_attention(q, k, v, projection(), causal=causal, key_padding_mask=mask, local_window=window,
                             sink_tokens=sinks, far_part=far_part)
    expected = naive(q, k, v, window=window, sinks=sinks, causal=causal, mask=mask, far_part=far_part)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("far_part", ["favor", "none"])
@pytest.mark.parametrize("window, sinks", [(2, 1), (4, 2), (6, 0)])
def test_bidirectional_half_blocks_match_the_naive_hybrid(monkeypatch, window, sinks, far_part):
    """Bidirectional blocks of W/2 reaching two blocks each way (without autograd; padding, grouped heads), made to
    run at these small windows; W = 32 below runs them at the default threshold."""
    monkeypatch.setattr(hybrid, "HALF_BLOCKS_FROM", 2)
    assert hybrid._block_layout(L, window, False) == (window // 2, 2)
    assert hybrid._block_layout(L, window, False, recording=True) == (window, 1)
    q, k, v = qkv()
    mask = padding_mask()
    with torch.no_grad():
        out, _ = favor_attention(q, k, v, projection(), key_padding_mask=mask, local_window=window, sink_tokens=sinks,
                                 far_part=far_part)
    expected = naive(q, k, v, window=window, sinks=sinks, causal=False, mask=mask, far_part=far_part)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_bidirectional_half_blocks_at_the_default_threshold():
    q, k, v = qkv(120)
    assert hybrid._block_layout(120, 32, False) == (16, 2)
    out, _ = favor_attention(q, k, v, projection(), local_window=32, sink_tokens=4)
    torch.testing.assert_close(out, naive(q, k, v, window=32, sinks=4, causal=False, mask=None), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("far_part", ["favor", "none"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window, sinks", [(5, 3), (1, 2), (8, 2)])  # (8, 2): bidirectionally one block
def test_gradients_match_the_naive_hybrid(causal, window, sinks, far_part):
    inputs = [t.requires_grad_() for t in qkv(21)]
    reference_inputs = [t.detach().clone().requires_grad_() for t in inputs]
    mask = torch.ones(B, 21, dtype=torch.bool)
    mask[0, 17:] = False  # right padding: every query sees a key (the reference's softmax of nothing is NaN)
    out, _ = favor_attention(*inputs, projection(), causal=causal, key_padding_mask=mask, local_window=window,
                             sink_tokens=sinks, far_part=far_part)
    expected = naive(*reference_inputs, window=window, sinks=sinks, causal=causal, mask=mask, far_part=far_part)
    assert_same_input_gradients(out, expected, inputs, reference_inputs)


@pytest.mark.parametrize("causal", [False, True])
def test_a_window_covering_the_sequence_is_exact_softmax_attention(causal):
    q, k, v = qkv(heads=2, key_heads=2)
    out, _ = favor_attention(q, k, v, projection(), causal=causal, local_window=L, sink_tokens=2)
    torch.testing.assert_close(out, softmax_attention(q, k, v, causal=causal), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_window_logits_spread_far_beyond_the_exp_floor_still_give_exact_attention(causal):
    # logits spread over hundreds: weights under e^-80 of a row's largest are raised to it (the fast exp),
    # which must not show in values or gradients
    q, k, v = qkv(heads=2, key_heads=2)
    q, k = q * 6, k * 6
    for t in (q, k, v):
        t.requires_grad_()
    reference = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, _ = favor_attention(q, k, v, projection(), causal=causal, local_window=L, sink_tokens=2)
    expected = softmax_attention(*reference, causal=causal)
    spread = (q @ k.transpose(-1, -2) / D**0.5).detach()
    assert (spread.amax(-1) - spread.amin(-1)).max() > 200
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert_same_input_gradients(out, expected, (q, k, v), reference)


@pytest.mark.parametrize("causal", [False, True])
def test_rows_in_groups_match_the_naive_hybrid(causal, monkeypatch):
    # without autograd, (batch, key head) rows go through in groups of GROUP_ELEMENTS key features: one row each here
    monkeypatch.setattr(hybrid, "GROUP_ELEMENTS", L * M)
    q, k, v = qkv()
    mask = padding_mask()
    out, _ = favor_attention(q, k, v, projection(), causal=causal, key_padding_mask=mask, local_window=5, sink_tokens=3)
    torch.testing.assert_close(out, naive(q, k, v, window=5, sinks=3, causal=causal, mask=mask), rtol=1e-4, atol=1e-5)


def test_a_row_longer_than_a_group_runs_whole_and_alone(monkeypatch):
    # GROUP_ELEMENTS sizes the groups, ROW_ELEMENTS the longest row run whole: a row between the two is a group alone,
    # not cut into segments
    monkeypatch.setattr(hybrid, "GROUP_ELEMENTS", L * M // 2)
    monkeypatch.setattr(hybrid, "_segments", lambda *args, **kwargs: pytest.fail("a whole row went through segments"))
    q, k, v = qkv()
    mask = padding_mask()
    out, _ = favor_attention(q, k, v, projection(), key_padding_mask=mask, local_window=5, sink_tokens=3)
    torch.testing.assert_close(out, naive(q, k, v, window=5, sinks=3, causal=False, mask=mask), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("blocks_per_step", [2, 16])  # 2: a head's blocks over several steps; 16: two heads a step
@pytest.mark.parametrize("causal", [False, True])
def test_query_blocks_in_steps_match_the_naive_hybrid(causal, blocks_per_step, monkeypatch):
    # without autograd, the query side goes through STEP_ELEMENTS query features at a time, causal FAVOR+ states
    # scanned step by step and carried from a head's step to its next
    window, group = 5, 2
    monkeypatch.setattr(hybrid, "STEP_ELEMENTS", blocks_per_step * group * window * M)
    q, k, v = qkv()
    mask = padding_mask()
    out, _ = favor_attention(q, k, v, projection(), causal=causal, key_padding_mask=mask, local_window=window,
                             sink_tokens=3)
    expected = naive(q, k, v, window=window, sinks=3, causal=causal, mask=mask)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def segments_of_four_windows(monkeypatch, causal, window=5, recording=False):
    """Sequences of 70 tokens (4 rows: B × 2 key heads) go through segments of four windows: under autograd
    (``recording``) one row at a time, else all rows together; bidirectionally a row is then more than a group
    (ROW_ELEMENTS).  Returns the list of the sequences' plans, to check they ran."""
    if recording:
        monkeypatch.setattr(hybrid, "AUTOGRAD_SEGMENT_ELEMENTS", 4 * window * M)
    else:
        monkeypatch.setattr(hybrid, "SEGMENT_ELEMENTS", 4 * window * B * 2 * M)
    monkeypatch.setattr(hybrid, "AUTOGRAD_ROW_ELEMENTS" if recording else "ROW_ELEMENTS", 2 * window * M)
    plans, segments = [], hybrid._segments

    def recorded(x, weight, segment, **settings):
        plans.append(segment)
        return segments(x, weight, segment, **settings)

    monkeypatch.setattr(hybrid, "_segments", recorded)
    return plans


@pytest.mark.parametrize("blocks_per_step", [2, 1000])  # query blocks per step of the query side
@pytest.mark.parametrize("far_part", ["favor", "none"])
@pytest.mark.parametrize("window, sinks, left_padding", [(5, 3, 6), (4, 0, 0), (5, 3, 30)])  # 30: sinks beyond
@pytest.mark.parametrize("length", [70, 63])  # 63: with W = 5, the last segment is shorter than a window
@pytest.mark.parametrize("causal", [False, True])
def test_segments_match_the_naive_hybrid(causal, length, window, sinks, left_padding, far_part, blocks_per_step,
                                         monkeypatch):
    # long sequences go through segments of 4 windows here, each between the neighbouring segments' end blocks with
    # the sinks and a FAVOR+ summary: causally each continues from the one before (where a sequence's sinks are not
    # all in the first segment, in one pass), bidirectionally each reads the summary of all far keys
    plans = segments_of_four_windows(monkeypatch, causal, window)
    monkeypatch.setattr(hybrid, "STEP_ELEMENTS", blocks_per_step * 2 * window * M)
    q, k, v = qkv(length)
    mask = torch.ones(B, length, dtype=torch.bool)
    mask[0, :left_padding] = False
    mask[1, 55:] = False
    weight = FAR_LOG_WEIGHT if far_part == "favor" else None
    out, _ = favor_attention(q, k, v, projection(), causal=causal, key_padding_mask=mask, local_window=window,
                             sink_tokens=sinks, far_part=far_part, far_log_weight=weight)
    expected = hybrid_attention(q, *(t.repeat_interleave(2, 1) for t in (k, v)), projection().double(), window=window,
                                sinks=sinks, far=far_part == "favor", causal=causal, key_padding_mask=mask,
                                far_log_weight=weight).nan_to_num()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert len(plans) == (0 if causal and left_padding > 4 * window else 1)


@pytest.mark.parametrize("far_key_limit", [0, 6])
@pytest.mark.parametrize("window, sinks, left_padding", [(5, 3, 6), (4, 0, 0), (5, 3, 30)])
@pytest.mark.parametrize("length", [70, 20])  # 20: each row is one segment, in one pass
def test_long_causal_rows_one_at_a_time_match_the_naive_hybrid(length, window, sinks, left_padding, far_key_limit,
                                                               monkeypatch):
    """Without autograd, causal rows of at least ROW_SEGMENT_ELEMENTS key features go one (batch, key head) row at a
    time, each in segments of that size (four windows here): padding, sinks (beyond the first segment for a sequence
    padded on its left by 30: then in one pass per row), a far weight per query head and a far-key limit."""
    monkeypatch.setattr(hybrid, "ROW_SEGMENT_ELEMENTS", 4 * window * M)
    plans = segments_of_four_windows(monkeypatch, causal=True, window=window)
    q, k, v = qkv(length)
    mask = torch.ones(B, length, dtype=torch.bool)
    mask[0, : min(left_padding, length - 2)] = False
    weight = FAR_LOG_WEIGHT
    with torch.no_grad():
        out, _ = favor_attention(q, k, v, projection(), causal=True, key_padding_mask=mask, local_window=window,
                                 sink_tokens=sinks, far_log_weight=weight, far_key_limit=far_key_limit)
    expected = hybrid_attention(q, *(t.repeat_interleave(2, 1) for t in (k, v)), projection().double(), window=window,
                                sinks=sinks, causal=True, key_padding_mask=mask, far_log_weight=weight,
                                far_key_limit=far_key_limit).nan_to_num()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    segmented = length > 4 * window and left_padding <= 4 * window
    assert plans == ([4 * window] * B * 2 if segmented else [])  # every (batch, key head) row on its own


def test_bidirectional_sequences_with_fewer_real_tokens_than_sinks_go_in_one_pass(monkeypatch):
    # every query sees the sinks; a sequence of fewer real tokens than S has fewer sinks than the segments' carry
    plans = segments_of_four_windows(monkeypatch, causal=False)
    q, k, v = qkv(70)
    mask = torch.ones(B, 70, dtype=torch.bool)
    mask[1, 2:] = False
    out, _ = favor_attention(q, k, v, projection(), key_padding_mask=mask, local_window=5, sink_tokens=3)
    torch.testing.assert_close(out, naive(q, k, v, window=5, sinks=3, causal=False, mask=mask), rtol=1e-4, atol=1e-5)
    assert not plans


@pytest.mark.parametrize("far_part", ["favor", "none"])
@pytest.mark.parametrize("causal", [False, True])
def test_segments_run_again_in_backward_give_the_naive_gradients(causal, far_part, monkeypatch):
    # under autograd each segment runs again in backward; causally gradients reach earlier segments through the
    # carry, bidirectionally the summary's gradient reaches every segment's keys
    plans = segments_of_four_windows(monkeypatch, causal, recording=True)
    inputs = [t.requires_grad_() for t in qkv(70)]
    reference_inputs = [t.detach().clone().requires_grad_() for t in inputs]
    mask = torch.ones(B, 70, dtype=torch.bool)
    mask[1, 61:] = False  # right padding only: the reference's gradient of a query that sees no key is NaN
    weight = FAR_LOG_WEIGHT.clone().requires_grad_() if far_part == "favor" else None
    reference_weight = FAR_LOG_WEIGHT.clone().requires_grad_() if far_part == "favor" else None
    out, _ = favor_attention(*inputs, projection(), causal=causal, key_padding_mask=mask, local_window=5,
                             sink_tokens=3, far_part=far_part, far_log_weight=weight)
    expected = hybrid_attention(reference_inputs[0], *(t.repeat_interleave(2, 1) for t in reference_inputs[1:]),
                                projection().double(), window=5, sinks=3, far=far_part == "favor", causal=causal,
                                key_padding_mask=mask, far_log_weight=reference_weight)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert_same_input_gradients(out, expected, inputs, reference_inputs)
    if weight is not None:
        torch.testing.assert_close(weight.grad, reference_weight.grad, rtol=1e-3, atol=1e-5)
    assert len(plans) == 1


def planned_rows(monkeypatch) -> list:
    """A list that receives the (batch, key heads) shape of every sequence :func:`hybrid._plan` cuts into segments."""
    rows, plan = [], hybrid._plan

    def recorded(x, segment, **settings):
        rows.append(x.query.shape[:2])
        return plan(x, segment, **settings)

    monkeypatch.setattr(hybrid, "_plan", recorded)
    return rows


@pytest.mark.parametrize("causal", [False, True])
def test_segments_under_autograd_run_one_row_at_a_time(causal, monkeypatch):
    # backward then holds one (batch, key head) row's segment graph: every plan is one row's, and there is one per row
    segments_of_four_windows(monkeypatch, causal, recording=True)
    rows = planned_rows(monkeypatch)
    q, k, v = (t.requires_grad_() for t in qkv(70))
    favor_attention(q, k, v, projection(), causal=causal, local_window=5, sink_tokens=3)[0].sum().backward()
    assert rows == [(1, 1)] * (B * 2)


@pytest.mark.parametrize("causal", [False, True])
def test_segments_of_all_rows_under_autograd_give_the_naive_gradients(causal, monkeypatch):
    # off the CPU a part is every row (_rows_per_part): one plan for all of them, the same values and gradients
    segments_of_four_windows(monkeypatch, causal, recording=True)
    monkeypatch.setattr(hybrid, "AUTOGRAD_SEGMENT_ELEMENTS", 4 * 5 * B * 2 * M)  # four windows of all rows
    monkeypatch.setattr(hybrid, "_rows_per_part", lambda device, rows: rows)
    rows = planned_rows(monkeypatch)
    inputs = [t.requires_grad_() for t in qkv(70)]
    reference_inputs = [t.detach().clone().requires_grad_() for t in inputs]
    mask = torch.ones(B, 70, dtype=torch.bool)
    mask[1, 61:] = False  # right padding only: the reference's gradient of a query that sees no key is NaN
    out, _ = favor_attention(*inputs, projection(), causal=causal, key_padding_mask=mask, local_window=5,
                             sink_tokens=3, far_log_weight=FAR_LOG_WEIGHT)
    expected = hybrid_attention(reference_inputs[0], *(t.repeat_interleave(2, 1) for t in reference_inputs[1:]),
                                projection().double(), window=5, sinks=3, causal=causal, key_padding_mask=mask,
                                far_log_weight=FAR_LOG_WEIGHT)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert_same_input_gradients(out, expected, inputs, reference_inputs)
    assert rows == [(B * 2, 1)]


@pytest.mark.parametrize("causal", [False, True])
def test_segments_take_autograd_grad(causal, monkeypatch):
    # torch.autograd.grad (not only loss.backward()) goes through the segments, and they leave no .grad behind
    segments_of_four_windows(monkeypatch, causal, recording=True)
    q, k, v = (t.requires_grad_() for t in qkv(70))
    out, _ = favor_attention(q, k, v, projection(), causal=causal, local_window=5, sink_tokens=3)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    reference = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    expected = hybrid_attention(reference[0], *(t.repeat_interleave(2, 1) for t in reference[1:]),
                                projection().double(), window=5, sinks=3, causal=causal)
    expected_grads = torch.autograd.grad(expected.square().sum(), reference)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-3, atol=1e-4)
    assert all(t.grad is None for t in (q, k, v))


@pytest.mark.parametrize("causal", [False, True])
def test_checkpointed_groups_of_rows_give_the_naive_gradients(causal, monkeypatch):
    # under autograd, rows go through in groups of AUTOGRAD_ROW_ELEMENTS, run again in backward: one row each here
    monkeypatch.setattr(hybrid, "AUTOGRAD_ROW_ELEMENTS", L * M)
    inputs = [t.requires_grad_() for t in qkv()]
    reference_inputs = [t.detach().clone().requires_grad_() for t in inputs]
    mask = padding_mask()
    mask[0] = True  # right padding only: the reference's gradient of a query that sees no key is NaN
    out, _ = favor_attention(*inputs, projection(), causal=causal, key_padding_mask=mask, local_window=5, sink_tokens=3)
    expected = naive(*reference_inputs, window=5, sinks=3, causal=causal, mask=mask)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert_same_input_gradients(out, expected, inputs, reference_inputs)


@pytest.mark.parametrize("causal, pieces, length", [
    (True, "segments", 70),  # causal segments of four windows
    (False, "segments", 70),  # bidirectional segments of four windows
    (False, "groups", L),  # bidirectional groups of one row
])
def test_pieces_run_again_in_backward_give_the_naive_gradient_of_the_features(causal, pieces, length, monkeypatch):
    # ω alone requiring gradients (attention transfer trains it on the teacher's fixed inputs) gets every piece's share
    if pieces == "segments":
        segments_of_four_windows(monkeypatch, causal, recording=True)
    else:
        monkeypatch.setattr(hybrid, "AUTOGRAD_ROW_ELEMENTS", L * M)
    q, k, v = qkv(length)
    features, reference_features = (projection().requires_grad_() for _ in range(2))
    out, _ = favor_attention(q, k, v, features, causal=causal, local_window=5, sink_tokens=3)
    expected = hybrid_attention(q, *(t.repeat_interleave(2, 1) for t in (k, v)), reference_features.double(), window=5,
                                sinks=3, causal=causal)
    grad_out = torch.randn_like(expected)
    out.backward(grad_out)
    expected.backward(grad_out)
    torch.testing.assert_close(features.grad, reference_features.grad, rtol=1e-3, atol=1e-5)


FAR_LOG_WEIGHT = torch.tensor([0.7, -1.5, 0.0, 2.0], dtype=torch.float64)  # one per query head


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_a_per_head_far_weight_matches_the_naive_hybrid_values_and_gradients(causal, grouped, monkeypatch):
    # each query head's FAVOR+ weights times exp(far_log_weight[h]), learnable: its gradient too; grouped: rows
    # in groups of one (batch, key head) row, run again in backward
    if grouped:
        monkeypatch.setattr(hybrid, "AUTOGRAD_ROW_ELEMENTS", L * M)
    inputs = [*qkv(), FAR_LOG_WEIGHT.clone()]
    inputs = [t.requires_grad_() for t in inputs]
    reference_inputs = [t.detach().clone().requires_grad_() for t in inputs]
    mask = padding_mask()
    mask[0] = True  # right padding only: the reference's gradient of a query that sees no key is NaN
    *qkv_, weight = inputs
    out, _ = favor_attention(*qkv_, projection(), causal=causal, key_padding_mask=mask, local_window=5, sink_tokens=3,
                             far_log_weight=weight)
    *reference_qkv, reference_weight = reference_inputs
    group = 2
    expected = hybrid_attention(
        reference_qkv[0], *(t.repeat_interleave(group, 1) for t in reference_qkv[1:]), projection().double(), window=5,
        sinks=3, causal=causal, key_padding_mask=mask, far_log_weight=reference_weight,
    )
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert_same_input_gradients(out, expected, inputs, reference_inputs)
    assert weight.grad.abs().min() > 0  # every head's weight learns


@pytest.mark.parametrize("causal", [False, True])
def test_a_zero_far_log_weight_changes_nothing_bit_for_bit(causal):
    q, k, v = qkv(dtype=torch.float32)
    plain, _ = favor_attention(q, k, v, projection(), causal=causal, local_window=5, sink_tokens=3)
    weighted, _ = favor_attention(q, k, v, projection(), causal=causal, local_window=5, sink_tokens=3,
                                  far_log_weight=torch.zeros(4))
    assert torch.equal(plain, weighted)


def test_a_far_log_weight_needs_one_value_per_query_head_and_a_window():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"far_log_weight must hold one value per query head, shape \(4,\)"):
        favor_attention(q, k, v, projection(), local_window=5, far_log_weight=torch.zeros(2))
    with pytest.raises(ValueError, match="far_log_weight .* needs local_window ≥ 1"):
        favor_attention(q, k, v, projection(), far_log_weight=torch.zeros(4))


@pytest.mark.parametrize("causal", [False, True])
def test_zero_window_and_sinks_is_pure_favor_bit_for_bit(causal):
    q, k, v = qkv(dtype=torch.float32)
    pure, _ = favor_attention(q, k, v, projection(), causal=causal)
    hybrid, _ = favor_attention(q, k, v, projection(), causal=causal, local_window=0, sink_tokens=0)
    assert torch.equal(pure, hybrid)


@pytest.mark.parametrize("window, sinks", [(4, 2), (9, 0)])
def test_future_tokens_never_change_past_outputs_bit_exact(window, sinks):
    q, k, v = qkv(40, dtype=torch.float32)
    out, _ = favor_attention(q, k, v, projection(), causal=True, local_window=window, sink_tokens=sinks)
    for t in (0, 3, 17, 31):
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        q2[:, :, t + 1 :], k2[:, :, t + 1 :] = q2[:, :, t + 1 :] * 5, k2[:, :, t + 1 :] * 5
        v2[:, :, t + 1 :] = -v2[:, :, t + 1 :]
        out2, _ = favor_attention(q2, k2, v2, projection(), causal=True, local_window=window, sink_tokens=sinks)
        assert torch.equal(out[:, :, : t + 1], out2[:, :, : t + 1])


@pytest.mark.parametrize("causal", [False, True])
def test_padded_keys_contribute_nothing(causal):
    q, k, v = qkv(12, dtype=torch.float32)
    mask = torch.ones(B, 12, dtype=torch.bool)
    mask[0, :4] = False
    alone, _ = favor_attention(q[:1, :, 4:], k[:1, :, 4:], v[:1, :, 4:], projection(), causal=causal, local_window=3, sink_tokens=2)
    padded, _ = favor_attention(q, k, v, projection(), causal=causal, key_padding_mask=mask, local_window=3, sink_tokens=2)
    torch.testing.assert_close(padded[:1, :, 4:], alone, rtol=1e-5, atol=1e-6)


def test_large_norms_stay_convex_and_finite():
    q, k, _ = (t * 30 for t in qkv(dtype=torch.float32))
    q.requires_grad_()
    ones = torch.ones(B, 2, L, D)
    for causal in (False, True):
        out, _ = favor_attention(q, k, ones, projection(), causal=causal, local_window=4, sink_tokens=1)
        torch.testing.assert_close(out, torch.ones_like(out))
        out.sum().backward()
        assert torch.isfinite(q.grad).all()


@pytest.mark.parametrize(
    "values, field",
    [
        (dict(local_window=-1), "local_window"),
        (dict(sink_tokens=-2, local_window=4), "sink_tokens"),
        (dict(local_window=2.5), "local_window"),
        (dict(local_window=True), "local_window"),
        (dict(sink_tokens=4), "sink_tokens"),  # sinks without a window
        (dict(local_window=8, kernel="relu"), "kernel"),
        (dict(local_window=8, far_part="exact"), "far_part"),
        (dict(far_part="none"), "far_part"),  # nothing left to attend to without a window
        (dict(far_weight=True), "far_weight"),  # no FAVOR+ part to weigh without a window
        (dict(local_window=8, far_part="none", far_weight=True), "far_weight"),
        (dict(local_window=8, far_weight=1), "far_weight"),
        (dict(local_window=8, far_key_limit=-1), "far_key_limit"),
        (dict(far_key_limit=100), "far_key_limit"),  # no far part beyond a window without one
        (dict(local_window=8, far_part="none", far_key_limit=100), "far_key_limit"),
    ],
)
def test_bad_settings_raise_naming_the_field(values, field):
    with pytest.raises(ValueError, match=field):
        PerformerConfig(**values)


def test_causal_queries_may_be_the_last_positions_of_the_keys():
    """With a key/value cache: the new queries attend to the cached keys plus themselves."""
    q, k, v = qkv()
    full, _ = favor_attention(q, k, v, projection(), causal=True, local_window=5, sink_tokens=2)
    last, _ = favor_attention(q[:, :, -3:], k, v, projection(), causal=True, local_window=5, sink_tokens=2)
    torch.testing.assert_close(last, full[:, :, -3:])


def test_what_the_op_does_not_cover_yet_raises():
    q, k, v = qkv(8)
    _, state = favor_attention(q, k, v, projection(), causal=True)
    with pytest.raises(NotImplementedError, match="FAVOR\\+ state"):
        favor_attention(q, k, v, projection(), causal=True, local_window=4, initial_state=state)
    with pytest.raises(ValueError, match="as many queries as keys"):
        favor_attention(q[:, :, -1:], k, v, projection(), local_window=4)  # bidirectional cross-attention
    with pytest.raises(ValueError, match="local_window ≥ 1"):
        favor_attention(q, k, v, projection(), sink_tokens=2)


def llama_pair(**settings):
    stock = transformers.LlamaForCausalLM(tiny_llama_config()).eval()
    return stock, hf_performer.to_performer(stock, PerformerConfig(nb_features=16, **settings)).eval()


def test_a_model_with_a_window_covering_its_input_matches_exact_attention():
    stock, model = llama_pair(local_window=64, sink_tokens=4)
    ids = torch.randint(3, VOCAB, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :3] = 0
    exact = stock(input_ids=ids, attention_mask=mask).logits
    hybrid = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(hybrid[1], exact[1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(hybrid[0, 3:], exact[0, 3:], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("far_part", ["favor", "none"])
def test_generation_with_keys_and_values_equals_full_recomputation(far_part):
    _, model = llama_pair(local_window=4, sink_tokens=1, far_part=far_part)
    ids = torch.randint(3, VOCAB, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :2] = 0  # left padding, as in batched generation
    generated = model.generate(
        ids, attention_mask=mask, max_new_tokens=5, do_sample=False, cache_implementation="dynamic", pad_token_id=0
    )
    for _ in range(5):  # greedy by hand, every step recomputing the whole sequence without a cache
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
        logits = model(input_ids=ids, attention_mask=mask[:, :-1], use_cache=False).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
    assert torch.equal(generated, ids)


def test_a_model_with_a_far_weight_saves_loads_trains_and_decodes_with_it(tmp_path):
    # far_weight=True: one learnable log weight per head and layer, zero at conversion (outputs unchanged)
    stock, plain = llama_pair(local_window=3, sink_tokens=1)
    model = hf_performer.to_performer(stock, PerformerConfig(nb_features=16, local_window=3, sink_tokens=1, far_weight=True))
    ids = torch.randint(3, VOCAB, (2, 11))
    torch.testing.assert_close(model(ids, use_cache=False).logits, plain(ids, use_cache=False).logits)
    select_trainable(model, "attention")  # the far weights train with any choice
    weights = [p.far_log_weight for p in model.favor_projections()]
    assert [tuple(w.shape) for w in weights] == [(4,)] * 2 and all(w.requires_grad for w in weights)
    model(ids, labels=ids, use_cache=False).loss.backward()
    assert all(w.grad.abs().min() > 0 for w in weights)
    with torch.no_grad():
        for w in weights:
            w.copy_(torch.tensor([-3.0, 0.5, 1.0, 2.0]))
    trained = model(ids, use_cache=False).logits
    assert not torch.allclose(trained, plain(ids, use_cache=False).logits)
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(loaded(ids, use_cache=False).logits, trained)
    assert_cached_generation_recomputes(loaded, ids[:, :6])  # FavorCache
    # asked for after the model was built: no parameter to use, said so
    plain.config.performer_config = {"far_weight": True}
    with pytest.raises(ValueError, match="far_weight=True was set after this model was built"):
        plain(ids)


@pytest.mark.parametrize("path", ["one pass", "groups", "segments", "half blocks"])
@pytest.mark.parametrize("recording", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window, sinks, limit", [(5, 3, 4), (4, 0, 20), (1, 1, 1)])
def test_a_far_key_limit_matches_the_naive_hybrid(causal, recording, path, window, sinks, limit, monkeypatch):
    """far_key_limit = N: a query with n > N far keys has its far weights times N / n, counted by every path (one
    pass, groups of rows, segments of four windows that carry the count, bidirectional half blocks), with padding,
    grouped heads and a per-head far weight; values and, under autograd, gradients (of q, k, v and the weight)."""
    if path == "segments":
        segments_of_four_windows(monkeypatch, causal, window, recording=recording)
    elif path == "groups":
        monkeypatch.setattr(hybrid, "AUTOGRAD_ROW_ELEMENTS" if recording else "ROW_ELEMENTS", 70 * M)
    elif path == "half blocks":
        monkeypatch.setattr(hybrid, "HALF_BLOCKS_FROM", 2)
    inputs = [*qkv(70), FAR_LOG_WEIGHT.clone()]
    if recording:
        inputs = [t.requires_grad_() for t in inputs]
    reference_inputs = [t.detach().clone().requires_grad_(recording) for t in inputs]
    mask = torch.ones(B, 70, dtype=torch.bool)
    mask[1, 61:] = False  # right padding only: the reference's gradient of a query that sees no key is NaN
    *qkv_, weight = inputs
    out, _ = favor_attention(*qkv_, projection(), causal=causal, key_padding_mask=mask, local_window=window,
                             sink_tokens=sinks, far_log_weight=weight, far_key_limit=limit)
    q, k, v, reference_weight = reference_inputs
    expected = hybrid_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), projection().double(),
                                window=window, sinks=sinks, causal=causal, key_padding_mask=mask,
                                far_log_weight=reference_weight, far_key_limit=limit)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    if recording:
        assert_same_input_gradients(out, expected, inputs, reference_inputs)


def test_a_far_key_limit_above_every_count_changes_nothing():
    q, k, v = qkv()
    for causal in (False, True):
        plain, _ = favor_attention(q, k, v, projection(), causal=causal, local_window=5, sink_tokens=3)
        limited, _ = favor_attention(q, k, v, projection(), causal=causal, local_window=5, sink_tokens=3,
                                     far_key_limit=L)
        torch.testing.assert_close(limited, plain, rtol=0, atol=1e-12)


def test_a_model_with_a_far_key_limit_changes_only_long_inputs_and_decodes_with_it(tmp_path):
    """far_key_limit = 2 with W = 3, S = 1: queries past position 6 have more far keys and change; shorter inputs do
    not; the limit is saved, may be lifted on load, and cached generation counts far keys as a full forward does."""
    stock, plain = llama_pair(local_window=3, sink_tokens=1)
    model = hf_performer.to_performer(stock, PerformerConfig(nb_features=16, local_window=3, sink_tokens=1,
                                                             far_key_limit=2)).eval()
    ids = torch.randint(3, VOCAB, (2, 14))
    limited, unlimited = (m(ids, use_cache=False).logits for m in (model, plain))
    torch.testing.assert_close(limited[:, :6], unlimited[:, :6])  # at most 2 far keys up to position 5
    assert not torch.allclose(limited[:, 7:], unlimited[:, 7:])
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(loaded(ids, use_cache=False).logits, limited)
    lifted = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, performer_config={"far_key_limit": 0}).eval()
    torch.testing.assert_close(lifted(ids, use_cache=False).logits, unlimited)
    assert_cached_generation_recomputes(loaded, ids[:, :6], new_tokens=8)


def test_hybrid_and_causal_favor_raise_glibcs_mmap_threshold_once_per_process():
    """The allocator nudge (:func:`attention._raise_mmap_threshold`) runs once per process, on the first call of the
    hybrid or of causal FAVOR+ (with or without autograd); it changes no output."""
    from hf_performer.favor import attention

    q, k, v = (t.float().requires_grad_() for t in qkv())
    attention._free_threshold_chunk.cache_clear()
    recorded = hybrid.hybrid_favor_attention(q, k, v, projection(), local_window=5, sink_tokens=2, causal=True)
    with torch.no_grad():
        plain = hybrid.hybrid_favor_attention(q, k, v, projection(), local_window=5, sink_tokens=2, causal=True)
        attention.causal_favor(q, k, v, projection())
    info = attention._free_threshold_chunk.cache_info()
    assert (info.misses, info.hits) == (1, 2)
    torch.testing.assert_close(plain, recorded.detach())
