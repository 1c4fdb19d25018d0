"""FAVOR+ attention ops against the naive O(L²) references: values, gradients, masks, state."""

import pytest
import torch

from hf_performer.favor import (
    FavorState,
    bidirectional_favor,
    causal_favor,
    favor_attention,
    orthogonal_random_matrix,
    recurrent_favor_step,
)
from hf_performer.favor.naive import positive_softmax_features, quadratic_linear_attention, softmax_attention
from tests.conftest import assert_same_input_gradients

B, H, D, M = 2, 3, 16, 64


def qkv(length, *, heads=H, key_heads=None, key_length=None, scale=1.0, dtype=torch.float64):
    key_heads = key_heads or heads
    key_length = key_length or length
    q = torch.randn(B, heads, length, D, dtype=dtype) * scale
    k = torch.randn(B, key_heads, key_length, D, dtype=dtype) * scale
    v = torch.randn(B, key_heads, key_length, D, dtype=dtype)
    return q, k, v


def projection(m=M, seed=0):
    return orthogonal_random_matrix(m, D, generator=torch.Generator().manual_seed(seed))


def reference(q, k, v, omega, *, causal, key_padding_mask=None):
    """Quadratic linear attention with the unstabilised features of the paper, in float64."""
    s = D**-0.25
    q_feat = positive_softmax_features(q.double() * s, omega.double())
    k_feat = positive_softmax_features(k.double() * s, omega.double())
    return quadratic_linear_attention(q_feat, k_feat, v.double(), causal=causal, key_padding_mask=key_padding_mask)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 7, 16, 64])
@pytest.mark.parametrize("block_size", [None, 10])
def test_matches_quadratic_reference(causal, chunk_size, block_size):
    """``block_size=10``: features computed and used 10 tokens (causal: whole chunks) at a time."""
    q, k, v = qkv(37)
    omega = projection()
    out, _ = favor_attention(q, k, v, omega, causal=causal, chunk_size=chunk_size, block_size=block_size)
    torch.testing.assert_close(out, reference(q, k, v, omega, causal=causal), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("block_size", [None, 8])
def test_gradients_match_quadratic_reference(causal, block_size):
    omega = projection()
    inputs = [t.requires_grad_() for t in qkv(21)]
    reference_inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out, _ = favor_attention(*inputs, omega, causal=causal, chunk_size=8, block_size=block_size)
    expected = reference(*reference_inputs, omega, causal=causal)
    assert_same_input_gradients(out, expected, inputs, reference_inputs)


@pytest.mark.parametrize("block_size", [None, 5])
def test_bidirectional_gradients_of_every_input_and_the_features_with_grouped_heads_and_padding(block_size):
    """The bidirectional op recomputes features in its own backward: query, key, value and ω (learned
    features) get the quadratic reference's gradients; padded keys get zero, and a batch row whose keys
    are all padding gets zero gradients instead of NaN."""
    q, k, v = qkv(13, heads=4, key_heads=2)
    omega = projection().double()
    mask = torch.ones(B, 13, dtype=torch.bool)
    mask[0, 9:] = False
    inputs = [t.requires_grad_() for t in (q, k, v, omega)]
    reference_inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = bidirectional_favor(*inputs, key_padding_mask=mask, block_size=block_size)
    k_ref, v_ref = (t.repeat_interleave(2, 1) for t in reference_inputs[1:3])
    expected = reference(reference_inputs[0], k_ref, v_ref, reference_inputs[3], causal=False, key_padding_mask=mask)
    assert_same_input_gradients(out, expected, inputs, reference_inputs)
    assert k.grad[0, :, 9:].abs().max() == 0 and v.grad[0, :, 9:].abs().max() == 0

    empty = torch.zeros(B, 13, dtype=torch.bool)
    empty[1] = True
    for t in inputs:
        t.grad = None
    bidirectional_favor(*inputs, key_padding_mask=empty, block_size=block_size).sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in inputs)
    assert q.grad[0].abs().max() == 0


