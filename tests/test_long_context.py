"""Perplexity of the same tokens at several context lengths (issue 13's context-2048 measure)."""

import math

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

import hf_performer
from hf_performer import PerformerConfig
from hf_performer.recovery.long_context import tail_perplexity
from tests.conftest import VOCAB, tiny_llama_config
from tests.test_recipes import DATA, recipe

IDS = torch.randint(3, VOCAB, (70,), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(initializer_range=0.2)).eval()


def manual(model, inputs: torch.Tensor, scored: int) -> torch.Tensor:
    """Summed next-token NLL of the last ``scored`` tokens of ``inputs [L]``, from one full forward."""
    logits = model(input_ids=inputs[None]).logits[0]
    return torch.nn.functional.cross_entropy(logits[-scored - 1 : -1], inputs[-scored:], reduction="sum")


def test_each_span_scores_its_last_tokens_from_the_end_of_the_span(llama):
    ppl, count = tail_perplexity(llama, IDS, span=32, scored=7, context=20)
    assert count == 2 * 7  # 70 tokens: two whole spans of 32, the last 6 tokens unused
    nll = manual(llama, IDS[12:32], 7) + manual(llama, IDS[44:64], 7)
    assert ppl == pytest.approx(math.exp(nll.item() / 14), rel=1e-5)


def test_a_window_only_model_scores_the_same_at_every_context_beyond_its_window(llama):
    """Keys beyond the window are dropped: context past the reach of 2 layers of windows of 4 (6 tokens
    back) changes nothing, while the hybrid's FAVOR+ part reads it."""
    window_only = hf_performer.to_performer(llama, PerformerConfig(nb_features=8, local_window=4, far_part="none"))
    short, _ = tail_perplexity(window_only, IDS, span=32, scored=6, context=14)
    long, _ = tail_perplexity(window_only, IDS, span=32, scored=6, context=32)
    assert short == pytest.approx(long, rel=1e-5)
    hybrid = hf_performer.to_performer(llama, PerformerConfig(nb_features=8, local_window=4))
    assert tail_perplexity(hybrid, IDS, span=32, scored=6, context=14)[0] != pytest.approx(
        tail_perplexity(hybrid, IDS, span=32, scored=6, context=32)[0], rel=1e-5
    )


@pytest.mark.parametrize("span, scored, context", [(32, 8, 8), (32, 8, 40), (32, 0, 16)])
def test_impossible_lengths_raise_naming_them(llama, span, scored, context):
    with pytest.raises(ValueError, match="scored < context ≤ span"):
        tail_perplexity(llama, IDS, span=span, scored=scored, context=context)


def test_a_text_shorter_than_one_span_raises(llama):
    with pytest.raises(ValueError, match="fewer than one span"):
        tail_perplexity(llama, IDS[:20], span=32, scored=4, context=8)


def test_the_script_tables_every_model_against_the_first(tmp_path, byte_level_tokenizer, capsys):
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(byte_level_tokenizer)
    config = tiny_llama_config(vocab_size=len(tokenizer), initializer_range=0.2)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "exact")
    tokenizer.save_pretrained(tmp_path / "exact")
    hf_performer.convert(tmp_path / "exact", tmp_path / "hybrid", PerformerConfig(nb_features=8, local_window=4))
    out = tmp_path / "table.md"
    recipe("long_context_perplexity").main([
        "--text", str(DATA / "wikitext2_valid_300.txt"), "--span", "64", "--scored", "15", "--contexts", "16", "64",
        "--models", f"exact={tmp_path / 'exact'}", f"hybrid={tmp_path / 'hybrid'}", "--out", str(out),
    ])  # fmt: skip
    table = out.read_text().splitlines()
    assert table[0] == "| model | context 16 | × exact | context 64 | × exact |"
    assert table[2].startswith("| exact |") and table[2].count("| 1.000 |") == 2
    assert table[3].startswith("| hybrid |")
    recipe("long_context_perplexity").main([
        "--text", str(DATA / "wikitext2_valid_300.txt"), "--span", "64", "--scored", "15", "--contexts", "16", "64",
        "--models", f"exact={tmp_path / 'exact'}", f"hybrid={tmp_path / 'hybrid'}", "--far_key_limit", "2",
        "--out", str(out),
    ])  # fmt: skip
    limited = out.read_text().splitlines()
    assert limited[2] == table[2] and limited[3] != table[3]  # the exact model as it was, the hybrid's far part capped
