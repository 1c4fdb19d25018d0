"""Constant-memory generation: ``generate()`` decodes FAVOR+ GPT-2 and Llama from a ``FavorCache``, pure
FAVOR+ or hybrid (an exact local window and sink tokens, FAVOR+ beyond)."""

import warnings

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

import hf_performer
from hf_performer import PerformerConfig
from hf_performer.integration.cache import CACHE_KWARG, FavorCache
from tests.conftest import VOCAB, tiny_gpt2_config, tiny_llama_config
from tests.test_real_checkpoints import smollm2_path  # noqa: F401  (fixture)

CAUSAL_MODELS = {
    "gpt2": (tiny_gpt2_config, transformers.GPT2LMHeadModel),
    "llama": (tiny_llama_config, transformers.LlamaForCausalLM),  # grouped-query attention: 4 heads, 2 kv heads
}
PAD = 0
ATTENTION = {"favor": {}, "hybrid": dict(local_window=3, sink_tokens=2)}  # a window far shorter than the sequences


def tiny_performer(model_type, attention="favor"):
    config, stock_class = CAUSAL_MODELS[model_type]
    settings = PerformerConfig(nb_features=32, **ATTENTION[attention])
    return hf_performer.to_performer(stock_class(config()).eval(), settings)


def left_padded_batch():
    ids = torch.randint(3, VOCAB, (2, 9))
    mask = torch.ones_like(ids)
    ids[0, :4], mask[0, :4] = PAD, 0
    return {"input_ids": ids, "attention_mask": mask}


def generate(model, steps=32, **kwargs):
    options = {"max_new_tokens": steps, "min_new_tokens": steps, "pad_token_id": PAD, "return_dict_in_generate": True}
    with torch.no_grad():
        return model.generate(**left_padded_batch(), **{**options, **kwargs})


@pytest.mark.parametrize("model_type", CAUSAL_MODELS)
@pytest.mark.parametrize("attention", ATTENTION)
def test_generate_decodes_from_a_favor_cache_by_default(model_type, attention):
    out = generate(tiny_performer(model_type, attention), steps=2)
    assert isinstance(out.past_key_values, FavorCache)
    assert out.past_key_values.get_seq_length() == out.sequences.shape[1] - 1


@pytest.mark.parametrize("model_type", CAUSAL_MODELS)
def test_generate_warns_about_nothing(model_type):
    model = tiny_performer(model_type)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        generate(model, steps=4)


def test_a_cache_passed_to_generate_is_the_one_it_fills():
    cache = DynamicCache()
    generate(tiny_performer("gpt2"), steps=4, **{CACHE_KWARG: cache})
    assert cache.get_seq_length() == left_padded_batch()["input_ids"].shape[1] + 3


@pytest.mark.parametrize("model_type", CAUSAL_MODELS)
@pytest.mark.parametrize("attention", ATTENTION)
def test_cached_greedy_decoding_matches_full_recomputation(model_type, attention):
    model = tiny_performer(model_type, attention)
    torch.manual_seed(1)
    cached = generate(model, do_sample=False, output_logits=True)
    torch.manual_seed(1)
    recomputed = generate(model, do_sample=False, output_logits=True, use_cache=False)
    assert torch.equal(cached.sequences, recomputed.sequences)
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(recomputed.logits), rtol=0, atol=1e-4)


def test_cached_sampling_draws_the_same_tokens_as_recomputation():
    model = tiny_performer("llama")
    torch.manual_seed(1)
    batch = left_padded_batch()
    sampled = []
    for use_cache in (True, False):
        torch.manual_seed(2)
        with torch.no_grad():
            sampled.append(
                model.generate(**batch, do_sample=True, max_new_tokens=32, pad_token_id=PAD, use_cache=use_cache)
            )
    assert torch.equal(*sampled)


@pytest.mark.parametrize("model_type", CAUSAL_MODELS)
@pytest.mark.parametrize("attention", ATTENTION)
def test_beam_search_reorders_the_state_and_matches_recomputation(model_type, attention):
    model = tiny_performer(model_type, attention)
    beams = {"num_beams": 3, "num_return_sequences": 3, "do_sample": False, "output_scores": True}
    torch.manual_seed(1)
    cached = generate(model, steps=16, **beams)
    torch.manual_seed(1)
    recomputed = generate(model, steps=16, use_cache=False, **beams)
    assert isinstance(cached.past_key_values, FavorCache)
    assert torch.equal(cached.sequences, recomputed.sequences)
    torch.testing.assert_close(cached.sequences_scores, recomputed.sequences_scores, rtol=0, atol=1e-5)


