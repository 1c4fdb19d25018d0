"""Spearman rank correlation, as a local ``evaluate`` metric (no Hub download).

evaluate.load("examples/metrics/spearman").compute(predictions=[...], references=[...])
→ {"spearmanr": ρ}   (ρ in [-1, 1]; STS-B tables usually print 100·ρ)
"""

import datasets
import evaluate
from scipy.stats import spearmanr

_DESCRIPTION = "Spearman rank correlation between predicted and reference scores (e.g. STS-B similarity)."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of float): predicted scores, e.g. cosine similarities of sentence embeddings.
    references (list of float): gold scores.
Returns:
    spearmanr (float): Spearman's ρ.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Spearman(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("float64"), "references": datasets.Value("float64")}
            ),
        )

    def _compute(self, predictions, references):
        return {"spearmanr": float(spearmanr(predictions, references).statistic)}
