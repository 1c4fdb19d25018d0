"""Where does FAVOR+ hurt?  Per-layer relative error of FAVOR+ attention outputs against exact attention.

For a FAVOR+ model and the same weights with exact (sdpa) attention, on given texts, per attention
layer (the outputs :mod:`hf_performer.recovery.attention_transfer` trains on):

- ``isolated``: both layers get the exact model's input to that layer, so the number is the error
  of the attention approximation alone;
- ``end_to_end``: both models run freely, so errors of earlier layers compound into later ones
  (what the model's outputs actually see).

Relative error = ``‖favor − exact‖ / ‖exact‖`` (Frobenius norms over all real tokens).
"""

from __future__ import annotations

from pathlib import Path

import torch

from hf_performer.recovery.attention_transfer import recorded_attention


@torch.no_grad()
def layer_errors(favor, exact, batches) -> dict[str, list[float]]:
    """``{"isolated": [...], "end_to_end": [...]}``: relative error per attention layer over ``batches``.

    ``favor`` is a Performer model, ``exact`` the same weights with exact attention; ``batches``
    yields tokenized model inputs (``input_ids``, ``attention_mask``).
    """
    classes = favor.attention_classes
    squared = {"isolated": {}, "end_to_end": {}}
    reference: dict[int, float] = {}
    for batch in batches:
        mask = batch["attention_mask"].unsqueeze(-1).float()
        with recorded_attention(exact, classes) as (exact_in, exact_out):
            exact(**batch)
        for mode, forced in (("isolated", exact_in), ("end_to_end", None)):
            with recorded_attention(favor, classes, forced) as (_, favor_out):
                favor(**batch)
            for layer, output in favor_out.items():
                error = (((output.float() - exact_out[layer].float()) * mask) ** 2).sum()
                squared[mode][layer] = squared[mode].get(layer, 0.0) + float(error)
        for layer, output in exact_out.items():
            reference[layer] = reference.get(layer, 0.0) + float(((output.float() * mask) ** 2).sum())
    return {
        mode: [(errors[layer] / reference[layer]) ** 0.5 for layer in sorted(errors)]
        for mode, errors in squared.items()
    }


def error_table(errors_by_model: dict[str, dict[str, list[float]]]) -> str:
    """A Markdown table: one row per layer, isolated and end-to-end error columns per model."""
    names = list(errors_by_model)
    header = "| layer | " + " | ".join(f"{n} isolated | {n} end-to-end" for n in names) + " |"
    lines = [header, "|---" * (1 + 2 * len(names)) + "|"]
    layers = len(next(iter(errors_by_model.values()))["isolated"])
    for layer in range(layers):
        cells = [f"{errors_by_model[n][mode][layer]:.3f}" for n in names for mode in ("isolated", "end_to_end")]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_errors(errors_by_model: dict[str, dict[str, list[float]]], path: str | Path, title: str = "") -> None:
    """Relative error against layer, one colour per model; solid isolated, dashed end-to-end."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    for index, (name, errors) in enumerate(errors_by_model.items()):
        colour = f"C{index}"
        layers = range(len(errors["isolated"]))
        axes.plot(layers, errors["isolated"], marker="o", color=colour, label=f"{name} (isolated)")
        axes.plot(layers, errors["end_to_end"], marker="x", linestyle="--", color=colour, label=f"{name} (end to end)")
    axes.set_xlabel("attention layer")
    axes.set_ylabel("relative error ‖favor − exact‖ / ‖exact‖")
    axes.set_title(title or "FAVOR+ attention output error per layer")
    axes.legend(fontsize="small", loc="best")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
