"""What every Performer config and model class adds to its transformers base class.

A family file (``bert.py``, ``gpt2.py``, ``llama.py``) declares ``Performer<Stock>`` classes as
``class PerformerBertModel(_PerformerBert, BertModel)`` and lists them in a :class:`Family` entry
(stock, Performer and Auto class of every head); :mod:`hf_performer.patching` registers the entries.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers.generation import GenerationMode

from hf_performer.config import PerformerConfig
from hf_performer.integration.attention import ATTENTION_NAME
from hf_performer.integration.cache import CACHE_KWARG, NEEDS_KEYS_AND_VALUES, FavorCache
from hf_performer.integration.projection import FavorProjection


class PerformerConfigMixin:
    """Keeps the FAVOR+ settings and defaults to FAVOR+.

    ``performer_config`` is a :class:`PerformerConfig` (its dict form in config.json), the one place
    the attention layers read their settings from.  Assigning a dict changes only the fields it names,
    which is how ``from_pretrained(..., performer_config={"causal_chunk_size": 128})`` reaches a
    saved config; assigning a ``PerformerConfig`` replaces the settings.

    transformers does not save ``attn_implementation``, so a saved Performer checkpoint reloads as
    FAVOR+ because its model type's config defaults to it.  Pass ``attn_implementation="sdpa"`` to
    run the same weights with exact attention (for example as a distillation teacher).
    """

    def __post_init__(self, performer_config=None, **kwargs):
        self.performer_config = performer_config
        kwargs.setdefault("attn_implementation", ATTENTION_NAME)
        super().__post_init__(**kwargs)
        # transformers validates a config after __init__ only for the classes it decorates with @strict,
        # not for subclasses such as this one; without it output_attentions=True would load and
        # return no attentions where sdpa refuses
        self.validate()

    def __setattr__(self, name, value):
        # kwargs of from_pretrained land here too: store a validated PerformerConfig whatever was passed
        if name == "performer_config":
            current = self.__dict__.get("performer_config")
            value = PerformerConfig.coerce(value) if current is None or value is None else current.updated(value)
        super().__setattr__(name, value)

    def to_dict(self) -> dict:
        values = super().to_dict()
        values["performer_config"] = self.performer_config.to_dict()
        return values


_FEATURE_KEYS = r"\.favor\.(projection|draws|steps|far_log_weight)$"


class PerformerModelMixin:
    """Attaches a :class:`FavorProjection` as ``.favor`` to every attention module of the model.

    The projections are persistent buffers (``...favor.projection``, ``...favor.draws``,
    ``...favor.steps``): saved with the weights, absent from stock checkpoints, where they are drawn
    from the seed instead (and ``...favor.far_log_weight``, with ``far_weight``, starts at 0).
    """

    attention_classes: tuple[type[nn.Module], ...] = ()

    def __init_subclass__(cls, **kwargs):
        """A model class (a mixin followed by a stock class) also refuses ``output_attentions`` and does not
        expect stock checkpoints to hold the features."""
        super().__init_subclass__(**kwargs)
        if not issubclass(cls, PreTrainedModel) or getattr(cls.forward, "__refuses_output_attentions__", False):
            return
        cls.forward = _refusing_output_attentions(cls.forward)
        cls._keys_to_ignore_on_load_missing = [*(cls._keys_to_ignore_on_load_missing or []), _FEATURE_KEYS]

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        for module in self.modules():
            if isinstance(module, self.attention_classes):
                module.favor = FavorProjection(self.config, _head_dim(module), module.layer_idx, _stream(module))

    def favor_projections(self) -> list[FavorProjection]:
        return [m for m in self.modules() if isinstance(m, FavorProjection)]

    def initialize_weights(self):
        """Also draw the features that a checkpoint did not provide (a stock checkpoint has none).

        Not done in ``_init_weights``: transformers dispatches a head class's inner base model (a stock
        ``BertModel`` inside ``PerformerBertForMaskedLM``) to that model's own ``_init_weights``.
        """
        super().initialize_weights()
        for projection in self.favor_projections():
            if not getattr(projection.projection, "_is_hf_initialized", False):
                projection.reset()
            elif not getattr(projection.steps, "_is_hf_initialized", False):
                projection.steps.zero_()  # saved before training steps were counted
            weight = getattr(projection, "far_log_weight", None)
            if weight is not None and not getattr(weight, "_is_hf_initialized", False):
                with torch.no_grad():
                    weight.zero_()  # converted without far_weight: weight 1, the outputs it had

    def redraw_features(self) -> None:
        """Draw new random features in every layer now (training redraws on its own schedule:
        :func:`hf_performer.count_training_step`)."""
        for projection in self.favor_projections():
            projection.redraw()


class PerformerDecoderMixin:
    """Causal families (GPT-2, Llama): ``generate()`` decodes from a constant-size :class:`FavorCache`.

    Used when the model runs ``attn_implementation="favor+"`` without cross-attention and neither a
    cache (``past_key_values``, ``cache`` in newer transformers) nor ``cache_implementation`` is
    given.  ``cache_implementation="dynamic"`` still selects transformers' key/value cache (same
    outputs, O(context) per step).  The other cache implementations (static, offloaded, quantized,
    ...) and assisted decoding need keys and values that the state does not have: they raise instead
    of quietly falling back.
    """

    def _prepare_cache_for_generation(
        self, generation_config, model_kwargs: dict, generation_mode, batch_size: int, max_cache_length: int
    ):
        implementation = generation_config.cache_implementation
        decodes_from_state = (
            self.config._attn_implementation == ATTENTION_NAME
            and not getattr(self.config, "add_cross_attention", False)
            and model_kwargs.get(CACHE_KWARG) is None
            and generation_config.use_cache is not False
            and implementation != "dynamic"
        )
        if not decodes_from_state:
            return super()._prepare_cache_for_generation(
                generation_config, model_kwargs, generation_mode, batch_size, max_cache_length
            )
        if implementation is not None:
            raise ValueError(
                f"cache_implementation={implementation!r} stores keys and values, but {NEEDS_KEYS_AND_VALUES}. "
                "Leave cache_implementation unset (constant-memory FavorCache) or pass 'dynamic'."
            )
        if generation_mode == GenerationMode.ASSISTED_GENERATION:
            raise ValueError(
                f"assisted decoding rolls rejected tokens back out of the cache, but {NEEDS_KEYS_AND_VALUES}. "
                "Pass cache_implementation='dynamic' to generate() to decode with keys and values instead."
            )
        model_kwargs[CACHE_KWARG] = FavorCache()


def _head_dim(module: nn.Module) -> int:
    for name in ("head_dim", "attention_head_size"):
        if hasattr(module, name):
            return int(getattr(module, name))
    raise TypeError(f"cannot tell the head dimension of {type(module).__name__}")


def _stream(module: nn.Module) -> int:
    """1 for cross-attention (its own features, independent of the same layer's self-attention)."""
    return int(getattr(module, "is_cross_attention", False) or "CrossAttention" in type(module).__name__)


def _refusing_output_attentions(forward):
    """``forward`` that explains why FAVOR+ has no attention weights; keeps the signature (Trainer and
    generate inspect it)."""

    @functools.wraps(forward)
    def checked_forward(self, *args, **kwargs):
        if kwargs.get("output_attentions") and self.config._attn_implementation == ATTENTION_NAME:
            raise ValueError(
                "output_attentions=True: FAVOR+ never forms the attention matrix, so there are no attention "
                "weights to return. Load the same checkpoint with attn_implementation='eager' to inspect "
                "softmax attention."
            )
        return forward(self, *args, **kwargs)

    checked_forward.__refuses_output_attentions__ = True
    return checked_forward


@dataclass(frozen=True)
class Head:
    """One model class of a family: the transformers Auto class that loads it, the stock class and its
    FAVOR+ version (``AutoModelForMaskedLM``, ``BertForMaskedLM``, ``PerformerBertForMaskedLM``)."""

    auto_class: type
    stock_class: type
    performer_class: type


@dataclass(frozen=True)
class Family:
    """One supported architecture: its stock and Performer config classes and one :class:`Head` per model class."""

    stock_config_class: type
    config_class: type
    heads: tuple[Head, ...]

    @property
    def stock_model_type(self) -> str:
        return self.stock_config_class.model_type

    @property
    def model_type(self) -> str:
        return self.config_class.model_type

    def head_for(self, model_class: type) -> Head | None:
        """The head whose stock or Performer class is ``model_class``."""
        return next((h for h in self.heads if model_class in (h.stock_class, h.performer_class)), None)

    def head_named(self, class_name: str) -> Head | None:
        """The head whose stock or Performer class is called ``class_name`` (config.json's ``architectures``)."""
        return next((h for h in self.heads if class_name in (h.stock_class.__name__, h.performer_class.__name__)), None)

    @property
    def base_model(self) -> Head:
        """The head without a task head (``AutoModel``): what a config without ``architectures`` loads as."""
        return next(h for h in self.heads if h.auto_class is AutoModel)

    def stock_class_names(self) -> list[str]:
        return sorted(h.stock_class.__name__ for h in self.heads)
