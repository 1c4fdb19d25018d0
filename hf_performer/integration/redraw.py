"""Feature redraws every ``redraw_interval`` training steps: ``Trainer`` does it, loops call one function.

A training step is one update of the model (``Trainer``'s ``state.global_step``), however many
optimizers or gradient-accumulation micro-batches make it up, so redraws count nothing of the
optimizer and work with any optimizer object (DeepSpeed's, Accelerate's, a user's wrapper).  Each
:class:`~hf_performer.integration.projection.FavorProjection` counts the steps in a persistent buffer
next to its features, so a checkpoint (``save_pretrained``, ``Trainer``'s ``checkpoint-*``, a PEFT
adapter that saves the ``favor`` modules) resumes the same schedule.  Draws are seeded by (seed, layer,
draw number), so every process of a distributed run draws the same features without communicating.
"""

from __future__ import annotations

from torch import nn
from transformers import TrainerCallback

from hf_performer.integration.projection import FavorProjection


def count_training_step(model: nn.Module) -> int:
    """Count one training step of ``model`` (any module holding FAVOR+ layers: a Performer model, a
    PEFT or DDP wrapper of one); layers redraw their features every ``redraw_interval`` steps.

    Call it once per update, after ``optimizer.step()``, in hand-written loops; ``Trainer`` calls it
    through :class:`PerformerRedrawCallback`.  Returns how many layers redrew.
    """
    projections = {name: module for name, module in model.named_modules() if isinstance(module, FavorProjection)}
    if getattr(model, "peft_config", None):
        _refuse_redraws_an_adapter_would_lose(projections)
    return sum(projection.count_step() for projection in projections.values())


def _refuse_redraws_an_adapter_would_lose(projections: dict[str, FavorProjection]) -> None:
    """A PEFT adapter saves only its own modules: features redrawn in the frozen base model would be lost
    (a reloaded adapter would run on the base's first draw), unless the ``favor`` modules are saved with it.

    PEFT's ``ModulesToSaveWrapper`` keeps a copy per adapter under ``<name>.modules_to_save.<adapter>``:
    the copy is what forward uses and the adapter saves (its ``original_module`` is redrawn too, unused).
    """
    if any(p.settings.redraw_interval and ".modules_to_save." not in name and not name.endswith(".original_module")
           for name, p in projections.items()):
        raise ValueError(
            "this PEFT model redraws FAVOR+ features in the base model, which the adapter does not save, so a "
            "reloaded adapter would give different outputs. Save the features with the adapter: "
            "LoraConfig(..., modules_to_save=['favor']), or train with redraw_interval=0."
        )


class PerformerRedrawCallback(TrainerCallback):
    """Counts ``Trainer``'s training steps (once per ``global_step``) for the model's FAVOR+ layers.

    ``import hf_performer`` adds it to transformers' default callbacks, so every ``Trainer`` (and
    subclasses such as sentence-transformers') redraws on schedule without being told; models without
    FAVOR+ layers are left alone.
    """

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            count_training_step(model)