@pytest.mark.parametrize("causal", [False, True])
def test_error_against_softmax_falls_as_nb_features_grows(causal):
    q, k, v = qkv(64, scale=0.5)
    exact = softmax_attention(q, k, v, causal=causal)

    def mean_error(m):
        errors = [
            (favor_attention(q, k, v, projection(m, seed), causal=causal)[0] - exact).pow(2).mean()
            for seed in range(8)
        ]
        return torch.stack(errors).mean()

    errors = [mean_error(m) for m in (16, 64, 256, 1024)]
    assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] < errors[0] / 8


@pytest.mark.parametrize("chunk_size", [1, 5, 32])
def test_future_tokens_never_change_past_outputs_bit_exact(chunk_size):
    q, k, v = qkv(40, dtype=torch.float32)
    omega = projection()
    out, _ = favor_attention(q, k, v, omega, causal=True, chunk_size=chunk_size)
    for t in (0, 4, 17, 31):
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        # large keys in the future would move any key-maximum stabiliser that looks ahead
        q2[:, :, t + 1 :] = torch.randn_like(q2[:, :, t + 1 :]) * 5
        k2[:, :, t + 1 :] = torch.randn_like(k2[:, :, t + 1 :]) * 5
        v2[:, :, t + 1 :] = torch.randn_like(v2[:, :, t + 1 :])
        out2, _ = favor_attention(q2, k2, v2, omega, causal=True, chunk_size=chunk_size)
        assert torch.equal(out[:, :, : t + 1], out2[:, :, : t + 1])


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("block_size", [None, 4])
def test_padded_keys_do_not_change_outputs(causal, block_size):
    """``block_size=4``: a block of padding only, which must contribute nothing."""
    omega = projection()
    q, k, v = qkv(12, dtype=torch.float32)
    mask = torch.ones(B, 12, dtype=torch.bool)
    if causal:  # left padding, as in batched generation
        mask[0, :4] = False
        real = slice(4, None)
    else:  # right padding, as in encoders
        mask[0, 8:] = False
        real = slice(0, 8)
    out, _ = favor_attention(q, k, v, omega, causal=causal, key_padding_mask=mask, chunk_size=5, block_size=block_size)
    alone, _ = favor_attention(
        q[:1, :, real], k[:1, :, real], v[:1, :, real], omega, causal=causal, chunk_size=5, block_size=block_size
    )
    torch.testing.assert_close(out[:1, :, real], alone, rtol=1e-5, atol=1e-6)
    expected = reference(q, k, v, omega, causal=causal, key_padding_mask=mask).float()
    torch.testing.assert_close(out[:, :, real], expected[:, :, real], rtol=1e-4, atol=1e-5)


def test_query_that_sees_only_padding_gets_zeros_not_nan():
    q, k, v = qkv(6, dtype=torch.float32)
    mask = torch.ones(B, 6, dtype=torch.bool)
    mask[0, :3] = False
    out, _ = favor_attention(q, k, v, projection(), causal=True, key_padding_mask=mask)
    assert torch.isfinite(out).all()
    assert (out[0, :, :3] == 0).all()


@pytest.mark.parametrize("causal", [False, True])
def test_grouped_query_heads_share_key_heads(causal):
    q, k, v = qkv(10, heads=4, key_heads=2)
    omega = projection()
    out, _ = favor_attention(q, k, v, omega, causal=causal, block_size=4, chunk_size=2)
    expanded = favor_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), omega, causal=causal)[0]
    torch.testing.assert_close(out, expanded, rtol=1e-4, atol=1e-5)  # blocks change float32 rounding only


def test_cross_attention_with_different_lengths():
    q, k, v = qkv(5, key_length=11)
    omega = projection()
    out, _ = favor_attention(q, k, v, omega)
    torch.testing.assert_close(out, reference(q, k, v, omega, causal=False), rtol=1e-4, atol=1e-5)


