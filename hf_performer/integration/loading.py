"""Turning stock checkpoints and models into Performer ones.

``from_pretrained(..., attention="favor+")`` has no extension point in transformers, so
:func:`patch_from_pretrained` wraps ``PreTrainedModel.from_pretrained`` once (idempotent, marked
with ``__hf_performer__``).  The wrapper only acts when FAVOR+ is requested for a stock class: it
swaps in the Performer class and config of the same family and hands everything else to the
original method unchanged.  ``AutoModel*.from_pretrained`` goes through it too, since the Auto
classes call the resolved model class's ``from_pretrained``.
"""

from __future__ import annotations

import copy
import functools
import inspect

from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from hf_performer.config import PerformerConfig
from hf_performer.integration.attention import ATTENTION_NAME
from hf_performer.models.base import PerformerModelMixin
from hf_performer.models.registry import family_for

_DOWNLOAD_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "subfolder", "token")


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
    values = {k: v for k, v in config.to_dict().items() if k not in ("model_type", "transformers_version")}
    return family.config_class(**values, performer_config=PerformerConfig.coerce(performer_config))


def performer_class_for(model_class: type) -> type:
    """The Performer class of a stock model class (``BertForMaskedLM`` → ``PerformerBertForMaskedLM``)."""
    if issubclass(model_class, PerformerModelMixin):
        return model_class
    family = family_for(getattr(model_class.config_class, "model_type", None) or model_class.__name__)
    performer_class = family.performer_class_for(model_class)
    if performer_class is None:
        supported = sorted(c.__bases__[-1].__name__ for c in family.auto_models.values())
        raise ValueError(f"{model_class.__name__} has no FAVOR+ version; supported classes: {supported}")
    return performer_class


def to_performer(model: PreTrainedModel, performer_config=None) -> PreTrainedModel:
    """A FAVOR+ copy of an in-memory ``model`` (same weights, features drawn from the seed).

    The input model is left untouched (its config too: the copy gets its own, so a teacher running
    ``sdpa`` stays exact); the copy has the same dtype, device and train/eval mode.
    """
    config = performer_config_from(model.config, performer_config)
    config._attn_implementation = ATTENTION_NAME
    performer = performer_class_for(type(model))(config)
    missing, unexpected = performer.load_state_dict(model.state_dict(), strict=False)
    missing = [key for key in missing if ".favor." not in key]
    if missing or unexpected:
        raise RuntimeError(f"weights did not carry over: missing {missing}, unexpected {unexpected}")
    first = next(model.parameters())
    return performer.to(device=first.device, dtype=first.dtype).train(model.training)


def _refuse_other_features(checkpoint, settings: PerformerConfig, download: dict) -> None:
    """Raise if ``checkpoint`` is a converted one whose features were drawn with other settings."""
    saved, _ = PretrainedConfig.get_config_dict(checkpoint, **download)
    if "performer_config" in saved:
        PerformerConfig.from_dict(saved["performer_config"]).reloaded_with(settings)


def _favor_from_pretrained(original):
    named_parameters = set(inspect.signature(original).parameters)

    @functools.wraps(original)
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        attention = kwargs.pop("attention", None)
        performer_config = kwargs.pop("performer_config", None)
        if attention not in (None, ATTENTION_NAME):
            raise ValueError(
                f"attention={attention!r} is not known: hf_performer provides attention='favor+'; for "
                "transformers' own kernels pass attn_implementation='sdpa' / 'eager' / ... instead."
            )
        config = kwargs.get("config")
        requested = ATTENTION_NAME in (
            attention,
            kwargs.get("attn_implementation"),
            getattr(config, "_attn_implementation", None),
        )
        performer_class = issubclass(cls, PerformerModelMixin)
        if performer_config is not None and not requested and not performer_class:
            raise ValueError("performer_config= only applies together with attention='favor+'")
        download = {k: kwargs[k] for k in _DOWNLOAD_KWARGS if k in kwargs}
        # the Auto classes apply performer_config= to the saved config and pass it as config=
        given_config = isinstance(config, PretrainedConfig)
        if not requested and performer_config is None:
            if performer_class and given_config:
                _refuse_other_features(pretrained_model_name_or_path, config.performer_config, download)
            return original(cls, pretrained_model_name_or_path, *model_args, **kwargs)

        target = performer_class_for(cls)
        if not isinstance(config, PretrainedConfig):
            config_kwargs = {k: v for k, v in kwargs.items() if k not in named_parameters}
            config, unused = AutoConfig.from_pretrained(
                config or pretrained_model_name_or_path, return_unused_kwargs=True, **download, **config_kwargs
            )
            kwargs = {**{k: v for k, v in kwargs.items() if k in named_parameters}, **unused}
        kwargs["config"] = performer_config_from(config, performer_config)
        if given_config:
            _refuse_other_features(pretrained_model_name_or_path, kwargs["config"].performer_config, download)
        kwargs["attn_implementation"] = ATTENTION_NAME
        return original(target, pretrained_model_name_or_path, *model_args, **kwargs)

    from_pretrained.__hf_performer__ = True
    return from_pretrained


def patch_from_pretrained() -> None:
    """Wrap ``PreTrainedModel.from_pretrained`` to accept ``attention="favor+"`` and ``performer_config=``."""
    current = PreTrainedModel.__dict__["from_pretrained"].__func__
    if getattr(current, "__hf_performer__", False):
        return
    PreTrainedModel.from_pretrained = classmethod(_favor_from_pretrained(current))
