"""Longer inputs for checkpoints with a learned position table (BERT, GPT-2).

FAVOR+ makes attention linear in length, but a BERT checkpoint still has only
``max_position_embeddings`` (512) learned positions.  ``extend_position_embeddings`` tiles the
learned table (the Longformer initialisation: copy the first ``n`` rows onward) so the model accepts
longer inputs at once and can be fine-tuned from there.
"""

from __future__ import annotations

import torch
from torch import nn


def _position_table(model: nn.Module) -> tuple[nn.Module, str]:
    for module in model.modules():
        for name in ("position_embeddings", "wpe"):
            if isinstance(getattr(module, name, None), nn.Embedding):
                return module, name
    raise ValueError(
        f"{type(model).__name__} has no learned position table (position_embeddings / wpe); models with rotary "
        "positions (Llama) need no extension: set config.max_position_embeddings instead."
    )


@torch.no_grad()
def extend_position_embeddings(model: nn.Module, max_positions: int) -> nn.Module:
    """Grow the learned position table of ``model`` in place to ``max_positions`` rows by tiling it.

    Also grows the ``position_ids`` / ``token_type_ids`` buffers of BERT embeddings and updates
    ``config.max_position_embeddings`` (``n_positions`` for GPT-2).  Returns ``model``.
    """
    owner, name = _position_table(model)
    old = getattr(owner, name)
    if max_positions <= old.num_embeddings:
        raise ValueError(f"max_positions ({max_positions}) must exceed the current {old.num_embeddings} positions")
    repeats = -(-max_positions // old.num_embeddings)
    new = nn.Embedding(max_positions, old.embedding_dim, device=old.weight.device, dtype=old.weight.dtype)
    new.weight.copy_(old.weight.repeat(repeats, 1)[:max_positions])
    setattr(owner, name, new)
    for buffer in ("position_ids", "token_type_ids"):
        if hasattr(owner, buffer):
            current = getattr(owner, buffer)
            grown = torch.arange(max_positions, device=current.device).expand(1, -1)
            owner.register_buffer(buffer, grown if buffer == "position_ids" else torch.zeros_like(grown), persistent=False)
    model.config.max_position_embeddings = max_positions  # GPT-2 maps this name to n_positions
    return model
