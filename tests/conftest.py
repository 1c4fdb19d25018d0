"""Shared fixtures: small random configs of every family and the offline environment."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from transformers import BertConfig, GPT2Config, LlamaConfig

import hf_performer  # noqa: F401  (registers FAVOR+)

VOCAB = 99


def tiny_bert_config(**overrides) -> BertConfig:
    values = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=VOCAB)
    return BertConfig(**{**values, **overrides})


def tiny_gpt2_config(**overrides) -> GPT2Config:
    values = dict(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return GPT2Config(**{**values, **overrides})


def tiny_llama_config(**overrides) -> LlamaConfig:
    values = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=VOCAB,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return LlamaConfig(**{**values, **overrides})


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def byte_level_tokenizer(tmp_path_factory):
    """A GPT-2-style byte-level BPE tokenizer trained in a second on a few sentences, saved as a transformers
    tokenizer folder (``tokenizer.json``, ``tokenizer_config.json``), so no test needs a downloaded tokenizer."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    sentences = ["A man with a hard hat is dancing.", "A young child is riding a horse.", "Three men play chess."]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(sentences * 10, vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )
    folder = tmp_path_factory.mktemp("byte-level-tokenizer")
    tokenizer.save_pretrained(folder)
    return folder


def assert_same_input_gradients(out, expected, inputs, reference_inputs) -> None:
    """Backpropagate one random output gradient through ``out`` and ``expected`` and compare the gradients
    of the matching ``inputs`` and ``reference_inputs`` (fast op vs naive reference)."""
    grad_out = torch.randn_like(expected)
    out.backward(grad_out)
    expected.backward(grad_out)
    for got, want in zip(inputs, reference_inputs):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-3, atol=1e-5)


def assert_cached_generation_recomputes(model, prompt: torch.Tensor, new_tokens: int = 5) -> None:
    """Greedy ``generate`` of ``new_tokens`` after ``prompt`` (with the model's cache) equals greedy decoding by
    hand, every step a full forward of the whole sequence without a cache."""
    generated = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    full = prompt
    for _ in range(new_tokens):
        full = torch.cat([full, model(input_ids=full, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(generated, full)
