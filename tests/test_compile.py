"""``torch.compile(model, fullgraph=True)`` of a FAVOR+ model with a padding mask: no Python branch on
tensor values anywhere between the mask function and the attention output (issue 11, item 4)."""

import torch
import transformers

import hf_performer
from hf_performer import PerformerConfig
from tests.conftest import VOCAB, tiny_llama_config


def test_a_padded_batch_compiles_with_fullgraph_and_matches_eager():
    stock = transformers.LlamaForCausalLM(tiny_llama_config())
    model = hf_performer.to_performer(stock, PerformerConfig(nb_features=16)).eval()
    ids = torch.randint(3, VOCAB, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    eager = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(input_ids=ids, attention_mask=mask, use_cache=False).logits, eager)
