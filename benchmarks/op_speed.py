"""Attention-op speed: hf-performer FAVOR+ (pure and hybrid) vs SDPA vs performer-pytorch, measured side by side.

Same threads, same inputs (fp32, batch 1, 8 heads, head dim 64, nb_features 256 by default).  Each length
runs in ``--processes`` fresh processes, one after another (default 3; ``0``: every length in this one process).
In each, the matmul peak is measured first, then every (mode, pass, provider) cell in turn, so the ratios compare
runs taken moments apart on the same (shared) machine.  Each cell is the best of ``--repeats`` runs after a
warm-up (a single run when one takes more than ``--slow-seconds``); the CSV holds the median over the processes,
with their fastest and slowest (``seconds_min``, ``seconds_max``), and the ratios, rates and crossovers come from
the medians.  Why several processes: FAVOR+'s time depends on what the process allocated before, and runs in one
process inherit that history (``RESULTS.md``).  Writes ``results/op_speed.csv``, ``op_speed_run.json``
(conditions, crossover lengths, extrapolation fit), ``op_speed.png`` and ``op_flop_rate.png``.

    python benchmarks/op_speed.py                     # the full sweep, 256 … 16384 tokens
    python benchmarks/op_speed.py --lengths 512 1024  # a quick check
    python benchmarks/op_speed.py --threads 1 --name op_speed_1thread   # one thread: see RESULTS.md
    python benchmarks/op_speed.py --providers hf-performer hf-performer-hybrid sdpa performer-pytorch \
        --passes forward --lengths 1024 2048 4096 8192 16384 --name op_speed_hybrid   # the hybrid (issue 13)

The hybrid (``hf-performer-hybrid``: exact softmax within ``--local-window`` tokens and to the first
``--sink-tokens``, FAVOR+ beyond) is measured only when asked for; its crossover lengths vs SDPA go to
the run file next to pure FAVOR+'s.

performer-pytorch's CPU causal path splits every input into 128 chunks and builds an ``[L/128, m, d]``
tensor per chunk (all kept for backward: GBs at 2048 tokens), so its causal forward+backward only runs
up to ``--performer-pytorch-causal-backward-max`` tokens (forward: ``--performer-pytorch-causal-max``).
Beyond that its time is estimated with ``fixed + per_token · L`` fitted on its measured lengths ≥ 1024
(a fixed cost for the 128 chunks plus O(L) work, as its code does; fit in the run file) and marked
``measured=no`` in the CSV.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys

import numpy as np
import torch

from flop_counts import favor_forward_flops, matmul_peak_gflops
from measurement import RESULTS, Run, run_child, seconds_per_call
from plotting import style_length_axes
from providers import (
    HYBRID, MODES, PASSES, PROVIDERS, add_causal_chunk_argument, add_hybrid_arguments, add_op_shape_arguments, attention_call,
    attention_op, random_qkv,
)


def performer_pytorch_cap(args, mode: str, pass_: str) -> int:
    if mode == "bidirectional":
        return max(args.lengths)
    return args.performer_pytorch_causal_max if pass_ == "forward" else args.performer_pytorch_causal_backward_max


def measure_length(length: int, args) -> list[dict]:
    """Every (mode, pass, provider) cell at one length, in this process, after the matmul peak: rows with
    ``seconds`` (:func:`seconds_per_call`) and ``matmul_peak_gflops``."""
    peak = matmul_peak_gflops()
    q, k, v = random_qkv(length, args.heads, args.head_dim)
    rows = []
    for mode in MODES:
        for pass_ in args.passes:
            for provider in args.providers:
                if provider == "performer-pytorch" and length > performer_pytorch_cap(args, mode, pass_):
                    continue
                op = attention_op(provider, args.head_dim, args.nb_features, mode == "causal", args.causal_chunk_size,
                                  args.local_window, args.sink_tokens)
                seconds = seconds_per_call(attention_call(op, q, k, v, pass_), args.repeats, args.slow_seconds)
                rows.append(dict(mode=mode, pass_=pass_, length=length, provider=provider, seconds=seconds,
                                 matmul_peak_gflops=peak))
    return rows


def median_over_processes(length: int, args) -> list[dict]:
    """:func:`measure_length` in ``args.processes`` fresh processes, one after another → per cell the median
    ``seconds`` and matmul peak, with ``seconds_min``, ``seconds_max`` and ``processes`` (those that finished).

    Why fresh processes: the op's speed depends on where its per-block tensors fall, i.e. on what the process
    allocated before. Pure causal FAVOR+ at 2,048 tokens took 30 ms in some processes and 36–41 ms in others
    (``RESULTS.md``), and in one process every length measured after another inherits that history. The median of a
    few processes is the figure a rerun reproduces."""
    command = [sys.executable, __file__, *sys.argv[1:], "--child", str(length)]
    runs = [run_child(command, args.child_timeout, f"L={length}, process {i + 1}") for i in range(args.processes)]
    runs = [run for run in runs if run is not None]
    if not runs:
        raise SystemExit(f"op_speed: no process finished the cells at L={length}")
    rows = []
    for cells in zip(*runs):
        seconds = [cell["seconds"] for cell in cells]
        rows.append(dict(cells[0], seconds=statistics.median(seconds), seconds_min=min(seconds), seconds_max=max(seconds),
                         processes=len(seconds), matmul_peak_gflops=statistics.median(c["matmul_peak_gflops"] for c in cells)))
    return rows


def crossover_length(lengths, sdpa_over_favor) -> str:
    """Shortest length from which FAVOR+ stays faster than SDPA, interpolated in log-log space."""
    pairs = list(zip(lengths, sdpa_over_favor))
    for i, (length, ratio) in enumerate(pairs):
        if all(r >= 1 for _, r in pairs[i:]):
            if i == 0:
                return f"≤ {length}"
            (l0, r0), (l1, r1) = pairs[i - 1], pairs[i]
            t = -math.log(r0) / (math.log(r1) - math.log(r0))
            return f"{math.exp(math.log(l0) + t * (math.log(l1) - math.log(l0))):.0f}"
    return f"> {lengths[-1]}"


def plot(rows, path_times, path_rate) -> None:
    ticks = sorted({r["length"] for r in rows})
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8.5), sharex=True)
    for (i, mode), (j, pass_) in ((a, b) for a in enumerate(MODES) for b in enumerate(PASSES)):
        ax = axes[i][j]
        for provider, color in zip(PROVIDERS + (HYBRID,), ("C0", "C1", "C2", "C3")):
            for measured, style in (("yes", "o-"), ("no", "x--")):
                cells = [r for r in rows if (r["mode"], r["pass"], r["provider"], r["measured"]) == (mode, pass_, provider, measured)]
                if cells:
                    label = provider + ("" if measured == "yes" else " (extrapolated)")
                    ax.loglog([r["length"] for r in cells], [r["seconds"] for r in cells], style, color=color, label=label)
        style_length_axes(ax, ticks, "seconds", f"{mode}, {pass_}")
    fig.suptitle("Attention op time (fp32, batch 1, 8 heads, head dim 64, m = 256, 2 shared CPU cores)")
    fig.tight_layout()
    fig.savefig(path_times, dpi=110)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode, color in zip(MODES, ("C0", "C3")):
        cells = [r for r in rows if (r["mode"], r["pass"], r["provider"]) == (mode, "forward", "hf-performer")]
        ax.semilogx([r["length"] for r in cells], [r["favor_gflops"] for r in cells], "o-", color=color, label=f"FAVOR+ {mode} forward")
    cells = [r for r in rows if (r["mode"], r["pass"], r["provider"]) == ("bidirectional", "forward", "hf-performer")]
    ax.semilogx([r["length"] for r in cells], [r["matmul_peak_gflops"] for r in cells], "k--", label="matmul peak (2048³), same run")
    ax.semilogx([r["length"] for r in cells], [r["matmul_peak_gflops"] / 2 for r in cells], "k:", label="50 % of peak (goal)")
    ax.set_xlabel("sequence length L")
    ax.set_ylabel("GFLOP/s")
    ax.set_ylim(bottom=0)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Achieved FLOP rate of the FAVOR+ forward")
    fig.tight_layout()
    fig.savefig(path_rate, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096, 8192, 16384])
    add_op_shape_arguments(parser)
    add_causal_chunk_argument(parser)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per cell (default: 3)")
    parser.add_argument("--slow-seconds", type=float, default=5.0, help="a warm-up slower than this is the measurement")
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS + (HYBRID,),
                        help=f"(default: {' '.join(PROVIDERS)}; hf-performer is always measured)")
    parser.add_argument("--passes", nargs="+", default=list(PASSES), choices=PASSES, help="(default: both)")
    add_hybrid_arguments(parser)
    parser.add_argument("--performer-pytorch-causal-max", type=int, default=16384)
    parser.add_argument("--performer-pytorch-causal-backward-max", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    parser.add_argument("--name", default="op_speed", help="results/<name>.csv, .png (default: op_speed)")
    parser.add_argument("--processes", type=int, default=3,
                        help="fresh processes per length, each timing every cell; the CSV has their median and range "
                             "(default: 3; 0: every length in this one process)")
    parser.add_argument("--child-timeout", type=float, default=3600, help="seconds for one process's cells")
    parser.add_argument("--child", type=int, metavar="LENGTH", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.lengths.sort()
    args.providers = ["hf-performer"] + [p for p in args.providers if p != "hf-performer"]  # the ratios' reference
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child is not None:
        print(json.dumps(measure_length(args.child, args)))
        return

    run = Run(args.name)
    rows = []
    spread = (lambda r: f" [{r['seconds_min']:.3f}–{r['seconds_max']:.3f}]") if args.processes else (lambda r: "")
    for length in args.lengths:
        measured = median_over_processes(length, args) if args.processes else measure_length(length, args)
        for mode in MODES:
            for pass_ in args.passes:
                cells = [dict(row, measured="yes") for row in measured if (row["mode"], row["pass_"]) == (mode, pass_)]
                ours = next(row for row in cells if row["provider"] == "hf-performer")
                flops = args.heads * favor_forward_flops(
                    length, args.head_dim, args.nb_features, mode == "causal", args.causal_chunk_size
                )["total"]
                favor_rate = flops / ours["seconds"] / 1e9 if pass_ == "forward" else float("nan")
                rows += [dict(row, favor_gflops=favor_rate) for row in cells]
                text = "  ".join(f"{r['provider']} {r['seconds']:.3f}s{spread(r)} ({r['seconds'] / ours['seconds']:.1f}x)"
                                 for r in cells)
                peak = ours["matmul_peak_gflops"]
                print(f"L={length:<6} {mode:<13} {pass_:<16} {text}"
                      + (f"  FAVOR+ {favor_rate:.1f} GFLOP/s = {favor_rate / peak:.0%} of peak {peak:.0f}" if pass_ == "forward" else ""),
                      flush=True)
    for row in rows:
        row["pass"] = row.pop("pass_")

    fits = {}
    if "performer-pytorch" in args.providers:
        for mode in MODES:
            for pass_ in args.passes:
                measured = [r for r in rows if (r["mode"], r["pass"], r["provider"]) == (mode, pass_, "performer-pytorch")]
                missing = [length for length in args.lengths if length > performer_pytorch_cap(args, mode, pass_)]
                fit_points = [r for r in measured if r["length"] >= 1024]
                if not missing or len(fit_points) < 2:
                    continue
                slope, intercept = np.polyfit([r["length"] for r in fit_points], [r["seconds"] for r in fit_points], 1)
                last = fit_points[-1]["seconds"]
                fits[f"{mode} {pass_}"] = dict(seconds_per_token=slope, fixed_seconds=intercept, fitted_on=[r["length"] for r in fit_points])
                rows += [dict(mode=mode, length=length, provider="performer-pytorch", measured="no", **{"pass": pass_},
                              seconds=intercept + slope * length if slope > 0 else last) for length in missing]

    crossovers, hybrid_crossovers = {}, {}
    for row in rows:
        ours = next(r for r in rows if (r["mode"], r["pass"], r["length"], r["provider"]) == (row["mode"], row["pass"], row["length"], "hf-performer"))
        row["time_over_hf_performer"] = row["seconds"] / ours["seconds"]
    if "sdpa" in args.providers:
        for mode in MODES:
            for pass_ in args.passes:
                cells = sorted((r["length"], r["time_over_hf_performer"]) for r in rows if (r["mode"], r["pass"], r["provider"]) == (mode, pass_, "sdpa"))
                crossovers[f"{mode} {pass_}"] = crossover_length([c[0] for c in cells], [c[1] for c in cells])
                if HYBRID in args.providers:
                    seconds = {(r["length"], r["provider"]): r["seconds"] for r in rows if (r["mode"], r["pass"]) == (mode, pass_)}
                    hybrid_crossovers[f"{mode} {pass_}"] = crossover_length(
                        [c[0] for c in cells], [seconds[c[0], "sdpa"] / seconds[c[0], HYBRID] for c in cells])
        print("crossover length vs SDPA (FAVOR+ faster from):", crossovers)
        if hybrid_crossovers:
            print(f"crossover length vs SDPA ({HYBRID} faster from):", hybrid_crossovers)

    order = ["mode", "pass", "length", "provider", "seconds", "time_over_hf_performer", "measured", "favor_gflops", "matmul_peak_gflops"]
    if args.processes:
        order += ["seconds_min", "seconds_max", "processes"]
    rows = [{key: (f"{row[key]:.5g}" if isinstance(row.get(key), float) else row.get(key, "")) for key in order} for row in rows]
    hybrid = dict(hybrid_crossover_length_vs_sdpa=hybrid_crossovers,
                  hybrid=dict(local_window=args.local_window, sink_tokens=args.sink_tokens)) if HYBRID in args.providers else {}
    run.finish(rows, crossover_length_vs_sdpa=crossovers, performer_pytorch_extrapolation=fits, **hybrid,
               processes_per_length=args.processes,
               shape=dict(batch=1, heads=args.heads, head_dim=args.head_dim, nb_features=args.nb_features,
                          causal_chunk_size=args.causal_chunk_size, dtype="float32"))
    plot([{k: (float(v) if k in ("seconds", "favor_gflops", "matmul_peak_gflops") and v != "" else v) for k, v in r.items()} for r in rows],
         RESULTS / f"{args.name}.png", RESULTS / f"{args.name.replace('op_speed', 'op_flop_rate')}.png")


if __name__ == "__main__":
    main()
