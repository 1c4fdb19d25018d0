"""Where a recovered checkpoint comes from: the original model and every training stage since conversion.

Saved as ``recovery.json`` next to the weights.  A recipe that starts from a recovered checkpoint
(fine-tuning after attention transfer) reads it and adds its own stage, so the final card names the
original model — not the intermediate folder — and lists every stage with its data, steps and
metric before and after::

    {"original": "sentence-transformers/all-MiniLM-L6-v2", "base_model": "sentence-transformers/all-MiniLM-L6-v2",
     "stages": [{"recipe": "attention transfer", "trained": "the attention projections", "data": "stsb/train.tsv",
                 "steps": 120, "eval_data": "STS-B dev", "metric": "mse", "before": 0.31, "after": 0.04}]}
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import ModelCard
from transformers.utils import cached_file

PROVENANCE_FILE = "recovery.json"


@dataclass(frozen=True)
class Stage:
    """One training run of a recipe on a FAVOR+ model."""

    recipe: str  # e.g. "attention transfer", "sentence-embedding fine-tuning"
    trained: str  # which weights trained, e.g. "the attention projections", "all weights"
    data: str  # the training data as the card names it (Hub id, or a file's folder/name)
    steps: int
    eval_data: str
    metric: str
    before: float
    after: float


@dataclass(frozen=True)
class Provenance:
    """The original model (``original``: a Hub id, or a local folder's parent and name, never its path;
    ``base_model``: its Hub id for the card's metadata, when known) and the stages trained since its conversion to FAVOR+."""

    original: str
    base_model: str | None = None
    stages: tuple[Stage, ...] = field(default_factory=tuple)

    def with_stage(self, stage: Stage) -> Provenance:
        return dataclasses.replace(self, stages=(*self.stages, stage))

    def save(self, folder: str | Path) -> None:
        text = json.dumps(dataclasses.asdict(self), indent=2) + "\n"
        (Path(folder) / PROVENANCE_FILE).write_text(text, encoding="utf-8")


def provenance_of(checkpoint: str, base_model: str | None = None) -> Provenance:
    """The provenance of a recipe's ``--model``: what a recovered checkpoint records, else ``checkpoint``
    itself as the original.

    ``base_model`` (a Hub id) names the original for the card when ``checkpoint`` is a local folder; a
    Hub id is its own base model, and a converted checkpoint's card already names its base model.
    """
    local = Path(checkpoint).is_dir()
    recorded = cached_file(checkpoint, PROVENANCE_FILE, _raise_exceptions_for_missing_entries=False)
    if recorded is not None:
        saved = json.loads(Path(recorded).read_text(encoding="utf-8"))
        stages = tuple(Stage(**stage) for stage in saved["stages"])
        return Provenance(saved["original"], base_model or saved["base_model"], stages)
    if not local:
        return Provenance(checkpoint, base_model or checkpoint)
    folder = Path(checkpoint).resolve()
    converted_from = _converted_from(folder)
    named = base_model or converted_from
    return Provenance(named or f"{folder.parent.name}/{folder.name}", named)


def _converted_from(folder: Path) -> str | None:
    """The ``base_model`` that ``hf-performer convert`` wrote into a converted checkpoint's card (a stock
    checkpoint's own card may name *its* base model, which is not the one converted, so it is not read)."""
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    card = folder / "README.md"
    if "performer_config" not in config or not card.is_file():
        return None
    return ModelCard.load(card, ignore_metadata_errors=True).data.base_model
