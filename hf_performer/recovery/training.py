"""What every recipe does around ``Trainer.train``: checking the launch, resuming, and checking that
the processes agree.

- A recipe launched as several processes trains as one distributed run or not at all: processes
  that did not join one run would each train alone and write the same output folder.
- ``--resume_from_checkpoint last`` resumes from the newest ``checkpoint-*`` in the output folder
  (a path resumes from that checkpoint); the optimizer, scheduler, RNG and FAVOR+ features resume
  with the weights.
- After training, every process reports a fingerprint of its FAVOR+ features: the draws depend only
  on (seed, layer, draw number), so a distributed run must end with one fingerprint everywhere,
  and a mismatch is an error rather than a silently wrong checkpoint.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint


def refuse_unjoined_processes(training: TrainingArguments) -> None:
    """Raise before any work if the launcher started more processes than ``training`` runs as one.

    ``accelerate launch --multi_gpu --num_processes N`` on a machine without GPUs starts N processes
    (``WORLD_SIZE=N``), but without ``--use_cpu true`` ``TrainingArguments`` sets each one up alone.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and training.world_size != launched:
        raise ValueError(
            f"launched as {launched} processes (WORLD_SIZE={launched}), but TrainingArguments runs "
            f"{training.world_size} ({training.parallel_mode.value}): each process would train alone and write "
            f"{training.output_dir}. On CPUs pass --use_cpu true to the recipe; on GPUs make {launched} visible "
            "(CUDA_VISIBLE_DEVICES) or launch fewer processes."
        )


def optimizer_for(model: torch.nn.Module, training: TrainingArguments, far_weight_learning_rate: float | None):
    """``Trainer``'s own optimizer (``None``: Trainer builds it) unless the hybrid's per-head far weights
    (``...favor.far_log_weight``) get their own learning rate: then the optimizer and the weight-decay groups
    Trainer would build, with the far weights in a group of their own (no weight decay).  The scheduler scales
    every group alike (warm-up and decay)."""
    if far_weight_learning_rate is None:
        return None
    far, rest = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (far if name.endswith("favor.far_log_weight") else rest).append((name, parameter))
    if not far:
        raise ValueError(
            "--far_weight_learning_rate was given, but the model has no trainable per-head far weights: convert or "
            "load it with --favor-far-weight true (PerformerConfig far_weight=True, which needs a local window)"
        )
    optimizer_class, kwargs = Trainer.get_optimizer_cls_and_kwargs(training, model)
    decayed = set(Trainer.get_decay_parameter_names(None, model))  # a method that reads only its argument
    groups = [
        {"params": [p for name, p in rest if name in decayed], "weight_decay": training.weight_decay},
        {"params": [p for name, p in rest if name not in decayed], "weight_decay": 0.0},
        {"params": [p for _, p in far], "lr": far_weight_learning_rate, "weight_decay": 0.0},
    ]
    return optimizer_class([group for group in groups if group["params"]], **kwargs)


def resume_checkpoint(output_dir: str, resume_from_checkpoint: str | None) -> str | None:
    """The checkpoint to resume from: ``None``, a given path, or for ``"last"`` the newest in ``output_dir``."""
    if resume_from_checkpoint != "last":
        return resume_from_checkpoint
    last = get_last_checkpoint(output_dir) if Path(output_dir).is_dir() else None
    if last is None:
        raise ValueError(f"--resume_from_checkpoint last: no checkpoint-* folder in {output_dir}")
    return last


def features_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 (first 16 hex digits) of every layer's random features ω, in layer order."""
    digest = hashlib.sha256()
    for projection in model.favor_projections():
        digest.update(projection.projection.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def check_features_agree(trainer: Trainer) -> str:
    """Print this process's features fingerprint and raise unless every process holds the same ω."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    fingerprint = features_fingerprint(model)
    print(f"process {trainer.args.process_index}/{trainer.args.world_size}: FAVOR+ features {fingerprint}", flush=True)
    code = torch.tensor([int(fingerprint, 16) >> 1], dtype=torch.long, device=trainer.args.device)
    codes = trainer.accelerator.gather(code)
    if bool((codes != codes[0]).any()):
        raise RuntimeError(f"processes hold different FAVOR+ features: {[hex(int(c)) for c in codes]}")
    return fingerprint


def final_metric(trainer: Trainer, key: str) -> float:
    """``key`` (e.g. ``eval_loss``) of the trained model: from the evaluation logged at the last step if
    there was one (a full evaluation can cost as much as many training steps), else a new evaluation."""
    for entry in reversed(trainer.state.log_history):
        if key in entry and entry.get("step") == trainer.state.global_step:
            return float(entry[key])
    return float(trainer.evaluate()[key])
