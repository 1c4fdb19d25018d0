"""Constant-memory decoding: a transformers ``Cache`` that holds FAVOR+ state instead of keys and values.

Causal FAVOR+ is a recurrent network: per layer and head, the past enters attention only through
``S = Σ φ(k) vᵀ`` (``m × Dv``) and ``z = Σ φ(k)`` (``m``), the :class:`FavorState`.  A
:class:`FavorCacheLayer` keeps that state and the number of tokens seen, so its size does not grow
with the context and one decoding step costs O(m·Dv) per head whatever the context length.
Hybrid FAVOR+ (``local_window`` W, ``sink_tokens`` S) keeps a :class:`HybridState` instead: the S sink
keys/values, the last W − 1 keys/values and the FAVOR+ state of the tokens that left the window,
still constant in size; a step costs O((W + S + m)·d) per head.

The hand-off with transformers: GPT-2 and Llama attention modules call
``past_key_values.update(key, value, layer_idx)`` and pass what it returns to the attention
function.  :meth:`FavorCacheLayer.update` stores nothing and returns the *new* keys and values, the
keys tagged with the layer (:func:`cache_layer_of`); ``favor_attention_forward`` continues from the
layer's state and hands the new state back with :meth:`FavorCacheLayer.advance`.
``PerformerDecoderMixin`` (``models/base.py``) makes ``generate()`` use a :class:`FavorCache`.
"""

from __future__ import annotations

import inspect

import torch
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.generation import GenerationMixin

from hf_performer.favor.attention import FavorState
from hf_performer.favor.hybrid import HybridState

_LAYER_TAG = "favor_cache_layer"

CACHE_KWARG = (
    "cache"
    if "cache" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    else "past_key_values"
)
"""The model keyword under which ``generate()`` passes a cache: newer transformers renamed
``past_key_values`` to ``cache`` and warn (then fail) when the old name is used."""

NEEDS_KEYS_AND_VALUES = (
    "FAVOR+ decodes from a recurrent state (Σφ(k)vᵀ and Σφ(k)) that cannot drop tokens or be written "
    "position by position"
)


class FavorCacheLayer(CacheLayerMixin):
    """One layer's FAVOR+ state: ``summary [B, Hk, m, Dv + 1]`` (``Σ φ(k)vᵀ`` next to ``Σ φ(k)``), ``log_scale [B, Hk, m]``
    (a :class:`FavorState`), or with hybrid FAVOR+ a :class:`HybridState` holding such a state.

    Kept per *key* head, as the FAVOR+ ops compute it: grouped-query heads that share a key head see
    the same keys and values, hence the same state (3× smaller for SmolLM2 than per query head).
    ``seen_tokens`` counts every position given so far, padding included, as a key/value cache's
    length would: transformers derives mask sizes and default positions from it.
    """

    is_croppable = False
    supports_early_init = False  # there are no key/value tensors to preallocate

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.state: FavorState | HybridState | None = None
        self.seen_tokens = 0
        self.awaiting_attention = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Nothing to allocate: the state is created by the first attention call."""

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Count the new ``[B, Hk, L, D]`` keys and return them unchanged, tagged with this layer."""
        if self.awaiting_attention:
            raise RuntimeError(
                "a FavorCache was used with an attention function other than 'favor+' (the state of this layer "
                "was never advanced). Use attn_implementation='favor+' with a FavorCache, or a DynamicCache "
                "with other attention implementations."
            )
        self.seen_tokens += key_states.shape[-2]
        self.awaiting_attention = True
        tagged = key_states.view_as(key_states)
        setattr(tagged, _LAYER_TAG, self)
        return tagged, value_states

    def initial_state(self) -> FavorState | HybridState | None:
        """The state of the tokens before this step (per key head, as the FAVOR+ ops take it)."""
        return self.state

    def advance(self, state: FavorState | HybridState) -> None:
        """Keep ``state`` (``[B, Hk, ...]``) as the state after this step's tokens."""
        self.state = state
        self.awaiting_attention = False

    @property
    def nbytes(self) -> int:
        """Bytes held by this layer (independent of the number of tokens seen)."""
        if self.state is None:
            return 0
        return self.state.nbytes if isinstance(self.state, HybridState) else sum(t.nbytes for t in self.state)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen_tokens + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.state, self.seen_tokens, self.awaiting_attention = None, 0, False

    def _select(self, select) -> None:
        if isinstance(self.state, HybridState):
            self.state = self.state.map(select)
        elif self.state is not None:
            self.state = FavorState(*(select(tensor) for tensor in self.state))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row ``i`` continues from the state of row ``beam_idx[i]``."""
        self._select(lambda tensor: tensor.index_select(0, beam_idx.to(tensor.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select(lambda tensor: tensor.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select(lambda tensor: tensor[indices])

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise ValueError(
                f"cannot remove {abs(tokens_to_remove)} tokens from a FavorCache: {NEEDS_KEYS_AND_VALUES}. "
                "Assisted and speculative decoding need a cache that can roll back: pass "
                "cache_implementation='dynamic' to generate() (keys and values, O(context) per step)."
            )


class FavorCache(Cache):
    """A :class:`FavorCacheLayer` per layer (created on first use); pass it as ``past_key_values``.

    ``generate()`` of a FAVOR+ GPT-2 or Llama model creates one by default.  In a hand-written
    decoding loop, pass ``past_key_values=FavorCache(), use_cache=True`` to the first forward and the
    returned cache to the next ones.
    """

    def __init__(self):
        super().__init__(layer_class_to_replicate=FavorCacheLayer)

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache: constant in the number of tokens, linear in the batch size."""
        return sum(layer.nbytes for layer in self.layers)


def cache_layer_of(key: torch.Tensor) -> FavorCacheLayer | None:
    """The :class:`FavorCacheLayer` whose :meth:`~FavorCacheLayer.update` returned ``key``, if any."""
    return getattr(key, _LAYER_TAG, None)
