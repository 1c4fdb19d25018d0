"""The ``hf-performer`` command: ``hf-performer convert SRC OUT --nb-features 256 ...`` and
``hf-performer push OUT user/name`` (upload a converted folder, e.g. after a failed ``--push-to-hub``).

A user error ends with ``hf-performer COMMAND: error: MESSAGE`` on stderr and exit status 2, as
argparse does for bad options; no traceback.

The FAVOR+ options are generated from :class:`PerformerConfig`'s fields (name, default, help),
so the command line always offers exactly the settings the config has.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from hf_performer.config import FAR_PARTS, PerformerConfig
from hf_performer.export.conversion import ConversionError, convert, push
from hf_performer.favor.features import FEATURE_MAPS, FEATURE_SCALINGS, KERNELS
from hf_performer.models.registry import FAMILIES

_CHOICES = {"kernel": sorted(KERNELS), "feature_scaling": FEATURE_SCALINGS, "far_part": FAR_PARTS,
            "feature_map": FEATURE_MAPS}

CONVERT_DESCRIPTION = (
    "Convert a BERT, GPT-2 or Llama checkpoint (any head) to FAVOR+ attention. OUT receives the weights with "
    "their random features, the model code for trust_remote_code=True loading without hf-performer, the "
    "tokenizer and a README.md model card. OUT is written to a staging folder and moved into place when complete."
)


def add_performer_options(parser: argparse.ArgumentParser) -> None:
    """``--nb-features``, ``--kernel``, ... : one option per :class:`PerformerConfig` field."""
    group = parser.add_argument_group("FAVOR+ settings (PerformerConfig)")
    for field in dataclasses.fields(PerformerConfig):
        flag = "--" + field.name.replace("_", "-")
        help_text = field.metadata.get("help", "")
        if isinstance(field.default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default, help=help_text)
        else:
            group.add_argument(
                flag, type=type(field.default), default=field.default, choices=_CHOICES.get(field.name), help=help_text
            )


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "src",
        metavar="SRC",
        help=f"local checkpoint folder or Hub model id; model types: {', '.join(FAMILIES)} (any head)",
    )
    parser.add_argument("out", metavar="OUT", help="folder to write the FAVOR+ checkpoint to (must be empty or absent)")
    add_performer_options(parser)
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT once the new one is complete")
    parser.add_argument(
        "--base-model",
        metavar="HUB_ID",
        help="Hub id of SRC for the card's base_model metadata (unset: SRC itself when it is a Hub id)",
    )
    parser.add_argument(
        "--eval-results",
        metavar="FILE",
        help="JSON list of evaluation results to show in the card (huggingface_hub.EvalResult fields, plus an "
        "optional source_metric_value)",
    )
    parser.add_argument(
        "--push-to-hub",
        metavar="REPO_ID",
        help="upload OUT to this Hub repository once written (token from HF_TOKEN or `hf auth login`)",
    )
    parser.add_argument("--private", action="store_true", help="create the --push-to-hub repository as private")


def add_push_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", metavar="OUT", help="a folder written by `hf-performer convert`")
    parser.add_argument("repo_id", metavar="REPO_ID", help="Hub repository to upload to, e.g. user/name (created if absent)")
    parser.add_argument("--private", action="store_true", help="create the repository as private")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-performer", description="Performer (FAVOR+) attention for transformers.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    convert_parser = commands.add_parser(
        "convert",
        help="convert a checkpoint to FAVOR+",
        description=CONVERT_DESCRIPTION,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_convert_arguments(convert_parser)
    push_parser = commands.add_parser(
        "push",
        help="upload a converted checkpoint folder to the Hub",
        description="Upload OUT, written by `hf-performer convert`, to a Hub repository without converting again "
        "(token from HF_TOKEN or `hf auth login`).",
    )
    add_push_arguments(push_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hf-performer`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "push":
            print(f"Uploaded: {push(args.out, args.repo_id, args.private)}", file=sys.stderr)
            return 0
        names = [field.name for field in dataclasses.fields(PerformerConfig)]
        convert(
            args.src,
            args.out,
            {name: getattr(args, name) for name in names},
            overwrite=args.overwrite,
            base_model=args.base_model,
            eval_results=args.eval_results,
            push_to_hub=args.push_to_hub,
            private=args.private,
        )
    except ConversionError as error:
        print(f"hf-performer {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
