"""Everything hf-performer changes in transformers, applied by :func:`patch` and undone by :func:`unpatch`.

``import hf_performer`` calls :func:`patch` (any number of calls apply it once).  It changes exactly:

1. ``AttentionInterface`` and ``AttentionMaskInterface``: ``"favor+"`` → the FAVOR+ attention and mask
   functions (:mod:`hf_performer.integration.attention`);
2. ``AutoConfig`` and the ``AutoModel*`` classes: the ``performer_*`` model types and their classes
   (every :class:`~hf_performer.models.base.Head` of :data:`~hf_performer.models.registry.FAMILIES`),
   so converted checkpoints load through the Auto classes;
3. ``PreTrainedModel.from_pretrained``: wrapped to accept ``attention="favor+"`` and
   ``performer_config=``, which swap a stock class for its Performer class (transformers has no
   extension point for this; ``AutoModel*.from_pretrained`` goes through it too);
4. ``transformers.trainer.DEFAULT_CALLBACKS``: :class:`PerformerRedrawCallback` appended, so every
   ``Trainer`` counts training steps for feature redraws.

:func:`unpatch` puts back what each change replaced (the same objects), so transformers is as it was
before the first :func:`patch`.  Without the patch transformers does not know ``"favor+"``, so no
FAVOR+ model runs until :func:`patch` is called again; :func:`~hf_performer.to_stock` turns one into
the stock model, which does.

The ``trust_remote_code`` export (:mod:`hf_performer.export.remote_code`) never ships this module:
a checkpoint's code registers its attention functions and nothing else.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

from transformers import AttentionInterface, AutoConfig, PretrainedConfig, PreTrainedModel, trainer
from transformers.masking_utils import AttentionMaskInterface
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from hf_performer.config import PerformerConfig
from hf_performer.integration.attention import ATTENTION_NAME, favor_attention_forward, favor_mask
from hf_performer.integration.redraw import PerformerRedrawCallback
from hf_performer.model_conversion import performer_class_for, performer_config_from
from hf_performer.models.base import PerformerModelMixin
from hf_performer.models.registry import FAMILIES

_DOWNLOAD_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "subfolder", "token")
_ABSENT = object()

_undo: list[Callable[[], None]] = []
"""One function per change :func:`patch` made, in the order made; :func:`unpatch` calls them last first."""


def patch() -> None:
    """Apply the changes listed in this module's docstring; does nothing when they are applied already."""
    if _undo:
        return
    _set_entry(AttentionInterface._global_mapping, ATTENTION_NAME, favor_attention_forward)
    _set_entry(AttentionMaskInterface._global_mapping, ATTENTION_NAME, favor_mask)
    for family in FAMILIES.values():
        _set_entry(CONFIG_MAPPING._extra_content, family.model_type, family.config_class)
        for head in family.heads:
            _set_entry(head.auto_class._model_mapping._extra_content, family.config_class, head.performer_class)
    original = PreTrainedModel.__dict__["from_pretrained"]
    PreTrainedModel.from_pretrained = classmethod(_favor_from_pretrained(original.__func__))
    _undo.append(lambda: setattr(PreTrainedModel, "from_pretrained", original))
    trainer.DEFAULT_CALLBACKS.append(PerformerRedrawCallback)
    _undo.append(lambda: trainer.DEFAULT_CALLBACKS.remove(PerformerRedrawCallback))


def unpatch() -> None:
    """Restore transformers as it was before :func:`patch`: ``"favor+"``, the ``performer_*`` Auto
    entries, the ``from_pretrained`` wrapper and the redraw callback are gone (entries they replaced
    come back).  Does nothing when not patched."""
    while _undo:
        _undo.pop()()


def _set_entry(mapping: dict, key, value) -> None:
    """``mapping[key] = value``, undone by restoring the previous entry (or its absence).

    The registries are written directly rather than through ``AutoConfig.register`` /
    ``AttentionInterface.register``: those have no way to unregister, and the undo must restore
    the store they write to.
    """
    previous = mapping.get(key, _ABSENT)
    mapping[key] = value

    def undo() -> None:
        if previous is _ABSENT:
            mapping.pop(key, None)
        else:
            mapping[key] = previous

    _undo.append(undo)


def _refuse_other_features(checkpoint, settings: PerformerConfig, download: dict) -> None:
    """Raise if ``checkpoint`` is a converted one whose features were drawn with other settings."""
    saved, _ = PretrainedConfig.get_config_dict(checkpoint, **download)
    if "performer_config" in saved:
        PerformerConfig.from_dict(saved["performer_config"]).reloaded_with(settings)


def _favor_from_pretrained(original):
    """``from_pretrained`` that converts when FAVOR+ is requested for a stock class (it swaps in the
    Performer class and config of the same family) and hands everything else to ``original`` unchanged."""
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

    return from_pretrained
