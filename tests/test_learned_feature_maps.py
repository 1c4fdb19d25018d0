"""The learned feature maps of hybrid attention (``feature_map="softmax"``: ``φ(x) = softmax(ωx)``; ``"hedgehog"``: a
softmax over each half of the features, Hedgehog's pair) against the naive reference through every path the FAVOR+
far part has: one pass, groups of rows, segments, decoding token by token and in pieces, values and gradients; and in
a model: conversion, training, save → load, generation."""

import math

import pytest
import torch
import transformers

import hf_performer
from hf_performer import PerformerConfig
from hf_performer.favor import favor_attention, hybrid, orthogonal_random_matrix
from hf_performer.favor.features import LEARNED_FEATURE_MAPS, key_log_features, learned_projection, log_normaliser
from hf_performer.favor.hybrid import recurrent_hybrid_favor
from hf_performer.favor.naive import hybrid_attention
from hf_performer.recovery.attention_transfer import select_trainable
from tests.conftest import VOCAB, assert_cached_generation_recomputes, assert_same_input_gradients, tiny_llama_config
from tests.test_favor_hybrid import segments_of_four_windows

B, D, M = 2, 16, 64
FAR_LOG_WEIGHT = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64)


def qkv(length, dtype=torch.float64, requires_grad=False):
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(B, 4, length, D, generator=generator, dtype=dtype)  # 4 query heads share 2 key heads
    k, v = (torch.randn(B, 2, length, D, generator=generator, dtype=dtype) for _ in range(2))
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


@pytest.fixture(params=LEARNED_FEATURE_MAPS)
def feature_map(request):
    return request.param


def projection(requires_grad=False):
    # twice the unit rows a model starts from: sharper than at conversion, as after some training (and, for
    # "hedgehog", halves that are not each other's negatives, as after training)
    omega = 2 * orthogonal_random_matrix(M, D, generator=torch.Generator().manual_seed(0), scaling="unit")
    return omega.double().requires_grad_(requires_grad)


def naive(q, k, v, omega, *, causal, feature_map, mask=None, window=5, sinks=3, far_log_weight=None):
    expanded = [t.repeat_interleave(2, 1) for t in (k, v)]
    return hybrid_attention(q, *expanded, omega, window=window, sinks=sinks, causal=causal, key_padding_mask=mask,
                            far_log_weight=far_log_weight, feature_map=feature_map).nan_to_num()


def test_the_features_are_a_softmax_over_the_features():
    x = torch.randn(3, 7, D, dtype=torch.float64)
    omega = projection()
    features = (key_log_features(x, omega, input_scale=0.5, feature_map="softmax") - 0.5 * math.log(M)).exp()
    torch.testing.assert_close(features, torch.softmax(0.5 * x @ omega.T, -1))
    torch.testing.assert_close(log_normaliser(x, x @ omega.T, "favor+"), x.pow(2).sum(-1, keepdim=True) / 2)
    with pytest.raises(ValueError, match="feature_map must be one of"):
        log_normaliser(x, x @ omega.T, "relu")