def test_causal_queries_are_the_last_positions_of_the_keys():
    """With a key/value cache, 3 new queries attend to 9 cached keys plus themselves."""
    q, k, v = qkv(12)
    omega = projection()
    full, _ = favor_attention(q, k, v, omega, causal=True)
    last, _ = favor_attention(q[:, :, 9:], k, v, omega, causal=True)
    torch.testing.assert_close(last, full[:, :, 9:], rtol=1e-4, atol=1e-5)
    blocked, _ = favor_attention(q[:, :, 9:], k, v, omega, causal=True, chunk_size=2, block_size=4)  # prefix in 3 blocks
    torch.testing.assert_close(blocked, full[:, :, 9:], rtol=1e-4, atol=1e-5)


def test_continuing_from_final_state_equals_one_pass():
    q, k, v = qkv(30)
    omega = projection()
    full, full_state = favor_attention(q, k, v, omega, causal=True, chunk_size=8)
    first, state = favor_attention(q[:, :, :13], k[:, :, :13], v[:, :, :13], omega, causal=True, chunk_size=8)
    outputs = [first]
    for t in range(13, 30):  # token by token, as in decoding
        out, state = favor_attention(
            q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], omega, causal=True, initial_state=state
        )
        outputs.append(out)
    torch.testing.assert_close(torch.cat(outputs, 2), full, rtol=1e-4, atol=1e-5)
    assert isinstance(state, FavorState) and state.kv.shape == (B, H, M, D)
    for got, want in zip(common_reference(state), common_reference(full_state)):  # the same sums
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def common_reference(state):
    """``(kv, k_sum, reference)`` of a state with its per-feature references folded into their largest
    (the chunked and the token-by-token paths may keep the same sums relative to different references)."""
    reference = state.log_scale.amax(-1, keepdim=True)
    rows = torch.exp(state.log_scale - reference)
    return state.kv * rows[..., None], state.k_sum * rows, reference


def test_large_logits_stay_finite():
    q, k, v = qkv(50, scale=8.0, dtype=torch.float32)  # logit std ≈ 8, as in trained models
    for causal in (False, True):
        out, _ = favor_attention(q, k, v, projection(), causal=causal)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_accumulate_in_float32(dtype):
    q, k, v = qkv(33, dtype=torch.float32)
    omega = projection()
    full, _ = favor_attention(q, k, v, omega, causal=True)
    half, _ = favor_attention(q.to(dtype), k.to(dtype), v.to(dtype), omega, causal=True)
    assert half.dtype == dtype
    tolerance = 2e-2 if dtype == torch.float16 else 6e-2
    torch.testing.assert_close(half.float(), full, rtol=tolerance, atol=tolerance)


def test_relu_kernel_matches_its_quadratic_form():
    q, k, v = qkv(17)
    omega = projection()
    out, _ = favor_attention(q, k, v, omega, causal=True, kernel_fn=torch.relu, kernel_epsilon=1e-3)
    s = D**-0.25

    def features(x):
        return (torch.relu(x * s @ omega.double().T) + 1e-3) / M**0.5

    expected = quadratic_linear_attention(features(q), features(k), v, causal=True)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_scaling_is_honoured():
    q, k, v = qkv(9)
    omega = projection()
    scaling = 0.3  # e.g. GPT-2's scale_attn_by_inverse_layer_idx
    out, _ = favor_attention(q, k, v, omega, scaling=scaling)
    rescaled = (scaling * D**0.5) ** 0.5  # reference() applies D^-¼ to q and k
    expected = reference(q * rescaled, k * rescaled, v, omega, causal=False)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_bad_shapes_are_refused():
    omega = projection()
    q, k, v = qkv(4, heads=3, key_heads=2)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        favor_attention(q, k, v, omega)
    q, k, v = qkv(6, key_length=4)
    with pytest.raises(ValueError, match="at least as many keys"):
        favor_attention(q, k, v, omega, causal=True)
    with pytest.raises(ValueError, match="bidirectional attention has none"):
        favor_attention(*qkv(4), omega, initial_state=FavorState.empty(B, H, M, D))


