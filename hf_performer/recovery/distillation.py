"""Fine-tuning that distils from the exact model: KL(teacher ‖ student) on next-token distributions.

Cross-entropy on the text alone asks the FAVOR+ student to relearn language modelling from one-hot
targets; the exact checkpoint it was converted from already knows the whole next-token distribution
at every position, a far richer signal per token (Hinton et al. 2015; LoLCATs and Liger fine-tune
linearised LLMs against their softmax originals the same way).  The training loss is

    α · T² · KL(softmax(teacher / T) ‖ softmax(student / T)) + (1 − α) · cross-entropy

averaged over the real (unpadded) tokens; ``T²`` keeps the gradient scale of the KL term independent
of the temperature.  Evaluation reports the plain cross-entropy, so held-out losses stay comparable
with runs that do not distil (and the teacher costs nothing there).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer


def distillation_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """``T² · KL(teacher ‖ student)`` of the softened distributions, mean over real tokens.

    Logits are ``[batch, seq, vocab]`` (computed in float32: a bf16 log-softmax over ~50k words loses
    the small probabilities the KL is about); ``attention_mask [batch, seq]`` marks real tokens.
    """
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_token = F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1)
    if attention_mask is None:
        return temperature**2 * per_token.mean()
    mask = attention_mask.to(per_token.dtype)
    return temperature**2 * (per_token * mask).sum() / mask.sum()


class DistillationTrainer(Trainer):
    """``Trainer`` for causal LMs whose training loss mixes :func:`distillation_kl` against a frozen
    ``teacher`` (weight ``alpha``) with the model's own cross-entropy (weight ``1 − alpha``).

    The teacher follows the student to its device, in eval mode without gradients; it must share the
    student's vocabulary (the same checkpoint with exact attention, as the recipe loads it).
    """

    def __init__(self, *args, teacher: nn.Module, temperature: float = 1.0, alpha: float = 0.5, **kwargs):
        if not temperature > 0:
            raise ValueError(f"the distillation temperature must be > 0, got {temperature}")
        if not 0 <= alpha <= 1:
            raise ValueError(f"the distillation weight alpha must be in [0, 1], got {alpha}")
        super().__init__(*args, **kwargs)
        self.teacher = teacher.eval().requires_grad_(False).to(self.args.device)
        self.temperature, self.alpha = temperature, alpha
        # Both terms are means over the micro-batch's tokens; with the model's own num_items_in_batch
        # normalisation the cross-entropy alone would be pre-scaled for gradient accumulation and the
        # KL not, so let Trainer divide the mixed loss by the accumulation steps instead.
        self.model_accepts_loss_kwargs = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        cross_entropy, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        if not model.training:  # evaluation: the plain held-out cross-entropy
            return (cross_entropy, outputs) if return_outputs else cross_entropy
        with torch.no_grad():
            teacher_logits = self.teacher(**{k: v for k, v in inputs.items() if k != "labels"}).logits
        kl = distillation_kl(outputs.logits, teacher_logits, inputs.get("attention_mask"), self.temperature)
        loss = self.alpha * kl + (1 - self.alpha) * cross_entropy
        return (loss, outputs) if return_outputs else loss
