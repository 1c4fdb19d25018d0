"""Command-line options the recipes share: the checkpoint and its data (:class:`RecipeArguments`),
and the ``--favor-*`` options of :class:`PerformerConfig`, generated from its fields; and those of the scripts that
table several checkpoints on one text (:func:`add_text_and_models_arguments`).

Each field ``x`` becomes ``--favor-x`` with the field's own help text, so a new setting appears in
every recipe's ``--help`` without editing the recipes (the prefix keeps ``--favor-seed`` apart from
``TrainingArguments``' ``--seed``).  The options given (and the recipe's own defaults) are kept apart
from the ones left out: a stock ``--model`` gets ``PerformerConfig`` defaults for those, a converted
one keeps its saved settings, and only the settings named are checked against what it was drawn with.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from hf_performer.config import PerformerConfig

PREFIX = "favor_"


@dataclass(kw_only=True)
class RecipeArguments:
    """What every recipe reads: the checkpoint, how its data is read, and how the card names both.

    A recipe subclasses it with its own data options (where the training and held-out text come from)
    and parses it with ``transformers.HfArgumentParser`` (keyword-only, so a subclass may add required fields).
    """

    model: str = field(metadata={"help": "Checkpoint (folder or Hub id): stock BERT/GPT-2/Llama, or FAVOR+."})
    dataset_config: str | None = field(default=None, metadata={"help": "Configuration name of a Hub dataset."})
    split: str = field(default="train", metadata={"help": "Split of a Hub dataset for the training data."})
    eval_split: str = field(default="validation", metadata={"help": "Split of a Hub dataset for --eval_data."})
    column_names: list[str] | None = field(
        default=None, metadata={"help": "Column names of a headerless TSV/CSV (e.g. STS-B's 7 columns)."}
    )
    text_columns: list[str] = field(
        default_factory=lambda: ["text"],
        metadata={"help": "Columns holding text (a sentence pair for finetune.py's sentence-embedding task)."},
    )
    max_length: int = field(
        default=128,
        metadata={"help": "Tokens per example (longer ones are truncated); the block length of causal-lm and --blocks."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use at most this many training examples."})
    positions_up_to: int | None = field(
        default=None,
        metadata={
            "help": "Causal-LM training blocks get position ids that jump once by a random skip, reaching up to this "
            "(PoSE, arXiv 2309.10400): a model trained on --max_length-token blocks sees the relative distances (and "
            "rotary angles) of a context this long. Training blocks only; held-out text keeps positions 0, 1, … "
            "(default: no jump)."
        },
    )
    far_weight_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "Learning rate of the hybrid's per-head far weights (PerformerConfig far_weight; default: "
            "--learning_rate). Adam moves a parameter by about the learning rate per step, so a log weight "
            "trained at 1e-4 barely moves in a few hundred steps: give it its own, e.g. 1e-2."
        },
    )
    base_model: str | None = field(
        default=None,
        metadata={
            "help": "Hub id of the original model, for the card's base_model when --model is a local folder "
            "(default: --model if it is a Hub id, or what a converted or recovered --model records)."
        },
    )
    eval_dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "What the evaluation data is, for the model card (e.g. 'STS-B dev'); default: its Hub id, "
            "or a file's folder and name (never its path)."
        },
    )


def add_performer_arguments(parser: argparse.ArgumentParser, **defaults) -> None:
    """Add a "FAVOR+" group with one ``--favor-<field>`` option per :class:`PerformerConfig` field.

    ``defaults`` overrides field defaults for this recipe (e.g. ``redraw_interval=0``).
    """
    group = parser.add_argument_group(
        "FAVOR+ settings (a FAVOR+ --model keeps the features it was converted with; only --favor-redraw-interval, "
        "--favor-causal-chunk-size, --favor-local-window, --favor-sink-tokens, --favor-far-part and --favor-far-weight may change)"
    )
    for field in dataclasses.fields(PerformerConfig):
        kind = {bool: _boolean}.get(type(field.default), type(field.default))
        group.add_argument(
            f"--{PREFIX}{field.name}".replace("_", "-"),
            dest=PREFIX + field.name,
            type=kind,
            default=defaults.get(field.name),  # None: not asked for
            help=f"{field.metadata['help']} (default: {defaults.get(field.name, field.default)})",
        )


def performer_config_from_args(namespace: argparse.Namespace) -> dict:
    """The settings asked for with ``--favor-*`` options or by the recipe's defaults, as a dict of
    :class:`PerformerConfig` fields (what ``load_student`` and ``performer_config=`` take)."""
    values = {f.name: getattr(namespace, PREFIX + f.name) for f in dataclasses.fields(PerformerConfig)}
    return {name: value for name, value in values.items() if value is not None}


def add_text_and_models_arguments(parser: argparse.ArgumentParser, models_help: str) -> None:
    """``--text`` (a .txt file read as one stream, or a Hub dataset id with ``--dataset_config`` and ``--split``),
    ``--models NAME=CHECKPOINT ...`` (a list of ``(name, checkpoint)``) and ``--out`` (a file for the table)."""
    parser.add_argument("--text", required=True, help="A .txt file (one stream) or a Hub dataset id.")
    parser.add_argument("--dataset_config", default=None, help="Configuration of a Hub dataset.")
    parser.add_argument("--split", default="test", help="Split of a Hub dataset.")
    parser.add_argument("--models", type=_named, nargs="+", required=True, help=models_help)
    parser.add_argument("--out", type=Path, default=None, help="Write the Markdown table here too.")


def _named(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=CHECKPOINT, got {text!r}")
    return name, path


def _boolean(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