@pytest.mark.parametrize("model_type", CAUSAL_MODELS)
@pytest.mark.parametrize("attention", ATTENTION)
def test_hand_written_decoding_loop_with_a_favor_cache_matches_one_forward(model_type, attention):
    model = tiny_performer(model_type, attention)
    ids = torch.randint(3, VOCAB, (2, 17))
    with torch.no_grad():
        out = model(ids[:, :9], past_key_values=FavorCache(), use_cache=True)
        step_logits = [out.logits[:, -1]]
        for position in range(9, 17):  # positions come from the cache's token count
            out = model(ids[:, position : position + 1], past_key_values=out.past_key_values, use_cache=True)
            step_logits.append(out.logits[:, -1])
        full = model(ids).logits[:, 8:]
    torch.testing.assert_close(torch.stack(step_logits, 1), full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("model_type", CAUSAL_MODELS)
@pytest.mark.parametrize("attention", ATTENTION)
def test_left_padded_batch_fed_in_pieces_gives_the_logits_of_one_forward(model_type, attention):
    """fla's check: decode a left-padded batch through the cache (a prefill, single tokens and a piece of
    several) and compare every real position with one forward over the whole batch."""
    model = tiny_performer(model_type, attention)
    batch = left_padded_batch()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    cache, pieces = FavorCache(), []
    with torch.no_grad():
        for start, end in [(0, 5), (5, 6), (6, 8), (8, 9)]:
            out = model(
                ids[:, start:end], attention_mask=mask[:, :end], position_ids=positions[:, start:end],
                past_key_values=cache, use_cache=True,
            )
            pieces.append(out.logits)
        full = model(ids, attention_mask=mask, position_ids=positions).logits
    stepped = torch.cat(pieces, 1)
    real = mask.bool()
    torch.testing.assert_close(stepped[real], full[real], rtol=0, atol=1e-5)


@pytest.mark.parametrize("attention", ATTENTION)
def test_repeated_then_selected_cache_rows_decode_like_the_rows_they_copy(attention):
    model = tiny_performer("llama", attention)
    ids, following = torch.randint(3, VOCAB, (2, 9)), torch.randint(3, VOCAB, (2, 1))
    with torch.no_grad():
        original = model(ids, past_key_values=FavorCache(), use_cache=True).past_key_values
        copied = model(ids, past_key_values=FavorCache(), use_cache=True).past_key_values
        copied.batch_repeat_interleave(2)  # rows 0, 0, 1, 1
        copied.batch_select_indices(torch.tensor([1, 2]))  # rows 0, 1 again
        expected = model(following, past_key_values=original, use_cache=True).logits
        got = model(following, past_key_values=copied, use_cache=True).logits
    assert torch.equal(got, expected)


@pytest.mark.parametrize("attention", ATTENTION)
def test_cache_memory_does_not_grow_with_generated_tokens(attention):
    model = tiny_performer("gpt2", attention)
    after_10 = generate(model, steps=10).past_key_values
    after_500 = generate(model, steps=500).past_key_values
    assert after_500.get_seq_length() == after_10.get_seq_length() + 490
    assert after_10.nbytes == after_500.nbytes > 0


def test_checkpoint_reloaded_from_disk_decodes_from_the_cache(tmp_path):
    model = tiny_performer("llama")
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.manual_seed(1)
    cached = generate(again, do_sample=False)
    torch.manual_seed(1)
    original = generate(model, do_sample=False, use_cache=False)
    assert isinstance(cached.past_key_values, FavorCache)
    assert torch.equal(cached.sequences, original.sequences)


def test_dynamic_cache_implementation_still_decodes_from_keys_and_values():
    model = tiny_performer("gpt2")
    torch.manual_seed(1)
    dynamic = generate(model, steps=8, cache_implementation="dynamic")
    torch.manual_seed(1)
    favor = generate(model, steps=8)
    assert type(dynamic.past_key_values) is DynamicCache
    assert torch.equal(dynamic.sequences, favor.sequences)


@pytest.mark.parametrize("implementation", ["static", "offloaded", "quantized"])
def test_cache_implementations_that_store_keys_and_values_are_refused(implementation):
    with pytest.raises(ValueError, match=f"cache_implementation='{implementation}' stores keys and values"):
        generate(tiny_performer("llama"), steps=2, cache_implementation=implementation)


def test_assisted_decoding_is_refused_with_a_hint():
    model = tiny_performer("llama")
    with pytest.raises(ValueError, match="assisted decoding.*cache_implementation='dynamic'"):
        generate(model, steps=2, prompt_lookup_num_tokens=2)


def test_cropping_a_favor_cache_is_refused():
    cache = generate(tiny_performer("gpt2"), steps=2).past_key_values
    with pytest.raises(ValueError, match="cannot remove 1 tokens from a FavorCache"):
        cache.crop(-1)


def test_favor_cache_refuses_attention_that_is_not_favor():
    model = tiny_performer("llama")
    model.set_attn_implementation("sdpa")
    batch = left_padded_batch()
    with torch.no_grad():
        cache = model(**batch, past_key_values=FavorCache(), use_cache=True).past_key_values
        with pytest.raises(RuntimeError, match="attention function other than 'favor\\+'"):
            model(input_ids=batch["input_ids"][:, -1:], past_key_values=cache, use_cache=True)


def test_smollm2_cached_greedy_decoding_matches_full_recomputation(smollm2_path):  # noqa: F811
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, attention="favor+").eval()
    batch = tokenizer(
        ["The capital of Italy is", "Once upon a time, in a village by the sea,"], return_tensors="pt", padding=True
    )
    steps = 32
    with torch.no_grad():
        cached = model.generate(
            **batch,
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=tokenizer.pad_token_id,
        )
        # one forward over the final sequences recomputes every step: a future token never changes
        # a past output; positions as generate() gives them (RoPE'd FAVOR+ features depend on them)
        mask = torch.cat([batch["attention_mask"], torch.ones(2, steps, dtype=torch.long)], 1)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        recomputed = model(cached.sequences, attention_mask=mask, position_ids=positions).logits[:, -steps - 1 : -1]
    assert isinstance(cached.past_key_values, FavorCache)
    assert torch.equal(recomputed.argmax(-1), cached.sequences[:, -steps:])
    # float32 rounding, amplified by 30 layers: on SmolLM2's own queries/keys, a layer's recurrent
    # steps equal its one-pass output to 2e-15 in float64 and to 1e-6 (relative) in float32; the
    # full forward at causal_chunk_size=1 differs from chunk 128 by up to 7e-4 (logits up to ±38),
    # and exact attention's key/value cache differs from its full forward by up to 1e-4
    torch.testing.assert_close(torch.stack(cached.logits, 1), recomputed, rtol=0, atol=2e-3)


