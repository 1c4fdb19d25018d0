"""What every Performer config and model class adds to its transformers base class.

A family file (``bert.py``, ``gpt2.py``, ``llama.py``) combines these mixins with the stock classes
and describes itself in a :class:`Family` entry; ``registration.py`` registers the entries.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from hf_performer.config import PerformerConfig
from hf_performer.integration.attention import ATTENTION_NAME
from hf_performer.integration.projection import FavorProjection
from hf_performer.integration.redraw import track_for_redraws


class PerformerConfigMixin:
    """Keeps the FAVOR+ settings (``performer_config``, a dict in config.json) and defaults to FAVOR+.

    transformers does not save ``attn_implementation``, so a saved Performer checkpoint reloads as
    FAVOR+ because its model type's config defaults to it.  Pass ``attn_implementation="sdpa"`` to
    run the same weights with exact attention (for example as a distillation teacher).
    """

    def __post_init__(self, performer_config=None, **kwargs):
        self.performer_config = performer_config
        kwargs.setdefault("attn_implementation", ATTENTION_NAME)
        super().__post_init__(**kwargs)

    def __setattr__(self, name, value):
        # kwargs of from_pretrained land here too: store the validated JSON form whatever was passed
        if name == "performer_config":
            value = PerformerConfig.coerce(value).to_dict()
        super().__setattr__(name, value)

    @property
    def favor_settings(self) -> PerformerConfig:
        return PerformerConfig.coerce(self.performer_config)


class PerformerModelMixin:
    """Attaches a :class:`FavorProjection` as ``.favor`` to every attention module of the model.

    The projections are persistent buffers (``...favor.projection``, ``...favor.draws``): saved with
    the weights, absent from stock checkpoints, where they are drawn from the seed instead.
    """

    attention_classes: tuple[type[nn.Module], ...] = ()

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        settings = config.favor_settings
        for module in self.modules():
            if isinstance(module, self.attention_classes):
                module.favor = FavorProjection(settings, _head_dim(module), module.layer_idx, _stream(module))
        self.favor_optimizer_steps = 0
        track_for_redraws(self)

    @property
    def favor_settings(self) -> PerformerConfig:
        return self.config.favor_settings

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

    def redraw_features(self) -> None:
        """Draw new random features in every layer (done automatically every ``redraw_interval`` steps)."""
        for projection in self.favor_projections():
            projection.redraw()


def _head_dim(module: nn.Module) -> int:
    for name in ("head_dim", "attention_head_size"):
        if hasattr(module, name):
            return int(getattr(module, name))
    raise TypeError(f"cannot tell the head dimension of {type(module).__name__}")


def _stream(module: nn.Module) -> int:
    """1 for cross-attention (its own features, independent of the same layer's self-attention)."""
    return int(getattr(module, "is_cross_attention", False) or "CrossAttention" in type(module).__name__)


def performer_model_class(base: type, config_class: type, attention_classes: tuple[type, ...]) -> type:
    """``Performer<Base>``: ``base`` with FAVOR+ and a ``config_class`` of a performer model type."""
    ignore_missing = list(base._keys_to_ignore_on_load_missing or []) + [r"\.favor\.(projection|draws)$"]
    return type(
        f"Performer{base.__name__}",
        (PerformerModelMixin, base),
        {
            "config_class": config_class,
            "attention_classes": attention_classes,
            "_keys_to_ignore_on_load_missing": ignore_missing,
            "__module__": config_class.__module__,
        },
    )


@dataclass(frozen=True)
class Family:
    """One supported architecture: its stock ``model_type``, Performer config and model classes."""

    stock_model_type: str
    config_class: type
    auto_models: dict = field(default_factory=dict)  # transformers Auto class → Performer model class

    @property
    def model_type(self) -> str:
        return self.config_class.model_type

    def performer_class_for(self, stock_class: type) -> type | None:
        for performer_class in self.auto_models.values():
            if performer_class.__bases__[-1] is stock_class:
                return performer_class
        return None
