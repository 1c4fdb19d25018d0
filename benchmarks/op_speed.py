"""Attention-op speed: hf-performer FAVOR+ vs SDPA vs performer-pytorch, measured side by side.

One process, same threads, same inputs (fp32, batch 1, 8 heads, head dim 64, nb_features 256 by
default); each cell is the median of ``--repeats`` timed runs after one warm-up.  Prints a table with
the ratios and writes a CSV.

    python benchmarks/op_speed.py --lengths 4096 16384 --csv benchmarks/results/op_speed.csv

performer-pytorch (``pip install -e .[bench]``) is optional; its causal CPU path is very slow, so it is
only run up to ``--performer-pytorch-causal-max`` tokens.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from hf_performer.favor import favor_attention, orthogonal_random_matrix


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def providers(heads_dim: int, nb_features: int, causal: bool, with_performer_pytorch: bool):
    """name → callable(q, k, v) for [B, H, L, D] inputs."""
    projection = orthogonal_random_matrix(nb_features, heads_dim, generator=torch.Generator().manual_seed(0))
    found = {
        "hf-performer": lambda q, k, v: favor_attention(q, k, v, projection, causal=causal)[0],
        "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
    }
    if with_performer_pytorch:
        from performer_pytorch import FastAttention

        attention = FastAttention(dim_heads=heads_dim, nb_features=nb_features, causal=causal)
        found["performer-pytorch"] = lambda q, k, v: attention(q, k, v)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384], help="(default: 4096 16384)")
    parser.add_argument("--heads", type=int, default=8, help="(default: 8)")
    parser.add_argument("--head-dim", type=int, default=64, help="(default: 64)")
    parser.add_argument("--nb-features", type=int, default=256, help="(default: 256)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per cell (default: 3)")
    parser.add_argument("--no-performer-pytorch", action="store_true", help="skip performer-pytorch")
    parser.add_argument("--performer-pytorch-causal-max", type=int, default=4096, help="(default: 4096)")
    parser.add_argument("--csv", type=Path, default=None, help="write the results here")
    args = parser.parse_args()

    torch.manual_seed(0)
    rows = []
    print(f"fp32, batch 1, {args.heads} heads, head dim {args.head_dim}, m={args.nb_features}, "
          f"{torch.get_num_threads()} threads, forward only, median of {args.repeats}")
    for mode in ("bidirectional", "causal"):
        causal = mode == "causal"
        for length in args.lengths:
            q, k, v = (torch.randn(1, args.heads, length, args.head_dim) for _ in range(3))
            use_pp = not args.no_performer_pytorch and (not causal or length <= args.performer_pytorch_causal_max)
            seconds = {}
            with torch.no_grad():
                for name, fn in providers(args.head_dim, args.nb_features, causal, use_pp).items():
                    seconds[name] = median_seconds(lambda: fn(q, k, v), args.repeats)
            ours = seconds["hf-performer"]
            cells = "  ".join(f"{n} {s:.3f}s ({s / ours:.1f}x)" for n, s in seconds.items())
            print(f"{mode:<14}L={length:<7}{cells}")
            rows += [dict(mode=mode, length=length, provider=n, seconds=f"{s:.4f}", speedup_of_hf_performer=f"{s / ours:.2f}")
                     for n, s in seconds.items()]
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with open(args.csv, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
