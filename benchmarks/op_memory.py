"""Attention-op peak memory vs length: one fresh process per (provider, mode, pass, length).

Each child process builds its inputs, runs the op once at 256 tokens (so libraries and thread pools
are loaded), records its peak resident set size (``ru_maxrss``) as the baseline, runs the op once at
the measured length, and reports the rise of the peak: the memory the op needs beyond its inputs.
The parent fits ``memory ∝ L^b`` on lengths ≥ ``--fit-from`` (``b = 1``: linear).  Writes
``results/op_memory.csv``, ``op_memory_run.json`` (exponents) and ``op_memory.png``.

    python benchmarks/op_memory.py                       # 2048 … 65536 tokens
    python benchmarks/op_memory.py --lengths 1024 2048   # a quick check
    python benchmarks/op_memory.py --providers hf-performer-hybrid sdpa --name op_memory_hybrid   # the hybrid (W=64 S=4)
    python benchmarks/op_memory.py --providers hf-performer sdpa --passes forward   # forward only

SDPA and performer-pytorch stop at the ``--*-max`` lengths (time, and performer-pytorch's causal
``[L, m, d]`` tensors: it needed GBs at 2048 tokens).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from measurement import RESULTS, Run, peak_rss_bytes, run_child
from plotting import style_length_axes
from providers import (
    HYBRID, MODES, PASSES, PROVIDERS, add_causal_chunk_argument, add_hybrid_arguments, add_op_shape_arguments, attention_call, attention_op, import_favor_without_transformers, random_qkv,
)

MIB = 2**20


def child(provider: str, mode: str, pass_: str, length: int, args) -> None:
    """Runs in the fresh process: prints ``{"peak_rise_bytes": …, "seconds": …}``."""
    import_favor_without_transformers()
    heads, head_dim = args.heads, args.head_dim
    op = attention_op(provider, head_dim, args.nb_features, mode == "causal", args.causal_chunk_size, args.local_window,
                      args.sink_tokens)
    attention_call(op, *random_qkv(256, heads, head_dim), pass_)()
    q, k, v = random_qkv(length, heads, head_dim)
    call = attention_call(op, q, k, v, pass_)
    baseline = peak_rss_bytes()
    start = time.perf_counter()
    call()
    seconds = time.perf_counter() - start
    print(json.dumps(dict(peak_rise_bytes=peak_rss_bytes() - baseline, seconds=seconds)))


def measure(provider: str, mode: str, pass_: str, length: int, args) -> dict | None:
    command = [sys.executable, __file__, "--child", provider, mode, pass_, str(length),
               "--heads", str(args.heads), "--head-dim", str(args.head_dim), "--nb-features", str(args.nb_features),
               "--causal-chunk-size", str(args.causal_chunk_size), "--local-window", str(args.local_window),
               "--sink-tokens", str(args.sink_tokens)]
    return run_child(command, args.child_timeout, f"{provider} {mode} {pass_} L={length}")


def cap(args, provider: str, mode: str, pass_: str) -> int:
    if provider in ("hf-performer", HYBRID):
        return max(args.lengths)
    if provider == "sdpa":
        return args.sdpa_max
    if mode == "bidirectional":
        return args.performer_pytorch_max
    return args.performer_pytorch_causal_max if pass_ == "forward" else args.performer_pytorch_causal_backward_max


def exponent(lengths, values) -> float:
    return float(np.polyfit(np.log(lengths), np.log(values), 1)[0])


def plot(rows, path) -> None:
    ticks = sorted({r["length"] for r in rows})
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8.5), sharex=True, sharey=True)
    for (i, mode), (j, pass_) in ((a, b) for a in enumerate(MODES) for b in enumerate(PASSES)):
        ax = axes[i][j]
        for provider, color in zip(PROVIDERS + (HYBRID,), ("C0", "C1", "C2", "C3")):
            cells = [r for r in rows if (r["mode"], r["pass"], r["provider"]) == (mode, pass_, provider)]
            if cells:
                ax.loglog([r["length"] for r in cells], [r["peak_mib"] for r in cells], "o-", color=color, label=provider)
        ours = [r for r in rows if (r["mode"], r["pass"], r["provider"]) == (mode, pass_, "hf-performer")]
        if ours:
            last = ours[-1]
            xs = np.array([ours[0]["length"], last["length"]])
            ax.loglog(xs, last["peak_mib"] * xs / last["length"], "k:", label="∝ L (reference)")
        style_length_axes(ax, ticks, "peak memory beyond inputs (MiB)", f"{mode}, {pass_}")
    fig.suptitle("Attention op peak memory (fp32, batch 1, 8 heads, head dim 64, m = 256; ru_maxrss rise, one process per point)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768, 65536])
    add_op_shape_arguments(parser)
    add_causal_chunk_argument(parser)
    add_hybrid_arguments(parser)
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS + (HYBRID,))
    parser.add_argument("--passes", nargs="+", default=list(PASSES), choices=PASSES, help="(default: both)")
    parser.add_argument("--name", default="op_memory", help="results/<name>.csv, .png (default: op_memory)")
    parser.add_argument("--sdpa-max", type=int, default=16384)
    parser.add_argument("--performer-pytorch-max", type=int, default=16384, help="bidirectional (default: 16384)")
    parser.add_argument("--performer-pytorch-causal-max", type=int, default=4096)
    parser.add_argument("--performer-pytorch-causal-backward-max", type=int, default=2048)
    parser.add_argument("--fit-from", type=int, default=4096, help="fit the exponent on lengths ≥ this (default: 4096)")
    parser.add_argument("--child-timeout", type=float, default=300)
    parser.add_argument("--child", nargs=4, metavar=("PROVIDER", "MODE", "PASS", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        provider, mode, pass_, length = args.child
        child(provider, mode, pass_, int(length), args)
        return

    args.lengths.sort()
    run = Run(args.name)
    rows = []
    for mode in MODES:
        for pass_ in args.passes:
            for provider in args.providers:
                for length in (n for n in args.lengths if n <= cap(args, provider, mode, pass_)):
                    result = measure(provider, mode, pass_, length, args)
                    if result is None:
                        continue
                    rows.append({"mode": mode, "pass": pass_, "provider": provider, "length": length,
                                 "peak_mib": result["peak_rise_bytes"] / MIB, "seconds_single_run": result["seconds"]})
                    print(f"{mode:<13} {pass_:<16} {provider:<17} L={length:<6} {rows[-1]['peak_mib']:9.1f} MiB  "
                          f"({result['seconds']:.2f} s)", flush=True)
    exponents = {}
    for mode in MODES:
        for pass_ in args.passes:
            for provider in args.providers:
                cells = [r for r in rows if (r["mode"], r["pass"], r["provider"]) == (mode, pass_, provider) and r["length"] >= args.fit_from]
                if len(cells) >= 2:
                    exponents[f"{provider} {mode} {pass_}"] = dict(
                        exponent=round(exponent([r["length"] for r in cells], [r["peak_mib"] for r in cells]), 3),
                        fitted_on=[r["length"] for r in cells])
    for name, fit in exponents.items():
        print(f"memory ∝ L^{fit['exponent']:.2f}  {name}  (lengths {fit['fitted_on']})")
    plot(rows, RESULTS / f"{args.name}.png")
    run.finish([{k: (f"{v:.5g}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows], memory_exponents=exponents,
               shape=dict(batch=1, heads=args.heads, head_dim=args.head_dim, nb_features=args.nb_features,
                          causal_chunk_size=args.causal_chunk_size, dtype="float32"))


if __name__ == "__main__":
    main()
