"""The recovery curve: a metric against the optimizer step, kept as JSON and drawn as a PNG.

:class:`RecoveryCurve` is a ``TrainerCallback``: every evaluation adds a point; at the end of
training (and at every evaluation, so an interrupted run still has its curve) the main process
writes ``recovery_curve.json`` (``[{"step": .., "<metric>": ..}, ...]``) and ``recovery_curve.png``
into the output folder.  A resumed run starts from the saved JSON, so its curve continues.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import TrainerCallback


class RecoveryCurve(TrainerCallback):
    """Record ``eval_<metric>`` at each evaluation; ``reference`` (e.g. the exact model) is drawn as a line."""

    def __init__(self, output_dir: str | Path, metric: str, reference: float | None = None, title: str = ""):
        self.folder = Path(output_dir)
        self.metric = metric
        self.reference = reference
        self.title = title
        saved = self.folder / "recovery_curve.json"
        self.points: list[dict] = json.loads(saved.read_text())["points"] if saved.is_file() else []

    def add(self, step: int, value: float) -> None:
        self.points = [p for p in self.points if p["step"] != step] + [{"step": step, self.metric: value}]
        self.points.sort(key=lambda p: p["step"])

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        key = f"eval_{self.metric}"
        if metrics and key in metrics:
            self.add(state.global_step, float(metrics[key]))
            if state.is_world_process_zero:
                self.write()

    def write(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        record = {"metric": self.metric, "reference": self.reference, "points": self.points}
        (self.folder / "recovery_curve.json").write_text(json.dumps(record, indent=2) + "\n")
        plot_curve(self.points, self.metric, self.folder / "recovery_curve.png", self.reference, self.title)


def plot_curve(points: list[dict], metric: str, path: Path, reference: float | None = None, title: str = "") -> None:
    """Draw ``metric`` against ``step`` (and the ``reference`` level, dashed) into the PNG ``path``.

    Values spanning more than a factor of 10 (a zero-shot perplexity of 1,500 recovering towards 20) get a
    log axis, where the late steps would otherwise sit flat on the floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    figure, axes = plt.subplots(figsize=(6, 4))
    axes.plot([p["step"] for p in points], [p[metric] for p in points], marker="o", label="FAVOR+")
    if reference is not None:
        axes.axhline(reference, linestyle="--", color="grey", label="exact attention")
    values = [p[metric] for p in points] + ([reference] if reference is not None else [])
    if min(values) > 0 and max(values) > 10 * min(values):
        axes.set_yscale("log")
        # plain numbers (200, not 2×10²); between decades only 2, 3 and 5 ×, so the labels do not crowd
        axes.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        axes.yaxis.set_minor_formatter(FuncFormatter(lambda value, _: f"{value:g}" if f"{value:.0e}"[0] in "235" else ""))
    axes.set_xlabel("optimizer step")
    axes.set_ylabel(metric)
    axes.set_title(title or f"recovery: {metric}")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
