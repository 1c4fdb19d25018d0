"""Loading the teacher/student pair of a checkpoint and saving a recovered model as a shareable checkpoint.

A recipe's ``--model`` may be a stock checkpoint (converted to FAVOR+ on load) or an already
converted one (the output of ``hf-performer convert`` or of an earlier recipe, which keeps its
features); its head is read from ``config.json``, so a sequence classifier stays one.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from transformers import AutoConfig, PreTrainedModel, PreTrainedTokenizerBase

from hf_performer.config import PerformerConfig
from hf_performer.export.conversion import save_checkpoint
from hf_performer.models.registry import family_for
from hf_performer.recovery.provenance import Provenance


def auto_class_for(checkpoint: str):
    """The transformers Auto class that loads ``checkpoint``'s head (stock or Performer), e.g. ``AutoModelForCausalLM``."""
    config = AutoConfig.from_pretrained(checkpoint)
    family = family_for(config.model_type)
    architecture = (config.architectures or [None])[0]
    head = family.head_named(architecture) if architecture else None
    if head is None:
        raise ValueError(f"{checkpoint}: head {architecture} has no FAVOR+ version; supported: {family.stock_class_names()}")
    return head.auto_class


def load_student(checkpoint: str, settings: PerformerConfig | dict, auto_class=None, **kwargs) -> PreTrainedModel:
    """``checkpoint`` with FAVOR+ attention: converted with ``settings``, or, if already converted, with
    its saved features and the ``settings`` that may change on load (others raise: see
    :meth:`PerformerConfig.reloaded_with`; a dict names only the settings it asks for)."""
    auto_class = auto_class or auto_class_for(checkpoint)
    return auto_class.from_pretrained(checkpoint, attention="favor+", performer_config=settings, **kwargs)


def load_teacher(checkpoint: str, auto_class=None, **kwargs) -> PreTrainedModel:
    """The same weights with exact softmax attention (``sdpa``), in eval mode."""
    auto_class = auto_class or auto_class_for(checkpoint)
    return auto_class.from_pretrained(checkpoint, attn_implementation="sdpa", **kwargs).eval()


def prepare_padding(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> None:
    """Pad where FAVOR+ expects it: left in causal models, right in bidirectional ones; a tokenizer
    without a pad token (GPT-2, Llama) pads with its end-of-sequence token."""
    causal = any(getattr(m, "is_causal", False) for m in model.modules() if isinstance(m, model.attention_classes))
    tokenizer.padding_side = "left" if causal else "right"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def save_recovered(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    out: str | Path,
    *,
    provenance: Provenance,
    eval_results: list[dict] | None = None,
) -> Path:
    """Write ``model`` like ``hf-performer convert`` does (:func:`~hf_performer.export.conversion.save_checkpoint`:
    weights, remote code, tokenizer, model card), plus ``recovery.json`` (``provenance``: the original model
    and the training stages).

    The card names the original model (``base_model`` when it is known on the Hub) and lists the stages;
    ``eval_results`` (the format of :mod:`hf_performer.export.model_card`) go into the card and into
    ``eval_results.json`` next to it.
    """
    out = Path(out)
    save_checkpoint(
        model,
        out,
        tokenizer,
        name=out.name,
        base_model=provenance.base_model,
        source_name=provenance.original,
        eval_results=eval_results,
        stages=[dataclasses.asdict(stage) for stage in provenance.stages],
    )
    provenance.save(out)
    if eval_results:
        (out / "eval_results.json").write_text(json.dumps(eval_results, indent=2) + "\n", encoding="utf-8")
    return out
