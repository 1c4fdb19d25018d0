"""The README.md model card of a converted checkpoint, rendered from ``model_cards/performer.md``.

The template sits at the top of the repository and ships inside the package as
``hf_performer.model_cards`` (pyproject's ``package-dir``), so an installed wheel reads it with
``importlib.resources``.

The card's YAML header is Hub metadata built with ``huggingface_hub.ModelCardData`` (library,
tags, base model, pipeline tag, license, evaluation results as ``model-index``), so the Hub
shows the checkpoint correctly without hand work.

Evaluation results (``--eval-results file.json``) are a JSON list of objects whose keys are the
fields of ``huggingface_hub.EvalResult`` (``task_type``, ``dataset_type``, ``dataset_name``,
``metric_type``, ``metric_value``, optionally ``dataset_split`` and the others), plus an
optional ``source_metric_value``: the same metric for the source model, shown next to it::

    [{"task_type": "text-classification", "dataset_type": "glue", "dataset_name": "SST-2",
      "dataset_split": "validation", "metric_type": "accuracy", "metric_value": 0.91,
      "source_metric_value": 0.92}]
"""

from __future__ import annotations

import dataclasses
import json
from importlib import resources
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from hf_performer.config import PerformerConfig, __version__

CARD_TEMPLATE = "performer.md"


def card_template() -> str:
    """The text of the card template: the installed package's copy, or the repository's own file when the
    package runs from a checkout that is not installed (``conversion/convert.py``, ``PYTHONPATH=.``)."""
    try:
        template = resources.files("hf_performer.model_cards") / CARD_TEMPLATE
    except ModuleNotFoundError:
        template = Path(__file__).resolve().parents[2] / "model_cards" / CARD_TEMPLATE
    return template.read_text(encoding="utf-8")

TAGS = ["performer", "favor+", "linear-attention", "hf-performer"]

PIPELINE_TAGS = {
    "AutoModel": "feature-extraction",
    "AutoModelForCausalLM": "text-generation",
    "AutoModelForMaskedLM": "fill-mask",
    "AutoModelForSequenceClassification": "text-classification",
    "AutoModelForTokenClassification": "token-classification",
    "AutoModelForQuestionAnswering": "question-answering",
}
"""Auto class of the converted head → Hub ``pipeline_tag`` (heads without a Hub task get none)."""

_SOURCE_VALUE = "source_metric_value"


def read_eval_results(path: str | Path) -> list[dict]:
    """The entries of an evaluation results file, each checked by constructing an ``EvalResult``."""
    entries = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
        raise ValueError(
            f"{path}: evaluation results must be a JSON list of objects (see hf_performer.export.model_card)"
        )
    for index, entry in enumerate(entries):
        try:
            EvalResult(**{k: v for k, v in entry.items() if k != _SOURCE_VALUE})
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path}: entry {index} is not a valid evaluation result: {error}") from None
    return entries


def model_card(
    model_id: str,
    *,
    stock_model_type: str,
    auto_class: str,
    settings: PerformerConfig,
    base_model: str | None = None,
    source_name: str,
    license: str | None = None,
    language: str | list[str] | None = None,
    has_tokenizer: bool = True,
    eval_results: list[dict] | None = None,
    stages: list[dict] | None = None,
    sentence_transformers_files: list[str] | None = None,
) -> ModelCard:
    """The card of a FAVOR+ checkpoint converted from ``base_model`` (a Hub id) or the folder ``source_name``.

    ``model_id`` is the name the load snippets use (the Hub repository, or the output folder's name).
    ``stages`` are the training runs since conversion (the fields of
    :class:`hf_performer.recovery.provenance.Stage`): without them the weights are the source's, unchanged.
    ``sentence_transformers_files`` are the source's sentence-transformers files kept next to the weights.
    """
    eval_results = eval_results or []
    data = ModelCardData(
        library_name="transformers",
        tags=TAGS + [stock_model_type],
        base_model=base_model,
        pipeline_tag=PIPELINE_TAGS.get(auto_class),
        license=license,
        language=language,
        model_name=model_id,
        eval_results=[EvalResult(**{k: v for k, v in e.items() if k != _SOURCE_VALUE}) for e in eval_results] or None,
    )
    source_description = (
        f"[`{base_model}`](https://huggingface.co/{base_model})" if base_model else f"The checkpoint `{source_name}`"
    )
    rows = [
        {
            "task": e["task_type"],
            "dataset": e["dataset_name"],
            "split": e.get("dataset_split") or "",
            "metric": e["metric_type"],
            "value": e["metric_value"],
            "source_value": e.get(_SOURCE_VALUE, ""),
        }
        for e in eval_results
    ]
    return ModelCard.from_template(
        data,
        template_str=card_template(),
        model_id=model_id,
        source_description=source_description,
        version=__version__,
        settings=dataclasses.asdict(settings),
        auto_class=auto_class,
        has_tokenizer=has_tokenizer,
        eval_rows=rows,
        has_source_values=any(_SOURCE_VALUE in e for e in eval_results),
        stages=stages or [],
        sentence_transformers_files=sentence_transformers_files or [],
    )
