"""Command-line options of the recipes for :class:`PerformerConfig`, generated from its fields.

Each field ``x`` becomes ``--favor-x`` with the field's own help text, so a new setting appears in
every recipe's ``--help`` without editing the recipes (the prefix keeps ``--favor-seed`` apart from
``TrainingArguments``' ``--seed``).
"""

from __future__ import annotations

import argparse
import dataclasses

from hf_performer.config import PerformerConfig

PREFIX = "favor_"


def add_performer_arguments(parser: argparse.ArgumentParser, **defaults) -> None:
    """Add a "FAVOR+" group with one ``--favor-<field>`` option per :class:`PerformerConfig` field.

    ``defaults`` overrides field defaults for this recipe (e.g. ``redraw_interval=0``).
    """
    group = parser.add_argument_group("FAVOR+ settings (used when --model is not already a FAVOR+ checkpoint)")
    for field in dataclasses.fields(PerformerConfig):
        default = defaults.get(field.name, field.default)
        kind = {bool: _boolean}.get(type(field.default), type(field.default))
        group.add_argument(
            f"--{PREFIX}{field.name}".replace("_", "-"),
            dest=PREFIX + field.name,
            type=kind,
            default=default,
            help=f"{field.metadata['help']} (default: {default})",
        )


def performer_config_from_args(namespace: argparse.Namespace) -> PerformerConfig:
    """The :class:`PerformerConfig` given by the ``--favor-*`` options of a parsed namespace."""
    return PerformerConfig(**{f.name: getattr(namespace, PREFIX + f.name) for f in dataclasses.fields(PerformerConfig)})


def _boolean(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
