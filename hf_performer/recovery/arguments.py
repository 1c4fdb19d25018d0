"""Command-line options of the recipes for :class:`PerformerConfig`, generated from its fields.

Each field ``x`` becomes ``--favor-x`` with the field's own help text, so a new setting appears in
every recipe's ``--help`` without editing the recipes (the prefix keeps ``--favor-seed`` apart from
``TrainingArguments``' ``--seed``).  The options given (and the recipe's own defaults) are kept apart
from the ones left out: a stock ``--model`` gets ``PerformerConfig`` defaults for those, a converted
one keeps its saved settings, and only the settings named are checked against what it was drawn with.
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
    group = parser.add_argument_group(
        "FAVOR+ settings (a FAVOR+ --model keeps the settings it was converted with; only "
        "--favor-redraw-interval and --favor-causal-chunk-size may change them)"
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


def _boolean(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
