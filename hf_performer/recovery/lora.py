"""LoRA fine-tuning through ``peft`` (the optional extra ``hf-performer[peft]``): low-rank adapters on the
attention projections train instead of every weight, then merge back into a full checkpoint.

Merging keeps what later stages and users load a plain checkpoint (FAVOR+ or exact), with no adapter
to carry.  FAVOR+ features live in ``favor`` submodules of the attention layers: with
``redraw_interval=0`` (the recipes' default) the base model's features are the adapter's; with redraws
the ``favor`` modules train as ``modules_to_save`` so the merged model keeps the last draw (see the
README, "Training your own way").
"""

from __future__ import annotations

from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from hf_performer.models.registry import family_for


def attention_projection_names(model: PreTrainedModel) -> list[str]:
    """Full names of the linear layers inside the model's attention modules (``model.layers.0.self_attn.q_proj``):
    the default LoRA targets.  Full names, not suffixes: GPT-2's MLP has a ``c_proj`` too.  The attention
    modules are the classes FAVOR+ replaces in the model's family, so an exact model answers the same."""
    performer_class = family_for(model.config.model_type).base_model.performer_class
    names = []
    for prefix, module in model.named_modules():
        if isinstance(module, performer_class.attention_classes):
            linear = [name for name, child in module.named_modules() if isinstance(child, (nn.Linear, Conv1D))]
            names += [f"{prefix}.{name}" for name in linear]
    return names


def with_lora(model: PreTrainedModel, r: int, alpha: float | None = None, target_modules: list[str] | None = None):
    """``model`` wrapped as a ``peft`` LoRA model of rank ``r`` (scale ``alpha / r``; default ``alpha = 2r``)
    on ``target_modules`` (default: :func:`attention_projection_names`); only the adapters train."""
    try:
        import peft
    except ImportError as error:
        raise ImportError('LoRA needs peft: pip install "hf-performer[peft]"') from error
    if r < 1:
        raise ValueError(f"the LoRA rank must be ≥ 1, got {r}")
    settings = getattr(model.config, "performer_config", None)  # None for the exact model
    config = peft.LoraConfig(
        r=r,
        lora_alpha=alpha if alpha is not None else 2 * r,
        target_modules=target_modules or attention_projection_names(model),
        fan_in_fan_out=any(isinstance(m, Conv1D) for m in model.modules()),  # GPT-2 stores weights transposed
        modules_to_save=["favor"] if settings is not None and settings.redraw_interval else None,
    )
    return peft.get_peft_model(model, config)


def merged(model) -> PreTrainedModel:
    """The base model with the LoRA updates added into its weights (a ``peft`` model), or ``model`` as it is."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
