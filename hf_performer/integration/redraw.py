"""Feature redraws every ``redraw_interval`` optimizer steps, in training only.

One global ``torch.optim`` step post-hook (registered once, idempotently) counts the steps of every
optimizer that holds a tracked Performer model's parameters.  That covers ``Trainer``, Accelerate
(its optimizer wrapper skips the inner step on accumulation micro-batches, so only real updates
count) and hand-written loops alike.  Draws are seeded by (seed, layer, draw number), so every
process of a distributed run draws the same features without communicating.
"""

from __future__ import annotations

import weakref

from torch.optim.optimizer import register_optimizer_step_post_hook

_tracked_models: weakref.WeakSet = weakref.WeakSet()
_hook_handle = None


def track_for_redraws(model) -> None:
    """Count ``model``'s optimizer steps from now on (``model`` has ``favor_settings`` and ``redraw_features``)."""
    global _hook_handle
    _tracked_models.add(model)
    if _hook_handle is None:
        _hook_handle = register_optimizer_step_post_hook(_after_optimizer_step)


def _after_optimizer_step(optimizer, args, kwargs) -> None:
    optimized = None
    for model in list(_tracked_models):
        interval = model.favor_settings.redraw_interval
        if not interval or not model.training:
            continue
        if optimized is None:
            optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if not any(id(p) in optimized for p in model.parameters()):
            continue
        model.favor_optimizer_steps += 1
        if model.favor_optimizer_steps % interval == 0:
            model.redraw_features()
