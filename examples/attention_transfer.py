"""Attention transfer: teach a FAVOR+ model to reproduce its softmax attention, layer by layer.

Stage one of recovery.  Teacher: ``--model`` with exact attention (sdpa), frozen.  Student: the
same checkpoint converted to FAVOR+ (or as saved, if it is already FAVOR+).  The loss is the mean
over layers of the MSE between the two attention outputs on unlabelled text
(:mod:`hf_performer.recovery.attention_transfer`); no labels are used.  Afterwards run
``examples/finetune.py --model OUTPUT_DIR`` for the task (the chain the README recommends).

    python examples/attention_transfer.py --model CHECKPOINT --data Salesforce/wikitext --dataset_config wikitext-2-raw-v1 \\
        --output_dir out/transfer --max_steps 300 [--train_what attention|all|features|attention+features] [--favor-nb-features 256]
    accelerate launch examples/attention_transfer.py ...         # several processes / GPUs (add --bf16 on GPU;
                                                                  # on CPUs --use_cpu true)
    python examples/attention_transfer.py ... --resume_from_checkpoint last   # continue an interrupted run

OUTPUT_DIR receives ``checkpoint-*`` folders while training and, at the end, the FAVOR+ checkpoint
(weights and features, tokenizer, exported model code, README.md card with the final held-out
MSE), ``recovery.json`` (the original model and this stage, which fine-tuning extends),
``eval_results.json`` (the card's format) and ``recovery_curve.{json,png}``
(held-out MSE against the step).  Every option of ``transformers.TrainingArguments`` is accepted.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from datasets import Dataset
from transformers import AutoTokenizer, DataCollatorWithPadding, HfArgumentParser, TrainingArguments

import hf_performer  # noqa: F401  (registers FAVOR+)
from hf_performer.recovery.arguments import RecipeArguments, add_performer_arguments, performer_config_from_args
from hf_performer.recovery.attention_transfer import TRAINABLE, AttentionTransferTrainer, select_trainable
from hf_performer.recovery.checkpoints import (
    auto_class_for,
    load_student,
    load_teacher,
    prepare_padding,
    save_recovered,
)
from hf_performer.recovery.curves import RecoveryCurve
from hf_performer.recovery.data import card_dataset, load_split, skipped_positions, text_examples, token_blocks, tokenized
from hf_performer.recovery.provenance import Stage, provenance_of
from hf_performer.recovery.training import (
    check_features_agree,
    final_metric,
    optimizer_for,
    refuse_unjoined_processes,
    resume_checkpoint,
)


@dataclass(kw_only=True)
class TransferArguments(RecipeArguments):
    data: str = field(
        metadata={"help": "Unlabelled training text: a .txt/.tsv/.csv/.json(l) file or a Hub dataset id."}
    )
    eval_data: str | None = field(
        default=None,
        metadata={"help": "Held-out text in the same forms (default: the last --eval_fraction of --data)."},
    )
    eval_fraction: float = field(
        default=0.05, metadata={"help": "Share of --data held out when --eval_data is not given."}
    )
    blocks: bool = field(
        default=False,
        metadata={
            "help": "Read the text as one stream (a .txt file as written) cut into --max_length-token blocks, "
            "as causal LMs are trained and evaluated, instead of one example per line or cell."
        },
    )
    max_eval_samples: int | None = field(default=256, metadata={"help": "Use at most this many held-out texts."})
    train_what: str = field(
        default="attention",
        metadata={
            "choices": tuple(TRAINABLE),
            "help": f"What trains, one of {tuple(TRAINABLE)}: every weight; the attention modules' projections; "
            "only the random features ω, made learnable (generalised attention: fitted, no longer unbiased); or "
            "the projections and ω together.",
        },
    )
    teacher_forcing: bool = field(
        default=True,
        metadata={
            "help": "Feed each student attention layer the teacher's input to that layer, so the loss measures "
            "the attention approximation alone (LoLCATs). With it only attention weights receive gradients."
        },
    )
    far_share_weight: float = field(
        default=0.0,
        metadata={
            "help": "Hybrid attention (--favor-local-window > 0, FAVOR+ far part): add this times the error of the "
            "FAVOR+ part on its own keys (far-only attention output and log of their total weight, per layer) to the "
            "loss, which otherwise weighs the far part only by its small share of the normaliser. 0: off."
        },
    )


def parse(argv: list[str] | None = None):
    parser = HfArgumentParser((TransferArguments, TrainingArguments), description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add_performer_arguments(parser, redraw_interval=0)
    recipe, training, favor = parser.parse_args_into_dataclasses(argv)
    return recipe, training, performer_config_from_args(favor)


def training_texts(recipe: TransferArguments, tokenizer, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Tokenized training and held-out examples: one per line/cell, or ``--blocks`` of one stream (training blocks
    with ``--positions_up_to`` position ids drawn from ``seed``)."""
    if recipe.positions_up_to and not recipe.blocks:
        raise ValueError("--positions_up_to moves the positions of causal-LM blocks: it needs --blocks true")
    sample_by = "document" if recipe.blocks else "line"

    def examples(source: str, split: str) -> Dataset:
        rows = load_split(
            source,
            split=split,
            column_names=recipe.column_names,
            dataset_config=recipe.dataset_config,
            sample_by=sample_by,
        )
        rows = text_examples(rows, recipe.text_columns)
        return token_blocks(rows, tokenizer, recipe.max_length) if recipe.blocks else rows

    train = examples(recipe.data, recipe.split)
    if recipe.eval_data:
        held_out = examples(recipe.eval_data, recipe.eval_split)
    else:
        cut = len(train) - max(1, int(len(train) * recipe.eval_fraction))
        train, held_out = train.select(range(cut)), train.select(range(cut, len(train)))
    if recipe.max_train_samples:
        train = train.select(range(min(recipe.max_train_samples, len(train))))
    if recipe.max_eval_samples:
        held_out = held_out.select(range(min(recipe.max_eval_samples, len(held_out))))
    if recipe.blocks:
        if recipe.positions_up_to:
            train = skipped_positions(train, recipe.positions_up_to, seed=seed)
        return train, held_out
    return tokenized(train, tokenizer, recipe.max_length), tokenized(held_out, tokenizer, recipe.max_length)