@pytest.mark.parametrize("far_key_limit", [0, 8])
def test_smollm2_hybrid_cached_greedy_decoding_matches_full_recomputation(smollm2_path, far_key_limit):  # noqa: F811
    """A real checkpoint with a window (W = 16, S = 4) shorter than its ~32-token prompts; with far_key_limit = 8 the
    late queries' far parts are capped, counted alike by the decoding steps and the full forward."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path, padding_side="left")
    settings = PerformerConfig(local_window=16, sink_tokens=4, far_key_limit=far_key_limit)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, attention="favor+", performer_config=settings).eval()
    prompts = [
        "The history of the city goes back to Roman times, when a small fort guarded the crossing of the river "
        "that still runs through its centre today, and",
        "Once upon a time, in a village by the sea, there lived an old fisherman who every morning",
    ]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    steps = 8
    with torch.no_grad():
        cached = model.generate(
            **batch, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, output_logits=True,
            return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id,
        )
        mask = torch.cat([batch["attention_mask"], torch.ones(2, steps, dtype=torch.long)], 1)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        recomputed = model(cached.sequences, attention_mask=mask, position_ids=positions).logits[:, -steps - 1 : -1]
    assert batch["input_ids"].shape[1] > 16 + 4  # the far part is in use
    assert isinstance(cached.past_key_values, FavorCache)
    assert torch.equal(recomputed.argmax(-1), cached.sequences[:, -steps:])
    torch.testing.assert_close(torch.stack(cached.logits, 1), recomputed, rtol=0, atol=2e-3)
