"""Axis styling shared by the plots of the length sweeps (op_speed, op_memory, model_speed)."""

from __future__ import annotations


def style_length_axes(ax, lengths: list[int], ylabel: str, title: str | None = None) -> None:
    """Label a log-log axis whose x is the sequence length: the measured ``lengths`` as ticks (no minor
    ticks, which would hide them), a grid and a legend.  Call after plotting."""
    ax.set_xticks(lengths, [str(n) for n in lengths], rotation=45)
    ax.minorticks_off()
    if title:
        ax.set_title(title)
    ax.set_xlabel("sequence length L")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
