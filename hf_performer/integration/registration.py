"""Registers everything with transformers; safe to call any number of times."""

from __future__ import annotations

from transformers import AttentionInterface, AutoConfig, trainer
from transformers.masking_utils import AttentionMaskInterface

from hf_performer.integration.attention import ATTENTION_NAME, favor_attention_forward, favor_mask
from hf_performer.integration.loading import patch_from_pretrained
from hf_performer.integration.redraw import PerformerRedrawCallback
from hf_performer.models.registry import FAMILIES


def register() -> None:
    """Make ``"favor+"`` an attention implementation, the Performer model types Auto-loadable,
    ``from_pretrained(..., attention="favor+")`` convert stock checkpoints, and every ``Trainer`` count
    training steps for feature redraws (:class:`PerformerRedrawCallback` among its default callbacks)."""
    AttentionInterface.register(ATTENTION_NAME, favor_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, favor_mask)
    for family in FAMILIES.values():
        AutoConfig.register(family.model_type, family.config_class, exist_ok=True)
        for auto_class, model_class in family.auto_models.items():
            auto_class.register(family.config_class, model_class, exist_ok=True)
    patch_from_pretrained()
    if PerformerRedrawCallback not in trainer.DEFAULT_CALLBACKS:
        trainer.DEFAULT_CALLBACKS.append(PerformerRedrawCallback)
