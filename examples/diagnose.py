"""Show where FAVOR+ hurts: per-layer relative error of FAVOR+ attention outputs vs exact attention.

For each ``--models`` checkpoint (a stock one is converted with the ``--favor-*`` settings; a FAVOR+
one, e.g. a recovered model, keeps its own features) the same weights are also run with exact
attention (or ``--exact-model``, e.g. the source of a recovered model), and on the given texts every
attention layer's output error is measured isolated
(both layers fed the exact input: the approximation alone) and end to end (errors compound).
Run it before and after recovery to see what attention transfer fixed::

    python examples/diagnose.py --models SRC out/transfer --exact-model SRC --labels converted transferred \\
        --texts examples/data/stsb_dev_300.tsv --column-names genre file year id score sentence1 sentence2 \\
        --text-column sentence1 --output out/diagnose

Writes ``OUTPUT.md`` (the table, also printed) and ``OUTPUT.png`` (error against layer per model).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from transformers import AutoTokenizer

import hf_performer  # noqa: F401  (registers FAVOR+)
from hf_performer.recovery.arguments import add_performer_arguments, performer_config_from_args
from hf_performer.recovery.checkpoints import auto_class_for, load_student, load_teacher, prepare_padding
from hf_performer.recovery.data import load_split, text_examples
from hf_performer.recovery.diagnose import error_table, layer_errors, plot_errors


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", required=True, help="Checkpoints to diagnose (stock or FAVOR+).")
    parser.add_argument(
        "--exact-model",
        default=None,
        help="Checkpoint run with exact attention as the reference for every model (default: each model's own "
        "weights; give the source checkpoint to measure recovered models against the original).",
    )
    parser.add_argument("--labels", nargs="+", default=None, help="Names of the models in the table and plot.")
    parser.add_argument("--texts", required=True, help="A .txt/.tsv/.csv/.json(l) file or a Hub dataset id.")
    parser.add_argument("--dataset-config", default=None, help="Configuration of a Hub dataset (e.g. glue's stsb).")
    parser.add_argument("--split", default="validation", help="Split of a Hub dataset (default: validation).")
    parser.add_argument("--column-names", nargs="+", default=None, help="Column names of a headerless TSV/CSV.")
    parser.add_argument("--text-column", default="text", help="Column holding the texts (default: text).")
    parser.add_argument("--rows", type=int, default=64, help="Texts to use (default: 64).")
    parser.add_argument("--max-length", type=int, default=128, help="Tokens per text (default: 128).")
    parser.add_argument("--batch-size", type=int, default=16, help="Texts per forward pass (default: 16).")
    parser.add_argument(
        "--output", default="diagnose", help="Path stem of OUTPUT.md and OUTPUT.png (default: diagnose)."
    )
    add_performer_arguments(parser, redraw_interval=0)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse(argv)
    settings = performer_config_from_args(args)
    rows = load_split(args.texts, split=args.split, column_names=args.column_names, dataset_config=args.dataset_config)
    texts = text_examples(rows, [args.text_column])["text"][: args.rows]
    errors_by_model = {}
    labels = args.labels or [Path(checkpoint).name for checkpoint in args.models]
    if len(labels) != len(args.models):
        raise SystemExit(f"--labels names {len(labels)} models but --models gives {len(args.models)}")
    for checkpoint, label in zip(args.models, labels):
        auto_class = auto_class_for(checkpoint)
        favor = load_student(checkpoint, settings, auto_class).eval()
        exact = load_teacher(args.exact_model or checkpoint, auto_class)
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        prepare_padding(tokenizer, favor)
        batches = (
            tokenizer(
                texts[i : i + args.batch_size],
                padding=True,
                truncation=True,
                max_length=args.max_length,
                return_tensors="pt",
            )
            for i in range(0, len(texts), args.batch_size)
        )
        errors_by_model[f"{label} m={favor.config.performer_config.nb_features}"] = layer_errors(favor, exact, batches)
    table = error_table(errors_by_model)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".md").write_text(
        f"Relative error ‖favor − exact‖ / ‖exact‖ of each attention layer's output on {len(texts)} texts of "
        f"{args.texts}.\n\n{table}\n",
        encoding="utf-8",
    )
    plot_errors(errors_by_model, output.with_suffix(".png"))
    print(table)
    print(f"wrote {output.with_suffix('.md')} and {output.with_suffix('.png')}")


if __name__ == "__main__":
    main()
