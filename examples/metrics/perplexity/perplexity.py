"""Perplexity from per-token negative log-likelihoods, as a local ``evaluate`` metric.

The Hub's ``perplexity`` module loads a model by id and scores texts itself; a recipe already has
the model's losses, so this one takes them:

    evaluate.load("examples/metrics/perplexity").compute(predictions=[nll_1, nll_2, ...])
    → {"perplexity": exp(mean nll)}   (one natural-log NLL per predicted token)
"""

import math

import datasets
import evaluate

_DESCRIPTION = "exp of the mean per-token negative log-likelihood (natural log) of a language model."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of float): the negative log-likelihood of every predicted token.
Returns:
    perplexity (float): exp(mean(predictions)).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Perplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("float64")}),
        )

    def _compute(self, predictions):
        return {"perplexity": math.exp(sum(predictions) / len(predictions))}