def test_block_length_fills_the_cache_budget_with_a_floor():
    from hf_performer.favor.attention import BLOCK_ELEMENTS, MIN_BLOCK_TOKENS, block_length

    assert block_length(8, 256) * 8 * 256 == BLOCK_ELEMENTS  # 512 tokens at 8 heads, m = 256
    assert block_length(64 * 12, 256) == MIN_BLOCK_TOKENS  # a batch of short sentences: no 5-token blocks
    assert block_length(9, 256, multiple=64) % 64 == 0  # causal blocks are whole chunks


def test_causal_blocks_under_autograd_balance_saved_summaries_against_one_block_of_backward():
    """√(L·(Dv + 1) / (6·G)) tokens, whole chunks, within the floor and the cache budget."""
    from hf_performer.favor.attention import MIN_BLOCK_TOKENS, recompute_block_length

    assert [recompute_block_length(length, 64, 1, 64, 512) for length in (2048, 4096, 16384, 65536)] == [128, 192, 384, 512]
    assert recompute_block_length(16384, 64, 4, 64, 512) == 192  # four query heads per key head
    assert recompute_block_length(100, 64, 1, 16, 512) == MIN_BLOCK_TOKENS


@pytest.mark.parametrize("mode", ["bidirectional", "causal", "decoding step"])
def test_compiles_with_fullgraph_and_a_padding_mask(mode):
    """No Python branch on tensor values (``.item()``, ``bool(tensor)``, data-dependent shapes):
    ``torch.compile(fullgraph=True)`` traces the op, forward and backward, and matches eager."""
    omega = projection(32)
    q, k, v = qkv(20, heads=4, key_heads=2, dtype=torch.float32)
    mask = torch.ones(B, 20, dtype=torch.bool)
    mask[0, :5] = False
    causal = mode != "bidirectional"
    state = None
    if mode == "decoding step":
        _, state = favor_attention(q[:, :, :19], k[:, :, :19], v[:, :, :19], omega, causal=True, key_padding_mask=mask[:, :19])
        q, k, v, mask = q[:, :, 19:], k[:, :, 19:], v[:, :, 19:], mask[:, 19:]

    def op(q, k, v, mask):
        return favor_attention(q, k, v, omega, causal=causal, key_padding_mask=mask, chunk_size=4, block_size=8, initial_state=state)[0]

    compiled_q = q.clone().requires_grad_()
    compiled = torch.compile(op, fullgraph=True, backend="aot_eager")(compiled_q, k, v, mask)
    eager_q = q.clone().requires_grad_()
    eager = op(eager_q, k, v, mask)
    torch.testing.assert_close(compiled, eager)
    compiled.sum().backward()
    eager.sum().backward()
    torch.testing.assert_close(compiled_q.grad, eager_q.grad)


@pytest.mark.parametrize("causal", [False, True])
def test_queries_that_see_only_padding_get_zero_gradients_not_nan(causal):
    """Left padding in causal training: the first queries of a padded row see no key at all."""
    q, k, v = (t.requires_grad_() for t in qkv(12, dtype=torch.float32))
    mask = torch.ones(B, 12, dtype=torch.bool)
    mask[0, :5] = False
    if not causal:
        mask[1] = False  # a row of padding only
    out, _ = favor_attention(q, k, v, projection(), causal=causal, key_padding_mask=mask, chunk_size=4)
    out.backward(torch.randn_like(out))
    for tensor in (q, k, v):
        assert torch.isfinite(tensor.grad).all()
    blind = (slice(0, 1), slice(None), slice(0, 5)) if causal else (slice(1, 2),)
    assert (q.grad[blind] == 0).all()


