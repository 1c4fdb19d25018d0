"""Converting models in memory: stock → FAVOR+ (:func:`to_performer`) and back (:func:`to_stock`).

Both keep every weight and differ only in the attention: the Performer class of a stock head is
``Performer<Stock>``, a subclass of it that adds random features (``...favor.*`` buffers) and runs
``attn_implementation="favor+"``; the families table (:mod:`hf_performer.models.registry`) pairs them.
"""

from __future__ import annotations

import copy

from transformers import PretrainedConfig, PreTrainedModel

from hf_performer.config import PerformerConfig
from hf_performer.integration.attention import ATTENTION_NAME
from hf_performer.models.base import PerformerModelMixin
from hf_performer.models.registry import family_for

# config.json entries that belong to one model type and not to the architecture's settings
_TYPE_KEYS = ("model_type", "transformers_version", "auto_map")


def performer_config_from(config: PretrainedConfig, performer_config=None) -> PretrainedConfig:
    """A new Performer config: the Performer version of a stock transformers ``config``, or a copy of a
    Performer one with the settings that may change on load applied (:meth:`PerformerConfig.reloaded_with`).

    ``performer_config``: a :class:`PerformerConfig`, a dict of fields, or ``None`` (the defaults for a
    stock config, the saved settings for a Performer one).
    """
    family = family_for(config.model_type)
    if isinstance(config, family.config_class):
        config = copy.deepcopy(config)
        config.performer_config = config.performer_config.reloaded_with(performer_config)
        return config
    values = {k: v for k, v in config.to_dict().items() if k not in _TYPE_KEYS}
    return family.config_class(**values, performer_config=PerformerConfig.coerce(performer_config))


def stock_config_from(config: PretrainedConfig) -> PretrainedConfig:
    """The stock config of a Performer ``config`` (``PerformerBertConfig`` → ``BertConfig``): the same
    architecture without ``performer_config``, on transformers' default attention."""
    family = family_for(config.model_type)
    values = {k: v for k, v in config.to_dict().items() if k not in (*_TYPE_KEYS, "performer_config")}
    return family.stock_config_class(**values)


def performer_class_for(model_class: type) -> type:
    """The Performer class of a stock model class (``BertForMaskedLM`` → ``PerformerBertForMaskedLM``)."""
    if issubclass(model_class, PerformerModelMixin):
        return model_class
    family = family_for(getattr(model_class.config_class, "model_type", None) or model_class.__name__)
    head = family.head_for(model_class)
    if head is None:
        raise ValueError(
            f"{model_class.__name__} has no FAVOR+ version; supported classes: {family.stock_class_names()}"
        )
    return head.performer_class


def _copy_with_weights(target: PreTrainedModel, source: PreTrainedModel) -> PreTrainedModel:
    """``target`` holding ``source``'s weights, on its device and dtype and in its train/eval mode; only
    the random features (``...favor.*``, which one side has and the other lacks) may differ."""
    missing, unexpected = target.load_state_dict(source.state_dict(), strict=False)
    missing = [key for key in missing if ".favor." not in key]
    unexpected = [key for key in unexpected if ".favor." not in key]
    if missing or unexpected:
        raise RuntimeError(f"weights did not carry over: missing {missing}, unexpected {unexpected}")
    first = next(source.parameters())
    return target.to(device=first.device, dtype=first.dtype).train(source.training)


def to_performer(model: PreTrainedModel, performer_config=None) -> PreTrainedModel:
    """A FAVOR+ copy of an in-memory ``model`` (same weights, features drawn from the seed).

    The input model is left untouched (its config too: the copy gets its own, so a teacher running
    ``sdpa`` stays exact); the copy has the same dtype, device and train/eval mode.
    """
    config = performer_config_from(model.config, performer_config)
    config._attn_implementation = ATTENTION_NAME
    return _copy_with_weights(performer_class_for(type(model))(config), model)


def to_stock(model: PreTrainedModel) -> PreTrainedModel:
    """The stock transformers copy of a Performer ``model``: its stock class and config type, softmax
    attention (transformers' default, ``sdpa`` where available) and the same weights, without the
    random features.  The inverse of :func:`to_performer`; the input model is left untouched.
    """
    if not isinstance(model, PerformerModelMixin):
        raise ValueError(f"{type(model).__name__} is not a FAVOR+ model; to_stock takes what to_performer returns")
    head = family_for(model.config.model_type).head_for(type(model))
    if head is None:  # a user's subclass of a Performer class
        raise ValueError(f"{type(model).__name__} is not one of the Performer classes of {model.config.model_type}")
    return _copy_with_weights(head.stock_class(stock_config_from(model.config)), model)
