"""Task fine-tuning of a FAVOR+ model: sentence embeddings, sequence classification or causal LM.

Stage two of recovery (stage one: ``examples/attention_transfer.py``).  ``--model`` is a stock
checkpoint (converted to FAVOR+ on load with the ``--favor-*`` settings) or a FAVOR+ one, such as
the output of attention transfer, which is the chain the README recommends::

    python examples/attention_transfer.py --model SRC --data TEXT --output_dir out/transfer ...
    python examples/finetune.py --task sentence-embedding --model out/transfer --output_dir out/final ...

Tasks (metrics are the local ``evaluate`` modules in ``examples/metrics``; nothing is fetched):

- ``sentence-embedding``: pairs of ``--text_columns A B`` with a similarity ``--label_column``
  divided by ``--label_scale``; loss MSE(cos(mean-pooled u, v), label); metric Spearman ρ ×100;
- ``classification``: ``--text_columns TEXT [TEXT2]`` and an integer ``--label_column``; cross-entropy;
  metric accuracy ×100;
- ``causal-lm``: ``--text_columns`` text cut into ``--max_length``-token blocks (a ``.txt`` file is read
  as one stream, line breaks kept); metric perplexity.

``--distill_from SRC`` (causal-lm) adds KL(exact SRC ‖ model) on the next-token distributions to the loss
(``--distill_alpha``, ``--distill_temperature``; :mod:`hf_performer.recovery.distillation`); ``--lora_r R``
trains LoRA adapters through ``peft`` instead of every weight and saves them merged
(:mod:`hf_performer.recovery.lora`).

``--exact`` fine-tunes the model with exact softmax attention instead (a baseline, trained by the same
options, for a fair comparison: fine-tuning on the domain alone lowers perplexity); by default the
exact model's metric on the eval data is measured first, drawn as the reference line of
``recovery_curve.png`` and written next to the FAVOR+ value in ``eval_results.json`` and the card.
Runs under ``accelerate launch`` too; ``--resume_from_checkpoint last`` continues a run.  Every
option of ``transformers.TrainingArguments`` is accepted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import evaluate
import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    default_data_collator,
)

import hf_performer  # noqa: F401  (registers FAVOR+)
from hf_performer.recovery.arguments import RecipeArguments, add_performer_arguments, performer_config_from_args
from hf_performer.recovery.checkpoints import load_student, load_teacher, prepare_padding, save_recovered
from hf_performer.recovery.curves import RecoveryCurve
from hf_performer.recovery.data import card_dataset, load_split, skipped_positions, text_examples, token_blocks
from hf_performer.recovery.distillation import DistillationTrainer
from hf_performer.recovery.lora import merged, with_lora
from hf_performer.recovery.provenance import Stage, provenance_of
from hf_performer.recovery.sentence_embeddings import SentenceEmbeddingTrainer, SentencePairCollator
from hf_performer.recovery.training import (
    check_features_agree,
    final_metric,
    optimizer_for,
    refuse_unjoined_processes,
    resume_checkpoint,
)

METRICS = Path(__file__).resolve().parent / "metrics"

TASKS = {
    # task: (Auto class, metric module, metric key, Hub task type for the card)
    "sentence-embedding": (AutoModel, "spearman", "spearmanr", "sentence-similarity"),
    "classification": (AutoModelForSequenceClassification, "accuracy", "accuracy", "text-classification"),
    "causal-lm": (AutoModelForCausalLM, "perplexity", "perplexity", "text-generation"),
}


@dataclass(kw_only=True)
class FinetuneArguments(RecipeArguments):
    task: str = field(metadata={"choices": sorted(TASKS), "help": "What the model is fine-tuned for."})
    train_data: str = field(metadata={"help": "Training data: a .txt/.tsv/.csv/.json(l) file or a Hub dataset id."})
    eval_data: str = field(metadata={"help": "Evaluation data, in the same forms."})
    label_column: str = field(default="label", metadata={"help": "Label column (classification, sentence-embedding)."})
    label_scale: float = field(
        default=5.0, metadata={"help": "sentence-embedding: labels are divided by this (STS-B: 5)."}
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use at most this many evaluation examples."})
    exact: bool = field(default=False, metadata={"help": "Fine-tune with exact softmax attention (the baseline)."})
    evaluate_exact: bool = field(
        default=True, metadata={"help": "Measure an exact-attention model on the eval data first (the reference)."}
    )
    evaluate_only: bool = field(
        default=False, metadata={"help": "Only measure the metric (exact and FAVOR+); no training, nothing saved."}
    )
    reference_model: str | None = field(
        default=None,
        metadata={
            "help": "Checkpoint whose exact-attention metric is the reference (default: --model with exact "
            "attention; give the original source when --model is the output of attention transfer)."
        },
    )
    distill_from: str | None = field(
        default=None,
        metadata={
            "help": "causal-lm: distil from this checkpoint run with exact attention (the original model): "
            "the loss adds KL(teacher ‖ student) on the next-token distributions."
        },
    )
    distill_alpha: float = field(
        default=0.5, metadata={"help": "Weight of the KL term; cross-entropy gets 1 − this (1: KL alone)."}
    )
    distill_temperature: float = field(default=1.0, metadata={"help": "Softmax temperature of the KL term."})
    lora_r: int | None = field(
        default=None,
        metadata={
            "help": "Train LoRA adapters of this rank (peft) instead of every weight; they are merged into the "
            "saved checkpoint."
        },
    )
    lora_alpha: float | None = field(default=None, metadata={"help": "LoRA scale numerator (default: 2 × --lora_r)."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Modules LoRA adapts (default: the linear layers of the attention modules)."}
    )


def parse(argv):
    parser = HfArgumentParser((FinetuneArguments, TrainingArguments), description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add_performer_arguments(parser, redraw_interval=0)
    recipe, training, favor = parser.parse_args_into_dataclasses(argv)
    return recipe, training, performer_config_from_args(favor)


def prepare(recipe: FinetuneArguments, tokenizer, source: str, split: str, limit: int | None, *,
            positions_seed: int | None = None):
    """The tokenized examples of one data source for the task; with ``positions_seed``, causal-LM blocks get
    ``--positions_up_to`` position ids drawn from it (training data only)."""
    rows = load_split(
        source,
        split=split,
        column_names=recipe.column_names,
        dataset_config=recipe.dataset_config,
        sample_by="document" if recipe.task == "causal-lm" else "line",  # a .txt file is one text stream
    )
    if recipe.task == "causal-lm":
        blocks = token_blocks(text_examples(rows, recipe.text_columns), tokenizer, recipe.max_length)
        blocks = blocks.select(range(min(limit, len(blocks)))) if limit else blocks
        if positions_seed is not None and recipe.positions_up_to:
            blocks = skipped_positions(blocks, recipe.positions_up_to, seed=positions_seed)
        return blocks.map(lambda block: {"labels": block["input_ids"]})
    rows = rows.select(range(min(limit, len(rows)))) if limit else rows
    if recipe.task == "sentence-embedding":
        first, second = recipe.text_columns

        def encode(batch):
            a = tokenizer([str(t) for t in batch[first]], truncation=True, max_length=recipe.max_length)
            b = tokenizer([str(t) for t in batch[second]], truncation=True, max_length=recipe.max_length)
            labels = [float(score) / recipe.label_scale for score in batch[recipe.label_column]]
            return {**{f"a_{k}": v for k, v in a.items()}, **{f"b_{k}": v for k, v in b.items()}, "labels": labels}

    else:

        def encode(batch):
            texts = [[str(text) for text in batch[column]] for column in recipe.text_columns]
            encoded = tokenizer(*texts, truncation=True, max_length=recipe.max_length)
            return {**encoded, "labels": [int(label) for label in batch[recipe.label_column]]}

    return rows.map(encode, batched=True, remove_columns=rows.column_names)


def metric_function(task: str):
    """``compute_metrics`` for the task, backed by the local evaluate module (values ×100 except perplexity)."""
    _, module, key, _ = TASKS[task]
    metric = evaluate.load(str(METRICS / module))

    def compute(prediction):
        predictions, labels = prediction.predictions, prediction.label_ids
        if task == "causal-lm":
            return metric.compute(predictions=predictions[labels[:, 1:] != -100].tolist())
        if task == "classification":
            predictions = predictions.argmax(-1)
        return {key: 100 * metric.compute(predictions=predictions.tolist(), references=labels.tolist())[key]}

    return compute


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood ``[batch, seq-1]`` of the next token: causal-lm evaluation keeps
    these instead of ``[batch, seq, vocab]`` logits."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="none"
    )


def build_trainer(recipe, training, model, tokenizer, train, held_out, callbacks=(), teacher=None):
    common = {
        "model": model,
        "args": training,
        "train_dataset": train,
        "eval_dataset": held_out,
        "processing_class": tokenizer,
        "compute_metrics": metric_function(recipe.task),
        "callbacks": list(callbacks),
        "optimizers": (optimizer_for(model, training, recipe.far_weight_learning_rate), None),
    }
    if recipe.task == "sentence-embedding":
        training.label_names = ["labels"]
        return SentenceEmbeddingTrainer(data_collator=SentencePairCollator(tokenizer), **common)
    if recipe.task == "causal-lm" and teacher is not None:
        return DistillationTrainer(
            teacher=teacher,
            alpha=recipe.distill_alpha,
            temperature=recipe.distill_temperature,
            data_collator=default_data_collator,
            preprocess_logits_for_metrics=token_nll,
            **common,
        )
    if recipe.task == "causal-lm":
        return Trainer(data_collator=default_data_collator, preprocess_logits_for_metrics=token_nll, **common)
    return Trainer(data_collator=DataCollatorWithPadding(tokenizer), **common)


def main(argv: list[str] | None = None) -> None:
    recipe, training, settings = parse(argv)
    refuse_unjoined_processes(training)
    if training.resume_from_checkpoint:
        training.resume_from_checkpoint = resume_checkpoint(training.output_dir, training.resume_from_checkpoint)
    training.remove_unused_columns = False
    for option, given in (("--distill_from", recipe.distill_from), ("--positions_up_to", recipe.positions_up_to)):
        if given and recipe.task != "causal-lm":
            raise ValueError(f"{option} is for causal-LM training blocks: it needs --task causal-lm, not {recipe.task}")
    auto_class, _, key, hub_task = TASKS[recipe.task]
    training.metric_for_best_model = key
    extra = {}
    if recipe.task == "classification":
        extra["num_labels"] = len(
            set(
                load_split(
                    recipe.train_data,
                    split=recipe.split,
                    column_names=recipe.column_names,
                    dataset_config=recipe.dataset_config,
                )[recipe.label_column]
            )
        )

    tokenizer = AutoTokenizer.from_pretrained(recipe.model)
    if recipe.exact:
        model = load_teacher(recipe.model, auto_class, **extra).train()
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    else:
        model = load_student(recipe.model, settings, auto_class, **extra)
        prepare_padding(tokenizer, model)
    with training.main_process_first(desc="tokenizing"):
        train = prepare(recipe, tokenizer, recipe.train_data, recipe.split, recipe.max_train_samples,
                        positions_seed=training.seed)
        held_out = prepare(recipe, tokenizer, recipe.eval_data, recipe.eval_split, recipe.max_eval_samples)

    reference = None
    metric_key = f"eval_{key}"
    if recipe.evaluate_exact and not recipe.exact:
        exact = load_teacher(recipe.reference_model or recipe.model, auto_class, **extra)
        if not recipe.reference_model:
            exact.load_state_dict(model.state_dict(), strict=False)  # the same freshly initialised head, if any
        reference = build_trainer(recipe, training, exact, tokenizer, train, held_out).evaluate()[metric_key]
        del exact
    curve = RecoveryCurve(
        training.output_dir, key, reference, title=f"{recipe.task}: {key} ({Path(recipe.model).name})"
    )
    if recipe.lora_r:
        model = with_lora(model, recipe.lora_r, recipe.lora_alpha, recipe.lora_target_modules)
    teacher = load_teacher(recipe.distill_from, auto_class) if recipe.distill_from else None
    trainer = build_trainer(recipe, training, model, tokenizer, train, held_out, [curve], teacher)
    before = trainer.evaluate()[metric_key]
    if recipe.evaluate_only:
        if trainer.is_world_process_zero():
            print(f"{key}: {before:.2f} ({'exact' if recipe.exact else 'FAVOR+'} attention)" + shown(reference))
        return
    trainer.train(resume_from_checkpoint=training.resume_from_checkpoint)
    after = final_metric(trainer, metric_key)
    if not recipe.exact:
        check_features_agree(trainer)
    if not trainer.is_world_process_zero():
        return
    curve.write()
    result = {
        "task_type": hub_task,
        **card_dataset(recipe.eval_data, recipe.eval_split, recipe.eval_dataset_name),
        "metric_type": key,
        "metric_value": after,
    }
    if reference is not None:
        result["source_metric_value"] = reference
    model = merged(trainer.accelerator.unwrap_model(trainer.model))
    if recipe.exact:
        model.save_pretrained(training.output_dir)
        tokenizer.save_pretrained(training.output_dir)
        (Path(training.output_dir) / "eval_results.json").write_text(json.dumps([result], indent=2) + "\n")
    else:
        stage = Stage(
            recipe=f"{recipe.task} fine-tuning",
            trained=trained(recipe),
            data=card_dataset(recipe.train_data, recipe.split)["dataset_name"],
            steps=trainer.state.global_step,
            eval_data=result["dataset_name"],
            metric=key,
            before=before,
            after=after,
        )
        provenance = provenance_of(recipe.model, recipe.base_model).with_stage(stage)
        save_recovered(model, tokenizer, training.output_dir, provenance=provenance, eval_results=[result])
    print(f"{key}: {before:.2f} before fine-tuning, {after:.2f} after{shown(reference)}; saved {training.output_dir}")


def trained(recipe: FinetuneArguments) -> str:
    """What fine-tuning trained and against what, for the model card."""
    what = f"LoRA adapters (r={recipe.lora_r}), merged" if recipe.lora_r else "all weights"
    if recipe.distill_from:
        what += (
            f", distilled from {Path(recipe.distill_from).name} with exact attention "
            f"(KL weight {recipe.distill_alpha}, temperature {recipe.distill_temperature})"
        )
    return what


def shown(reference: float | None) -> str:
    return "" if reference is None else f"; exact attention: {reference:.2f}"


if __name__ == "__main__":
    main(sys.argv[1:])
