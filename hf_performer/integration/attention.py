"""The ``"favor+"`` entries of transformers' ``AttentionInterface`` and ``AttentionMaskInterface``.

Models call ``favor_attention_forward`` wherever they would call SDPA, with the projected
``query [B, H, Lq, D]``, ``key``/``value`` ``[B, Hk, Lk, D]`` (after RoPE, after any key/value cache).
With a :class:`~hf_performer.integration.cache.FavorCache` the keys are only this step's, and the
past comes in as the cache layer's state: a FAVOR+ state, or with a local window or sinks a
:class:`~hf_performer.favor.hybrid.HybridState` (sinks, window and the FAVOR+ state of the rest).
The mask function makes transformers hand us a ``[B, Lk]`` key padding mask instead of a 4-D bias:
without it, transformers' mask preprocessing returns ``None`` for unknown implementations and
padding would be silently attended to.
"""

from __future__ import annotations

import torch
from transformers.masking_utils import bidirectional_mask_function, causal_mask_function
from transformers.utils import logging

from hf_performer.favor.attention import favor_attention
from hf_performer.favor.features import KERNELS
from hf_performer.favor.hybrid import HybridState, recurrent_hybrid_favor
from hf_performer.integration.cache import cache_layer_of

logger = logging.get_logger(__name__)

ATTENTION_NAME = "favor+"


def favor_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor | None:
    """Mask interface: the ``[B, kv_length]`` bool key padding mask (``True`` = attend), or ``None``.

    Causality is not part of the mask: ``favor_attention_forward`` reads ``module.is_causal``.  Any
    other pattern (sliding windows, packed sequences, custom and/or masks) cannot be expressed by
    FAVOR+ and is refused rather than silently ignored.
    """
    if mask_function not in (causal_mask_function, bidirectional_mask_function):
        raise ValueError(
            "attn_implementation='favor+' supports plain causal or bidirectional attention with padding only, "
            f"but this model asked for a custom mask pattern ({getattr(mask_function, '__name__', mask_function)}: "
            "sliding window, packed sequences or an or/and mask). Use attn_implementation='sdpa' for this model, "
            "or pass an explicit 2-D attention_mask instead of packed position_ids."
        )
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:]
    # Dropping an all-ones mask saves the masking work in eager mode; under torch.compile the check
    # would branch on tensor values (a graph break), and the mask gives the same result anyway
    if torch.compiler.is_compiling() or not bool(attention_mask.all()):
        return attention_mask
    return None


def favor_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention interface: FAVOR+ in place of softmax attention; returns ``([B, Lq, H, Dv], None)``.

    - ``scaling`` is honoured (GPT-2 may scale by the inverse layer index).
    - Causal iff ``is_causal`` (when given) or ``module.is_causal``; queries are the last positions of
      the keys, so cross-attention (``Lq ≠ Lk``) and key/value caches work.
    - Keys from a ``FavorCache`` layer: attention continues from the layer's state (FAVOR+, or hybrid
      with ``local_window`` / ``sink_tokens``) and the new state is stored back; the ``[B, past + Lk]`` padding mask is cut to this step's ``Lk`` keys (the
      padding of earlier steps is already absent from the state).
    - ``local_window`` / ``sink_tokens`` on cross-attention raise: a window needs one sequence.
    - Attention dropout is not applied: FAVOR+ never forms the attention matrix it would drop from
      (a one-time warning says so when training with ``dropout > 0``).
    - No attention weights are returned (``None`` where eager returns them), for the same reason;
      Performer models refuse ``output_attentions=True`` with an explanation.
    """
    favor = getattr(module, "favor", None)
    if favor is None:
        raise ValueError(
            f"{type(module).__name__} has no FAVOR+ random features. Load the model with "
            "`from_pretrained(..., attention='favor+')` after `import hf_performer`, or convert it with "
            "`hf_performer.to_performer(model)`; setting attn_implementation='favor+' on a loaded model is not enough."
        )
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            f"FAVOR+ takes a [batch, kv_len] key padding mask but got a {attention_mask.dim()}-D mask of shape "
            f"{tuple(attention_mask.shape)}: an arbitrary attention pattern cannot be expressed with random "
            "features. Pass a 2-D attention_mask (1 = token, 0 = padding) to the model instead."
        )
    for unsupported in ("sliding_window", "softcap", "s_aux"):
        if kwargs.get(unsupported) is not None:
            raise ValueError(f"FAVOR+ does not support `{unsupported}`; use attn_implementation='sdpa' for this model")
    if dropout > 0.0 and module.training:
        logger.warning_once(
            f"FAVOR+ ignores attention dropout (p={dropout}): there is no attention matrix to drop entries from."
        )
    causal = bool(module.is_causal if is_causal is None else is_causal)
    cache_layer = cache_layer_of(key)
    initial_state = None
    if cache_layer is not None:
        if not causal:
            raise ValueError("a FavorCache holds causal state; it cannot serve bidirectional attention")
        initial_state = cache_layer.initial_state()
        if attention_mask is not None:
            attention_mask = attention_mask[:, -key.shape[-2] :]
    settings = favor.settings
    window, sinks = settings.local_window, settings.sink_tokens
    hybrid = bool(window or sinks)
    if hybrid and favor.stream:
        raise ValueError(
            f"PerformerConfig.local_window={window} / sink_tokens={sinks} describe positions within one sequence, "
            f"but {type(module).__name__} is cross-attention (its queries and keys come from different sequences). "
            "Use local_window=0 and sink_tokens=0 for models with cross-attention (encoder-decoder, "
            "add_cross_attention=True)."
        )
    if initial_state is not None and isinstance(initial_state, HybridState) != hybrid:
        raise ValueError(
            f"this FavorCache was filled with other local_window / sink_tokens settings than the current "
            f"local_window={window}, sink_tokens={sinks}; start a new FavorCache after changing them"
        )
    if cache_layer is not None and hybrid:
        output, state = recurrent_hybrid_favor(
            query,
            key,
            value,
            favor.projection,
            initial_state,
            local_window=window,
            sink_tokens=sinks,
            far_part=settings.far_part,
            far_log_weight=favor.far_log_weights(),
            scaling=scaling,
            key_padding_mask=attention_mask,
            feature_map=settings.feature_map,
            far_key_limit=settings.far_key_limit,
        )
    else:
        output, state = favor_attention(
            query,
            key,
            value,
            favor.projection,
            scaling=scaling,
            causal=causal,
            key_padding_mask=attention_mask,
            kernel_fn=KERNELS[settings.kernel],
            kernel_epsilon=settings.kernel_epsilon,
            chunk_size=settings.causal_chunk_size,
            initial_state=initial_state,
            local_window=window,
            sink_tokens=sinks,
            far_part=settings.far_part,
            far_log_weight=favor.far_log_weights(),
            feature_map=settings.feature_map,
            far_key_limit=settings.far_key_limit,
        )
    if cache_layer is not None:
        cache_layer.advance(state)
    elif favor.inputs_hook is not None:
        favor.inputs_hook(query, key, value, attention_mask, scaling, causal)
    return output.transpose(1, 2).contiguous(), None