def test_hedgehog_features_are_a_softmax_over_each_half_and_start_as_the_pair():
    x = torch.randn(3, 7, D, dtype=torch.float64)
    omega = projection()
    features = (key_log_features(x, omega, input_scale=0.5, feature_map="hedgehog") - 0.5 * math.log(M)).exp()
    halves = (0.5 * x @ omega.T).unflatten(-1, (2, M // 2))
    torch.testing.assert_close(features, torch.softmax(halves, -1).flatten(-2))
    torch.testing.assert_close(features.sum(-1), torch.full((3, 7), 2.0, dtype=torch.float64))
    start = learned_projection("hedgehog", M, D, generator=torch.Generator().manual_seed(0)).double()
    first = start[: M // 2]
    torch.testing.assert_close(start[M // 2 :], -first)  # [ω; −ω]: [softmax(ωx), softmax(−ωx)]
    block = first[:D]  # m/2 = 32 rows in blocks of d = 16 orthogonal unit rows (drawn in float32)
    torch.testing.assert_close(block @ block.T, torch.eye(D, dtype=torch.float64), rtol=0, atol=1e-6)
    torch.testing.assert_close(first.norm(dim=1), torch.ones(M // 2, dtype=torch.float64), rtol=0, atol=1e-6)
    paired = (key_log_features(x, start, feature_map="hedgehog") - 0.5 * math.log(M)).exp()
    logits = x @ first.T
    torch.testing.assert_close(paired, torch.cat([torch.softmax(logits, -1), torch.softmax(-logits, -1)], -1))
    with pytest.raises(ValueError, match="nb_features must be even"):
        learned_projection("hedgehog", 7, D)


@pytest.mark.parametrize("rows_in_groups", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_matches_the_naive_hybrid_with_padding_grouped_heads_and_a_far_weight(causal, rows_in_groups, feature_map,
                                                                             monkeypatch):
    if rows_in_groups:  # one (batch, key head) row per group
        monkeypatch.setattr(hybrid, "GROUP_ELEMENTS", 37 * M)
    q, k, v = qkv(37)
    mask = torch.ones(B, 37, dtype=torch.bool)
    mask[0, :6] = False
    mask[1, 30:] = False
    out, _ = favor_attention(q, k, v, projection(), causal=causal, key_padding_mask=mask, local_window=5,
                             sink_tokens=3, far_log_weight=FAR_LOG_WEIGHT, feature_map=feature_map)
    expected = naive(q, k, v, projection(), causal=causal, mask=mask, far_log_weight=FAR_LOG_WEIGHT,
                     feature_map=feature_map)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    # another map than FAVOR+'s: the same inputs give other outputs
    favor, _ = favor_attention(q, k, v, projection(), causal=causal, key_padding_mask=mask, local_window=5,
                               sink_tokens=3, far_log_weight=FAR_LOG_WEIGHT)
    assert (favor - out).abs().max() > 1e-2


@pytest.mark.parametrize("causal", [False, True])
def test_gradients_of_inputs_omega_and_far_weight_match_the_naive_hybrid(causal, feature_map):
    inputs = [*qkv(21, requires_grad=True), projection(requires_grad=True), FAR_LOG_WEIGHT.clone().requires_grad_()]
    reference_inputs = [t.detach().clone().requires_grad_() for t in inputs]
    q, k, v, omega, weight = inputs
    out, _ = favor_attention(q, k, v, omega, causal=causal, local_window=5, sink_tokens=3, far_log_weight=weight,
                             feature_map=feature_map)
    expected = naive(*reference_inputs[:4], causal=causal, far_log_weight=reference_inputs[4], feature_map=feature_map)
    assert_same_input_gradients(out, expected, inputs, reference_inputs)
    assert omega.grad.abs().max() > 0 and weight.grad.abs().min() > 0  # ω and every head's weight learn


@pytest.mark.parametrize("recording", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_segments_match_the_naive_hybrid_values_and_gradients(causal, recording, feature_map, monkeypatch):
    plans = segments_of_four_windows(monkeypatch, causal, recording=recording)
    inputs = [*qkv(70, requires_grad=recording), projection(requires_grad=recording)]
    reference_inputs = [t.detach().clone().requires_grad_(recording) for t in inputs]
    mask = torch.ones(B, 70, dtype=torch.bool)
    mask[1, 61:] = False  # right padding: every query sees a key (the reference's softmax of nothing is NaN)
    out, _ = favor_attention(*inputs, causal=causal, key_padding_mask=mask, local_window=5, sink_tokens=3,
                             feature_map=feature_map)
    expected = naive(*reference_inputs, causal=causal, mask=mask, feature_map=feature_map)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    if recording:
        assert_same_input_gradients(out, expected, inputs, reference_inputs)
    assert len(plans) == 1


@pytest.mark.parametrize("splits", [list(range(1, 29)), [3, 4, 9, 17, 18], [12]])  # token by token, pieces, prefill
@pytest.mark.parametrize("window, sinks", [(1, 0), (4, 2), (6, 1)])
def test_decoding_matches_the_naive_hybrid(window, sinks, splits, feature_map):
    q, k, v = qkv(29)
    mask = torch.ones(B, 29, dtype=torch.bool)
    mask[0, :5] = False  # left padding, as in batched generation
    state, outputs, start = None, [], 0
    for end in [*splits, 29]:
        piece = slice(start, end)
        out, state = recurrent_hybrid_favor(q[:, :, piece], k[:, :, piece], v[:, :, piece], projection(), state,
                                            local_window=window, sink_tokens=sinks, key_padding_mask=mask[:, piece],
                                            far_log_weight=FAR_LOG_WEIGHT, feature_map=feature_map)
        outputs.append(out)
        start = end
    expected = naive(q, k, v, projection(), causal=True, mask=mask, window=window, sinks=sinks,
                     far_log_weight=FAR_LOG_WEIGHT, feature_map=feature_map)
    stepped = torch.cat(outputs, -2)
    torch.testing.assert_close(stepped[1], expected[1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(stepped[0, :, 5:], expected[0, :, 5:], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "values, field",
    [
        (dict(feature_map="cosine"), "feature_map"),
        (dict(feature_map="hedgehog", redraw_interval=0), "feature_map"),
        (dict(feature_map="softmax", redraw_interval=0), "feature_map"),  # no window: no far part to learn
        (dict(local_window=8, feature_map="softmax", redraw_interval=0, feature_scaling="sqrt_d"), "feature_scaling"),
        (dict(local_window=8, feature_map="softmax"), "redraw_interval"),  # a redraw would replace the learned ω
        (dict(local_window=8, feature_map="hedgehog", redraw_interval=0, nb_features=255), "nb_features"),
    ],
)
def test_bad_settings_raise_naming_the_field(values, field):
    with pytest.raises(ValueError, match=field):
        PerformerConfig(**values)


def test_the_op_refuses_it_without_a_window_with_an_unknown_name_or_an_odd_hedgehog(feature_map):
    q, k, v = qkv(8)
    with pytest.raises(ValueError, match=f"feature_map='{feature_map}' .* needs local_window ≥ 1"):
        favor_attention(q, k, v, projection(), feature_map=feature_map)
    with pytest.raises(ValueError, match="feature_map must be one of"):
        favor_attention(q, k, v, projection(), local_window=4, feature_map="cosine")
    with pytest.raises(ValueError, match="nb_features must be even"):
        favor_attention(q, k, v, projection()[:-1], local_window=4, feature_map="hedgehog")


def test_a_model_converts_trains_saves_loads_and_generates_with_it(tmp_path, feature_map):
    stock = transformers.LlamaForCausalLM(tiny_llama_config()).eval()
    settings = PerformerConfig(nb_features=16, local_window=3, sink_tokens=1, far_weight=True, feature_map=feature_map,
                               redraw_interval=0)
    model = hf_performer.to_performer(stock, settings).eval()
    omegas = [p.projection for p in model.favor_projections()]
    for omega in omegas:  # a learned map starts soft: unit rows (hedgehog: [ω; −ω])
        torch.testing.assert_close(omega.norm(dim=1), torch.ones(16))
        if feature_map == "hedgehog":
            torch.testing.assert_close(omega[8:], -omega[:8])
    ids = torch.randint(3, VOCAB, (2, 11))
    favor = hf_performer.to_performer(stock, PerformerConfig(nb_features=16, local_window=3, sink_tokens=1)).eval()
    assert not torch.allclose(model(ids, use_cache=False).logits, favor(ids, use_cache=False).logits)

    select_trainable(model, "attention+features")  # attention transfer's choice: ω and the far weights train
    model(ids, labels=ids, use_cache=False).loss.backward()
    projections = list(model.favor_projections())
    assert all(p.projection.grad.abs().max() > 0 and p.far_log_weight.grad.abs().min() > 0 for p in projections)
    with torch.no_grad():
        for p in projections:
            p.projection.mul_(3.0)
            p.far_log_weight.fill_(2.0)
    trained = model(ids, use_cache=False).logits

    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.performer_config.feature_map == feature_map
    assert torch.equal(loaded(ids, use_cache=False).logits, trained)
    assert_cached_generation_recomputes(loaded, ids[:, :6])  # FavorCache
    # ω was learned for this map: loading it as FAVOR+ features is refused; its far part may be switched off
    with pytest.raises(ValueError, match="feature_map"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path, performer_config={"feature_map": "favor+"})
    off = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, performer_config={"far_part": "none", "far_weight": False}).eval()
    window_only = hf_performer.to_performer(stock, PerformerConfig(nb_features=16, local_window=3, sink_tokens=1,
                                                                   far_part="none")).eval()
    torch.testing.assert_close(off(ids, use_cache=False).logits, window_only(ids, use_cache=False).logits)
