"""Sentence-embedding fine-tuning: mean pooling and a cosine-similarity regression on sentence pairs.

The objective of sentence-transformers' ``CosineSimilarityLoss`` (all-MiniLM-L6-v2's family):
``MSE(cos(u, v), score / max_score)`` with ``u``, ``v`` the mean-pooled token states of the two
sentences.  The model stays a plain ``AutoModel`` encoder, so the result saves and loads like any
checkpoint; the pooling lives here, not in a wrapper module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import Trainer

SIDES = ("a", "b")


def mean_pooled(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, **extra) -> torch.Tensor:
    """Mean of the last hidden states over real tokens: ``[batch, hidden]``."""
    hidden = model(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


def pair_similarity(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cosine similarity ``[batch]`` of the pairs in ``inputs`` (``a_input_ids``, ``b_attention_mask``, ...)."""
    embeddings = []
    for side in SIDES:
        prefix = f"{side}_"
        fields = {k.removeprefix(prefix): v for k, v in inputs.items() if k.startswith(prefix)}
        embeddings.append(mean_pooled(model, **fields))
    return F.cosine_similarity(*embeddings, dim=-1)


class SentencePairCollator:
    """Pads each side of tokenized pairs (``a_*`` and ``b_*`` fields) separately; ``labels`` as float."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch: dict[str, torch.Tensor] = {}
        for side in SIDES:
            prefix = f"{side}_"
            padded = self.tokenizer.pad(
                [{k.removeprefix(prefix): v for k, v in row.items() if k.startswith(prefix)} for row in rows],
                return_tensors="pt",
            )
            batch.update({prefix + k: v for k, v in padded.items()})
        batch["labels"] = torch.tensor([float(row["labels"]) for row in rows])
        return batch


class SentenceEmbeddingTrainer(Trainer):
    """``Trainer`` for pair regression: loss ``MSE(cos(u, v), labels)``; predictions are the cosines."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        similarity = pair_similarity(model, inputs)
        loss = F.mse_loss(similarity, inputs["labels"].to(similarity.dtype))
        return (loss, {"loss": loss, "similarity": similarity}) if return_outputs else loss