def main(argv: list[str] | None = None) -> None:
    recipe, training, settings = parse(argv)
    refuse_unjoined_processes(training)
    if training.resume_from_checkpoint:
        training.resume_from_checkpoint = resume_checkpoint(training.output_dir, training.resume_from_checkpoint)
    if recipe.train_what == "all":
        training.ddp_find_unused_parameters = True  # layers past the last attention get no gradient
    training.remove_unused_columns = False

    auto_class = auto_class_for(recipe.model)
    tokenizer = AutoTokenizer.from_pretrained(recipe.model)
    teacher = load_teacher(recipe.model, auto_class)
    student = load_student(recipe.model, settings, auto_class)
    prepare_padding(tokenizer, student)
    trainable = select_trainable(student, recipe.train_what)

    with training.main_process_first(desc="tokenizing"):
        train, held_out = training_texts(recipe, tokenizer, training.seed)

    curve = RecoveryCurve(
        training.output_dir, "loss", title=f"attention transfer: held-out attention MSE ({recipe.model})"
    )
    trainer = AttentionTransferTrainer(
        model=student,
        teacher=teacher,
        teacher_forcing=recipe.teacher_forcing,
        far_share_weight=recipe.far_share_weight,
        args=training,
        train_dataset=train,
        eval_dataset=held_out,
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
        callbacks=[curve],
        optimizers=(optimizer_for(student, training, recipe.far_weight_learning_rate), None),
    )
    if trainer.is_world_process_zero():
        print(f"training {trainable:,} weights ({recipe.train_what}) on {len(train):,} texts; teacher: exact attention")
    before = trainer.evaluate()["eval_loss"]
    trainer.train(resume_from_checkpoint=training.resume_from_checkpoint)
    after = final_metric(trainer, "eval_loss")
    check_features_agree(trainer)
    if trainer.is_world_process_zero():
        curve.write()
        evaluated_on = card_dataset(
            recipe.eval_data or recipe.data,
            recipe.eval_split if recipe.eval_data else recipe.split,
            recipe.eval_dataset_name,
        )
        results = [
            {
                "task_type": "attention-transfer",
                "task_name": "Attention transfer (mean per-layer MSE to softmax attention, lower is better)",
                **evaluated_on,
                "metric_type": "mse",
                "metric_value": after,
                "source_metric_value": 0.0,
            }
        ]
        stage = Stage(
            recipe="attention transfer",
            trained=TRAINABLE[recipe.train_what],
            data=card_dataset(recipe.data, recipe.split)["dataset_name"],
            steps=trainer.state.global_step,
            eval_data=evaluated_on["dataset_name"],
            metric="attention MSE",
            before=before,
            after=after,
        )
        save_recovered(
            trainer.accelerator.unwrap_model(trainer.model),
            tokenizer,
            training.output_dir,
            provenance=provenance_of(recipe.model, recipe.base_model).with_stage(stage),
            eval_results=results,
        )
        print(f"held-out attention MSE: {before:.4g} before, {after:.4g} after; saved {training.output_dir}")


if __name__ == "__main__":
    main(sys.argv[1:])