def test_each_entry_point_matches_its_reference_with_grouped_heads():
    """bidirectional / causal (chunked) / recurrent step, called directly; GQA keys are not repeated."""
    q, k, v = qkv(14, heads=4, key_heads=2)
    omega = projection()
    expanded = [t.repeat_interleave(2, 1) for t in (k, v)]
    torch.testing.assert_close(
        bidirectional_favor(q, k, v, omega), reference(q, *expanded, omega, causal=False), rtol=1e-4, atol=1e-5
    )
    causal_out, state = causal_favor(q[:, :, :13], k[:, :, :13], v[:, :, :13], omega, chunk_size=4)
    full = reference(q, *expanded, omega, causal=True)
    torch.testing.assert_close(causal_out, full[:, :, :13], rtol=1e-4, atol=1e-5)
    assert state.kv.shape == (B, 2, M, D) and state.log_scale.shape == (B, 2, M)  # per key head, per feature
    step, _ = recurrent_favor_step(q[:, :, 13:], k[:, :, 13:], v[:, :, 13:], omega, state)
    torch.testing.assert_close(step, full[:, :, 13:], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("scale", [1.0, 10.0])
def test_token_by_token_steps_equal_one_causal_pass_with_left_padding(scale):
    """The one-token decoding step (generation's) against the causal reference, padding tokens and all
    (at per-dimension std 10 too, where its per-feature stabiliser keeps it exact)."""
    q, k, v = qkv(9, heads=4, key_heads=2, scale=scale)
    mask = torch.ones(B, 9, dtype=torch.bool)
    mask[0, :3] = False
    full = reference(q, *(t.repeat_interleave(2, 1) for t in (k, v)), projection(), causal=True, key_padding_mask=mask)
    state, steps = None, []
    for t in range(9):
        token = slice(t, t + 1)
        out, state = recurrent_favor_step(q[:, :, token], k[:, :, token], v[:, :, token], projection(), state,
                                          key_padding_mask=mask[:, token])
        steps.append(out)
    stepped = torch.cat(steps, -2)
    torch.testing.assert_close(stepped[1], full[1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(stepped[0, :, 3:], full[0, :, 3:], rtol=1e-4, atol=1e-5)
    assert not stepped[0, :, :3].any()  # a query that has seen only padding reads 0 (the reference's 0/0 is NaN)


def test_a_decoding_step_under_autograd_gives_the_reference_gradients():
    """The one-token step's fast path runs without autograd; with gradients it takes the general path."""
    q, k, v = qkv(6, heads=4, key_heads=2)
    _, state = causal_favor(q[:, :, :5], k[:, :, :5], v[:, :, :5], projection())
    inputs = [t[:, :, 5:].clone().requires_grad_() for t in (q, k, v)]
    out, _ = recurrent_favor_step(*inputs, projection(), state)
    with torch.no_grad():
        fast, _ = recurrent_favor_step(*inputs, projection(), state)
    torch.testing.assert_close(out, fast, rtol=1e-5, atol=1e-6)
    reference_inputs = [t.detach().clone().requires_grad_() for t in inputs]
    full = [torch.cat([t[:, :, :5], r], 2) for t, r in zip((q, k, v), reference_inputs)]
    expected = reference(full[0], *(t.repeat_interleave(2, 1) for t in full[1:]), projection(), causal=True)[:, :, 5:]
    assert_same_input_gradients(out, expected, inputs, reference_inputs)


def test_bidirectional_backward_keeps_no_features():
    """What the op saves for backward: its inputs, the output and the [m, Dv + 1] summary, never the
    [L, m] features of the queries or keys (they are recomputed block by block)."""
    q, k, v = (t.float().requires_grad_() for t in qkv(96))
    saved = []

    def pack(tensor):
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = bidirectional_favor(q, k, v, projection(), block_size=32)
    summary_and_reference = B * H * M * (D + 2)
    assert sum(saved) <= 4 * q.numel() + M * D + summary_and_reference  # q, k, v, out, ω
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def grouped_padded_inputs(length, padding=slice(50, 70)):
    """Float64 ``q [B, 4, L, D]``, ``k, v [B, 2, L, D]`` (two query heads per key head) with leaves for every input
    and ``ω``, and a mask with the ``padding`` tokens of row 0 padded (across a block boundary by default)."""
    q, k, v = qkv(length, heads=4, key_heads=2)
    mask = torch.ones(B, length, dtype=torch.bool)
    mask[0, padding] = False
    return [t.requires_grad_() for t in (q, k, v, projection().double())], mask


def repeated(inputs):
    """Detached copies of ``(q, k, v, ω)`` requiring grad, keys and values repeated to one per query head."""
    copies = [t.detach().clone().requires_grad_() for t in inputs]
    return copies, (copies[0], copies[1].repeat_interleave(2, 1), copies[2].repeat_interleave(2, 1), copies[3])


CAUSAL_BLOCKS = dict(chunk_size=16, block_size=64)
"""150 tokens: three blocks of 64, 16 or 48 tokens per chunk and a ragged last chunk of 6."""


def test_causal_gradients_of_every_input_and_the_features_match_the_quadratic_reference():
    """The causal op recomputes features in its own backward (block by block, in reverse): query, key, value and ω
    get the quadratic reference's gradients, with grouped heads and left padding, across blocks and chunks."""
    inputs, mask = grouped_padded_inputs(150)
    reference_inputs, expanded = repeated(inputs)
    out, _ = causal_favor(*inputs, key_padding_mask=mask, **CAUSAL_BLOCKS)
    expected = reference(*expanded, causal=True, key_padding_mask=mask)
    assert_same_input_gradients(out, expected, inputs, reference_inputs)
    assert inputs[1].grad[0, :, 50:70].abs().max() == 0 and inputs[2].grad[0, :, 50:70].abs().max() == 0


@pytest.mark.parametrize("std", [1.0, 15.0])
def test_causal_gradients_equal_autograd_of_the_same_chunks(std, monkeypatch):
    """Against plain autograd through the chunked forward (what ran before the hand-written backward), float32,
    at std 15 too, where query features sit on the floor: the same gradients up to float rounding."""
    import hf_performer.favor.attention as attention

    inputs, mask = grouped_padded_inputs(150)
    inputs = [(t.detach().float() * (std if i < 2 else 1)).requires_grad_() for i, t in enumerate(inputs)]
    autograd_inputs = [t.detach().clone().requires_grad_() for t in inputs]
    grad_out = torch.randn(B, 4, 150, D)
    out, state = causal_favor(*inputs, key_padding_mask=mask, **CAUSAL_BLOCKS)
    (out * grad_out).sum().backward()
    monkeypatch.setattr(attention, "records_gradients", lambda *tensors: False)  # forward under autograd
    expected, expected_state = causal_favor(*autograd_inputs, key_padding_mask=mask, **CAUSAL_BLOCKS)
    (expected * grad_out).sum().backward()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert all(torch.equal(a, b) for a, b in zip(state, expected_state))
    for got, want in zip(inputs, autograd_inputs):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-5 * want.grad.abs().max().item())


def test_causal_gradients_reach_a_key_value_prefix_and_an_initial_state():
    """Keys before the first query (a key/value cache, folded into the state) and the state a first call hands
    to a second one get their gradients through the op's entry state."""
    inputs, _ = grouped_padded_inputs(150)
    q, k, v, omega = inputs
    reference_inputs, expanded = repeated(inputs)
    expected = reference(*expanded, causal=True)
    cached, _ = causal_favor(q[:, :, 40:], k, v, omega, **CAUSAL_BLOCKS)  # 40 keys before the first query
    assert_same_input_gradients(cached, expected[:, :, 40:], inputs, reference_inputs)

    for t in inputs + reference_inputs:
        t.grad = None
    first, state = causal_favor(q[:, :, :70], k[:, :, :70], v[:, :, :70], omega, **CAUSAL_BLOCKS)
    second, _ = causal_favor(q[:, :, 70:], k[:, :, 70:], v[:, :, 70:], omega, initial_state=state, **CAUSAL_BLOCKS)
    assert state.kv.requires_grad
    expected = reference(*repeated_leaves(reference_inputs), causal=True)
    assert_same_input_gradients(torch.cat([first, second], 2), expected, inputs, reference_inputs)


def repeated_leaves(inputs):
    """``(q, k, v, ω)`` with keys and values repeated to one per query head (gradients reach ``inputs``)."""
    q, k, v, omega = inputs
    return q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), omega


def test_causal_rows_of_padding_only_get_zero_gradients_not_nan():
    inputs, mask = grouped_padded_inputs(150, padding=slice(0, 20))  # left padding: 20 queries see no key
    mask[1] = False  # a row of padding only
    out, _ = causal_favor(*inputs, key_padding_mask=mask, **CAUSAL_BLOCKS)
    out.backward(torch.randn_like(out))
    assert all(torch.isfinite(t.grad).all() for t in inputs)
    q, k, v, _ = inputs
    assert q.grad[1].abs().max() == 0 and k.grad[1].abs().max() == 0 and v.grad[1].abs().max() == 0
    assert q.grad[0, :, :20].abs().max() == 0


def test_causal_backward_keeps_no_features_and_no_chunk_states():
    """What the op saves for backward: its inputs, the output and the [m, Dv + 1] summary each block starts from;
    never the [L, m] features or the per-chunk states (recomputed block by block)."""
    length, blocks = 200, 4  # 13 chunks of 16
    q, k, v = (t.float().requires_grad_() for t in qkv(length))
    saved = []

    def pack(tensor):
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out, _ = causal_favor(q, k, v, projection(), **CAUSAL_BLOCKS)
    entries = blocks * B * H * (M * (D + 1) + 1)
    assert sum(saved) <= 4 * q.numel() + M * D + entries  # q, k, v, out, ω
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_bidirectional_default_blocks_short_in_one_long_in_lean_blocks(monkeypatch):
    """Up to ``SHORT_ELEMENTS`` feature elements a sequence is one block (what it does is counted through the key
    feature calls); beyond, lean blocks: both equal to the reference."""
    from hf_performer.favor import attention, features

    calls = []
    original = features.key_features
    monkeypatch.setattr(attention, "key_features", lambda *a, **kw: calls.append(a[0].shape[-2]) or original(*a, **kw))
    q, k, v = qkv(40)
    omega = projection()
    for short_elements, blocks in ((B * H * 40 * M, [40]), (B * H * 39 * M, None)):
        monkeypatch.setattr(attention, "SHORT_ELEMENTS", short_elements)
        monkeypatch.setattr(attention, "LEAN_BLOCK_ELEMENTS", B * H * 16 * M)
        monkeypatch.setattr(attention, "MIN_BLOCK_TOKENS", 16)
        calls.clear()
        out = bidirectional_favor(q, k, v, omega)
        assert calls == (blocks or [16, 16, 8])
        torch.testing.assert_close(out.double(), reference(q, k, v, omega, causal=False), atol=1e-5, rtol=1e-4)


def test_causal_default_blocks_short_sequences_in_larger_blocks(monkeypatch):
    """Without autograd, a causal sequence below ``SHORT_CAUSAL_ELEMENTS`` feature elements runs in blocks of
    ``SHORT_CAUSAL_BLOCK_ELEMENTS``, a longer one in lean blocks (counted through the softmax terms of each block):
    both equal to the reference."""
    from hf_performer.favor import attention

    calls = []
    original = attention._softmax_terms
    monkeypatch.setattr(attention, "_softmax_terms", lambda *a, **kw: calls.append(a[1].shape[-2]) or original(*a, **kw))
    monkeypatch.setattr(attention, "MIN_BLOCK_TOKENS", 8)
    monkeypatch.setattr(attention, "LEAN_BLOCK_ELEMENTS", B * H * 8 * M)
    monkeypatch.setattr(attention, "SHORT_CAUSAL_BLOCK_ELEMENTS", B * H * 16 * M)
    q, k, v = qkv(40)
    omega = projection()
    for short_elements, blocks in ((B * H * 41 * M, [16, 16, 8]), (B * H * 40 * M, [8] * 5)):
        monkeypatch.setattr(attention, "SHORT_CAUSAL_ELEMENTS", short_elements)
        calls.clear()
        with torch.no_grad():
            out, _ = causal_favor(q, k, v, omega, chunk_size=8)
        assert calls == blocks
        torch.testing.assert_close(out.double(), reference(q, k, v, omega, causal=True), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("queries", [160, 4])
def test_bidirectional_keys_in_the_output_memory_match_the_reference(queries, monkeypatch):
    """The forward's key pass computes its features in the output's memory while it is still unwritten: 160 queries
    (per key head 2 × 160 × 16 floats, less a [16, 64] product, hold 64 keys of 64 floats), in blocks of 64 keys,
    more than ``block_size`` 8; 4 queries hold none, so in a buffer of 8 keys.  Values and gradients equal the
    reference's either way, with grouped heads and padding across a key block's edge (50–70)."""
    from hf_performer.favor import attention, features

    calls = []
    original = features.key_features
    monkeypatch.setattr(attention, "key_features", lambda *a, **kw: calls.append(a[0].shape[-2]) or original(*a, **kw))
    inputs, mask = grouped_padded_inputs(160)
    reference_inputs, expanded = repeated(inputs)
    q, k, v, omega = inputs
    out = bidirectional_favor(q[:, :, -queries:], k, v, omega, key_padding_mask=mask, block_size=8)
    key_blocks = [64, 64, 32] if queries == 160 else [8] * 20
    assert calls[: len(key_blocks)] == key_blocks
    expected = reference(expanded[0][:, :, -queries:], *expanded[1:], causal=False, key_padding_mask=mask)
    assert_same_input_gradients(out, expected, inputs, reference_inputs)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("recording", [False, True])
def test_batch_pieces_equal_one_call(causal, recording, monkeypatch):
    """A batch of short sequences runs in pieces of sequences (``BATCH_PIECE_ELEMENTS``): the same outputs, causal
    states and gradients as one call, with grouped heads, padding and (causal) an initial state."""
    from hf_performer.favor import attention

    batch, length = 5, 11
    q = torch.randn(batch, 4, length, D, dtype=torch.float64)
    k, v = (torch.randn(batch, 2, length, D, dtype=torch.float64) for _ in range(2))
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[1, :4] = False
    mask[4, 7:] = False
    omega = projection()
    state = None
    if causal:
        _, state = favor_attention(q, k, v, omega, causal=True)
    leaves = [t.clone().requires_grad_(recording) for t in (q, k, v)]
    whole_leaves = [t.clone().requires_grad_(recording) for t in (q, k, v)]
    whole, whole_state = favor_attention(*whole_leaves, omega, causal=causal, key_padding_mask=mask, initial_state=state)
    monkeypatch.setattr(attention, "BATCH_PIECE_ELEMENTS", 2 * 4 * length * M)  # two sequences a piece: 2 + 2 + 1
    cpu = torch.device("cpu")
    assert len(attention._batch_pieces(batch, 4, length, M, cpu)) == 3
    assert len(attention._batch_pieces(batch, 4, attention.MIN_BLOCK_TOKENS + 1, M, cpu)) == 1  # longer: token blocks
    assert len(attention._batch_pieces(batch, 4, length, M, torch.device("meta"))) == 1  # the CPU's caches only
    out, out_state = favor_attention(*leaves, omega, causal=causal, key_padding_mask=mask, initial_state=state)
    torch.testing.assert_close(out, whole)
    if causal:
        for got, want in zip(out_state, whole_state):
            torch.testing.assert_close(got, want)
    if recording:
        assert_same_input_gradients(out, whole, leaves, whole_leaves)
