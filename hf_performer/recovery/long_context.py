"""Perplexity of the same tokens with short and with long context: what a model gains from reading further.

A model whose attention reaches only a local window (plus a few sink tokens) scores the last tokens of a
long span as if the span began at its window; a model that really reads the whole span scores them better.
:func:`tail_perplexity` measures exactly that: the text is cut into spans of ``span`` tokens, and the last
``scored`` tokens of each are predicted from at most ``context`` tokens (the end of the span), so the same
tokens are scored at every context length and perplexities at different contexts compare directly.
"""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def tail_perplexity(model, token_ids: torch.Tensor, *, span: int, scored: int, context: int) -> tuple[float, int]:
    """Perplexity of the last ``scored`` tokens of every full ``span``-token piece of ``token_ids [N]``,
    each predicted from the tokens before it within the last ``context`` tokens of its span (a causal
    LM, one span at a time) → ``(perplexity, number of tokens scored)``.

    ``scored < context ≤ span``: every scored token has at least one token of context.
    """
    if not 0 < scored < context <= span:
        raise ValueError(
            f"need 0 < scored < context ≤ span (each scored token needs a token before it inside the context), got "
            f"scored={scored}, context={context}, span={span}"
        )
    spans = token_ids.numel() // span
    if spans == 0:
        raise ValueError(f"the text has {token_ids.numel()} tokens, fewer than one span of {span}; give a longer text")
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, spans * span, span):
        inputs = token_ids[start + span - context : start + span][None].to(device)
        logits = model(input_ids=inputs, use_cache=False).logits[0, -scored - 1 : -1].float()
        total += torch.nn.functional.cross_entropy(logits, inputs[0, -scored:], reduction="sum").item()
        count += scored
    return math.exp(total / count), count
