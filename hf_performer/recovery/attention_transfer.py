"""Attention transfer: train a FAVOR+ student so every attention layer's output matches softmax.

Stage one of recovery (Hedgehog, Zhang et al. 2024; LoLCATs, Zhang et al. 2024): before any task
fine-tuning, the converted model learns, on unlabelled text, to make its random-feature attention
reproduce the exact attention of the checkpoint it came from.  The teacher is that same checkpoint
run with ``attn_implementation="sdpa"``, frozen.

The per-layer outputs are read with forward hooks on the attention modules of the family (the
classes FAVOR+ replaces, ``student.attention_classes``), so the loss works for every head class
of every supported family without touching their code:

- BERT: ``BertSelfAttention`` output, the context ``[batch, seq, hidden]`` before the output dense;
- GPT-2 / Llama: the attention block output ``[batch, seq, hidden]`` after ``c_proj`` / ``o_proj``.

With ``teacher_forcing`` each student attention layer receives the teacher's input to that layer
(a forward pre-hook swaps it in), so the loss measures the attention approximation alone and errors
of earlier layers do not compound; without it both models run freely and the loss also trains the
student to correct what earlier layers got wrong.

With ``far_share_weight > 0`` (hybrid attention with a FAVOR+ far part) the loss adds, per layer, the error of the
FAVOR+ part on its own keys (:func:`~hf_performer.favor.far_share.far_share_error`: the softmax attention restricted
to the far keys and the log of their total weight, against FAVOR+'s estimates), which the output error weighs only
by the far part's small share of the normaliser.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers import Trainer

from hf_performer.favor.far_share import FarShareError, far_share_error
from hf_performer.integration.projection import FavorProjection

TRAINABLE = {
    "all": "all weights",
    "attention": "the attention projections",
    "features": "the random features ω (made learnable)",
    "attention+features": "the attention projections and the random features ω (made learnable)",
}
"""What attention transfer may train (→ how a model card says it): every weight, the attention modules'
projections (q, k, v and GPT-2/Llama's output projection), only the random features ω made learnable,
or both of the last two (a learned feature map with the projections adapting to it, as Hedgehog and
LoLCATs train).  With ``PerformerConfig(far_weight=True)`` every choice also trains the hybrid's per-head far
weights."""


def attention_modules(model: nn.Module, attention_classes: tuple[type, ...]) -> list[nn.Module]:
    """The attention modules of ``model`` (instances of ``attention_classes``), in module order.

    Teacher and student list them in the same order, so position ``i`` pairs the same layer even
    when one of them is wrapped (``DistributedDataParallel`` prefixes the names).
    """
    return [module for module in model.modules() if isinstance(module, attention_classes)]


@contextmanager
def recorded_attention(
    model: nn.Module, attention_classes: tuple[type, ...], forced_inputs: dict[int, torch.Tensor] | None = None
) -> Iterator[tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]]:
    """Record, while active, each attention module's input hidden states and output, by position.

    Yields ``(inputs, outputs)`` dicts (position in :func:`attention_modules` → ``[batch, seq,
    hidden]``) filled by the next forward pass.  ``forced_inputs`` (same positions) replaces each
    module's input hidden states: the teacher forcing of :func:`attention_transfer_loss`.
    """
    inputs: dict[int, torch.Tensor] = {}
    outputs: dict[int, torch.Tensor] = {}
    handles = []

    def before(index):
        def hook(module, args, kwargs):
            if "hidden_states" in kwargs:  # Llama passes it by name, BERT and GPT-2 by position
                if forced_inputs is not None:
                    kwargs = {**kwargs, "hidden_states": forced_inputs[index]}
                inputs[index] = kwargs["hidden_states"]
            else:
                if forced_inputs is not None:
                    args = (forced_inputs[index], *args[1:])
                inputs[index] = args[0]
            return args, kwargs

        return hook

    def after(index):
        def hook(module, args, output):
            outputs[index] = output[0] if isinstance(output, tuple) else output

        return hook

    for index, module in enumerate(attention_modules(model, attention_classes)):
        handles.append(module.register_forward_pre_hook(before(index), with_kwargs=True))
        handles.append(module.register_forward_hook(after(index)))
    try:
        yield inputs, outputs
    finally:
        for handle in handles:
            handle.remove()


def token_mean(per_token: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``per_token [batch, seq]`` values over real tokens (padding carries no signal)."""
    if attention_mask is None:
        return per_token.mean()
    mask = attention_mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum()


def hybrid_projections(model: nn.Module) -> list[FavorProjection]:
    """The ``FavorProjection`` of every self-attention layer of ``model``, checked to be hybrid with a FAVOR+ far
    part (what the far-share error measures)."""
    projections = [m for m in model.modules() if isinstance(m, FavorProjection) and not m.stream]
    for projection in projections:
        settings = projection.settings
        if not settings.local_window or settings.far_part != "favor":
            raise ValueError(
                f"far_share_weight trains the FAVOR+ part of hybrid attention, but this model has local_window="
                f"{settings.local_window}, far_part={settings.far_part!r}: use far_share_weight=0, or a model with "
                "local_window > 0 and far_part='favor'"
            )
    if not projections:
        raise ValueError("far_share_weight needs a FAVOR+ model (no FavorProjection found); use far_share_weight=0")
    return projections


@contextmanager
def recorded_far_share(model: nn.Module) -> Iterator[list[FarShareError]]:
    """While active, every hybrid FAVOR+ self-attention layer of ``model`` appends the :class:`FarShareError` of its
    queries, keys and values to the yielded list (through ``FavorProjection.inputs_hook``), in call order."""
    projections = hybrid_projections(model)
    errors: list[FarShareError] = []

    def hook_of(projection: FavorProjection):
        def hook(query, key, value, key_padding_mask, scaling, causal):
            settings = projection.settings
            errors.append(far_share_error(
                query, key, value, projection.projection, window=settings.local_window, sinks=settings.sink_tokens,
                scaling=scaling, causal=causal, key_padding_mask=key_padding_mask,
                far_log_weight=projection.far_log_weights(), feature_map=settings.feature_map,
            ))
        return hook

    for projection in projections:
        projection.inputs_hook = hook_of(projection)
    try:
        yield errors
    finally:
        for projection in projections:
            projection.inputs_hook = None


def attention_transfer_loss(
    student: nn.Module,
    teacher: nn.Module,
    inputs: dict[str, torch.Tensor],
    attention_classes: tuple[type, ...],
    teacher_forcing: bool = True,
    far_share_weight: float = 0.0,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Mean over layers of the MSE between student and teacher attention outputs on ``inputs``, plus
    ``far_share_weight`` times the mean over layers of the :class:`FarShareError` (output + log mass).

    ``inputs`` are model inputs (``input_ids``, ``attention_mask``; labels are dropped: no task
    loss here).  ``student`` may be wrapped (DDP); ``attention_classes`` are the classes FAVOR+
    replaces.  Returns the loss and the per-layer MSEs (detached), layer by layer.
    """
    model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    with torch.no_grad(), recorded_attention(teacher, attention_classes) as (teacher_in, teacher_out):
        teacher(**model_inputs)
    forced = teacher_in if teacher_forcing else None
    with recorded_attention(student, attention_classes, forced) as (_, student_out):
        if far_share_weight:
            with recorded_far_share(student) as far_errors:
                student(**model_inputs)
        else:
            student(**model_inputs)
    mask = model_inputs.get("attention_mask")
    per_layer = [
        token_mean(((student_out[i].float() - teacher_out[i].float()) ** 2).mean(-1), mask) for i in sorted(teacher_out)
    ]
    loss = torch.stack(per_layer).mean()
    if far_share_weight:
        loss = loss + far_share_weight * torch.stack([e.output + e.log_mass for e in far_errors]).mean()
    return loss, [value.detach() for value in per_layer]


def make_features_learnable(model: nn.Module) -> list[nn.Parameter]:
    """Turn every layer's random features ω (``FavorProjection.projection``) into a trainable parameter.

    This is generalised attention with a learned feature map (the paper's generalised attention takes any
    feature map; with ω trained the softmax estimate is no longer unbiased, it is fitted instead).  The tensor keeps
    its name, so checkpoints save and load as before.  Redrawing would throw the learned ω away, so
    it is refused unless the model's ``redraw_interval`` is 0.
    """
    if model.config.performer_config.redraw_interval:
        raise ValueError(
            "learnable random features need redraw_interval=0: a redraw would replace the learned ω "
            f"(this model redraws every {model.config.performer_config.redraw_interval} steps)"
        )
    parameters = []
    for projection in model.favor_projections():
        if isinstance(projection.projection, nn.Parameter):
            parameters.append(projection.projection)
            continue
        value = projection._buffers.pop("projection")
        projection.projection = nn.Parameter(value.detach().clone())
        parameters.append(projection.projection)
    return parameters


def select_trainable(model: nn.Module, what: str) -> int:
    """Freeze everything except ``what`` (one of :data:`TRAINABLE`); returns the trainable element count."""
    if what not in TRAINABLE:
        raise ValueError(f"what trains must be one of {tuple(TRAINABLE)}, got {what!r}")
    learned_features = what in ("features", "attention+features")
    if learned_features:
        make_features_learnable(model)
    for parameter in model.parameters():
        parameter.requires_grad = what == "all"
    if what in ("attention", "attention+features"):
        for module in attention_modules(model, model.attention_classes):
            for name, parameter in module.named_parameters():
                parameter.requires_grad = not name.startswith("favor.")
    for projection in model.favor_projections():
        if learned_features:
            projection.projection.requires_grad = True
        if hasattr(projection, "far_log_weight"):  # the hybrid's per-head far weight trains with any choice
            projection.far_log_weight.requires_grad = True
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class AttentionTransferTrainer(Trainer):
    """``Trainer`` whose loss is :func:`attention_transfer_loss` against a frozen exact-attention ``teacher``.

    The teacher follows the student to its device and stays in eval mode; under Accelerate every
    process holds its own copy (it is never wrapped or synchronised: it does not train).  Per-layer
    MSEs are logged as ``mse/layer_<i>`` next to the loss.
    """

    def __init__(self, *args, teacher: nn.Module, teacher_forcing: bool = True, far_share_weight: float = 0.0,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.eval().requires_grad_(False).to(self.args.device)
        self.teacher_forcing = teacher_forcing
        self.far_share_weight = far_share_weight
        if far_share_weight:
            hybrid_projections(self.model)  # refuse a model without a FAVOR+ far part now, not at the first step
        self._attention_classes = self.accelerator.unwrap_model(self.model).attention_classes
        self._layer_mse: dict[int, list[float]] = {}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, per_layer = attention_transfer_loss(
            model, self.teacher, inputs, self._attention_classes, self.teacher_forcing, self.far_share_weight
        )
        for layer, value in enumerate(per_layer):
            self._layer_mse.setdefault(layer, []).append(float(value))
        return (loss, {"loss": loss}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation loss = the attention MSE on held-out text, without the far-share term (so that runs with and
        without it compare); no logits to return."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss, _ = attention_transfer_loss(model, self.teacher, inputs, self._attention_classes, self.teacher_forcing)
        return loss, None, None

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self._layer_mse and "loss" in logs:
            logs.update({f"mse/layer_{i}": sum(v) / len(v) for i, v in self._layer_mse.items()})
            self._layer_mse = {}
        super().log(logs, *args, **kwargs)
